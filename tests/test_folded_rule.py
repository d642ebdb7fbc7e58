"""Which Conv / Gemm layers of an ONNX graph the default rule takes as folded BatchNorms
(streamnorm.onnx._rule): one small hand-built graph per case, --exclude / exclude=, the refusal
of a partial recalibration, the report's counts, and precision / recall on the zoo (slow)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from streamnorm.cli import main  # noqa: E402
from streamnorm.onnx import annotate, folded_layers, recalibrate  # noqa: E402
from streamnorm.onnx._folded import default_layers  # noqa: E402

C = 4
RNG = np.random.default_rng(0)


class _Builder:
    """A graph on input ``x`` (N, C, 6, 6): nodes, and weights as initializers or, with
    ``constants=True``, as Constant nodes (paddle2onnx's way)."""

    def __init__(self, constants: bool = False) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.constants = constants
        self.k = 0

    def const(self, value: np.ndarray, name: str | None = None) -> str:
        self.k += 1
        name = name or f"k{self.k}"
        t = numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
        if self.constants:
            self.nodes.append(helper.make_node("Constant", [], [name], value=t))
        else:
            self.inits.append(t)
        return name

    def add(self, op: str, inputs: list[str], name: str = "", **attrs) -> str:
        self.k += 1
        out = f"t{self.k}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, name: str, c_in: int = C, c_out: int = C, bias: bool = True) -> str:
        w = self.const(0.3 * RNG.standard_normal((c_out, c_in, 1, 1)))
        ins = [x, w] + ([self.const(0.1 * RNG.standard_normal(c_out))] if bias else [])
        return self.add("Conv", ins, name)

    def model(self, out: str, out_shape: list | None = None, opset: int = 15) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], ["y"]))
        g = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 6, 6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape or ["N", C, 6, 6])],
            self.inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        onnx.checker.check_model(m)
        return m


def _verdicts(model: onnx.ModelProto) -> dict[str, tuple[bool, str]]:
    return {c.name: (c.chosen, c.reason) for c in folded_layers(model)}


def _taken(model: onnx.ModelProto) -> set[str]:
    """The default selection, through the function recalibrate and annotate use."""
    return {model.graph.node[i].name for i in default_layers(model)}


def _se(b: _Builder, x: str, tag: str, reduce: str = "GlobalAveragePool") -> str:
    """x * sigmoid(conv(relu(conv(pool(x))))): a squeeze-excitation block."""
    if reduce == "ReduceMean":
        p = b.add("ReduceMean", [x], axes=[2, 3], keepdims=1)
    else:
        p = b.add("GlobalAveragePool", [x])
    s = b.add("Relu", [b.conv(p, f"{tag}.fc1", C, 2)])
    g = b.add("HardSigmoid", [b.conv(s, f"{tag}.fc2", 2, C)])
    return b.add("Mul", [x, g])


# ------------------------------------------------------------------------------------------
# one graph per case


def test_conv_mul_add_relu_with_constant_node_weights_is_taken() -> None:
    """paddle2onnx: weights as Constant nodes, a per-channel (and a scalar) affine between the
    Conv and its activation; a decomposed HardSwish (Add 3 -> Clip) after it."""
    b = _Builder(constants=True)
    c = b.conv("x", "conv_affine")
    a = b.add("Mul", [c, b.const(RNG.standard_normal((1, C, 1, 1)))])
    a = b.add("Add", [a, b.const(RNG.standard_normal((C, 1, 1)))])
    r = b.add("Relu", [a])
    c2 = b.conv(r, "conv_scalar")
    a2 = b.add("Add", [b.add("Mul", [c2, b.const([1.5])]), b.const([0.2])])
    h = b.add("Clip", [b.add("Add", [a2, b.const(3.0)]), b.const(0.0), b.const(6.0)])
    m = b.model(b.add("Mul", [a2, h]))
    v = _verdicts(m)
    assert v["conv_affine"] == (True, "Conv -> Mul/Add -> Relu")
    assert v["conv_scalar"] == (True, "Conv -> Mul/Add -> Clip")
    assert _taken(m) == {"conv_affine", "conv_scalar"}


def test_a_spatial_mul_is_no_affine() -> None:
    """A Mul by a constant that varies over space is not a per-channel affine."""
    b = _Builder()
    c = b.conv("x", "conv")
    r = b.add("Relu", [b.add("Mul", [c, b.const(RNG.standard_normal((1, 1, 6, 6)))])])
    m = b.model(r)
    assert not _verdicts(m)["conv"][0]


def test_conv_feeding_a_residual_add_is_taken() -> None:
    """x + conv2(relu(conv1(x))): conv2 ends a residual branch (Conv-BN, then the Add)."""
    b = _Builder()
    r = b.add("Relu", [b.conv("x", "conv1")])
    s = b.add("Add", [b.conv(r, "conv2"), "x"])
    m = b.model(b.add("Relu", [s]))
    v = _verdicts(m)
    assert v["conv2"] == (True, "Conv -> residual Add")
    assert _taken(m) == {"conv1", "conv2"}


def test_conv_on_the_skip_side_of_an_add_is_not_taken() -> None:
    """c + c * se(c) (PP-OCR's RSE layer): the Add does not end a residual branch of c."""
    b = _Builder()
    c = b.conv("x", "in_conv")
    m = b.model(b.add("Add", [c, _se(b, c, "se")]))
    chosen, why = _verdicts(m)["in_conv"]
    assert not chosen and "skip side" in why


@pytest.mark.parametrize("reduce", ["GlobalAveragePool", "ReduceMean"])
def test_squeeze_excitation_convs_are_not_taken(reduce: str) -> None:
    """GlobalAveragePool / ReduceMean -> Conv -> Relu -> Conv -> HardSigmoid -> Mul."""
    b = _Builder()
    r = b.add("Relu", [b.conv("x", "conv")])
    m = b.model(_se(b, r, "se", reduce))
    v = _verdicts(m)
    for name in ("se.fc1", "se.fc2"):
        assert v[name] == (False, "after global pooling (squeeze-excitation or classifier)")
    assert _taken(m) == {"conv"}


def test_a_bn_conv_before_a_squeeze_excitation_is_taken() -> None:
    """Conv-BN (no activation) -> SE -> Conv-BN-act: the SE gate is a per-channel scale."""
    b = _Builder()
    c = b.conv("x", "dw")
    g = _se(b, c, "se")
    m = b.model(b.add("Relu", [b.conv(g, "pw")]))
    assert _verdicts(m)["dw"][0]
    assert _taken(m) == {"dw", "pw"}


def test_classifier_gemms_are_not_taken() -> None:
    """GlobalAveragePool -> Flatten -> Gemm -> HardSwish -> Gemm -> graph output
    (MobileNetV3's classifier), and a Gemm -> Softmax."""
    b = _Builder()
    r = b.add("Relu", [b.conv("x", "conv")])
    f = b.add("Flatten", [b.add("GlobalAveragePool", [r])])
    h = b.add(
        "HardSwish",
        [
            b.add(
                "Gemm",
                [f, b.const(RNG.standard_normal((8, C))), b.const(np.zeros(8))],
                "fc1",
                transB=1,
            )
        ],
    )
    logits = b.add("Gemm", [h, b.const(RNG.standard_normal((8, 3))), b.const(np.zeros(3))], "fc2")
    m = b.model(b.add("Softmax", [logits]), ["N", 3])
    v = _verdicts(m)
    assert v["fc1"] == (False, "after global pooling (squeeze-excitation or classifier)")
    assert v["fc2"][0] is False
    assert _taken(m) == {"conv"}
    b = _Builder()  # a head straight to the graph output
    m = b.model(b.conv(b.add("Relu", [b.conv("x", "conv")]), "head"))
    assert _verdicts(m)["head"] == (False, "feeds the graph output (a head or classifier)")


def test_conv_before_a_batchnorm_node_or_without_bias_is_not_taken() -> None:
    b = _Builder()
    stats = [b.const(np.ones(C)), b.const(np.zeros(C)), b.const(np.zeros(C)), b.const(np.ones(C))]
    bn = b.add("BatchNormalization", [b.conv("x", "conv_bn"), *stats])
    r = b.add("Relu", [bn])
    m = b.model(b.add("Relu", [b.conv(r, "nobias", bias=False)]))
    v = _verdicts(m)
    assert not v["conv_bn"][0] and "BatchNormalization node follows" in v["conv_bn"][1]
    assert not v["nobias"][0] and "no bias" in v["nobias"][1]
    assert _taken(m) == set()


def test_linear_bottleneck_depends_on_the_next_conv() -> None:
    """Conv -> Conv-act: a linear bottleneck (taken); Conv -> Conv without BatchNorm (a neck's
    projection before a bias-free Conv): not taken."""
    b = _Builder()
    p = b.conv("x", "project")
    e = b.add("Relu", [b.conv(p, "expand")])
    lateral = b.conv(e, "lateral")
    m = b.model(b.add("Add", [b.conv(lateral, "neck", bias=False), e]))
    v = _verdicts(m)
    assert v["project"] == (True, "Conv -> Conv (linear bottleneck: a Conv-BN block follows)")
    assert not v["lateral"][0] and "'neck'" in v["lateral"][1]
    assert _taken(m) == {"project", "expand"}


def test_unnamed_nodes_are_shown_by_their_output_name() -> None:
    b = _Builder()
    m = b.model(b.add("Relu", [b.conv("x", "")]))
    (choice,) = folded_layers(m)
    assert choice.name == m.graph.node[0].output[0] and choice.chosen


# ------------------------------------------------------------------------------------------
# layers= / exclude=, the refusal of a partial recalibration, the report


def _bn_and_folded(tmp_path: pathlib.Path) -> pathlib.Path:
    """x -> conv1 -> Relu -> conv2 -> BatchNormalization -> Relu -> conv3 -> Relu."""
    b = _Builder()
    r = b.add("Relu", [b.conv("x", "conv1")])
    stats = [
        b.const(np.ones(C)),
        b.const(np.zeros(C)),
        b.const(np.zeros(C)),
        b.const(np.ones(C)),
    ]
    bn = b.add("BatchNormalization", [b.conv(r, "conv2", bias=False), *stats], "bn")
    r = b.add("Relu", [b.conv(b.add("Relu", [bn]), "conv3")])
    path = tmp_path / "m.onnx"
    onnx.save(b.model(r), str(path))
    return path


def _data(n: int = 64, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(int(shift * 10))
    return (rng.standard_normal((n, C, 6, 6)) + shift).astype(np.float32)


def test_exclude_and_layers(tmp_path) -> None:
    path = _bn_and_folded(tmp_path)
    assert [c.name for c in folded_layers(path) if c.chosen] == ["conv1", "conv3"]
    v = {c.name: c for c in folded_layers(path, exclude=["conv1"])}
    assert not v["conv1"].chosen and v["conv1"].reason == "excluded by name"
    assert v["conv3"].chosen
    conv3_out = next(n.output[0] for n in onnx.load(str(path)).graph.node if n.name == "conv3")
    out = folded_layers(path, layers=["conv2", "conv3"], exclude=[conv3_out])  # an output name
    assert {c.name for c in out if c.chosen} == {"conv2"}
    # a BatchNorm node in exclude keeps its statistics (recalibrate); the Conv choice ignores it
    assert {c.name for c in folded_layers(path, exclude=["bn"]) if c.chosen} == {"conv1", "conv3"}
    with pytest.raises(ValueError, match="layers names Conv or Gemm nodes"):
        folded_layers(path, layers=["bn"])
    r = recalibrate(path, _data(shift=1), tmp_path / "o.onnx", source=_data(), exclude=["conv1"])
    assert [(x.name, x.kind) for x in r.layers] == [("bn", "BatchNorm"), ("conv3", "folded")]
    measured = annotate(path, _data(), tmp_path / "a.onnx", exclude=["conv3"], progress=False)
    assert list(measured) == ["conv1"]


def test_partial_recalibration_is_refused_with_the_fixes(tmp_path, capsys) -> None:
    path = _bn_and_folded(tmp_path)
    with pytest.raises(ValueError, match="no source moments") as e:
        recalibrate(path, _data(shift=1), tmp_path / "o.onnx", progress=False)
    assert "bn_only=True" in str(e.value) and "source=" in str(e.value)
    assert not (tmp_path / "o.onnx").exists()
    np.save(tmp_path / "tgt.npy", _data(shift=1))
    np.save(tmp_path / "src.npy", _data())
    args = ["calibrate", str(path), "--data", str(tmp_path / "tgt.npy"), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "o.onnx")]) == 2
    captured = capsys.readouterr()
    assert "--bn-only" in captured.err and "--source" in captured.err
    assert "streamnorm annotate MODEL --data SOURCE --out OUT" in captured.err
    assert "+ conv1" in captured.out and "- conv2" in captured.out  # the choice, listed
    assert not (tmp_path / "o.onnx").exists()
    # partial on purpose
    assert main([*args, "--out", str(tmp_path / "o.onnx"), "--bn-only"]) == 0
    out = capsys.readouterr().out
    assert "recalibrated 1 " in out
    # both kinds, counted apart
    rc = main([*args, "--out", str(tmp_path / "o2.onnx"), "--source", str(tmp_path / "src.npy")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "layers: 1 BatchNorm node(s), 2 folded Conv / Gemm layer(s)" in out
    assert "kind" in out and "folded" in out


def test_annotate_and_calibrate_show_the_same_names(tmp_path, capsys) -> None:
    path = _bn_and_folded(tmp_path)
    m = onnx.load(str(path))
    m.graph.node[[n.name for n in m.graph.node].index("conv3")].name = ""  # unnamed
    onnx.save(m, str(path))
    np.save(tmp_path / "src.npy", _data())
    np.save(tmp_path / "tgt.npy", _data(shift=1))
    a = tmp_path / "a.onnx"
    base = ["--no-progress", "--exclude", "conv1"]
    assert (
        main(["annotate", str(path), "--data", str(tmp_path / "src.npy"), "--out", str(a), *base])
        == 0
    )
    annotated = capsys.readouterr().out
    o = tmp_path / "o.onnx"
    assert (
        main(
            [
                "calibrate",
                str(a),
                "--data",
                str(tmp_path / "tgt.npy"),
                "--out",
                str(o),
                "--no-progress",
            ]
        )
        == 0
    )
    calibrated = capsys.readouterr().out
    name = next(n.output[0] for n in m.graph.node if n.op_type == "Conv" and not n.name)
    assert f"{name}: {C} channels" in annotated
    assert f"+ {name}" in calibrated and f"\n{name} " in calibrated


# ------------------------------------------------------------------------------------------
# the zoo


def _bench() -> object:
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "folded_rule.py"
    spec = importlib.util.spec_from_file_location("folded_rule_bench", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.parametrize("name", ["det", "rec", "cls"])
def test_paddleocr_precision_and_recall(name: str) -> None:
    import _zoo

    bench = _bench()
    path = _zoo.paddleocr_model(name)
    truth = bench.paddle_truth(path)
    assert len(truth) == {"det": 28, "rec": 28, "cls": 0}[name]
    assert bench.new_rule(path) == truth


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["resnet50", "mobilenet_v3_large", "densenet121", "efficientnet_b0"]
)
def test_torch_zoo_precision_and_recall(name: str, tmp_path) -> None:
    import _zoo

    _zoo.timm() if name == "efficientnet_b0" else _zoo.torchvision()
    bench = _bench()
    folded, unfolded = bench.torch_exports(name, str(tmp_path))
    truth = bench.torch_truth(folded, unfolded)
    assert truth and bench.new_rule(folded) == truth
    os.remove(unfolded)
    assert sys.modules.get("onnx") is not None


def test_annotate_a_model_with_batchnorm_nodes_only(tmp_path) -> None:
    """Nothing looks folded, every BatchNorm is a node: annotate writes an empty annotation,
    and calibrate then recalibrates the nodes (no refusal, no source needed)."""
    b = _Builder()
    stats = [b.const(np.ones(C)), b.const(np.zeros(C)), b.const(np.zeros(C)), b.const(np.ones(C))]
    bn = b.add("BatchNormalization", [b.conv("x", "conv", bias=False), *stats], "bn")
    path = tmp_path / "m.onnx"
    onnx.save(b.model(b.add("Relu", [bn])), str(path))
    assert annotate(path, _data(), tmp_path / "a.onnx", progress=False) == {}
    r = recalibrate(tmp_path / "a.onnx", _data(shift=1), tmp_path / "o.onnx", progress=False)
    assert r.kinds == {"BatchNorm": 1}
    b = _Builder()  # neither: nothing to annotate
    onnx.save(b.model(b.add("Relu", [b.conv("x", "conv", bias=False)])), str(path))
    with pytest.raises(ValueError, match="no Conv / Gemm layer that looks like a folded"):
        annotate(path, _data(), tmp_path / "b.onnx", progress=False)
    assert not (tmp_path / "b.onnx").exists()
