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
from ..calibrate import CalibrationReport, LayerReport, Stats, input_of, layer_report
from ..torch import all_reduce_moments, bn_axes, bn_layers

torch = require("torch", "lightning")
pl = require("lightning.pytorch", "lightning")

from lightning.pytorch import Callback  # noqa: E402

__all__ = ["RecalibrateBN"]

#: the prefix of the metrics logged per layer (``<prefix>/<layer>/mean_shift`` and ``std_shift``)
METRIC_PREFIX = "recalibrate_bn"


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


def _batch_len(x: Any) -> int:
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    return 1


class _Frozen:
    """A model in calibration mode: everything in eval, the BatchNorm layers in training mode with
    momentum 0 (batch statistics normalize, buffers stay); :meth:`restore` puts back the modes,
    momenta and buffers exactly."""

    def __init__(self, model: Any, bns: list[tuple[str, Any]]) -> None:
        self.flags = [(m, m.training) for m in model.modules()]
        self.momenta = [(m, m.momentum) for _, m in bns]
        self.buffers = [
            (m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False)}) for _, m in bns
        ]
        model.eval()
        for _, m in bns:
            m.train()
            m.momentum = 0.0

    def restore_modes(self) -> None:
        for m, flag in self.flags:
            m.training = flag
        for m, p in self.momenta:
            m.momentum = p

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for m, saved in self.buffers:
                for k, b in m.named_buffers(recurse=False):
                    if k in saved:
                        b.copy_(saved[k])


class RecalibrateBN(Callback):
    """Re-estimate BatchNorm statistics exactly at the end of ``fit`` (and before validation).

    Parameters
    ----------
    num_samples : int, optional
        Samples to use, over all ranks together (each rank takes ``ceil(num_samples / world)``;
        the last batch is cut). All the data by default.
    dataloader : iterable, optional
        The calibration batches; by default the train dataloader (under DDP, Lightning already
        gives each rank its own part of it). A given ``DataLoader`` without a
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
        if dataloader is not None and (
            isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable)
        ):
            raise InputTypeError(
                "dataloader must be an iterable of batches (a DataLoader), got "
                f"{type(dataloader).__name__}"
            )
        self.dataloader = dataloader
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
        bns = [
            (n, m)
            for n, m in bn_layers(pl_module)
            if m.track_running_stats and m.running_mean is not None
        ]
        if not bns:
            return None
        loader = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if loader is None:
            raise InputError(
                "RecalibrateBN found no train dataloader to calibrate on; pass dataloader="
            )
        if not isinstance(loader, Iterable) or isinstance(loader, (dict, list, tuple)):
            raise InputTypeError(
                "RecalibrateBN needs one dataloader of batches; the trainer has "
                f"{type(loader).__name__} (several train dataloaders?): pass dataloader="
            )
        world = max(1, int(trainer.world_size))
        frozen = _Frozen(pl_module, bns)
        try:
            acc, samples, batches = self._collect(trainer, pl_module, bns, loader, world)
            report = self._write(trainer, pl_module, bns, acc, (samples, batches), frozen)
        except BaseException:
            frozen.restore_buffers()
            raise
        finally:
            frozen.restore_modes()
        self.reports.append(report)
        self._log(trainer, report)
        return report

    def _collect(
        self, trainer: Any, pl_module: Any, bns: list[tuple[str, Any]], loader: Any, world: int
    ) -> tuple[dict[str, Moments], int, int]:
        """This rank's moments of every layer's input, and its samples and batches."""
        acc = {name: Moments() for name, _ in bns}

        def make_hook(name: str) -> Callable[..., None]:
            def hook(module: Any, args: tuple[Any, ...]) -> None:
                x = args[0].detach()
                if x.dtype in (torch.float16, torch.bfloat16):
                    x = x.float()
                acc[name].update(x.cpu().numpy(), axis=bn_axes(x.ndim))

            return hook

        rank = int(trainer.global_rank)
        stride = 1 if world == 1 or self.dataloader is None or _is_sharded(loader) else world
        budget = None if self.num_samples is None else math.ceil(self.num_samples / world)
        precision = trainer.precision_plugin
        samples = batches = 0
        handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in bns]
        try:
            with torch.no_grad(), precision.forward_context():
                for i, batch in enumerate(loader):
                    if i % stride != rank % stride:
                        continue
                    batch = trainer.strategy.batch_to_device(batch)
                    if self.forward_fn is not None:
                        n = _batch_len(input_of(batch, self.input_key))
                        self.forward_fn(pl_module, batch)
                    else:
                        x = input_of(batch, self.input_key)
                        if budget is not None:
                            x = x[: budget - samples]
                        n = _batch_len(x)
                        pl_module(precision.convert_input(x))
                    samples += n
                    batches += 1
                    if budget is not None and samples >= budget:
                        break
        finally:
            for h in handles:
                h.remove()
        return acc, samples, batches

    def _write(
        self,
        trainer: Any,
        pl_module: Any,
        bns: list[tuple[str, Any]],
        acc: dict[str, Moments],
        seen: tuple[int, int],
        frozen: _Frozen,
    ) -> CalibrationReport:
        """Merge across ranks, check every layer, then write all of them."""
        distributed = (
            int(trainer.world_size) > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        )
        if distributed:
            acc = {name: all_reduce_moments(acc[name]) for name, _ in bns}
            counts = torch.tensor(seen, dtype=torch.float64, device=pl_module.device)
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            samples, batches = (int(round(float(c))) for c in counts.cpu())
        else:
            samples, batches = seen
        if samples == 0:
            raise InputError("RecalibrateBN got no data: the dataloader yielded no batch")
        staged = []
        for name, m in bns:
            mom = acc[name]
            if mom.shape is None:
                raise InputError(f"no batch reached BatchNorm layer {name!r} during calibration")
            n = float(np.min(np.asarray(mom.count)))
            if n < 2:
                raise InputError(
                    f"layer {name!r} saw {n:g} value(s) per channel; an unbiased variance needs "
                    "at least 2: give more samples"
                )
            mean = np.array(mom.mean, dtype=np.float64).reshape(-1)  # writable copies
            var = np.array(mom.var(ddof=1), dtype=np.float64).reshape(-1)
            if mean.shape != tuple(m.running_mean.shape):
                raise InputError(
                    f"the input of layer {name!r} has {mean.size} channels, the layer "
                    f"{m.running_mean.numel()}"
                )
            if not (np.isfinite(mean).all() and np.isfinite(var).all()):
                raise InputError(
                    f"the input of layer {name!r} has non-finite values (NaN/Inf); the "
                    "statistics were not changed"
                )
            staged.append((name, m, mean, var))
        reports: list[LayerReport] = []
        with torch.no_grad():
            for name, m, mean, var in staged:
                old = Stats(
                    m.running_mean.detach().double().cpu().numpy(),
                    m.running_var.detach().double().cpu().numpy(),
                )
                m.running_mean.copy_(torch.from_numpy(mean))
                m.running_var.copy_(torch.from_numpy(var))
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(batches)
                reports.append(
                    layer_report(name, samples, batches, old, Stats(mean, var), float(m.eps))
                )
        return CalibrationReport(reports, "population", "one-pass", samples, frozen.restore_buffers)

    def _log(self, trainer: Any, report: CalibrationReport) -> None:
        metrics: dict[str, float] = {}
        for x in report.layers:
            metrics[f"{METRIC_PREFIX}/{x.name}/mean_shift"] = x.max_mean_shift
            metrics[f"{METRIC_PREFIX}/{x.name}/std_shift"] = x.max_std_shift
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
