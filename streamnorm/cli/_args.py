"""What the subcommands share: argparse types and passing flags on as keyword arguments."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["count", "keywords"]


def count(text: str) -> int:
    """An integer >= 1 (argparse ``type=``)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {n}")
    return n


def keywords(target: Callable[..., Any], args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The keyword arguments of ``target`` (a function or a dataclass) that are flags of the same
    name in ``args`` (``--batch-size`` -> ``batch_size``), with ``extra`` added or replacing.

    Examples
    --------
    >>> compare(**keywords(compare, args, progress=not args.quiet))      # doctest: +SKIP
    """
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(target).parameters.values()
    out = {
        p.name: getattr(args, p.name) for p in params if p.kind in named and hasattr(args, p.name)
    }
    out.update(extra)
    return out
