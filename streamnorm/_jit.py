"""Compiling a kernel twice: the parallel original and its serial twin.

Numba's on-disk cache tells functions apart by qualified name and source line, not by their
compile options. A serial twin compiled from the very function object of its parallel original
would therefore share (and overwrite) the original's cache entries. :func:`twins` compiles a
renamed copy instead, so that each variant has cache entries of its own. Every kernel module
that ships a serial twin uses it.

It also says whether the parallel kernels may run at all (:func:`threads_ok`): not in a process
started by ``fork()``. GNU OpenMP cannot survive a fork: Numba terminates a child forked after a
parallel kernel at its first parallel launch, and a child forked after PyTorch ran its own
OpenMP threads (one runtime for both) hangs there. A forked child therefore runs the serial
twins, which give the same bits.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

from numba import njit

#: set in a process started by fork() (see threads_ok)
_forked = False


def _after_fork_in_child() -> None:
    # unconditional: the parent's OpenMP runtime may have been started by another library
    # (PyTorch's CPU ops share it), which nothing here can see
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def threads_ok() -> bool:
    """Whether the parallel kernels may run in this process.

    False in a process started by ``fork()`` (``os.fork``, ``multiprocessing``'s ``fork`` start
    method, DataLoader workers) and in its own forked children: an OpenMP runtime started
    before the fork does not survive it, and every dispatch takes the serial twin instead
    (bit-identical results, one thread). Processes started by ``spawn`` keep their threads.
    """
    return not _forked


def renamed(func: Callable[..., Any], name: str) -> types.FunctionType:
    """A copy of the plain Python function ``func`` under the name ``name`` (same code object)."""
    if not isinstance(func, types.FunctionType):
        raise TypeError(f"expected a plain Python function, got {type(func).__name__}")
    twin = types.FunctionType(
        func.__code__, func.__globals__, name, func.__defaults__, func.__closure__
    )
    twin.__qualname__ = name
    twin.__doc__ = func.__doc__
    return twin


def twins(
    func: Callable[..., Any], parallel: dict[str, Any], serial: dict[str, Any]
) -> tuple[Any, Any]:
    """``(parallel kernel, serial kernel)`` compiled from ``func`` with the two option sets.

    The serial one is compiled from a copy named ``<name>_serial``, so that the two never share
    an on-disk cache entry.
    """
    name = func.__name__
    return njit(**parallel)(func), njit(**serial)(renamed(func, name + "_serial"))


__all__ = ["renamed", "threads_ok", "twins"]
