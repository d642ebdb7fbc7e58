"""Test-time estimators of BatchNorm statistics, fed per-batch :class:`~streamnorm.Moments`.

=====================  ======================================================================
estimator              estimate
=====================  ======================================================================
:class:`Population`    exact pooled mean/variance of everything fed (the whole-dataset truth)
:class:`EMA`           exponential moving average (PyTorch, Keras and ONNX styles)
:class:`CumulativeAverage`  equal weight per batch (PyTorch ``momentum=None``, ``update_bn``)
:class:`WindowedAverage`    average over the middle epochs, dropping the first and last ones
=====================  ======================================================================

All share one protocol: ``update(batch, *, epoch=0) -> self``; ``mean``, ``var`` (with
``var_convention`` saying whether ``var`` is biased or unbiased, and ``running_var(convention)``
converting); ``count``, ``batches``; ``reset()``; ``to_dict()`` / :func:`from_dict`; ``merge``
where it is meaningful (not for :class:`EMA`).
"""

from __future__ import annotations

from typing import Any

from ._base import CONVENTIONS, Estimator, from_dict
from .alpha_mix import AlphaMix
from .batch import BatchStats
from .cumulative import CumulativeAverage
from .decaying_ema import DecayingEMA
from .ema import EMA
from .population import Population
from .prior_mix import PriorMix
from .prior_population import PriorPopulation
from .windowed import WindowedAverage


def default_estimators() -> dict[str, Any]:
    """The default set, with common settings (fresh objects on every call).

    ``population``: :class:`Population`; ``ema``: PyTorch's default (``EMA(0.1, style="torch")``);
    ``ema_keras``: Keras' default (``EMA(0.99, style="keras", unbiased=False)``); ``cumulative``:
    PyTorch's ``momentum=None``; ``windowed``: the middle half of the epochs, pooled.
    """
    return {
        "population": Population(),
        "ema": EMA(0.1, style="torch"),
        "ema_keras": EMA(0.99, style="keras", unbiased=False),
        "cumulative": CumulativeAverage(),
        "windowed": WindowedAverage(),
    }


__all__ = [
    "CONVENTIONS",
    "EMA",
    "AlphaMix",
    "BatchStats",
    "CumulativeAverage",
    "DecayingEMA",
    "Estimator",
    "Population",
    "PriorMix",
    "PriorPopulation",
    "WindowedAverage",
    "default_estimators",
    "from_dict",
]
