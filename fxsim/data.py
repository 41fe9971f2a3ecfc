"""Data sets: MNIST and Fashion-MNIST (IDX, gzip), CIFAR-10 (python pickle batches), and an
embedded Fashion-MNIST sample so that everything runs offline.

Where data is looked for, in order: the data folder (``--data-dir``, else ``$FXSIM_DATA``, else
the user cache folder), then ``/usr/share/datasets/<name>/`` (Debian's ``dataset-fashion-mnist``
package puts Fashion-MNIST there). ``fxsim data fetch NAME`` downloads from the canonical source
with pooch into the data folder, checking each file's published checksum. Images come back as
float32 in [0, 1], shape (N, C, H, W); labels as int64.
"""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from fxsim.errors import FxsimError

SYSTEM_DIRS = (Path("/usr/share/datasets"),)
SAMPLE = "sample"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: str  # "idx" or "cifar"
    input_shape: tuple
    classes: tuple
    urls: tuple  # base URLs, first one tried first
    files: dict  # file name -> known hash ("sha256:..." or "md5:...")
    source: str


_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

DATASETS = {
    "mnist": DatasetInfo(
        "mnist", "idx", (1, 28, 28), tuple(str(i) for i in range(10)),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/",
         "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        dict(zip(_IDX_FILES, (
            "sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ), strict=True)),
        "Y. LeCun, C. Cortes, C. Burges: the MNIST database",
    ),
    # Zalando publishes MD5 sums only for these files, so that is what a download is checked
    # against; Debian's package recompresses them, so local copies are checked by format.
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", "idx", (1, 28, 28),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        dict(zip(_IDX_FILES, (
            "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d", "md5:25c81989df183df01b3e8a0aad5dffbe",
            "md5:bef4ecab320f06d8554ea6380940ec79", "md5:bb300cfdad3c16e7a12a480ee83cd310",
        ), strict=True)),
        "Zalando Research, MIT licence",
    ),
    "cifar10": DatasetInfo(
        "cifar10", "cifar", (3, 32, 32),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"),
        ("https://www.cs.toronto.edu/~kriz/",),
        {"cifar-10-python.tar.gz":
         "sha256:6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
        "A. Krizhevsky: CIFAR-10",
    ),
}


def data_dir(override=None) -> Path:
    """The folder fxsim keeps data sets in."""
    if override:
        return Path(override)
    if os.environ.get("FXSIM_DATA"):
        return Path(os.environ["FXSIM_DATA"])
    import pooch

    return Path(pooch.os_cache("fxsim"))


def names() -> list[str]:
    return [*DATASETS, SAMPLE]


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise FxsimError(f"unknown dataset {name!r}; choose one of: {', '.join(names())}")
    return DATASETS[name]


def locate(name: str, folder=None) -> Path | None:
    """The folder holding ``name``'s files, or None. The sample is always there."""
    info = _info(name)
    candidates = [data_dir(folder) / name, *(d / name for d in SYSTEM_DIRS)]
    for candidate in candidates:
        if info.kind == "idx" and all((candidate / f).is_file() for f in info.files):
            return candidate
        if info.kind == "cifar" and (
            (candidate / "cifar-10-batches-py").is_dir()
            or (candidate / "cifar-10-python.tar.gz").is_file()
        ):
            return candidate
    return None


def fetch(name: str, folder=None, progress=None) -> Path:
    """Download ``name`` into the data folder (skipping files already there and verified).
    ``progress(file name)``, if given, makes a progress bar for one file in pooch's protocol
    (``total``, ``update(n)``, ``reset()``, ``close()``); pooch's own bar would need tqdm."""
    info = _info(name)
    import pooch

    target = data_dir(folder) / name
    target.mkdir(parents=True, exist_ok=True)
    for file_name, known_hash in info.files.items():
        errors = []
        for base in info.urls:
            try:
                pooch.retrieve(base + file_name, known_hash=known_hash, fname=file_name,
                               path=target, progressbar=progress(file_name) if progress else False)
                break
            except Exception as exc:  # network or checksum: try the next mirror
                errors.append(f"{base}: {exc}")
        else:
            raise FxsimError(f"could not download {file_name} for {name}: {'; '.join(errors)}")
    return target


def available(folder=None) -> list[dict]:
    """One row per data set: where it is, or how to get it."""
    rows = [{"name": SAMPLE, "where": "embedded in fxsim (6,000 train + 1,000 test "
             "Fashion-MNIST images)"}]
    for name, info in DATASETS.items():
        where = locate(name, folder)
        rows.append({"name": name, "where": str(where) if where else
                     f"not present: `fxsim data fetch {name}` ({info.urls[0]})"})
    return rows


def default_dataset(folder=None) -> str:
    """Fashion-MNIST where present, else the embedded sample."""
    return "fashion-mnist" if locate("fashion-mnist", folder) else SAMPLE


def input_shape(name: str) -> tuple:
    return (1, 28, 28) if name == SAMPLE else _info(name).input_shape


def load(name: str, split: str = "test", folder=None, limit: int | None = None):
    """(images float32 (N, C, H, W) in [0, 1], labels int64 (N,)) of ``split`` ('train'/'test').

    ``limit`` keeps the first N. A data set that is not present is an error that says how to
    fetch it (loading never downloads).
    """
    if split not in ("train", "test"):
        raise FxsimError(f"split must be 'train' or 'test', got {split!r}")
    if name == SAMPLE:
        images, labels = _load_sample(split)
    else:
        info = _info(name)
        where = locate(name, folder)
        if where is None:
            raise FxsimError(f"dataset {name} not found in {data_dir(folder) / name} or "
                             f"{', '.join(str(d / name) for d in SYSTEM_DIRS)}; run "
                             f"`fxsim data fetch {name}`")
        images, labels = (_load_idx if info.kind == "idx" else _load_cifar)(where, split)
        _check_labels(labels, len(info.classes), where, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return (images.astype(np.float32) / np.float32(255.0)), labels.astype(np.int64)


def _check_labels(labels, n_classes: int, where, split: str) -> None:
    """A label outside 0 .. n_classes - 1 is a damaged file: every accuracy computed on it
    would be quietly wrong, so it is an error naming the first such label."""
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        raise FxsimError(f"{where}: {split} label {int(labels[bad[0]])} at index {bad[0]} is "
                         f"not a class (0 .. {n_classes - 1}; {bad.size} of {labels.size} "
                         "labels are not)")


def _load_sample(split):
    with resources.files("fxsim").joinpath("_data/fashion-mnist-sample.npz").open("rb") as f:
        data = np.load(f)
        return data[f"{split}_images"][:, None], data[f"{split}_labels"]


def read_idx(path) -> np.ndarray:
    """An IDX file (gzip-compressed or not) as a uint8 array; malformed files are named."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise FxsimError(f"{path}: cannot read ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise FxsimError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise FxsimError(f"{path}: header says {dims} but the file holds "
                         f"{len(raw) - header} bytes of data (truncated?)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_idx(folder: Path, split: str):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise FxsimError(f"{folder}: {split} images {images.shape} and labels {labels.shape} "
                         "do not match")
    return images[:, None], labels


def _unpickle(data: bytes, where: str):
    try:
        batch = pickle.loads(data, encoding="bytes")
        images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], np.int64)
    except Exception as exc:
        raise FxsimError(f"{where}: not a CIFAR-10 python batch ({exc})") from exc
    if len(images) != len(labels):
        raise FxsimError(f"{where}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _load_cifar(folder: Path, split: str):
    names_ = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    batches = []
    extracted = folder / "cifar-10-batches-py"
    if extracted.is_dir():
        for n in names_:
            path = extracted / n
            if not path.is_file():
                raise FxsimError(f"{path}: missing CIFAR-10 batch")
            batches.append(_unpickle(path.read_bytes(), str(path)))
    else:
        archive = folder / "cifar-10-python.tar.gz"
        try:
            with tarfile.open(archive) as tar:
                for n in names_:
                    member = tar.extractfile(f"cifar-10-batches-py/{n}")
                    batches.append(_unpickle(member.read(), f"{archive}:{n}"))
        except (tarfile.TarError, KeyError, OSError, AttributeError) as exc:
            raise FxsimError(f"{archive}: not a readable CIFAR-10 archive ({exc})") from exc
    return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
