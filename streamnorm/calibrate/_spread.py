"""Standard errors of a layer's statistics from the spread between batches.

:class:`BatchSpread` keeps, per cluster of consecutive batches, the pooled moments of the values
that reached a layer (and the sums of the batch means and batch variances); :meth:`errors` turns
the spread of the clusters into standard errors of the estimated mean and variance, and
:meth:`trace` into the same quantities after every prefix of the data (for a plot).

Notes
-----
A channel's values inside one image are correlated (neighbouring pixels, the same object), so
the ``n`` values of a pass are not ``n`` independent draws and ``sigma / sqrt(n)`` is too
optimistic. Batches of shuffled data are independent of each other, so each batch (a cluster of
values) is treated as the sampling unit, whatever the correlation inside it.

Write batch ``j`` (of ``k``) as ``n_j`` values per channel with mean ``m_j`` and biased variance
``v_j``. The population estimator is a weighted mean of per-batch quantities with weights
``w_j = n_j / n``::

    mean  mu      = sum_j w_j m_j
    var   sigma^2 = sum_j w_j d_j,        d_j = v_j + (m_j - mu)^2

(``d_j`` is the batch's mean square around the pooled mean; the dependence of ``d_j`` on ``mu``
does not change the estimate to first order, since ``sum_j w_j (m_j - mu) = 0``). For a weighted
mean ``theta = sum_j w_j t_j`` of independent cluster quantities (a ratio estimator), the
linearized sampling variance, estimated from the clusters themselves, is::

    se(theta)^2 = k / (k - 1) * sum_j w_j^2 (t_j - theta)^2

which for equal batch sizes is ``s_t^2 / k``, the variance between batch values over the number
of batches. Reported are ``mean_se = se(mu) / sigma`` (in units of the channel's standard
deviation) and ``var_se = se(sigma^2) / sigma^2`` (relative; the ``n / (n - 1)`` of an unbiased
``running_var`` cancels). The cumulative estimator (equal-weight mean of batch means and of
batch variances, ``update_bn``) gets the same formula with ``w_j = 1 / k``, ``t_j = m_j`` and
``t_j`` = the batch variance in the layer's convention. An EMA's error does not shrink with more
data; its standard errors are NaN.

The assumptions are those of the data: batches independent and alike (shuffled data); with data
sorted by class the batches differ systematically and the errors describe an average over the
sorted order, not a random sample. With few batches the estimated errors are themselves noisy
(relative error about ``1 / sqrt(2 (k - 1))``).

To bound memory, at most :data:`MAX_CLUSTERS` clusters are kept: when that many are reached,
neighbours are merged pairwise (exactly), which leaves the estimates unchanged and keeps the
standard errors valid (a cluster of consecutive batches is as independent of the others as its
batches are), with at least ``MAX_CLUSTERS / 2`` degrees of freedom.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_CLUSTERS", "BatchSpread", "Trace"]

#: clusters kept before neighbours are merged pairwise
MAX_CLUSTERS = 128


@dataclass(frozen=True)
class Trace:
    """A layer's estimates after every prefix of the data (cluster boundaries).

    Attributes
    ----------
    samples : numpy.ndarray, shape (K,), int64
        Batch items seen after each prefix.
    mean_se, var_se : numpy.ndarray, shape (K,)
        Largest standard error over channels after each prefix (see :class:`BatchSpread`); NaN
        for fewer than 2 clusters.
    mean_dev, var_dev : numpy.ndarray, shape (K,)
        Largest deviation over channels of the prefix estimate from the final one:
        ``|mu_prefix - mu| / sigma`` and ``|var_prefix / var - 1|``.
    """

    samples: np.ndarray
    mean_se: np.ndarray
    var_se: np.ndarray
    mean_dev: np.ndarray
    var_dev: np.ndarray


class BatchSpread:
    """Per-cluster moments of a layer's input, for standard errors (see the module Notes).

    Parameters
    ----------
    unbiased : bool
        The layer stores unbiased variances (the cumulative estimator averages those).
    """

    def __init__(self, unbiased: bool = True) -> None:
        self.unbiased = bool(unbiased)
        self.items = np.zeros(0, dtype=np.int64)  # batch items per cluster
        self.batches = np.zeros(0, dtype=np.int64)  # batches per cluster
        self.n = np.zeros(0)  # values per channel per cluster
        self.mean: np.ndarray | None = None  # (k, C) pooled mean of the cluster
        self.m2: np.ndarray | None = None  # (k, C) pooled sum of squared deviations
        self.sum_means: np.ndarray | None = None  # (k, C) sum of the batch means
        self.sum_vars: np.ndarray | None = None  # (k, C) sum of the batch variances

    def __len__(self) -> int:
        return int(self.n.size)

    def add(self, items: int, count: float, mean: np.ndarray, m2: np.ndarray) -> None:
        """One batch: ``items`` batch items, ``count`` values per channel, its mean and M2."""
        mean = np.asarray(mean, dtype=np.float64).reshape(1, -1)
        m2 = np.asarray(m2, dtype=np.float64).reshape(1, -1)
        dof = count - 1.0 if self.unbiased else count
        var = m2 / dof if dof > 0 else np.full_like(m2, np.nan)
        self._append(
            np.array([items]), np.array([1]), np.array([float(count)]), mean, m2, mean, var
        )

    def _append(
        self,
        items: np.ndarray,
        batches: np.ndarray,
        n: np.ndarray,
        mean: np.ndarray,
        m2: np.ndarray,
        sum_means: np.ndarray,
        sum_vars: np.ndarray,
    ) -> None:
        self.items = np.concatenate([self.items, items])
        self.batches = np.concatenate([self.batches, batches])
        self.n = np.concatenate([self.n, n])
        if self.mean is None or self.m2 is None or self.sum_means is None or self.sum_vars is None:
            self.mean, self.m2, self.sum_means, self.sum_vars = mean, m2, sum_means, sum_vars
        else:
            self.mean = np.concatenate([self.mean, mean])
            self.m2 = np.concatenate([self.m2, m2])
            self.sum_means = np.concatenate([self.sum_means, sum_means])
            self.sum_vars = np.concatenate([self.sum_vars, sum_vars])
        while len(self) >= MAX_CLUSTERS:
            self._coarsen()

    def _coarsen(self) -> None:
        """Merge clusters ``2i`` and ``2i + 1`` (an odd last one stays alone), exactly."""
        assert self.mean is not None and self.m2 is not None
        assert self.sum_means is not None and self.sum_vars is not None
        k = len(self)
        a, b = np.arange(0, k - 1, 2), np.arange(1, k, 2)
        na, nb = self.n[a], self.n[b]
        n = na + nb
        delta = self.mean[b] - self.mean[a]
        frac = (nb / n)[:, None]
        mean = self.mean[a] + delta * frac
        m2 = self.m2[a] + self.m2[b] + delta**2 * (na * frac[:, 0])[:, None]
        parts = [
            (
                self.items[a] + self.items[b],
                self.batches[a] + self.batches[b],
                n,
                mean,
                m2,
                self.sum_means[a] + self.sum_means[b],
                self.sum_vars[a] + self.sum_vars[b],
            )
        ]
        if k % 2:
            last = slice(k - 1, k)
            parts.append(
                (
                    self.items[last],
                    self.batches[last],
                    self.n[last],
                    self.mean[last],
                    self.m2[last],
                    self.sum_means[last],
                    self.sum_vars[last],
                )
            )
        cols = [np.concatenate([p[i] for p in parts]) for i in range(7)]
        self.items, self.batches, self.n = cols[0], cols[1], cols[2]
        self.mean, self.m2, self.sum_means, self.sum_vars = cols[3], cols[4], cols[5], cols[6]

    def merge(self, other: BatchSpread) -> BatchSpread:
        """The clusters of both (this one's first); inputs unchanged."""
        out = BatchSpread(self.unbiased)
        for s in (self, other):
            if len(s) and s.mean is not None:
                assert s.m2 is not None and s.sum_means is not None and s.sum_vars is not None
                out._append(s.items, s.batches, s.n, s.mean, s.m2, s.sum_means, s.sum_vars)
        return out

    def copy(self) -> BatchSpread:
        return BatchSpread(self.unbiased).merge(self)

    # ----------------------------------------------------------------------------------------

    def errors(self, estimator: str, upto: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(mean_se, var_se)``, shape (C,), from the first ``upto`` clusters (all by default).

        ``mean_se`` is in units of the estimated standard deviation, ``var_se`` relative to the
        estimated variance (see the module Notes); NaN with fewer than 2 clusters or for
        ``"ema"``, 0 for a channel whose values are all equal.
        """
        est = self._estimates(estimator, upto)
        if est is None:
            return np.zeros(0), np.zeros(0)
        mu, var, m_se2, v_se2 = est
        return _ratio(np.sqrt(m_se2), np.sqrt(var)), _ratio(np.sqrt(v_se2), var)

    def _estimates(
        self, estimator: str, upto: int | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """``(mean, var, se(mean)^2, se(var)^2)`` of the first ``upto`` clusters."""
        if self.mean is None or self.m2 is None or self.sum_means is None:
            return None
        assert self.sum_vars is not None
        k = len(self) if upto is None else int(upto)
        n, m, m2 = self.n[:k], self.mean[:k], self.m2[:k]
        if estimator == "cumulative":
            b = self.batches[:k].astype(np.float64)
            w = (b / b.sum())[:, None]
            tm = self.sum_means[:k] / b[:, None]
            tv = self.sum_vars[:k] / b[:, None]
            mu = (w * tm).sum(axis=0)
            var = (w * tv).sum(axis=0)
        else:
            w = (n / n.sum())[:, None]
            tm = m
            mu = (w * m).sum(axis=0)
            tv = m2 / n[:, None] + (m - mu) ** 2
            var = (w * tv).sum(axis=0)
        if k < 2 or estimator == "ema":
            nan = np.full(mu.shape, np.nan)
            return mu, var, nan, nan
        c = k / (k - 1.0)
        m_se2 = c * (w**2 * (tm - mu) ** 2).sum(axis=0)
        v_se2 = c * (w**2 * (tv - var) ** 2).sum(axis=0)
        return mu, var, m_se2, v_se2

    def trace(self, estimator: str) -> Trace:
        """Largest errors and deviations from the final estimate after every prefix."""
        k = len(self)
        samples = np.cumsum(self.items)
        out = np.full((4, k), np.nan)
        final = self._estimates(estimator, None)
        if final is not None:
            mu_f, var_f = final[0], final[1]
            sd_f = np.sqrt(var_f)
            for i in range(k):
                est = self._estimates(estimator, i + 1)
                assert est is not None
                mu, var, m_se2, v_se2 = est
                out[0, i] = _max(_ratio(np.sqrt(m_se2), np.sqrt(var)))
                out[1, i] = _max(_ratio(np.sqrt(v_se2), var))
                out[2, i] = _max(_ratio(np.abs(mu - mu_f), sd_f))
                out[3, i] = _max(_ratio(np.abs(var - var_f), var_f))
        return Trace(samples, out[0], out[1], out[2], out[3])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, 0 where both are 0 (a constant channel), inf where only ``den`` is."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(num, dtype=np.float64) / den
    both = (num == 0) & (den == 0)
    return np.where(both, 0.0, out)


def _max(a: np.ndarray) -> float:
    return float(np.nanmax(a)) if a.size and not np.all(np.isnan(a)) else float("nan")
