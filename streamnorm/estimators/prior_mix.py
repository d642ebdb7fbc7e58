"""PriorMix: N-prior mixing of source and target batch statistics (Schneider et al. 2020)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validate import check_bool, check_nonnegative
from ._base import Estimator
from ._source import SourcePooled, check_positions, mix, share


class PriorMix(SourcePooled, Estimator):
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

    latest = True

    _param_names = ("prior", "positions", "pooled", "source_var")

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
        super().__init__(source, source_var)

    def _mix(self, convention: str) -> tuple[np.ndarray, np.ndarray]:
        src = self._need_source()
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
