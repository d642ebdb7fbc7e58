"""Numba kernels of the estimators: apply ``k`` batches' moments to a state in one call.

Pure array-in/array-out, no validation. Each takes the batches as ``(k, D)`` float64 arrays
``n`` (per-dimension counts), ``mu`` (batch means) and ``m2`` (sums of squared deviations) and
updates the state arrays in place, batch after batch in order. Applying ``k`` batches at once
gives the same bits as applying them one by one: the per-batch arithmetic does not depend on ``k``.
"""

from __future__ import annotations

from numba import njit

from .._config import JIT
from .._kernels import chan_merge_into


@njit(**JIT)
def add_rows(acc, n):  # type: ignore[no-untyped-def]
    """``acc += n[0] + n[1] + ...``, in order (exact for integer counts, fixed order otherwise)."""
    k, D = n.shape
    for i in range(k):
        for d in range(D):
            acc[d] += n[i, d]


@njit(**JIT)
def chan_rows(n, mu, m2, cnt, mean, q):  # type: ignore[no-untyped-def]
    """Chan-merge every batch into the pooled state ``(cnt, mean, q)``, in order."""
    for i in range(n.shape[0]):
        chan_merge_into(cnt, mean, q, n[i], mu[i], m2[i])


@njit(**JIT)
def ema_rows(n, mu, m2, decay, rate, mean, var_u, var_b):  # type: ignore[no-untyped-def]
    """``s <- decay * s + rate * x`` for the mean, the unbiased and the biased batch variance."""
    k, D = n.shape
    for i in range(k):
        for d in range(D):
            c = n[i, d]
            q = m2[i, d]
            mean[d] = decay * mean[d] + rate * mu[i, d]
            var_u[d] = decay * var_u[d] + rate * (q / (c - 1.0))
            var_b[d] = decay * var_b[d] + rate * (q / c)


@njit(**JIT)
def cumulative_rows(n, mu, m2, t, mean, s, var_u, var_b):  # type: ignore[no-untyped-def]
    """Equal weight per batch: running mean of the batch means and of the batch variances.

    ``s`` accumulates the pooled sum ``sum_b v_b + sum_b (mu_b - mean)^2`` (law of total variance
    with one unit of weight per batch). Returns the new number of batches ``t``.
    """
    k, D = n.shape
    for i in range(k):
        t += 1.0
        f = 1.0 / t
        g = (t - 1.0) / t
        for d in range(D):
            c = n[i, d]
            q = m2[i, d]
            delta = mu[i, d] - mean[d]
            mean[d] = mean[d] + delta * f
            s[d] = s[d] + q / c + delta * delta * g
            var_u[d] = var_u[d] + (q / (c - 1.0) - var_u[d]) * f
            var_b[d] = var_b[d] + (q / c - var_b[d]) * f
    return t


@njit(**JIT)
def sums_rows(n, mu, m2, sum_mu, sum_u, sum_v):  # type: ignore[no-untyped-def]
    """Add each batch's mean, unbiased and biased variance to per-epoch sums."""
    k, D = n.shape
    for i in range(k):
        for d in range(D):
            c = n[i, d]
            q = m2[i, d]
            sum_mu[d] += mu[i, d]
            sum_u[d] += q / (c - 1.0)
            sum_v[d] += q / c
