"""PyTorch Lightning adapter (extra ``lightning``): the :class:`RecalibrateBN` callback.

The callback re-estimates every BatchNorm layer's ``running_mean`` / ``running_var`` with the
exact population estimator at the end of ``fit`` (and, optionally, before each validation epoch),
merging the statistics of all ranks exactly under DDP.

The names live in a private module imported on first use, so that ``import streamnorm`` never
loads Lightning and a missing extra reports itself clearly.
"""

from __future__ import annotations

from .._extras import lazy_names, require

require("lightning")
require("torch", "lightning")

__all__ = ["RecalibrateBN"]

__getattr__, __dir__ = lazy_names(__name__, {"._callback": __all__})
