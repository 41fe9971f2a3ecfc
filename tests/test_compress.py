import itertools

import numpy as np
import pytest

from fxsim import data
from fxsim.compress import (
    apply_masks,
    density_report,
    fold_batchnorm,
    magnitude_masks,
    quant_config,
    quantize_model,
)
from fxsim.datapath import Datapath
from fxsim.errors import FxsimError
from fxsim.fixedpoint import dequantize, quantize
from fxsim.models import cifarnet, lenet5
from tests.helpers import run_cli


def fake_quant_lenet5(model, config, x):
    """Independent float64 reference: quantize/dequantize around float64 layers."""
    dps = {name: Datapath.from_dict(d) for name, d in config.items()}

    def q(values, fmt):
        return dequantize(quantize(values, fmt), fmt)

    def conv(v, w, b):
        n, _, h, wd = v.shape
        j, _, k, _ = w.shape
        oh, ow = h - k + 1, wd - k + 1
        out = np.zeros((n, j, oh, ow))
        for ki in range(k):
            for kj in range(k):
                patch = v[:, :, ki : ki + oh, kj : kj + ow]
                out += np.einsum("nchw,jc->njhw", patch, w[:, :, ki, kj])
        return out + b[None, :, None, None]

    def pool(v):
        n, c, h, w = v.shape
        return v.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))

    def params(name):
        dp = dps[name]
        layer = model.layer(name)
        return (q(layer.params["weight"].astype(np.float64), dp.weight_fmt),
                q(layer.params["bias"].astype(np.float64), dp.bias_format), dp.output_fmt)

    v = q(2.0 * x.astype(np.float64) - 1.0, dps["conv1"].act_fmt)
    for name in ("conv1", "conv2"):
        w, b, out = params(name)
        v = pool(np.maximum(q(conv(v, w, b), out), 0))
    v = v.reshape(len(v), -1)
    w, b, out = params("fc1")
    v = np.maximum(q(v @ w.T + b, out), 0)
    w, b, out = params("fc2")
    return q(v @ w.T + b, out)


@pytest.fixture(scope="module")
def trained_lenet():
    from fxsim.train import TrainConfig, train

    x, y = data.load("sample", "train", limit=2000)
    model = lenet5(seed=0)
    train(model, x, y, TrainConfig(epochs=1, batch_size=64))
    return model


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_wide_accumulator_logits_equal_fake_quant_reference(trained_lenet, bits):
    config = quant_config(trained_lenet, bits)
    qmodel = quantize_model(trained_lenet, config)
    x, _ = data.load("sample", "test", limit=64)
    logits, counters, _ = qmodel.run(x)
    assert np.array_equal(logits, fake_quant_lenet5(trained_lenet, config, x))
    assert set(counters) == {"conv1", "conv2", "fc1", "fc2"}
    assert all(c.acc_overflows == 0 for c in counters.values())


def test_narrow_per_mac_differs_only_where_counters_say_so(trained_lenet):
    x, _ = data.load("sample", "test", limit=64)
    wide_out = {"bits": 16, "int_bits": 10, "signed": True}  # wider than a 16-bit register

    def config(**acc):
        c = quant_config(trained_lenet, 8, **acc)
        for d in c.values():
            d["out_fmt"] = wide_out
        return c

    wide = quantize_model(trained_lenet, config())
    narrow = quantize_model(trained_lenet, config(acc_bits=16, acc_mode="per_mac"))
    value = x.astype(np.float32)
    total_events = total_diff = 0
    for i, layer in enumerate(wide.layers):
        y_wide, ctx_wide = layer.forward(value)
        if isinstance(ctx_wide, dict) and "counters" in ctx_wide:
            y_narrow, ctx = narrow.layers[i].forward(value)
            differing = int((y_narrow != y_wide).sum())
            events = ctx["counters"].acc_overflows
            assert differing <= events, layer.name  # every changed output needs an overflow
            total_events += events
            total_diff += differing
        value = y_wide
    assert total_events > 0 and total_diff > 0  # the case does exercise overflow
    roomy = quantize_model(trained_lenet, quant_config(trained_lenet, 8, acc_bits=40,
                                                       acc_mode="per_mac"))
    l_roomy, c_roomy, _ = roomy.run(x)
    assert sum(c.acc_overflows for c in c_roomy.values()) == 0
    l_wide, _, _ = quantize_model(trained_lenet, quant_config(trained_lenet, 8)).run(x)
    assert np.array_equal(l_roomy, l_wide)


def test_batchnorm_folding_keeps_the_function():
    model = cifarnet(seed=2)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if "gamma" in layer.params:
            layer.params["gamma"][:] = rng.uniform(0.5, 1.5, layer.params["gamma"].shape)
            layer.buffers["mean"][:] = rng.normal(0, 0.1, layer.buffers["mean"].shape)
            layer.buffers["var"][:] = rng.uniform(0.5, 2, layer.buffers["var"].shape)
    x = rng.random((3, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(fold_batchnorm(model).forward(x), model.forward(x),
                               rtol=1e-4, atol=1e-4)


def test_cifarnet_quantises_with_exact_average_pool():
    model = cifarnet(seed=0)
    config = quant_config(model, 8)
    assert config["logits"]["act_fmt"]["bits"] == 14  # 8 + log2(64) fraction bits
    logits, counters, _ = quantize_model(model, config).run(
        np.random.default_rng(0).random((2, 3, 32, 32)))
    assert logits.shape == (2, 10) and len(counters) == 9


def test_inference_goes_in_chunks_that_bound_the_columns_and_change_no_bit(monkeypatch):
    from fxsim import models

    # CifarNet's conv1 builds 576 x 900 float32 columns an image (2 MB): 64 images a chunk;
    # LeNet5's largest (conv2, 500 x 64) are 128 KB: its batches of 1,000 stay whole
    assert cifarnet(seed=0)._chunk(1000) == 64
    assert lenet5(seed=0)._chunk(1000) == 1000
    assert lenet5(seed=0)._chunk(7) == 7
    qmodel = quantize_model(lenet5(seed=0), quant_config(lenet5(seed=0), 8))
    x = np.random.default_rng(1).random((9, 1, 28, 28))
    whole = qmodel.run(x)
    monkeypatch.setattr(models, "CHUNK_BYTES", 2 * 128_000)  # 2 images a chunk
    chunked_model = quantize_model(lenet5(seed=0), quant_config(lenet5(seed=0), 8))
    assert chunked_model._chunk(1000) == 2
    chunked = chunked_model.run(x)
    assert np.array_equal(chunked[0], whole[0])  # the integer datapath: exact in any chunks
    assert chunked[1] == whole[1] and chunked[2] == whole[2]
    assert np.array_equal(chunked_model.predict(x), qmodel.predict(x))


def test_magnitude_pruning_hits_the_density():
    model = lenet5(seed=0)
    masks = magnitude_masks(model, 0.1)
    apply_masks(model, masks)
    report = density_report(model, masks)
    assert all(abs(d - 0.1) < 0.001 for d in report["layers"].values())
    kept = model.layer("fc1").params["weight"][masks["fc1"]]
    pruned = model.layer("fc1").params["weight"][~masks["fc1"]]
    assert np.all(pruned == 0) and np.abs(kept).min() >= np.abs(pruned).max()


def test_bad_compression_requests():
    model = lenet5()
    for bad in (0.0, -1, 1.5):
        with pytest.raises(FxsimError, match=r"density must be in \(0, 1\]"):
            magnitude_masks(model, bad)
    config = quant_config(model, 8)
    config["conv9"] = config["conv1"]
    with pytest.raises(FxsimError, match="names layers the model lacks: conv9"):
        quantize_model(model, config)


# ---------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def baseline_file(tmp_path_factory):
    from fxsim import store

    x, y = data.load("sample", "train", limit=1500)
    from fxsim.train import TrainConfig, train

    model = lenet5(seed=0)
    train(model, x, y, TrainConfig(epochs=1, batch_size=64))
    path = tmp_path_factory.mktemp("models") / "base.h5"
    store.save_model(model, path, "sample")
    return path


def test_prune_quantize_simulate_pipeline(baseline_file, tmp_path, capsys):
    from fxsim import store

    pruned = tmp_path / "p.h5"
    code, out, _ = run_cli(["prune", baseline_file, "--density", "0.2", "--scope", "global",
                            "--finetune-epochs", "1", "--limit", "300", "-o", pruned], capsys)
    assert code == 0 and "density 0.2000" in out
    model, info = store.load_model(pruned)
    for name, mask in info["masks"].items():
        assert np.all(model.layer(name).params["weight"][~mask] == 0)
    assert info["provenance"]["parent"] == str(baseline_file)
    quantised = tmp_path / "q.h5"
    code, out, _ = run_cli(["quantize", pruned, "--bits", "8", "--finetune-epochs", "1",
                            "--limit", "300", "-o", quantised], capsys)
    assert code == 0 and "8-bit, bit-accurate test accuracy" in out
    model, info = store.load_model(quantised)
    assert set(info["quant"]) == {"conv1", "conv2", "fc1", "fc2"} and info["masks"]
    for name, mask in info["masks"].items():  # still pruned after quantisation-aware tuning
        assert np.all(model.layer(name).params["weight"][~mask] == 0)
    code, out, _ = run_cli(["simulate", quantised, "--n", "200", "--json"], capsys)
    result = __import__("json").loads(out)
    assert code == 0 and result["images"] == 200 and 0 <= result["accuracy"] <= 1
    assert abs(result["accuracy"] - info["metrics"]["test_acc"]) < 0.1
    conv2 = result["layers"]["conv2"]
    assert conv2["executed_macs"] + conv2["skipped_macs"] == conv2["macs"]
    code, out, _ = run_cli(["simulate", quantised, "--n", "50", "--acc-bits", "16",
                            "--acc-mode", "per_mac"], capsys)
    assert code == 0 and "acc overflows" in out
    code, out, _ = run_cli(["simulate", quantised, "--n", "200"], capsys)  # the counts, exact
    row = next(line.split() for line in out.splitlines() if line.startswith("conv2 "))
    assert row[1:4] == [f"{conv2[k]:,}" for k in ("macs", "executed_macs", "skipped_macs")]


@pytest.mark.parametrize(("args", "message"), [
    (["prune", "{base}", "--density", "0", "-o", "{out}"], r"density must be in \(0, 1\]"),
    (["prune", "{base}", "--density", "1.5", "-o", "{out}"], r"density must be in \(0, 1\]"),
    (["quantize", "{base}", "--bits", "1", "-o", "{out}"], "bitwidth must be an integer"),
    (["quantize", "{base}", "--bits", "8", "--acc-bits", "10", "-o", "{out}"],
     "acc_bits 10 cannot hold one product"),
    (["simulate", "{base}"], "float model: give --bits"),
    (["simulate", "{missing}", "--bits", "8"], "no such file"),
])
def test_compression_bad_input_exits_2_and_writes_nothing(baseline_file, tmp_path, capsys,
                                                          args, message):
    import re

    out = tmp_path / "out.h5"
    filled = [a.format(base=baseline_file, out=out, missing=tmp_path / "nope.h5") for a in args]
    code, _, err = run_cli(filled, capsys)
    assert code == 2 and re.search(message, err) and err.count("\n") == 1
    assert not out.exists()


def test_training_passes_run_dense_kernels_with_the_same_bits():
    """kernel="auto" on a sparse model: evaluation takes the zero-skipping kernel, a training
    pass (weights prepared for one step) the dense one; the outputs are the same bits."""
    model = lenet5(seed=0)
    masks = magnitude_masks(model, 0.05, scope="global")
    apply_masks(model, masks)
    qmodel = quantize_model(model, quant_config(model, 8), masks)
    images = data.load("sample", "test", limit=16)[0]
    inputs = qmodel.layer_outputs(images, ["pool1", "flatten"])
    for name, x in (("conv2", inputs["pool1"]), ("fc1", inputs["flatten"])):
        layer = qmodel.layer(name)
        y_eval, ctx_eval = layer.forward(x, False)
        y_train, ctx_train = layer.forward(x, True)
        assert np.array_equal(y_eval, y_train) and y_eval.dtype == y_train.dtype
        eval_paths, train_paths = ctx_eval["counters"].paths, ctx_train["counters"].paths
        assert all(p.startswith("sparse") for p in eval_paths), eval_paths
        assert not any(p.startswith("sparse") for p in train_paths), train_paths
        y_again, _ = layer.forward(x, False)  # back to evaluation: zero-skipping again
        assert np.array_equal(y_again, y_eval)


def test_clipped_ste_gradients():
    from fxsim.fixedpoint import QFormat
    from fxsim.layers import Linear
    from fxsim.qlayers import QuantLinear

    fmt = QFormat(8, 2)
    rng = np.random.default_rng(0)
    float_layer = Linear(6, 4)
    float_layer.params["weight"] = rng.uniform(-0.5, 0.5, (4, 6)).astype(np.float32)
    float_layer.params["weight"][0, 0] = 3.0  # outside fix<8,2>: clipped to 1.984375
    q = QuantLinear(float_layer, Datapath(fmt, fmt))
    x = dequantize(quantize(rng.uniform(-1, 1, (5, 6)), fmt), fmt).astype(np.float32)
    y, ctx = q.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, grads = q.backward(dy, ctx)
    w_q = dequantize(quantize(float_layer.params["weight"], fmt), fmt)
    live = (np.abs(y) < 1.984375) & (y > -2)  # outputs that did not saturate
    dy_live = np.where(live, dy, 0)
    np.testing.assert_allclose(dx, dy_live @ w_q, rtol=1e-6, atol=1e-6)
    expected_w = dy_live.T @ x
    expected_w[0, 0] = 0.0  # the clipped weight gets no gradient
    np.testing.assert_allclose(grads["weight"], expected_w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads["bias"], dy_live.sum(axis=0), rtol=1e-6, atol=1e-6)


def test_dns_rule_has_hysteresis():
    from fxsim.compress import dns_update

    w = np.array([0.0, 0.5, 0.95, 1.0, 1.05, 1.2, 3.0])  # mean|w| + alpha std|w| = t
    alpha = (1.0 - np.abs(w).mean()) / np.abs(w).std()  # t = 1
    assert dns_update(w, None, alpha).tolist() == [0, 0, 0, 0, 1, 1, 1]
    previous = np.array([1, 1, 1, 1, 0, 0, 0], bool)
    # kept if above 1.1 or (kept before and above 0.9)
    assert dns_update(w, previous, alpha).tolist() == [0, 0, 1, 1, 0, 1, 1]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_dns_lands_on_the_density_and_zeroes_pruned_weights(scope):
    from fxsim.compress import dns_prune
    from fxsim.train import TrainConfig

    x, y = data.load("sample", "train", limit=600)
    model = lenet5(seed=0)
    masks, history = dns_prune(model, x, y, 0.2, TrainConfig(epochs=2, batch_size=64), scope,
                               interval=3)
    report = density_report(model, masks)
    assert abs(report["overall"] - 0.2) <= 0.01 * 0.2
    if scope == "layer":
        assert all(abs(d - 0.2) <= 0.002 for d in report["layers"].values())
    for name, mask in masks.items():
        assert np.all(model.layer(name).params["weight"][~mask] == 0)
    assert len(history) == 2 and history[-1]["loss"] < history[0]["loss"] * 1.5


def test_dns_cut_short_resumes_from_its_checkpoint_with_the_same_bits(tmp_path):
    """DNS's masks change while it trains: they are kept in the checkpoint with the rest, and
    a run cut short in its second epoch ends with the masks and weights of one never cut."""
    from fxsim.compress import dns_prune
    from fxsim.train import TrainConfig

    x, y = data.load("sample", "train", limit=320)
    config = TrainConfig(epochs=3, batch_size=32, seed=2)
    whole = lenet5(seed=0)
    expected_masks, _ = dns_prune(whole, x, y, 0.2, config, "global", interval=3)

    def cut(event):
        if event.get("epoch") == 1 and event.get("batch") == 4:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "dns.checkpoint"
    with pytest.raises(KeyboardInterrupt):
        dns_prune(lenet5(seed=0), x, y, 0.2, config, "global", 3, cut, checkpoint)
    resumed, events = lenet5(seed=0), []
    masks, history = dns_prune(resumed, x, y, 0.2, config, "global", 3, events.append,
                               checkpoint)
    assert [e["epoch"] for e in events if e.get("resumed")] == [1]
    assert len(history) == 3
    for name, mask in expected_masks.items():
        assert np.array_equal(masks[name], mask), name
    for name, value in whole.parameters().items():
        assert np.array_equal(resumed.parameters()[name], value), name
    # another density is another run: its checkpoint is not this one's
    other, events = lenet5(seed=0), []
    dns_prune(other, x, y, 0.3, TrainConfig(epochs=1, batch_size=32, seed=2), "global", 3,
              events.append, checkpoint)
    assert not any(e.get("resumed") for e in events)


def test_separate_weight_and_activation_formats(trained_lenet):
    config = quant_config(trained_lenet, 8, weight_bits=4)
    assert config["fc1"]["act_fmt"] == {"bits": 8, "int_bits": 2, "signed": True}
    assert config["fc1"]["weight_fmt"] == {"bits": 4, "int_bits": 1, "signed": True}
    config = quant_config(trained_lenet, 12, int_bits=5, weight_bits=6, weight_int_bits=0)
    assert config["conv1"]["act_fmt"]["int_bits"] == 5
    assert config["conv1"]["weight_fmt"] == {"bits": 6, "int_bits": 0, "signed": True}
    x, _ = data.load("sample", "test", limit=32)
    logits, _, _ = quantize_model(trained_lenet, config).run(x)
    assert logits.shape == (32, 10)


def test_fewest_int_bits_is_exact():
    from fxsim.compress import fewest_int_bits

    values = np.array([0.1, -0.5, 0.9, 1.5, -3.9])
    assert fewest_int_bits(values, 8, 0.0) == 3  # fix<8,3> holds [-4, 3.96875]
    assert fewest_int_bits(values, 8, 0.2) == 2  # one of five (-3.9) may overflow
    assert fewest_int_bits(np.array([0.01, -0.02]), 8, 0.0) == -4  # fix<8,-4>: |x| < 1/32


def test_dynamic_fixed_point_chains_formats_and_beats_the_preset(trained_lenet):
    from fxsim.compress import auto_quant_config

    calibration, _ = data.load("sample", "train", limit=500)
    config = auto_quant_config(trained_lenet, 8, calibration)
    names = ["conv1", "conv2", "fc1", "fc2"]
    for before, after in itertools.pairwise(names):
        assert config[after]["act_fmt"] == config[before]["out_fmt"]
    x, y = data.load("sample", "test")
    auto = (quantize_model(trained_lenet, config).run(x)[0].argmax(1) == y).mean()
    preset_config = quant_config(trained_lenet, 8)
    preset = (quantize_model(trained_lenet, preset_config).run(x)[0].argmax(1) == y).mean()
    float_acc = (trained_lenet.predict(x) == y).mean()
    assert auto >= preset and auto >= float_acc - 0.02


def test_quantize_command_with_auto_int_bits(baseline_file, tmp_path, capsys):
    from fxsim import store

    out = tmp_path / "auto.h5"
    code, text, _ = run_cli(["quantize", baseline_file, "--bits", "8", "--int-bits", "auto",
                             "--calibration", "200", "-o", out], capsys)
    assert code == 0 and "8-bit" in text
    _, info = store.load_model(out)
    assert info["provenance"]["int_bits"] == "auto"
    code, _, err = run_cli(["quantize", baseline_file, "--bits", "8", "--int-bits", "two",
                            "-o", out.with_name("x.h5")], capsys)
    assert code == 2 and "--int-bits must be an integer or 'auto'" in err


def test_input_quantizer_counts_overflows_and_clips_gradients():
    from fxsim.fixedpoint import QFormat
    from fxsim.qlayers import QuantizeInput

    fmt = QFormat(8, 2)  # max value 1.984375, step 1/64
    layer = QuantizeInput(fmt)
    x = np.array([[fmt.max_value + fmt.step / 4, 5.0, 0.5]])
    y, ctx = layer.forward(x)
    assert y.tolist() == [[fmt.max_value, fmt.max_value, 0.5]]
    assert ctx["saturations"] == 1  # 5.0 overflows; the first value rounds onto the grid
    dx, _ = layer.backward(np.ones_like(x), ctx)
    assert dx.tolist() == [[0.0, 0.0, 1.0]]  # no gradient beyond the format's range
