"""BatchStats: prediction-time BatchNorm, the statistics of the current batch only."""

from __future__ import annotations

import numpy as np

from .._errors import InputError
from ._base import Estimator
from ._pooled import PooledState


class BatchStats(PooledState, Estimator):
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

    latest = True

    def check_batch(self, shape: tuple[int, ...], min_count: float) -> None:
        if not min_count > 1:
            raise InputError(
                f"BatchStats needs at least 2 values per dimension in every batch, got "
                f"{min_count:g}: a batch of one sample without spatial positions has no "
                "variance. Use larger batches, or an estimator that mixes in the source "
                "statistics (PriorPopulation, PriorMix) for batch size 1"
            )
        super().check_batch(shape, min_count)

    def _mean_flat(self) -> np.ndarray:
        return self._mu.copy()
