"""Bit-accurate LeNet5 inference speed: 10,000 images through the integer datapath, against
float32 inference of the same model, in one run.

    python benchmarks/inference.py [--model lenet5.h5] [--images 10000] [--repeats 3]

Rows: float32 (the model's own float forward), 8-bit with a wide accumulator, 8-bit with a
16-bit per-MAC saturating accumulator, and a 0.1-density (global magnitude) pruned 8-bit twin
run on the sparse kernel and on the dense kernel. Without --model a LeNet5 is trained for one
epoch on the embedded sample (the weights matter: they set the kernel path). Images are the
embedded sample's test images, repeated to the requested count.
"""

from __future__ import annotations

import argparse
import json
import os

from fxsim import compress
from fxsim.bench import benchmark_model, median_time, sample_images
from fxsim.models import lenet5


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model = benchmark_model(args.model)
    x, _ = sample_images(args.images)

    pruned = lenet5()
    for layer, source in zip(pruned.layers, model.layers, strict=True):
        layer.params = {k: v.copy() for k, v in source.params.items()}
    masks = compress.magnitude_masks(pruned, 0.1, scope="global")
    compress.apply_masks(pruned, masks)

    def quantised(m, masks=None, **options):
        kernel = options.pop("kernel", "auto")
        config = compress.quant_config(m, 8, kernel=kernel, **options)
        return compress.quantize_model(m, config, masks)

    runs = {
        "float32": lambda: model.predict(x, 1000),
        "8-bit, wide accumulator": quantised(model).run,
        "8-bit, 16-bit per_mac saturating": quantised(model, acc_bits=16,
                                                     acc_mode="per_mac").run,
        "8-bit, density 0.1, sparse kernel": quantised(pruned, masks, kernel="sparse").run,
        "8-bit, density 0.1, dense kernel": quantised(pruned, masks, kernel="dense").run,
    }
    rows = []
    for name, fn in runs.items():
        call = fn if name == "float32" else (lambda fn=fn: fn(x, 1000))
        seconds = median_time(call, args.repeats)
        rows.append({"run": name, "seconds": seconds})
    print(f"\nLeNet5 inference on {len(x):,} images, {os.cpu_count()} cores, batch 1000, "
          f"median of {args.repeats}\n")
    print("| run | seconds | images/s |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']:.2f} | {len(x) / r['seconds']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": len(x), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
