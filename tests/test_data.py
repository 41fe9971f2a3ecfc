import gzip
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fxsim import data
from fxsim.errors import FxsimError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, compress=True):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist_like(folder: Path, images, labels, test_images, test_labels):
    folder.mkdir(parents=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", test_images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", test_labels)


def test_embedded_sample_is_real_fashion_mnist():
    x, y = data.load("sample", "train")
    assert x.shape == (6000, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.mean() > 0.2  # real images, not noise
    assert np.bincount(y).min() > 500  # all ten classes present
    xt, yt = data.load("sample", "test", limit=10)
    assert xt.shape == (10, 1, 28, 28) and yt.shape == (10,)


def test_idx_loader_round_trips_files_in_the_real_format(tmp_path):
    x, y = data.load("sample", "train", limit=50)
    images = np.round(x[:, 0] * 255).astype(np.uint8)
    write_mnist_like(tmp_path / "mnist", images, y, images[:20], y[:20])
    got_x, got_y = data.load("mnist", "train", folder=tmp_path)
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y)
    assert data.load("mnist", "test", folder=tmp_path)[0].shape == (20, 1, 28, 28)
    assert data.locate("mnist", tmp_path) == tmp_path / "mnist"


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian():
    x, y = data.load("fashion-mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and np.bincount(y).tolist() == [1000] * 10
    xs, ys = data.load("sample", "test")
    assert np.array_equal(x[:1000], xs) and np.array_equal(y[:1000], ys)


def test_bad_idx_files_are_named(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x09\x01" + (3).to_bytes(4, "big") + b"abc"))
    with pytest.raises(FxsimError, match="bad magic"):
        data.read_idx(bad)
    short = tmp_path / "y.gz"
    short.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"ab"))
    with pytest.raises(FxsimError, match=r"y.gz: header says \[5\].*truncated"):
        data.read_idx(short)
    garbage = tmp_path / "z.gz"
    garbage.write_bytes(b"not gzip at all")
    with pytest.raises(FxsimError, match=r"z\.gz: cannot read"):
        data.read_idx(garbage)


def test_labels_outside_the_classes_are_named(tmp_path):
    x, y = data.load("sample", "test", limit=30)
    images = np.round(x[:, 0] * 255).astype(np.uint8)
    bad = y.copy()
    bad[[7, 20]] = [10, 255]
    write_mnist_like(tmp_path / "mnist", images, y, images, bad)
    assert np.array_equal(data.load("mnist", "train", folder=tmp_path)[1], y)
    with pytest.raises(FxsimError, match=r"mnist: test label 10 at index 7 is not a class "
                                         r"\(0 \.\. 9; 2 of 30 labels are not\)"):
        data.load("mnist", "test", folder=tmp_path, limit=5)
    batches = write_cifar(tmp_path / "cifar10", np.random.default_rng(0), as_archive=False)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({**batches["test_batch"], b"labels": [0, 1, 2, -1, 4, 5, 6]}))
    with pytest.raises(FxsimError, match="cifar10: test label -1 at index 3 is not a class"):
        data.load("cifar10", "test", folder=tmp_path)


def write_cifar(folder: Path, rng, as_archive: bool):
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 7).tolist()
        batches[name] = {b"data": rng.integers(0, 256, (7, 3072), dtype=np.uint8),
                         b"labels": labels}
    inner = folder / "cifar-10-batches-py"
    inner.mkdir(parents=True)
    for name, batch in batches.items():
        (inner / name).write_bytes(pickle.dumps(batch))
    if as_archive:
        with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(inner, arcname="cifar-10-batches-py")
        for p in inner.iterdir():
            p.unlink()
        inner.rmdir()
    return batches


@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar10_loader_on_files_the_test_writes(tmp_path, as_archive):
    batches = write_cifar(tmp_path / "cifar10", np.random.default_rng(0), as_archive)
    x, y = data.load("cifar10", "train", folder=tmp_path)
    assert x.shape == (35, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32) / 255.0
    assert np.allclose(x[0], first)
    assert y[:7].tolist() == batches["data_batch_1"][b"labels"]
    xt, yt = data.load("cifar10", "test", folder=tmp_path)
    assert xt.shape == (7, 3, 32, 32) and yt.tolist() == batches["test_batch"][b"labels"]


def test_missing_and_unknown_datasets_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIRS", ())
    with pytest.raises(FxsimError, match="run `fxsim data fetch mnist`"):
        data.load("mnist", folder=tmp_path)
    with pytest.raises(FxsimError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")
    assert data.default_dataset(tmp_path) == "sample"
    rows = {r["name"]: r["where"] for r in data.available(tmp_path)}
    assert rows["cifar10"].startswith("not present")


def test_fetch_verifies_checksums(tmp_path, monkeypatch):
    import pooch

    calls = []

    def fake_retrieve(url, known_hash, fname, path, progressbar):
        calls.append((url, known_hash))
        raise ValueError("SHA256 hash of downloaded file does not match")

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    with pytest.raises(FxsimError, match=r"could not download train-images-idx3-ubyte\.gz"):
        data.fetch("mnist", tmp_path, progress=False)
    assert [c[0].split("/")[2] for c in calls] == ["ossci-datasets.s3.amazonaws.com",
                                                   "storage.googleapis.com"]
    assert calls[0][1].startswith("sha256:440fcabf")


def test_data_commands(tmp_path, capsys):
    from fxsim.cli import main

    main(["data", "list", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("sample") and "cifar10" in out
    with pytest.raises(SystemExit) as done:
        main(["data", "fetch", "imagenet", "--data-dir", str(tmp_path)])
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown dataset 'imagenet'")


@pytest.fixture
def local_mirror(tmp_path, monkeypatch):
    """MNIST-format files served over HTTP from this machine, registered as the mnist data
    set's only mirror with their SHA-256 sums: the download path as a user runs it (pooch,
    checksums, the progress bars), with no internet."""
    import functools
    import hashlib
    import http.server
    import threading
    from dataclasses import replace

    served = tmp_path / "served"
    x, y = data.load("sample", "train", limit=40)
    images = np.round(x[:, 0] * 255).astype(np.uint8)
    write_mnist_like(served, images, y, images[:10], y[:10])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sums = {p.name: "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
            for p in served.iterdir()}
    info = replace(data.DATASETS["mnist"], urls=(f"http://127.0.0.1:{server.server_port}/",),
                   files=sums)
    monkeypatch.setitem(data.DATASETS, "mnist", info)
    yield served, x, y
    server.shutdown()
    server.server_close()


def test_fetch_downloads_checks_and_loads(tmp_path, capsys, local_mirror):
    """`fxsim data fetch` on a clean install: it used to ask pooch for tqdm's progress bar,
    which fxsim does not depend on, and failed on every file."""
    from tests.helpers import run_cli

    served, x, y = local_mirror
    code, out, err = run_cli(["data", "fetch", "mnist", "--data-dir", tmp_path / "d"], capsys)
    assert code == 0, err
    assert out.strip() == str(tmp_path / "d" / "mnist")
    assert "train-images-idx3-ubyte.gz" in err and "tqdm" not in err
    for name in data.DATASETS["mnist"].files:
        assert (tmp_path / "d" / "mnist" / name).read_bytes() == (served / name).read_bytes()
    got_x, got_y = data.load("mnist", "train", folder=tmp_path / "d")
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y)


def test_fetch_refuses_a_file_whose_checksum_differs(tmp_path, capsys, local_mirror):
    from tests.helpers import run_cli

    served, _, _ = local_mirror
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    code, _, err = run_cli(["data", "fetch", "mnist", "--data-dir", tmp_path / "d"], capsys)
    assert code == 2 and "could not download t10k-labels-idx1-ubyte.gz for mnist" in err
    assert not (tmp_path / "d" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
