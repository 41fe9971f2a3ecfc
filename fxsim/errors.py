"""Errors a user can fix, each said in one line.

Every exception fxsim raises on purpose derives from :class:`FxsimError`; the command line turns
one into a single line on stderr and exit code 2. Anything else is a bug and exits 1.
"""


class FxsimError(Exception):
    """Base class: something the user asked for or gave us is wrong, and the message says what."""


class FormatError(FxsimError, ValueError):
    """A number format, rounding mode or overflow mode is invalid."""


class RangeError(FxsimError, ValueError):
    """A value is outside what its format or the datapath can hold (NaN, out-of-range codes)."""


class ShapeError(FxsimError, ValueError):
    """Array shapes do not fit together."""


class DatapathError(FxsimError, ValueError):
    """A datapath configuration cannot compute what was asked (e.g. accumulator too narrow)."""
