"""Test-time statistics under distribution shift: the corrupted-digits benchmark.

scikit-learn's bundled digits, corrupted deterministically in code (:func:`corrupt`, eight
corruption types at five severities), the digits CNN trained on clean data, and every test-time
estimator of :mod:`streamnorm.estimators` run through :func:`streamnorm.torch.adapt` at several
test batch sizes (:func:`run`), with a table, ``shift.json`` and ``shift.png``
(:func:`write_outputs`). The command line is ``streamnorm shift``.
"""

from __future__ import annotations

from ._corruptions import CORRUPTIONS, SEVERITIES, corrupt
from ._report import plot, table, write_json, write_outputs
from ._runner import BATCH_SIZES, ESTIMATORS, ShiftConfig, run, summarize

__all__ = [
    "BATCH_SIZES",
    "CORRUPTIONS",
    "ESTIMATORS",
    "SEVERITIES",
    "ShiftConfig",
    "corrupt",
    "plot",
    "run",
    "summarize",
    "table",
    "write_json",
    "write_outputs",
]
