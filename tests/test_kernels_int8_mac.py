"""The per-MAC register on int8 dot products (fxsim.kernels.int8_mac): the kernel against
registers stepped MAC by MAC in int64, the layers that take it against the Python reference,
and the choice of path. Skipped where the CPU lacks AVX-512 VNNI (the per-MAC float kernels'
own tests cover that machine)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsim import QFormat, datapath
from fxsim.datapath import Datapath, prepare
from fxsim.kernels import dense, int8, int8_mac
from tests.test_datapath import check_conv, check_linear, datapaths, random_codes

needs_vnni = pytest.mark.skipif(not int8.AVAILABLE, reason="the CPU has no AVX-512 VNNI")


def stepped_registers(x, w, start, bits, wrap):
    """(registers (N, J), events): every register takes its products one by one in input
    order, saturating or wrapping after each (int64 arithmetic, all lanes at once)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    reg = np.broadcast_to(np.asarray(start, np.int64), (x.shape[0], w.shape[0])).copy()
    events = 0
    for k in range(x.shape[1]):
        s = reg + np.outer(x[:, k], w[:, k])
        reg = ((s - lo) & ((1 << bits) - 1)) + lo if wrap else np.clip(s, lo, hi)
        events += int(np.count_nonzero(reg != s))
    return reg, events


def run_kernel(x, w, start, bits, wrap, group_quads):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    packed = int8_mac.pack_weights(w)
    rows, smallest, largest = int8_mac.bias_rows(np.ascontiguousarray(x), packed.shape[0])
    assert (smallest, largest) == (x.min(), x.max())
    limits, corr = int8_mac.thresholds(w, smallest, largest, lo, hi, group_quads)
    padded_start = np.zeros(packed.shape[1], np.int32)
    padded_start[: w.shape[0]] = start
    sums = np.empty((x.shape[0], w.shape[0]), np.int32)
    events = int8_mac.per_mac_rows(rows, packed, limits, corr, padded_start, lo, hi,
                                   (1 << bits) - 1, wrap, group_quads, sums)
    return sums, events


@needs_vnni
@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 22), fan_in=st.integers(1, 150),
       n_out=st.sampled_from([1, 10, 16, 17, 64, 70, 129, 150]), bits=st.integers(12, 24),
       wrap=st.booleans(), group_quads=st.integers(1, 3),
       inputs=st.sampled_from(["signed", "nonnegative", "ramp"]))
def test_per_mac_registers_match_stepped_registers(seed, batch, fan_in, n_out, bits, wrap,
                                                   group_quads, inputs):
    # registers narrow enough to saturate (or wrap) many times over and wide enough not to;
    # batches around the micro-kernel's 4 rows and the task's 16; outputs around whole
    # vectors (16), micro-kernels (64) and panels (128); partial last quads and groups
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 127, (batch, fan_in), endpoint=True)
    if inputs == "nonnegative":
        x = np.abs(x) // 2 * 2 + 1 if seed % 2 else np.abs(x)
        x = np.minimum(x, 127)
    elif inputs == "ramp":  # climbs into saturation, then comes back down
        x = np.where(np.arange(fan_in) < fan_in // 2, 127, -128) * np.ones((batch, 1), np.int64)
    w = rng.integers(-128, 127, (n_out, fan_in), endpoint=True)
    w[:, rng.random(fan_in) < 0.2] = 0
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    start = rng.integers(lo, hi, n_out, endpoint=True)
    start[0] = hi  # at a rail before the first product
    sums, events = run_kernel(x, w, start, bits, wrap, group_quads)
    expected, expected_events = stepped_registers(x, w, start, bits, wrap)
    assert np.array_equal(sums, expected)
    assert events == expected_events


@needs_vnni
@pytest.mark.parametrize("wrap", [False, True])
def test_per_mac_registers_at_the_int32_bound(wrap):
    # the largest register and fan-in int8_mac.fits allows: biased registers and thresholds
    # close to 2^31 must still compare exactly
    bits = 24
    fan_in = 4 * 1000
    while not int8_mac.fits(bits, 128, 128 * (fan_in + 4)):
        fan_in -= 4
    assert int8_mac.fits(bits, 128, 128 * fan_in)
    x = np.full((5, fan_in), -128)
    x[1] = 127
    x[2, fan_in // 2 :] = 127
    w = np.full((20, fan_in), -128)
    w[3] = 127
    start = np.zeros(20, np.int64)
    sums, events = run_kernel(x, w, start, bits, wrap, int8_mac.GROUP_QUADS)
    expected, expected_events = stepped_registers(x, w, start, bits, wrap)
    assert np.array_equal(sums, expected) and events == expected_events
    assert events > 0


def test_thresholds_of_a_known_group():
    # two outputs, one group of 8 inputs in [0, 10]; the register [-100, 99]
    w = np.array([[1, -2, 3, 0, 0, 0, 0, 0, 5], [-1, -1, -1, -1, -1, -1, -1, -1, -1]])
    limits, corr = int8_mac.thresholds(w, 0, 10, -100, 99, group_quads=2)
    assert limits.shape == (2, 2, 16) and corr.shape == (3, 16)
    # group 0 of output 0: rises by at most 10 * (1 + 3), falls by at most 10 * 2
    assert limits[0, :, 0].tolist() == [-100 + 20, 99 - 40]
    assert corr[:, 0].tolist() == [0, 128 * 2, 128 * 7]
    # group 1 (input 8 alone) starts 128 * 2 further on
    assert limits[1, :, 0].tolist() == [-100 + 256, 99 - 50 + 256]
    assert limits[0, :, 1].tolist() == [-100 + 80, 99]
    assert limits[0, :, 2].tolist() == [-100, 99]  # padding outputs: no products


@pytest.mark.parametrize(("kernel", "stride", "padding"),
                         [((3, 3), (1, 1), (1, 1)), ((5, 5), (1, 1), (0, 0)),
                          ((1, 9), (1, 1), (0, 4)),  # a window row longer than one word
                          ((2, 3), (2, 1), (1, 2)), ((3, 3), (2, 2), (0, 1))])
def test_bias_windows_are_canonical_im2col_rows(kernel, stride, padding):
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 127, (3, 5, 9, 8), endpoint=True).astype(np.int8)
    fan_in = 5 * kernel[0] * kernel[1]
    quads = -(-fan_in // 4)
    rows = int8_mac.bias_windows(x, *kernel, *stride, *padding, quads)
    cols = dense.im2col(x.astype(np.int64), *kernel, stride, padding)  # (K, N * P)
    assert rows.shape == (cols.shape[1], 4 * quads) and rows.dtype == np.uint8
    assert np.array_equal(rows[:, :fan_in].astype(np.int64) - 128, cols.T)
    assert (rows[:, fan_in:] == 128).all()


def per_mac_datapath(dp: Datapath, acc_bits: int, kernel="dense") -> Datapath:
    return Datapath(dp.act_fmt, dp.weight_fmt, out_fmt=dp.out_fmt, acc_bits=acc_bits,
                    acc_overflow=dp.acc_overflow, acc_mode="per_mac", rounding=dp.rounding,
                    overflow=dp.overflow, kernel=kernel)


@needs_vnni
@settings(max_examples=60, deadline=None)
@given(dp=datapaths(max_bits=8), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 9),
       fan_in=st.integers(1, 90), n_out=st.sampled_from([3, 16, 40, 70]),
       extra_bits=st.integers(0, 6), zeros=st.sampled_from([0, 0.2]))
def test_int8_per_mac_linear_layers_match_reference(dp, seed, batch, fan_in, n_out,
                                                    extra_bits, zeros):
    """Every rounding and overflow mode, sat and wrap registers a few bits wider than one
    product: the kernel, the bias load and the requantisation after it, bit for bit and
    counter for counter the Python reference."""
    dp = per_mac_datapath(dp, Datapath(dp.act_fmt, dp.weight_fmt).product_bits + extra_bits)
    rng = np.random.default_rng(seed)
    x = random_codes(rng, dp.act_fmt, (batch, fan_in))
    w = random_codes(rng, dp.weight_fmt, (n_out, fan_in), zeros)
    b = random_codes(rng, dp.bias_format, (n_out,)) >> rng.integers(0, 30)
    counters = check_linear(dp, x, w, b)
    assert_per_mac_int8_where_it_can_overflow(counters)


def assert_per_mac_int8_where_it_can_overflow(counters):
    # a register the bound proves cannot overflow runs as an exact sum (int8, or float32 for
    # a few outputs); one that overflowed must have run here
    (path,) = counters.paths
    assert path in ("int8", "float32", "per_mac_int8")
    if counters.acc_overflows:
        assert path == "per_mac_int8"


@needs_vnni
@settings(max_examples=40, deadline=None)
@given(dp=datapaths(max_bits=8), seed=st.integers(0, 2**32 - 1),
       channels=st.sampled_from([1, 3, 8]), size=st.integers(3, 8),
       kernel=st.sampled_from([(1, 1), (3, 3), (2, 4)]), stride=st.sampled_from([1, 2]),
       padding=st.integers(0, 2), extra_bits=st.integers(0, 6))
def test_int8_per_mac_convolutions_match_reference(dp, seed, channels, size, kernel, stride,
                                                   padding, extra_bits):
    dp = per_mac_datapath(dp, Datapath(dp.act_fmt, dp.weight_fmt).product_bits + extra_bits)
    rng = np.random.default_rng(seed)
    x = random_codes(rng, dp.act_fmt, (2, channels, size, size + 1))
    w = random_codes(rng, dp.weight_fmt, (18, channels, *kernel))
    b = random_codes(rng, dp.bias_format, (18,)) >> rng.integers(0, 30)
    if kernel[0] > size + 2 * padding:
        return
    counters = check_conv(dp, x, w, b, stride, padding)
    assert_per_mac_int8_where_it_can_overflow(counters)


@needs_vnni
def test_int8_per_mac_path_is_taken_only_where_it_is_exact():
    fmt = QFormat(8, 2)
    rng = np.random.default_rng(5)

    def per_mac(**kw):
        return Datapath(fmt, fmt, acc_bits=kw.pop("acc_bits", 18), acc_mode="per_mac", **kw)

    cases = [
        (per_mac(kernel="dense"), 0, "per_mac_int8"),
        (per_mac(kernel="dense", acc_overflow="wrap"), 0, "per_mac_int8"),
        # the zero-skipping datapath: dense enough, it runs every weight (counted as skipping)
        (per_mac(kernel="sparse"), 0.1, "sparse_per_mac_int8"),
        (per_mac(kernel="sparse"), 0.6, "sparse_per_mac_float32"),
        (Datapath(QFormat(9, 2), fmt, acc_bits=19, acc_mode="per_mac", kernel="dense"), 0,
         "per_mac_float32"),  # codes beyond a byte
    ]
    for dp, zeros, path in cases:
        w = random_codes(rng, dp.weight_fmt, (30, 200), zeros)
        x = random_codes(rng, dp.act_fmt, (4, 200))
        counters = check_linear(dp, x, w, np.zeros(30, np.int64))
        assert counters.paths == {path: 120}, (dp, zeros)
        executed = np.count_nonzero(w) * 4 if dp.kernel == "sparse" else w.size * 4
        assert counters.executed_macs == executed
    # a register whose biased values would leave int32: float64 lanes, as a saturating
    # register of 31 bits takes elsewhere (one output, one row)
    fan_in = 70_000
    assert not int8_mac.fits(31, 128, 128 * fan_in)
    x, w = np.full((1, fan_in), -128), np.full((1, fan_in), -128)
    _, counters = prepare(w, None, per_mac(acc_bits=31, kernel="dense")).linear(x)
    assert counters.paths == {"per_mac_float64": 1}
    expected, events = stepped_registers(x, w, [0], 31, False)
    assert counters.acc_overflows == events > 0
    assert counters.max_abs_acc == abs(int(expected[0, 0])) == (1 << 30) - 1
    # switched off (or a CPU without VNNI): the float lanes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8, "AVAILABLE", False)
        w = random_codes(rng, fmt, (30, 200))
        counters = check_linear(per_mac(kernel="dense"), random_codes(rng, fmt, (4, 200)), w,
                                np.zeros(30, np.int64))
    assert counters.paths == {"per_mac_float32": 120}


@needs_vnni
def test_tables_are_kept_per_input_range():
    fmt = QFormat(8, 2)
    rng = np.random.default_rng(2)
    prepared = prepare(random_codes(rng, fmt, (20, 60)), None,
                       Datapath(fmt, fmt, acc_bits=17, acc_mode="per_mac", kernel="dense"))
    x = random_codes(rng, fmt, (3, 60))
    y_signed, _ = prepared.linear(x)
    y_again, _ = prepared.linear(x)
    relu = np.abs(x).clip(max=fmt.max_code)
    y_relu, _ = prepared.linear(relu)
    keys = [k for k in prepared._casts if isinstance(k, tuple) and k[0] == "int8_mac"]
    assert sorted(k[2] for k in keys) == [False, True]  # signed inputs, then nonnegative ones
    assert np.array_equal(y_signed, y_again)
    fresh = prepare(prepared.weights, None, prepared.datapath)
    assert np.array_equal(y_relu, fresh.linear(relu)[0])
    # inputs of ever new ranges (an attack's steps) keep a bounded number of tables
    for top in range(1, 3 * datapath._PLANS_KEPT):
        prepared.linear(np.clip(x, -top, top))
    kept = [k for k in prepared._casts if isinstance(k, tuple) and k[0] == "int8_mac"]
    assert 0 < len(kept) <= datapath._PLANS_KEPT
