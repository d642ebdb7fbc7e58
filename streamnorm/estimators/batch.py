"""BatchStats: prediction-time BatchNorm, the statistics of the current batch only."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import InputError
from ._base import Estimator, state_array


class BatchStats(Estimator):
    """The statistics of the latest batch alone (prediction-time BN, Nado et al. 2020).

    With a model's BatchNorm layers this is what training mode normalizes with, at test time:
    every test batch is normalized with its own mean and variance; earlier batches are
    forgotten. AdaBN over a whole target set is :class:`~streamnorm.Population` instead.

    Notes
    -----
    For a batch of ``c`` values per dimension (``c = n`` samples for ``(N, C)`` input, ``n H W``
    for NCHW input reduced over ``(0, 2, 3)``: every spatial position of every sample weighs the
    same) with mean ``mean_t`` and sum of squared deviations ``M2``::

        mean = mean_t,    var = M2 / c          (biased, ``var_convention == "biased"``)

    ``running_var("unbiased")`` is ``M2 / (c - 1)``. Every batch needs at least 2 values per
    dimension: a variance from one value is meaningless (it is 0, and normalizing with it maps
    every input to the shift ``beta``), so a batch of one sample without spatial positions is
    rejected with an error. BatchStats cannot be merged.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> est = streamnorm.BatchStats()
    >>> _ = est.update(streamnorm.moments(np.array([[0.0], [9.0]])))
    >>> _ = est.update(streamnorm.moments(np.array([[1.0], [3.0]])))
    >>> est.mean.tolist(), est.var.tolist(), est.running_var("unbiased").tolist()
    ([2.0], [1.0], [2.0])
    """

    def __init__(self) -> None:
        super().__init__()

    @property
    def var_convention(self) -> str:
        return "biased"

    def check_batch(self, shape: tuple[int, ...], min_count: float) -> None:
        if not min_count > 1:
            raise InputError(
                f"BatchStats needs at least 2 values per dimension in every batch, got "
                f"{min_count:g}: a batch of one sample without spatial positions has no "
                "variance. Use larger batches, or an estimator that mixes in the source "
                "statistics (PriorPopulation, PriorMix) for batch size 1"
            )
        super().check_batch(shape, min_count)

    def _params(self) -> dict[str, Any]:
        return {}

    def _clear_state(self) -> None:
        self._init_state(0)

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

    def _mean_flat(self) -> np.ndarray:
        return self._mu.copy()

    def _var_flat(self, convention: str) -> np.ndarray:
        den = self._n - (1.0 if convention == "unbiased" else 0.0)
        out = np.full(self._n.shape, np.nan)
        np.divide(self._m2, den, out=out, where=den > 0)
        return out

    def _state(self) -> dict[str, Any]:
        return {"n": self._n, "mean": self._mu, "m2": self._m2}

    def _set_state(self, d: Any, D: int) -> None:
        self._n = state_array(d, "n", (D,))
        self._mu = state_array(d, "mean", (D,))
        self._m2 = state_array(d, "m2", (D,))
