"""Test-session settings."""

import os

import pytest

import fxsim  # noqa: F401  (its process settings first: before numpy and Numba load)

# Many tests check that a command's stderr is exactly one line; in a run with a cold Numba
# cache the CLI would add its first-run notice (tests/test_cli.py tests it on its own).
os.environ["FXSIM_COMPILE_NOTICE"] = "off"


def threads_per_worker() -> int:
    """Numba threads for one test process: its share of the pool when pytest-xdist runs
    several workers, else the whole pool."""
    import numba

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, numba.config.NUMBA_NUM_THREADS // workers)


@pytest.fixture(autouse=True, scope="session")
def _share_the_cores():
    """xdist starts a worker per core, and each worker's parallel kernels would start a thread
    per core. With more threads than cores, every parallel loop waits for threads the other
    workers have descheduled, and the thousands of small kernel calls of the property tests
    pay that each time: the whole suite took 575 s instead of 126 s on 2 cores. Each worker
    takes its share; tests/test_threads.py checks that the kernels give the same bits on one
    thread and on the whole pool."""
    import numba

    numba.set_num_threads(threads_per_worker())
    yield
