"""streamnorm: fast, exact BatchNorm test-time statistics.

Per-dimension moments of batches with parallel Numba kernels, mergeable states, several test-time
estimators at once, and offline recalibration of saved models.
"""

from ._moments import Moments, moments

__version__ = "0.1.0"

__all__ = [
    "Moments",
    "__version__",
    "moments",
]
