"""Shared test helpers."""

from fxsim.cli import main


def run_cli(args, capsys):
    """Run the fxsim command line in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err
