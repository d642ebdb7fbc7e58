"""Source moments stored in an ONNX model's ``metadata_props``.

:func:`streamnorm.onnx.annotate` measures, on the source (training) data, the per-channel
moments of the Conv / Gemm outputs whose BatchNorm an exporter folded away, and stores them in
the model itself, so that a deployed model carries what :func:`streamnorm.onnx.recalibrate` needs
to adapt it to new data.

Format
------
One ``metadata_props`` entry, key ``"streamnorm.source_moments"``, whose value is a JSON object::

    {
      "format": "streamnorm.source_moments",
      "version": 1,
      "samples": 1347,                     # samples (rows of the data) measured
      "layers": [
        {
          "output": "/0/Conv_output_0",     # the layer's output tensor (the key)
          "node": "/0/Conv",                # the node that produces it
          "op": "Conv",                     # "Conv" or "Gemm"
          "channel_axis": 1,                # channels of the output; all other axes reduced
          "count": [4096.0, ...],           # values per channel (samples x positions), (C,)
          "mean": [0.12, ...],              # per-channel mean, (C,)
          "m2": [310.5, ...]                # per-channel sum of squared deviations, (C,)
        },
        ...
      ]
    }

Numbers are float64 written with Python's ``repr`` (they read back bit for bit). ``m2 / count``
is the biased variance. A reader that finds another ``format`` or a ``version`` it does not know
refuses the record (:class:`~streamnorm._errors.RecordError`) rather than guess. Other metadata
entries of the model are kept as they are.

A second entry, key ``"streamnorm.batchnorms"`` (:class:`BatchNormRecord`, written by
:func:`streamnorm.onnx.export`), names for each BatchNorm module of a PyTorch model the node that
carries it and its eps, weight, bias and statistics at export.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import RecordError
from .._io import check_header
from .._moments import Moments

__all__ = [
    "BATCHNORMS_KEY",
    "CARRIERS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "BatchNormRecord",
    "LayerMoments",
    "dumps",
    "dumps_batchnorms",
    "read",
    "read_batchnorms",
    "store",
    "store_entry",
]

#: the ``metadata_props`` key
METADATA_KEY = "streamnorm.source_moments"
FORMAT_NAME = "streamnorm.source_moments"
FORMAT_VERSION = 1

_WHAT = "source-moments metadata"


@dataclass(frozen=True)
class LayerMoments:
    """The source moments of one layer's output.

    Attributes
    ----------
    output : str
        The output tensor's name.
    node : str
        The producing node's name.
    op : str
        Its operator, ``"Conv"`` or ``"Gemm"``.
    moments : Moments
        Per-channel count, mean and M2, shape (C,).
    channel_axis : int, default 1
    """

    output: str
    node: str
    op: str
    moments: Moments
    channel_axis: int = 1

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean, shape (C,), float64."""
        return np.asarray(self.moments.mean, dtype=np.float64).reshape(-1)

    @property
    def var(self) -> np.ndarray:
        """Per-channel biased variance ``M2 / count``, shape (C,), float64."""
        return np.asarray(self.moments.var(0), dtype=np.float64).reshape(-1)


def _floats(a: Any) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


def dumps(layers: list[LayerMoments], samples: int) -> str:
    """The JSON value of the metadata entry (see the module docstring).

    Raises
    ------
    ValueError
        A non-finite moment (JSON has no NaN): the data or the model produce NaN/Inf.
    """
    out = []
    for m in layers:
        st = m.moments
        count = np.broadcast_to(np.asarray(st.count, dtype=np.float64), st.mean.shape)
        arrays = {"count": _floats(count), "mean": _floats(st.mean), "m2": _floats(st.m2)}
        if not all(math.isfinite(v) for a in arrays.values() for v in a):
            raise RecordError(
                f"the output {m.output!r} of node {m.node!r} has non-finite moments "
                "(NaN/Inf) on the source data; check the data and the model"
            )
        out.append(
            {
                "output": m.output,
                "node": m.node,
                "op": m.op,
                "channel_axis": int(m.channel_axis),
                **arrays,
            }
        )
    return json.dumps(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "samples": int(samples),
            "layers": out,
        },
        separators=(",", ":"),
    )


def store(model: Any, text: str) -> None:
    """Put ``text`` under :data:`METADATA_KEY` in ``model.metadata_props`` (replacing an old
    entry; other entries are kept)."""
    store_entry(model, METADATA_KEY, text)


def _layer(d: Any, i: int) -> LayerMoments:
    if not isinstance(d, dict):
        raise RecordError(f"corrupt {_WHAT}: layer {i} is not an object")
    for k in ("output", "node", "op", "count", "mean", "m2"):
        if k not in d:
            raise RecordError(f"corrupt {_WHAT}: layer {i} has no {k!r}")
    if not isinstance(d["output"], str) or not isinstance(d["node"], str):
        raise RecordError(f"corrupt {_WHAT}: layer {i} has a non-string name")
    axis = d.get("channel_axis", 1)
    if not isinstance(axis, int) or axis != 1:
        raise RecordError(f"corrupt {_WHAT}: layer {i} has channel_axis {axis!r}, expected 1")
    try:
        arrs = [np.asarray(d[k], dtype=np.float64) for k in ("count", "mean", "m2")]
    except (TypeError, ValueError) as e:
        raise RecordError(f"corrupt {_WHAT}: layer {d['output']!r}: {e}") from e
    if any(a.ndim != 1 or a.shape != arrs[1].shape or a.size == 0 for a in arrs):
        raise RecordError(
            f"corrupt {_WHAT}: layer {d['output']!r} needs count, mean and m2 of one equal "
            f"length, got shapes {[a.shape for a in arrs]}"
        )
    count, mean, m2 = arrs
    if not (np.isfinite(mean).all() and np.isfinite(m2).all()) or np.any(count <= 0):
        raise RecordError(
            f"impossible {_WHAT}: layer {d['output']!r} has non-finite moments or empty channels"
        )
    if not (np.isfinite(count).all() and np.all(count >= 1) and np.all(count == np.round(count))):
        raise RecordError(  # annotate counts the values each channel received
            f"impossible {_WHAT}: layer {d['output']!r} has counts that are not whole numbers "
            ">= 1 (the number of values each channel received)"
        )
    try:
        mom = Moments.from_arrays(count, mean, m2)
    except ValueError as e:
        raise RecordError(f"impossible {_WHAT}: layer {d['output']!r}: {e}") from e
    return LayerMoments(d["output"], d["node"], str(d["op"]), mom, axis)


def read(model: Any) -> dict[str, LayerMoments] | None:
    """The source moments stored in ``model`` by output name, or ``None`` when it has none.

    Raises
    ------
    RecordError
        An entry that is not JSON, another format, an unknown version, or impossible moments.
    """
    return _read_layers(model, METADATA_KEY, FORMAT_NAME, FORMAT_VERSION, _WHAT, _layer)


# --------------------------------------------------------------------------------------------
# the BatchNorm modules of an exported PyTorch model (streamnorm.onnx.export)

#: the ``metadata_props`` key of the BatchNorm record
BATCHNORMS_KEY = "streamnorm.batchnorms"
BATCHNORMS_FORMAT = "streamnorm.batchnorms"
BATCHNORMS_VERSION = 1

_BN_WHAT = "BatchNorm metadata"

#: operators a recorded BatchNorm may be carried by
CARRIERS = ("BatchNormalization", "Conv", "Gemm")


@dataclass(frozen=True)
class BatchNormRecord:
    """One BatchNorm module of a PyTorch model and the ONNX node that carries it.

    Written by :func:`streamnorm.onnx.export` under the key ``"streamnorm.batchnorms"``::

        {"format": "streamnorm.batchnorms", "version": 1, "layers": [
          {"module": "layer1.0.bn1",                 # the module's qualified name
           "node": "/layer1/layer1.0/conv1/Conv",     # the node that carries it
           "output": "/layer1/layer1.0/conv1/Conv_output_0",  # its output: the BN's output
           "op": "Conv",                   # "Conv" / "Gemm" (folded) or "BatchNormalization"
           "site": "output",               # optional, default "output" (see below)
           "eps": 0.001, "gamma": [...], "beta": [...],   # the module's eps, weight, bias
           "mean": [...], "var": [...]},   # the statistics it normalized with at export
          ...]}

    ``site`` is ``"output"`` when the node's output is the BatchNorm's output (a folded or a
    kept BatchNorm), ``"input"`` when it is the BatchNorm's input and the BatchNorm itself was
    exported as other operators that read only it (torchvision's ``FrozenBatchNorm2d`` becomes
    ``Mul`` / ``Add`` after its Conv).

    Attributes
    ----------
    module, node, output, op : str
    eps : float
    site : {"output", "input"}
    gamma, beta, mean, var : numpy.ndarray, shape (C,), float64
        ``var`` is the value the module divided by (``sqrt(var + eps)``), as stored in its
        ``running_var``.
    """

    module: str
    node: str
    output: str
    op: str
    eps: float
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    site: str = "output"

    @property
    def channels(self) -> int:
        return int(self.gamma.size)

    @property
    def scale(self) -> np.ndarray:
        """``gamma / sqrt(var + eps)``, shape (C,): the per-channel factor folded into the
        node's weight."""
        return self.gamma / np.sqrt(self.var + self.eps)

    @property
    def output_var(self) -> np.ndarray:
        """The variance of the module's output on data whose moments are ``(mean, var)``:
        ``gamma^2 var / (var + eps)``, shape (C,)."""
        return self.gamma**2 * self.var / (self.var + self.eps)

    @property
    def source(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of the node's output on data whose moments are ``(mean, var)``:
        ``(beta, output_var)`` at the output site, ``(mean, var)`` at the input site."""
        if self.site == "input":
            return self.mean, self.var
        return self.beta, self.output_var

    @property
    def target(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(m, k, f)`` per channel, shape (C,) each: recalibrated on target data whose node
        output ``y`` has moments ``(mean_y, var_y)``, the node's output becomes
        ``m + k (y - mean_y) / sqrt(var_y + eps f^2)``, with ``f`` the factor between ``y``
        and the BatchNorm input as exported. Output site: ``(beta, |gamma|, gamma / sqrt(var +
        eps))``; input site: ``(mean, sqrt(var + eps), 1)`` (the operators after the node keep
        normalizing with the exported statistics)."""
        if self.site == "input":
            return self.mean, np.sqrt(self.var + self.eps), np.ones_like(self.mean)
        return self.beta, np.abs(self.gamma), self.scale


def dumps_batchnorms(records: list[BatchNormRecord]) -> str:
    """The JSON value of the BatchNorm entry (see :class:`BatchNormRecord`)."""
    out = []
    for r in records:
        arrays = {k: _floats(getattr(r, k)) for k in ("gamma", "beta", "mean", "var")}
        if not all(math.isfinite(v) for a in arrays.values() for v in a):
            raise RecordError(f"the BatchNorm {r.module!r} has non-finite parameters or statistics")
        out.append(
            {
                "module": r.module,
                "node": r.node,
                "output": r.output,
                "op": r.op,
                "site": r.site,
                "eps": float(r.eps),
                **arrays,
            }
        )
    return json.dumps(
        {"format": BATCHNORMS_FORMAT, "version": BATCHNORMS_VERSION, "layers": out},
        separators=(",", ":"),
    )


def store_entry(model: Any, key: str, text: str) -> None:
    """Put ``text`` under ``key`` in ``model.metadata_props`` (replacing an old entry of that
    key; other entries are kept)."""
    props = model.metadata_props
    keep = [(p.key, p.value) for p in props if p.key != key]
    del props[:]
    for k, v in keep:
        props.add(key=k, value=v)
    props.add(key=key, value=text)


def _bn_record(d: Any, i: int) -> BatchNormRecord:
    if not isinstance(d, dict):
        raise RecordError(f"corrupt {_BN_WHAT}: layer {i} is not an object")
    names = ("module", "node", "output", "op")
    for k in (*names, "eps", "gamma", "beta", "mean", "var"):
        if k not in d:
            raise RecordError(f"corrupt {_BN_WHAT}: layer {i} has no {k!r}")
    if not all(isinstance(d[k], str) for k in names):
        raise RecordError(f"corrupt {_BN_WHAT}: layer {i} has a non-string name")
    if d["op"] not in CARRIERS:
        raise RecordError(
            f"corrupt {_BN_WHAT}: layer {i} has op {d['op']!r}, not one of {CARRIERS}"
        )
    try:
        eps = float(d["eps"])
        arrs = [np.asarray(d[k], dtype=np.float64) for k in ("gamma", "beta", "mean", "var")]
    except (TypeError, ValueError) as e:
        raise RecordError(f"corrupt {_BN_WHAT}: layer {d['module']!r}: {e}") from e
    if any(a.ndim != 1 or a.shape != arrs[0].shape or a.size == 0 for a in arrs):
        raise RecordError(
            f"corrupt {_BN_WHAT}: layer {d['module']!r} needs gamma, beta, mean and var of one "
            f"equal length, got shapes {[a.shape for a in arrs]}"
        )
    gamma, beta, mean, var = arrs
    site = d.get("site", "output")
    if site not in ("output", "input") or (site == "input" and d["op"] == "BatchNormalization"):
        raise RecordError(f"corrupt {_BN_WHAT}: layer {d['module']!r} has site {site!r}")
    finite = all(np.isfinite(a).all() for a in arrs) and math.isfinite(eps)
    if not finite or eps < 0 or np.any(var + eps <= 0):
        raise RecordError(
            f"impossible {_BN_WHAT}: layer {d['module']!r} has non-finite values or var + eps <= 0"
        )
    return BatchNormRecord(
        d["module"], d["node"], d["output"], d["op"], eps, gamma, beta, mean, var, site
    )


def read_batchnorms(model: Any) -> dict[str, BatchNormRecord] | None:
    """The BatchNorm records stored in ``model`` by output name, or ``None`` when it has none.

    Raises
    ------
    RecordError
        An entry that is not JSON, another format, an unknown version, or impossible values.
    """
    return _read_layers(
        model, BATCHNORMS_KEY, BATCHNORMS_FORMAT, BATCHNORMS_VERSION, _BN_WHAT, _bn_record
    )


def _read_layers(
    model: Any, key: str, fmt: str, version: int, what: str, parse: Callable[[Any, int], Any]
) -> dict[str, Any] | None:
    """The entries of the JSON record under ``key`` in ``model``'s metadata, parsed one by one
    with ``parse(entry, index)`` and keyed by their ``output`` (``None`` without a record)."""
    texts = [p.value for p in model.metadata_props if p.key == key]
    if not texts:
        return None
    try:
        d = json.loads(texts[-1])
    except ValueError as e:
        raise RecordError(f"the model's {key!r} metadata is not JSON: {e}") from e
    if not isinstance(d, dict):
        raise RecordError(f"corrupt {what}: expected a JSON object, got {type(d).__name__}")
    check_header(d, fmt, version, what)
    layers = d.get("layers")
    if not isinstance(layers, list):
        raise RecordError(f"corrupt {what}: 'layers' is not a list")
    out: dict[str, Any] = {}
    for i, entry in enumerate(layers):
        r = parse(entry, i)
        if r.output in out:
            raise RecordError(f"corrupt {what}: output {r.output!r} appears twice")
        out[r.output] = r
    return out
