"""Train mode for a calibration model: what ``mode="one-pass"`` runs.

An ONNX graph has no train mode: every ``BatchNormalization`` node normalizes with the statistics
stored in it. PyTorch's one-pass recalibration (``update_bn``) runs the network in train mode,
each BatchNorm normalizing its input with the statistics of the current batch, and collects each
layer's input on the way. :func:`train_mode_model` rewrites a calibration model (see
:func:`~streamnorm.onnx._graph.calibration_model`) so that one pass over it computes the same
inputs:

- a ``BatchNormalization`` node reads, instead of its stored ``mean`` and ``var``, the mean and
  biased variance of its input ``X`` over the batch (every axis but 1), computed in the graph;
  with its own ``epsilon``, scale and bias this is exactly PyTorch's train-mode normalization;
- a folded layer (a Conv / Gemm that absorbed a BatchNorm) gets its output ``y`` normalized in
  the same way and mapped to its source moments, ``y_train = mean_s + std_s (y - m_b) /
  sqrt(v_b + eps)`` per channel, before any other node reads it. Folding made ``y`` an affine
  function ``s (z - mu_old) + beta`` of the BatchNorm's input ``z`` per channel, so ``(y - m_b)
  / sqrt(v_b)`` equals ``sign(s) (z - m_b(z)) / sqrt(v_b(z))``, and the source moments
  ``(mean_s, std_s)`` are the BatchNorm's ``(beta, |gamma|)`` when its statistics were the
  population statistics of the source data (up to BatchNorm's ``eps``, which folding lost;
  ``eps`` here only guards channels of zero variance). A layer whose BatchNorm was recorded at
  export (:func:`streamnorm.onnx.export`) is normalized exactly: ``beta + |gamma| (y - m_b) /
  sqrt(v_b + eps s^2)``, with the recorded ``gamma``, ``beta``, ``eps`` and folded factor ``s``.

The tensors the adapter collects (each node's ``X``, each folded layer's raw ``y``) stay exposed
as graph outputs. A model with a fixed batch dimension has short batches padded; the batch
statistics are then taken over the real rows only, whose indices the runner feeds as the graph
input :data:`ROWS_INPUT`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputError
from .._extras import require
from ._folded import FoldedLayer
from ._graph import BNNode, GraphIndex, opset_version

__all__ = ["ROWS_INPUT", "TRAIN_EPS", "TrainTarget", "train_mode_model"]

#: the graph input that holds the indices of the real rows of a padded batch (int64, (n,))
ROWS_INPUT = "streamnorm.batch_rows"

#: what a folded layer adds to its batch variance (guards channels of zero variance)
TRAIN_EPS = 1e-12


@dataclass(frozen=True)
class TrainTarget:
    """What a folded layer's output becomes in train mode: per channel
    ``mean + std (y - m_b) / sqrt(v_b + eps)``, with ``(m_b, v_b)`` its batch moments.

    Attributes
    ----------
    mean, std, eps : numpy.ndarray, shape (C,), float64
        The source moments (``mean``, ``sqrt(var)``, :data:`TRAIN_EPS`), or a recorded
        BatchNorm's ``beta``, ``|gamma|`` and ``eps s^2``.
    """

    mean: np.ndarray
    std: np.ndarray
    eps: np.ndarray

    @classmethod
    def of_moments(cls, mean: np.ndarray, var: np.ndarray) -> TrainTarget:
        """From source moments (mean and biased var, shape (C,))."""
        m = np.asarray(mean, np.float64).reshape(-1)
        std = np.sqrt(np.maximum(np.asarray(var, np.float64).reshape(-1), 0.0))
        return cls(m, std, np.full(m.shape, TRAIN_EPS))


class _Builder:
    """New nodes and initializers for one rewrite, with names no tensor of the graph has."""

    def __init__(self, model: Any, rows: bool) -> None:
        self.onnx = require("onnx")
        self.ctx = GraphIndex.of(model)
        self.axes_as_input = opset_version(model) >= 18
        self.nodes: list[Any] = []
        self.consts: dict[str, str] = {}
        self.rows = rows

    def const(self, key: str, value: np.ndarray) -> str:
        """An initializer holding ``value`` (made once per ``key``)."""
        name = self.consts.get(key)
        if name is None:
            name = self.ctx.new_name(f"streamnorm.{key}")
            t = self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name)
            self.ctx.add_initializer(t)
            self.consts[key] = name
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> str:
        """Append a node of one output; the output's name."""
        out = self.ctx.new_name(base)
        self.nodes.append(
            self.onnx.helper.make_node(
                op, inputs, [out], name=self.ctx.new_name(f"{base}.node"), **attrs
            )
        )
        return out

    def mean_over(self, x: str, base: str) -> str:
        """``ReduceMean`` over axes 0 and 2 of a (N, C, L) tensor, keeping them: (1, C, 1)."""
        if self.axes_as_input:
            axes = self.const("axes_0_2", np.array([0, 2], np.int64))
            return self.node("ReduceMean", [x, axes], base, keepdims=1)
        return self.node("ReduceMean", [x], base, axes=[0, 2], keepdims=1)

    def batch_moments(self, x: str, base: str) -> tuple[str, str, str]:
        """Nodes computing, for ``x`` of shape (N, C, ...): ``x`` as (N, C, L) and its
        per-channel batch mean and biased variance, each (1, C, 1), over the real rows."""
        flat = self.node(
            "Reshape", [x, self.const("shape_nc_", np.array([0, 0, -1], np.int64))], base
        )
        rows = flat
        if self.rows:
            rows = self.node("Gather", [flat, ROWS_INPUT], f"{base}.rows", axis=0)
        mean = self.mean_over(rows, f"{base}.batch_mean")
        dev = self.node("Sub", [rows, mean], f"{base}.dev")
        sq = self.node("Mul", [dev, dev], f"{base}.sq")
        var = self.mean_over(sq, f"{base}.batch_var")
        return flat, mean, var


def train_mode_model(
    cal: Any,
    bns: Sequence[BNNode],
    folded: Sequence[FoldedLayer],
    targets: Mapping[str, TrainTarget],
    dtypes: Mapping[str, np.dtype],
    *,
    padded: bool,
) -> Any:
    """A copy of the calibration model ``cal`` in which every BatchNorm node and every folded
    layer normalizes with the statistics of the current batch.

    Parameters
    ----------
    cal : onnx.ModelProto
        From :func:`~streamnorm.onnx._graph.calibration_model` (nodes in the order of the model
        that ``bns`` and ``folded`` index). Not modified.
    bns : sequence of BNNode
    folded : sequence of FoldedLayer
    targets : mapping of str to TrainTarget
        Per folded layer: what its output is normalized to.
    dtypes : mapping of str to numpy.dtype
        Per folded layer: the dtype of its output (its weight's).
    padded : bool
        Batches may be padded (a fixed batch dimension): take the batch statistics over the
        rows fed in :data:`ROWS_INPUT` only.

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    ValueError
        A folded layer whose output a BatchNormalization node reads (its input would no longer
        be the exposed tensor), or a graph that already has a tensor named :data:`ROWS_INPUT`.
    """
    onnx = require("onnx")
    model = onnx.ModelProto()
    model.CopyFrom(cal)
    g = model.graph
    b = _Builder(model, padded)
    if padded:
        if ROWS_INPUT in b.ctx.taken:
            raise InputError(
                f"the model has a tensor named {ROWS_INPUT!r}, which mode='one-pass' needs for "
                "itself; use mode='sequential'"
            )
        g.input.append(
            onnx.helper.make_tensor_value_info(ROWS_INPUT, onnx.TensorProto.INT64, [None])
        )
        b.ctx.taken.add(ROWS_INPUT)
    bn_at = {x.index: x for x in bns}
    folded_at = {f.index: f for f in folded}
    bn_inputs = {x.x for x in bns}
    for f in folded:
        if f.output in bn_inputs:
            raise InputError(
                f"the output of layer {f.name!r} is the input of a BatchNormalization node; "
                "mode='one-pass' cannot put both in train mode, use mode='sequential'"
            )
    renamed: dict[str, str] = {}
    for i, node in enumerate(list(g.node)):
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        bn = bn_at.get(i)
        if bn is not None:
            _, mean, var = b.batch_moments(node.input[0], f"{bn.name}.train")
            flat_c = b.const("shape_c", np.array([-1], np.int64))
            node.input[3] = b.node("Reshape", [mean, flat_c], f"{bn.name}.train.mean")
            node.input[4] = b.node("Reshape", [var, flat_c], f"{bn.name}.train.var")
        b.nodes.append(node)
        layer = folded_at.get(i)
        if layer is not None:
            to, dtype = targets[layer.name], np.dtype(dtypes[layer.name])
            renamed[layer.output] = _normalized(b, layer, to, dtype)
    del g.node[:]
    g.node.extend(b.nodes)
    return model


def _normalized(b: _Builder, f: FoldedLayer, to: TrainTarget, dtype: np.dtype) -> str:
    """Nodes mapping ``f.output`` to ``mean + std (y - m_b) / sqrt(v_b + eps)``; the new
    tensor's name."""
    base = f"{f.name}.train"
    flat, mean, var = b.batch_moments(f.output, base)

    def per_channel(what: str, a: np.ndarray) -> str:
        value = np.asarray(a, np.float64).reshape(1, f.channels, 1).astype(dtype)
        return b.const(f"{base}.{what}", value)

    var_eps = b.node("Add", [var, per_channel("eps", to.eps)], f"{base}.var_eps")
    sd = b.node("Sqrt", [var_eps], f"{base}.batch_std")
    gain = b.node("Div", [per_channel("std", to.std), sd], f"{base}.gain")
    dev = b.node("Sub", [flat, mean], f"{base}.centred")
    out = b.node("Mul", [dev, gain], f"{base}.scaled")
    out = b.node("Add", [out, per_channel("mean", to.mean)], f"{base}.moved")
    shape_of = b.node("Shape", [f.output], f"{base}.shape")
    return b.node("Reshape", [out, shape_of], f"{base}.out")
