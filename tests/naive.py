"""Slow, obviously-correct reference implementations that the kernels are compared to."""

from __future__ import annotations

import numpy as np


def moments_ld(x, axis=0, weights=None, omit=False):
    """Two-pass moments in long double: returns (count, mean, m2) as long-double arrays.

    ``weights`` apply along the first reduced axis; ``omit`` drops non-finite values.
    """
    x = np.asarray(x)
    if x.dtype.kind == "b":
        x = x.astype(np.uint8)
    xl = x.astype(np.longdouble)
    if axis is None:
        axis = tuple(range(x.ndim))
    axes = (axis,) if np.isscalar(axis) else tuple(axis)
    axes = tuple(sorted(a % x.ndim for a in axes))
    w = np.ones(x.shape[axes[0]] if axes else 1, dtype=np.longdouble)
    if weights is not None:
        w = np.asarray(weights, dtype=np.longdouble)
    shape = [1] * x.ndim
    if axes:
        shape[axes[0]] = -1
    wb = np.broadcast_to(w.reshape(shape), x.shape).astype(np.longdouble)
    if omit:
        good = np.isfinite(xl)
        wb = np.where(good, wb, 0)
        xl = np.where(good, xl, 0)
    n = wb.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (wb * xl).sum(axis=axes) / n
        d = xl - np.expand_dims(mean, axes)
        m2 = (wb * d * d).sum(axis=axes)
    return n, mean, m2


def naive_var(x, axis=0):
    """Textbook E[x^2] - E[x]^2 in the input's precision: what the adversarial tests defeat."""
    x = np.asarray(x)
    dt = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    return ((x * x).mean(axis=axis, dtype=dt) - x.mean(axis=axis, dtype=dt) ** 2).astype(np.float64)


def var_exact(values):
    """Exact population variance of a 1-D float sequence, with fractions."""
    from fractions import Fraction

    fr = [Fraction(float(v)) for v in values]
    n = len(fr)
    mean = sum(fr) / n
    return float(sum((v - mean) ** 2 for v in fr) / n)
