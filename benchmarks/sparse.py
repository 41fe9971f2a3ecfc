"""Sparse (zero-skipping) vs dense integer kernels vs float32 BLAS across weight densities.

The same as `fxsim bench kernels`: LeNet5 and CifarNet layer shapes, densities 1 .. 0.02, the
three kernels timed in one run (medians), sparse and dense checked bit-identical first.

    python benchmarks/sparse.py [--repeats 5] [--json out.json] [--plot out.png]
"""

import sys

from fxsim.cli import main

if __name__ == "__main__":
    main(["bench", "kernels", *sys.argv[1:]])
