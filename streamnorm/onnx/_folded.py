"""Conv / Gemm layers whose BatchNorm an exporter folded into their weights.

``torch.onnx.export`` in eval mode folds a BatchNorm that follows a Conv into the Conv's weight
and bias (other exporters and ``torch.jit.freeze`` fold the one after a Linear too): the graph
keeps no statistics to recalibrate. What it keeps is the effect: on the source data, each output
channel of such a layer has the mean and variance BatchNorm normalized it to. Recalibration
restores that distribution on new data by per-channel moment matching,

    y' = mean_s + std_s (y - mean_t) / std_t,

with the source moments ``(mean_s, std_s)`` (measured by :func:`streamnorm.onnx.annotate` and
stored in the model, or measured from source data) and the target moments ``(mean_t, std_t)``
of the layer's output on the new data, and folds it back into the layer: output channel ``c`` of
the weight is scaled by ``a_c = std_s / std_t`` and the bias becomes
``a_c (b_c - mean_t) + mean_s``. With BatchNorm statistics that were the exact population
statistics of the source data, this equals recalibrating the BatchNorm before folding, up to
BatchNorm's ``eps`` (lost in folding). A model written by :func:`streamnorm.onnx.export` records
each folded BatchNorm's eps, weight, bias and statistics; its layers are adapted exactly instead
(see ``_OnnxAdapter.write`` in :mod:`streamnorm.onnx._calibrate`).

Which layers
------------
By default (:func:`default_layers`), the Conv / Gemm nodes the graph shows a folded BatchNorm
in: read by an activation (also through a per-channel affine ``Mul`` / ``Add``), the last Conv
of a residual branch, a linear bottleneck before a Conv-BN block; not after a global pooling
(squeeze-excitation, classifiers), not before a ``BatchNormalization`` node, not without a bias,
not feeding the graph output (the rule and its reasons: :mod:`streamnorm.onnx._rule`).
:func:`select` applies ``layers`` / ``exclude`` (node names or output names) or the layers
annotated in the metadata; :func:`folded_layers` lists every Conv / Gemm with its verdict.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputError, InputNotFoundError, InputTypeError, RecordError
from .._extras import require
from . import _metadata as meta
from ._graph import GraphIndex
from ._rule import ACTIVATIONS, FOLDABLE, LayerChoice, chosen, classify, layer_label

__all__ = [
    "ACTIVATIONS",
    "FOLDABLE",
    "FoldedLayer",
    "LayerChoice",
    "default_layers",
    "folded_layers",
    "match",
    "named_layers",
    "prepare_folded",
    "select",
    "split_excluded",
]

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class FoldedLayer:
    """One Conv / Gemm layer adapted by moment matching of its output.

    Attributes
    ----------
    name : str
        Unique layer name (the node's name, or ``<op>_<index>``).
    node : str
        The node's name in the graph.
    op : {"Conv", "Gemm"}
    output : str
        Its output tensor, shape (N, C, ...).
    weight, bias : str
        Its own weight and bias initializers (a missing bias is added as zeros; a Gemm's bias is
        a per-channel vector with ``beta = 1``).
    channels : int
        Output channels ``C``.
    index : int
        Position of the node in the graph (topological order).
    trans_b : bool
        A Gemm whose weight is stored ``(C, K)`` (``transB = 1``); ``(K, C)`` otherwise.
    """

    name: str
    node: str
    op: str
    output: str
    weight: str
    bias: str
    channels: int
    index: int
    trans_b: bool = False

    def scaled(
        self, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray, shift: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(a W, a b + shift)`` per output channel, in the arrays' dtypes.

        Parameters
        ----------
        weight : numpy.ndarray
            Conv: shape (C, C_in / group, k...); Gemm: (C, K) or (K, C) (``trans_b``).
        bias : numpy.ndarray, C values
        scale, shift : numpy.ndarray, shape (C,), float64
        """
        w = weight.astype(np.float64)
        if self.op == "Gemm" and not self.trans_b:
            w = w * scale[None, :]
        else:
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        b = scale * bias.astype(np.float64).reshape(-1) + shift
        return w.astype(weight.dtype), b.reshape(bias.shape).astype(bias.dtype)


def _is_default_domain(node: Any) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def default_layers(model: Any) -> list[int]:
    """Indices of the Conv / Gemm nodes the default rule takes (see :mod:`._rule`)."""
    return chosen(classify(model))


def select(
    model: Any,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    annotated: Sequence[str] | None = None,
) -> list[tuple[int, LayerChoice]]:
    """Every Conv / Gemm node with its verdict: the ``layers`` named, else the layers whose
    outputs are ``annotated`` (source moments in the metadata), else the default rule; then
    without the ``exclude``d ones. As ``(node index, LayerChoice)`` in graph order.

    Raises
    ------
    TypeError, ValueError
        ``layers`` / ``exclude`` that are not lists of names of Conv / Gemm nodes.
    RecordError
        An annotated output that no Conv / Gemm node of the model produces.
    """
    verdicts = classify(model)
    if layers is not None:
        named = set(named_layers(model, layers))
        verdicts = [
            (
                i,
                c._replace(
                    chosen=i in named,
                    reason="named in layers" if i in named else f"not named (rule: {c.reason})",
                ),
            )
            for i, c in verdicts
        ]
    elif annotated is not None:
        g = model.graph
        outputs = {n.output[0]: i for i, n in enumerate(g.node) if n.output}
        marked = set()
        for out in annotated:
            i = outputs.get(out)
            if i is None or g.node[i].op_type not in FOLDABLE:
                raise RecordError(
                    f"the source moments in the model's metadata name the output {out!r}, which "
                    "no Conv / Gemm node of the model produces; annotate this model again"
                )
            marked.add(i)
        verdicts = [
            (
                i,
                c._replace(
                    chosen=i in marked,
                    reason="annotated (source moments in the metadata)"
                    if i in marked
                    else f"not annotated (rule: {c.reason})",
                ),
            )
            for i, c in verdicts
        ]
    _, exclude = split_excluded(model, exclude)
    if exclude is not None:
        dropped = set(named_layers(model, exclude, what="exclude"))
        verdicts = [
            (i, c._replace(chosen=False, reason="excluded by name") if i in dropped else c)
            for i, c in verdicts
        ]
    return verdicts


def split_excluded(
    model: Any, exclude: Sequence[str] | None
) -> tuple[set[int], Sequence[str] | None]:
    """``exclude`` split into the ``BatchNormalization`` nodes it names (indices: nodes whose
    stored statistics stay as they are) and the other names (``None`` when none is left).

    A list that is not a sequence of str is passed on as it is, for :func:`named_layers` to
    refuse.
    """
    if exclude is None or isinstance(exclude, str) or not isinstance(exclude, Sequence):
        return set(), exclude
    g = model.graph
    bns: set[int] = set()
    rest: list[str] = []
    for name in exclude:
        i = match(model, name) if isinstance(name, str) else None
        if i is not None and g.node[i].op_type == "BatchNormalization":
            bns.add(i)
        else:
            rest.append(name)
    return bns, (rest if rest or not bns else None)


def folded_layers(
    model_path: Any,
    *,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    annotated: bool = True,
) -> list[LayerChoice]:
    """Which Conv / Gemm layers of an ONNX model are adapted as folded BatchNorms, and why.

    Parameters
    ----------
    model_path : str, path-like or onnx.ModelProto
    layers, exclude : list of str, optional
        As in :func:`streamnorm.onnx.recalibrate` (node or output names).
    annotated : bool, default True
        Without ``layers``, an annotated model (:func:`streamnorm.onnx.annotate`) chooses its
        annotated layers, as :func:`~streamnorm.onnx.recalibrate` does without ``source``;
        ``False``: the default rule (``recalibrate`` with ``source``, ``annotate``).

    Returns
    -------
    list of LayerChoice
        Every Conv / Gemm node of the main graph in graph order: ``(name, op, reason, chosen)``.

    Examples
    --------
    >>> for name, op, reason, chosen in folded_layers("model.onnx"):  # doctest: +SKIP
    ...     print("+" if chosen else "-", name, op, reason)
    """
    onnx = require("onnx")
    model = model_path
    if not isinstance(model_path, onnx.ModelProto):
        if not isinstance(model_path, (str, os.PathLike)):
            raise InputTypeError(
                f"model_path must be a path or an onnx.ModelProto, got {type(model_path).__name__}"
            )
        if not os.path.isfile(model_path):
            raise InputNotFoundError(f"model file {os.fspath(model_path)!r} does not exist")
        try:
            model = onnx.load(os.fspath(model_path), load_external_data=False)
        except Exception as e:
            raise InputError(f"{os.fspath(model_path)!r} is not a readable ONNX model: {e}") from e
    stored = meta.read(model) if annotated else None
    outputs = None if stored is None else list(stored)
    return [c for _, c in select(model, layers, exclude, outputs)]


def match(model: Any, name: str) -> int | None:
    """Index of the node named ``name``, or of the node whose first output is ``name``."""
    for i, n in enumerate(model.graph.node):
        if n.name == name:
            return i
    for i, n in enumerate(model.graph.node):
        if n.output and n.output[0] == name:
            return i
    return None


def named_layers(model: Any, layers: Any, what: str = "layers") -> list[int]:
    """Indices of the Conv / Gemm nodes named in ``layers`` (node or output names), sorted;
    ``what`` names the argument in the errors.

    Raises
    ------
    TypeError
        ``layers`` is not a sequence of str.
    ValueError
        An unknown name, a node that is not a Conv / Gemm, or an empty list.
    """
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise InputTypeError(
            f"{what} must be a list of node or output names, got {type(layers).__name__}"
        )
    if not layers:
        raise InputError(f"{what} is empty; name at least one Conv or Gemm node (or omit it)")
    g = model.graph
    out: set[int] = set()
    for name in layers:
        if not isinstance(name, str):
            raise InputTypeError(f"{what} must hold str names, got {type(name).__name__}")
        i = match(model, name)
        if i is None:
            convs = [layer_label(n) for n in g.node if n.op_type in FOLDABLE][:8]
            raise InputError(
                f"the model has no node or output named {name!r}; its Conv / Gemm nodes are {convs}"
            )
        node = g.node[i]
        if node.op_type not in FOLDABLE or not _is_default_domain(node):
            hint = (
                " (BatchNormalization nodes are recalibrated unless named in exclude)"
                if node.op_type == "BatchNormalization"
                else ""
            )
            raise InputError(
                f"{name!r} is a {node.op_type} node; {what} names Conv or Gemm nodes{hint}"
            )
        out.add(i)
    return sorted(out)


def _attr(node: Any, name: str, default: Any) -> Any:
    onnx = require("onnx")
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_float_attr(node: Any, name: str, value: float) -> None:
    onnx = require("onnx")
    for a in node.attribute:
        if a.name == name:
            a.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _check_weight(node: str, op: str, w: np.ndarray) -> None:
    if w.dtype.kind != "f":
        raise InputError(
            f"{op} node {node!r} has a weight of dtype {w.dtype}; moment matching rewrites "
            "floating-point weights only (recalibrate the float model before quantizing)"
        )
    want = 2 if op == "Gemm" else 3
    if (op == "Gemm" and w.ndim != 2) or w.ndim < want:
        raise InputError(f"{op} node {node!r} has a weight of shape {w.shape}")


def _bias(
    ctx: GraphIndex, node: Any, name: str, channels: int, dtype: np.dtype, beta: float
) -> str:
    """Give ``node`` a bias initializer of its own with ``channels`` values (input 2)."""
    onnx = require("onnx")
    has = len(node.input) > 2 and node.input[2]
    if has:
        src, value = ctx.own_input(node, 2, name, "bias")
        if node.op_type == "Conv" or (value.size == channels and beta == 1.0):
            if value.size != channels:
                raise InputError(
                    f"{node.op_type} node {name!r} has a bias of shape {value.shape}, expected "
                    f"({channels},)"
                )
            return src
        if value.size not in (1, channels) or (value.ndim == 2 and value.shape[0] != 1):
            raise InputError(
                f"Gemm node {name!r} has a bias C of shape {value.shape} that is not per output "
                f"channel ({channels},); moment matching needs one bias per channel"
            )
        full = np.broadcast_to(beta * value.astype(np.float64).reshape(-1), (channels,))
        ctx.uses[src] -= 1
    else:
        full = np.zeros(channels)
    new = ctx.new_name(f"{name}.bias")
    ctx.add_initializer(onnx.numpy_helper.from_array(np.ascontiguousarray(full, dtype=dtype), new))
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = new
    ctx.uses[new] += 1
    if node.op_type == "Gemm":
        _set_float_attr(node, "beta", 1.0)
    return new


def _one(ctx: GraphIndex, i: int) -> FoldedLayer:
    node = ctx.model.graph.node[i]
    name = ctx.layer_name(node, i)
    op = node.op_type
    if len(node.input) < 2 or not node.input[1]:
        raise InputError(f"{op} node {name!r} has no weight input")
    weight, w = ctx.own_input(node, 1, name, "weight")
    _check_weight(name, op, w)
    trans_b = bool(_attr(node, "transB", 0)) if op == "Gemm" else False
    channels = int(w.shape[0] if op == "Conv" or trans_b else w.shape[1])
    beta = float(_attr(node, "beta", 1.0)) if op == "Gemm" else 1.0
    bias = _bias(ctx, node, name, channels, w.dtype, beta)
    return FoldedLayer(name, node.name, op, node.output[0], weight, bias, channels, i, trans_b)


def prepare_folded(model: Any, indices: Sequence[int], taken: set[str]) -> list[FoldedLayer]:
    """Give each selected Conv / Gemm node a weight and bias of its own (in place).

    Parameters
    ----------
    model : onnx.ModelProto
        Loaded with its external data. Changed in place.
    indices : sequence of int
        The nodes (from :func:`default_layers` or :func:`named_layers`).
    taken : set of str
        Layer names already given out (the BatchNorm nodes').

    Returns
    -------
    list of FoldedLayer
        In graph order.
    """
    ctx = GraphIndex.of(model)
    ctx.names |= set(taken)
    out = [_one(ctx, i) for i in sorted(indices)]
    ctx.drop_unused()
    return out
