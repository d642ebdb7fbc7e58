"""The training runs: one per seed, every estimator tracked, scored against the truth."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._extras import require
from .metrics import Estimates, Truth, layer_errors, max_relative_diff, overall, score
from .settings import Settings
from .truth import ground_truth

#: reference rows of the accuracy column (not estimators)
TRUTH = "truth"
PYTORCH = "pytorch_buffers"

Data = tuple[Any, Any, Any, Any]


@dataclass
class RunPlan:
    """What every seed's run shares: the checked settings, the data and the step counts.

    Attributes
    ----------
    settings : Settings
    data : tuple
        ``(x_train, y_train, x_test, y_test)`` from :func:`streamnorm.digits.load_digits_nchw`.
    steps : int
        Optimizer steps per epoch.
    last_steps : int
        Steps at the end of training whose snapshots measure the noise.
    tick : callable
        Called after every step (a progress bar's update).
    """

    settings: Settings
    data: Data
    steps: int
    last_steps: int
    tick: Callable[[], Any] = field(default=lambda: None)

    @property
    def total(self) -> int:
        """Optimizer steps per seed."""
        return self.settings.epochs * self.steps


def snapshot(tracker: Any) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{layer: {estimator: (mean, running_var)}}`` now, in PyTorch's unbiased convention.

    An estimator with nothing to estimate from yet (a window that is still empty) gives NaN of
    the layer's channel shape.
    """
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for layer in tracker.layers:
        ests = {name: tracker.estimator(layer, name) for name in tracker.estimator_names}
        shape = next((e.shape for e in ests.values() if e.shape), ())
        out[layer] = {}
        for name, e in ests.items():
            try:
                out[layer][name] = (
                    np.array(e.mean, dtype=np.float64),
                    np.array(e.running_var("unbiased")),
                )
            except ValueError:
                out[layer][name] = (np.full(shape, np.nan), np.full(shape, np.nan))
    return out


@dataclass
class _Recording:
    """Snapshots taken during one training run."""

    epochs: list[Any] = field(default_factory=list)
    steps: list[Any] = field(default_factory=list)


def _train_tracked(model: Any, plan: RunPlan, seed: int) -> tuple[Any, _Recording]:
    """Train ``model`` with every estimator tracking its BatchNorm inputs; the snapshots."""
    from .. import Tracker
    from ..digits import train
    from ..torch import track

    s = plan.settings
    tracker = Tracker(copy.deepcopy(s.estimators))
    rec = _Recording()

    def on_batch(epoch: int, step: int, loss: float) -> None:
        if epoch * plan.steps + step >= plan.total - plan.last_steps:
            rec.steps.append(snapshot(tracker))
        plan.tick()

    def on_epoch(epoch: int) -> None:
        rec.epochs.append(snapshot(tracker))
        if epoch < s.epochs - 1:
            tracker.next_epoch()

    x_tr, y_tr = plan.data[:2]
    with track(model, tracker):
        train(
            model,
            x_tr,
            y_tr,
            epochs=s.epochs,
            batch_size=s.batch_size,
            lr=s.lr,
            seed=seed,
            schedule=s.schedule,
            on_batch=on_batch,
            on_epoch=on_epoch,
        )
    return tracker, rec


def _buffers(model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PyTorch's own running statistics, float64."""
    from ..torch import bn_layers

    return {
        name: (bn.running_mean.double().numpy().copy(), bn.running_var.double().numpy().copy())
        for name, bn in bn_layers(model)
    }


def _accuracies(
    model: Any, tracker: Any, truth: Truth, final: Any, plan: RunPlan
) -> dict[str, float]:
    """Test accuracy with each estimator's statistics loaded, the truth's and PyTorch's own."""
    from ..digits import accuracy
    from ..torch import load_estimates

    x_te, y_te = plan.data[2:]
    acc: dict[str, float] = {PYTORCH: accuracy(model, x_te, y_te)}
    for est in plan.settings.estimators:
        if any(np.isnan(final[est][layer]["mean_err"]) for layer in truth):
            acc[est] = math.nan  # nothing to load (e.g. a window that dropped every epoch)
            continue
        m = copy.deepcopy(model)
        load_estimates(m, tracker, estimator=est)
        acc[est] = accuracy(m, x_te, y_te)
    m = copy.deepcopy(model)
    load_estimates(m, {k: {TRUTH: t} for k, t in truth.items()}, estimator=TRUTH)
    acc[TRUTH] = accuracy(m, x_te, y_te)
    return acc


def _lists(pairs: Any) -> dict[str, Any]:
    return {"mean": pairs[0].tolist(), "var": pairs[1].tolist()}


def run_seed(seed: int, plan: RunPlan) -> dict[str, Any]:
    """Train one model from ``seed`` and score every estimator; the run's record.

    Returns
    -------
    dict
        ``final`` (errors per estimator and layer at the end), ``final_overall``,
        ``pytorch_buffers`` (errors of the model's own buffers), ``epochs`` /
        ``epochs_per_layer`` and ``steps`` / ``steps_per_layer`` (errors after every epoch and
        over the last steps), ``accuracy``, ``truth`` and ``estimates`` per channel, and
        ``pytorch_ema_max_abs_diff`` (PyTorch's buffers against the tracked ``ema``).
    """
    from ..digits import make_cnn
    from ..torch import bn_layers

    s = plan.settings
    model = make_cnn(seed=seed, width=s.width)
    eps = {}
    for name, bn in bn_layers(model):
        bn.momentum = s.momentum  # PyTorch's own buffers are then the reference EMA
        eps[name] = float(bn.eps)
    tracker, rec = _train_tracked(model, plan, seed)
    truth_m = ground_truth(model, plan.data[0])
    truth = {name: (np.asarray(m.mean), np.asarray(m.var(ddof=1))) for name, m in truth_m.items()}
    final_est: Estimates = rec.epochs[-1]
    final = score(final_est, truth, eps)
    per_epoch = [score(snap, truth, eps) for snap in rec.epochs]
    per_step = [score(snap, truth, eps) for snap in rec.steps]
    own = _buffers(model)
    names = list(s.estimators)
    return {
        "seed": seed,
        "final": final,
        "final_overall": {e: overall(final[e]) for e in names},
        "pytorch_buffers": {
            name: layer_errors(*own[name], *truth[name], eps=eps[name]) for name in truth
        },
        "epochs": [{e: overall(sc[e]) for e in names} for sc in per_epoch],
        "epochs_per_layer": per_epoch,
        "steps": [{e: overall(sc[e]) for e in names} for sc in per_step],
        "steps_per_layer": per_step,
        "accuracy": _accuracies(model, tracker, truth, final, plan),
        "truth": {
            name: {"count": float(np.min(truth_m[name].count)), **_lists(t)}
            for name, t in truth.items()
        },
        "estimates": {name: {e: _lists(mv) for e, mv in final_est[name].items()} for name in truth},
        "pytorch_ema_max_abs_diff": max_relative_diff(own, final_est, "ema"),
    }


def run_seeds(plan: RunPlan) -> list[dict[str, Any]]:
    """:func:`run_seed` for every seed, with the thread count and progress bar of the settings.

    PyTorch's thread count is restored afterwards, also on error.
    """
    torch = require("torch")
    s = plan.settings
    old_threads = torch.get_num_threads()
    bar: Any = None
    if s.progress:
        tqdm = require("tqdm")
        bar = tqdm.tqdm(total=plan.total * len(s.seeds), desc="streamnorm compare", unit="step")
        plan.tick = lambda: bar.update(1)
    runs = []
    try:
        if s.threads is not None:
            torch.set_num_threads(s.threads)
        for seed in s.seeds:
            if bar is not None:
                bar.set_postfix_str(f"seed {seed}")
            runs.append(run_seed(seed, plan))
    finally:
        torch.set_num_threads(old_threads)
        if bar is not None:
            bar.close()
    return runs


__all__ = ["PYTORCH", "TRUTH", "RunPlan", "run_seed", "run_seeds", "snapshot"]
