"""The number system: fixed-point formats, named rounding and overflow modes, exact conversions.

A :class:`QFormat` is a two's-complement (or unsigned) word of ``bits`` bits of which ``int_bits``
are integer bits, the sign bit included (the ap_fixed<W, I> convention). A value is stored as an
integer *code*; ``value = code * 2**-frac_bits``. The conversions here return ``int64`` codes, so
signed words go up to 64 bits and unsigned ones up to 63; the datapath also reads and writes
codes in narrower integer dtypes (:func:`code_dtype`: int8 for an 8-bit format).

Every conversion here is exact: a float64 is decomposed into its 53-bit integer mantissa and its
exponent, and from there on only integers are shifted, rounded and saturated. The same scalar
routines (:func:`round_shift`, :func:`shift_left`, :func:`apply_overflow`) are compiled into the
datapath kernels, so quantize, requantize and the integer layers share one definition of rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numba import njit, prange

from fxsim.errors import FormatError, RangeError

__all__ = [
    "Overflow",
    "QFormat",
    "Rounding",
    "check_codes",
    "dequantize",
    "paper_format",
    "quantize",
    "requantize",
]


class Rounding(StrEnum):
    """How a value between two grid points is rounded (names and tie rules follow ap_fixed)."""

    TRN = "trn"  # floor (toward -inf)
    TRN_ZERO = "trn_zero"  # toward zero
    RND = "rnd"  # nearest, ties toward +inf
    RND_ZERO = "rnd_zero"  # nearest, ties toward zero
    RND_MIN_INF = "rnd_min_inf"  # nearest, ties toward -inf
    RND_INF = "rnd_inf"  # nearest, ties away from zero
    RND_CONV = "rnd_conv"  # nearest, ties to even (convergent; numpy's round)
    STOCHASTIC = "stochastic"  # up with probability equal to the discarded fraction

    @classmethod
    def parse(cls, value: Rounding | str) -> Rounding:
        return _parse_enum(cls, value, "rounding mode")

    @property
    def code(self) -> int:
        """The small integer the compiled kernels use for this mode."""
        return _ROUNDING_ORDER.index(self)


class Overflow(StrEnum):
    """What happens to a value outside a format's code range (names follow ap_fixed)."""

    SAT = "sat"  # clamp to the nearest end of the range
    WRAP = "wrap"  # keep the low `bits` bits (two's complement wrap-around)
    SAT_ZERO = "sat_zero"  # an out-of-range value becomes 0
    SAT_SYM = "sat_sym"  # clamp, but negative overflow goes to -max_code (symmetric range)

    @classmethod
    def parse(cls, value: Overflow | str) -> Overflow:
        return _parse_enum(cls, value, "overflow mode")

    @property
    def code(self) -> int:
        return _OVERFLOW_ORDER.index(self)


_ROUNDING_ORDER = tuple(Rounding)
_OVERFLOW_ORDER = tuple(Overflow)

# The integer codes of the modes, for the compiled kernels (must match the orders above).
TRN, TRN_ZERO, RND, RND_ZERO, RND_MIN_INF, RND_INF, RND_CONV, STOCHASTIC = range(8)
SAT, WRAP, SAT_ZERO, SAT_SYM = range(4)


def _parse_enum(cls, value, what):
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key.startswith("ap_"):  # accept ap_fixed spellings such as AP_RND_CONV
            key = key[3:]
        try:
            return cls(key)
        except ValueError:
            pass
    names = ", ".join(m.value for m in cls)
    raise FormatError(f"unknown {what} {value!r}; choose one of: {names}")


@dataclass(frozen=True)
class QFormat:
    """A fixed-point word: ``bits`` bits in all, ``int_bits`` of them integer bits (sign included).

    ``frac_bits = bits - int_bits`` may be negative (coarser than integers) or exceed ``bits``
    (all fraction). Examples: ``QFormat(4, 1)`` steps 1/8 over [-1, 0.875];
    ``QFormat(8, 2)`` steps 1/64 over [-2, 2 - 1/64].
    """

    bits: int
    int_bits: int
    signed: bool = True

    def __post_init__(self):
        for name in ("bits", "int_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise FormatError(f"QFormat {name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "signed", bool(self.signed))
        if not 1 <= self.bits <= 64:
            raise FormatError(f"QFormat bits must be between 1 and 64, got {self.bits}")
        if not self.signed and self.bits > 63:
            raise FormatError(
                f"unsigned QFormat bits must be at most 63 (codes are int64), got {self.bits}"
            )
        if abs(self.int_bits) > 1024:
            raise FormatError(f"QFormat int_bits must be within +-1024, got {self.int_bits}")

    @property
    def frac_bits(self) -> int:
        return self.bits - self.int_bits

    @property
    def min_code(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def max_code(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """The value of one code step, ``2**-frac_bits``."""
        return math.ldexp(1.0, -self.frac_bits)

    @property
    def min_value(self) -> float:
        return math.ldexp(float(self.min_code), -self.frac_bits)

    @property
    def max_value(self) -> float:
        return math.ldexp(float(self.max_code), -self.frac_bits)

    def __str__(self) -> str:
        kind = "" if self.signed else "u"
        return f"{kind}fix<{self.bits},{self.int_bits}>"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "int_bits": self.int_bits, "signed": self.signed}

    @classmethod
    def from_dict(cls, data: dict) -> QFormat:
        if not isinstance(data, dict) or not {"bits", "int_bits"} <= set(data):
            raise FormatError(f"a QFormat needs 'bits' and 'int_bits', got {data!r}")
        unknown = set(data) - {"bits", "int_bits", "signed"}
        if unknown:
            raise FormatError(f"unknown QFormat keys: {', '.join(sorted(unknown))}")
        return cls(data["bits"], data["int_bits"], data.get("signed", True))


def paper_format(bits: int) -> QFormat:
    """The paper's preset: 4 bits -> 1 integer bit, 8 -> 2, any other width -> 4 (signed)."""
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 2 <= bits <= 64:
        raise FormatError(f"bitwidth must be an integer between 2 and 64, got {bits!r}")
    int_bits = {4: 1, 8: 2}.get(int(bits), 4)
    return QFormat(int(bits), int_bits)


# --------------------------------------------------------------------------------------------
# Scalar integer routines, compiled; shared by quantize/requantize and the datapath kernels.
# --------------------------------------------------------------------------------------------

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


@njit(cache=True, nogil=True)
def round_shift(v, s, rmode, u):
    """``round(v / 2**s)`` exactly, for int64 ``v`` and ``s >= 1``, under rounding mode ``rmode``.

    ``u`` is a uniform draw in [0, 1), used only by stochastic rounding. Works from the floor
    quotient ``q``, whether the discarded remainder is nonzero, and how it compares to one half.
    """
    if s <= 63:
        q = v >> s
        mask = np.int64(_INT64_MAX) if s == 63 else (np.int64(1) << s) - 1
        rem = v & mask
        cmp = rem - (np.int64(1) << (s - 1))  # remainder minus one half; both below 2^63
        nonzero = rem != 0
        frac = float(rem) * 2.0 ** (-s)
    else:
        # |v| <= 2^63 <= 2^(s-1): the quotient is 0 or -1 and only v = -2^63, s = 64 is a tie.
        q = np.int64(-1) if v < 0 else np.int64(0)
        nonzero = v != 0
        if v >= 0:
            cmp = np.int64(-1)
        elif s == 64 and v == _INT64_MIN:
            cmp = np.int64(0)
        else:
            cmp = np.int64(1)
        frac = math.ldexp(float(v), -s)
        if v < 0:
            frac += 1.0
    if not nonzero or rmode == TRN:
        return q
    if rmode == TRN_ZERO:
        return q + 1 if v < 0 else q
    if rmode == STOCHASTIC:
        return q + 1 if u < frac else q
    if cmp > 0:
        return q + 1
    if cmp < 0:
        return q
    # an exact tie between q and q + 1
    if rmode == RND:
        return q + 1
    if rmode == RND_ZERO:
        return q + 1 if v < 0 else q
    if rmode == RND_MIN_INF:
        return q
    if rmode == RND_INF:
        return q if v < 0 else q + 1
    return q + (q & 1)  # RND_CONV: to the even neighbour


@njit(cache=True, nogil=True)
def shift_left(v, t):
    """``v * 2**t`` for ``t >= 0``: returns (low 64 bits as int64, whether it left int64)."""
    if t == 0:
        return v, False
    if t >= 64:
        return np.int64(0), v != 0
    limit = np.int64(1) << (63 - t)
    return v << t, (v >= limit) or (v < -limit)


@njit(cache=True, nogil=True)
def apply_overflow(q, big, negative, lo, hi, bits, signed, omode):
    """Map an exact integer into ``[lo, hi]`` under overflow mode ``omode``.

    ``q`` is the integer, or its low 64 bits when ``big`` says it did not fit in int64 (then
    ``negative`` gives its sign). Returns (code, whether it overflowed).
    """
    if not big and lo <= q <= hi:
        return q, False
    if omode == WRAP:
        if bits == 64:
            return q, True
        m = q & ((np.int64(1) << bits) - 1)
        if signed and m > hi:
            m -= np.int64(1) << bits
        return m, True
    if omode == SAT_ZERO:
        return np.int64(0), True
    positive = (not negative) if big else q > hi
    if positive:
        return hi, True
    if omode == SAT_SYM and signed and bits > 1:
        return lo + 1, True  # ap_fixed sets the word to 100..01, i.e. -max_code
    return lo, True


@njit(cache=True, nogil=True)
def requantize_one(v, shift, lo, hi, bits, signed, rmode, omode, u):
    """One code ``v`` with ``shift`` more fraction bits than the target -> (code, overflowed)."""
    if shift > 0:
        q = round_shift(v, shift, rmode, u)
        return apply_overflow(q, False, q < 0, lo, hi, bits, signed, omode)
    q, big = shift_left(v, -shift)
    return apply_overflow(q, big, v < 0, lo, hi, bits, signed, omode)


@njit(cache=True, nogil=True)
def _quantize_one(x, frac, lo, hi, bits, signed, rmode, omode, u):
    if x == 0.0:
        return np.int64(0), False
    if math.isinf(x):
        # Infinity has no residue to wrap: it saturates (sat_zero still gives 0).
        mode = SAT if omode == WRAP else omode
        return apply_overflow(np.int64(0), True, x < 0, lo, hi, bits, signed, mode)
    m, e = math.frexp(x)
    mant = np.int64(m * 9007199254740992.0)  # m * 2^53: exact, |mant| < 2^53
    # x * 2^frac == mant * 2^(e - 53 + frac): a pure integer shift from here on.
    return requantize_one(mant, 53 - e - frac, lo, hi, bits, signed, rmode, omode, u)


# _quantize_flat rounds a scaled value s = x * 2**frac with 0 < |s| < _FAST_BELOW in float64 (a
# fast path, 5-13x the general one: quantising LeNet5's 430k weights took 4 ms of every
# quantised training step). The power-of-two scaling is exact unless it underflows, and there
# its floor f and f + 0.5 are exact (|f| < 2^51), so comparing s with f + 0.5 decides every tie
# exactly. An underflowed s (|s| < 2^-1022) is not exact, but keeps the sign and the magnitude
# (below one half) that decide its rounding in every mode. Zero (x = 0, or s underflowed to 0),
# larger or infinite values, NaN (an infinite scale times 0) and stochastic rounding take
# _quantize_one.
_FAST_BELOW = 2.0**51


@njit(inline="always")
def _round_scaled(s, rmode):
    """``s`` (a scaled value inside the fast path's bounds, see above) rounded to an integer
    under the deterministic mode ``rmode``, as int64: the same rules as :func:`round_shift`.
    Bitwise, not short-circuit, logic: branches in the loop kept it from vectorising (rnd_conv
    4x slower)."""
    if rmode == RND_CONV:
        return np.int64(np.rint(s))  # exact: ties to even is the float rounding mode
    f = math.floor(s)
    half = f + 0.5
    if rmode == TRN:
        up = False
    elif rmode == TRN_ZERO:
        up = (s < 0) & (s != f)
    elif rmode == RND:
        up = s >= half
    elif rmode == RND_ZERO:
        up = (s > half) | ((s == half) & (s < 0))
    elif rmode == RND_MIN_INF:
        up = s > half
    else:  # RND_INF
        up = (s > half) | ((s == half) & (s > 0))
    return np.int64(f) + np.int64(up)


@njit(cache=True, parallel=True)
def _quantize_flat(x, frac, lo, hi, bits, signed, rmode, omode, u):
    out = np.empty(x.size, np.int64)
    overflows = 0
    stochastic = u.size > 0
    scale = math.ldexp(1.0, frac)
    for i in prange(x.size):
        s = x[i] * scale
        magnitude = abs(s)
        if not stochastic and 0.0 < magnitude < _FAST_BELOW:
            q = _round_scaled(s, rmode)
            code, ovf = apply_overflow(q, False, q < 0, lo, hi, bits, signed, omode)
        else:
            ui = u[i] if stochastic else 0.0
            code, ovf = _quantize_one(x[i], frac, lo, hi, bits, signed, rmode, omode, ui)
        out[i] = code
        overflows += 1 if ovf else 0
    return out, overflows


@njit(cache=True, parallel=True)
def _requantize_flat(v, shift, lo, hi, bits, signed, rmode, omode, u):
    out = np.empty(v.size, np.int64)
    overflows = 0
    stochastic = u.size > 0
    for i in prange(v.size):
        ui = u[i] if stochastic else 0.0
        code, ovf = requantize_one(v[i], shift, lo, hi, bits, signed, rmode, omode, ui)
        out[i] = code
        overflows += 1 if ovf else 0
    return out, overflows


def uniform_draws(rounding: Rounding, size: int, seed: int | np.random.Generator) -> np.ndarray:
    """The uniform [0, 1) draws stochastic rounding needs (an empty array for other modes)."""
    if rounding is not Rounding.STOCHASTIC:
        return np.empty(0, np.float64)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return rng.random(size)


def format_args(fmt: QFormat) -> tuple[int, int, int, bool]:
    """(min_code, max_code, bits, signed): how the compiled kernels see a format."""
    return fmt.min_code, fmt.max_code, fmt.bits, fmt.signed


# --------------------------------------------------------------------------------------------
# Public array API
# --------------------------------------------------------------------------------------------


def quantize_with_count(
    x, fmt: QFormat, rounding="rnd_conv", overflow="sat", seed=0
) -> tuple[np.ndarray, int]:
    """:func:`quantize`, also returning how many elements overflowed the format."""
    rounding, overflow = Rounding.parse(rounding), Overflow.parse(overflow)
    arr = np.asarray(x)
    if arr.dtype.kind in "iub":
        # Integers are codes with no fraction bits: exact, even beyond 2^53.
        return requantize_with_count(arr, 0, fmt, rounding, overflow, seed)
    if arr.dtype.kind != "f":
        raise RangeError(f"quantize needs real numbers, got an array of dtype {arr.dtype}")
    flat = np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)
    if np.isnan(flat).any():
        index = np.unravel_index(int(np.flatnonzero(np.isnan(flat))[0]), arr.shape)
        raise RangeError(f"cannot quantize NaN (first at index {tuple(map(int, index))})")
    u = uniform_draws(rounding, flat.size, seed)
    codes, count = _quantize_flat(
        flat, fmt.frac_bits, *format_args(fmt), rounding.code, overflow.code, u
    )
    return codes.reshape(arr.shape), int(count)


def quantize(x, fmt: QFormat, rounding="rnd_conv", overflow="sat", seed=0) -> np.ndarray:
    """Exact integer codes of ``x`` (any shape of floats) in ``fmt``: ``round(x * 2**frac_bits)``.

    Rounding and overflow are applied once, to the exact value. NaN is an error; +-inf saturates
    (``sat_zero`` maps it to 0). ``seed`` (int or Generator) drives ``stochastic`` rounding only.
    Integer input is taken as exact integers (codes with no fraction bits). Returns int64.
    """
    return quantize_with_count(x, fmt, rounding, overflow, seed)[0]


def dequantize(codes, fmt: QFormat) -> np.ndarray:
    """Float64 values of ``codes`` in ``fmt``: ``code * 2**-frac_bits`` (exact below 2^53)."""
    codes = np.asarray(codes)
    check_codes(codes, fmt, "codes")
    return np.ldexp(codes.astype(np.float64), -fmt.frac_bits)


def requantize_with_count(
    codes, from_frac_bits: int, fmt: QFormat, rounding="rnd_conv", overflow="sat", seed=0
) -> tuple[np.ndarray, int]:
    """:func:`requantize`, also returning how many elements overflowed the target format."""
    rounding, overflow = Rounding.parse(rounding), Overflow.parse(overflow)
    arr = np.asarray(codes)
    if arr.dtype.kind not in "iub":
        raise RangeError(f"requantize needs integer codes, got an array of dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > _INT64_MAX:
        raise RangeError("requantize takes codes up to 2^63 - 1; got a larger uint64 value")
    flat = np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)
    shift = int(from_frac_bits) - fmt.frac_bits
    u = uniform_draws(rounding, flat.size, seed)
    out, count = _requantize_flat(
        flat, shift, *format_args(fmt), rounding.code, overflow.code, u
    )
    return out.reshape(arr.shape), int(count)


def requantize(
    codes, from_frac_bits: int, fmt: QFormat, rounding="rnd_conv", overflow="sat", seed=0
) -> np.ndarray:
    """Re-express integer ``codes`` that carry ``from_frac_bits`` fraction bits in ``fmt``.

    Pure integer: a left shift, or a right shift with the named rounding, then overflow handling.
    This is what the datapath does between layers (accumulator -> activation). Returns int64.
    """
    return requantize_with_count(codes, from_frac_bits, fmt, rounding, overflow, seed)[0]


@njit(cache=True, parallel=True)
def _min_max(flat):
    """(min, max) of a 1-D integer array of at least 64 elements in one parallel pass. Numba's
    own array min/max per chunk vectorise for every integer width, where a hand-written loop
    did not for narrow ones (7.4M codes: int8 1.6 -> 0.2 ms, int64 1.8 -> 1.5 ms, 2 cores)."""
    n_tasks = 64
    size = flat.size
    lows = np.empty(n_tasks, np.int64)
    highs = np.empty(n_tasks, np.int64)
    for t in prange(n_tasks):
        chunk = flat[size * t // n_tasks : size * (t + 1) // n_tasks]
        lows[t] = chunk.min()
        highs[t] = chunk.max()
    return _extremes(lows, highs)


@njit(cache=True)
def _extremes(lows, highs):
    """(min of lows, max of highs), serially: in a parallel kernel each array reduction is a
    thread launch of its own (~1.6 us on 2 cores)."""
    lo = lows[0]
    hi = highs[0]
    for t in range(1, lows.size):
        lo = min(lo, lows[t])
        hi = max(hi, highs[t])
    return lo, hi


def min_max(codes: np.ndarray) -> tuple[int, int]:
    """Smallest and largest code of a non-empty integer array (one parallel pass when large)."""
    if codes.size < 1 << 16 or codes.dtype == np.uint64 or not codes.flags.c_contiguous:
        return int(codes.min()), int(codes.max())
    lo, hi = _min_max(codes.reshape(-1))
    return int(lo), int(hi)


@njit(cache=True, parallel=True)
def _grid_codes(x, scale, lo, hi, out):
    off_grid = 0
    for i in prange(x.size):
        v = x[i] * scale  # exact: a power of two
        c = np.int64(v) if -9.2e18 < v < 9.2e18 else np.int64(0)
        ok = c == v and lo <= c <= hi
        off_grid += 0 if ok else 1
        out[i] = c
    return off_grid


def code_dtype(fmt: QFormat) -> np.dtype:
    """The narrowest signed integer dtype (int8, int16, int32 or int64) that holds every code of
    ``fmt``: how an accelerator stores activations (an 8-bit format's codes in one byte each).

    fxsim's kernels take codes in any integer dtype and can return them in this one
    (``out_dtype``), which moves an eighth of the bytes of int64 codes for an 8-bit format.
    """
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= fmt.min_code and fmt.max_code <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def codes_on_grid(x: np.ndarray, fmt: QFormat, dtype=np.int64) -> np.ndarray | None:
    """The codes (as ``dtype``, which must hold the format's range) of values already on
    ``fmt``'s grid and in its range, in one pass; None if any value is not (then
    :func:`quantize` must round). Exact: scaling by 2^frac_bits is."""
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype.kind != "f" or fmt.bits > 53:
        return None
    out = np.empty(flat.size, dtype)
    scale = float(2.0**fmt.frac_bits)
    if _grid_codes(flat, scale, fmt.min_code, fmt.max_code, out):
        return None
    return out.reshape(np.shape(x))


@njit(cache=True, parallel=True)
def _scaled(codes, step, out):
    for i in prange(codes.size):
        out[i] = codes[i] * step
    return out


def values(codes: np.ndarray, fmt: QFormat, dtype=np.float64) -> np.ndarray:
    """:func:`dequantize` without the range check, straight into ``dtype``: exact when every
    code fits the dtype's mantissa (at most 24 bits for float32, 53 for float64)."""
    flat = np.ascontiguousarray(codes).reshape(-1)
    out = np.empty(flat.size, dtype)
    return _scaled(flat, out.dtype.type(fmt.step), out).reshape(np.shape(codes))


def check_codes(codes: np.ndarray, fmt: QFormat, name: str) -> tuple[int, int]:
    """Raise :class:`RangeError` naming the first code of ``codes`` outside ``fmt``'s range.

    Returns the smallest and largest code (0, 0 for an empty array).
    """
    if codes.dtype.kind not in "iub":
        raise RangeError(f"{name} must be integer codes, got dtype {codes.dtype}")
    if codes.size == 0:
        return 0, 0
    lo, hi = min_max(codes)
    if lo >= fmt.min_code and hi <= fmt.max_code:
        return lo, hi
    bad = lo if lo < fmt.min_code else hi
    index = np.unravel_index(int(np.flatnonzero(codes == bad)[0]), codes.shape)
    kind = "negative code in unsigned format" if bad < 0 and not fmt.signed else "code"
    raise RangeError(
        f"{name}: {kind} {bad} at index {tuple(map(int, index))} is outside {fmt} "
        f"range [{fmt.min_code}, {fmt.max_code}]"
    )
