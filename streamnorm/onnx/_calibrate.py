"""ONNX adapter (extra ``onnx``): recalibrate the BatchNorm statistics stored in an ONNX file.

:func:`recalibrate` reads a model, runs it with onnxruntime over calibration data in batches,
computes the per-channel moments of every ``BatchNormalization`` input with streamnorm's kernels
and writes a new file whose ``mean`` / ``var`` initializers hold them. The input file is never
modified.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any

import numpy as np

from .._extras import require
from .._moments import Moments, atomic_write
from ..calibrate import _data
from ..torch._calibrate import CalibrationReport, _LayerStats, layer_report, progress_bar
from ._graph import calibration_model, prepare

__all__ = ["recalibrate"]

MODES = ("sequential", "one-pass")
_MAX_PROTO = 2**31 - 2**20  # protobuf's 2 GiB limit, with room to spare


# --------------------------------------------------------------------------------------------
# loading


def _load(path: str) -> tuple[Any, set[str], set[str]]:
    """The model with its external data loaded, the real paths of every file it came from, and
    the names of the tensors stored as external data."""
    onnx = require("onnx")
    from onnx import external_data_helper as ext

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ValueError(f"{path!r} is not a readable ONNX model: {e}") from e
    files = {os.path.realpath(path)}
    base = os.path.dirname(os.path.abspath(path))
    external: set[str] = set()
    for t in ext._get_all_tensors(model):
        if ext.uses_external_data(t):
            external.add(t.name)
            info = ext.ExternalDataInfo(t)
            files.add(os.path.realpath(os.path.join(base, info.location)))
    if external:
        try:
            ext.load_external_data_for_model(model, base)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"cannot read the external data of {path!r}: {e}") from e
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ValueError(f"{path!r} is not a valid ONNX model: {e}") from e
    return model, files, external


def _np_dtype(elem_type: int) -> np.dtype:
    onnx = require("onnx")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _model_input(model: Any, input_name: str | None) -> tuple[str, list[int | None], np.dtype]:
    g = model.graph
    inits = {t.name for t in g.initializer}
    real = [i for i in g.input if i.name not in inits]
    if input_name is None:
        if len(real) != 1:
            raise ValueError(
                f"the model has {len(real)} inputs {[i.name for i in real]}; recalibration feeds "
                "one array: name it with input_name="
            )
        vi = real[0]
    else:
        found = [i for i in real if i.name == input_name]
        if not found:
            raise ValueError(
                f"the model has no input {input_name!r}; its inputs are {[i.name for i in real]}"
            )
        others = [i.name for i in real if i.name != input_name]
        if others:
            raise ValueError(
                f"the model also needs inputs {others}, which recalibration cannot feed"
            )
        vi = found[0]
    tt = vi.type.tensor_type
    dims: list[int | None] = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim
    ]
    return vi.name, dims, _np_dtype(tt.elem_type)


def _check_fit(shape: tuple[int, ...], dtype: np.dtype, name: str, dims: list[int | None],
               want: np.dtype) -> None:  # fmt: skip
    if dims and len(shape) != len(dims):
        raise ValueError(
            f"data has samples of shape {shape[1:]} (rank {len(shape)} with the batch axis) but "
            f"the model input {name!r} has rank {len(dims)} (shape {dims})"
        )
    for k, (have, need) in enumerate(zip(shape[1:], dims[1:], strict=False), start=1):
        if need is not None and have != need:
            raise ValueError(
                f"data has samples of shape {shape[1:]}; the model input {name!r} expects "
                f"{['N' if d is None else d for d in dims]} (axis {k}: {have} != {need})"
            )
    if dtype.kind not in "fiub":
        raise TypeError(f"data dtype {dtype} is not numeric; the model input needs {want}")
    if want.kind == "f" and dtype.kind in "fiub":
        return
    if not np.can_cast(dtype, want, casting="same_kind"):
        raise TypeError(
            f"data dtype {dtype} does not fit the model input {name!r} of dtype {want}; "
            f"convert it first, e.g. x.astype('{want}')"
        )


# --------------------------------------------------------------------------------------------
# running


def _session(source: Any, providers: list[str] | None) -> Any:
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(source, opts, providers=providers or ["CPUExecutionProvider"])


def _run_shard(
    session: Any,
    shard: Any,
    *,
    input_name: str,
    targets: list[tuple[str, str, bool]],
    feeds: dict[str, np.ndarray],
    batch_size: int,
    fixed_batch: int | None,
    dtype: np.dtype,
    bar: Any = None,
) -> dict[str, _LayerStats]:
    """Moments of the inputs of ``targets`` ((node name, X name, X is the graph input))."""
    stats = {name: _LayerStats(0.0, None) for name, _, _ in targets}
    out_names = sorted({x for _, x, is_in in targets if not is_in})
    bs = fixed_batch or batch_size
    for batch in _data.iter_batches(shard, bs):
        arr = np.ascontiguousarray(np.asarray(batch), dtype=dtype)
        n = arr.shape[0]
        if fixed_batch is not None and n < fixed_batch:  # rows are independent in eval mode
            arr = np.concatenate([arr, np.repeat(arr[:1], fixed_batch - n, axis=0)])
        res = session.run(out_names, {input_name: arr, **feeds}) if out_names else []
        got = dict(zip(out_names, res, strict=True))
        for name, x, is_in in targets:
            a = arr if is_in else got[x]
            stats[name].add(np.asarray(a)[:n])
        if bar is not None:
            bar.update(1)
    return stats


def _shard_pass(
    shard: Any,
    *,
    model_bytes: bytes,
    input_name: str,
    targets: list[tuple[str, str, bool]],
    feeds: dict[str, np.ndarray],
    batch_size: int,
    fixed_batch: int | None,
    dtype: str,
    providers: list[str] | None,
) -> dict[str, Moments]:
    """Per-node moments of one shard; a session of its own (runs on a Dask worker)."""
    session = _session(model_bytes, providers)
    stats = _run_shard(
        session, shard, input_name=input_name, targets=targets, feeds=feeds,
        batch_size=batch_size, fixed_batch=fixed_batch, dtype=np.dtype(dtype),
    )  # fmt: skip
    out: dict[str, Moments] = {}
    for name, st in stats.items():
        out.update(st.to_moments(name))
    return out


# --------------------------------------------------------------------------------------------
# writing


def _save(model: Any, out_path: str, external: set[str], inputs: set[str]) -> None:
    """Write atomically; tensors that were external data in the input stay external."""
    onnx = require("onnx")
    from onnx import external_data_helper as ext

    if not external and model.ByteSize() < _MAX_PROTO:
        try:
            onnx.checker.check_model(model)
        except Exception as e:
            raise ValueError(f"the recalibrated model does not pass onnx.checker: {e}") from e
        data = model.SerializeToString()
        atomic_write(out_path, lambda f: f.write(data))
        return
    folder = os.path.dirname(os.path.abspath(out_path))
    location = os.path.basename(out_path) + ".data"
    data_path = os.path.join(folder, location)
    if os.path.realpath(data_path) in inputs:
        raise ValueError(
            f"writing {out_path!r} would overwrite {data_path!r}, which the input model reads "
            "its weights from; choose another output name"
        )
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=folder) as tmp:
        tmp_model = os.path.join(tmp, os.path.basename(out_path))
        marked = False
        for t in ext._get_all_tensors(model):
            if t.name in external and t.HasField("raw_data"):
                ext.set_external_data(t, location)
                marked = True
        if not marked or model.ByteSize() >= _MAX_PROTO:
            ext.convert_model_to_external_data(
                model, all_tensors_to_one_file=True, location=location, size_threshold=1024
            )
        onnx.save_model(model, tmp_model)
        try:
            onnx.checker.check_model(tmp_model)
        except Exception as e:
            raise ValueError(f"the recalibrated model does not pass onnx.checker: {e}") from e
        for p in (os.path.join(tmp, location), tmp_model):
            if os.path.exists(p):
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        if os.path.exists(os.path.join(tmp, location)):
            os.replace(os.path.join(tmp, location), data_path)
        os.replace(tmp_model, out_path)


# --------------------------------------------------------------------------------------------
# the public function


def _check_paths(model_path: Any, out_path: Any) -> tuple[str, str]:
    for what, p in (("model_path", model_path), ("out_path", out_path)):
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"{what} must be a str or path-like, got {type(p).__name__}")
    mp, op = os.fspath(model_path), os.fspath(out_path)
    if not os.path.isfile(mp):
        raise FileNotFoundError(f"model file {mp!r} does not exist")
    if os.path.realpath(mp) == os.path.realpath(op):
        raise ValueError(
            f"out_path {op!r} is the input model; the input file is never modified, write to "
            "another path"
        )
    folder = os.path.dirname(os.path.abspath(op))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the output folder {folder!r} does not exist")
    return mp, op


def _open(data: Any, key: str | None) -> Any:
    if isinstance(data, (str, os.PathLike)):
        return _data.open_data(data, key)
    if isinstance(data, _data.Dataset):
        return data
    if hasattr(data, "detach") and hasattr(data, "cpu"):
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        if data.ndim < 1 or len(data) == 0:
            raise ValueError(f"data is empty (shape {data.shape}); give at least one sample")
        return data
    raise TypeError(
        "data must be a numpy array, a tensor, a path (.npy, .npz, folder or glob of .npy) or a "
        f"streamnorm Dataset, got {type(data).__name__}"
    )


def recalibrate(
    model_path: str | os.PathLike[str],
    data: Any,
    out_path: str | os.PathLike[str],
    *,
    mode: str = "sequential",
    num_samples: int | None = None,
    batch_size: int = 64,
    input_name: str | None = None,
    key: str | None = None,
    progress: bool = True,
    client: Any = None,
    providers: list[str] | None = None,
) -> CalibrationReport:
    """Write a copy of an ONNX model whose BatchNorm statistics are re-estimated from data.

    Parameters
    ----------
    model_path : str or path-like
        An ONNX model (opset 9 or later, external data allowed). Never modified.
    data : numpy.ndarray, torch.Tensor, path or streamnorm Dataset, shape (N, ...)
        Samples for the model input; a path is opened with
        :func:`streamnorm._data.open_data` (``.npy``, ``.npz`` with ``key``, a folder or glob of
        ``.npy`` shards) and read batch by batch.
    out_path : str or path-like
        The recalibrated model, written atomically; with external data in the input, its
        tensors go to ``out_path + ".data"`` next to it.
    mode : {"sequential", "one-pass"}
        ``sequential``: one pass per group of BatchNorm nodes of the same depth, in topological
        order, each computed with all upstream nodes already recalibrated, which reaches the
        fixed point. ``one-pass``: one pass with the old statistics everywhere (approximate: the
        inputs of deeper nodes come from upstream layers normalized by old statistics).
    num_samples : int, optional
        Use only the first ``num_samples`` samples.
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

    Returns
    -------
    CalibrationReport
        Per node: samples, batches and the shift of mean and sigma in units of the old sigma.

    Notes
    -----
    The ONNX graph always normalizes with its stored statistics, so the moments of a node's input
    depend on the statistics of every node upstream; ``sequential`` recomputes depth by depth so
    that, afterwards, every node's input has exactly the stored mean and variance on the data.
    ``var`` is written biased (``M2 / n``, the convention of the ONNX operator), in the
    initializer's dtype; ``epsilon``, the scale and the bias are untouched. An initializer
    shared by several nodes (or with other operators, or reached through ``Identity`` /
    ``Constant``) is copied so that each BatchNorm node gets its own. Statistics fed as graph
    inputs are refused with ``ValueError``: the file stores nothing to rewrite.
    """
    require("onnxruntime", "onnx")
    mp, op = _check_paths(model_path, out_path)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))
        or num_samples < 1
    ):  # fmt: skip
        raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
    bs = _data._check_batch_size(batch_size)
    model, inputs, external = _load(mp)
    bns = prepare(model)
    ds = _data.limit(_open(data, key), num_samples)
    in_name, dims, in_dtype = _model_input(model, input_name)
    _check_fit(tuple(ds.shape), np.dtype(ds.dtype), in_name, dims, in_dtype)
    fixed = dims[0] if dims and dims[0] is not None else None

    inits = {t.name: t for t in model.graph.initializer}
    onnx = require("onnx")
    feeds = {n: onnx.numpy_helper.to_array(inits[n]) for b in bns for n in (b.mean, b.var)}
    old = {b.name: (feeds[b.mean].astype(np.float64), feeds[b.var].astype(np.float64)) for b in bns}
    cal = calibration_model(model, bns)
    if cal.ByteSize() >= _MAX_PROTO:
        raise ValueError(
            "the model is larger than 2 GiB once loaded; recalibration of such models through "
            "onnxruntime sessions from memory is not supported"
        )
    cal_bytes = cal.SerializeToString()
    groups = (
        [[b for b in bns if b.depth == d] for d in sorted({b.depth for b in bns})]
        if mode == "sequential"
        else [bns]
    )
    shard_list = _data.shards(ds, fixed or bs)
    per_pass = sum(-(-(s.stop - s.start if isinstance(s, _data.FileShard) else len(s)) //
                     (fixed or bs)) for s in shard_list)  # fmt: skip
    try:
        session = None if client is not None else _session(cal_bytes, providers)
    except Exception as e:
        raise ValueError(f"onnxruntime cannot run the model: {e}") from e
    bar = progress_bar(per_pass * len(groups), progress, "calibrating")
    results: dict[str, _LayerStats] = {}
    try:
        for group in groups:
            targets = [(b.name, b.x, b.x_is_input) for b in group]
            stats = _pass(
                session, client, shard_list, cal_bytes, targets, feeds, in_name, bs, fixed,
                in_dtype, providers, bar,
            )  # fmt: skip
            for b in group:
                st = stats[b.name]
                mean = np.asarray(st.pooled.mean)
                var = np.asarray(st.pooled.var(ddof=0))
                if mean.shape != (b.channels,):
                    raise ValueError(
                        f"the input of node {b.name!r} has {mean.shape} channels, the node "
                        f"{b.channels}"
                    )
                if not (np.isfinite(mean).all() and np.isfinite(var).all()):
                    raise ValueError(
                        f"the input of node {b.name!r} has non-finite values (NaN/Inf); check "
                        "the data (nothing was written)"
                    )
                feeds[b.mean] = mean.astype(feeds[b.mean].dtype)
                feeds[b.var] = var.astype(feeds[b.var].dtype)
                results[b.name] = st
    finally:
        if bar is not None:
            bar.close()
    for b in bns:
        for n in (b.mean, b.var):
            inits[n].CopyFrom(onnx.numpy_helper.from_array(feeds[n], n))
    _save(model, op, external, inputs)
    reports = [
        layer_report(
            b.name, results[b.name].samples, results[b.name].batches, *old[b.name],
            feeds[b.mean].astype(np.float64), feeds[b.var].astype(np.float64), b.eps,
        )
        for b in bns
    ]  # fmt: skip
    return CalibrationReport(
        layers=reports, estimator="population", mode=mode,
        samples=max((r.samples for r in reports), default=0),
    )  # fmt: skip


def _pass(
    session: Any, client: Any, shard_list: list[Any], cal_bytes: bytes,
    targets: list[tuple[str, str, bool]], feeds: dict[str, np.ndarray], in_name: str, bs: int,
    fixed: int | None, in_dtype: np.dtype, providers: list[str] | None, bar: Any,
) -> dict[str, _LayerStats]:  # fmt: skip
    if client is not None:
        from ..calibrate._distributed import map_merge

        fn = functools.partial(
            _shard_pass, model_bytes=cal_bytes, input_name=in_name, targets=targets,
            feeds=dict(feeds), batch_size=bs, fixed_batch=fixed, dtype=in_dtype.str,
            providers=providers,
        )  # fmt: skip
        merged = map_merge(client, shard_list, fn)
        return {name: _LayerStats.from_moments(name, merged) for name, _, _ in targets}
    total: dict[str, _LayerStats] = {name: _LayerStats(0.0, None) for name, _, _ in targets}
    for shard in shard_list:
        try:
            part = _run_shard(
                session, shard, input_name=in_name, targets=targets, feeds=feeds,
                batch_size=bs, fixed_batch=fixed, dtype=in_dtype, bar=bar,
            )  # fmt: skip
        except Exception as e:
            if type(e).__module__.startswith("onnxruntime"):
                raise ValueError(f"onnxruntime failed on the data: {e}") from e
            raise
        for name, st in part.items():
            t = total[name]
            t.pooled += st.pooled
            t.batch += st.batch
            t.sizes += st.sizes
    return total
