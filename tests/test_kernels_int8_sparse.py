"""The zero-skipping int8 kernels (vpermb + vpdpbusd): the schedule holds every stored weight
exactly once; the sums are exact against int64 arithmetic; the layers that take them match the
Python reference. Kernel tests are skipped where the CPU lacks AVX-512 VNNI or VBMI; there the
float zero-skipping kernel runs (tests/test_kernels_sparse.py covers it on any machine)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsim import QFormat, code_dtype
from fxsim.datapath import Datapath, conv2d, prepare
from fxsim.kernels import dense, int8, int8_sparse, sparse
from fxsim.kernels.int8_sparse import BLOCK, GROUPS, LANES, STEP, WINDOW_STEP
from tests.test_datapath import check_conv, check_linear, datapaths, random_codes

needs_vbmi = pytest.mark.skipif(not int8_sparse.AVAILABLE,
                                reason="the CPU has no AVX-512 VNNI and VBMI")
DENSITIES = [0.0, 0.02, 0.1, 0.5, 1.0]


def sparse_codes(rng, shape, density, lo=-128, hi=127):
    w = rng.integers(lo, hi, shape, endpoint=True)
    return np.where(rng.random(shape) < density, w, 0)


def unpack(schedule: int8_sparse.Schedule, n_seg: int, seg_len: int) -> np.ndarray:
    """The (J, S, L) weights a schedule multiplies, rebuilt from its runs and steps, checking
    on the way that no two weights share a slot's input and that spare slots hold weight 0."""
    panels = schedule.run_ptr.size - 1
    w = np.zeros((panels * GROUPS * LANES, n_seg, seg_len + 2 * BLOCK), np.int64)
    seen = np.zeros(w.shape, bool)
    step = 0
    for panel in range(panels):
        assert schedule.step_ptr[panel] == step
        for run in schedule.runs[schedule.run_ptr[panel] : schedule.run_ptr[panel + 1]]:
            seg, first, counts = run[0], run[1], run[2:]
            assert first % WINDOW_STEP == 0 and counts.any()
            for g, count in enumerate(counts):
                for _ in range(count):
                    entry = schedule.table[step * STEP : (step + 1) * STEP]
                    index, weight = entry[:BLOCK], entry[BLOCK:].view(np.int8)
                    for byte in range(BLOCK):
                        j = (panel * GROUPS + g) * LANES + byte // 4
                        if weight[byte] == 0:
                            continue
                        k = first + index[byte]
                        assert index[byte] < BLOCK and k < seg_len and not seen[j, seg, k]
                        seen[j, seg, k] = True
                        w[j, seg, k] = weight[byte]
                    step += 1
    assert schedule.steps == step == schedule.step_ptr[-1]
    return w[:, :, :seg_len]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_out=st.integers(1, 140), n_seg=st.integers(1, 3),
       seg_len=st.integers(1, 200), density=st.sampled_from(DENSITIES))
def test_schedule_holds_every_stored_weight_once(seed, n_out, n_seg, seg_len, density):
    rng = np.random.default_rng(seed)
    w = sparse_codes(rng, (n_out, n_seg, seg_len), density)
    schedule = int8_sparse.Schedule(w)
    rebuilt = unpack(schedule, n_seg, seg_len)
    assert np.array_equal(rebuilt[:n_out], w) and not rebuilt[n_out:].any()
    expected = 0
    for seg in range(n_seg):
        for first in range(0, n_out, LANES):
            rows = [list(np.nonzero(w[j, seg])[0]) for j in range(first, min(first + LANES, n_out))]
            expected += greedy_steps(rows, seg_len)
    assert schedule.steps == expected
    corr = 128 * w.reshape(n_out, -1).sum(axis=1)
    assert np.array_equal(schedule.corr.astype(np.int64) % 2**32, corr % 2**32)


def greedy_steps(rows: list, seg_len: int) -> int:
    """The steps one group of 16 rows (each a sorted list of its weights' positions in a
    segment) takes, by the rule of int8_sparse.Schedule, in plain Python: windows of 64 every
    32 bytes; each takes as many steps as the fullest row needs for the weights no later window
    holds, and every row fills its slots with its next weights inside the window."""
    starts = [0]
    while starts[-1] + BLOCK < seg_len:
        starts.append(starts[-1] + WINDOW_STEP)
    done = [0] * len(rows)
    total = 0
    for i, start in enumerate(starts):
        only_here = starts[i + 1] if i + 1 < len(starts) else seg_len
        need = max(-(-sum(1 for k in row[done[r]:] if k < only_here) // 4)
                   for r, row in enumerate(rows))
        for r, row in enumerate(rows):
            held = sum(1 for k in row[done[r]:] if k < start + BLOCK)
            done[r] += min(4 * need, held)
        total += need
    assert done == [len(row) for row in rows]
    return total


def test_schedule_of_a_hand_worked_layer():
    # 2 outputs, a fan-in of 70: windows 0..63 and 32..95 (clipped to 69). Output 0 stores
    # five weights; the first window must take the three below 32 (one step), and fills that
    # step with the next one it holds (60). The second window takes output 0's last (63) and
    # output 1's only weight (66) in one step: two steps, where windows 0..63 and 64..69
    # without overlap would take three.
    w = np.zeros((2, 1, 70), np.int64)
    w[0, 0, [1, 5, 9, 60, 63]] = [-1, 2, -3, 4, -128]
    w[1, 0, 66] = 127
    schedule = int8_sparse.linear_schedule(w[:, 0])
    assert schedule.runs.tolist() == [[0, 0, 1, 0, 0, 0], [0, 32, 1, 0, 0, 0]]
    assert schedule.run_ptr.tolist() == [0, 2] and schedule.step_ptr.tolist() == [0, 2]
    assert schedule.steps == 2 and schedule.reach == 96
    table = schedule.table.reshape(2, 2, BLOCK)
    assert table[0, 0, :4].tolist() == [1, 5, 9, 60]  # lane 0, step 0: its first four inputs
    assert table[0, 1, :4].view(np.int8).tolist() == [-1, 2, -3, 4]
    assert not table[0, 1, 4:].any()  # spare slots: weight 0
    assert table[1, 0, 0] == 63 - 32 and table[1, 1, 0] == 128  # -128 as a byte
    assert table[1, 0, 4] == 66 - 32 and table[1, 1, 4] == 127  # lane 1: bytes 4..7
    assert not np.delete(table[1, 1], [0, 4]).any()
    assert schedule.corr.tolist() == [128 * (-126), 128 * 127]


def linear_sums(x, w):
    schedule = int8_sparse.linear_schedule(w)
    sums = np.empty((x.shape[0], w.shape[0]), np.int32)
    int8_sparse.linear_sums(np.ascontiguousarray(x, np.int8), schedule.runs, schedule.run_ptr,
                            schedule.step_ptr, schedule.table, schedule.corr, schedule.reach,
                            sums)
    return sums


@needs_vbmi
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 40), fan_in=st.integers(1, 300),
       n_out=st.integers(1, 150), density=st.sampled_from(DENSITIES))
def test_linear_sums_are_exact(seed, batch, fan_in, n_out, density):
    # batches around the micro-kernel's 4 images and a task's 32, fan-ins around whole
    # blocks (64 bytes: the last image's block loads run from a padded copy), outputs around
    # whole vectors (16) and panels (64)
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 127, (batch, fan_in), endpoint=True)
    w = sparse_codes(rng, (n_out, fan_in), density)
    x[0] = -128
    assert np.array_equal(linear_sums(x, w), x @ w.T)


@needs_vbmi
@pytest.mark.parametrize(("x_code", "w_code"), [(-128, -128), (-128, 127), (127, 127),
                                                (127, -128), (0, 127)])
def test_linear_sums_are_exact_up_to_the_int32_bound(x_code, w_code):
    # the largest fan-in whose worst sum fits int32, every weight stored: the biased sum
    # (x + 128) * w * K wraps int32 (up to twice over), and so does the correction
    fan_in = (2**31 - 1) // (128 * 128)
    x = np.full((5, fan_in), x_code, np.int8)
    w = np.full((17, fan_in), w_code, np.int64)
    assert (linear_sums(x, w) == x_code * w_code * fan_in).all()


def conv_sums_int64(x, w, stride, padding):
    """(N, J, P) exact sums by im2col in int64: the independent check."""
    n = x.shape[0]
    cols = dense.im2col(x.astype(np.int64), w.shape[2], w.shape[3], stride, padding)
    return (w.reshape(w.shape[0], -1) @ cols).reshape(w.shape[0], n, -1).transpose(1, 0, 2)


@needs_vbmi
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 3),
       channels=st.sampled_from([1, 2, 3, 5, 8, 20, 37]), size=st.integers(1, 9),
       kernel=st.sampled_from([(1, 1), (3, 3), (5, 5), (2, 4), (3, 1)]),
       stride=st.sampled_from([(1, 1), (2, 2), (3, 3), (1, 2)]), padding=st.integers(0, 2),
       n_out=st.sampled_from([1, 16, 17, 50, 64, 65, 130]), density=st.sampled_from(DENSITIES))
def test_conv_sums_are_exact(seed, batch, channels, size, kernel, stride, padding, n_out,
                             density):
    """Folded and unfolded layouts (int8.folds), window rows of up to 3 blocks, strides in
    both directions, zero padding (which the biased layout holds as 128), outputs around
    whole vectors and panels."""
    kh, kw = kernel
    if size + 2 * padding < max(kh, kw):
        return  # no output: another test's subject
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 127, (batch, channels, size, size + 1), endpoint=True).astype(np.int8)
    w = sparse_codes(rng, (n_out, channels, kh, kw), density)
    fold = int8.folds(channels, kw)
    schedule = int8_sparse.conv_schedule(w, fold)
    xflat, shape = int8_sparse.conv_input(x, (padding, padding), kw if fold else 1,
                                          schedule.reach)
    expected = conv_sums_int64(x, w, stride, (padding, padding))
    sums = np.empty(expected.shape, np.int32)
    int8_sparse.conv_sums(xflat, shape, schedule.runs, schedule.run_ptr, schedule.step_ptr,
                          schedule.table, schedule.corr, kh, 1 if fold else kw, *stride,
                          np.zeros(n_out, np.int64), sparse.NO_REQUANT,
                          np.empty((0, 0, 0), np.uint8), sums)
    assert np.array_equal(sums, expected)


def test_biased_layout_holds_each_code_plus_128():
    x = np.arange(-60, 60, dtype=np.int8).reshape(2, 5, 3, 4)  # 5 channels: one quad + one
    for fold_kw in (1, 3):
        flat, shape, pixel_sums = int8.layout_buffer(x, (1, 2), fold_kw, spare=70, biased=True)
        plain, _ = int8.layout(x, (1, 2), fold_kw)
        assert shape == plain.shape and flat.size == plain.size + 70 and pixel_sums.size == 0
        biased = flat[: plain.size].reshape(shape).view(np.uint8).astype(np.int64)
        assert np.array_equal(biased, plain.astype(np.int64) + 128)  # padding: 0 + 128
        assert not flat[plain.size :].any()


def sparse_datapath(dp: Datapath) -> Datapath:
    return Datapath(dp.act_fmt, dp.weight_fmt, out_fmt=dp.out_fmt, acc_bits=dp.acc_bits,
                    acc_overflow=dp.acc_overflow, acc_mode="final", rounding=dp.rounding,
                    overflow=dp.overflow, kernel="sparse")


@needs_vbmi
@settings(max_examples=40, deadline=None)
@given(dp=datapaths(max_bits=8), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 20),
       fan_in=st.integers(1, 150), n_out=st.sampled_from([25, 64, 130]),
       density=st.sampled_from([0.05, 0.3, 0.6]))
def test_zero_skipping_int8_linear_layers_match_reference(dp, seed, batch, fan_in, n_out,
                                                          density):
    """Every rounding and overflow mode, any accumulator width applied once: bit for bit and
    counter for counter the Python reference, only the stored weights executed."""
    dp = sparse_datapath(dp)
    rng = np.random.default_rng(seed)
    x = random_codes(rng, dp.act_fmt, (batch, fan_in))
    w = random_codes(rng, dp.weight_fmt, (n_out, fan_in), 1 - density)
    b = random_codes(rng, dp.bias_format, (n_out,)) >> rng.integers(0, 60)
    counters = check_linear(dp, x, w, b)
    if not prepare(w, b, dp).compressed.fills_blocks():
        path = "sparse_int8_gather" if fan_in >= int8_sparse.MIN_SEGMENT else "sparse_float32"
        assert counters.paths == {path: counters.outputs}
    assert counters.executed_macs == np.count_nonzero(w) * batch


@needs_vbmi
@settings(max_examples=40, deadline=None)
@given(dp=datapaths(max_bits=8), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 2),
       channels=st.sampled_from([1, 3, 8, 13]), size=st.integers(3, 7),
       kernel=st.sampled_from([(3, 3), (5, 5), (2, 4)]), stride=st.sampled_from([1, 2]),
       padding=st.integers(0, 2), n_out=st.sampled_from([5, 17, 70]),
       density=st.sampled_from([0.05, 0.3, 0.6]))
def test_zero_skipping_int8_convolutions_match_reference(dp, seed, batch, channels, size,
                                                         kernel, stride, padding, n_out,
                                                         density):
    """As above for convolutions: requantised inside the kernel where the vectorised
    requantisation applies, after it elsewhere."""
    kh, kw = kernel
    if size + 2 * padding < max(kh, kw):
        return
    dp = sparse_datapath(dp)
    rng = np.random.default_rng(seed)
    x = random_codes(rng, dp.act_fmt, (batch, channels, size, size + 1))
    w = random_codes(rng, dp.weight_fmt, (n_out, channels, kh, kw), 1 - density)
    b = random_codes(rng, dp.bias_format, (n_out,)) >> rng.integers(0, 60)
    counters = check_conv(dp, x, w, b, stride, padding)
    rows = int8_sparse.segment_bytes(w.shape)
    if not prepare(w, b, dp).compressed.fills_blocks():
        path = "sparse_int8_gather" if rows >= int8_sparse.MIN_SEGMENT else "sparse_float32"
        assert counters.paths == {path: counters.outputs}
    assert counters.executed_macs == np.count_nonzero(w) * counters.outputs // n_out


@needs_vbmi
def test_gather_path_is_taken_only_where_it_is_exact():
    """Zero-skipping int8 sums where the dense ones would run as int8 dot products and few
    enough weights are stored; elsewhere the other zero-skipping kernels."""
    fmt = QFormat(8, 2)
    rng = np.random.default_rng(4)
    x = random_codes(rng, fmt, (3, 16, 6, 6))  # window rows of 3 x 16 bytes
    cases = [
        (Datapath(fmt, fmt, kernel="sparse"), 0.3, "sparse_int8_gather"),
        (Datapath(fmt, fmt, kernel="sparse"), 0.95, "sparse_int8"),  # filler zeros, densely
        (Datapath(QFormat(9, 2), fmt, kernel="sparse"), 0.3, "sparse_float32"),  # 9 bits
        # a per-MAC register that can overflow: its own kernels
        (Datapath(fmt, fmt, kernel="sparse", acc_bits=16, acc_mode="per_mac"), 0.3,
         "sparse_per_mac_float32"),
    ]
    for dp, density, path in cases:
        w = np.where(rng.random((20, 16, 3, 3)) < density, 127, 0)  # 16 bits: overflows
        _, counters = conv2d(x, w, None, dp, padding=1)
        assert counters.paths == {path: counters.outputs}, (dp, density)
    # window rows shorter than MIN_SEGMENT (4 channels, 3 wide: 12 bytes): the float kernel
    w = np.where(rng.random((20, 4, 3, 3)) < 0.3, 1, 0)
    _, counters = conv2d(x[:, :4], w, None, Datapath(fmt, fmt, kernel="sparse"), padding=1)
    assert counters.paths == {"sparse_float32": counters.outputs}
    assert int8_sparse.segment_bytes((20, 4, 3, 3)) == 12
    assert int8_sparse.segment_bytes((20, 1, 5, 5)) == 8  # LeNet5's conv1, folded
    assert int8_sparse.segment_bytes((50, 20, 5, 5)) == 100
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8_sparse, "AVAILABLE", False)  # VNNI without VBMI (Cascade Lake)
        w = np.where(rng.random((20, 16, 3, 3)) < 0.3, 1, 0)
        _, counters = conv2d(x, w, None, Datapath(fmt, fmt, kernel="sparse"), padding=1)
        assert counters.paths == {"sparse_float32": counters.outputs}


@needs_vbmi
def test_auto_skips_zeros_below_the_gather_thresholds():
    """With the int8 zero-skipping kernel, skipping pays from about half the weights down
    (docs/results/sparse.md): kernel="auto" uses its own thresholds, above the float ones."""
    from fxsim.datapath import SPARSE_DENSITY_THRESHOLD
    from fxsim.kernels.sparse import random_mask

    rng = np.random.default_rng(2)
    fmt = QFormat(8, 2)
    for kind, shape in (("linear", (40, 200)), ("conv", (40, 16, 3, 3))):
        x = random_codes(rng, fmt, (2, 200) if kind == "linear" else (2, 16, 5, 5))
        threshold = SPARSE_DENSITY_THRESHOLD[f"{kind}_int8_gather"]
        assert SPARSE_DENSITY_THRESHOLD[kind] < threshold < 0.75  # below the filler-zero rule
        for density, path in ((threshold - 0.05, "sparse_int8_gather"), (threshold + 0.1, "int8")):
            w = np.where(random_mask(shape, density, rng), 3, 0)
            layer = prepare(w, None, Datapath(fmt, fmt))
            _, counters = layer.linear(x) if kind == "linear" else layer.conv2d(x, padding=1)
            assert set(counters.paths) == {path}, (kind, density)


@needs_vbmi
def test_conv_sums_over_bands_and_pieces_of_rows():
    # 1,100 output columns: each row is cut into pieces of at most 1,024 positions (tasks of
    # int8.task_grid), and 3 rows make bands of one row each
    rng = np.random.default_rng(6)
    x = rng.integers(-128, 127, (2, 16, 3, 1100), endpoint=True).astype(np.int8)
    w = sparse_codes(rng, (20, 16, 3, 3), 0.2)
    schedule = int8_sparse.conv_schedule(w, False)
    xflat, shape = int8_sparse.conv_input(x, (1, 1), 1, schedule.reach)
    expected = conv_sums_int64(x, w, (1, 1), (1, 1))
    sums = np.empty(expected.shape, np.int32)
    int8_sparse.conv_sums(xflat, shape, schedule.runs, schedule.run_ptr, schedule.step_ptr,
                          schedule.table, schedule.corr, 3, 3, 1, 1, np.zeros(20, np.int64),
                          sparse.NO_REQUANT, np.empty((0, 0, 0), np.uint8), sums)
    assert int8.task_grid(3, 1100) == (1, 1024, 3, 2)
    assert np.array_equal(sums, expected)


@needs_vbmi
@pytest.mark.parametrize("rounding", ["rnd_conv", "trn", "rnd_zero", "rnd_inf"])
@pytest.mark.parametrize("out_fmt, overflow, x_max", [(QFormat(8, 2), "sat", 16),
                                                      (QFormat(16, 5), "sat_sym", 128)])
def test_fused_convolution_equals_the_dense_kernel(rounding, out_fmt, overflow, x_max,
                                                   monkeypatch):
    """The zero-skipping int8 convolution requantised inside the kernel by the int32 kernel
    (a whole image's tile of a panel in one call, one int32 bias per code) against the dense
    int8 kernel, bit for bit and counter for counter: panels of 64 outputs, whole and in part
    (50, 70, 130 outputs), shifts of 6 (int8 codes; inputs within +-16, so that most codes are
    in range) and 1 (int16 codes, some saturating), random biases, and rows too long for one
    task (then a call per output channel)."""
    fmt = QFormat(8, 2)
    dp = Datapath(fmt, fmt, out_fmt=out_fmt, rounding=rounding, overflow=overflow)
    out_dtype = code_dtype(out_fmt)
    rng = np.random.default_rng(11)
    kernel_calls = []  # whether each call of the kernel took the int32 requantisation
    conv_sums = int8_sparse.conv_sums
    monkeypatch.setattr(int8_sparse, "conv_sums", lambda *args: kernel_calls.append(
        args[12][11]) or conv_sums(*args))
    for n_out, x_shape in ((50, (3, 16, 7, 9)), (130, (2, 16, 5, 6)), (70, (1, 16, 2, 1030))):
        x = rng.integers(-x_max, x_max, x_shape)
        w = random_codes(rng, fmt, (n_out, 16, 3, 3), 0.7)
        b = rng.integers(-(2**14), 2**14, n_out)  # +-4 at the accumulator's 12 fraction bits
        ys, cs = {}, {}
        for kernel in ("dense", "sparse"):
            layer = prepare(w, b, Datapath(**{**dp.__dict__, "kernel": kernel}))
            ys[kernel], cs[kernel] = layer.conv2d(x, 1, 1, out_dtype=out_dtype)
        assert cs["sparse"].paths == {"sparse_int8_gather": cs["sparse"].outputs}
        assert kernel_calls == [1]
        kernel_calls.clear()
        assert ys["sparse"].dtype == ys["dense"].dtype == out_dtype
        assert np.array_equal(ys["sparse"], ys["dense"]), n_out
        for key in ("out_saturations", "acc_overflows", "max_abs_acc", "outputs"):
            assert getattr(cs["sparse"], key) == getattr(cs["dense"], key), (n_out, key)
        assert 0 < cs["dense"].out_saturations < cs["dense"].outputs // 2
