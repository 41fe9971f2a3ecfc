"""Attack speed on LeNet5: IFGSM (the paper's 12 steps of 0.02) on 10,000 images against the
float model and its 8-bit twin (forward on the integer datapath, backward through the STE), and
DeepFool on 1,000 images, in one run.

    python benchmarks/attacks.py [--model lenet5.h5] [--images 10000] [--deepfool 1000]

Without --model a LeNet5 is trained for one epoch on the embedded sample. Images are the
sample's test images, repeated to the requested count. Each row is one timed run (these runs
are long enough that one is representative on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from fxsim import attacks, compress
from fxsim.bench import benchmark_model, sample_images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--deepfool", type=int, default=1_000)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model = benchmark_model(args.model)
    x, y = sample_images(args.images)
    q8 = compress.quantize_model(model, compress.quant_config(model, 8))
    attacks.ifgsm(model, x[:64], y[:64], steps=1)  # warm-up: JIT compilation
    attacks.ifgsm(q8, x[:64], y[:64], steps=1)

    rows = []
    for name, target, fn, n in (
        ("IFGSM 12 x 0.02, float32", model, attacks.ifgsm, len(x)),
        ("IFGSM 12 x 0.02, 8-bit integer datapath", q8, attacks.ifgsm, len(x)),
        ("DeepFool (top 10, overshoot 0.02), float32", model, attacks.deepfool,
         min(args.deepfool, len(x))),
    ):
        t0 = time.perf_counter()
        result = fn(target, x[:n], y[:n])
        seconds = time.perf_counter() - t0
        accuracy = float((target.predict(result.adversarial) == y[:n]).mean())
        rows.append({"run": name, "images": n, "seconds": seconds,
                     "success": float(result.success.mean()), "accuracy_after": accuracy})
    print(f"\nLeNet5, {os.cpu_count()} cores\n")
    print("| attack | images | seconds | success | accuracy after |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['images']:,} | {r['seconds']:.1f} | {r['success']:.3f} | "
              f"{r['accuracy_after']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
