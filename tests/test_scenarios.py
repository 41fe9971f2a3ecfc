"""Scenarios, results files and reports."""

import json

import numpy as np
import pytest

from fxsim import attacks, compress, data, report, scenarios, store
from fxsim.errors import FxsimError
from fxsim.models import cifarnet, lenet5
from tests.helpers import run_cli


def test_plan_has_the_three_scenarios_and_the_matrix_on_request():
    pairs = scenarios.plan("B", ["C1", "C2"])
    assert pairs == [("B", "B", "FULL->FULL"),
                     ("C1", "C1", "COMP->COMP"), ("B", "C1", "FULL->COMP"),
                     ("C1", "B", "COMP->FULL"),
                     ("C2", "C2", "COMP->COMP"), ("B", "C2", "FULL->COMP"),
                     ("C2", "B", "COMP->FULL")]
    full = scenarios.plan("B", ["C1", "C2"], matrix=True)
    assert full[len(pairs):] == [("C1", "C2", "CROSS"), ("C2", "C1", "CROSS")]
    # with the matrix every (source, target) pair is evaluated exactly once
    assert len({(s, t) for s, t, _ in full}) == len(full) == 9
    with pytest.raises(FxsimError):
        scenarios.plan("B", ["C1", "C1"])


class FixedPredictions:
    """A stand-in target whose predictions on the adversarial set are given."""

    def __init__(self, predictions):
        self.predictions = np.asarray(predictions)

    def predict(self, images):
        return self.predictions


def test_evaluate_counts_success_only_on_images_the_target_got_right():
    labels = np.array([0, 1, 2, 3])
    clean = np.array([0, 1, 2, 0])  # 3 of 4 right
    adv = scenarios.AdversarialSet("ifgsm", "B", np.zeros((4, 1, 2, 2)), 0.01, 0.3, 1)
    metrics = scenarios.evaluate(FixedPredictions([0, 2, 2, 1]), adv, labels, clean)
    assert metrics["accuracy"] == 0.5
    assert metrics["success_rate"] == pytest.approx(1 / 3)  # only image 1 of 0, 1, 2 fooled
    assert (metrics["mean_abs"], metrics["mean_l2"], metrics["gradient_masked"]) == (0.01, 0.3, 1)


@pytest.fixture(scope="module")
def three_models():
    """A briefly trained LeNet5, a 0.2-density pruned copy and an 8-bit quantised copy."""
    from fxsim.train import TrainConfig, train

    x, y = data.load("sample", "train", limit=1000)
    base = lenet5(seed=1)
    train(base, x, y, TrainConfig(epochs=1, batch_size=50, lr=0.05, seed=1))
    pruned = lenet5(seed=1)
    for a, b in zip(pruned.layers, base.layers, strict=True):
        a.params = {k: v.copy() for k, v in b.params.items()}
    masks = compress.magnitude_masks(pruned, 0.2, scope="global")
    compress.apply_masks(pruned, masks)
    quant = compress.quant_config(base, 8)
    return base, (pruned, masks), (compress.quantize_model(base, quant), quant)


def test_run_wires_every_scenario_to_the_right_examples(three_models):
    base, (pruned, _), (quantised, _) = three_models
    images, labels = data.load("sample", "test", limit=24)
    models = {"baseline": base, "p": pruned, "q": quantised}
    settings = {"ifgsm": {"eps": 0.05, "steps": 2}}
    rows, clean = scenarios.run(models, "baseline", settings, images, labels, matrix=True)
    assert len(rows) == 9
    for name, model in models.items():
        assert clean[name] == float((model.predict(images) == labels).mean())
    made = {name: attacks.ifgsm(m, images, labels, 0.05, 2).adversarial
            for name, m in models.items()}
    for row in rows:  # recompute every row independently from its source and target
        after = models[row["target"]].predict(made[row["source"]])
        assert row["accuracy"] == float((after == labels).mean()), row
        delta = np.abs(made[row["source"]].astype(np.float64) - images)
        assert row["mean_abs"] == pytest.approx(delta.mean(), rel=1e-12)
    by_pair = {(r["source"], r["target"]): r["scenario"] for r in rows}
    assert by_pair["baseline", "p"] == "FULL->COMP" and by_pair["q", "baseline"] == "COMP->FULL"
    assert by_pair["q", "q"] == "COMP->COMP" and by_pair["p", "q"] == "CROSS"


def test_describe_names_kind_density_and_bits(three_models):
    base, (pruned, masks), (_, quant) = three_models
    assert scenarios.describe("b", base, {}, baseline=True)["kind"] == "baseline"
    row = scenarios.describe("p", pruned, {"masks": masks})
    assert row["kind"] == "pruned" and row["density"] == pytest.approx(0.2, abs=1e-4)
    row = scenarios.describe("q", base, {"quant": quant})
    assert (row["kind"], row["bits"], row["density"]) == ("quantized", 8, 1.0)
    row = scenarios.describe("pq", pruned, {"masks": masks, "quant": quant})
    assert row["kind"] == "pruned+quantized"


def synthetic_results():
    """Rows and models like a small sweep's, with made-up numbers."""
    models = [{"name": "baseline", "kind": "baseline", "density": 1.0, "bits": 0,
               "clean_accuracy": 0.9, "file": "b.h5"}]
    for d in (0.5, 0.1):
        models.append({"name": f"pruned-{d:g}", "kind": "pruned", "density": d, "bits": 0,
                       "clean_accuracy": 0.8 + d / 10, "file": ""})
    for b in (4, 8, 16):
        models.append({"name": f"q{b}", "kind": "quantized", "density": 1.0, "bits": b,
                       "clean_accuracy": 0.7 + b / 100, "file": ""})
    names = [m["name"] for m in models]
    rows = []
    for attack in ("ifgsm", "deepfool"):
        for i, (s, t, scenario) in enumerate(scenarios.plan("baseline", names[1:], True)):
            rows.append({"attack": attack, "scenario": scenario, "source": s, "target": t,
                         "accuracy": (i % 7) / 10, "success_rate": float("nan") if i == 3
                         else 0.5, "mean_abs": 0.01 * (1 + names.index(s)), "mean_l2": 1.0,
                         "gradient_masked": 0, "images": 100})
    return rows, models


def test_results_file_round_trips(tmp_path):
    rows, models = synthetic_results()
    path = tmp_path / "r.h5"
    store.save_results(path, rows, models, {"dataset": "sample", "seed": 3})
    rows2, models2, config = store.load_results(path)
    assert config == {"dataset": "sample", "seed": 3}
    assert json.dumps(rows2) == json.dumps(rows)  # NaN included, same order
    assert models2 == models


def test_bad_results_files_name_the_problem(tmp_path):
    import h5py

    rows, models = synthetic_results()
    bad = tmp_path / "bad.h5"
    store.save_results(bad, rows, models, {})
    with h5py.File(bad, "a") as f:
        del f["rows"]["accuracy"]
    with pytest.raises(FxsimError, match="no column 'accuracy'"):
        store.load_results(bad)
    store.save_results(bad, [{**rows[0], "scenario": "SIDEWAYS"}], models, {})
    with pytest.raises(FxsimError, match="unknown scenario 'SIDEWAYS'"):
        store.load_results(bad)
    store.save_results(bad, [{**rows[0], "target": "ghost"}], models, {})
    with pytest.raises(FxsimError, match="target 'ghost' is not in the models table"):
        store.load_results(bad)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(FxsimError, match="not an HDF5 file"):
        store.load_results(tmp_path / "text.h5")
    store.save_model(lenet5(), tmp_path / "model.h5", "sample")
    with pytest.raises(FxsimError, match="expected 'fxsim-results'"):
        store.load_results(tmp_path / "model.h5")


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_report_renders_tables_and_plots_from_a_results_file(tmp_path, capsys):
    rows, models = synthetic_results()
    store.save_results(tmp_path / "r.h5", rows, models, {"dataset": "sample", "arch": "lenet5",
                                                         "attacks": {"ifgsm": {}}})
    code, out, err = run_cli(["report", tmp_path / "r.h5", "-o", tmp_path / "rep"], capsys)
    assert code == 0, err
    folder = tmp_path / "rep"
    for name in ("pruning.png", "quantization.png", "perturbation.png", "transfer-matrix.png"):
        width, height = png_size(folder / name)
        assert 400 <= width <= 4000 and 250 <= height <= 3000, (name, width, height)
        assert str(folder / name) in out
    text = (folder / "report.md").read_text()
    assert "### ifgsm" in text and "### deepfool" in text and "![pruning.png]" in text
    # the baseline line shows its FULL->FULL accuracy (row 0 of each attack: 0.0)
    assert "| baseline | baseline | 1.000 | float32 | 0.9000 | 0.0000 | 0.0000 | 0.0000 |" in text
    # q8 under ifgsm: COMP->COMP is the row with source = target = q8
    index = next(i for i, r in enumerate(rows) if r["scenario"] == "COMP->COMP"
                 and r["source"] == "q8")
    assert f"| q8 | quantized | 1.000 | 8 | 0.7800 | {rows[index]['accuracy']:.4f} |" in text
    csv_rows = (folder / "rows.csv").read_text().strip().splitlines()
    assert len(csv_rows) == len(rows) + 1
    _names, matrix = report.transfer_matrix(rows, models, "ifgsm")
    assert not np.isnan(matrix).any() and matrix.shape == (6, 6)
    # no model file to read: the value distributions say so instead of failing the report
    assert not (folder / "value-distributions.png").exists()
    assert ("Not found, so not in the value distributions: baseline, pruned-0.5, pruned-0.1, "
            "q4, q8, q16.") in text


def test_report_without_the_models_data_set_leaves_out_only_the_distributions(
        tmp_path, capsys, monkeypatch):
    """Model files present but their data set not on this machine: the report is written, and
    says why it has no value distributions (stderr too), instead of failing."""
    rows, models = synthetic_results()
    store.save_model(lenet5(), tmp_path / "b.h5", "mnist")
    models = [{**m, "file": str(tmp_path / "b.h5")} for m in models]
    store.save_results(tmp_path / "r.h5", rows, models, {"dataset": "mnist", "arch": "lenet5"})
    monkeypatch.setattr(data, "SYSTEM_DIRS", [])
    code, _, err = run_cli(["report", tmp_path / "r.h5", "-o", tmp_path / "rep",
                            "--data-dir", tmp_path / "nodata"], capsys)
    assert code == 0, err
    assert "value distributions left out: dataset mnist not found" in err
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Value distributions left out: dataset mnist not found" in text
    assert not (tmp_path / "rep" / "value-distributions.png").exists()
    assert (tmp_path / "rep" / "pruning.png").exists()


def test_report_on_a_missing_or_bad_file_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["report", tmp_path / "none.h5", "-o", tmp_path / "rep"], capsys)
    assert code == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, three_models):
    folder = tmp_path_factory.mktemp("models")
    base, (pruned, masks), (_, quant) = three_models
    store.save_model(base, folder / "base.h5", "sample")
    store.save_model(pruned, folder / "p20.h5", "sample", masks=masks)
    store.save_model(base, folder / "q8.h5", "sample", quant=quant)
    store.save_model(base, folder / "mnist.h5", "mnist")
    store.save_model(cifarnet(), folder / "cifar.h5", "cifar10")
    return folder


def test_scenarios_command_writes_results_and_report(model_files, tmp_path, capsys):
    f = tmp_path / "models"  # copies, moved away below
    f.mkdir()
    for name in ("base.h5", "p20.h5", "q8.h5"):
        (f / name).write_bytes((model_files / name).read_bytes())
    code, out, err = run_cli(["scenarios", "--baseline", f / "base.h5", "--compressed",
                              f / "p20.h5", f / "q8.h5", "--attacks", "ifgsm,deepfool",
                              "--steps", "2", "--max-iter", "3", "--n", "16", "-o",
                              tmp_path / "r.h5", "--report", tmp_path / "rep"], capsys)
    assert code == 0, err
    rows, models, config = store.load_results(tmp_path / "r.h5")
    assert [m["name"] for m in models] == ["baseline", "p20", "q8"]
    assert [m["kind"] for m in models] == ["baseline", "pruned", "quantized"]
    assert len(rows) == 2 * 7 and config["attacks"]["ifgsm"]["steps"] == 2
    assert "### deepfool" in out and (tmp_path / "rep" / "pruning.png").exists()
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Value distributions" in text and "Not found" not in text
    assert png_size(tmp_path / "rep" / "value-distributions.png")[0] >= 400
    for name in ("baseline", "p20", "q8"):  # a row in the weights and the activations table
        assert text.count(f"| {name} | 430,500 |") == 1
        assert text.count(f"| {name} | {16 * (20 * 24 * 24 + 50 * 64 + 500 + 10):,} |") == 0
        assert text.count(f"| {name} | {10 * (20 * 24 * 24 + 50 * 64 + 500 + 10):,} |") == 1
    # moved with its results file into <folder>/steps, as a sweep lays them out: found there
    moved = tmp_path / "moved"
    (moved / "steps").mkdir(parents=True)
    for name in ("base.h5", "p20.h5", "q8.h5"):
        (f / name).rename(moved / "steps" / name)
    (tmp_path / "r.h5").rename(moved / "r.h5")
    code, _, err = run_cli(["report", moved / "r.h5", "-o", moved / "rep"], capsys)
    assert code == 0, err
    moved_text = (moved / "rep" / "report.md").read_text()
    assert "## Value distributions" in moved_text and "Not found" not in moved_text
    assert moved_text.count("| q8 | 430,500 |") == 1
    (moved / "steps" / "q8.h5").unlink()
    code, _, err = run_cli(["report", moved / "r.h5", "-o", moved / "rep"], capsys)
    assert code == 0, err
    moved_text = (moved / "rep" / "report.md").read_text()
    assert "Not found, so not in the value distributions: q8." in moved_text
    assert moved_text.count("| p20 | 430,500 |") == 1


@pytest.mark.parametrize("other, message", [
    ("mnist.h5", "dataset 'mnist' model, the baseline"),
    ("cifar.h5", "arch 'cifarnet' model, the baseline"),
    ("missing.h5", "no such file"),
])
def test_scenarios_refuses_models_that_do_not_belong(model_files, tmp_path, capsys, other,
                                                     message):
    code, _, err = run_cli(["scenarios", "--baseline", model_files / "base.h5", "--compressed",
                            model_files / other, "--n", "4", "-o", tmp_path / "r.h5"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.h5").exists()


def test_scenarios_rejects_an_unknown_attack_and_a_compressed_baseline(model_files, tmp_path,
                                                                      capsys):
    args = ["scenarios", "--compressed", model_files / "q8.h5", "-o", tmp_path / "r.h5"]
    code, _, err = run_cli([*args, "--baseline", model_files / "base.h5", "--attacks", "cw"],
                           capsys)
    assert code == 2 and "unknown attack 'cw'" in err
    code, _, err = run_cli([*args, "--baseline", model_files / "p20.h5"], capsys)
    assert code == 2 and "must be the dense float model" in err
    assert not (tmp_path / "r.h5").exists()


def test_scenarios_refuses_a_model_given_twice(model_files, tmp_path, capsys):
    """The same file twice (under any spelling), or the baseline again as a compressed model,
    would be attacked twice under two names: refused before any work."""
    q8, again = model_files / "q8.h5", model_files / ".." / model_files.name / "q8.h5"
    for compressed, message in (([q8, again], f"{again} is given twice (it is also given as "
                                              f"{q8})"),
                                ([model_files / "base.h5"], "is also the baseline")):
        code, _, err = run_cli(["scenarios", "--baseline", model_files / "base.h5",
                                "--compressed", *compressed, "--n", "4", "-o",
                                tmp_path / "r.h5"], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r.h5").exists()


def test_scenarios_cut_short_skips_the_finished_attacks_when_run_again(model_files, tmp_path,
                                                                        capsys, monkeypatch):
    """Interrupted in its third attack, `fxsim scenarios` keeps the two finished ones in
    OUTPUT.attacks; run again it makes only the rest, writes what an uninterrupted run writes,
    and removes the folder."""
    from fxsim import attacks

    args = ["scenarios", "--baseline", model_files / "base.h5", "--compressed",
            model_files / "p20.h5", model_files / "q8.h5", "--attacks", "ifgsm,fgsm",
            "--steps", "2", "--n", "12"]
    code, _, err = run_cli([*args, "-o", tmp_path / "whole.h5"], capsys)
    assert code == 0, err
    real_run, made = attacks.run, []

    def counted(method, model, *rest, **kw):
        made.append(method)
        if stop_at and len(made) == stop_at:
            raise KeyboardInterrupt
        return real_run(method, model, *rest, **kw)

    monkeypatch.setattr(attacks, "run", counted)
    out = tmp_path / "r.h5"
    stop_at = 3
    code, _, _ = run_cli([*args, "-o", out], capsys)
    assert code == 130 and not out.exists()
    assert len(list((tmp_path / "r.h5.attacks").glob("*.h5"))) == 2
    made.clear()
    stop_at = None
    code, _, err = run_cli([*args, "-o", out], capsys)
    assert code == 0, err
    assert len(made) == 6 - 2 and err.count("made before, read back") == 2
    assert not (tmp_path / "r.h5.attacks").exists()
    whole, resumed = store.load_results(tmp_path / "whole.h5"), store.load_results(out)
    assert json.dumps(whole[0]) == json.dumps(resumed[0])  # every row, to the bit


def test_attack_files_are_named_by_everything_their_images_depend_on(tmp_path):
    images, labels = np.zeros((3, 1, 28, 28), np.float32), np.array([0, 1, 2])
    files = scenarios.AttackFiles(tmp_path, {"a": "d1", "b": "d2"}, images, labels)
    reference = files.path("ifgsm", "a", {"eps": 0.02, "steps": 12})
    assert files.path("ifgsm", "a", {"steps": 12, "eps": 0.02}) == reference
    others = [files.path("ifgsm", "a", {"eps": 0.03, "steps": 12}),
              files.path("ifgm", "a", {"eps": 0.02, "steps": 12}),
              files.path("ifgsm", "b", {"eps": 0.02, "steps": 12}),
              scenarios.AttackFiles(tmp_path, {"a": "d1"}, images + 0.5, labels).path(
                  "ifgsm", "a", {"eps": 0.02, "steps": 12}),
              scenarios.AttackFiles(tmp_path, {"a": "d1"}, images, labels[::-1]).path(
                  "ifgsm", "a", {"eps": 0.02, "steps": 12})]
    assert reference not in others and len(set(others)) == len(others)
