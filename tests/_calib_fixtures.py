"""Shared helpers for the recalibration tests: tiny ONNX graphs, a trained digits model,
and slow reference computations."""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np


def onnx_cnn(
    opset: int = 15,
    *,
    seed: int = 0,
    shared: bool = False,
    stats_as_inputs: bool = False,
    batch: int | str = "N",
    ir_version: int | None = None,
    c1: int = 4,
    c2: int = 3,
) -> Any:
    """Conv -> BN -> Relu -> Conv -> BN on (batch, 2, 6, 6) float32 input, built with onnx.helper.

    ``shared``: both BN nodes read the same ``mean`` and ``var`` initializers (needs c1 == c2),
    and the first one's ``var`` is also its ``scale`` (one initializer in two slots).
    ``stats_as_inputs``: the statistics are graph inputs instead of initializers.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    if shared:
        c2 = c1

    def init(name: str, a: np.ndarray) -> Any:
        return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)

    inits = [
        init("w1", rng.normal(0, 0.5, (c1, 2, 3, 3))),
        init("b1", rng.normal(0, 0.2, c1)),
        init("g1", rng.uniform(0.5, 1.5, c1)),
        init("be1", rng.normal(0, 0.1, c1)),
        init("w2", rng.normal(0, 0.5, (c2, c1, 3, 3))),
        init("b2", rng.normal(0, 0.2, c2)),
        init("g2", rng.uniform(0.5, 1.5, c2)),
        init("be2", rng.normal(0, 0.1, c2)),
    ]
    stats = {
        "m1": rng.normal(0, 0.3, c1),
        "v1": rng.uniform(0.5, 2.0, c1),
        "m2": rng.normal(0, 0.3, c2),
        "v2": rng.uniform(0.5, 2.0, c2),
    }
    names = {"m1": "m1", "v1": "v1", "m2": "m2", "v2": "v2"}
    scale1 = "g1"
    if shared:
        names = {"m1": "m", "v1": "v", "m2": "m", "v2": "v"}
        stats = {"m": stats["m1"], "v": stats["v1"]}
        scale1 = "v"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 6, 6])]
    for k, v in stats.items():
        if stats_as_inputs:
            inputs.append(helper.make_tensor_value_info(k, TensorProto.FLOAT, [len(v)]))
        else:
            inits.append(init(k, v))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c1", scale1, "be1", names["m1"], names["v1"]],
            ["n1"],
            name="bn1",
            epsilon=1e-5,
        ),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node(
            "BatchNormalization",
            ["c2", "g2", "be2", names["m2"], names["v2"]],
            ["y"],
            name="bn2",
            epsilon=1e-3,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c2, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    default_ir = 4 if opset <= 9 else (8 if opset <= 17 else 10)
    model.ir_version = ir_version if ir_version is not None else default_ir
    onnx.checker.check_model(model)
    return model


def onnx_bn_inputs(path: str, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reference: per BN node, float64 mean and biased var of its input, running ``path`` in
    onnxruntime (statistics as stored) with the BN inputs added as outputs by hand."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = onnx.load(path)
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    for n in bns:
        m.graph.output.append(helper.make_tensor_value_info(n.input[0], TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run([n.input[0] for n in bns], {m.graph.input[0].name: x})
    ref = {}
    for n, a in zip(bns, outs, strict=True):
        a = a.astype(np.float64)
        axes = (0, *range(2, a.ndim))
        ref[n.name] = (a.mean(axis=axes), a.var(axis=axes))
    return ref


def onnx_stats(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per BN node, its stored (mean, var)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return {
        n.name: (inits[n.input[3]].astype(np.float64), inits[n.input[4]].astype(np.float64))
        for n in m.graph.node
        if n.op_type == "BatchNormalization"
    }


@functools.lru_cache(maxsize=1)
def _trained() -> tuple[Any, dict[str, Any], tuple[Any, ...]]:
    import torch

    from streamnorm import digits as D

    data = D.load_digits_nchw(seed=0)
    model = D.make_cnn(seed=0, width=8)
    with torch.random.fork_rng():
        D.train(model, data[0], data[1], epochs=2, batch_size=64, lr=0.1, seed=0)
    return model, copy.deepcopy(model.state_dict()), data


def trained_digits() -> tuple[Any, tuple[Any, ...]]:
    """A fresh copy of the small digits CNN (trained once per process) and the digits split."""
    from streamnorm import digits as D

    _, state, data = _trained()
    model = D.make_cnn(seed=0, width=8)
    model.load_state_dict(state)
    return model, data


def bn_input_moments(model: Any, x: Any, *, train_bn: bool = False) -> dict[str, Any]:
    """Reference: float64 mean and unbiased var of every BN layer's input, one full batch,
    in eval mode (``train_bn``: BN layers in training mode), via plain torch."""
    import torch

    from streamnorm.torch import bn_layers

    got: dict[str, Any] = {}

    def make(name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            a = args[0].detach().double()
            axes = (0, *range(2, a.ndim))
            got[name] = (a.mean(dim=axes).numpy(), a.var(dim=axes, unbiased=True).numpy())

        return hook

    layers = bn_layers(model)
    saved = copy.deepcopy(model.state_dict())
    was = model.training
    hs = [m.register_forward_pre_hook(make(n)) for n, m in layers]
    try:
        model.eval()
        if train_bn:
            for _, m in layers:
                m.train()
        with torch.no_grad():
            model(torch.as_tensor(x))
    finally:
        for h in hs:
            h.remove()
        model.train(was)
        model.load_state_dict(saved)
    return got


def digits_arch() -> Any:
    """The architecture of :func:`trained_digits`, for ``--arch _calib_fixtures:digits_arch``."""
    from streamnorm import digits as D

    return D.make_cnn(seed=0, width=8)


#: for the CLI test of an --arch that names something not callable
NOT_A_BUILDER = 3
