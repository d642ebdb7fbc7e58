"""streamnorm.onnx.recalibrate: fixed point on onnx.helper graphs (opsets 9 and 15, shared
initializers), agreement with the PyTorch path on an exported model, external data, fixed and
dynamic batch dimensions, and bad input (the input file never changes)."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from _calib_fixtures import onnx_bn_inputs, onnx_cnn, onnx_stats  # noqa: E402

from streamnorm.onnx import recalibrate  # noqa: E402


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _x(n: int = 70, seed: int = 1, batch_shape: tuple[int, ...] = (2, 6, 6)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.5 + 2.0 * rng.standard_normal((n, *batch_shape))).astype(np.float32)


def _save(model: object, path: pathlib.Path) -> pathlib.Path:
    onnx.save(model, str(path))
    return path


def _assert_fixed_point(out: pathlib.Path, x: np.ndarray, rtol: float = 2e-5) -> None:
    stored = onnx_stats(str(out))
    ref = onnx_bn_inputs(str(out), x)
    assert stored.keys() == ref.keys()
    for name, (mean, var) in ref.items():
        s_mean, s_var = stored[name]
        np.testing.assert_allclose(s_mean, mean, atol=rtol * np.sqrt(var).max(), err_msg=name)
        np.testing.assert_allclose(s_var, var, rtol=rtol, err_msg=name)


@pytest.mark.parametrize("opset", [9, 15, 21])
@pytest.mark.parametrize("shared", [False, True])
def test_sequential_reaches_the_fixed_point(
    tmp_path: pathlib.Path, opset: int, shared: bool
) -> None:
    src = _save(onnx_cnn(opset, shared=shared), tmp_path / "m.onnx")
    before = _digest(src)
    out = tmp_path / "out.onnx"
    x = _x()
    report = recalibrate(src, x, out, batch_size=16, progress=False)
    assert _digest(src) == before
    onnx.checker.check_model(onnx.load(str(out)))
    _assert_fixed_point(out, x)
    assert [r.name for r in report.layers] == ["bn1", "bn2"]
    assert report.samples == 70 and report["bn1"].batches == 5
    m = onnx.load(str(out))
    assert onnx.helper.get_attribute_value(m.graph.node[1].attribute[0]) == pytest.approx(1e-5)
    if shared:
        bn1, bn2 = (n for n in m.graph.node if n.op_type == "BatchNormalization")
        assert len({bn1.input[3], bn1.input[4], bn2.input[3], bn2.input[4], bn1.input[1]}) == 5
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
        # the scale that shared the first node's var keeps its old value
        orig = {
            t.name: onnx.numpy_helper.to_array(t)
            for t in onnx_cnn(opset, shared=True).graph.initializer
        }
        np.testing.assert_array_equal(inits[bn1.input[1]], orig["v"])
        assert not np.allclose(inits[bn1.input[4]], inits[bn2.input[4]])


def test_everything_but_the_statistics_is_unchanged(tmp_path: pathlib.Path) -> None:
    model = onnx_cnn(15)
    src = _save(model, tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    recalibrate(src, _x(), out, progress=False)
    new = onnx.load(str(out))
    assert [(n.op_type, list(n.input), list(n.output)) for n in new.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in model.graph.node
    ]
    a = {t.name: t for t in model.graph.initializer}
    b = {t.name: t for t in new.graph.initializer}
    assert a.keys() == b.keys()
    changed = {k for k in a if a[k].SerializeToString() != b[k].SerializeToString()}
    assert changed == {"m1", "v1", "m2", "v2"}
    assert new.graph.input == model.graph.input and new.graph.output == model.graph.output
    assert new.opset_import == model.opset_import


def _train_mode_oracle(x: np.ndarray, batch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reference of one-pass for :func:`onnx_cnn`: per batch, bn1 normalizes with the float64
    moments of its input over that batch (train mode), fed by hand; per node, the pooled mean
    and biased var of its input over all batches."""
    import onnxruntime as ort

    m = onnx_cnn(15, stats_as_inputs=True)
    m.graph.output.append(onnx.helper.make_tensor_value_info("c1", onnx.TensorProto.FLOAT, None))
    m.graph.output.append(onnx.helper.make_tensor_value_info("c2", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    ones = {k: np.ones(c, np.float32) for k, c in (("m1", 4), ("v1", 4), ("m2", 3), ("v2", 3))}
    c1s, c2s = [], []
    for i in range(0, len(x), batch):
        b = x[i : i + batch]
        (c1,) = sess.run(["c1"], {"x": b, **ones})
        c1 = c1.astype(np.float64)
        c1s.append(c1)
        stats = {"m1": c1.mean(axis=(0, 2, 3)), "v1": c1.var(axis=(0, 2, 3))}
        feeds = {**ones, **{k: v.astype(np.float32) for k, v in stats.items()}}
        c2s.append(sess.run(["c2"], {"x": b, **feeds})[0].astype(np.float64))
    out = {}
    for name, parts in (("bn1", c1s), ("bn2", c2s)):
        c = np.concatenate(parts)
        out[name] = (c.mean(axis=(0, 2, 3)), c.var(axis=(0, 2, 3)))
    return out


@pytest.mark.parametrize("opset", [9, 15, 21])
@pytest.mark.parametrize("batch", ["N", 5])
def test_one_pass_normalizes_with_batch_statistics(
    tmp_path: pathlib.Path, opset: int, batch: int | str
) -> None:
    """One-pass is PyTorch's train-mode pass: bn2's input comes from bn1 normalizing with the
    statistics of each batch (a fixed batch of 5 pads the last batch of 3: the padding must
    not enter the batch statistics)."""
    src = _save(onnx_cnn(opset, batch=batch), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    x = _x(23)
    r = recalibrate(src, x, out, mode="one-pass", batch_size=5, progress=False)
    assert r.mode == "one-pass" and r["bn2"].batches == 5 and r.samples == 23
    stored = onnx_stats(str(out))
    for name, (ref_mean, ref_var) in _train_mode_oracle(x, 5).items():
        atol = 1e-5 * np.sqrt(ref_var).max()
        np.testing.assert_allclose(stored[name][0], ref_mean, atol=atol, err_msg=name)
        np.testing.assert_allclose(stored[name][1], ref_var, rtol=1e-5, err_msg=name)
    # the eval-mode pass (bn1 normalizing with its stored statistics) gives others
    eval_mode = onnx_bn_inputs(str(_save(onnx_cnn(opset), tmp_path / "d.onnx")), x)["bn2"][1]
    assert np.abs(eval_mode / stored["bn2"][1] - 1).max() > 1e-2


def test_fixed_and_dynamic_batch_dimension_agree(tmp_path: pathlib.Path) -> None:
    x = _x(23)
    dyn = _save(onnx_cnn(15, batch="batch"), tmp_path / "dyn.onnx")
    fixed = _save(onnx_cnn(15, batch=5), tmp_path / "fixed.onnx")
    recalibrate(dyn, x, tmp_path / "a.onnx", batch_size=7, progress=False)
    r = recalibrate(fixed, x, tmp_path / "b.onnx", batch_size=7, progress=False)
    assert r["bn1"].batches == 5 and r.samples == 23  # the model's own batch of 5, last padded
    a, b = onnx_stats(str(tmp_path / "a.onnx")), onnx_stats(str(tmp_path / "b.onnx"))
    for k in a:
        np.testing.assert_allclose(a[k][0], b[k][0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a[k][1], b[k][1], rtol=1e-6)


def test_external_data(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    src = folder / "m.onnx"
    onnx.save_model(
        onnx_cnn(15),
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.onnx.data",
        size_threshold=0,
    )
    digests = {p: _digest(p) for p in folder.iterdir()}
    out = tmp_path / "out.onnx"
    x = _x()
    recalibrate(src, x, out, progress=False)
    assert {p: _digest(p) for p in folder.iterdir()} == digests
    assert (tmp_path / "out.onnx.data").exists()
    onnx.checker.check_model(str(out))
    _assert_fixed_point(out, x)
    # an output whose data file would be the input's weights is refused
    with pytest.raises(ValueError, match="overwrite"):
        recalibrate(src, x, folder / "w.onnx", progress=False)
    assert {p: _digest(p) for p in folder.iterdir()} == digests


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_statistics_through_identity_nodes(tmp_path: pathlib.Path) -> None:
    # torch's exporter deduplicates equal initializers: a fresh BN's running_var (ones) becomes
    # Identity(weight). Calibration must give the node its own var and leave the weight alone.
    torch = pytest.importorskip("torch")
    m = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        m,
        (torch.zeros(2, 2, 6, 6),),
        buf,
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "N"}},
        do_constant_folding=False,
        opset_version=15,
    )
    src = tmp_path / "m.onnx"
    src.write_bytes(buf.getvalue())
    g = onnx.load(str(src)).graph
    assert any(n.op_type == "Identity" for n in g.node)
    out = tmp_path / "out.onnx"
    x = _x(40)
    recalibrate(src, x, out, progress=False)
    new = onnx.load(str(out))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in new.graph.initializer}
    np.testing.assert_array_equal(inits["1.weight"], np.ones(3, np.float32))
    np.testing.assert_array_equal(inits["1.bias"], np.zeros(3, np.float32))
    _assert_fixed_point(out, x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_exported_torch_model_matches_pytorch_sequential(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    from _calib_fixtures import trained_digits

    from streamnorm import digits as D
    from streamnorm.torch import recalibrate as torch_recalibrate

    model, data = trained_digits()
    model.eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (data[2][:4],),
        buf,
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        do_constant_folding=False,
        opset_version=15,
    )
    src = tmp_path / "digits.onnx"
    src.write_bytes(buf.getvalue())
    x = D.shift_domain(data[2], seed=3).numpy()
    out = tmp_path / "out.onnx"
    recalibrate(src, x, out, batch_size=50, progress=False)
    torch_recalibrate(model, x, mode="sequential", batch_size=50, progress=False)
    onnx_model = onnx.load(str(out))
    inits = {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64)
        for t in onnx_model.graph.initializer
    }
    spatial = {"bn1": 64, "bn2": 64, "bn3": 16, "bn4": 1}
    for name, mod in model.named_modules():
        if name not in spatial:
            continue
        n = len(x) * spatial[name]
        mean = mod.running_mean.double().numpy()
        var_biased = mod.running_var.double().numpy() * (n - 1) / n
        np.testing.assert_allclose(inits[f"{name}.running_mean"], mean, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(inits[f"{name}.running_var"], var_biased, atol=1e-4, rtol=1e-4)
    # the recalibrated ONNX model classifies the shifted digits as the recalibrated torch model
    import onnxruntime as ort

    sess = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    pred_onnx = sess.run(["y"], {"x": x})[0].argmax(1)
    with torch.no_grad():
        pred_torch = model(torch.from_numpy(x)).argmax(1).numpy()
    assert (pred_onnx == pred_torch).mean() > 0.99


def test_data_from_files_equals_array(tmp_path: pathlib.Path) -> None:
    src = _save(onnx_cnn(15), tmp_path / "m.onnx")
    x = _x(50)
    recalibrate(src, x, tmp_path / "a.onnx", batch_size=10, progress=False)
    np.savez(tmp_path / "d.npz", inputs=x, other=np.zeros(3))
    recalibrate(
        src, tmp_path / "d.npz", tmp_path / "b.onnx", key="inputs", batch_size=10, progress=False
    )
    (tmp_path / "shards").mkdir()
    for i in range(0, 50, 20):
        np.save(tmp_path / "shards" / f"part{i:03d}.npy", x[i : i + 20])
    recalibrate(src, tmp_path / "shards", tmp_path / "c.onnx", batch_size=10, progress=False)
    recalibrate(
        src,
        str(tmp_path / "shards" / "part*.npy"),
        tmp_path / "d.onnx",
        batch_size=10,
        progress=False,
    )
    a = onnx_stats(str(tmp_path / "a.onnx"))
    for other in ("b", "c", "d"):
        b = onnx_stats(str(tmp_path / f"{other}.onnx"))
        for k in a:
            np.testing.assert_allclose(a[k][1], b[k][1], rtol=1e-6)
    r = recalibrate(src, x, tmp_path / "e.onnx", num_samples=17, progress=False)
    assert r.samples == 17
    recalibrate(src, x[:17], tmp_path / "f.onnx", progress=False)
    e, f = onnx_stats(str(tmp_path / "e.onnx")), onnx_stats(str(tmp_path / "f.onnx"))
    np.testing.assert_allclose(e["bn2"][1], f["bn2"][1], rtol=1e-6)
    with pytest.raises(ValueError, match="nothing to restore"):
        r.restore()


# ------------------------------------------------------------------------------------------
# bad input: an error, no output file, input bytes unchanged


def _bad_models(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, type, str]]:
    from onnx import TensorProto, helper

    out = {}
    p = tmp_path / "stats_inputs.onnx"
    _save(onnx_cnn(15, stats_as_inputs=True), p)
    out["stats as graph inputs"] = (p, ValueError, "graph input")
    p = tmp_path / "garbage.onnx"
    p.write_bytes(b"\x08\x07this is not an onnx model\xff\xfe")
    out["corrupt"] = (p, ValueError, "ONNX model")
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    out["empty file"] = (p, ValueError, "ONNX model")
    old = onnx_cnn(15)
    old.opset_import[0].version = 7
    for n in old.graph.node:
        del n.attribute[:]
    p = _save(old, tmp_path / "opset7.onnx")
    out["opset 7"] = (p, ValueError, "opset")
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 6, 6])],
    )
    p = _save(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)]), tmp_path / "nobn.onnx"
    )
    out["no BN"] = (p, ValueError, "no BatchNormalization")
    tm = onnx_cnn(15)
    tm.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    p = _save(tm, tmp_path / "training.onnx")
    out["training mode"] = (p, ValueError, "training_mode")
    return out


def test_bad_models(tmp_path: pathlib.Path) -> None:
    x = _x(10)
    for what, (path, exc, match) in _bad_models(tmp_path).items():
        before = _digest(path)
        out = tmp_path / "out.onnx"
        with pytest.raises(exc, match=match):
            recalibrate(path, x, out, progress=False)
        assert not out.exists(), what
        assert _digest(path) == before, what


def test_bad_data_and_arguments(tmp_path: pathlib.Path) -> None:
    src = _save(onnx_cnn(15), tmp_path / "m.onnx")
    before = _digest(src)
    out = tmp_path / "out.onnx"
    x = _x(10)
    nan = x.copy()
    nan[3, 1, 2, 2] = np.nan
    cases = [
        (dict(data=x[:, :, :5]), ValueError, "shape"),
        (dict(data=x[:, 0]), ValueError, "rank"),
        (dict(data=x.astype("U8")), TypeError, "numeric"),
        (dict(data=np.zeros((0, 2, 6, 6), np.float32)), ValueError, "empty"),
        (dict(data=[x]), TypeError, "numpy array"),
        (dict(data=nan), ValueError, "non-finite"),
        (dict(data=tmp_path / "missing.npy"), FileNotFoundError, "does not exist"),
        (dict(data=x, mode="twice"), ValueError, "mode"),
        (dict(data=x, num_samples=0), ValueError, "num_samples"),
        (dict(data=x, batch_size=0), ValueError, "batch_size"),
        (dict(data=x, input_name="y"), ValueError, "no input"),
        (dict(data=x, out_path=src), ValueError, "never modified"),
        (dict(data=x, out_path=tmp_path / "nofolder" / "o.onnx"), FileNotFoundError, "folder"),
        (dict(data=x, model_path=tmp_path / "nope.onnx"), FileNotFoundError, "does not exist"),
        (dict(data=x, model_path=3), TypeError, "path"),
    ]
    for kw, exc, match in cases:
        model_path = kw.pop("model_path", src)
        out_path = kw.pop("out_path", out)
        data = kw.pop("data")
        with pytest.raises(exc, match=match):
            recalibrate(model_path, data, out_path, progress=False, **kw)  # type: ignore[arg-type]
        assert not out.exists(), kw
        assert _digest(src) == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary files left behind


def test_out_that_is_a_data_file_is_refused_before_the_run(tmp_path: pathlib.Path) -> None:
    from streamnorm._errors import OutputPathError

    src = _save(onnx_cnn(15), tmp_path / "m.onnx")
    (tmp_path / "shards").mkdir()
    for i in range(2):
        np.save(tmp_path / "shards" / f"p{i}.npy", _x(10, seed=i))
    np.save(tmp_path / "x.npy", _x(10))
    cases = [
        (tmp_path / "x.npy", tmp_path / "x.npy"),
        (tmp_path / "shards", tmp_path / "shards" / "p0.npy"),
        (str(tmp_path / "shards" / "p*.npy"), tmp_path / "shards" / "p1.npy"),
    ]
    for data, out in cases:
        before = _digest(out)
        with pytest.raises(OutputPathError, match="one of the inputs"):
            recalibrate(src, data, out, progress=False)
        assert _digest(out) == before


def test_excluded_batchnorm_nodes_keep_their_statistics(tmp_path: pathlib.Path) -> None:
    """``exclude`` names BatchNorm nodes too: they keep their stored statistics, the others are
    recalibrated (with the kept node's old statistics upstream, sequentially); the CLI's
    ``--exclude`` of ``annotate`` and ``calibrate`` takes the same list."""
    from streamnorm.cli import main
    from streamnorm.onnx import folded_layers

    src = _save(onnx_cnn(15), tmp_path / "m.onnx")
    x = _x()
    old = onnx_stats(str(src))
    out = tmp_path / "out.onnx"
    report = recalibrate(src, x, out, batch_size=16, progress=False, exclude=["bn1"])
    assert [r.name for r in report.layers] == ["bn2"]
    new = onnx_stats(str(out))
    np.testing.assert_array_equal(new["bn1"][0], old["bn1"][0])
    np.testing.assert_array_equal(new["bn1"][1], old["bn1"][1])
    assert not np.allclose(new["bn2"][1], old["bn2"][1])
    ref = onnx_bn_inputs(str(out), x)["bn2"]  # bn2's input with bn1 as it was
    np.testing.assert_allclose(new["bn2"][1], ref[1], rtol=2e-5)
    # by output name, and through the CLI (annotate ignores BatchNorm names)
    bn1_out = next(n.output[0] for n in onnx.load(str(src)).graph.node if n.name == "bn1")
    again = tmp_path / "again.onnx"
    recalibrate(src, x, again, batch_size=16, progress=False, exclude=[bn1_out])
    assert onnx_stats(str(again))["bn1"][0].tolist() == old["bn1"][0].tolist()
    np.save(tmp_path / "x.npy", x)
    cli_out = tmp_path / "cli.onnx"
    args = ["--data", str(tmp_path / "x.npy"), "--exclude", "bn1", "--no-progress"]
    assert main(["calibrate", str(src), *args, "--out", str(cli_out)]) == 0
    cli = onnx_stats(str(cli_out))
    np.testing.assert_array_equal(cli["bn1"][1], old["bn1"][1])
    np.testing.assert_allclose(cli["bn2"][1], new["bn2"][1], rtol=1e-6)
    assert not any(c.chosen for c in folded_layers(str(src), exclude=["bn1"]))
