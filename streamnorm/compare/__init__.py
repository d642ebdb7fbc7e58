"""Compare BatchNorm test-time estimators on a real training run.

:func:`compare` trains the small digits CNN (:mod:`streamnorm.digits`) with PyTorch on the CPU
while a :class:`streamnorm.Tracker` feeds every BatchNorm input to all estimators at once,
computes the ground truth with the final weights, and scores every estimator: normalized mean
error, log variance ratio, their noise over the last steps and across seeds, and the test
accuracy with the estimator's statistics loaded. :class:`CompareResult` prints the table and
writes ``compare.json`` and ``compare.png``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import require
from .._moments import Moments, atomic_write

__all__ = ["CompareResult", "compare", "ground_truth", "layer_errors"]

#: estimators compared by default, in table order
DEFAULT_ESTIMATORS = ("population", "ema", "ema_keras", "cumulative", "windowed")
#: reference rows of the accuracy column (not estimators)
TRUTH = "truth"
PYTORCH = "pytorch_buffers"

Estimates = Mapping[str, Mapping[str, tuple[Any, Any]]]


# --------------------------------------------------------------------------------------------
# metrics


def layer_errors(
    mean_hat: Any, var_hat: Any, mean: Any, var: Any, *, eps: float = 1e-5
) -> dict[str, float]:
    """Errors of one layer's estimate against the truth, aggregated over channels.

    Parameters
    ----------
    mean_hat, var_hat : array_like, shape (C,)
        Estimated per-channel mean and variance.
    mean, var : array_like, shape (C,)
        True per-channel mean and variance.
    eps : float, default 1e-5
        BatchNorm's ``eps``; it is added to both variances (see Notes).

    Returns
    -------
    dict
        ``mean_err``: mean over channels of ``|mean_hat - mean| / sqrt(var + eps)``;
        ``logvar``: mean over channels of ``log((var_hat + eps) / (var + eps))`` (signed: the
        bias of the variance, negative = underestimated); ``logvar_abs``: mean over channels of
        its absolute value; ``mean_err_max`` and ``logvar_abs_max``: the worst channel.

    Notes
    -----
    At test time BatchNorm computes ``(z - mean_hat) / sqrt(var_hat + eps)``. With the true
    statistics that would be a standard normalization, so ``|mean_hat - mean| / sqrt(var + eps)``
    is the shift of the normalized output in units of its standard deviation and
    ``log((var_hat + eps) / (var + eps))`` is twice the log of its scale error. Adding ``eps``
    keeps the errors finite for dead channels (variance 0), exactly where BatchNorm itself
    stays finite.
    """
    mh, vh, m, v = (
        np.asarray(a, dtype=np.float64).reshape(-1) for a in (mean_hat, var_hat, mean, var)
    )
    if not mh.shape == vh.shape == m.shape == v.shape:
        raise ValueError(
            "mean_hat, var_hat, mean and var must have the same shape (C,), got "
            f"{mh.shape}, {vh.shape}, {m.shape} and {v.shape}"
        )
    if mh.size == 0:
        raise ValueError("no channels to compare: the arrays are empty")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if np.any(v < 0) or np.any(vh < 0):
        raise ValueError("variances must be >= 0")
    scale = np.sqrt(v + eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        me = np.abs(mh - m) / scale
        lv = np.log(vh + eps) - np.log(v + eps)
    return {
        "mean_err": float(np.mean(me)),
        "mean_err_max": float(np.max(me)),
        "logvar": float(np.mean(lv)),
        "logvar_abs": float(np.mean(np.abs(lv))),
        "logvar_abs_max": float(np.max(np.abs(lv))),
    }


def _score(
    snap: Estimates, truth: Mapping[str, tuple[np.ndarray, np.ndarray]], eps: Mapping[str, float]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{estimator: {layer: errors}}`` of one snapshot of estimates."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for layer, (m, v) in truth.items():
        for est, (mh, vh) in snap[layer].items():
            out.setdefault(est, {})[layer] = layer_errors(mh, vh, m, v, eps=eps[layer])
    return out


def _overall(per_layer: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean over layers of each metric."""
    keys = next(iter(per_layer.values())).keys()
    return {k: float(np.mean([d[k] for d in per_layer.values()])) for k in keys}


# --------------------------------------------------------------------------------------------
# ground truth


class _Pool:
    """A minimal tracker for :func:`streamnorm.torch.track`: one pooled Moments per layer."""

    def __init__(self) -> None:
        self.moments: dict[str, Moments] = {}

    def update(self, layer: str, x: Any, axis: Any) -> Moments:
        m = self.moments.setdefault(layer, Moments())
        m.update(x, axis=axis)
        return m


def ground_truth(model: Any, x: Any, *, batch_size: int = 512) -> dict[str, Moments]:
    """Population statistics of every BatchNorm input with the model's current weights.

    Parameters
    ----------
    model : torch.nn.Module
        Its weights are frozen (no gradient step); its mode and BatchNorm buffers are restored
        afterwards, also on error.
    x : torch.Tensor, shape (N, ...)
        The whole training set.
    batch_size : int, default 512
        Samples per forward pass; the result does not depend on it.

    Returns
    -------
    dict of str to Moments
        Per BatchNorm layer (qualified name, in :func:`streamnorm.torch.bn_layers` order) the
        exact pooled count, mean and M2 of its input over all of ``x``, reduced over every axis
        but the channel axis.

    Notes
    -----
    The input of a BatchNorm layer depends on how the layers before it normalize. The truth
    used here is the distribution a layer sees **at test time** when every earlier layer uses
    its own true statistics: layers are processed in order; for layer ``k`` the model runs in
    evaluation mode with layers ``0 .. k-1`` holding the population statistics already found,
    and the input of layer ``k`` is pooled over the whole set. This is what an ideal
    recalibration with the final weights (PreciseBN, ``update_bn`` with one huge batch) would
    load. Estimators that average training-mode batches also carry the train/test discrepancy
    of small batches, and their error against this truth includes it.
    """
    torch = require("torch")
    from ..torch._hooks import bn_layers, track

    layers = bn_layers(model)
    if not layers:
        raise ValueError("model has no BatchNorm layers")
    for name, bn in layers:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"BatchNorm layer {name!r} has track_running_stats=False; it normalizes with "
                "batch statistics at test time and has no buffers to estimate"
            )
    xt = torch.as_tensor(x)
    n = int(xt.shape[0])
    if n < 2:
        raise ValueError(f"x must hold at least 2 samples, got {n}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    was_training = {m: m.training for m in model.modules()}
    saved = {name: (bn.running_mean.clone(), bn.running_var.clone()) for name, bn in layers}
    saved_nbt = {
        name: bn.num_batches_tracked.clone()
        for name, bn in layers
        if bn.num_batches_tracked is not None
    }
    truth: dict[str, Moments] = {}
    try:
        model.eval()
        with torch.no_grad():
            for name, bn in layers:
                pool = _Pool()
                bn.train()  # only this layer's hook fires; its own output is discarded
                with track(model, pool, layers=[name]):
                    for i in range(0, n, batch_size):
                        model(xt[i : i + batch_size])
                bn.eval()
                if name not in pool.moments:
                    raise ValueError(f"BatchNorm layer {name!r} was not called in the forward pass")
                m = pool.moments[name]
                truth[name] = m
                cnt = float(np.min(m.count))
                bn.running_mean.copy_(torch.tensor(np.array(m.mean), dtype=bn.running_mean.dtype))
                var = np.asarray(m.var(ddof=1 if cnt > 1 else 0))
                bn.running_var.copy_(torch.tensor(np.array(var), dtype=bn.running_var.dtype))
    finally:
        for name, bn in layers:
            bn.running_mean.copy_(saved[name][0])
            bn.running_var.copy_(saved[name][1])
            if name in saved_nbt:
                bn.num_batches_tracked.copy_(saved_nbt[name])
        for m, t in was_training.items():
            m.training = t
    return truth


# --------------------------------------------------------------------------------------------
# the run


def _estimator_set(
    momentum: float, drop_first: float | int, drop_last: float | int, names: Sequence[str]
) -> dict[str, Any]:
    """Named estimator prototypes for the tracker."""
    from ..estimators import EMA, CumulativeAverage, Population, WindowedAverage

    known: dict[str, Callable[[], Any]] = {
        "population": Population,
        "ema": lambda: EMA(momentum=momentum),
        "ema_keras": lambda: EMA(momentum=0.99, convention="keras", unbiased=False),
        "cumulative": CumulativeAverage,
        "windowed": lambda: WindowedAverage(drop_first=drop_first, drop_last=drop_last),
        "windowed_mob": lambda: WindowedAverage(
            drop_first=drop_first, drop_last=drop_last, mode="mean_of_batch"
        ),
        "ema_bc": lambda: EMA(momentum=momentum, bias_correction=True),
    }
    unknown = [e for e in names if e not in known]
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; choose from {sorted(known)}")
    return {e: known[e]() for e in names}


def _snapshot(tracker: Any) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{layer: {estimator: (mean, running_var)}}`` now, in PyTorch's unbiased convention."""
    from ..torch._hooks import _running_var

    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for layer in tracker.layers:
        out[layer] = {}
        for est in tracker.estimator_names:
            e = tracker.estimator(layer, est)
            try:
                mv = (np.array(e.mean, dtype=np.float64), np.array(_running_var(e)))
            except ValueError:  # nothing to estimate from yet (e.g. the window is still empty)
                shape = next(
                    (
                        s
                        for s in (
                            tracker.estimator(layer, n).shape for n in tracker.estimator_names
                        )
                        if s
                    ),
                    (),
                )
                nan = np.full(shape, np.nan)
                mv = (nan, nan.copy())
            out[layer][est] = mv
    return out


def _check_momentum(momentum: Any) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a number in (0, 1], got {momentum!r}")
    if not 0.0 < float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
    return float(momentum)


def _check_drop(name: str, v: Any) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(
            f"{name} must be an int (epochs) or a float fraction in [0, 0.5), got {v!r}"
        )
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"{name} must be >= 0 epochs, got {v}")
        return v
    if not 0.0 <= v < 0.5:
        raise ValueError(f"{name} as a fraction must be in [0, 0.5), got {v!r}")
    return float(v)


def _run_seed(
    seed: int,
    data: tuple[Any, Any, Any, Any],
    *,
    epochs: int,
    batch_size: int,
    momentum: float,
    drop_first: float | int,
    drop_last: float | int,
    estimators: Mapping[str, Any],
    width: int,
    lr: float,
    schedule: str,
    last_steps: int,
    tick: Callable[[], Any],
) -> dict[str, Any]:
    from ..digits import accuracy, make_cnn, train
    from ..torch._hooks import bn_layers, load_estimates, track

    x_tr, y_tr, x_te, y_te = data
    model = make_cnn(seed=seed, width=width)
    layers = bn_layers(model)
    for _, bn in layers:
        bn.momentum = momentum  # PyTorch's own buffers are then the reference EMA
    eps = {name: float(bn.eps) for name, bn in layers}
    from .._tracker import Tracker

    tracker = Tracker(copy.deepcopy(dict(estimators)))
    steps = int(x_tr.shape[0]) // batch_size
    total = epochs * steps
    epoch_snaps: list[dict[str, Any]] = []
    step_snaps: list[dict[str, Any]] = []

    def on_batch(epoch: int, step: int, loss: float) -> None:
        if epoch * steps + step >= total - last_steps:
            step_snaps.append(_snapshot(tracker))
        tick()

    def on_epoch(epoch: int) -> None:
        epoch_snaps.append(_snapshot(tracker))
        if epoch < epochs - 1:
            tracker.next_epoch()

    with track(model, tracker):
        train(
            model, x_tr, y_tr, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
            schedule=schedule, on_batch=on_batch, on_epoch=on_epoch,
        )  # fmt: skip

    truth_m = ground_truth(model, x_tr)
    truth = {name: (np.asarray(m.mean), np.asarray(m.var(ddof=1))) for name, m in truth_m.items()}
    final = _score(epoch_snaps[-1], truth, eps)
    per_epoch = [_score(s, truth, eps) for s in epoch_snaps]
    per_step = [_score(s, truth, eps) for s in step_snaps]

    acc: dict[str, float] = {PYTORCH: accuracy(model, x_te, y_te)}
    pytorch_est = {
        name: (bn.running_mean.double().numpy().copy(), bn.running_var.double().numpy().copy())
        for name, bn in layers
    }
    for est in estimators:
        m = copy.deepcopy(model)
        if any(np.isnan(final[est][layer]["mean_err"]) for layer in truth):
            acc[est] = math.nan  # nothing to load (e.g. a window that dropped every epoch)
            continue
        load_estimates(m, tracker, estimator=est)
        acc[est] = accuracy(m, x_te, y_te)
    m = copy.deepcopy(model)
    load_estimates(
        m,
        {k: {TRUTH: t} for k, t in truth.items()},
        estimator=TRUTH,
    )
    acc[TRUTH] = accuracy(m, x_te, y_te)

    final_est = epoch_snaps[-1]
    return {
        "seed": seed,
        "final": final,
        "final_overall": {e: _overall(final[e]) for e in estimators},
        "pytorch_buffers": {
            name: layer_errors(*pytorch_est[name], *truth[name], eps=eps[name]) for name in truth
        },
        "epochs": [{e: _overall(s[e]) for e in estimators} for s in per_epoch],
        "epochs_per_layer": per_epoch,
        "steps": [{e: _overall(s[e]) for e in estimators} for s in per_step],
        "steps_per_layer": per_step,
        "accuracy": acc,
        "truth": {
            name: {
                "count": float(np.min(truth_m[name].count)),
                "mean": t[0].tolist(),
                "var": t[1].tolist(),
            }
            for name, t in truth.items()
        },
        "estimates": {
            name: {
                e: {"mean": mv[0].tolist(), "var": mv[1].tolist()}
                for e, mv in final_est[name].items()
            }
            for name in truth
        },
        "pytorch_ema_max_abs_diff": _pytorch_vs_ema(pytorch_est, final_est, "ema"),
    }


def _pytorch_vs_ema(
    pytorch_est: Mapping[str, tuple[np.ndarray, np.ndarray]], final: Estimates, name: str
) -> float | None:
    """Largest relative difference between PyTorch's buffers and the tracked torch-EMA."""
    if any(name not in final[layer] for layer in pytorch_est):
        return None
    worst = 0.0
    for layer, (m, v) in pytorch_est.items():
        em, ev = (np.asarray(a) for a in final[layer][name])
        scale = np.sqrt(v) + 1e-12
        worst = max(
            worst,
            float(np.max(np.abs(em - m) / scale)),
            float(np.max(np.abs(ev - v) / (v + 1e-12))),
        )
    return worst


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _summarize(
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
                    _sd([s[est][layer][key] for s in r["steps_per_layer"]]) for layer in layers
                ]
                step_noise[key].append(float(np.mean(per_layer)))
        acc = [r["accuracy"][est] for r in runs]
        summary[est] = {
            "mean_err": float(np.mean([f["mean_err"] for f in finals])),
            "mean_err_seed_sd": _sd([f["mean_err"] for f in finals]),
            "logvar": float(np.mean([f["logvar"] for f in finals])),
            "logvar_seed_sd": _sd([f["logvar"] for f in finals]),
            "logvar_abs": float(np.mean([f["logvar_abs"] for f in finals])),
            "mean_err_step_noise": float(np.mean(step_noise["mean_err"])),
            "logvar_step_noise": float(np.mean(step_noise["logvar"])),
            "accuracy": float(np.mean(acc)),
            "accuracy_seed_sd": _sd(acc),
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
        summary[ref] = {"accuracy": float(np.mean(acc)), "accuracy_seed_sd": _sd(acc)}
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
                )  # fmt: skip
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
        """
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out must be a folder, but {str(folder)!r} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_jsonable(self.to_dict()), indent=1, allow_nan=False)
        paths = {"json": folder / "compare.json"}
        atomic_write(paths["json"], lambda f: f.write(text), mode="w")
        if plot:
            paths["png"] = folder / "compare.png"
            plot_result(self, paths["png"])
        return paths


def _jsonable(obj: Any) -> Any:
    """NaN and infinities become ``null`` (strict JSON); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
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


def compare(
    *,
    epochs: int = 12,
    batch_size: int = 32,
    momentum: float = 0.1,
    drop_first: float | int = 0.25,
    drop_last: float | int = 0.25,
    seeds: Sequence[int] | int = 3,
    estimators: Sequence[str] | Mapping[str, Any] = DEFAULT_ESTIMATORS,
    width: int = 16,
    lr: float = 0.05,
    schedule: str = "constant",
    last_steps: int | None = None,
    threads: int | None = 1,
    progress: bool = False,
) -> CompareResult:
    """Train the digits CNN, track every estimator, and score them against the truth.

    Parameters
    ----------
    epochs : int, default 12
        Training epochs per seed (>= 1).
    batch_size : int, default 32
        Samples per training step (>= 2); the estimators see one batch per step and layer.
    momentum : float, default 0.1
        Momentum of the PyTorch-convention EMA (``m <- (1 - p) m + p x``), in (0, 1]; the
        BatchNorm layers of the model use the same one, so ``pytorch_buffers`` is its reference.
    drop_first, drop_last : int or float, default 0.25
        Epochs the windowed average drops at the start and at the end: an int counts epochs, a
        float in [0, 0.5) is a fraction of the epochs seen.
    seeds : int or sequence of int, default 3
        An int ``k`` runs seeds ``0 .. k-1``; a sequence names the seeds. The seed sets the
        weights and the shuffling; the train/test split is the same for all.
    estimators : sequence of str or dict of str to estimator
        Names among ``population, ema, ema_keras, cumulative, windowed, windowed_mob, ema_bc``
        (``ema`` uses ``momentum``, the windowed ones ``drop_first`` / ``drop_last``), or a dict
        of name -> estimator prototype (e.g. ``{"ema_0.01": streamnorm.EMA(0.01)}``), as
        :class:`streamnorm.Tracker` takes it.
    width : int, default 16
        Width of the network (:func:`streamnorm.digits.make_cnn`).
    lr : float, default 0.05
        SGD learning rate.
    schedule : {"constant", "cosine"}, default "constant"
        Learning-rate schedule (:func:`streamnorm.digits.train`). With ``"cosine"`` the
        weights settle at the end, which favours estimators that weigh the last steps.
    last_steps : int, optional
        Steps at the end of training over which the noise is measured; one epoch by default.
    threads : int or None, default 1
        PyTorch intra-op threads while this function runs (``torch.set_num_threads``; the
        previous setting is restored on return, also on error). The network is so small that
        per-operation threading overhead dominates: one thread is fastest, by far on a busy
        machine. ``None`` leaves PyTorch's setting alone.
    progress : bool, default False
        Show a tqdm progress bar on stderr.

    Returns
    -------
    CompareResult

    Notes
    -----
    The truth is :func:`ground_truth` of the trained model over the whole training set: the
    test-time input distribution of each layer when the layers before it use their own
    population statistics. Errors are per channel and normalized by the true standard
    deviation (see :func:`layer_errors`), then averaged over channels and layers. Bias is the
    signed error at the end of training averaged over seeds; noise is its spread over the last
    steps (one seed) and across seeds. Because every estimator is fed the same batches by the
    same kernel pass, differences between them are due to the estimators alone.
    """
    from ..digits import load_digits_nchw

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(
            f"batch_size must be an int >= 2 (BatchNorm needs 2 samples), got {batch_size!r}"
        )
    momentum = _check_momentum(momentum)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    drop_first = _check_drop("drop_first", drop_first)
    drop_last = _check_drop("drop_last", drop_last)
    if (
        isinstance(drop_first, int)
        and isinstance(drop_last, int)
        and drop_first + drop_last >= epochs
    ):
        raise ValueError(
            f"drop_first + drop_last = {drop_first + drop_last} epochs leaves nothing of the "
            f"{epochs} epochs for the windowed average; train longer or drop fewer"
        )
    if isinstance(seeds, bool):
        raise TypeError(f"seeds must be an int count or a sequence of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        seed_list = list(range(seeds))
    else:
        seed_list = [int(s) for s in seeds]
        if not seed_list or any(s < 0 for s in seed_list) or len(set(seed_list)) != len(seed_list):
            raise ValueError(f"seeds must be distinct non-negative ints, got {list(seeds)}")
    if isinstance(estimators, Mapping):
        protos = dict(estimators)
        if not protos or not all(isinstance(k, str) for k in protos):
            raise ValueError("estimators must map at least one str name to an estimator")
    else:
        if isinstance(estimators, str):
            raise TypeError(
                f"estimators must be a sequence of names, got the string {estimators!r}"
            )
        names = list(estimators)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"estimators must be distinct names, got {names}")
        protos = _estimator_set(momentum, drop_first, drop_last, names)
    est_names = list(protos)
    data = load_digits_nchw(seed=0)
    n_train = int(data[0].shape[0])
    if batch_size > n_train:
        raise ValueError(f"batch_size {batch_size} exceeds the {n_train} training images")
    steps = n_train // batch_size
    total = epochs * steps
    if last_steps is None:
        last_steps = steps
    if isinstance(last_steps, bool) or not isinstance(last_steps, int) or last_steps < 1:
        raise ValueError(f"last_steps must be a positive int, got {last_steps!r}")
    last_steps = min(last_steps, total)

    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    torch = require("torch")
    old_threads = torch.get_num_threads()
    bar: Any = None
    if progress:
        tqdm = require("tqdm")
        bar = tqdm.tqdm(total=total * len(seed_list), desc="streamnorm compare", unit="step")

    def tick() -> None:
        if bar is not None:
            bar.update(1)

    runs = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for seed in seed_list:
            if bar is not None:
                bar.set_postfix_str(f"seed {seed}")
            runs.append(
                _run_seed(
                    seed,
                    data,
                    epochs=epochs,
                    batch_size=batch_size,
                    momentum=momentum,
                    drop_first=drop_first,
                    drop_last=drop_last,
                    estimators=protos,
                    width=width,
                    lr=lr,
                    schedule=schedule,
                    last_steps=last_steps,
                    tick=tick,
                )  # fmt: skip
            )
    finally:
        torch.set_num_threads(old_threads)
        if bar is not None:
            bar.close()
    layers = list(runs[0]["truth"])
    config = {
        "epochs": epochs,
        "batch_size": batch_size,
        "momentum": momentum,
        "drop_first": drop_first,
        "drop_last": drop_last,
        "seeds": seed_list,
        "estimators": {k: repr(v) for k, v in protos.items()},
        "width": width,
        "lr": lr,
        "schedule": schedule,
        "last_steps": last_steps,
        "threads": threads,
        "steps_per_epoch": steps,
        "n_train": n_train,
        "n_test": int(data[2].shape[0]),
        "truth": "population of each BN input over the whole training set, final weights, "
        "earlier BN layers using their population statistics (eval mode)",
    }
    return CompareResult(
        config=config,
        layers=layers,
        estimators=est_names,
        runs=runs,
        summary=_summarize(runs, est_names, layers),
    )
