"""Calibration data read from files in batches, never whole.

:func:`open_data` opens a ``.npy`` file (memory-mapped), one array of a ``.npz`` archive
(memory-mapped when stored, streamed when compressed), or a folder / glob of ``.npy`` shards, as a
:class:`Dataset` that knows only paths, shapes and dtypes. :func:`shards` cuts a dataset (or an
in-memory array) into picklable pieces, and :func:`iter_batches` reads one piece batch by batch;
the local and the distributed calibration paths both go through these two functions, so they see
exactly the same batches.
"""

from __future__ import annotations

import glob
import os
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .._errors import InputError, InputNotFoundError, InputTypeError
from .._validate import check_optional_positive_int, check_size

__all__ = [
    "INPUT_KEYS",
    "Dataset",
    "FileShard",
    "Stream",
    "check_data",
    "input_of",
    "iter_batches",
    "limit",
    "open_data",
    "shards",
    "take",
]

_GLOB_CHARS = set("*?[")


class FileShard(NamedTuple):
    """Rows ``start:stop`` of the array in ``path`` (member ``key`` of a ``.npz``)."""

    path: str
    start: int
    stop: int
    key: str | None = None


class _Part(NamedTuple):
    path: str
    key: str | None
    rows: int


class Dataset:
    """Arrays on disk read as one sequence of samples along axis 0.

    Parameters
    ----------
    parts : list of (path, key, rows)
        The files in order; all share ``sample_shape`` and ``dtype``.
    sample_shape : tuple of int
        Shape of one sample (the array shape without axis 0).
    dtype : numpy.dtype

    Notes
    -----
    Only metadata is held; rows are read by :func:`iter_batches`. ``len(dataset)`` is the total
    number of samples.
    """

    def __init__(self, parts: list[_Part], sample_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.parts = list(parts)
        self.sample_shape = tuple(sample_shape)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(total samples, *sample_shape)``."""
        return (len(self), *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def head(self, n: int) -> Dataset:
        """The first ``n`` samples (metadata only)."""
        out: list[_Part] = []
        left = int(n)
        for p in self.parts:
            if left <= 0:
                break
            out.append(_Part(p.path, p.key, min(p.rows, left)))
            left -= p.rows
        return Dataset(out, self.sample_shape, self.dtype)

    def __repr__(self) -> str:
        return f"Dataset(files={len(self.parts)}, shape={self.shape}, dtype={self.dtype})"


# --------------------------------------------------------------------------------------------
# opening files


def _check_array_meta(what: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) < 1:
        raise InputError(f"{what} holds a 0-d array (a scalar); calibration data needs (N, ...)")
    if dtype.kind not in "fiub" or dtype.fields is not None:
        raise InputTypeError(
            f"{what} has dtype {dtype}; calibration data must be real numbers "
            "(float, int, unsigned or bool)"
        )


def _npy_meta(path: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path!r} is not a readable .npy file: {e}") from e
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path!r} is not a .npy array file")
    _check_array_meta(repr(path), arr.shape, arr.dtype)
    return arr.shape, arr.dtype


def _member_name(zf: zipfile.ZipFile, path: str, key: str | None) -> str:
    names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    if not names:
        raise InputError(f"{path!r} holds no arrays")
    if key is None:
        if len(names) > 1:
            raise InputError(
                f"{path!r} holds several arrays {names}; choose one with key= (--key NAME)"
            )
        return names[0]
    if key not in names:
        raise InputError(f"{path!r} has no array {key!r}; it holds {names}")
    return key


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` stream ``f``, left at the data."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        header = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        header = fmt.read_array_header_2_0(f)
    else:  # version 3.0 (utf-8 field names) has no public reader
        header = fmt._read_array_header(f, version)  # type: ignore[attr-defined]
    shape, fortran, dtype = header
    return tuple(int(n) for n in shape), bool(fortran), np.dtype(dtype)


def _npz_meta(path: str, key: str | None) -> tuple[str, tuple[int, ...], np.dtype]:
    try:
        with zipfile.ZipFile(path) as zf:
            name = _member_name(zf, path, key)
            with zf.open(name + ".npy") as f:
                shape, _fortran, dtype = _read_npy_header(f)
    except zipfile.BadZipFile as e:
        raise InputError(f"{path!r} is not a readable .npz file: {e}") from e
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise InputError(f"{path!r} is not a readable .npz file: {e}") from e
    _check_array_meta(f"{path!r}[{name!r}]", shape, dtype)
    return name, shape, dtype


def _expand(path: str) -> list[str]:
    # a path that exists is taken as it is (a file may be called 'x[1].npy'); a glob otherwise
    if any(c in _GLOB_CHARS for c in path) and not os.path.exists(path):
        files = sorted(glob.glob(path))
        if not files:
            raise InputNotFoundError(f"no files match {path!r}")
        bad = [f for f in files if not f.endswith(".npy") or not os.path.isfile(f)]
        if bad:
            raise InputError(
                f"a glob of shards must match only .npy files; it also matched {bad[:3]}"
            )
        return files
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f)
            for f in os.listdir(path)
            if f.endswith(".npy") and os.path.isfile(os.path.join(path, f))
        )
        if not files:
            raise InputError(f"folder {path!r} holds no .npy shards")
        return files
    if not os.path.exists(path):
        raise InputNotFoundError(f"data file {path!r} does not exist")
    return [path]


def open_data(path: str | os.PathLike[str], key: str | None = None) -> Dataset:
    """Open calibration data without reading it.

    Parameters
    ----------
    path : str or path-like
        A ``.npy`` file, a ``.npz`` archive, a folder of ``.npy`` shards (taken in sorted name
        order) or a glob pattern matching ``.npy`` shards. Every shard has shape
        ``(n_i, *sample_shape)`` with the same sample shape and dtype. A path that exists is
        taken as it is, also when its name has glob characters (``x[1].npy``); only a path
        that names no file is a pattern.
    key : str, optional
        The array of a ``.npz`` archive; needed when it holds more than one.

    Returns
    -------
    Dataset
        Paths, shapes and dtype; the data stay on disk.

    Notes
    -----
    ``.npy`` files and stored (``np.savez``) archive members are memory-mapped;
    compressed members (``np.savez_compressed``) are decompressed as a stream, batch by batch.
    Object arrays are refused (they would need pickle).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"path must be a str or path-like, got {type(path).__name__}")
    p = os.fspath(path)
    files = _expand(p)
    if len(files) == 1 and files[0].endswith(".npz"):
        name, shape, dtype = _npz_meta(files[0], key)
        parts = [_Part(files[0], name, shape[0])]
        ds = Dataset(parts, shape[1:], dtype)
    else:
        if key is not None:
            raise InputError(f"key={key!r} selects an array of a .npz archive; {p!r} is not one")
        parts = []
        sample: tuple[int, ...] | None = None
        dtype0: np.dtype | None = None
        for f in files:
            if not f.endswith(".npy"):
                raise InputError(
                    f"unsupported data file {f!r}: expected .npy, .npz, a folder or a glob of "
                    ".npy shards"
                )
            shape, dtype = _npy_meta(f)
            if sample is None:
                sample, dtype0 = shape[1:], dtype
            elif shape[1:] != sample or dtype != dtype0:
                raise InputError(
                    f"shard {f!r} has samples of shape {shape[1:]} and dtype {dtype}; the first "
                    f"shard has {sample} and {dtype0}; all shards must agree"
                )
            parts.append(_Part(f, None, shape[0]))
        ds = Dataset(parts, sample or (), dtype0 if dtype0 is not None else np.dtype("f8"))
    if len(ds) == 0:
        raise InputError(f"data {p!r} is empty (0 samples); calibration needs at least one")
    return ds


# --------------------------------------------------------------------------------------------
# reading rows


class _ZipRows:
    """Rows of a compressed ``.npz`` member, read forward as a stream."""

    def __init__(self, path: str, key: str) -> None:
        self.path, self.key = path, key
        self._zf: zipfile.ZipFile | None = None
        self._f: Any = None
        self._pos = 0
        with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
            shape, fortran, dtype = _read_npy_header(f)
            self._data_start = f.tell()
        if fortran and len(shape) > 1:
            raise InputError(
                f"{path!r}[{key!r}] is a Fortran-ordered compressed array, which cannot be "
                "streamed by rows; save it C-ordered or with np.savez (uncompressed)"
            )
        self.shape, self.dtype = shape, dtype
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def _seek(self, row: int) -> None:
        if self._f is None or row < self._pos:
            self.close()
            self._zf = zipfile.ZipFile(self.path)
            self._f = self._zf.open(self.key + ".npy")
            self._f.seek(self._data_start)
            self._pos = 0
        if row > self._pos:
            self._f.seek((row - self._pos) * self._row_bytes, os.SEEK_CUR)
            self._pos = row

    def read(self, start: int, stop: int) -> np.ndarray:
        self._seek(start)
        n = stop - start
        buf = self._f.read(n * self._row_bytes)
        if len(buf) != n * self._row_bytes:
            raise InputError(f"{self.path!r}[{self.key!r}] is truncated")
        self._pos = stop
        return np.frombuffer(buf, dtype=self.dtype).reshape((n, *self.shape[1:])).copy()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._zf is not None:
            self._zf.close()
        self._f = self._zf = None


def _stored_member(path: str, key: str) -> np.ndarray | None:
    """Memory-map a stored (uncompressed) ``.npz`` member, or ``None`` if it is compressed."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return None
        with open(path, "rb") as raw:
            raw.seek(info.header_offset)
            header = raw.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise InputError(f"{path!r} has a corrupt entry for {key!r}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            raw.seek(info.header_offset + 30 + name_len + extra_len)
            shape, fortran, dtype = _read_npy_header(raw)
            offset = raw.tell()
    order: Any = "F" if fortran else "C"
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype=dtype, order=order)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def _rows(path: str, key: str | None) -> Any:
    if key is None:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    mm = _stored_member(path, key)
    return mm if mm is not None else _ZipRows(path, key)


# --------------------------------------------------------------------------------------------
# shards and batches


def limit(data: Any, n: int | None) -> Any:
    """The first ``n`` samples of an array, tensor or :class:`Dataset` (all of it for ``None``)."""
    if n is None:
        return data
    if isinstance(data, Dataset):
        return data.head(n)
    return data[:n]


def shards(data: Any, batch_size: int, rows_per_shard: int | None = None) -> list[Any]:
    """Cut ``data`` into picklable pieces whose boundaries fall on whole batches.

    Parameters
    ----------
    data : numpy.ndarray, torch.Tensor or Dataset, shape (N, ...)
    batch_size : int
        Samples per batch; every shard but the last of each file holds a multiple of it.
    rows_per_shard : int, optional
        Samples per shard, rounded up to a multiple of ``batch_size``; by default about eight
        shards per file.

    Returns
    -------
    list
        Array slices (views) for in-memory data, :class:`FileShard` for files.

    Notes
    -----
    Batches never span two files: a folder of shards gives each file's last batch short. Reading
    shards one after the other with :func:`iter_batches` gives the same batches as any other
    split of the same data, so per-batch statistics do not depend on how the work is spread.
    """
    bs = check_size("batch_size", batch_size)

    def per(n: int) -> int:
        if rows_per_shard is not None:
            r = check_size("rows_per_shard", rows_per_shard)
            return -(-r // bs) * bs
        nb = max(1, -(-n // bs))
        return bs * max(1, -(-nb // 8))

    if isinstance(data, Dataset):
        out: list[Any] = []
        for p in data.parts:
            step = per(p.rows)
            out.extend(
                FileShard(p.path, s, min(s + step, p.rows), p.key) for s in range(0, p.rows, step)
            )
        return out
    n = len(data)
    step = per(n)
    return [data[s : s + step] for s in range(0, n, step)]


def iter_batches(shard: Any, batch_size: int) -> Iterator[Any]:
    """Yield the batches of one shard, reading only one batch at a time from disk.

    Parameters
    ----------
    shard : array slice or FileShard
        An item of :func:`shards`.
    batch_size : int

    Yields
    ------
    numpy.ndarray or torch.Tensor, shape (b, ...)
        ``b = batch_size`` except for a last short batch; arrays read from files are ordinary
        in-memory arrays.
    """
    bs = check_size("batch_size", batch_size)
    if isinstance(shard, FileShard):
        rows = _rows(shard.path, shard.key)
        try:
            for s in range(shard.start, shard.stop, bs):
                e = min(s + bs, shard.stop)
                if isinstance(rows, _ZipRows):
                    yield rows.read(s, e)
                else:
                    yield np.array(rows[s:e])
        finally:
            if isinstance(rows, _ZipRows):
                rows.close()
        return
    for s in range(0, len(shard), bs):
        yield shard[s : s + bs]


# --------------------------------------------------------------------------------------------
# batches of any form, and the one stream every calibration reads

#: dict keys tried, in order, for the input of a dict batch
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "data")


def _is_array(x: Any) -> bool:
    """An array or a tensor: something with a shape that can be sliced along axis 0."""
    return hasattr(x, "shape") and hasattr(x, "__getitem__") and hasattr(x, "__len__")


def input_of(batch: Any, input_key: str | None = None) -> Any:
    """The model input of a batch: the batch itself (an array or tensor), the first item of a
    tuple or list, or the ``input_key`` entry of a dict (by default the first of
    :data:`INPUT_KEYS` present)."""
    if _is_array(batch):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputError("got an empty tuple/list as a batch; expected (input, ...)")
        return batch[0]
    if isinstance(batch, Mapping):
        if input_key is not None:
            if input_key not in batch:
                raise InputError(f"batch has no key {input_key!r}; its keys are {list(batch)}")
            return batch[input_key]
        for k in INPUT_KEYS:
            if k in batch:
                return batch[k]
        raise InputError(
            f"cannot tell which entry of a dict batch is the input (keys {list(batch)}); "
            "pass input_key=NAME or forward_fn"
        )
    raise InputTypeError(
        f"cannot find the input in a batch of type {type(batch).__name__}; batches must be "
        "tensors, arrays, (input, ...) tuples or dicts, or pass forward_fn(model, batch)"
    )


def _batch_len(batch: Any, input_key: str | None) -> int:
    try:
        return int(input_of(batch, input_key).shape[0])
    except (TypeError, ValueError, AttributeError, IndexError):
        raise InputTypeError(
            "num_samples needs batches whose input has a batch axis; "
            f"cannot size a batch of type {type(batch).__name__}"
        ) from None


def take(batch: Any, n: int, size: int) -> Any:
    """The first ``n`` samples of every per-sample item of ``batch`` (batch size ``size``)."""
    if _is_array(batch) and len(batch.shape) > 0:
        return batch[:n] if batch.shape[0] == size else batch
    if isinstance(batch, tuple):
        items = [take(b, n, size) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    if isinstance(batch, list):
        return [take(b, n, size) for b in batch]
    if isinstance(batch, Mapping):
        return {k: take(v, n, size) for k, v in batch.items()}
    return batch


def check_data(data: Any) -> Any:
    """Calibration data as given, a path opened with :func:`open_data`, or a clear error.

    Arrays and tensors must be non-empty with a batch axis; any other iterable is taken as an
    iterable of batches.
    """
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        return open_data(data if not isinstance(data, bytes) else data.decode())
    if isinstance(data, Dataset):
        return data
    if _is_array(data):
        shape = tuple(data.shape)
        if len(shape) < 1 or shape[0] == 0:
            raise InputError(f"data is empty (shape {shape}); give at least one sample")
        if isinstance(data, np.ndarray) and data.dtype.kind not in "fiub":
            raise InputTypeError(f"data must be real numbers, got dtype {data.dtype}")
        return data
    if not isinstance(data, Iterable):
        raise InputTypeError(
            f"data must be an array, a tensor, a path or an iterable of batches, got "
            f"{type(data).__name__}"
        )
    return data


@dataclass(frozen=True)
class Stream:
    """The batches of one calibration, the same on every pass.

    Attributes
    ----------
    data : array, tensor, Dataset or iterable of batches
        Checked with :func:`check_data`. Arrays, tensors and datasets (``arraylike``) are cut
        into batches of ``batch_size``, along shard boundaries (:func:`shards`), so that a
        local run and a distributed one see the same batches; any other iterable yields the
        batches itself and is re-iterated on every pass.
    batch_size : int
    num_samples : int, optional
        Only the first ``num_samples`` samples; the batch that crosses the limit is cut.
    input_key : str, optional
        The input of dict batches (see :func:`input_of`); used to size and cut batches.
    """

    data: Any
    batch_size: int
    num_samples: int | None = None
    input_key: str | None = None

    @property
    def arraylike(self) -> bool:
        return isinstance(self.data, Dataset) or _is_array(self.data)

    @classmethod
    def of(
        cls,
        data: Any,
        batch_size: Any,
        num_samples: Any = None,
        input_key: str | None = None,
    ) -> Stream:
        """Check the arguments once; arrays are cut to ``num_samples`` here (metadata only)."""
        bs = check_size("batch_size", batch_size)
        n = check_optional_positive_int("num_samples", num_samples)
        data = check_data(data)
        if isinstance(data, Dataset) or _is_array(data):
            return cls(limit(data, n), bs, None, input_key)
        return cls(data, bs, n, input_key)

    def shards(self) -> list[Any]:
        """Picklable pieces of array-like data (see :func:`shards`)."""
        return shards(self.data, self.batch_size)

    def batches_per_pass(self) -> int | None:
        """Batches one pass yields (``None`` when an iterable does not say)."""
        if not self.arraylike:
            return None
        return sum(
            -(-(s.stop - s.start if isinstance(s, FileShard) else len(s)) // self.batch_size)
            for s in self.shards()
        )

    def batches(self) -> Iterator[Any]:
        """One pass over the data."""
        if self.arraylike:
            for s in self.shards():
                yield from iter_batches(s, self.batch_size)
            return
        if self.num_samples is None:
            yield from self.data
            return
        seen = 0
        for batch in self.data:
            size = _batch_len(batch, self.input_key)
            if seen >= self.num_samples:
                return
            if seen + size > self.num_samples:
                batch = take(batch, self.num_samples - seen, size)
                size = self.num_samples - seen
            seen += size
            yield batch

    def check_passes(
        self, mode: str, kind: str = "BatchNorm", examples: str = "a list, an array"
    ) -> None:
        """``InputTypeError`` when ``mode="sequential"`` would pass several times over a one-shot
        iterator (``kind``: what the framework calls the layers; ``examples``: the re-iterables
        it takes)."""
        if mode == "sequential" and not self.arraylike and iter(self.data) is self.data:
            raise InputTypeError(
                f"mode='sequential' passes over the data once per {kind} layer; pass a "
                f"re-iterable ({examples}), not a one-shot iterator or generator"
            )

    def first(self) -> Any:
        """The first batch (``InputError`` when there is none)."""
        for batch in self.batches():
            return batch
        raise InputError("data is empty: it yields no batch")
