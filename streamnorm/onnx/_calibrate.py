"""Recalibrate the BatchNorm statistics stored in an ONNX file (the ONNX side of
:mod:`streamnorm.calibrate`).

:class:`_OnnxAdapter` runs the model with onnxruntime, the statistics fed as inputs of a session
made once (:func:`~streamnorm.onnx._graph.calibration_model`), hands every
``BatchNormalization`` input to the core and keeps the new statistics; :func:`recalibrate` loads
the model, checks the paths and the data, and writes a new file. The input file is never
modified.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import calibrate as core
from .._errors import InputError, InputNotFoundError, InputTypeError, OutputPathError
from .._extras import require
from .._io import atomic_write, check_output
from .._validate import check_size, is_torch_tensor
from ._graph import BNNode, calibration_model, prepare

__all__ = ["recalibrate"]

_MAX_PROTO = 2**31 - 2**20  # protobuf's 2 GiB limit, with room to spare


# --------------------------------------------------------------------------------------------
# loading


@dataclass
class _Loaded:
    """A model with its external data loaded.

    Attributes
    ----------
    model : onnx.ModelProto
    files : set of str
        Real paths of every file it came from (the model and its external data).
    external : set of str
        Names of the tensors stored as external data.
    """

    model: Any
    files: set[str]
    external: set[str]


def _load(path: str) -> _Loaded:
    onnx = require("onnx")
    from onnx import external_data_helper as ext

    try:
        model = onnx.load(path, load_external_data=False)
    except OSError:
        raise
    except Exception as e:  # protobuf DecodeError and friends
        raise InputError(f"{path!r} is not a readable ONNX model: {e}") from e
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
            raise InputError(f"cannot read the external data of {path!r}: {e}") from e
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise InputError(f"{path!r} is not a valid ONNX model: {e}") from e
    return _Loaded(model, files, external)


@dataclass(frozen=True)
class _Input:
    """The graph input recalibration feeds: name, dims (``None`` where dynamic), dtype."""

    name: str
    dims: list[int | None]
    dtype: np.dtype

    @property
    def fixed_batch(self) -> int | None:
        return self.dims[0] if self.dims and self.dims[0] is not None else None


def _model_input(model: Any, input_name: str | None) -> _Input:
    onnx = require("onnx")
    g = model.graph
    inits = {t.name for t in g.initializer}
    real = [i for i in g.input if i.name not in inits]
    if input_name is None:
        if len(real) != 1:
            raise InputError(
                f"the model has {len(real)} inputs {[i.name for i in real]}; recalibration feeds "
                "one array: name it with input_name="
            )
        vi = real[0]
    else:
        found = [i for i in real if i.name == input_name]
        if not found:
            raise InputError(
                f"the model has no input {input_name!r}; its inputs are {[i.name for i in real]}"
            )
        others = [i.name for i in real if i.name != input_name]
        if others:
            raise InputError(
                f"the model also needs inputs {others}, which recalibration cannot feed"
            )
        vi = found[0]
    tt = vi.type.tensor_type
    dims: list[int | None] = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim
    ]
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return _Input(vi.name, dims, dtype)


def _check_fit(shape: tuple[int, ...], dtype: np.dtype, want: _Input) -> None:
    """The data fit the model input: rank, fixed dimensions, dtype."""
    name, dims = want.name, want.dims
    if dims and len(shape) != len(dims):
        raise InputError(
            f"data has samples of shape {shape[1:]} (rank {len(shape)} with the batch axis) but "
            f"the model input {name!r} has rank {len(dims)} (shape {dims})"
        )
    for k, (have, need) in enumerate(zip(shape[1:], dims[1:], strict=False), start=1):
        if need is not None and have != need:
            raise InputError(
                f"data has samples of shape {shape[1:]}; the model input {name!r} expects "
                f"{['N' if d is None else d for d in dims]} (axis {k}: {have} != {need})"
            )
    if dtype.kind not in "fiub":
        raise InputTypeError(
            f"data dtype {dtype} is not numeric; the model input needs {want.dtype}"
        )
    if want.dtype.kind == "f":
        return
    if not np.can_cast(dtype, want.dtype, casting="same_kind"):
        raise InputTypeError(
            f"data dtype {dtype} does not fit the model input {name!r} of dtype {want.dtype}; "
            f"convert it first, e.g. x.astype('{want.dtype}')"
        )


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


@dataclass
class _OnnxAdapter:
    """:class:`streamnorm.calibrate.Adapter` for a calibration model (statistics as inputs).

    Attributes
    ----------
    model_bytes : bytes
        The serialized :func:`calibration_model`.
    bns : list of BNNode
    feeds : dict of str to numpy.ndarray
        The current statistics, fed to every run; :meth:`write` replaces them.
    source : _Input
    providers : list of str, optional
    """

    model_bytes: bytes
    bns: list[BNNode]
    feeds: dict[str, np.ndarray]
    source: _Input
    providers: list[str] | None = None
    session: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {b.name: b for b in self.bns}

    def layers(self) -> list[core.NormLayer]:
        return [core.NormLayer(b.name, b.channels, b.eps, "biased") for b in self.bns]

    def read(self, layer: core.NormLayer) -> core.Stats:
        b = self._by_name[layer.name]
        return core.Stats(
            self.feeds[b.mean].astype(np.float64), self.feeds[b.var].astype(np.float64)
        )

    def write(self, layer: core.NormLayer, result: core.LayerResult) -> None:
        """Keep the statistics in the initializers' dtype (``var`` biased, ONNX's convention)."""
        b = self._by_name[layer.name]
        self.feeds[b.mean] = result.mean.astype(self.feeds[b.mean].dtype)
        self.feeds[b.var] = result.var.astype(self.feeds[b.var].dtype)

    def run(self, batch: Any, targets: Sequence[core.NormLayer], emit: core.Emit) -> None:
        """A model with a fixed batch dimension gets short batches padded (rows are
        independent in inference mode) and the padding dropped again."""
        if self.session is None:
            self.session = _session(self.model_bytes, self.providers)
        arr = np.ascontiguousarray(np.asarray(batch), dtype=self.source.dtype)
        n = arr.shape[0]
        fixed = self.source.fixed_batch
        if fixed is not None and n < fixed:
            arr = np.concatenate([arr, np.repeat(arr[:1], fixed - n, axis=0)])
        nodes = [self._by_name[x.name] for x in targets]
        out_names = sorted({b.x for b in nodes if not b.x_is_input})
        try:
            res = (
                self.session.run(out_names, {self.source.name: arr, **self.feeds})
                if out_names
                else []
            )
        except Exception as e:
            if type(e).__module__.startswith("onnxruntime"):
                raise InputError(f"onnxruntime failed on the data: {e}") from e
            raise
        got = dict(zip(out_names, res, strict=True))
        for b in nodes:
            emit(b.name, np.asarray(arr if b.x_is_input else got[b.x])[:n])

    def sequential_passes(
        self, layers: list[core.NormLayer], first: Callable[[], Any]
    ) -> list[list[core.NormLayer]]:
        """One pass per depth: nodes of one depth do not depend on each other's statistics."""
        depth = {b.name: b.depth for b in self.bns}
        return [
            [x for x in layers if depth[x.name] == d]
            for d in sorted({depth[x.name] for x in layers})
        ]

    def remote(self) -> Callable[[], _OnnxAdapter]:
        return _Remote(self.model_bytes, self.bns, dict(self.feeds), self.source, self.providers)


@dataclass(frozen=True)
class _Remote:
    """Rebuilds the adapter, with the statistics written so far, on a Dask worker."""

    model_bytes: bytes
    bns: list[BNNode]
    feeds: dict[str, np.ndarray]
    source: _Input
    providers: list[str] | None

    def __call__(self) -> _OnnxAdapter:
        return _OnnxAdapter(
            self.model_bytes, self.bns, dict(self.feeds), self.source, self.providers
        )


# --------------------------------------------------------------------------------------------
# writing


def _data_path(out_path: str) -> str:
    """Where tensors stored as external data go: ``out_path + ".data"``, next to it."""
    return os.path.join(
        os.path.dirname(os.path.abspath(out_path)), os.path.basename(out_path) + ".data"
    )


def _save(loaded: _Loaded, out_path: str) -> None:
    """Write atomically; an ``OSError`` (full disk, no permission) becomes ``OutputPathError``."""
    try:
        _write(loaded, out_path)
    except OSError as e:
        raise OutputPathError(f"cannot write {out_path!r}: {e.strerror or e}") from e


def _write(loaded: _Loaded, out_path: str) -> None:
    """Write atomically; tensors that were external data in the input stay external."""
    onnx = require("onnx")
    from onnx import external_data_helper as ext

    model, external = loaded.model, loaded.external
    if not external and model.ByteSize() < _MAX_PROTO:
        try:
            onnx.checker.check_model(model)
        except Exception as e:
            raise InputError(f"the recalibrated model does not pass onnx.checker: {e}") from e
        data = model.SerializeToString()
        atomic_write(out_path, lambda f: f.write(data))
        return
    data_path = _data_path(out_path)
    folder = os.path.dirname(data_path)
    location = os.path.basename(data_path)
    if os.path.realpath(data_path) in loaded.files:
        raise OutputPathError(
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
            raise InputError(f"the recalibrated model does not pass onnx.checker: {e}") from e
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
            raise InputTypeError(f"{what} must be a str or path-like, got {type(p).__name__}")
    mp, op = os.fspath(model_path), os.fspath(out_path)
    if os.path.isdir(mp):
        raise InputError(f"model {mp!r} is a directory; give the .onnx file inside it")
    if not os.path.isfile(mp):
        raise InputNotFoundError(f"model file {mp!r} does not exist")
    if os.path.realpath(mp) == os.path.realpath(op):
        raise OutputPathError(
            f"out_path {op!r} is the input model; the input file is never modified, write to "
            "another path"
        )
    folder = os.path.dirname(os.path.abspath(op))
    if not os.path.isdir(folder):
        raise InputNotFoundError(f"the output folder {folder!r} does not exist")
    return mp, op


def _open(data: Any, key: str | None) -> Any:
    if isinstance(data, (str, os.PathLike)):
        return core.open_data(data, key)
    if isinstance(data, core.Dataset):
        return data
    if is_torch_tensor(data):
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        if data.ndim < 1 or len(data) == 0:
            raise InputError(f"data is empty (shape {data.shape}); give at least one sample")
        return data
    raise InputTypeError(
        "data must be a numpy array, a tensor, a path (.npy, .npz, folder or glob of .npy) or a "
        f"streamnorm Dataset, got {type(data).__name__}"
    )


def _inputs(loaded: _Loaded, data: Any) -> list[str]:
    """Every file the run reads: the model, its external data, the data files."""
    files = list(loaded.files)
    if isinstance(data, core.Dataset):
        files += [p.path for p in data.parts]
    return files


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
) -> core.CalibrationReport:
    """Write a copy of an ONNX model whose BatchNorm statistics are re-estimated from data.

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
    The per-node statistics are :class:`~streamnorm.Population` estimators (see
    :mod:`streamnorm.calibrate`). The ONNX graph always normalizes with its stored statistics, so
    the moments of a node's input depend on the statistics of every node upstream;
    ``sequential`` recomputes depth by depth so that, afterwards, every node's input has exactly
    the stored mean and variance on the data. ``var`` is written biased (``M2 / n``, the
    convention of the ONNX operator), in the initializer's dtype; ``epsilon``, the scale and the
    bias are untouched. An initializer shared by several nodes (or with other operators, or
    reached through ``Identity`` / ``Constant``) is copied so that each BatchNorm node gets its
    own. Statistics fed as graph inputs are refused with ``ValueError``: the file stores nothing
    to rewrite.
    """
    require("onnxruntime", "onnx")
    onnx = require("onnx")
    mp, op = _check_paths(model_path, out_path)
    settings = core.Settings.checked(core.StatsSpec("population"), mode, progress, client)
    bs = check_size("batch_size", batch_size)
    loaded = _load(mp)
    bns = prepare(loaded.model)
    opened = _open(data, key)
    source = _model_input(loaded.model, input_name)
    _check_fit(tuple(opened.shape), np.dtype(opened.dtype), source)
    stream = core.Stream.of(opened, source.fixed_batch or bs, num_samples)
    check_output(op, _inputs(loaded, opened))
    if loaded.external and os.path.realpath(_data_path(op)) in loaded.files:
        raise OutputPathError(
            f"writing {op!r} would overwrite {_data_path(op)!r}, which the input model reads "
            "its weights from; choose another output name"
        )

    inits = {t.name: t for t in loaded.model.graph.initializer}
    feeds = {n: onnx.numpy_helper.to_array(inits[n]) for b in bns for n in (b.mean, b.var)}
    cal = calibration_model(loaded.model, bns)
    if cal.ByteSize() >= _MAX_PROTO:
        raise InputError(
            "the model is larger than 2 GiB once loaded; recalibration of such models through "
            "onnxruntime sessions from memory is not supported"
        )
    adapter = _OnnxAdapter(cal.SerializeToString(), bns, feeds, source, providers)
    report = core.calibrate(adapter, stream, settings)
    for b in bns:
        for n in (b.mean, b.var):
            inits[n].CopyFrom(onnx.numpy_helper.from_array(adapter.feeds[n], n))
    _save(loaded, op)
    return report
