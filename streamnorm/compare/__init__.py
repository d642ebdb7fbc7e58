"""Compare BatchNorm test-time estimators on a real training run.

:func:`compare` trains the small digits CNN (:mod:`streamnorm.digits`) with PyTorch on the CPU
while a :class:`streamnorm.Tracker` feeds every BatchNorm input to all estimators at once,
computes the ground truth with the final weights, and scores every estimator: normalized mean
error, log variance ratio, their noise over the last steps and across seeds, and the test
accuracy with the estimator's statistics loaded. :class:`CompareResult` prints the table and
writes ``compare.json`` and ``compare.png``.

The modules: ``metrics`` (errors against the truth), ``truth`` (:func:`ground_truth`),
``settings`` (the checked settings and the named estimators), ``runner`` (one training run per
seed), ``report`` (:class:`CompareResult`: summary, table, JSON, plot) and ``experiment``
(:func:`compare` itself).
"""

from __future__ import annotations

from .experiment import compare
from .metrics import layer_errors
from .report import CompareResult
from .truth import ground_truth

__all__ = ["CompareResult", "compare", "ground_truth", "layer_errors"]
