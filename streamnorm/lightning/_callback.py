""":class:`RecalibrateBN`: exact BatchNorm statistics at the end of a Lightning ``fit``.

Each rank runs its share of the calibration batches through the LightningModule (every module in
eval mode, the BatchNorm layers normalizing by batch statistics with their buffers frozen, as
``streamnorm.torch.recalibrate(..., mode="one-pass")``), accumulates each layer's input moments
locally, and the ranks merge them exactly with :func:`streamnorm.torch.all_reduce_moments`, so
that every rank writes the same statistics: those of all the data the ranks saw together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .._errors import InputError, InputTypeError
from .._extras import require
from .._moments import Moments
from .._validate import check_bool, check_callable, check_optional_positive_int
from ..calibrate import (
    CalibrationReport,
    LayerReport,
    LayerResult,
    LayerStats,
    StatsSpec,
    input_of,
    layer_report,
)
from ..estimators import Population
from ..torch import all_reduce_moments, bn_layers
from ..torch._calibrate import Forward, Snapshot, TorchAdapter, configure, norm_list

torch = require("torch", "lightning")
pl = require("lightning.pytorch", "lightning")

from lightning.pytorch import Callback  # noqa: E402

__all__ = ["RecalibrateBN"]

#: the prefix of the metrics logged per layer (``<prefix>/<layer>/mean_shift`` and ``std_shift``)
METRIC_PREFIX = "recalibrate_bn"

#: every layer's statistics: the exact population, written unbiased
_POPULATION = StatsSpec("population")


def _averaging_callbacks() -> tuple[type, ...]:
    """Lightning's weight-averaging callbacks (``WeightAveraging`` exists from Lightning 2.5)."""
    cbs = pl.callbacks
    names = ("StochasticWeightAveraging", "WeightAveraging")
    return tuple(getattr(cbs, n) for n in names if isinstance(getattr(cbs, n, None), type))


def _is_sharded(loader: Any) -> bool:
    """A ``DataLoader`` whose sampler already gives each rank its own part of the data."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    dist_sampler = torch.utils.data.DistributedSampler
    return isinstance(sampler, dist_sampler) or isinstance(inner, dist_sampler)


def _call_module(model: Any, x: Any) -> None:
    """The default forward: the module on the batch's (converted) input."""
    model(x)


def _all_reduce(st: LayerStats) -> LayerStats:
    """The statistics of all ranks together (the same on every rank); ``batches`` is 0 when no
    rank saw the layer."""
    est = st.estimator
    local = est.moments if isinstance(est, Population) and st.batches else Moments()
    merged = all_reduce_moments(local)
    if merged.shape is None:
        return LayerStats(st.name, Population())
    return LayerStats(st.name, Population().update(merged), batches=1)


def _check_dataloader(dataloader: Any) -> Any:
    """``dataloader`` if it is one iterable of batches (a ``DataLoader``, or a list of batches).

    Checked when the callback is built, so that a wrong one fails before training, not at the
    end of ``fit``.
    """
    if dataloader is None:
        return None
    if (
        isinstance(dataloader, (str, bytes, dict))
        or not isinstance(dataloader, Iterable)
        or isinstance(dataloader, torch.Tensor)
    ):
        raise InputTypeError(
            "dataloader must be one iterable of batches: a torch DataLoader, or a list of "
            f"batches such as [(x, y), ...] or [x, ...]; got {type(dataloader).__name__}"
        )
    if isinstance(dataloader, (list, tuple)):
        if not dataloader:
            raise InputError("dataloader is an empty list: it holds no batch to calibrate on")
        if any(isinstance(b, torch.utils.data.DataLoader) for b in dataloader):
            raise InputTypeError(
                "dataloader must be one iterable of batches, got a list of DataLoaders; pass "
                "the one to calibrate on (RecalibrateBN(dataloader=loaders[0]))"
            )
    return dataloader


def _batch_len(x: Any) -> int:
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    return 1


class RecalibrateBN(Callback):
    """Re-estimate BatchNorm statistics exactly at the end of ``fit`` (and before validation).

    Parameters
    ----------
    num_samples : int, optional
        Samples to use, over all ranks together (each rank takes ``ceil(num_samples / world)``;
        the last batch is cut). All the data by default.
    dataloader : iterable, optional
        The calibration batches: one ``DataLoader`` or a list of batches (``[(x, y), ...]``),
        checked when the callback is built; by default the train dataloader (under DDP,
        Lightning already gives each rank its own part of it). A given ``DataLoader`` without a
        ``DistributedSampler`` is split by batch: rank ``r`` of ``w`` takes batches ``r, r+w,
        ...``, so every rank must iterate it in the same order.
    every_validation : bool, default False
        Also recalibrate before each validation epoch during ``fit`` (not during the sanity
        check), so that validation sees exact statistics of the current weights.
    forward_fn : callable, optional
        ``forward_fn(pl_module, batch)`` runs the model on a batch (already on the device); by
        default ``pl_module(input)`` with the input found as in
        :func:`streamnorm.calibrate.input_of` (the batch, its first item, or a dict entry).
    input_key : str, optional
        The input's key in dict batches (see :func:`streamnorm.calibrate.input_of`).

    Attributes
    ----------
    reports : list of CalibrationReport
        One per recalibration, in order; ``reports[-1]`` (also :attr:`report`) is the last.

    Notes
    -----
    The statistics are those of :class:`~streamnorm.Population`: the exact pooled mean and the
    unbiased pooled variance (PyTorch's ``running_var`` convention) of every value each layer
    received, computed as in ``streamnorm.torch.recalibrate(model, data, mode="one-pass")``: the
    model in eval mode (dropout off), the BatchNorm layers normalizing by batch statistics. Under
    DDP each rank feeds its part and the per-layer moments are merged exactly with
    :func:`streamnorm.torch.all_reduce_moments` (counts, means and M2, by the law of total
    variance; averaging the ranks' variances would ignore the spread of their means), so every
    rank ends with the same buffers, bit for bit. With ``SyncBatchNorm`` every rank must run the
    same number of batches (true for the train dataloader with a ``num_samples`` budget).

    At the end of training the callback runs in ``on_train_end`` after Lightning's
    ``StochasticWeightAveraging`` and ``WeightAveraging`` callbacks (it moves itself behind them
    in ``setup``), so it recalibrates the averaged weights they have put into the module, not the
    live ones. ``num_batches_tracked`` becomes the number of batches used (all ranks).

    The report's standard errors come from the spread between batches, as in
    ``streamnorm.torch.recalibrate``; under DDP (the ranks' moments merged into one) they are NaN.

    For each layer, the largest shift of the mean and of the standard deviation, in units of the
    old standard deviation, is logged to the trainer's loggers as
    ``recalibrate_bn/<layer>/mean_shift`` and ``recalibrate_bn/<layer>/std_shift``.

    Examples
    --------
    >>> from streamnorm.lightning import RecalibrateBN                     # doctest: +SKIP
    >>> trainer = Trainer(callbacks=[RecalibrateBN(num_samples=8192)])     # doctest: +SKIP
    """

    def __init__(
        self,
        num_samples: int | None = None,
        dataloader: Iterable[Any] | None = None,
        every_validation: bool = False,
        *,
        forward_fn: Callable[[Any, Any], Any] | None = None,
        input_key: str | None = None,
    ) -> None:
        super().__init__()
        self.num_samples = check_optional_positive_int("num_samples", num_samples)
        self.dataloader = _check_dataloader(dataloader)
        self.every_validation = check_bool("every_validation", every_validation)
        self.forward_fn = check_callable("forward_fn", forward_fn)
        if input_key is not None and not isinstance(input_key, str):
            raise InputTypeError(f"input_key must be a str, got {type(input_key).__name__}")
        self.input_key = input_key
        self.reports: list[CalibrationReport] = []

    @property
    def report(self) -> CalibrationReport | None:
        """The report of the last recalibration (``None`` before the first)."""
        return self.reports[-1] if self.reports else None

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Move this callback behind the weight-averaging callbacks, so that at the end of
        training it sees the averaged weights."""
        cbs = list(trainer.callbacks)
        kinds = _averaging_callbacks()
        last = max((i for i, cb in enumerate(cbs) if isinstance(cb, kinds)), default=-1)
        me = next((i for i, cb in enumerate(cbs) if cb is self), -1)
        if 0 <= me < last:
            cbs.insert(last, cbs.pop(me))
            # a new list: the trainer may be iterating over the old one (calling setup)
            trainer.callbacks = cbs

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.recalibrate(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.every_validation or trainer.sanity_checking:
            return
        if trainer.state.fn != "fit":
            return
        self.recalibrate(trainer, pl_module)

    # ----------------------------------------------------------------------------------------
    # the work

    def recalibrate(self, trainer: Any, pl_module: Any) -> CalibrationReport | None:
        """Recalibrate ``pl_module`` now (on every rank at once under DDP).

        Returns
        -------
        CalibrationReport or None
            ``None`` when the module has no BatchNorm layer with running statistics.
        """
        bns = {name for name, _ in bn_layers(pl_module)}
        found = [layer for layer in norm_list(pl_module) if layer[0] in bns]
        if not found:
            return None
        loader = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if loader is None:
            raise InputError(
                "RecalibrateBN found no train dataloader to calibrate on; pass dataloader="
            )
        if self.dataloader is None and (
            not isinstance(loader, Iterable) or isinstance(loader, (dict, list, tuple))
        ):
            raise InputTypeError(
                "RecalibrateBN needs one dataloader of batches; the trainer has "
                f"{type(loader).__name__} (several train dataloaders?): pass dataloader="
            )
        world = max(1, int(trainer.world_size))
        snap = Snapshot(pl_module, found)
        try:
            configure(pl_module, found, one_pass=True)
            call = self.forward_fn if self.forward_fn is not None else _call_module
            adapter = TorchAdapter(pl_module, found, Forward(forward_fn=call), snap.base)
            stats, samples, batches = self._collect(trainer, adapter, loader, world)
            report = self._write(trainer, adapter, stats, (samples, batches), snap)
        except BaseException:
            snap.restore_buffers()
            raise
        finally:
            snap.restore_modes()
        self.reports.append(report)
        self._log(trainer, report)
        return report

    def _collect(
        self, trainer: Any, adapter: TorchAdapter, loader: Any, world: int
    ) -> tuple[dict[str, LayerStats], int, int]:
        """This rank's statistics of every layer's input, and its samples and batches."""
        layers = adapter.layers()
        stats = {x.name: LayerStats.new(x, _POPULATION) for x in layers}
        axis = {x.name: x.channel_axis for x in layers}

        def emit(name: str, x: np.ndarray) -> None:
            stats[name].add(x, axis[name])

        rank = int(trainer.global_rank)
        stride = 1 if world == 1 or self.dataloader is None or _is_sharded(loader) else world
        budget = None if self.num_samples is None else math.ceil(self.num_samples / world)
        precision = trainer.precision_plugin
        samples = batches = 0
        with torch.no_grad(), precision.forward_context():
            for i, batch in enumerate(loader):
                if i % stride != rank % stride:
                    continue
                batch = trainer.strategy.batch_to_device(batch)
                if self.forward_fn is not None:
                    n = _batch_len(input_of(batch, self.input_key))
                else:
                    x = input_of(batch, self.input_key)
                    if budget is not None:
                        x = x[: budget - samples]
                    n = _batch_len(x)
                    batch = precision.convert_input(x)
                adapter.run(batch, layers, emit)
                samples += n
                batches += 1
                if budget is not None and samples >= budget:
                    break
        return stats, samples, batches

    def _write(
        self,
        trainer: Any,
        adapter: TorchAdapter,
        stats: dict[str, LayerStats],
        seen: tuple[int, int],
        snap: Snapshot,
    ) -> CalibrationReport:
        """Merge across ranks, check every layer, then write all of them."""
        distributed = (
            int(trainer.world_size) > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        )
        if distributed:
            stats = {name: _all_reduce(st) for name, st in stats.items()}
            counts = torch.tensor(seen, dtype=torch.float64, device=adapter.model.device)
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            samples, batches = (int(round(float(c))) for c in counts.cpu())
        else:
            samples, batches = seen
        if samples == 0:
            raise InputError("RecalibrateBN got no data: the dataloader yielded no batch")
        staged = []
        for x in adapter.layers():
            if not stats[x.name].batches:
                raise InputError(f"no batch reached BatchNorm layer {x.name!r} during calibration")
            staged.append((x, stats[x.name].result(x)))
        reports: list[LayerReport] = []
        for x, new in staged:
            old = adapter.read(x)
            adapter.write(x, LayerResult(new.mean, new.var, samples, batches, continued=False))
            st = stats[x.name]  # standard errors from the spread between batches, as recalibrate
            reports.append(
                layer_report(
                    x.name, samples, batches, old, new, x.eps, se=st.errors(), spread=st.spread
                )
            )
        return CalibrationReport(reports, "population", "one-pass", samples, snap.restore_buffers)

    def _log(self, trainer: Any, report: CalibrationReport) -> None:
        metrics: dict[str, float] = {}
        for x in report.layers:
            metrics[f"{METRIC_PREFIX}/{x.name}/mean_shift"] = x.max_mean_shift
            metrics[f"{METRIC_PREFIX}/{x.name}/std_shift"] = x.max_std_shift
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
