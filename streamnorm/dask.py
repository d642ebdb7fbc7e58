"""Dask adapter (extra ``dask``): moments of arrays larger than memory, on threads or a cluster.

:func:`moments` is a :func:`dask.array.reduction`: streamnorm's kernel computes each chunk's
``(count, mean, M2)``, and the chunk states are combined with the Chan merge in Dask's tree. It runs
on whatever scheduler is active (the threaded default, or a ``distributed`` client).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from typing import Any

import numpy as np

from ._compute import WEIGHTS_BOUND, scale_weights
from ._errors import InputError, InputTypeError
from ._extras import require
from ._moments import Moments
from ._state import State, empty_state
from ._validate import (
    Axis,
    check_axes,
    check_nan_policy,
    check_real_dtype,
    check_split_every,
    check_weights,
    check_weights_layout,
    nonfinite_message,
)

da = require("dask.array", "dask")
dask = require("dask", "dask")

__all__ = ["moments"]

#: Dtype of the reduction's output blocks: a (count, mean, mean residual, M2) record per dimension.
STATE_DTYPE = np.dtype([("n", "f8"), ("mean", "f8"), ("lo", "f8"), ("m2", "f8")])
#: The arrays of a :class:`~streamnorm._state.State` that travel as the record fields.
FIELDS = ("n", "mean", "lo", "m2")

#: A mean counts as far from zero above this many standard deviations: its float64 rounding
#: would then show in the merge (relative error about 1e-16 * FAR per merge level).
FAR = 100.0

#: Bytes of float64 per shifted slab of a block (see ``_shifted``).
SLAB_BYTES = 4 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# the three steps of the reduction
#
# ``chunk`` returns the block's :class:`Moments` (the core kernel on the block as it is, no copy);
# ``combine`` and ``aggregate`` get them in block order (``concatenate=False``) and Chan-merge them
# with ``+=``. Moments keep each mean as a double-double (``mean + mean_lo``), so the difference of
# two chunk means, which the merge squares, keeps its digits far from zero whatever the chunking.


def _empty_state(kept: tuple[int, ...]) -> Moments:
    """A state with no samples over ``kept`` dimensions (merging it changes nothing)."""
    return Moments.from_state(empty_state(kept))


def _chunk(
    x: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    axis: tuple[int, ...],
    nan_policy: str = "propagate",
) -> Moments:
    """One block's state over the block's kept dimensions (reduced axes dropped).

    The core kernel runs on the block as it is. Where the kernel reports no rounding residual for
    a mean far from zero (relative to the spread), the block is done again shifted by its first
    sample (see :func:`_shifted`), which gives the residual exactly.
    """
    kept = tuple(s for i, s in enumerate(x.shape) if i not in axis)
    if x.size == 0:  # an empty block (no samples, or no dimensions)
        return _empty_state(kept)
    w = None
    if weights is not None:
        a0 = axis[0]
        w = np.ascontiguousarray(
            weights[tuple(slice(None) if i == a0 else 0 for i in range(x.ndim))], dtype=np.float64
        )
    ax: int | tuple[int, ...] = axis[0] if len(axis) == 1 else axis  # the core's rows fast path
    st = Moments().update(x, ax, weights=w, nan_policy=nan_policy)
    if _residual_missing(st):
        st = _shifted(x, axis, w, nan_policy)
    return st


def _residual_missing(st: Moments) -> bool:
    """True if some mean sits far from zero (``|mean| > FAR * std``) without a residual."""
    s = st.state()
    if s is None:
        return False
    n, mean, lo, m2 = s.n, s.mean, s.lo, s.m2
    with np.errstate(all="ignore"):
        ok = (n > 1) & np.isfinite(mean) & np.isfinite(m2) & (m2 > 0)
        far = ok & (np.abs(mean) > FAR * np.sqrt(m2 / np.where(n > 0, n, 1.0))) & (lo == 0.0)
    return bool(far.any())


def _shifted(
    x: np.ndarray, axis: tuple[int, ...], w: np.ndarray | None, nan_policy: str
) -> Moments:
    """The block's state computed on ``x - ref`` (``ref``: its first sample), slab by slab.

    The shifted means are small, so their rounding is negligible, and ``ref + shifted mean`` is
    split exactly into ``mean + mean_lo`` (two-sum). Slabs along the first reduced axis hold at
    most ``SLAB_BYTES`` of float64 each.
    """
    a0 = axis[0]
    first = tuple(slice(0, 1) if i in axis else slice(None) for i in range(x.ndim))
    ref = np.array(x[first], dtype=np.float64)  # keepdims shape, broadcasts against x
    if nan_policy == "omit":  # a missing first sample: the column's mean is as good a reference
        bad = ~np.isfinite(ref)
        if bad.any():
            with np.errstate(all="ignore"):
                m = np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=axis, keepdims=True)
            ref[bad] = np.where(np.isfinite(m), m, 0.0)[bad]
    ref[~np.isfinite(ref)] = 0.0
    ax: int | tuple[int, ...] = a0 if len(axis) == 1 else axis
    acc = Moments()
    step = max(1, SLAB_BYTES // max(1, (x.size // x.shape[a0]) * 8))
    for i in range(0, x.shape[a0], step):
        sl = tuple(slice(i, i + step) if j == a0 else slice(None) for j in range(x.ndim))
        y = np.subtract(x[sl], ref, dtype=np.float64)
        acc.update(y, ax, weights=None if w is None else w[i : i + step], nan_policy=nan_policy)
    st = acc.state()
    if st is None:  # cannot happen: x has samples
        return _empty_state(tuple(s for i, s in enumerate(x.shape) if i not in axis))
    r = ref.reshape(-1)
    s = st.mean
    hi = r + s  # two-sum: hi + err == r + s exactly
    bb = hi - r
    err = (r - (hi - bb)) + (s - bb)
    empty = st.n == 0
    mean = np.where(empty, np.nan, hi)
    lo = np.where(empty | ~np.isfinite(hi), 0.0, err + st.lo)
    return Moments.from_state(replace(st, mean=mean, lo=lo))


def _flatten(parts: Any) -> list[Moments]:
    """Dask hands ``combine``/``aggregate`` one state or nested lists of states, in block order."""
    if isinstance(parts, Moments):
        return [parts]
    out: list[Moments] = []
    for p in parts:
        out.extend(_flatten(p))
    return out


def _merge(parts: Any) -> Moments:
    """Chan-merge the states in block order (a fixed order, whatever the completion order)."""
    return Moments.merge_all(_flatten(parts))


def _combine(
    parts: Any, axis: tuple[int, ...], keepdims: bool = True, computing_meta: bool = False
) -> Any:
    if computing_meta:
        return parts
    return _merge(parts)


def _aggregate(
    parts: Any, axis: tuple[int, ...], keepdims: bool = False, computing_meta: bool = False
) -> Any:
    """The merged state as a structured array of records, shape = the kept block's."""
    if computing_meta:
        return parts
    st = _merge(parts).state()
    if st is None:  # cannot happen (empty blocks carry their shape), kept for safety
        raise RuntimeError("internal: a kept block received no state")
    shape = st.shape
    out = np.empty(shape, dtype=STATE_DTYPE)
    for k in FIELDS:
        out[k] = getattr(st, k).reshape(shape)
    if keepdims:
        out = np.expand_dims(out, tuple(sorted(axis)))
    return out


# --------------------------------------------------------------------------------------------
# input checks


def _check_x(x: Any) -> Any:
    if not isinstance(x, da.Array):
        raise InputTypeError(
            f"streamnorm.dask.moments takes a dask.array.Array, got {type(x).__module__}."
            f"{type(x).__name__}; use streamnorm.moments for in-memory arrays, or wrap the data "
            "with dask.array.from_array(x, chunks=...)"
        )
    check_real_dtype(np.empty(0, dtype=x.dtype))
    if x.ndim == 0:
        raise InputError(
            "x is 0-d (a single number, shape ()); moments reduce over samples along an axis, "
            "so pass at least a 1-D array of samples"
        )
    if any(math.isnan(c) for cs in x.chunks for c in cs):
        raise InputError(
            "x has unknown chunk sizes (NaN in x.chunks); call x.compute_chunk_sizes() first"
        )
    return x


def _dask_weights(weights: Any, x: Any, axes: tuple[int, ...]) -> tuple[Any, Any]:
    """Weights as a 1-D dask array chunked like ``x`` along ``axes[0]``, and broadcast to ``x``.

    In-memory weights get the full check (:func:`streamnorm._validate.check_weights`); a Dask
    array of weights is checked for dtype and shape only (its values are not read here).
    """
    if not axes:
        raise InputError("weights need at least one reduced axis; got axis=()")
    a0 = axes[0]
    n0 = x.shape[a0]
    if "weights" not in inspect.signature(da.reduction).parameters:
        raise ImportError(
            f"weights need dask.array.reduction(weights=...), which dask {dask.__version__} "
            "lacks; upgrade dask (pip install -U 'dask[array]')"
        )
    # weights whose total overflows are divided by one power of two for the whole array (see
    # streamnorm._compute.weights_exponent): chunks scaled each on its own would disagree
    per_weight = math.prod(x.shape[i] for i in axes) // max(1, n0)
    if isinstance(weights, da.Array):
        w = check_weights_layout(weights, n0, a0).astype(np.float64).rechunk((x.chunks[a0],))
        over = (w / WEIGHTS_BOUND).sum() * per_weight > 1.0  # scaled: the sum cannot overflow
        e = da.where(over, da.frexp(w.max())[1], 0)
        w = da.ldexp(w, -e)
    else:
        checked = scale_weights(check_weights(weights, n0, a0), per_weight)
        w = da.from_array(checked, chunks=(x.chunks[a0],))
    shape = [1] * x.ndim
    shape[a0] = n0
    wb = da.broadcast_to(w.reshape(tuple(shape)), x.shape, chunks=x.chunks)
    return w, wb


# --------------------------------------------------------------------------------------------
# public


def moments(
    x: Any,
    axis: Axis = 0,
    *,
    weights: Any = None,
    nan_policy: str = "propagate",
    split_every: int | dict[int, int] | None = None,
) -> Moments:
    """Per-dimension moments of a Dask array, computed chunk by chunk and merged in a tree.

    Parameters
    ----------
    x : dask.array.Array, shape (..., D...)
        Real numbers, any chunking (regular, irregular, empty chunks, chunks along the kept axes).
        Only one chunk per task is in memory at a time.
    axis : int or tuple of int or None, default 0
        Axes to reduce over, as in :func:`streamnorm.moments`: ``(N, D)`` rows ``axis=0``,
        NCHW ``axis=(0, 2, 3)``, NHWC ``axis=(0, 1, 2)``, per-sample ``axis=(2, 3)``.
    weights : array_like or dask.array.Array, shape (n,), optional
        One non-negative frequency weight per sample along the first reduced axis. A Dask array
        is rechunked to the chunking of that axis.
    nan_policy : {"propagate", "raise", "omit"}
        As in :meth:`streamnorm.Moments.update`. ``raise`` reports the count and the (global)
        dimensions of the non-finite values after the pass.
    split_every : int or dict, optional
        Fan-in of Dask's reduction tree (chunk states merged per node); Dask's default if omitted.

    Returns
    -------
    Moments
        The same state ``streamnorm.moments(x.compute(), axis, ...)`` would give (to rounding),
        with dimension shape ``x.shape`` without the reduced axes.

    Notes
    -----
    This is :func:`dask.array.reduction` with ``chunk`` = streamnorm's kernel (each chunk's count,
    mean and M2, computed with a per-block shift) and ``combine``/``aggregate`` = the Chan merge
    ``M2 = M2a + M2b + d^2 na nb / n``, never ``E[x^2] - E[x]^2``. The chunk states keep their
    means as double-doubles (``mean + mean_lo``), so the difference of two chunk means, which the
    merge squares, keeps its digits for data far from zero whatever the chunking
    (``dask.array.var`` merges chunk means computed from raw sums, and loses digits there as the
    chunks get smaller). A chunk whose kernel path gives no residual for a mean more than ``FAR``
    standard deviations from zero is done again shifted by its first sample, in float64 slabs.
    The tree's shape depends only on the chunking, and each node merges its
    inputs in block order, so the result does not depend on which worker finishes first; lost
    chunks are recomputed by Dask.

    Examples
    --------
    >>> import numpy as np, dask.array as da, streamnorm.dask
    >>> x = da.from_array(np.arange(12.0).reshape(6, 2), chunks=(4, 2))
    >>> m = streamnorm.dask.moments(x)
    >>> m.count, m.mean.tolist(), m.var().tolist()
    (6, [5.0, 6.0], [11.666666666666666, 11.666666666666666])
    """
    x = _check_x(x)
    nan_policy = check_nan_policy(nan_policy)
    axes = check_axes(axis, x.ndim)
    split_every = check_split_every(split_every)
    w, wb = (None, None) if weights is None else _dask_weights(weights, x, axes)
    nsamp = int(np.prod([x.shape[i] for i in axes], dtype=np.int64))
    kept = tuple(s for i, s in enumerate(x.shape) if i not in axes)
    if nsamp == 0 or int(np.prod(kept, dtype=np.int64)) == 0 or not axes:
        # nothing to reduce over a cluster: the core handles the degenerate shapes
        return _degenerate(x, axes, w, nan_policy)
    kernel_policy = "propagate" if nan_policy == "raise" else nan_policy
    extra: dict[str, Any] = {} if wb is None else {"weights": wb}
    red = da.reduction(
        x,
        chunk=_chunk_with(kernel_policy),
        combine=_combine,
        aggregate=_aggregate,
        axis=axes,
        keepdims=False,
        dtype=STATE_DTYPE,
        split_every=split_every,
        concatenate=False,
        meta=np.empty((0,) * len(kept), dtype=STATE_DTYPE),
        name="streamnorm-moments",
        **extra,
    )
    if w is None:
        (st,) = dask.compute(red)
        total = float(nsamp)
    else:
        st, ws = dask.compute(red, w.sum())
        total = float(ws) * (nsamp // x.shape[axes[0]])
    fields = {k: np.ascontiguousarray(np.asarray(st)[k]).reshape(-1) for k in FIELDS}
    if nan_policy == "raise" and (np.isnan(fields["mean"]) & (fields["n"] > 0)).any():
        bad = np.asarray((~da.isfinite(x)).sum(axis=axes).compute())
        raise InputError(nonfinite_message(bad, kept))
    omit = nan_policy == "omit"
    return Moments.from_state(
        State(**fields, shape=kept, total=total, weighted=weights is not None, per_dim=omit)
    )


def _chunk_with(nan_policy: str) -> Any:
    """Dask's ``chunk`` callable: ``chunk(x_chunk, weights_chunk=None, axis, keepdims)``."""

    def chunk(
        x: np.ndarray,
        weights: np.ndarray | None = None,
        axis: tuple[int, ...] = (),
        keepdims: bool = True,
        computing_meta: bool = False,
    ) -> Any:
        if computing_meta:
            return x
        return _chunk(x, weights, axis=axis, nan_policy=nan_policy)

    chunk.__name__ = "streamnorm_chunk"
    return chunk


def _degenerate(x: Any, axes: tuple[int, ...], w: Any, nan_policy: str) -> Moments:
    """No samples, no dimensions or no reduced axis: the core gives the state directly.

    With no samples or no dimensions nothing is read (a zero-size stand-in carries the shape);
    with ``axis=()`` every element is its own dimension, so the state is as large as ``x``.
    """
    w1 = None if w is None else np.asarray(w.compute())
    if x.size == 0:
        data = np.empty(x.shape, dtype=x.dtype)
    else:
        data = np.asarray(x.compute())
    return Moments().update(data, axes, weights=w1, nan_policy=nan_policy)
