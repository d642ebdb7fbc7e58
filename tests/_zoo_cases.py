"""The zoo's networks and the checks run on them, shared by ``tests/test_zoo.py`` and
``bench/zoo.py``.

Every network is built with random weights (:mod:`_zoo` downloads nothing); the BatchNorm
scales and shifts are drawn at random too, so that no layer is the identity. The checks:

- :func:`bn_stats` / :func:`reference_stats`: the statistics a recalibration wrote, and the
  slow reference (every BatchNorm input collected by hooks, mean and unbiased variance in
  float64 over all of them);
- :func:`onnx_error`: export a model whose BatchNorm statistics are the population statistics
  of the source data, annotate it on the source data, recalibrate it on shifted data, and
  compare its output with the PyTorch model recalibrated sequentially on the same shifted data.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _zoo
import numpy as np


@dataclass(frozen=True)
class Case:
    """One network of the zoo.

    Attributes
    ----------
    name : str
    build : callable
        ``build(torchvision, timm) -> torch.nn.Module`` with random weights.
    size : int
        Height and width of the inputs.
    onnx : bool
        Whether the ONNX path is checked (inception's 299 x 299 inputs make it slow).
    """

    name: str
    build: Callable[[Any, Any], Any]
    size: int = 64
    onnx: bool = True


def _mixed_evonorm(tv: Any, timm: Any) -> Any:
    """timm's regnety_002 with every other BatchNorm (and its activation) replaced by an
    ``EvoNorm2dS0``: a network where norm layers streamnorm must leave alone sit between the
    ones it recalibrates."""
    model = timm.create_model("regnety_002", pretrained=False)
    bns = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, timm.layers.BatchNormAct2d) and m.num_features % 8 == 0
    ]
    for name, m in bns[::2]:
        parent = model.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], timm.layers.EvoNorm2dS0(m.num_features, groups=8))
    return model


CASES = [
    Case("tv_resnet50", lambda tv, timm: tv.models.resnet50(weights=None)),
    Case("tv_mobilenet_v3_large", lambda tv, timm: tv.models.mobilenet_v3_large(weights=None)),
    Case("tv_densenet121", lambda tv, timm: tv.models.densenet121(weights=None)),
    # stochastic depth off: update_bn runs it in training mode, recalibrate in eval mode
    Case(
        "tv_efficientnet_b0",
        lambda tv, timm: tv.models.efficientnet_b0(weights=None, stochastic_depth_prob=0.0),
    ),
    Case("timm_efficientnet_b0", lambda tv, timm: timm.create_model("efficientnet_b0")),
    Case("timm_mobilenetv3_large_100", lambda tv, timm: timm.create_model("mobilenetv3_large_100")),
    Case("timm_cs3darknet_s", lambda tv, timm: timm.create_model("cs3darknet_s")),
    Case("timm_regnety_002", lambda tv, timm: timm.create_model("regnety_002")),
    Case("timm_regnety_002_evonorm", _mixed_evonorm),
    # the auxiliary head needs 299 x 299 inputs (a 17 x 17 map before its 5 x 5 convolution)
    Case(
        "timm_inception_v3_aux",
        lambda tv, timm: timm.create_model("inception_v3", aux_logits=True),
        size=299,
        onnx=False,
    ),
]

BY_NAME = {c.name: c for c in CASES}


def build(case: Case, seed: int = 0, eps: float | None = None) -> Any:
    """The network of ``case`` in eval mode, random weights and BatchNorm affines from ``seed``;
    with ``eps``, every BatchNorm's epsilon set to it."""
    import torch

    tv = _zoo.torchvision()
    timm = _zoo.timm()
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = case.build(tv, timm)
        for m in bn_layers(model).values():
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
            if eps is not None:
                m.eps = eps
    return model.eval()


def bn_layers(model: Any) -> dict[str, Any]:
    """The ``_BatchNorm`` modules of ``model`` by name."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def data(n: int, size: int, seed: int = 0) -> tuple[Any, Any]:
    """``(source, shifted)``: ``n`` samples of shape (3, size, size); the shifted set is
    ``1.5 x + 0.5`` of other draws."""
    import torch

    g = torch.Generator().manual_seed(seed)
    src = torch.randn(n, 3, size, size, generator=g)
    tgt = 1.5 * torch.randn(n, 3, size, size, generator=g) + 0.5
    return src, tgt


def bn_stats(model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``running_mean`` and ``running_var`` of every BatchNorm layer, as float64 arrays."""
    return {
        n: (
            m.running_mean.detach().double().numpy().copy(),
            m.running_var.detach().double().numpy().copy(),
        )
        for n, m in bn_layers(model).items()
    }


def reference_stats(model: Any, batches: list[Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The population statistics of one pass, the slow way: BatchNorm layers in training mode
    (batch statistics), everything else in eval mode, every layer's input kept, and the mean and
    unbiased variance per channel computed in float64 over all of them at the end."""
    import torch

    layers = bn_layers(model)
    seen: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    handles = []
    for name, m in layers.items():

        def keep(mod: Any, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0].detach().double().numpy()
            seen[name].append(np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]))

        handles.append(m.register_forward_pre_hook(keep))
    model.eval()
    for m in layers.values():
        m.train()
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in handles:
            h.remove()
        model.eval()
    out = {}
    for name, parts in seen.items():
        if not parts:
            continue
        x = np.concatenate(parts)
        out[name] = (x.mean(axis=0), x.var(axis=0, ddof=1))
    return out


def worst_relative(
    got: dict[str, tuple[np.ndarray, np.ndarray]], want: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[float, str]:
    """The largest ``max|got - want| / max|want|`` over the layers, means and variances apart,
    and the layer where it is (layers of ``want`` only)."""
    worst, where = 0.0, ""
    for name, (wm, wv) in want.items():
        gm, gv = got[name]
        for g, w, what in ((gm, wm, "mean"), (gv, wv, "var")):
            scale = max(float(np.max(np.abs(w))), 1e-12)
            err = float(np.max(np.abs(g - w))) / scale
            if err > worst:
                worst, where = err, f"{name}.{what}"
    return worst, where


# --------------------------------------------------------------------------------------------
# the ONNX path


def export(model: Any, example: Any, path: str, how: str = "torch") -> None:
    """Write ``model`` (eval mode) to ``path`` with a dynamic batch dimension.

    ``how="torch"``: ``torch.onnx.export`` (TorchScript exporter, which folds every BatchNorm
    after a Conv into the Conv); ``how="streamnorm"``: ``streamnorm.onnx.export``.
    """
    import torch

    model = copy.deepcopy(model).eval()
    kwargs: dict[str, Any] = {
        "dynamo": False,
        "input_names": ["x"],
        "output_names": ["y"],
        "dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "streamnorm":
            import streamnorm.onnx

            streamnorm.onnx.export(model, (example,), path, **kwargs)
        else:
            torch.onnx.export(model, (example,), path, **kwargs)


def run_onnx(path: str, x: np.ndarray) -> np.ndarray:
    """The first output of the ONNX model at ``path`` on ``x``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def first_output(y: Any) -> np.ndarray:
    if isinstance(y, (tuple, list)):
        y = y[0]
    return y.detach().numpy()


@dataclass
class OnnxResult:
    """What :func:`onnx_error` measured: the relative error of the recalibrated ONNX model's
    output against the PyTorch recalibration, and of the unadapted one (for scale)."""

    error: float
    unadapted: float
    bn_nodes: int
    convs: int


def onnx_error(
    model: Any, src: Any, tgt: Any, how: str = "torch", batch_size: int = 4
) -> OnnxResult:
    """Relative error ``||y_onnx - y_torch|| / ||y_torch||`` on ``tgt`` of the ONNX path
    (export, ``annotate`` on ``src``, ``recalibrate`` on ``tgt``, defaults) against
    ``model`` recalibrated sequentially on ``tgt`` and run in eval mode.

    ``model`` is first recalibrated sequentially on ``src`` (a copy), so that its statistics are
    the exact population statistics of the source data, as the ONNX path assumes.
    """
    import onnx
    import torch

    import streamnorm.onnx
    import streamnorm.torch

    base = copy.deepcopy(model).eval()
    streamnorm.torch.recalibrate(
        base, src, mode="sequential", batch_size=batch_size, progress=False
    )
    ref = copy.deepcopy(base)
    streamnorm.torch.recalibrate(ref, tgt, mode="sequential", batch_size=batch_size, progress=False)
    with torch.no_grad():
        want = first_output(ref.eval()(tgt))
        before = first_output(base(tgt))
    with tempfile.TemporaryDirectory() as d:
        raw, ann, out = (os.path.join(d, f) for f in ("m.onnx", "a.onnx", "c.onnx"))
        export(base, src[:1], raw, how)
        graph = onnx.load(raw).graph
        nbn = sum(n.op_type == "BatchNormalization" for n in graph.node)
        nconv = sum(n.op_type == "Conv" for n in graph.node)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            streamnorm.onnx.annotate(raw, src.numpy(), ann, batch_size=batch_size, progress=False)
            streamnorm.onnx.recalibrate(
                ann, tgt.numpy(), out, batch_size=batch_size, progress=False
            )
        got = run_onnx(out, tgt.numpy())
    scale = float(np.linalg.norm(want))
    return OnnxResult(
        float(np.linalg.norm(got - want)) / scale,
        float(np.linalg.norm(before - want)) / scale,
        nbn,
        nconv,
    )


def folded_convs(model: Any, x: Any) -> list[int]:
    """Positions, in call order, of the Conv2d calls whose output goes straight into a
    BatchNorm layer (the Convs an exporter folds a BatchNorm into)."""
    import torch

    calls: list[Any] = []
    fed: set[int] = set()
    handles = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            handles.append(m.register_forward_hook(lambda mod, a, y: calls.append(y)))
    for m in bn_layers(model).values():
        handles.append(m.register_forward_pre_hook(lambda mod, a: fed.add(id(a[0]))))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return [i for i, y in enumerate(calls) if id(y) in fed]
