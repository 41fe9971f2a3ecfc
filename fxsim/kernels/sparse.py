"""Compressed (pruned) weights and zero-skipping kernels, bit-identical to the dense ones.

A sparse accelerator (EIE, SCNN) stores only the nonzero weights and never multiplies the
others. :class:`CompressedWeights` is that storage: CSR over output channels (or features),
with column indices into the flattened fan-in (input channel, kernel row, kernel column), in
the canonical MAC order.

The kernel needs no im2col. The input is transposed once to ``(C * Hp * Wp, N)`` with explicit
zero padding, so that a batch of images is one contiguous vector per input pixel; with a column
stride sw > 1 each padded row is also split into sw phases (columns ix = phase + sw * q), so
that a stored weight at (c, kh, kw) meets the inputs of output columns 0, 1, 2, ... in adjacent
rows: one output row is one contiguous run of ``OW * N`` values for every stored weight, and
one stored weight is one long vector update. A linear layer is the case Hp = Wp = 1, one
position, base = input index. Time is proportional to the stored weights times the output
positions: skipping is real, not simulated. Only where it is cheaper, at densities above ~0.75,
do blocks of four output channels run over the union of their columns with filler zeros
(:meth:`CompressedWeights.quads`), as index-sharing accelerators do (a per-MAC register,
:func:`sparse_per_mac`, runs every weight above a density of 0.7, as the dense per-MAC datapath
does at any density, two or four channels per pass); the counters report the simulated
datapath's MACs either way.

Every output sees its MACs in canonical order (stored weights are visited in index order), so
the per-MAC saturating and wrapping accumulators give exactly the dense kernels' results;
adding a skipped zero product would change neither an exact nor a saturated sum.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from fxsim.errors import ShapeError
from fxsim.kernels.dense import (
    batch_last_row,
    code_size,
    finish_images,
    image_tasks,
    phase_width,
    requantise_lanes,
    rows_range,
    task_images,
    task_totals,
    total,
)
from fxsim.kernels.tile import (
    add_products,
    add_products_quad,
    per_mac_products,
    per_mac_products_pair,
    per_mac_products_quad,
    unit_first,
    units,
)


class CompressedWeights:
    """CSR storage of a layer's nonzero weight codes.

    ``row_ptr`` (J + 1,) int64, ``col_idx`` (nnz,) int64 into the flattened fan-in,
    ``values`` (nnz,) int64 codes, ``shape`` the dense weight shape ((J, K) or (J, C, KH, KW)),
    ``eie_fillers`` the filler entries an EIE encoding adds (:func:`storage_bytes`).
    Only nonzero codes are stored: a weight that survived pruning but quantised to 0 is skipped
    like a pruned one (a real compressor drops it too).
    """

    def __init__(self, w_codes: np.ndarray, mask: np.ndarray | None = None):
        w = np.asarray(w_codes)
        if mask is not None:
            check_mask(w, mask)
        flat = w.reshape(w.shape[0], -1)
        keep = flat != 0
        self.shape = w.shape
        self.row_ptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
        rows, cols = np.nonzero(keep)  # row-major: each row's indices ascend, canonical order
        del rows
        self.col_idx = cols.astype(np.int64)
        self.values = flat[keep].astype(np.int64)
        self.eie_fillers = int(nonzero_counts(np.ascontiguousarray(flat, np.int64))[1])

    @property
    def n_out(self) -> int:
        return self.shape[0]

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[1:])  # Python ints: this is read on every call

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    @property
    def density(self) -> float:
        total = self.n_out * self.fan_in
        return self.nnz / total if total else 0.0

    def fills_blocks(self) -> bool:
        """Whether at most a quarter of the weights are zero, where running output channels in
        blocks over the union of their columns (filler zeros included) costs less than one by
        one (see :data:`QUAD_COST`; :meth:`quads` decides per block of four)."""
        return self.nnz * QUAD >= QUAD_COST * self.n_out * self.fan_in

    def _chunk_bounds(self, columns: int) -> np.ndarray:
        """0, columns, 2 * columns, ..., fan_in: the fan-in cut into chunks."""
        return np.append(np.arange(0, self.fan_in, columns), self.fan_in)

    def chunk_pointers(self, columns: int) -> np.ndarray:
        """(J, chunks + 1) int64: where each row's stored weights cross every multiple of
        ``columns`` in the fan-in. Row j's weights in chunk c are ``ptr[j, c] .. ptr[j, c + 1] -
        1``; chunk 0 starts at ``row_ptr[j]``, the last ends at ``row_ptr[j + 1]``."""
        bounds = self._chunk_bounds(columns)
        rows = np.arange(self.n_out, dtype=np.int64)
        # (row, column) as one key, ascending over the whole CSR (rows in order, columns
        # ascending within a row)
        keys = np.repeat(rows, np.diff(self.row_ptr)) * self.fan_in + self.col_idx
        return np.searchsorted(keys, rows[:, None] * self.fan_in + bounds).astype(np.int64)

    def quads(self, columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Output channels 4b .. 4b + 3 as one block over the union of their columns, where
        that is cheaper than running them one by one (see :data:`QUAD_COST`).

        Returns ``blocked`` (B,) bool, B = ceil(J / 4); ``ptr`` (B, chunks + 1) int64: block
        b's entries in chunk c (chunks of ``columns`` as in :meth:`chunk_pointers`) are ``ptr[b,
        c] .. ptr[b, c + 1] - 1`` (none for a block that is not blocked); ``cols`` (U,) int64
        their columns, ascending per block; ``values`` (U, 4) int64 the four channels' weights
        there, 0 where a channel stores none (and for the rows past J of the last block)."""
        bounds = self._chunk_bounds(columns)
        n_blocks = -(-self.n_out // QUAD)
        blocked = np.zeros(n_blocks, bool)
        ptr = np.zeros((n_blocks, bounds.size), np.int64)
        cols, values = [], []
        start = 0
        for b in range(n_blocks):
            first, last = self.row_ptr[b * QUAD], self.row_ptr[min(self.n_out, (b + 1) * QUAD)]
            union = np.unique(self.col_idx[first:last])
            blocked[b] = union.size * QUAD_COST <= last - first
            if blocked[b]:
                block = np.zeros((union.size, QUAD), np.int64)
                for i in range(min(QUAD, self.n_out - b * QUAD)):
                    lo, hi = self.row_ptr[b * QUAD + i], self.row_ptr[b * QUAD + i + 1]
                    block[np.searchsorted(union, self.col_idx[lo:hi]), i] = self.values[lo:hi]
                cols.append(union)
                values.append(block)
                ptr[b] = start + np.searchsorted(union, bounds)
                start += union.size
            else:
                ptr[b] = start
        if not cols:
            return blocked, ptr, np.zeros(0, np.int64), np.zeros((0, QUAD), np.int64)
        return blocked, ptr, np.concatenate(cols), np.concatenate(values)

    def storage_bytes(self, weight_bits: int) -> dict[str, int]:
        """Bytes the weights take at ``weight_bits`` bits each, in four encodings
        (:func:`storage_bytes`)."""
        return storage_bytes(self.n_out, self.fan_in, self.nnz, self.eie_fillers, weight_bits)


def storage_bytes(n_out: int, fan_in: int, nnz: int, eie_fillers: int,
                  weight_bits: int) -> dict[str, int]:
    """Bytes of ``n_out`` x ``fan_in`` weights of ``weight_bits`` bits, ``nnz`` of them nonzero,
    in four encodings.

    dense:   every weight.
    bitmask: one presence bit per weight + the nonzero values.
    csr:     values + a column index of ceil(log2 K) bits each + J + 1 row pointers of
             ceil(log2(nnz + 1)) bits.
    eie:     EIE-style: each entry is a value + a 4-bit count of zeros before it; a gap of
             16 or more zeros costs one filler entry (value 0) per 16 zeros (``eie_fillers`` in
             all); + J + 1 row pointers of ceil(log2(entries + 1)) bits.
    """
    total = n_out * fan_in
    index_bits = max(1, math.ceil(math.log2(max(fan_in, 2))))
    pointer_bits = max(1, math.ceil(math.log2(nnz + 1)))
    entries = nnz + eie_fillers
    eie_pointer_bits = max(1, math.ceil(math.log2(entries + 1)))
    bits = {
        "dense": total * weight_bits,
        "bitmask": total + nnz * weight_bits,
        "csr": nnz * (weight_bits + index_bits) + (n_out + 1) * pointer_bits,
        "eie": entries * (weight_bits + 4) + (n_out + 1) * eie_pointer_bits,
    }
    return {name: -(-b // 8) for name, b in bits.items()}


@njit(cache=True, parallel=True)
def nonzero_counts(matrix):
    """(nonzero weights, EIE filler entries) of a (J, K) weight matrix, without building its
    CSR: what :func:`storage_bytes` needs (a quantised training step asks for it every step,
    where the CSR cost LeNet5 3.5 ms)."""
    n_rows, n_cols = matrix.shape
    stored = np.zeros(n_rows, np.int64)
    fillers = np.zeros(n_rows, np.int64)
    for j in prange(n_rows):
        previous = -1
        for k in range(n_cols):
            if matrix[j, k] != 0:
                fillers[j] += (k - previous - 1) // 16
                stored[j] += 1
                previous = k
    return stored.sum(), fillers.sum()


def random_mask(shape, density: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask keeping exactly ``round(density * size)`` weights chosen uniformly."""
    if not 0.0 < density <= 1.0:  # also rejects NaN
        raise ShapeError(f"density must be in (0, 1], got {density}")
    size = int(np.prod(shape))
    keep = np.zeros(size, bool)
    keep[rng.permutation(size)[: round(density * size)]] = True
    return keep.reshape(shape)


def check_mask(w: np.ndarray, mask) -> None:
    """Reject a mask that does not describe ``w``: wrong shape or dtype, or weights it prunes
    that are not zero. (fxsim rejects rather than zeroes them: a nonzero pruned weight means
    the model and its mask disagree, and silently changing weights would hide that.)"""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ShapeError(f"mask must be boolean, got dtype {mask.dtype}")
    if mask.shape != w.shape:
        raise ShapeError(f"mask shape {mask.shape} does not match weight shape {w.shape}")
    stray = (~mask) & (w != 0)
    if stray.any():
        index = tuple(int(i) for i in np.argwhere(stray)[0])
        raise ShapeError(
            f"weight at index {index} is {w[index]} but the mask prunes it; "
            f"{int(stray.sum())} pruned weights are nonzero"
        )


def conv_bases(shape, cols: np.ndarray, padded_hw, stride_w: int = 1) -> np.ndarray:
    """Row of the inputs that weight columns ``cols`` (into the flattened (c, kh, kw) fan-in
    of weights of ``shape``) meet at output (0, 0) in the
    :func:`fxsim.kernels.dense.layout_input` layout; output (oy, ox) reads that row
    + ``oy * stride_h * row_len`` + ``ox`` (see :func:`fxsim.kernels.dense.input_row_length`).
    A linear layer's column is its input row."""
    if len(shape) == 2:
        return cols
    _, _, kh, kw = shape
    hp, wp = padded_hw
    wq = phase_width(wp, stride_w)
    c, rest = np.divmod(cols, kh * kw)
    ki, kj = np.divmod(rest, kw)
    return batch_last_row(c, ki, kj, hp, stride_w, wq).astype(np.int64)


# Lanes one task of the sparse kernels accumulates at once. The accumulators (a few KiB) stay
# in L1 while every stored weight of every output channel streams over them; the inputs a task
# reads, up to fan-in x lanes values, are reused from L2 by all output channels, so the tile is
# the largest that keeps them within TILE_BYTES. Measured on this machine (2 MiB of L2 per
# core), kernel alone: lenet5.conv2 (fan-in 500) at density 1 10.8 ms with 512 lanes, 9.1 with
# 1024; cifarnet.conv6 (fan-in 1,728) 77 ms with 512, 70 with 256; at density 0.1 the same
# choices are 5-10 % faster or equal. A whole output row per task (the previous design) was
# 1.3-2.3x slower.
MAX_TILE = 1024
MIN_TILE = 64
TILE_BYTES = 5 << 19  # 2.5 MiB


def tile_lanes(out_rows: int, row_lanes: int, threads: int, fan_in: int,
               itemsize: int) -> tuple[int, int]:
    """(lanes per task, output-channel groups) for the zero-skipping kernels.

    Lanes: the largest power of two up to :data:`MAX_TILE` whose inputs (``fan_in * lanes *
    itemsize`` bytes) fit :data:`TILE_BYTES`, and no wider than an output row needs (not below
    :data:`MIN_TILE`). Groups: when the ``out_rows`` rows of ``row_lanes`` lanes make fewer
    tasks than threads (a linear layer is one row of batch-size lanes), each tile is split by
    output channel instead of into narrower tiles, which keeps the vectors long: lenet5.fc1,
    batch 256, 2 cores, kernel alone: 3.0 -> 2.8 ms at density 1, 0.37 -> 0.29 ms at 0.1
    (two tiles of 128 lanes -> one of 256 in two channel groups)."""
    tile = MAX_TILE
    while tile > MIN_TILE and (fan_in * tile * itemsize > TILE_BYTES or tile >= 2 * row_lanes):
        tile //= 2
    tasks = out_rows * -(-row_lanes // tile)
    return tile, max(1, -(-threads // max(1, tasks)))


# Chunks of the fan-in for sparse_sum. A task's accumulators for all its output channels stay
# in L2 (ACC_BYTES) while the fan-in is taken a chunk at a time: every output channel runs its
# stored weights of the chunk, whose inputs (CHUNK_BYTES) are reused from L1 by all of them
# instead of streaming the whole tile's inputs from L2 once per channel. A chunk holds at least
# CHUNK_ENTRIES stored weights per row on average, else the accumulators' round trips to L2
# cost more than the inputs save (at low density the fan-in stays one chunk). Measured, 2 cores,
# whole layer with 8-bit codes, medians of 7 interleaved runs, one chunk -> chunked: density 1:
# cifarnet.conv6 74.0 -> 52.4 ms, cifarnet.conv2 51.9 -> 48.7, lenet5.fc1 2.48 -> 2.15;
# density 0.5: conv6 41.0 -> 29.1, fc1 1.82 -> 1.52; density 0.1: conv6 9.8 -> 8.8, the others
# equal within noise. 16 or 64 KiB chunks, or 16 or 32 entries, were no better.
CHUNK_BYTES = 32 << 10
CHUNK_ENTRIES = 8
ACC_BYTES = 1 << 20

# Output channels per block, and when a block runs as one: its union of columns U costs about
# QUAD_COST single-channel entries each (measured at density 1, where U is a quarter of the
# entries: 2.5-3.1), so a block runs as one where U * QUAD_COST <= its stored weights, in
# practice above a density of about 0.75 (at 0.5, U is 0.47 of the entries: one by one is
# faster). Measured, kernel alone, 2 cores, density 1: cifarnet.conv6 43.5 -> 33.6 ms,
# lenet5.fc1 2.12 -> 1.34 ms, cifarnet.conv2 (32 images) 10.7 -> 6.6 ms.
QUAD = 4
QUAD_COST = 3
# Chunks where most channels run in blocks of four. Measured, 2 cores, density 1, medians of 7
# interleaved runs, 32 KiB -> 256 KiB: cifarnet.conv6 39.5 -> 35.4 ms, lenet5.fc1 1.81 -> 1.70,
# lenet5.conv2 6.33 -> 5.92; at density 0.5 (no blocks) 256 KiB was slower: conv6 32.2 -> 35.1.
QUAD_CHUNK_BYTES = 256 << 10


def sum_tiles(out_rows: int, row_lanes: int, threads: int, cw: CompressedWeights, n_img: int,
              itemsize: int, input_itemsize: int | None = None) -> tuple[int, int, int]:
    """(lanes per task, output-channel groups, fan-in columns per chunk) for
    :func:`sparse_sum` over ``out_rows`` output rows of ``row_lanes`` lanes (``n_img`` images
    per output pixel), sums of ``itemsize`` bytes, inputs of ``input_itemsize`` (default the
    same)."""
    input_itemsize = input_itemsize or itemsize
    channels = cw.shape[1]
    window = cw.fan_in // channels if channels else 1
    kh, kw = cw.shape[2:] if len(cw.shape) == 4 else (1, 1)
    per_channel_entries = cw.nnz / max(1, cw.n_out * channels)
    by_entries = math.ceil(CHUNK_ENTRIES / per_channel_entries) if cw.nnz else channels
    tile = MAX_TILE
    while tile > MIN_TILE and (cw.n_out * tile * itemsize > ACC_BYTES or tile >= 2 * row_lanes):
        tile //= 2
    # bytes of input one channel's kernel rows cover across a tile: kw shifts of a row overlap
    channel_bytes = kh * (tile + (kw - 1) * n_img) * input_itemsize
    # dense enough for blocks of four channels (most of sparse_sum's blocks run as one): each
    # pass updates four tiles of sums, and chunks 8x larger measured best
    chunk_bytes = QUAD_CHUNK_BYTES if cw.fills_blocks() else CHUNK_BYTES
    per_chunk = max(chunk_bytes // channel_bytes, by_entries, 1)
    # one chunk, the tile's inputs for the whole fan-in in L2: where chunks would hold every
    # channel anyway, and for narrow inputs (low density, see fxsim.datapath.
    # _INT8_INPUTS_BELOW), where it measured best (2 cores, density 0.1, 8 stored weights per
    # row and chunk -> one chunk: cifarnet.conv1 16.5 -> 15.3 ms, conv6 9.0 -> 8.2)
    if per_chunk >= channels or input_itemsize < itemsize:
        tile, groups = tile_lanes(out_rows, row_lanes, threads, cw.fan_in, input_itemsize)
        return tile, groups, cw.fan_in
    tasks = out_rows * -(-row_lanes // tile)
    return tile, max(1, -(-threads // max(1, tasks))), per_chunk * window


@njit(cache=True, inline="always")
def _task(task, per_row, seg, n_img, stride_h, row_len, tile):
    """(input offset, output offset, width) of one task: a tile of one output row, whose
    ``seg = OW * N`` lanes read contiguous inputs."""
    oy = task // per_row
    t0 = (task % per_row) * tile
    return oy * stride_h * row_len * n_img + t0, oy * seg + t0, min(tile, seg - t0)


# The fused requantisation's arguments when a kernel returns raw sums instead (codes empty).
NO_REQUANT = (0,) * 12


@njit(cache=True, inline="always")
def _emit(acc, j, dst, width, sums, codes, size, wide, bias, rq, counts):
    """A finished tile of channel j's lanes: its raw sums into ``sums[j, dst:]``, or, when
    ``codes`` (the codes' bytes, ``size`` a code) is not empty, requantised while still in L1
    (plus ``bias[j]``, see :func:`fxsim.kernels.dense.requantise_lanes`) into the codes of
    ``[j, dst:]``, with the events and extremes added into ``counts`` (acc overflows,
    saturations, max, min)."""
    if codes.shape[0] == 0:
        sums[j, dst : dst + width] = acc
        return
    n_acc, n_sat, top, bottom = requantise_lanes(acc, bias[j], rq, wide,
                                                 codes[j, dst * size : (dst + width) * size])
    counts[0] += n_acc
    counts[1] += n_sat
    counts[2] = max(counts[2], top)
    counts[3] = min(counts[3], bottom)


@njit(cache=True, parallel=True)
def sparse_sum(xt, chunks, bases, values, quads, bias, rq, codes, out_hw, stride_h, row_len,
               tile, groups):
    """Exact zero-skipping sums ``sums[j, p, n]`` over the stored weights of row j.

    ``xt`` (R, N) is the laid-out input and ``values`` the stored weights in the lane dtype
    (float32, float64 or int64), where the caller's bound makes every partial sum exact (so the
    order of additions does not matter); ``xt`` in the lane dtype too, or, with float32 lanes,
    as int8 or int16 codes, converted as they are read. ``chunks`` (J, C + 1) splits each row's
    stored weights at fan-in boundaries (:meth:`CompressedWeights.chunk_pointers`; one chunk: the
    row pointers). ``quads`` = (blocked, ptr, bases, values) from
    :meth:`CompressedWeights.quads` (bases of the columns, values in the lane dtype): blocks
    of four channels that run over their union of columns as one. A task is a tile of
    ``tile`` lanes (see :func:`sum_tiles`) of one output row, for one of ``groups`` ranges of
    blocks: it keeps one tile of sums per channel and, chunk by chunk, applies every
    channel's stored weights of the chunk, each a vector update reading ``tile`` contiguous
    inputs (:func:`fxsim.kernels.tile.add_products`, or four channels at a time,
    :func:`fxsim.kernels.tile.add_products_quad`).

    With ``codes`` the bytes of (J, P * N) codes (:func:`fxsim.kernels.dense.code_bytes`),
    each finished tile is requantised at once
    (``bias`` (J,) int64 added, ``rq`` from :func:`fxsim.kernels.dense.fast_requant_args`)
    into ``codes`` in the same (j, p, n) order, and the sums are never stored (LeNet5 conv2 at
    density 0.1: see docs/results/sparse.md). With ``codes`` of shape (0, 0) (and
    :data:`NO_REQUANT`) the raw sums are returned for the general requantisation.
    Returns (sums (J, P, N), or (J, 0, N) when fused; the fused counters: accumulator
    overflow events, output saturations, largest and smallest sum).
    """
    n_out, n_chunks = chunks.shape[0], chunks.shape[1] - 1
    blocked, q_ptr, q_bases, q_values = quads
    n_blocks = blocked.size
    n_img = xt.shape[1]
    oh, ow = out_hw
    xflat = xt.reshape(-1)
    seg = ow * n_img
    per_row = (seg + tile - 1) // tile
    n_tasks = oh * per_row * groups
    fused = codes.shape[0] > 0
    size = code_size(codes[0], oh * ow * n_img) if fused else 1
    sums = np.empty((n_out, 0 if fused else oh * ow * n_img), values.dtype)
    counts = np.empty((n_tasks, 4), np.int64)
    for task in prange(n_tasks):
        counts[task, :] = 0
        src, dst, width = _task(task // groups, per_row, seg, n_img, stride_h, row_len, tile)
        group = task % groups
        b0, b1 = n_blocks * group // groups, n_blocks * (group + 1) // groups
        j0, j1 = b0 * QUAD, min(n_out, b1 * QUAD)
        acc = np.zeros(((b1 - b0) * QUAD, width), values.dtype)
        wide = np.empty(width if fused else 0, np.int64)
        for chunk in range(n_chunks):
            for b in range(b0, b1):
                r = (b - b0) * QUAD
                if blocked[b]:
                    add_products_quad(acc[r], acc[r + 1], acc[r + 2], acc[r + 3], xflat,
                                      q_ptr[b, chunk], q_ptr[b, chunk + 1], q_bases, q_values,
                                      n_img, src)
                    continue
                for j in range(b * QUAD, min(n_out, (b + 1) * QUAD)):
                    add_products(acc[j - j0], xflat, chunks[j, chunk], chunks[j, chunk + 1],
                                 bases, values, n_img, src)
        for j in range(j0, j1):
            _emit(acc[j - j0], j, dst, width, sums, codes, size, wide, bias, rq, counts[task])
    n_acc, n_sat, top, bottom, _, _ = task_totals(counts)
    return sums.reshape(n_out, 0 if fused else oh * ow, n_img), n_acc, n_sat, top, bottom


@njit(cache=True, parallel=True)
def sparse_per_mac(xt, row_ptr, bases, values, out_hw, stride_h, row_len, start, wrap, lo,
                   hi, mask, x_max_abs, tile, groups, rq, codes, paired, quads):
    """Zero-skipping per-MAC register: saturates (or wraps, with ``wrap``) after every MAC.

    Same layout and tasks as :func:`sparse_sum`. Lanes float32, int32 or int64 (see
    :mod:`fxsim.kernels.tile`): every product fits the register [lo, hi] and register + product
    is exact in the lane dtype (the caller checks);
    ``x_max_abs`` bounds the inputs. ``start`` (J,) holds each register's first value (the
    aligned, overflow-checked bias); ``mask`` is 2^bits - 1. Every output takes its MACs one
    after another in canonical order (see :mod:`fxsim.kernels.tile`). With ``codes`` the
    registers are requantised as they finish, as in :func:`sparse_sum` (no bias: it is the
    register's start). Returns (sums (J, P, N) int64, or (J, 0, N) when fused; overflow
    events; the fused counters as in :func:`sparse_sum`).

    ``paired``: every row stores all K weights of the fan-in, zeros included (``values`` (J *
    K,), ``row_ptr`` = 0, K, 2K, ...), and ``bases`` (K,) is shared by all rows: the dense
    per-MAC convolution, two output channels per pass over the tile's inputs
    (:func:`fxsim.kernels.tile.per_mac_products_pair`; a zero product leaves a register,
    saturated or not, unchanged), and channels 4b .. 4b + 3 four per pass where ``quads``
    (B, K, 4) holds their weights side by side (:func:`fxsim.kernels.tile.
    per_mac_products_quad`; B = 0: pairs only).
    """
    n_out = row_ptr.size - 1
    n_img = xt.shape[1]
    oh, ow = out_hw
    xflat = xt.reshape(-1)
    seg = ow * n_img
    per_row = (seg + tile - 1) // tile
    n_tasks = oh * per_row * groups
    fused = codes.shape[0] > 0
    size = code_size(codes[0], oh * ow * n_img) if fused else 1
    sums = np.empty((n_out, 0 if fused else oh * ow * n_img), np.int64)
    no_bias = _zeros(n_out)
    events = np.empty(n_tasks, np.int64)  # every task fills its entry
    counts = np.empty((n_tasks, 4), np.int64)
    zero = np.int64(0)  # not a literal 0: that would be another compilation of the callees
    for task in prange(n_tasks):
        counts[task, :] = 0
        src, dst, width = _task(task // groups, per_row, seg, n_img, stride_h, row_len, tile)
        group = task % groups
        acc = np.empty(width, xt.dtype)
        wide = np.empty(width if fused else 0, np.int64)
        hits = np.zeros(width, np.int32)  # per lane and channel: at most nnz(row) events
        count = 0
        if paired:
            acc1 = np.empty(width, xt.dtype)
            acc2 = np.empty(width, xt.dtype)
            acc3 = np.empty(width, xt.dtype)
            hits1 = np.zeros(width, np.int32)
            hits2 = np.zeros(width, np.int32)
            hits3 = np.zeros(width, np.int32)
            fan_in = bases.size
            n_quads = quads.shape[0]
            n_units = units(n_out, n_quads)  # blocks of four channels, pairs, one alone
            for unit in range(n_units * group // groups, n_units * (group + 1) // groups):
                j = unit_first(unit, n_quads)
                row = values[row_ptr[j] : row_ptr[j] + fan_in]
                acc[:] = start[j]
                if unit < n_quads:
                    acc1[:] = start[j + 1]
                    acc2[:] = start[j + 2]
                    acc3[:] = start[j + 3]
                    per_mac_products_quad(
                        acc, acc1, acc2, acc3, hits, hits1, hits2, hits3, xflat, zero, fan_in,
                        bases, row, values[row_ptr[j + 1] : row_ptr[j + 1] + fan_in],
                        values[row_ptr[j + 2] : row_ptr[j + 2] + fan_in],
                        values[row_ptr[j + 3] : row_ptr[j + 3] + fan_in], quads[unit], n_img,
                        src, x_max_abs, wrap, lo, hi, mask)
                    _emit(acc1, j + 1, dst, width, sums, codes, size, wide, no_bias,
                          rq, counts[task])
                    _emit(acc2, j + 2, dst, width, sums, codes, size, wide, no_bias,
                          rq, counts[task])
                    _emit(acc3, j + 3, dst, width, sums, codes, size, wide, no_bias,
                          rq, counts[task])
                elif j + 1 < n_out:
                    acc1[:] = start[j + 1]
                    per_mac_products_pair(acc, acc1, hits, hits1, xflat, zero, fan_in, bases, row,
                                          values[row_ptr[j + 1] : row_ptr[j + 1] + fan_in],
                                          n_img, src, x_max_abs, wrap, lo, hi, mask)
                    _emit(acc1, j + 1, dst, width, sums, codes, size, wide, no_bias,
                          rq, counts[task])
                else:
                    per_mac_products(acc, hits, xflat, zero, fan_in, bases, row, n_img, src,
                                     x_max_abs, wrap, lo, hi, mask)
                _emit(acc, j, dst, width, sums, codes, size, wide, no_bias, rq, counts[task])
                for t in range(width):
                    count += hits[t] + hits1[t] + hits2[t] + hits3[t]
                hits[:] = 0
                hits1[:] = 0
                hits2[:] = 0
                hits3[:] = 0
        else:
            for j in range(n_out * group // groups, n_out * (group + 1) // groups):
                acc[:] = start[j]
                per_mac_products(acc, hits, xflat, row_ptr[j], row_ptr[j + 1], bases, values,
                                 n_img, src, x_max_abs, wrap, lo, hi, mask)
                _emit(acc, j, dst, width, sums, codes, size, wide, no_bias, rq, counts[task])
                for t in range(width):
                    count += hits[t]
                hits[:] = 0
        events[task] = count
    n_acc, n_sat, top, bottom, _, _ = task_totals(counts)
    return (sums.reshape(n_out, 0 if fused else oh * ow, n_img), total(events), n_acc, n_sat,
            top, bottom)


@njit(cache=True)
def _zeros(n):
    """np.zeros(n) built serially: in a parallel kernel it would be a thread launch of its own."""
    return np.zeros(n, np.int64)


# Images per task of linear_few_outputs: each stored weight is one multiply-add of this many
# lanes (4 vectors), enough to hide the latency of the accumulators' load-add-store through L1
# (2 cores, 256 images x 500 inputs x 10 outputs at density 1, kernel alone: 8 lanes 0.15 ms,
# 16 lanes 0.14, 32 lanes 0.07).
_FEW_IMAGES = 32


@njit(cache=True, parallel=True, fastmath={"contract"})
def linear_few_outputs(x, row_ptr, col_pos, used, values, bias, rq, out):
    """The zero-skipping twin of :func:`fxsim.kernels.dense.linear_few_outputs`: a linear
    layer with few outputs, its stored weights ``values`` (CSR ``row_ptr``; lane dtype, sums
    exact in any order) applied to :data:`_FEW_IMAGES` images at a time.

    ``x`` (N, K) integer codes of any dtype (N, K >= 1); ``used`` (U,) the inputs some stored
    weight reads, ascending, and ``col_pos`` (nnz,) each stored weight's position in ``used``.
    A task casts its images' used inputs into a (U, 32) buffer of lanes (one row per input;
    read a column at a time, from the 32 rows' cache lines, which stay in L1), and each stored
    weight of output j is one 32-lane multiply-add: work in proportion to the stored weights
    and the inputs they read, plus one requantisation of the task's sums.
    ``bias`` (J,) int64, ``rq`` from :func:`fxsim.kernels.dense.fast_requant_args`, ``out``
    the bytes of (N, J) codes (:func:`fxsim.kernels.dense.code_bytes`). Returns (accumulator
    overflow events, output saturations, largest and smallest sum, smallest and largest input
    code).
    """
    n_img = x.shape[0]
    n_out = row_ptr.size - 1
    size = code_size(out, n_img * n_out)
    tasks, stats, flat = image_tasks(n_img, _FEW_IMAGES, out)
    for task in prange(tasks):
        i0, rows = task_images(task, _FEW_IMAGES, n_img)
        x_lo, x_hi = rows_range(x, i0, rows)
        buf = np.zeros((used.size, _FEW_IMAGES), values.dtype)
        for u in range(used.size):
            dst = buf[u]
            k = used[u]
            for r in range(rows):
                dst[r] = x[i0 + r, k]
        lanes = np.empty(_FEW_IMAGES, values.dtype)
        acc = np.empty(_FEW_IMAGES * n_out, np.int64)
        for j in range(n_out):
            lanes[:] = 0
            idx = row_ptr[j]
            last = row_ptr[j + 1]
            while idx + 4 <= last:
                v0, v1, v2, v3 = values[idx], values[idx + 1], values[idx + 2], values[idx + 3]
                b0, b1 = buf[col_pos[idx]], buf[col_pos[idx + 1]]
                b2, b3 = buf[col_pos[idx + 2]], buf[col_pos[idx + 3]]
                for t in range(_FEW_IMAGES):
                    lanes[t] += v0 * b0[t] + v1 * b1[t] + v2 * b2[t] + v3 * b3[t]
                idx += 4
            for rest in range(idx, last):
                v0 = values[rest]
                b0 = buf[col_pos[rest]]
                for t in range(_FEW_IMAGES):
                    lanes[t] += v0 * b0[t]
            for r in range(rows):
                acc[r * n_out + j] = np.int64(lanes[r]) + bias[j]
        finish_images(acc, rows, n_out, i0, rq, flat, size, stats[task], x_lo, x_hi)
    return task_totals(stats)
