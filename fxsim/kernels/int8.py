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
unsigned weight 0, which multiplies anything to 0; a convolution's padded channels meet only
zero codes (see :func:`pack_conv_weights`).

Available only where the host has AVX-512 VNNI and BW (``AVAILABLE``); the caller falls back to
the float BLAS path elsewhere. ``FXSIM_INT8_DOT=off`` turns it off (to compare, or to run the
float path on a VNNI machine). The micro-kernel is LLVM IR emitted through a Numba intrinsic,
its accumulators in registers, because LLVM does not turn a plain Numba loop into ``vpdpbusd``
(it emits vpmaddwd on widened bytes: checked on LLVM 22). As for :mod:`fxsim.kernels.tile`,
Numba's on-disk cache checks only a kernel's own source file: after editing the dense.py
helpers these kernels call, delete ``fxsim/kernels/__pycache__`` in a development checkout.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fxsim.kernels.dense import code_size, requantise_lanes, task_totals

# Output lanes of one vector (int32), and the fan-in entries one lane takes per instruction.
LANES = 16
QUAD = 4
# Micro-kernel shape: MR input vectors (images) x NR vectors of outputs, 16 accumulators.
MR = 4
NR = 4
# A task: ROWS input vectors x a PANEL of outputs, its int32 sums (8 KiB) in L1; the fan-in is
# taken CHUNK quads at a time, so that the panel's weights for a chunk (32 KiB) stay in L1 while
# every group of MR rows runs over them.
ROWS = 16
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
    """An intrinsic ``micro(transposed, c, c_off, ldc, w, w_off, ldw, x, x_off, ldx, quads,
    segments, x_seg)``:

    c[c_off + i * ldc + 16 * v + l] += sum over segments s and quads q < quads of the four
    products of w[w_off + (s * quads + q) * ldw + 64 * v + 4 * l + t] (uint8) and
    x[x_off + s * x_seg + i * ldx + 4 * q + t] (int8), for input vectors i < mr, output
    vectors v < nr, lanes l < 16, t < 4; int32 lanes, wrapping. ``c`` int32, ``w`` uint8 and
    ``x`` int8 are flat C arrays, offsets and strides in elements. A linear layer's input
    vector is one segment; a convolution's window is kh segments (its rows) of ``quads``
    contiguous quads each, whose sums stay in registers across all of them.

    ``transposed``: the sums start from zero and are stored, not added, with each output's
    input vectors side by side: c[c_off + (16 * v + l) * ldc + i] (a convolution's channels
    as rows of positions, the order its output takes; for MR input vectors a 4 x 16 transpose
    in registers, then 16-byte stores). A run-time flag: the callers pass a constant, which
    LLVM folds once the intrinsic is inlined."""

    @intrinsic
    def micro(typingctx, transposed, c, c_off, ldc, w, w_off, ldw, x, x_off, ldx, quads,
              segments, x_seg):
        sig = types.void(transposed, c, c_off, ldc, w, w_off, ldw, x, x_off, ldx, quads,
                         segments, x_seg)

        def codegen(context, builder, signature, args):
            (transposed, c_arr, c_off, ldc, w_arr, w_off, ldw, x_arr, x_off, ldx, quads,
             segments, x_seg) = args
            arrays = [context.make_array(signature.args[i])(context, builder, a).data
                      for i, a in ((1, c_arr), (4, w_arr), (7, x_arr))]
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
            zeros = ir.Constant(v16, None)
            with builder.if_else(transposed) as (fresh, adding):
                with fresh:
                    for i in range(mr):
                        for v in range(nr):
                            builder.store(zeros, accs[i][v])
                with adding:
                    for i in range(mr):
                        for v in range(nr):
                            builder.store(builder.load(c_slot(i, v), align=4), accs[i][v])
            with cgutils.for_range(builder, segments) as outer:
                seg = outer.index
                w_seg = builder.add(w_off, builder.mul(builder.mul(seg, quads), ldw))
                x_base = builder.add(x_off, builder.mul(seg, x_seg))
                with cgutils.for_range(builder, quads) as loop:
                    q = loop.index
                    w_at = builder.add(w_seg, builder.mul(q, ldw))
                    weights = []
                    for v in range(nr):
                        p = builder.gep(w_ptr, [builder.add(w_at, const(64 * v))])
                        vec = builder.load(builder.bitcast(p, v16.as_pointer()), align=1)
                        weights.append(builder.bitcast(vec, operand))
                    x_at = builder.add(x_base, builder.mul(q, const(QUAD)))
                    for i in range(mr):
                        p = builder.gep(x_ptr, [builder.add(x_at, builder.mul(ldx, const(i)))])
                        four = builder.load(builder.bitcast(p, i32.as_pointer()), align=1)
                        lane0 = builder.insert_element(zeros, four, ir.Constant(i32, 0))
                        splat = builder.shuffle_vector(lane0, zeros,
                                                       ir.Constant(v16, [0] * LANES))
                        splat = builder.bitcast(splat, operand)
                        for v in range(nr):
                            acc = builder.load(accs[i][v])
                            builder.store(builder.call(dot, [acc, weights[v], splat]),
                                          accs[i][v])
            with builder.if_else(transposed) as (fresh, adding):
                with fresh:
                    _store_transposed(builder, [[builder.load(a) for a in row] for row in accs],
                                      c_ptr, c_off, ldc)
                with adding:
                    for i in range(mr):
                        for v in range(nr):
                            builder.store(builder.load(accs[i][v]), c_slot(i, v), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return micro


def _store_transposed(builder, sums, c_ptr, c_off, ldc):
    """Store ``sums[i][v]`` (<16 x i32>: outputs 16v .. 16v + 15 of input vector i) as
    c[c_off + (16 * v + l) * ldc + i]: for four input vectors, each output's four sums are
    gathered into one <4 x i32> by two rounds of shuffles and stored at once; for one, lane by
    lane."""
    i32 = ir.IntType(32)
    index = c_off.type
    rows = len(sums)
    for v in range(len(sums[0])):
        if rows == 4:
            a0, a1, a2, a3 = (sums[i][v] for i in range(4))
            pairs = [k for lane in range(LANES) for k in (lane, LANES + lane)]
            t01 = builder.shuffle_vector(a0, a1, ir.Constant(ir.VectorType(i32, 32), pairs))
            t23 = builder.shuffle_vector(a2, a3, ir.Constant(ir.VectorType(i32, 32), pairs))
            fours = [k for lane in range(LANES)
                     for k in (2 * lane, 2 * lane + 1, 32 + 2 * lane, 33 + 2 * lane)]
            quad = builder.shuffle_vector(t01, t23, ir.Constant(ir.VectorType(i32, 64), fours))
            v4 = ir.VectorType(i32, 4)
            for lane in range(LANES):
                piece = builder.shuffle_vector(
                    quad, quad, ir.Constant(v4, [4 * lane + k for k in range(4)]))
                at = builder.add(c_off, builder.mul(ldc, ir.Constant(index, LANES * v + lane)))
                ptr = builder.bitcast(builder.gep(c_ptr, [at]), v4.as_pointer())
                builder.store(piece, ptr, align=4)
        else:
            for i in range(rows):
                for lane in range(LANES):
                    value = builder.extract_element(sums[i][v], ir.Constant(i32, lane))
                    row = builder.mul(ldc, ir.Constant(index, LANES * v + lane))
                    at = builder.add(c_off, builder.add(row, ir.Constant(index, i)))
                    builder.store(value, builder.gep(c_ptr, [at]), align=4)


# one compiled copy per shape: MR or 1 input vectors x 4, 2 or 1 output vectors
_MICRO = {(rows, vectors): _micro(rows, vectors) for rows in (MR, 1) for vectors in (4, 2, 1)}
_micro_44, _micro_14 = _MICRO[MR, 4], _MICRO[1, 4]
_micro_42, _micro_12 = _MICRO[MR, 2], _MICRO[1, 2]
_micro_41, _micro_11 = _MICRO[MR, 1], _MICRO[1, 1]


def pack_weights(w: np.ndarray, offset: int = 128) -> np.ndarray:
    """(J, K) integer weight codes in [-128, 127] -> (ceil(K / 4), J16, 4) uint8 ``w +
    offset`` (mod 256: with ``offset`` 0, the signed bytes), J16 = J rounded up to whole
    vectors of 16: quad q, output j holds the weights of inputs 4q .. 4q + 3; padding (beyond
    K or J) is 0."""
    n_out, fan_in = w.shape
    quads = -(-fan_in // QUAD)
    padded = -(-n_out // LANES) * LANES
    packed = np.zeros((quads * QUAD, padded), np.uint8)
    packed[:fan_in, :n_out] = ((np.asarray(w, np.int16) + offset) & 255).T
    return np.ascontiguousarray(packed.reshape(quads, QUAD, padded).transpose(0, 2, 1))


def channel_quads(channels: int) -> int:
    """``channels`` rounded up to whole quads: the depth of a pixel in :func:`layout`."""
    return -(-channels // QUAD) * QUAD


def folds(channels: int, kw: int) -> bool:
    """Whether a convolution's window rows are laid out folded (see :func:`layout`): where
    padding each pixel's channels to a quad would waste more than padding a whole window row
    (LeNet5's conv1, one channel, 5 wide: 8 bytes a row folded, 20 not)."""
    return channel_quads(channels * kw) < kw * channel_quads(channels)


def layout_weights(w: np.ndarray, fold: bool) -> np.ndarray:
    """(J, C, KH, KW) weight codes -> (J, KH, KW', D) int64: each output's weights in the
    order in which a window sits in the :func:`layout` layout: (kh, kw, c), each pixel's
    channels padded with zeros to D = :func:`channel_quads` (C), or with ``fold`` (kh, (kw,
    c)), KW' = 1, each window row padded to D = :func:`channel_quads` (KW * C)."""
    n_out, channels, kh, kw = w.shape
    rows = np.asarray(w).transpose(0, 2, 3, 1)  # (J, kh, kw, C)
    if fold:
        rows = rows.reshape(n_out, kh, 1, kw * channels)
    depth = rows.shape[3]
    nhwc = np.zeros((*rows.shape[:3], channel_quads(depth)), np.int64)
    nhwc[..., :depth] = rows
    return nhwc


def pack_conv_weights(w: np.ndarray, fold: bool) -> np.ndarray:
    """(J, C, KH, KW) weight codes -> :func:`pack_weights` of the fan-in in the order in which
    :func:`conv_sums` reads a window from the :func:`layout` layout (:func:`layout_weights`;
    an exact sum does not depend on the order of its terms). The padding weights (128
    unsigned) meet only the layout's zero codes."""
    return pack_weights(layout_weights(w, fold).reshape(w.shape[0], -1))


def layout(x: np.ndarray, padding, fold_kw: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) codes that fit int8 -> the input of :func:`conv_sums`: ``xp`` (N, H + 2ph,
    W', D) int8 and ``pixel_sums`` (N, H + 2ph, W') int32, the sum of each pixel's D codes.

    Unfolded (``fold_kw`` 1): pixel (y, x) of the zero-padded image, its C channels then zeros
    up to D = :func:`channel_quads` (C); W' = W + 2pw. Folded (``fold_kw`` = kw): pixel (y, x)
    holds the window row that starts there, ``x[c, y, x + kj]`` at ``kj * C + c``, then zeros
    up to D = :func:`channel_quads` (kw * C); W' = W + 2pw - kw + 1, and the convolution is
    kh x 1."""
    flat, shape, pixel_sums = layout_buffer(x, padding, fold_kw)
    return flat.reshape(shape), pixel_sums


def layout_buffer(x: np.ndarray, padding, fold_kw: int = 1, spare: int = 0,
                  biased: bool = False) -> tuple[np.ndarray, tuple, np.ndarray]:
    """:func:`layout` as a flat int8 buffer with ``spare`` zero bytes after the layout (so
    that wide loads near its end stay inside it): (buffer, the layout's shape (N, H', W', D),
    ``pixel_sums``). With ``biased``, every byte of the layout (padding included) holds its
    code + 128 as an unsigned byte (the bytes viewed as uint8), and ``pixel_sums`` is empty."""
    n, c, h, w = x.shape
    ph, pw = padding
    hp, wp = h + 2 * ph, w + 2 * pw
    width = wp - fold_kw + 1
    shape = (n, hp, width, channel_quads(c * fold_kw))
    size = n * hp * width * shape[3]
    flat = np.empty(size + spare, np.int8)
    flat[size:] = 0
    sums = np.empty((0, 0, 0) if biased else (n, hp, width), np.int32)
    _layout(np.ascontiguousarray(x), ph, pw, fold_kw, 128 if biased else 0,
            flat[:size].reshape(shape), sums)
    return flat, shape, sums


# Pixels that a block of _layout turns around at once (16 bytes of each channel row in), and
# the channels of its two block sizes.
BLOCK_PIXELS = 16
BLOCK_CHANNELS = 64
SMALL_BLOCK_CHANNELS = 16


def _pixels_block_of(channels: int):
    """An intrinsic ``block(x, x_off, plane, out, out_off, depth, count, flip, summed, sums,
    sums_off)``: ``out[out_off + p * depth + c] = x[x_off + c * plane + p] ^ flip`` for
    ``channels`` (64 or 16) channels c and pixels p < ``count`` (at most 16), and with
    ``summed`` ``sums[sums_off + p] +=`` the sum of those codes (int32, before the flip):
    channel rows (NCHW, ``plane`` bytes apart) turned into 16 pixels' channel vectors (NHWC) in
    registers. Reads 16 bytes of every row whatever ``count``. A byte permute turns each quad
    of rows into 16 pixels' words of four channels; for 64 channels a 16 x 16 transpose of
    those words (four rounds of two-source dword shuffles, each swapping the off-diagonal
    halves of 2^k x 2^k blocks) gives each pixel's 64 bytes, for 16 channels one gather of
    four words per pixel its 16 bytes, each stored at once. Plain vector IR: LLVM picks the
    shuffles for the target."""
    quads = channels // QUAD

    @intrinsic
    def block(typingctx, x, x_off, plane, out, out_off, depth, count, flip, summed, sums,
              sums_off):
        sig = types.void(x, x_off, plane, out, out_off, depth, count, flip, summed, sums,
                         sums_off)

        def codegen(context, builder, signature, args):
            (x_arr, x_off, plane, out_arr, out_off, depth, count, flip, summed, sums_arr,
             sums_off) = args
            x_ptr = context.make_array(signature.args[0])(context, builder, x_arr).data
            out_ptr = context.make_array(signature.args[3])(context, builder, out_arr).data
            sums_ptr = context.make_array(signature.args[9])(context, builder, sums_arr).data
            i8, i32 = ir.IntType(8), ir.IntType(32)
            v16b, v64b = ir.VectorType(i8, BLOCK_PIXELS), ir.VectorType(i8, 64)
            v16 = ir.VectorType(i32, LANES)
            index = x_off.type

            def mask(values):
                return ir.Constant(ir.VectorType(i32, len(values)), values)

            def row(c):
                at = builder.add(x_off, builder.mul(plane, ir.Constant(index, c)))
                ptr = builder.bitcast(builder.gep(x_ptr, [at]), v16b.as_pointer())
                return builder.load(ptr, align=1)

            def concat(a, b):
                return builder.shuffle_vector(a, b, mask(list(range(2 * a.type.count))))

            def each_pixel(emit):  # emit(p) for pixels p < count
                for p in range(BLOCK_PIXELS):
                    with builder.if_then(builder.icmp_signed("<", ir.Constant(index, p), count)):
                        emit(p)

            # words[q][p]: channels 4q .. 4q + 3 of pixel p
            pixel_major = mask([BLOCK_PIXELS * k + p for p in range(BLOCK_PIXELS)
                                for k in range(QUAD)])
            words = []
            for q in range(quads):
                r = [row(QUAD * q + k) for k in range(QUAD)]
                rows4 = concat(concat(r[0], r[1]), concat(r[2], r[3]))
                words.append(builder.bitcast(
                    builder.shuffle_vector(rows4, rows4, pixel_major), v16))
            with builder.if_then(summed):  # sums[sums_off + p] += the codes of pixel p
                # bytes widened to i16 and added over the quads (|sum| <= 16 * 128), then
                # each word's four added in i32
                v64h = ir.VectorType(ir.IntType(16), 64)
                wide = ir.Constant(v64h, None)
                for vec in words:
                    wide = builder.add(wide, builder.sext(builder.bitcast(vec, v64b), v64h))
                total = ir.Constant(v16, None)
                for k in range(QUAD):
                    part = builder.shuffle_vector(wide, wide, mask(
                        [QUAD * p + k for p in range(BLOCK_PIXELS)]))
                    total = builder.add(total, builder.sext(part, v16))

                def add_sum(p):
                    ptr = builder.gep(sums_ptr, [builder.add(sums_off, ir.Constant(index, p))])
                    builder.store(builder.add(builder.load(ptr), builder.extract_element(
                        total, ir.Constant(i32, p))), ptr)

                each_pixel(add_sum)
            if quads == LANES:  # transpose: (q, p) -> (p, q), one bit of both per round
                for k in range(4):
                    bit = 1 << k
                    keep_i = mask([p if not p & bit else LANES + (p ^ bit)
                                   for p in range(LANES)])
                    keep_j = mask([LANES + p if p & bit else p ^ bit for p in range(LANES)])
                    for i in range(LANES):
                        if not i & bit:
                            a, b = words[i], words[i | bit]
                            words[i] = builder.shuffle_vector(a, b, keep_i)
                            words[i | bit] = builder.shuffle_vector(a, b, keep_j)
                pixels = words
            else:  # pixel p: word p of each quad
                every = concat(concat(words[0], words[1]), concat(words[2], words[3]))
                pixels = [builder.shuffle_vector(every, every, mask(
                    [LANES * q + p for q in range(quads)])) for p in range(BLOCK_PIXELS)]
            vec_bytes = ir.VectorType(i8, channels)
            splat = builder.insert_element(ir.Constant(vec_bytes, None),
                                           builder.trunc(flip, i8), ir.Constant(i32, 0))
            splat = builder.shuffle_vector(splat, splat, mask([0] * channels))

            def store(p):
                at = builder.add(out_off, builder.mul(depth, ir.Constant(index, p)))
                ptr = builder.bitcast(builder.gep(out_ptr, [at]), vec_bytes.as_pointer())
                builder.store(builder.xor(builder.bitcast(pixels[p], vec_bytes), splat), ptr,
                              align=1)

            each_pixel(store)
            return context.get_dummy_value()

        return sig, codegen

    return block


_pixels_block = _pixels_block_of(BLOCK_CHANNELS)
_pixels_block_small = _pixels_block_of(SMALL_BLOCK_CHANNELS)


@njit(cache=True, parallel=True)
def _layout(x, ph, pw, fold_kw, flip, out, pixel_sums):
    n_img, channels, h, w = x.shape
    hp, width, depth = out.shape[1], out.shape[2], out.shape[3]
    flat_out = out.reshape(-1)
    flat_x = x.reshape(-1)
    words = flat_out.view(np.int32)  # a pixel's depth is whole quads: whole words
    # blocks read the codes as bytes: codes of one byte, unfolded
    bytewise = fold_kw == 1 and x.itemsize == 1
    # pixel sums added up in registers by the blocks, where they lay out every channel
    summed = pixel_sums.shape[0] > 0 and bytewise and channels % SMALL_BLOCK_CHANNELS == 0
    flat_sums = pixel_sums.reshape(-1)
    per_row = width * (depth // QUAD)
    # code + flip (mod 256) is code ^ flip for flip 0 or 128: in every byte of a word at once
    flip_word = np.int32(np.uint32(flip * 0x01010101))
    for task in prange(n_img * hp):
        img = task // hp
        y = task - img * hp
        words[task * per_row : (task + 1) * per_row] = flip_word
        dst = out[img, y]
        done = channels // QUAD  # quads laid out by whole blocks (a padding row: all, by the fill)
        if summed:
            pixel_sums[img, y] = 0  # the blocks add to it; padding pixels sum to 0
        if ph <= y < ph + h:
            # unfolded, 64 channels at a time (then 16) are turned around in registers, 16
            # pixels per block (a last, shorter block reads past its row: inside x but for the
            # very end, which takes the word loop below). CifarNet conv1's input, 2 cores: 32
            # images in cache 0.51 -> 0.08 ms; 128 images, 4.1-4.9 -> 0.4-1.1 ms (memory-bound)
            c0 = 0
            while bytewise and c0 + SMALL_BLOCK_CHANNELS <= channels:
                big = c0 + BLOCK_CHANNELS <= channels
                size = BLOCK_CHANNELS if big else SMALL_BLOCK_CHANNELS
                x_row = ((img * channels + c0) * h + y - ph) * w
                if x_row + (size - 1) * h * w + w - 1 + BLOCK_PIXELS > flat_x.size:
                    break
                out_row = (task * width + pw) * depth + c0
                for ix0 in range(0, w, BLOCK_PIXELS):
                    count = min(BLOCK_PIXELS, w - ix0)
                    sums_at = task * width + pw + ix0
                    if big:
                        _pixels_block(flat_x, x_row + ix0, h * w, flat_out,
                                      out_row + ix0 * depth, depth, count, flip, summed,
                                      flat_sums, sums_at)
                    else:
                        _pixels_block_small(flat_x, x_row + ix0, h * w, flat_out,
                                            out_row + ix0 * depth, depth, count, flip, summed,
                                            flat_sums, sums_at)
                c0 += size
            done = c0 // QUAD
            # the other channels: four channels' codes of a pixel go as one little-endian word,
            # rows read as vectors, a word stored per pixel
            quads = channels // QUAD if fold_kw == 1 else 0
            row_words = words[task * per_row + pw * (depth // QUAD) :]
            for q in range(done, quads):
                r0 = x[img, QUAD * q, y - ph]
                r1 = x[img, QUAD * q + 1, y - ph]
                r2 = x[img, QUAD * q + 2, y - ph]
                r3 = x[img, QUAD * q + 3, y - ph]
                for ix in range(w):
                    row_words[ix * (depth // QUAD) + q] = (
                        (np.int32(r0[ix]) & 255) | ((np.int32(r1[ix]) & 255) << 8)
                        | ((np.int32(r2[ix]) & 255) << 16) | (np.int32(r3[ix]) << 24)
                    ) ^ flip_word
            for c in range(QUAD * quads, channels):
                row = x[img, c, y - ph]
                for kj in range(fold_kw):
                    at = kj * channels + c
                    # pixel ix takes input column ix + kj - pw where that is inside the image
                    lo = max(0, pw - kj)
                    hi = min(width, w + pw - kj)
                    for ix in range(lo, hi):
                        dst[ix, at] = np.int8(np.int32(row[ix + kj - pw]) ^ flip)
        if pixel_sums.shape[0] > 0 and not (summed and QUAD * done == channels):
            for ix in range(width):
                pixel_sums[img, y, ix] = _byte_sum(dst[ix])


@njit(inline="always")
def _micro_call(transposed, rows, vectors, c, c_off, c_ld, w, at, w_ld, x, x_off, x_ld, quads,
                segments, x_seg):
    """The micro-kernel of ``rows`` (MR or 1) input vectors x ``vectors`` (4, 2 or 1) output
    vectors."""
    if rows == MR:
        if vectors == 4:
            _micro_44(transposed, c, c_off, c_ld, w, at, w_ld, x, x_off, x_ld, quads, segments,
                      x_seg)
        elif vectors == 2:
            _micro_42(transposed, c, c_off, c_ld, w, at, w_ld, x, x_off, x_ld, quads, segments,
                      x_seg)
        else:
            _micro_41(transposed, c, c_off, c_ld, w, at, w_ld, x, x_off, x_ld, quads, segments,
                      x_seg)
    elif vectors == 4:
        _micro_14(transposed, c, c_off, c_ld, w, at, w_ld, x, x_off, x_ld, quads, segments,
                  x_seg)
    elif vectors == 2:
        _micro_12(transposed, c, c_off, c_ld, w, at, w_ld, x, x_off, x_ld, quads, segments,
                  x_seg)
    else:
        _micro_11(transposed, c, c_off, c_ld, w, at, w_ld, x, x_off, x_ld, quads, segments,
                  x_seg)


@njit(inline="always")
def _run_quads(c, c_ld, cols, rows, w, w_off, w_ld, x, x_off, x_ld, quads, segments, x_seg,
               transposed):
    """Micro-kernels over ``rows`` input vectors (``x`` from ``x_off + i * x_ld``) and
    ``cols`` outputs (a multiple of 16) of one panel: ``c[i * c_ld + j] += ...`` (or, with
    ``transposed``, ``c[j * c_ld + i] = ...``) over ``segments`` x ``quads`` quads of the
    fan-in (see :func:`_micro`), whose weights start at ``w_off``. Four output vectors at a
    time, then two, then one."""
    row_step, col_step = (1, c_ld) if transposed else (c_ld, 1)
    col = 0
    while col < cols:
        width = cols - col
        vectors = 4 if width >= 4 * LANES else (2 if width >= 2 * LANES else 1)
        at = w_off + QUAD * col
        row = 0
        while row < rows:
            step = MR if row + MR <= rows else 1
            _micro_call(transposed, step, vectors, c, row * row_step + col * col_step, c_ld, w,
                        at, w_ld, x, x_off + row * x_ld, x_ld, quads, segments, x_seg)
            row += step
        col += vectors * LANES


@njit(cache=True, parallel=True)
def dot_rows(rows, packed, sums):
    """Exact ``sums[n, j] = sum_k rows[n, k] * w[j, k]`` as int32: a linear layer.

    ``rows`` (N, K) int8 codes, C-contiguous; ``packed`` from :func:`pack_weights`; ``sums``
    (N, J) int32, filled. The caller guarantees every true sum fits int32. A task is up to
    :data:`ROWS` images x one :data:`PANEL` of outputs."""
    n_rows, fan_in = rows.shape
    padded = packed.shape[1]
    n_out = sums.shape[1]
    whole = fan_in // QUAD
    tail = fan_in - QUAD * whole
    xflat = rows.reshape(-1)
    wflat = packed.reshape(-1)
    w_ld = padded * QUAD
    blocks = (n_rows + ROWS - 1) // ROWS
    panels = (padded + PANEL - 1) // PANEL
    for task in prange(blocks * panels):
        i0 = (task // panels) * ROWS
        count = min(ROWS, n_rows - i0)
        j0 = (task % panels) * PANEL
        cols = min(PANEL, padded - j0)
        c = np.zeros(ROWS * PANEL, np.int32)
        for q0 in range(0, whole, CHUNK):
            _run_quads(c, PANEL, cols, count, wflat, q0 * w_ld + QUAD * j0, w_ld, xflat,
                       i0 * fan_in + QUAD * q0, fan_in, min(CHUNK, whole - q0), 1, 0, False)
        if tail:
            # the last, partial quad from a zero-padded copy: reading it in place could run
            # past the end of the rows
            last = np.zeros(ROWS * QUAD, np.int8)
            for i in range(count):
                for t in range(tail):
                    last[i * QUAD + t] = xflat[(i0 + i) * fan_in + QUAD * whole + t]
            _run_quads(c, PANEL, cols, count, wflat, whole * w_ld + QUAD * j0, w_ld, last, 0,
                       QUAD, 1, 1, 0, False)
        for i in range(count):
            # the weights' +128 times sum_k x[k]; int32 arithmetic wraps, exact mod 2^32
            shift = np.int32(128 * _byte_sum(rows[i0 + i]))
            for j in range(j0, min(j0 + cols, n_out)):
                sums[i0 + i, j] = np.int32(c[i * PANEL + j - j0] - shift)


@njit(inline="always")
def _byte_sum(codes):
    """The sum of a 1-D int8 array, in int32 lanes (vectorised; exact below 2^24 codes)."""
    total = np.int32(0)
    for k in range(codes.size):
        total = np.int32(total + np.int32(codes[k]))
    return total


# Output positions per task of conv_sums: whole output rows of one image (or pieces of a row
# wider than this). Large enough that each output channel's positions are requantised as one
# long vector (a call per few dozen lanes cost more than the arithmetic on LeNet5's conv1),
# small enough that the task's sums (positions x a panel of 128 int32) stay in L2.
TASK_POSITIONS = 1024


@njit(inline="always")
def task_grid(oh, ow):
    """How a convolution's OH x OW outputs per image split into tasks: (band, piece, bands,
    pieces): ``band`` output rows of ``piece`` positions each (whole rows, or pieces of a row
    wider than :data:`TASK_POSITIONS`), ``bands`` x ``pieces`` tasks per image and panel."""
    band = max(1, TASK_POSITIONS // ow)
    piece = min(ow, TASK_POSITIONS)
    return band, piece, (oh + band - 1) // band, (ow + piece - 1) // piece


@njit(inline="always")
def task_at(task, panels, band, piece, bands, pieces, oh, ow):
    """Task ``task`` of :func:`task_grid`'s split, panels innermost -> (panel, image, first and
    last output row + 1, first output column, positions per row)."""
    panel = task % panels
    rest = task // panels
    ox0 = (rest % pieces) * piece
    rest //= pieces
    oy0 = (rest % bands) * band
    img = rest // bands
    return panel, img, oy0, min(oh, oy0 + band), ox0, min(piece, ow - ox0)


@njit(cache=True, parallel=True)
def conv_sums(xp, pixel_sums, packed, kh, kw, sh, sw, bias, rq, codes, sums):
    """Exact convolution sums as int32, straight from the :func:`layout` layout (no im2col):
    ``sum[n, j, oy * OW + ox] = sum over (ki, kj, d) of xp[n, oy * sh + ki, ox * sw + kj, d] *
    w'[j, ki, kj, d]``, w' the weights as :func:`pack_conv_weights` orders them (``packed``),
    ``kw`` 1 for a folded layout.

    With ``codes`` the bytes of (N, J, OH * OW) codes (:func:`fxsim.kernels.dense.code_bytes`),
    each output channel's sums of a task are requantised at once, ``bias`` (J,) int64 added
    and ``rq`` from :func:`fxsim.kernels.dense.fast_requant_args`, into ``codes``, and the sums
    are never stored; with ``codes`` of shape (0, 0, 0) they go to ``sums`` (N, J, OH * OW) int32.
    Returns the fused counters (accumulator overflow events, output saturations, largest and
    smallest sum; zeros when not fused).

    Window row ki of output (oy, ox) is ``kw * D`` contiguous bytes of ``xp`` (a segment of
    the micro-kernel, :func:`_micro`; the kh rows are ``W' * D`` apart), and the same row of
    output (oy, ox + 1) starts ``sw * D`` bytes later: a micro-kernel's MR outputs are MR
    input vectors ``sw * D`` apart. A task is up to :data:`TASK_POSITIONS` outputs (whole
    output rows of one image, or a piece of one) x one :data:`PANEL` of output channels; the
    correction for the weights' +128 is 128 times the window's sum of ``pixel_sums``."""
    n_img, hp, wp, depth = xp.shape
    padded = packed.shape[1]
    fused = codes.shape[0] > 0
    n_out = codes.shape[1] if fused else sums.shape[1]
    oh = (hp - kh) // sh + 1
    ow = (wp - kw) // sw + 1
    size = code_size(codes[0, 0], oh * ow) if fused else 1
    xflat = xp.reshape(-1)
    wflat = packed.reshape(-1)
    sums_flat = pixel_sums.reshape(-1)
    w_ld = padded * QUAD
    row_quads = kw * depth // QUAD
    band, piece, bands, pieces = task_grid(oh, ow)
    panels = (padded + PANEL - 1) // PANEL
    n_tasks = n_img * bands * pieces * panels
    counts = np.zeros((n_tasks, 4), np.int64)
    for task in prange(n_tasks):
        panel, img, oy0, oy1, ox0, count = task_at(task, panels, band, piece, bands, pieces,
                                                   oh, ow)
        j0 = panel * PANEL
        n_pos = (oy1 - oy0) * count  # consecutive positions from oy0 * ow + ox0
        cols = min(PANEL, padded - j0)
        c = np.empty(cols * n_pos, np.int32)  # (channel, position): every entry is stored
        shift = np.empty(n_pos, np.int64)
        for oy in range(oy0, oy1):
            first = (oy - oy0) * count  # this row's first position in the task
            x_off = ((img * hp + oy * sh) * wp + ox0 * sw) * depth
            _run_quads(c[first:], n_pos, cols, count, wflat, QUAD * j0, w_ld, xflat, x_off,
                       sw * depth, row_quads, kh, wp * depth, True)
            for i in range(count):
                total = np.int32(0)
                for ki in range(kh):  # flat indices: a view per row cost 0.9 ms on conv1
                    at = (img * hp + oy * sh + ki) * wp + (ox0 + i) * sw
                    for kj in range(kw):
                        total = np.int32(total + sums_flat[at + kj])
                shift[first + i] = 128 * total
        lanes = np.empty(n_pos, np.int32)
        wide = np.empty(n_pos if fused else 0, np.int64)
        p0 = oy0 * ow + ox0
        for j in range(j0, min(j0 + cols, n_out)):
            row = c[(j - j0) * n_pos :]
            for t in range(n_pos):  # int32 casts wrap: exact mod 2^32, see the module notes
                lanes[t] = np.int32(row[t] - shift[t])
            if not fused:
                sums[img, j, p0 : p0 + n_pos] = lanes
                continue
            n_acc, n_sat, top, bottom = requantise_lanes(
                lanes, bias[j], rq, wide, codes[img, j, p0 * size : (p0 + n_pos) * size])
            counts[task, 0] += n_acc
            counts[task, 1] += n_sat
            counts[task, 2] = max(counts[task, 2], top)
            counts[task, 3] = min(counts[task, 3], bottom)
    n_acc, n_sat, top, bottom, _, _ = task_totals(counts)
    return n_acc, n_sat, top, bottom


# Codes of up to 16 bits as two signed base-256 digits, code = 256 * high + low, low in
# [-128, 127]: then the high digit fits a byte for codes in [-32768, DIGITS_MAX].
DIGITS_MAX = 32639


def digits(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, C, ...) integer codes in [-32768, :data:`DIGITS_MAX`] -> int8 digit arrays (high,
    both, low): ``codes == 256 * high + low`` elementwise, ``both`` (N, 2C, ...) = high and low
    side by side along axis 1. Zero codes give zero digits, so zero padding stays zero
    padding."""
    x = np.ascontiguousarray(codes)
    n, c = x.shape[:2]
    high = np.empty(x.shape, np.int8)
    low = np.empty(x.shape, np.int8)
    both = np.empty((n, 2 * c, *x.shape[2:]), np.int8)
    _digits(x.reshape(n, c, -1), high.reshape(n, c, -1), low.reshape(n, c, -1),
            both.reshape(n, 2 * c, -1))
    return high, both, low


@njit(cache=True, parallel=True)
def _digits(x, high, low, both):
    n, c, size = x.shape
    for plane in prange(n * c):
        img = plane // c
        ch = plane - img * c
        for t in range(size):
            wide = np.int32(x[img, ch, t])
            lo = ((wide + 128) & 255) - 128
            hi = (wide - lo) >> 8
            high[img, ch, t] = hi
            low[img, ch, t] = lo
            both[img, ch, t] = hi
            both[img, c + ch, t] = lo


@njit(cache=True, parallel=True)
def combine_digits(high, middle, low, out):
    """``out = 65536 * high + 256 * middle + low`` (int32 digit sums -> int64, flat arrays of
    the same size): the exact sum of products of two-digit codes, from the sums of the digit
    products ``high`` = sum x_hi w_hi, ``middle`` = sum (x_hi w_lo + x_lo w_hi), ``low`` = sum
    x_lo w_lo."""
    for i in prange(out.size):
        out[i] = ((np.int64(high[i]) << 16) + (np.int64(middle[i]) << 8)) + np.int64(low[i])
