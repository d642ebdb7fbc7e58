"""Recalibrate the BatchNorm statistics stored in an ONNX file, and the Conv / Gemm layers into
which an exporter folded its BatchNorms (the ONNX side of :mod:`streamnorm.calibrate`).

:class:`_OnnxAdapter` runs the model with onnxruntime, the statistics and the weights of folded
layers fed as inputs of a session made once (:func:`~streamnorm.onnx._graph.calibration_model`),
hands every ``BatchNormalization`` input and every folded layer's output to the core, keeps the
new statistics and folds the moment matching of each folded layer into its weights (see
:mod:`streamnorm.onnx._folded`); :func:`recalibrate` loads the model, checks the paths and the
data, and writes a new file; :func:`annotate` stores the source moments of the folded layers in
the model (see :mod:`streamnorm.onnx._metadata`). The input file is never modified.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .. import calibrate as core
from .._errors import InputError, OutputPathError, RecordError
from .._extras import require
from .._io import check_outputs
from .._moments import Moments
from .._validate import check_size
from . import _metadata as meta
from ._files import (
    MAX_PROTO,
    Loaded,
    ModelInput,
    check_fit,
    check_paths,
    data_path,
    input_files,
    load,
    model_input,
    open_source,
    output_files,
    save,
)
from ._folded import FoldedLayer, named_layers, prepare_folded, select, split_excluded
from ._graph import BNNode, calibration_model, depths, prepare, prune
from ._rule import chosen, layer_label
from ._segments import Target, segment_cursors
from ._train import ROWS_INPUT, TrainTarget, train_mode_model

__all__ = ["annotate", "recalibrate"]

#: the ``eps`` of a folded layer in the report's shifts (guards channels of zero variance)
_REPORT_EPS = 1e-12

# --------------------------------------------------------------------------------------------
# the adapter


def _session(source: Any, providers: list[str] | None) -> Any:
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(source, opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        raise InputError(f"onnxruntime cannot run the model: {e}") from e


@dataclass(frozen=True)
class _Plan:
    """What one recalibration adapts (picklable).

    Attributes
    ----------
    bns : list of BNNode
    folded : list of FoldedLayer
    sources : dict of str to Stats
        Per folded layer: the source moments of its output (mean, biased var).
    depth : dict of str to int
        Per layer (both kinds): its depth in the graph (see :func:`~._graph.depths`).
    exact : dict of str to BatchNormRecord
        Per folded layer recorded by :func:`streamnorm.onnx.export`: the BatchNorm folded into
        it (adapted exactly, see :meth:`_OnnxAdapter.write`).
    torch_bns : frozenset of str
        BatchNorm nodes recorded by :func:`streamnorm.onnx.export` as PyTorch BatchNorms: their
        ``var`` is written unbiased, as PyTorch's ``running_var`` (so are the exact layers').
    """

    bns: list[BNNode]
    folded: list[FoldedLayer]
    sources: dict[str, core.Stats]
    depth: dict[str, int]
    exact: dict[str, meta.BatchNormRecord] = field(default_factory=dict)
    torch_bns: frozenset[str] = frozenset()


class _Runner:
    """Runs a calibration model on one batch with the current feeds; the asked tensors."""

    def __init__(self, model_bytes: bytes, source: ModelInput, providers: list[str] | None):
        self.model_bytes, self.source, self.providers = model_bytes, source, providers
        self.session: Any = None

    def outputs(
        self, batch: Any, names: Sequence[str], feeds: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The batch as fed and the tensors ``names``, rows beyond the batch dropped.

        A model with a fixed batch dimension gets short batches padded (rows are independent
        in inference mode) and the padding dropped again; a train-mode model (one-pass) is fed
        the indices of the real rows (:data:`~._train.ROWS_INPUT`) for its batch statistics.
        """
        if self.session is None:
            self.session = _session(self.model_bytes, self.providers)
        arr = np.ascontiguousarray(np.asarray(batch), dtype=self.source.dtype)
        n = arr.shape[0]
        fixed = self.source.fixed_batch
        if fixed is not None and n < fixed:
            arr = np.concatenate([arr, np.repeat(arr[:1], fixed - n, axis=0)])
        out_names = sorted(set(names))
        fed = {self.source.name: arr, **feeds}
        if any(i.name == ROWS_INPUT for i in self.session.get_inputs()):
            fed[ROWS_INPUT] = np.arange(n, dtype=np.int64)
        try:
            res = self.session.run(out_names, fed) if names else []
        except Exception as e:
            if type(e).__module__.startswith("onnxruntime"):
                raise InputError(f"onnxruntime failed on the data: {e}") from e
            raise
        return arr[:n], {k: np.asarray(v)[:n] for k, v in zip(out_names, res, strict=True)}


def _finite(name: str, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``arrays`` (new weights, biases or statistics in the model's dtypes) if all are finite.

    Source moments that pass the metadata checks can still give values the model's dtype cannot
    hold (a mean of 1e39, a variance of 1e300 or a count of 1e-300 overflow float32):
    ``InputError`` then, before anything is written.
    """
    for a in arrays:
        if not np.isfinite(a).all():
            raise InputError(
                f"layer {name!r}: the new weights or statistics are not finite in {a.dtype} "
                f"({int(np.size(a) - np.isfinite(a).sum())} of {a.size} values overflow); the "
                "source moments (the model's metadata or source=) or the data are out of "
                "range for the model. Nothing was written"
            )
    return arrays


def _runner(cal: Any, feed: ModelInput, providers: list[str] | None, doing: str) -> _Runner:
    """A runner of the calibration model ``cal``, which must fit in one protobuf message."""
    if cal.ByteSize() >= MAX_PROTO:
        raise InputError(
            f"the model is larger than 2 GiB once loaded; {doing} such models through "
            "onnxruntime sessions from memory is not supported"
        )
    return _Runner(cal.SerializeToString(), feed, providers)


@dataclass
class _OnnxAdapter:
    """:class:`streamnorm.calibrate.Adapter` for a calibration model (statistics and folded
    weights as inputs).

    Attributes
    ----------
    model_bytes : bytes
        The serialized :func:`calibration_model`.
    plan : _Plan
    feeds : dict of str to numpy.ndarray
        The current statistics and folded weights, fed to every run; :meth:`write` replaces
        them.
    assumed : dict of str to Stats
        Per folded layer: the output moments it maps to the source moments (the source moments
        themselves until :meth:`write` adapts it); what :meth:`read` returns.
    source : ModelInput
    providers : list of str, optional
    scales : dict of str to numpy.ndarray
        Per exactly adapted folded layer: the factor ``gamma / sqrt(var + eps)`` now folded into
        its weight, shape (C,) (the recorded one until :meth:`write` adapts it).
    """

    model_bytes: bytes
    plan: _Plan
    feeds: dict[str, np.ndarray]
    assumed: dict[str, core.Stats]
    source: ModelInput
    providers: list[str] | None = None
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    runner: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._bn = {b.name: b for b in self.plan.bns}
        self._folded = {f.name: f for f in self.plan.folded}
        self.runner = _Runner(self.model_bytes, self.source, self.providers)

    def layers(self) -> list[core.NormLayer]:
        """BatchNorm nodes and folded layers, in graph order; ``var`` biased (ONNX's
        convention), unbiased for the BatchNorms of a PyTorch model recorded at export."""
        torch_bn = self.plan.torch_bns

        def conv(name: str) -> str:
            return "unbiased" if name in torch_bn or name in self.plan.exact else "biased"

        both = [
            (b.index, core.NormLayer(b.name, b.channels, b.eps, conv(b.name)))
            for b in self.plan.bns
        ]
        both += [
            (f.index, core.NormLayer(f.name, f.channels, _REPORT_EPS, conv(f.name)))
            for f in self.plan.folded
        ]
        return [x for _, x in sorted(both, key=lambda t: t[0])]

    def read(self, layer: core.NormLayer) -> core.Stats:
        if layer.name in self._folded:
            return self.assumed[layer.name]
        b = self._bn[layer.name]
        return core.Stats(
            self.feeds[b.mean].astype(np.float64), self.feeds[b.var].astype(np.float64)
        )

    def write(self, layer: core.NormLayer, result: core.LayerResult) -> None:
        """Keep the statistics in the initializers' dtype (``var`` biased, ONNX's convention);
        for a folded layer, fold ``y' = mean_s + std_s (y - mean_t) / std_t`` into its weights
        (a channel of zero target or source variance gets ``y' = mean_s``)."""
        f = self._folded.get(layer.name)
        if f is None:
            b = self._bn[layer.name]
            with np.errstate(over="ignore", invalid="ignore"):  # _finite says it
                mean, var = _finite(
                    layer.name,
                    result.mean.astype(self.feeds[b.mean].dtype),
                    result.var.astype(self.feeds[b.var].dtype),
                )
            self.feeds[b.mean], self.feeds[b.var] = mean, var
            return
        rec = self.plan.exact.get(f.name)
        if rec is not None:
            self._write_exact(f, rec, result)
            return
        src = self.plan.sources[f.name]
        std_s = np.sqrt(np.maximum(src.var, 0.0))
        std_t = np.sqrt(np.maximum(result.var, 0.0))
        scale = np.zeros_like(std_t)
        np.divide(std_s, std_t, out=scale, where=std_t > 0)
        shift = src.mean - scale * result.mean
        with np.errstate(over="ignore", invalid="ignore"):  # _finite says it
            new = f.scaled(self.feeds[f.weight], self.feeds[f.bias], scale, shift)
        self.feeds[f.weight], self.feeds[f.bias] = _finite(f.name, *new)
        self.assumed[f.name] = core.Stats(result.mean.copy(), result.var.copy())

    def _write_exact(
        self, f: FoldedLayer, rec: meta.BatchNormRecord, result: core.LayerResult
    ) -> None:
        """Recalibrate the BatchNorm folded into ``f``, ``eps`` included.

        The folded output is ``y = s (z - mu) + beta`` with ``s = gamma / sqrt(var + eps)`` (``z``
        the unfolded output); with ``(m, v)`` the target moments of ``y``, the BatchNorm
        recalibrated to the target moments of ``z`` gives
        ``beta + |gamma| (y - m) / sqrt(v + eps s^2)``, folded in as ``a y + (beta - a m)``. A
        channel with ``gamma = 0`` (or no variance and ``eps = 0``) outputs ``beta``. The folded
        factor becomes ``a s = gamma / sqrt(v / s^2 + eps)``. A record at the input site (the
        BatchNorm exported as operators after the node) gets the same with ``(mean,
        sqrt(var + eps), 1)`` in place of ``(beta, |gamma|, s)``: the node's output is mapped to
        what the exported statistics turn into the recalibrated BatchNorm's output (see
        :attr:`~._metadata.BatchNormRecord.target`).
        """
        m, k, f0 = rec.target
        s = self.scales.get(f.name, f0)
        denom = np.sqrt(np.maximum(result.var, 0.0) + rec.eps * s * s)
        a = np.zeros_like(denom)
        np.divide(k, denom, out=a, where=denom > 0)
        shift = m - a * result.mean
        with np.errstate(over="ignore", invalid="ignore"):  # _finite says it
            new = f.scaled(self.feeds[f.weight], self.feeds[f.bias], a, shift)
        self.feeds[f.weight], self.feeds[f.bias] = _finite(f.name, *new)
        self.scales[f.name] = a * s
        self.assumed[f.name] = core.Stats(result.mean.copy(), result.var.copy())

    def run(self, batch: Any, targets: Sequence[core.NormLayer], emit: core.Emit) -> None:
        wanted = []
        for x in targets:
            if x.name in self._folded:
                wanted.append(self._folded[x.name].output)
            elif not self._bn[x.name].x_is_input:
                wanted.append(self._bn[x.name].x)
        arr, got = self.runner.outputs(batch, wanted, self.feeds)
        for x in targets:
            if x.name in self._folded:
                emit(x.name, got[self._folded[x.name].output])
            else:
                b = self._bn[x.name]
                emit(x.name, arr if b.x_is_input else got[b.x])

    def sequential_passes(
        self, layers: list[core.NormLayer], first: Callable[[], Any]
    ) -> list[list[core.NormLayer]]:
        """One pass per depth: layers of one depth do not depend on each other's statistics."""
        depth = self.plan.depth
        return [
            [x for x in layers if depth[x.name] == d]
            for d in sorted({depth[x.name] for x in layers})
        ]

    def cursors(self, passes: list[list[core.NormLayer]]) -> Any:
        """Each batch's frontier kept between the sequential passes, the graph cut into one
        segment per pass (see :mod:`streamnorm.onnx._segments`)."""
        onnx = require("onnx")
        targets = [Target(b.name, b.x, b.index, False) for b in self.plan.bns]
        targets += [Target(f.name, f.output, f.index, True) for f in self.plan.folded]
        model = onnx.load_from_string(self.model_bytes)
        return segment_cursors(model, targets, passes, self.source, self.feeds, self.providers)

    def remote(self) -> Callable[[], _OnnxAdapter]:
        """A picklable factory of a new adapter (its own runner, built where it is called) with
        the statistics written so far."""
        return functools.partial(_rebuild, _init_args(self))


def _init_args(adapter: _OnnxAdapter) -> dict[str, Any]:
    """The constructor arguments of ``adapter``, its dicts (statistics) copied."""
    return _copies({f.name: getattr(adapter, f.name) for f in fields(adapter) if f.init})


def _copies(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with every dict value copied, so that adapters built from it share none."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in args.items()}


def _rebuild(args: dict[str, Any]) -> _OnnxAdapter:
    """A new adapter from :func:`_init_args` (runs on a Dask worker)."""
    return _OnnxAdapter(**_copies(args))


# --------------------------------------------------------------------------------------------
# folded layers: which, their source moments


_NO_SOURCE = (
    "the model has no BatchNormalization node and no source moments for its Conv / Gemm layers "
    "(whose BatchNorm was folded at export): annotate it on the source data first "
    "(streamnorm.onnx.annotate, or `streamnorm annotate MODEL --data SOURCE --out OUT`) or give "
    "the source data (source=, or --source DATA)"
)


def _partial(bns: list[BNNode], names: list[str]) -> str:
    """The refusal of recalibrating the BatchNorm nodes only, naming every way out (in the
    Python and the command-line words)."""
    shown = ", ".join(repr(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")
    return (
        f"the model has {len(bns)} BatchNormalization node(s) and {len(names)} Conv / Gemm "
        f"layer(s) whose BatchNorm was folded at export ({shown}), but no source moments for "
        "the folded ones, so only the BatchNorm nodes could be recalibrated; annotate the model "
        "on the source data first (streamnorm.onnx.annotate, or `streamnorm annotate MODEL "
        "--data SOURCE --out OUT`), give the source data (source=, or --source DATA), drop "
        "layers that are not folded BatchNorms (exclude=, or --exclude NAME; "
        "streamnorm.onnx.folded_layers and `streamnorm annotate` list the choice and why), or "
        "recalibrate the BatchNorm nodes only on purpose (bn_only=True, or --bn-only)"
    )


def _pick(
    model: Any,
    bns: list[BNNode],
    choice: _Choice,
    stored: dict[str, meta.LayerMoments] | None,
    has_source: bool,
) -> list[int]:
    """The Conv / Gemm nodes to adapt (indices), or ``InputError`` when they cannot be."""
    if choice.bn_only:
        if choice.layers is not None:
            raise InputError(
                "bn_only=True (--bn-only) adapts no Conv / Gemm layer; drop layers= (--layers)"
            )
        if not bns:
            raise InputError(
                "bn_only=True (--bn-only) but the model has no BatchNormalization node"
            )
        return []
    annotated = None if stored is None or has_source else list(stored)
    picked = chosen(select(model, choice.layers, choice.exclude, annotated))
    if not picked and not bns:
        raise InputError(
            "the model has no BatchNormalization node to recalibrate and no Conv / Gemm layer "
            "that looks like a folded BatchNorm (streamnorm.onnx.folded_layers says why); name "
            "the Conv / Gemm layers to adapt with layers= (--layers)"
        )
    if not picked or has_source or stored is not None:
        return picked
    if bns:
        g = model.graph
        raise InputError(_partial(bns, [layer_label(g.node[i]) for i in picked]))
    raise InputError(_NO_SOURCE)


@dataclass(frozen=True)
class _Choice:
    """What the caller said about the Conv / Gemm layers (see :func:`recalibrate`)."""

    layers: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    bn_only: bool = False


def _folded_records(model: Any) -> dict[str, meta.BatchNormRecord]:
    """The BatchNorms that :func:`streamnorm.onnx.export` recorded as folded into a Conv /
    Gemm, by output name."""
    recorded = meta.read_batchnorms(model) or {}
    return {o: r for o, r in recorded.items() if r.op in ("Conv", "Gemm")}


def _recorded_bns(model: Any, bns: list[BNNode]) -> frozenset[str]:
    """The BatchNorm nodes that :func:`streamnorm.onnx.export` recorded (PyTorch modules)."""
    recorded = meta.read_batchnorms(model) or {}
    g = model.graph
    return frozenset(
        b.name
        for b in bns
        if (r := recorded.get(g.node[b.index].output[0])) is not None
        and r.op == "BatchNormalization"
    )


def _recorded_layers(model: Any, recorded: dict[str, meta.BatchNormRecord]) -> list[int]:
    """The Conv / Gemm nodes (indices) of ``recorded``; ``RecordError`` for a missing one."""
    g = model.graph
    outputs = {n.output[0]: i for i, n in enumerate(g.node) if n.output}
    picked = []
    for out, r in recorded.items():
        i = outputs.get(out)
        if i is None or g.node[i].op_type != r.op:
            raise RecordError(
                f"the BatchNorm record in the model's metadata puts {r.module!r} in the {r.op} "
                f"output {out!r}, which the model does not have; export the model again"
            )
        picked.append(i)
    return sorted(picked)


def _exact(
    folded: list[FoldedLayer], recorded: dict[str, meta.BatchNormRecord]
) -> dict[str, meta.BatchNormRecord]:
    """Per folded layer with a BatchNorm record: the record (checked against the layer)."""
    out = {}
    for f in folded:
        r = recorded.get(f.output)
        if r is None:
            continue
        if r.channels != f.channels:
            raise RecordError(
                f"the BatchNorm record of {r.module!r} has {r.channels} channels, the layer "
                f"{f.name!r} {f.channels}; export the model again"
            )
        out[f.name] = r
    return out


def _remember_external(loaded: Loaded, folded: list[FoldedLayer]) -> None:
    """The weights of a model with external data stay external (also their copies)."""
    if loaded.external:
        loaded.external.update(n for f in folded for n in (f.weight, f.bias))


def _from_metadata(stored: dict[str, meta.LayerMoments] | None, f: FoldedLayer) -> core.Stats:
    m = None if stored is None else stored.get(f.output)
    if m is None:
        have = sorted(stored or {})
        raise InputError(
            f"layer {f.name!r} (output {f.output!r}) has no source moments in the model's "
            f"metadata (annotated: {have[:6]}); annotate it (layers=) or give source="
        )
    if m.mean.shape != (f.channels,):
        raise RecordError(
            f"the source moments of {f.output!r} in the model's metadata have {m.mean.size} "
            f"channels, the layer {f.channels}; annotate this model again"
        )
    return core.Stats(m.mean, m.var)


def _stats(m: Moments, output: str) -> core.Stats:
    mean = np.asarray(m.mean, dtype=np.float64).reshape(-1)
    var = np.asarray(m.var(0), dtype=np.float64).reshape(-1)
    if not (np.isfinite(mean).all() and np.isfinite(var).all()):
        raise InputError(
            f"the output {output!r} has non-finite values (NaN/Inf) on the source data; check "
            "the data and the model"
        )
    return core.Stats(mean, var)


def _measure(
    runner: _Runner,
    feeds: dict[str, np.ndarray],
    outputs: list[str],
    stream: core.Stream,
    progress: bool,
) -> tuple[dict[str, Moments], int]:
    """Per-channel moments (channels on axis 1) of ``outputs`` over one pass; the samples."""
    acc = {o: Moments() for o in outputs}
    samples = 0
    bar = core.progress_bar(stream.batches_per_pass(), progress, "source moments")
    try:
        for batch in stream.batches():
            arr, got = runner.outputs(batch, outputs, feeds)
            for o in outputs:
                x = got[o]
                acc[o].update(x, axis=tuple(i for i in range(x.ndim) if i != 1))
            samples += int(arr.shape[0])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if samples == 0:
        raise InputError("the source data are empty: give at least one sample")
    return acc, samples


def _annotate_model(
    model: Any, layers: list[tuple[str, str, str]], measured: dict[str, Moments], samples: int
) -> None:
    """Store ``measured`` (by output) for ``layers`` ``(output, node, op)`` in the metadata."""
    entries = [meta.LayerMoments(o, node, op, measured[o]) for o, node, op in layers]
    meta.store(model, meta.dumps(entries, samples))


def _train_mode(
    cal: Any,
    bns: list[BNNode],
    folded: list[FoldedLayer],
    sources: dict[str, core.Stats],
    exact: dict[str, meta.BatchNormRecord],
    feeds: dict[str, np.ndarray],
    feed: ModelInput,
) -> Any:
    """The calibration model of ``mode="one-pass"`` (see :mod:`streamnorm.onnx._train`): a
    folded layer normalizes its batch to its source moments, or exactly to its recorded
    BatchNorm's ``beta``, ``|gamma|`` and ``eps``."""
    targets = {}
    for f in folded:
        r = exact.get(f.name)
        if r is None:
            targets[f.name] = TrainTarget.of_moments(sources[f.name].mean, sources[f.name].var)
        else:
            m, k, f0 = r.target
            targets[f.name] = TrainTarget(m, k, r.eps * f0**2)
    dtypes = {f.name: feeds[f.weight].dtype for f in folded}
    return train_mode_model(cal, bns, folded, targets, dtypes, padded=bool(feed.fixed_batch))


def _check_data_file(loaded: Loaded, op: str) -> None:
    if loaded.external and os.path.realpath(data_path(op)) in loaded.files:
        raise OutputPathError(
            f"writing {op!r} would overwrite {data_path(op)!r}, which the input model reads "
            "its weights from; choose another output name"
        )


# --------------------------------------------------------------------------------------------
# the public functions


def recalibrate(
    model_path: str | os.PathLike[str],
    data: Any,
    out_path: str | os.PathLike[str],
    *,
    mode: str = "sequential",
    num_samples: int | str | None = None,
    batch_size: int = 64,
    input_name: str | None = None,
    key: str | None = None,
    progress: bool = True,
    client: Any = None,
    providers: list[str] | None = None,
    tol: float | None = None,
    source: Any = None,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    bn_only: bool = False,
    cache_bytes: int | None = None,
) -> core.CalibrationReport:
    """Write a copy of an ONNX model whose BatchNorm statistics are re-estimated from data, and
    whose folded Conv / Gemm layers are adapted to it by moment matching.

    Parameters
    ----------
    model_path : str or path-like
        An ONNX model (opset 9 or later, external data allowed). Never modified.
    data : numpy.ndarray, torch.Tensor, path or streamnorm Dataset, shape (N, ...)
        Samples for the model input; a path is opened with
        :func:`streamnorm.calibrate.open_data` (``.npy``, ``.npz`` with ``key``, a folder or glob
        of ``.npy`` shards) and read batch by batch.
    out_path : str or path-like
        The recalibrated model, written atomically; with external data in the input, its
        tensors go to ``out_path + ".data"`` next to it. It may be none of the files read.
    mode : {"sequential", "one-pass"}
        ``sequential``: one pass per group of BatchNorm nodes of the same depth, in topological
        order, each computed with all upstream nodes already recalibrated, which reaches the
        fixed point. ``one-pass``: PyTorch's train-mode pass (``update_bn``): one pass in which
        every BatchNorm node, and every adapted folded layer, normalizes with the statistics of
        the current batch (computed in the graph; see Notes), so deeper layers see their input
        as in :func:`streamnorm.torch.recalibrate` with ``mode="one-pass"``.
    num_samples : int or "auto", optional
        Use only the first ``num_samples`` samples. ``"auto"``: each pass streams batches
        until every channel's ``mean_se`` and ``var_se`` are below ``tol`` (default 0.01), or
        the data end (see :func:`streamnorm.torch.recalibrate`).
    batch_size : int, default 64
        Samples per onnxruntime call (a model with a fixed batch dimension uses its own).
    input_name : str, optional
        The graph input to feed, when the model has several.
    key : str, optional
        The array of a ``.npz`` data file.
    progress : bool, default True
        A tqdm bar on a terminal.
    client : distributed.Client, optional
        Run each pass on a Dask cluster, one task per shard of the data.
    providers : list of str, optional
        onnxruntime execution providers (default CPU).
    tol : float, optional
        The tolerance of ``num_samples="auto"``.
    source : array, tensor, path or streamnorm Dataset, shape (N, ...), optional
        Source (training) data: the source moments of the folded layers are measured on it with
        the model as given (``key`` applies to it too), and stored in the output's metadata.
        Without it they come from the model's metadata (:func:`annotate`).
    layers : list of str, optional
        The Conv / Gemm layers to adapt by moment matching (node or output names). Default: the
        layers annotated in the metadata; with ``source``, or for a model without annotation,
        those the graph shows a folded BatchNorm in (:func:`folded_layers` lists them and why).
        ``BatchNormalization`` nodes are recalibrated unless named in ``exclude``.
    exclude : list of str, optional
        Layers (node or output names) to leave as they are: Conv / Gemm layers taken out of the
        default or of ``layers``, and ``BatchNormalization`` nodes whose stored statistics are
        kept (e.g. a detection head whose statistics suit the new data better than their
        re-estimate; see the README's "Real models").
    bn_only : bool, default False
        Recalibrate the ``BatchNormalization`` nodes only and adapt no Conv / Gemm layer. Without
        it, a model with BatchNorm nodes and folded layers but no source moments for them is
        refused rather than recalibrated in part.
    cache_bytes : int, optional
        ``mode="sequential"``: memory for the tensors each batch hands from one depth to the
        next (default 1 GiB). The graph is cut into one segment per depth and every batch runs
        each segment once, so the passes cost about one inference pass (plus the folded layers
        once more); batches beyond the budget are recomputed from the data for every depth. 0
        recomputes every batch. The results are the same up to float rounding.

    Returns
    -------
    CalibrationReport
        Per node: samples, batches and the shift of mean and sigma in units of the old sigma.

    Notes
    -----
    The per-node statistics are :class:`~streamnorm.Population` estimators (see
    :mod:`streamnorm.calibrate`). The ONNX graph always normalizes with its stored statistics, so
    the moments of a node's input depend on the statistics of every node upstream;
    ``sequential`` recomputes depth by depth so that, afterwards, every node's input has exactly
    the stored mean and variance on the data. ``one-pass`` runs a copy of the graph in train
    mode instead: each BatchNorm node reads the mean and biased variance of its input over the
    batch, and a folded layer's output is normalized with its batch moments and mapped to its
    source moments (``mean_s + std_s (y - m_b) / sqrt(v_b)``: the BatchNorm's ``beta`` and
    ``|gamma|`` up to ``eps``; exactly, ``eps`` included, for a layer recorded by
    :func:`streamnorm.onnx.export`). With a fixed batch dimension, the padding of a short
    batch stays out of the batch statistics. ``var`` is written biased (``M2 / n``, the
    convention of the ONNX operator), in the initializer's dtype; ``epsilon``, the scale and the
    bias are untouched. An initializer shared by several nodes (or with other operators, or
    reached through ``Identity`` / ``Constant``) is copied so that each BatchNorm node gets its
    own; the originals that nothing reads any more (initializers, ``Constant`` and ``Identity``
    nodes) are dropped, so the file keeps its size. Statistics fed as graph inputs are refused
    with ``ValueError``: the file stores nothing to rewrite.

    A folded layer (a Conv / Gemm that absorbed a BatchNorm at export) gets
    ``y' = mean_s + std_s (y - mean_t) / std_t`` per output channel, folded into its weight and
    bias (see :mod:`streamnorm.onnx._folded`), with ``(mean_t, std_t)`` the moments of its output
    on ``data``. Folded layers and BatchNorm nodes are adapted together, depth by depth in
    topological order (``sequential``: each with everything upstream already adapted). A model
    with BatchNorm statistics that were the exact population statistics of the source data
    before export then equals, up to BatchNorm's ``eps``, the same network recalibrated before
    export. Folded layers need source moments (``source`` or the metadata): a model with
    folded layers and none is refused with ``ValueError`` (also when it has BatchNorm nodes:
    recalibrating those alone leaves the folded layers tuned to the old data; ``bn_only=True``
    asks for that on purpose). Weights shared with other nodes are copied; weights stored as
    external data stay external.

    A model written by :func:`streamnorm.onnx.export` carries a record of its PyTorch
    BatchNorms: without ``layers``, the folded layers are exactly those recorded, and each is
    adapted as recalibrating its BatchNorm would, eps included, with no source moments
    (``beta + |gamma| (y - mean_t) / sqrt(var_t + eps s^2)``, ``s`` the factor folded in); the
    variances of recorded BatchNorms are PyTorch's (unbiased, ``M2 / (n - 1)``), so the result
    equals :func:`streamnorm.torch.recalibrate` (population, sequential) then export.
    """
    require("onnxruntime", "onnx")
    onnx = require("onnx")
    mp, op = check_paths(model_path, out_path)
    budget, auto_tol = core.check_budget(num_samples, tol)
    settings = core.Settings.checked(
        core.StatsSpec("population"), mode, progress, client, auto_tol, cache_bytes
    )
    bs = check_size("batch_size", batch_size)
    loaded = load(mp)
    model = loaded.model
    bns = prepare(model, allow_none=True)
    kept, exclude = split_excluded(model, exclude)
    bns = [b for b in bns if b.index not in kept]
    stored = meta.read(model)
    recorded = _folded_records(model)
    choice = _Choice(layers, exclude, bn_only)
    if recorded and layers is None and not bn_only:
        picked = _recorded_layers(model, recorded)
        if exclude is not None:
            dropped = set(named_layers(model, exclude, "exclude"))
            picked = [i for i in picked if i not in dropped]
    else:
        picked = _pick(model, bns, choice, stored, source is not None)
    folded = prepare_folded(model, picked, {b.name for b in bns})
    _remember_external(loaded, folded)
    opened = open_source(data, key)
    src_data = None if source is None else open_source(source, key)
    feed = model_input(model, input_name)
    check_fit(tuple(opened.shape), np.dtype(opened.dtype), feed)
    if src_data is not None:
        check_fit(tuple(src_data.shape), np.dtype(src_data.dtype), feed)
    stream = core.Stream.of(opened, feed.fixed_batch or bs, budget)
    read_files = input_files(loaded, opened)
    if src_data is not None:
        read_files += input_files(loaded, src_data)
    _check_data_file(loaded, op)
    check_outputs(output_files(loaded, op), read_files)

    inits = {t.name: t for t in model.graph.initializer}
    weights = [n for f in folded for n in (f.weight, f.bias)]
    names = [n for b in bns for n in (b.mean, b.var)] + weights
    feeds = {n: onnx.numpy_helper.to_array(inits[n]) for n in names}
    cal = calibration_model(model, bns, fed=weights, exposed=[f.output for f in folded])
    runner = _runner(cal, feed, providers, "recalibration of")
    measured: dict[str, Moments] = {}
    if src_data is not None and folded:
        src_stream = core.Stream.of(src_data, feed.fixed_batch or bs)
        measured, src_samples = _measure(
            runner, feeds, [f.output for f in folded], src_stream, progress
        )
        sources = {f.name: _stats(measured[f.output], f.output) for f in folded}
    else:
        sources = {f.name: _from_metadata(stored, f) for f in folded if f.output not in recorded}
    exact = _exact(folded, recorded)
    sources.update({n: core.Stats(*r.source) for n, r in exact.items()})
    if settings.mode == "one-pass":
        train = _train_mode(cal, bns, folded, sources, exact, feeds, feed)
        runner = _runner(train, feed, providers, "recalibration of")
    depth_of = depths(model, {b.index for b in bns} | {f.index for f in folded})
    plan = _Plan(
        bns,
        folded,
        sources,
        {
            **{b.name: depth_of[b.index] for b in bns},
            **{f.name: depth_of[f.index] for f in folded},
        },
        exact,
        _recorded_bns(model, bns),
    )
    adapter = _OnnxAdapter(runner.model_bytes, plan, feeds, dict(sources), feed, providers)
    adapter.runner = runner
    report = core.calibrate(adapter, stream, settings)
    folded_names = {f.name for f in folded}
    for x in report.layers:
        x.kind = "folded" if x.name in folded_names else x.kind
    for n in names:
        inits[n].CopyFrom(onnx.numpy_helper.from_array(adapter.feeds[n], n))
    if measured:
        _annotate_model(model, [(f.output, f.node, f.op) for f in folded], measured, src_samples)
    prune(model)
    save(loaded, op)
    return report


def annotate(
    model_path: str | os.PathLike[str],
    source_data: Any,
    out_path: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = 64,
    num_samples: int | None = None,
    input_name: str | None = None,
    key: str | None = None,
    progress: bool = True,
    providers: list[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, Moments]:
    """Write a copy of an ONNX model that carries the source moments of its folded layers.

    Measures, on the source (training) data, the per-channel count, mean and M2 of the output
    of each selected Conv / Gemm layer, with the model as it is, and stores them in the model's
    ``metadata_props`` (key ``"streamnorm.source_moments"``, a versioned JSON format described
    in :mod:`streamnorm.onnx._metadata`). :func:`recalibrate` then adapts those layers to new
    data without the source data.

    Parameters
    ----------
    model_path : str or path-like
        An ONNX model, e.g. exported with ``torch.onnx.export`` in eval mode (which folds every
        BatchNorm after a Conv into the Conv). Never modified.
    source_data : numpy.ndarray, torch.Tensor, path or streamnorm Dataset, shape (N, ...)
        The data the model's BatchNorm statistics were estimated on (as for ``data`` of
        :func:`recalibrate`).
    out_path : str or path-like
        The annotated model, written atomically (the graph and weights unchanged; an older
        annotation is replaced, other metadata kept). It may be none of the files read.
    layers : list of str, optional
        Conv / Gemm layers (node or output names). Default: those the graph shows a folded
        BatchNorm in (:func:`folded_layers` lists them and why).
    batch_size : int, default 64
        Samples per onnxruntime call.
    num_samples : int, optional
        Use only the first ``num_samples`` samples.
    input_name, key, progress, providers, exclude
        As in :func:`recalibrate`.

    Returns
    -------
    dict of str to Moments
        Per layer (node name, or output name for an unnamed node: the names of the
        recalibration report): its per-channel moments, shape (C,).

    Raises
    ------
    ValueError
        No layer to annotate in a model without ``BatchNormalization`` nodes, a name that is
        not a Conv / Gemm node, data that do not fit the model, non-finite outputs. Nothing is
        written.

    Notes
    -----
    A model whose BatchNorms are all kept as nodes (nothing looks folded) gets an annotation
    with no layer: :func:`recalibrate` then recalibrates its BatchNorm nodes, knowing that
    nothing else needs source moments.
    """
    require("onnxruntime", "onnx")
    mp, op = check_paths(model_path, out_path)
    bs = check_size("batch_size", batch_size)
    loaded = load(mp)
    model = loaded.model
    picked = chosen(select(model, layers, exclude))
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    if not picked and not has_bn:
        raise InputError(
            "the model has no Conv / Gemm layer that looks like a folded BatchNorm "
            "(streamnorm.onnx.folded_layers says why); name the layers to annotate with layers= "
            "(--layers)"
        )
    nodes = [model.graph.node[i] for i in picked]
    opened = open_source(source_data, key)
    feed = model_input(model, input_name)
    check_fit(tuple(opened.shape), np.dtype(opened.dtype), feed)
    stream = core.Stream.of(opened, feed.fixed_batch or bs, num_samples)
    _check_data_file(loaded, op)
    check_outputs(output_files(loaded, op), input_files(loaded, opened))
    outputs = [n.output[0] for n in nodes]
    runner = _runner(calibration_model(model, [], exposed=outputs), feed, providers, "annotating")
    measured, samples = _measure(runner, {}, outputs, stream, progress)
    for o in outputs:
        _stats(measured[o], o)
    _annotate_model(model, [(n.output[0], n.name, n.op_type) for n in nodes], measured, samples)
    save(loaded, op)
    return {layer_label(n): measured[n.output[0]] for n in nodes}
