"""Sweeps: config checking, resumable cached steps, job-count independence, the demo config."""

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from fxsim import data, store, sweep
from fxsim.errors import FxsimError
from fxsim.models import lenet5
from tests.helpers import run_cli

TINY = """
dataset = "sample"
arch = "lenet5"
seed = 3
images = 24
train_limit = 600
matrix = true

[baseline]
epochs = 1
lr = 0.05

[pruning]
densities = [0.3]
epochs = 1

[quantization]
bitwidths = [8]
epochs = 1

[attacks.ifgsm]
steps = 2

[attacks.deepfool]
max_iter = 3
"""


def write_config(folder: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def run(config_file, output, jobs=1, progress=None):
    config = sweep.load_config(config_file, output)
    return sweep.run_sweep(config, jobs, progress=progress)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny sweep run once, uninterrupted, with one job: (rows, models, config)."""
    folder = tmp_path_factory.mktemp("reference")
    return store.load_results(run(write_config(folder), folder / "whole"))


def same_results(a, b) -> bool:
    """Equal rows (NaN included) and models apart from where their files are."""
    strip = [[{**m, "file": Path(m["file"]).name} for m in r[1]] for r in (a, b)]
    return json.dumps(a[0]) == json.dumps(b[0]) and strip[0] == strip[1]


def test_an_interrupted_sweep_resumes_and_matches_an_uninterrupted_one(tmp_path, reference):
    config_file = write_config(tmp_path)

    seen = []

    def stop_after_four(event):
        seen.append(event)
        if len(seen) == 4:
            raise Interrupt  # as if the machine went down after the 4th step's file landed

    with pytest.raises(Interrupt):
        run(config_file, tmp_path / "cut", progress=stop_after_four)
    assert not (tmp_path / "cut" / "results.h5").exists()
    done_before = {e["step"] for e in seen}
    (tmp_path / "cut" / "steps" / ".q8-partial.h5.tmp").write_bytes(b"half a file")

    events = []
    resumed = store.load_results(run(config_file, tmp_path / "cut", progress=events.append))
    cached = {e["step"] for e in events if e["status"] == "cached"}
    assert cached == done_before  # exactly the finished steps were skipped
    assert len(events) == events[-1]["total"] == 1 + 2 + 3 * 2 + 3
    assert same_results(resumed, reference)

    again = []
    run(config_file, tmp_path / "cut", progress=again.append)
    assert all(e["status"] == "cached" for e in again)


def test_a_killed_sweep_process_resumes_and_matches(tmp_path, reference):
    """A real interruption: the sweep process is killed (SIGKILL, no clean-up) while it works
    on a step after the first one landed."""
    import subprocess
    import sys
    import time

    config_file = write_config(tmp_path)
    steps = tmp_path / "out" / "steps"
    process = subprocess.Popen([sys.executable, "-m", "fxsim.cli", "sweep", str(config_file),
                                "-o", str(tmp_path / "out"), "--no-report"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(steps.glob("baseline-*.h5")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    landed = {p.name for p in steps.glob("*-*.*")}
    assert any(n.startswith("baseline-") for n in landed)
    assert not (tmp_path / "out" / "results.h5").exists()
    events = []
    resumed = store.load_results(run(config_file, tmp_path / "out", progress=events.append))
    assert sum(e["status"] == "cached" for e in events) >= 1
    assert same_results(resumed, reference)


def test_two_jobs_give_the_same_results_as_one(tmp_path, reference):
    config_file = write_config(tmp_path)
    one_folder = Path(next(m["file"] for m in reference[1] if m["name"] == "q8")).parent.parent
    one = store.load_results(one_folder / "results.h5")
    two = store.load_results(run(config_file, tmp_path / "two", jobs=2))
    assert same_results(one, two)
    for name in ("pruned-0.3", "q8"):
        a = next(Path(m["file"]) for m in one[1] if m["name"] == name)
        b = next(Path(m["file"]) for m in two[1] if m["name"] == name)
        assert a.name == b.name  # same settings, same hash
        model_a, _ = store.load_model(a)
        model_b, _ = store.load_model(b)
        for key, value in model_a.parameters().items():
            assert (value == model_b.parameters()[key]).all(), key


def test_changing_one_setting_recomputes_only_what_depends_on_it(tmp_path):
    config_file = write_config(tmp_path)
    run(config_file, tmp_path / "out")
    write_config(tmp_path, TINY.replace("densities = [0.3]", "densities = [0.3, 0.1]"))
    events = []
    _rows, models, _ = store.load_results(run(config_file, tmp_path / "out",
                                             progress=events.append))
    fresh = sorted(e["step"] for e in events if e["status"] == "done")
    # the new model, its attacks, and the evaluations that now see its examples (matrix on)
    assert fresh == sorted(["pruned-0.1", "ifgsm-pruned-0.1", "deepfool-pruned-0.1",
                            "eval-baseline", "eval-pruned-0.3", "eval-pruned-0.1", "eval-q8"])
    assert [m["name"] for m in models] == ["baseline", "pruned-0.3", "pruned-0.1", "q8"]


def test_a_sweep_can_start_from_an_existing_baseline(tmp_path, capsys):
    store.save_model(lenet5(seed=5), tmp_path / "base.h5", "sample")
    text = TINY.replace("[baseline]\nepochs = 1\nlr = 0.05",
                        '[baseline]\nfile = "base.h5"').replace("matrix = true", "")
    config_file = write_config(tmp_path, text)
    code, out, err = run_cli(["sweep", config_file, "-o", tmp_path / "out", "--no-report"],
                             capsys)
    assert code == 0, err
    rows, models, _config = store.load_results(tmp_path / "out" / "results.h5")
    assert models[0]["file"] == str((tmp_path / "base.h5").resolve())
    assert len(rows) == 2 * 7 and "results:" in out
    assert not (tmp_path / "out" / "report").exists()


BAD_CONFIGS = [
    ("dataset = 'sample'\narch = 'lenet5\n", "not valid TOML"),
    (TINY.replace("densities", "densites"), "unknown key 'pruning.densites'"),
    (TINY.replace("seed = 3", "sed = 3"), "unknown key 'sed'"),
    (TINY.replace("[attacks.deepfool]", "[attacks.carlini]"), "unknown attack 'carlini'"),
    (TINY.replace("max_iter = 3", "max_iters = 3"), "deepfool has no setting 'max_iters'"),
    (TINY.replace('arch = "lenet5"', 'arch = "resnet"'), "unknown architecture 'resnet'"),
    (TINY.replace('arch = "lenet5"', 'arch = "cifarnet"'), "cifarnet does not take sample"),
    (TINY.replace("[baseline]", '[baseline]\nfile = "nowhere.h5"'), "nowhere.h5: no such file"),
    (TINY.replace("[0.3]", "[0.3, 1.5]"), "every density must be a number in (0, 1]"),
    (TINY.replace("[0.3]", "[0.3, 0.30]"), "pruning.densities lists a value twice"),
    (TINY.replace("bitwidths = [8]", "bitwidths = [8, 0]"), "quantization"),
    (TINY.replace("images = 24", "images = 'many'"), "images must be int"),
    (TINY.replace("steps = 2", "steps = 0"), "steps must be an integer >= 1"),
    (TINY.replace('dataset = "sample"\n', ""), "missing key 'dataset'"),
    # each of these used to pass the check and fail (or run nonsense) later
    (TINY.replace("seed = 3", "seed = -3"), "seed must be >= 0, got -3"),
    (TINY.replace("lr = 0.05", "lr = -0.05"), "baseline.lr must be > 0, got -0.05"),
    (TINY.replace("[pruning]", "[pruning]\nlr = 0"), "pruning.lr must be > 0, got 0"),
    (TINY.replace("lr = 0.05", "lr = 0.05\nmomentum = 1.0"), "momentum must be in [0, 1)"),
    (TINY.replace("max_iter = 3", "overshoot = 'big'"),
     "deepfool setting 'overshoot' must be a number, got 'big'"),
    (TINY.replace("steps = 2", "steps = 2.5"), "ifgsm setting 'steps' must be an integer"),
    (TINY.replace("steps = 2", "steps = 2\neps = true"), "ifgsm setting 'eps' must be a number"),
    (TINY.replace("steps = 2", "steps = 2\nradius = '0.1'"),
     "ifgsm setting 'radius' must be a number or absent"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS)
def test_bad_configs_are_one_line_and_write_nothing(tmp_path, capsys, text, message):
    config_file = write_config(tmp_path, text)
    code, _out, err = run_cli(["sweep", config_file, "-o", tmp_path / "out"], capsys)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_baseline_of_another_dataset_is_refused(tmp_path, capsys):
    store.save_model(lenet5(), tmp_path / "mnist.h5", "mnist")
    config_file = write_config(tmp_path, TINY.replace("[baseline]", '[baseline]\nfile = '
                                                                    '"mnist.h5"'))
    code, _, err = run_cli(["sweep", config_file, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "dataset 'mnist' model, the sweep's dataset is 'sample'" in err
    assert not (tmp_path / "out").exists()


def test_the_example_configs_are_valid_and_the_demo_is_the_shipped_one():
    examples = Path(__file__).parent.parent / "examples"
    shipped = (resources.files("fxsim") / "_data" / "demo.toml").read_text()
    assert (examples / "demo.toml").read_text() == shipped
    demo = sweep.load_config(examples / "demo.toml")
    assert len(demo["pruning"]["densities"]) == 3 and len(demo["attacks"]) == 3
    paper_file = examples / "paper-lenet5.toml"
    if data.locate("fashion-mnist") is None:
        with pytest.raises(FxsimError, match="fetch fashion-mnist"):
            sweep.load_config(paper_file)
        return
    paper = sweep.load_config(paper_file)
    assert paper["quantization"]["bitwidths"] == [4, 8, 10, 12, 16, 20, 24, 32]
    assert len(paper["pruning"]["densities"]) == 8 and paper["images"] == 1000


def test_the_config_check_looks_for_the_data_set_in_data_dir(tmp_path):
    import numpy as np

    from tests.test_data import write_mnist_like

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 8, dtype=np.uint8)
    write_mnist_like(tmp_path / "data" / "mnist", images, labels, images, labels)
    config_file = write_config(tmp_path, TINY.replace('dataset = "sample"', 'dataset = "mnist"'))
    config = sweep.load_config(config_file, tmp_path / "out", tmp_path / "data")
    assert config["dataset"] == "mnist"
    if data.locate("mnist") is None:  # nowhere else on this machine
        with pytest.raises(FxsimError, match="fetch mnist"):
            sweep.load_config(config_file, tmp_path / "out")


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_example_configs_load_and_plan_every_step(name, tmp_path, monkeypatch):
    """The shipped configs stay valid: with their data set present (files the test writes in
    the real formats), each loads and plans one model per density and bitwidth, an attack
    step per (attack, model) and an evaluation per model."""
    import numpy as np

    from tests.test_data import write_cifar, write_mnist_like

    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    for mnist_like in ("mnist", "fashion-mnist"):
        write_mnist_like(folder / mnist_like, rng.integers(0, 256, (12, 28, 28)),
                         rng.integers(0, 10, 12), rng.integers(0, 256, (5, 28, 28)),
                         rng.integers(0, 10, 5))
    write_cifar(folder / "cifar10", rng, as_archive=False)
    monkeypatch.setattr(data, "SYSTEM_DIRS", [])  # only what the test wrote
    config = sweep.load_config(EXAMPLES / name, tmp_path / "out", folder)
    stages = sweep.plan(config)
    models = len(config["pruning"]["densities"]) + len(config["quantization"]["bitwidths"])
    assert models >= 3
    trained = 0 if config["baseline"]["file"] else 1
    attacks = len(config["attacks"])
    assert attacks >= 1
    sizes = [len(stage) for stage in stages]
    assert sizes == [trained, models, attacks * (models + 1), models + 1][1 - trained:]
    if name.startswith("paper-"):  # the paper's settings (its section 3.3)
        assert config["attacks"]["ifgsm"] == {**config["attacks"]["ifgsm"], "eps": 0.02,
                                              "steps": 12}
        assert config["quantization"]["int_bits"] == "preset"


def test_a_training_step_cut_short_resumes_from_its_checkpoint(tmp_path):
    """A step that trains writes STEP-FILE.checkpoint after every epoch; cut short in its
    second epoch and run again, it resumes there (its log says so) and writes the model an
    uninterrupted step writes; the checkpoint is then gone."""
    config = sweep.load_config(write_config(tmp_path, TINY.replace("epochs = 1\nlr = 0.05",
                                                                   "epochs = 2\nlr = 0.05")))
    baseline = next(step for stage in sweep.plan(config) for step in stage
                    if step.name == "baseline")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for folder in (whole, cut):
        (folder / "steps").mkdir(parents=True)
    sweep.execute(baseline, whole, {})

    def stop_after_the_first_epoch(message):
        raise Interrupt(message)

    with pytest.raises(Interrupt, match="baseline: epoch 1 "):
        sweep.execute(baseline, cut, {}, log=stop_after_the_first_epoch)
    checkpoint = cut / f"{baseline.file}.checkpoint"
    assert checkpoint.exists() and not (cut / baseline.file).exists()
    lines = []
    sweep.execute(baseline, cut, {}, log=lines.append)
    assert "from the checkpoint" in lines[0] and "from the checkpoint" not in lines[1]
    assert not checkpoint.exists()
    model, info = store.load_model(cut / baseline.file)
    reference, reference_info = store.load_model(whole / baseline.file)
    for name, value in reference.parameters().items():
        assert np.array_equal(model.parameters()[name], value), name
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(info["metrics"]["history"]) == strip(reference_info["metrics"]["history"])
