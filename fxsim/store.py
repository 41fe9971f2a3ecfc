"""Files fxsim writes and reads: JSON results and HDF5 model files (schema in docs/formats.md).

Every write goes to a temporary file in the target's folder that is renamed into place only
when complete, so an interrupted run never leaves a half-written file. Reading validates
everything and names the file and what is wrong."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from fxsim.errors import FxsimError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it."""
    target = Path(path)
    _check_folder(target)  # its own temporary file below is the write test
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise FxsimError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the result should not be
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk, a file system gone read-only
            raise FxsimError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def _check_folder(path) -> Path:
    """``path``'s folder, which must exist."""
    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    if not folder.is_dir():
        raise FxsimError(f"cannot write {path}: folder {folder} does not exist")
    return folder


def check_writable(path, inputs=()) -> None:
    """Fail early, before long work, if ``path`` cannot be written (missing folder) or is one
    of ``inputs``, the files the command reads (under any spelling): writing it would
    replace that file (`fxsim attack m.h5 -o m.h5` turned the model into adversarial
    images)."""
    folder = _check_folder(path)
    try:  # a read-only or forbidden folder, found now rather than after the work
        fd, probe = tempfile.mkstemp(prefix=".fxsim-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FxsimError(f"cannot write {path}: {exc.strerror or exc}") from exc
    for given in inputs:
        if Path(given).resolve() == Path(path).resolve():
            raise FxsimError(f"cannot write {path}: it is {given}, which this command reads; "
                             "give another output path")


def file_digest(path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path, data) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Model files (HDF5, schema version 1; see docs/formats.md)
# --------------------------------------------------------------------------------------------

MODEL_FORMAT = "fxsim-model"
MODEL_VERSION = 1


def save_model(model, path, dataset: str, provenance: dict | None = None,
               metrics: dict | None = None, masks: dict | None = None,
               quant: dict | None = None) -> None:
    """Write ``model`` to an HDF5 model file, atomically.

    masks: layer name -> boolean array of that layer's weight shape (pruned models).
    quant: layer name -> JSON-ready Datapath dict (quantised models).
    """
    import h5py

    from fxsim import __version__

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = MODEL_FORMAT
        f.attrs["version"] = MODEL_VERSION
        f.attrs["arch"] = model.arch
        f.attrs["dataset"] = dataset
        f.attrs["input_shape"] = list(model.input_shape)
        f.attrs["num_classes"] = model.num_classes
        f.attrs["fxsim_version"] = __version__
        f.attrs["provenance"] = json.dumps(provenance or {})
        f.attrs["metrics"] = json.dumps(metrics or {})
        layers = f.create_group("layers")
        for layer in model.layers:
            if not layer.params and not layer.buffers:
                continue
            group = layers.create_group(layer.name)
            for name, value in {**layer.params, **layer.buffers}.items():
                group.create_dataset(name, data=np.asarray(value, np.float32))
            if masks and layer.name in masks:
                group.create_dataset("mask", data=np.asarray(masks[layer.name], bool))
        if quant:
            group = f.create_group("quant")
            for name, datapath in quant.items():
                group.attrs[name] = json.dumps(datapath)


def _bad(path, what: str):
    return FxsimError(f"{path}: {what}")


@contextlib.contextmanager
def _reading(path, expected_format: str, what: str):
    """Open one of fxsim's HDF5 files for reading. A missing file, a file that is not HDF5 or
    not of ``expected_format``, and a truncated or unreadable one (also while the body reads
    it) are each an FxsimError naming the file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise _bad(path, "no such file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        raise _bad(path, "not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != expected_format:
                raise _bad(path, f"format is {f.attrs.get('format')!r}, expected "
                                 f"{expected_format!r}")
            yield f
    except FxsimError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise _bad(path, f"unreadable or truncated {what} file ({exc})") from exc


def load_model(path):
    """Read a model file; return (model, info dict with dataset, provenance, metrics, masks,
    quant). Every problem is an FxsimError naming the file and what is wrong."""
    from fxsim.models import ARCHITECTURES

    with _reading(path, MODEL_FORMAT, "model") as f:
        return _read_model(f, Path(path), ARCHITECTURES)


def _read_model(f, path, architectures):
    from fxsim.compress import prunable_layers
    from fxsim.datapath import Datapath

    attrs = f.attrs
    version = attrs.get("version")
    if version != MODEL_VERSION:
        shown = version.item() if hasattr(version, "item") else version
        raise _bad(path, f"schema version {shown!r} is not supported "
                         f"(this fxsim reads version {MODEL_VERSION})")
    arch = attrs.get("arch")
    if arch not in architectures:
        raise _bad(path, f"unknown architecture {arch!r}; known: {', '.join(architectures)}")
    model = architectures[arch](num_classes=int(attrs["num_classes"]))
    if tuple(int(v) for v in attrs["input_shape"]) != model.input_shape:
        shown = tuple(int(v) for v in attrs["input_shape"])
        raise _bad(path, f"input_shape {shown} does not match {arch}")
    if "layers" not in f:
        raise _bad(path, "missing group 'layers'")
    masks = {}
    for layer in model.layers:
        expected = {**layer.params, **layer.buffers}
        if not expected:
            continue
        if layer.name not in f["layers"]:
            raise _bad(path, f"missing layer '{layer.name}'")
        group = f["layers"][layer.name]
        for name, current in expected.items():
            if name not in group:
                raise _bad(path, f"layer '{layer.name}' has no '{name}'")
            value = group[name][()]
            if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.number):
                raise _bad(path, f"layer '{layer.name}' {name} is not an array of numbers "
                                 f"(dtype {getattr(value, 'dtype', type(value).__name__)})")
            if value.shape != current.shape:
                raise _bad(path, f"layer '{layer.name}' {name} has shape {value.shape}, "
                                 f"{arch} needs {current.shape}")
            if not np.all(np.isfinite(value)):
                raise _bad(path, f"layer '{layer.name}' {name} holds NaN or inf values")
            target = layer.params if name in layer.params else layer.buffers
            target[name] = value.astype(np.float32)
        if "mask" in group:
            mask = group["mask"][()]
            weight = layer.params.get("weight")
            if weight is None or mask.shape != weight.shape or mask.dtype != np.bool_:
                raise _bad(path, f"layer '{layer.name}' mask has shape {mask.shape} dtype "
                                 f"{mask.dtype}, needs a boolean {getattr(weight, 'shape', None)}")
            masks[layer.name] = mask
    quant = {}
    if "quant" in f:
        known = {layer.name for layer in model.layers}
        # the datapath runs every conv/linear layer, so a quantised model has one for each
        datapath_layers = prunable_layers(model)
        for name, text in f["quant"].attrs.items():
            if name not in known:
                raise _bad(path, f"quant config names a missing layer '{name}'")
            if name not in datapath_layers:
                raise _bad(path, f"quant config names layer '{name}', which is not a "
                                 "convolution or linear layer")
            quant[name] = json.loads(text)
            try:  # checked here, so that every command names the file and the layer
                Datapath.from_dict(quant[name])
            except (FxsimError, TypeError, ValueError, KeyError, AttributeError) as exc:
                raise _bad(path, f"layer '{name}' has a bad quant config: {exc}") from exc
        uncovered = [name for name in datapath_layers if name not in quant]
        if uncovered:
            raise _bad(path, f"quant config has no datapath for layer '{uncovered[0]}'")
    info = {
        "arch": arch,
        "dataset": str(attrs.get("dataset", "")),
        "fxsim_version": str(attrs.get("fxsim_version", "")),
        "provenance": json.loads(attrs.get("provenance", "{}")),
        "metrics": json.loads(attrs.get("metrics", "{}")),
        "masks": masks,
        "quant": quant,
    }
    return model, info


# --------------------------------------------------------------------------------------------
# Training checkpoints (HDF5, version 1): where an interrupted training run continues
# --------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "fxsim-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path, run: str, arrays: dict[str, dict[str, np.ndarray]], rng_state: dict,
                    history: list[dict]) -> None:
    """Write a training run's state after an epoch, atomically: ``run`` identifies the run
    (see :func:`fxsim.train.train`), ``arrays`` is group name -> (name -> array) (parameters,
    buffers, momentum), kept in their own dtypes, ``rng_state`` the random generator's
    state, ``history`` the finished epochs' records."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = CHECKPOINT_FORMAT
        f.attrs["version"] = CHECKPOINT_VERSION
        f.attrs["run"] = run
        f.attrs["rng_state"] = json.dumps(rng_state)
        f.attrs["history"] = json.dumps(history)
        for group_name, named in arrays.items():
            group = f.create_group(group_name)
            for name, value in named.items():
                group.create_dataset(name, data=value)


def load_checkpoint(path, run: str) -> dict | None:
    """The state :func:`save_checkpoint` wrote at ``path`` if it is there and belongs to
    ``run``, else None (no file, or another run's, which the next save replaces). A damaged
    file is an FxsimError naming it: it is not deleted."""
    if not Path(path).exists():
        return None
    with _reading(path, CHECKPOINT_FORMAT, "checkpoint") as f:
        if f.attrs.get("version") != CHECKPOINT_VERSION or f.attrs.get("run") != run:
            return None
        return {"rng_state": json.loads(f.attrs["rng_state"]),
                "history": json.loads(f.attrs["history"]),
                "arrays": {g: {name: f[g][name][()] for name in f[g]} for g in f}}


ADVERSARIAL_FORMAT = "fxsim-adversarial"


def save_adversarial(path, original, adversarial, labels, meta: dict) -> None:
    """Adversarial images (HDF5, atomic): datasets ``original``, ``adversarial`` (float32,
    (N, C, H, W) in [0, 1] unless the attack did not clip) and ``labels``; root attributes
    ``format="fxsim-adversarial"``, ``version=1`` and ``meta`` (JSON: attack, settings, source
    model, dataset)."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = ADVERSARIAL_FORMAT
        f.attrs["version"] = 1
        f.attrs["meta"] = json.dumps(meta)
        f.create_dataset("original", data=np.asarray(original, np.float32), compression="gzip")
        f.create_dataset("adversarial", data=np.asarray(adversarial, np.float32),
                         compression="gzip")
        f.create_dataset("labels", data=np.asarray(labels, np.int64))


def load_adversarial(path):
    """Read an adversarial image file: (original, adversarial, labels, meta)."""
    with _reading(path, ADVERSARIAL_FORMAT, "adversarial") as f:
        original, adversarial = f["original"][()], f["adversarial"][()]
        labels, meta = f["labels"][()], json.loads(f.attrs["meta"])
    if adversarial.shape != original.shape or labels.shape != (len(original),):
        raise _bad(path, f"shapes do not match: original {original.shape}, adversarial "
                         f"{adversarial.shape}, labels {labels.shape}")
    return original, adversarial, labels, meta


# --------------------------------------------------------------------------------------------
# Results files (HDF5; see docs/formats.md)
# --------------------------------------------------------------------------------------------

RESULTS_FORMAT = "fxsim-results"
RESULTS_VERSION = 1
_TEXT_COLUMNS = {"attack", "scenario", "source", "target", "name", "kind", "file"}
_INT_COLUMNS = {"gradient_masked", "images", "bits"}


def _write_table(group, rows: list[dict], columns) -> None:
    import h5py

    for column in columns:
        values = [row[column] for row in rows]
        if column in _TEXT_COLUMNS:
            group.create_dataset(column, data=np.array(values, dtype=object),
                                 dtype=h5py.string_dtype())
        elif column in _INT_COLUMNS:
            group.create_dataset(column, data=np.array(values, dtype=np.int64))
        else:
            group.create_dataset(column, data=np.array(values, dtype=np.float64))


def _read_table(f, name: str, columns, path) -> list[dict]:
    if name not in f:
        raise _bad(path, f"missing group '{name}'")
    group = f[name]
    data = {}
    for column in columns:
        if column not in group:
            raise _bad(path, f"table '{name}' has no column '{column}'")
        value = group[column][()]
        if column in _TEXT_COLUMNS:
            data[column] = [v.decode() if isinstance(v, bytes) else str(v) for v in value]
        elif column in _INT_COLUMNS:
            data[column] = value.astype(np.int64).tolist()
        else:
            data[column] = value.astype(np.float64).tolist()
    lengths = {len(v) for v in data.values()}
    if len(lengths) > 1:
        raise _bad(path, f"table '{name}' has columns of different lengths {sorted(lengths)}")
    count = lengths.pop() if lengths else 0
    return [{c: data[c][i] for c in columns} for i in range(count)]


def save_results(path, rows: list[dict], models: list[dict], config: dict) -> None:
    """Write a results file atomically: group ``rows`` (one row per attack, scenario, source,
    target; columns scenarios.ROW_COLUMNS), group ``models`` (scenarios.MODEL_COLUMNS) and the
    JSON ``config`` that produced them."""
    import h5py

    from fxsim import __version__
    from fxsim.scenarios import MODEL_COLUMNS, ROW_COLUMNS

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = RESULTS_FORMAT
        f.attrs["version"] = RESULTS_VERSION
        f.attrs["fxsim_version"] = __version__
        f.attrs["config"] = json.dumps(config)
        _write_table(f.create_group("rows"), rows, ROW_COLUMNS)
        _write_table(f.create_group("models"), models, MODEL_COLUMNS)


def load_results(path) -> tuple[list[dict], list[dict], dict]:
    """Read and validate a results file: (rows, models, config)."""
    from fxsim.scenarios import MODEL_COLUMNS, ROW_COLUMNS, SCENARIOS

    with _reading(path, RESULTS_FORMAT, "results") as f:
        if f.attrs.get("version") != RESULTS_VERSION:
            raise _bad(path, f"results version {f.attrs.get('version')!r} is not supported")
        rows = _read_table(f, "rows", ROW_COLUMNS, path)
        models = _read_table(f, "models", MODEL_COLUMNS, path)
        config = json.loads(f.attrs.get("config", "{}"))
    names = {m["name"] for m in models}
    for i, row in enumerate(rows):
        if row["scenario"] not in SCENARIOS:
            raise _bad(path, f"row {i}: unknown scenario {row['scenario']!r}")
        for end in ("source", "target"):
            if row[end] not in names:
                raise _bad(path, f"row {i}: {end} {row[end]!r} is not in the models table")
    return rows, models, config
