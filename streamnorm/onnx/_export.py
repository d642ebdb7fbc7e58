"""Export a PyTorch model to ONNX with a record of where each of its BatchNorms went.

``torch.onnx.export`` in eval mode folds a BatchNorm that follows a Conv (and, with the dynamo
exporter of torch 2.9 and later, one that follows a Linear) into that layer's weight and bias,
``eps`` included; the others stay ``BatchNormalization`` nodes. :func:`export` exports the
model and records, for every BatchNorm module, the node that carries it and the module's
``eps``, weight, bias and running statistics at export, in the model's metadata (key
``"streamnorm.batchnorms"``, see :class:`~streamnorm.onnx._metadata.BatchNormRecord`).
:func:`streamnorm.onnx.recalibrate` then adapts a folded layer exactly as recalibrating the
BatchNorm before export would, ``eps`` included, with no source data and no guess at which
Conv layers were folded.

How modules are matched to nodes
--------------------------------
By value, independent of the exporter and of its node names: the model runs once in PyTorch on a
random probe of the shapes of ``args``, and each BatchNorm module's output is computed (float64)
from the input it received; the exported graph runs on the same probe with every Conv, Gemm and
BatchNormalization output exposed. A module is carried by the node whose output equals its
output (relative RMS difference below :data:`TOL`); a ``BatchNormalization`` node wins over a
Conv before it (a BatchNorm with fresh statistics is almost the identity), and a module that
matches two nodes of the same kind, or a node matched by two modules, is an error.

A module whose output no such node carries, but whose input is the output of a Conv / Gemm read
by nothing else, was exported as other operators after that node (torchvision's
``FrozenBatchNorm2d`` becomes ``Mul`` / ``Add``): it is recorded at the node's *input* site
(``site="input"``), and recalibration adapts the node so that those operators, which keep the
exported statistics, output what the recalibrated BatchNorm would.

Not handled (left out of the record, with a warning; recalibration treats their nodes as it
treats those of any ONNX model): a BatchNorm module called more than once in a forward pass
(shared), and one found in neither way. A BatchNorm with
``track_running_stats=False`` has no statistics and is not a BatchNorm module here. Keyword
inputs (``kwargs=``) are refused: the probe feeds ``args`` only.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .._errors import InputError, InputTypeError
from .._extras import require
from .._io import check_output
from . import _metadata as meta
from ._files import load, save
from ._graph import calibration_model

__all__ = ["TOL", "export"]

#: relative RMS difference below which a node's output is a BatchNorm module's output
TOL = 1e-3

#: a second candidate within this factor of the best one makes a match ambiguous
_MARGIN = 20.0


@dataclass
class _Seen:
    """One BatchNorm module and the inputs it received during the probe run."""

    name: str
    module: Any
    inputs: list[Any]


def _is_norm(m: Any, torch: Any) -> bool:
    """A module normalizing per channel with stored statistics: ``running_mean`` and
    ``running_var`` tensors of one shape (C,) and a numeric ``eps`` (every ``_BatchNorm``,
    timm's ``BatchNormAct2d``, torchvision's ``FrozenBatchNorm2d``)."""
    rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    eps = getattr(m, "eps", None)
    return (
        isinstance(rm, torch.Tensor)
        and isinstance(rv, torch.Tensor)
        and rm.ndim == 1
        and rm.shape == rv.shape
        and isinstance(eps, (int, float))
        and not isinstance(eps, bool)
    )


def _param(m: Any, name: str, c: int, fill: float) -> np.ndarray:
    t = getattr(m, name, None)
    if t is None:
        return np.full(c, fill)
    return t.detach().cpu().double().numpy().reshape(-1).copy()


def _record(name: str, m: Any) -> meta.BatchNormRecord:
    """The module's eps, weight, bias and statistics (no node yet)."""
    mean = m.running_mean.detach().cpu().double().numpy().copy()
    var = m.running_var.detach().cpu().double().numpy().copy()
    c = mean.size
    return meta.BatchNormRecord(
        module=name,
        node="",
        output="",
        op="",
        eps=float(m.eps),
        gamma=_param(m, "weight", c, 1.0),
        beta=_param(m, "bias", c, 0.0),
        mean=mean,
        var=var,
    )


def _bn_output(x: Any, rec: meta.BatchNormRecord) -> np.ndarray:
    """The module's output on its input ``x`` (float64), channels on axis 1."""
    a = x.detach().cpu().double().numpy()
    shape = (1, -1) + (1,) * (a.ndim - 2)
    s = (rec.gamma / np.sqrt(rec.var + rec.eps)).reshape(shape)
    return (a - rec.mean.reshape(shape)) * s + rec.beta.reshape(shape)


def _as_tuple(args: Any, torch: Any) -> tuple[Any, ...]:
    if isinstance(args, torch.Tensor):
        return (args,)
    if not isinstance(args, tuple):
        raise InputTypeError(
            f"args must be a tensor or a tuple of model inputs, got {type(args).__name__}"
        )
    return args


def _probe(args: tuple[Any, ...], torch: Any) -> tuple[tuple[Any, ...], list[Any]]:
    """``args`` with every floating tensor replaced by standard normal values of its shape (a
    fixed seed), and the tensors in order (the exported graph's inputs)."""
    gen = torch.Generator().manual_seed(0)
    out, tensors = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_floating_point():
                a = torch.randn(a.shape, generator=gen).to(dtype=a.dtype, device=a.device)
            tensors.append(a)
        out.append(a)
    return tuple(out), tensors


def _run_torch(model: Any, probe: tuple[Any, ...], torch: Any) -> list[_Seen]:
    seen = [_Seen(n, m, []) for n, m in model.named_modules() if _is_norm(m, torch)]
    handles = []

    def hook(entry: _Seen) -> Any:
        def pre(module: Any, inputs: tuple[Any, ...]) -> None:
            entry.inputs.append(inputs[0].detach().clone() if inputs else None)

        return pre

    try:
        for s in seen:
            handles.append(s.module.register_forward_pre_hook(hook(s)))
        with torch.no_grad():
            model(*probe)
    finally:
        for h in handles:
            h.remove()
    return seen


def _run_onnx(model: Any, tensors: list[Any], nodes: list[Any]) -> dict[str, np.ndarray]:
    ort = require("onnxruntime")
    cal = calibration_model(model, [], exposed=[n.output[0] for n in nodes])
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != len(tensors):
        raise InputError(
            f"the exported graph has {len(names)} inputs ({names[:4]}) but args hold "
            f"{len(tensors)} tensors; export a model whose inputs are the tensors of args"
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(cal.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {k: t.detach().cpu().numpy() for k, t in zip(names, tensors, strict=True)}
    wanted = [n.output[0] for n in nodes]
    got = sess.run(wanted, feeds)
    return dict(zip(wanted, got, strict=True))


def _error(got: np.ndarray, want: np.ndarray) -> float:
    d = np.sqrt(np.mean((got.astype(np.float64) - want) ** 2))
    scale = np.sqrt(np.mean(want**2))
    return float(d / scale) if scale > 0 else (0.0 if d == 0 else float("inf"))


def _match(
    entry: _Seen, rec: meta.BatchNormRecord, nodes: list[Any], values: dict[str, np.ndarray]
) -> Any:
    """The node carrying ``entry`` (see the module docstring), or ``None``."""
    want = _bn_output(entry.inputs[0], rec)
    scored = []
    for n in nodes:
        v = values[n.output[0]]
        if v.shape == want.shape:
            scored.append((_error(v, want), n))
    for kind in (("BatchNormalization",), ("Conv", "Gemm")):
        hits = sorted(
            ((e, n) for e, n in scored if n.op_type in kind and e < TOL), key=lambda t: t[0]
        )
        if len(hits) > 1 and hits[1][0] < max(_MARGIN * hits[0][0], 1e-12):
            raise InputError(
                f"the output of BatchNorm {entry.name!r} matches several nodes "
                f"({[n.name for _, n in hits[:3]]}) on the probe; the mapping is ambiguous"
            )
        if hits:
            return hits[0][1]
    return None


def _match_input(
    entry: _Seen, nodes: list[Any], values: dict[str, np.ndarray], readers: dict[str, int]
) -> Any:
    """The Conv / Gemm whose output is ``entry``'s input and is read by one node only (the
    first of the operators the BatchNorm became), or ``None``."""
    want = entry.inputs[0].detach().cpu().double().numpy()
    hits = sorted(
        (
            (e, n)
            for n in nodes
            if n.op_type in ("Conv", "Gemm") and values[n.output[0]].shape == want.shape
            for e in [_error(values[n.output[0]], want)]
            if e < TOL
        ),
        key=lambda t: t[0],
    )
    if len(hits) > 1 and hits[1][0] < max(_MARGIN * hits[0][0], 1e-12):
        return None
    if not hits or readers.get(hits[0][1].output[0], 0) != 1:
        return None
    return hits[0][1]


def _map(
    model: Any, onnx_model: Any, probe: tuple[Any, ...], tensors: list[Any]
) -> tuple[list[meta.BatchNormRecord], list[str]]:
    """The records of the matched modules, and the names of the modules left out."""
    torch = require("torch")
    seen = _run_torch(model, probe, torch)
    g = onnx_model.graph
    nodes = [
        n for n in g.node if n.op_type in meta.CARRIERS and n.domain in ("", "ai.onnx") and n.output
    ]
    values = _run_onnx(onnx_model, tensors, nodes) if seen and nodes else {}
    readers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    for o in g.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    records: list[meta.BatchNormRecord] = []
    left: list[str] = []
    owner: dict[str, str] = {}
    for s in seen:
        if len(s.inputs) != 1 or s.inputs[0] is None:
            left.append(f"{s.name} (called {len(s.inputs)} times)")
            continue
        rec = _record(s.name, s.module)
        node, site = _match(s, rec, nodes, values), "output"
        if node is None:
            node, site = _match_input(s, nodes, values, readers), "input"
        if node is None:
            left.append(f"{s.name} (not found in a Conv / Gemm / BatchNormalization node)")
            continue
        if node.output[0] in owner:
            raise InputError(
                f"BatchNorms {owner[node.output[0]]!r} and {s.name!r} both match node "
                f"{node.name!r}; the mapping is ambiguous"
            )
        owner[node.output[0]] = s.name
        records.append(
            replace(rec, node=node.name, output=node.output[0], op=node.op_type, site=site)
        )
    return records, left


def export(
    model: Any, args: Any, path: str | os.PathLike[str], **export_kwargs: Any
) -> dict[str, meta.BatchNormRecord]:
    """Export a PyTorch model to ONNX and record in it where each BatchNorm module went.

    Runs ``torch.onnx.export(model, args, ...)`` in eval mode, finds for every BatchNorm module
    the node that carries it (a ``BatchNormalization`` node, or the Conv / Gemm it was folded
    into) and stores, per module, that node and the module's ``eps``, weight, bias and
    ``running_mean`` / ``running_var`` in the model's ``metadata_props`` (key
    ``"streamnorm.batchnorms"``). :func:`streamnorm.onnx.recalibrate` adapts the folded
    layers of such a file exactly, ``eps`` included, without source data.

    Parameters
    ----------
    model : torch.nn.Module
        Its BatchNorm modules: every module with ``running_mean`` / ``running_var`` tensors and
        an ``eps`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm's ``BatchNormAct2d``, ...).
        Exported in eval mode; its train/eval state comes back as it was, nothing else changes.
    args : torch.Tensor or tuple
        The example inputs of ``torch.onnx.export``. A random probe of the same shapes and
        dtypes runs once through the model and the exported graph to match modules to nodes.
    path : str or path-like
        The ``.onnx`` file, written atomically (tensors the exporter stored as external data go
        to ``path + ".data"``).
    **export_kwargs
        Passed to ``torch.onnx.export`` (``dynamo``, ``input_names``, ``dynamic_axes``,
        ``opset_version``, ...). ``training`` other than eval and ``kwargs`` (keyword
        inputs) are refused.

    Returns
    -------
    dict of str to BatchNormRecord
        Per recorded module name: its node (``node``, ``output``, ``op``) and parameters.

    Raises
    ------
    TypeError
        ``model`` is not a ``torch.nn.Module``, ``path`` not a path, ``args`` neither a tensor
        nor a tuple.
    ValueError
        A folder or unwritable output path, ``f``, ``kwargs`` or a training mode in
        ``export_kwargs``, a graph whose inputs are not the tensors of ``args``, an ambiguous match.

    Warns
    -----
    UserWarning
        BatchNorm modules left out of the record (see the module docstring): recalibration
        treats their nodes as those of any ONNX model.

    Notes
    -----
    The match is made by value on a probe (see :mod:`streamnorm.onnx._export`), so it does not
    depend on which exporter ran (TorchScript or dynamo) or how it named the nodes.
    """
    torch = require("torch")
    require("onnx")
    require("onnxruntime", "onnx")
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"path must be a str or path-like, got {type(path).__name__}")
    out = check_output(path)
    if "f" in export_kwargs:
        raise InputError("give the output file as path, not as f=")
    if export_kwargs.get("kwargs"):
        raise InputError(
            "keyword inputs (kwargs=) are not supported: give every model input in args"
        )
    training = export_kwargs.get("training")
    if training is not None and training != torch.onnx.TrainingMode.EVAL:
        raise InputError(
            f"training={training!r}: BatchNorms are exported in eval mode (their statistics are "
            "what is recorded); leave training out"
        )
    args = _as_tuple(args, torch)
    probe, tensors = _probe(args, torch)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with tempfile.TemporaryDirectory(prefix="streamnorm-export-") as tmp:
            tmp_path = os.path.join(tmp, "model.onnx")
            torch.onnx.export(model, args, tmp_path, **export_kwargs)
            loaded = load(tmp_path)
            records, left = _map(model, loaded.model, probe, tensors)
            text = meta.dumps_batchnorms(records)
            meta.store_entry(loaded.model, meta.BATCHNORMS_KEY, text)
            save(loaded, out)
    finally:
        for m, t in modes.items():
            m.training = t
    if left:
        warnings.warn(
            f"{len(left)} BatchNorm module(s) are not in the record: {left[:4]}"
            f"{' ...' if len(left) > 4 else ''}; recalibrate cannot adapt them exactly",
            UserWarning,
            stacklevel=2,
        )
    return {r.module: r for r in records}
