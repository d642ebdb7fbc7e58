"""One batch to a :class:`~streamnorm._state.State`: validation, dispatch, and the rare fix-ups.

:func:`compute` is what :meth:`streamnorm.Moments.update` runs for every batch. It

1. recognises device memory by its attributes and hands it to the ``cuda`` adapter, loaded through
   :func:`streamnorm._extras.require` like any optional extra (the core never imports an adapter);
2. turns host input into a numpy array without copying it (CPU torch tensors, masked arrays, lists;
   only a ``bfloat16`` tensor, which numpy cannot view, becomes a ``float32`` copy);
3. validates dtype, axes, weights and ``nan_policy`` (:mod:`streamnorm._validate`);
4. runs the kernels (:mod:`streamnorm._reduce`) through :func:`call_kernel`, the one place compiled
   code is entered from Python for moments, so that a Ctrl-C arrives as ``KeyboardInterrupt``;
5. redoes, with an exact power-of-two scaling, the dimensions whose float64 sums overflowed
   although their input is finite (spreads above about ``1e154``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ._errors import InputError
from ._extras import require
from ._reduce import reduce_batch, run_rows
from ._state import State
from ._validate import (
    Axis,
    check_axes,
    check_nan_policy,
    check_real_dtype,
    check_weights,
    is_torch_tensor,
    nonfinite_message,
    on_cuda_device,
)

_F4 = np.dtype("f4")
_F8 = np.dtype("f8")
_FAST_DTYPES = (_F4, _F8)

#: the ways of saying "reduce the rows" of a 2-D array, checked before any normalization
_AXIS_ZERO_2D = (0, -2, (0,), (-2,))

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# entering compiled code


def interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The ``KeyboardInterrupt`` in ``exc``'s cause/context chain, if any."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def call_kernel(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` (code that enters Numba kernels); a Ctrl-C arrives as KeyboardInterrupt.

    A signal that arrives while a parallel Numba kernel runs surfaces, when the kernel returns, as
    ``SystemError("... returned a result with an exception set")`` with the
    ``KeyboardInterrupt`` only in its cause chain, which ``except KeyboardInterrupt`` misses.
    This re-raises it as the ``KeyboardInterrupt`` it is; any other error passes unchanged.
    """
    try:
        return fn(*args)
    except SystemError as e:
        ki = interrupt_in(e)
        if ki is None:
            raise
        raise KeyboardInterrupt(*ki.args) from None


# --------------------------------------------------------------------------------------------
# host input


def as_host_array(x: Any) -> np.ndarray:
    """``x`` as a numpy array, zero-copy where numpy can view it.

    CPU torch tensors are viewed (``detach`` first); ``bfloat16``, which numpy has no dtype for,
    becomes a ``float32`` copy (exact). Masked arrays are returned as they are (see
    :func:`compute`).
    """
    if isinstance(x, np.ndarray):
        return x
    if is_torch_tensor(x):
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return np.asarray(x.numpy())
    return np.asarray(x)


def _check_ndim(a: np.ndarray) -> None:
    if a.ndim == 0:
        raise InputError(
            "x is 0-d (a single number, shape ()); moments reduce over samples along an axis, "
            "so pass at least a 1-D array of samples, e.g. np.atleast_1d(x)"
        )


# --------------------------------------------------------------------------------------------
# one batch


def lean_rows(x: Any, axis: Any, weights: Any, nan_policy: Any) -> bool:
    """The batch takes the lean path: a C-contiguous (R, D) float32/float64 array, axis 0.

    ``x`` is exactly a numpy array (no subclass, no tensor) with ``R, D > 0``, native byte
    order, no weights, ``nan_policy="propagate"``, ``axis`` the int 0 or -2. Every test here is
    a type or an attribute check (about 0.3 us all told); whatever fails one of them takes
    :func:`compute`'s general path, whose validation is the one that raises.
    """
    return (
        type(x) is np.ndarray
        and weights is None
        and type(nan_policy) is str
        and nan_policy == "propagate"
        and type(axis) is int
        and (axis == 0 or axis == -2)
        and x.ndim == 2
        and (x.dtype is _F4 or x.dtype is _F8)
        and x.flags.c_contiguous
        and x.shape[0] > 0
        and x.shape[1] > 0
    )


def lean_state(a: np.ndarray) -> State:
    """The moments of a batch that passed :func:`lean_rows` as a fresh :class:`State`."""
    n, m, q, lo = call_kernel(run_rows, a, None, False)
    st = State(n, m, lo, q, (a.shape[1],), float(a.shape[0]))
    if a.itemsize == 8:
        _rescue_overflow(a, (0,), None, False, st)
    return st


def compute(x: Any, axis: Axis, weights: Any, nan_policy: str) -> State | None:
    """One batch's moments as a :class:`State`, or ``None`` for a batch without samples.

    Parameters
    ----------
    x : array_like, torch.Tensor, numpy masked array or CUDA array, shape (..., D...)
        The batch. Masked entries of a masked array are skipped as ``nan_policy="omit"`` skips
        NaN; the policy then applies to the unmasked values.
    axis, weights, nan_policy
        As in :meth:`streamnorm.Moments.update`.

    Returns
    -------
    State or None
        Flat float64 ``n``, ``mean``, ``lo``, ``m2`` over the kept dimensions (``D``), fresh
        arrays the caller may keep.
    """
    if lean_rows(x, axis, weights, nan_policy):
        return lean_state(x)
    nan_policy = check_nan_policy(nan_policy)
    if on_cuda_device(x):
        cuda = require("streamnorm.cuda", "cuda")
        return cuda.host_state(x, axis, weights, nan_policy)
    if isinstance(x, np.ma.MaskedArray):
        return _compute_masked(x, axis, weights, nan_policy)
    a = check_real_dtype(as_host_array(x))
    _check_ndim(a)
    if (
        weights is None
        and nan_policy == "propagate"
        and a.ndim == 2
        and type(axis) in (int, tuple)
        and axis in _AXIS_ZERO_2D
        and a.dtype in _FAST_DTYPES
        and a.flags.c_contiguous
        and a.shape[0] > 0
        and a.shape[1] > 0
    ):  # the fast path: (R, D) C-contiguous float, axis 0
        return lean_state(a)
    axes = check_axes(axis, a.ndim)
    w = None if weights is None else _weights(weights, a, axes)
    return _reduce(a, axes, w, nan_policy)


def _weights(weights: Any, a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    if not axes:
        raise InputError("weights need at least one reduced axis; got axis=()")
    w = check_weights(weights, a.shape[axes[0]], axes[0])
    return scale_weights(w, math.prod(a.shape[i] for i in axes) // max(1, a.shape[axes[0]]))


#: weights whose total (times the samples each weight counts) exceeds this are scaled down: the
#: kernels' weighted sums (a weight times a float32 value, times a squared deviation) stay finite
WEIGHTS_BOUND = 2.0**512


def weights_exponent(largest: float, total: float) -> int:
    """The power of two ``e`` that weights are divided by (``0``: left as they are).

    ``largest`` is the largest weight, ``total`` the weights' total times the samples each
    weight counts (``inf`` where that overflows). Beyond :data:`WEIGHTS_BOUND` the weights are
    divided by ``2**e``, the smallest power of two above the largest weight, so that the largest
    becomes a number in ``[0.5, 1)``: exact (a power of two), and the mean and variance do not
    depend on the weights' scale. The count of the batch is then the scaled total.
    """
    if not total > WEIGHTS_BOUND:
        return 0
    return int(np.frexp(largest)[1])


def scale_weights(w: np.ndarray, per_weight: int) -> np.ndarray:
    """Checked float64 weights ``w``, divided by a power of two if their total overflows.

    ``per_weight`` is the number of samples each weight counts (the product of the other
    reduced axes). See :func:`weights_exponent`; weights ``2**1074`` times smaller than the
    largest become 0 (their share of the mean is below float64's resolution anyway).
    """
    if w.size == 0:
        return w
    with np.errstate(over="ignore"):
        total = float(np.sum(w)) * per_weight
    e = weights_exponent(float(np.max(w)), total)
    return np.ldexp(w, -e) if e else w


def _reduce(
    a: np.ndarray, axes: tuple[int, ...], w: np.ndarray | None, nan_policy: str
) -> State | None:
    """The general path: ``a`` validated, ``axes`` normalized, ``w`` checked."""
    nsamp = math.prod(a.shape[i] for i in axes)
    kept = tuple(s for i, s in enumerate(a.shape) if i not in axes)
    if nsamp == 0:
        return None
    total = float(nsamp) if w is None else float(w.sum()) * (nsamp // a.shape[axes[0]])
    if math.prod(kept) == 0:
        e = np.zeros(0)
        return State(e, e.copy(), e.copy(), e.copy(), kept, total, w is not None)
    n, m, q, lo = call_kernel(reduce_batch, a, axes, w, nan_policy)
    st = State(n, m, lo, q, kept, total, w is not None, nan_policy == "omit")
    if a.dtype.kind == "f" and a.dtype.itemsize >= 8:  # narrower floats cannot overflow float64
        _rescue_overflow(a, axes, w, nan_policy == "omit", st)
    if nan_policy == "raise" and (np.isnan(st.mean) & (st.n > 0)).any():
        bad = np.sum(~np.isfinite(a), axis=axes)
        raise InputError(nonfinite_message(bad, kept))
    return st


def _compute_masked(
    x: np.ma.MaskedArray, axis: Axis, weights: Any, nan_policy: str
) -> State | None:
    """A masked array: masked entries are skipped; ``nan_policy`` applies to the others."""
    mask = np.ma.getmaskarray(x)
    data = check_real_dtype(np.ma.getdata(x))
    _check_ndim(data)
    axes = check_axes(axis, data.ndim)
    w = None if weights is None else _weights(weights, data, axes)
    if not mask.any():
        return _reduce(data, axes, w, nan_policy)
    kept = tuple(s for i, s in enumerate(data.shape) if i not in axes)
    bad = None
    if nan_policy != "omit" and data.dtype.kind == "f":
        bad = np.sum(~np.isfinite(data) & ~mask, axis=axes)
        if nan_policy == "raise" and bad.any():
            raise InputError(nonfinite_message(bad, kept))
    # NaN marks a masked entry for the omitting kernel (a copy: the mask has to reach it)
    dtype = data.dtype if data.dtype.kind == "f" else np.dtype(np.float64)
    filled = np.where(mask, np.nan, data).astype(dtype, copy=False)
    st = _reduce(filled, axes, w, "omit")
    if st is not None and bad is not None and bad.any():  # propagate NaN/Inf that were not masked
        b = np.asarray(bad).reshape(-1) > 0
        st.mean[b] = np.nan
        st.m2[b] = np.nan
        st.lo[b] = 0.0
    return st


# --------------------------------------------------------------------------------------------
# overflow


def _rescue_overflow(
    a: np.ndarray, axes: tuple[int, ...], w: np.ndarray | None, omit: bool, st: State
) -> None:
    """Redo, scaled, the dimensions whose sums overflowed although their input is finite.

    Float64 data spread wider than about ``1e154`` overflows the kernels' squared deviations
    (and a spread near ``1e308`` their shifted sums), which they report as NaN. Those
    dimensions, and only those, are computed again on ``x * 2**-e`` (``2**e`` just above the
    dimension's largest magnitude; exact, as any power of two is), and the results scaled back:
    the mean is then exact to rounding, and ``m2`` is infinite only where ``n * var`` itself
    exceeds the float64 range. ``st``'s arrays are updated in place.
    """
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero((st.n > 0) & ~(np.isfinite(st.mean) & np.isfinite(st.m2)))
    if bad.size == 0:
        return
    kept_axes = [i for i in range(a.ndim) if i not in axes]
    t = np.transpose(a, kept_axes + list(axes))  # a view: (kept..., reduced...)
    if kept_axes:
        sub = np.asarray(t[np.unravel_index(bad, st.shape)], dtype=np.float64)
    else:
        sub = np.asarray(t, dtype=np.float64)[None]
    red = tuple(range(1, sub.ndim))
    finite = np.isfinite(sub)
    ok = np.ones(bad.size, dtype=bool) if omit else finite.all(axis=red)
    if not ok.any():
        return
    sub, finite, dims = sub[ok], finite[ok], bad[ok]
    biggest = np.max(np.abs(np.where(finite, sub, 0.0)), axis=red)
    e = np.frexp(biggest)[1]  # |x| < 2**e
    scaled = np.ldexp(sub, -e.reshape((-1,) + (1,) * len(red)))
    # the weights run along the first reduced axis, which is axis 1 of ``sub``
    n, m, q, lo = call_kernel(reduce_batch, scaled, red, w, "omit" if omit else "propagate")
    with np.errstate(over="ignore"):
        st.n[dims] = n
        st.mean[dims] = np.ldexp(m, e)
        st.lo[dims] = np.ldexp(lo, e)
        st.m2[dims] = np.ldexp(q, 2 * e)


__all__ = [
    "as_host_array",
    "call_kernel",
    "compute",
    "interrupt_in",
    "lean_rows",
    "lean_state",
    "scale_weights",
    "weights_exponent",
]
