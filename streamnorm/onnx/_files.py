"""Reading, checking and writing ONNX model files for recalibration and annotation.

:func:`load` reads a model with its external data; :func:`save` writes one atomically, keeping
tensors that were external data in the input external; :func:`check_paths`,
:func:`model_input`, :func:`check_fit` and :func:`open_source` check the arguments before any
run. The input files are never modified.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import calibrate as core
from .._errors import InputError, InputNotFoundError, InputTypeError, OutputPathError
from .._extras import require
from .._io import atomic_write, deferred_signals, file_mode
from .._validate import is_torch_tensor

__all__ = [
    "MAX_PROTO",
    "Loaded",
    "ModelInput",
    "check_fit",
    "check_paths",
    "data_path",
    "input_files",
    "load",
    "model_files",
    "model_input",
    "open_source",
    "output_files",
    "save",
]

MAX_PROTO = 2**31 - 2**20  # protobuf's 2 GiB limit, with room to spare


# --------------------------------------------------------------------------------------------
# loading


@dataclass
class Loaded:
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


def _load_graph(path: str) -> Any:
    """The model at ``path`` without its external data; ``InputError`` for an unreadable
    file (``OSError`` as it is)."""
    onnx = require("onnx")
    try:
        return onnx.load(path, load_external_data=False)
    except OSError:
        raise
    except Exception as e:  # protobuf DecodeError and friends
        raise InputError(f"{path!r} is not a readable ONNX model: {e}") from e


def load(path: str) -> Loaded:
    model = _load_graph(path)
    onnx = require("onnx")
    from onnx import external_data_helper as ext

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
    return Loaded(model, files, external)


@dataclass(frozen=True)
class ModelInput:
    """The graph input recalibration feeds: name, dims (``None`` where dynamic), dtype."""

    name: str
    dims: list[int | None]
    dtype: np.dtype

    @property
    def fixed_batch(self) -> int | None:
        return self.dims[0] if self.dims and self.dims[0] is not None else None


def model_input(model: Any, input_name: str | None) -> ModelInput:
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
    return ModelInput(vi.name, dims, dtype)


def check_fit(shape: tuple[int, ...], dtype: np.dtype, want: ModelInput) -> None:
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
# writing


def data_path(out_path: str) -> str:
    """Where tensors stored as external data go: ``out_path + ".data"``, next to it."""
    return os.path.join(
        os.path.dirname(os.path.abspath(out_path)), os.path.basename(out_path) + ".data"
    )


def _written(out_path: str, external: bool, size: int) -> list[str]:
    # the writer puts tensors in a data file when the input had external data or the model is
    # near protobuf's limit; half the limit leaves room for what a run adds
    if external or size >= MAX_PROTO // 2:
        return [out_path, data_path(out_path)]
    return [out_path]


def output_files(loaded: Loaded, out_path: str) -> list[str]:
    """Every file :func:`save` of ``loaded`` to ``out_path`` may write: the model, and its
    external data file (:func:`data_path`) where the tensors need one."""
    return _written(out_path, bool(loaded.external), loaded.model.ByteSize())


def model_files(model_path: str, out_path: str) -> tuple[list[str], list[str]]:
    """Before loading the weights: the files a run on ``model_path`` reads (the model and its
    external data files) and those it may write at ``out_path`` (see :func:`output_files`)."""
    require("onnx")
    from onnx import external_data_helper as ext

    model = _load_graph(model_path)
    base = os.path.dirname(os.path.abspath(model_path))
    reads = [model_path]
    for t in ext._get_all_tensors(model):
        if ext.uses_external_data(t):
            reads.append(os.path.join(base, ext.ExternalDataInfo(t).location))
    writes = _written(out_path, len(reads) > 1, os.path.getsize(model_path))
    return reads, writes


def save(loaded: Loaded, out_path: str) -> None:
    """Write atomically; an ``OSError`` (full disk, no permission) becomes ``OutputPathError``."""
    try:
        _write(loaded, out_path)
    except OSError as e:
        raise OutputPathError(f"cannot write {out_path!r}: {e.strerror or e}") from e


def _write(loaded: Loaded, out_path: str) -> None:
    """Write atomically; tensors that were external data in the input stay external."""
    onnx = require("onnx")
    from onnx import external_data_helper as ext

    model, external = loaded.model, loaded.external
    if not external and model.ByteSize() < MAX_PROTO:
        try:
            onnx.checker.check_model(model)
        except Exception as e:
            raise InputError(f"the recalibrated model does not pass onnx.checker: {e}") from e
        data = model.SerializeToString()
        atomic_write(out_path, lambda f: f.write(data))
        return
    data_file = data_path(out_path)
    folder = os.path.dirname(data_file)
    location = os.path.basename(data_file)
    if os.path.realpath(data_file) in loaded.files:
        raise OutputPathError(
            f"writing {out_path!r} would overwrite {data_file!r}, which the input model reads "
            "its weights from; choose another output name"
        )
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=folder) as tmp:
        tmp_model = os.path.join(tmp, os.path.basename(out_path))
        marked = False
        for t in ext._get_all_tensors(model):
            if t.name in external and t.HasField("raw_data"):
                ext.set_external_data(t, location)
                marked = True
        if not marked or model.ByteSize() >= MAX_PROTO:
            ext.convert_model_to_external_data(
                model, all_tensors_to_one_file=True, location=location, size_threshold=1024
            )
        onnx.save_model(model, tmp_model)
        try:
            onnx.checker.check_model(tmp_model)
        except Exception as e:
            raise InputError(f"the recalibrated model does not pass onnx.checker: {e}") from e
        tmp_data = os.path.join(tmp, location)
        for p, target in ((tmp_data, data_file), (tmp_model, out_path)):
            if os.path.exists(p):
                # onnx writes the data file with mode 0600: give each the mode of the file it
                # replaces, or the umask's
                os.chmod(p, file_mode(target))
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        with deferred_signals():  # the model and its data file are put in place together
            if os.path.exists(tmp_data):
                os.replace(tmp_data, data_file)
            os.replace(tmp_model, out_path)


# --------------------------------------------------------------------------------------------
# the public function


def check_paths(model_path: Any, out_path: Any) -> tuple[str, str]:
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


def open_source(data: Any, key: str | None) -> Any:
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


def input_files(loaded: Loaded, data: Any) -> list[str]:
    """Every file the run reads: the model, its external data, the data files."""
    files = list(loaded.files)
    if isinstance(data, core.Dataset):
        files += [p.path for p in data.parts]
    return files
