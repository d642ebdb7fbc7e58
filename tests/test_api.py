"""The public surface: pinned names, lazy optional extras, the CLI entry point."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

import streamnorm
from streamnorm import cli
from streamnorm._errors import (
    InputError,
    InputTypeError,
    MissingExtraError,
    OutputPathError,
)


def test_all_is_pinned_and_sorted():
    assert streamnorm.__all__ == [
        "AlphaMix",
        "BatchStats",
        "CumulativeAverage",
        "DecayingEMA",
        "EMA",
        "Moments",
        "Population",
        "PriorMix",
        "PriorPopulation",
        "Tracker",
        "WindowedAverage",
        "__version__",
        "moments",
        "normalize",
    ]
    assert streamnorm.__all__ == sorted(streamnorm.__all__)
    for name in streamnorm.__all__:
        assert hasattr(streamnorm, name)


@pytest.mark.slow
def test_import_pulls_in_no_optional_extra():
    code = (
        "import sys, streamnorm\n"
        "heavy = {'torch', 'onnx', 'onnxruntime', 'dask', 'distributed', 'matplotlib', 'tqdm',"
        " 'sklearn', 'numba.cuda', 'keras', 'lightning', 'jax'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_cli_help_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert "compare" in capsys.readouterr().out
    out = subprocess.run(
        [sys.executable, "-m", "streamnorm.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and streamnorm.__version__ in out.stdout


@pytest.mark.slow
def test_bench_quick_runs(tmp_path, capsys):
    out = tmp_path / "bench.md"
    code = cli.main(["bench", "--quick", "--repeat", "1", "--no-others", "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert "| ratio |" in text and "read limit" in text and "us / update" in text
    assert cli.main(["bench", "--repeat", "0"]) == 2
    assert "--repeat must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the CLI's error handling: user errors are one line and exit 2, bugs show their traceback


def _compare_raising(monkeypatch, error):
    """Make ``streamnorm compare`` raise ``error`` from inside the library call."""
    import streamnorm.compare

    def fail(**kw):
        raise error

    monkeypatch.setattr(streamnorm.compare, "compare", fail)


def _run_compare(tmp_path):
    return cli.main(["compare", "--out", str(tmp_path / "out"), "--quiet", "--no-plot"])


@pytest.mark.parametrize(
    "error",
    [
        InputError("momentum must be in (0, 1], got 0"),
        InputTypeError("seeds must be an int count"),
        OutputPathError("output 'x' is a directory"),
        MissingExtraError("tqdm is needed for this and is not installed: pip install tqdm"),
        FileNotFoundError(2, "No such file or directory", "data.npy"),
        PermissionError(13, "Permission denied", "out/compare.json"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(error, tmp_path, monkeypatch, capsys):
    _compare_raising(monkeypatch, error)
    assert _run_compare(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamnorm compare: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("an internal bug"),
        ValueError("a plain ValueError from inside the library"),
        TypeError("unsupported operand"),
        ImportError("cannot import name 'x' from 'streamnorm._y'"),
        OSError(errno.EIO, "Input/output error"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset"),
    ],
)
def test_cli_bugs_propagate_with_their_traceback(error, tmp_path, monkeypatch, capsys):
    _compare_raising(monkeypatch, error)
    with pytest.raises(type(error)) as info:
        _run_compare(tmp_path)
    assert info.value is error
    assert capsys.readouterr().err == ""


def test_cli_usage_error_is_a_library_error():
    assert issubclass(cli.UsageError, InputError) and issubclass(cli.UsageError, ValueError)


@pytest.mark.parametrize("wrapped", [False, True])
def test_cli_ctrl_c_prints_one_line_and_exits_130(wrapped, tmp_path, monkeypatch, capsys):
    error: BaseException = KeyboardInterrupt()
    if wrapped:  # how a compiled parallel kernel reports an interrupt
        error = SystemError("CPUDispatcher(...) returned a result with an exception set")
        error.__cause__ = KeyboardInterrupt()
    _compare_raising(monkeypatch, error)
    assert _run_compare(tmp_path) == 130
    assert capsys.readouterr().err == "streamnorm compare: interrupted\n"
    assert not (tmp_path / "out").exists()


def test_cli_system_error_without_interrupt_is_a_bug(tmp_path, monkeypatch):
    error = SystemError("something else")
    error.__cause__ = RuntimeError("inner")
    _compare_raising(monkeypatch, error)
    with pytest.raises(SystemError):
        _run_compare(tmp_path)


@pytest.mark.slow
def test_cli_bug_shows_a_traceback_in_a_real_process(tmp_path):
    code = (
        "import sys, streamnorm.compare\n"
        "def bug(**kw):\n"
        "    raise ValueError('a plain ValueError from inside the library')\n"
        "streamnorm.compare.compare = bug\n"
        "from streamnorm.cli import main\n"
        f"sys.exit(main(['compare', '--out', {str(tmp_path / 'o')!r}, '--quiet', '--no-plot']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "a plain ValueError" in out.stderr
