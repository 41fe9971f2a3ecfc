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

Lanes are float32 (a saturating register whose values, register + product, stay integers below
2^24: every add and clamp is exact), int32 (registers of <= 30 bits) or int64. The multiply-add
loops let LLVM fuse ``acc + w * x`` into one FMA (``fastmath={"contract"}``, nothing else):
wherever they run, every product and sum is an integer the lane dtype holds exactly, so one
rounding or two give the same bits (one core, float32 pair loop: 22 -> 28 GMAC/s). Two output
channels whose stored weights share their offsets (a dense layer) can run together
(:func:`per_mac_products_pair`), loading each input vector once for both, or four
(:func:`per_mac_products_quad`) where all four can take a group as plain multiply-adds.

Numba's on-disk cache checks only the calling kernel's own source file: after editing this
module in a development checkout, delete ``fxsim/kernels/__pycache__`` so that the kernels in
dense.py and sparse.py are compiled again with the new code.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

# Stored weights per fast-path group: larger groups amortise the range check over more MACs,
# smaller ones need less headroom in the register (the bound grows with the group).
GROUP = 8


@njit(cache=True, inline="always")
def sat_add(acc, product, lo, hi):
    """Saturating register add: (new register value, 1 if it overflowed else 0) as int32."""
    s = acc + product
    c = min(max(s, lo), hi)
    return c, np.int32(c != s)


def wrap_into(s, lo, mask):
    """``s`` wrapped into the two's-complement register [lo, -lo - 1], ``mask = 2^bits - 1``."""
    return ((s - lo) & mask) + lo


@overload(wrap_into, inline="always")
def _wrap_into(s, lo, mask):
    if isinstance(s, types.Integer):
        return lambda s, lo, mask: ((s - lo) & mask) + lo
    # float lanes (the caller keeps |s - lo| < 2^24 in float32): subtracting a multiple of
    # 2^bits found by a floor division by a power of two is exact
    return lambda s, lo, mask: s - np.floor((s - lo) / (mask + 1)) * (mask + 1)


@njit(cache=True, inline="always")
def wrap_add(acc, product, lo, mask):
    """Wrapping register add of a two's-complement register [lo, -lo - 1], mask = 2^bits - 1."""
    s = acc + product
    c = wrap_into(s, lo, mask)
    return c, np.int32(c != s)


def as_lane_int(v):
    """A register value as an integer: itself in integer lanes, int32 in float lanes."""
    return v


@overload(as_lane_int, inline="always")
def _as_lane_int(v):
    if isinstance(v, types.Integer):
        return lambda v: v
    # float lanes hold integers below 2^24 (float32) or 2^53 (float64): the conversion is
    # exact, and integer max/min vectorise where float ones (NaN rules) do not: 256 lanes in
    # 18 ns instead of 220
    if v.bitwidth == 64:
        return lambda v: np.int64(v)
    return lambda v: np.int32(v)


@njit(cache=True)
def lane_range(acc):
    """(max, min) of a non-empty tile of registers, as integers, in one vectorised pass."""
    top = as_lane_int(acc[0])
    bottom = top
    for t in range(1, acc.size):
        v = as_lane_int(acc[t])
        top = max(top, v)
        bottom = min(bottom, v)
    return top, bottom


@njit(cache=True, fastmath={"contract"})
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


# Larger than the headroom of any register the kernels run (at most 62 bits): a group bound
# is capped here, so that summing the bounds of wide registers' products cannot overflow int64.
BOUND_CAP = 1 << 62


@njit(cache=True, inline="always")
def group_bound(values, first, last, x_max_abs):
    """x_max_abs * sum |w| over stored weights first .. last - 1 (capped at BOUND_CAP): no
    prefix of the group's products moves a register by more."""
    bound = abs(values[first]) * x_max_abs
    for g in range(first + 1, last):
        bound = min(bound + abs(values[g]) * x_max_abs, BOUND_CAP)  # each term <= 2^61
    return bound


@njit(cache=True, inline="always")
def proven_safe(acc, top, bottom, exact, bound, lo, hi):
    """(safe, top, bottom, exact): whether every lane of ``acc`` is at least ``bound`` inside
    [lo, hi]. ``top`` / ``bottom`` bound the tile (``exact``: measured, else widened); a widened
    range that does not prove it is measured again before giving up."""
    safe = bottom >= lo + bound and top <= hi - bound
    if not safe and not exact:
        top, bottom = lane_range(acc)
        exact = True
        safe = bottom >= lo + bound and top <= hi - bound
    return safe, top, bottom, exact


@njit(cache=True, inline="always")
def range_after(acc, top, bottom, bound, plain):
    """(max, min, measured) of a tile after a group: the range before it widened by the
    group's bound where the group ran as plain multiply-adds, else measured again."""
    if plain:
        return top + bound, bottom - bound, False
    top, bottom = lane_range(acc)
    return top, bottom, True


@njit(cache=True)
def per_mac_products(acc, hits, xflat, first, last, offsets, values, mult, src, x_max_abs,
                     wrap, lo, hi, mask):
    """Run stored weights ``first .. last - 1`` of one output channel over the tile ``acc``.

    ``acc`` (width,) holds the registers (lane dtype float32, int32 or int64, already at their
    start value), ``hits`` (width,) int32 counts overflow events per lane. Every product fits
    the register and register + product is exact in the lane dtype (the caller checks);
    ``x_max_abs`` bounds every input. Returns nothing; updates ``acc`` and ``hits`` in place.
    """
    top, bottom = lane_range(acc)
    exact = True  # top / bottom are the tile's measured range, not a widened bound
    idx = first
    while idx < last:
        end = min(idx + GROUP, last)
        bound = group_bound(values, idx, end, x_max_abs)
        safe, top, bottom, exact = proven_safe(acc, top, bottom, exact, bound, lo, hi)
        if safe:
            add_products(acc, xflat, idx, end, offsets, values, mult, src)
        else:
            checked_products(acc, hits, xflat, idx, end, offsets, values, mult, src, wrap, lo,
                             hi, mask)
        top, bottom, exact = range_after(acc, top, bottom, bound, safe)
        idx = end


@njit(cache=True, fastmath={"contract"})
def add_products_pair(acc0, acc1, xflat, first, last, offsets, values0, values1, mult, src):
    """:func:`add_products` for two output channels whose stored weights share ``offsets``:
    each input vector is loaded once for both (2 cores, a tile of 256 int32 lanes: 12.5 ->
    19 GMAC/s per core; float32 18.5 -> 25)."""
    width = acc0.size
    idx = first
    while idx + 4 <= last:
        w0, w1, w2, w3 = values0[idx], values0[idx + 1], values0[idx + 2], values0[idx + 3]
        v0, v1, v2, v3 = values1[idx], values1[idx + 1], values1[idx + 2], values1[idx + 3]
        x0 = xflat[offsets[idx] * mult + src :][:width]
        x1 = xflat[offsets[idx + 1] * mult + src :][:width]
        x2 = xflat[offsets[idx + 2] * mult + src :][:width]
        x3 = xflat[offsets[idx + 3] * mult + src :][:width]
        for t in range(width):
            p0, p1, p2, p3 = x0[t], x1[t], x2[t], x3[t]
            acc0[t] += w0 * p0 + w1 * p1 + w2 * p2 + w3 * p3
            acc1[t] += v0 * p0 + v1 * p1 + v2 * p2 + v3 * p3
        idx += 4
    for rest in range(idx, last):
        w0, v0 = values0[rest], values1[rest]
        x0 = xflat[offsets[rest] * mult + src :][:width]
        for t in range(width):
            acc0[t] += w0 * x0[t]
            acc1[t] += v0 * x0[t]


@njit(cache=True, inline="always")
def _four(values, idx):
    """Row ``idx`` of a (U, 4) array as four scalars (kept in registers by the loop using them:
    read from the array inside it, they would be loaded again after every store)."""
    return values[idx, 0], values[idx, 1], values[idx, 2], values[idx, 3]


@njit(cache=True, fastmath={"contract"})
def add_products_quad(acc0, acc1, acc2, acc3, xflat, first, last, offsets, values, mult, src):
    """:func:`add_products` for four output channels at once over entries ``first .. last - 1``
    of a shared column list: entry ``idx`` reads ``xflat[offsets[idx] * mult + src :]`` and
    adds ``values[idx, i]`` times it to channel i (``values`` (U, 4), zero where a channel has
    no weight: exact, the sums being exact in any order). Four entries per pass: each input
    vector is loaded once for four channels, 16 multiply-adds per 4 input and 4 accumulator
    loads (2 cores, CifarNet conv2 at density 1, 32 images: 10.7 -> 6.6 ms)."""
    width = acc0.size
    idx = first
    while idx + 4 <= last:
        x0 = xflat[offsets[idx] * mult + src :][:width]
        x1 = xflat[offsets[idx + 1] * mult + src :][:width]
        x2 = xflat[offsets[idx + 2] * mult + src :][:width]
        x3 = xflat[offsets[idx + 3] * mult + src :][:width]
        a0, a1, a2, a3 = _four(values, idx)
        b0, b1, b2, b3 = _four(values, idx + 1)
        c0, c1, c2, c3 = _four(values, idx + 2)
        d0, d1, d2, d3 = _four(values, idx + 3)
        for t in range(width):
            p, q, r, u = x0[t], x1[t], x2[t], x3[t]
            acc0[t] += a0 * p + b0 * q + c0 * r + d0 * u
            acc1[t] += a1 * p + b1 * q + c1 * r + d1 * u
            acc2[t] += a2 * p + b2 * q + c2 * r + d2 * u
            acc3[t] += a3 * p + b3 * q + c3 * r + d3 * u
        idx += 4
    for rest in range(idx, last):
        x0 = xflat[offsets[rest] * mult + src :][:width]
        a0, a1, a2, a3 = _four(values, rest)
        for t in range(width):
            p = x0[t]
            acc0[t] += a0 * p
            acc1[t] += a1 * p
            acc2[t] += a2 * p
            acc3[t] += a3 * p


@njit(cache=True, inline="always")
def pair_group(acc0, acc1, hits0, hits1, xflat, first, last, offsets, values0, values1, mult,
               src, wrap, lo, hi, mask, plain):
    """A group of two channels' weights as plain multiply-adds where ``plain`` (both proven
    safe), else both MAC by MAC in one pass (exact for a safe one too, with no events)."""
    if plain:
        add_products_pair(acc0, acc1, xflat, first, last, offsets, values0, values1, mult, src)
    else:
        checked_products_pair(acc0, acc1, hits0, hits1, xflat, first, last, offsets, values0,
                              values1, mult, src, wrap, lo, hi, mask)


@njit(cache=True)
def per_mac_products_pair(acc0, acc1, hits0, hits1, xflat, first, last, offsets, values0,
                          values1, mult, src, x_max_abs, wrap, lo, hi, mask):
    """:func:`per_mac_products` for two output channels whose stored weights share ``offsets``
    (the weights of a dense layer, zeros included: a zero product leaves a register, saturated
    or not, unchanged). A group both channels can take as plain multiply-adds runs as one pass
    over the inputs; otherwise each channel runs it on its own."""
    top0, bottom0 = lane_range(acc0)
    top1, bottom1 = lane_range(acc1)
    exact0 = exact1 = True
    idx = first
    while idx < last:
        end = min(idx + GROUP, last)
        bound0 = group_bound(values0, idx, end, x_max_abs)
        bound1 = group_bound(values1, idx, end, x_max_abs)
        safe0, top0, bottom0, exact0 = proven_safe(acc0, top0, bottom0, exact0, bound0, lo, hi)
        safe1, top1, bottom1, exact1 = proven_safe(acc1, top1, bottom1, exact1, bound1, lo, hi)
        plain = safe0 and safe1
        pair_group(acc0, acc1, hits0, hits1, xflat, idx, end, offsets, values0, values1, mult,
                   src, wrap, lo, hi, mask, plain)
        top0, bottom0, exact0 = range_after(acc0, top0, bottom0, bound0, plain)
        top1, bottom1, exact1 = range_after(acc1, top1, bottom1, bound1, plain)
        idx = end


@njit(cache=True, inline="always")
def units(n, fours):
    """How many units ``n`` channels (or images) make as ``fours`` blocks of four, then pairs,
    then one alone; with :func:`unit_first`, the task split of the kernels that run
    :func:`per_mac_products_quad`."""
    return fours + (n - 4 * fours + 1) // 2


@njit(cache=True, inline="always")
def unit_first(unit, fours):
    """The first channel (or image) of unit ``unit`` of :func:`units`."""
    return 4 * unit if unit < fours else 4 * fours + 2 * (unit - fours)


@njit(cache=True)
def per_mac_products_quad(acc0, acc1, acc2, acc3, hits0, hits1, hits2, hits3, xflat, first,
                          last, offsets, w0, w1, w2, w3, block, mult, src, x_max_abs, wrap, lo,
                          hi, mask):
    """:func:`per_mac_products_pair` for four output channels whose weights ``w0`` .. ``w3``
    share ``offsets`` (``block`` (K, 4): the same weights side by side). A group all four can
    take as plain multiply-adds runs as one pass (:func:`add_products_quad`: each input
    vector loaded once for four channels); otherwise each pair takes it as
    :func:`per_mac_products_pair` does."""
    top0, bottom0 = lane_range(acc0)
    top1, bottom1 = lane_range(acc1)
    top2, bottom2 = lane_range(acc2)
    top3, bottom3 = lane_range(acc3)
    exact0 = exact1 = exact2 = exact3 = True
    idx = first
    while idx < last:
        end = min(idx + GROUP, last)
        bound0 = group_bound(w0, idx, end, x_max_abs)
        bound1 = group_bound(w1, idx, end, x_max_abs)
        bound2 = group_bound(w2, idx, end, x_max_abs)
        bound3 = group_bound(w3, idx, end, x_max_abs)
        safe0, top0, bottom0, exact0 = proven_safe(acc0, top0, bottom0, exact0, bound0, lo, hi)
        safe1, top1, bottom1, exact1 = proven_safe(acc1, top1, bottom1, exact1, bound1, lo, hi)
        safe2, top2, bottom2, exact2 = proven_safe(acc2, top2, bottom2, exact2, bound2, lo, hi)
        safe3, top3, bottom3, exact3 = proven_safe(acc3, top3, bottom3, exact3, bound3, lo, hi)
        plain01 = safe0 and safe1
        plain23 = safe2 and safe3
        if plain01 and plain23:
            add_products_quad(acc0, acc1, acc2, acc3, xflat, idx, end, offsets, block, mult, src)
        else:
            pair_group(acc0, acc1, hits0, hits1, xflat, idx, end, offsets, w0, w1, mult, src,
                       wrap, lo, hi, mask, plain01)
            pair_group(acc2, acc3, hits2, hits3, xflat, idx, end, offsets, w2, w3, mult, src,
                       wrap, lo, hi, mask, plain23)
        top0, bottom0, exact0 = range_after(acc0, top0, bottom0, bound0, plain01)
        top1, bottom1, exact1 = range_after(acc1, top1, bottom1, bound1, plain01)
        top2, bottom2, exact2 = range_after(acc2, top2, bottom2, bound2, plain23)
        top3, bottom3, exact3 = range_after(acc3, top3, bottom3, bound3, plain23)
        idx = end


@njit(cache=True, fastmath={"contract"})
def checked_products_pair(acc0, acc1, hits0, hits1, xflat, first, last, offsets, values0,
                          values1, mult, src, wrap, lo, hi, mask):
    """:func:`checked_products` for two output channels whose stored weights share
    ``offsets``, each input vector loaded once for both. (Here and there the saturating and
    wrapping loops are written out separately: one helper choosing between the two adds
    unifies their result types, and the float32 loop ran at half the speed.)"""
    width = acc0.size
    idx = first
    while idx + 2 <= last:
        w0, w1, v0, v1 = values0[idx], values0[idx + 1], values1[idx], values1[idx + 1]
        x0 = xflat[offsets[idx] * mult + src :][:width]
        x1 = xflat[offsets[idx + 1] * mult + src :][:width]
        if wrap:
            for t in range(width):
                p0, p1 = x0[t], x1[t]
                a, h0 = wrap_add(acc0[t], w0 * p0, lo, mask)
                a, h1 = wrap_add(a, w1 * p1, lo, mask)
                b, g0 = wrap_add(acc1[t], v0 * p0, lo, mask)
                b, g1 = wrap_add(b, v1 * p1, lo, mask)
                hits0[t] += h0 + h1
                hits1[t] += g0 + g1
                acc0[t] = a
                acc1[t] = b
        else:
            for t in range(width):
                p0, p1 = x0[t], x1[t]
                a, h0 = sat_add(acc0[t], w0 * p0, lo, hi)
                a, h1 = sat_add(a, w1 * p1, lo, hi)
                b, g0 = sat_add(acc1[t], v0 * p0, lo, hi)
                b, g1 = sat_add(b, v1 * p1, lo, hi)
                hits0[t] += h0 + h1
                hits1[t] += g0 + g1
                acc0[t] = a
                acc1[t] = b
        idx += 2
    if idx < last:
        checked_products(acc0, hits0, xflat, idx, last, offsets, values0, mult, src, wrap, lo,
                         hi, mask)
        checked_products(acc1, hits1, xflat, idx, last, offsets, values1, mult, src, wrap, lo,
                         hi, mask)


@njit(cache=True, fastmath={"contract"})
def checked_products(acc, hits, xflat, first, last, offsets, values, mult, src, wrap, lo, hi,
                     mask):
    """Stored weights ``first .. last - 1`` MAC by MAC, saturating (or wrapping) after each.

    Four weights per pass: each lane's register stays in a vector register through four
    checked adds in canonical order, so the tile and its event counts are loaded and stored a
    quarter as often (2 cores, cifarnet.conv6 with a 20-bit register that saturates often:
    see docs/results/kernels.md).
    """
    width = acc.size
    idx = first
    while idx + 4 <= last:
        w0, w1, w2, w3 = values[idx], values[idx + 1], values[idx + 2], values[idx + 3]
        x0 = xflat[offsets[idx] * mult + src :][:width]
        x1 = xflat[offsets[idx + 1] * mult + src :][:width]
        x2 = xflat[offsets[idx + 2] * mult + src :][:width]
        x3 = xflat[offsets[idx + 3] * mult + src :][:width]
        if wrap:
            for t in range(width):
                a, h0 = wrap_add(acc[t], w0 * x0[t], lo, mask)
                a, h1 = wrap_add(a, w1 * x1[t], lo, mask)
                a, h2 = wrap_add(a, w2 * x2[t], lo, mask)
                a, h3 = wrap_add(a, w3 * x3[t], lo, mask)
                hits[t] += h0 + h1 + h2 + h3
                acc[t] = a
        else:
            for t in range(width):
                a, h0 = sat_add(acc[t], w0 * x0[t], lo, hi)
                a, h1 = sat_add(a, w1 * x1[t], lo, hi)
                a, h2 = sat_add(a, w2 * x2[t], lo, hi)
                a, h3 = sat_add(a, w3 * x3[t], lo, hi)
                hits[t] += h0 + h1 + h2 + h3
                acc[t] = a
        idx += 4
    for rest in range(idx, last):
        wv = values[rest]
        x0 = xflat[offsets[rest] * mult + src :][:width]
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
