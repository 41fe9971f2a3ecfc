"""Benchmarks a user can run: the sparse (zero-skipping) kernel against the dense one and
float32 BLAS, on the paper's layer shapes, all timed in one process on the same data.

Times are medians of several repeats after a warm-up call (JIT compilation, page faults). The
functions return plain rows; printing, JSON and plots are the caller's business.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fxsim.datapath import Datapath, prepare
from fxsim.errors import FxsimError
from fxsim.fixedpoint import code_dtype, paper_format
from fxsim.kernels.dense import im2col
from fxsim.kernels.sparse import random_mask


@dataclass(frozen=True)
class LayerShape:
    kind: str  # "conv" or "linear"
    x_shape: tuple  # (N, C, H, W) or (N, K)
    w_shape: tuple  # (J, C, KH, KW) or (J, K)
    stride: int = 1
    padding: int = 0


# LeNet5 with a batch of 256, CifarNet with 128 (its layers are 10-20x larger per image).
LAYERS = {
    "lenet5.conv1": LayerShape("conv", (256, 1, 28, 28), (20, 1, 5, 5)),
    "lenet5.conv2": LayerShape("conv", (256, 20, 12, 12), (50, 20, 5, 5)),
    "lenet5.fc1": LayerShape("linear", (256, 800), (500, 800)),
    "lenet5.fc2": LayerShape("linear", (256, 500), (10, 500)),
    "cifarnet.conv1": LayerShape("conv", (128, 64, 30, 30), (64, 64, 3, 3), 1, 1),
    "cifarnet.conv2": LayerShape("conv", (128, 64, 30, 30), (128, 64, 3, 3), 2, 1),
    "cifarnet.conv6": LayerShape("conv", (128, 192, 8, 8), (192, 192, 3, 3), 1, 1),
}
DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)


def median_time(fn: Callable, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def float_layer(shape: LayerShape, xf: np.ndarray, wf: np.ndarray) -> np.ndarray:
    """The float layer as a CPU framework runs it: im2col + GEMM (BLAS) + NCHW layout."""
    if shape.kind == "linear":
        return xf @ wf.T
    n = xf.shape[0]
    j, _, kh, kw = wf.shape
    cols = im2col(xf, kh, kw, (shape.stride,) * 2, (shape.padding,) * 2)
    y = wf.reshape(j, -1) @ cols
    oh_ow = cols.shape[1] // n
    return np.ascontiguousarray(y.reshape(j, n, oh_ow).transpose(1, 0, 2))


def check_densities(densities) -> tuple[float, ...]:
    out = tuple(float(d) for d in densities)
    bad = [d for d in out if not 0.0 < d <= 1.0]
    if bad or not out:
        raise FxsimError(f"densities must be in (0, 1], got {', '.join(map(str, bad)) or 'none'}")
    return out


def sparse_vs_dense(layers=None, densities=DENSITIES, bits: int = 8, repeats: int = 5,
                    seed: int = 0, progress: Callable[[str], None] | None = None,
                    per_mac_bits: int | None = None) -> list[dict]:
    """Time dense int, sparse int and float32 BLAS per layer shape and weight density.

    Weights are pruned at random to exactly the density, inputs are random codes of the
    paper's ``bits``-wide format, passed in and returned in the narrowest integer dtype that
    holds it (:func:`fxsim.code_dtype`), as quantised models pass them. The accumulator is
    exact (``final``), or with ``per_mac_bits`` a register of that width saturating after every
    MAC. The dense and sparse outputs are compared bit for bit before timing. Returns one row
    per (layer, density) with seconds, speed-ups and the kernel path each took.
    """
    names = list(LAYERS) if layers is None else list(layers)
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        raise FxsimError(f"unknown layer {unknown[0]!r}; choose from: {', '.join(LAYERS)}")
    densities = check_densities(densities)
    fmt = paper_format(bits)
    codes = code_dtype(fmt)  # inputs and outputs in the narrowest dtype, as models pass them
    acc = {} if per_mac_bits is None else {"acc_bits": per_mac_bits, "acc_mode": "per_mac"}
    Datapath(fmt, fmt, **acc)  # a bad width fails here, before any work
    rng = np.random.default_rng(seed)
    rows = []
    for name in names:
        shape = LAYERS[name]
        x = rng.integers(fmt.min_code, fmt.max_code, shape.x_shape, endpoint=True)
        x_codes = x.astype(codes)
        w_full = rng.integers(fmt.min_code, fmt.max_code, shape.w_shape, endpoint=True)
        for density in densities:
            if progress:
                progress(f"{name} density {density:g}")
            mask = random_mask(shape.w_shape, density, rng)
            w = np.where(mask, w_full, 0)
            layers_by_kernel = {
                kernel: prepare(w, None, Datapath(fmt, fmt, kernel=kernel, **acc), mask)
                for kernel in ("dense", "sparse")
            }

            def run(layer, shape=shape, x=x_codes, out_dtype=codes):
                if shape.kind == "conv":
                    return layer.conv2d(x, shape.stride, shape.padding, out_dtype)
                return layer.linear(x, out_dtype)

            y_dense, c_dense = run(layers_by_kernel["dense"])
            y_sparse, c_sparse = run(layers_by_kernel["sparse"])
            if not np.array_equal(y_dense, y_sparse):
                raise AssertionError(f"sparse and dense results differ on {name} at {density}")
            xf, wf = x.astype(np.float32), w.astype(np.float32)
            dense_layer, sparse_layer = layers_by_kernel["dense"], layers_by_kernel["sparse"]
            t_dense = median_time(lambda layer=dense_layer: run(layer), repeats)
            t_sparse = median_time(lambda layer=sparse_layer: run(layer), repeats)
            t_float = median_time(lambda s=shape, a=xf, b=wf: float_layer(s, a, b), repeats)
            rows.append({
                "layer": name, "density": density, "macs": c_dense.macs,
                "executed_macs": c_sparse.executed_macs,
                "weight_bytes": c_sparse.weight_bytes,
                "paths": {"dense_int": sorted(c_dense.paths), "sparse_int": sorted(c_sparse.paths)},
                "seconds": {"dense_int": t_dense, "sparse_int": t_sparse, "f32_blas": t_float},
                "sparse_speedup_vs_dense": t_dense / t_sparse,
                "sparse_speedup_vs_f32": t_float / t_sparse,
            })  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table; a column with the kernel paths is added when some row did
    not take the exact float32 path (a per-MAC register, wide formats)."""
    show_paths = any(r["paths"]["dense_int"] != ["float32"] for r in rows)
    extra_head, extra_rule = (" paths |", "---|") if show_paths else ("", "")
    lines = [
        "| layer | density | MMAC executed | dense int ms | sparse int ms | f32 BLAS ms "
        "| sparse vs dense | sparse vs f32 | CSR / dense bytes |" + extra_head,
        "|---|---|---|---|---|---|---|---|---|" + extra_rule,
    ]
    for r in rows:
        s = r["seconds"]
        ratio = r["weight_bytes"]["csr"] / r["weight_bytes"]["dense"]
        paths = " / ".join(", ".join(r["paths"][k]) for k in ("dense_int", "sparse_int"))
        lines.append(
            f"| {r['layer']} | {r['density']:g} | {r['executed_macs'] / 1e6:.1f} | "
            f"{s['dense_int'] * 1e3:.2f} | {s['sparse_int'] * 1e3:.2f} | "
            f"{s['f32_blas'] * 1e3:.2f} | {r['sparse_speedup_vs_dense']:.2f}x | "
            f"{r['sparse_speedup_vs_f32']:.2f}x | {ratio:.2f} |"
            + (f" {paths} |" if show_paths else "")
        )
    return "\n".join(lines)


def benchmark_model(path=None):
    """The model in ``path`` (float weights), or a LeNet5 trained for one epoch on the
    embedded sample: a benchmark needs realistic weights, since they decide the kernel path."""
    from fxsim import data, store
    from fxsim.models import lenet5
    from fxsim.train import TrainConfig, train

    if path:
        return store.load_model(path)[0]
    model = lenet5()
    train(model, *data.load("sample", "train"), TrainConfig(epochs=1))
    return model


def sample_images(count: int):
    """The embedded sample's test images and labels, repeated to ``count``."""
    from fxsim import data

    x, y = data.load("sample", "test")
    reps = -(-count // len(x))
    return np.concatenate([x] * reps)[:count], np.concatenate([y] * reps)[:count]
