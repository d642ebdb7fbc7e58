"""Compiling a kernel twice: the parallel original and its serial twin.

Numba's on-disk cache tells functions apart by qualified name and source line, not by their
compile options. A serial twin compiled from the very function object of its parallel original
would therefore share (and overwrite) the original's cache entries. :func:`twins` compiles a
renamed copy instead, so that each variant has cache entries of its own. Every kernel module
that ships a serial twin uses it.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from numba import njit


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


__all__ = ["renamed", "twins"]
