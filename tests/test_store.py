import json

import h5py
import numpy as np
import pytest

from fxsim import compress, store
from fxsim.cli import main
from fxsim.errors import FxsimError
from fxsim.models import cifarnet, lenet5


def saved_lenet(tmp_path, name="m.h5", **kwargs):
    model = lenet5(seed=3)
    path = tmp_path / name
    store.save_model(model, path, "fashion-mnist", {"command": "test", "seed": 3},
                     {"test_acc": 0.5}, **kwargs)
    return model, path


def test_round_trip_is_bit_exact(tmp_path):
    quant = compress.quant_config(lenet5(), 8)
    model, path = saved_lenet(tmp_path, masks={"fc1": np.ones((500, 800), bool)}, quant=quant)
    loaded, info = store.load_model(path)
    for name, value in model.parameters().items():
        assert np.array_equal(loaded.parameters()[name], value)
    assert info["dataset"] == "fashion-mnist" and info["metrics"] == {"test_acc": 0.5}
    assert info["provenance"]["seed"] == 3 and info["masks"]["fc1"].all()
    assert info["quant"] == quant
    net = cifarnet(seed=1)
    net.layer("bn2").buffers["var"][:] = 3.0
    store.save_model(net, tmp_path / "c.h5", "cifar10")
    loaded_net, _ = store.load_model(tmp_path / "c.h5")
    assert np.array_equal(loaded_net.layer("bn2").buffers["var"], net.layer("bn2").buffers["var"])


def edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


BAD_FILES = {
    "wrong format": (lambda f: f.attrs.__setitem__("format", "keras"), "format is 'keras'"),
    "wrong version": (lambda f: f.attrs.__setitem__("version", 7), "schema version 7"),
    "unknown arch": (lambda f: f.attrs.__setitem__("arch", "resnet"), "unknown architecture"),
    "missing layer": (lambda f: f["layers"].__delitem__("conv2"), "missing layer 'conv2'"),
    "shape": (lambda f: (f["layers/fc2"].__delitem__("weight"),
                         f["layers/fc2"].create_dataset("weight", data=np.zeros((10, 400)))),
              r"fc2' weight has shape \(10, 400\), lenet5 needs \(10, 500\)"),
    "nan": (lambda f: f["layers/conv1/bias"].__setitem__(0, np.nan), "NaN or inf"),
    "mask shape": (lambda f: f["layers/fc1"].create_dataset("mask", data=np.ones((3, 3), bool)),
                   "fc1' mask has shape"),
    "quant layer": (lambda f: f.create_group("quant").attrs.__setitem__("conv9", "{}"),
                    "quant config names a missing layer 'conv9'"),
}


def set_quant(layer, **changes):
    """An edit of a quantised model file: layer's quant config with ``changes`` (None: drop
    the layer's config)."""
    def fn(f):
        attrs = f["quant"].attrs
        if changes.get("drop"):
            del attrs[layer]
            return
        config = json.loads(attrs["fc1"])
        config.update(changes)
        attrs[layer] = json.dumps(config)
    return fn


# a quantised model file whose quant configs are broken: every command must name the file
# and the layer (they used to pass `fxsim info` and fail later without either, or crash it)
BAD_QUANT = {
    "no weight format": (set_quant("fc1", weight_fmt=None), "fc1' has a bad quant config: "),
    "bits": (set_quant("fc1", weight_fmt={"bits": 200, "int_bits": 2}),
             "fc1' has a bad quant config: QFormat bits must be between 1 and 64, got 200"),
    "rounding": (set_quant("conv2", rounding="banana"),
                 "conv2' has a bad quant config: unknown rounding mode 'banana'"),
    "accumulator": (set_quant("fc2", acc_bits=4), "fc2' has a bad quant config: acc_bits 4"),
    "not an object": (lambda f: f["quant"].attrs.__setitem__("fc1", "[1, 2]"),
                      "fc1' has a bad quant config: a Datapath must be a JSON object"),
    "not a datapath layer": (set_quant("pool1"), "names layer 'pool1', which is not a conv"),
    "a layer uncovered": (set_quant("conv1", drop=True), "no datapath for layer 'conv1'"),
    "text weights": (lambda f: (f["layers/fc2"].__delitem__("bias"),
                                f["layers/fc2"].create_dataset("bias", data=[b"a"] * 10)),
                     "fc2' bias is not an array of numbers"),
}


@pytest.mark.parametrize("case", list(BAD_FILES) + list(BAD_QUANT))
def test_bad_model_files_give_one_line_and_exit_2(tmp_path, case, capsys):
    if case in BAD_FILES:
        fn, message = BAD_FILES[case]
        _, path = saved_lenet(tmp_path)
    else:
        fn, message = BAD_QUANT[case]
        _, path = saved_lenet(tmp_path, quant=compress.quant_config(lenet5(), 8))
    edit(path, fn)
    with pytest.raises(FxsimError, match=message):
        store.load_model(path)
    with pytest.raises(SystemExit) as done:
        main(["info", str(path)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and str(path) in err


def test_not_hdf5_and_truncated_files(tmp_path):
    text = tmp_path / "t.h5"
    text.write_text("hello")
    with pytest.raises(FxsimError, match="not an HDF5 file"):
        store.load_model(text)
    _, path = saved_lenet(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FxsimError, match=r"cut\.h5"):
        store.load_model(cut)
    with pytest.raises(FxsimError, match="no such file"):
        store.load_model(tmp_path / "absent.h5")


def test_interrupted_save_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    model, path = saved_lenet(tmp_path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(KeyboardInterrupt):
        store.save_model(model, path, "fashion-mnist")
    with pytest.raises(KeyboardInterrupt):
        store.save_model(model, tmp_path / "new.h5", "fashion-mnist")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]


def test_a_failing_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    """The machine refusing a write (a full disk, a read-only or forbidden folder) is an
    error naming the file, exit 2, not an "internal error"; the old file stays."""
    import errno
    import os
    import sys

    model, path = saved_lenet(tmp_path)
    before = path.read_bytes()

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(FxsimError, match=r"cannot write .*m\.h5: No space left on device"):
        store.save_model(model, path, "fashion-mnist")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]  # no temporary left
    monkeypatch.undo()
    if sys.platform == "linux":  # a folder nobody can create files in, root included
        with pytest.raises(FxsimError, match=r"cannot write /proc/m\.h5: "):
            store.check_writable("/proc/m.h5")
        with pytest.raises(SystemExit) as done:  # found before the work, not after it
            main(["prune", str(path), "--density", "0.5", "-o", "/proc/m.h5"])
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.startswith("error: cannot write /proc/m.h5")


def test_info_command_prints_architecture_and_json(tmp_path, capsys):
    _, path = saved_lenet(tmp_path)
    main(["info", str(path)])
    out = capsys.readouterr().out
    assert "lenet5 on fashion-mnist, 431,080 parameters" in out and "fc1" in out
    main(["info", str(path), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] == 431_080 and len(summary["layers"]) == 4
