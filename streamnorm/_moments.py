"""The mergeable per-dimension state :class:`Moments` and :func:`moments`.

This module validates and normalizes input (dtype, layout, axes, NaN policy, weights), picks the
kernel, and owns serialization. It is the only place that decides how an array reaches a kernel.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import _kernels as K
from ._reduce import reduce_batch, run_rows

FORMAT_NAME = "streamnorm.Moments"
FORMAT_VERSION = 1
NAN_POLICIES = ("propagate", "raise", "omit")

_FAST_DTYPES = (np.dtype("f4"), np.dtype("f8"))

Axis = int | Sequence[int] | None

#: the ways of saying "reduce the rows" of a 2-D array, checked before any normalization
_AXIS_ZERO_2D = (0, -2, (0,), (-2,))


# --------------------------------------------------------------------------------------------
# input checks


def _on_cuda_device(x: Any) -> bool:
    """True for CUDA memory: ``__cuda_array_interface__``, a CUDA DLPack device, a CUDA tensor.

    Looks only at attributes; imports nothing (the GPU path is imported when it is needed).
    """
    if isinstance(x, np.ndarray):
        return False
    if getattr(x, "is_cuda", False) is True:  # torch, whatever the dtype
        return True
    try:
        if hasattr(x, "__cuda_array_interface__"):
            return True
    except (TypeError, RuntimeError):  # a producer that has CAI but not for this dtype
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is None or not hasattr(x, "__dlpack__"):
        return False
    try:
        kind = int(dev()[0])
    except Exception:
        return False
    return kind in (2, 13)  # kDLCUDA, kDLCUDAManaged


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor on the CPU, zero-copy
        x = x.detach()
    return np.asarray(x)


def _check_dtype(x: np.ndarray) -> np.ndarray:
    kind = x.dtype.kind
    if kind == "b":
        return x.view(np.uint8)
    if kind in "fiu":
        return x
    what = {
        "c": "complex numbers have no single variance; pass x.real and x.imag separately",
        "O": "convert object arrays to a numeric dtype first, e.g. np.asarray(x, dtype=float)",
        "U": "convert strings to numbers first, e.g. x.astype(float)",
        "S": "convert bytes to numbers first, e.g. x.astype(float)",
        "M": "convert datetimes to numbers first, e.g. x.astype('datetime64[s]').astype('int64')",
        "m": "convert timedeltas to numbers first, e.g. x / np.timedelta64(1, 's')",
    }.get(kind, "pass a real numeric array (float, int, unsigned or bool)")
    raise TypeError(f"unsupported dtype {x.dtype} for moments: {what}")


def _normalize_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, bool):
        raise TypeError(f"axis must be an int, a tuple of ints or None, got {axis!r}")
    if isinstance(axis, (int, np.integer)):
        axes: Sequence[Any] = (axis,)
    elif isinstance(axis, Sequence) and not isinstance(axis, str):
        axes = axis
    else:
        raise TypeError(f"axis must be an int, a tuple of ints or None, got {type(axis).__name__}")
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"axis entries must be ints, got {a!r}")
        if not -ndim <= a < ndim:
            raise np.exceptions.AxisError(int(a), ndim)
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {tuple(axes)}")
    return tuple(sorted(out))


def _check_weights(weights: Any, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    if not axes:
        raise ValueError("weights need at least one reduced axis; got axis=()")
    w = np.asarray(weights)
    if w.dtype.kind not in "fiub":
        raise TypeError(f"weights must be real numbers, got dtype {w.dtype}")
    n = x.shape[axes[0]]
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(
            f"weights must be 1-D with one weight per sample along axis {axes[0]} "
            f"(length {n}), got shape {w.shape}"
        )
    w = w.astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    return w


def _raise_nonfinite(x: np.ndarray, axes: tuple[int, ...], shape: tuple[int, ...]) -> None:
    bad = np.sum(~np.isfinite(x), axis=axes)
    total = int(np.sum(bad))
    where = np.argwhere(np.asarray(bad).reshape(shape) > 0) if shape else np.zeros((1, 0), int)
    dims = [tuple(int(i) for i in r) if len(r) != 1 else int(r[0]) for r in where[:10]]
    more = "" if len(where) <= 10 else f" and {len(where) - 10} more"
    raise ValueError(
        f"{total} non-finite value(s) (NaN/Inf) in dimension(s) {dims}{more}; "
        "use nan_policy='omit' to skip them or 'propagate' to get NaN for those dimensions"
    )


# --------------------------------------------------------------------------------------------
# the state


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
    ``var(ddof=1)`` is the unbiased estimate for the repeated samples.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> m = streamnorm.Moments().update(x[:1]).update(x[1:])
    >>> m.count, m.mean.tolist(), m.var().tolist()
    (4, [4.5, 5.5, 6.5], [11.25, 11.25, 11.25])
    """

    __slots__ = ("_shape", "_n", "_mean", "_lo", "_m2", "_total", "_weighted", "_per_dim")

    def __init__(
        self,
        x: Any = None,
        axis: Axis = 0,
        *,
        weights: Any = None,
        nan_policy: str = "propagate",
    ) -> None:
        self._shape: tuple[int, ...] | None = None
        self._n = np.zeros(0)
        self._mean = np.zeros(0)
        self._lo = np.zeros(0)  # rounding residual of the mean: the true mean is _mean + _lo
        self._m2 = np.zeros(0)
        self._total = 0.0
        self._weighted = False
        self._per_dim = False
        if x is not None:
            self.update(x, axis, weights=weights, nan_policy=nan_policy)

    # ---- construction from raw arrays (used by adapters and deserialization)
    @classmethod
    def from_arrays(
        cls,
        count: Any,
        mean: Any,
        m2: Any,
        *,
        weighted: bool = False,
    ) -> Moments:
        """Build a state from per-dimension ``count``, ``mean`` and ``m2`` arrays.

        ``count`` may be a scalar (the same for every dimension) or an array of ``mean``'s shape.
        """
        mean_a = np.array(mean, dtype=np.float64)
        m2_a = np.array(m2, dtype=np.float64)
        cnt = np.asarray(count, dtype=np.float64)
        if m2_a.shape != mean_a.shape:
            raise ValueError(f"m2 shape {m2_a.shape} differs from mean shape {mean_a.shape}")
        if cnt.shape not in ((), mean_a.shape):
            raise ValueError(f"count shape {cnt.shape} must be () or the mean shape {mean_a.shape}")
        if np.any(cnt < 0) or not np.all(np.isfinite(cnt)):
            raise ValueError("counts must be finite and non-negative")
        self = cls()
        self._shape = mean_a.shape
        self._n = np.broadcast_to(cnt, mean_a.shape).astype(np.float64).reshape(-1)
        self._mean = mean_a.reshape(-1).copy()
        self._lo = np.zeros_like(self._mean)
        self._m2 = m2_a.reshape(-1).copy()
        self._per_dim = cnt.shape != () and mean_a.size > 0 and bool(np.any(cnt != cnt.flat[0]))
        self._total = float(cnt.flat[0]) if cnt.size and not self._per_dim else 0.0
        self._weighted = bool(weighted) or bool(np.any(cnt != np.round(cnt)))
        return self

    # ---- read-only views
    @property
    def shape(self) -> tuple[int, ...] | None:
        """Dimension shape (the axes not reduced), or ``None`` before the first update."""
        return self._shape

    def _out(self, a: np.ndarray) -> Any:
        if self._shape is None:
            raise ValueError("empty Moments: no data yet, call update() first")
        v = a.reshape(self._shape).view()
        v.flags.writeable = False
        return v[()] if self._shape == () else v

    @property
    def count(self) -> Any:
        """Samples seen: an int (a float with weights), or per-dimension counts after ``omit``."""
        if self._per_dim:
            c = self._n.reshape(self._shape or ())
            c = c.copy() if self._weighted else c.astype(np.int64)
            return c[()] if self._shape == () else c
        return float(self._total) if self._weighted else int(self._total)

    @property
    def mean(self) -> Any:
        """Per-dimension mean (float64; NaN where the count is 0 or a NaN/Inf was propagated)."""
        return self._out(self._mean)

    @property
    def m2(self) -> Any:
        """Per-dimension sum of squared deviations from the mean (float64)."""
        return self._out(self._m2)

    def var(self, ddof: float = 0) -> Any:
        """Per-dimension variance ``m2 / (count - ddof)``; NaN where ``count <= ddof``."""
        if self._shape is None:
            raise ValueError("empty Moments: no data yet, call update() first")
        try:
            dd = float(ddof)
        except (TypeError, ValueError):
            dd = -1.0
        if not np.isfinite(dd) or dd < 0:
            raise ValueError(f"ddof must be a non-negative number, got {ddof!r}")
        den = self._n - dd
        out = np.full(self._n.shape, np.nan)
        np.divide(self._m2, den, out=out, where=den > 0)
        out = out.reshape(self._shape)
        return out[()] if self._shape == () else out

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
            Real numbers (float16/32/64, signed or unsigned ints, bool). Any strides or order;
            nothing is copied whole and nothing is converted whole to float64.
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
            unchanged. ``omit``: skip them; counts become per-dimension (``np.nanmean/nanvar``).

        Returns
        -------
        self
        """
        b = _compute(x, axis, weights, nan_policy)
        if b is None:
            return self
        n, mean, m2, shape, total, weighted, per_dim, *lo = b
        lo_ = lo[0] if lo else None
        self._merge_in(n, mean, m2, shape, total, weighted, per_dim, lo_, own=True)
        return self

    def _merge_in(
        self,
        n: np.ndarray,
        mean: np.ndarray,
        m2: np.ndarray,
        shape: tuple[int, ...],
        total: float,
        weighted: bool,
        per_dim: bool,
        lo: np.ndarray | None = None,
        own: bool = False,
    ) -> None:
        """Merge raw per-dimension arrays in; ``own`` says they are fresh and may be kept."""
        lo = np.zeros_like(mean) if lo is None else lo
        if self._shape is None:
            self._shape = shape
            if not own:
                n, mean, lo, m2 = n.copy(), mean.copy(), lo.copy(), m2.copy()
            self._n, self._mean, self._lo, self._m2 = n, mean, lo, m2
        else:
            if shape != self._shape:
                raise ValueError(
                    f"dimension mismatch: this Moments has dimension shape {self._shape}, "
                    f"the batch has {shape}; reduce over the axes that leave {self._shape}"
                )
            K.chan_merge_dd(self._n, self._mean, self._lo, self._m2, n, mean, lo, m2)
        self._total += total
        self._weighted = self._weighted or weighted
        self._per_dim = self._per_dim or per_dim

    # ---- merging
    def copy(self) -> Moments:
        """An independent copy."""
        out = Moments()
        out._shape = self._shape
        out._n, out._mean, out._m2 = self._n.copy(), self._mean.copy(), self._m2.copy()
        out._lo = self._lo.copy()
        out._total, out._weighted, out._per_dim = self._total, self._weighted, self._per_dim
        return out

    def merge(self, other: Moments) -> Moments:
        """A new state holding both (``self + other``); neither input changes."""
        return self.copy().__iadd__(other)

    def __iadd__(self, other: Moments) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        if other._shape is None:
            return self
        self._merge_in(
            other._n, other._mean, other._m2, other._shape,
            other._total, other._weighted, other._per_dim, other._lo,
        )  # fmt: skip
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
                raise TypeError(f"merge_all takes Moments, got {type(s).__name__}")
            out += s
        return out

    def __repr__(self) -> str:
        if self._shape is None:
            return "Moments(empty)"
        return f"Moments(shape={self._shape}, count={self.count!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Moments.from_dict, (self.to_dict(),))

    # ---- serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of numpy arrays and scalars (``from_dict`` reverses it)."""
        shape = self._shape
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "empty": shape is None,
            "shape": np.asarray(shape if shape is not None else (), dtype=np.int64),
            "count": self._n.copy(),
            "mean": self._mean.copy(),
            "mean_lo": self._lo.copy(),
            "m2": self._m2.copy(),
            "total": float(self._total),
            "weighted": bool(self._weighted),
            "per_dim": bool(self._per_dim),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Moments:
        """Rebuild a state from :meth:`to_dict`'s output; ``ValueError`` if it is not one."""
        if not hasattr(d, "__getitem__") or not hasattr(d, "keys"):
            raise TypeError(f"from_dict takes a mapping, got {type(d).__name__}")
        keys = {"format", "version", "empty", "shape", "count", "mean", "m2", "total"}
        missing = keys - set(d.keys())
        if missing:
            raise ValueError(f"not a streamnorm Moments record: missing {sorted(missing)}")
        if str(np.asarray(d["format"])) != FORMAT_NAME:
            raise ValueError(f"not a streamnorm Moments record: format {d['format']!r}")
        version = int(np.asarray(d["version"]))
        if version != FORMAT_VERSION:
            raise ValueError(
                f"Moments format version {version} is not supported (this streamnorm reads "
                f"version {FORMAT_VERSION}); upgrade streamnorm"
            )
        out = cls()
        if bool(np.asarray(d["empty"])):
            return out
        shape = tuple(int(s) for s in np.asarray(d["shape"]).reshape(-1))
        size = int(np.prod(shape, dtype=np.int64))
        arrs = [np.asarray(d[k], dtype=np.float64).reshape(-1) for k in ("count", "mean", "m2")]
        if any(a.shape != (size,) for a in arrs):
            raise ValueError(f"corrupt Moments record: arrays do not match shape {shape}")
        if np.any(arrs[0] < 0):
            raise ValueError("corrupt Moments record: negative counts")
        out._shape = shape
        out._n, out._mean, out._m2 = (a.copy() for a in arrs)
        lo = np.asarray(d.get("mean_lo", np.zeros(size)), dtype=np.float64).reshape(-1)
        if lo.shape != (size,):
            raise ValueError(f"corrupt Moments record: mean_lo does not match shape {shape}")
        out._lo = lo.copy()
        out._total = float(np.asarray(d["total"]))
        out._weighted = bool(np.asarray(d.get("weighted", False)))
        out._per_dim = bool(np.asarray(d.get("per_dim", False)))
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path`` as ``.npz`` (with a format version), atomically."""
        atomic_write(path, lambda f: np.savez(f, **self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Moments:
        """Read a file written by :meth:`save`; ``ValueError`` for a truncated or foreign file."""
        return cls.from_dict(read_npz(path, "Moments"))


def read_npz(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """All arrays of an ``.npz`` file (no pickles); ``ValueError`` if it is not a readable one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        name = os.fspath(path)
        raise ValueError(f"{name!r} is not a readable streamnorm {what} file: {e}") from e


def atomic_write(path: str | os.PathLike[str], write: Any, mode: str = "wb") -> None:
    """Write a file atomically: temp file in the same folder, fsync, ``os.replace``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------
# one batch


Batch = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...], float, bool, bool, np.ndarray]


def _compute(x: Any, axis: Axis, weights: Any, nan_policy: str) -> tuple[Any, ...] | None:
    """One batch: ``(n, mean, m2, dims_shape, total, weighted, per_dim, lo)`` or ``None`` if empty.

    ``n``, ``mean``, ``m2``, ``lo`` are flat float64 arrays over the dimensions; ``lo`` is the
    rounding residual of ``mean`` (see ``chan_merge_dd``); ``total`` the samples (or weight) seen.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if _on_cuda_device(x):
        from .cuda import _host_batch  # lazy: the GPU path is an optional extra

        return _host_batch(x, axis, weights, nan_policy)  # type: ignore[no-any-return]
    a = _check_dtype(_as_array(x))
    if a.ndim == 0:
        raise ValueError("x is 0-d (a scalar); moments need at least a 1-D array of samples")
    # fast path: (R, D) C-contiguous float, axis 0
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
    ):
        n, m, q, lo = run_rows(a, None, False)
        return n, m, q, (a.shape[1],), float(a.shape[0]), False, False, lo
    axes = _normalize_axes(axis, a.ndim)
    w = None if weights is None else _check_weights(weights, a, axes)
    nsamp = int(np.prod([a.shape[i] for i in axes], dtype=np.int64))
    kept = tuple(s for i, s in enumerate(a.shape) if i not in axes)
    if nsamp == 0 or int(np.prod(kept, dtype=np.int64)) == 0:
        total = 0.0
        if nsamp and w is not None:
            total = float(w.sum() * (nsamp // max(1, a.shape[axes[0]])))
        elif nsamp:
            total = float(nsamp)
        if nsamp == 0:
            return None
        e = np.zeros(0)
        return e, e, e, kept, total, w is not None, False, e
    n, m, q, lo = reduce_batch(a, axes, w, nan_policy)
    if nan_policy == "raise" and (np.isnan(m) & (n > 0)).any():
        _raise_nonfinite(a, axes, kept)
    total = float(nsamp) if w is None else float(w.sum()) * (nsamp // a.shape[axes[0]])
    return n, m, q, kept, total, w is not None, nan_policy == "omit", lo


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
