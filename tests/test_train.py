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


# ------------------------------------------------------------------------------ checkpoints


class Interrupted(Exception):
    pass


def interrupt_at(epoch: int, batch: int):
    """A progress callback that stops training in the middle of ``epoch`` (0-based)."""
    def progress(event):
        if event.get("epoch") == epoch and event.get("batch") == batch:
            raise Interrupted
    return progress


def all_state(model):
    return {**model.parameters(), **{f"{layer.name}.{k}": v for layer in model.layers
                                     for k, v in layer.buffers.items()}}


def assert_same_run(a, b):
    """Same bits in every parameter and buffer."""
    state_a, state_b = all_state(a), all_state(b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert np.array_equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("arch", ["lenet5", "cifarnet"])
def test_an_interrupted_run_resumes_from_its_checkpoint_with_the_same_bits(tmp_path, arch):
    """Cut short in its third epoch, a run resumes after its second from the checkpoint and
    ends with the bits of the run never interrupted: weights, momentum, BatchNorm statistics
    (CifarNet) and the random generator (shuffling, dropout) all come back."""
    from fxsim.models import ARCHITECTURES

    if arch == "lenet5":
        x, y = data.load("sample", "train", limit=300)
        test = data.load("sample", "test", limit=50)
    else:
        rng = np.random.default_rng(0)
        x = rng.random((96, 3, 32, 32), dtype=np.float32)
        y = rng.integers(0, 10, 96)
        test = (x[:16], y[:16])
    config = TrainConfig(epochs=3, batch_size=32, lr=0.01, seed=7)
    whole = ARCHITECTURES[arch](seed=2)
    expected = train(whole, x, y, config, test=test)
    checkpoint = tmp_path / "run.checkpoint"
    cut = ARCHITECTURES[arch](seed=2)
    with pytest.raises(Interrupted):
        train(cut, x, y, config, test=test, progress=interrupt_at(2, 2), checkpoint=checkpoint)
    events = []
    resumed = ARCHITECTURES[arch](seed=2)
    history = train(resumed, x, y, config, test=test, progress=events.append,
                    checkpoint=checkpoint)
    assert_same_run(whole, resumed)
    drop = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert drop(history) == drop(expected)
    epochs = [e for e in events if "batch" not in e]
    assert [(e["epoch"], e.get("resumed", False)) for e in epochs] == [
        (1, True), (2, True), (3, False)]
    assert not any(e.get("epoch") in (0, 1) for e in events if "batch" in e)  # not re-run


def test_a_checkpoint_of_another_run_is_not_used(tmp_path):
    """Other settings, starting weights, data or datapath: the checkpoint is replaced, and the
    run gives the bits of a run from scratch."""
    from fxsim import compress

    x, y = data.load("sample", "train", limit=200)
    config = TrainConfig(epochs=2, batch_size=50, seed=1)
    checkpoint = tmp_path / "run.checkpoint"
    with pytest.raises(Interrupted):
        train(lenet5(seed=0), x, y, config, progress=interrupt_at(1, 1), checkpoint=checkpoint)
    other_lr = TrainConfig(epochs=2, batch_size=50, seed=1, lr=0.02)
    model, fresh = lenet5(seed=0), lenet5(seed=0)
    events = []
    train(model, x, y, other_lr, progress=events.append, checkpoint=checkpoint)
    train(fresh, x, y, other_lr)
    assert_same_run(model, fresh)
    assert not any(e.get("resumed") for e in events)
    # what the digest tells apart
    from fxsim.train import run_id

    base = lenet5(seed=0)
    reference = run_id(base, x, y, config, {})
    assert run_id(lenet5(seed=0), x, y, config, {}) == reference
    assert run_id(lenet5(seed=1), x, y, config, {}) != reference
    assert run_id(base, x[:199], y[:199], config, {}) != reference
    flipped = y.copy()
    flipped[0] = (flipped[0] + 1) % 10
    assert run_id(base, x, flipped, config, {}) != reference
    assert run_id(base, x, y, config, {"fc1.weight": np.ones((500, 800), bool)}) != reference
    q8 = compress.quantize_model(base, compress.quant_config(base, 8))
    q4 = compress.quantize_model(base, compress.quant_config(base, 4))
    assert run_id(q8, x, y, config, {}) != run_id(q4, x, y, config, {})


def test_train_command_resumes_and_deletes_its_checkpoint(tmp_path, capsys, monkeypatch):
    """`fxsim train` cut short keeps OUTPUT.checkpoint; run again, it resumes (saying so), and
    the model it writes equals an uninterrupted run's; the checkpoint is gone."""
    from fxsim import cli, store

    args = ["train", "lenet5", "--dataset", "sample", "--epochs", "2", "--limit", "256",
            "--seed", "4"]
    main([*args, "-o", str(tmp_path / "whole.h5")])
    real_bars = cli._EpochBars

    class CutShort(real_bars):
        def __call__(self, event):
            if event.get("epoch") == 1 and event.get("batch") == 2:
                raise KeyboardInterrupt
            super().__call__(event)

    monkeypatch.setattr(cli, "_EpochBars", CutShort)
    out = tmp_path / "m.h5"
    with pytest.raises(SystemExit) as done:  # Ctrl-C: "aborted", exit 130
        main([*args, "-o", str(out)])
    assert done.value.code == 130
    assert not out.exists() and (tmp_path / "m.h5.checkpoint").exists()
    monkeypatch.setattr(cli, "_EpochBars", real_bars)
    capsys.readouterr()
    main([*args, "-o", str(out)])
    assert "epoch 1:" in capsys.readouterr().err.split("from the checkpoint")[0]
    assert not (tmp_path / "m.h5.checkpoint").exists()
    assert_same_run(store.load_model(out)[0], store.load_model(tmp_path / "whole.h5")[0])


def test_a_damaged_checkpoint_is_named_not_deleted(tmp_path):
    checkpoint = tmp_path / "run.checkpoint"
    checkpoint.write_bytes(b"not hdf5")
    x, y = data.load("sample", "train", limit=64)
    with pytest.raises(FxsimError, match=r"run\.checkpoint: not an HDF5 file"):
        train(lenet5(), x, y, TrainConfig(epochs=1), checkpoint=checkpoint)
    assert checkpoint.read_bytes() == b"not hdf5"
