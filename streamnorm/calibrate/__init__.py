"""Framework-free calibration core: data streaming, per-layer estimators, scheduling, reports.

Recalibration re-estimates the statistics of a model's normalization layers from data. Everything
about it that does not depend on a framework lives here, and nothing here imports one:

- :class:`Stream` (``_data.py``): the batches of a calibration, from arrays, tensors, files
  (:func:`open_data`: ``.npy``, ``.npz``, folders and globs of shards, read batch by batch) or
  any iterable of batches, cut to ``num_samples``; the same batches on every pass, locally or
  shard by shard on a cluster;
- :class:`LayerStats` (``_stats.py``): a layer's statistics, which are an estimator of
  :mod:`streamnorm.estimators` (``"population"`` -> ``Population``, ``"cumulative"`` ->
  ``CumulativeAverage``, ``"ema"`` -> ``EMA`` continued from the stored statistics), plus the
  samples and batches seen; merged exactly across shards;
- :func:`calibrate` (``_run.py``): one-pass or sequential scheduling, local or on Dask
  (``_distributed.py``: :func:`map_merge`, :func:`get_client`);
- :class:`CalibrationReport` / :class:`LayerReport` (``_report.py``) and the progress bar;
- standard errors from the spread between batches (:class:`BatchSpread`, ``_spread.py``: per
  layer and channel ``mean_se`` and ``var_se``), ``num_samples="auto"`` (:func:`check_budget`,
  ``Settings.tol``: each pass stops once they are below ``tol``) and their plot
  (:func:`plot_samples`, ``_plot.py``).

Writing an adapter
------------------
A framework adapter implements the :class:`Adapter` protocol and nothing else:

``layers() -> list[NormLayer]``
    Find the norm layers. A :class:`NormLayer` says its ``name``, ``channels``, ``eps``, its
    variance convention (``"unbiased"`` for PyTorch's ``running_var``, ``"biased"`` for ONNX and
    Keras) and its ``channel_axis`` (every other axis of its input is reduced).
``run(batch, targets, emit)``
    Run the model on one batch and hand each target layer's input, as a numpy array, to the core
    with ``emit(name, x)``. Converting the batch (to a tensor, to the model's dtype) is the
    adapter's business.
``read(layer) -> Stats`` / ``write(layer, result: LayerResult)``
    Read a layer's stored ``(mean, var)`` (float64, its own convention), and store new ones
    (``result.continued`` says an EMA continued the stored statistics, so a batch counter adds
    up). Later batches must use what was written: sequential passes rely on it.
``sequential_passes(layers, first) -> list[list[NormLayer]]``
    The groups of layers for ``mode="sequential"``, in the order they must be calibrated (a
    layer after everything upstream of it): PyTorch runs ``first()`` (the first batch) with
    hooks to find the forward order (:func:`forward_order`); ONNX groups nodes by depth in the
    graph.
``remote() -> callable``
    A picklable factory that rebuilds the adapter, with the statistics written so far, on a Dask
    worker (used only with ``client=``).
``cursors(passes) -> context manager of start(batch) -> Cursor`` (optional)
    Sequential passes at about the cost of one (``_sequential.py``): a :class:`Cursor` keeps one
    batch's forward pass paused between passes and runs it on to the next pass's layers
    (PyTorch: a thread per batch, paused in the norm layers' pre-hooks; ONNX: the graph cut
    into one segment per pass). Without it, every sequential pass runs from the data.

An adapter that sees each layer's input during a forward pass (hooks, patched calls) derives
from :class:`WatchedAdapter`, which provides ``run`` and ``sequential_passes`` from one method
``call_model(batch, current)`` that runs the model and calls ``current.hand(name, x)``.

The adapter validates its own arguments, builds a :class:`Stream` (``Stream.of``) and
:class:`Settings` (``Settings.checked``), calls :func:`calibrate` and restores the model if it
raises. Two adapters never import each other; what they share belongs here.
"""

from ._data import Dataset, FileShard, Stream, input_of, iter_batches, open_data, shards
from ._distributed import get_client, map_merge, merge_results
from ._layers import ForwardPass, StopPass, WatchedAdapter, forward_order, select_layers
from ._plot import SampleCurve, plot_samples
from ._progress import progress_bar
from ._report import CalibrationReport, LayerReport, Stats, layer_report, skipped_layer
from ._run import (
    AUTO_MIN_BATCHES,
    MODES,
    Adapter,
    Emit,
    LayerResult,
    Settings,
    ShardJob,
    calibrate,
    check_budget,
    shard_pass,
)
from ._sequential import DEFAULT_CACHE_BYTES, Cursor
from ._spread import BatchSpread, Trace
from ._stats import ESTIMATORS, LayerStats, NormLayer, StatsSpec

__all__ = [
    "AUTO_MIN_BATCHES",
    "DEFAULT_CACHE_BYTES",
    "ESTIMATORS",
    "MODES",
    "Adapter",
    "BatchSpread",
    "CalibrationReport",
    "Cursor",
    "Dataset",
    "Emit",
    "FileShard",
    "ForwardPass",
    "LayerReport",
    "LayerResult",
    "LayerStats",
    "NormLayer",
    "SampleCurve",
    "Settings",
    "ShardJob",
    "Stats",
    "Stream",
    "StatsSpec",
    "StopPass",
    "Trace",
    "WatchedAdapter",
    "calibrate",
    "check_budget",
    "forward_order",
    "get_client",
    "input_of",
    "iter_batches",
    "layer_report",
    "map_merge",
    "merge_results",
    "open_data",
    "plot_samples",
    "progress_bar",
    "select_layers",
    "shards",
    "shard_pass",
    "skipped_layer",
]
