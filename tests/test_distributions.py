"""Value distributions (the paper's Figure 5): fxsim.distributions and `fxsim distributions`."""

import json

import numpy as np
import pytest

from fxsim import compress, data, store
from fxsim.distributions import LayerValues, ecdf, layer_values, summarize
from fxsim.fixedpoint import QFormat, dequantize, quantize
from fxsim.models import cifarnet, lenet5
from tests.helpers import run_cli


def _pruned_lenet5(density=0.3):
    model = lenet5(seed=0)
    masks = compress.magnitude_masks(model, density)
    compress.apply_masks(model, masks)
    return model, masks


def test_quantised_model_values_are_its_codes_and_its_outputs():
    model, masks = _pruned_lenet5()
    config = compress.quant_config(model, 4)
    qmodel = compress.quantize_model(model, config, masks)
    images = data.load("sample", "test", limit=6)[0]
    layers = layer_values(qmodel, images, batch_size=4)  # two batches, the second short
    assert [x.layer for x in layers] == ["conv1", "conv2", "fc1", "fc2"]
    for x in layers:
        fmt = QFormat.from_dict(config[x.layer]["weight_fmt"])
        w = np.where(masks[x.layer], model.layer(x.layer).params["weight"], 0)
        expected = dequantize(quantize(w, fmt, config[x.layer]["rounding"]), fmt)
        np.testing.assert_array_equal(x.weights, expected.reshape(-1))
        assert x.weight_limits == (fmt.min_value, fmt.max_value)
        out = QFormat.from_dict(config[x.layer]["out_fmt"])
        assert x.output_limits == (out.min_value, out.max_value)
        assert np.all((x.activations >= out.min_value) & (x.activations <= out.max_value))
        assert np.array_equal(x.activations, np.round(x.activations * 2.0 ** out.frac_bits)
                              / 2.0 ** out.frac_bits)  # on the output grid
    # the last layer's outputs are the logits of the integer datapath, bit for bit
    logits = qmodel.run(images)[0]
    np.testing.assert_array_equal(layers[-1].activations, logits.astype(np.float64).reshape(-1))
    sizes = [6 * 20 * 24 * 24, 6 * 50 * 8 * 8, 6 * 500, 6 * 10]
    assert [x.activations.size for x in layers] == sizes
    stats = summarize(layers, "weights")
    zeros = sum(int(np.count_nonzero(x.weights == 0)) for x in layers)
    assert stats["count"] == 430500 and stats["zero"] == zeros / 430500
    assert stats["zero"] >= 0.7  # the pruned 70 %, and 4-bit rounding adds more


def test_float_model_activations_are_the_batch_norm_outputs():
    model = cifarnet(seed=1)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # statistics and affine terms far from the identity
        if layer.kind == "batchnorm":
            n = layer.params["gamma"].size
            layer.params["gamma"][:] = rng.uniform(0.5, 2, n)
            layer.params["beta"][:] = rng.uniform(-1, 1, n)
            layer.buffers["mean"][:] = rng.uniform(-0.5, 0.5, n)
            layer.buffers["var"][:] = rng.uniform(0.5, 2, n)
    images = rng.random((2, 3, 32, 32), dtype=np.float32)
    layers = layer_values(model, images)
    assert all(x.weight_limits is None and x.output_limits is None for x in layers)
    first_bn = next(i for i, layer in enumerate(model.layers) if layer.kind == "batchnorm")
    y = images
    for layer in model.layers[: first_bn + 1]:
        y, _ = layer.forward(y)
    conv = model.layers[first_bn - 1]
    assert layers[0].layer == conv.name
    np.testing.assert_allclose(layers[0].activations, y.reshape(-1), rtol=1e-4, atol=1e-4)
    bn = model.layers[first_bn]  # the weights too are the folded ones the datapath would use
    scale = bn.params["gamma"] / np.sqrt(bn.buffers["var"] + bn.eps)
    np.testing.assert_allclose(layers[0].weights,
                               (conv.params["weight"] * scale[:, None, None, None]).reshape(-1),
                               rtol=1e-6)
    assert layers[-1].activations.size == 2 * 10


def test_images_of_another_shape_are_refused():
    from fxsim.errors import ShapeError

    with pytest.raises(ShapeError, match=r"lenet5 expects images of shape \(N, 1, 28, 28\)"):
        layer_values(lenet5(), np.zeros((2, 3, 32, 32), np.float32))


def test_summarize_counts_zeros_and_limits_exactly():
    a = LayerValues("a", np.array([0.0, 0.5, -1.0, 0.875, 0.0]), np.array([0.875, 0.25]),
                    (-1.0, 0.875), (-2.0, 1.75))
    b = LayerValues("b", np.array([-0.125, 0.0, -0.875]), np.array([-2.0, 1.75, 0.0]),
                    (-0.875, 0.125), (-2.0, 1.75))
    w = summarize([a, b], "weights")
    assert w["count"] == 8 and w["zero"] == 3 / 8
    assert w["at_limit"] == 3 / 8  # -1 and 0.875 in a; -0.875 in b (its own limits)
    assert (w["min"], w["max"]) == (-1.0, 0.875)
    assert w["mean_abs"] == pytest.approx((0.5 + 1 + 0.875 + 0.125 + 0.875) / 8)
    act = summarize([a, b], "activations")
    assert act["zero"] == 1 / 5 and act["at_limit"] == 2 / 5  # 0.875 < 1.75 is inside
    float_layer = LayerValues("f", np.array([0.0, 2.0]), np.array([1.0]), None, None)
    assert summarize([a, float_layer], "weights")["at_limit"] is None
    empty = summarize([LayerValues("e", np.zeros(0), np.zeros(0), None, None)], "activations")
    assert empty["count"] == 0 and empty["zero"] is None and empty["min"] is None
    with pytest.raises(ValueError, match="which must be"):
        summarize([a], "biases")


def test_ecdf_is_the_fraction_at_or_below():
    rng = np.random.default_rng(3)
    values = rng.integers(-5, 6, 200).astype(float)
    grid = np.arange(-6.5, 7, 0.5)
    expected = [(values <= g).mean() for g in grid]
    np.testing.assert_array_equal(ecdf(values, grid), expected)
    assert np.isnan(ecdf(np.zeros(0), grid)).all()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    model, masks = _pruned_lenet5(0.1)
    pruned = folder / "pruned.h5"
    store.save_model(model, pruned, "sample", masks=masks)
    base = lenet5(seed=0)
    q4 = folder / "q4.h5"
    store.save_model(base, q4, "sample", quant=compress.quant_config(base, 4))
    return pruned, q4


def test_distributions_command(model_files, tmp_path, capsys):
    pruned, q4 = model_files
    plot = tmp_path / "cdf.png"
    code, out, _ = run_cli(["distributions", pruned, q4, "--images", "3", "--json",
                            "--plot", plot], capsys)
    assert code == 0
    summary = json.loads(out)
    assert list(summary) == ["pruned", "q4"]
    assert summary["pruned"]["weights"]["zero"] == pytest.approx(0.9, abs=1e-5)
    assert summary["pruned"]["weights"]["at_limit"] is None
    assert summary["q4"]["activations"]["count"] == 3 * (20 * 24 * 24 + 50 * 64 + 500 + 10)
    assert summary["q4"]["weights"]["max"] <= 0.875  # fix<4,1>
    assert set(summary["q4"]["layers"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(["distributions", q4, "--images", "2"], capsys)
    assert code == 0 and "### weights" in out and "### activations" in out
    row = next(line for line in out.splitlines() if line.startswith("| q4 |"))
    assert row.split("|")[2].strip() == "430,500"


@pytest.mark.parametrize(("args", "message"), [
    (["{missing}"], "no such file"),
    (["{q4}", "--plot", "{nodir}"], "no such directory|does not exist|cannot write"),
    (["{q4}", "--dataset", "no-such-set"], "unknown data set|unknown dataset"),
    # a model of the data set's images named, not only the shapes that do not fit
    (["{q4}", "--dataset", "cifar10"], r"q4\.h5 \(lenet5\) takes \(1, 28, 28\) images, "
                                       r"cifar10 has \(3, 32, 32\)"),
])
def test_distributions_bad_input_exits_2(model_files, tmp_path, capsys, args, message):
    import re

    _, q4 = model_files
    filled = [a.format(missing=tmp_path / "nope.h5", q4=q4, nodir=tmp_path / "x" / "p.png")
              for a in args]
    code, out, err = run_cli(["distributions", *filled], capsys)
    assert code == 2 and re.search(message, err) and err.count("\n") == 1
    assert out == ""
