"""fxsim: bit-accurate fixed-point simulation of neural-network accelerators."""

from fxsim import _runtime  # noqa: F401  (first: thread and allocator settings)
from fxsim.errors import FxsimError
from fxsim.fixedpoint import (
    Overflow,
    QFormat,
    Rounding,
    code_dtype,
    dequantize,
    paper_format,
    quantize,
    requantize,
)

__version__ = "0.1.0"

__all__ = [
    "FxsimError",
    "Overflow",
    "QFormat",
    "Rounding",
    "__version__",
    "code_dtype",
    "dequantize",
    "paper_format",
    "quantize",
    "requantize",
]
