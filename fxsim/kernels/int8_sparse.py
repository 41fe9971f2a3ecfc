"""Zero-skipping int8 dot products: each lane gathers its own stored weights' inputs with a
byte permute (x86 AVX-512 VBMI ``vpermb``) and takes four of them per ``vpdpbusd`` (VNNI).

The dense int8 kernel (:mod:`fxsim.kernels.int8`) broadcasts one quad of inputs to 16 output
channels: every lane multiplies the same four inputs by its own weights. Pruned weights make
that wasteful, and skipping a quad only where all 16 x 4 of its weights are zero skips almost
nothing (at density 0.1 a third of the quads hold a weight of any one channel, and nearly
all a weight of one of 16). Here the lanes are still 16 output channels, but each lane takes
its own next four stored weights: ``vpermb`` picks, from a 64-byte window of the input, the
four inputs those weights meet, lane by lane, and ``vpdpbusd`` multiplies and adds them. A
window's products for a group of 16 channels take as many steps as its fullest lane needs
(ceil(nnz / 4)); the other lanes' spare slots hold weight 0. Time follows the stored
weights: at density 0.1 a fifth to a sixth of the dense kernel's dot products, each beside
one ``vpermb`` (docs/results/sparse.md).

The schedule (:class:`Schedule`) is built once per weight matrix: per panel of four groups
of 16 output channels, a list of runs (a 64-byte window of the fan-in and each group's number
of steps in it) and, per step, 64 byte indices into the window and the 64 weights (int8) they
meet. The fan-in is taken in segments: a linear layer's one row, or a convolution's window rows
(``kw * D`` contiguous bytes of the :func:`fxsim.kernels.int8.layout` layout, ``W' * D``
apart), so a convolution needs no im2col.

Exactness. ``vpdpbusd`` needs one unsigned operand: inputs go in as ``x + 128`` (0..255: a
convolution's layout is written biased, a linear layer's rows are flipped in registers as each
window is loaded) and weights as they are, so a lane sums ``sum w (x + 128) = sum w x + 128 *
sum w``, and the last term is one constant per output channel (``corr``), subtracted at the
end (or folded into the int32 requantisation's bias). A spare slot has weight 0 and adds
nothing. The int32 lanes wrap, so every sum is exact modulo 2^32; the caller uses this kernel
only where every true sum fits int32 (the bound of :mod:`fxsim.kernels.int8`), so the
subtraction gives it exactly.

Only where the host has AVX-512 VNNI and VBMI (:data:`AVAILABLE`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fxsim.kernels import int8
from fxsim.kernels.dense import code_size, int32_kernel, requantise_lanes, task_totals
from fxsim.kernels.int8 import LANES, QUAD, _dot_intrinsic, _store_transposed

# Bytes of one block of the fan-in: one zmm register, the reach of vpermb. (Two registers
# through vpermi2b took 16 % fewer steps on lenet5.fc1 at density 0.1 but ran 10-20 % slower.)
BLOCK = 64
# Bytes of one step of the schedule: 64 byte indices, then 64 weights.
STEP = 2 * BLOCK
# Windows of a segment start this many bytes apart (see Schedule).
WINDOW_STEP = BLOCK // 2
# Input vectors (images, or output positions) per micro-kernel call: each step's indices and
# weights are loaded once for MR of them (4, 6 and 8 measured equal on lenet5.fc1), and
# groups of 16 output channels per call: each block of the input is loaded once for GROUPS
# of them. MR x GROUPS accumulators, MR blocks, indices and weights: 22 of 32 registers.
MR = 4
GROUPS = 4
# A linear task: ROWS images x one panel of outputs (the panel's schedule stays in L1).
ROWS = 32


# The shortest segment (a convolution's window row in the layout, a linear layer's fan-in) that
# this kernel takes: a block then holds at most this many bytes of weights to gather from, and
# shorter rows make each run take few weights per step. LeNet5's conv1 (one channel, its 5-wide
# rows folded into 8 bytes) at density 0.1: 2.4 ms here, 1.3 on the float zero-skipping
# kernel, 2.5 dense (2 cores, batch 256).
MIN_SEGMENT = BLOCK // 2
# The most output positions per image for which a convolution requantises each task's tile of
# sums in one call (see conv_sums): cifarnet.conv1 (900) took 4.8-5.3 ms that way at density
# 0.1, 4.3-4.5 with a call per channel.
TILE_POSITIONS = 256


def segment_bytes(w_shape) -> int:
    """Bytes of one segment of a layer with weights of ``w_shape`` ((J, K) or (J, C, KH, KW)):
    a linear layer's fan-in, a convolution's window row in the
    :func:`fxsim.kernels.int8.layout` layout (folded where :func:`int8.folds` says so)."""
    if len(w_shape) == 2:
        return int(w_shape[1])
    _, channels, _, kw = w_shape
    if int8.folds(channels, kw):
        return int8.channel_quads(kw * channels)
    return kw * int8.channel_quads(channels)


def _host_has_vbmi() -> bool:
    """Whether vpermb can run here, next to the VNNI that :data:`int8.AVAILABLE` checks."""
    if not int8.AVAILABLE:
        return False
    try:
        from llvmlite import binding
        from numba.core import config

        if config.CPU_NAME:
            return "+avx512vbmi" in (config.CPU_FEATURES or "")
        return bool(binding.get_host_cpu_features().get("avx512vbmi", False))
    except Exception:  # any failure to ask means no: the other kernels are always there
        return False


AVAILABLE = _host_has_vbmi()


class Schedule:
    """The zero-skipping schedule of one weight matrix (see the module notes).

    Output channels go in groups of 16 (a vector of lanes) and groups in panels of
    :data:`GROUPS` (one micro-kernel call). Each segment is read through windows of 64 bytes
    that start every :data:`WINDOW_STEP` bytes, so that every weight lies in one or two of
    them. Window by window, a group takes as many steps as its fullest lane needs for the
    weights that no later window holds (ceil(n / 4)); every lane then fills its spare slots
    with the next weights of its row that the window holds, so that later windows need fewer
    steps (against windows that do not overlap, 13-25 % fewer steps at density 0.1 on the
    LeNet5 and CifarNet layers, 8-20 % at 0.3).

    ``runs`` (R, 2 + GROUPS) int32, per panel the windows where some weight is taken:
    segment, first byte of the window in the segment, then each group's steps; ``run_ptr`` /
    ``step_ptr`` (panels + 1,) int64: each panel's first run / step; ``table`` (steps *
    STEP,) uint8: the steps in order (panel, run, group), each 64 byte indices into the run's
    window, then 64 int8 weights (as uint8), lane l's at bytes 4l .. 4l + 3, spare slots
    weight 0; ``corr`` (J,) int32: 128 times each output's weight sum (mod 2^32);
    ``reach``: bytes past a segment's start that a window load reads; ``steps``:
    ``vpdpbusd`` per input vector; ``n_out``.
    """

    def __init__(self, w_segments: np.ndarray):
        """``w_segments`` (J, S, L) integer weight codes in [-128, 127]: each output's fan-in
        in S segments of L bytes, in the order of the input layout."""
        w = np.asarray(w_segments)
        n_out, _, seg_len = w.shape
        width = GROUPS * LANES
        panels = -(-n_out // width)
        # panel by panel: building costs a few times one panel's weights in memory
        pieces = [_panel_schedule(w[width * p : width * (p + 1)], seg_len)
                  for p in range(panels)]
        self.runs = np.concatenate([runs for runs, _ in pieces] or [np.zeros((0, 2 + GROUPS))]
                                   ).astype(np.int32).reshape(-1, 2 + GROUPS)
        self.run_ptr = np.zeros(panels + 1, np.int64)
        np.cumsum([len(runs) for runs, _ in pieces], out=self.run_ptr[1:])
        self.step_ptr = np.zeros(panels + 1, np.int64)
        np.cumsum([len(table) // STEP for _, table in pieces], out=self.step_ptr[1:])
        self.table = np.concatenate([table for _, table in pieces] or [np.zeros(0, np.uint8)])
        corr = 128 * w.reshape(n_out, -1).sum(axis=1, dtype=np.int64)
        self.corr = ((corr + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)
        self.reach = int(self.runs[:, 1].max()) + BLOCK if len(self.runs) else 0
        self.steps = int(self.step_ptr[-1])
        self.n_out = n_out


def _panel_schedule(w: np.ndarray, seg_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One panel's part of a :class:`Schedule`: ``w`` (up to GROUPS * 16, S, L) weight codes ->
    (runs (R, 2 + GROUPS), table (steps * STEP,) uint8)."""
    n_seg = w.shape[1]
    rows = GROUPS * LANES
    padded = np.zeros((rows, n_seg, seg_len), np.int8)  # codes of a byte
    padded[: len(w)] = w
    nonzero = padded != 0
    n_win = 1 + max(0, -(-(seg_len - BLOCK) // WINDOW_STEP))
    starts = WINDOW_STEP * np.arange(n_win)
    only_here = np.append(starts[1:], seg_len)  # a window's weights no later one holds
    held = np.minimum(starts + BLOCK, seg_len)  # the end of what a window holds
    below = np.zeros((rows, n_seg, seg_len + 1), np.int32)  # weights of a row below x
    np.cumsum(nonzero, axis=2, out=below[:, :, 1:])
    # window by window, each row's weights taken so far (a prefix of its row)
    taken = np.zeros((rows, n_seg, n_win + 1), np.int64)
    steps = np.zeros((n_seg, n_win, GROUPS), np.int64)
    for i in range(n_win):
        done = taken[:, :, i]
        must = below[:, :, only_here[i]] - done
        need = (-(-must // QUAD)).reshape(GROUPS, LANES, n_seg).max(axis=1)  # (G, S)
        steps[:, i] = need.T
        slots = QUAD * np.repeat(need, LANES, axis=0)
        taken[:, :, i + 1] = done + np.minimum(slots, below[:, :, held[i]] - done)
    s_idx, i_idx = np.nonzero(steps.any(axis=2))  # runs, in (segment, window) order
    runs = np.concatenate([np.stack([s_idx, starts[i_idx]], axis=1), steps[s_idx, i_idx]],
                          axis=1)
    first = np.zeros(steps.size + 1, np.int64)  # each (segment, window, group)'s first step
    np.cumsum(steps.reshape(-1), out=first[1:])
    # every stored weight's slot: its rank r in its row gives the window that took it (the
    # last i with taken[i] <= r), step (r - taken[i]) // 4 of its group's steps in that
    # window's run and byte 4 * lane + (r - taken[i]) % 4
    j, s, k = np.nonzero(nonzero)  # sorted by (j, s, k)
    row = j * n_seg + s
    rank = np.arange(row.size) - np.searchsorted(row, row)
    offsets = (seg_len + 1) * np.arange(rows * n_seg)[:, None]  # rows one after another
    flat_taken = (taken[:, :, :n_win].reshape(rows * n_seg, n_win) + offsets).reshape(-1)
    window = np.searchsorted(flat_taken, rank + (seg_len + 1) * row, side="right")
    window -= row * n_win + 1
    slot = rank - taken[j, s, window]
    step = first[(s * n_win + window) * GROUPS + j // LANES] + slot // QUAD
    byte = QUAD * (j % LANES) + slot % QUAD
    table = np.zeros(first[-1] * STEP, np.uint8)
    table[step * STEP + byte] = k - starts[window]
    table[step * STEP + BLOCK + byte] = padded[j, s, k].view(np.uint8)
    return runs, table


def linear_schedule(w: np.ndarray) -> Schedule:
    """(J, K) weight codes -> the schedule of a linear layer: one segment, the input row."""
    w = np.asarray(w)
    return Schedule(w.reshape(w.shape[0], 1, w.shape[1]))


def conv_schedule(w: np.ndarray, fold: bool) -> Schedule:
    """(J, C, KH, KW) weight codes -> the schedule of a convolution over the
    :func:`fxsim.kernels.int8.layout` layout (folded or not, see :func:`int8.folds`): KH
    segments, the window rows, each ``kw * D`` bytes (folded: D), in the layout's order
    (:func:`int8.layout_weights`)."""
    return Schedule(int8.layout_weights(w, fold).reshape(w.shape[0], w.shape[2], -1))


def _permute_intrinsic(builder):
    """``vpermb``: (<64 x i8> table, <64 x i8> indices) -> table[indices & 63]."""
    v64 = ir.VectorType(ir.IntType(8), BLOCK)
    fnty = ir.FunctionType(v64, [v64, v64])
    return cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.qi.512")


def _micro(mr: int):
    """An intrinsic ``micro(transposed, biased, c, c_off, ldc, x, x_off, ldx, x_seg, runs, r0,
    r1, table, s0)``: for input vectors i < mr (from byte ``x_off + i * ldx`` of the int8
    array ``x``) and output channels 16 g + l of a panel (groups g < GROUPS, lanes l < 16),
    the sum over runs r0 .. r1 - 1 (segment s, first byte b, each group's steps) and over
    group g's steps (from step s0 on) of the four products of the step's weights and the
    bytes ``x[x_off + i * ldx + s * x_seg + b + index] + 128`` (``biased``: the bytes as they
    are, as unsigned), each run's block read by one 64-byte load per input vector; int32,
    wrapping. Stored as c[c_off + i * ldc + 16 g + l], or with ``transposed`` c[c_off + (16 g +
    l) * ldc + i] (see :func:`fxsim.kernels.int8._store_transposed`). ``transposed`` and
    ``biased`` are run-time flags; the callers pass constants, which LLVM folds."""
    width = 2 + GROUPS  # int32 fields of a run

    @intrinsic
    def micro(typingctx, transposed, biased, c, c_off, ldc, x, x_off, ldx, x_seg, runs, r0, r1,
              table, s0):
        sig = types.void(transposed, biased, c, c_off, ldc, x, x_off, ldx, x_seg, runs, r0, r1,
                         table, s0)

        def codegen(context, builder, signature, args):
            (transposed, biased, c_arr, c_off, ldc, x_arr, x_off, ldx, x_seg, runs_arr, r0, r1,
             t_arr, s0) = args
            c_ptr, x_ptr, runs_ptr, t_ptr = [
                context.make_array(signature.args[i])(context, builder, a).data
                for i, a in ((2, c_arr), (5, x_arr), (9, runs_arr), (12, t_arr))]
            v16 = ir.VectorType(ir.IntType(32), LANES)
            v64 = ir.VectorType(ir.IntType(8), BLOCK)
            dot, operand = _dot_intrinsic(builder)
            permute = _permute_intrinsic(builder)
            index = c_off.type

            def const(value):
                return ir.Constant(index, value)

            def load64(ptr, at):
                return builder.load(builder.bitcast(builder.gep(ptr, [at]), v64.as_pointer()),
                                    align=1)

            def run_field(r, field):
                at = builder.add(builder.mul(r, const(width)), const(field))
                return builder.sext(builder.load(builder.gep(runs_ptr, [at])), index)

            # accumulators and the step counter in allocas: LLVM's SROA keeps them in registers
            accs = [[cgutils.alloca_once(builder, v16) for _ in range(GROUPS)]
                    for _ in range(mr)]
            for row in accs:
                for acc in row:
                    builder.store(ir.Constant(v16, None), acc)
            step = cgutils.alloca_once(builder, index)
            builder.store(s0, step)
            flip = builder.select(biased, ir.Constant(v64, None),
                                  ir.Constant(v64, [0x80] * BLOCK))  # x + 128, unsigned
            with cgutils.for_range(builder, builder.sub(r1, r0)) as runs_loop:
                r = builder.add(r0, runs_loop.index)
                off = builder.add(builder.mul(run_field(r, 0), x_seg), run_field(r, 1))
                blocks = [builder.xor(load64(x_ptr, builder.add(
                    builder.add(x_off, builder.mul(ldx, const(i))), off)), flip)
                    for i in range(mr)]
                for g in range(GROUPS):
                    count = run_field(r, 2 + g)
                    first = builder.load(step)
                    with cgutils.for_range(builder, count) as steps_loop:
                        at = builder.mul(builder.add(first, steps_loop.index), const(STEP))
                        indices = load64(t_ptr, at)
                        weights = builder.bitcast(load64(t_ptr, builder.add(at, const(BLOCK))),
                                                  operand)
                        for i in range(mr):
                            inputs = builder.bitcast(
                                builder.call(permute, [blocks[i], indices]), operand)
                            builder.store(builder.call(dot, [builder.load(accs[i][g]), inputs,
                                                             weights]), accs[i][g])
                    builder.store(builder.add(first, count), step)
            sums = [[builder.load(acc) for acc in row] for row in accs]
            with builder.if_else(transposed) as (columns, rows):
                with columns:
                    _store_transposed(builder, sums, c_ptr, c_off, ldc)
                with rows:
                    for i in range(mr):
                        for g in range(GROUPS):
                            at = builder.add(c_off, builder.add(builder.mul(ldc, const(i)),
                                                                const(LANES * g)))
                            ptr = builder.bitcast(builder.gep(c_ptr, [at]), v16.as_pointer())
                            builder.store(sums[i][g], ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return micro


_micro_mr = _micro(MR)
_micro_1 = _micro(1)


@njit(inline="always")
def _panel(transposed, biased, c, c_off, ldc, row_step, x, x_off, ldx, x_seg, count, runs, r0,
           r1, table, s0):
    """The micro-kernels over ``count`` input vectors for one panel of outputs: MR at a time,
    then one by one; input vector i's sums go to ``c_off + i * row_step``."""
    i = 0
    while i + MR <= count:
        _micro_mr(transposed, biased, c, c_off + i * row_step, ldc, x, x_off + i * ldx, ldx,
                  x_seg, runs, r0, r1, table, s0)
        i += MR
    while i < count:
        _micro_1(transposed, biased, c, c_off + i * row_step, ldc, x, x_off + i * ldx, ldx,
                 x_seg, runs, r0, r1, table, s0)
        i += 1


@njit(cache=True, parallel=True)
def linear_sums(x, runs, run_ptr, step_ptr, table, corr, reach, sums):
    """Exact ``sums[n, j] = sum_k x[n, k] * w[j, k]`` (int32) of a :func:`linear_schedule`:
    ``x`` (N, K) int8, C-contiguous; ``sums`` (N, J) int32, filled. The caller guarantees
    every true sum fits int32. A task is up to :data:`ROWS` images x one panel of outputs;
    images whose block loads would read past the end of ``x`` (``reach`` bytes from a row's
    start) run from a zero-padded copy."""
    n_rows, fan_in = x.shape
    n_out = sums.shape[1]
    panels = run_ptr.size - 1
    width = GROUPS * LANES
    xflat = x.reshape(-1)
    blocks = (n_rows + ROWS - 1) // ROWS
    for task in prange(blocks * panels):
        panel = task % panels
        i0 = (task // panels) * ROWS
        count = min(ROWS, n_rows - i0)
        c = np.empty(ROWS * width, np.int32)
        r0, r1, s0 = run_ptr[panel], run_ptr[panel + 1], step_ptr[panel]
        if (i0 + count - 1) * fan_in + reach <= xflat.size:
            _panel(False, False, c, 0, width, width, xflat, i0 * fan_in, fan_in, 0, count,
                   runs, r0, r1, table, s0)
        else:
            local = np.zeros(count * fan_in + reach, np.int8)
            local[: count * fan_in] = xflat[i0 * fan_in : (i0 + count) * fan_in]
            _panel(False, False, c, 0, width, width, local, 0, fan_in, 0, count, runs, r0, r1,
                   table, s0)
        j0 = width * panel
        m = min(width, n_out - j0)
        shift = corr[j0 : j0 + m]
        for i in range(count):  # slices and a plain range: the loop vectorises (0.10 ms -> 0)
            src = c[i * width : i * width + m]
            dst = sums[i0 + i, j0 : j0 + m]
            for t in range(m):
                dst[t] = np.int32(src[t] - shift[t])


def conv_input(x: np.ndarray, padding, fold_kw: int, reach: int) -> tuple[np.ndarray, tuple]:
    """The :func:`fxsim.kernels.int8.layout` layout of (N, C, H, W) int8 codes for
    :func:`conv_sums`, biased (code + 128, as unsigned bytes), in a flat buffer with ``reach``
    spare bytes at its end, so that the last windows' 64-byte block loads stay inside it (the
    spare bytes meet only weight 0). Returns (flat buffer, (N, H', W', D))."""
    flat, shape, _ = int8.layout_buffer(x, padding, fold_kw, reach, biased=True)
    return flat, shape


@njit(cache=True, parallel=True)
def conv_sums(xflat, shape, runs, run_ptr, step_ptr, table, corr, kh, kw, sh, sw, bias, rq,
              codes, sums):
    """Exact convolution sums of a :func:`conv_schedule` over the :func:`conv_input` buffer
    ``xflat`` (its layout's ``shape`` (N, H', W', D)), ``kw`` 1 for a folded layout: outputs
    (oy, ox) from the windows at (oy * sh, ox * sw). As :func:`fxsim.kernels.int8.conv_sums`:
    with ``codes`` the bytes of (N, J, OH * OW) codes each output channel's sums of a task are
    requantised at once (``bias``, ``rq``) into ``codes``; with ``codes`` of shape (0, 0, 0)
    the int32 sums go to ``sums`` (N, J, OH * OW). Returns the fused counters (accumulator
    overflow events, output saturations, largest and smallest sum; zeros when not fused). A
    task is up to :data:`fxsim.kernels.int8.TASK_POSITIONS` output positions of one image
    (whole output rows, or a piece of one, :func:`fxsim.kernels.int8.task_grid`) x one panel of
    outputs."""
    n_img, hp, wp, depth = shape
    fused = codes.shape[0] > 0
    n_out = corr.size
    panels = run_ptr.size - 1
    width = GROUPS * LANES
    oh = (hp - kh) // sh + 1
    ow = (wp - kw) // sw + 1
    size = code_size(codes[0, 0], oh * ow) if fused else 1
    x_seg = wp * depth
    band, piece, bands, pieces = int8.task_grid(oh, ow)
    n_tasks = n_img * bands * pieces * panels
    counts = np.zeros((n_tasks, 4), np.int64)
    # Where a task is a whole image of at most TILE_POSITIONS outputs, its channels' codes are
    # contiguous and the int32 requantisation takes its tile in one call, with one bias per
    # code (bias - corr, wrapping: exact, see below). A call per channel cost more than its
    # work there (LeNet5's conv2, 64 positions: its layer at density 0.1 0.76-0.81 -> 0.65-0.72
    # ms); over larger tiles the bias per code cost more loads than the calls it saved.
    per_image = oh * ow
    whole = fused and int32_kernel(rq, size) and bands * pieces == 1 and per_image <= TILE_POSITIONS
    tile_bias = np.empty(n_out * per_image if whole else 0, np.int32)
    for j in range(n_out if whole else 0):
        value = np.int32(np.int64(bias[j]) - corr[j])
        for t in range(per_image):
            tile_bias[j * per_image + t] = value
    for task in prange(n_tasks):
        panel, img, oy0, oy1, ox0, count = int8.task_at(task, panels, band, piece, bands,
                                                        pieces, oh, ow)
        n_pos = (oy1 - oy0) * count  # consecutive positions from oy0 * ow + ox0
        c = np.empty(width * n_pos, np.int32)  # (channel, position)
        r0, r1, s0 = run_ptr[panel], run_ptr[panel + 1], step_ptr[panel]
        for oy in range(oy0, oy1):
            x_off = ((img * hp + oy * sh) * wp + ox0 * sw) * depth
            _panel(True, True, c, (oy - oy0) * count, n_pos, 1, xflat, x_off, sw * depth,
                   x_seg, count, runs, r0, r1, table, s0)
        wide = np.empty(n_pos if fused else 0, np.int64)
        p0 = oy0 * ow + ox0
        j0 = width * panel
        if whole:  # the int32 kernel (int32_kernel), which needs no int64 buffer
            j1 = min(j0 + width, n_out)
            dest = codes[img].reshape(-1)[j0 * n_pos * size : j1 * n_pos * size]
            counts[task, 0], counts[task, 1], counts[task, 2], counts[task, 3] = (
                requantise_lanes(c[: (j1 - j0) * n_pos], tile_bias[j0 * n_pos : j1 * n_pos],
                                 rq, wide, dest))
            continue
        lanes = np.empty(n_pos, np.int32)
        for j in range(j0, min(j0 + width, n_out)):
            row = c[(j - j0) * n_pos : (j - j0 + 1) * n_pos]
            dest = codes[img, j, p0 * size : (p0 + n_pos) * size] if fused else codes[0, 0, :0]
            if fused and int32_kernel(rq, size):
                # the int32 requantisation adds in int32, wrapping: the biased sums plus
                # bias - corr give sum + bias exactly (it fits int32: rq[11]), one pass fewer
                n_acc, n_sat, top, bottom = requantise_lanes(row, np.int64(bias[j]) - corr[j],
                                                             rq, wide, dest)
            else:
                for t in range(n_pos):  # int32 casts wrap: exact mod 2^32 (module notes)
                    lanes[t] = np.int32(row[t] - corr[j])
                if not fused:
                    sums[img, j, p0 : p0 + n_pos] = lanes
                    continue
                n_acc, n_sat, top, bottom = requantise_lanes(lanes, bias[j], rq, wide, dest)
            counts[task, 0] += n_acc
            counts[task, 1] += n_sat
            counts[task, 2] = max(counts[task, 2], top)
            counts[task, 3] = min(counts[task, 3], bottom)
    n_acc, n_sat, top, bottom, _, _ = task_totals(counts)
    return n_acc, n_sat, top, bottom
