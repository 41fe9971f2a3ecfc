import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsim.kernels import batchnorm


def activations(shape, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3 + 1).astype(dtype)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_passes_match_the_numpy_formulas(n, c, h, w, seed):
    x = activations((n, c, h, w), seed)
    dy = activations((n, c, h, w), seed + 1)
    mean, var = batchnorm.statistics(x)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, x.var(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)

    inv = 1.0 / np.sqrt(var + 1e-3)
    gamma, beta = np.linspace(-1.5, 2, c), np.linspace(0.3, -0.4, c)
    y, xhat = batchnorm.normalise(x, mean, inv, gamma, beta)
    expected_xhat = (x - mean[:, None, None]) * inv[:, None, None]
    assert np.array_equal(xhat, expected_xhat)  # the same operations in the same order
    assert np.array_equal(y, expected_xhat * gamma[:, None, None] + beta[:, None, None])

    sum_dy, sum_dy_xhat = batchnorm.gradient_sums(dy, xhat)
    np.testing.assert_allclose(sum_dy, dy.sum(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sum_dy_xhat, (dy * xhat).sum(axis=(0, 2, 3)), rtol=1e-12,
                               atol=1e-12)

    scale, m, mh = gamma * inv, sum_dy / 7, sum_dy_xhat / 5
    dx = batchnorm.input_gradient(dy, xhat, scale, m, mh)
    expected = scale[:, None, None] * (dy - m[:, None, None] - xhat * mh[:, None, None])
    assert np.array_equal(dx, expected)


def test_float32_keeps_its_dtype_and_numpys_bits():
    x = activations((3, 4, 5, 6), 0, np.float32)
    mean, var = batchnorm.statistics(x)
    assert mean.dtype == var.dtype == np.float64
    mean32, inv32 = mean.astype(np.float32), (1.0 / np.sqrt(var + 1e-3)).astype(np.float32)
    gamma, beta = np.ones(4, np.float32) * 1.5, np.full(4, 0.25, np.float32)
    y, xhat = batchnorm.normalise(x, mean32, inv32, gamma, beta)
    assert y.dtype == xhat.dtype == np.float32
    expected = (x - mean32[:, None, None]) * inv32[:, None, None]
    assert np.array_equal(xhat, expected)
    assert np.array_equal(y, expected * gamma[:, None, None] + beta[:, None, None])


@pytest.mark.parametrize("threads", [1, 2])
def test_same_bits_whatever_the_thread_count(threads):
    x = activations((8, 6, 9, 9), 3, np.float32)
    dy = activations((8, 6, 9, 9), 4, np.float32)
    reference = _all_passes(x, dy)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        again = _all_passes(x, dy)
    finally:
        numba.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(reference, again, strict=True))


def _all_passes(x, dy):
    mean, var = batchnorm.statistics(x)
    inv = 1.0 / np.sqrt(var + 1e-3)
    y, xhat = batchnorm.normalise(x, mean, inv, np.ones(6), np.zeros(6))
    sums = batchnorm.gradient_sums(dy, xhat)
    dx = batchnorm.input_gradient(dy, xhat, inv, sums[0] / 10, sums[1] / 10)
    return mean, var, y, xhat, *sums, dx
