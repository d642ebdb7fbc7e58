"""The result of a comparison: summary over seeds, table, JSON and plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import require
from .._io import atomic_write, check_output_dir
from .metrics import seed_sd
from .runner import PYTORCH, TRUTH


def summarize(
    runs: Sequence[Mapping[str, Any]], estimators: Sequence[str], layers: Sequence[str]
) -> dict[str, Any]:
    """Per estimator: final errors (mean and spread across seeds), noise over steps, accuracy."""
    summary: dict[str, Any] = {}
    for est in estimators:
        finals = [r["final_overall"][est] for r in runs]
        # noise over the last steps: per layer, the spread of its error over the recorded steps
        step_noise: dict[str, list[float]] = {"mean_err": [], "logvar": []}
        for r in runs:
            for key in step_noise:
                per_layer = [
                    seed_sd([s[est][layer][key] for s in r["steps_per_layer"]]) for layer in layers
                ]
                step_noise[key].append(float(np.mean(per_layer)))
        acc = [r["accuracy"][est] for r in runs]
        summary[est] = {
            "mean_err": float(np.mean([f["mean_err"] for f in finals])),
            "mean_err_seed_sd": seed_sd([f["mean_err"] for f in finals]),
            "logvar": float(np.mean([f["logvar"] for f in finals])),
            "logvar_seed_sd": seed_sd([f["logvar"] for f in finals]),
            "logvar_abs": float(np.mean([f["logvar_abs"] for f in finals])),
            "mean_err_step_noise": float(np.mean(step_noise["mean_err"])),
            "logvar_step_noise": float(np.mean(step_noise["logvar"])),
            "accuracy": float(np.mean(acc)),
            "accuracy_seed_sd": seed_sd(acc),
            "per_layer": {
                layer: {
                    key: float(np.mean([r["final"][est][layer][key] for r in runs]))
                    for key in ("mean_err", "logvar", "logvar_abs")
                }
                for layer in layers
            },
        }
    for ref in (TRUTH, PYTORCH):
        acc = [r["accuracy"][ref] for r in runs]
        summary[ref] = {"accuracy": float(np.mean(acc)), "accuracy_seed_sd": seed_sd(acc)}
    return summary


@dataclass
class CompareResult:
    """Everything :func:`compare` measured.

    Attributes
    ----------
    config : dict
        The settings of the run.
    layers : list of str
        BatchNorm layers, in model order.
    estimators : list of str
        Estimators compared, in table order.
    runs : list of dict
        One record per seed: final errors per estimator and layer, errors after every epoch and
        over the last steps, test accuracies, the truth and the final estimates per channel.
    summary : dict
        Per estimator, aggregated over layers and seeds (see :meth:`table`), plus the accuracy
        of the references ``"truth"`` (population statistics of the final weights loaded) and
        ``"pytorch_buffers"`` (the model's own running statistics).
    """

    config: dict[str, Any]
    layers: list[str]
    estimators: list[str]
    runs: list[dict[str, Any]] = field(repr=False)
    summary: dict[str, Any] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Every number, JSON-serializable."""
        return {
            "format": "streamnorm.compare",
            "version": 1,
            "config": self.config,
            "layers": self.layers,
            "estimators": self.estimators,
            "summary": self.summary,
            "runs": self.runs,
        }

    def table(self) -> str:
        """The plain-text summary table (overall, then per layer).

        Columns: ``mean err`` = ``|mu_hat - mu| / sigma`` and ``log var`` = signed
        ``log(var_hat / var)`` at the end of training, averaged over channels, layers and seeds,
        each with its spread across seeds (``sd``); ``|log var|`` its magnitude; ``step noise``
        the spread of each over the last steps; ``acc`` the test accuracy with the estimator's
        statistics loaded, with its spread across seeds.
        """
        seeds = len(self.runs)
        cols = [
            ("estimator", 16, "s"),
            ("mean err", 10, ".4f"),
            ("sd", 8, ".4f"),
            ("log var", 10, "+.4f"),
            ("sd", 8, ".4f"),
            ("|log var|", 11, ".4f"),
            ("noise mu", 10, ".4f"),
            ("noise var", 10, ".4f"),
            ("acc", 8, ".4f"),
            ("sd", 7, ".4f"),
        ]

        def row(values: Sequence[Any]) -> str:
            out = []
            for (_, w, f), v in zip(cols, values, strict=True):
                text = "" if v is None else format(v, f)
                out.append(text.ljust(w) if f == "s" else text.rjust(w))
            return "".join(out).rstrip()

        head = "".join(n.ljust(w) if f == "s" else n.rjust(w) for n, w, f in cols)
        lines = [
            f"BatchNorm test-time estimators vs. the population of the final weights "
            f"({len(self.layers)} BN layers, {seeds} seed{'s' if seeds != 1 else ''}, "
            f"{self.config['epochs']} epochs, batch size {self.config['batch_size']})",
            head,
            "-" * len(head),
        ]
        for est in self.estimators:
            s = self.summary[est]
            lines.append(
                row(
                    [
                        est,
                        s["mean_err"],
                        s["mean_err_seed_sd"],
                        s["logvar"],
                        s["logvar_seed_sd"],
                        s["logvar_abs"],
                        s["mean_err_step_noise"],
                        s["logvar_step_noise"],
                        s["accuracy"],
                        s["accuracy_seed_sd"],
                    ]
                )
            )
        for ref, label in ((TRUTH, "truth"), (PYTORCH, "pytorch buffers")):
            s = self.summary[ref]
            lines.append(row([label, *([None] * 7), s["accuracy"], s["accuracy_seed_sd"]]))
        lines.append("")
        lines.append("per layer: mean err / log var")
        head2 = "estimator".ljust(16) + "".join(name.rjust(18) for name in self.layers)
        lines += [head2, "-" * len(head2)]
        for est in self.estimators:
            pl = self.summary[est]["per_layer"]
            lines.append(
                est.ljust(16)
                + "".join(f"{pl[n]['mean_err']:>9.4f}{pl[n]['logvar']:>+9.4f}" for n in self.layers)
            )
        lines.append("")
        lines.append(
            "mean err = |mu_hat - mu| / sqrt(var + eps), log var = log((var_hat + eps) / (var + "
            "eps)), per channel against the population of the final weights; averaged over "
            "channels, layers and seeds (sd: across seeds; noise: spread over the last steps)."
        )
        lines.append(
            "acc: test accuracy with the estimator's statistics loaded; truth: the population "
            "itself; pytorch buffers: the model's own running statistics."
        )
        return "\n".join(lines)

    def save(self, out: str | os.PathLike[str], *, plot: bool = True) -> dict[str, Path]:
        """Write ``compare.json`` and (with ``plot``) ``compare.png`` into the folder ``out``.

        Returns
        -------
        dict
            ``{"json": path, "png": path}`` of the files written.

        Raises
        ------
        OutputPathError
            ``out`` is a file, lies below a file, or cannot be written (checked first).
        """
        folder = Path(check_output_dir(out))
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(jsonable(self.to_dict()), indent=1, allow_nan=False)
        paths = {"json": folder / "compare.json"}
        atomic_write(paths["json"], lambda f: f.write(text), mode="w")
        if plot:
            paths["png"] = folder / "compare.png"
            plot_result(self, paths["png"])
        return paths


def jsonable(obj: Any) -> Any:
    """NaN and infinities become ``null`` (strict JSON); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    return obj


def plot_result(result: CompareResult, path: str | os.PathLike[str]) -> None:
    """Plot error vs. epoch per estimator and accuracy per estimator into ``path`` (PNG).

    Parameters
    ----------
    result : CompareResult
    path : str or path-like
        Written atomically; the Agg backend is used, no display is needed.
    """
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_m, ax_v, ax_a = fig.subplots(1, 3)
    n_ep = len(result.runs[0]["epochs"])
    epochs = np.arange(1, n_ep + 1)
    for est in result.estimators:
        me = np.mean([[e[est]["mean_err"] for e in r["epochs"]] for r in result.runs], axis=0)
        lv = np.mean([[e[est]["logvar_abs"] for e in r["epochs"]] for r in result.runs], axis=0)
        ax_m.plot(epochs, me, marker="o", ms=3, label=est)
        ax_v.plot(epochs, lv, marker="o", ms=3, label=est)
    for ax, title in (
        (ax_m, "mean error |mu_hat - mu| / sigma"),
        (ax_v, "variance error |log(var_hat / var)|"),
    ):
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=8)
    names = [*result.estimators, TRUTH, PYTORCH]
    acc = [result.summary[n]["accuracy"] for n in names]
    sd = [result.summary[n]["accuracy_seed_sd"] for n in names]
    ax_a.barh(
        range(len(names)), acc, xerr=sd, color=["C0"] * len(result.estimators) + ["0.5", "0.7"]
    )
    ax_a.set_yticks(range(len(names)), names)
    ax_a.invert_yaxis()
    lo = max(0.0, min(acc) - 0.05)
    ax_a.set_xlim(lo, 1.0)
    ax_a.set_title("test accuracy with the estimator's statistics")
    for i, a in enumerate(acc):
        ax_a.text(lo + 0.002, i, f"{a:.3f}", va="center", fontsize=8, color="white")
    fig.suptitle(
        f"digits CNN, batch size {result.config['batch_size']}, {result.config['epochs']} epochs, "
        f"{len(result.runs)} seed(s): error against the population of the final weights"
    )
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")


__all__ = ["CompareResult", "jsonable", "plot_result", "summarize"]
