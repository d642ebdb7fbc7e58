"""CumulativeAverage: equal weight per batch (PyTorch momentum=None, swa_utils.update_bn)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from .._validate import check_bool, check_choice
from . import _kernels as EK
from ._base import Estimator, state_array

VAR_MODES = ("mean_of_batch", "pooled")


class CumulativeAverage(Estimator):
    """Average of the batch statistics over every batch, each batch weighted equally.

    Parameters
    ----------
    unbiased : bool, default True
        Report the variance in PyTorch's convention (see Notes).
    var_mode : {"mean_of_batch", "pooled"}, default "mean_of_batch"
        How the batch variances become a population variance (see Notes).

    Notes
    -----
    The mean is the plain average of the batch means, ``(1/B) sum_b mu_b``: PyTorch's
    ``momentum=None`` (factor ``1 / num_batches_tracked``) and
    ``torch.optim.swa_utils.update_bn``. With the defaults the state equals BatchNorm's
    ``running_mean`` / ``running_var`` with ``momentum=None`` after the same batches.

    ``var_mode="mean_of_batch"`` (Ioffe & Szegedy 2015) averages the batch variances:
    ``(1/B) sum_b M2_b / (n_b - 1)`` with ``unbiased`` (PyTorch), ``/ n_b`` without. It ignores
    how much the batch means scatter, so it underestimates the population variance when the
    batches differ (drift, small or non-i.i.d. batches).

    ``var_mode="pooled"`` uses the law of total variance with one unit of weight per batch:
    ``(1/B) sum_b M2_b / n_b + (1/B) sum_b (mu_b - mean)^2``; with equal batch sizes that is
    exactly the variance of all the samples pooled (``Population().var``). With ``unbiased``
    it is multiplied by ``N / (N - 1)`` (``N``: samples seen).

    ``var_convention`` is ``"unbiased"`` when ``unbiased`` else ``"biased"``; the state keeps
    what :meth:`running_var` needs to convert exactly.

    Every batch needs at least 2 samples per dimension for ``mean_of_batch`` with
    ``unbiased``, at least 1 otherwise.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> a, b = np.array([[0.0], [2.0]]), np.array([[10.0], [12.0]])
    >>> mob = streamnorm.CumulativeAverage(unbiased=False)
    >>> pooled = streamnorm.CumulativeAverage(unbiased=False, var_mode="pooled")
    >>> for x in (a, b):
    ...     _ = mob.update(streamnorm.moments(x)); _ = pooled.update(streamnorm.moments(x))
    >>> mob.mean.tolist(), mob.var.tolist(), pooled.var.tolist()
    ([6.0], [1.0], [26.0])
    """

    _param_names = ("unbiased", "var_mode")

    def __init__(self, unbiased: bool = True, var_mode: str = "mean_of_batch") -> None:
        self.unbiased = check_bool("unbiased", unbiased)
        self.var_mode = check_choice("var_mode", var_mode, VAR_MODES)
        super().__init__()

    @property
    def min_batch_count(self) -> int:
        return 2 if (self.unbiased and self.var_mode == "mean_of_batch") else 1

    def _clear_state(self) -> None:
        self._init_state(0)

    def _init_state(self, D: int) -> None:
        self._t = 0.0
        self._mu = np.zeros(D)
        self._s = np.zeros(D)
        self._var_u = np.zeros(D)
        self._var_b = np.zeros(D)

    def _apply(
        self, n: np.ndarray, mu: np.ndarray, m2: np.ndarray, epochs: np.ndarray, uniform: bool
    ) -> None:
        self._t = float(
            EK.cumulative_rows(
                n,
                mu,
                m2,
                self._t,
                self._mu,
                self._s,
                self._var_u,
                self._var_b,
                uniform,
                self.var_mode == "pooled",
            )
        )

    def _mean_flat(self) -> np.ndarray:
        return self._mu.copy()

    def _var_flat(self, convention: str) -> np.ndarray:
        if self.var_mode == "mean_of_batch":
            return (self._var_u if convention == "unbiased" else self._var_b).copy()
        v = self._s / self._t
        if convention == "unbiased":
            den = self._count - 1.0
            out = np.full(v.shape, np.nan)
            np.divide(v * self._count, den, out=out, where=den > 0)
            return out
        return v

    def _state(self) -> dict[str, Any]:
        return {
            "batches": np.float64(self._t),
            "mean": self._mu,
            "pooled_sum": self._s,
            "var_unbiased": self._var_u,
            "var_biased": self._var_b,
        }

    def _set_state(self, d: Any, D: int) -> None:
        self._t = float(state_array(d, "batches", (), integer=True))
        self._mu = state_array(d, "mean", (D,))
        self._s = state_array(d, "pooled_sum", (D,))
        self._var_u = state_array(d, "var_unbiased", (D,))
        self._var_b = state_array(d, "var_biased", (D,))

    def merge(self, other: Estimator) -> CumulativeAverage:
        """A new CumulativeAverage of both inputs' batches (each batch still weighs one)."""
        self._merge_check(other)
        other = cast(CumulativeAverage, other)
        self._sync()
        other._sync()
        out = cast(CumulativeAverage, self._merge_base(other))
        if self._shape is None or other._shape is None:
            src = other if self._shape is None else self
            out._init_state(src._mu.shape[0])
            out._t = src._t
            for k in ("_mu", "_s", "_var_u", "_var_b"):
                setattr(out, k, getattr(src, k).copy())
            return out
        ta, tb = self._t, other._t
        t = ta + tb
        delta = other._mu - self._mu
        out._t = t
        out._mu = self._mu + delta * (tb / t)
        out._s = self._s + other._s + delta * delta * (ta * tb / t)
        out._var_u = (self._var_u * ta + other._var_u * tb) / t
        out._var_b = (self._var_b * ta + other._var_b * tb) / t
        return out
