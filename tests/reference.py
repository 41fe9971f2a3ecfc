"""Slow, independent reference of fxsim's arithmetic in plain Python integers and Fractions.

Tests only. It shares no code with fxsim: rounding works on exact rationals, overflow on
unbounded ints, and the layer loops follow the canonical MAC order literally.
"""

from __future__ import annotations

import math
from fractions import Fraction

HALF = Fraction(1, 2)


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_rational(v: Fraction, mode: str, u: float | None = None) -> int:
    """The integer the named rounding mode picks for the exact rational ``v``."""
    floor = math.floor(v)
    rest = v - floor
    if rest == 0:
        return floor
    if mode == "trn":
        return floor
    if mode == "trn_zero":
        return floor if v > 0 else floor + 1
    if mode == "stochastic":
        return floor + 1 if Fraction(u) < rest else floor
    if rest > HALF:
        return floor + 1
    if rest < HALF:
        return floor
    ties = {
        "rnd": floor + 1,
        "rnd_zero": floor if v > 0 else floor + 1,
        "rnd_min_inf": floor,
        "rnd_inf": floor + 1 if v > 0 else floor,
        "rnd_conv": floor if floor % 2 == 0 else floor + 1,
    }
    return ties[mode]


def overflow_int(q: int, bits: int, signed: bool, mode: str) -> tuple[int, bool]:
    lo, hi = code_range(bits, signed)
    if lo <= q <= hi:
        return q, False
    if mode == "wrap":
        m = q % 2**bits
        if signed and m >= 2 ** (bits - 1):
            m -= 2**bits
        return m, True
    if mode == "sat_zero":
        return 0, True
    if q > hi:
        return hi, True
    if mode == "sat_sym" and signed and bits > 1:
        return -hi, True
    return lo, True


def quantize_ref(x: float, bits, int_bits, signed, rounding, overflow, u=None) -> tuple[int, bool]:
    if math.isinf(x):
        lo, hi = code_range(bits, signed)
        if overflow == "sat_zero":
            return 0, True
        if x > 0:
            return hi, True
        return (-hi if overflow == "sat_sym" and signed and bits > 1 else lo), True
    v = Fraction(x) * Fraction(2) ** (bits - int_bits)
    return overflow_int(round_rational(v, rounding, u), bits, signed, overflow)


def requantize_ref(code: int, from_frac, bits, int_bits, signed, rounding, overflow, u=None):
    v = Fraction(code) * Fraction(2) ** ((bits - int_bits) - from_frac)
    return overflow_int(round_rational(v, rounding, u), bits, signed, overflow)


def accumulate_ref(products: list[int], bias: int, acc_bits, acc_overflow, acc_mode):
    """Returns (register value, overflow events, |value| before final overflow)."""
    if acc_bits is None:
        total = bias + sum(products)
        return total, 0, abs(total)
    if acc_mode == "final":
        total = bias + sum(products)
        value, over = overflow_int(total, acc_bits, True, acc_overflow)
        return value, int(over), abs(total)
    acc, events = overflow_int(bias, acc_bits, True, acc_overflow)
    events = int(events)
    for p in products:
        if p == 0:
            continue  # a skipped MAC: the register is left as it is
        acc, over = overflow_int(acc + p, acc_bits, True, acc_overflow)
        events += int(over)
    return acc, events, abs(acc)


def conv2d_ref(x, w, bias, dp, stride=1, padding=0):
    """Nested loops over Python ints. x: N x C x H x W lists, w: J x C x KH x KW lists.

    ``dp`` is a dict with act_fmt/weight_fmt/out_fmt (bits, int_bits, signed), acc_bits,
    acc_overflow, acc_mode, rounding, overflow. Bias codes are already at the accumulator's
    fraction. Returns (y as nested lists, dict of counters).
    """
    n_img, chans, height, width = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    n_out, _, kh, kw = len(w), len(w[0]), len(w[0][0]), len(w[0][0][0])
    oh = (height + 2 * padding - kh) // stride + 1
    ow = (width + 2 * padding - kw) // stride + 1
    counters = {"acc_overflows": 0, "out_saturations": 0, "max_abs_acc": 0}
    out = [[[[0] * ow for _ in range(oh)] for _ in range(n_out)] for _ in range(n_img)]
    for n in range(n_img):
        for j in range(n_out):
            for oy in range(oh):
                for ox in range(ow):
                    products = []
                    for c in range(chans):
                        for ki in range(kh):
                            for kj in range(kw):
                                iy = oy * stride + ki - padding
                                ix = ox * stride + kj - padding
                                inside = 0 <= iy < height and 0 <= ix < width
                                xv = x[n][c][iy][ix] if inside else 0
                                products.append(xv * w[j][c][ki][kj])
                    out[n][j][oy][ox] = _finish(products, bias[j], dp, counters)
    return out, counters


def linear_ref(x, w, bias, dp):
    counters = {"acc_overflows": 0, "out_saturations": 0, "max_abs_acc": 0}
    out = [
        [_finish([xv * wv for xv, wv in zip(row, wrow, strict=True)], b, dp, counters)
         for wrow, b in zip(w, bias, strict=True)]
        for row in x
    ]
    return out, counters


def _finish(products, bias, dp, counters):
    acc, events, magnitude = accumulate_ref(
        products, bias, dp["acc_bits"], dp["acc_overflow"], dp["acc_mode"]
    )
    counters["acc_overflows"] += events
    counters["max_abs_acc"] = max(counters["max_abs_acc"], magnitude)
    acc_frac = dp["act_fmt"][0] - dp["act_fmt"][1] + dp["weight_fmt"][0] - dp["weight_fmt"][1]
    code, sat = requantize_ref(acc, acc_frac, *dp["out_fmt"], dp["rounding"], dp["overflow"])
    counters["out_saturations"] += int(sat)
    return code
