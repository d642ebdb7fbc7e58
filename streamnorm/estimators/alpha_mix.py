"""AlphaMix: alpha-BN, a fixed-weight mix of batch and source statistics (You et al. 2021)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validate import check_fraction
from ._base import Estimator
from ._source import SourcePooled, mix


class AlphaMix(SourcePooled, Estimator):
    """alpha-BN: ``alpha * batch + (1 - alpha) * source`` for the mean and the variance.

    Parameters
    ----------
    source : (array_like, array_like), optional
        The source ``(mean, var)``, shape ``(D...)`` each. Required before the first
        :meth:`update`; ``streamnorm.torch.adapt`` supplies each layer's buffers to a template
        built without it.
    alpha : float, default 0.1
        The batch's weight, in ``[0, 1]``: ``0`` keeps the source statistics, ``1`` gives the
        batch statistics alone (prediction-time BN).
    source_var : {"unbiased", "biased"}, default "unbiased"
        The convention of the source variance. The mix attaches no sample count to the source, so
        it is taken as the variance of the source population, where both conventions agree: the
        keyword records the convention and changes no value.

    Notes
    -----
    For a batch with mean ``mean_t`` and biased variance ``var_t = M2 / c`` (``c`` values per
    dimension: every spatial position of every sample weighs the same)::

        mean = alpha mean_t + (1 - alpha) mean_s
        var  = alpha var_t  + (1 - alpha) var_s

    ``var`` is biased (``var_convention == "biased"``), as a BatchNorm in training mode
    normalizes; ``running_var("unbiased")`` mixes ``M2 / (c - 1)`` instead (NaN for a batch of
    one value). The estimate depends on the latest batch only; before any batch it is the
    source. A batch of one sample works for ``alpha < 1``. AlphaMix cannot be merged.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> est = streamnorm.AlphaMix(source=([0.0], [1.0]), alpha=0.25)
    >>> _ = est.update(streamnorm.moments(np.array([[3.0], [5.0]])))   # mean 4, var 1
    >>> est.mean.tolist(), est.var.tolist()          # 0.25 * 4 + 0.75 * 0,  0.25 * 1 + 0.75 * 1
    ([1.0], [1.0])
    """

    latest = True

    _param_names = ("alpha", "source_var")

    def __init__(
        self, source: Any = None, alpha: float = 0.1, source_var: str = "unbiased"
    ) -> None:
        self.alpha = check_fraction("alpha", alpha, low=0.0, high=1.0, closed="both")
        super().__init__(source, source_var)

    def _mix(self, convention: str) -> tuple[np.ndarray, np.ndarray]:
        src = self._need_source()
        c = self._n
        w = np.where(c > 0, 1.0 - self.alpha, 1.0)
        ddof = 1.0 if convention == "unbiased" else 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            vt = np.where(c - ddof > 0, self._m2 / np.maximum(c - ddof, 1e-300), np.nan)
        vt = np.where(w == 1.0, 0.0, vt)
        return mix(w, src.mean, src.var, self._mu, vt, False)

    def _mean_flat(self) -> np.ndarray:
        return self._mix("biased")[0]

    def _var_flat(self, convention: str) -> np.ndarray:
        return self._mix(convention)[1]
