"""The pooled ``(count, mean, M2)`` state several estimators keep per dimension.

:class:`PooledState` is a mixin, listed before :class:`~streamnorm.estimators.Estimator` in a
class's bases (``class Population(PooledState, Estimator)``): only concrete estimators register
for :func:`~streamnorm.estimators.from_dict`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np

from .._kernels import chan_merge_into
from . import _kernels as EK
from ._base import Estimator, state_array

if TYPE_CHECKING:  # the type checker sees the estimator a mixin ends up in
    EstimatorMixin = Estimator
else:

    class EstimatorMixin:
        """Base of the estimator mixins: a plain class, so that a mixin does not register."""


class PooledState(EstimatorMixin):
    """Mixin: the state is one ``(count, mean, M2)`` triple per dimension, flat float64 arrays.

    With ``latest = False`` every batch is merged in exactly (Chan et al.): the triple holds the
    statistics of everything fed. With ``latest = True`` it holds the latest batch's alone.
    ``var`` is biased (``M2 / count``); the record stores the triple as ``n``, ``mean``, ``m2``.
    """

    #: keep only the latest batch (True) or pool every batch (False)
    latest: ClassVar[bool] = False

    def _clear_state(self) -> None:
        self._init_state(0)

    def _init_state(self, D: int) -> None:
        self._n = np.zeros(D)
        self._mu = np.zeros(D)
        self._m2 = np.zeros(D)

    def _apply(
        self, n: np.ndarray, mu: np.ndarray, m2: np.ndarray, epochs: np.ndarray, uniform: bool
    ) -> None:
        if self.latest:
            self._n = np.broadcast_to(n[-1], mu[-1].shape).astype(np.float64)
            self._mu = mu[-1].astype(np.float64)
            self._m2 = m2[-1].astype(np.float64)
        else:
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

    def _merge_pooled(self, other: PooledState) -> PooledState:
        """A new estimator with both inputs' triples merged exactly; the caller checked them."""
        self._sync()
        other._sync()
        out = cast(PooledState, self._merge_base(other))
        D = int(np.prod(out._shape, dtype=np.int64)) if out._shape is not None else 0
        out._init_state(D)
        for src in (self, other):
            if src._shape is not None:
                chan_merge_into(out._n, out._mu, out._m2, src._n, src._mu, src._m2)
        return out
