"""Numba kernels of the estimators: apply ``k`` batches' moments to a state in one call.

Pure array-in/array-out, no validation. Each takes the batches as float64 arrays ``n``
(counts), ``mu`` (batch means, ``(k, D)``) and ``m2`` (sums of squared deviations, ``(k, D)``)
and updates the state arrays in place, batch after batch in order. With ``uniform`` every
dimension of a batch has the same count ``n[i, 0]`` (``n`` may then be ``(k, 1)``), and so has
the state: per-batch factors are computed once per batch instead of once per element; otherwise
``n`` is ``(k, D)``. Applying ``k`` batches at once gives the same bits as applying them one by
one: the per-batch arithmetic does not depend on ``k``.

Each inner loop stores into at most two state arrays and reads at most two batch rows: LLVM
vectorizes a loop only after runtime checks that its arrays do not overlap, and gives up (leaving
the loop scalar, about ten times slower) beyond eight such checks, e.g. with three stored arrays.
"""

from __future__ import annotations

from numba import njit

from .._config import JIT, STRICT_JIT
from .._kernels import chan_rows as chan_rows  # the pooled estimators' merge: the kernels' own


@njit(**STRICT_JIT)
def file_row(rows, i, mean, lo, m2):
    """File one batch's mean and M2 as ``rows[0, i]`` and ``rows[1, i]`` (``rows`` (2, k, D)).

    The mean filed is ``mean + lo`` (the double-double mean rounded to float64) when some
    residual ``lo`` is not zero, and ``mean`` itself otherwise, exactly as ``numpy`` forms it.
    Compiled without fastmath, so that the sum is the plain float64 one.
    """
    D = mean.shape[0]
    any_lo = False
    for d in range(D):
        if lo[d] != 0.0:
            any_lo = True
            break
    if any_lo:
        for d in range(D):
            rows[0, i, d] = mean[d] + lo[d]
    else:
        for d in range(D):
            rows[0, i, d] = mean[d]
    for d in range(D):
        rows[1, i, d] = m2[d]


@njit(**JIT)
def add_rows(acc, n, uniform):
    """``acc += n[0] + n[1] + ...`` per dimension, in order."""
    k = n.shape[0]
    D = acc.shape[0]
    if uniform:
        s = acc[0] if D else 0.0
        for i in range(k):
            s += n[i, 0]
        for d in range(D):
            acc[d] = s
        return
    for i in range(k):
        for d in range(D):
            acc[d] += n[i, d]


@njit(**JIT)
def ema_rows(n, mu, m2, decay, rate, mean, var_u, var_b, uniform):
    """``s <- decay * s + rate * x`` for the mean, the unbiased and the biased batch variance."""
    k, D = mu.shape
    for i in range(k):
        mi = mu[i]
        qi = m2[i]
        for d in range(D):
            mean[d] = decay * mean[d] + rate * mi[d]
        if uniform:
            ru = rate / (n[i, 0] - 1.0)
            rb = rate / n[i, 0]
            for d in range(D):
                var_u[d] = decay * var_u[d] + ru * qi[d]
                var_b[d] = decay * var_b[d] + rb * qi[d]
        else:
            ni = n[i]
            for d in range(D):
                var_u[d] = decay * var_u[d] + rate * (qi[d] / (ni[d] - 1.0))
                var_b[d] = decay * var_b[d] + rate * (qi[d] / ni[d])


@njit(**JIT)
def cumulative_rows(n, mu, m2, t, mean, s, var_u, var_b, uniform, pooled):
    """Equal weight per batch: running mean of the batch means and of the batch variances.

    With ``pooled``, ``s`` accumulates the pooled sum ``sum_b v_b + sum_b (mu_b - mean)^2`` (law
    of total variance with one unit of weight per batch) and ``var_u``/``var_b`` are left alone;
    without, ``var_u``/``var_b`` are the running means of the unbiased/biased batch variances and
    ``s`` is left alone. Returns the new number of batches ``t``.
    """
    k, D = mu.shape
    for i in range(k):
        t += 1.0
        f = 1.0 / t
        g = (t - 1.0) / t
        mi = mu[i]
        qi = m2[i]
        if pooled and uniform:
            ib = 1.0 / n[i, 0]
            for d in range(D):
                delta = mi[d] - mean[d]
                s[d] = s[d] + qi[d] * ib + delta * delta * g
        elif pooled:
            ni = n[i]
            for d in range(D):
                delta = mi[d] - mean[d]
                s[d] = s[d] + qi[d] / ni[d] + delta * delta * g
        elif uniform:
            iu = 1.0 / (n[i, 0] - 1.0)
            ib = 1.0 / n[i, 0]
            for d in range(D):
                var_u[d] = var_u[d] + (qi[d] * iu - var_u[d]) * f
                var_b[d] = var_b[d] + (qi[d] * ib - var_b[d]) * f
        else:
            ni = n[i]
            for d in range(D):
                var_u[d] = var_u[d] + (qi[d] / (ni[d] - 1.0) - var_u[d]) * f
                var_b[d] = var_b[d] + (qi[d] / ni[d] - var_b[d]) * f
        for d in range(D):
            mean[d] = mean[d] + (mi[d] - mean[d]) * f
    return t


@njit(**JIT)
def sums_rows(n, mu, m2, sum_mu, sum_u, sum_v, uniform):
    """Add each batch's mean, unbiased and biased variance to per-epoch sums."""
    k, D = mu.shape
    for i in range(k):
        mi = mu[i]
        qi = m2[i]
        for d in range(D):
            sum_mu[d] += mi[d]
        if uniform:
            iu = 1.0 / (n[i, 0] - 1.0)
            ib = 1.0 / n[i, 0]
            for d in range(D):
                sum_u[d] += qi[d] * iu
                sum_v[d] += qi[d] * ib
        else:
            ni = n[i]
            for d in range(D):
                sum_u[d] += qi[d] / (ni[d] - 1.0)
                sum_v[d] += qi[d] / ni[d]
