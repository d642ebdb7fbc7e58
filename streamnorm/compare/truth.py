"""The ground truth: per-layer population statistics of the final weights, in evaluation mode."""

from __future__ import annotations

import copy
from typing import Any

from .. import Moments
from .._errors import InputError
from .._extras import require
from .._validate import check_positive_int


def _check_model(model: Any) -> list[tuple[str, Any]]:
    """The model's BatchNorm layers; each must keep running statistics."""
    from ..torch import bn_layers

    layers = bn_layers(model)
    if not layers:
        raise InputError("model has no BatchNorm layers")
    for name, bn in layers:
        if bn.running_mean is None or bn.running_var is None:
            raise InputError(
                f"BatchNorm layer {name!r} has track_running_stats=False; it normalizes with "
                "batch statistics at test time and has no buffers to estimate"
            )
    return layers


def _pool_inputs(model: Any, x: Any, batch_size: int) -> dict[str, Moments]:
    """Pool the input of every BatchNorm layer over ``x`` in one evaluation-mode pass."""
    torch = require("torch")
    from ..torch import bn_axes, bn_layers

    pooled: dict[str, Moments] = {}

    def hook_for(name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            z = args[0].detach()
            if z.dtype in (torch.float16, torch.bfloat16):
                z = z.float()  # numpy cannot view half precision
            pooled.setdefault(name, Moments()).update(z, axis=bn_axes(z.ndim))

        return hook

    handles = [bn.register_forward_pre_hook(hook_for(name)) for name, bn in bn_layers(model)]
    try:
        model.eval()
        with torch.no_grad():
            for i in range(0, int(x.shape[0]), batch_size):
                model(x[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return pooled


def ground_truth(model: Any, x: Any, *, batch_size: int = 512) -> dict[str, Moments]:
    """Population statistics of every BatchNorm input with the model's current weights.

    Parameters
    ----------
    model : torch.nn.Module
        Not changed: the work is done on a deep copy.
    x : torch.Tensor, shape (N, ...)
        The whole training set.
    batch_size : int, default 512
        Samples per forward pass; the result does not depend on it beyond rounding.

    Returns
    -------
    dict of str to Moments
        Per BatchNorm layer (qualified name, in :func:`streamnorm.torch.bn_layers` order) the
        exact pooled count, mean and M2 of its input over all of ``x``, reduced over every axis
        but the channel axis.

    Notes
    -----
    The input of a BatchNorm layer depends on how the layers before it normalize. The truth
    used here is the distribution a layer sees **at test time** when every earlier layer uses
    its own true statistics: what :func:`streamnorm.torch.recalibrate` with
    ``mode="sequential"`` and ``estimator="population"`` loads (layers in forward order, each
    pooled over the whole set in evaluation mode with the earlier ones already recalibrated).
    This function recalibrates a copy of the model that way, then pools every layer's input in
    one more evaluation-mode pass, which sees exactly the inputs the sequential passes saw, to
    return the exact float64 moments rather than the buffers' rounded values. This is what an
    ideal recalibration with the final weights (PreciseBN, ``update_bn`` with one huge batch)
    would load. Estimators that average training-mode batches also carry the train/test
    discrepancy of small batches, and their error against this truth includes it.
    """
    torch = require("torch")
    from ..torch import recalibrate

    layers = _check_model(model)
    xt = torch.as_tensor(x)
    n = int(xt.shape[0])
    if n < 2:
        raise InputError(f"x must hold at least 2 samples, got {n}")
    batch_size = check_positive_int("batch_size", batch_size)
    work = copy.deepcopy(model)
    recalibrate(
        work, xt, estimator="population", mode="sequential", progress=False, batch_size=batch_size
    )
    pooled = _pool_inputs(work, xt, batch_size)
    missing = [name for name, _ in layers if name not in pooled]
    if missing:
        raise InputError(f"BatchNorm layer {missing[0]!r} was not called in the forward pass")
    return {name: pooled[name] for name, _ in layers}


__all__ = ["ground_truth"]
