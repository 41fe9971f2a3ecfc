"""Integer datapath kernels vs float32 BLAS on LeNet5 / CifarNet layer shapes, in one run.

For every layer shape it times, on the same random codes:
  f32 gemm    float32 BLAS on the prebuilt im2col matrix (the bare GEMM, a lower bound)
  f32 layer   float32 layer as a CPU framework runs it: im2col + sgemm + NCHW layout
Shapes: fxsim.bench.LAYERS (LeNet5 at batch 256, CifarNet at batch 128).
  int final   fxsim.datapath, exact sum then one overflow; codes in and out in the narrowest
              dtype that holds the format (int8 for 8 bits), as fxsim's quantised layers pass
              them on; weights prepared once with fxsim.datapath.prepare
  int64 codes the same with int64 codes in and out (the default of the public functions)
  int per_mac the same as "int final" with a narrow accumulator saturating after every MAC
and prints a Markdown table of medians with throughput (GMAC/s) and ratios to the f32 layer.
No assertions on time: the numbers go to docs/results/kernels.md.

    python benchmarks/kernels.py [--repeats 7] [--json out.json] [--bits 8]
"""

from __future__ import annotations

# isort: skip_file

import argparse
import json
import os
import platform
import sys

import fxsim  # noqa: F401  first: its thread settings must reach OpenBLAS before numpy loads
import numpy as np

from fxsim import QFormat, code_dtype, paper_format
from fxsim.bench import LAYERS, float_layer, median_time
from fxsim.datapath import Datapath, prepare
from fxsim.kernels.dense import im2col


def bench_shape(name, shape, fmt, acc_bits, repeats, rng, code_max=None):
    kind, stride, padding = shape.kind, shape.stride, shape.padding
    lo, hi = (fmt.min_code, fmt.max_code) if code_max is None else (-code_max, code_max)
    x = rng.integers(lo, hi, size=shape.x_shape, endpoint=True)
    w = rng.integers(lo, hi, size=shape.w_shape, endpoint=True)
    final = prepare(w, None, Datapath(fmt, fmt))
    per_mac = prepare(w, None, Datapath(fmt, fmt, acc_bits=acc_bits, acc_mode="per_mac"))
    xf, wf = x.astype(np.float32), w.astype(np.float32)
    narrow = code_dtype(fmt)
    x_narrow = x.astype(narrow)
    if kind == "conv":
        kh, kw = shape.w_shape[2:]
        cols = im2col(xf, kh, kw, (stride, stride), (padding, padding))
        w2 = wf.reshape(shape.w_shape[0], -1)

        def gemm():
            return w2 @ cols

        def run(prepared, codes=x_narrow, out_dtype=narrow):
            return prepared.conv2d(codes, stride=stride, padding=padding, out_dtype=out_dtype)
    else:
        def gemm():
            return xf @ wf.T

        def run(prepared, codes=x_narrow, out_dtype=narrow):
            return prepared.linear(codes, out_dtype=out_dtype)

    y_final, c_final = run(final)
    y_wide, c_wide = run(final, x, None)
    if not (np.array_equal(y_final, y_wide) and c_final == c_wide):
        raise AssertionError(f"{name}: {narrow} and int64 codes give different results")
    _, c_mac = run(per_mac)
    macs = c_final.macs
    t_gemm = median_time(gemm, repeats)
    t_float = median_time(lambda: float_layer(shape, xf, wf), repeats)
    t_final = median_time(lambda: run(final), repeats)
    t_wide = median_time(lambda: run(final, x, None), repeats)
    t_mac = median_time(lambda: run(per_mac), repeats)
    return {
        "layer": name,
        "macs": macs,
        "format": str(fmt),
        "codes_dtype": str(narrow),
        "per_mac_acc_bits": acc_bits,
        "final_path": next(iter(c_final.paths)),
        "per_mac_path": next(iter(c_mac.paths)),
        "per_mac_overflow_events": c_mac.acc_overflows,
        "seconds": {"f32_gemm": t_gemm, "f32_layer": t_float, "int_final": t_final,
                    "int_final_int64_codes": t_wide, "int_per_mac": t_mac},
        "gmacs": {k: macs / t / 1e9 for k, t in
                  {"f32_gemm": t_gemm, "f32_layer": t_float, "int_final": t_final,
                   "int_final_int64_codes": t_wide, "int_per_mac": t_mac}.items()},
        "ratio_final_vs_f32_layer": t_float / t_final,
        "ratio_final_int64_codes_vs_f32_layer": t_float / t_wide,
        "ratio_final_vs_f32_gemm": t_gemm / t_final,
        "ratio_per_mac_vs_f32_layer": t_float / t_mac,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bits", type=int, default=8, help="paper format width (default 8)")
    parser.add_argument("--acc-bits", type=int, default=20,
                        help="per_mac accumulator width (default 20)")
    parser.add_argument("--json", help="write results to this JSON file")
    parser.add_argument("--layers", default=",".join(LAYERS),
                        help="comma-separated layer names (default: all)")
    parser.add_argument("--code-max", type=int,
                        help="draw input and weight codes from [-CODE_MAX, CODE_MAX] instead of "
                             "the whole format (e.g. 32639: 16-bit codes whose base-256 digits "
                             "fit a byte)")
    args = parser.parse_args(argv)
    names = args.layers.split(",")
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        parser.error(f"unknown layer {unknown[0]!r}; choose from: {', '.join(LAYERS)}")
    fmt = paper_format(args.bits) if args.bits != 64 else QFormat(64, 4)
    rows = []
    for name in names:
        print(f"  {name} ...", file=sys.stderr)
        rng = np.random.default_rng([0, list(LAYERS).index(name)])  # the same codes, any selection
        rows.append(bench_shape(name, LAYERS[name], fmt, args.acc_bits, args.repeats, rng,
                                args.code_max))
    header = ("| layer | MMAC | f32 gemm GMAC/s | f32 layer GMAC/s | int final GMAC/s (path) "
              "| final / f32 layer | final / f32 gemm | int64 codes / f32 layer "
              "| per_mac GMAC/s (path) | per_mac / f32 layer |")
    inputs = "" if args.code_max is None else f", codes in [-{args.code_max}, {args.code_max}]"
    print(f"\nformat {fmt} (codes as {code_dtype(fmt)}), per_mac accumulator {args.acc_bits} "
          f"bits{inputs}, medians of {args.repeats}, {os.cpu_count()} cores\n")
    print(header)
    print("|---" * 10 + "|")
    for r in rows:
        g = r["gmacs"]
        print(f"| {r['layer']} | {r['macs'] / 1e6:.0f} | {g['f32_gemm']:.1f} | "
              f"{g['f32_layer']:.1f} | {g['int_final']:.1f} ({r['final_path']}) | "
              f"{r['ratio_final_vs_f32_layer']:.2f} | {r['ratio_final_vs_f32_gemm']:.2f} | "
              f"{r['ratio_final_int64_codes_vs_f32_layer']:.2f} | "
              f"{g['int_per_mac']:.1f} ({r['per_mac_path']}) | "
              f"{r['ratio_per_mac_vs_f32_layer']:.2f} |")
    if args.json:
        meta = {"python": platform.python_version(), "numpy": np.__version__,
                "machine": platform.machine(), "cores": os.cpu_count(), "format": str(fmt),
                "repeats": args.repeats, "code_max": args.code_max}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
