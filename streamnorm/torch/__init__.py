"""PyTorch adapter (extra ``torch``): training hooks, BN buffers, recalibration, all-reduce.

The names live in private modules and are imported on first use, so that ``import
streamnorm.torch`` stays cheap and a missing piece reports itself clearly.
"""

from __future__ import annotations

from .._extras import lazy_names, require

require("torch")

_MODULES = {
    "._adapt": ("adapt", "adapt_groups"),
    "._calibrate": ("CalibrationReport", "LayerReport", "recalibrate"),
    "._distributed": ("all_reduce_moments",),
    "._hooks": ("bn_axes", "bn_layers", "load_estimates", "register_norm", "track"),
}

__all__ = sorted(name for names in _MODULES.values() for name in names)

__getattr__, __dir__ = lazy_names(__name__, _MODULES)
