"""Sweeps: the whole experiment from one TOML file, run as resumable, cached steps.

A sweep trains (or loads) the baseline, builds every pruned and every quantised model from it,
makes the adversarial images of every attack on every model, evaluates the scenarios
(fxsim.scenarios) and writes one results file. Every step's output is its own file under
``OUTPUT/steps/``, named by a hash of everything that determines it (its settings, the hashes
of the steps it reads, the data set and seed), and written atomically. A rerun skips the steps
whose file exists, so an interrupted sweep resumes where it stopped and changing one setting
recomputes only what depends on it. Steps of one stage are independent and run in parallel
over ``jobs`` processes; a step's result depends only on its inputs, never on the job count.

The config keys are in ``SCHEMA`` and docs/formats.md; examples/ holds the demo's and the
paper's LeNet5 sweep.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fxsim.errors import FxsimError

# Bump when a step's meaning or its bits change, so that old step files are not reused: a
# resumed sweep must give what a fresh run of the same fxsim gives. 2: training's conv2
# gradient sums in another order and dropout draws float32 (same seeds, other bits).
STEP_VERSION = 2

_NUMBER = (int, float)
SCHEMA = {
    "": {"dataset": str, "arch": str, "seed": int, "images": int, "batch_size": int,
         "matrix": bool, "output": str, "train_limit": int},
    "baseline": {"file": str, "epochs": int, "lr": _NUMBER, "batch_size": int,
                 "momentum": _NUMBER, "weight_decay": _NUMBER},
    "pruning": {"densities": list, "method": str, "scope": str, "epochs": int, "lr": _NUMBER},
    "quantization": {"bitwidths": list, "int_bits": (int, str), "max_overflow": _NUMBER,
                     "calibration": int, "acc_bits": int, "acc_mode": str,
                     "acc_overflow": str, "rounding": str, "epochs": int, "lr": _NUMBER},
}
DEFAULTS = {
    "": {"seed": 0, "images": 1000, "batch_size": 500, "matrix": False, "train_limit": None},
    "baseline": {"file": None, "epochs": 10, "lr": 0.01, "batch_size": 64, "momentum": 0.9,
                 "weight_decay": 5e-4},
    "pruning": {"densities": [], "method": "magnitude", "scope": "global", "epochs": 2,
                "lr": 0.001},
    "quantization": {"bitwidths": [], "int_bits": "preset", "max_overflow": 1e-3,
                     "calibration": 1000, "acc_bits": None, "acc_mode": "final",
                     "acc_overflow": "sat", "rounding": "rnd_conv", "epochs": 2, "lr": 0.001},
}


# ------------------------------------------------------------------------------ the config


def _where(path, section: str, key: str | None = None) -> str:
    dotted = ".".join(p for p in (section, key) if p)
    return f"{path}: {dotted}" if dotted else str(path)


def _check_type(path, section, key, value, expected) -> None:
    types = expected if isinstance(expected, tuple) else (expected,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise FxsimError(f"{_where(path, section, key)} must be {names}, got {value!r}")


def _section(path, raw: dict, section: str) -> dict:
    given = raw if section == "" else raw.get(section, {})
    if not isinstance(given, dict):
        raise FxsimError(f"{_where(path, section)} must be a table")
    schema = SCHEMA[section]
    skip = {"baseline", "pruning", "quantization", "attacks"} if section == "" else set()
    for key, value in given.items():
        if key in skip:
            continue
        if key not in schema:
            raise FxsimError(f"{path}: unknown key '{_where('', section, key).strip(': ')}' "
                             f"(known: {', '.join(schema)})")
        _check_type(path, section, key, value, schema[key])
    return {**DEFAULTS.get(section, {}),
            **{k: v for k, v in given.items() if k not in skip}}


def _positive(path, section, key, value) -> None:
    if value is not None and value < 1:
        raise FxsimError(f"{_where(path, section, key)} must be >= 1, got {value}")


def load_config(path, output=None, data_dir=None) -> dict:
    """Read and check a sweep TOML file: every problem (syntax, unknown key, bad value,
    missing model file, unknown attack or architecture) is an FxsimError naming it. Relative
    paths in the file are relative to the file's folder. Returns the completed config."""
    import tomllib

    from fxsim import attacks, compress
    from fxsim import data as data_lib
    from fxsim.models import ARCHITECTURES

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FxsimError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise FxsimError(f"{path}: cannot read ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise FxsimError(f"{path}: not valid TOML: {exc}") from exc
    top = _section(path, raw, "")
    for key in ("dataset", "arch"):
        if key not in top:
            raise FxsimError(f"{path}: missing key '{key}'")
    if top["arch"] not in ARCHITECTURES:
        raise FxsimError(f"{_where(path, '', 'arch')}: unknown architecture {top['arch']!r}; "
                         f"choose from {', '.join(ARCHITECTURES)}")
    shape = data_lib.input_shape(top["dataset"])  # checks the name
    if shape != ARCHITECTURES[top["arch"]]().input_shape:
        raise FxsimError(f"{path}: {top['arch']} does not take {top['dataset']} images {shape}")
    if top["dataset"] != data_lib.SAMPLE and data_lib.locate(top["dataset"], data_dir) is None:
        raise FxsimError(f"{path}: dataset {top['dataset']} is not present; run "
                         f"`fxsim data fetch {top['dataset']}`")
    for key in ("images", "batch_size", "train_limit"):
        _positive(path, "", key, top[key])
    if top["seed"] < 0:
        raise FxsimError(f"{_where(path, '', 'seed')} must be >= 0, got {top['seed']}")
    config = {**top, "baseline": _section(path, raw, "baseline"),
              "pruning": _section(path, raw, "pruning"),
              "quantization": _section(path, raw, "quantization")}
    base = config["baseline"]
    for key in ("epochs", "batch_size"):
        _positive(path, "baseline", key, base[key])
    if base["file"] is not None:
        file = (path.parent / base["file"]).resolve()
        from fxsim import store

        _, info = store.load_model(file)
        for key in ("arch", "dataset"):
            if info[key] != top[key]:
                raise FxsimError(f"{_where(path, 'baseline', 'file')}: {file} is a {key} "
                                 f"{info[key]!r} model, the sweep's {key} is {top[key]!r}")
        if info["masks"] or info["quant"]:
            raise FxsimError(f"{_where(path, 'baseline', 'file')}: {file} is compressed; the "
                             "baseline must be a dense float model")
        base["file"] = str(file)
    prune = config["pruning"]
    for density in prune["densities"]:
        if not isinstance(density, _NUMBER) or isinstance(density, bool) or \
                not 0 < density <= 1:
            raise FxsimError(f"{_where(path, 'pruning', 'densities')}: every density must be "
                             f"a number in (0, 1], got {density!r}")
    if prune["method"] not in ("magnitude", "dns"):
        raise FxsimError(f"{_where(path, 'pruning', 'method')} must be 'magnitude' or 'dns'")
    if prune["scope"] not in ("layer", "global"):
        raise FxsimError(f"{_where(path, 'pruning', 'scope')} must be 'layer' or 'global'")
    if prune["method"] == "dns" and prune["densities"] and prune["epochs"] < 1:
        raise FxsimError(f"{_where(path, 'pruning', 'epochs')}: dns needs epochs >= 1")
    quant = config["quantization"]
    int_bits = quant["int_bits"]
    if isinstance(int_bits, str) and int_bits not in ("preset", "auto"):
        raise FxsimError(f"{_where(path, 'quantization', 'int_bits')} must be 'preset', "
                         f"'auto' or an integer, got {int_bits!r}")
    model = ARCHITECTURES[top["arch"]]()
    for bits in quant["bitwidths"]:
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise FxsimError(f"{_where(path, 'quantization', 'bitwidths')}: {bits!r} is not "
                             "an integer")
        try:  # builds the Datapaths, which checks widths, modes and the accumulator
            compress.quant_config(model, bits, int_bits if isinstance(int_bits, int) else None,
                                  quant["acc_bits"], quant["acc_mode"], quant["acc_overflow"],
                                  quant["rounding"])
        except (FxsimError, ValueError) as exc:
            raise FxsimError(f"{_where(path, 'quantization')}: {exc}") from exc
    for section, key in (("pruning", "densities"), ("quantization", "bitwidths")):
        values = config[section][key]
        if len(set(values)) != len(values):
            raise FxsimError(f"{_where(path, section, key)} lists a value twice: {values}")
    for section in ("pruning", "quantization"):
        if config[section]["epochs"] < 0:
            raise FxsimError(f"{_where(path, section, 'epochs')} must be >= 0")
    for section in ("baseline", "pruning", "quantization"):
        if not config[section]["lr"] > 0:
            raise FxsimError(f"{_where(path, section, 'lr')} must be > 0, got "
                             f"{config[section]['lr']}")
    if not 0 <= base["momentum"] < 1:
        raise FxsimError(f"{_where(path, 'baseline', 'momentum')} must be in [0, 1), got "
                         f"{base['momentum']}")
    if not base["weight_decay"] >= 0:
        raise FxsimError(f"{_where(path, 'baseline', 'weight_decay')} must be >= 0, got "
                         f"{base['weight_decay']}")
    raw_attacks = raw.get("attacks", {})
    if not isinstance(raw_attacks, dict) or not raw_attacks:
        raise FxsimError(f"{path}: give at least one attack, e.g. [attacks.ifgsm]")
    config["attacks"] = {}
    for method, settings in raw_attacks.items():
        if not isinstance(settings, dict):
            raise FxsimError(f"{_where(path, 'attacks', method)} must be a table")
        try:
            config["attacks"][method] = attacks.settings_for(method, settings)
        except FxsimError as exc:
            raise FxsimError(f"{_where(path, 'attacks', method)}: {exc}") from exc
    if output is not None:
        config["output"] = str(Path(output))
    elif "output" in config:
        config["output"] = str(path.parent / config["output"])
    else:
        config["output"] = path.stem
    return config


# ------------------------------------------------------------------------------ the steps


@dataclass(frozen=True)
class Step:
    """One unit of work: ``kind`` (train, prune, quantize, attack, evaluate), a readable
    ``name``, the ``settings`` that determine its output, the steps it reads (``parents``,
    by name) and ``key``, the hash of all that; ``file`` is where its output lives, relative
    to the output folder."""

    kind: str
    name: str
    settings: dict
    parents: tuple = ()
    key: str = ""
    file: str = ""


def _key(kind: str, settings: dict, parent_keys: list[str]) -> str:
    text = json.dumps({"version": STEP_VERSION, "kind": kind, "settings": settings,
                       "parents": parent_keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _make(kind, name, settings, parents=(), suffix=".h5") -> Step:
    key = _key(kind, settings, [p.key for p in parents])
    return Step(kind, name, settings, tuple(p.name for p in parents), key,
                f"steps/{name}-{key}{suffix}")


def _attack_step_name(method: str, model: str) -> str:
    return f"{method}-{model}"


def plan(config: dict) -> list[list[Step]]:
    """The sweep's steps in stages; the steps of a stage only read earlier stages."""
    from fxsim.scenarios import plan as scenario_plan

    data = {"dataset": config["dataset"], "train_limit": config["train_limit"],
            "seed": config["seed"]}
    base = config["baseline"]
    if base["file"]:
        from fxsim import store

        settings = {"sha256": store.file_digest(base["file"])}
        baseline = Step("given", "baseline", settings, key=_key("given", settings, []),
                        file=base["file"])
    else:
        baseline = _make("train", "baseline", {**data, "arch": config["arch"],
                                               **{k: v for k, v in base.items() if k != "file"}})
    models = []
    prune = config["pruning"]
    for density in prune["densities"]:
        settings = {**data, "density": float(density),
                    **{k: v for k, v in prune.items() if k != "densities"}}
        models.append(_make("prune", f"pruned-{density:g}", settings, [baseline]))
    quant = config["quantization"]
    for bits in quant["bitwidths"]:
        settings = {**data, "bits": bits, **{k: v for k, v in quant.items() if k != "bitwidths"}}
        suffix = "" if quant["int_bits"] == "preset" else f"i{quant['int_bits']}"
        models.append(_make("quantize", f"q{bits}{suffix}", settings, [baseline]))
    by_name = {m.name: m for m in [baseline, *models]}
    images = {"dataset": config["dataset"], "images": config["images"],
              "batch_size": config["batch_size"]}
    attack_steps = {}
    for method, settings in config["attacks"].items():
        for model in by_name.values():
            attack_steps[method, model.name] = _make(
                "attack", _attack_step_name(method, model.name),
                {**images, "method": method, "attack": settings}, [model])
    pairs = scenario_plan("baseline", [m.name for m in models], config["matrix"])
    evaluations = []
    for target in by_name.values():
        sets = [[method, source, scenario] for method in config["attacks"]
                for source, t, scenario in pairs if t == target.name]
        parents = [target, *(attack_steps[m, s] for m, s, _ in sets)]
        evaluations.append(_make("evaluate", f"eval-{target.name}", {**images, "sets": sets},
                                 parents, suffix=".json"))
    first = [] if baseline.kind == "given" else [baseline]
    return [s for s in (first, models, list(attack_steps.values()), evaluations) if s]


def execute(step: Step, out_dir, parent_files: dict, data_dir=None, log=None) -> str:
    """Run one step and write its file (atomically); ``parent_files``: parent name -> path.
    Returns the path written."""
    from fxsim import attacks, compress, scenarios, store
    from fxsim import data as data_lib
    from fxsim.models import ARCHITECTURES
    from fxsim.train import TrainConfig, finetune_config, train

    s = step.settings
    target = Path(out_dir) / step.file
    # a training step's state after every epoch, so that a step cut short resumes mid-way
    checkpoint = Path(f"{target}.checkpoint")
    say = log or (lambda msg: None)

    def epoch_log(event):
        if "batch" not in event:
            done = ", from the checkpoint" if event.get("resumed") else ""
            say(f"{step.name}: epoch {event['epoch']} loss {event['loss']:.4f} train acc "
                f"{event['train_acc']:.4f} ({event['seconds']:.1f} s{done})")

    def training_data():
        return data_lib.load(s["dataset"], "train", data_dir, s["train_limit"])

    provenance = {"command": f"fxsim sweep (step {step.name})", "seed": s.get("seed"),
                  "step": step.kind, "key": step.key, "settings": s}
    if step.kind == "train":
        model = ARCHITECTURES[s["arch"]](seed=s["seed"])
        config = TrainConfig(s["epochs"], s["batch_size"], s["lr"], s["momentum"],
                             s["weight_decay"], seed=s["seed"])
        history = train(model, *training_data(), config, progress=epoch_log,
                        checkpoint=checkpoint)
        store.save_model(model, target, s["dataset"], {**provenance, "parent": None},
                         {"train_acc": history[-1]["train_acc"], "history": history})
        checkpoint.unlink(missing_ok=True)
        return str(target)
    if step.kind in ("prune", "quantize"):
        parent = parent_files[step.parents[0]]
        model, info = store.load_model(parent)
        config = finetune_config(s["epochs"], s["lr"], s["seed"])
        train_data = training_data() if config else None
        provenance["parent"] = str(parent)
        if step.kind == "prune":
            masks, history = compress.prune_model(model, s["density"], s["method"], s["scope"],
                                                  train_data, config, epoch_log, checkpoint)
            store.save_model(model, target, info["dataset"], provenance,
                             {"history": history}, masks=masks)
            checkpoint.unlink(missing_ok=True)
            return str(target)
        int_bits = {"preset": None}.get(s["int_bits"], s["int_bits"])
        calibration = (data_lib.load(s["dataset"], "train", data_dir, s["calibration"])[0]
                       if int_bits == "auto" else None)
        qmodel, quant, history = compress.quantize_finetune(
            model, s["bits"], int_bits, info["masks"], train_data, config, calibration,
            s["max_overflow"], epoch_log, checkpoint, acc_bits=s["acc_bits"],
            acc_mode=s["acc_mode"], acc_overflow=s["acc_overflow"], rounding=s["rounding"])
        store.save_model(compress.export_float(qmodel, model), target, info["dataset"],
                         provenance, {"history": history}, masks=info["masks"], quant=quant)
        checkpoint.unlink(missing_ok=True)
        return str(target)
    images, labels = data_lib.load(s["dataset"], "test", data_dir, s["images"])
    if step.kind == "attack":
        source = compress.runnable(*store.load_model(parent_files[step.parents[0]]))
        result = attacks.run(s["method"], source, images, labels, s["attack"], s["batch_size"])
        made = scenarios.AdversarialSet.from_result(s["method"], step.parents[0], result)
        meta = {"method": s["method"], "settings": s["attack"], "source": step.parents[0],
                "dataset": s["dataset"], "key": step.key, "mean_abs": made.mean_abs,
                "mean_l2": made.mean_l2, "gradient_masked": made.gradient_masked,
                "success_rate": float(result.success.mean())}
        store.save_adversarial(target, images, result.adversarial, labels, meta)
        return str(target)
    if step.kind == "evaluate":
        return _evaluate(step, target, parent_files, images, labels)
    raise FxsimError(f"unknown step kind {step.kind!r}")


def _evaluate(step, target, parent_files, images, labels) -> str:
    from fxsim import compress, scenarios, store

    name = step.parents[0]
    model = compress.runnable(*store.load_model(parent_files[name]))
    clean = model.predict(images)
    rows = []
    for method, source, scenario in step.settings["sets"]:
        _, adversarial, _, meta = store.load_adversarial(
            parent_files[_attack_step_name(method, source)])
        adv = scenarios.AdversarialSet(method, source, adversarial, meta["mean_abs"],
                                       meta["mean_l2"], meta["gradient_masked"])
        rows.append({"attack": method, "scenario": scenario, "source": source, "target": name,
                     **scenarios.evaluate(model, adv, labels, clean)})
    store.write_json(target, {"target": name, "clean_accuracy": float((clean == labels).mean()),
                              "rows": rows})
    return str(target)


# ------------------------------------------------------------------------------ running


# Every step runs in a worker process with single-threaded BLAS, whatever the job count:
# OpenBLAS's float32 GEMM rounds differently when it splits the work over another number of
# threads, so a fixed BLAS thread count is what makes a sweep give the same bits for any
# --jobs. Numba's kernels give the same bits for any thread count, so each step gets the cores
# the running steps leave free (numba.set_num_threads).
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _worker_init() -> None:
    """Die with the parent (Linux), so killing a sweep leaves no orphan workers."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_pool(jobs: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"),
                               initializer=_worker_init)


def _run_in_worker(step, out, files, data_dir, log, threads: int) -> float:
    import numba

    from fxsim.kernels import announce_compiling

    if log:  # the workers compile the kernels a first run needs: they say so in the log
        announce_compiling(log)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    start = time.perf_counter()
    execute(step, out, files, data_dir, log)
    return time.perf_counter() - start


def _run_stage(pool, todo, jobs, out, files, data_dir, log, report) -> None:
    """Run a stage's steps, at most ``jobs`` at a time; a new one starts when one ends."""
    from concurrent.futures import FIRST_COMPLETED, wait

    threads = max(1, (os.cpu_count() or 1) // min(jobs, len(todo)))
    waiting, running = list(todo), {}
    while waiting or running:
        while waiting and len(running) < jobs:
            step = waiting.pop(0)
            running[pool.submit(_run_in_worker, step, out, files, data_dir, log,
                                threads)] = step
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            report(running.pop(future), "done", future.result())


def run_sweep(config: dict, jobs: int = 1, data_dir=None, progress=None, log=None) -> Path:
    """Run (or resume) the sweep ``config`` (from load_config) into ``config["output"]``;
    returns the results file. Steps run in ``jobs`` worker processes. ``progress(event)``
    hears {"step", "status": "cached" | "done", "seconds", "index", "total"} per step;
    ``log(msg)`` gets epoch lines of training steps (it must be picklable: a module-level
    function)."""
    out = Path(config["output"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps").mkdir(exist_ok=True)
    stages = plan(config)
    files = {step.name: str(out / step.file) for stage in stages for step in stage}
    if "baseline" not in files:  # given as a file, not a step
        files["baseline"] = config["baseline"]["file"]
    total = sum(len(stage) for stage in stages)
    done = 0

    def report(step, status, seconds):
        nonlocal done
        done += 1
        if progress:
            progress({"step": step.name, "status": status, "seconds": seconds,
                      "index": done, "total": total})

    pool = None
    saved_env = {k: os.environ.get(k) for k in _WORKER_ENV}
    try:
        for stage in stages:
            todo = []
            for step in stage:
                if (out / step.file).exists():
                    report(step, "cached", 0.0)
                else:
                    todo.append(step)
            if todo and pool is None:
                os.environ.update(_WORKER_ENV)  # inherited by the workers as they spawn
                pool = _start_pool(jobs)
            if todo:
                _run_stage(pool, todo, jobs, out, files, data_dir, log, report)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return assemble(config, stages, out, files)


def assemble(config: dict, stages, out: Path, files: dict) -> Path:
    """Gather the evaluation steps' rows and the models table into ``out/results.h5``."""
    from fxsim import scenarios, store

    evaluations = stages[-1]
    clean, rows = {}, []
    for step in evaluations:
        data = json.loads((out / step.file).read_text())
        clean[data["target"]] = data["clean_accuracy"]
        rows += data["rows"]
    order = {m: i for i, m in enumerate(config["attacks"])}
    pairs = {(s, t): i for i, (s, t, _) in enumerate(
        scenarios.plan("baseline", [e.parents[0] for e in evaluations[1:]], config["matrix"]))}
    rows.sort(key=lambda r: (order[r["attack"]], pairs[r["source"], r["target"]]))
    models = []
    for step in evaluations:
        name = step.parents[0]
        model, info = store.load_model(files[name])
        row = scenarios.describe(name, model, info, files[name], baseline=name == "baseline")
        row["clean_accuracy"] = clean[name]
        models.append(row)
    results = out / "results.h5"
    store.save_results(results, rows, models, config)
    return results
