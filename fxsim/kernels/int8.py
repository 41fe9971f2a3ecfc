"""Exact int8 dot products on the CPU's integer dot-product unit (x86 AVX-512 VNNI).

``vpdpbusd`` multiplies 64 unsigned bytes by 64 signed bytes and adds each group of four
products into one of 16 int32 lanes: 64 multiply-adds per instruction, against 16 for a float32
FMA, so where a layer's codes fit in a byte an integer GEMM outruns float32 BLAS (measured in
docs/results/kernels.md). It is also the arithmetic an int8 accelerator does.

Exactness. One operand must be unsigned: the weights are stored as ``w + 128`` (0..255), and

    sum_k w[j, k] x[k] = sum_k (w[j, k] + 128) x[k] - 128 * sum_k x[k]

where the last term is one integer per input vector. The int32 lanes wrap on overflow, so every
lane holds the left sum modulo 2^32 and the result is exact modulo 2^32; the caller uses this
kernel only where ``x_max_abs * max_j sum_k |w[j, k]| < 2^31``, so the true sum is the one int32
value in its class. Padding (fan-in to a multiple of four, outputs to whole vectors) stores the
unsigned weight 0, which multiplies anything to 0.

Available only where the host has AVX-512 VNNI and BW (``AVAILABLE``); the caller falls back to
the float BLAS path elsewhere. ``FXSIM_INT8_DOT=off`` turns it off (to compare, or to run the
float path on a VNNI machine). The micro-kernel is LLVM IR emitted through a Numba intrinsic,
its accumulators in registers, because LLVM does not turn a plain Numba loop into ``vpdpbusd``
(it emits vpmaddwd on widened bytes: checked on LLVM 22).
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Output lanes of one vector (int32), and the fan-in entries one lane takes per instruction.
LANES = 16
QUAD = 4
# Micro-kernel shape: MR input vectors (images) x NR vectors of outputs, 16 accumulators.
MR = 4
NR = 4
# A task: IMAGES images x a PANEL of outputs, its int32 sums (8 KiB) in L1; the fan-in is taken
# CHUNK quads at a time, so that the panel's weights for a chunk (32 KiB) stay in L1 while every
# group of MR images runs over them.
IMAGES = 16
PANEL = 128
CHUNK = 64


def _host_has_vnni() -> bool:
    """Whether the int8 kernels can run here: the CPU Numba compiles for has AVX-512 F, BW and
    VNNI, and ``FXSIM_INT8_DOT`` is not ``off``."""
    if os.environ.get("FXSIM_INT8_DOT", "auto").lower() in ("off", "0", "no", "false"):
        return False
    try:
        from llvmlite import binding
        from numba.core import config

        if config.CPU_NAME:  # a target chosen by hand (portable caches): trust its features only
            features = config.CPU_FEATURES or ""
            return all(f"+{name}" in features for name in ("avx512f", "avx512bw", "avx512vnni"))
        host = binding.get_host_cpu_features()
        return all(host.get(name, False) for name in ("avx512f", "avx512bw", "avx512vnni"))
    except Exception:  # any failure to ask means no: the float path is always there
        return False


AVAILABLE = _host_has_vnni()


def _dot_intrinsic(builder):
    """The ``vpdpbusd`` intrinsic: (acc <16 x i32>, unsigned bytes, signed bytes) -> acc.
    LLVM 21 changed its operand types from <16 x i32> to <64 x i8>."""
    from llvmlite import binding

    v16 = ir.VectorType(ir.IntType(32), LANES)
    operand = ir.VectorType(ir.IntType(8), 64) if binding.llvm_version_info >= (21,) else v16
    fnty = ir.FunctionType(v16, [v16, operand, operand])
    name = "llvm.x86.avx512.vpdpbusd.512"
    return cgutils.get_or_insert_function(builder.module, fnty, name), operand


def _micro(mr: int, nr: int):
    """An intrinsic ``micro(c, c_off, ldc, w, w_off, ldw, x, x_off, ldx, quads)``:

    c[c_off + i * ldc + 16 * v + l] += sum over quads q of the four products of
    w[w_off + q * ldw + 64 * v + 4 * l + t] (uint8) and x[x_off + i * ldx + 4 * q + t] (int8),
    for images i < mr, vectors v < nr, lanes l < 16, t < 4; int32 lanes, wrapping. ``c``
    int32, ``w`` uint8 and ``x`` int8 are flat C arrays, offsets and strides in elements."""

    @intrinsic
    def micro(typingctx, c, c_off, ldc, w, w_off, ldw, x, x_off, ldx, quads):
        sig = types.void(c, c_off, ldc, w, w_off, ldw, x, x_off, ldx, quads)

        def codegen(context, builder, signature, args):
            c_arr, c_off, ldc, w_arr, w_off, ldw, x_arr, x_off, ldx, quads = args
            arrays = [context.make_array(signature.args[i])(context, builder, a).data
                      for i, a in ((0, c_arr), (3, w_arr), (6, x_arr))]
            c_ptr, w_ptr, x_ptr = arrays
            i32 = ir.IntType(32)
            v16 = ir.VectorType(i32, LANES)
            dot, operand = _dot_intrinsic(builder)
            index = c_off.type

            def const(value):
                return ir.Constant(index, value)

            def c_slot(i, v):
                at = builder.add(c_off, builder.add(builder.mul(ldc, const(i)), const(LANES * v)))
                return builder.bitcast(builder.gep(c_ptr, [at]), v16.as_pointer())

            # accumulators in allocas: LLVM's SROA turns them into registers
            accs = [[cgutils.alloca_once(builder, v16) for _ in range(nr)] for _ in range(mr)]
            for i in range(mr):
                for v in range(nr):
                    builder.store(builder.load(c_slot(i, v), align=4), accs[i][v])
            zeros = ir.Constant(v16, None)
            with cgutils.for_range(builder, quads) as loop:
                q = loop.index
                w_at = builder.add(w_off, builder.mul(q, ldw))
                weights = []
                for v in range(nr):
                    p = builder.gep(w_ptr, [builder.add(w_at, const(64 * v))])
                    vec = builder.load(builder.bitcast(p, v16.as_pointer()), align=1)
                    weights.append(builder.bitcast(vec, operand))
                x_at = builder.add(x_off, builder.mul(q, const(QUAD)))
                for i in range(mr):
                    p = builder.gep(x_ptr, [builder.add(x_at, builder.mul(ldx, const(i)))])
                    four = builder.load(builder.bitcast(p, i32.as_pointer()), align=1)
                    lane0 = builder.insert_element(zeros, four, ir.Constant(i32, 0))
                    splat = builder.shuffle_vector(lane0, zeros, ir.Constant(v16, [0] * LANES))
                    splat = builder.bitcast(splat, operand)
                    for v in range(nr):
                        acc = builder.load(accs[i][v])
                        builder.store(builder.call(dot, [acc, weights[v], splat]), accs[i][v])
            for i in range(mr):
                for v in range(nr):
                    builder.store(builder.load(accs[i][v]), c_slot(i, v), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return micro


_micro_full = _micro(MR, NR)
_micro_rows1 = _micro(1, NR)
_micro_vec1 = _micro(MR, 1)
_micro_one = _micro(1, 1)


def pack_weights(w: np.ndarray) -> np.ndarray:
    """(J, K) integer weight codes in [-128, 127] -> (ceil(K / 4), J16, 4) uint8 ``w + 128``,
    J16 = J rounded up to whole vectors of 16: quad q, output j holds the weights of inputs 4q ..
    4q + 3; padding (beyond K or J) is 0."""
    n_out, fan_in = w.shape
    quads = -(-fan_in // QUAD)
    padded = -(-n_out // LANES) * LANES
    packed = np.zeros((quads * QUAD, padded), np.uint8)
    packed[:fan_in, :n_out] = (np.asarray(w, np.int16) + 128).T
    return np.ascontiguousarray(packed.reshape(quads, QUAD, padded).transpose(0, 2, 1))


@njit(inline="always")
def _run_quads(c, c_ld, cols, rows, w, w_off, w_ld, x, x_off, x_ld, quads):
    """Micro-kernels over ``rows`` images (x rows ``x_off + i * x_ld``) and ``cols`` outputs
    (a multiple of 16) of one panel: ``c[i * c_ld + j] += ...`` for ``quads`` quads of the
    fan-in, whose weights start at ``w_off`` (``w_ld`` bytes apart)."""
    col = 0
    while col + LANES * NR <= cols:
        row = 0
        while row + MR <= rows:
            _micro_full(c, row * c_ld + col, c_ld, w, w_off + QUAD * col, w_ld, x,
                        x_off + row * x_ld, x_ld, quads)
            row += MR
        while row < rows:
            _micro_rows1(c, row * c_ld + col, c_ld, w, w_off + QUAD * col, w_ld, x,
                         x_off + row * x_ld, x_ld, quads)
            row += 1
        col += LANES * NR
    while col < cols:
        row = 0
        while row + MR <= rows:
            _micro_vec1(c, row * c_ld + col, c_ld, w, w_off + QUAD * col, w_ld, x,
                        x_off + row * x_ld, x_ld, quads)
            row += MR
        while row < rows:
            _micro_one(c, row * c_ld + col, c_ld, w, w_off + QUAD * col, w_ld, x,
                       x_off + row * x_ld, x_ld, quads)
            row += 1
        col += LANES


@njit(cache=True, parallel=True)
def linear_sums(x, packed, sums):
    """Exact ``sums[n, j] = sum_k x[n, k] * w[j, k]`` as int32.

    ``x`` (N, K) int8 codes, C-contiguous; ``packed`` from :func:`pack_weights`; ``sums`` (N,
    J) int32, filled. The caller guarantees every true sum fits int32. A task is up to
    :data:`IMAGES` images x one :data:`PANEL` of outputs."""
    n_img, fan_in = x.shape
    padded = packed.shape[1]
    n_out = sums.shape[1]
    whole = fan_in // QUAD
    tail = fan_in - QUAD * whole
    xflat = x.reshape(-1)
    wflat = packed.reshape(-1)
    w_ld = padded * QUAD
    blocks = (n_img + IMAGES - 1) // IMAGES
    panels = (padded + PANEL - 1) // PANEL
    for task in prange(blocks * panels):
        i0 = (task // panels) * IMAGES
        rows = min(IMAGES, n_img - i0)
        j0 = (task % panels) * PANEL
        cols = min(PANEL, padded - j0)
        c = np.zeros(IMAGES * PANEL, np.int32)
        for q0 in range(0, whole, CHUNK):
            _run_quads(c, PANEL, cols, rows, wflat, q0 * w_ld + QUAD * j0, w_ld, xflat,
                       i0 * fan_in + QUAD * q0, fan_in, min(CHUNK, whole - q0))
        if tail:
            # the last, partial quad from a zero-padded copy: reading it in place could run
            # past the end of x
            last = np.zeros(IMAGES * QUAD, np.int8)
            for i in range(rows):
                for t in range(tail):
                    last[i * QUAD + t] = xflat[(i0 + i) * fan_in + QUAD * whole + t]
            _run_quads(c, PANEL, cols, rows, wflat, whole * w_ld + QUAD * j0, w_ld, last, 0,
                       QUAD, 1)
        for i in range(rows):
            row = x[i0 + i]
            total = np.int64(0)
            for k in range(fan_in):
                total += row[k]
            # the weights' +128 times sum_k x[k]; int32 casts wrap, which is exact mod 2^32
            shift = 128 * total
            for j in range(j0, min(j0 + cols, n_out)):
                sums[i0 + i, j] = np.int32(c[i * PANEL + j - j0] - shift)
