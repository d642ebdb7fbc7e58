"""Hooks that feed every BatchNorm layer's input to a Tracker, and writing estimates back."""

from __future__ import annotations

from typing import Any

from ._extras import require

torch = require("torch")

from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

__all__ = ["bn_layers"]


def bn_layers(model: Any) -> list[tuple[str, Any]]:
    """Every BatchNorm module of ``model`` with its qualified name, in definition order.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    list of (str, torch.nn.Module)
        ``(name, module)`` for each subclass of ``torch.nn.modules.batchnorm._BatchNorm``
        (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and the ``LazyBatchNorm`` variants), in the
        order ``model.named_modules()`` visits them (the order the modules were assigned). A
        module shared at several places appears once, under its first name. ``InstanceNorm``,
        ``GroupNorm`` and ``LayerNorm`` have no running statistics and are not listed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
