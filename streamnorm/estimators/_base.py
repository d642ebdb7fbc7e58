"""The estimator protocol: a shallow abstract base shared by the test-time estimators.

An estimator consumes per-batch :class:`~streamnorm.Moments` and keeps a per-dimension estimate
of the population mean and variance. Subclasses implement a handful of hooks that work on flat
float64 arrays; the base class owns validation, counts, conversion between variance conventions
and serialization.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np

from .._errors import RecordError
from .._io import check_header, record_flag, record_int, record_scalar
from .._moments import Moments
from .._validate import VAR_CONVENTIONS, check_epoch, check_var_convention
from . import _kernels as EK

FORMAT_NAME = "streamnorm.Estimator"
FORMAT_VERSION = 1
CONVENTIONS = VAR_CONVENTIONS


class Owner:
    """Something that may hold batches not yet applied to an estimator (a Tracker layer)."""

    def flush(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


Unpacked = tuple[tuple[int, ...] | None, np.ndarray, np.ndarray, np.ndarray, float, bool, bool]

_NOTHING = np.zeros(0)


def unpack(batch: Any) -> Unpacked:
    """``(shape, n, mean, m2, min_count, weighted, uniform)`` of a batch, zero-copy.

    ``n``, ``mean``, ``m2`` are flat float64 arrays (read-only by contract: they are the batch
    state's own, see :meth:`Moments.state`); ``uniform`` says every dimension has the same count
    (no per-dimension counts from ``nan_policy="omit"``). ``shape`` is ``None`` for an empty
    ``Moments``. ``mean`` is the double-double mean rounded to float64.
    """
    if not isinstance(batch, Moments):
        raise TypeError(
            f"estimators are fed streamnorm.Moments, got {type(batch).__name__}; wrap an array "
            "with streamnorm.moments(x, axis=...) or use streamnorm.Tracker.update"
        )
    st = batch.state()
    if st is None:
        return None, _NOTHING, _NOTHING, _NOTHING, 0.0, False, True
    mean = st.mean if not st.lo.any() else st.mean + st.lo
    return st.shape, st.n, mean, st.m2, st.min_count, st.weighted, not st.per_dim


#: state entries that are counts or sums of squares (variances are recognised by their name):
#: negative values are impossible
_NON_NEGATIVE = frozenset(
    {"n", "m2", "count", "t", "batches", "pooled_sum", "epochs", "epoch_batches"}
    | {"epoch_count", "epoch_m2"}
)


def _non_negative(key: str) -> bool:
    return key in _NON_NEGATIVE or "var" in key.split("_")


def _may_be_nan(key: str) -> bool:
    """Unbiased variances are NaN where a batch of one value left them undefined."""
    return "unbiased" in key.split("_")


class Estimator(abc.ABC):
    """Base class of the test-time estimators (River-style: ``update(...) -> self``).

    Subclasses keep their state in flat float64 arrays of length ``D`` (the number of
    dimensions, e.g. channels) and implement the hooks ``_clear_state``, ``_init_state``,
    ``_apply``, ``_mean_flat``, ``_var_flat``, ``_params`` and ``_state``/``_set_state``.

    Attributes
    ----------
    var_convention : {"biased", "unbiased"}
        Which variance :attr:`var` returns. ``"unbiased"`` means it is built from Bessel-corrected
        (``n - 1``) variances, as PyTorch's ``running_var``; ``"biased"`` from ``/ n`` variances,
        as Keras' ``moving_variance`` and ONNX. :meth:`running_var` converts to either one.
    """

    _registry: ClassVar[dict[str, type[Estimator]]] = {}
    #: Renamed parameters, ``{old name: new name}``: records written under the old name still load.
    _renamed_params: ClassVar[dict[str, str]] = {}
    #: the constructor keywords that define the estimator (its record's ``param_*`` entries)
    _param_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Estimator._registry[cls.__name__] = cls

    def __init__(self) -> None:
        self._owner: Owner | None = None
        self._clear()

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _clear_state(self) -> None: ...

    @abc.abstractmethod
    def _init_state(self, D: int) -> None: ...

    @abc.abstractmethod
    def _apply(
        self, n: np.ndarray, mu: np.ndarray, m2: np.ndarray, epochs: np.ndarray, uniform: bool
    ) -> None:
        """Apply ``k`` batches (``(k, D)`` arrays, epochs ``(k,)``) in order; see ``_kernels``."""

    @abc.abstractmethod
    def _mean_flat(self) -> np.ndarray: ...

    @abc.abstractmethod
    def _var_flat(self, convention: str) -> np.ndarray: ...

    def _params(self) -> dict[str, Any]:
        """The constructor's parameters (``_param_names``), as recorded and compared in merges."""
        return {k: getattr(self, k) for k in self._param_names}

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _set_state(self, d: Any, D: int) -> None: ...

    #: whether :attr:`var` is built from Bessel-corrected (``n - 1``) variances; estimators with
    #: an ``unbiased`` parameter set it per instance
    unbiased: bool = False

    @property
    def var_convention(self) -> str:
        """``"biased"`` or ``"unbiased"``: the convention of :attr:`var` (from ``unbiased``)."""
        return "unbiased" if self.unbiased else "biased"

    @property
    def min_batch_count(self) -> int:
        """Samples a batch needs in every dimension: 0 (any), 1 or 2 (unbiased batch variance)."""
        return 0

    def _check_epoch_order(self, epoch: int) -> None:
        """Raise if ``epoch`` may not follow the batches seen so far (default: any order)."""
        return None

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self._shape: tuple[int, ...] | None = None
        self._count = np.zeros(0)
        self._batches = 0
        self._weighted = False
        self._uniform = True
        self._clear_state()

    def attach(self, owner: Owner | None) -> None:
        """Let ``owner`` hold batches not yet applied; it is flushed before any read or reset."""
        self._owner = owner

    def _sync(self) -> None:
        if self._owner is not None:
            self._owner.flush()

    def reset(self) -> Estimator:
        """Forget every batch (the parameters stay). Returns ``self``."""
        self._sync()
        self._clear()
        return self

    # ------------------------------------------------------------------ updating
    def update(self, batch: Moments, *, epoch: int = 0) -> Estimator:
        """Feed one batch's moments.

        Parameters
        ----------
        batch : Moments
            The batch's per-dimension moments, e.g. ``streamnorm.moments(x, axis=(0, 2, 3))``
            for an NCHW batch; its dimension shape must match earlier batches.
        epoch : int, default 0
            The training epoch the batch belongs to (``>= 0``). Only :class:`WindowedAverage`
            uses it, and it requires epochs that never go backwards.

        Returns
        -------
        self
        """
        shape, n, mu, m2, cmin, weighted, uniform = unpack(batch)
        epoch = check_epoch(epoch)
        self._sync()
        if shape is None or n.size == 0:
            return self
        self.check_batch(shape, cmin)
        self._check_epoch_order(epoch)
        ep = np.array([epoch], dtype=np.int64)
        self.feed_batches(shape, n[None], mu[None], m2[None], ep, weighted, uniform)
        return self

    def check_batch(self, shape: tuple[int, ...], min_count: float) -> None:
        """Raise ``ValueError`` if a batch of this shape and smallest count cannot be fed."""
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"dimension mismatch: {type(self).__name__} has dimension shape {self._shape}, "
                f"the batch has {shape}; reduce over the axes that leave {self._shape}"
            )
        need = self.min_batch_count
        if need == 2 and not min_count > 1:
            raise ValueError(
                f"{type(self).__name__} needs more than 1 sample per dimension in every batch "
                f"(the unbiased batch variance divides by n - 1), got a batch with {min_count:g}; "
                "use larger batches or unbiased=False"
            )
        if need == 1 and not min_count > 0:
            raise ValueError(
                f"{type(self).__name__} needs at least 1 sample per dimension in every batch, got "
                "a batch with an empty dimension (all values omitted as NaN?)"
            )

    def feed_batches(
        self,
        shape: tuple[int, ...],
        n: np.ndarray,
        mu: np.ndarray,
        m2: np.ndarray,
        epochs: np.ndarray,
        weighted: bool,
        uniform: bool,
    ) -> None:
        """Apply ``k`` validated batches: ``(k, D)`` float64 arrays, C-contiguous.

        The interface for a producer that has already validated and stacked the batches (the
        :class:`~streamnorm.Tracker`); ordinary use goes through :meth:`update`.

        With ``uniform`` (every dimension of each batch has the same count) ``n`` may be
        ``(k, 1)``. Once a batch with per-dimension counts was fed, the state's counts may
        differ per dimension and every later batch takes the per-dimension path.
        """
        if self._shape is None:
            self._shape = shape
            D = mu.shape[1]
            self._count = np.zeros(D)
            self._uniform = True
            self._init_state(D)
        uniform = uniform and self._uniform
        if not uniform and n.shape[1] != mu.shape[1]:
            n = np.ascontiguousarray(np.broadcast_to(n, mu.shape))
        self._uniform = uniform
        EK.add_rows(self._count, n, uniform)
        self._batches += mu.shape[0]
        self._weighted = self._weighted or weighted
        self._apply(n, mu, m2, epochs, uniform)

    # ------------------------------------------------------------------ reading
    @property
    def shape(self) -> tuple[int, ...] | None:
        """Dimension shape of the batches, or ``None`` before the first one."""
        return self._shape

    @property
    def batches(self) -> int:
        """Number of batches seen."""
        self._sync()
        return self._batches

    @property
    def count(self) -> Any:
        """Samples seen: an int (a float with weights), per-dimension counts if they differ."""
        self._sync()
        c = self._count
        if c.size == 0 or bool(np.all(c == c[0])):
            v = float(c[0]) if c.size else 0.0
            return v if self._weighted else int(v)
        out = c.copy() if self._weighted else c.astype(np.int64)
        return out.reshape(self._shape or ())

    def _out(self, flat: np.ndarray) -> Any:
        out = np.array(flat, dtype=np.float64).reshape(self._shape or ())
        return out[()] if out.shape == () else out

    def _need_data(self) -> None:
        if self._shape is None:
            raise ValueError(
                f"{type(self).__name__} has no batches yet; call update() with a batch first"
            )

    @property
    def mean(self) -> Any:
        """Estimate of the population mean (float64, the batches' dimension shape)."""
        self._sync()
        self._need_data()
        return self._out(self._mean_flat())

    @property
    def var(self) -> Any:
        """Estimate of the population variance, in the convention :attr:`var_convention`."""
        self._sync()
        self._need_data()
        return self._out(self._var_flat(self.var_convention))

    def running_var(self, convention: str = "unbiased") -> Any:
        """The variance estimate in a given convention (default PyTorch's ``running_var``).

        Parameters
        ----------
        convention : {"unbiased", "biased"}
            ``"unbiased"``: what PyTorch's BatchNorm stores in ``running_var``. ``"biased"``:
            what Keras (``moving_variance``) and ONNX (``input_var``) store.

        Returns
        -------
        ndarray, float64, the batches' dimension shape
        """
        convention = check_var_convention(convention)
        self._sync()
        self._need_data()
        return self._out(self._var_flat(convention))

    # ------------------------------------------------------------------ combining
    def merge(self, other: Estimator) -> Estimator:
        """A new estimator holding both ``self``'s and ``other``'s batches."""
        raise TypeError(f"{type(self).__name__} cannot be merged")

    def __add__(self, other: Any) -> Estimator:
        if not isinstance(other, Estimator):
            return NotImplemented
        return self.merge(other)

    def _merge_check(self, other: Any) -> None:
        if type(other) is not type(self):
            raise TypeError(
                f"can only merge {type(self).__name__} with {type(self).__name__}, "
                f"got {type(other).__name__}"
            )
        if other._params() != self._params():
            raise ValueError(
                f"cannot merge estimators with different parameters: {self._params()} vs "
                f"{other._params()}"
            )
        if self._shape is not None and other._shape is not None and self._shape != other._shape:
            raise ValueError(
                f"cannot merge estimators of dimension shapes {self._shape} and {other._shape}"
            )

    def _merge_base(self, other: Estimator) -> Estimator:
        """The new estimator's base state (counts, batches); state arrays are the caller's."""
        out = type(self)(**self._params())
        out._shape = self._shape if self._shape is not None else other._shape
        if self._shape is None:
            out._count = other._count.copy()
        elif other._shape is None:
            out._count = self._count.copy()
        else:
            out._count = self._count + other._count
        out._uniform = self._uniform and other._uniform
        out._batches = self._batches + other._batches
        out._weighted = self._weighted or other._weighted
        return out

    def copy(self) -> Estimator:
        """An independent copy (not attached to any Tracker)."""
        return type(self).from_dict(self.to_dict())

    def __copy__(self) -> Estimator:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> Estimator:
        return self.copy()

    def __reduce__(self) -> tuple[Any, ...]:
        return (from_dict, (self.to_dict(),))

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of numpy arrays, scalars and strings; :func:`from_dict` rebuilds it."""
        self._sync()
        d: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "estimator": type(self).__name__,
            "empty": self._shape is None,
            "shape": np.asarray(self._shape if self._shape is not None else (), dtype=np.int64),
            "count": self._count.copy(),
            "batches": int(self._batches),
            "weighted": bool(self._weighted),
            "uniform": bool(self._uniform),
        }
        for k, v in self._params().items():
            d["param_" + k] = v
        if self._shape is not None:
            for k, v in self._state().items():
                d["state_" + k] = np.array(v, copy=True)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Estimator:
        """Rebuild an estimator from :meth:`to_dict`'s output (also read back from ``.npz``)."""
        what = "estimator"
        check_header(d, FORMAT_NAME, FORMAT_VERSION, what)
        for key in ("estimator", "empty", "shape", "count", "batches"):
            if key not in d.keys():
                raise RecordError(f"not a streamnorm estimator record: missing {key!r}")
        name = record_scalar(d, "estimator", what)
        klass = Estimator._registry.get(name) if isinstance(name, str) else None
        if klass is None:
            raise RecordError(
                f"unknown estimator {name!r}; known: {sorted(Estimator._registry)} (import the "
                "module that defines it first)"
            )
        if cls is not Estimator and not issubclass(klass, cls):
            raise RecordError(f"the record holds a {name}, not a {cls.__name__}")
        obj = _record_estimator(d, klass)
        if record_flag(d, "empty", what):
            return obj
        shape_a = np.asarray(d["shape"])
        if shape_a.ndim != 1 or shape_a.dtype.kind not in "iu" or np.any(shape_a < 0):
            raise RecordError(f"corrupt estimator record: shape {d['shape']!r}")
        shape = tuple(int(s) for s in shape_a)
        D = int(np.prod(shape, dtype=np.int64))
        count = state_array(d, "count", (D,))
        batches = record_int(d, "batches", what, low=0)
        obj._shape = shape
        obj._count = count
        obj._batches = batches
        flags = {k: record_flag(d, k, what) for k in ("weighted", "uniform") if k in d.keys()}
        obj._weighted = flags.get("weighted", False)
        obj._uniform = flags.get("uniform", False) and (
            count.size == 0 or bool(np.all(count == count[0]))
        )
        obj._init_state(D)
        state = {k[6:]: d[k] for k in d.keys() if str(k).startswith("state_")}
        obj._set_state(state, D)
        for key, v in obj._state().items():  # states a subclass reads without state_array
            _check_values(key, np.asarray(v, dtype=np.float64))
        return obj

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        seen = "" if self._shape is None else f", shape={self._shape}"
        return f"{type(self).__name__}({params}){seen}"


def _record_estimator(d: Any, klass: type[Estimator]) -> Estimator:
    """A fresh ``klass`` built from a record's ``param_*`` entries; ``RecordError`` if it can't."""
    params = {
        klass._renamed_params.get(str(k)[6:], str(k)[6:]): record_scalar(d, k, "estimator")
        for k in d.keys()
        if str(k).startswith("param_")
    }
    unknown = sorted(set(params) - set(klass._param_names))
    if unknown:
        raise RecordError(
            f"corrupt estimator record: {klass.__name__} has no parameter(s) {unknown} "
            f"(known: {list(klass._param_names)})"
        )
    try:
        return klass(**params)
    except (TypeError, ValueError) as e:
        raise RecordError(f"impossible estimator record: {e}") from e


def _check_values(key: str, a: np.ndarray, *, integer: bool = False) -> None:
    """Raise ``RecordError`` for values a state ``key`` cannot hold.

    Every value is finite (unbiased variances may be NaN); counts, sums of squares and variances
    are ``>= 0``; with ``integer`` every value is a whole number.
    """
    bad = ~np.isfinite(a)
    if _may_be_nan(key):
        bad &= ~np.isnan(a)
    if np.any(bad):
        raise RecordError(
            f"impossible estimator record: {key!r} holds NaN or infinite values; counts, "
            "means and variances must be finite"
        )
    if _non_negative(key) and np.any(a < 0):
        raise RecordError(
            f"impossible estimator record: negative {key!r} (counts, sums of squares and "
            "variances are >= 0)"
        )
    if integer and np.any(a != np.round(a)):
        raise RecordError(f"impossible estimator record: {key!r} should hold whole numbers")


def state_array(
    state: Any, key: str, shape: tuple[int, ...], *, integer: bool = False
) -> np.ndarray:
    """A float64 copy of ``state[key]`` checked against ``shape`` and its key's range.

    ``RecordError`` if it is missing, not real numbers, of another shape, not finite (unbiased
    variances may be NaN), negative where a count or variance is, or (``integer``) not whole.
    """
    if key not in state:
        raise RecordError(f"corrupt estimator record: missing state {key!r}")
    raw = np.asarray(state[key])
    if raw.dtype.kind not in "iuf":
        raise RecordError(
            f"corrupt estimator record: state {key!r} should hold real numbers, got dtype "
            f"{raw.dtype}"
        )
    a = np.array(raw, dtype=np.float64)
    if a.shape != shape:
        raise RecordError(
            f"corrupt estimator record: state {key!r} has shape {a.shape}, not {shape}"
        )
    _check_values(key, a, integer=integer)
    return a


def from_dict(d: Any) -> Estimator:
    """Rebuild any estimator from its :meth:`Estimator.to_dict` record."""
    return Estimator.from_dict(d)
