"""Files: atomic writes, versioned ``.npz`` records and their header check, output-path checks.

Guarantees for every file the library writes:

- a regular file is replaced atomically (temp file in the same folder, fsync, ``os.replace``): a
  reader sees the old file or the new one, never a partial one, and a failure leaves the old file;
- a new file gets the permissions the umask allows (as ``open`` would); a replaced file keeps its
  mode;
- a target that is not a regular file (a character device such as ``/dev/null``, a FIFO) is
  written in place, never replaced;
- an output that is one of the inputs, or another output, is refused before anything runs
  (:func:`check_output`, :func:`check_outputs`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ._errors import InputTypeError, OutputPathError, RecordError

PathLike = str | os.PathLike[str]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode(path: PathLike) -> int:
    """The permission bits a file written at ``path`` gets: those of the file it replaces, or
    what the umask allows (as ``open`` would) for a new one."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


#: the signals that stop a command (Ctrl-C, ``kill``); held while files are put in place
_STOP_SIGNALS = frozenset(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name)
)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C and ``SIGTERM`` until the block ends.

    For files put in place together (an ONNX model and its external data): a signal that comes
    in between is handled after both, so the pair is never half old, half new. Python runs
    signal handlers in the main thread only, whichever thread the signal reached: there the
    handlers are swapped for one that notes the signal, and the signal is raised again after
    the block, to the handler that was there. In another thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        caught.append(signum)

    old = {}
    for s in _STOP_SIGNALS:
        if signal.getsignal(s) is not None:  # None: a handler Python did not install
            old[s] = signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def atomic_write(path: PathLike, write: Callable[[Any], Any], mode: str = "wb") -> None:
    """Write ``path`` with ``write(f)``; atomically for regular files (see the module notes).

    The temporary file is removed on every exit Python sees: an exception, Ctrl-C, and a
    ``SIGTERM`` that the program turns into an exception (the command line does).
    """
    path = os.fspath(path)
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"output {path!r} is a directory; give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(path, mode) as f:  # a device or FIFO: write through, never replace it
            write(f)
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    except OSError as e:  # name the output, not a temporary name the user never gave
        raise type(e)(e.errno, e.strerror, path) from e
    try:
        os.chmod(tmp, file_mode(path))
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_output(out: PathLike, inputs: Iterable[PathLike] = ()) -> str:
    """Check before a run that ``out`` can be written and is none of ``inputs``.

    Refuses (``OutputPathError``) an existing directory, a missing or read-only parent folder, and
    an output that resolves to any input path (a folder input covers every file in it). Returns
    ``out`` as a string.
    """
    if not isinstance(out, (str, os.PathLike)):
        raise InputTypeError(f"output path must be a str or os.PathLike, got {type(out).__name__}")
    out = os.fspath(out)
    real = os.path.realpath(out)
    if os.path.isdir(out):
        raise OutputPathError(f"output {out!r} is a directory; give a file name inside it")
    for p in inputs:
        ip = os.path.realpath(os.fspath(p))
        if real == ip or (os.path.isdir(ip) and real.startswith(ip.rstrip(os.sep) + os.sep)):
            raise OutputPathError(
                f"output {out!r} is one of the inputs ({os.fspath(p)!r}); writing it would "
                "destroy that input: choose another output path"
            )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise OutputPathError(f"cannot write {out!r}: its folder {parent!r} {what}")
    exists = os.path.exists(out)
    regular = exists and stat.S_ISREG(os.stat(out).st_mode)
    if (not exists or regular) and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {out!r}: no permission to create files in {parent!r}")
    if exists and not regular and not os.access(out, os.W_OK):
        raise OutputPathError(f"cannot write {out!r}: no permission")
    return out


def check_outputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike] = ()) -> list[str]:
    """:func:`check_output` for every one of ``outputs``, and no two of them the same file.

    Two outputs may name the same file only when it exists and is not a regular file (a
    device such as ``/dev/null``). Returns the outputs as strings.
    """
    inputs = list(inputs)
    outs = [check_output(o, inputs) for o in outputs]
    seen: dict[str, str] = {}
    for o in outs:
        real = os.path.realpath(o)
        if real in seen and (not os.path.exists(o) or stat.S_ISREG(os.stat(o).st_mode)):
            raise OutputPathError(
                f"outputs {seen[real]!r} and {o!r} are the same file; one would overwrite the "
                "other: give each output its own path"
            )
        seen.setdefault(real, o)
    return outs


def check_output_dir(out: PathLike) -> str:
    """Check before a run that the folder ``out`` exists or can be created, and is writable.

    Refuses (``OutputPathError``) an ``out`` that is not a folder, a path through a file (a
    parent that is not a folder), a new folder whose parent does not exist (only the last level
    of the path is ever created) and a folder (or the parent of a new one) that gives no
    permission to create files. Creates nothing; returns ``out`` as a string.
    """
    if not isinstance(out, (str, os.PathLike)):
        raise InputTypeError(
            f"output folder must be a str or os.PathLike, got {type(out).__name__}"
        )
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputPathError(f"output folder {out!r} is a file; give a folder")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputPathError(
            f"cannot create the output folder {out!r}: {existing!r} is a file, not a folder"
        )
    parent = os.path.dirname(os.path.abspath(out))
    if existing not in (os.path.abspath(out), parent):
        raise OutputPathError(
            f"cannot create the output folder {out!r}: its parent {parent!r} does not exist "
            "(only the last folder of the path is created); create it first"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"cannot write into the output folder {out!r}: no permission to create files in "
            f"{existing!r}"
        )
    return out


# --------------------------------------------------------------------------------------------
# .npz records


def read_npz(path: PathLike, what: str) -> dict[str, Any]:
    """All arrays of an ``.npz`` file (no pickles); ``RecordError`` for anything unreadable.

    ``FileNotFoundError`` and ``IsADirectoryError`` propagate as such.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise IsADirectoryError(f"{name!r} is a directory, not a streamnorm {what} file")
    try:
        z = np.load(name, allow_pickle=False)
        if not isinstance(z, Mapping) and not hasattr(z, "files"):
            raise RecordError(
                f"{name!r} is not a streamnorm {what} file: it holds a single array (.npy); "
                "records are .npz files written by save()"
            )
        with z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except RecordError:
        raise
    except Exception as e:  # zip damage surfaces as many types (BadZipFile, RuntimeError, ...)
        raise RecordError(f"{name!r} is not a readable streamnorm {what} file: {e}") from e


def check_header(d: Any, format_name: str, version: int, what: str) -> None:
    """Check a record's ``format`` / ``version`` entries; ``RecordError`` / ``InputTypeError``."""
    if not hasattr(d, "__getitem__") or not hasattr(d, "keys"):
        raise InputTypeError(f"from_dict takes a mapping, got {type(d).__name__}")
    missing = [k for k in ("format", "version") if k not in d.keys()]
    if missing:
        raise RecordError(f"not a streamnorm {what} record: missing {missing} (no header)")
    if str(np.asarray(d["format"])) != format_name:
        raise RecordError(f"not a streamnorm {what} record: format {d['format']!r}")
    v = record_int(d, "version", what)
    if v != version:
        raise RecordError(
            f"{what} format version {v} is not supported (this streamnorm reads version "
            f"{version}); upgrade streamnorm"
        )


def record_scalar(d: Any, key: str, what: str) -> Any:
    """A scalar entry of a record as a Python value; ``RecordError`` if missing or not a scalar."""
    if key not in d.keys():
        raise RecordError(f"corrupt {what} record: missing {key!r}")
    a = np.asarray(d[key])
    if a.shape != ():
        raise RecordError(f"corrupt {what} record: {key!r} should be a scalar, got shape {a.shape}")
    return a.item()


def record_int(d: Any, key: str, what: str, *, low: int | None = None) -> int:
    """An integer entry of a record (not a bool, a float or an array); ``RecordError`` if not."""
    a = np.asarray(d[key]) if key in d.keys() else None
    if a is None or a.shape != () or a.dtype.kind not in "iu":
        got = "missing" if a is None else f"{d[key]!r}"
        raise RecordError(f"corrupt {what} record: {key!r} should be an integer, got {got}")
    v = int(a)
    if low is not None and v < low:
        raise RecordError(f"impossible {what} record: {key!r} is {v}, should be >= {low}")
    return v


def record_flag(d: Any, key: str, what: str) -> bool:
    """A boolean entry of a record (``True`` / ``False`` only); ``RecordError`` if not."""
    a = np.asarray(d[key]) if key in d.keys() else None
    if a is None or a.shape != () or a.dtype.kind != "b":
        got = "missing" if a is None else f"{d[key]!r}"
        raise RecordError(f"corrupt {what} record: {key!r} should be True or False, got {got}")
    return bool(a)


__all__ = [
    "PathLike",
    "atomic_write",
    "check_header",
    "check_output",
    "check_output_dir",
    "check_outputs",
    "deferred_signals",
    "file_mode",
    "read_npz",
    "record_flag",
    "record_int",
    "record_scalar",
]
