import json
import struct

import pytest

from fxsim.bench import markdown_table, sparse_vs_dense
from fxsim.cli import main
from fxsim.errors import FxsimError
from fxsim.kernels import int8


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_sparse_vs_dense_rows_are_consistent():
    rows = sparse_vs_dense(["lenet5.fc2"], densities=(1.0, 0.1), repeats=1)
    assert [r["density"] for r in rows] == [1.0, 0.1]
    full, pruned = rows
    # kept weights whose random code happens to be 0 are skipped too (about 1 in 256)
    assert full["macs"] == 256 * 10 * 500
    assert 0.97 * full["macs"] <= full["executed_macs"] <= full["macs"]
    kept = 500 * 256  # 10% of 5000 weights, times 256 images
    assert pruned["executed_macs"] % 256 == 0 and 0.9 * kept <= pruned["executed_macs"] <= kept
    assert pruned["weight_bytes"]["csr"] < full["weight_bytes"]["dense"]
    for r in rows:
        assert all(t > 0 for t in r["seconds"].values())
    table = markdown_table(rows)
    assert table.count("\n") == 3 and "| lenet5.fc2 | 0.1 |" in table


def test_bench_rejects_bad_densities_and_layers():
    with pytest.raises(FxsimError, match=r"densities must be in \(0, 1\], got 0.0"):
        sparse_vs_dense(["lenet5.fc2"], densities=(0.0, 0.5), repeats=1)
    with pytest.raises(FxsimError, match="unknown layer 'lenet9'"):
        sparse_vs_dense(["lenet9"], repeats=1)


def test_bench_command_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    main(["bench", "kernels", "--layers", "lenet5.fc2", "--densities", "1,0.2",
          "--repeats", "1", "--json", str(out_json), "--plot", str(out_png)])
    assert "| lenet5.fc2 | 0.2 |" in capsys.readouterr().out
    assert len(json.loads(out_json.read_text())["rows"]) == 2
    width, height = png_size(out_png)
    assert 300 <= width <= 2000 and 200 <= height <= 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.png"]  # no temp files


def test_bench_command_bad_input_exits_2_without_files(tmp_path, capsys):
    target = tmp_path / "b.json"
    with pytest.raises(SystemExit) as done:
        main(["bench", "kernels", "--densities", "0.5,1.5", "--json", str(target)])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == "error: densities must be in (0, 1], got 1.5"
    assert not target.exists()
    for option in ("--json", "--plot"):  # refused before the timing, not after it
        with pytest.raises(SystemExit) as done:
            main(["bench", "kernels", "--layers", "lenet5.fc2", "--repeats", "1",
                  option, str(tmp_path / "missing" / "b.json")])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot write") and "density" not in err


def test_bench_command_times_a_per_mac_register(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(int8, "AVAILABLE", False)  # the float lanes (int8_mac: its own tests)
    out_json = tmp_path / "b.json"
    main(["bench", "kernels", "--layers", "lenet5.conv2", "--densities", "1",
          "--repeats", "1", "--per-mac-acc-bits", "18", "--json", str(out_json)])
    assert "| per_mac_float32 / sparse_per_mac_float32 |" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["per_mac_acc_bits"] == 18
    # random 8-bit codes over a fan-in of 500 can overflow an 18-bit register: no exact path
    # (a saturating register whose values stay below 2^24 runs in float32 lanes)
    assert result["rows"][0]["paths"] == {"dense_int": ["per_mac_float32"],
                                          "sparse_int": ["sparse_per_mac_float32"]}
    with pytest.raises(SystemExit) as done:
        main(["bench", "kernels", "--layers", "lenet5.fc2", "--per-mac-acc-bits", "10"])
    assert done.value.code == 2
    assert "acc_bits 10 cannot hold one product" in capsys.readouterr().err
