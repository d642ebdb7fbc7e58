"""The public surface: pinned names, lazy optional extras, the CLI entry point."""

from __future__ import annotations

import subprocess
import sys

import streamnorm
from streamnorm import cli


def test_all_is_pinned_and_sorted():
    assert streamnorm.__all__ == [
        "CumulativeAverage",
        "EMA",
        "Moments",
        "Population",
        "Tracker",
        "WindowedAverage",
        "__version__",
        "moments",
        "normalize",
    ]
    assert streamnorm.__all__ == sorted(streamnorm.__all__)
    for name in streamnorm.__all__:
        assert hasattr(streamnorm, name)


def test_import_pulls_in_no_optional_extra():
    code = (
        "import sys, streamnorm\n"
        "heavy = {'torch', 'onnx', 'onnxruntime', 'dask', 'distributed', 'matplotlib', 'tqdm',"
        " 'sklearn', 'numba.cuda'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_help_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert "compare" in capsys.readouterr().out
    out = subprocess.run(
        [sys.executable, "-m", "streamnorm.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and streamnorm.__version__ in out.stdout


def test_bench_quick_runs(tmp_path, capsys):
    out = tmp_path / "bench.md"
    code = cli.main(["bench", "--quick", "--repeat", "1", "--no-others", "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert "ratio to sum" in text and "us / update" in text
    assert cli.main(["bench", "--repeat", "0"]) == 2
    assert "--repeat must be >= 1" in capsys.readouterr().err
