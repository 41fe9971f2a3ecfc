import json
import subprocess
import sys

import pytest

from fxsim.cli import main


def run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_format_command_quantises_values(capsys):
    main(["format", "8", "2", "--json", "0.3", "--", "-5"])
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 1 / 64 and (info["min_code"], info["max_code"]) == (-128, 127)
    assert [(r["code"], r["overflow"]) for r in info["values"]] == [(19, False), (-128, True)]
    main(["format", "4", "1", "--rounding", "trn", "0.9999"])
    assert "code        7 = 0.875" in capsys.readouterr().out
    # every digit: the top of fix<8,2> is 1.984375 (%g said 1.98438), a code's value exact
    main(["format", "8", "2", "0.3", "--", "-5"])
    out = capsys.readouterr().out
    assert "step 0.015625; range [-2.0, 1.984375]" in out and "= -2.0  overflow (sat)" in out
    main(["format", "16", "4", "0.123456789"])
    assert "0.123456789 -> code      506 = 0.12353515625" in capsys.readouterr().out
    main(["format", "4", "0", "--unsigned", "0.3"])
    assert capsys.readouterr().out.startswith("ufix<4,0>: 4 bits, 0 integer (no sign), 4 fraction")


def test_bad_input_is_one_line_and_exit_code_2(capsys):
    code, out, err = run(["format", "70", "2"], capsys)
    assert out == ""
    assert code == 2 and err.strip() == "error: QFormat bits must be between 1 and 64, got 70"
    code, _, err = run(["format", "8", "2", "--rounding", "nearest", "1"], capsys)
    assert code == 2 and "'nearest' is not one of" in err


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "fxsim.cli", "--version"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and "fxsim, version" in done.stdout


def test_a_first_run_says_that_the_kernels_compile(tmp_path):
    """With an empty Numba cache a command that compiles for a second or more says so, once
    (a first run's minutes of compiling otherwise look like a hang); with the kernels cached it
    says nothing, and FXSIM_COMPILE_NOTICE=off silences it."""
    import os

    def stderr(**env):
        done = subprocess.run([sys.executable, "-m", "fxsim.cli", "format", "8", "2", "0.3"],
                              capture_output=True, text=True,
                              env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
                                   **env})
        assert done.returncode == 0 and "code       19" in done.stdout, done.stderr
        return done.stderr

    first = stderr(FXSIM_COMPILE_NOTICE="on")  # `format` compiles ~2 s of kernels
    assert first == ("fxsim: compiling kernels for this CPU (a first run: a minute or two in "
                     "all; they are cached on disk for the next runs)\n")
    assert stderr(FXSIM_COMPILE_NOTICE="on") == ""  # cached now
    assert stderr(FXSIM_COMPILE_NOTICE="off", NUMBA_CACHE_DIR=str(tmp_path / "other")) == ""


@pytest.mark.parametrize("args", [
    ["attack", "{m}", "--method", "fgsm", "-o", "{m_again}"],
    ["attack", "{m}", "--method", "fgsm", "--plot", "{m}"],
    ["attack", "{m}", "--method", "fgsm", "--eval-on", "{q}", "-o", "{q}"],
    ["strength", "{m}", "--plot", "{m_again}"],
    ["distributions", "{m}", "{q}", "--plot", "{q}"],
    ["prune", "{m}", "--density", "0.5", "-o", "{m_again}"],
    ["quantize", "{m}", "--bits", "8", "-o", "{m}"],
    ["scenarios", "--baseline", "{m}", "--compressed", "{q}", "-o", "{q}"],
])
def test_an_output_that_is_an_input_is_refused(tmp_path, capsys, args):
    """`fxsim attack m.h5 -o m.h5` used to replace the model with adversarial images, and
    `fxsim scenarios ... -o q8.h5` a compressed model with the results: now exit 2, one line,
    every file as it was."""
    from fxsim import compress, store
    from fxsim.models import lenet5

    model = lenet5(seed=0)
    store.save_model(model, tmp_path / "m.h5", "sample")
    store.save_model(model, tmp_path / "q.h5", "sample", quant=compress.quant_config(model, 8))
    (tmp_path / "sub").mkdir()
    paths = {"m": tmp_path / "m.h5", "q": tmp_path / "q.h5",
             "m_again": tmp_path / "sub" / ".." / "m.h5"}
    before = {name: paths[name].read_bytes() for name in ("m", "q")}
    with pytest.raises(SystemExit) as done:
        main([a.format(**paths) for a in args])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1, err
    assert "which this command reads; give another output path" in err
    assert {name: paths[name].read_bytes() for name in ("m", "q")} == before
