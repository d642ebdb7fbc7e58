"""Errors of test-time statistics against the truth: per layer, per snapshot, overall."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._errors import InputError

#: ``{layer: {estimator: (mean, running_var)}}``, arrays of shape (C,)
Estimates = Mapping[str, Mapping[str, tuple[Any, Any]]]
#: ``{layer: (mean, var)}`` of the truth, arrays of shape (C,)
Truth = Mapping[str, tuple[np.ndarray, np.ndarray]]
#: ``{estimator: {layer: errors}}``
Scores = dict[str, dict[str, dict[str, float]]]


def layer_errors(
    mean_hat: Any, var_hat: Any, mean: Any, var: Any, *, eps: float = 1e-5
) -> dict[str, float]:
    """Errors of one layer's estimate against the truth, aggregated over channels.

    Parameters
    ----------
    mean_hat, var_hat : array_like, shape (C,)
        Estimated per-channel mean and variance.
    mean, var : array_like, shape (C,)
        True per-channel mean and variance.
    eps : float, default 1e-5
        BatchNorm's ``eps``; it is added to both variances (see Notes).

    Returns
    -------
    dict
        ``mean_err``: mean over channels of ``|mean_hat - mean| / sqrt(var + eps)``;
        ``logvar``: mean over channels of ``log((var_hat + eps) / (var + eps))`` (signed: the
        bias of the variance, negative = underestimated); ``logvar_abs``: mean over channels of
        its absolute value; ``mean_err_max`` and ``logvar_abs_max``: the worst channel.

    Notes
    -----
    At test time BatchNorm computes ``(z - mean_hat) / sqrt(var_hat + eps)``. With the true
    statistics that would be a standard normalization, so ``|mean_hat - mean| / sqrt(var + eps)``
    is the shift of the normalized output in units of its standard deviation and
    ``log((var_hat + eps) / (var + eps))`` is twice the log of its scale error. Adding ``eps``
    keeps the errors finite for dead channels (variance 0), exactly where BatchNorm itself
    stays finite.
    """
    mh, vh, m, v = (
        np.asarray(a, dtype=np.float64).reshape(-1) for a in (mean_hat, var_hat, mean, var)
    )
    if not mh.shape == vh.shape == m.shape == v.shape:
        raise InputError(
            "mean_hat, var_hat, mean and var must have the same shape (C,), got "
            f"{mh.shape}, {vh.shape}, {m.shape} and {v.shape}"
        )
    if mh.size == 0:
        raise InputError("no channels to compare: the arrays are empty")
    if not eps >= 0:
        raise InputError(f"eps must be >= 0, got {eps!r}")
    if np.any(v < 0) or np.any(vh < 0):
        raise InputError("variances must be >= 0")
    scale = np.sqrt(v + eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        me = np.abs(mh - m) / scale
        lv = np.log(vh + eps) - np.log(v + eps)
    return {
        "mean_err": float(np.mean(me)),
        "mean_err_max": float(np.max(me)),
        "logvar": float(np.mean(lv)),
        "logvar_abs": float(np.mean(np.abs(lv))),
        "logvar_abs_max": float(np.max(np.abs(lv))),
    }


def score(snap: Estimates, truth: Truth, eps: Mapping[str, float]) -> Scores:
    """``{estimator: {layer: errors}}`` of one snapshot of estimates (see :func:`layer_errors`)."""
    out: Scores = {}
    for layer, (m, v) in truth.items():
        for est, (mh, vh) in snap[layer].items():
            out.setdefault(est, {})[layer] = layer_errors(mh, vh, m, v, eps=eps[layer])
    return out


def overall(per_layer: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean over layers of each metric of ``{layer: errors}``."""
    keys = next(iter(per_layer.values())).keys()
    return {k: float(np.mean([d[k] for d in per_layer.values()])) for k in keys}


def seed_sd(values: Any) -> float:
    """Sample standard deviation (ddof 1) of a list of numbers; 0 for fewer than two."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def max_relative_diff(reference: Truth, estimates: Estimates, name: str) -> float | None:
    """Largest relative difference between ``reference`` ``(mean, var)`` and estimator ``name``.

    The mean's difference is relative to ``sqrt(var)``, the variance's to ``var`` (each plus
    1e-12); ``None`` when ``name`` is not among the estimates.
    """
    if any(name not in estimates[layer] for layer in reference):
        return None
    worst = 0.0
    for layer, (m, v) in reference.items():
        em, ev = (np.asarray(a) for a in estimates[layer][name])
        worst = max(
            worst,
            float(np.max(np.abs(em - m) / (np.sqrt(v) + 1e-12))),
            float(np.max(np.abs(ev - v) / (v + 1e-12))),
        )
    return worst


__all__ = [
    "Estimates",
    "Scores",
    "Truth",
    "layer_errors",
    "max_relative_diff",
    "overall",
    "score",
    "seed_sd",
]
