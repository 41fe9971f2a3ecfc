"""Bit-accurate inference speed: 10,000 LeNet5 images through the integer datapath, against
float32 inference of the same model, and 1,000 CifarNet images both ways, in one run.

    python benchmarks/inference.py [--model lenet5.h5] [--images 10000] [--repeats 3]

Rows: float32 (the model's own float forward), 8-bit with a wide accumulator, 8-bit with a
16-bit per-MAC saturating accumulator, and a 0.1-density (global magnitude) pruned 8-bit twin
run on the sparse kernel and on the dense kernel. Without --model a LeNet5 is trained for one
epoch on the embedded sample (the weights matter: they set the kernel path). Images are the
embedded sample's test images, repeated to the requested count. CifarNet has random weights
and images (no CIFAR-10 offline), a tenth as many.
"""

from __future__ import annotations

# isort: skip_file

import argparse
import json
import os

import fxsim  # noqa: F401  first: its thread settings must reach OpenBLAS before numpy loads
import numpy as np

from fxsim import compress
from fxsim.bench import benchmark_model, median_time, sample_images
from fxsim.models import cifarnet, lenet5


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
        rows.append({"run": name, "images": len(x), "seconds": seconds})

    # CifarNet (random weights and images: no CIFAR-10 offline; the weights only set the
    # kernel path through their bounds) on a tenth as many images
    cifar = cifarnet()
    cifar_q = quantised(cifar)
    xc = np.random.default_rng(0).random((max(1, len(x) // 10), 3, 32, 32), dtype=np.float32)
    for name, call in (("CifarNet float32", lambda: cifar.predict(xc, 1000)),
                       ("CifarNet 8-bit, wide accumulator",
                        lambda: cifar_q.run(xc, 1000))):
        rows.append({"run": name, "images": len(xc),
                     "seconds": median_time(call, args.repeats)})

    print(f"\nInference, {os.cpu_count()} cores, batch 1000, median of {args.repeats}\n")
    print("| run | images | seconds | images/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['images']:,} | {r['seconds']:.2f} | "
              f"{r['images'] / r['seconds']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": len(x), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
