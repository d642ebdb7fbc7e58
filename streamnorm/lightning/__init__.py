"""PyTorch Lightning adapter (extra ``lightning``): the :class:`RecalibrateBN` callback.

The callback re-estimates every BatchNorm layer's ``running_mean`` / ``running_var`` with the
exact population estimator at the end of ``fit`` (and, optionally, before each validation epoch),
merging the statistics of all ranks exactly under DDP.

The names live in a private module imported on first use, so that ``import streamnorm`` never
loads Lightning and a missing extra reports itself clearly.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._extras import require

require("lightning")
require("torch", "lightning")

_NAMES = {"RecalibrateBN": "._callback"}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'streamnorm.lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __package__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
