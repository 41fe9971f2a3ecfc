import numpy as np
import pytest

from fxsim import autograd
from fxsim.errors import ShapeError
from fxsim.layers import (
    Affine,
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Standardize,
)
from fxsim.models import cifarnet, lenet5

EPS = 1e-6


def to_float64(layers):
    for layer in layers:
        for k, v in layer.params.items():
            layer.params[k] = v.astype(np.float64)
        for k, v in layer.buffers.items():
            layer.buffers[k] = v.astype(np.float64)


def numeric_grad(f, array, index):
    old = array[index]
    array[index] = old + EPS
    up = f()
    array[index] = old - EPS
    down = f()
    array[index] = old
    return (up - down) / (2 * EPS)


def check_layer(layer, x, train=False, n_checks=12, seed=0):
    """Analytic input and parameter gradients of sum(forward(x) * r) vs central differences."""
    to_float64([layer])
    rng = np.random.default_rng(seed)
    y, ctx = layer.forward(x, train=train, rng=np.random.default_rng(7))
    r = rng.standard_normal(y.shape)

    def loss():
        out, _ = layer.forward(x, train=train, rng=np.random.default_rng(7))
        return float((out * r).sum())

    dx, grads = layer.backward(r, ctx)
    assert dx.shape == x.shape
    for _ in range(n_checks):
        i = tuple(int(rng.integers(s)) for s in x.shape)
        assert dx[i] == pytest.approx(numeric_grad(loss, x, i), rel=1e-5, abs=1e-7)
    for name, p in layer.params.items():
        assert grads[name].shape == p.shape
        for _ in range(n_checks):
            i = tuple(int(rng.integers(s)) for s in p.shape)
            assert grads[name][i] == pytest.approx(numeric_grad(loss, p, i), rel=1e-5, abs=1e-7)


def images(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize(("stride", "padding", "size"),
                         [(1, 0, (7, 6)), (2, 1, (7, 6)), (1, 2, (7, 6)), (3, 2, (8, 7)),
                          (1, 1, (16, 16))])
def test_conv2d_gradients(stride, padding, size):
    # up to 42 output positions: batch-last columns; 16 x 16 = 256: one GEMM per image
    check_layer(Conv2d(3, 4, 3, stride, padding), images((2, 3, *size)))


def test_conv2d_one_gemm_over_the_batch_matches_a_gemm_per_image(monkeypatch):
    from fxsim import layers

    layer = Conv2d(3, 4, 3, 1, 1)
    to_float64([layer])
    layer.params["bias"] = np.array([0.5, -1.0, 2.0, 0.25])
    x = images((2, 3, 16, 16))  # 256 positions: image-major columns, 27,648 MACs an image
    per_image, _ = layer.forward(x)
    monkeypatch.setattr(layers, "ONE_GEMM_MACS", 0)
    one_gemm, _ = layer.forward(x)
    np.testing.assert_allclose(one_gemm, per_image, rtol=1e-12, atol=1e-12)
    check_layer(layer, x)


def test_linear_relu_flatten_affine_gradients():
    check_layer(Linear(6, 5), images((4, 6)))
    check_layer(ReLU(), images((3, 8)))
    check_layer(Flatten(), images((2, 3, 2, 2)))
    check_layer(Affine(2.0, -1.0), images((2, 4)))


def test_pooling_gradients():
    check_layer(MaxPool2d(2), images((2, 3, 4, 6)))
    check_layer(AvgPool2d(2), images((2, 3, 4, 6)))


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_gradients(train):
    bn = BatchNorm2d(3)
    bn.params["gamma"] = np.array([0.5, 1.5, -1.0])
    bn.params["beta"] = np.array([0.1, 0.0, -0.2])
    bn.buffers["mean"] = np.array([0.1, -0.2, 0.3])
    bn.buffers["var"] = np.array([0.5, 2.0, 1.0])
    check_layer(bn, images((4, 3, 3, 3)), train=train)


def test_dropout_and_standardize_gradients():
    check_layer(Dropout(0.5), images((4, 10)), train=True)
    check_layer(Standardize(), images((3, 2, 4, 4)) * 3 + 1)
    check_layer(Standardize(), np.full((2, 1, 3, 3), 0.5) + images((2, 1, 3, 3)) * 1e-3)


def test_dropout_scales_and_is_identity_in_eval():
    x = np.ones((200, 50), np.float32)
    y, _ = Dropout(0.5).forward(x, train=True, rng=np.random.default_rng(0))
    assert set(np.unique(y).tolist()) == {0.0, 2.0} and abs(y.mean() - 1.0) < 0.05
    assert np.array_equal(Dropout(0.5).forward(x)[0], x)


def test_conv_matches_a_direct_loop():
    conv = Conv2d(2, 3, 3, stride=2, padding=1)
    x = images((1, 2, 5, 5)).astype(np.float32)
    y, _ = conv.forward(x)
    w, b = conv.params["weight"], conv.params["bias"]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for j in range(3):
        for oy in range(3):
            for ox in range(3):
                patch = xp[0, :, oy * 2 : oy * 2 + 3, ox * 2 : ox * 2 + 3]
                assert y[0, j, oy, ox] == pytest.approx(float((patch * w[j]).sum() + b[j]),
                                                        rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------------------- models


def test_model_sizes_match_the_design():
    assert lenet5().num_parameters() == 431_080
    assert 1_250_000 < cifarnet().num_parameters() < 1_350_000
    assert lenet5().forward(np.zeros((2, 1, 28, 28))).shape == (2, 10)
    assert cifarnet().forward(np.zeros((2, 3, 32, 32))).shape == (2, 10)


@pytest.mark.parametrize("build", [lenet5, cifarnet])
def test_model_parameter_gradients(build):
    model = build()
    to_float64(model.layers)
    rng = np.random.default_rng(3)
    x = rng.random((3, *model.input_shape))
    labels = rng.integers(0, 10, 3)
    _, grads = model.loss_and_grads(x, labels, train=False)
    params = model.parameters()
    for name in ("conv1.weight", "fc2.bias") if model.arch == "lenet5" else (
            "conv0.weight", "bn3.gamma", "logits.weight"):
        p = params[name]
        for _ in range(4):
            i = tuple(int(rng.integers(s)) for s in p.shape)

            def loss():
                return model.loss_and_grads(x, labels, train=False)[0]

            assert grads[name][i] == pytest.approx(numeric_grad(loss, p, i), rel=1e-4, abs=1e-8)


def test_input_gradient_is_per_sample_and_batch_independent():
    model = lenet5()
    to_float64(model.layers)
    rng = np.random.default_rng(4)
    x = rng.random((5, 1, 28, 28))
    labels = rng.integers(0, 10, 5)
    g_batch, _ = model.input_gradient(x, labels)
    g_alone, _ = model.input_gradient(x[2:3], labels[2:3])
    np.testing.assert_allclose(g_batch[2:3], g_alone, rtol=1e-10, atol=1e-12)
    i = (2, 0, 14, 13)

    def sample_loss():
        logits = model.forward(x[2:3])
        return float(autograd.softmax_cross_entropy(logits, labels[2:3])[0][0])

    assert g_batch[i] == pytest.approx(numeric_grad(sample_loss, x, i), rel=1e-5, abs=1e-9)
    g_logit, _ = model.input_gradient(x, logit=np.full(5, 3))
    j = (1, 0, 10, 20)

    def logit3():
        return float(model.forward(x)[1, 3])

    assert g_logit[j] == pytest.approx(numeric_grad(logit3, x, j), rel=1e-5, abs=1e-9)


def test_logit_gradients_are_input_gradients_from_one_forward_pass():
    """Model.logit_gradients gives, bit for bit, what input_gradient gives for each chosen
    logit (and the same logits), on a float LeNet5 and on its 8-bit quantised twin, whose STE
    backward keeps what it reuses in the tape; a tape replayed in another order gives the same."""
    from fxsim.compress import quant_config, quantize_model

    rng = np.random.default_rng(5)
    float_model = lenet5()
    x = rng.random((6, 1, 28, 28), dtype=np.float32)
    classes = np.stack([rng.permutation(10)[:4] for _ in range(6)])
    for model in (float_model, quantize_model(float_model, quant_config(float_model, 8))):
        grads, logits = model.logit_gradients(x, classes)
        assert grads.shape == (6, 4, 1, 28, 28)
        for k in range(4):
            want, want_logits = model.input_gradient(x, logit=classes[:, k])
            assert grads.dtype == want.dtype
            assert np.array_equal(grads[:, k], want)
            assert np.array_equal(logits, want_logits)
        assert np.abs(grads).max() > 0  # not trivially equal
        reversed_grads, _ = model.logit_gradients(x, classes[:, ::-1])
        assert np.array_equal(reversed_grads, grads[:, ::-1])
    with pytest.raises(ShapeError, match=r"classes must be \(6, K\)"):
        float_model.logit_gradients(x, classes[:, 0])
    with pytest.raises(ShapeError, match=r"outside 0\.\.9"):
        float_model.logit_gradients(x, classes + 10)


def test_model_rejects_bad_inputs():
    model = lenet5()
    with pytest.raises(ShapeError, match=r"lenet5 expects images of shape \(N, 1, 28, 28\)"):
        model.forward(np.zeros((2, 3, 28, 28)))
    with pytest.raises(ShapeError, match=r"label 10 is outside 0\.\.9"):
        model.loss_and_grads(np.zeros((2, 1, 28, 28)), np.array([1, 10]))


def test_empty_batches_pass_through_inference_and_are_refused_for_a_loss():
    from fxsim.errors import FxsimError
    from fxsim.models import cifarnet, lenet5

    for model, shape in ((lenet5(), (1, 28, 28)), (cifarnet(), (3, 32, 32))):
        empty = np.zeros((0, *shape), np.float32)
        assert model.forward(empty).shape == (0, 10)
        assert model.input_gradient(empty, np.zeros(0, int))[0].shape == empty.shape
        with pytest.raises(FxsimError, match="at least one image"):
            model.loss_and_grads(empty, np.zeros(0, int))
        # the documented call needs no generator: dropout then draws from a seeded one
        x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
        loss_a, grads_a = model.loss_and_grads(x, np.array([1, 2]))
        loss_b, grads_b = model.loss_and_grads(x, np.array([1, 2]))
        assert loss_a == loss_b and all(np.array_equal(grads_a[k], grads_b[k]) for k in grads_a)
