"""PyTorch adapter (extra ``torch``): training hooks, BN buffers, recalibration, all-reduce.

The names live in private modules and are imported on first use, so that ``import
streamnorm.torch`` stays cheap and a missing piece reports itself clearly.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._extras import require

require("torch")

_NAMES = {
    "adapt": "._adapt",
    "track": "._hooks",
    "load_estimates": "._hooks",
    "bn_layers": "._hooks",
    "bn_axes": "._hooks",
    "register_norm": "._hooks",
    "recalibrate": "._calibrate",
    "CalibrationReport": "._calibrate",
    "LayerReport": "._calibrate",
    "all_reduce_moments": "._distributed",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'streamnorm.torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __package__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
