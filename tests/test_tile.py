"""The per-MAC register helpers of fxsim.kernels.tile on each lane dtype."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from fxsim.kernels.tile import lane_range, sat_add, wrap_add


@njit
def _adds(acc, products, lo, hi, mask, wrap):
    out = np.empty_like(acc)
    hits = np.empty(acc.size, np.int32)
    for t in range(acc.size):
        if wrap:
            out[t], hits[t] = wrap_add(acc[t], products[t], lo, mask)
        else:
            out[t], hits[t] = sat_add(acc[t], products[t], lo, hi)
    return out, hits


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 22), seed=st.integers(0, 2**32 - 1), wrap=st.booleans())
def test_register_adds_agree_in_every_lane_dtype(bits, seed, wrap):
    # float32 lanes hold a register only while register + product stays below 2^24: there the
    # saturating and wrapping adds (and the event flags) must equal the integer ones exactly
    rng = np.random.default_rng(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    acc = rng.integers(lo, hi, 500, endpoint=True)
    products = rng.integers(-(1 << bits), 1 << bits, 500, endpoint=True)
    want = None
    for dtype in (np.int64, np.int32, np.float32):
        lanes = [dtype(v) for v in (lo, hi, (1 << bits) - 1)]
        got, hits = _adds(acc.astype(dtype), products.astype(dtype), *lanes, wrap)
        s = acc + products
        expect = ((s - lo) & ((1 << bits) - 1)) + lo if wrap else np.clip(s, lo, hi)
        np.testing.assert_array_equal(got.astype(np.int64), expect)
        np.testing.assert_array_equal(hits, (expect != s).astype(np.int32))
        if want is not None:
            np.testing.assert_array_equal(got.astype(np.int64), want)
        want = got.astype(np.int64)


def test_lane_range_is_exact_for_integer_lanes():
    acc = np.array([3, -7, 2**23 - 1, -(2**23), 0])
    for dtype in (np.int32, np.int64, np.float32):
        assert lane_range(acc.astype(dtype)) == (2**23 - 1, -(2**23))
