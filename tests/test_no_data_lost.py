"""Nothing the user has is lost: outputs never overwrite inputs or each other, adaptations are
undone exactly, a SIGTERM leaves the old output and no partial file, files follow the umask,
and paths mean what they say."""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest

from streamnorm import cli
from streamnorm._io import atomic_write
from streamnorm.calibrate import open_data

TESTS = str(pathlib.Path(__file__).parent)


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _x(n: int = 40, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.5 + 2.0 * rng.standard_normal((n, 2, 6, 6))).astype(np.float32)


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith(f"streamnorm {command}: error:"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a calibration pass starts (checks must come first)."""
    from streamnorm.calibrate import LayerStats

    def add(self, x, channel_axis=1):  # pragma: no cover - reached only on a regression
        raise AssertionError("the calibration ran before the outputs were checked")

    monkeypatch.setattr(LayerStats, "add", add)


@pytest.fixture
def onnx_models(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    """An ONNX model in one file, one whose weights are in ``weights.bin``, and data files."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from _calib_fixtures import onnx_cnn

    files = {
        "plain": tmp_path / "m.onnx",
        "ext": tmp_path / "e.onnx",
        "weights": tmp_path / "weights.bin",
        "data": tmp_path / "tgt.npy",
        "source": tmp_path / "src.npy",
    }
    onnx.save(onnx_cnn(15), str(files["plain"]))
    onnx.save_model(
        onnx_cnn(15),
        str(files["ext"]),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    np.save(files["data"], _x())
    np.save(files["source"], _x(seed=2) + 1)
    return files


# ------------------------------------------------------------------------------------------
# item 1: every output is checked against every input and every other output, before the run


def test_plot_and_data_files_never_overwrite_an_input_or_an_output(
    onnx_models, tmp_path, capsys, no_run
) -> None:
    pytest.importorskip("matplotlib")
    m = onnx_models
    plain, ext, data, source = (str(m[k]) for k in ("plain", "ext", "data", "source"))
    victim_out = tmp_path / "o.onnx.data"  # the external data file of --out o.onnx
    victim_out.write_bytes(b"not yet written")
    shards = tmp_path / "p.onnx.data"
    shards.mkdir()
    np.save(shards / "p0.npy", _x())
    cases = [
        # --plot naming the source data
        ([plain, "--data", data, "--source", source, "--plot", source], m["source"], "inputs"),
        # --plot naming the input model's external data (its own name, not m.onnx.data)
        ([str(ext), "--data", data, "--plot", str(m["weights"])], m["weights"], "inputs"),
        # --plot naming the external data file --out gets
        ([ext, "--data", data, "--plot", str(victim_out)], victim_out, "same file"),
        # a --data folder where --out puts its external data file
        ([ext, "--data", str(shards)], shards / "p0.npy", "is a directory"),
        # --plot naming --out
        ([plain, "--data", data, "--plot", str(tmp_path / "o.onnx")], None, "same file"),
    ]
    for args, victim, match in cases:
        before = None if victim is None else _digest(victim)
        out = str(tmp_path / ("p.onnx" if "p.onnx.data" in args[2] else "o.onnx"))
        rc = cli.main(["calibrate", *args, "--out", out, "--no-progress"])
        err = _one_line_error(capsys, rc, "calibrate")
        assert match in err, (args, err)
        if victim is not None:
            assert _digest(victim) == before, args
        assert not os.path.exists(out), args


def test_library_checks_the_outputs_data_file_before_the_run(onnx_models, no_run) -> None:
    from streamnorm._errors import OutputPathError
    from streamnorm.onnx import annotate, recalibrate

    m = onnx_models
    out = m["ext"].parent / "o.onnx"
    shards = m["ext"].parent / "o.onnx.data"  # where the weights of out would go
    shards.mkdir()
    np.save(shards / "p0.npy", _x())
    before = _digest(shards / "p0.npy")
    with pytest.raises(OutputPathError, match="is a directory"):
        recalibrate(m["ext"], str(shards), out, progress=False)
    with pytest.raises(OutputPathError, match="is a directory"):
        recalibrate(m["ext"], m["data"], out, source=str(shards), progress=False)
    with pytest.raises(OutputPathError, match="is a directory"):
        annotate(m["ext"], str(shards), out, progress=False)
    assert _digest(shards / "p0.npy") == before and not out.exists()


# ------------------------------------------------------------------------------------------
# item 2: one active adaptation per model


def test_a_second_adapt_of_an_adapted_model_is_refused_naming_the_first() -> None:
    torch = pytest.importorskip("torch")
    from test_adapt import assert_restored, small_model, snapshot

    import streamnorm.torch as snt

    model = small_model().train()
    snap = snapshot(model)
    x = torch.randn(8, 2, 5, 5, dtype=torch.float64) * 3 + 1
    first = snt.adapt(model, "prior_population")
    for target in (model, model[1]):  # the model, or a part of it
        with pytest.raises(ValueError, match=r"already adapted by adapt with PriorPopulation"):
            snt.adapt(target, "batch")
        with pytest.raises(ValueError, match=r"test_no_data_lost\.py:\d+"):
            snt.adapt_groups(target, "batch", 2)
    with torch.no_grad():
        model(x)
    first.restore()
    assert model.training  # the mode from before the first adapt, whatever order was tried
    assert_restored(model, snap)
    # restored: the model may be adapted again; nested blocks undo exactly
    with torch.no_grad():
        want = torch.nn.functional.batch_norm(
            model[0](x), None, None, model[1].weight, model[1].bias, training=True
        )
    with snt.adapt(model, "batch"), torch.no_grad():
        with pytest.raises(ValueError, match="already adapted"):
            with snt.adapt(model, "prior_population"):
                pass  # pragma: no cover
        torch.testing.assert_close(model[1](model[0](x)), want)  # the outer one still adapts
        other = small_model(seed=1)
        with snt.adapt(other, "batch"):  # another model is another matter
            other(x)
        assert not other.training
    assert model.training and other.training is False
    assert_restored(model, snap)


# ------------------------------------------------------------------------------------------
# item 3: SIGTERM is handled as Ctrl-C


_BIG_ARCH = '''
import torch


class Big(torch.nn.Module):
    """A BatchNorm and a large buffer, so that writing the checkpoint takes a while."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(4)
        self.register_buffer("blob", torch.zeros(2**26))

    def forward(self, x):
        return self.bn(x)


def build():
    return Big()
'''


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGTERM")
def test_sigterm_while_writing_is_one_line_exit_143_old_output_and_no_temp_file(
    tmp_path: pathlib.Path,
) -> None:
    torch = pytest.importorskip("torch")
    (tmp_path / "bigarch.py").write_text(_BIG_ARCH)
    sys.path.insert(0, str(tmp_path))
    try:
        import bigarch
    finally:
        sys.path.remove(str(tmp_path))
    torch.save(bigarch.build().state_dict(), tmp_path / "ckpt.pt")  # 256 MiB
    del sys.modules["bigarch"]
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.pt"
    out.write_bytes(b"the old model")
    paths = [str(tmp_path), TESTS, os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    command = [sys.executable, "-m", "streamnorm.cli", "calibrate", "ckpt.pt", "--data", "x.npy"]
    command += ["--arch", "bigarch:build", "--out", "out.pt", "--no-progress"]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    signalled = False
    while proc.poll() is None and time.monotonic() < deadline:
        if any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()):  # writing has begun
            proc.send_signal(signal.SIGTERM)
            signalled = True
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=240)
    assert signalled, f"the command ended before it wrote (rc {proc.returncode}): {err}"
    assert proc.returncode == 143, err
    assert err.strip() == "streamnorm calibrate: terminated"
    assert out.read_bytes() == b"the old model"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_sigterm_handler_is_installed_only_while_a_command_runs(monkeypatch, capsys) -> None:
    """In-process: a SIGTERM during a run is the one-line exit 143, and the process's own
    handler is back afterwards."""
    import streamnorm.cli.bench as bench

    class Outside(Exception):
        pass

    def outside(signum: int, frame: object) -> None:
        raise Outside("the handler of the process ran, not the command's")

    def speed(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the run")  # pragma: no cover

    monkeypatch.setattr(bench, "run_speed", speed)
    seen = signal.signal(signal.SIGTERM, outside)
    try:
        rc = cli.main(["bench", "--quick"])
        assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        signal.signal(signal.SIGTERM, seen)
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_TERMINATED == 143, err
    assert err == "streamnorm bench: terminated"


def test_deferred_signals_hold_sigterm_until_the_files_are_in_place() -> None:
    from streamnorm._io import deferred_signals

    class Stopped(Exception):
        pass

    def stop(signum: int, frame: object) -> None:
        raise Stopped

    steps = []
    old = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped):
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # bytecodes at which Python would run a handler
                    pass
                steps.append("first file")
                steps.append("second file")
        assert signal.getsignal(signal.SIGTERM) is stop
    finally:
        signal.signal(signal.SIGTERM, old)
    assert steps == ["first file", "second file"]


# ------------------------------------------------------------------------------------------
# item 4: file modes


def _mode(path: pathlib.Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("command", ["calibrate", "annotate"])
def test_onnx_data_file_follows_the_umask_and_keeps_a_replaced_mode(
    onnx_models, tmp_path, capsys, umask_022, command
) -> None:
    m = onnx_models
    out = tmp_path / "o.onnx"
    data_file = tmp_path / "o.onnx.data"
    args = [command, str(m["ext"]), "--data", str(m["data"]), "--out", str(out), "--no-progress"]
    if command == "calibrate":
        args += ["--source", str(m["source"])]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert data_file.exists()
    assert (_mode(out), _mode(data_file)) == (0o644, 0o644)
    out.chmod(0o640)
    data_file.chmod(0o600)
    assert cli.main(args) == 0, capsys.readouterr().err
    assert (_mode(out), _mode(data_file)) == (0o640, 0o600)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


# ------------------------------------------------------------------------------------------
# item 14: paths mean what they say; output folders are checked before the run


def test_a_data_path_that_exists_is_taken_literally(tmp_path: pathlib.Path) -> None:
    np.save(tmp_path / "x[1].npy", np.zeros((3, 2)))
    np.save(tmp_path / "x1.npy", np.ones((5, 2)))
    assert len(open_data(tmp_path / "x[1].npy")) == 3  # the file, not the glob matching x1.npy
    os.remove(tmp_path / "x1.npy")
    assert len(open_data(str(tmp_path / "x[1].npy"))) == 3
    # a name that no file has is still a glob
    np.save(tmp_path / "x2.npy", np.ones((4, 2)))
    assert len(open_data(str(tmp_path / "x[2].npy"))) == 4


def test_bench_out_in_a_missing_folder_fails_before_the_benchmark(
    tmp_path, capsys, monkeypatch
) -> None:
    import streamnorm.cli.bench as bench

    def speed(*args: object) -> None:  # pragma: no cover - reached only on a regression
        raise AssertionError("the benchmark ran although --out cannot be written")

    monkeypatch.setattr(bench, "run_speed", speed)
    out = tmp_path / "missing" / "report.md"
    rc = cli.main(["bench", "--quick", "--out", str(out)])
    err = _one_line_error(capsys, rc, "bench")
    assert str(out) in err and "does not exist" in err and ".tmp" not in err


def test_atomic_write_into_a_missing_folder_names_the_output(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "missing" / "f.bin"
    with pytest.raises(FileNotFoundError) as info:
        atomic_write(out, lambda f: f.write(b"x"))
    assert info.value.filename == str(out)


def test_compare_out_creates_at_most_one_folder_level(tmp_path, capsys, monkeypatch) -> None:
    import streamnorm.compare

    def fail(**kw: object) -> None:  # pragma: no cover - reached only on a regression
        raise AssertionError("the run started although --out cannot be made")

    monkeypatch.setattr(streamnorm.compare, "compare", fail)
    out = tmp_path / "new" / "dir" / "x"
    rc = cli.main(["compare", "--out", str(out), "--quiet", "--no-plot"])
    err = _one_line_error(capsys, rc, "compare")
    assert "does not exist" in err and str(tmp_path / "new" / "dir") in err
    assert not (tmp_path / "new").exists()
