"""PriorMix: N-prior mixing of source and target batch statistics (Schneider et al. 2020).

Also home of :class:`SourceStats` (a source ``(mean, var)`` pair) and of the mixing formulas the
source-based test-time estimators share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._errors import InputError, InputTypeError
from .._validate import check_bool, check_nonnegative, check_positive_int, check_var_convention
from ._base import Estimator, state_array


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
    if hasattr(v, "detach"):  # a torch tensor (buffers), possibly on a device
        v = v.detach().cpu().double().numpy()
    a = np.array(v, dtype=np.float64)
    return a


def prime(est: Estimator, source: SourceStats | None) -> None:
    """Give a freshly cleared estimator the source's dimension shape (no batches, count 0)."""
    if source is None:
        return
    est._shape = source.shape
    est._count = np.zeros(source.mean.size)
    est._init_state(source.mean.size)


def restore_source(
    d: Any, D: int, shape: tuple[int, ...] | None, convention: str
) -> SourceStats | None:
    """The source saved in an estimator record, or ``None`` if it has none."""
    if "source_mean" not in d:
        return None
    mean = state_array(d, "source_mean", (D,))
    var = state_array(d, "source_var", (D,))
    return SourceStats((mean.reshape(shape or ()), var.reshape(shape or ())), convention)


def need_source(est: Estimator, source: SourceStats | None) -> SourceStats:
    """``source``, or a clear error saying how to give one."""
    if source is None:
        raise InputError(
            f"{type(est).__name__} has no source statistics; build it with "
            "source=(mean, var) (e.g. a BN layer's running_mean and running_var), or use it as a "
            "template in streamnorm.torch.adapt, which takes them from each layer"
        )
    return source


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


class PriorMix(Estimator):
    """N-prior mixing: the source statistics as a prior worth ``N`` samples (Schneider et al.).

    Each batch's statistics are mixed with the source statistics, weighted by sample counts; the
    estimate depends on the latest batch only (earlier batches are forgotten).

    Parameters
    ----------
    source : (array_like, array_like), optional
        The source ``(mean, var)``, shape ``(D...)`` each (e.g. a BN layer's ``running_mean`` and
        ``running_var``). Required before the first :meth:`update`; ``streamnorm.torch.adapt``
        supplies each layer's buffers to a template built without it.
    prior : float, default 16
        ``N``: the source's weight in samples, ``>= 0``; ``0`` gives the batch statistics alone
        (prediction-time BN), ``math.inf`` the source alone.
    positions : int, default 1
        Values per sample in each dimension: 1 for a ``(N, C)`` batch, ``H * W`` for the input of
        a ``BatchNorm2d`` reduced over ``(0, 2, 3)``. A batch of ``c`` values per dimension counts
        as ``n = c / positions`` samples, and the source as ``N * positions`` values.
    pooled : bool, default False
        Mix the variances exactly (law of total variance) rather than linearly as the paper does.
    source_var : {"unbiased", "biased"}, default "unbiased"
        The convention of the source variance (``"unbiased"``: PyTorch's ``running_var``).

    Notes
    -----
    For a batch of ``n`` samples with mean ``mean_t`` and biased variance ``var_t`` (``M2 / c``)
    and the source ``(mean_s, var_s)``, with ``w = N / (N + n)``::

        mean = (N mean_s + n mean_t) / (N + n) = w mean_s + (1 - w) mean_t
        var  = w var_s + (1 - w) var_t                                   (pooled=False, paper)
        var  = w var_s + (1 - w) var_t + w (1 - w) (mean_s - mean_t)^2   (pooled=True)

    ``var`` is **biased** (``var_convention == "biased"``: the variance a BatchNorm in training
    mode normalizes with). The source variance enters as the biased variance of the
    ``N * positions`` values the prior stands for (``var_s (N P - 1) / (N P)`` for an unbiased
    source; unchanged for ``N = inf``), so ``pooled=True`` is exactly the biased variance of the
    prior's values together with the batch's. ``running_var("unbiased")`` mixes the unbiased
    variances (``pooled=False``) or divides the pooled sum of squares by ``N P + c - 1``
    (``pooled=True``); it is NaN where a count of 1 leaves it undefined.

    ``N = 0`` gives the batch statistics, ``N -> inf`` the source statistics. A batch of one
    sample works (its biased variance over one value is 0, the source carries the spread).
    PriorMix cannot be merged (it keeps only the latest batch).

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> est = streamnorm.PriorMix(source=([0.0], [1.0]), prior=2, source_var="biased")
    >>> _ = est.update(streamnorm.moments(np.array([[3.0], [5.0]])))   # n = 2, mean 4, var 1
    >>> est.mean.tolist(), est.var.tolist()          # (2*0 + 2*4) / 4,  (2*1 + 2*1) / 4
    ([2.0], [1.0])
    """

    def __init__(
        self,
        source: Any = None,
        prior: float = 16.0,
        positions: int = 1,
        pooled: bool = False,
        source_var: str = "unbiased",
    ) -> None:
        self.prior = check_nonnegative("prior", prior, allow_inf=True)
        self.positions = check_positions(positions)
        self.pooled = check_bool("pooled", pooled)
        self.source_var = check_var_convention(source_var, "source_var")
        self.source = None if source is None else SourceStats(source, self.source_var)
        super().__init__()

    @property
    def var_convention(self) -> str:
        return "biased"

    @property
    def min_batch_count(self) -> int:
        return 1

    def _params(self) -> dict[str, Any]:
        return {
            "prior": self.prior,
            "positions": self.positions,
            "pooled": self.pooled,
            "source_var": self.source_var,
        }

    def _clear_state(self) -> None:
        self._init_state(0)
        prime(self, getattr(self, "source", None))

    def _init_state(self, D: int) -> None:
        self._n = np.zeros(D)
        self._mu = np.zeros(D)
        self._m2 = np.zeros(D)

    def check_batch(self, shape: tuple[int, ...], min_count: float) -> None:
        need_source(self, self.source)
        super().check_batch(shape, min_count)

    def _apply(
        self, n: np.ndarray, mu: np.ndarray, m2: np.ndarray, epochs: np.ndarray, uniform: bool
    ) -> None:
        self._n = np.broadcast_to(n[-1], mu[-1].shape).astype(np.float64)
        self._mu = mu[-1].astype(np.float64)
        self._m2 = m2[-1].astype(np.float64)

    def _mix(self, convention: str) -> tuple[np.ndarray, np.ndarray]:
        src = need_source(self, self.source)
        c = self._n
        values = self.prior * self.positions
        w = share(self.prior, c / self.positions)
        with np.errstate(divide="ignore", invalid="ignore"):
            vt_b = np.where(c > 0, self._m2 / np.where(c > 0, c, 1.0), 0.0)
            mean, var_b = mix(w, src.mean, src.biased(values), self._mu, vt_b, self.pooled)
            if convention == "biased":
                return mean, var_b
            if self.pooled:
                total = values + c
                return mean, np.where(total > 1, var_b * total / (total - 1.0), np.nan)
            vt_u = np.where(c > 1, self._m2 / (c - 1.0), np.nan)
            vt_u = np.where(w == 1.0, 0.0, vt_u)
            _, var_u = mix(w, src.mean, src.unbiased(values), self._mu, vt_u, False)
        return mean, var_u

    def _mean_flat(self) -> np.ndarray:
        return self._mix("biased")[0]

    def _var_flat(self, convention: str) -> np.ndarray:
        return self._mix(convention)[1]

    def _state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self._n, "mean": self._mu, "m2": self._m2}
        if self.source is not None:
            out.update(self.source.state())
        return out

    def _set_state(self, d: Any, D: int) -> None:
        self.source = restore_source(d, D, self._shape, self.source_var)
        self._n = state_array(d, "n", (D,))
        self._mu = state_array(d, "mean", (D,))
        self._m2 = state_array(d, "m2", (D,))
