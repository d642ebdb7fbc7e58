"""PriorPopulation: the source statistics as a prior, pooled exactly with all target samples."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from .._validate import check_nonnegative
from ._base import Estimator
from ._source import SourcePooled, check_positions, mix, share


class PriorPopulation(SourcePooled, Estimator):
    """Online prior-population: a source prior worth ``N`` samples plus every target sample.

    The exact mean and variance of the union of two sets: ``N`` samples drawn from the source
    statistics, and all the target samples fed so far (Chan et al.'s merge, as
    :class:`~streamnorm.Population`). With no target data it is the source; as target data
    stream in, the prior's share ``N / (N + n)`` shrinks and the estimate converges to AdaBN
    (the population statistics of the target). It works from a batch of one sample and is
    mergeable: shards of a target stream can be pooled.

    Parameters
    ----------
    source : (array_like, array_like), optional
        The source ``(mean, var)``, shape ``(D...)`` each (e.g. a BN layer's ``running_mean`` and
        ``running_var``). Required before the first :meth:`update`; ``streamnorm.torch.adapt``
        supplies each layer's buffers to a template built without it.
    prior : float, default 16
        ``N``: the prior's worth in samples, ``>= 0`` (``0``: the target population alone,
        AdaBN; ``math.inf``: the source alone).
    positions : int, default 1
        Values per sample in each dimension: 1 for ``(N, C)`` input, ``H * W`` for the input of a
        ``BatchNorm2d`` reduced over ``(0, 2, 3)``. A prior worth ``N`` samples of ``H x W``
        positions is ``N * H * W`` values per channel; ``c`` target values count as
        ``n = c / positions`` samples.
    source_var : {"unbiased", "biased"}, default "unbiased"
        The convention of the source variance (``"unbiased"``: PyTorch's ``running_var``); an
        unbiased source variance ``var_s`` is the sum of squares ``var_s (N P - 1)`` of the
        prior's ``N P`` values.

    Notes
    -----
    With the prior ``(N P values, mean_s, biased var_s)``, the target so far ``(c values, n = c / P
    samples, mean_t, M2_t)`` and ``w = N / (N + n)``::

        mean = w mean_s + (1 - w) mean_t
        var  = w var_s + (1 - w) M2_t / c + w (1 - w) (mean_s - mean_t)^2

    which is the exact biased variance (``var_convention == "biased"``) of the ``N P + c``
    values; ``running_var("unbiased")`` divides their sum of squares by ``N P + c - 1`` instead.
    ``N = 0`` gives AdaBN (the pooled target), ``N -> inf`` the source. Before any target batch
    (or with ``N = 0`` and no target) the estimate is the source. The count :attr:`count` is the
    number of target values fed.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> est = streamnorm.PriorPopulation(source=([0.0], [1.0]), prior=2, source_var="biased")
    >>> for x in ([[3.0]], [[5.0]]):                   # batch size 1
    ...     _ = est.update(streamnorm.moments(np.array(x)))
    >>> est.mean.tolist(), est.var.tolist()   # 2 values (mean 0, var 1) and 3, 5 pooled
    ([2.0], [5.0])
    """

    _param_names = ("prior", "positions", "source_var")

    def __init__(
        self,
        source: Any = None,
        prior: float = 16.0,
        positions: int = 1,
        source_var: str = "unbiased",
    ) -> None:
        self.prior = check_nonnegative("prior", prior, allow_inf=True)
        self.positions = check_positions(positions)
        super().__init__(source, source_var)

    @property
    def min_batch_count(self) -> int:
        return 0

    def _init_state(self, D: int) -> None:
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        super()._init_state(D)

    def _apply(
        self, n: np.ndarray, mu: np.ndarray, m2: np.ndarray, epochs: np.ndarray, uniform: bool
    ) -> None:
        super()._apply(n, mu, m2, epochs, uniform)
        self._cache = None

    def _pool(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._cache is not None:
            return self._cache
        src = self._need_source()
        c = self._n
        values = self.prior * self.positions
        w = share(self.prior, c / self.positions)
        vt = np.zeros_like(c)
        np.divide(self._m2, c, out=vt, where=c > 0)
        mean, var = mix(w, src.mean, src.biased(values), self._mu, vt, True)
        self._cache = (mean, var, values + c)
        return self._cache

    def _mean_flat(self) -> np.ndarray:
        return self._pool()[0].copy()

    def _var_flat(self, convention: str) -> np.ndarray:
        _, var, total = self._pool()
        if convention == "biased":
            return var.copy()
        out = np.full(var.shape, np.nan)
        np.divide(var * total, total - 1.0, out=out, where=total > 1)
        return np.where(np.isinf(total), var, out)

    def _set_state(self, d: Any, D: int) -> None:
        super()._set_state(d, D)
        self._cache = None

    def merge(self, other: Estimator) -> PriorPopulation:
        """A new estimator: the prior once, with both inputs' target samples (exact)."""
        self._merge_check(other)
        other = cast(PriorPopulation, other)
        if not (self.source is None and other.source is None) and not (
            self.source is not None and self.source.same(other.source)
        ):
            raise ValueError(
                "cannot merge PriorPopulation estimators with different source statistics; "
                "the prior is shared, so both must be built from the same (mean, var)"
            )
        out = cast(PriorPopulation, self._merge_pooled(other))
        out.source = self.source
        return out
