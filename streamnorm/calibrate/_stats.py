"""Per-layer statistics of a calibration pass: an estimator object per layer, fed batch by batch.

Each layer's statistics ARE an estimator of :mod:`streamnorm.estimators`:

============== ========================================================================
estimator      object
============== ========================================================================
"population"   :class:`~streamnorm.Population`: exact pooled mean and variance
"cumulative"   :class:`~streamnorm.CumulativeAverage` (mean of batch variances), which is
               ``torch.optim.swa_utils.update_bn``
"ema"          :class:`~streamnorm.EMA` (PyTorch style), continued from the layer's stored
               statistics
============== ========================================================================

:class:`LayerStats` adds what a report needs (samples and batches seen) and merges exactly with
the statistics of another shard of the data (all but ``"ema"``, which depends on batch order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import InputError
from .._moments import moments
from .._validate import check_channel_axis, check_choice, check_momentum, check_var_convention
from ..estimators import EMA, CumulativeAverage, Estimator, Population
from ._report import Stats
from ._spread import BatchSpread

__all__ = ["ESTIMATORS", "LayerStats", "NormLayer", "StatsSpec"]

#: the estimators a recalibration can write into a model
ESTIMATORS = ("population", "cumulative", "ema")


@dataclass(frozen=True)
class NormLayer:
    """One normalization layer as an adapter describes it to the core.

    Attributes
    ----------
    name : str
        Unique within the model (a qualified module name, a graph node name).
    channels : int
        Length ``C`` of its statistics.
    eps : float
        Added to the variance when the layer normalizes (for the report's shifts in sigma).
    var_convention : {"unbiased", "biased"}, default "unbiased"
        What its stored variance means: PyTorch's ``running_var`` is unbiased, ONNX's and Keras'
        are biased.
    channel_axis : int, default 1
        The axis of the layer's input that holds the channels; every other axis is reduced.
    """

    name: str
    channels: int
    eps: float
    var_convention: str = "unbiased"
    channel_axis: int = 1

    def __post_init__(self) -> None:
        check_var_convention(self.var_convention, "var_convention")


@dataclass(frozen=True)
class StatsSpec:
    """Which estimator every layer gets.

    Attributes
    ----------
    estimator : {"population", "cumulative", "ema"}
    momentum : float, default 0.1
        PyTorch-style momentum of ``"ema"`` (the new batch's weight), in ``(0, 1]``.
    """

    estimator: str = "population"
    momentum: float = 0.1

    @classmethod
    def checked(cls, estimator: Any, momentum: Any) -> StatsSpec:
        """A spec from user arguments, or ``InputError`` / ``InputTypeError``."""
        return cls(check_choice("estimator", estimator, ESTIMATORS), check_momentum(momentum))

    def new(self, layer: NormLayer) -> Estimator:
        """A fresh estimator for ``layer``, in the layer's variance convention."""
        unbiased = layer.var_convention == "unbiased"
        if self.estimator == "population":
            return Population()
        if self.estimator == "cumulative":
            return CumulativeAverage(unbiased=unbiased)
        return EMA(self.momentum, unbiased=unbiased)


@dataclass
class LayerStats:
    """One layer's estimator plus the samples and batches that reached the layer.

    Attributes
    ----------
    name : str
    estimator : Estimator
    start : Stats, optional
        For an :class:`~streamnorm.EMA`: the stored statistics it continues from (see
        :meth:`result`).
    samples, batches : int
        Batch items and batches fed.
    spread : BatchSpread, optional
        The per-batch moments behind the standard errors (not kept for an EMA, whose error
        does not shrink with more data).
    """

    name: str
    estimator: Estimator
    start: Stats | None = None
    samples: int = 0
    batches: int = 0
    spread: BatchSpread | None = field(default=None, repr=False)

    @classmethod
    def new(cls, layer: NormLayer, spec: StatsSpec, start: Stats | None = None) -> LayerStats:
        """Empty statistics for ``layer``; ``start`` (its stored statistics) is kept for EMA."""
        est = spec.new(layer)
        if isinstance(est, EMA):
            return cls(layer.name, est, start)
        return cls(layer.name, est, spread=BatchSpread(layer.var_convention == "unbiased"))

    @property
    def kind(self) -> str:
        """The estimator's name in :data:`ESTIMATORS`."""
        if isinstance(self.estimator, EMA):
            return "ema"
        return "cumulative" if isinstance(self.estimator, CumulativeAverage) else "population"

    def errors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean_se, var_se)`` per channel (see :mod:`streamnorm.calibrate._spread`); NaN for
        an EMA or fewer than 2 batches, empty before any batch."""
        if self.spread is None:
            c = int(np.asarray(self.estimator.mean).size) if self.batches else 0
            return np.full(c, np.nan), np.full(c, np.nan)
        return self.spread.errors(self.kind)

    def add(self, x: np.ndarray, channel_axis: int = 1) -> None:
        """Feed one batch of the layer's input, shape ``(N, ..., C, ...)``, channels on
        ``channel_axis`` (negative counts from the end)."""
        channel_axis = check_channel_axis(channel_axis, x.ndim, self.name)
        axes = tuple(i for i in range(x.ndim) if i != channel_axis)
        channels = x.shape[channel_axis]
        per_channel = x.size // channels if channels else 0
        if per_channel < self.estimator.min_batch_count:
            raise InputError(
                f"layer {self.name!r} got a batch with a single value per channel, whose "
                "unbiased variance is undefined; use batches of at least 2 samples (or "
                "estimator='population')"
            )
        batch = moments(x, axis=axes)
        self.estimator.update(batch)
        if self.spread is not None:
            self.spread.add(int(x.shape[0]), per_channel, batch.mean, batch.m2)
        self.samples += int(x.shape[0])
        self.batches += 1

    def merge(self, other: LayerStats) -> LayerStats:
        """The statistics of both shards (exact; ``TypeError`` for an EMA). Inputs unchanged."""
        if other.batches == 0:
            return self._copy()
        if self.batches == 0:
            return other._copy()
        spread = None
        if self.spread is not None and other.spread is not None:
            spread = self.spread.merge(other.spread)
        return LayerStats(
            self.name,
            self.estimator.merge(other.estimator),
            self.start,
            self.samples + other.samples,
            self.batches + other.batches,
            spread,
        )

    def _copy(self) -> LayerStats:
        spread = None if self.spread is None else self.spread.copy()
        return LayerStats(
            self.name, self.estimator.copy(), self.start, self.samples, self.batches, spread
        )

    def result(self, layer: NormLayer) -> Stats:
        """The layer's new statistics in its variance convention, checked.

        Raises ``InputError`` for non-finite values (NaN/Inf in the layer's input), a population
        with fewer than 2 values per channel for an unbiased variance, or a channel count that
        is not the layer's.

        Notes
        -----
        An EMA started at ``(0, 1)`` and one started at ``start`` differ, after ``t`` batches, by
        ``decay**t * (start - (0, 1))`` exactly (the update is linear), so the estimator runs
        from its own start and the difference is added here.
        """
        est = self.estimator
        if isinstance(est, Population) and layer.var_convention == "unbiased":
            n = float(np.min(np.asarray(est.count)))
            if n < 2:
                raise InputError(
                    f"layer {self.name!r} saw {n:g} value(s) per channel; an unbiased variance "
                    "needs at least 2: give more samples"
                )
        if isinstance(est, EMA):
            mean, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in est.state)
            if self.start is not None:
                w = (1.0 - est.momentum) ** self.batches
                mean = mean + w * self.start.mean
                var = var + w * (self.start.var - 1.0)
        else:
            mean = np.asarray(est.mean, dtype=np.float64).reshape(-1)
            var = np.asarray(est.running_var(layer.var_convention), dtype=np.float64).reshape(-1)
        if mean.shape != (layer.channels,):
            raise InputError(
                f"the input of layer {self.name!r} has {mean.size} channels, the layer "
                f"{layer.channels}"
            )
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise InputError(
                f"the input of layer {self.name!r} has non-finite values (NaN/Inf); check the "
                "data and the model (statistics were not changed)"
            )
        return Stats(mean, var)
