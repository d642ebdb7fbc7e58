"""What a recalibration did, per layer: :class:`LayerReport` and :class:`CalibrationReport`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .._errors import InputError

__all__ = ["CalibrationReport", "LayerReport", "Stats", "layer_report"]


@dataclass(frozen=True)
class Stats:
    """A layer's stored statistics in its own variance convention.

    Attributes
    ----------
    mean, var : numpy.ndarray, shape (C,), float64
    """

    mean: np.ndarray
    var: np.ndarray


@dataclass
class LayerReport:
    """What calibration did to one BatchNorm layer.

    Attributes
    ----------
    name : str
        Qualified module name (PyTorch) or node name (ONNX).
    samples : int
        Samples (batch items) whose activations reached the layer.
    batches : int
        Batches that reached the layer.
    channels : int
    mean_shift : numpy.ndarray, shape (C,)
        ``|new mean - old mean| / old sigma`` per channel, ``old sigma = sqrt(old var + eps)``.
    std_shift : numpy.ndarray, shape (C,)
        ``|new sigma - old sigma| / old sigma`` per channel.
    """

    name: str
    samples: int
    batches: int
    channels: int
    mean_shift: np.ndarray
    std_shift: np.ndarray

    @property
    def max_mean_shift(self) -> float:
        return float(np.max(self.mean_shift)) if self.mean_shift.size else 0.0

    @property
    def max_std_shift(self) -> float:
        return float(np.max(self.std_shift)) if self.std_shift.size else 0.0


def layer_report(
    name: str, samples: int, batches: int, old: Stats, new: Stats, eps: float
) -> LayerReport:
    """The shifts of one layer from ``old`` to ``new`` statistics, in units of its old sigma."""
    old_sigma = np.sqrt(np.maximum(old.var, 0.0) + eps)
    new_sigma = np.sqrt(np.maximum(new.var, 0.0) + eps)
    return LayerReport(
        name=name,
        samples=int(samples),
        batches=int(batches),
        channels=int(old.mean.size),
        mean_shift=np.abs(new.mean - old.mean) / old_sigma,
        std_shift=np.abs(new_sigma - old_sigma) / old_sigma,
    )


@dataclass
class CalibrationReport:
    """Per-layer summary of a recalibration; :meth:`restore` undoes it.

    Attributes
    ----------
    layers : list of LayerReport
        In the order the layers were calibrated.
    estimator, mode : str
    samples : int
        Samples used (after ``num_samples``).
    undo : callable, optional
        Puts the old statistics back (set for models changed in place, such as PyTorch
        modules; ``None`` when the calibration wrote a new file).
    """

    layers: list[LayerReport]
    estimator: str
    mode: str
    samples: int
    undo: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; layers are {[x.name for x in self.layers]}")

    def __len__(self) -> int:
        return len(self.layers)

    def restore(self) -> None:
        """Put back the statistics the layers had before calibration (PyTorch models).

        An ONNX calibration never modified its input file, so there is nothing to undo there and
        this raises ``ValueError``.
        """
        if self.undo is None:
            raise InputError(
                "nothing to restore: this calibration wrote a new file (ONNX) and left the input "
                "model unchanged; keep using the input file to undo it"
            )
        self.undo()

    def table(self) -> str:
        """A plain-text table: layer, samples, batches, largest mean and std shift (in sigma)."""
        head = ("layer", "samples", "batches", "max |dmean|/sigma", "max |dsigma|/sigma")
        rows = [_row(x) for x in self.layers]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"recalibrated {len(self.layers)} BatchNorm layer(s) from {self.samples} samples "
            f"(estimator={self.estimator}, mode={self.mode})\n{self.table()}"
        )


def _row(x: LayerReport) -> tuple[str, ...]:
    return (
        x.name,
        str(x.samples),
        str(x.batches),
        f"{x.max_mean_shift:.4g}",
        f"{x.max_std_shift:.4g}",
    )
