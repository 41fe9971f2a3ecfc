"""Process settings fxsim needs before numpy, Numba and OpenBLAS start (imported first by
`fxsim/__init__.py`)."""

import os

# Numba's OpenMP workers spin after each parallel loop, and so do OpenBLAS's after each GEMM; on
# a small machine the two pools then fight for the cores (measured: a 10x500 GEMM followed by a
# numba loop took 10.8 ms instead of 0.08 ms on 2 cores). Passive waiting removes the fight.
# It must be set before numba starts its thread pool; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# ... but a worker that sleeps at once must be woken for the next parallel loop, about 0.15 ms
# on this machine, which dominated small layers (min/max of 128k codes: 0.17 ms, against
# 0.025 ms when the workers spin briefly). GNU OpenMP's spin count overrides the passive policy:
# a short spin bridges back-to-back Numba loops and leaves the cores to BLAS soon after.
# Measured (2 cores): 20,000 spins against none, a LeNet5 fc2-sized int layer, batch 256,
# 0.74 -> 0.27 ms; fc1 1.77 -> 1.3 ms. 3,000 spins (70-80 us here; 20,000 were 300-600 us)
# bridge the same gaps and no longer spin through most of the GEMM that follows a Numba loop
# in training: a LeNet5 training step (batch 64) 12.5-13.0 -> 11.0-11.3 ms (four alternated
# runs each), fc1's forward GEMM in it 0.65-0.71 -> 0.41 ms; int inference unchanged.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")
# OpenBLAS's own threads busy-wait 2^28 cycles after a GEMM by default, stealing the cores
# from the Numba kernels that follow (im2col, col2im, pooling). 2^4 cycles (the minimum):
# float IFGSM on 10,000 LeNet5 images 39.8 s -> 29.5 s, a training epoch 17.5 s -> 15.6 s
# (2 cores). Read when numpy loads OpenBLAS, so it only helps where fxsim is imported first
# (the CLI, the benchmarks, the sweep's workers).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _keep_freed_memory() -> None:
    """glibc hands allocations above 128 KB-32 MB to mmap and returns them on free, so every
    batch's im2col columns and activations (tens of MB) are page-faulted in afresh. Keeping
    blocks up to 256 MB on the heap lets the next batch reuse them: float IFGSM on 10,000
    LeNet5 images 29.6 s -> 24.3 s (2 cores). The process keeps up to its peak memory. Set
    FXSIM_MALLOC=default to leave glibc alone."""
    import sys

    if sys.platform != "linux" or os.environ.get("FXSIM_MALLOC", "tune") != "tune":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


_keep_freed_memory()
