"""PyTorch adapter (extra ``torch``): training hooks, BN buffers, recalibration, all-reduce.

The names live in private modules and are imported on first use, so that ``import
streamnorm.torch`` stays cheap and a missing piece reports itself clearly.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._extras import require

require("torch")

_NAMES = {
    "track": "._torch_hooks",
    "load_estimates": "._torch_hooks",
    "bn_layers": "._torch_hooks",
    "bn_axes": "._torch_hooks",
    "recalibrate": "._torch_calibrate",
    "CalibrationReport": "._torch_calibrate",
    "LayerReport": "._torch_calibrate",
    "all_reduce_moments": "._torch_distributed",
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
