"""Batch normalisation's passes over float activations (N, C, H, W), per channel.

numpy took about ten passes over the data for a training step's forward (mean, variance,
then a temporary per operator) and as many for the backward; these take three (statistics,
then the normalisation) and two (gradient sums, then the input gradient). On 2 cores, CifarNet's
conv1 output at batch 64 ((64, 64, 30, 30) float32): forward 9.5-9.9 -> 2.0-2.3 ms, backward
10.4-10.7 -> 2.3-2.6 ms; the whole CifarNet training step 590-689 -> 526-603 ms (two
alternated runs each). Channel statistics and gradient sums accumulate in float64, a
channel on one thread in a fixed order: the same bits whatever the number of threads. The
elementwise passes do the arithmetic numpy did, in the same order and precision (no fused
multiply-add), so given the same statistics they give the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def _as_channels(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> a C-contiguous (N, C, H * W) view or copy."""
    a = np.ascontiguousarray(a)
    return a.reshape(a.shape[0], a.shape[1], int(np.prod(a.shape[2:])))


# "reassoc" lets a channel's sum vectorise (float64 lanes); the order it then takes is fixed by
# the compiled loop, not by the data or the threads.
@njit(cache=True, parallel=True, fastmath={"reassoc"})
def _statistics(x, mean, var):
    n, channels, size = x.shape
    count = n * size
    for c in prange(channels):
        total = 0.0
        for i in range(n):
            row = x[i, c]
            for k in range(size):
                total += np.float64(row[k])
        m = total / count
        squares = 0.0
        for i in range(n):
            row = x[i, c]
            for k in range(size):
                d = np.float64(row[k]) - m
                squares += d * d
        mean[c] = m
        var[c] = squares / count


def statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (biased) variance of ``x`` (N, C, H, W) over N, H and W, as
    float64 (C,) arrays: two passes, the variance about the mean."""
    x3 = _as_channels(x)
    mean = np.empty(x3.shape[1])
    var = np.empty(x3.shape[1])
    _statistics(x3, mean, var)
    return mean, var


@njit(cache=True, parallel=True)
def _normalise(x, mean, inv, gamma, beta, xhat, y):
    n, channels, size = x.shape
    for r in prange(n * channels):
        i, c = r // channels, r % channels
        m, s, g, b = mean[c], inv[c], gamma[c], beta[c]
        src, h, out = x[i, c], xhat[i, c], y[i, c]
        for k in range(size):
            v = (src[k] - m) * s
            h[k] = v
            out[k] = v * g + b


def normalise(x: np.ndarray, mean, inv, gamma, beta) -> tuple[np.ndarray, np.ndarray]:
    """(y, xhat) with ``xhat = (x - mean) * inv`` and ``y = xhat * gamma + beta`` per channel
    (the (C,) vectors are cast to ``x``'s dtype), in one pass; both (N, C, H, W)."""
    x3 = _as_channels(x)
    dt = x3.dtype
    xhat = np.empty_like(x3)
    y = np.empty_like(x3)
    _normalise(x3, *(np.asarray(v, dt) for v in (mean, inv, gamma, beta)), xhat, y)
    return y.reshape(x.shape), xhat.reshape(x.shape)


@njit(cache=True, parallel=True, fastmath={"reassoc"})
def _gradient_sums(dy, xhat, sum_dy, sum_dy_xhat):
    n, channels, size = dy.shape
    for c in prange(channels):
        total = 0.0
        weighted = 0.0
        for i in range(n):
            d, h = dy[i, c], xhat[i, c]
            for k in range(size):
                g = np.float64(d[k])
                total += g
                weighted += g * np.float64(h[k])
        sum_dy[c] = total
        sum_dy_xhat[c] = weighted


def gradient_sums(dy: np.ndarray, xhat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel sums of ``dy`` and of ``dy * xhat`` (both (N, C, H, W)) as float64 (C,)
    arrays, in one pass: the gradients of beta and gamma."""
    sum_dy = np.empty(dy.shape[1])
    sum_dy_xhat = np.empty(dy.shape[1])
    _gradient_sums(_as_channels(dy), _as_channels(xhat), sum_dy, sum_dy_xhat)
    return sum_dy, sum_dy_xhat


@njit(cache=True, parallel=True)
def _input_gradient(dy, xhat, scale, mean_dy, mean_dy_xhat, dx):
    n, channels, size = dy.shape
    for r in prange(n * channels):
        i, c = r // channels, r % channels
        s, m, mh = scale[c], mean_dy[c], mean_dy_xhat[c]
        d, h, out = dy[i, c], xhat[i, c], dx[i, c]
        for k in range(size):
            out[k] = s * (d[k] - m - h[k] * mh)


def input_gradient(dy: np.ndarray, xhat: np.ndarray, scale, mean_dy, mean_dy_xhat) -> np.ndarray:
    """``scale * (dy - mean_dy - xhat * mean_dy_xhat)`` per channel (the (C,) vectors cast to
    ``dy``'s dtype), in one pass: batch normalisation's input gradient in training, with
    ``scale = gamma / std``."""
    dy3 = _as_channels(dy)
    dt = dy3.dtype
    dx = np.empty_like(dy3)
    _input_gradient(dy3, _as_channels(xhat).astype(dt, copy=False),
                    *(np.asarray(v, dt) for v in (scale, mean_dy, mean_dy_xhat)), dx)
    return dx.reshape(dy.shape)
