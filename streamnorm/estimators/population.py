"""Population: the exact pooled statistics of everything fed."""

from __future__ import annotations

from typing import cast

from .._moments import Moments
from ._base import Estimator
from ._pooled import PooledState


class Population(PooledState, Estimator):
    """Exact mean and variance of all the samples fed, pooled (Chan et al.'s merge).

    This is the whole-dataset estimate: fed every training batch once with the final weights
    frozen, it is the ground truth the other estimators are compared with (fvcore's PreciseBN,
    AdaBN, ``update_bn``-style recalibration). Dimensions that never received a sample (all
    values omitted as NaN) have a NaN mean.

    ``var`` is the **biased** variance ``M2 / N`` of the ``N`` samples (``var_convention ==
    "biased"``), i.e. ``Moments.var(ddof=0)`` of the concatenated data;
    ``running_var("unbiased")`` is ``M2 / (N - 1)``, what PyTorch's ``running_var`` means.

    Notes
    -----
    Each batch's ``(n, mean, M2)`` is merged with ``n = na + nb; d = mb - ma;
    mean = ma + d nb / n; M2 = M2a + M2b + d^2 na nb / n``, which is exact whatever the batch
    sizes: the result equals the moments of the concatenated batches up to rounding. The order
    of the batches does not matter beyond rounding, so populations of disjoint shards can be
    merged.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> x = np.arange(12.0).reshape(6, 2)
    >>> pop = streamnorm.Population()
    >>> for b in (x[:1], x[1:4], x[4:]):
    ...     _ = pop.update(streamnorm.moments(b))
    >>> pop.mean.tolist(), pop.var.tolist(), pop.count
    ([5.0, 6.0], [11.666666666666666, 11.666666666666666], 6)
    """

    @property
    def moments(self) -> Moments:
        """The pooled state as a :class:`~streamnorm.Moments` (a copy)."""
        self._sync()
        self._need_data()
        return Moments.from_arrays(
            self._n.reshape(self._shape or ()),
            self._mean_flat().reshape(self._shape or ()),
            self._m2.reshape(self._shape or ()),
            weighted=self._weighted,
        )

    def merge(self, other: Estimator) -> Population:
        """A new Population of both inputs' samples (exact; neither input changes)."""
        self._merge_check(other)
        return cast(Population, self._merge_pooled(cast(Population, other)))
