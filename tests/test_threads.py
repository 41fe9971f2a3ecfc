"""Same bits on any number of threads. The other tests run one thread per xdist worker
(tests/conftest.py); here each layer also runs on the whole Numba pool, whose task splits
(blocks of positions, panels, bands of rows, chunks of stored weights) then differ."""

import contextlib

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsim import QFormat, autograd, code_dtype
from fxsim.datapath import Datapath, prepare
from fxsim.models import cifarnet, lenet5
from tests.test_kernels_sparse import ROUNDINGS, make_weights, random_bias

needs_pool = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                reason="Numba's pool has one thread")


@contextlib.contextmanager
def threads(n: int):
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def on_one_and_all(run):
    """``run()`` on one thread and on the whole pool: both results."""
    with threads(1):
        one = run()
    with threads(numba.config.NUMBA_NUM_THREADS):
        every = run()
    return one, every


@st.composite
def layers(draw):
    bits = draw(st.sampled_from([4, 8, 12, 16]))
    fmt = QFormat(bits, 2)
    per_mac = draw(st.booleans())
    dp = Datapath(fmt, fmt, acc_bits=draw(st.integers(2 * bits, 2 * bits + 8)) if per_mac
                  else None, acc_mode="per_mac" if per_mac else "final",
                  rounding=draw(st.sampled_from(ROUNDINGS)),
                  kernel=draw(st.sampled_from(["dense", "sparse"])))
    return dp, draw(st.sampled_from(["random", "dense", "empty_rows"])), draw(
        st.integers(0, 2**32 - 1))


@needs_pool
@settings(max_examples=40, deadline=None)
@given(case=layers(), conv=st.booleans(), channels=st.sampled_from([3, 20, 64]),
       batch=st.integers(1, 40), narrow=st.booleans())
def test_layers_give_the_same_bits_on_any_thread_count(case, conv, channels, batch, narrow):
    dp, mask_kind, seed = case
    rng = np.random.default_rng(seed)
    fmt = dp.act_fmt
    shape = (batch, channels, 9, 10) if conv else (batch, channels * 9)
    x = rng.integers(fmt.min_code, fmt.max_code, shape, endpoint=True)
    w_shape = (70, channels, 3, 3) if conv else (70, channels * 9)
    w, mask = make_weights(rng, dp, w_shape, mask_kind)
    layer = prepare(w, random_bias(rng, dp, 70), dp, mask)
    out_dtype = code_dtype(dp.output_fmt) if narrow else None
    x = x.astype(code_dtype(fmt)) if narrow else x

    def run():
        return (layer.conv2d(x, 1, 1, out_dtype) if conv else layer.linear(x, out_dtype))

    (y1, c1), (y2, c2) = on_one_and_all(run)
    assert np.array_equal(y1, y2) and c1 == c2


@needs_pool
@pytest.mark.parametrize(("make", "batch"), [(lenet5, 37), (cifarnet, 5)])
def test_a_float_model_and_its_gradients_on_any_thread_count(make, batch):
    # CifarNet: batch normalisation's channel sums, one GEMM over the batch for conv0 / conv1
    model = make()
    x = np.random.default_rng(3).random((batch, *model.input_shape)).astype(np.float32)

    def run():
        logits, tape = autograd.forward(model.layers, x, train=True,
                                        rng=np.random.default_rng(5))
        dx, grads = autograd.backward(tape, np.cos(logits))
        return logits, dx, grads

    (y1, dx1, g1), (y2, dx2, g2) = on_one_and_all(run)
    assert np.array_equal(y1, y2) and np.array_equal(dx1, dx2) and g1.keys() == g2.keys()
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)
