"""The progress bar of a calibration (tqdm, an optional extra, imported on first use)."""

from __future__ import annotations

from typing import Any

from .._extras import require

__all__ = ["progress_bar"]


def progress_bar(total: int | None, enabled: bool, desc: str = "calibrating") -> Any:
    """A tqdm bar of ``total`` batches on a terminal when ``enabled``; ``None`` otherwise.

    The bar hides itself when the output is not a terminal (``disable=None``) and disappears
    when closed (``leave=False``).
    """
    if not enabled:
        return None
    tqdm = require("tqdm").tqdm
    return tqdm(total=total, desc=desc, unit="batch", disable=None, leave=False)
