"""A plot of a calibration's precision against the number of samples (``--plot``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._extras import require
from .._io import atomic_write
from ._report import CalibrationReport

__all__ = ["SampleCurve", "plot_samples"]


@dataclass(frozen=True)
class SampleCurve:
    """An error curve measured against a reference, drawn beside a report's own traces.

    Attributes
    ----------
    label : str
    samples : numpy.ndarray, shape (K,)
    mean_err, var_err : numpy.ndarray, shape (K,)
        Largest ``|mu_hat - mu| / sigma`` and ``|var_hat / var - 1|`` over channels and layers.
    """

    label: str
    samples: np.ndarray
    mean_err: np.ndarray
    var_err: np.ndarray


def plot_samples(
    report: CalibrationReport,
    path: str | os.PathLike[str],
    *,
    curves: Sequence[SampleCurve] = (),
    title: str | None = None,
) -> None:
    """Plot, per layer, the estimate's error against the samples seen, with its standard error.

    Parameters
    ----------
    report : CalibrationReport
        Its layers' traces (:meth:`LayerReport.trace`): after every prefix of the data, the
        largest deviation over channels of the prefix estimate from the final one (solid) and
        the largest standard error (the band below the dashed line, from 0 to 2 se).
    path : str or path-like
        PNG, written atomically with the Agg backend (no display needed).
    curves : sequence of SampleCurve
        Errors against a reference (e.g. the exact statistics of a larger sample), drawn in
        black.
    title : str, optional
    """
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_m, ax_v = fig.subplots(1, 2)
    for i, layer in enumerate(report.layers):
        tr = layer.trace()
        if tr is None or tr.samples.size < 2:
            continue
        color = f"C{i % 10}"
        for ax, dev, se in ((ax_m, tr.mean_dev, tr.mean_se), (ax_v, tr.var_dev, tr.var_se)):
            ok = np.isfinite(se)
            ax.fill_between(tr.samples[ok], 0, 2 * se[ok], color=color, alpha=0.12, lw=0)
            ax.plot(tr.samples[ok], 2 * se[ok], color=color, ls="--", lw=0.8)
            ax.plot(tr.samples[:-1], dev[:-1], color=color, lw=1.2, label=layer.name)
    for c in curves:
        ax_m.plot(c.samples, c.mean_err, color="k", marker="o", ms=3, label=c.label)
        ax_v.plot(c.samples, c.var_err, color="k", marker="o", ms=3, label=c.label)
    for ax, what in (
        (ax_m, "mean: |mu_n - mu| / sigma"),
        (ax_v, "variance: |var_n / var - 1|"),
    ):
        if report.tol is not None:
            ax.axhline(report.tol, color="0.3", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("samples")
        ax.set_title(f"{what}; dashed: 2 x standard error")
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.suptitle(
        title
        or (
            f"{report.estimator} statistics, {report.mode}: deviation from the final estimate "
            f"({report.samples} samples) and 2 standard errors"
        )
    )
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
