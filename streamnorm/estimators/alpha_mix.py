"""AlphaMix: alpha-BN, a fixed-weight mix of batch and source statistics (You et al. 2021)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validate import check_fraction, check_var_convention
from ._base import Estimator, state_array
from .prior_mix import SourceStats, mix, need_source, prime, restore_source


class AlphaMix(Estimator):
    """alpha-BN: ``alpha * batch + (1 - alpha) * source`` for the mean and the variance.

    Parameters
    ----------
    source : (array_like, array_like), optional
        The source ``(mean, var)``, shape ``(D...)`` each. Required before the first
        :meth:`update`; ``streamnorm.torch.adapt`` supplies each layer's buffers to a template
        built without it.
    alpha : float, default 0.1
        The batch's weight, in ``[0, 1]``: ``0`` keeps the source statistics, ``1`` gives the
        batch statistics alone (prediction-time BN).
    source_var : {"unbiased", "biased"}, default "unbiased"
        The convention of the source variance. The mix attaches no sample count to the source, so
        it is taken as the variance of the source population, where both conventions agree: the
        keyword records the convention and changes no value.

    Notes
    -----
    For a batch with mean ``mean_t`` and biased variance ``var_t = M2 / c`` (``c`` values per
    dimension: every spatial position of every sample weighs the same)::

        mean = alpha mean_t + (1 - alpha) mean_s
        var  = alpha var_t  + (1 - alpha) var_s

    ``var`` is biased (``var_convention == "biased"``), as a BatchNorm in training mode
    normalizes; ``running_var("unbiased")`` mixes ``M2 / (c - 1)`` instead (NaN for a batch of
    one value). The estimate depends on the latest batch only; before any batch it is the
    source. A batch of one sample works for ``alpha < 1``. AlphaMix cannot be merged.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> est = streamnorm.AlphaMix(source=([0.0], [1.0]), alpha=0.25)
    >>> _ = est.update(streamnorm.moments(np.array([[3.0], [5.0]])))   # mean 4, var 1
    >>> est.mean.tolist(), est.var.tolist()          # 0.25 * 4 + 0.75 * 0,  0.25 * 1 + 0.75 * 1
    ([1.0], [1.0])
    """

    def __init__(
        self, source: Any = None, alpha: float = 0.1, source_var: str = "unbiased"
    ) -> None:
        self.alpha = check_fraction("alpha", alpha, low=0.0, high=1.0, closed="both")
        self.source_var = check_var_convention(source_var, "source_var")
        self.source = None if source is None else SourceStats(source, self.source_var)
        super().__init__()

    @property
    def var_convention(self) -> str:
        return "biased"

    @property
    def min_batch_count(self) -> int:
        return 1

    def check_batch(self, shape: tuple[int, ...], min_count: float) -> None:
        need_source(self, self.source)
        super().check_batch(shape, min_count)

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "source_var": self.source_var}

    def _clear_state(self) -> None:
        self._init_state(0)
        prime(self, getattr(self, "source", None))

    def _init_state(self, D: int) -> None:
        self._n = np.zeros(D)
        self._mu = np.zeros(D)
        self._m2 = np.zeros(D)

    def _apply(
        self, n: np.ndarray, mu: np.ndarray, m2: np.ndarray, epochs: np.ndarray, uniform: bool
    ) -> None:
        self._n = np.broadcast_to(n[-1], mu[-1].shape).astype(np.float64)
        self._mu = mu[-1].astype(np.float64)
        self._m2 = m2[-1].astype(np.float64)

    def _mix(self, convention: str) -> tuple[np.ndarray, np.ndarray]:
        src = need_source(self, self.source)
        c = self._n
        w = np.where(c > 0, 1.0 - self.alpha, 1.0)
        ddof = 1.0 if convention == "unbiased" else 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            vt = np.where(c - ddof > 0, self._m2 / np.maximum(c - ddof, 1e-300), np.nan)
        vt = np.where(w == 1.0, 0.0, vt)
        return mix(w, src.mean, src.var, self._mu, vt, False)

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
