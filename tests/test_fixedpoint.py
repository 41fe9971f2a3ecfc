import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fxsim
from fxsim import FxsimError, Overflow, QFormat, Rounding, dequantize, quantize, requantize
from fxsim.errors import FormatError, RangeError
from fxsim.fixedpoint import paper_format, quantize_with_count, requantize_with_count
from tests.reference import quantize_ref, requantize_ref

DETERMINISTIC = [r.value for r in Rounding if r is not Rounding.STOCHASTIC]
OVERFLOWS = [o.value for o in Overflow]


@st.composite
def formats(draw, max_bits=64):
    signed = draw(st.booleans())
    bits = draw(st.integers(1, max_bits if signed else min(max_bits, 63)))
    int_bits = draw(st.integers(-8, bits + 8))
    return QFormat(bits, int_bits, signed)


# ---------------------------------------------------------------------------- QFormat


def test_qformat_examples_from_the_design():
    f = QFormat(4, 1)
    assert (f.frac_bits, f.min_code, f.max_code, f.step) == (3, -8, 7, 0.125)
    assert (f.min_value, f.max_value) == (-1.0, 0.875)
    g = QFormat(8, 2)
    assert (g.step, g.min_value, g.max_value) == (1 / 64, -2.0, 2 - 1 / 64)
    u = QFormat(8, 8, signed=False)
    assert (u.min_code, u.max_code) == (0, 255)
    assert QFormat(64, 1).min_code == -(2**63)
    assert QFormat(6, 10).frac_bits == -4 and QFormat(6, 10).step == 16.0


def test_paper_presets():
    assert paper_format(4) == QFormat(4, 1)
    assert paper_format(8) == QFormat(8, 2)
    for bits in (10, 12, 16, 20, 24, 32):
        assert paper_format(bits) == QFormat(bits, 4)
    with pytest.raises(FormatError, match="bitwidth"):
        paper_format(1)


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 0), "between 1 and 64"), ((65, 1), "between 1 and 64"), ((64, 1, False), "63"),
     ((8.0, 2), "integer"), ((8, "2"), "integer")],
)
def test_bad_formats_are_named(args, message):
    with pytest.raises(FormatError, match=message):
        QFormat(*args)


def test_format_dict_round_trip_and_modes_by_name():
    f = QFormat(12, 4, signed=False)
    assert QFormat.from_dict(f.to_dict()) == f
    assert Rounding.parse("AP_RND_CONV") is Rounding.RND_CONV
    assert Overflow.parse("Wrap") is Overflow.WRAP
    with pytest.raises(FormatError, match="rnd_conv"):
        Rounding.parse("nearest")
    with pytest.raises(FormatError, match="unknown QFormat keys: frac"):
        QFormat.from_dict({"bits": 8, "int_bits": 2, "frac": 6})


def test_public_api_is_exported():
    for name in ("QFormat", "Rounding", "Overflow", "quantize", "dequantize", "requantize",
                 "paper_format", "FxsimError"):
        assert hasattr(fxsim, name)


# ---------------------------------------------------------------------------- truth tables

# ap_fixed<4,2>: code = 4 * x. Inputs given as 4 * x, i.e. in code units: ties at .5,
# non-ties at .25/.75. Expected codes worked out by hand from the ap_fixed mode definitions.
CODE_UNITS = [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, -1.75, -0.25, 0.25, 1.25, -2.0, 3.0]
ROUNDING_TABLE = {
    "trn":         [-3, -2, -1, 0, 1, 2, -2, -1, 0, 1, -2, 3],
    "trn_zero":    [-2, -1, 0, 0, 1, 2, -1, 0, 0, 1, -2, 3],
    "rnd":         [-2, -1, 0, 1, 2, 3, -2, 0, 0, 1, -2, 3],
    "rnd_zero":    [-2, -1, 0, 0, 1, 2, -2, 0, 0, 1, -2, 3],
    "rnd_min_inf": [-3, -2, -1, 0, 1, 2, -2, 0, 0, 1, -2, 3],
    "rnd_inf":     [-3, -2, -1, 1, 2, 3, -2, 0, 0, 1, -2, 3],
    "rnd_conv":    [-2, -2, 0, 0, 2, 2, -2, 0, 0, 1, -2, 3],
}  # fmt: skip


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_rounding_truth_table_4bit(mode):
    x = np.array(CODE_UNITS) / 4
    assert quantize(x, QFormat(4, 2), mode).tolist() == ROUNDING_TABLE[mode]


# fix<4,4> holds integers in [-8, 7]; ufix<4,4> in [0, 15].
SIGNED_IN = [-20, -17, -9, -8, 7, 8, 9, 16, 19, 31]
UNSIGNED_IN = [-3, -1, 0, 15, 16, 21]
OVERFLOW_TABLE = {
    "sat":      ([-8, -8, -8, -8, 7, 7, 7, 7, 7, 7], [0, 0, 0, 15, 15, 15]),
    "wrap":     ([-4, -1, 7, -8, 7, -8, -7, 0, 3, -1], [13, 15, 0, 15, 0, 5]),
    "sat_zero": ([0, 0, 0, -8, 7, 0, 0, 0, 0, 0], [0, 0, 0, 15, 0, 0]),
    "sat_sym":  ([-7, -7, -7, -8, 7, 7, 7, 7, 7, 7], [0, 0, 0, 15, 15, 15]),
}  # fmt: skip


@pytest.mark.parametrize("mode", OVERFLOWS)
def test_overflow_truth_table_4bit(mode):
    signed, unsigned = OVERFLOW_TABLE[mode]
    got = quantize(np.array(SIGNED_IN, float), QFormat(4, 4), overflow=mode)
    assert got.tolist() == signed
    got_u = quantize(np.array(UNSIGNED_IN, float), QFormat(4, 4, signed=False), overflow=mode)
    assert got_u.tolist() == unsigned
    # integer input and requantize take the same path through the same table
    assert requantize(np.array(SIGNED_IN), 0, QFormat(4, 4), overflow=mode).tolist() == signed


def test_rounding_that_carries_into_overflow():
    # 1.9 * 4 = 7.6 rounds to 8, one past fix<4,2>'s max code 7
    assert quantize([1.9], QFormat(4, 2), "rnd_conv", "sat").tolist() == [7]
    assert quantize([1.9], QFormat(4, 2), "rnd_conv", "wrap").tolist() == [-8]
    assert quantize([1.9], QFormat(4, 2), "trn", "wrap").tolist() == [7]


def test_overflow_counts_and_infinities():
    codes, count = quantize_with_count([np.inf, -np.inf, 0.5, 100.0], QFormat(8, 2))
    assert codes.tolist() == [127, -128, 32, 127] and count == 3
    assert quantize([np.inf, -np.inf], QFormat(8, 2), overflow="wrap").tolist() == [127, -128]
    assert quantize([np.inf, -np.inf], QFormat(8, 2), overflow="sat_zero").tolist() == [0, 0]
    assert quantize([-np.inf], QFormat(8, 2), overflow="sat_sym").tolist() == [-127]


def test_nan_is_an_error_naming_where():
    with pytest.raises(RangeError, match=r"NaN.*\(1, 0\)"):
        quantize(np.array([[0.0, 1.0], [np.nan, 2.0]]), QFormat(8, 2))
    assert issubclass(RangeError, FxsimError)


def test_dequantize_checks_the_format():
    assert dequantize(np.array([-8, 7]), QFormat(4, 1)).tolist() == [-1.0, 0.875]
    with pytest.raises(RangeError, match="negative code in unsigned format -1"):
        dequantize(np.array([3, -1]), QFormat(4, 4, signed=False))
    with pytest.raises(RangeError, match=r"code 8 at index \(1,\)"):
        dequantize(np.array([0, 8]), QFormat(4, 1))


def test_shapes_are_kept_and_scalars_work():
    x = np.linspace(-3, 3, 24).reshape(2, 3, 4)
    assert quantize(x, QFormat(8, 3)).shape == (2, 3, 4)
    assert quantize(0.3, QFormat(8, 2)).shape == ()
    assert quantize(np.float32(0.3), QFormat(8, 2)) == round(0.3 * 64)


# ---------------------------------------------------------------------------- properties


finite_floats = st.floats(allow_nan=False, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=400, deadline=None)
@given(x=st.lists(finite_floats, min_size=1, max_size=6), fmt=formats(),
       rounding=st.sampled_from(DETERMINISTIC), overflow=st.sampled_from(OVERFLOWS))
def test_quantize_matches_python_reference(x, fmt, rounding, overflow):
    codes, count = quantize_with_count(np.array(x), fmt, rounding, overflow)
    expected = [quantize_ref(v, fmt.bits, fmt.int_bits, fmt.signed, rounding, overflow) for v in x]
    assert codes.tolist() == [c for c, _ in expected]
    assert count == sum(o for _, o in expected)


@settings(max_examples=600, deadline=None)
@given(k=st.one_of(st.integers(-(2**12), 2**12), st.integers(2**49, 2**53),
                   st.integers(-(2**53), -(2**49))),
       offset=st.sampled_from([0.0, 0.25, 0.5, 0.75]), nudge=st.sampled_from([-1, 0, 1]),
       fmt=formats(), rounding=st.sampled_from(DETERMINISTIC),
       overflow=st.sampled_from(OVERFLOWS), tiny=st.booleans())
def test_quantize_ties_and_the_float_fast_path_bounds(k, offset, nudge, fmt, rounding, overflow,
                                                      tiny):
    """Exact ties (k + 1/2 grid steps), their neighbours one ulp away, scaled values across the
    float fast path's bound (2^51) and, with ``tiny``, ones that underflow: the same codes as
    the Python reference."""
    x = math.ldexp(k + offset, -fmt.frac_bits - (1030 if tiny else 0))
    if nudge:
        x = math.nextafter(x, math.inf if nudge > 0 else -math.inf)
    assume(math.isfinite(x))
    codes, count = quantize_with_count(np.array([x, -x]), fmt, rounding, overflow)
    expected = [quantize_ref(v, fmt.bits, fmt.int_bits, fmt.signed, rounding, overflow)
                for v in (x, -x)]
    assert codes.tolist() == [c for c, _ in expected]
    assert count == sum(o for _, o in expected)


@settings(max_examples=400, deadline=None)
@given(codes=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=6),
       from_frac=st.integers(-80, 140), fmt=formats(),
       rounding=st.sampled_from(DETERMINISTIC), overflow=st.sampled_from(OVERFLOWS))
def test_requantize_matches_python_reference(codes, from_frac, fmt, rounding, overflow):
    got, count = requantize_with_count(np.array(codes, np.int64), from_frac, fmt, rounding,
                                       overflow)
    expected = [requantize_ref(c, from_frac, fmt.bits, fmt.int_bits, fmt.signed, rounding,
                               overflow) for c in codes]
    assert got.tolist() == [c for c, _ in expected]
    assert count == sum(o for _, o in expected)


@settings(max_examples=200, deadline=None)
@given(x=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=20), frac=st.integers(0, 20))
def test_rnd_conv_is_numpy_round(x, frac):
    fmt = QFormat(60, 60 - frac)
    x = np.array(x)
    assert np.array_equal(quantize(x, fmt, "rnd_conv"), np.round(np.ldexp(x, frac)).astype(int))


@settings(max_examples=200, deadline=None)
@given(fmt=formats(max_bits=40), rounding=st.sampled_from(DETERMINISTIC),
       overflow=st.sampled_from(OVERFLOWS), data=st.data())
def test_quantize_is_idempotent_on_grid_values(fmt, rounding, overflow, data):
    codes = np.array(data.draw(st.lists(st.integers(fmt.min_code, fmt.max_code), min_size=1)))
    values = dequantize(codes, fmt)
    assert np.array_equal(quantize(values, fmt, rounding, overflow), codes)


@settings(max_examples=200, deadline=None)
@given(x=st.lists(st.floats(-1e4, 1e4), min_size=2, max_size=30), fmt=formats(max_bits=24),
       rounding=st.sampled_from(DETERMINISTIC), overflow=st.sampled_from(["sat", "sat_sym"]))
def test_saturating_quantize_is_monotonic_and_bounded(x, fmt, rounding, overflow):
    x = np.sort(np.array(x))
    codes = quantize(x, fmt, rounding, overflow)
    assert codes.min() >= fmt.min_code and codes.max() <= fmt.max_code
    if overflow == "sat_sym" and fmt.signed and fmt.bits > 1:
        # as ap_fixed's AP_SAT_SYM (truth table above), only an overflow goes to -max_code: a
        # value that rounds to min_code without overflowing keeps it, below the saturated ones
        at_min = codes == fmt.min_code
        assert np.all(x[at_min] >= dequantize(np.array([fmt.min_code]), fmt)[0] - fmt.step)
        codes = np.maximum(codes, fmt.min_code + 1)
    assert np.all(np.diff(codes) >= 0)


@settings(max_examples=200, deadline=None)
@given(codes=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=20),
       bits=st.integers(2, 40), shift=st.integers(0, 8))
def test_wrap_is_modular(codes, bits, shift):
    fmt = QFormat(bits, bits)
    got = requantize(np.array(codes), -shift, fmt, overflow="wrap")
    for c, g in zip(codes, got.tolist(), strict=True):
        assert (g - (c << shift)) % 2**bits == 0
        assert fmt.min_code <= g <= fmt.max_code


# ---------------------------------------------------------------------------- stochastic


def test_stochastic_rounding_is_seeded_unbiased_and_neighbourly():
    fmt = QFormat(16, 8)
    x = np.full(200_000, 0.3 / 256 + 1.0)  # code 256.3
    a = quantize(x, fmt, "stochastic", seed=7)
    b = quantize(x, fmt, "stochastic", seed=7)
    assert np.array_equal(a, b)
    assert set(np.unique(a).tolist()) == {256, 257}
    assert abs(a.mean() - 256.3) < 0.005  # std of the mean ~0.001
    assert not np.array_equal(a, quantize(x, fmt, "stochastic", seed=8))
    on_grid = dequantize(np.arange(-50, 50), fmt)
    assert np.array_equal(quantize(on_grid, fmt, "stochastic"), np.arange(-50, 50))


@settings(max_examples=100, deadline=None)
@given(x=st.lists(st.floats(-100, 100), min_size=1, max_size=10), seed=st.integers(0, 99))
def test_stochastic_matches_reference_with_the_same_draws(x, seed):
    fmt = QFormat(20, 8)
    u = np.random.default_rng(seed).random(len(x))
    got = quantize(np.array(x), fmt, "stochastic", seed=seed)
    # with <= 53 significant bits below the cut the discarded fraction is exact in float64
    assume(all(math.frexp(v)[1] < 40 for v in x))
    expected = [quantize_ref(v, 20, 8, True, "stochastic", "sat", ui)[0]
                for v, ui in zip(x, u, strict=True)]
    assert got.tolist() == expected


def test_requantize_rejects_floats_and_huge_uint64():
    with pytest.raises(RangeError, match="integer codes"):
        requantize(np.array([1.5]), 2, QFormat(8, 2))
    with pytest.raises(RangeError, match="2\\^63"):
        requantize(np.array([2**64 - 1], np.uint64), 0, QFormat(8, 2))


EXTREMES = [-(2**63), -(2**63) + 1, -(2**62), -1, 0, 1, 2**62, 2**63 - 1]


@pytest.mark.parametrize("rounding", DETERMINISTIC)
@pytest.mark.parametrize("from_frac", [1, 2, 61, 62, 63, 64, 65, 66, 200, -1, -63, -64, -200])
def test_requantize_extreme_codes_and_shifts(rounding, from_frac):
    fmt = QFormat(8, 8)
    for overflow in ("sat", "wrap"):
        got = requantize(np.array(EXTREMES), from_frac, fmt, rounding, overflow).tolist()
        expected = [requantize_ref(c, from_frac, 8, 8, True, rounding, overflow)[0]
                    for c in EXTREMES]
        assert got == expected


@pytest.mark.parametrize(("bits", "int_bits", "signed", "dtype"), [
    (1, 1, True, np.int8), (8, 2, True, np.int8), (8, 8, False, np.int16),
    (7, 0, False, np.int8), (9, 3, True, np.int16), (16, 4, True, np.int16),
    (16, 4, False, np.int32), (17, 0, True, np.int32), (32, 8, True, np.int32),
    (31, 0, False, np.int32), (32, 0, False, np.int64), (33, 1, True, np.int64),
    (64, 4, True, np.int64), (63, 0, False, np.int64),
])  # fmt: skip
def test_code_dtype_is_the_narrowest_signed_dtype_holding_the_format(bits, int_bits, signed,
                                                                    dtype):
    from fxsim import code_dtype

    fmt = QFormat(bits, int_bits, signed)
    assert code_dtype(fmt) == np.dtype(dtype)
    info = np.iinfo(code_dtype(fmt))
    assert info.min <= fmt.min_code and fmt.max_code <= info.max


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.uint32])
def test_min_max_of_narrow_large_arrays(dtype):
    from fxsim.fixedpoint import min_max

    info = np.iinfo(dtype)
    size = 200_001
    codes = np.random.default_rng(7).integers(info.min // 2, info.max // 2, size).astype(dtype)
    # the extremes at the ends of the array and of the parallel chunks, and inside one
    for low_at, high_at in [(0, size - 1), (size - 1, 0), (size // 64, size // 64 - 1),
                            (99, 123_457)]:
        both = codes.copy()
        both[low_at], both[high_at] = info.min, info.max
        assert min_max(both) == (int(info.min), int(info.max))


@pytest.mark.parametrize("size", [1, 70_000, 1_000_003])
def test_min_max_matches_numpy_on_large_arrays(size):
    from fxsim.fixedpoint import check_codes, min_max

    rng = np.random.default_rng(size)
    codes = rng.integers(-1000, 1000, size)
    codes[rng.integers(size)] = -(2**40)
    codes[rng.integers(size)] = 2**41
    assert min_max(codes) == (int(codes.min()), int(codes.max()))
    assert min_max(codes.astype(np.int32)[::-1]) == (int(codes.astype(np.int32).min()),
                                                     int(codes.astype(np.int32).max()))
    with pytest.raises(RangeError, match="code 2199023255552"):
        check_codes(codes, QFormat(41, 41), "big")


@settings(max_examples=100, deadline=None)
@given(fmt=formats(max_bits=24), data=st.data())
def test_codes_on_grid_and_values_are_exact(fmt, data):
    from fxsim.fixedpoint import code_dtype, codes_on_grid, values

    codes = np.array(data.draw(st.lists(st.integers(fmt.min_code, fmt.max_code), min_size=1)))
    grid = values(codes, fmt, np.float32)
    assert np.array_equal(grid.astype(np.float64), dequantize(codes, fmt))
    assert np.array_equal(codes_on_grid(grid, fmt), codes)
    narrow = codes_on_grid(grid, fmt, code_dtype(fmt))
    assert narrow.dtype == code_dtype(fmt) and np.array_equal(narrow, codes)
    assert codes_on_grid(grid.astype(np.float64), fmt).tolist() == codes.tolist()
    off = grid.astype(np.float64) + fmt.step / 4
    assert codes_on_grid(off, fmt) is None  # off the grid: rounding is needed
    assert codes_on_grid(np.array([fmt.max_value + fmt.step]), fmt) is None  # out of range
    assert codes_on_grid(np.array([np.nan, 1e300]), fmt) is None
