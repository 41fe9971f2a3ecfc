import numpy as np
import pytest

from fxsim import data
from fxsim.cli import main
from fxsim.errors import FxsimError
from fxsim.models import lenet5
from fxsim.train import TrainConfig, evaluate, finetune_config, sgd_step, train


def test_lenet5_learns_the_embedded_sample():
    x, y = data.load("sample", "train")
    test = data.load("sample", "test")
    model = lenet5(seed=0)
    history = train(model, x, y, TrainConfig(epochs=3, batch_size=64, lr_decays=()), test=test)
    assert history[-1]["loss"] < history[0]["loss"]
    assert evaluate(model, *test) >= 0.80


def test_training_is_deterministic_for_a_seed():
    x, y = data.load("sample", "train", limit=512)
    runs = []
    for _ in range(2):
        model = lenet5(seed=1)
        train(model, x, y, TrainConfig(epochs=1, batch_size=64, seed=5))
        runs.append(model.parameters())
    for name in runs[0]:
        assert np.array_equal(runs[0][name], runs[1][name])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_step_gives_the_bits_of_the_numpy_expressions(dtype):
    """The fused update against the textbook numpy lines, bit for bit: weight decay on weights
    only, a pruning mask (with negative velocities, so -0.0 must come out as numpy makes it),
    and a gradient of another dtype (the numpy path)."""
    rng = np.random.default_rng(1)
    shapes = {"fc.weight": (7, 9), "fc.bias": (7,), "conv.weight": (3, 2, 2, 2)}
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads["conv.weight"] = grads["conv.weight"].astype(np.float16)
    velocity = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    keep = {"fc.weight": rng.random(shapes["fc.weight"]) < 0.5}
    config = TrainConfig(momentum=0.9, weight_decay=5e-4)
    p_ref = {k: v.copy() for k, v in params.items()}
    v_ref = {k: v.copy() for k, v in velocity.items()}
    for name, p in p_ref.items():
        g = grads[name]
        if name.endswith(".weight"):
            g = g + config.weight_decay * p
        v_ref[name] *= config.momentum
        v_ref[name] -= 0.0123 * g
        if name in keep:
            v_ref[name] *= keep[name]
        p += v_ref[name]
    sgd_step(params, grads, velocity, 0.0123, config, keep)
    for name in shapes:
        assert params[name].tobytes() == p_ref[name].tobytes(), name
        assert velocity[name].tobytes() == v_ref[name].tobytes(), name


def test_learning_rate_schedule_decays_three_times():
    config = TrainConfig(epochs=20, lr=0.01)
    assert [config.lr_at(e) for e in (0, 9, 10, 15, 18, 19)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.0001, 0.00001, 0.00001])


def test_bad_training_settings(tmp_path, capsys):
    with pytest.raises(FxsimError, match="epochs and batch size"):
        TrainConfig(epochs=0)
    with pytest.raises(FxsimError, match="seed must be an integer >= 0, got -1"):
        TrainConfig(seed=-1)
    with pytest.raises(FxsimError, match=r"need lr > 0.*got lr -0\.1"):
        TrainConfig(lr=-0.1)
    # no fine-tuning (0 epochs) still refuses a learning rate that could not be meant
    with pytest.raises(FxsimError, match="fine-tuning learning rate must be > 0, got -1"):
        finetune_config(0, -1.0, 0)
    with pytest.raises(SystemExit) as done:  # NumPy's generators take no negative seed
        main(["train", "lenet5", "--seed", "-5", "-o", str(tmp_path / "m.h5")])
    assert done.value.code == 2 and "--seed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["train", "cifarnet", "--dataset", "sample", "--epochs", "1",
              "-o", str(tmp_path / "c.h5")])
    assert done.value.code == 2 and "cifarnet needs images of shape (3, 32, 32)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["train", "lenet5", "--epochs", "1", "-o", str(tmp_path / "no" / "m.h5")])
    assert done.value.code == 2 and not (tmp_path / "no").exists()


def test_train_command_writes_a_model(tmp_path, capsys):
    out = tmp_path / "m.h5"
    main(["train", "lenet5", "--dataset", "sample", "--epochs", "1", "--limit", "256",
          "-o", str(out)])
    assert "test accuracy" in capsys.readouterr().out
    main(["info", str(out)])
    assert "lenet5 on sample" in capsys.readouterr().out


def test_cifarnet_trains_from_cifar_files(tmp_path, capsys):
    from tests.test_data import write_cifar

    write_cifar(tmp_path / "cifar10", np.random.default_rng(1), as_archive=False)
    out = tmp_path / "c.h5"
    main(["train", "cifarnet", "--dataset", "cifar10", "--data-dir", str(tmp_path),
          "--epochs", "1", "--batch-size", "16", "-o", str(out)])
    assert "test accuracy" in capsys.readouterr().out
    main(["info", str(out), "--json"])
    assert '"arch": "cifarnet"' in capsys.readouterr().out
