"""Slow, obviously-correct reference implementations that the kernels are compared to.

The one oracle of the test suite: the CPU kernels, Dask and the GPU path (under the simulator) are
all compared to :func:`moments_ld` / :func:`reference`.
"""

from __future__ import annotations

import numpy as np

import streamnorm


def moments_ld(x, axis=0, weights=None, omit=False):
    """Two-pass moments in long double: returns (count, mean, m2) as long-double arrays.

    ``weights`` apply along the first reduced axis; a sample of weight 0 is left out (even a
    NaN), as the library does; ``omit`` drops non-finite values.
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
    xl = np.where(wb == 0, 0, xl)
    n = wb.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (wb * xl).sum(axis=axes) / n
        d = xl - np.expand_dims(mean, axes)
        m2 = (wb * d * d).sum(axis=axes)
    return n, mean, m2


def reference(x, axis=0, weights=None, omit=False) -> streamnorm.Moments:
    """:func:`moments_ld` as a :class:`streamnorm.Moments` (float64, rounded once).

    Dimensions whose mean or M2 is not finite hold NaN in both; dimensions without samples hold
    a NaN mean and an M2 of 0, as the library's states do.
    """
    x = np.asarray(x)
    n, mean, m2 = moments_ld(x, axis, weights=weights, omit=omit)
    mean = np.atleast_1d(mean).astype(np.float64)
    m2 = np.atleast_1d(m2).astype(np.float64)
    n = np.atleast_1d(n).astype(np.float64)
    bad = ~(np.isfinite(mean) & np.isfinite(m2))
    mean[bad], m2[bad] = np.nan, np.nan
    m2[n == 0] = 0.0
    axes = tuple(range(x.ndim)) if axis is None else tuple(np.atleast_1d(axis) % max(x.ndim, 1))
    shape = tuple(s for i, s in enumerate(x.shape) if i not in axes)
    return streamnorm.Moments.from_arrays(n.reshape(shape), mean.reshape(shape), m2.reshape(shape))


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
