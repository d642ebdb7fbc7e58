"""streamnorm.onnx.export: the record of where each BatchNorm module of a PyTorch model went in
the exported graph, and the exact recalibration of the Conv / Gemm layers it was folded into
(eps included), compared with recalibrating the PyTorch model."""

from __future__ import annotations

import copy
import json
import pathlib
import warnings
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

import _zoo  # noqa: E402
from torch import nn  # noqa: E402

from streamnorm._errors import InputError, InputTypeError, OutputPathError, RecordError  # noqa: E402
from streamnorm.onnx import annotate, export, recalibrate  # noqa: E402
from streamnorm.torch import recalibrate as torch_recalibrate  # noqa: E402

KEY = "streamnorm.batchnorms"


class BNAct(nn.BatchNorm2d):
    """BatchNorm then an activation in one module, as timm's ``BatchNormAct2d``."""

    def __init__(self, c: int, eps: float) -> None:
        super().__init__(c, eps=eps)
        self.act = nn.SiLU()

    def forward(self, x: Any) -> Any:
        return self.act(super().forward(x))


def _net() -> nn.Sequential:
    """Conv-BN-ReLU (eps 1e-3), Conv-BNAct (eps 1e-3), Conv-BN (eps 0.1), Linear-BN1d; BN scales
    of both signs and one zero; small running variances, so that eps matters."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, eps=1e-3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        BNAct(8, eps=1e-3),
        nn.Conv2d(8, 6, 1),
        nn.BatchNorm2d(6, eps=0.1),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 10),
        nn.BatchNorm1d(10),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                c = mod.num_features
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.weight[::3] *= -1
                mod.weight[1] = 0.0
                mod.bias.copy_(torch.randn(c, generator=g))
    return m.eval()


def _data(n: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Source data of small spread (BN variances near eps) and the target ``3 x + 1``."""
    src = (0.1 * np.random.default_rng(0).standard_normal((n, 3, 8, 8))).astype(np.float32)
    return src, 3 * src + 1


@pytest.fixture(scope="module")
def calibrated() -> nn.Sequential:
    """The net with the population statistics of the source data."""
    m = _net()
    torch_recalibrate(m, _data()[0], mode="sequential", progress=False)
    return m


def _export(m: nn.Module, path: pathlib.Path, dynamo: bool = False) -> dict:
    x = torch.from_numpy(_data()[0][:2])
    kw: dict[str, Any] = {"input_names": ["x"]}
    if dynamo:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("N")},)
    else:
        kw["dynamic_axes"] = {"x": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export(m, (x,), path, dynamo=dynamo, **kw)


def _run(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _reference(m: nn.Module, tgt: np.ndarray, x: np.ndarray) -> np.ndarray:
    ref = copy.deepcopy(m)
    torch_recalibrate(ref, tgt, mode="sequential", progress=False)
    with torch.no_grad():
        return ref(torch.from_numpy(x)).numpy()


def _truth(m: nn.Module, x: Any) -> dict[str, bool]:
    """Per BatchNorm module: does its input come straight from a Conv module (folded)?"""
    conv_out: list[Any] = []  # the tensors themselves: ids of freed tensors are reused
    folded: dict[str, bool] = {}
    hooks = []
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(lambda _m, _a, y: conv_out.append(y)))
        elif isinstance(getattr(mod, "running_mean", None), torch.Tensor):
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda _m, a, k=name: folded.__setitem__(k, any(a[0] is y for y in conv_out))
                )
            )
    try:
        with torch.no_grad():
            m(x)
    finally:
        for h in hooks:
            h.remove()
    return folded


# --------------------------------------------------------------------------------------------
# the small net


def test_record_is_the_module_structure(calibrated, tmp_path):
    rec = _export(calibrated, tmp_path / "m.onnx")
    assert {k: r.op for k, r in rec.items()} == {
        "1": "Conv",
        "4": "Conv",
        "6": "Conv",
        "9": "BatchNormalization",  # the TorchScript exporter keeps a BN after a Linear
    }
    truth = _truth(calibrated, torch.from_numpy(_data()[0][:2]))
    assert {k for k, r in rec.items() if r.op == "Conv"} == {k for k, f in truth.items() if f}
    assert [rec[k].eps for k in ("1", "4", "6", "9")] == [1e-3, 1e-3, 0.1, 1e-5]
    bn = calibrated[4]
    np.testing.assert_array_equal(rec["4"].gamma, bn.weight.detach().double().numpy())
    np.testing.assert_array_equal(rec["4"].var, bn.running_var.double().numpy())
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    d = json.loads(stored[KEY])
    assert d["format"] == KEY and d["version"] == 1 and len(d["layers"]) == 4
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    by_out = {n.output[0]: n for n in g.node}
    for r in rec.values():
        assert by_out[r.output].op_type == r.op and by_out[r.output].name == r.node
    assert calibrated.training is False and not any(x.training for x in calibrated.modules())


def test_recalibration_matches_pytorch_and_moment_matching_does_not(calibrated, tmp_path):
    """eps = 1e-3 and 0.1 with running variances of ~1e-2: moment matching of the folded Conv
    outputs (which loses eps) is off by percents, the recorded path agrees to float32."""
    src, tgt = _data()
    path = tmp_path / "m.onnx"
    _export(calibrated, path)
    x = tgt[:256]
    want = _reference(calibrated, tgt, x)
    recalibrate(path, tgt, tmp_path / "new.onnx", progress=False)
    assert _rel(_run(tmp_path / "new.onnx", x), want) < 1e-4

    # the same graph without the record: annotate + moment matching (eps lost in folding)
    m = onnx.load(str(path))
    keep = [(p.key, p.value) for p in m.metadata_props if p.key != KEY]
    del m.metadata_props[:]
    for k, v in keep:
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(tmp_path / "plain.onnx"))
    annotate(tmp_path / "plain.onnx", src, tmp_path / "ann.onnx", progress=False)
    recalibrate(tmp_path / "ann.onnx", tgt, tmp_path / "old.onnx", progress=False)
    assert _rel(_run(tmp_path / "old.onnx", x), want) > 1e-2


@pytest.mark.slow
def test_dynamo_exporter_folds_the_linear_too(calibrated, tmp_path):
    src, tgt = _data()
    rec = _export(calibrated, tmp_path / "m.onnx", dynamo=True)
    assert {k: r.op for k, r in rec.items()} == {"1": "Conv", "4": "Conv", "6": "Conv", "9": "Gemm"}
    recalibrate(tmp_path / "m.onnx", tgt, tmp_path / "new.onnx", progress=False)
    x = tgt[:256]
    assert _rel(_run(tmp_path / "new.onnx", x), _reference(calibrated, tgt, x)) < 1e-4


def test_frozen_batchnorm_is_recorded_at_its_conv_and_recalibrated(tmp_path):
    """torchvision's FrozenBatchNorm2d is exported as Mul / Add after its Conv: recorded at the
    Conv's output as the BatchNorm's input, and recalibrated as PyTorch does it."""
    tv = _zoo.torchvision()
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        tv.ops.misc.FrozenBatchNorm2d(8, eps=1e-3),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.BatchNorm2d(6, eps=1e-3),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 10),
    ).eval()
    with torch.no_grad():
        m[1].weight.copy_(torch.linspace(-1.5, 1.5, 8))
        m[1].weight[4] = 0.0
        m[1].bias.copy_(torch.linspace(-1, 1, 8))
    src, tgt = _data()
    torch_recalibrate(m, src, mode="sequential", progress=False)
    rec = _export(m, tmp_path / "m.onnx")
    assert {k: (r.op, r.site) for k, r in rec.items()} == {
        "1": ("Conv", "input"),
        "4": ("Conv", "output"),
    }
    recalibrate(tmp_path / "m.onnx", tgt, tmp_path / "new.onnx", progress=False)
    x = tgt[:256]
    assert _rel(_run(tmp_path / "new.onnx", x), _reference(m, tgt, x)) < 1e-4


def test_bad_input(calibrated, tmp_path):
    x = torch.from_numpy(_data()[0][:2])
    with pytest.raises(InputTypeError, match="torch.nn.Module"):
        export(lambda t: t, (x,), tmp_path / "m.onnx")
    with pytest.raises(InputTypeError, match="path"):
        export(calibrated, (x,), 3)
    with pytest.raises(OutputPathError, match="directory"):
        export(calibrated, (x,), tmp_path)
    with pytest.raises(OutputPathError, match="does not exist"):
        export(calibrated, (x,), tmp_path / "nope" / "m.onnx")
    with pytest.raises(InputTypeError, match="tuple"):
        export(calibrated, [x], tmp_path / "m.onnx")
    with pytest.raises(InputError, match="not as f="):
        export(calibrated, (x,), tmp_path / "m.onnx", f="other.onnx")
    with pytest.raises(InputError, match="eval mode"):
        export(calibrated, (x,), tmp_path / "m.onnx", training=torch.onnx.TrainingMode.TRAINING)
    assert not (tmp_path / "m.onnx").exists()


def test_corrupt_record_is_refused(calibrated, tmp_path):
    path = tmp_path / "m.onnx"
    _export(calibrated, path)
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == KEY:
            d = json.loads(p.value)
            d["layers"][0]["output"] = "no_such_tensor"
            p.value = json.dumps(d)
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(RecordError, match="export the model again"):
        recalibrate(tmp_path / "bad.onnx", _data()[1], tmp_path / "out.onnx", progress=False)
    for p in m.metadata_props:
        if p.key == KEY:
            p.value = json.dumps({**json.loads(p.value), "version": 99})
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(RecordError, match="version 99"):
        recalibrate(tmp_path / "bad.onnx", _data()[1], tmp_path / "out.onnx", progress=False)


def test_export_is_public_and_imports_torch_only_when_called():
    import subprocess
    import sys

    code = (
        "import sys, streamnorm.onnx as o\n"
        "print('export' in o.__all__, 'torch' in sys.modules, 'streamnorm.torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False"]


def test_kwargs_inputs_are_refused(calibrated, tmp_path):
    x = torch.from_numpy(_data()[0][:2])
    with pytest.raises(InputError, match="args"):
        export(calibrated, (), tmp_path / "m.onnx", kwargs={"input": x})


def test_shared_batchnorm_is_left_out_with_a_warning(tmp_path):
    bn = nn.BatchNorm2d(4)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.ReLU(), nn.Conv2d(4, 4, 1), bn).eval()
    with pytest.warns(UserWarning, match="called 2 times"):
        rec = export(m, (torch.randn(2, 3, 4, 4),), tmp_path / "m.onnx", dynamo=False)
    assert rec == {}


# --------------------------------------------------------------------------------------------
# the zoo (random weights)


def _zoo_model(name: str) -> nn.Module:
    if name == "efficientnet_b0":
        return _zoo.timm().create_model("efficientnet_b0", pretrained=False).eval()
    return getattr(_zoo.torchvision().models, name)(weights=None).eval()


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize(
    "name", ["resnet50", "mobilenet_v3_large", "densenet121", "efficientnet_b0"]
)
def test_zoo_record_is_the_set_of_folded_convs(name, dynamo, tmp_path):
    m = _zoo_model(name)
    x = torch.randn(1, 3, 96, 96)
    truth = _truth(m, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = export(m, (x,), tmp_path / "m.onnx", dynamo=dynamo)
    assert set(rec) == set(truth)
    assert {k for k, r in rec.items() if r.op == "Conv"} == {k for k, f in truth.items() if f}
    assert {r.op for k, r in rec.items() if not truth[k]} <= {"BatchNormalization"}
    if name == "mobilenet_v3_large":
        assert {r.eps for r in rec.values()} == {1e-3}
