"""What the estimators that take source statistics share (test-time adaptation).

:class:`SourceStats` holds a source ``(mean, var)`` pair (e.g. a BN layer's buffers); :func:`mix`
and :func:`share` are the mixing formulas. :class:`SourceMixin` gives an estimator its
``source`` and ``source_var`` parameters and keeps the source in its record;
:class:`SourcePooled` adds the pooled ``(count, mean, M2)`` of the target batches. Both are
mixins, listed before :class:`~streamnorm.estimators.Estimator` in a class's bases.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from .._errors import InputError, InputTypeError
from .._validate import check_positive_int, check_real_dtype, check_var_convention
from ._base import state_array
from ._pooled import EstimatorMixin, PooledState


class SourceStats:
    """A source ``(mean, var)`` pair (e.g. a BN layer's buffers) as flat float64 copies.

    Parameters
    ----------
    source : (array_like, array_like)
        Per-dimension mean and variance, the same shape ``(D...)``; finite, variance >= 0.
    convention : {"unbiased", "biased"}
        What ``var`` divides by: ``"unbiased"`` (``n - 1``, PyTorch's ``running_var``) or
        ``"biased"`` (``n``, Keras / ONNX).
    """

    def __init__(self, source: Any, convention: str) -> None:
        self.convention = check_var_convention(convention, "source_var")
        if not isinstance(source, (tuple, list)) or len(source) != 2:
            raise InputTypeError(
                "source must be a (mean, var) pair, e.g. (bn.running_mean, bn.running_var), "
                f"got {type(source).__name__}"
            )
        mean, var = (_as_float64(v) for v in source)
        if mean.shape != var.shape:
            raise InputError(
                f"source mean and var must have the same shape, got {mean.shape} and {var.shape}"
            )
        if mean.size == 0:
            raise InputError("source mean and var are empty; pass one value per dimension")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
            raise InputError("source mean and var must be finite; found NaN or Inf")
        if np.any(var < 0):
            raise InputError("source var must be >= 0; found a negative variance")
        self.shape: tuple[int, ...] = tuple(mean.shape)
        self.mean = mean.reshape(-1)
        self.var = var.reshape(-1)

    def biased(self, values: float) -> np.ndarray:
        """The source variance as the biased variance of ``values`` values (``inf``: as is)."""
        if self.convention == "biased" or math.isinf(values) or values == 0:
            return self.var
        return self.var * (max(values - 1.0, 0.0) / values)

    def unbiased(self, values: float) -> np.ndarray:
        """The source variance as the unbiased variance of ``values`` values (NaN if <= 1)."""
        if self.convention == "unbiased" or math.isinf(values):
            return self.var
        if values <= 1.0:
            return np.full(self.var.shape, np.nan)
        return self.var * (values / (values - 1.0))

    def state(self) -> dict[str, Any]:
        return {"source_mean": self.mean, "source_var": self.var}

    def same(self, other: SourceStats | None) -> bool:
        return (
            other is not None
            and self.convention == other.convention
            and self.shape == other.shape
            and bool(np.array_equal(self.mean, other.mean))
            and bool(np.array_equal(self.var, other.var))
        )


def _as_float64(v: Any) -> np.ndarray:
    """A float64 copy of one source array; ``InputTypeError`` for complex (no real part taken)."""
    if hasattr(v, "detach"):  # a torch tensor (buffers), possibly on a device
        v = v.detach().cpu()
        v = v.numpy() if v.is_complex() else v.double().numpy()
    a = np.asarray(v)
    if a.dtype.kind == "c":  # as moments(): complex numbers have no single variance
        check_real_dtype(a, "source statistics")
    return np.array(a, dtype=np.float64)


def check_positions(value: Any) -> int:
    return check_positive_int("positions", value)


def mix(
    w: np.ndarray | float,
    ms: np.ndarray,
    vs: np.ndarray,
    mt: np.ndarray,
    vt: np.ndarray,
    pooled: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``w``-weighted mean and variance of a source and a target (``w`` the source's weight).

    Linear: ``w vs + (1 - w) vt``. Pooled (law of total variance): plus
    ``w (1 - w) (ms - mt)^2``, the exact biased variance of the union when ``vs`` and ``vt`` are
    biased and ``w`` is the source's share of the values.
    """
    w = np.asarray(w, dtype=np.float64)
    mean = np.where(w == 1.0, ms, w * ms + (1.0 - w) * mt)
    var = np.where(w == 1.0, vs, w * vs + (1.0 - w) * vt)
    if pooled:
        d = ms - mt
        var = np.where(w == 1.0, vs, var + w * (1.0 - w) * d * d)
    return mean, var


def share(prior: float, samples: np.ndarray) -> np.ndarray:
    """The prior's weight ``N / (N + n)``: 1 for ``N = inf`` and where no target was seen."""
    if math.isinf(prior):
        return np.ones_like(samples)
    den = prior + samples
    out = np.ones_like(samples)
    np.divide(prior, den, out=out, where=den > 0)
    return out


class SourceMixin(EstimatorMixin):
    """Mixin: an estimator built from optional source statistics ``(mean, var)``.

    It takes the ``source`` and ``source_var`` parameters, reports a biased ``var``, needs a
    batch of at least one value per dimension, starts with the source's dimension shape, and
    keeps the source in the record (``source_mean``, ``source_var``). With ``requires_source``
    a batch is refused until a source is given; without, the first batch stands in for it.
    Subclasses record their own state with :meth:`_with_source` / :meth:`_restore_source`.
    """

    #: whether :meth:`update` needs a source (``False``: the first batch is the start)
    requires_source: ClassVar[bool] = True

    def __init__(self, source: Any, source_var: str) -> None:
        self.source_var = check_var_convention(source_var, "source_var")
        self.source = None if source is None else SourceStats(source, self.source_var)
        super().__init__()

    @property
    def min_batch_count(self) -> int:
        return 1

    def check_batch(self, shape: tuple[int, ...], min_count: float) -> None:
        if self.requires_source:
            self._need_source()
        super().check_batch(shape, min_count)

    def _clear_state(self) -> None:
        """No batches; with a source, its dimension shape (count 0)."""
        self._init_state(0)
        if self.source is not None:
            self._shape = self.source.shape
            self._count = np.zeros(self.source.mean.size)
            self._init_state(self.source.mean.size)

    def _need_source(self) -> SourceStats:
        """The source, or a clear error saying how to give one."""
        if self.source is None:
            raise InputError(
                f"{type(self).__name__} has no source statistics; build it with "
                "source=(mean, var) (e.g. a BN layer's running_mean and running_var), or use it "
                "as a template in streamnorm.torch.adapt, which takes them from each layer"
            )
        return self.source

    def _with_source(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with the source's arrays added (if there is a source)."""
        if self.source is not None:
            state.update(self.source.state())
        return state

    def _restore_source(self, d: Any, D: int) -> None:
        """Take the source saved in an estimator record (``None`` if it has none)."""
        if "source_mean" not in d:
            self.source = None
            return
        shape = self._shape or ()
        mean = state_array(d, "source_mean", (D,))
        var = state_array(d, "source_var", (D,))
        self.source = SourceStats((mean.reshape(shape), var.reshape(shape)), self.source_var)


class SourcePooled(SourceMixin, PooledState):
    """Mixin: a source plus the pooled ``(count, mean, M2)`` of the target batches."""

    def _state(self) -> dict[str, Any]:
        return self._with_source(super()._state())

    def _set_state(self, d: Any, D: int) -> None:
        self._restore_source(d, D)
        super()._set_state(d, D)
