"""The int8 dot-product kernels (AVX-512 VNNI): exact against int64 arithmetic, and the linear
layers that take them exact against the Python reference. Skipped where the CPU lacks VNNI;
there the float path they replace runs, and the tests at the end cover it on any machine."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsim import QFormat
from fxsim.datapath import Datapath, conv2d, prepare
from fxsim.kernels import dense, int8, int8_sparse
from tests.test_datapath import check_conv, check_linear, datapaths, random_codes

needs_vnni = pytest.mark.skipif(not int8.AVAILABLE, reason="the CPU has no AVX-512 VNNI")


def int8_sums(x, w):
    sums = np.empty((x.shape[0], w.shape[0], 1), np.int32)
    int8.dot_rows(np.ascontiguousarray(x, np.int8), int8.pack_weights(w), sums)
    return sums[:, :, 0]


@needs_vnni
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 40), fan_in=st.integers(1, 300),
       n_out=st.integers(1, 150))
def test_dot_rows_are_exact(seed, batch, fan_in, n_out):
    # batches around the micro-kernel's 4 images and the task's 16, fan-ins with and without
    # a partial last quad, outputs around whole vectors (16) and micro-kernels (64)
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 127, (batch, fan_in), endpoint=True)
    w = rng.integers(-128, 127, (n_out, fan_in), endpoint=True)
    x[0] = -128  # the correction's extreme: sum_k x[k] as negative as it gets
    assert np.array_equal(int8_sums(x, w), x @ w.T)


@needs_vnni
@pytest.mark.parametrize(("x_code", "w_code"), [(-128, -128), (-128, 127), (127, 127),
                                                (127, -128), (0, 127)])
def test_dot_rows_are_exact_up_to_the_int32_bound(x_code, w_code):
    # the largest fan-in whose worst sum, 128 * 128 * K, fits int32; with w = 127 the unsigned
    # weights' sum, 255 * x * K, wraps int32 twice over and the result must still be exact
    fan_in = (2**31 - 1) // (128 * 128)
    x = np.full((5, fan_in), x_code, np.int8)
    w = np.full((17, fan_in), w_code, np.int8)
    assert (int8_sums(x, w) == x_code * w_code * fan_in).all()


def test_pack_weights_layout():
    w = np.arange(-30, 30).reshape(3, 20)  # 3 outputs, 20 inputs: 5 quads, 16 lanes
    packed = int8.pack_weights(w)
    assert packed.shape == (5, 16, 4) and packed.dtype == np.uint8
    assert packed[2, 1, 3] == w[1, 11] + 128
    assert not packed[:, 3:].any()  # padding outputs multiply to zero


def int8_datapath(dp: Datapath, acc_mode=None) -> Datapath:
    """dp with formats of at most 8 bits (codes within a byte) and kernel="dense"."""
    return Datapath(dp.act_fmt, dp.weight_fmt, out_fmt=dp.out_fmt, acc_bits=dp.acc_bits,
                    acc_overflow=dp.acc_overflow, acc_mode=acc_mode or dp.acc_mode,
                    rounding=dp.rounding, overflow=dp.overflow, kernel="dense")


@needs_vnni
@settings(max_examples=80, deadline=None)
@given(dp=datapaths(max_bits=8), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 20),
       fan_in=st.integers(1, 70), n_out=st.sampled_from([25, 40, 64, 65, 130]),
       zeros=st.sampled_from([0, 0.5]))
def test_int8_linear_layers_match_reference(dp, seed, batch, fan_in, n_out, zeros):
    """Every rounding and overflow mode, accumulators of any width applied once (or per MAC
    where no MAC can overflow): the int8 kernel and the requantisation after it, bit for bit
    and counter for counter the Python reference."""
    dp = int8_datapath(dp)
    rng = np.random.default_rng(seed)
    x = random_codes(rng, dp.act_fmt, (batch, fan_in))
    w = random_codes(rng, dp.weight_fmt, (n_out, fan_in), zeros)
    b = random_codes(rng, dp.bias_format, (n_out,)) >> rng.integers(0, 60)
    counters = check_linear(dp, x, w, b)
    if dp.acc_mode == "final":
        assert counters.paths == {"int8": counters.outputs}
    else:  # int8 where the register cannot overflow (an exact sum), else the per-MAC kernels
        assert counters.paths in ({"int8": counters.outputs},
                                  {f"per_mac_{lanes}": counters.outputs
                                   for lanes in ("int8", "float32", "int32", "int64")
                                   if f"per_mac_{lanes}" in counters.paths})


@needs_vnni
def test_int8_path_is_taken_only_where_it_is_exact():
    fmt = QFormat(8, 2)
    rng = np.random.default_rng(3)
    cases = [
        (Datapath(fmt, fmt, kernel="dense"), 30, 0, "int8"),
        (Datapath(fmt, fmt, kernel="dense"), dense.FEW_OUTPUTS, 0, "float32"),  # fused kernel
        # skips zeros: int8 sums where the CPU gathers inputs by lane (VBMI), else float32
        (Datapath(fmt, fmt, kernel="sparse"), 30, 0.5,
         "sparse_int8_gather" if int8_sparse.AVAILABLE else "sparse_float32"),
        # few zeros: the zero-skipping datapath runs densely (filler zeros), counted as skipping
        (Datapath(fmt, fmt, kernel="sparse"), 30, 0.1, "sparse_int8"),
        (Datapath(QFormat(9, 2), fmt, kernel="dense"), 30, 0, "float32"),  # beyond a byte
        (Datapath(fmt, QFormat(8, 2, signed=False), kernel="dense"), 30, 0, "float32"),
    ]
    for dp, n_out, zeros, path in cases:
        w = random_codes(rng, dp.weight_fmt, (n_out, 50), zeros)
        xc = random_codes(rng, dp.act_fmt, (4, 50))
        counters = check_linear(dp, xc, w, np.zeros(n_out, np.int64))
        assert counters.paths == {path: 4 * n_out}, (dp, n_out)
        executed = np.count_nonzero(w) * 4 if dp.kernel == "sparse" else w.size * 4
        assert counters.executed_macs == executed
        assert counters.executed_macs + counters.skipped_macs == counters.macs
    # a fan-in whose worst sum exceeds 2^31 (but not 2^53) runs in float64
    big = 1 << 17
    w = np.full((30, big), -128)
    xb = np.full((1, big), -128)
    _, counters = prepare(w, None, Datapath(fmt, fmt, kernel="dense")).linear(xb)
    assert counters.paths == {"float64": 30}
    assert counters.max_abs_acc == 128 * 128 * big


@settings(max_examples=40, deadline=None)
@given(dp=datapaths(max_bits=8), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 20),
       fan_in=st.integers(1, 70))
def test_linear_layers_without_int8_dot_products_match_reference(dp, seed, batch, fan_in):
    """The float BLAS path that machines without VNNI run, for the layers that take the int8
    kernel here."""
    dp = int8_datapath(dp, acc_mode="final")
    rng = np.random.default_rng(seed)
    x = random_codes(rng, dp.act_fmt, (batch, fan_in))
    w = random_codes(rng, dp.weight_fmt, (40, fan_in), 0.3)
    b = random_codes(rng, dp.bias_format, (40,)) >> rng.integers(0, 60)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8, "AVAILABLE", False)
        counters = check_linear(dp, x, w, b)
    assert counters.paths == {"float32": counters.outputs}


@needs_vnni
@settings(max_examples=80, deadline=None)
@given(dp=datapaths(max_bits=8), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 3),
       channels=st.sampled_from([1, 2, 3, 4, 5, 8, 9]), size=st.integers(1, 9),
       kernel=st.sampled_from([(1, 1), (3, 3), (5, 5), (2, 4), (3, 1)]),
       stride=st.sampled_from([1, 2, 3, (1, 2)]), padding=st.integers(0, 2),
       n_out=st.sampled_from([1, 5, 16, 17, 40, 64, 65, 130]))
def test_int8_convolutions_match_reference(dp, seed, batch, channels, size, kernel, stride,
                                          padding, n_out):
    """Windows laid out pixel by pixel and folded (few channels, see int8.folds), strides in
    both directions, output channels around whole vectors and micro-kernels, every rounding
    and overflow mode: bit for bit and counter for counter the Python reference."""
    kh, kw = kernel
    if size + 2 * padding < max(kh, kw):
        return  # no output: another test's subject
    dp = int8_datapath(dp)
    rng = np.random.default_rng(seed)
    x = random_codes(rng, dp.act_fmt, (batch, channels, size, size + 1))
    w = random_codes(rng, dp.weight_fmt, (n_out, channels, kh, kw), 0.3)
    b = random_codes(rng, dp.bias_format, (n_out,)) >> rng.integers(0, 60)
    if isinstance(stride, tuple):  # the reference takes one stride: compare with the float path
        y, counters = conv2d(x, w, b, dp, stride=stride, padding=padding)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(int8, "AVAILABLE", False)
            y_float, float_counters = conv2d(x, w, b, dp, stride=stride, padding=padding)
        assert np.array_equal(y, y_float)
        assert counters.to_dict() | {"paths": None} == float_counters.to_dict() | {"paths": None}
    else:
        counters = check_conv(dp, x, w, b, stride, padding)
    if dp.acc_mode == "final":
        assert counters.paths == {"int8": counters.outputs}


@needs_vnni
@pytest.mark.parametrize("out_fmt", [QFormat(8, 4), QFormat(16, 2)])
@pytest.mark.parametrize("acc_bits", [None, 17])
def test_int8_convolution_requantised_inside_or_after_the_kernel(out_fmt, acc_bits, monkeypatch):
    """fix<8,4> out: a right shift, requantised inside int8.conv_sums; fix<16,2> out: a left
    shift, which the vectorised requantisation does not take, so the kernel returns int32 sums
    and the general requantisation runs. A 17-bit accumulator overflows (counted either way)."""
    fmt = QFormat(8, 2)
    dp = Datapath(fmt, fmt, out_fmt=out_fmt, acc_bits=acc_bits, kernel="dense")
    rng = np.random.default_rng(5)
    x = random_codes(rng, fmt, (3, 6, 7, 9))
    w = random_codes(rng, fmt, (20, 6, 3, 3))
    b = random_codes(rng, dp.bias_format, (20,)) >> 2
    fused = []
    conv_sums = int8.conv_sums
    monkeypatch.setattr(int8, "conv_sums", lambda *a: fused.append(a[9].size > 0) or conv_sums(*a))
    counters = check_conv(dp, x, w, b, stride=1, padding=1)
    assert counters.paths == {"int8": counters.outputs}
    assert fused and all(fused) == (out_fmt.bits == 8) and any(fused) == (out_fmt.bits == 8)
    assert (counters.acc_overflows > 0) == (acc_bits is not None)


def test_folded_layout_holds_each_window_row():
    x = np.arange(2 * 2 * 3 * 4, dtype=np.int8).reshape(2, 2, 3, 4)  # N, C, H, W
    xp, pixel_sums = int8.layout(x, (1, 1), 3)  # padded 5 x 6, rows of 3 pixels: 4 starts
    assert xp.shape == (2, 5, 4, int8.channel_quads(6))
    # pixel (y, x) holds input columns x - 1 .. x + 1 of padded row y, (kj, c) order
    assert xp[1, 2, 0].tolist() == [0, 0, x[1, 0, 1, 0], x[1, 1, 1, 0], x[1, 0, 1, 1],
                                    x[1, 1, 1, 1], 0, 0]
    assert not xp[:, 0].any() and not xp[:, 4].any()  # padding rows
    assert (pixel_sums == xp.sum(axis=3, dtype=np.int32)).all()
    assert int8.folds(1, 5) and not int8.folds(20, 5) and not int8.folds(3, 3)


def reference_layout(x, padding, fold_kw):
    """int8.layout in numpy: the zero-padded image, each pixel's window row of fold_kw columns
    in (kj, c) order, zeros up to whole quads."""
    n, c, h, w = x.shape
    ph, pw = padding
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), np.int8)
    padded[:, :, ph : ph + h, pw : pw + w] = x
    width = w + 2 * pw - fold_kw + 1
    out = np.zeros((n, h + 2 * ph, width, int8.channel_quads(c * fold_kw)), np.int8)
    for kj in range(fold_kw):
        out[..., kj * c : (kj + 1) * c] = padded[..., kj : kj + width].transpose(0, 2, 3, 1)
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 3),
       channels=st.sampled_from([3, 16, 20, 64, 66, 80, 192]), h=st.integers(1, 5),
       w=st.integers(1, 40), padding=st.integers(0, 2), fold_kw=st.sampled_from([1, 3]),
       biased=st.booleans(), dtype=st.sampled_from([np.int8, np.uint8, np.int16, np.int64]))
def test_layout_matches_numpy(seed, batch, channels, h, w, padding, fold_kw, biased, dtype):
    """Blocks of 64 and of 16 channels turned around in registers (16 pixels at a time, a last
    shorter one, the end of the input by words), other channels word by word, folded rows byte
    by byte, codes of wider dtypes word by word: each against numpy, the pixel sums too, the
    padding and the spare bytes zero."""
    if fold_kw > w + 2 * padding:
        return
    low = 0 if dtype == np.uint8 else -128  # codes that fit int8, in any integer dtype
    x = np.random.default_rng(seed).integers(low, 128, (batch, channels, h, w)).astype(dtype)
    flat, shape, pixel_sums = int8.layout_buffer(x, (padding, padding), fold_kw, spare=9,
                                                 biased=biased)
    expected = reference_layout(x, (padding, padding), fold_kw)
    laid = flat[: expected.size].reshape(shape)
    assert shape == expected.shape and not flat[expected.size :].any()
    if biased:
        assert np.array_equal(laid.view(np.uint8), expected.view(np.uint8) ^ 128)
        assert pixel_sums.size == 0
    else:
        assert np.array_equal(laid, expected)
        assert np.array_equal(pixel_sums, expected.sum(axis=3, dtype=np.int32))


@needs_vnni
def test_auto_skips_zeros_only_well_below_the_int8_dense_speed(monkeypatch):
    """With int8 dot products the dense sums outrun the float zero-skipping kernel down to a
    density of ~0.1 (docs/results/sparse.md): kernel="auto" uses the int8 thresholds there,
    on hosts without the int8 zero-skipping kernel (VNNI without VBMI)."""
    from fxsim.datapath import SPARSE_DENSITY_THRESHOLD
    from fxsim.kernels.sparse import random_mask

    monkeypatch.setattr(int8_sparse, "AVAILABLE", False)
    rng = np.random.default_rng(2)
    fmt = QFormat(8, 2)
    for kind, shape in (("linear", (40, 200)), ("conv", (40, 8, 3, 3))):
        x = random_codes(rng, fmt, (2, 200) if kind == "linear" else (2, 8, 5, 5))
        threshold = SPARSE_DENSITY_THRESHOLD[f"{kind}_int8"]
        assert threshold < SPARSE_DENSITY_THRESHOLD[kind]
        # between the two thresholds: dense here, zero-skipping where the float path runs
        between = (threshold + SPARSE_DENSITY_THRESHOLD[kind]) / 2
        for density, path in ((threshold / 2, "sparse_float32"), (between, "int8")):
            w = np.where(random_mask(shape, density, rng), 3, 0)
            layer = prepare(w, None, Datapath(fmt, fmt))
            _, counters = layer.linear(x) if kind == "linear" else layer.conv2d(x, padding=1)
            assert set(counters.paths) == {path}, (kind, density)


@needs_vnni
@pytest.mark.parametrize(("shape", "kernel", "padding"), [
    ((2, 3, 40, 41), (3, 3), 1),  # 1,640 positions per image: tasks of 25 output rows + 15
    ((1, 2, 2, 1100), (1, 3), 0),  # 1,098 positions in one row: tasks of 1,024 + 74
])
def test_int8_convolution_tasks_across_rows_and_within_a_row(shape, kernel, padding):
    """Images larger than one task (int8.TASK_POSITIONS): bands of output rows, and pieces of
    a row wider than a task, against the float path (itself checked against the reference)."""
    fmt = QFormat(8, 2)
    dp = Datapath(fmt, fmt, acc_bits=16, kernel="dense")  # overflows: counted both ways
    rng = np.random.default_rng(6)
    x = random_codes(rng, fmt, shape)
    w = random_codes(rng, fmt, (20, shape[1], *kernel))
    b = random_codes(rng, dp.bias_format, (20,)) >> 2
    y, counters = conv2d(x, w, b, dp, padding=padding)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8, "AVAILABLE", False)
        y_float, float_counters = conv2d(x, w, b, dp, padding=padding)
    assert counters.paths == {"int8": y.size}
    assert np.array_equal(y, y_float) and counters.acc_overflows > 0
    assert counters.to_dict() | {"paths": None} == float_counters.to_dict() | {"paths": None}


# ------------------------------------------------------------- codes of up to 16 bits: digits


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(3, 1), (2, 5, 3), (1, 4, 2, 3)]))
def test_digits_recompose_the_codes(seed, shape):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-32768, int8.DIGITS_MAX, shape, endpoint=True)
    codes.flat[0], codes.flat[-1] = -32768, int8.DIGITS_MAX
    high, both, low = int8.digits(codes)
    assert high.dtype == low.dtype == both.dtype == np.int8
    assert np.array_equal(256 * high.astype(np.int64) + low, codes)
    assert np.array_equal(both, np.concatenate([high, low], axis=1))
    assert not any(d.any() for d in int8.digits(np.zeros(shape, np.int64)))


def wide_datapath(dp: Datapath) -> Datapath:
    """dp with 16-bit codes (wider than a byte, digits within one), an exact sum."""
    fmt = QFormat(16, 4)
    acc_bits = None if dp.acc_bits is None else max(dp.acc_bits, 32)  # holds one product
    return Datapath(fmt, fmt, out_fmt=dp.out_fmt, acc_bits=acc_bits,
                    acc_overflow=dp.acc_overflow, acc_mode="final", rounding=dp.rounding,
                    overflow=dp.overflow, kernel="dense")


def digit_codes(rng, shape, zeros=0.0, low=-int8.DIGITS_MAX):
    """Codes the digit path takes: weights from -32768, inputs (bounded by their largest
    magnitude) from -DIGITS_MAX."""
    codes = rng.integers(low, int8.DIGITS_MAX, shape, endpoint=True)
    codes[rng.random(shape) < zeros] = 0
    return codes


@needs_vnni
@settings(max_examples=40, deadline=None)
@given(dp=datapaths(max_bits=16), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 9),
       fan_in=st.integers(1, 60), n_out=st.sampled_from([25, 40, 70]))
def test_int8_digit_linear_layers_match_reference(dp, seed, batch, fan_in, n_out):
    """16-bit codes as int8 dot products of their digits (path int8x2): every rounding and
    overflow mode, accumulators of any width, against the Python reference."""
    dp = wide_datapath(dp)
    rng = np.random.default_rng(seed)
    x = digit_codes(rng, (batch, fan_in))
    x[0, 0] = -int8.DIGITS_MAX  # the largest |x| the path takes
    w = digit_codes(rng, (n_out, fan_in), 0.3, low=-32768)
    w[0, 0] = -32768
    b = random_codes(rng, dp.bias_format, (n_out,)) >> rng.integers(0, 40)
    counters = check_linear(dp, x, w, b)
    assert counters.paths == {"int8x2": counters.outputs}


@needs_vnni
@settings(max_examples=30, deadline=None)
@given(dp=datapaths(max_bits=16), seed=st.integers(0, 2**32 - 1),
       channels=st.sampled_from([2, 3, 8]), size=st.integers(3, 7),
       kernel=st.sampled_from([(1, 1), (3, 3), (2, 3)]), stride=st.sampled_from([1, 2]),
       padding=st.integers(0, 2))
def test_int8_digit_convolutions_match_reference(dp, seed, channels, size, kernel, stride,
                                                 padding):
    dp = wide_datapath(dp)
    rng = np.random.default_rng(seed)
    x = digit_codes(rng, (2, channels, size, size + 1))
    w = digit_codes(rng, (17, channels, *kernel), 0.2, low=-32768)
    b = random_codes(rng, dp.bias_format, (17,)) >> rng.integers(0, 40)
    counters = check_conv(dp, x, w, b, stride, padding)
    folded = int8.folds(channels, kernel[1])
    assert counters.paths == {"float64" if folded else "int8x2": counters.outputs}


@needs_vnni
def test_int8_digit_path_is_taken_only_where_it_is_exact():
    fmt = QFormat(16, 4)
    dp = Datapath(fmt, fmt, kernel="dense")
    rng = np.random.default_rng(4)
    w = digit_codes(rng, (30, 40), low=-32768)
    x = digit_codes(rng, (3, 40))
    assert check_linear(dp, x, w, np.zeros(30, np.int64)).paths == {"int8x2": 90}
    top = x.copy()
    top[1, 2] = int8.DIGITS_MAX + 1  # its high digit would be 128
    assert check_linear(dp, top, w, np.zeros(30, np.int64)).paths == {"float64": 90}
    w_top = w.copy()
    w_top[3, 3] = fmt.max_code
    assert check_linear(dp, x, w_top, np.zeros(30, np.int64)).paths == {"float64": 90}
    few = w[: dense.FEW_OUTPUTS]  # the fused few-output kernel's layers
    assert "int8x2" not in check_linear(dp, x, few, np.zeros(len(few), np.int64)).paths
    sparse_dp = Datapath(fmt, fmt, kernel="sparse")
    assert check_linear(sparse_dp, x, w, np.zeros(30, np.int64)).paths == {
        "sparse_float64": 90}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8, "AVAILABLE", False)
        assert check_linear(dp, x, w, np.zeros(30, np.int64)).paths == {"float64": 90}
