"""What a recalibration did, per layer: :class:`LayerReport` and :class:`CalibrationReport`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .._errors import InputError
from ._spread import BatchSpread, Trace

__all__ = [
    "NO_DATA",
    "RECALIBRATED",
    "SKIPPED",
    "CalibrationReport",
    "LayerReport",
    "Stats",
    "layer_report",
    "skipped_layer",
]

#: :attr:`LayerReport.status` of a layer whose statistics were re-estimated and written
RECALIBRATED = "recalibrated"
#: :attr:`LayerReport.status` of a layer left as it was (:attr:`LayerReport.reason` says why)
SKIPPED = "skipped"
#: the reason of a layer no batch reached (a branch the model does not run in eval mode)
NO_DATA = "no data reached it"


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
    mean_se : numpy.ndarray, shape (C,)
        Standard error of the new mean in units of the channel's estimated standard deviation,
        from the spread between batches (see :mod:`streamnorm.calibrate._spread`); NaN where it
        is not defined (an EMA, a single batch), empty when not computed.
    var_se : numpy.ndarray, shape (C,)
        Standard error of the new variance relative to it (same conventions).
    spread : BatchSpread, optional
        The per-batch moments behind ``mean_se`` / ``var_se`` (for :meth:`trace`).
    estimator : str
        The estimator the errors refer to.
    status : {"recalibrated", "skipped"}
        ``"skipped"``: the layer's statistics were left as they were (shifts 0, no errors).
    reason : str
        Why a layer was skipped (``""`` when recalibrated): ``"no data reached it"`` (a branch
        the model does not run in eval mode, such as inception_v3's auxiliary head), or what
        the framework adapter found (no statistics to write, an unregistered class).
    kind : str, default "BatchNorm"
        What the layer is: ``"BatchNorm"`` (a norm layer or node), or ``"folded"`` (an ONNX
        Conv / Gemm whose folded BatchNorm was adapted by moment matching).
    """

    name: str
    samples: int
    batches: int
    channels: int
    mean_shift: np.ndarray
    std_shift: np.ndarray
    mean_se: np.ndarray = field(default_factory=lambda: np.zeros(0))
    var_se: np.ndarray = field(default_factory=lambda: np.zeros(0))
    spread: BatchSpread | None = field(default=None, repr=False, compare=False)
    estimator: str = field(default="population", repr=False, compare=False)
    status: str = RECALIBRATED
    reason: str = ""
    kind: str = field(default="BatchNorm", compare=False)

    @property
    def skipped(self) -> bool:
        """The layer's statistics were left as they were (see :attr:`reason`)."""
        return self.status != RECALIBRATED

    def trace(self) -> Trace | None:
        """The largest standard errors and deviations from the final estimate after every
        prefix of the data (``None`` without a spread); costs ``O(K^2 C)`` for ``K`` clusters."""
        return None if self.spread is None else self.spread.trace(self.estimator)

    @property
    def max_mean_shift(self) -> float:
        return float(np.max(self.mean_shift)) if self.mean_shift.size else 0.0

    @property
    def max_std_shift(self) -> float:
        return float(np.max(self.std_shift)) if self.std_shift.size else 0.0

    @property
    def max_mean_se(self) -> float:
        """Largest ``mean_se`` over channels (NaN when not defined)."""
        return _nanmax(self.mean_se)

    @property
    def max_var_se(self) -> float:
        """Largest ``var_se`` over channels (NaN when not defined)."""
        return _nanmax(self.var_se)


def _nanmax(a: np.ndarray) -> float:
    if a.size == 0 or np.all(np.isnan(a)):
        return float("nan")
    return float(np.nanmax(a))


def layer_report(
    name: str,
    samples: int,
    batches: int,
    old: Stats,
    new: Stats,
    eps: float,
    *,
    se: tuple[np.ndarray, np.ndarray] | None = None,
    spread: BatchSpread | None = None,
    estimator: str = "population",
) -> LayerReport:
    """The shifts of one layer from ``old`` to ``new`` statistics, in units of its old sigma;
    ``se``: its ``(mean_se, var_se)``, ``spread``: where they come from. A layer no sample
    reached is marked skipped (:data:`NO_DATA`): the core writes nothing to it."""
    old_sigma = np.sqrt(np.maximum(old.var, 0.0) + eps)
    new_sigma = np.sqrt(np.maximum(new.var, 0.0) + eps)
    mean_se, var_se = se if se is not None else (np.zeros(0), np.zeros(0))
    return LayerReport(
        name=name,
        samples=int(samples),
        batches=int(batches),
        channels=int(old.mean.size),
        mean_shift=np.abs(new.mean - old.mean) / old_sigma,
        std_shift=np.abs(new_sigma - old_sigma) / old_sigma,
        mean_se=np.asarray(mean_se, dtype=np.float64),
        var_se=np.asarray(var_se, dtype=np.float64),
        spread=spread,
        estimator=estimator,
        status=SKIPPED if samples == 0 else RECALIBRATED,
        reason=NO_DATA if samples == 0 else "",
    )


def skipped_layer(name: str, channels: int, reason: str) -> LayerReport:
    """The report of a layer calibration left out before it started (``reason`` says why)."""
    return LayerReport(
        name=name,
        samples=0,
        batches=0,
        channels=int(channels),
        mean_shift=np.zeros(0),
        std_shift=np.zeros(0),
        mean_se=np.zeros(0),
        var_se=np.zeros(0),
        status=SKIPPED,
        reason=reason,
    )


@dataclass
class CalibrationReport:
    """Per-layer summary of a recalibration; :meth:`restore` undoes it.

    Attributes
    ----------
    layers : list of LayerReport
        In the order the layers were calibrated; layers left as they were come with
        ``status="skipped"`` and a ``reason`` (see :attr:`skipped`).
    estimator, mode : str
    samples : int
        Samples used (after ``num_samples``; with ``num_samples="auto"`` the samples the
        standard errors needed, the largest over the passes).
    undo : callable, optional
        Puts the old statistics back (set for models changed in place, such as PyTorch
        modules; ``None`` when the calibration wrote a new file).
    tol : float, optional
        The tolerance of ``num_samples="auto"`` (``None`` otherwise).
    converged : bool, optional
        With ``num_samples="auto"``: every channel's standard errors fell below ``tol``
        (``False``: the data ended first).
    """

    layers: list[LayerReport]
    estimator: str
    mode: str
    samples: int
    undo: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    tol: float | None = None
    converged: bool | None = None

    @property
    def max_mean_se(self) -> float:
        """Largest ``mean_se`` over layers and channels (NaN when not defined)."""
        return _nanmax(np.array([x.max_mean_se for x in self.layers]))

    @property
    def max_var_se(self) -> float:
        """Largest ``var_se`` over layers and channels (NaN when not defined)."""
        return _nanmax(np.array([x.max_var_se for x in self.layers]))

    @property
    def skipped(self) -> list[LayerReport]:
        """The layers whose statistics were left as they were, with their ``reason``."""
        return [x for x in self.layers if x.skipped]

    @property
    def kinds(self) -> dict[str, int]:
        """Layers per :attr:`LayerReport.kind`, e.g. ``{"BatchNorm": 3, "folded": 28}``."""
        out: dict[str, int] = {}
        for x in self.layers:
            out[x.kind] = out.get(x.kind, 0) + 1
        return out

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
        """A plain-text table: layer, samples, batches, largest mean and std shift (in sigma),
        largest standard errors of the mean (in sigma) and of the variance (relative), and
        the status (``skipped: <reason>`` for layers left as they were, shown with ``-``)."""
        head: tuple[str, ...] = (
            "layer",
            "samples",
            "batches",
            "max |dmean|/sigma",
            "max |dsigma|/sigma",
            "max mean_se",
            "max var_se",
            "status",
        )
        rows = [_row(x) for x in self.layers]
        if set(self.kinds) != {"BatchNorm"} and self.layers:
            head += ("kind",)
            rows = [(*r, x.kind) for r, x in zip(rows, self.layers, strict=True)]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        skipped = len(self.skipped)
        head = (
            f"recalibrated {len(self.layers) - skipped} BatchNorm layer(s) from {self.samples} "
            f"samples (estimator={self.estimator}, mode={self.mode})"
        )
        if skipped:
            head += f"; skipped {skipped} (left as they were, see the status column)"
        if set(self.kinds) != {"BatchNorm"} and self.layers:
            head += "\nlayers: " + ", ".join(
                f"{n} {_KIND_WORDS.get(k, k)}" for k, n in sorted(self.kinds.items())
            )
        if self.tol is not None:
            if self.converged:
                head += (
                    f"\nnum_samples='auto': every standard error below tol={self.tol:g} after "
                    f"{self.samples} samples"
                )
            else:
                worst = _nanmax(np.array([self.max_mean_se, self.max_var_se]))
                head += (
                    f"\nnum_samples='auto': the data ended after {self.samples} samples with "
                    f"standard errors up to {worst:.3g} "
                    f"(tol={self.tol:g}); give more data for that tolerance"
                )
        return f"{head}\n{self.table()}"


_KIND_WORDS = {
    "BatchNorm": "BatchNorm node(s)",
    "folded": "folded Conv / Gemm layer(s) adapted by moment matching",
}


def _row(x: LayerReport) -> tuple[str, ...]:
    if x.skipped:
        return (x.name, str(x.samples), str(x.batches), "-", "-", "-", "-", _status(x))
    return (
        x.name,
        str(x.samples),
        str(x.batches),
        f"{x.max_mean_shift:.4g}",
        f"{x.max_std_shift:.4g}",
        f"{x.max_mean_se:.3g}",
        f"{x.max_var_se:.3g}",
        _status(x),
    )


def _status(x: LayerReport) -> str:
    return f"{x.status}: {x.reason}" if x.reason else x.status
