"""Training speed of fxsim's float side: one LeNet5 epoch, and one forward+backward pass (LeNet5
at the batch size and at 256, CifarNet at the batch size) against the float32 BLAS time of the
GEMMs that pass needs, measured in the same run.

    python benchmarks/train.py [--images 60000] [--batch-size 64] [--repeats 5] [--json out.json]

The epoch uses synthetic images (random pixels, random labels): speed does not depend on
content. The "BLAS floor" times, with the same shapes (taken from the model's own forward pass),
the GEMMs of the forward pass (W @ cols per conv, x @ W.T per linear layer) and of the backward
pass (dW for each, dX for all but the first layer, whose input gradient training does not
need), back to back, without im2col, col2im, pooling, normalisation or activations: what a
perfect implementation on this BLAS would still spend.
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
from fxsim import autograd
from fxsim.models import cifarnet, lenet5
from fxsim.train import TrainConfig, train


def gemm_shapes(model, x) -> list[tuple[int, int, int]]:
    """(M, K, N) of every GEMM a training step of ``model`` on ``x`` needs: per convolution
    (from the im2col matrix its forward pass built) and linear layer the forward product, dW
    and dX, except dX of the first layer with parameters (training needs no gradient with
    respect to the images)."""
    _, tape = autograd.forward(model.layers, x, train=True, rng=np.random.default_rng(0))
    shapes, first = [], True
    for layer, ctx in tape:
        if layer.kind == "conv":
            j = layer.params["weight"].shape[0]
            k, m = ctx[0].shape  # the (C*KH*KW, positions x images) columns
            shapes += [(j, k, m), (j, m, k)] + ([] if first else [(k, j, m)])
        elif layer.kind == "linear":
            j, k = layer.params["weight"].shape
            n = ctx.shape[0]
            shapes += [(n, k, j), (j, n, k)] + ([] if first else [(n, j, k)])
        first = first and not layer.params
    return shapes


def blas_floor(model, x, repeats: int, rng) -> float:
    """Median time of the forward and backward GEMMs of a training step (:func:`gemm_shapes`),
    back to back in float32."""
    f32 = np.float32
    arrays = [(rng.standard_normal((a, b), f32), rng.standard_normal((b, c), f32))
              for a, b, c in gemm_shapes(model, x)]

    def run():
        for a, b in arrays:
            a @ b

    return median_time(run, repeats)


def step_time(model, x, repeats: int, rng) -> float:
    y = rng.integers(0, 10, len(x))

    def run():
        model.loss_grads_logits(x, y, rng)

    return median_time(run, repeats)


def step_row(name, model, batch, repeats, rng) -> dict:
    x = rng.random((batch, *model.input_shape), dtype=np.float32)
    t_step = step_time(model, x, repeats, rng)
    t_blas = blas_floor(model, x, repeats, rng)
    print(f"  {name} batch {batch}: forward+backward {t_step * 1e3:.1f} ms, BLAS floor "
          f"{t_blas * 1e3:.1f} ms", file=sys.stderr)
    return {"model": name, "batch": batch, "fwd_bwd_s": t_step, "blas_floor_s": t_blas,
            "ratio": t_step / t_blas}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    rows = [step_row("LeNet5", lenet5(), batch, args.repeats, rng)
            for batch in (args.batch_size, 256)]
    rows.append(step_row("CifarNet", cifarnet(), args.batch_size, min(args.repeats, 3), rng))

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

    print(f"\nTraining, {os.cpu_count()} cores\n")
    print("| measurement | time | note |")
    print("|---|---|---|")
    print(f"| LeNet5, one epoch, {args.images:,} images, batch {args.batch_size} | {epoch:.1f} s | "
          f"median of {len(epochs)} ({', '.join(f'{e:.1f}' for e in epochs)}) |")
    for r in rows:
        print(f"| {r['model']} forward+backward, batch {r['batch']} | "
              f"{r['fwd_bwd_s'] * 1e3:.1f} ms | "
              f"{r['ratio']:.2f}x the BLAS floor of its GEMMs ({r['blas_floor_s'] * 1e3:.1f} ms)"
              f" |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"epoch_s": epochs, "images": args.images, "batch": args.batch_size,
                       "steps": rows}, f, indent=2)


if __name__ == "__main__":
    main()
