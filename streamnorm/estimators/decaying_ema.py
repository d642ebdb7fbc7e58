"""DecayingEMA: an online target EMA whose momentum decays with every batch (DUA-style)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validate import check_fraction
from ._base import Estimator, state_array
from ._source import SourceMixin


class DecayingEMA(SourceMixin, Estimator):
    """Exponential moving average with a decaying momentum ``m_t = max(m_min, m0 decay^t)``.

    The schedule of DUA (Mirza et al. 2022): early target batches move the estimate quickly,
    later ones less and less, down to a floor ``m_min`` that keeps tracking a drifting target.

    Parameters
    ----------
    source : (array_like, array_like), optional
        The start ``(mean, var)``, shape ``(D...)`` each, e.g. a BN layer's buffers. Without
        one, the first batch's statistics are the start.
    m0 : float, default 0.1
        Momentum of the first update, in ``[0, 1]`` (``0``, with ``m_min = 0``: keep the
        source).
    decay : float, default 0.94
        Factor applied to the momentum after every batch, in ``[0, 1]`` (``0``: the first
        batch moves the estimate by ``m0``, every later one by ``m_min``).
    m_min : float, default 0.005
        Floor of the momentum, in ``[0, 1]``.
    source_var : {"unbiased", "biased"}, default "unbiased"
        The convention of the source variance. The EMA attaches no sample count to the source, so
        it is taken as the variance of the source population, where both conventions agree: the
        keyword records the convention and changes no value.

    Notes
    -----
    With a source, the state starts at ``(mean_s, var_s)`` and batch ``t = 0, 1, 2, ...``
    updates it as::

        m_t  = max(m_min, m0 decay^t)
        mean <- (1 - m_t) mean + m_t mean_t
        var  <- (1 - m_t) var  + m_t var_t

    with the batch's mean and biased variance ``var_t = M2 / c`` (``c`` values per dimension:
    every spatial position of every sample weighs the same). Without a source the first batch
    sets the state and the next one is ``t = 1``. ``var`` is biased (``var_convention ==
    "biased"``); the average of the unbiased batch variances ``M2 / (c - 1)`` is kept as well for
    ``running_var("unbiased")`` (NaN once a batch of one value was fed). ``m0 = 1, decay = 1``
    gives the latest batch (prediction-time BN); ``m0 = m_min = 0`` keeps the source. A batch of
    one sample works. DecayingEMA cannot be merged (it depends on the order of the batches).

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> est = streamnorm.DecayingEMA(source=([0.0], [1.0]), m0=0.5, decay=0.5, m_min=0.0)
    >>> for x in ([[2.0], [2.0]], [[4.0], [4.0]]):
    ...     _ = est.update(streamnorm.moments(np.array(x)))
    >>> est.mean.tolist()                     # 0.5 * 2 = 1, then 0.75 * 1 + 0.25 * 4
    [1.75]
    """

    requires_source = False

    _param_names = ("m0", "decay", "m_min", "source_var")

    def __init__(
        self,
        source: Any = None,
        m0: float = 0.1,
        decay: float = 0.94,
        m_min: float = 0.005,
        source_var: str = "unbiased",
    ) -> None:
        self.m0 = check_fraction("m0", m0, low=0.0, high=1.0, closed="both")
        self.decay = check_fraction("decay", decay, low=0.0, high=1.0, closed="both")
        self.m_min = check_fraction("m_min", m_min, low=0.0, high=1.0, closed="both")
        super().__init__(source, source_var)

    def _init_state(self, D: int) -> None:
        src = self.source
        if src is not None and src.mean.size == D:
            self._mu = src.mean.copy()
            self._var_b = src.var.copy()
            self._var_u = src.var.copy()
        else:
            self._mu = np.zeros(D)
            self._var_b = np.zeros(D)
            self._var_u = np.zeros(D)
        self._t = 0

    def momentum(self, t: int) -> float:
        """The momentum of batch ``t`` (counted from 0 after the start)."""
        return max(self.m_min, self.m0 * self.decay**t)

    def _apply(
        self, n: np.ndarray, mu: np.ndarray, m2: np.ndarray, epochs: np.ndarray, uniform: bool
    ) -> None:
        for i in range(mu.shape[0]):
            c = np.broadcast_to(n[i], mu[i].shape)
            with np.errstate(divide="ignore", invalid="ignore"):
                vb = m2[i] / c
                vu = np.where(c > 1, m2[i] / (c - 1.0), np.nan)
            # without a source the first batch is the start
            m = 1.0 if self.source is None and self._t == 0 else self.momentum(self._t)
            self._mu = (1.0 - m) * self._mu + m * mu[i]
            self._var_b = (1.0 - m) * self._var_b + m * vb
            self._var_u = (1.0 - m) * self._var_u + m * vu
            self._t += 1

    def _mean_flat(self) -> np.ndarray:
        return self._mu.copy()

    def _var_flat(self, convention: str) -> np.ndarray:
        return (self._var_u if convention == "unbiased" else self._var_b).copy()

    def _state(self) -> dict[str, Any]:
        return self._with_source(
            {
                "mean": self._mu,
                "var_biased": self._var_b,
                "var_unbiased": self._var_u,
                "t": np.float64(self._t),
            }
        )

    def _set_state(self, d: Any, D: int) -> None:
        self._restore_source(d, D)
        self._mu = state_array(d, "mean", (D,))
        self._var_b = state_array(d, "var_biased", (D,))
        self._var_u = state_array(d, "var_unbiased", (D,))
        self._t = int(state_array(d, "t", (), integer=True))

    def merge(self, other: Estimator) -> Estimator:
        """Not possible: raises ``TypeError`` (the estimate depends on the batch order)."""
        raise TypeError(
            "a DecayingEMA cannot be merged: it depends on the order of the batches; use "
            "PriorPopulation for a mergeable online estimate"
        )
