import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsim import QFormat, code_dtype
from fxsim.datapath import Counters, Datapath, avg_pool2d, conv2d, linear, max_pool2d, relu
from fxsim.errors import DatapathError, FormatError, RangeError, ShapeError
from fxsim.kernels import int8
from tests.reference import conv2d_ref, linear_ref, requantize_ref

ROUNDINGS = ["trn", "trn_zero", "rnd", "rnd_zero", "rnd_min_inf", "rnd_inf", "rnd_conv"]
OVERFLOWS = ["sat", "wrap", "sat_zero", "sat_sym"]


def as_ref(dp: Datapath) -> dict:
    fmt = lambda f: (f.bits, f.int_bits, f.signed)  # noqa: E731
    return {
        "act_fmt": fmt(dp.act_fmt), "weight_fmt": fmt(dp.weight_fmt),
        "out_fmt": fmt(dp.output_fmt), "acc_bits": dp.acc_bits,
        "acc_overflow": dp.acc_overflow.value, "acc_mode": dp.acc_mode,
        "rounding": dp.rounding.value, "overflow": dp.overflow.value,
    }  # fmt: skip


def random_codes(rng, fmt: QFormat, shape, zero_fraction=0.0):
    codes = rng.integers(fmt.min_code, fmt.max_code, size=shape, endpoint=True)
    if zero_fraction:
        codes[rng.random(shape) < zero_fraction] = 0
    return codes


def aligned_bias(bias, dp):
    shift = dp.acc_frac_bits - dp.bias_format.frac_bits
    return [int(b) << shift for b in bias]


def check_conv(dp, x, w, b, stride=1, padding=0):
    y, counters = conv2d(x, w, b, dp, stride=stride, padding=padding)
    ref, ref_counters = conv2d_ref(x.tolist(), w.tolist(), aligned_bias(b, dp), as_ref(dp),
                                   stride, padding)
    assert y.tolist() == ref
    for key, value in ref_counters.items():
        assert getattr(counters, key) == value, key
    assert counters.outputs == y.size
    assert counters.macs == y.size * w[0].size
    # the same codes in the narrowest dtypes, as quantised layers pass them on
    narrow, narrow_counters = conv2d(x.astype(code_dtype(dp.act_fmt)), w, b, dp, stride=stride,
                                     padding=padding, out_dtype=code_dtype(dp.output_fmt))
    assert narrow.dtype == code_dtype(dp.output_fmt) and narrow.tolist() == ref
    assert narrow_counters == counters
    return counters


def check_linear(dp, x, w, b):
    y, counters = linear(x, w, b, dp)
    ref, ref_counters = linear_ref(x.tolist(), w.tolist(), aligned_bias(b, dp), as_ref(dp))
    assert y.tolist() == ref
    for key, value in ref_counters.items():
        assert getattr(counters, key) == value, key
    narrow, narrow_counters = linear(x.astype(code_dtype(dp.act_fmt)), w, b, dp,
                                     out_dtype=code_dtype(dp.output_fmt))
    assert narrow.dtype == code_dtype(dp.output_fmt) and narrow.tolist() == ref
    assert narrow_counters == counters
    return counters


@st.composite
def datapaths(draw, max_bits=12):
    act = QFormat(draw(st.integers(2, max_bits)), draw(st.integers(-2, 6)))
    weight = QFormat(draw(st.integers(2, max_bits)), draw(st.integers(-2, 4)))
    out = QFormat(draw(st.integers(2, max_bits)), draw(st.integers(-2, 8)),
                  draw(st.booleans()))
    probe = Datapath(act, weight)
    acc_bits = draw(st.one_of(st.none(), st.integers(probe.product_bits, 64)))
    return Datapath(
        act, weight, out_fmt=out, acc_bits=acc_bits,
        acc_overflow=draw(st.sampled_from(["sat", "wrap"])),
        acc_mode=draw(st.sampled_from(["final", "per_mac"])),
        rounding=draw(st.sampled_from(ROUNDINGS)), overflow=draw(st.sampled_from(OVERFLOWS)),
    )  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(dp=datapaths(), seed=st.integers(0, 2**32 - 1), stride=st.integers(1, 2),
       padding=st.integers(0, 2), kernel=st.integers(1, 3), zeros=st.sampled_from([0, 0.5]))
def test_conv2d_matches_reference(dp, seed, stride, padding, kernel, zeros):
    rng = np.random.default_rng(seed)
    x = random_codes(rng, dp.act_fmt, (2, 2, 5, 4))
    w = random_codes(rng, dp.weight_fmt, (3, 2, kernel, kernel), zeros)
    b = random_codes(rng, dp.bias_format, (3,)) >> rng.integers(0, 40)
    check_conv(dp, x, w, b, stride, padding)


@settings(max_examples=150, deadline=None)
@given(dp=datapaths(max_bits=16), seed=st.integers(0, 2**32 - 1),
       fan_in=st.integers(1, 40), zeros=st.sampled_from([0, 0.3, 1.0]))
def test_linear_matches_reference(dp, seed, fan_in, zeros):
    rng = np.random.default_rng(seed)
    x = random_codes(rng, dp.act_fmt, (3, fan_in))
    w = random_codes(rng, dp.weight_fmt, (4, fan_in), zeros)
    b = random_codes(rng, dp.bias_format, (4,)) >> rng.integers(0, 60)
    check_linear(dp, x, w, b)


@pytest.mark.parametrize("size", [(6, 7), (18, 18)])
@pytest.mark.parametrize("acc_mode", ["final", "per_mac"])
def test_conv2d_column_orders_match_reference(size, acc_mode):
    # 5 x 6 outputs: columns built batch-last; 16 x 16 = 256 outputs: image by image
    rng = np.random.default_rng(sum(size))
    fmt = QFormat(8, 2)
    dp = Datapath(fmt, fmt, acc_bits=16, acc_mode=acc_mode, rounding="rnd_conv")
    x = random_codes(rng, fmt, (3, 2, *size))
    w = random_codes(rng, fmt, (3, 2, 3, 3), zero_fraction=0.2)
    b = random_codes(rng, dp.bias_format, (3,)) >> 4
    counters = check_conv(dp, x, w, b, stride=1, padding=0)
    assert counters.acc_overflows > 0


# Each kernel path, forced by the formats and the accumulator, checked against the reference.
# Saturating per-MAC registers whose values stay below 2^24 run in float32 lanes (below 2^53,
# registers wider than 30 bits: float64 lanes), wrapping ones in int32 (int64) lanes.
BOTH = ("sat", "wrap")
PATHS = [
    ("float32", QFormat(8, 2), QFormat(8, 2), None, "final", BOTH),
    ("float64", QFormat(16, 4), QFormat(16, 2), None, "final", BOTH),
    ("int64", QFormat(26, 4), QFormat(26, 2), None, "final", BOTH),
    ("int64", QFormat(28, 4), QFormat(28, 2), 56, "final", BOTH),
    ("per_mac_float32", QFormat(8, 2), QFormat(8, 2), 17, "per_mac", ("sat",)),
    ("per_mac_int32", QFormat(8, 2), QFormat(8, 2), 17, "per_mac", ("wrap",)),
    ("per_mac_int32", QFormat(12, 2), QFormat(12, 2), 24, "per_mac", BOTH),
    ("per_mac_float64", QFormat(16, 4), QFormat(16, 2), 33, "per_mac", ("sat",)),
    ("per_mac_int64", QFormat(16, 4), QFormat(16, 2), 33, "per_mac", ("wrap",)),
    ("per_mac_int64", QFormat(32, 4), QFormat(31, 2), 64, "per_mac", BOTH),
    ("float32", QFormat(8, 2), QFormat(8, 2), 40, "per_mac", BOTH),  # cannot overflow: exact
]


# Where the CPU has int8 dot products (fxsim.kernels.int8), codes that fit a byte take them
# instead of float32 BLAS; the float32 cases run both ways there.
INT8_PATHS = [(*case[:5], ovf, True) for case in PATHS if case[0] == "float32" and int8.AVAILABLE
              for ovf in case[5]]


@pytest.mark.parametrize(("path", "act", "weight", "acc_bits", "mode", "acc_overflow", "int8_dot"),
                         [(*case[:5], ovf, False) for case in PATHS for ovf in case[5]]
                         + INT8_PATHS)
def test_every_kernel_path_is_exact(path, act, weight, acc_bits, mode, acc_overflow, int8_dot,
                                    monkeypatch):
    monkeypatch.setattr(int8, "AVAILABLE", int8_dot)
    path = "int8" if int8_dot else path
    rng = np.random.default_rng(zlib.crc32(repr((path, acc_bits, acc_overflow)).encode()))
    # kernel="dense": with about 0.7 of the weights nonzero, "auto" may take the zero-skipping
    # datapath for a per-MAC register (its own threshold is 0.7), which other tests cover
    dp = Datapath(act, weight, out_fmt=QFormat(16, 6), acc_bits=acc_bits,
                  acc_overflow=acc_overflow, acc_mode=mode, rounding="rnd_conv", kernel="dense")
    x = random_codes(rng, act, (3, 4, 6, 6))
    w = random_codes(rng, weight, (5, 4, 3, 3), zero_fraction=0.3)
    b = random_codes(rng, dp.bias_format, (5,)) >> 2
    counters = check_conv(dp, x, w, b, stride=1, padding=1)
    assert counters.paths == {path: counters.outputs}
    if mode == "per_mac" and path.startswith("per_mac"):
        assert counters.acc_overflows > 0  # the case is meant to exercise overflow
    lin_counters = check_linear(dp, x.reshape(3, -1)[:, :36], w.reshape(5, -1), b)
    assert set(lin_counters.paths) <= {path, "float32", "float64", "int64"}  # 5 outputs: fused


# (format, register bits, overflow) -> the lanes the per-MAC kernels run in
REGISTER_LANES = [
    (QFormat(8, 2), 19, "sat", "float32"),
    (QFormat(8, 2), 19, "wrap", "int32"),
    (QFormat(12, 2), 26, "sat", "int32"),
    (QFormat(16, 4), 36, "sat", "float64"),
    (QFormat(16, 4), 36, "wrap", "int64"),
]
# 8-bit codes on a CPU with int8 dot products: the same registers on fxsim.kernels.int8_mac
# (the cases above run with it switched off)
REGISTER_LANES += [(QFormat(8, 2), 19, mode, "int8") for mode in ("sat", "wrap")
                   if int8.AVAILABLE]


def lanes_as_chosen(monkeypatch, lanes):
    """Run the per-MAC float / integer lanes with the int8 kernel off, the int8 cases as the
    machine chooses."""
    if lanes != "int8":
        monkeypatch.setattr(int8, "AVAILABLE", False)


@pytest.mark.parametrize(("fmt", "acc_bits", "acc_overflow", "lanes"), REGISTER_LANES)
@pytest.mark.parametrize("kernel", ["dense", "sparse", "dense_pairs"])
def test_per_mac_fast_groups_are_exact_across_saturation(fmt, acc_bits, acc_overflow, lanes,
                                                         kernel, monkeypatch):
    # A register that holds about 16 full-size products, long dot products that climb into
    # saturation and come back down: the kernels' plain multiply-add groups (proven safe by
    # the range bound) and their MAC-by-MAC groups must interleave exactly like the reference.
    # "dense_pairs": weights without zero rows, dense enough for the kernel that runs two
    # output channels per pass (sparse.sparse_per_mac, paired; 5 channels: two pairs and one
    # alone). With lanes "int8", the dense layer runs int8_mac's checked groups instead, and
    # so does the zero-skipping one above density 0.7 ("dense_pairs"; "sparse", 0.64 of the
    # weights nonzero, skips zeros on float lanes).
    lanes_as_chosen(monkeypatch, lanes)
    rng = np.random.default_rng(acc_bits)
    fan_in = 300
    x = rng.integers(fmt.max_code // 2, fmt.max_code, (40, fan_in), endpoint=True)
    x[::3] *= -1
    ramp = np.where(np.arange(fan_in) < 150, fmt.max_code, fmt.min_code)
    blocks = np.where((np.arange(fan_in) // 24) % 2 == 0, fmt.max_code // 3, fmt.min_code // 3)
    w = np.stack([ramp, blocks, random_codes(rng, fmt, fan_in), random_codes(rng, fmt, fan_in),
                  np.zeros(fan_in, np.int64)])
    if kernel == "dense_pairs":
        w[4] = -ramp[::-1] - 1  # max_code first: climbs, then falls
        w[3, rng.random(fan_in) < 0.05] = 0
    else:
        w[3, rng.random(fan_in) < 0.7] = 0
    dp = Datapath(fmt, fmt, out_fmt=QFormat(24, 20), acc_bits=acc_bits, acc_mode="per_mac",
                  acc_overflow=acc_overflow, rounding="rnd_conv",
                  kernel=kernel.removesuffix("_pairs"))
    b = random_codes(rng, dp.bias_format, (5,)) >> 8
    counters = check_linear(dp, x, w, b)
    assert counters.acc_overflows > 0
    if lanes == "int8" and kernel == "sparse":
        lanes = "float32" if acc_overflow == "sat" else "int32"
    assert all(path.endswith(f"per_mac_{lanes}") for path in counters.paths)


@pytest.mark.parametrize(("fmt", "acc_bits", "acc_overflow", "lanes"),
                         REGISTER_LANES[:3] + REGISTER_LANES[5:])
@pytest.mark.parametrize("batch", [6, 7])
def test_per_mac_linear_vectorised_over_outputs_is_exact(fmt, acc_bits, acc_overflow, lanes,
                                                          batch, monkeypatch):
    # 64 or more outputs and mostly nonzero weights: the per-MAC kernel runs over the outputs
    # (dense.dot_per_mac_rows, images in fours, then a pair; an odd batch leaves one image
    # alone) instead of the batch; registers climb into saturation and back. (With lanes
    # "int8": int8_mac, vectorised over the outputs too.)
    lanes_as_chosen(monkeypatch, lanes)
    rng = np.random.default_rng(64)
    fan_in = 160
    x = rng.integers(fmt.max_code // 2, fmt.max_code, (batch, fan_in), endpoint=True)
    x[::2] *= -1
    x[:, rng.random(fan_in) < 0.2] = 0  # zero inputs are skipped
    ramp = np.where(np.arange(fan_in) < 80, fmt.max_code, fmt.min_code)
    w = np.concatenate([np.tile(ramp, (8, 1)), random_codes(rng, fmt, (60, fan_in))])
    dp = Datapath(fmt, fmt, out_fmt=QFormat(24, 20), acc_bits=acc_bits, acc_mode="per_mac",
                  acc_overflow=acc_overflow, rounding="rnd_conv")
    b = random_codes(rng, dp.bias_format, (68,)) >> 8
    counters = check_linear(dp, x, w, b)
    assert counters.acc_overflows > 0
    assert counters.paths == {f"per_mac_{lanes}": counters.outputs}


def test_per_mac_saturation_depends_on_order_and_differs_from_final():
    fmt = QFormat(4, 4)  # products of fix<4,4> need 8 bits
    final = Datapath(fmt, fmt, out_fmt=QFormat(8, 8), acc_bits=8, acc_mode="final")
    per_mac = Datapath(fmt, fmt, out_fmt=QFormat(8, 8), acc_bits=8, acc_mode="per_mac")
    w = np.array([[7, 7, 7, 7, 7]])
    x = np.array([[7, 7, 7, -7, -7], [-7, -7, 7, 7, 7]])  # the same products, in two orders
    y_final, c_final = linear(x, w, None, final)
    y_mac, c_mac = linear(x, w, None, per_mac)
    assert y_final.ravel().tolist() == [49, 49]  # exact sum, in range
    assert c_final.acc_overflows == 0
    # 49, 98, 147 saturates to 127, then 78, 29; the other order never leaves the range
    assert y_mac.ravel().tolist() == [29, 49]
    assert c_mac.acc_overflows == 1
    wrap = Datapath(fmt, fmt, out_fmt=QFormat(8, 8), acc_bits=8, acc_mode="per_mac",
                    acc_overflow="wrap")
    y_wrap, c_wrap = linear(x, w, None, wrap)
    assert y_wrap.ravel().tolist() == [49, 49] and c_wrap.acc_overflows == 2  # up, then back


def test_final_accumulator_overflow_is_counted_not_silent():
    fmt = QFormat(8, 8)
    dp = Datapath(fmt, fmt, out_fmt=QFormat(16, 16), acc_bits=16, acc_overflow="sat")
    x = np.full((1, 8), 127)
    w = np.full((2, 8), 127)  # 8 * 16129 = 129032 > 32767
    y, c = linear(x, w, None, dp)
    assert y.ravel().tolist() == [32767, 32767]
    assert c.acc_overflows == 2 and c.max_abs_acc == 129032


def test_bias_and_requantisation_of_a_known_case():
    # x = 0.5 (fix<8,2>: code 32), w = 0.25 (code 16), bias = 0.125: y = 0.25 in fix<8,2>
    act = QFormat(8, 2)
    dp = Datapath(act, act)
    bias = np.array([round(0.125 * 2**dp.acc_frac_bits)])
    y, c = linear(np.array([[32]]), np.array([[16]]), bias, dp)
    assert y.tolist() == [[16]] and c.out_saturations == 0


def test_counters_add_up():
    a = Counters(macs=5, acc_overflows=1, max_abs_acc=7, outputs=2, paths={"float32": 2})
    b = Counters(macs=3, out_saturations=2, max_abs_acc=9, outputs=1, paths={"int64": 1})
    total = a + b
    assert (total.macs, total.acc_overflows, total.out_saturations, total.max_abs_acc) == (
        8, 1, 2, 9)
    assert total.paths == {"float32": 2, "int64": 1}


def test_large_batches_are_chunked_with_identical_results(monkeypatch):
    import fxsim.datapath as datapath_module

    rng = np.random.default_rng(3)
    dp = Datapath(QFormat(8, 2), QFormat(8, 2), acc_bits=18, acc_mode="per_mac")
    x = random_codes(rng, dp.act_fmt, (7, 3, 9, 9))
    w = random_codes(rng, dp.weight_fmt, (4, 3, 3, 3))
    y_whole, c_whole = conv2d(x, w, None, dp)
    monkeypatch.setattr(datapath_module, "_CHUNK_ELEMENTS", 500)  # about one image per chunk
    y_chunked, c_chunked = conv2d(x, w, None, dp)
    assert np.array_equal(y_whole, y_chunked)
    assert c_whole == c_chunked


def test_stochastic_requantisation_is_seeded_and_batch_chunk_independent(monkeypatch):
    import fxsim.datapath as datapath_module

    rng = np.random.default_rng(4)
    dp = Datapath(QFormat(8, 2), QFormat(8, 2), rounding="stochastic", seed=11)
    x = random_codes(rng, dp.act_fmt, (5, 2, 6, 6))
    w = random_codes(rng, dp.weight_fmt, (3, 2, 3, 3))
    y1, _ = conv2d(x, w, None, dp)
    monkeypatch.setattr(datapath_module, "_CHUNK_ELEMENTS", 100)
    y2, _ = conv2d(x, w, None, dp)
    assert np.array_equal(y1, y2)
    # each output is one of the two neighbours of the exact value
    exact, _ = conv2d(x, w, None, Datapath(dp.act_fmt, dp.weight_fmt, out_fmt=QFormat(40, 28)))
    floor = exact >> (dp.acc_frac_bits - dp.act_fmt.frac_bits)  # fix<40,28> is exact here
    assert np.all((y1 == np.clip(floor, -128, 127)) | (y1 == np.clip(floor + 1, -128, 127)))


# ---------------------------------------------------------------------------- pools, relu


def test_max_pool_and_relu_on_codes():
    x = np.arange(32).reshape(1, 2, 4, 4) - 16
    assert max_pool2d(x, 2).tolist() == [[[[-11, -9], [-3, -1]], [[5, 7], [13, 15]]]]
    assert relu(np.array([-3, 0, 4])).tolist() == [0, 0, 4]


def test_avg_pool_power_of_two_is_exact_and_other_windows_round():
    x = np.array([[[[1, 2], [3, 5]]]])  # sum 11 over 4 values, frac_bits 3
    codes, frac = avg_pool2d(x, 3, kernel=2)
    assert codes.tolist() == [[[[11]]]] and frac == 5  # 11 / 2^5 == (11 / 4) / 2^3
    y = np.array([[[[1, 2, 4]]]])  # mean 7/3 over a 1x3 window
    for mode in ROUNDINGS:
        got, frac = avg_pool2d(y, 0, kernel=(1, 3), fmt=QFormat(8, 6), rounding=mode)
        # 7/3 in fix<8,6> (2 fraction bits): 28/3 = 9.33 -> the reference rounds the rational
        from fractions import Fraction

        from tests.reference import overflow_int, round_rational

        expected = overflow_int(round_rational(Fraction(28, 3), mode), 8, True, "sat")[0]
        assert got.ravel().tolist() == [expected] and frac == 2
    assert requantize_ref(7, 0, 8, 8, True, "rnd_conv", "sat")[0] == 7


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-1000, 1000), min_size=3, max_size=3),
       frac_in=st.integers(0, 4), frac_out=st.integers(-2, 8),
       mode=st.sampled_from(ROUNDINGS))
def test_avg_pool_non_power_of_two_matches_rational_rounding(values, frac_in, frac_out, mode):
    from fractions import Fraction

    from tests.reference import overflow_int, round_rational

    fmt = QFormat(16, 16 - frac_out)
    got, _ = avg_pool2d(np.array(values).reshape(1, 1, 1, 3), frac_in, kernel=(1, 3), fmt=fmt,
                        rounding=mode)
    exact = Fraction(sum(values), 3) * Fraction(2) ** (frac_out - frac_in)
    assert got.item() == overflow_int(round_rational(exact, mode), 16, True, "sat")[0]


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_named():
    act = QFormat(8, 2)
    dp = Datapath(act, act)
    x = np.zeros((1, 2, 5, 5), np.int64)
    w = np.zeros((3, 2, 3, 3), np.int64)
    with pytest.raises(ShapeError, match="expect 3 input channels, x has 2"):
        conv2d(x, np.zeros((3, 3, 3, 3), np.int64), None, dp)
    with pytest.raises(ShapeError, match="x must have 4 dimensions"):
        conv2d(x[0], w, None, dp)
    with pytest.raises(ShapeError, match="does not fit"):
        conv2d(x, np.zeros((3, 2, 7, 7), np.int64), None, dp)
    with pytest.raises(ShapeError, match=r"bias must have shape \(3,\)"):
        conv2d(x, w, np.zeros(2, np.int64), dp)
    with pytest.raises(ShapeError, match="stride"):
        conv2d(x, w, None, dp, stride=0)
    with pytest.raises(RangeError, match="x: code 200"):
        conv2d(x + 200, w, None, dp)
    with pytest.raises(ShapeError, match="weights expect 4 inputs, x has 3"):
        linear(np.zeros((2, 3), np.int64), np.zeros((5, 4), np.int64), None, dp)
    with pytest.raises(RangeError, match="integer codes"):
        linear(np.zeros((2, 3)), np.zeros((5, 3), np.int64), None, dp)


def test_linear_takes_any_integer_codes_and_names_bad_ones():
    """The float32 linear path checks and casts the codes in one pass: every integer dtype and
    memory order gives the int64 result, and a code out of range is named with its index."""
    act = QFormat(8, 2)
    dp = Datapath(act, act)
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, (7, 9))
    w = rng.integers(-128, 128, (4, 9))
    want, _ = linear(x, w, None, dp)
    for codes in (x.astype(np.int8), x.astype(np.int32), np.asfortranarray(x)):
        got, _ = linear(codes, w, None, dp)
        np.testing.assert_array_equal(got, want)
    bad = x.copy()
    bad[5, 2] = -129
    for codes in (bad, bad.astype(np.int16)):
        with pytest.raises(RangeError, match=r"x: code -129 at index \(5, 2\)"):
            linear(codes, w, None, dp)
    bad[5, 2], bad[6, 8] = 0, 128
    with pytest.raises(RangeError, match=r"x: code 128 at index \(6, 8\)"):
        linear(bad.astype(np.int16), w, None, dp)
    unsigned = QFormat(8, 2, signed=False)
    got, _ = linear(np.abs(x).astype(np.uint8), np.abs(w), None, Datapath(unsigned, unsigned))
    ref, _ = linear(np.abs(x), np.abs(w), None, Datapath(unsigned, unsigned))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
@pytest.mark.parametrize("acc", [{}, {"acc_bits": 17, "acc_mode": "per_mac"},
                                 {"acc_bits": 17, "acc_mode": "per_mac", "acc_overflow": "wrap"}])
def test_narrow_codes_in_and_out_match_int64(kernel, acc):
    """Codes in any integer dtype give the int64 codes' result bit for bit, on every kernel,
    and come back in the dtype asked for (big enough to show saturation: random 8-bit codes
    overflow a 17-bit register)."""
    fmt = QFormat(8, 2)
    dp = Datapath(fmt, fmt, kernel=kernel, **acc)
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (5, 3, 8, 8))
    w = rng.integers(-128, 128, (6, 3, 3, 3)) * (rng.random((6, 3, 3, 3)) < 0.6)
    b = rng.integers(-512, 512, 6)
    want, want_counters = conv2d(x, w, b, dp, stride=(1, 2), padding=1)
    assert want_counters.acc_overflows > 0 or not acc
    xl = x.reshape(5, -1)
    wl = rng.integers(-128, 128, (70, xl.shape[1]))
    want_l, want_l_counters = linear(xl, wl, None, dp)
    for dtype in (np.int8, np.int16, np.int32):
        got, counters = conv2d(x.astype(dtype), w, b, dp, stride=(1, 2), padding=1,
                               out_dtype=np.int8)
        assert got.dtype == np.int8 and counters == want_counters
        np.testing.assert_array_equal(got, want)
        got, counters = linear(xl.astype(dtype), wl, None, dp, out_dtype=np.int16)
        assert got.dtype == np.int16 and counters == want_l_counters
        np.testing.assert_array_equal(got, want_l)
    unsigned = QFormat(8, 2, signed=False)
    udp = Datapath(unsigned, fmt, out_fmt=unsigned, kernel=kernel, **acc)
    xu = rng.integers(0, 256, (5, 3, 8, 8))
    want_u, _ = conv2d(xu, w, None, udp)
    got_u, _ = conv2d(xu.astype(np.uint8), w, None, udp, out_dtype=code_dtype(unsigned))
    assert got_u.dtype == np.int16
    np.testing.assert_array_equal(got_u, want_u)


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
@pytest.mark.parametrize("acc", [{"acc_bits": 16}, {"acc_bits": 16, "acc_mode": "per_mac"}])
@pytest.mark.parametrize(("batch", "out_fmt", "by_words"), [
    (8, QFormat(8, 3), True), (16, QFormat(12, 2), True), (13, QFormat(8, 3), False)])
def test_batch_last_codes_transposed_by_words_match_reference(kernel, acc, batch, out_fmt,
                                                              by_words, monkeypatch):
    """Batch-last sums (small convolution outputs, the zero-skipping kernel, linear layers over
    the batch) are requantised in their own order and transposed as codes; batches that fill
    whole 8-byte words of int8 / int16 codes move a word at a time. Both against the plain
    Python reference, with final-accumulator or per-MAC overflow and output saturation."""
    from fxsim.kernels import dense

    calls = []
    words = dense._transpose_words
    monkeypatch.setattr(dense, "_transpose_words", lambda *a: calls.append(1) or words(*a))
    monkeypatch.setattr(int8, "AVAILABLE", False)  # the float kernels' batch-last sums
    fmt = QFormat(8, 2)
    dp = Datapath(fmt, fmt, out_fmt=out_fmt, kernel=kernel, rounding="rnd_conv", **acc)
    rng = np.random.default_rng(batch)
    x = random_codes(rng, fmt, (batch, 2, 6, 6))
    w = random_codes(rng, fmt, (4, 2, 3, 3), zero_fraction=0.3)  # 4 x 36 rows of codes
    b = random_codes(rng, dp.bias_format, (4,)) >> 3
    counters = check_conv(dp, x, w, b, stride=1, padding=1)
    assert counters.acc_overflows > 0 and counters.out_saturations > 0
    assert bool(calls) == by_words
    calls.clear()
    # more outputs than dense.FEW_OUTPUTS: the fused few-output kernels transpose nothing
    wl = random_codes(rng, fmt, (32, 72), zero_fraction=0.3)
    bl = random_codes(rng, dp.bias_format, (32,)) >> 3
    lin = check_linear(dp, x.reshape(batch, -1)[:, :72], wl, bl)
    assert lin.acc_overflows > 0 and lin.out_saturations > 0
    assert bool(calls) == (by_words and (kernel == "sparse" or "acc_mode" in acc))


@settings(max_examples=120, deadline=None)
@given(dp=datapaths(max_bits=16), kernel=st.sampled_from(["dense", "sparse"]),
       seed=st.integers(0, 2**32 - 1), batch=st.sampled_from([1, 3, 4, 5, 31, 32, 33, 70]),
       fan_in=st.integers(1, 40), n_out=st.sampled_from([1, 5, 24, 25]),
       zeros=st.sampled_from([0, 0.5, 0.95]))
def test_few_output_linear_kernels_match_reference(dp, kernel, seed, batch, fan_in, n_out, zeros):
    """Linear layers with at most dense.FEW_OUTPUTS outputs run fused (cast, exact sums and
    requantisation in one pass; images in blocks of 4 dense, 32 zero-skipping, so batches on
    both sides of a block) wherever the bound and the rounding allow: bit for bit and counter
    for counter the Python reference, and the kernel really ran where it applies."""
    from fxsim.datapath import _fast_requant, prepare
    from fxsim.kernels import dense, sparse

    calls = []
    fused = {module: module.linear_few_outputs for module in (dense, sparse)}
    dp = Datapath(dp.act_fmt, dp.weight_fmt, out_fmt=dp.out_fmt, acc_bits=dp.acc_bits,
                  acc_overflow=dp.acc_overflow, acc_mode=dp.acc_mode, rounding=dp.rounding,
                  overflow=dp.overflow, kernel=kernel)
    rng = np.random.default_rng(seed)
    x = random_codes(rng, dp.act_fmt, (batch, fan_in))
    w = random_codes(rng, dp.weight_fmt, (n_out, fan_in), zeros)
    b = random_codes(rng, dp.bias_format, (n_out,)) >> rng.integers(0, 60)
    with pytest.MonkeyPatch.context() as patch:
        for module, kernel_fn in fused.items():
            patch.setattr(module, "linear_few_outputs",
                          lambda *a, m=module, f=kernel_fn: calls.append(m) or f(*a))
        counters = check_linear(dp, x, w, b)
    prepared = prepare(w, b, dp)
    fmt = dp.act_fmt
    plan = prepared.plan(max(-fmt.min_code, fmt.max_code))
    acc_omode = dp.acc_overflow.code if dp.acc_bits is not None else -1
    applies = (n_out <= dense.FEW_OUTPUTS and plan.path in ("float32", "float64")
               and _fast_requant(acc_omode, dp.acc_frac_bits - dp.output_fmt.frac_bits, plan,
                                 dp) is not None)
    assert bool(calls) == applies
    # zero-skipping: at most a quarter of the weights zero, all outputs run as one dense block
    skips = np.count_nonzero(w) * 4 < 3 * w.size
    assert set(calls) <= {sparse if kernel == "sparse" and skips else dense}
    if applies and kernel == "sparse":
        assert counters.executed_macs == np.count_nonzero(w) * batch
        assert counters.executed_macs + counters.skipped_macs == counters.macs


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
@pytest.mark.parametrize("stride", [1, 2, 3, (1, 2)])
def test_one_pixel_images_with_any_stride(kernel, stride):
    """A 1 x 1 image (say after global pooling) with a stride above 1: the input layout once
    took a linear layer's shortcut here and ignored the column stride (wrong codes at stride 2,
    a crash at 3)."""
    fmt = QFormat(8, 2)
    dp = Datapath(fmt, fmt, kernel=kernel)
    rng = np.random.default_rng(1)
    x = random_codes(rng, fmt, (8, 3, 1, 1))
    w = random_codes(rng, fmt, (4, 3, 1, 1))
    b = random_codes(rng, dp.bias_format, (4,)) >> 4
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    y, _ = conv2d(x, w, b, dp, stride=stride)
    ref, _ = conv2d_ref(x.tolist(), w.tolist(), aligned_bias(b, dp), as_ref(dp), sh, 0)
    assert sw == sh or y.shape == (8, 4, 1, 1)  # one output column whatever the stride
    assert y.tolist() == ref


def test_out_dtype_must_hold_the_output_format():
    fmt = QFormat(8, 2)
    wide = Datapath(fmt, fmt, out_fmt=QFormat(12, 4))
    x = np.zeros((2, 5), np.int8)
    w = np.ones((3, 5), np.int8)
    with pytest.raises(FormatError, match="out_dtype int8 cannot hold the output format"):
        linear(x, w, None, wide, out_dtype=np.int8)
    with pytest.raises(FormatError, match="out_dtype float32 cannot hold"):
        linear(x, w, None, wide, out_dtype=np.float32)
    with pytest.raises(FormatError, match="out_dtype uint16 cannot hold"):
        linear(x, w, None, wide, out_dtype=np.uint16)
    with pytest.raises(FormatError, match="out_dtype must be a numpy integer dtype"):
        conv2d(x.reshape(2, 5, 1, 1), w.reshape(3, 5, 1, 1), None, wide, out_dtype="no-such")
    y, _ = linear(x, w, None, wide, out_dtype=np.int16)
    assert y.dtype == np.int16


def test_bad_datapaths_are_named():
    act = QFormat(8, 2)
    with pytest.raises(DatapathError, match=r"acc_bits 12 cannot hold .* \(needs 16 bits\)"):
        Datapath(act, act, acc_bits=12)
    with pytest.raises(DatapathError, match="between 2 and 64"):
        Datapath(act, act, acc_bits=65)
    with pytest.raises(FormatError, match="'sat' or 'wrap'"):
        Datapath(act, act, acc_overflow="sat_zero")
    with pytest.raises(FormatError, match="acc_mode"):
        Datapath(act, act, acc_mode="sometimes")
    with pytest.raises(DatapathError, match="more than the accumulator"):
        Datapath(act, act, bias_fmt=QFormat(16, 0))
    with pytest.raises(FormatError, match="unknown Datapath keys: accbits"):
        Datapath.from_dict({"act_fmt": act.to_dict(), "weight_fmt": act.to_dict(), "accbits": 3})


def test_datapath_dict_round_trip():
    dp = Datapath(QFormat(8, 2), QFormat(6, 1), out_fmt=QFormat(10, 4), acc_bits=24,
                  acc_mode="per_mac", acc_overflow="wrap", rounding="trn", overflow="sat_sym")
    assert Datapath.from_dict(dp.to_dict()) == dp


def test_sums_beyond_int64_are_refused_not_wrong():
    big = QFormat(32, 3)  # a product needs 64 bits
    dp = Datapath(big, big, out_fmt=QFormat(16, 8))
    x = np.full((1, 16), big.max_code)
    w = np.full((1, 16), big.max_code)
    with pytest.raises(DatapathError, match="more than 64 bits"):
        linear(x, w, None, dp)
    # a per_mac register of at most 64 bits is always simulated exactly
    narrow = Datapath(big, big, out_fmt=QFormat(16, 8), acc_bits=64, acc_mode="per_mac")
    y, c = linear(x, w, None, narrow)
    # the register saturates at 2^63 - 1 (value 2^63 / 2^58 = 32, code 32 * 2^8) from MAC 3 on
    assert y.tolist() == [[8192]] and c.acc_overflows == 14
