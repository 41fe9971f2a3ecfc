import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsim.kernels import dense

# half the sides whole words of 1-byte codes, so that the word path runs often
SIDES = st.one_of(st.integers(1, 40), st.integers(1, 5).map(lambda k: 8 * k))


@settings(max_examples=200, deadline=None)
@given(rows=SIDES, cols=SIDES,
       dtype=st.sampled_from([np.int8, np.uint8, np.int16, np.int32, np.int64, np.float32]),
       into=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_transpose2d_is_the_transpose(rows, cols, dtype, into, seed):
    """Every shape, word-aligned (1- and 2-byte codes move 8 bytes at a time) or not, into a
    new array or a given one; extreme codes included, so no byte leaks into its neighbour."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    a = rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), (rows, cols),
                     endpoint=True).astype(dtype)
    a.flat[rng.integers(a.size)] = info.min
    a.flat[rng.integers(a.size)] = info.max
    out = np.full((cols, rows), 7, dtype) if into else None
    got = dense.transpose2d(a, out=out)
    assert got.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, a.T)
    if into:
        assert got is out
    cast = dense.transpose2d(a[:, ::-1], np.float64)  # a cast, from a strided view
    np.testing.assert_array_equal(cast, a[:, ::-1].T.astype(np.float64))


@settings(max_examples=100, deadline=None)
@given(batch=st.sampled_from([1, 3, 4, 8, 16]), chans=st.integers(1, 3), h=st.integers(1, 6),
       w=st.integers(1, 9), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       stride_w=st.integers(1, 3), dtype=st.sampled_from([np.int8, np.int16, np.int64]),
       seed=st.integers(0, 2**32 - 1))
def test_layout_input_puts_every_pixel_in_its_row(batch, chans, h, w, padding, stride_w,
                                                   dtype, seed):
    """Narrow codes go through a word-at-a-time transpose when the batch and the image fill
    whole words; every path must give the documented layout: row ((c * Hp + iy) * sw + ix %
    sw) * Wq + ix // sw holds padded pixel (c, iy, ix) of every image, zeros in the padding."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (batch, chans, h, w)).astype(dtype)
    ph, pw = padding
    got = dense.layout_input(x, padding, np.float32, stride_w)
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))).astype(np.float32)
    hp, wp = h + 2 * ph, w + 2 * pw
    wq = dense.phase_width(wp, stride_w)
    assert got.shape == (chans * hp * stride_w * wq, batch)
    for c in range(chans):
        for iy in range(hp):
            for ix in range(stride_w * wq):
                row = got[((c * hp + iy) * stride_w + ix % stride_w) * wq + ix // stride_w]
                want = padded[:, c, iy, ix] if ix < wp else 0
                np.testing.assert_array_equal(row, want)
