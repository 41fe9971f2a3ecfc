"""Dense kernels: im2col and its adjoint (image-major or batch-last), the batch-last input
layout, exact and per-MAC dot products, accumulator finish, pooling, ReLU, transposes.

Kernels know nothing of models or configurations; they take code arrays and plain integers.
A conv or linear layer is one matrix product in this layout::

    acc[j, m] = bias[j] + sum_k w[j, k] * cols[k, m]

``j`` is the output channel (or feature), ``k`` the fan-in index in the canonical MAC order
(input channel, kernel row, kernel column; for a linear layer the input index) and ``m`` the
output position: (image, row, column) from :func:`im2col`, (row, column, image) from
:func:`im2col_batch_last`. For a linear layer ``cols`` is ``x.T`` (or the per-MAC kernel runs
over output features, :func:`dot_per_mac_rows`). Loops run over ``m`` innermost, so one MAC
step of many outputs is a contiguous vector operation while each output still sees its MACs
in canonical order.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from fxsim.errors import ShapeError
from fxsim.fixedpoint import SAT, SAT_SYM, apply_overflow, requantize_one
from fxsim.kernels.tile import (
    per_mac_products,
    per_mac_products_pair,
    per_mac_products_quad,
    unit_first,
    units,
)

# Output positions handled per task by the blocked kernels: a (K, block) slice of cols stays in
# L2 while all output channels run over it. Smaller blocks when there are few positions, so
# that every core gets work (a linear layer's batch of 256 would otherwise be one task); not
# smaller than that, since every block costs the same (LeNet5 fc2 with a 20-bit per-MAC
# register, batch 256 on 2 cores: 0.16 ms in blocks of 32, 0.08 ms in blocks of 128).
BLOCK = 256
MIN_BLOCK = 32


def block_size(m_total: int, threads: int) -> int:
    """Positions per task: BLOCK, or less so that every thread gets a task."""
    per_task = -(-m_total // max(1, threads))
    return int(min(BLOCK, max(MIN_BLOCK, -(-per_task // MIN_BLOCK) * MIN_BLOCK)))


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@njit(cache=True, inline="always")
def _inside_columns(kj, sw, pw, w, ow):
    """Output columns [lo, hi) whose input column ox * sw + kj - pw lies inside the image;
    the others read zero padding."""
    lo = 0
    while lo < ow and lo * sw + kj - pw < 0:
        lo += 1
    hi = ow
    while hi > lo and (hi - 1) * sw + kj - pw >= w:
        hi -= 1
    return lo, hi


@njit(cache=True, parallel=True)
def _im2col(x, kh, kw, sh, sw, ph, pw, oh, ow, out):
    n_img, c_in, h, w = x.shape
    ohw = oh * ow
    for row in prange(c_in * kh * kw):
        c = row // (kh * kw)
        ki = (row // kw) % kh
        kj = row % kw
        ox_lo, ox_hi = _inside_columns(kj, sw, pw, w, ow)
        for n in range(n_img):
            for oy in range(oh):
                iy = oy * sh + ki - ph
                dst = n * ohw + oy * ow
                if iy < 0 or iy >= h:
                    for ox in range(ow):
                        out[row, dst + ox] = 0
                    continue
                for ox in range(ox_lo):
                    out[row, dst + ox] = 0
                if sw == 1:  # contiguous: the cast from narrow codes vectorises
                    src = x[n, c, iy, ox_lo + kj - pw : ox_hi + kj - pw]
                    for t in range(ox_hi - ox_lo):
                        out[row, dst + ox_lo + t] = src[t]
                else:
                    for ox in range(ox_lo, ox_hi):
                        out[row, dst + ox] = x[n, c, iy, ox * sw + kj - pw]
                for ox in range(ox_hi, ow):
                    out[row, dst + ox] = 0
    return out


def im2col(x: np.ndarray, kh: int, kw: int, stride=(1, 1), padding=(0, 0), dtype=None):
    """(N, C, H, W) -> (C*kh*kw, N*OH*OW) columns, zero padding included.

    ``dtype`` (default x's) is the dtype of the columns; values are cast on the fly, which is
    exact for integer codes the caller has bounded (e.g. below 2^24 for float32).
    """
    x = np.ascontiguousarray(x)
    n, c, h, w = x.shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    out = np.empty((c * kh * kw, n * oh * ow), x.dtype if dtype is None else dtype)
    return _im2col(x, kh, kw, stride[0], stride[1], padding[0], padding[1], oh, ow, out)


@njit(cache=True, parallel=True)
def _col2im(cols, kh, kw, sh, sw, ph, pw, oh, ow, out):
    n_img, c_in, h, w = out.shape
    n_blocks = (n_img + 15) // 16
    # A task owns one input channel of 16 images, so no two tasks add into the same pixel; it
    # walks each of its kh * kw rows of cols in order (contiguous reads).
    for task in prange(c_in * n_blocks):
        c = task // n_blocks
        n0 = (task % n_blocks) * 16
        for ki in range(kh):
            for kj in range(kw):
                row = (c * kh + ki) * kw + kj
                ox_lo, ox_hi = _inside_columns(kj, sw, pw, w, ow)
                for n in range(n0, min(n0 + 16, n_img)):
                    for oy in range(oh):
                        iy = oy * sh + ki - ph
                        if iy < 0 or iy >= h:
                            continue
                        src = oy * ow
                        for ox in range(ox_lo, ox_hi):
                            out[n, c, iy, ox * sw + kj - pw] += cols[row, n, src + ox]
    return out


def col2im(cols: np.ndarray, x_shape, kh: int, kw: int, stride=(1, 1), padding=(0, 0)):
    """The adjoint of :func:`im2col`: add (C*kh*kw, N*OH*OW) columns back into (N, C, H, W).
    ``cols`` may also be a (C*kh*kw, N, OH*OW) view with any strides, as long as the last
    axis is contiguous (a per-image GEMM's output, transposed)."""
    h, w = x_shape[2:]
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    if cols.ndim == 2:
        cols = np.ascontiguousarray(cols).reshape(cols.shape[0], x_shape[0], oh * ow)
    elif cols.strides[2] != cols.itemsize:
        cols = np.ascontiguousarray(cols)
    out = np.zeros(x_shape, cols.dtype)
    return _col2im(cols, kh, kw, stride[0], stride[1], padding[0], padding[1], oh, ow, out)


@njit(cache=True, parallel=True)
def _layout(x, ph, pw, sw, wq, out):
    n_img, chans, h, w = x.shape
    hp = h + 2 * ph
    for row in prange(chans * hp):
        c = row // hp
        iy = row % hp - ph
        for phase in range(sw):
            for q in range(wq):
                dst = out[(row * sw + phase) * wq + q]
                ix = q * sw + phase - pw
                if iy < 0 or iy >= h or ix < 0 or ix >= w:
                    dst[:] = 0
                else:
                    for n in range(n_img):
                        dst[n] = x[n, c, iy, ix]
    return out


@njit(cache=True, parallel=True)
def _layout_pixels(pixels, chans, h, w, ph, pw, sw, wq, out):
    """:func:`_layout` from pixel-major codes ``pixels`` (C * H * W, N): every output row is
    a contiguous (vectorised) cast of one input row, or zeros."""
    hp = h + 2 * ph
    for row in prange(chans * hp):
        c = row // hp
        iy = row % hp - ph
        for phase in range(sw):
            for q in range(wq):
                dst = out[(row * sw + phase) * wq + q]
                ix = q * sw + phase - pw
                if iy < 0 or iy >= h or ix < 0 or ix >= w:
                    dst[:] = 0
                else:
                    src = pixels[(c * h + iy) * w + ix]
                    for n in range(dst.size):
                        dst[n] = src[n]
    return out


def phase_width(padded_w: int, stride_w: int) -> int:
    """Columns per phase of a padded input row split by column index modulo the stride."""
    return -(-padded_w // stride_w)


def layout_input(x: np.ndarray, padding, dtype, stride_w: int = 1) -> np.ndarray:
    """(N, C, H, W) -> (C * Hp * stride_w * Wq, N) in ``dtype``: one batch vector per pixel.

    Zero-padded, and each padded row split into ``stride_w`` phases by column modulo the stride
    (Wq columns each, see :func:`phase_width`), so that the inputs a weight meets at output
    columns 0, 1, 2, ... are adjacent rows for any stride: a whole output row is one
    contiguous run of ``OW * N`` values. With stride 1 this is the plain (C, Hp, Wp) order.
    Values are cast on the fly (exact for codes the caller has bounded).
    """
    n, c, h, w = x.shape
    ph, pw = padding
    if h == w == 1 and ph == pw == 0 and stride_w == 1:  # a linear layer's input: (N, C).T
        return transpose2d(x.reshape(n, c), dtype)
    hp = h + 2 * ph
    wq = phase_width(w + 2 * pw, stride_w)
    out = np.empty((c * hp * stride_w * wq, n), dtype)
    x = np.ascontiguousarray(x)
    per_word = 8 // x.itemsize if x.itemsize <= 2 else 0
    if per_word and n % per_word == 0 and (c * h * w) % per_word == 0:
        # narrow codes: transpose them a word at a time, then cast contiguous batch vectors
        # (2 cores, int8 codes to float32: a 32-image chunk of CifarNet conv1's input 0.53 ->
        # 0.38 ms, LeNet5 conv2's 256 images 0.22 -> 0.13 ms, against gathering each image)
        pixels = transpose2d(x.reshape(n, c * h * w))
        return _layout_pixels(pixels, c, h, w, ph, pw, stride_w, wq, out)
    return _layout(x, ph, pw, stride_w, wq, out)


def input_row_length(padded_w: int, stride_w: int) -> int:
    """Rows of the :func:`layout_input` layout per padded input row."""
    return stride_w * phase_width(padded_w, stride_w)


@njit(cache=True, inline="always")
def batch_last_row(c, ki, kj, hp, sw, wq):
    """Row of input (c, ki, kj) at output (0, 0) in the :func:`layout_input` layout (scalars,
    or integer arrays of them)."""
    return ((c * hp + ki) * sw + kj % sw) * wq + kj // sw


@njit(cache=True, parallel=True)
def _im2col_batch_last(xt, c_in, hp, kh, kw, sh, sw, wq, oh, ow, out):
    n_img = xt.shape[1]
    xflat = xt.reshape(-1)
    seg = ow * n_img  # one output row of one (c, ki, kj): contiguous in the layout
    row_len = sw * wq
    for task in prange(c_in * kh * kw * oh):
        row, oy = task // oh, task % oh
        c, ki, kj = row // (kh * kw), (row // kw) % kh, row % kw
        src = (batch_last_row(c, ki, kj, hp, sw, wq) + oy * sh * row_len) * n_img
        out[row, oy * seg : (oy + 1) * seg] = xflat[src : src + seg]
    return out


def im2col_batch_last(x: np.ndarray, kh: int, kw: int, stride=(1, 1), padding=(0, 0),
                      dtype=None):
    """(N, C, H, W) -> (C*kh*kw, OH*OW*N) columns ordered (oy, ox, image): im2col with the
    batch as the fastest axis. Built from :func:`layout_input`, where every (row, output row)
    is one contiguous copy; for layers with few output positions per image this is several
    times faster than :func:`im2col` (LeNet5 conv2, batch 256: 1.3 vs 3.7 ms). ``dtype`` as in
    :func:`im2col`."""
    n, c, h, w = x.shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    dtype = x.dtype if dtype is None else dtype
    xt = layout_input(x, padding, dtype, stride[1])
    out = np.empty((c * kh * kw, oh * ow * n), dtype)
    wq = phase_width(w + 2 * padding[1], stride[1])
    return _im2col_batch_last(xt, c, h + 2 * padding[0], kh, kw, stride[0], stride[1], wq, oh,
                              ow, out)


@njit(cache=True, parallel=True)
def _col2im_batch_last(cols, c_in, hp, kh, kw, sh, sw, wq, oh, ow, dxt):
    n_img = dxt.shape[1]
    dflat = dxt.reshape(-1)
    seg = ow * n_img
    row_len = sw * wq
    for c in prange(c_in):  # channel c's rows add only into channel c: no two tasks collide
        for ki in range(kh):
            for kj in range(kw):
                row = (c * kh + ki) * kw + kj
                base = batch_last_row(c, ki, kj, hp, sw, wq)
                for oy in range(oh):
                    dst = dflat[(base + oy * sh * row_len) * n_img :][:seg]
                    src = cols[row, oy * seg : (oy + 1) * seg]
                    for t in range(seg):
                        dst[t] += src[t]
    return dxt


@njit(cache=True, parallel=True)
def _from_batch_last(xt, ph, pw, hp, sw, wq, out):
    n_img, c_in, h, w = out.shape
    n_blocks = (n_img + _BLOCK - 1) // _BLOCK
    for task in prange(c_in * n_blocks):
        # one channel of _BLOCK images: reads a cache line of neighbouring images per pixel,
        # writes _BLOCK image planes, each in order
        c, n0 = task // n_blocks, (task % n_blocks) * _BLOCK
        n1 = min(n0 + _BLOCK, n_img)
        for iy in range(h):
            for ix in range(w):
                src = xt[batch_last_row(c, iy + ph, ix + pw, hp, sw, wq)]
                for n in range(n0, n1):
                    out[n, c, iy, ix] = src[n]
    return out


# Side of the square blocks the transposing kernels move at a time: 32 float32 = two cache
# lines read and 32 rows written in step (measured on (3200, 256) float32: 0.37 ms, against
# 5.1 ms for numpy's copy of the transposed view).
_BLOCK = 32


@njit(cache=True, parallel=True)
def _transpose2d(a, out):
    rows, cols = a.shape
    row_blocks = (rows + _BLOCK - 1) // _BLOCK
    col_blocks = (cols + _BLOCK - 1) // _BLOCK
    for task in prange(row_blocks * col_blocks):
        r0 = (task // col_blocks) * _BLOCK
        c0 = (task % col_blocks) * _BLOCK
        for c in range(c0, min(c0 + _BLOCK, cols)):
            for r in range(r0, min(r0 + _BLOCK, rows)):
                out[c, r] = a[r, c]
    return out


_LOW_HALVES = (np.uint64(0x00000000FFFFFFFF), np.uint64(0x0000FFFF0000FFFF),
               np.uint64(0x00FF00FF00FF00FF))  # the low 4, 2 or 1 bytes of each 8, 4 or 2


@njit(inline="always")
def _swap_halves(a, b, shift, mask):
    """Two 64-bit words as two rows of a 2x2 block of fields ``shift`` bits wide, transposed:
    ``a``'s high fields trade places with ``b``'s low ones (little-endian: low = first)."""
    t = ((a >> shift) ^ b) & mask
    return a ^ (t << shift), b ^ t


@njit(cache=True, parallel=True)
def _transpose_words(a, out, itemsize):
    """Transpose of 1- or 2-byte elements, a word (8 bytes) at a time. ``a`` (R, C / k) and
    ``out`` (C, R / k) are uint64 views, k = 8 / itemsize elements per word: a block of k rows
    x one word is transposed in registers by log2(k) rounds of half swaps (Hacker's Delight
    7-3), then stored as k words of ``out``. Tasks are 16 x 16 blocks of words."""
    s32, s16, s8 = np.uint64(32), np.uint64(16), np.uint64(8)
    m32, m16, m8 = _LOW_HALVES
    per_word = 8 // itemsize
    row_words = a.shape[0] // per_word
    col_words = a.shape[1]
    row_blocks = (row_words + 15) // 16
    col_blocks = (col_words + 15) // 16
    for task in prange(row_blocks * col_blocks):
        r0 = (task // col_blocks) * 16
        c0 = (task % col_blocks) * 16
        for cw in range(c0, min(c0 + 16, col_words)):
            c = cw * per_word
            for rw in range(r0, min(r0 + 16, row_words)):
                r = rw * per_word
                if itemsize == 2:
                    x0, x2 = _swap_halves(a[r, cw], a[r + 2, cw], s32, m32)
                    x1, x3 = _swap_halves(a[r + 1, cw], a[r + 3, cw], s32, m32)
                    x0, x1 = _swap_halves(x0, x1, s16, m16)
                    x2, x3 = _swap_halves(x2, x3, s16, m16)
                    out[c, rw] = x0
                    out[c + 1, rw] = x1
                    out[c + 2, rw] = x2
                    out[c + 3, rw] = x3
                else:
                    x0, x4 = _swap_halves(a[r, cw], a[r + 4, cw], s32, m32)
                    x1, x5 = _swap_halves(a[r + 1, cw], a[r + 5, cw], s32, m32)
                    x2, x6 = _swap_halves(a[r + 2, cw], a[r + 6, cw], s32, m32)
                    x3, x7 = _swap_halves(a[r + 3, cw], a[r + 7, cw], s32, m32)
                    x0, x2 = _swap_halves(x0, x2, s16, m16)
                    x1, x3 = _swap_halves(x1, x3, s16, m16)
                    x4, x6 = _swap_halves(x4, x6, s16, m16)
                    x5, x7 = _swap_halves(x5, x7, s16, m16)
                    x0, x1 = _swap_halves(x0, x1, s8, m8)
                    x2, x3 = _swap_halves(x2, x3, s8, m8)
                    x4, x5 = _swap_halves(x4, x5, s8, m8)
                    x6, x7 = _swap_halves(x6, x7, s8, m8)
                    out[c, rw] = x0
                    out[c + 1, rw] = x1
                    out[c + 2, rw] = x2
                    out[c + 3, rw] = x3
                    out[c + 4, rw] = x4
                    out[c + 5, rw] = x5
                    out[c + 6, rw] = x6
                    out[c + 7, rw] = x7
    return out


def transpose2d(a: np.ndarray, dtype=None, out: np.ndarray | None = None) -> np.ndarray:
    """A C-contiguous copy of ``a.T`` for a 2-D array, cast to ``dtype`` (default: ``a``'s) on
    the fly, written into ``out`` if given (C-contiguous, shape ``a.shape[::-1]``).

    Without a cast, 1- and 2-byte elements whose rows and columns both fill whole 8-byte
    words move a word at a time (:func:`_transpose_words`); otherwise element by element in
    cache-sized blocks. Measured on 2 cores: 256 x 800 int64 codes to float32 numpy's
    ``ascontiguousarray(a.T, dtype)`` 0.19 ms, the blocks 0.08 ms; (3,200, 256) int8 codes
    0.29 ms by elements, 0.06 ms by words ((57,600, 128): 2.7 -> 0.7 ms; int16 2.7 -> 1.1
    ms); float32 gains nothing by words (0.26-0.29 ms either way), so it stays in blocks."""
    a = np.ascontiguousarray(a)
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    if out is None:
        out = np.empty(a.shape[::-1], dtype)
    per_word = 8 // a.itemsize if a.itemsize in (1, 2) else 0
    if (dtype == a.dtype and per_word and a.shape[0] % per_word == 0
            and a.shape[1] % per_word == 0 and a.size):
        _transpose_words(a.view(np.uint64), out.view(np.uint64), a.itemsize)
        return out
    return _transpose2d(a, out)


@njit(cache=True, parallel=True)
def _channels_first(y, bias, out):
    n_out, n_img, _ = y.shape
    for task in prange(n_img * n_out):
        i, j = task // n_out, task % n_out
        src, dst, b = y[j, i], out[i, j], bias[j]
        for p in range(src.size):
            dst[p] = src[p] + b
    return out


def channels_first(y: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """(J, N, P) -> a C-contiguous (N, J, P) copy, ``bias`` (J,) (if given) added on the way:
    a convolution's one GEMM over the batch (image-major columns) laid out as NCHW, in one
    parallel pass over whole rows (2 cores, float32: (64, 64, 900) 0.56 ms, (20, 64, 576) 0.04
    ms, against 2.5 and 0.23 ms for numpy's sum of the transposed view and the bias)."""
    y = np.ascontiguousarray(y)
    bias = np.zeros(y.shape[0], y.dtype) if bias is None else bias.astype(y.dtype, copy=False)
    return _channels_first(y, bias, np.empty((y.shape[1], y.shape[0], y.shape[2]), y.dtype))


def col2im_batch_last(cols: np.ndarray, x_shape, kh: int, kw: int, stride=(1, 1),
                      padding=(0, 0)):
    """The adjoint of :func:`im2col_batch_last`: add (C*kh*kw, OH*OW*N) columns ordered
    (oy, ox, image) back into (N, C, H, W). Adds whole output rows of all images at once into
    the :func:`layout_input` layout, then crops the padding away."""
    n, c, h, w = x_shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    hp = h + 2 * padding[0]
    wq = phase_width(w + 2 * padding[1], stride[1])
    dxt = np.zeros((c * hp * stride[1] * wq, n), cols.dtype)
    cols = np.ascontiguousarray(cols)
    _col2im_batch_last(cols, c, hp, kh, kw, stride[0], stride[1], wq, oh, ow, dxt)
    return _from_batch_last(dxt, padding[0], padding[1], hp, stride[1], wq,
                            np.empty(x_shape, cols.dtype))


@njit(cache=True, parallel=True)
def dot_int64(w, cols, block):
    """Exact ``w @ cols`` in int64 (wraps mod 2^64 if a partial sum leaves int64)."""
    n_out, fan_in = w.shape
    m_total = cols.shape[1]
    out = np.empty((n_out, m_total), np.int64)
    n_blocks = (m_total + block - 1) // block
    for b in prange(n_blocks):
        m0 = b * block
        width = min(block, m_total - m0)
        tile = np.ascontiguousarray(cols[:, m0 : m0 + width])  # stays in L2 for all j
        acc = np.empty(width, np.int64)
        for j in range(n_out):
            acc[:] = 0
            for k in range(fan_in):
                wv = w[j, k]
                if wv == 0:
                    continue
                for t in range(width):
                    acc[t] += wv * tile[k, t]
            out[j, m0 : m0 + width] = acc
    return out


@njit(cache=True, parallel=True)
def dot_per_mac_rows(x, wt, start, lo, hi, mask, wrap, w_max_abs):
    """Per-MAC registers of a linear layer, vectorised over its J outputs instead of the batch.

    ``x`` (N, K) input codes and ``wt`` (K, J) the transposed weights, both in the lane dtype
    (float32 or int32 for narrow registers, else int64, at most 62 bits); ``start`` (J,) the
    registers' first values. For each image the register of every output takes the products
    x[k] * w[j, k] for k = 0, 1, ... in canonical order, one row of ``wt`` per nonzero x[k]
    (a zero input adds nothing to an exact or a saturated sum), with the same provably exact
    fast groups as :func:`fxsim.kernels.sparse.sparse_per_mac` (``w_max_abs`` bounds the
    weights). Images go in fours that share each row of ``wt`` they read (the inputs any of
    them has nonzero; a zero product leaves the others' registers unchanged), a remainder in
    a pair and alone (:func:`fxsim.kernels.tile.per_mac_products_quad`, ``_pair``). Returns
    (acc int64 (N, J), overflow events).
    """
    n_img = x.shape[0]
    n_out = wt.shape[1]
    wflat = wt.reshape(-1)
    out = np.empty((n_img, n_out), np.int64)
    n_fours = n_img // 4
    n_units = units(n_img, n_fours)
    events = np.empty(n_units, np.int64)  # every task fills its entry
    zero = np.int64(0)  # not a literal 0: that would be another compilation of the callees
    for unit in prange(n_units):
        i = unit_first(unit, n_fours)
        acc0 = start.copy()
        hits0 = np.zeros(n_out, np.int32)  # at most K events per output
        hits1 = np.zeros(n_out, np.int32)
        hits2 = np.zeros(n_out, np.int32)
        hits3 = np.zeros(n_out, np.int32)
        if unit < n_fours:
            inputs = np.flatnonzero((x[i] != 0) | (x[i + 1] != 0) | (x[i + 2] != 0)
                                    | (x[i + 3] != 0))
            block = np.empty((inputs.size, 4), x.dtype)
            for u in range(inputs.size):
                for r in range(4):
                    block[u, r] = x[i + r, inputs[u]]
            acc1 = start.copy()
            acc2 = start.copy()
            acc3 = start.copy()
            per_mac_products_quad(acc0, acc1, acc2, acc3, hits0, hits1, hits2, hits3, wflat,
                                  zero, inputs.size, inputs, x[i][inputs], x[i + 1][inputs],
                                  x[i + 2][inputs], x[i + 3][inputs], block, n_out, zero,
                                  w_max_abs, wrap, lo, hi, mask)
            out[i + 1] = acc1
            out[i + 2] = acc2
            out[i + 3] = acc3
        elif i + 1 < n_img:
            inputs = np.flatnonzero((x[i] != 0) | (x[i + 1] != 0))
            acc1 = start.copy()
            per_mac_products_pair(acc0, acc1, hits0, hits1, wflat, zero, inputs.size, inputs,
                                  x[i][inputs], x[i + 1][inputs], n_out, zero, w_max_abs, wrap,
                                  lo, hi, mask)
            out[i + 1] = acc1
        else:
            inputs = np.flatnonzero(x[i])
            per_mac_products(acc0, hits0, wflat, zero, inputs.size, inputs, x[i][inputs], n_out,
                             zero, w_max_abs, wrap, lo, hi, mask)
        out[i] = acc0
        count = 0
        for t in range(n_out):
            count += hits0[t] + hits1[t] + hits2[t] + hits3[t]
        events[unit] = count
    return out, total(events)


@njit(cache=True, parallel=True)
def dot_per_mac_int64(w, cols, start, acc_bits, wrap, block):
    """Per-MAC accumulator of any width up to 64 bits, in int64 lanes with checked adds.

    For registers of 63 and 64 bits, where register + product can leave int64 (narrower ones
    run :func:`fxsim.kernels.sparse.sparse_per_mac` or :func:`dot_per_mac_rows`). ``w`` (J, K),
    ``cols`` (K, M) and ``start`` (J,) are int64; each product fits in ``acc_bits``. An add
    that leaves int64 is detected from the sign bits.
    Returns (acc int64 (J, M), overflow events).
    """
    n_out, fan_in = w.shape
    m_total = cols.shape[1]
    lo = np.int64(-(1 << (acc_bits - 1))) if acc_bits < 64 else np.int64(-(1 << 63))
    hi = np.int64((1 << (acc_bits - 1)) - 1) if acc_bits < 64 else np.int64((1 << 63) - 1)
    out = np.empty((n_out, m_total), np.int64)
    n_blocks = (m_total + block - 1) // block
    events = np.empty(n_blocks, np.int64)  # every task fills its entry
    omode = 1 if wrap else 0
    for b in prange(n_blocks):
        m0 = b * block
        width = min(block, m_total - m0)
        tile = np.ascontiguousarray(cols[:, m0 : m0 + width])
        acc = np.empty(width, np.int64)
        count = 0
        for j in range(n_out):
            acc[:] = start[j]
            for k in range(fan_in):
                wv = w[j, k]
                if wv == 0:
                    continue
                for t in range(width):
                    a = acc[t]
                    p = wv * tile[k, t]
                    s = a + p  # wraps mod 2^64 if the true sum leaves int64
                    big = ((a ^ s) & (p ^ s)) < 0
                    c, over = apply_overflow(s, big, p < 0, lo, hi, acc_bits, True, omode)
                    count += np.int64(over)
                    acc[t] = c
            out[j, m0 : m0 + width] = acc
        events[b] = count
    return out, total(events)


@njit(inline="always")
def _task_stats(tasks):
    """Per-task counters of a requantisation kernel: accumulator overflow events, output
    saturations, largest and smallest sum (see :func:`totals`)."""
    return (np.empty(tasks, np.int64), np.empty(tasks, np.int64), np.empty(tasks, np.int64),
            np.empty(tasks, np.int64))


@njit(inline="always")
def _finish(sums, bias, bias_last, acc_bits, acc_omode, shift, lo, hi, bits, signed, rmode,
            omode, u, out):
    """Turn raw dot products into output codes: the general (scalar) kernel.

    ``sums`` (A, B, C), any strides, holds exact integer sums of products in any numeric dtype;
    ``out`` the bytes (:func:`code_bytes`) of the (A, B, C) codes. ``bias`` (int64) is indexed
    by the last axis when ``bias_last``, else by the middle one (conv: (N, J, P); linear: (N,
    1, J)). With ``acc_omode >= 0`` the exact sum then meets an ``acc_bits`` accumulator once
    (``final`` mode). The result is requantised by ``shift`` fraction bits into ``[lo, hi]``.
    ``u`` holds one uniform draw per code for stochastic rounding (empty otherwise).

    Returns (accumulator overflow events, output saturation events, largest and smallest
    accumulator value before overflow); the caller takes |.| in Python, where -2^63 is safe.
    """
    n_a, n_b, n_c = sums.shape
    acc_lo = -(np.int64(1) << (acc_bits - 1)) if 0 < acc_bits < 64 else np.int64(-(1 << 63))
    acc_hi = (np.int64(1) << (acc_bits - 1)) - 1 if 0 < acc_bits < 64 else np.int64((1 << 63) - 1)
    stochastic = u.size > 0
    tasks = n_a * n_b
    acc_events, sat_events, highest, lowest = _task_stats(tasks)
    for task in prange(tasks):
        # channel-major: neighbouring tasks read neighbouring images of a transposed input
        i = task % n_a
        j = task // n_a
        n_acc = 0
        n_sat = 0
        top = np.int64(0)
        bottom = np.int64(0)
        row = np.empty(n_c, np.int64)
        for p in range(n_c):
            a = np.int64(sums[i, j, p]) + (bias[p] if bias_last else bias[j])
            top = max(top, a)
            bottom = min(bottom, a)
            if acc_omode >= 0:
                a, over = apply_overflow(a, False, a < 0, acc_lo, acc_hi, acc_bits, True,
                                         acc_omode)
                n_acc += np.int64(over)
            ui = u[(i * n_b + j) * n_c + p] if stochastic else 0.0
            code, sat = requantize_one(a, shift, lo, hi, bits, signed, rmode, omode, ui)
            n_sat += np.int64(sat)
            row[p] = code
        store_codes(row, out[i, j])
        acc_events[task] = n_acc
        sat_events[task] = n_sat
        highest[task] = top
        lowest[task] = bottom
    return totals(acc_events, sat_events, highest, lowest)


def rounding_offsets(rmode: int, shift: int) -> tuple[int, int, int]:
    """(base, extra if negative, parity flag) with round(a / 2^s) == (a + offset) >> s.

    ``offset = base + (a < 0) * negative_extra + parity * ((a >> s) & 1)`` reproduces every
    deterministic mode of :func:`fxsim.fixedpoint.round_shift` for ``1 <= s <= 62``: adding
    ``half`` makes a floor round ties up, ``half - 1`` makes it round them down, and the parity
    of the floor quotient picks the even neighbour. Proven equal by the tests.
    """
    half = 1 << (shift - 1)
    table = {
        0: (0, 0, 0),  # trn
        1: (0, (1 << shift) - 1, 0),  # trn_zero: ceil for negatives
        2: (half, 0, 0),  # rnd: ties up
        3: (half - 1, 1, 0),  # rnd_zero: ties down if positive, up if negative
        4: (half - 1, 0, 0),  # rnd_min_inf: ties down
        5: (half, -1, 0),  # rnd_inf: ties up if positive, down if negative
        6: (half - 1, 0, 1),  # rnd_conv: ties down, plus one when the floor is odd
    }
    return table[rmode]


def code_bytes(codes: np.ndarray) -> np.ndarray:
    """C-contiguous integer codes as the kernels that write codes take them: their bytes
    (uint8, the last axis ``itemsize`` times as long). One compiled kernel then serves codes
    of 1, 2, 4 and 8 bytes alike (the code size is a run-time value, :func:`code_size`):
    compiling every kernel once per code dtype was most of a cold test run."""
    if not codes.flags.c_contiguous:
        raise ValueError("codes must be C-contiguous")
    return codes.view(np.uint8)


@njit(inline="always")
def code_size(dest, count):
    """Bytes per code of ``dest``, the bytes of ``count`` codes (1 when there are none)."""
    return dest.size // count if count > 0 else 1


@njit(inline="always")
def _store(values, dest):
    for p in range(values.size):
        dest[p] = values[p]


@njit(cache=True)
def store_codes(values, dest):
    """int64 ``values`` (codes that fit their dtype) into ``dest``, their bytes."""
    size = code_size(dest, values.size)
    if size == 1:
        _store(values, dest.view(np.int8))
    elif size == 2:
        _store(values, dest.view(np.int16))
    elif size == 4:
        _store(values, dest.view(np.int32))
    else:
        _store(values, dest.view(np.int64))


@njit(cache=True)
def requantise_row(acc, rq, dest):
    """One row of int64 sums ``acc`` (overwritten) -> output codes in ``dest``, the bytes of
    ``acc.size`` codes (:func:`code_bytes`), in separate branch-free passes so that every loop
    vectorises: the final accumulator's overflow, then rounding and output overflow. ``rq`` is
    :func:`fast_requant_args`' tuple. Returns (accumulator overflow events, output
    saturations, largest and smallest sum before the accumulator's overflow)."""
    size = code_size(dest, acc.size)
    if size == 1:
        return _requantise_row(acc, rq, dest.view(np.int8))
    if size == 2:
        return _requantise_row(acc, rq, dest.view(np.int16))
    if size == 4:
        return _requantise_row(acc, rq, dest.view(np.int32))
    return _requantise_row(acc, rq, dest.view(np.int64))


@njit(inline="always")
def _requantise_row(acc, rq, dest):
    """:func:`requantise_row` into the typed codes ``dest``."""
    shift, base, neg_extra, parity, lo, hi, sym_lo, mask, omode, acc_bits, acc_omode = rq[:11]
    has_acc = acc_omode >= 0 and 0 < acc_bits < 64
    acc_lo = -(np.int64(1) << (acc_bits - 1)) if has_acc else np.int64(0)
    acc_hi = (np.int64(1) << (acc_bits - 1)) - 1 if has_acc else np.int64(0)
    acc_mask = (np.int64(1) << acc_bits) - 1 if has_acc else np.int64(0)
    acc_wrap = acc_omode == 1
    wrap = omode == 1
    zero = omode == 2
    n = acc.size
    top = np.int64(0)
    bottom = np.int64(0)
    for p in range(n):
        top = max(top, acc[p])
        bottom = min(bottom, acc[p])
    n_acc = 0
    if has_acc:
        for p in range(n):
            a = acc[p]
            inside = (a >= acc_lo) & (a <= acc_hi)
            n_acc += 1 - np.int64(inside)
            wrapped = ((a - acc_lo) & acc_mask) + acc_lo
            clamped = min(max(a, acc_lo), acc_hi)
            acc[p] = a if inside else (wrapped if acc_wrap else clamped)
    n_sat = 0
    for p in range(n):
        a = acc[p]
        # selects and masks, not multiplies: AVX-512 has no cheap 64-bit multiply
        offset = base + (neg_extra if a < 0 else 0) + ((a >> shift) & parity)
        q = (a + offset) >> shift
        inside = (q >= lo) & (q <= hi)
        n_sat += 1 - np.int64(inside)
        over = hi if q > hi else sym_lo
        over = 0 if zero else over
        over = (((q - lo) & mask) + lo) if wrap else over
        dest[p] = q if inside else over
    return n_acc, n_sat, top, bottom


@intrinsic
def _ashr32(typingctx, value, shift):
    """``value >> shift`` in int32 (an arithmetic shift, ``shift`` 0..31). Numba's ``>>``
    widens int32 operands to int64, and LLVM then shifts 8 lanes per instruction instead of
    16: 1.8M int32 sums to int8 codes (rnd_conv) on 2 cores 0.47 -> 0.20 ms."""
    sig = types.int32(types.int32, types.int32)

    def codegen(context, builder, signature, args):
        return builder.ashr(*args)

    return sig, codegen


@njit(inline="always")
def _requantise_sat32(lanes, bias, rq, dest):
    """:func:`requantise_lanes`' int32 kernel: every value and rounding offset fits int32
    (``rq[11]``), no final accumulator, saturating output. One pass, twice the lanes of int64
    and no loop-invariant mode tests: 1,024 float32 sums to int8 codes on one core, 0.55 ->
    0.29 ns each (trn), 0.55 -> 0.37 (rnd_conv). Every operation is cast back to int32 at once,
    since Numba widens int32 arithmetic to int64 (which halves the vector lanes); shifts go
    through :func:`_ashr32` for the same reason."""
    i32 = np.int32
    shift, base, neg_extra, parity, lo, hi, sym_lo = (
        i32(rq[0]), i32(rq[1]), i32(rq[2]), i32(rq[3]), i32(rq[4]), i32(rq[5]), i32(rq[6]))
    top = i32(0)
    bottom = i32(0)
    n_sat = i32(0)
    if parity == 0 and neg_extra == 0:  # trn, rnd, rnd_min_inf
        for p in range(lanes.size):
            a = i32(i32(lanes[p]) + i32(bias_at(bias, p)))
            top = max(top, a)
            bottom = min(bottom, a)
            q = _ashr32(i32(a + base), shift)
            n_sat = i32(n_sat + i32(q > hi) + i32(q < lo))
            dest[p] = hi if q > hi else (sym_lo if q < lo else q)
    elif neg_extra == 0:  # rnd_conv
        for p in range(lanes.size):
            a = i32(i32(lanes[p]) + i32(bias_at(bias, p)))
            top = max(top, a)
            bottom = min(bottom, a)
            q = _ashr32(i32(a + i32(base + i32(_ashr32(a, shift) & parity))), shift)
            n_sat = i32(n_sat + i32(q > hi) + i32(q < lo))
            dest[p] = hi if q > hi else (sym_lo if q < lo else q)
    else:  # trn_zero, rnd_zero, rnd_inf
        for p in range(lanes.size):
            a = i32(i32(lanes[p]) + i32(bias_at(bias, p)))
            top = max(top, a)
            bottom = min(bottom, a)
            offset = i32(base + (neg_extra if a < 0 else i32(0))
                         + i32(_ashr32(a, shift) & parity))
            q = _ashr32(i32(a + offset), shift)
            n_sat = i32(n_sat + i32(q > hi) + i32(q < lo))
            dest[p] = hi if q > hi else (sym_lo if q < lo else q)
    return 0, np.int64(n_sat), np.int64(top), np.int64(bottom)


def bias_at(bias, p):
    """The bias of lane ``p``: ``bias[p]`` for an array of them (one per lane), else the one
    scalar bias of every lane."""
    return bias[p] if isinstance(bias, np.ndarray) else bias


@overload(bias_at, inline="always")
def _bias_at(bias, p):
    if isinstance(bias, types.Array):
        return lambda bias, p: bias[p]
    return lambda bias, p: bias


@njit(inline="always")
def int32_kernel(rq, size):
    """Whether :func:`requantise_lanes` takes its int32 kernel: where ``rq`` allows it (its
    flag ``rq[11]``) for codes of 1 or 2 bytes. Wider codes (outputs of more than 16 bits,
    whose sums rarely fit int32) take the int64 pass: an int32 kernel for each of them cost
    its every caller compile time (the requantisation code was a third of a first run's
    compiling)."""
    return rq[11] != 0 and size <= 2


@njit(cache=True)
def requantise_lanes(lanes, bias, rq, wide, dest):
    """``lanes`` (exact sums in any numeric dtype) + ``bias`` (one int64 for every lane, or an
    array of one per lane: int32 where ``rq`` allows the int32 kernel, so that its lanes stay
    int32) -> output codes in ``dest``, their bytes (:func:`code_bytes`):
    the int32 kernel where :func:`int32_kernel` says it applies, else through the int64 buffer
    ``wide`` (at least as long as ``lanes``) and :func:`requantise_row`. Returns what
    :func:`requantise_row` returns. Not inlined: the sparse kernels and
    :func:`finish_fast_rows` call it once per row or tile (hundreds of lanes), and one
    compiled copy per lane dtype keeps their many specialisations small to compile."""
    size = code_size(dest, lanes.size)
    if int32_kernel(rq, size):
        if size == 1:
            return _requantise_sat32(lanes, bias, rq, dest.view(np.int8))
        return _requantise_sat32(lanes, bias, rq, dest.view(np.int16))
    acc = wide[: lanes.size]
    for t in range(lanes.size):
        acc[t] = np.int64(lanes[t]) + bias_at(bias, t)
    return requantise_row(acc, rq, dest)


@njit(inline="always")
def _finish_fast(sums, bias, bias_last, rq, out):
    """:func:`_finish` for a right shift of 1..62 bits with a deterministic rounding mode
    (``rq`` from :func:`fast_requant_args`), row by row through the int64 pass
    (:func:`requantise_row`), into ``out``, the codes' bytes (:func:`code_bytes`). ``bias``
    (int64) is indexed by the last axis when ``bias_last`` (one per lane), else by the middle
    one (one per row). Rows of any strides: on the transposed view a convolution's float sums
    are, the int32 kernel does not vectorise (docs/results/kernels.md); contiguous rows that
    it takes go to :func:`_finish_lanes`."""
    n_a, n_b, n_c = sums.shape
    tasks = n_a * n_b
    acc_events, sat_events, highest, lowest = _task_stats(tasks)
    for task in prange(tasks):
        i = task % n_a  # channel-major, as in finish
        j = task // n_a
        acc = np.empty(n_c, np.int64)
        if bias_last:
            for p in range(n_c):
                acc[p] = np.int64(sums[i, j, p]) + bias[p]
        else:
            for p in range(n_c):
                acc[p] = np.int64(sums[i, j, p]) + bias[j]
        row = requantise_row(acc, rq, out[i, j])
        acc_events[task], sat_events[task], highest[task], lowest[task] = row
    return totals(acc_events, sat_events, highest, lowest)


@njit(inline="always")
def _finish_lanes(sums, bias, lane_bias, rq, out):
    """:func:`_finish_fast` through :func:`requantise_lanes`' int32 kernel, where ``rq``
    allows it and ``sums`` is C-contiguous: with ``lane_bias`` (C,) int32 one bias per lane
    (a linear layer's (N, 1, J) sums: 256 x 500 float32 sums to int8 codes on one core 0.088
    -> 0.052 ms; int32, so that its loads stay 16 lanes wide), with ``lane_bias`` empty
    ``bias[j]`` (int64) per row (a convolution's (N, J, P) sums, e.g. the 16-bit digit
    path's; the int8 convolutions requantise inside their own kernels). Codes wider than 2
    bytes take the int64 pass (:func:`int32_kernel`). A kernel of its
    own: every row type a kernel is compiled for compiles the calls of every branch."""
    n_a, n_b, n_c = sums.shape
    tasks = n_a * n_b
    acc_events, sat_events, highest, lowest = _task_stats(tasks)
    per_lane = lane_bias.size > 0
    for task in prange(tasks):
        i = task % n_a
        j = task // n_a
        acc = np.empty(n_c, np.int64)
        if per_lane:
            row = requantise_lanes(sums[i, j], lane_bias, rq, acc, out[i, j])
        else:
            row = requantise_lanes(sums[i, j], bias[j], rq, acc, out[i, j])
        acc_events[task], sat_events[task], highest[task], lowest[task] = row
    return totals(acc_events, sat_events, highest, lowest)


# Tasks of finish_fast_rows: enough for any thread count this runs on to share them evenly.
_ROW_BLOCKS = 64


@njit(cache=True, parallel=True)
def finish_fast_rows(sums, bias, rows_per_bias, rq, out):
    """:func:`finish_fast` for sums whose rows each belong to one bias: ``sums`` (R, C) any
    numeric dtype, row r takes ``bias[r // rows_per_bias]``, into ``out``, the bytes of (R, C)
    codes (:func:`code_bytes`). Batch-last sums (J, P, N) are R = J * P rows of N images:
    requantised here in their own order, every row contiguous and vectorised, then transposed
    to (N, J, P) as codes
    (:func:`transpose2d`), which is cheaper than requantising them in (N, J, P) order with
    stride N (measured in docs/results/sparse.md). Tasks are up to :data:`_ROW_BLOCKS` blocks
    of rows, each with one int64 buffer."""
    n_rows, n_cols = sums.shape
    blocks = max(1, min(n_rows, _ROW_BLOCKS))
    acc_events, sat_events, highest, lowest = _task_stats(blocks)
    for block in prange(blocks):
        acc = np.empty(n_cols, np.int64)
        n_acc = 0
        n_sat = 0
        top = np.int64(0)
        bottom = np.int64(0)
        for row in range(n_rows * block // blocks, n_rows * (block + 1) // blocks):
            row_acc, row_sat, row_top, row_bottom = requantise_lanes(
                sums[row], bias[row // rows_per_bias], rq, acc, out[row])
            n_acc += row_acc
            n_sat += row_sat
            top = max(top, row_top)
            bottom = min(bottom, row_bottom)
        acc_events[block] = n_acc
        sat_events[block] = n_sat
        highest[block] = top
        lowest[block] = bottom
    return totals(acc_events, sat_events, highest, lowest)


@functools.lru_cache(maxsize=256)
def fast_requant_args(rmode: int, shift: int, lo: int, hi: int, bits: int, signed: bool,
                      omode: int, acc_bits: int, acc_omode: int, acc_bound: int) -> tuple:
    """The int64 tuple :func:`requantise_row` and :func:`requantise_lanes` take, for a
    deterministic rounding mode ``rmode`` and a right shift of 1..62 bits (the caller
    guarantees ``acc_bound``, a bound on ``|sum + bias|``, with ``acc_bound + 2^shift < 2^63``,
    so the rounding offset cannot overflow): (shift, rounding offsets, the output range, where
    negative overflow saturates (``lo``, or ``lo + 1`` for sat_sym), 2^bits - 1 (or -1 for 64
    bits), the output overflow mode, the final accumulator's width and overflow mode (-1:
    none), and 1 where the int32 saturating kernel applies (no final accumulator, a saturating
    output, ``acc_bound + 2^shift < 2^31``: see :func:`requantise_lanes`), else 0)."""
    base, neg_extra, parity = rounding_offsets(rmode, shift)
    sym_lo = lo + 1 if omode == SAT_SYM and signed and bits > 1 else lo
    mask = (1 << bits) - 1 if bits < 64 else -1
    narrow = int(acc_omode < 0 and omode in (SAT, SAT_SYM) and acc_bound + (1 << shift) < 1 << 31
                 and lo >= -(1 << 31) and hi < 1 << 31)
    return (shift, base, neg_extra, parity, lo, hi, sym_lo, mask, omode, acc_bits, acc_omode,
            narrow)


# Each requantisation kernel is compiled twice from one inlined body: over Numba's threads, and
# on the calling thread alone for outputs too small to be worth waking Numba's sleeping pool
# right after a BLAS GEMM (the serial build also skips the parallel launch itself: lenet5.fc1
# GEMM + requantisation 0.92-0.97 -> 0.89-0.90 ms against set_num_threads(1) on the threaded one).
@njit(cache=True, parallel=True)
def finish(sums, bias, bias_last, acc_bits, acc_omode, shift, lo, hi, bits, signed, rmode,
           omode, u, out):
    """:func:`_finish` over Numba's threads."""
    return _finish(sums, bias, bias_last, acc_bits, acc_omode, shift, lo, hi, bits, signed,
                   rmode, omode, u, out)


@njit(cache=True)
def finish_serial(sums, bias, bias_last, acc_bits, acc_omode, shift, lo, hi, bits, signed,
                  rmode, omode, u, out):
    """:func:`_finish` on the calling thread."""
    return _finish(sums, bias, bias_last, acc_bits, acc_omode, shift, lo, hi, bits, signed,
                   rmode, omode, u, out)


@njit(cache=True, parallel=True)
def finish_fast(sums, bias, bias_last, rq, out):
    """:func:`_finish_fast` over Numba's threads."""
    return _finish_fast(sums, bias, bias_last, rq, out)


@njit(cache=True)
def finish_fast_serial(sums, bias, bias_last, rq, out):
    """:func:`_finish_fast` on the calling thread."""
    return _finish_fast(sums, bias, bias_last, rq, out)


@njit(cache=True, parallel=True)
def finish_lanes(sums, bias, lane_bias, rq, out):
    """:func:`_finish_lanes` over Numba's threads."""
    return _finish_lanes(sums, bias, lane_bias, rq, out)


@njit(cache=True)
def finish_lanes_serial(sums, bias, lane_bias, rq, out):
    """:func:`_finish_lanes` on the calling thread."""
    return _finish_lanes(sums, bias, lane_bias, rq, out)


# A linear layer with at most this many outputs (on a float path, with the vectorised
# requantisation) runs in one fused pass, :func:`linear_few_outputs`, instead of cast + GEMM +
# requantisation: BLAS's kernels are built for wide outputs, and three passes over two thread
# pools cost more than the arithmetic. Measured, 2 cores, 256 images x 500 inputs, sums alone:
# 10 outputs 0.024 ms fused against 0.042 ms sgemm, 32 outputs 0.066 against 0.055.
FEW_OUTPUTS = 24

# Images per task of linear_few_outputs: each weight vector loaded serves this many dot products.
_FEW_IMAGES = 4


@njit(inline="always")
def image_tasks(n_img, per_task, out):
    """A few-output linear kernel's tasks of ``per_task`` images each: (task count, a stats
    row per task for :func:`finish_images` to fill, ``out`` (the codes' bytes) flat)."""
    tasks = (n_img + per_task - 1) // per_task
    return tasks, np.empty((tasks, 6), np.int64), out.reshape(-1)


@njit(inline="always")
def task_images(task, per_task, n_img):
    """(first image, image count) of task ``task`` of :func:`image_tasks`."""
    i0 = task * per_task
    return i0, min(per_task, n_img - i0)


@njit(inline="always")
def rows_range(x, i0, rows):
    """The smallest and largest code of images ``i0 .. i0 + rows - 1`` of ``x`` (N, K), a
    vectorised min and max per image."""
    lo = np.int64(x[i0, 0])
    hi = lo
    for r in range(rows):
        lo = min(lo, np.int64(x[i0 + r].min()))
        hi = max(hi, np.int64(x[i0 + r].max()))
    return lo, hi


@njit(inline="always")
def _cast_rows(x, i0, rows, buf):
    """Images ``i0 .. i0 + rows - 1`` of the codes ``x`` into the rows of ``buf`` (the lane
    dtype; the rows beyond stay as they are)."""
    for r in range(rows):
        row = x[i0 + r]
        for k in range(row.size):
            buf[r, k] = row[k]


@njit(inline="always")
def finish_images(acc, rows, n_out, i0, rq, flat, size, stats, x_lo, x_hi):
    """The end of a few-output linear task: its ``rows`` images' biased sums ``acc`` (rows x
    n_out, image-major) requantised into ``flat`` (the bytes of the (N, J) codes, flattened,
    ``size`` bytes a code) from image ``i0`` on, and the task's ``stats`` row filled
    (accumulator overflows, saturations, largest and smallest sum, smallest and largest input
    code) for :func:`task_totals`."""
    n_acc, n_sat, top, bottom = requantise_row(
        acc[: rows * n_out], rq, flat[i0 * n_out * size : (i0 + rows) * n_out * size])
    stats[0] = n_acc
    stats[1] = n_sat
    stats[2] = top
    stats[3] = bottom
    stats[4] = x_lo
    stats[5] = x_hi


@njit(cache=True, parallel=True, fastmath={"contract", "reassoc"})
def linear_few_outputs(x, w, bias, rq, out):
    """``out = requantise(x @ w.T + bias)`` for a linear layer with few outputs, in one pass.

    ``x`` (N, K) integer codes of any dtype, read as they are (N, K >= 1); ``w`` (J, K) the
    weights in float lanes where the caller's bound makes every partial sum an integer the
    lanes hold exactly, in any order: that is what makes reassociating the dot products
    (``fastmath`` "reassoc", so that they vectorise) exact. ``bias`` (J,) int64, ``rq`` from
    :func:`fast_requant_args`, ``out`` the bytes of (N, J) codes (:func:`code_bytes`). A
    task casts :data:`_FEW_IMAGES`
    images into a buffer that stays in L1 and takes their J dot products together, so each
    weight vector is loaded once for all of them; their sums are requantised at once
    (:func:`requantise_row`). Returns (accumulator overflow events, output saturations,
    largest and smallest sum, smallest and largest input code): the caller range-checks the
    codes with the last two.
    """
    n_img, fan_in = x.shape
    n_out = w.shape[0]
    size = code_size(out, n_img * n_out)
    tasks, stats, flat = image_tasks(n_img, _FEW_IMAGES, out)
    for task in prange(tasks):
        i0, rows = task_images(task, _FEW_IMAGES, n_img)
        buf = np.zeros((_FEW_IMAGES, fan_in), w.dtype)
        x_lo, x_hi = rows_range(x, i0, rows)
        _cast_rows(x, i0, rows, buf)
        x0, x1, x2, x3 = buf[0], buf[1], buf[2], buf[3]
        acc = np.empty(_FEW_IMAGES * n_out, np.int64)
        for j in range(n_out):
            wj = w[j]
            s0 = s1 = s2 = s3 = wj[0] - wj[0]  # zero in the lane dtype
            for k in range(fan_in):
                s0 += x0[k] * wj[k]
                s1 += x1[k] * wj[k]
                s2 += x2[k] * wj[k]
                s3 += x3[k] * wj[k]
            acc[j] = np.int64(s0) + bias[j]
            acc[n_out + j] = np.int64(s1) + bias[j]
            acc[2 * n_out + j] = np.int64(s2) + bias[j]
            acc[3 * n_out + j] = np.int64(s3) + bias[j]
        finish_images(acc, rows, n_out, i0, rq, flat, size, stats[task], x_lo, x_hi)
    return task_totals(stats)


@njit(cache=True)
def task_totals(stats):
    """Per-task counters (T, 4 or 6) of a parallel kernel -> (sum, sum, max, min[, min, max])
    of its columns. A separate serial function on purpose: in a ``parallel=True`` kernel every
    array reduction (and ``np.zeros``) becomes a parallel region of its own, ~1.6 us each to
    start on 2 cores (a fc2-sized layer: 6 reductions were 8 of its 14 us at one image)."""
    n_acc, n_sat, top, bottom = totals(stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3])
    if stats.shape[1] == 4 or stats.shape[0] == 0:
        return n_acc, n_sat, top, bottom, np.int64(0), np.int64(0)
    low = stats[0, 4]
    high = stats[0, 5]
    for t in range(stats.shape[0]):
        low = min(low, stats[t, 4])
        high = max(high, stats[t, 5])
    return n_acc, n_sat, top, bottom, low, high


@njit(cache=True)
def totals(acc_events, sat_events, highest, lowest):
    """(sum, sum, max, min) of per-task counters, serially (see :func:`task_totals`). Every
    task's largest and smallest sum start from 0, so 0 is the neutral start here too."""
    n_acc = np.int64(0)
    n_sat = np.int64(0)
    top = np.int64(0)
    bottom = np.int64(0)
    for t in range(acc_events.size):
        n_acc += acc_events[t]
        n_sat += sat_events[t]
        top = max(top, highest[t])
        bottom = min(bottom, lowest[t])
    return n_acc, n_sat, top, bottom


@njit(cache=True)
def total(values):
    """The sum of per-task counts, serially (see :func:`task_totals`)."""
    count = np.int64(0)
    for t in range(values.size):
        count += values[t]
    return count


@njit(inline="always")
def _first_max_of_pairs(r0, r1, ox):
    """The first maximum of a 2 x 2 window (columns 2 * ox, 2 * ox + 1 of rows r0 and r1) and
    its index (row * 2 + column)."""
    best = r0[2 * ox]
    where = np.int8(0)
    v = r0[2 * ox + 1]
    if v > best:
        best, where = v, np.int8(1)
    v = r1[2 * ox]
    if v > best:
        best, where = v, np.int8(2)
    v = r1[2 * ox + 1]
    if v > best:
        best, where = v, np.int8(3)
    return best, where


@njit(cache=True, parallel=True)
def maxpool_forward(x, k):
    """Non-overlapping k x k max pooling of floats: (values, index of the first maximum in each
    window as int8 (row * k + column)). 2 x 2 windows (LeNet5's) have a loop of their own that
    vectorises (2 cores, (64, 20, 24, 24) float32: 0.27 -> 0.06 ms)."""
    n_img, chans, h, w = x.shape
    oh, ow = h // k, w // k
    out = np.empty((n_img, chans, oh, ow), x.dtype)
    arg = np.empty((n_img, chans, oh, ow), np.int8)
    for nc in prange(n_img * chans):
        n, c = nc // chans, nc % chans
        for oy in range(oh):
            if k == 2:
                r0, r1 = x[n, c, 2 * oy], x[n, c, 2 * oy + 1]
                values, where = out[n, c, oy], arg[n, c, oy]
                for ox in range(ow):
                    values[ox], where[ox] = _first_max_of_pairs(r0, r1, ox)
                continue
            for ox in range(ow):
                best = x[n, c, oy * k, ox * k]
                where = 0
                for i in range(k):
                    for j in range(k):
                        v = x[n, c, oy * k + i, ox * k + j]
                        if v > best:
                            best, where = v, i * k + j
                out[n, c, oy, ox] = best
                arg[n, c, oy, ox] = where
    return out, arg


@njit(cache=True, parallel=True)
def maxpool_backward(dy, arg, k):
    """Send each window's gradient to the position :func:`maxpool_forward` picked, zeros
    elsewhere: (N, C, OH * k, OW * k). 2 x 2 windows write every input position once instead
    of zeroing them all first (2 cores, (64, 20, 12, 12) float32: 0.30 -> 0.18 ms)."""
    n_img, chans, oh, ow = dy.shape
    if k == 2:
        dx = np.empty((n_img, chans, 2 * oh, 2 * ow), dy.dtype)
        for nc in prange(n_img * chans):
            n, c = nc // chans, nc % chans
            for oy in range(oh):
                d, a = dy[n, c, oy], arg[n, c, oy]
                r0, r1 = dx[n, c, 2 * oy], dx[n, c, 2 * oy + 1]
                for ox in range(ow):
                    v, where = d[ox], a[ox]
                    r0[2 * ox] = v if where == 0 else 0
                    r0[2 * ox + 1] = v if where == 1 else 0
                    r1[2 * ox] = v if where == 2 else 0
                    r1[2 * ox + 1] = v if where == 3 else 0
        return dx
    dx = np.zeros((n_img, chans, oh * k, ow * k), dy.dtype)
    for nc in prange(n_img * chans):
        n, c = nc // chans, nc % chans
        for oy in range(oh):
            for ox in range(ow):
                a = arg[n, c, oy, ox]
                dx[n, c, oy * k + a // k, ox * k + a % k] = dy[n, c, oy, ox]
    return dx


@njit(cache=True, parallel=True)
def _pool2d(x, kh, kw, sh, sw, take_max, out):
    n_img, chans, _, _ = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for nc in prange(n_img * chans):
        n = nc // chans
        c = nc % chans
        for oy in range(oh):
            for ox in range(ow):
                y0 = oy * sh
                x0 = ox * sw
                acc = x[n, c, y0, x0]
                for i in range(kh):
                    for k in range(kw):
                        if i == 0 and k == 0:
                            continue
                        v = x[n, c, y0 + i, x0 + k]
                        if take_max:
                            acc = max(acc, v)
                        else:
                            acc += v
                out[n, c, oy, ox] = acc
    return out


def pool2d_codes(x: np.ndarray, kernel, stride, take_max: bool) -> np.ndarray:
    """Max (``take_max``) or sum over (kh, kw) windows of int64 codes (N, C, H, W), no padding."""
    kh, kw = kernel
    sh, sw = stride
    n, c, h, w = x.shape
    oh = conv_output_size(h, kh, sh, 0)
    ow = conv_output_size(w, kw, sw, 0)
    out = np.empty((n, c, oh, ow), np.int64)
    return _pool2d(np.ascontiguousarray(x, dtype=np.int64), kh, kw, sh, sw, take_max, out)


@njit(cache=True, parallel=True)
def _relu_backward(dy, y, out):
    for i in prange(dy.size):
        out[i] = dy[i] if y[i] > 0 else 0
    return out


def relu_backward(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dy where the ReLU's output y is positive, else 0: one parallel pass, no mask array
    (2 cores, LeNet5 conv1 at batch 256: about 2 ms -> 0.6 ms)."""
    dy, y = np.ascontiguousarray(dy), np.ascontiguousarray(y)
    out = np.empty_like(dy)
    _relu_backward(dy.reshape(-1), y.reshape(-1), out.reshape(-1))
    return out


@njit(cache=True, parallel=True)
def _unsaturated_gradient(dy, y, lo, hi, out):
    for i in prange(dy.size):
        out[i] = 0 if (y[i] == lo) | (y[i] == hi) else dy[i]
    return out


def unsaturated_gradient(dy: np.ndarray, y: np.ndarray, lo, hi) -> np.ndarray:
    """dy where the output y (same shape) did not saturate at ``lo`` or ``hi``, else 0: the
    clipped straight-through estimator's gradient, as ``np.where((y == lo) | (y == hi), 0,
    dy)`` gives it (``lo`` and ``hi`` compared in y's dtype, as numpy compares a Python float
    with an array), in one parallel pass and no mask array (2 cores, a quantised LeNet5's conv1
    output at 64 images, 737,280 values: numpy's mask and ``where`` 2.1 ms, this 0.06 ms)."""
    dy, y = np.ascontiguousarray(dy), np.ascontiguousarray(y)
    if dy.shape != y.shape:
        raise ShapeError(f"gradient of shape {dy.shape} for an output of shape {y.shape}")
    out = np.empty_like(dy)
    _unsaturated_gradient(dy.reshape(-1), y.reshape(-1), y.dtype.type(lo), y.dtype.type(hi),
                          out.reshape(-1))
    return out


@njit(cache=True, parallel=True)
def _relu(x, out):
    for i in prange(x.size):
        out[i] = 0 if x[i] <= 0 else x[i]  # NaN is not <= 0: it passes through, as in maximum
    return out


def relu(x: np.ndarray) -> np.ndarray:
    """max(x, 0) in one parallel pass (2 cores, LeNet5 conv1's output at batch 256: numpy's
    single-threaded ``maximum`` takes about 1.5 ms)."""
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _relu(x.reshape(-1), out.reshape(-1))
    return out


@njit(cache=True)
def cast_min_max(flat, out):
    """``out[:] = flat`` in ``out``'s dtype, and (min, max) of ``flat``, in one pass.

    ``flat`` is a non-empty 1-D integer array; the caller checks the range before trusting the
    cast (an int64 code beyond 2^24 is not exact in float32, and the range check says so).
    Serial on purpose: it runs between BLAS calls, where waking Numba's thread pool costs more
    than the pass (2 cores, 128k codes: 0.025 ms serial, 0.04-0.3 ms parallel).
    """
    if flat.itemsize < 8:
        # narrow codes: Numba's own min and max vectorise where the fused loop does not
        # (204,800 int8 codes: 0.038 -> 0.019 ms); for int64 codes the fused loop is faster
        lo, hi = np.int64(flat.min()), np.int64(flat.max())
        for i in range(flat.size):
            out[i] = flat[i]
        return lo, hi
    lo = np.int64(flat[0])
    hi = lo
    for i in range(flat.size):
        v = np.int64(flat[i])
        out[i] = v
        lo = v if v < lo else lo
        hi = v if v > hi else hi
    return lo, hi
