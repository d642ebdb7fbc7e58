"""``streamnorm calibrate`` end to end (ONNX, checkpoints, TorchScript), every bad input as a
one-line error with exit code 2 and no output file, and the calibration data readers."""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from streamnorm.calibrate import _data
from streamnorm.cli import main

TESTS = str(pathlib.Path(__file__).parent)

# TorchScript is deprecated in torch 2.13 but still what users have on disk
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _x(n: int = 60, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.5 + 2.0 * rng.standard_normal((n, 2, 6, 6))).astype(np.float32)


@pytest.fixture
def onnx_files(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from _calib_fixtures import onnx_cnn

    src = tmp_path / "m.onnx"
    onnx.save(onnx_cnn(15), str(src))
    data = tmp_path / "x.npy"
    np.save(data, _x())
    return src, data


@pytest.fixture
def torch_files(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    torch = pytest.importorskip("torch")
    from _calib_fixtures import trained_digits

    from streamnorm import digits as D

    model, data = trained_digits()
    files = {
        "container": tmp_path / "ckpt.pt",
        "plain": tmp_path / "sd.pt",
        "script": tmp_path / "scripted.pt",
        "data": tmp_path / "shifted.npy",
    }
    torch.save({"state_dict": model.state_dict(), "epoch": 7}, files["container"])
    torch.save(model.state_dict(), files["plain"])
    with pytest.warns(DeprecationWarning):
        torch.jit.save(torch.jit.script(model), str(files["script"]))
    np.save(files["data"], D.shift_domain(data[2], seed=4).numpy())
    return files


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("streamnorm calibrate: error:"), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------
# end to end


def test_onnx_end_to_end(onnx_files, tmp_path, capsys) -> None:
    from _calib_fixtures import onnx_bn_inputs, onnx_stats

    src, data = onnx_files
    before = _digest(src)
    out = tmp_path / "out.onnx"
    rc = main(["calibrate", str(src), "--data", str(data), "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "bn1" in text and "bn2" in text and "mode=sequential" in text
    assert f"wrote {out}" in text
    assert _digest(src) == before
    stored, ref = onnx_stats(str(out)), onnx_bn_inputs(str(out), np.load(data))
    for k in ref:
        np.testing.assert_allclose(stored[k][1], ref[k][1], rtol=2e-5)


def test_onnx_one_pass_and_options(onnx_files, tmp_path, capsys) -> None:
    from _calib_fixtures import onnx_stats

    src, data = onnx_files
    npz = tmp_path / "d.npz"
    np.savez_compressed(npz, images=np.load(data), labels=np.zeros(60))
    out = tmp_path / "out.onnx"
    rc = main(
        [
            "calibrate",
            str(src),
            "--data",
            str(npz),
            "--key",
            "images",
            "--out",
            str(out),
            "--mode",
            "one-pass",
            "--num-samples",
            "25",
            "--batch-size",
            "8",
            "--input-name",
            "x",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "from 25 samples" in capsys.readouterr().out
    from streamnorm.onnx import recalibrate

    # one-pass normalizes with batch statistics: the same batches give the same statistics
    ref = tmp_path / "ref.onnx"
    recalibrate(src, np.load(data)[:25], ref, mode="one-pass", batch_size=8, progress=False)
    a, b = onnx_stats(str(out)), onnx_stats(str(tmp_path / "ref.onnx"))
    for k in a:
        np.testing.assert_allclose(a[k][1], b[k][1], rtol=1e-6)


@pytest.mark.parametrize("which", ["container", "plain"])
def test_checkpoint_end_to_end(torch_files, tmp_path, capsys, which) -> None:
    import torch
    from _calib_fixtures import digits_arch

    from streamnorm.torch import recalibrate

    src = torch_files[which]
    before = _digest(src)
    out = tmp_path / "out.pt"
    rc = main(
        [
            "calibrate",
            str(src),
            "--data",
            str(torch_files["data"]),
            "--out",
            str(out),
            "--arch",
            "_calib_fixtures:digits_arch",
            "--mode",
            "sequential",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "bn4" in capsys.readouterr().out
    assert _digest(src) == before
    saved = torch.load(out, weights_only=True)
    if which == "container":
        assert saved["epoch"] == 7
        saved = saved["state_dict"]
    ref = digits_arch()
    orig = torch.load(src, weights_only=True)
    ref.load_state_dict(orig["state_dict"] if which == "container" else orig)
    recalibrate(ref, np.load(torch_files["data"]), mode="sequential", progress=False)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=1e-6, atol=1e-7)


def test_torchscript_end_to_end(torch_files, tmp_path, capsys) -> None:
    import torch

    out = tmp_path / "out.pt"
    before = _digest(torch_files["script"])
    rc = main(
        [
            "calibrate",
            str(torch_files["script"]),
            "--data",
            str(torch_files["data"]),
            "--out",
            str(out),
            "--arch",
            "_calib_fixtures:digits_arch",
            "--estimator",
            "ema",
            "--momentum",
            "0.5",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert _digest(torch_files["script"]) == before
    old = torch.jit.load(str(torch_files["script"])).state_dict()
    new = torch.jit.load(str(out)).state_dict()
    assert not torch.equal(old["bn1.running_mean"], new["bn1.running_mean"])
    assert int(new["bn1.num_batches_tracked"]) == int(old["bn1.num_batches_tracked"]) + 8
    assert torch.equal(old["conv1.weight"], new["conv1.weight"])


@pytest.mark.slow
def test_subprocess_entry_point(onnx_files, tmp_path) -> None:
    src, data = onnx_files
    out = tmp_path / "out.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamnorm.cli",
            "calibrate",
            str(src),
            "--data",
            str(data),
            "--out",
            str(out),
            "--batch-size",
            "16",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "bn2" in proc.stdout and out.exists()


# ------------------------------------------------------------------------------------------
# bad input through the CLI


def test_bad_input_onnx(onnx_files, tmp_path, capsys) -> None:
    src, data = onnx_files
    out = tmp_path / "out.onnx"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model at all\xff")
    bad_shape = tmp_path / "bad_shape.npy"
    np.save(bad_shape, _x()[:, :, :4])
    bad_dtype = tmp_path / "bad_dtype.npy"
    np.save(bad_dtype, np.array([["a", "b"]] * 4))
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 2, 6, 6), np.float32))
    two = tmp_path / "two.npz"
    np.savez(two, a=_x(), b=_x())
    corrupt_npy = tmp_path / "corrupt.npy"
    corrupt_npy.write_bytes(b"\x93NUMPY garbage")
    cases = [
        ([str(tmp_path / "missing.onnx"), "--data", str(data)], "does not exist"),
        ([str(garbage), "--data", str(data)], "not a readable ONNX model"),
        ([str(src), "--data", str(bad_shape)], "shape"),
        ([str(src), "--data", str(bad_dtype)], "dtype"),
        ([str(src), "--data", str(empty)], "empty"),
        ([str(src), "--data", str(two)], "--key"),
        ([str(src), "--data", str(two), "--key", "c"], "no array 'c'"),
        ([str(src), "--data", str(corrupt_npy)], "not a readable .npy"),
        ([str(src), "--data", str(tmp_path / "missing.npy")], "does not exist"),
        ([str(src), "--data", str(tmp_path / "nomatch*.npy")], "no files match"),
        ([str(src), "--data", str(data), "--estimator", "ema"], "population"),
        ([str(src), "--data", str(data), "--momentum", "0.2"], "ema only"),
        ([str(src), "--data", str(data), "--input-name", "nope"], "no input"),
    ]
    before = _digest(src)
    for args, match in cases:
        rc = main(["calibrate", *args, "--out", str(out)])
        err = _one_line_error(capsys, rc)
        assert match in err, (args, err)
        assert not out.exists(), args
        assert _digest(src) == before
    rc = main(["calibrate", str(src), "--data", str(data), "--out", str(src)])
    assert "never modified" in _one_line_error(capsys, rc)
    assert _digest(src) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_bad_input_torch(torch_files, tmp_path, capsys) -> None:
    import torch

    out = tmp_path / "out.pt"
    data = str(torch_files["data"])
    arch = "_calib_fixtures:digits_arch"
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((20, 3, 8, 8), np.float32))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    pickled = tmp_path / "module.pt"
    from _calib_fixtures import digits_arch

    torch.save(digits_arch(), pickled)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    nodict = tmp_path / "nodict.pt"
    torch.save([1, 2, 3], nodict)
    frozen = tmp_path / "frozen.pt"
    with pytest.warns(DeprecationWarning):
        torch.jit.save(torch.jit.freeze(torch.jit.script(digits_arch().eval())), str(frozen))
    ckpt = str(torch_files["container"])
    cases = [
        ([ckpt, "--data", data], "--arch"),
        ([ckpt, "--data", data, "--arch", "no_such_module_xyz:build"], "unknown --arch"),
        ([ckpt, "--data", data, "--arch", "_calib_fixtures:nothing"], "unknown --arch"),
        ([ckpt, "--data", data, "--arch", "_calib_fixtures"], "module:callable"),
        ([ckpt, "--data", data, "--arch", "_calib_fixtures:NOT_A_BUILDER"], "not callable"),
        ([ckpt, "--data", str(wrong), "--arch", arch], "do not fit the model"),
        ([str(garbage), "--data", data, "--arch", arch], "not a readable PyTorch checkpoint"),
        ([str(pickled), "--data", data, "--arch", arch], "not a readable PyTorch checkpoint"),
        ([str(other), "--data", data, "--arch", arch], "do not fit --arch"),
        ([str(nodict), "--data", data, "--arch", arch], "no state_dict"),
        ([str(torch_files["script"]), "--data", data], "--arch"),
        ([str(frozen), "--data", data, "--arch", arch], "frozen"),
        ([ckpt, "--data", data, "--arch", arch, "--input-name", "x"], "ONNX models only"),
    ]
    for args, match in cases:
        before = _digest(pathlib.Path(args[0]))
        rc = main(["calibrate", *args, "--out", str(out)])
        err = _one_line_error(capsys, rc)
        assert match in err, (args, err)
        assert not out.exists(), args
        assert _digest(pathlib.Path(args[0])) == before


@pytest.mark.parametrize(
    ("flag", "value", "match"),
    [
        ("--num-samples", "abc", "integer"),
        ("--batch-size", "0", ">= 1"),
        ("--workers", "x", "integer"),
        ("--momentum", "x", "number"),
    ],
)
def test_bad_numbers_are_argparse_errors(onnx_files, tmp_path, capsys, flag, value, match) -> None:
    src, data = onnx_files
    out = tmp_path / "out.onnx"
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(src), "--data", str(data), "--out", str(out), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("streamnorm calibrate: error: argument " + flag), err
    assert match in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# outputs: never an input, checked before the run, written whole or not at all


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a calibration pass starts (checks must come first)."""
    from streamnorm.calibrate import LayerStats

    def add(self, x, channel_axis=1):  # pragma: no cover - reached only on a regression
        raise AssertionError("the calibration ran before the output was checked")

    monkeypatch.setattr(LayerStats, "add", add)


def test_out_that_is_an_input_is_refused(onnx_files, torch_files, tmp_path, capsys, no_run):
    src, data = onnx_files
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"p{i}.npy", _x(20, seed=i))
    arch = ["--arch", "_calib_fixtures:digits_arch"]
    ckpt, tdata = str(torch_files["plain"]), str(torch_files["data"])
    cases = [
        ([str(src), "--data", str(data), "--out", str(data)], data),
        ([str(src), "--data", str(folder), "--out", str(folder / "p1.npy")], folder / "p1.npy"),
        (
            [str(src), "--data", str(folder / "p*.npy"), "--out", str(folder / "p2.npy")],
            folder / "p2.npy",
        ),
        ([ckpt, "--data", tdata, "--out", tdata, *arch], pathlib.Path(tdata)),
        # the same file through another name
        ([str(src), "--data", str(data), "--out", str(tmp_path / "." / "x.npy")], data),
    ]
    for args, victim in cases:
        before = _digest(victim)
        rc = main(["calibrate", *args, "--no-progress"])
        err = _one_line_error(capsys, rc)
        assert "one of the inputs" in err, (args, err)
        assert _digest(victim) == before, args


def test_out_problems_are_found_before_the_run(onnx_files, torch_files, tmp_path, capsys, no_run):
    src, data = onnx_files
    existing_dir = tmp_path / "adir"
    existing_dir.mkdir()
    arch = ["--arch", "_calib_fixtures:digits_arch"]
    cases = [
        ([str(src), "--data", str(data)], existing_dir, "is a directory"),
        (
            [str(torch_files["plain"]), "--data", str(torch_files["data"]), *arch],
            existing_dir,
            "is a directory",
        ),
        ([str(src), "--data", str(data)], tmp_path / "missing" / "o.onnx", "does not exist"),
        ([str(src), "--data", str(data)], data / "o.onnx", "not a directory"),
    ]
    for args, out, match in cases:
        rc = main(["calibrate", *args, "--out", str(out), "--no-progress"])
        err = _one_line_error(capsys, rc)
        assert match in err, (args, err)
    assert existing_dir.is_dir() and list(existing_dir.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_out_in_a_read_only_folder_is_refused_before_the_run(onnx_files, tmp_path, capsys, no_run):
    src, data = onnx_files
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(["calibrate", str(src), "--data", str(data), "--out", str(ro / "o.onnx")])
        assert "permission" in _one_line_error(capsys, rc)
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("kind", ["onnx", "checkpoint"])
def test_failed_write_keeps_the_old_file(
    onnx_files, torch_files, tmp_path, capsys, monkeypatch, kind
):
    import errno

    if kind == "onnx":
        args = [str(onnx_files[0]), "--data", str(onnx_files[1])]
    else:
        args = [str(torch_files["plain"]), "--data", str(torch_files["data"])]
        args += ["--arch", "_calib_fixtures:digits_arch"]
    out = tmp_path / "out.bin"
    out.write_bytes(b"the old model")
    out.chmod(0o640)

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    rc = main(["calibrate", *args, "--out", str(out), "--no-progress"])
    err = _one_line_error(capsys, rc)
    assert "cannot write" in err and "No space left" in err, err
    assert out.read_bytes() == b"the old model"
    assert out.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_device_is_one_line_and_stays_a_device(onnx_files, capsys) -> None:
    import stat

    src, data = onnx_files
    rc = main(["calibrate", str(src), "--data", str(data), "--out", "/dev/full", "--no-progress"])
    assert "cannot write" in _one_line_error(capsys, rc)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_model_that_is_a_directory(onnx_files, tmp_path, capsys) -> None:
    _, data = onnx_files
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    rc = main(["calibrate", str(folder), "--data", str(data), "--out", str(tmp_path / "o.onnx")])
    err = _one_line_error(capsys, rc)
    assert "is a directory" in err and "does not exist" not in err


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("where", ["pass", "write"])
def test_ctrl_c_is_one_line_exit_130_and_no_file(
    onnx_files, tmp_path, capsys, monkeypatch, wrapped, where
) -> None:
    from streamnorm.calibrate import LayerStats

    def interrupt(*args: object, **kwargs: object) -> None:
        if not wrapped:
            raise KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:  # what a compiled kernel hands back
            raise SystemError("CPUDispatcher returned a result with an exception set") from e

    if where == "pass":
        monkeypatch.setattr(LayerStats, "add", interrupt)
    else:
        monkeypatch.setattr(os, "fsync", interrupt)
    src, data = onnx_files
    out = tmp_path / "out.onnx"
    rc = main(["calibrate", str(src), "--data", str(data), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 130, err
    assert err == "streamnorm calibrate: interrupted"
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


# ------------------------------------------------------------------------------------------
# the data readers


def test_open_data_formats_stream_the_same_rows(tmp_path: pathlib.Path) -> None:
    x = np.arange(37 * 3 * 2, dtype=np.float64).reshape(37, 3, 2)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "s.npz", x=x, y=np.ones(2))
    np.savez_compressed(tmp_path / "c.npz", x=x)
    np.savez(tmp_path / "one.npz", x)
    (tmp_path / "shards").mkdir()
    for i, s in enumerate((0, 10, 30)):
        np.save(tmp_path / "shards" / f"p{i}.npy", x[s : [10, 30, 37][i]])
    sources = [
        (str(tmp_path / "a.npy"), None),
        (tmp_path / "s.npz", "x"),
        (str(tmp_path / "c.npz"), "x"),
        (str(tmp_path / "one.npz"), None),
        (str(tmp_path / "shards"), None),
        (str(tmp_path / "shards" / "p*.npy"), None),
    ]
    for path, key in sources:
        ds = _data.open_data(path, key)
        assert ds.shape == (37, 3, 2) and ds.dtype == x.dtype and len(ds) == 37
        for bs, per in ((4, None), (5, 7), (37, None)):
            pieces = _data.shards(ds, bs, per)
            rows = [b for s in pieces for b in _data.iter_batches(s, bs)]
            assert all(len(b) <= bs for b in rows)
            np.testing.assert_array_equal(np.concatenate(rows), x)
        head = [b for s in _data.shards(ds.head(13), 4) for b in _data.iter_batches(s, 4)]
        np.testing.assert_array_equal(np.concatenate(head), x[:13])
    # .npy and stored .npz members are memory-mapped, never read whole
    assert isinstance(_data._rows(str(tmp_path / "a.npy"), None), np.memmap)
    assert isinstance(_data._rows(str(tmp_path / "s.npz"), "x"), np.memmap)
    assert isinstance(_data._rows(str(tmp_path / "c.npz"), "x"), _data._ZipRows)
    # in-memory arrays: views, batches aligned on shard boundaries
    pieces = _data.shards(x, 4, 10)
    assert [len(p) for p in pieces] == [12, 12, 12, 1]
    assert all(np.shares_memory(p, x) for p in pieces)


def test_open_data_bad_input(tmp_path: pathlib.Path) -> None:
    np.save(tmp_path / "scalar.npy", np.float64(3.0))
    np.save(tmp_path / "obj.npy", np.array([{}, 1], dtype=object), allow_pickle=True)
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    (tmp_path / "nothing").mkdir()
    (tmp_path / "mixed").mkdir()
    np.save(tmp_path / "mixed" / "a.npy", np.zeros((3, 2)))
    np.save(tmp_path / "mixed" / "b.npy", np.zeros((3, 4)))
    (tmp_path / "t.txt").write_text("1 2 3")
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as z:
        z.writestr("readme.txt", "no arrays here")
    cases = [
        ((tmp_path / "missing.npy",), FileNotFoundError, "does not exist"),
        ((str(tmp_path / "zz*.npy"),), FileNotFoundError, "no files match"),
        ((tmp_path / "scalar.npy",), ValueError, "0-d"),
        ((tmp_path / "obj.npy",), ValueError, "not a readable .npy"),
        ((tmp_path / "empty.npy",), ValueError, "empty"),
        ((tmp_path / "nothing",), ValueError, "no .npy"),
        ((tmp_path / "mixed",), ValueError, "all shards must agree"),
        ((tmp_path / "t.txt",), ValueError, "unsupported data file"),
        ((tmp_path / "bad.npz",), ValueError, "holds no arrays"),
        ((tmp_path / "empty.npy", "k"), ValueError, "key="),
        ((3,), TypeError, "path"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            _data.open_data(*args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        _data.shards(np.zeros((3, 2)), 0)
    with pytest.raises(TypeError, match="positive"):
        list(_data.iter_batches(np.zeros((3, 2)), 2.5))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# the framework-free core, driven by a numpy "model"


class _NumpyNet:
    """x (N, 3, 4) -> BN "a" (biased, stored) -> relu -> * w -> BN "b": an adapter of the
    calibration core with no framework at all."""

    def __init__(self, seed: int = 0) -> None:
        from streamnorm.calibrate import NormLayer

        rng = np.random.default_rng(seed)
        self.w = rng.uniform(0.5, 2.0, (1, 3, 1))
        self.stats = {n: (rng.normal(0, 1, 3), rng.uniform(0.5, 2, 3)) for n in "ab"}
        self.nbt = {"a": 0, "b": 0}
        self._layers = [NormLayer("a", 3, 1e-5, "biased"), NormLayer("b", 3, 1e-5, "biased")]
        self.calls = 0

    def _norm(self, name: str, x: np.ndarray) -> np.ndarray:
        m, v = self.stats[name]
        return (x - m[None, :, None]) / np.sqrt(v[None, :, None] + 1e-5)

    def inputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every layer's input with the stored statistics (the reference)."""
        a = 2.0 * x + 1.0
        return {"a": a, "b": np.maximum(self._norm("a", a), 0.0) * self.w}

    # the Adapter protocol
    def layers(self):
        return list(self._layers)

    def read(self, layer):
        from streamnorm.calibrate import Stats

        m, v = self.stats[layer.name]
        return Stats(m.copy(), v.copy())

    def write(self, layer, result) -> None:
        self.stats[layer.name] = (result.mean.copy(), result.var.copy())
        self.nbt[layer.name] = result.batches + (self.nbt[layer.name] if result.continued else 0)

    def run(self, batch, targets, emit) -> None:
        self.calls += 1
        got = self.inputs(np.asarray(batch, dtype=np.float64))
        for t in targets:
            emit(t.name, got[t.name])

    def sequential_passes(self, layers, first):
        return [[x] for x in layers]

    def remote(self):
        import copy

        return functools.partial(copy.deepcopy, self)


class _SyncClient:
    """A stand-in for distributed.Client that runs every task at once, in this process."""

    class _Done:
        def __init__(self, value: object) -> None:
            self.value = value

        def result(self) -> object:
            return self.value

    def submit(self, fn, *args, pure=False):
        args = tuple(a.result() if isinstance(a, self._Done) else a for a in args)
        return self._Done(fn(*args))


def _core_run(net, x, estimator="population", mode="sequential", client=None, **kw):
    from streamnorm.calibrate import Settings, StatsSpec, Stream, calibrate

    spec = StatsSpec.checked(estimator, kw.pop("momentum", 0.1))
    settings = Settings.checked(spec, mode, progress=False, client=client)
    return calibrate(
        net, Stream.of(x, kw.pop("batch_size", 7), kw.pop("num_samples", None)), settings
    )


def _xs(n: int = 40) -> np.ndarray:
    return np.random.default_rng(5).normal(3.0, 2.0, (n, 3, 4))


def test_core_sequential_reaches_the_exact_fixed_point() -> None:
    net, x = _NumpyNet(), _xs()
    report = _core_run(net, x)
    ref = net.inputs(x)  # with the new statistics
    for name in "ab":
        m, v = net.stats[name]
        np.testing.assert_allclose(m, ref[name].mean(axis=(0, 2)), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(v, ref[name].var(axis=(0, 2)), rtol=1e-12)
        assert net.nbt[name] == 6 and report[name].batches == 6 and report[name].samples == 40
    assert [r.name for r in report.layers] == ["a", "b"] and report.samples == 40
    with pytest.raises(ValueError, match="nothing to restore"):
        report.restore()


def test_core_estimators_are_the_estimator_classes() -> None:
    import streamnorm

    x = _xs(23)
    batches = [x[i : i + 5] for i in range(0, 23, 5)]
    for name, proto in (
        ("cumulative", streamnorm.CumulativeAverage(unbiased=False)),
        ("ema", streamnorm.EMA(0.3, unbiased=False)),
    ):
        net = _NumpyNet()
        start = net.read(net.layers()[0])
        _core_run(net, x, estimator=name, mode="one-pass", batch_size=5, momentum=0.3)
        est = proto
        for b in batches:
            est.update(streamnorm.moments(2.0 * b + 1.0, axis=(0, 2)))
        mean, var = np.asarray(est.mean), np.asarray(est.var)
        if name == "ema":  # continued from the stored statistics, not from (0, 1)
            w = 0.7 ** len(batches)
            mean, var = mean + w * start.mean, var + w * (start.var - 1.0)
            manual_m, manual_v = start.mean.copy(), start.var.copy()
            for b in batches:
                a = 2.0 * b + 1.0
                manual_m = 0.7 * manual_m + 0.3 * a.mean(axis=(0, 2))
                manual_v = 0.7 * manual_v + 0.3 * a.var(axis=(0, 2))
            np.testing.assert_allclose(mean, manual_m, rtol=1e-12)
            np.testing.assert_allclose(var, manual_v, rtol=1e-12)
            assert net.nbt["a"] == len(batches)  # 0 before, + 5 batches
        np.testing.assert_allclose(net.stats["a"][0], mean, rtol=1e-12)
        np.testing.assert_allclose(net.stats["a"][1], var, rtol=1e-12)


@pytest.mark.parametrize("estimator", ["population", "cumulative"])
@pytest.mark.parametrize("mode", ["sequential", "one-pass"])
def test_core_sharded_run_equals_local(estimator: str, mode: str) -> None:
    x = _xs(61)
    local, dist = _NumpyNet(), _NumpyNet()
    rep_l = _core_run(local, x, estimator, mode, batch_size=4)
    rep_d = _core_run(dist, x, estimator, mode, client=_SyncClient(), batch_size=4)
    assert dist.calls == 0  # every batch ran on a copy, as on a worker
    for name in "ab":
        for i in (0, 1):
            np.testing.assert_allclose(dist.stats[name][i], local.stats[name][i], rtol=1e-12)
        assert (rep_d[name].samples, rep_d[name].batches) == (rep_l[name].samples, 16)


def test_core_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="cannot be split"):
        _core_run(_NumpyNet(), _xs(), "ema", client=_SyncClient())
    with pytest.raises(TypeError, match="shards"):
        _core_run(_NumpyNet(), [_xs(4)], client=_SyncClient())
    with pytest.raises(ValueError, match="estimator"):
        _core_run(_NumpyNet(), _xs(), "median")
    with pytest.raises(ValueError, match="mode"):
        _core_run(_NumpyNet(), _xs(), mode="twice")
    net = _NumpyNet()
    before = {k: (m.copy(), v.copy()) for k, (m, v) in net.stats.items()}
    bad = _xs()
    bad[30, 1, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        _core_run(net, bad, mode="one-pass")
    for k, (m, v) in before.items():  # results are checked before anything is written
        np.testing.assert_array_equal(net.stats[k][0], m)
        np.testing.assert_array_equal(net.stats[k][1], v)


@pytest.mark.slow
def test_core_imports_no_framework() -> None:
    code = (
        "import sys, streamnorm.calibrate, streamnorm.cli.calibrate\n"
        "bad = {'torch', 'onnx', 'onnxruntime', 'keras', 'jax', 'tensorflow', 'distributed'}\n"
        "print(sorted(bad & set(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
