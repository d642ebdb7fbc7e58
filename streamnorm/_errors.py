"""The library's error classes: one home, so that callers (and the CLI) can tell user errors apart.

Every error a user can fix is a :class:`StreamnormError`. The concrete classes also subclass the
built-in exception that such a problem has always raised (``ValueError``, ``TypeError``), so that
existing ``except ValueError`` clauses keep working. The CLI turns exactly these (and ``OSError``
about the user's files) into one line on stderr with exit code 2; anything else is a bug and shows
its traceback.
"""

from __future__ import annotations


class StreamnormError(Exception):
    """Base class of the errors a user can fix (bad input, unreadable file, missing data)."""


class InputError(StreamnormError, ValueError):
    """A value the user passed is out of range, inconsistent or empty."""


class InputTypeError(StreamnormError, TypeError):
    """A value the user passed has the wrong type."""


class RecordError(InputError):
    """A saved record (``.npz`` state, metadata) is unreadable, foreign, corrupt or impossible."""


class OutputPathError(InputError):
    """An output path cannot be written safely (a directory, one of the inputs, not writable)."""


class SchedulerUnreachableError(ConnectionError, InputError):
    """A Dask scheduler address that cannot be reached (or is no scheduler)."""


class InputNotFoundError(FileNotFoundError, InputError):
    """A file or folder the user named (a model, calibration data) does not exist."""


class MissingExtraError(StreamnormError, ImportError):
    """An optional extra (torch, onnx, dask, ...) is not installed; the message says how."""


__all__ = [
    "InputError",
    "InputNotFoundError",
    "InputTypeError",
    "MissingExtraError",
    "OutputPathError",
    "RecordError",
    "SchedulerUnreachableError",
    "StreamnormError",
]
