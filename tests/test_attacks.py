import numpy as np
import pytest

from fxsim import attacks, data
from fxsim.errors import FxsimError
from fxsim.layers import Flatten, Linear
from fxsim.models import Model, lenet5
from tests.helpers import run_cli


def linear_model(weight, bias):
    """A 1x2x2-pixel, affine classifier whose gradients are known in closed form."""
    layer = Linear(4, len(weight), name="fc")
    layer.params = {"weight": np.asarray(weight, np.float64),
                    "bias": np.asarray(bias, np.float64)}
    return Model([Flatten(name="flat"), layer], (1, 2, 2), len(weight), arch="affine")


W2 = [[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 2.0]]


def test_fgsm_is_one_signed_step_then_clipped():
    model = linear_model(W2, [0.0, 0.0])
    x = np.array([[[[0.5, 0.99], [0.01, 0.5]]]])
    # d CE(label 0)/dx = (p1)(w1 - w0): its sign is sign(w1 - w0) = (-, +, -, +)
    result = attacks.fgsm(model, x, np.array([0]), eps=0.1)
    expected = np.clip(x + 0.1 * np.sign(np.array(W2[1]) - np.array(W2[0])).reshape(x.shape),
                       0, 1)
    np.testing.assert_allclose(result.adversarial, expected, rtol=1e-6)
    assert result.linf[0] == pytest.approx(0.1, rel=1e-5)


def test_ifgsm_iterates_stay_in_the_box_and_the_ball():
    model = linear_model(W2, [0.0, 0.0])
    x = np.full((3, 1, 2, 2), 0.5)
    free = attacks.ifgsm(model, x, np.zeros(3, int), eps=0.1, steps=12)
    # 12 steps of 0.1 from 0.5 along fixed signs end at the box edges
    np.testing.assert_allclose(free.adversarial[0].ravel(), [0, 1, 0, 1], atol=1e-6)
    ball = attacks.ifgsm(model, x, np.zeros(3, int), eps=0.1, steps=12, radius=0.25)
    assert np.all(np.abs(ball.adversarial - x) <= 0.25 + 1e-6)
    assert ball.linf.max() == pytest.approx(0.25, rel=1e-5)


def test_deepfool_on_an_affine_classifier_lands_past_the_boundary():
    model = linear_model(W2, [0.3, 0.0])
    x = np.array([[[[0.6, 0.1], [0.4, 0.3]]]])
    f = model.forward(x)[0]
    assert f[0] - f[1] == pytest.approx(0.8)  # class 0 by a clear margin
    w = np.array(W2[1]) - np.array(W2[0])
    gap = f[1] - f[0]
    step = (abs(gap) + 1e-4) / (w @ w) * w  # the closed-form step to the boundary
    result = attacks.deepfool(model, x, overshoot=0.02)
    np.testing.assert_allclose(result.adversarial.ravel(), x.ravel() + 1.02 * step, rtol=1e-5)
    assert result.success[0] and result.iterations[0] == 1


@pytest.fixture(scope="module")
def trained():
    from fxsim.train import TrainConfig, train

    x, y = data.load("sample", "train")
    model = lenet5(seed=0)
    train(model, x, y, TrainConfig(epochs=3, batch_size=64, lr_decays=()))
    xt, yt = data.load("sample", "test", limit=300)
    return model, xt, yt


def test_invariants_batch_independence_no_mutation_determinism(trained):
    model, x, y = trained
    x, y = x[:20].copy(), y[:20]
    before = x.copy()
    whole = attacks.ifgsm(model, x, y, eps=0.02, steps=3)
    alone = attacks.ifgsm(model, x[7:8], y[7:8], eps=0.02, steps=3)
    again = attacks.ifgsm(model, x, y, eps=0.02, steps=3, batch_size=6)
    assert np.array_equal(x, before)  # inputs untouched
    assert np.array_equal(whole.adversarial[7:8], alone.adversarial)
    assert np.array_equal(whole.adversarial, again.adversarial)
    assert whole.adversarial.min() >= 0 and whole.adversarial.max() <= 1


def test_continuous_attacks_are_bit_identical_alone_and_in_any_batch(trained):
    # DeepFool and IFGM move by gradient magnitudes, so a last-bit difference in a gradient
    # would carry on; float32 GEMM picks kernels by matrix size, so attacks evaluate the model
    # on fixed-size chunks. 100 images span two chunks (attacks.CHUNK = 64).
    model, x, y = trained
    x, y = x[:100], y[:100]
    assert len(x) > attacks.CHUNK
    for run in (lambda a, b, **k: attacks.deepfool(model, a, b, max_iter=10, **k),
                lambda a, b, **k: attacks.ifgm(model, a, b, eps=0.5, steps=3, **k)):
        whole = run(x, y).adversarial
        assert np.array_equal(whole, run(x, y, batch_size=7).adversarial)
        for i in (3, 70):
            assert np.array_equal(whole[i : i + 1], run(x[i : i + 1], y[i : i + 1]).adversarial)


def test_paper_settings_break_a_trained_lenet5(trained):
    model, x, y = trained
    clean = (model.predict(x) == y).mean()
    assert clean > 0.75
    adv = attacks.ifgsm(model, x, y, eps=0.02, steps=12)
    assert (model.predict(adv.adversarial) == y).mean() < 0.10
    correct = model.predict(x) == y
    df = attacks.deepfool(model, x[correct][:100])
    assert df.success.mean() >= 0.95
    assert 0 < np.median(df.l2) < 5  # small L2 perturbations


def test_targeted_attack_reaches_its_target(trained):
    model, x, y = trained
    target = (y[:50] + 1) % 10
    result = attacks.ifgsm(model, x[:50], y[:50], eps=0.02, steps=20, target=target)
    assert result.success.mean() > 0.8
    assert np.array_equal(model.predict(result.adversarial) == target, result.success)


def test_gradient_masking_is_reported():
    model = linear_model([[0.0] * 4, [0.0] * 4], [1.0, 0.0])  # constant logits: zero gradient
    result = attacks.fgsm(model, np.full((2, 1, 2, 2), 0.5), np.array([0, 0]), eps=0.1)
    assert result.gradient_masked.all() and not result.success.any()
    assert np.array_equal(result.adversarial, np.full((2, 1, 2, 2), 0.5, np.float32))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"eps": -0.1}, "eps must be >= 0"),
    ({"eps": np.inf}, "eps must be >= 0 and finite in float32, got inf"),
    ({"eps": 1e39}, r"finite in float32, got 1e\+39"),  # float32's inf
    ({"steps": 0}, "steps must be an integer >= 1"),
])
def test_bad_attack_arguments(kwargs, message):
    model = linear_model(W2, [0, 0])
    x = np.full((1, 1, 2, 2), 0.5)
    with pytest.raises(FxsimError, match=message):
        attacks.ifgsm(model, x, np.array([0]), **{"eps": 0.1, "steps": 2, **kwargs})


def test_bad_images_and_labels():
    model = linear_model(W2, [0, 0])
    with pytest.raises(FxsimError, match=r"clip box \[0.0, 1.0\]"):
        attacks.fgsm(model, np.full((1, 1, 2, 2), 1.5), np.array([0]), eps=0.1)
    with pytest.raises(FxsimError, match="attacks need images of shape"):
        attacks.fgsm(model, np.zeros((1, 3, 2, 2)), np.array([0]), eps=0.1)
    with pytest.raises(FxsimError, match=r"labels must lie in 0\.\.1"):
        attacks.fgsm(model, np.zeros((1, 1, 2, 2)), np.array([5]), eps=0.1)
    for method in ("fgsm", "ifgsm", "deepfool"):
        with pytest.raises(FxsimError, match="no images to attack"):
            attacks.run(method, model, np.zeros((0, 1, 2, 2)), np.zeros(0, int))


@pytest.fixture(scope="module")
def model_file(trained, tmp_path_factory):
    from fxsim import store

    path = tmp_path_factory.mktemp("attack") / "m.h5"
    store.save_model(trained[0], path, "sample")
    return path


def test_attack_command_reports_saves_and_plots(model_file, tmp_path, capsys):
    import json
    import struct

    import h5py

    from fxsim import compress, store

    model, _ = store.load_model(model_file)
    quantised = tmp_path / "q.h5"
    store.save_model(model, quantised, "sample", quant=compress.quant_config(model, 8))
    adv, png = tmp_path / "adv.h5", tmp_path / "adv.png"
    code, out, _ = run_cli(["attack", model_file, "--n", "60", "--eval-on", quantised, "-o", adv,
                        "--plot", png, "--json"], capsys)
    summary = json.loads(out)
    assert code == 0 and summary["images"] == 60 and set(summary["models"]) == {
        str(model_file), str(quantised)}
    row = summary["models"][str(model_file)]
    assert row["accuracy_after"] < row["accuracy_before"]
    with h5py.File(adv) as f:
        assert f.attrs["format"] == "fxsim-adversarial"
        assert f["adversarial"].shape == (60, 1, 28, 28) and f["labels"].shape == (60,)
        assert json.loads(f.attrs["meta"])["method"] == "ifgsm"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png.read_bytes()[16:24])
    assert width > 600 and height > 300
    code, out, _ = run_cli(["attack", quantised, "--method", "deepfool", "--n", "20"], capsys)
    assert code == 0 and "success" in out


@pytest.mark.parametrize(("extra", "message"), [
    (["--eps", "-1"], "eps must be >= 0"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--eval-on", "{missing}"], "no such file"),
])
def test_attack_command_bad_input(model_file, tmp_path, capsys, extra, message):
    out = tmp_path / "adv.h5"
    args = ["attack", model_file, "--n", "5", "-o", out,
            *[e.format(missing=tmp_path / "nope.h5") for e in extra]]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


# ---------------------------------------------------------------------------- strength curves


@pytest.mark.parametrize("source_kind", ["float", "8-bit"])
def test_strength_curves_are_the_separate_attacks_step_by_step(trained, source_kind):
    """Column k of a strength curve is the accuracy under the k-step attack itself, on the
    attacked model and on another; column 0 is the clean accuracy. The attacked model's
    columns 0 .. steps - 1 come from the gradient passes' logits (on a quantised model: its
    integer datapath's), the last from a forward pass of its own."""
    from fxsim import compress

    model, x, y = trained
    x, y = x[:40], y[:40]
    if source_kind == "8-bit":
        model = compress.quantize_model(model, compress.quant_config(model, 8))
    other = lenet5(seed=3)
    for method, eps_values in (("ifgsm", [0.01, 0.03]), ("ifgm", [0.5, 2.0])):
        curves = attacks.strength_curves(method, model, x, y, eps_values, 3, {"other": other},
                                         batch_size=15)
        assert (curves.method, curves.eps, curves.steps) == (method, eps_values, 3)
        for name, target in (("source", model), ("other", other)):
            acc = curves.accuracy[name]
            assert acc.shape == (2, 4)
            assert np.all(acc[:, 0] == np.mean(target.predict(x) == y))
            for i, eps in enumerate(eps_values):
                for k in (1, 2, 3):
                    adv = attacks.run(method, model, x, y, {"eps": eps, "steps": k}).adversarial
                    assert acc[i, k] == np.mean(target.predict(adv) == y), (method, name, i, k)
    white_box = attacks.strength_curves("ifgsm", model, x, y, [0.02], 6).accuracy["source"][0]
    assert white_box[6] < white_box[0]  # the attack works: accuracy falls as steps are added


@pytest.mark.parametrize(("args", "message"), [
    (("deepfool", [0.02], 3), "need an iterative attack"),
    (("ifgsm", [], 3), "at least one step size"),
    (("ifgsm", [0.01, -0.5], 3), "eps must be >= 0"),
    (("ifgm", [0.01], 0), "steps must be an integer >= 1"),
    (("ifgsm", [0.01], 2, {"source": None}), "'source' names the attacked model"),
])
def test_strength_curves_bad_arguments(trained, args, message):
    model, x, y = trained
    with pytest.raises(FxsimError, match=message):
        attacks.strength_curves(args[0], model, x[:4], y[:4], *args[1:])


def test_strength_command(model_file, tmp_path, capsys):
    import json

    plot = tmp_path / "strength.png"
    code, out, err = run_cli(["strength", model_file, "--eps", "0.01,0.04", "--steps", "2",
                              "--n", "20", "--eval-on", model_file, "--plot", plot, "--json"],
                             capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 20 and [c["method"] for c in result["curves"]] == ["ifgsm", "ifgm"]
    ifgsm = result["curves"][0]
    assert ifgsm["eps"] == [0.01, 0.04] and ifgsm["steps"] == 2
    # the model evaluated on its own examples as a transfer target sees the white-box numbers
    assert ifgsm["accuracy"]["source"] == ifgsm["accuracy"][str(model_file)]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(["strength", model_file, "--method", "ifgsm", "--eps", "0.02",
                            "--steps", "1", "--n", "10"], capsys)
    assert code == 0 and "### ifgsm on" in out and "| eps | 0 steps | 1 steps |" in out
    code, out, err = run_cli(["strength", model_file, "--eps", "0.01,big"], capsys)
    assert code == 2 and "--eps must be comma-separated numbers" in err and out == ""
    from fxsim import store
    from fxsim.models import cifarnet

    store.save_model(cifarnet(), tmp_path / "cifar.h5", "cifar10")
    code, out, err = run_cli(["strength", model_file, "--eval-on", tmp_path / "cifar.h5",
                              "--plot", plot], capsys)
    assert code == 2 and "takes (3, 32, 32) images" in err and err.count("\n") == 1
