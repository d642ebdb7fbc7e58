"""Recalibration of ONNX models whose BatchNorm was folded into the Conv / Gemm at export:
streamnorm.onnx.annotate, recalibrate with source moments (metadata or source=), the CLI, and
equality with recalibrating the unfolded PyTorch model."""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from streamnorm.cli import main  # noqa: E402
from streamnorm.onnx import annotate, recalibrate  # noqa: E402
from streamnorm.torch import recalibrate as torch_recalibrate  # noqa: E402

KEY = "streamnorm.source_moments"


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _net() -> nn.Sequential:
    """Conv-BN-ReLU blocks (with and without conv bias, grouped) and a Linear-BN-ReLU block;
    BN scales of both signs."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1, groups=2),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = mod.num_features
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.weight[::3] *= -1
                mod.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return m.eval()


def _domains(n: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    src = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    src[:, 1] += 0.5 * src[:, 0]
    tgt = (0.35 * rng.standard_normal((n, 3, 8, 8)) + 0.3).astype(np.float32)
    tgt[:, 2] *= 2.0
    return src, tgt


def _fused(model: nn.Sequential) -> nn.Sequential:
    """Every BN fused into the Conv / Linear before it (torch.nn.utils.fusion)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    mods, out, i = list(copy.deepcopy(model)), [], 0
    while i < len(mods):
        a, b = mods[i], mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
            out.append(fuse_conv_bn_eval(a, b))
            i += 2
        elif isinstance(a, nn.Linear) and isinstance(b, nn.BatchNorm1d):
            out.append(fuse_linear_bn_eval(a, b))
            i += 2
        else:
            out.append(a)
            i += 1
    return nn.Sequential(*out).eval()


def _export(model: nn.Module, x: np.ndarray, path: pathlib.Path) -> pathlib.Path:
    """torch.onnx.export with its defaults (eval mode, constant folding on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(x[:4]),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )
    return path


def _run(path: pathlib.Path, x: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
    """Run ``path`` on ``x``; ``names`` (intermediate tensors) are exposed as outputs by hand."""
    m = onnx.load(str(path))
    names = names or [o.name for o in m.graph.output]
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, {sess.get_inputs()[0].name: x})


def _ref_moments(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slow reference: per-channel (axis 1) count, mean and M2 in float64."""
    y64 = np.moveaxis(y.astype(np.float64), 1, 0).reshape(y.shape[1], -1)
    mean = y64.mean(axis=1)
    return np.full(y.shape[1], y64.shape[1], float), mean, ((y64 - mean[:, None]) ** 2).sum(1)


def _metadata(path: pathlib.Path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[KEY])


@pytest.fixture(scope="module")
def setup() -> dict:
    """The source-calibrated model, the domains and the reference: the unfolded model
    recalibrated on the target data (population, sequential) and its outputs."""
    src, tgt = _domains()
    model = _net()
    torch_recalibrate(model, src, mode="sequential", progress=False)
    ref = copy.deepcopy(model)
    torch_recalibrate(ref, tgt, mode="sequential", progress=False)
    with torch.no_grad():
        want = ref(torch.from_numpy(tgt)).numpy()
        before = model(torch.from_numpy(tgt)).numpy()
    return {"model": model, "src": src, "tgt": tgt, "want": want, "before": before}


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("fuse", [False, True], ids=["default-export", "every-bn-fused"])
def test_folded_model_equals_recalibrating_before_export(setup, tmp_path, fuse) -> None:
    src, tgt, want = setup["src"], setup["tgt"], setup["want"]
    model = _fused(setup["model"]) if fuse else setup["model"]
    path = _export(model, src, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 3 and ops.count("BatchNormalization") == (0 if fuse else 1)
    before = _digest(path)
    annotate(path, src, tmp_path / "a.onnx", batch_size=256, progress=False)
    assert _digest(path) == before
    report = recalibrate(tmp_path / "a.onnx", tgt, tmp_path / "out.onnx", progress=False)
    names = [r.name for r in report.layers]
    # three folded convolutions, then the Linear's BN node or its fused Gemm, in graph order
    assert [n.rsplit("/", 1)[-1] for n in names] == ["Conv"] * 3 + [
        "Gemm" if fuse else "BatchNormalization"
    ]
    (got,) = _run(tmp_path / "out.onnx", tgt)
    # the folded model before adaptation is far off: the test can fail
    (unadapted,) = _run(path, tgt)
    assert _rel(unadapted, want) > 0.3
    assert _rel(got, want) <= 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_annotate_stores_the_exact_source_moments(setup, tmp_path) -> None:
    src = setup["src"]
    path = _export(_fused(setup["model"]), src, tmp_path / "m.onnx")
    measured = annotate(path, src[:300], tmp_path / "a.onnx", batch_size=64, progress=False)
    meta = _metadata(tmp_path / "a.onnx")
    assert meta["format"] == KEY and meta["version"] == 1 and meta["samples"] == 300
    outs = [e["output"] for e in meta["layers"]]
    assert [e["op"] for e in meta["layers"]] == ["Conv", "Conv", "Conv", "Gemm"]
    # keyed by layer (node) name, the name the recalibration report shows
    assert list(measured) == [e["node"] for e in meta["layers"]]
    for entry, y in zip(meta["layers"], _run(path, src[:300], outs), strict=True):
        count, mean, m2 = _ref_moments(y)
        np.testing.assert_array_equal(entry["count"], count)
        np.testing.assert_allclose(entry["mean"], mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(entry["m2"], m2, rtol=1e-10)
    # the graph and the weights are unchanged
    a, b = onnx.load(str(path)), onnx.load(str(tmp_path / "a.onnx"))
    assert a.graph.SerializeToString() == b.graph.SerializeToString()


def test_recalibrated_layers_have_the_source_moments_on_the_target(setup, tmp_path) -> None:
    """The fixed point: after adaptation, each adapted output has the source moments on the
    target data (exactly, up to float32)."""
    src, tgt = setup["src"], setup["tgt"]
    path = _export(_fused(setup["model"]), src, tmp_path / "m.onnx")
    annotate(path, src, tmp_path / "a.onnx", batch_size=512, progress=False)
    recalibrate(tmp_path / "a.onnx", tgt, tmp_path / "out.onnx", batch_size=512, progress=False)
    meta = _metadata(tmp_path / "out.onnx")  # the annotation is kept
    assert meta == _metadata(tmp_path / "a.onnx")
    outs = [e["output"] for e in meta["layers"]]
    for entry, y in zip(meta["layers"], _run(tmp_path / "out.onnx", tgt, outs), strict=True):
        _, mean, m2 = _ref_moments(y)
        s_mean = np.asarray(entry["mean"])
        s_std = np.sqrt(np.asarray(entry["m2"]) / np.asarray(entry["count"]))
        t_std = np.sqrt(m2 / (y.size / y.shape[1]))
        np.testing.assert_allclose(mean, s_mean, atol=2e-5 * s_std.max())
        np.testing.assert_allclose(t_std, s_std, rtol=2e-5)


def test_source_equals_metadata_and_is_stored(setup, tmp_path) -> None:
    src, tgt = setup["src"], setup["tgt"]
    path = _export(setup["model"], src, tmp_path / "m.onnx")
    annotate(path, src, tmp_path / "a.onnx", progress=False)
    recalibrate(tmp_path / "a.onnx", tgt, tmp_path / "x.onnx", progress=False)
    recalibrate(path, tgt, tmp_path / "y.onnx", source=src, progress=False)
    (x,), (y,) = _run(tmp_path / "x.onnx", tgt), _run(tmp_path / "y.onnx", tgt)
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    a, b = _metadata(tmp_path / "a.onnx"), _metadata(tmp_path / "y.onnx")
    assert [e["output"] for e in a["layers"]] == [e["output"] for e in b["layers"]]
    for ea, eb in zip(a["layers"], b["layers"], strict=True):
        # float32 kernels differ slightly when the weights are fed rather than constants
        np.testing.assert_allclose(ea["mean"], eb["mean"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ea["m2"], eb["m2"], rtol=1e-6)


def test_cli_annotate_then_calibrate_round_trips_through_files(setup, tmp_path, capsys) -> None:
    src, tgt = setup["src"][:512], setup["tgt"][:512]
    path = _export(_fused(setup["model"]), src, tmp_path / "m.onnx")
    np.save(tmp_path / "src.npy", src)
    np.save(tmp_path / "tgt.npy", tgt)
    rc = main(
        [
            "annotate",
            str(path),
            "--data",
            str(tmp_path / "src.npy"),
            "--out",
            str(tmp_path / "a.onnx"),
            "--no-progress",
        ]
    )
    assert rc == 0 and "wrote" in capsys.readouterr().out
    rc = main(
        [
            "calibrate",
            str(tmp_path / "a.onnx"),
            "--data",
            str(tmp_path / "tgt.npy"),
            "--out",
            str(tmp_path / "out.onnx"),
            "--no-progress",
        ]
    )
    assert rc == 0
    annotate(path, src, tmp_path / "pa.onnx", progress=False)
    recalibrate(tmp_path / "pa.onnx", tgt, tmp_path / "pout.onnx", progress=False)
    (a,), (b,) = _run(tmp_path / "out.onnx", tgt), _run(tmp_path / "pout.onnx", tgt)
    np.testing.assert_array_equal(a, b)
    # --source instead of the metadata
    rc = main(
        [
            "calibrate",
            str(path),
            "--data",
            str(tmp_path / "tgt.npy"),
            "--source",
            str(tmp_path / "src.npy"),
            "--out",
            str(tmp_path / "s.onnx"),
            "--no-progress",
        ]
    )
    assert rc == 0
    (c,) = _run(tmp_path / "s.onnx", tgt)
    np.testing.assert_allclose(c, b, rtol=1e-6, atol=1e-6)


def test_no_bn_no_metadata_no_source_is_one_line_and_writes_nothing(setup, tmp_path, capsys):
    src, tgt = setup["src"][:64], setup["tgt"][:64]
    path = _export(_fused(setup["model"]), src, tmp_path / "m.onnx")
    np.save(tmp_path / "tgt.npy", tgt)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(
        [
            "calibrate",
            str(path),
            "--data",
            str(tmp_path / "tgt.npy"),
            "--out",
            str(tmp_path / "out.onnx"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "no BatchNormalization" in err and "annotate" in err and "--source" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(ValueError, match="annotate"):
        recalibrate(path, tgt, tmp_path / "out.onnx", progress=False)
    assert not (tmp_path / "out.onnx").exists()


def test_explicit_layers(setup, tmp_path) -> None:
    src, tgt = setup["src"][:256], setup["tgt"][:256]
    path = _export(_fused(setup["model"]), src, tmp_path / "m.onnx")
    r = recalibrate(path, tgt, tmp_path / "o.onnx", source=src, layers=["/0/Conv"], progress=False)
    assert [x.name for x in r.layers] == ["/0/Conv"]
    old = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    new_model = onnx.load(str(tmp_path / "o.onnx"))
    new = {t.name: numpy_helper.to_array(t) for t in new_model.graph.initializer}
    conv0 = next(n for n in new_model.graph.node if n.name == "/0/Conv")
    assert not np.allclose(new[conv0.input[1]], old[conv0.input[1]])
    for n in new_model.graph.node:  # every other weight is untouched
        if n.op_type in ("Conv", "Gemm") and n.name != "/0/Conv":
            np.testing.assert_array_equal(new[n.input[1]], old[n.input[1]])
    # an output name works too, and the annotation names what calibrate adapts by default
    annotate(path, src, tmp_path / "a.onnx", layers=[conv0.output[0]], progress=False)
    r = recalibrate(tmp_path / "a.onnx", tgt, tmp_path / "o2.onnx", progress=False)
    assert [x.name for x in r.layers] == ["/0/Conv"]
    cases = [
        (["nope"], "no node or output named"),
        (["/1/Relu"], "is a Relu node"),
        ([], "empty"),
    ]
    for layers, match in cases:
        with pytest.raises(ValueError, match=match):
            recalibrate(path, tgt, tmp_path / "x.onnx", source=src, layers=layers, progress=False)
    with pytest.raises(ValueError, match="no source moments in the model's metadata"):
        recalibrate(tmp_path / "a.onnx", tgt, tmp_path / "x.onnx", layers=["/2/Conv"])
    assert not (tmp_path / "x.onnx").exists()


def test_bn_model_with_folded_layers_but_no_source_is_refused(setup, tmp_path) -> None:
    """BatchNorm nodes and folded layers without source moments: no silent partial
    recalibration; bn_only=True asks for it, source= adapts both kinds."""
    src, tgt = setup["src"][:256], setup["tgt"][:256]
    path = _export(setup["model"], src, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="no source moments") as e:
        recalibrate(path, tgt, tmp_path / "o.onnx", progress=False)
    for fix in ("streamnorm.onnx.annotate", "source=", "bn_only=True", "--bn-only", "--source"):
        assert fix in str(e.value)
    assert not (tmp_path / "o.onnx").exists()
    r = recalibrate(path, tgt, tmp_path / "o.onnx", bn_only=True, progress=False)
    assert [x.name for x in r.layers] == ["/12/BatchNormalization"]
    assert r.kinds == {"BatchNorm": 1}
    r = recalibrate(path, tgt, tmp_path / "o2.onnx", source=src, progress=False)
    assert r.kinds == {"BatchNorm": 1, "folded": 3}
    assert [x.kind for x in r.layers] == ["folded", "folded", "folded", "BatchNorm"]
    assert "1 BatchNorm node(s)" in str(r) and "3 folded Conv / Gemm layer(s)" in str(r)


# ------------------------------------------------------------------------------------------
# hand-built graphs: shared weights, Gemm layouts, external data, bad metadata


def _graph_model(*, trans_b: int = 1, beta: float = 1.0, c_shape: tuple = (6,)) -> onnx.ModelProto:
    """Conv(x, W) -> Relu -> Conv(., W) (the same W) -> Relu -> Flatten -> Gemm -> Relu."""
    rng = np.random.default_rng(1)
    w = (0.3 * rng.standard_normal((4, 4, 3, 3))).astype(np.float32)
    b = (0.1 * rng.standard_normal(4)).astype(np.float32)
    gw = (0.2 * rng.standard_normal((6, 64) if trans_b else (64, 6))).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    inits.append(numpy_helper.from_array(gw, "G"))
    gemm_in = ["f", "G"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_shape).astype(np.float32), "C"))
        gemm_in.append("C")
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", gemm_in, ["g"], name="fc", transB=trans_b, beta=beta),
        helper.make_node("Relu", ["g"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])


def _xs(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    src = rng.standard_normal((n, 4, 4, 4)).astype(np.float32)
    tgt = (0.4 * rng.standard_normal((n, 4, 4, 4)) - 0.2).astype(np.float32)
    return src, tgt


def _assert_source_moments(src_path, out_path, tgt, outputs) -> None:
    ys_src = _run(src_path, _xs()[0], outputs)
    ys_out = _run(out_path, tgt, outputs)
    for a, b in zip(ys_src, ys_out, strict=True):
        _, ma, m2a = _ref_moments(a)
        _, mb, m2b = _ref_moments(b)
        sa = np.sqrt(m2a / (a.size / a.shape[1]))
        np.testing.assert_allclose(mb, ma, atol=1e-5 * sa.max())
        np.testing.assert_allclose(np.sqrt(m2b / (b.size / b.shape[1])), sa, rtol=1e-5)


@pytest.mark.parametrize(
    "trans_b,beta,c_shape",
    [(1, 1.0, (6,)), (0, 1.0, (1, 6)), (1, 0.5, (1,)), (0, 2.0, ()), (1, 1.0, None)],
)
def test_shared_weights_and_gemm_layouts(tmp_path, trans_b, beta, c_shape) -> None:
    onnx.save(_graph_model(trans_b=trans_b, beta=beta, c_shape=c_shape), str(tmp_path / "m.onnx"))
    src, tgt = _xs()
    # conv2 has no bias (so the default rule leaves it out): named, by node or output name
    layers = ["conv1", "c2", "fc"]
    annotate(tmp_path / "m.onnx", src, tmp_path / "a.onnx", layers=layers, progress=False)
    assert [e["output"] for e in _metadata(tmp_path / "a.onnx")["layers"]] == ["c1", "c2", "g"]
    r = recalibrate(tmp_path / "a.onnx", tgt, tmp_path / "o.onnx", batch_size=64, progress=False)
    assert [x.name for x in r.layers] == ["conv1", "conv2", "fc"]
    _assert_source_moments(tmp_path / "m.onnx", tmp_path / "o.onnx", tgt, ["c1", "c2", "g"])
    m = onnx.load(str(tmp_path / "o.onnx"))
    onnx.checker.check_model(m)
    conv1, _, conv2 = m.graph.node[:3]
    assert conv1.input[1] != conv2.input[1]  # the shared weight got copies


def test_external_data_stays_external(tmp_path) -> None:
    from onnx import external_data_helper as ext

    model = _graph_model()
    onnx.save(
        model,
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.weights",
        size_threshold=0,
    )
    src, tgt = _xs()
    before = _digest(tmp_path / "m.weights")
    layers = ["conv1", "conv2", "fc"]
    recalibrate(tmp_path / "m.onnx", tgt, tmp_path / "o.onnx", source=src, layers=layers)
    assert _digest(tmp_path / "m.weights") == before
    out = onnx.load(str(tmp_path / "o.onnx"), load_external_data=False)
    weights = [t for t in out.graph.initializer if t.dims and len(t.dims) == 4]
    assert weights and all(ext.uses_external_data(t) for t in weights)
    assert (tmp_path / "o.onnx.data").exists()
    _assert_source_moments(tmp_path / "m.onnx", tmp_path / "o.onnx", tgt, ["c1", "c2", "g"])


def test_bad_metadata_is_refused(tmp_path) -> None:
    src, tgt = _xs()
    annotate_path = tmp_path / "a.onnx"
    onnx.save(_graph_model(), str(tmp_path / "m.onnx"))
    annotate(tmp_path / "m.onnx", src, annotate_path, progress=False)
    good = _metadata(annotate_path)

    def with_meta(value: str) -> pathlib.Path:
        m = onnx.load(str(annotate_path))
        for p in m.metadata_props:
            if p.key == KEY:
                p.value = value
        path = tmp_path / "bad.onnx"
        onnx.save(m, str(path))
        return path

    cases = [
        ("{not json", "not JSON"),
        (json.dumps({**good, "version": 99}), "version 99"),
        (json.dumps({**good, "format": "other"}), "format"),
        (json.dumps({**good, "layers": [{**good["layers"][0], "m2": [-1.0] * 4}]}), "impossible"),
        (json.dumps({**good, "layers": [{**good["layers"][0], "output": "zz"}]}), "annotate"),
        (json.dumps({**good, "layers": [{**good["layers"][0], "mean": [0.0]}]}), "length"),
    ]
    for value, match in cases:
        path = with_meta(value)
        with pytest.raises(ValueError, match=match):
            recalibrate(path, tgt, tmp_path / "o.onnx", progress=False)
        assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    "field,value,match",
    [("mean", 1e39, "not finite"), ("m2", 1e300, "not finite"), ("count", 1e-300, "whole")],
    ids=["mean", "m2", "count"],
)
def test_metadata_that_overflows_the_weights_is_refused(tmp_path, field, value, match) -> None:
    """Finite source moments whose folded weights overflow float32: an error, nothing written
    (a count below one value is refused by the metadata reader already)."""
    src, tgt = _xs()
    annotate_path = tmp_path / "a.onnx"
    onnx.save(_graph_model(), str(tmp_path / "m.onnx"))
    annotate(tmp_path / "m.onnx", src, annotate_path, progress=False)
    meta = _metadata(annotate_path)
    last = meta["layers"][-1]
    last[field] = [value] * len(last[field])
    m = onnx.load(str(annotate_path))
    for p in m.metadata_props:
        if p.key == KEY:
            p.value = json.dumps(meta)
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    out = tmp_path / "o.onnx"
    with pytest.raises(ValueError, match=match):
        recalibrate(bad, tgt, out, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
