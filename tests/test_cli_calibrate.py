"""``streamnorm calibrate`` end to end (ONNX, checkpoints, TorchScript), every bad input as a
one-line error with exit code 2 and no output file, and the calibration data readers."""

from __future__ import annotations

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
    rc = main([
        "calibrate", str(src), "--data", str(npz), "--key", "images", "--out", str(out),
        "--mode", "one-pass", "--num-samples", "25", "--batch-size", "8", "--input-name", "x",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "from 25 samples" in capsys.readouterr().out
    from streamnorm.onnx import recalibrate

    recalibrate(src, np.load(data)[:25], tmp_path / "ref.onnx", mode="one-pass", progress=False)
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
    rc = main([
        "calibrate", str(src), "--data", str(torch_files["data"]), "--out", str(out),
        "--arch", "_calib_fixtures:digits_arch", "--mode", "sequential", "--no-progress",
    ])  # fmt: skip
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
    rc = main([
        "calibrate", str(torch_files["script"]), "--data", str(torch_files["data"]),
        "--out", str(out), "--arch", "_calib_fixtures:digits_arch", "--estimator", "ema",
        "--momentum", "0.5",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert _digest(torch_files["script"]) == before
    old = torch.jit.load(str(torch_files["script"])).state_dict()
    new = torch.jit.load(str(out)).state_dict()
    assert not torch.equal(old["bn1.running_mean"], new["bn1.running_mean"])
    assert int(new["bn1.num_batches_tracked"]) == int(old["bn1.num_batches_tracked"]) + 8
    assert torch.equal(old["conv1.weight"], new["conv1.weight"])


def test_subprocess_entry_point(onnx_files, tmp_path) -> None:
    src, data = onnx_files
    out = tmp_path / "out.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "streamnorm.cli", "calibrate", str(src), "--data", str(data),
         "--out", str(out), "--batch-size", "16"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
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
        ([str(src), "--data", str(data), "--num-samples", "abc"], "integer"),
        ([str(src), "--data", str(data), "--batch-size", "0"], ">= 1"),
        ([str(src), "--data", str(data), "--workers", "x"], "integer"),
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
        ([ckpt, "--data", data, "--arch", arch, "--momentum", "x", "--estimator", "ema"], "number"),
    ]
    for args, match in cases:
        before = _digest(pathlib.Path(args[0]))
        rc = main(["calibrate", *args, "--out", str(out)])
        err = _one_line_error(capsys, rc)
        assert match in err, (args, err)
        assert not out.exists(), args
        assert _digest(pathlib.Path(args[0])) == before


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
