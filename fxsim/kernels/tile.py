"""One output channel's stored weights applied to a tile of accumulators.

A tile is a vector of lanes (output positions x images) of one output channel; its stored
(nonzero) weights come in canonical order. :func:`add_products` adds exact products,
:func:`per_mac_products` runs the per-MAC register that saturates or wraps after every
multiply-accumulate. Shared by the dense per-MAC and the zero-skipping kernels, which differ
only in where a weight's inputs sit: ``xflat[offsets[idx] * mult + src :][:width]``.

Fast path, exact by a bound: a group of :data:`GROUP` consecutive weights moves any register by
at most ``bound = x_max_abs * sum |w|`` over the group, at every prefix of it. If every lane of
the tile lies in ``[lo + bound, hi - bound]`` before the group, no MAC of the group can leave
the register, so saturating (or wrapping) after each MAC gives exactly the plain sum and no
overflow events: the group runs as plain multiply-adds. Otherwise it runs MAC by MAC with the
overflow check. The tile's range is tracked conservatively (widened by each fast group's bound)
and measured again only when the conservative range no longer proves a group safe.

Numba's on-disk cache checks only the calling kernel's own source file: after editing this
module in a development checkout, delete ``fxsim/kernels/__pycache__`` so that the kernels in
dense.py and sparse.py are compiled again with the new code.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Stored weights per fast-path group: larger groups amortise the range check over more MACs,
# smaller ones need less headroom in the register (the bound grows with the group).
GROUP = 8


@njit(cache=True, inline="always")
def sat_add(acc, product, lo, hi):
    """Saturating register add: (new register value, 1 if it overflowed else 0) as int32."""
    s = acc + product
    c = min(max(s, lo), hi)
    return c, np.int32(c != s)


@njit(cache=True, inline="always")
def wrap_add(acc, product, lo, mask):
    """Wrapping register add of a two's-complement register [lo, -lo - 1], mask = 2^bits - 1."""
    s = acc + product
    c = ((s - lo) & mask) + lo
    return c, np.int32(c != s)


@njit(cache=True)
def add_products(acc, xflat, first, last, offsets, values, mult, src):
    """``acc += w * x`` for stored weights ``first .. last - 1``, without any overflow check.

    Only for sums the caller has proven exact (in the lane dtype, in any order): four weights
    per pass, so the tile ``acc`` is loaded and stored a quarter as often. Weight ``idx`` reads
    ``xflat[offsets[idx] * mult + src :][:acc.size]``.
    """
    width = acc.size
    idx = first
    while idx + 4 <= last:
        w0, w1, w2, w3 = values[idx], values[idx + 1], values[idx + 2], values[idx + 3]
        x0 = xflat[offsets[idx] * mult + src :][:width]
        x1 = xflat[offsets[idx + 1] * mult + src :][:width]
        x2 = xflat[offsets[idx + 2] * mult + src :][:width]
        x3 = xflat[offsets[idx + 3] * mult + src :][:width]
        for t in range(width):
            acc[t] += w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w3 * x3[t]
        idx += 4
    for rest in range(idx, last):
        wv = values[rest]
        x0 = xflat[offsets[rest] * mult + src :][:width]
        for t in range(width):
            acc[t] += wv * x0[t]


@njit(cache=True)
def per_mac_products(acc, hits, xflat, first, last, offsets, values, mult, src, x_max_abs,
                     wrap, lo, hi, mask):
    """Run stored weights ``first .. last - 1`` of one output channel over the tile ``acc``.

    ``acc`` (width,) holds the registers (lane dtype int32 or int64, already at their start
    value), ``hits`` (width,) int32 counts overflow events per lane. Every product fits the
    register and register + product fits the lane dtype (the caller checks); ``x_max_abs``
    bounds every input. Returns nothing; updates ``acc`` and ``hits`` in place.
    """
    width = acc.size
    top = acc.max()
    bottom = acc.min()
    exact = True  # top / bottom are the tile's measured range, not a widened bound
    idx = first
    while idx < last:
        end = min(idx + GROUP, last)
        bound = 0
        for g in range(idx, end):
            bound += abs(values[g])
        bound *= x_max_abs
        safe = bottom >= lo + bound and top <= hi - bound
        if not safe and not exact:
            top = acc.max()
            bottom = acc.min()
            exact = True
            safe = bottom >= lo + bound and top <= hi - bound
        if safe:
            add_products(acc, xflat, idx, end, offsets, values, mult, src)
            top += bound
            bottom -= bound
            exact = False
        else:
            for g in range(idx, end):
                wv = values[g]
                x0 = xflat[offsets[g] * mult + src :][:width]
                if wrap:
                    for t in range(width):
                        a, h = wrap_add(acc[t], wv * x0[t], lo, mask)
                        hits[t] += h
                        acc[t] = a
                else:
                    for t in range(width):
                        a, h = sat_add(acc[t], wv * x0[t], lo, hi)
                        hits[t] += h
                        acc[t] = a
            top = acc.max()
            bottom = acc.min()
            exact = True
        idx = end
