"""compare(): check the settings, load the digits, run every seed, build the result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._errors import InputError
from .report import CompareResult, summarize
from .runner import RunPlan, run_seeds
from .settings import DEFAULT_ESTIMATORS, Settings, check_settings

#: what the truth is, as recorded in the result's config
TRUTH_NOTE = (
    "population of each BN input over the whole training set, final weights, "
    "earlier BN layers using their population statistics (eval mode)"
)


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
    settings = check_settings(
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        drop_first=drop_first,
        drop_last=drop_last,
        seeds=seeds,
        estimators=estimators,
        width=width,
        lr=lr,
        schedule=schedule,
        last_steps=last_steps,
        threads=threads,
        progress=progress,
    )
    plan = _plan(settings)
    runs = run_seeds(plan)
    layers = list(runs[0]["truth"])
    names = list(plan.settings.estimators)
    return CompareResult(
        config=_config(plan),
        layers=layers,
        estimators=names,
        runs=runs,
        summary=summarize(runs, names, layers),
    )


def _plan(settings: Settings) -> RunPlan:
    """Load the digits and fix the step counts; the batch size must fit the training set."""
    from ..digits import load_digits_nchw

    data = load_digits_nchw(seed=0)
    n_train = int(data[0].shape[0])
    if settings.batch_size > n_train:
        raise InputError(f"batch_size {settings.batch_size} exceeds the {n_train} training images")
    steps = n_train // settings.batch_size
    last = steps if settings.last_steps is None else settings.last_steps
    return RunPlan(
        settings=settings,
        data=data,
        steps=steps,
        last_steps=min(last, settings.epochs * steps),
    )


def _config(plan: RunPlan) -> dict[str, Any]:
    """The settings of the run as recorded in the result."""
    s = plan.settings
    return {
        "epochs": s.epochs,
        "batch_size": s.batch_size,
        "momentum": s.momentum,
        "drop_first": s.drop_first,
        "drop_last": s.drop_last,
        "seeds": s.seeds,
        "estimators": {k: repr(v) for k, v in s.estimators.items()},
        "width": s.width,
        "lr": s.lr,
        "schedule": s.schedule,
        "last_steps": plan.last_steps,
        "threads": s.threads,
        "steps_per_epoch": plan.steps,
        "n_train": int(plan.data[0].shape[0]),
        "n_test": int(plan.data[2].shape[0]),
        "truth": TRUTH_NOTE,
    }


__all__ = ["TRUTH_NOTE", "compare"]
