"""Training speed of fxsim's float side: one LeNet5 epoch, and one forward+backward pass against
the float32 BLAS time of the GEMMs that pass needs, measured in the same run.

    python benchmarks/train.py [--images 60000] [--batch-size 64] [--repeats 5] [--json out.json]

The epoch uses synthetic images (random pixels, random labels): speed does not depend on
content. The "BLAS floor" times, with the same shapes, the GEMMs of the forward pass (W @ cols
per conv, x @ W.T per linear layer) and of the backward pass (dW for each, dX for all but the
first layer, whose input gradient training does not need), back to back, without im2col,
col2im, pooling or activations: what a perfect implementation on this BLAS would still spend.
"""

from __future__ import annotations

# isort: skip_file

import argparse
import json
import os
import statistics
import sys
import time

import fxsim  # noqa: F401  first: its thread settings must reach OpenBLAS before numpy loads
import numpy as np

from fxsim.bench import median_time
from fxsim.models import lenet5
from fxsim.train import TrainConfig, train


def blas_floor(batch: int, repeats: int, rng) -> float:
    """Median time of the forward and backward GEMMs of LeNet5 on ``batch`` images."""
    f32 = np.float32
    # (M, K) x (K, N) products of one training step: forward, dW, dX per layer
    convs = [(20, 25, batch * 24 * 24), (50, 500, batch * 8 * 8)]
    linears = [(batch, 800, 500), (batch, 500, 10)]
    shapes = []
    for i, (j, k, m) in enumerate(convs):
        shapes += [(j, k, m), (j, m, k)]  # W@cols, dY@cols.T
        if i:  # W.T@dY; training needs no gradient w.r.t. the images, so not for conv1
            shapes.append((k, j, m))
    for n, k, j in linears:
        shapes += [(n, k, j), (j, n, k), (n, j, k)]  # x@W.T, dY.T@x, dY@W
    arrays = [(rng.standard_normal((a, b), f32), rng.standard_normal((b, c), f32))
              for a, b, c in shapes]

    def run():
        for a, b in arrays:
            a @ b

    return median_time(run, repeats)


def step_time(batch: int, repeats: int, rng) -> float:
    model = lenet5()
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch)

    def run():
        model.loss_grads_logits(x, y, rng)

    return median_time(run, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    rows = []
    for batch in (args.batch_size, 256):
        t_step = step_time(batch, args.repeats, rng)
        t_blas = blas_floor(batch, args.repeats, rng)
        rows.append({"batch": batch, "fwd_bwd_s": t_step, "blas_floor_s": t_blas,
                     "ratio": t_step / t_blas})
        print(f"  batch {batch}: forward+backward {t_step * 1e3:.1f} ms, BLAS floor "
              f"{t_blas * 1e3:.1f} ms", file=sys.stderr)

    images = rng.random((args.images, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, args.images)
    model = lenet5()
    train(model, images[:512], labels[:512], TrainConfig(epochs=1, batch_size=args.batch_size))
    epochs = []
    for _ in range(2):
        t0 = time.perf_counter()
        train(model, images, labels, TrainConfig(epochs=1, batch_size=args.batch_size))
        epochs.append(time.perf_counter() - t0)
    epoch = statistics.median(epochs)

    print(f"\nLeNet5, {os.cpu_count()} cores\n")
    print("| measurement | time | note |")
    print("|---|---|---|")
    print(f"| one epoch, {args.images:,} images, batch {args.batch_size} | {epoch:.1f} s | "
          f"median of {len(epochs)} ({', '.join(f'{e:.1f}' for e in epochs)}) |")
    for r in rows:
        print(f"| forward+backward, batch {r['batch']} | {r['fwd_bwd_s'] * 1e3:.1f} ms | "
              f"{r['ratio']:.2f}x the BLAS floor of its GEMMs ({r['blas_floor_s'] * 1e3:.1f} ms)"
              f" |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"epoch_s": epochs, "images": args.images, "batch": args.batch_size,
                       "steps": rows}, f, indent=2)


if __name__ == "__main__":
    main()
