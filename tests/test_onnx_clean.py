"""Recalibrated ONNX files carry no dead weight: the old statistics and weights whose readers
got copies of their own (``Constant`` nodes, ``Identity`` chains, shared initializers) are
dropped, the file keeps its size, and onnxruntime loads it without a warning."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import _zoo  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from streamnorm.onnx import recalibrate  # noqa: E402

_LOAD = (
    "import sys, onnxruntime as ort; "
    "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"
)


def _const(name: str, a: np.ndarray) -> object:
    t = numpy_helper.from_array(np.asarray(a, np.float32), f"{name}.value")
    return helper.make_node("Constant", [], [name], name=f"{name}.const", value=t)


def _model() -> object:
    """Conv -> BN (mean a Constant, var an Identity of a Constant) -> Relu -> Conv (weight and
    bias Constants) -> Relu -> Conv -> BN -> BN (both reading the same mean and var
    initializers; all three BNs share their scale and bias)."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.normal(0, 0.3, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "g"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "be"),
        numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.normal(0, 0.2, 8).astype(np.float32), "ms"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "vs"),
    ]
    nodes = [
        _const("w1", rng.normal(0, 0.3, (8, 4, 3, 3))),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        _const("m1", rng.normal(0, 0.2, 8)),
        _const("v1raw", rng.uniform(0.5, 2, 8)),
        helper.make_node("Identity", ["v1raw"], ["v1"], name="v1.identity"),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "m1", "v1"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        _const("w2", rng.normal(0, 0.2, (8, 8, 3, 3))),
        _const("b2", rng.normal(0, 0.2, 8)),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c3", "g", "be", "ms", "vs"], ["n3"], name="bn2"),
        helper.make_node("BatchNormalization", ["n3", "g", "be", "ms", "vs"], ["y"], name="bn3"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _dead(model: object) -> tuple[list[str], list[str]]:
    """Nodes without side effects whose outputs nothing reads; initializers nothing reads."""
    g = model.graph
    reads = Counter(i for n in g.node for i in n.input)
    reads.update(o.name for o in g.output)
    nodes = [
        n.name
        for n in g.node
        if n.op_type in ("Constant", "Identity") and not any(reads[o] for o in n.output)
    ]
    return nodes, [t.name for t in g.initializer if not reads[t.name]]


def _warnings(path: pathlib.Path) -> list[str]:
    """What onnxruntime prints (default severity: warnings) loading ``path`` in a new process."""
    r = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path)], capture_output=True, text=True, check=True
    )
    return r.stderr.splitlines()


def _metadata_bytes(path: pathlib.Path) -> int:
    return sum(len(p.key) + len(p.value) for p in onnx.load(str(path)).metadata_props)


def test_constant_and_shared_statistics_leave_nothing_behind(tmp_path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_model(), str(src))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 4, 6, 6)).astype(np.float32)
    out = tmp_path / "out.onnx"
    recalibrate(src, 2 * x + 1, out, source=x, layers=["conv2"], batch_size=8, progress=False)
    m = onnx.load(str(out))
    assert _dead(m) == ([], [])
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops == {"Conv": 3, "BatchNormalization": 3, "Relu": 2, "Constant": 1}  # conv1's w1
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    # the scale and bias stay shared; every node has statistics of its own
    assert {(n.input[1], n.input[2]) for n in bns} == {("g", "be")}
    assert len({n.input[k] for n in bns for k in (3, 4)}) == 6
    grown = os.path.getsize(out) - _metadata_bytes(out)
    assert abs(grown / os.path.getsize(src) - 1) < 0.03
    assert _warnings(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["det", "rec", "cls"])
def test_paddleocr_files_keep_their_size_and_load_quietly(name, tmp_path) -> None:
    """paddle2onnx stores every weight as a Constant node: a copy for a recalibrated layer must
    not leave the original behind (the rec file grew 10.9 -> 15.9 MB, the cls file made
    onnxruntime print 70 'Removing initializer' warnings)."""
    path = pathlib.Path(_zoo.paddleocr_model(name))
    shape = {"det": (3, 64, 64), "rec": (3, 48, 64), "cls": (3, 48, 192)}[name]
    x = np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)
    assert _warnings(path) == []
    out = tmp_path / "out.onnx"
    recalibrate(path, 2 * x + 0.5, out, source=x, batch_size=8, progress=False)
    # the source moments (source=) are new content; the rest keeps its size
    grown = os.path.getsize(out) - _metadata_bytes(out)
    assert abs(grown / os.path.getsize(path) - 1) < 0.03
    assert _dead(onnx.load(str(out))) == ([], [])
    assert _warnings(out) == []
