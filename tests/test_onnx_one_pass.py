"""``mode="one-pass"`` on ONNX models is PyTorch's one-pass (train-mode) recalibration: an
8-block Conv-BN-ReLU network exported with its BatchNorm nodes and with them folded into the
Convs, recalibrated on target data ``3x + 1``, equals the network recalibrated in PyTorch with
``mode="one-pass"``."""

from __future__ import annotations

import copy
import pathlib
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from streamnorm.cli import main  # noqa: E402
from streamnorm.onnx import annotate, recalibrate  # noqa: E402
from streamnorm.torch import recalibrate as torch_recalibrate  # noqa: E402

N = 512


def _net() -> nn.Sequential:
    """Eight Conv-BN-ReLU blocks, BN scales of both signs, recalibrated on the source data."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    c = 3
    for _ in range(8):
        layers += [nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        c = 8
    m = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(8, generator=g) + 0.5)
                mod.weight[::3] *= -1
                mod.bias.copy_(torch.randn(8, generator=g) * 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def setup() -> dict:
    rng = np.random.default_rng(0)
    src = rng.standard_normal((N, 3, 8, 8)).astype(np.float32)
    tgt = 3 * src + 1
    model = _net()
    # the BN statistics are the population statistics of the source data, so a folded layer's
    # source moments are its BN's (beta, |gamma|)
    torch_recalibrate(model, src, mode="sequential", progress=False)
    return {"model": model, "src": src, "tgt": tgt}


def _torch_one_pass(setup: dict, batch_size: int) -> np.ndarray:
    """The PyTorch one-pass reference on the target data, its outputs with the variances
    written biased (as ONNX stores them: the unbiased ``running_var`` differs by n/(n-1))."""
    ref = copy.deepcopy(setup["model"])
    tgt = setup["tgt"]
    torch_recalibrate(ref, tgt, mode="one-pass", batch_size=batch_size, progress=False)
    n = len(tgt) * 64
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_var.mul_((n - 1) / n)
        return ref(torch.from_numpy(tgt)).numpy()


def _export(model: nn.Module, x: np.ndarray, path: pathlib.Path, **kw: object) -> pathlib.Path:
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
            **kw,
        )
    return path


def _run(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
    """Outputs of ``path`` on ``x``, one sample at a time copied to the model's batch size."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    rows = inp.shape[0] if isinstance(inp.shape[0], int) else len(x)
    if rows == len(x):
        return sess.run(None, {inp.name: x})[0]
    return np.concatenate(
        [sess.run(None, {inp.name: x[i : i + 1].repeat(rows, 0)})[0][:1] for i in range(len(x))]
    )


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("folded", [False, True], ids=["bn-nodes", "folded"])
def test_one_pass_equals_pytorch_one_pass(setup, tmp_path, folded) -> None:
    model, src, tgt = setup["model"], setup["src"], setup["tgt"]
    path = _export(model, src, tmp_path / "m.onnx", do_constant_folding=folded)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == (0 if folded else 8)
    if folded:
        path = tmp_path / "a.onnx"
        annotate(tmp_path / "m.onnx", src, path, progress=False)
    want = _torch_one_pass(setup, 64)
    out = tmp_path / "out.onnx"
    report = recalibrate(path, tgt, out, mode="one-pass", batch_size=64, progress=False)
    assert report.mode == "one-pass" and len(report.layers) == 8
    assert _rel(_run(out, tgt), want) <= 1e-4
    # the sequential fixed point is another model: the comparison can fail
    seq = tmp_path / "seq.onnx"
    recalibrate(path, tgt, seq, mode="sequential", batch_size=64, progress=False)
    assert _rel(_run(seq, tgt), want) > 1e-3


def test_cli_one_pass_writes_the_same_model(setup, tmp_path, capsys) -> None:
    src, tgt = setup["src"], setup["tgt"]
    path = _export(setup["model"], src, tmp_path / "m.onnx", do_constant_folding=False)
    np.save(tmp_path / "t.npy", tgt)
    recalibrate(path, tgt, tmp_path / "api.onnx", mode="one-pass", progress=False)
    argv = ["calibrate", str(path), "--data", str(tmp_path / "t.npy"), "--out"]
    assert main([*argv, str(tmp_path / "cli.onnx"), "--mode", "one-pass", "--no-progress"]) == 0
    assert "one-pass" in capsys.readouterr().out
    np.testing.assert_array_equal(
        _run(tmp_path / "cli.onnx", tgt), _run(tmp_path / "api.onnx", tgt)
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_default_export_with_a_fixed_batch(setup, tmp_path) -> None:
    """A default ``torch.onnx.export`` (the dynamo exporter: BN folded, opset 18+, a fixed batch
    of 4): the last, short batch is padded, and the padding stays out of the batch statistics."""
    model, src = setup["model"], setup["src"]
    tgt = setup["tgt"][:130]  # batches of 4, the last one of 2
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.from_numpy(src[:4]),), str(path))
    m = onnx.load(str(path))
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim][0] == 4
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)
    annotate(path, src, tmp_path / "a.onnx", progress=False)
    want = _torch_one_pass({**setup, "tgt": tgt}, 4)
    recalibrate(tmp_path / "a.onnx", tgt, tmp_path / "out.onnx", mode="one-pass", progress=False)
    assert _rel(_run(tmp_path / "out.onnx", tgt), want) <= 1e-4


def test_recorded_export_is_exact_with_a_large_eps(tmp_path) -> None:
    """A model from :func:`streamnorm.onnx.export` (BN folded, recorded with its eps): the
    one-pass normalizes each folded output as its BatchNorm would, eps included."""
    from streamnorm.onnx import export

    model = _net()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eps = 0.1
    rng = np.random.default_rng(1)
    src = (0.2 * rng.standard_normal((N, 3, 8, 8))).astype(np.float32)
    tgt = 3 * src + 1
    torch_recalibrate(model, src, mode="sequential", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(
            model,
            (torch.from_numpy(src[:2]),),
            tmp_path / "m.onnx",
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "N"}},
        )
    ref = copy.deepcopy(model)
    torch_recalibrate(ref, tgt, mode="one-pass", batch_size=64, progress=False)
    with torch.no_grad():
        want = ref(torch.from_numpy(tgt)).numpy()
    out = tmp_path / "out.onnx"
    recalibrate(tmp_path / "m.onnx", tgt, out, mode="one-pass", batch_size=64, progress=False)
    assert _rel(_run(out, tgt), want) <= 1e-4
