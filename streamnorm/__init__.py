"""streamnorm: fast, exact BatchNorm test-time statistics.

Per-dimension moments of batches with parallel Numba kernels, mergeable states, several test-time
estimators at once, and offline recalibration of saved models.
"""

from ._moments import Moments, moments
from ._normalize import normalize
from ._tracker import Tracker
from .estimators import (
    EMA,
    AlphaMix,
    BatchStats,
    CumulativeAverage,
    DecayingEMA,
    Population,
    PriorMix,
    PriorPopulation,
    WindowedAverage,
)

__version__ = "0.1.0"

__all__ = [
    "AlphaMix",
    "BatchStats",
    "CumulativeAverage",
    "DecayingEMA",
    "EMA",
    "Moments",
    "Population",
    "PriorMix",
    "PriorPopulation",
    "Tracker",
    "WindowedAverage",
    "__version__",
    "moments",
    "normalize",
]
