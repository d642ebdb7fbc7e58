"""Population: the exact pooled statistics of everything fed."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from .._kernels import chan_merge_into
from .._moments import Moments
from . import _kernels as EK
from ._base import Estimator, state_array


class Population(Estimator):
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
    def var_convention(self) -> str:
        return "biased"

    def _params(self) -> dict[str, Any]:
        return {}

    def _clear_state(self) -> None:
        self._n = np.zeros(0)
        self._mu = np.zeros(0)
        self._m2 = np.zeros(0)

    def _init_state(self, D: int) -> None:
        self._n = np.zeros(D)
        self._mu = np.zeros(D)
        self._m2 = np.zeros(D)

    def _apply(
        self, n: np.ndarray, mu: np.ndarray, m2: np.ndarray, epochs: np.ndarray, uniform: bool
    ) -> None:
        EK.chan_rows(n, mu, m2, self._n, self._mu, self._m2, uniform)

    def _mean_flat(self) -> np.ndarray:
        return np.where(self._n > 0, self._mu, np.nan)

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
        other = cast(Population, other)
        self._sync()
        other._sync()
        out = cast(Population, self._merge_base(other))
        D = int(np.prod(out._shape, dtype=np.int64)) if out._shape is not None else 0
        out._init_state(D)
        for src in (self, other):
            if src._shape is not None:
                chan_merge_into(out._n, out._mu, out._m2, src._n, src._mu, src._m2)
        return out
