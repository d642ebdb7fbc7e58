"""The mergeable per-dimension state :class:`Moments` and :func:`moments`.

``Moments`` wraps one :class:`~streamnorm._state.State` (the internal moments type every producer
returns); :func:`streamnorm._compute.compute` turns a batch into one. This module owns merging,
reading and serialization; validation and dispatch live in ``_compute``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from . import _kernels as K
from ._compute import compute, interrupt_in, lean_rows, lean_state
from ._errors import InputError, InputTypeError, RecordError
from ._io import atomic_write, check_header, read_npz, record_scalar
from ._reduce import merge_rows, plain_rows, rows_plan
from ._state import State
from ._validate import Axis, check_state_arrays

FORMAT_NAME = "streamnorm.Moments"
FORMAT_VERSION = 1


class Moments:
    """Mergeable per-dimension count, mean and sum of squared deviations (M2), in float64.

    ``Moments()`` is an empty accumulator; its dimension shape is fixed by the first update.
    Feed batches with :meth:`update`, combine states with ``a + b`` / ``a += b`` / :meth:`merge`
    (Chan et al.'s parallel formula), read ``count``, ``mean``, ``var(ddof)``.

    Parameters
    ----------
    x : array_like, optional
        A first batch; ``Moments(x, axis)`` equals ``Moments().update(x, axis)``.
    axis, weights, nan_policy
        As in :meth:`update`.

    Notes
    -----
    The state keeps ``M2 = sum (x - mean)^2`` rather than a variance, so that merging is exact:
    ``n = na + nb; d = mb - ma; mean = ma + d nb/n; M2 = M2a + M2b + d^2 na nb / n``. Any ``ddof``
    can be asked for afterwards. With frequency weights, ``count`` is the total weight and
    ``var(ddof=1)`` is the unbiased estimate for the repeated samples. Each mean is kept as a
    double-double (a float64 and its rounding residual), so that many merges far from zero keep
    the mean correctly rounded. Since the state holds ``M2 = n var``, a variance is infinite when
    ``n var`` exceeds the float64 range (about ``1.8e308``).

    Adapters (the GPU path, Dask, the ``torch.distributed`` all-reduce) exchange states through
    :meth:`from_state` and :meth:`state`, never through private attributes.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> m = streamnorm.Moments().update(x[:1]).update(x[1:])
    >>> m.count, m.mean.tolist(), m.var().tolist()
    (4, [4.5, 5.5, 6.5], [11.25, 11.25, 11.25])
    """

    __slots__ = ("_st", "_shared", "_lean", "_lock")

    def __init__(
        self,
        x: Any = None,
        axis: Axis = 0,
        *,
        weights: Any = None,
        nan_policy: str = "propagate",
    ) -> None:
        self._st: State | None = None
        # the arrays of _st are referenced elsewhere (see state()): copy before changing them
        self._shared = False
        # shape, dtype and blocking of the last batch merged by the lean path (see update())
        self._lean: tuple[tuple[int, ...], np.dtype[Any], tuple[int, int, bool]] | None = None
        # held while the state changes (update, +=), so that threads may share one object
        self._lock = threading.Lock()
        if x is not None:
            self.update(x, axis, weights=weights, nan_policy=nan_policy)

    # ---- the adapter interface
    @classmethod
    def from_state(cls, state: State | None) -> Moments:
        """A ``Moments`` holding ``state`` (``None``: an empty one); zero-copy.

        This is how producers of moments outside this module (the GPU path, Dask, the
        all-reduce) hand over their results. The arrays are shared, never changed: the new
        object copies them before its first in-place merge.
        """
        if state is not None and not isinstance(state, State):
            raise InputTypeError(f"from_state takes a State, got {type(state).__name__}")
        out = cls()
        out._st = state
        out._shared = state is not None
        return out

    def state(self) -> State | None:
        """The current state (``None`` while empty), zero-copy.

        The returned arrays are never changed afterwards (this object copies them before its
        next in-place merge), so a consumer may keep references; it must not change them.
        """
        self._shared = self._shared or self._st is not None
        return self._st

    # ---- construction from raw arrays
    @classmethod
    def from_arrays(
        cls,
        count: Any,
        mean: Any,
        m2: Any,
        *,
        weighted: bool = False,
        mean_lo: Any = None,
    ) -> Moments:
        """Build a state from per-dimension ``count``, ``mean`` and ``m2`` arrays.

        Parameters
        ----------
        count : float or array_like, shape () or (D...)
            Samples (or total weight) per dimension; finite and non-negative.
        mean : array_like, shape (D...)
            Per-dimension means.
        m2 : array_like, shape (D...)
            Per-dimension sums of squared deviations from the mean; non-negative (or NaN).
        weighted : bool
            Counts are weights (``count`` then reads as a float).
        mean_lo : array_like, shape (D...), optional
            The rounding residual of each mean (the exact mean is ``mean + mean_lo``).

        Raises
        ------
        ValueError
            Shapes that disagree, or an impossible state (negative or non-finite counts,
            negative ``m2``).
        """
        mean_a = np.array(mean, dtype=np.float64)
        m2_a = np.array(m2, dtype=np.float64)
        cnt = np.asarray(count, dtype=np.float64)
        if m2_a.shape != mean_a.shape:
            raise InputError(f"m2 shape {m2_a.shape} differs from mean shape {mean_a.shape}")
        if cnt.shape not in ((), mean_a.shape):
            raise InputError(f"count shape {cnt.shape} must be () or the mean shape {mean_a.shape}")
        lo_a = np.zeros(mean_a.shape) if mean_lo is None else np.array(mean_lo, dtype=np.float64)
        if lo_a.shape != mean_a.shape:
            raise InputError(f"mean_lo shape {lo_a.shape} differs from mean shape {mean_a.shape}")
        n = np.broadcast_to(cnt, mean_a.shape).astype(np.float64).reshape(-1)
        check_state_arrays(n if n.size else cnt.reshape(-1), mean_a, m2_a, "Moments state")
        per_dim = cnt.shape != () and mean_a.size > 0 and bool(np.any(cnt != cnt.flat[0]))
        total = float(cnt.flat[0]) if cnt.size and not per_dim else 0.0
        return cls.from_state(
            State(
                n=n,
                mean=mean_a.reshape(-1),
                lo=lo_a.reshape(-1),
                m2=m2_a.reshape(-1),
                shape=mean_a.shape,
                total=total,
                weighted=bool(weighted) or bool(np.any(cnt != np.round(cnt))),
                per_dim=per_dim,
            )
        )

    # ---- read-only views
    @property
    def shape(self) -> tuple[int, ...] | None:
        """Dimension shape (the axes not reduced), or ``None`` before the first update."""
        return None if self._st is None else self._st.shape

    def _need(self) -> State:
        if self._st is None:
            raise InputError("empty Moments: no data yet, call update() first")
        return self._st

    def _out(self, a: np.ndarray) -> Any:
        st = self._need()
        v = a.reshape(st.shape).view()
        v.flags.writeable = False
        return v[()] if st.shape == () else v

    @property
    def count(self) -> Any:
        """Samples seen: an int (a float with weights), or per-dimension counts after ``omit``."""
        st = self._st
        if st is None:
            return 0
        if st.per_dim:
            c = st.n.reshape(st.shape)
            c = c.copy() if st.weighted else c.astype(np.int64)
            return c[()] if st.shape == () else c
        return float(st.total) if st.weighted else int(st.total)

    @property
    def mean(self) -> Any:
        """Per-dimension mean (float64; NaN where the count is 0 or a NaN/Inf was propagated).

        The mean is kept as a double-double pair; this is the pair rounded to float64.
        """
        st = self._need()
        return self._out(st.mean + st.lo)

    @property
    def m2(self) -> Any:
        """Per-dimension sum of squared deviations from the mean (float64)."""
        return self._out(self._need().m2)

    def var(self, ddof: float = 0) -> Any:
        """Per-dimension variance ``m2 / (count - ddof)``; NaN where ``count <= ddof``."""
        st = self._need()
        try:
            dd = float(ddof)
        except (TypeError, ValueError):
            dd = -1.0
        if not np.isfinite(dd) or dd < 0:
            raise InputError(f"ddof must be a non-negative number, got {ddof!r}")
        den = st.n - dd
        out = np.full(st.n.shape, np.nan)
        np.divide(st.m2, den, out=out, where=den > 0)
        out = out.reshape(st.shape)
        return out[()] if st.shape == () else out

    def std(self, ddof: float = 0) -> Any:
        """Per-dimension standard deviation, ``sqrt(var(ddof))``."""
        return np.sqrt(self.var(ddof))

    # ---- updating
    def update(
        self,
        x: Any,
        axis: Axis = 0,
        *,
        weights: Any = None,
        nan_policy: str = "propagate",
    ) -> Moments:
        """Add a batch.

        Parameters
        ----------
        x : array_like, shape (..., D...)
            Real numbers (float16/32/64, signed or unsigned ints, bool); CPU torch tensors
            (bfloat16 too); CUDA arrays (reduced on the GPU, extra ``cuda``). Any strides or
            order; nothing is copied whole and nothing is converted whole to float64. A numpy
            masked array has its masked entries skipped, as ``nan_policy="omit"`` skips NaN
            (the policy then applies to the unmasked values; counts become per-dimension).
        axis : int or tuple of int or None, default 0
            Axes to reduce over; the others are the dimensions. ``(N, D)``: ``axis=0``.
            NCHW: ``axis=(0, 2, 3)``. NHWC: ``axis=(0, 1, 2)``. Per-sample statistics of NCHW
            (instance/layer norm): ``axis=(2, 3)``. ``None`` reduces everything.
        weights : array_like, shape (n,), optional
            One non-negative weight per sample along the first reduced axis (``n = x.shape[a]``),
            as frequency or importance weights; ``count`` then is the total weight.
        nan_policy : {"propagate", "raise", "omit"}
            ``propagate``: a NaN/Inf makes that dimension's mean and M2 NaN, others untouched.
            ``raise``: ``ValueError`` naming how many non-finite values and where; the state is
            unchanged. ``omit``: skip NaN and ``±inf`` alike; counts become per-dimension
            (``np.nanmean/nanvar`` with every ``±inf`` replaced by NaN first).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            ``x`` is 0-d (a single number: pass ``np.atleast_1d(x)``), axes out of range or
            repeated, bad weights, a NaN/Inf with ``nan_policy="raise"``, or a dimension shape
            different from earlier batches.
        TypeError
            A dtype that is not a real number (complex, strings, objects...).
        """
        # the lock makes one state safe to share between threads: the in-place merges below
        # and the merge of a computed batch run one at a time (the kernels of the general
        # path run outside it)
        with self._lock:
            lean = self._lean
            if (
                lean is not None
                and type(x) is np.ndarray
                and x.shape == lean[0]
                and x.dtype is lean[1]
                and weights is None
                and type(axis) is int
                and axis == 0
                and type(nan_policy) is str
                and nan_policy == "propagate"
                and x.flags.c_contiguous
                and not self._shared
                and self._st is not None
            ):
                # a stream of batches like the last one: the checks of lean_rows/plain_rows, the
                # shape test and the blocking are the same, so they are not repeated (a few us of
                # Python per batch, 10-15 % of a (256, 512) float32 update)
                if self._merge_rows(x, self._st, lean[2]):
                    return self
            elif lean_rows(x, axis, weights, nan_policy):
                a = self._st
                if a is None:
                    self._st = lean_state(x)
                    self._shared = False
                    self._lean = None
                    return self
                if a.shape == x.shape[1:] and plain_rows(x):
                    if self._shared:
                        a = self._st = a.copy()
                        self._shared = False
                    blocking = rows_plan(*x.shape, x.itemsize)
                    if self._merge_rows(x, a, blocking):
                        self._lean = (x.shape, x.dtype, blocking)
                        return self
        st = compute(x, axis, weights, nan_policy)
        if st is not None:
            with self._lock:
                self._merge_state(st, own=True)
        return self

    @staticmethod
    def _merge_rows(x: np.ndarray, a: State, blocking: tuple[int, int, bool]) -> bool:
        """Merge a lean batch into the owned state ``a`` in one compiled call (see ``_reduce``).

        False, with ``a`` unchanged, where the batch needs the general path (float64 moments
        that came out non-finite, which may be an overflow to rescue).
        """
        n0 = a.n[0]
        try:
            merged = merge_rows(x, a.n, a.mean, a.lo, a.m2, blocking)
        except SystemError as e:  # a Ctrl-C during the kernel (see ``_compute.call_kernel``)
            ki = interrupt_in(e)
            if ki is None:
                raise
            if a.n[0] != n0:  # the kernel had finished and merged: keep the state whole
                a.total += x.shape[0]
            raise KeyboardInterrupt(*ki.args) from None
        if merged:
            a.total += x.shape[0]
        return merged

    def _merge_state(self, b: State, own: bool = False) -> None:
        """Merge ``b`` in; ``own`` says its arrays are fresh and may be kept and changed."""
        a = self._st
        if a is None:
            self._st = b
            self._shared = not own
            self._lean = None
            return
        if b.shape != a.shape:
            raise InputError(
                f"dimension mismatch: this Moments has dimension shape {a.shape}, "
                f"the batch has {b.shape}; reduce over the axes that leave {a.shape}"
            )
        if self._shared:
            a = a.copy()
            self._shared = False
        K.chan_merge_dd(a.n, a.mean, a.lo, a.m2, b.n, b.mean, b.lo, b.m2)
        self._st = replace(
            a,
            total=a.total + b.total,
            weighted=a.weighted or b.weighted,
            per_dim=a.per_dim or b.per_dim,
        )

    # ---- merging
    def copy(self) -> Moments:
        """An independent copy."""
        return Moments.from_state(None if self._st is None else self._st.copy())

    def merge(self, other: Moments) -> Moments:
        """A new state holding both (``self + other``); neither input changes."""
        return self.copy().__iadd__(other)

    def __iadd__(self, other: Moments) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        st = other.state()
        if st is not None:
            with self._lock:
                self._merge_state(st)
        return self

    def __add__(self, other: Moments) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        return self.merge(other)

    @classmethod
    def merge_all(cls, states: Iterable[Moments]) -> Moments:
        """Merge states in the order given into a new one (empty iterable: ``Moments()``)."""
        out = cls()
        for s in states:
            if not isinstance(s, Moments):
                raise InputTypeError(f"merge_all takes Moments, got {type(s).__name__}")
            out += s
        return out

    def __repr__(self) -> str:
        if self._st is None:
            return "Moments(empty)"
        return f"Moments(shape={self._st.shape}, count={self.count!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Moments.from_dict, (self.to_dict(),))

    # ---- serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of numpy arrays and scalars (``from_dict`` reverses it)."""
        st = self._st
        if st is None:
            e = np.zeros(0)
            st = State(e, e, e, e, (), 0.0)
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "empty": self._st is None,
            "shape": np.asarray(st.shape, dtype=np.int64),
            "count": st.n.copy(),
            "mean": st.mean.copy(),
            "mean_lo": st.lo.copy(),
            "m2": st.m2.copy(),
            "total": float(st.total),
            "weighted": bool(st.weighted),
            "per_dim": bool(st.per_dim),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Moments:
        """Rebuild a state from :meth:`to_dict`'s output.

        Raises
        ------
        TypeError
            ``d`` is not a mapping.
        ValueError
            Not a Moments record, an unsupported version, or a corrupt or impossible state
            (arrays that disagree with the shape, negative or NaN counts, negative ``m2``).
        """
        what = "Moments"
        check_header(d, FORMAT_NAME, FORMAT_VERSION, what)
        for key in ("empty", "shape", "count", "mean", "m2", "total"):
            if key not in d.keys():
                raise RecordError(f"not a streamnorm Moments record: missing {key!r}")
        if bool(record_scalar(d, "empty", what)):
            return cls()
        try:
            shape = tuple(int(s) for s in np.asarray(d["shape"], dtype=np.int64).reshape(-1))
            arrs = [np.array(d[k], dtype=np.float64).reshape(-1) for k in ("count", "mean", "m2")]
            # records of the first releases have no residual: the mean is then exact as stored
            lo_rec = d["mean_lo"] if "mean_lo" in d.keys() else np.zeros(arrs[1].shape)
            arrs.insert(2, np.array(lo_rec, dtype=np.float64).reshape(-1))
            total = float(record_scalar(d, "total", what))
        except (TypeError, ValueError) as e:
            raise RecordError(f"corrupt Moments record: {e}") from e
        if any(s < 0 for s in shape):
            raise RecordError(f"corrupt Moments record: negative dimension in shape {shape}")
        size = int(np.prod(shape, dtype=np.int64))
        if any(a.shape != (size,) for a in arrs):
            raise RecordError(f"corrupt Moments record: arrays do not match shape {shape}")
        n, mean, lo, m2 = arrs
        try:
            check_state_arrays(n, mean, m2, "Moments record")
        except InputError as e:
            raise RecordError(str(e)) from None
        if not (np.isfinite(total) and total >= 0):
            raise RecordError(f"impossible Moments record: total count {total!r}")
        flags = {k: bool(record_scalar(d, k, what)) for k in ("weighted", "per_dim") if k in d}
        return cls.from_state(
            State(
                n=n,
                mean=mean,
                lo=lo,
                m2=m2,
                shape=shape,
                total=total,
                weighted=flags.get("weighted", False),
                per_dim=flags.get("per_dim", False),
            )
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path`` as ``.npz`` (with a format version), atomically."""
        d = self.to_dict()
        atomic_write(path, lambda f: np.savez(f, **d))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Moments:
        """Read a file written by :meth:`save`.

        Raises
        ------
        ValueError
            A truncated, damaged or foreign file (a ``.npy``, another ``.npz``), or an
            impossible state (:class:`~streamnorm._errors.RecordError`).
        FileNotFoundError, IsADirectoryError
            As ``open`` would.
        """
        return cls.from_dict(read_npz(path, "Moments"))


def moments(
    x: Any,
    axis: Axis = 0,
    *,
    weights: Any = None,
    nan_policy: str = "propagate",
) -> Moments:
    """Per-dimension moments of one array, reduced over ``axis``.

    Validates ``x``, picks the parallel Numba kernel for its layout (``(rows, D)``,
    channels-first ``(N, C, L)``, per-sample, or a block-copying path for any other strides) and
    wraps the result in a :class:`Moments`. See :meth:`Moments.update` for the parameters.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> x = np.ones((8, 3, 4, 4), dtype=np.float32)     # NCHW
    >>> streamnorm.moments(x, axis=(0, 2, 3)).mean.tolist()
    [1.0, 1.0, 1.0]
    """
    return Moments().update(x, axis, weights=weights, nan_policy=nan_policy)


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Axis", "Moments", "moments"]
