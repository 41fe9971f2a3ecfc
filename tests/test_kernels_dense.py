import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from fxsim.kernels import dense

# half the sides whole words of 1-byte codes, so that the word path runs often
SIDES = st.one_of(st.integers(1, 40), st.integers(1, 5).map(lambda k: 8 * k))


@settings(max_examples=200, deadline=None)
@given(rows=SIDES, cols=SIDES,
       dtype=st.sampled_from([np.int8, np.uint8, np.int16, np.int32, np.int64, np.float32]),
       into=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_transpose2d_is_the_transpose(rows, cols, dtype, into, seed):
    """Every shape, word-aligned (1- and 2-byte codes move 8 bytes at a time) or not, into a
    new array or a given one; extreme codes included, so no byte leaks into its neighbour."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    a = rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), (rows, cols),
                     endpoint=True).astype(dtype)
    a.flat[rng.integers(a.size)] = info.min
    a.flat[rng.integers(a.size)] = info.max
    out = np.full((cols, rows), 7, dtype) if into else None
    got = dense.transpose2d(a, out=out)
    assert got.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, a.T)
    if into:
        assert got is out
    cast = dense.transpose2d(a[:, ::-1], np.float64)  # a cast, from a strided view
    np.testing.assert_array_equal(cast, a[:, ::-1].T.astype(np.float64))


@settings(max_examples=50, deadline=None)
@given(j=st.integers(1, 6), n=st.integers(1, 5), p=st.integers(1, 40), bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**32 - 1))
def test_channels_first_moves_rows_and_adds_the_bias(j, n, p, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((j, n, p)).astype(dtype)
    b = rng.standard_normal(j).astype(dtype) if bias else None
    got = dense.channels_first(y, b)
    assert got.dtype == dtype and got.flags.c_contiguous and got.shape == (n, j, p)
    expected = y.transpose(1, 0, 2) + (b[None, :, None] if bias else dtype(0))
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=100, deadline=None)
@given(batch=st.sampled_from([1, 3, 4, 8, 16]), chans=st.integers(1, 3), h=st.integers(1, 6),
       w=st.integers(1, 9), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       stride_w=st.integers(1, 3), dtype=st.sampled_from([np.int8, np.int16, np.int64]),
       kept=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_layout_input_puts_every_pixel_in_its_row(batch, chans, h, w, padding, stride_w,
                                                   dtype, kept, seed):
    """Narrow codes go through a word-at-a-time transpose when the batch and the image fill
    whole words, and are cast to float32 lanes or kept as they are (``kept``: the int8 inputs
    of the zero-skipping kernel at low density); every path must give the documented layout:
    row ((c * Hp + iy) * sw + ix % sw) * Wq + ix // sw holds padded pixel (c, iy, ix) of every
    image, zeros in the padding."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (batch, chans, h, w)).astype(dtype)
    ph, pw = padding
    store = dtype if kept else np.float32
    got = dense.layout_input(x, padding, store, stride_w)
    assert got.dtype == store
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))).astype(store)
    hp, wp = h + 2 * ph, w + 2 * pw
    wq = dense.phase_width(wp, stride_w)
    assert got.shape == (chans * hp * stride_w * wq, batch)
    for c in range(chans):
        for iy in range(hp):
            for ix in range(stride_w * wq):
                row = got[((c * hp + iy) * stride_w + ix % stride_w) * wq + ix // stride_w]
                want = padded[:, c, iy, ix] if ix < wp else 0
                np.testing.assert_array_equal(row, want)


@njit
def _lanes_and_row(lanes, bias, rq, wide_rq, out_lanes, out_row):
    """requantise_lanes with ``bias`` (one for every lane, or an array of one per lane), and
    the int64 row kernel on the same biased sums."""
    wide = np.empty(lanes.size, np.int64)
    got = dense.requantise_lanes(lanes, bias, rq, wide, out_lanes.view(np.uint8))
    acc = np.empty(lanes.size, np.int64)
    for t in range(lanes.size):
        acc[t] = np.int64(lanes[t]) + np.int64(dense.bias_at(bias, t))
    want = dense.requantise_row(acc, wide_rq, out_row.view(np.uint8))
    return got, want


@settings(max_examples=150, deadline=None)
@given(rmode=st.integers(0, 6), omode=st.sampled_from([0, 3]), shift=st.integers(1, 12),
       out_bits=st.integers(2, 16), lane_bits=st.integers(2, 24),
       dtype=st.sampled_from([np.float32, np.int32, np.int64]), seed=st.integers(0, 2**32 - 1))
def test_int32_requantisation_matches_the_int64_one(rmode, omode, shift, out_bits, lane_bits,
                                                    dtype, seed):
    """The int32 saturating kernel (no final accumulator, every value and offset below 2^31)
    gives the int64 kernel's codes and counters for every deterministic rounding mode."""
    rng = np.random.default_rng(seed)
    lo, hi = -(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1
    lanes = rng.integers(-(1 << lane_bits), 1 << lane_bits, 300).astype(dtype)
    lanes[:2] = [-(1 << lane_bits), (1 << lane_bits) - 1]  # the bound itself
    bias = int(rng.integers(-(1 << 20), 1 << 20))
    # exact ties (odd multiples of half a step after the bias): where rounding modes differ
    ties = ((rng.integers(-40, 40, 60) * 2 + 1) << (shift - 1)) - bias
    lanes[2:62] = np.clip(ties, -(1 << lane_bits), (1 << lane_bits) - 1)
    bound = (1 << lane_bits) + abs(bias)
    rq = dense.fast_requant_args(rmode, shift, lo, hi, out_bits, True, omode, 0, -1, bound)
    assert rq[11] == 1
    wide_rq = (*rq[:11], 0)
    out_lanes = np.empty(lanes.size, np.int16)
    out_row = np.empty(lanes.size, np.int16)
    got, want = _lanes_and_row(lanes, bias, rq, wide_rq, out_lanes, out_row)
    assert got == want
    np.testing.assert_array_equal(out_lanes, out_row)
    # one bias per lane, int32 into the int32 kernel, int64 into the wide one: each lane's own
    # bias, ties included (the same sums + bias as above, split differently between the two)
    biases = rng.integers(-(1 << 20), 1 << 20, lanes.size)
    lanes = (lanes.astype(np.int64) + bias - biases).clip(-(1 << lane_bits),
                                                          (1 << lane_bits) - 1).astype(dtype)
    for kernel_rq, bias_dtype in ((rq, np.int32), (wide_rq, np.int64)):
        got, want = _lanes_and_row(lanes, biases.astype(bias_dtype), kernel_rq, wide_rq,
                                   out_lanes, out_row)
        assert got == want
        np.testing.assert_array_equal(out_lanes, out_row)


def test_int32_requantisation_only_where_it_is_exact():
    args = dict(rmode=6, shift=4, lo=-128, hi=127, bits=8, signed=True)

    def narrow(omode=0, acc_bits=0, acc_omode=-1, acc_bound=1 << 20):
        return dense.fast_requant_args(**args, omode=omode, acc_bits=acc_bits,
                                       acc_omode=acc_omode, acc_bound=acc_bound)[11]

    assert narrow() == 1 and narrow(omode=3) == 1
    assert narrow(acc_bound=(1 << 31) - 17) == 1 and narrow(acc_bound=(1 << 31) - 16) == 0
    assert narrow(omode=1) == 0 and narrow(omode=2) == 0  # wrap, sat_zero
    assert narrow(acc_bits=24, acc_omode=0) == 0  # a final accumulator to overflow first


def test_unsaturated_gradient_is_the_masked_gradient():
    """The STE's one-pass masked gradient equals numpy's ``where`` bit for bit: zero (+0.0)
    where the output sits at either end of its format, dy elsewhere (NaN included), the ends
    compared in the output's dtype, as numpy compares a Python float with an array; a shape
    mismatch is refused."""
    import pytest

    from fxsim.errors import ShapeError

    rng = np.random.default_rng(3)
    lo, hi = -2.0, 1.984375  # fix<8,2>
    for y_dtype, dy_dtype in ((np.float32, np.float32), (np.float64, np.float32),
                              (np.float64, np.float64)):
        y = rng.choice(np.array([lo, hi, 0.5, -0.25, np.nan]), (3, 4, 5, 6)).astype(y_dtype)
        dy = rng.standard_normal(y.shape).astype(dy_dtype)
        dy[0, 0, 0, :3] = [np.nan, -0.0, -1.5]
        got = dense.unsaturated_gradient(dy, y, lo, hi)
        want = np.where((y == lo) | (y == hi), 0, dy).astype(dy.dtype)
        assert got.dtype == want.dtype
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))  # bits, -0.0 and NaN
        assert ((y == lo) | (y == hi)).any() and not np.array_equal(got, dy, equal_nan=True)
    # a bound a float32 output cannot hold exactly: compared as numpy compares it, rounded
    y = np.full(4, np.float32(0.1))
    ones = np.ones(4, np.float32)
    assert dense.unsaturated_gradient(ones, y, -1.0, 0.1).tolist() == (
        np.where(y == 0.1, 0, ones).tolist())
    with pytest.raises(ShapeError, match="gradient of shape"):
        dense.unsaturated_gradient(ones, y[:3], lo, hi)


@pytest.mark.parametrize("k", [2, 3])
def test_maxpool_takes_the_first_maximum_and_routes_its_gradient(k):
    """Small integers make ties common (as ReLU's zeros do): the first maximum in row-major
    order wins, as numpy's argmax picks it; the gradient goes there and nowhere else."""
    rng = np.random.default_rng(k)
    n, c, oh, ow = 3, 4, 5, 7
    x = rng.integers(-2, 3, (n, c, oh * k, ow * k)).astype(np.float32)
    y, arg = dense.maxpool_forward(x, k)
    windows = x.reshape(n, c, oh, k, ow, k).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, oh, ow, -1)
    np.testing.assert_array_equal(y, windows.max(axis=-1))
    np.testing.assert_array_equal(arg, windows.argmax(axis=-1))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = dense.maxpool_backward(dy, arg, k)
    one_hot = np.arange(k * k) == windows.argmax(axis=-1)[..., None]
    expected = (one_hot * dy[..., None]).reshape(n, c, oh, ow, k, k).transpose(0, 1, 2, 4, 3, 5)
    np.testing.assert_array_equal(dx, expected.reshape(x.shape))
