"""fxsim: bit-accurate fixed-point simulation of neural-network accelerators."""

import os

# Numba's OpenMP workers spin after each parallel loop, and so do OpenBLAS's after each GEMM; on
# a small machine the two pools then fight for the cores (measured: a 10x500 GEMM followed by a
# numba loop took 10.8 ms instead of 0.08 ms on 2 cores). Passive waiting removes the fight.
# It must be set before numba starts its thread pool; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fxsim.errors import FxsimError
from fxsim.fixedpoint import (
    Overflow,
    QFormat,
    Rounding,
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
    "dequantize",
    "paper_format",
    "quantize",
    "requantize",
]
