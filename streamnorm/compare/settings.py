"""The settings of a comparison, checked once, and the estimators they name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import InputError, InputTypeError
from .._validate import (
    check_choice,
    check_drop,
    check_fraction,
    check_momentum,
    check_optional_positive_int,
    check_positive_int,
    is_int,
)
from ..digits import SCHEDULES

#: estimators compared by default, in table order
DEFAULT_ESTIMATORS = ("population", "ema", "ema_keras", "cumulative", "windowed")


@dataclass(frozen=True)
class Settings:
    """Checked settings of one comparison (see :func:`streamnorm.compare.compare`).

    ``last_steps`` is ``None`` for one epoch's steps (the run plan resolves it once the steps
    per epoch are known).
    """

    epochs: int
    batch_size: int
    momentum: float
    drop_first: float | int
    drop_last: float | int
    seeds: list[int]
    estimators: dict[str, Any]
    width: int
    lr: float
    schedule: str
    last_steps: int | None
    threads: int | None
    progress: bool


def named_estimators(settings_like: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Fresh estimator prototypes for ``names``; ``settings_like`` holds momentum and drops.

    ``population``, ``ema_keras`` and ``cumulative`` come from
    :func:`streamnorm.estimators.default_estimators`; ``ema`` uses ``momentum``, the windowed
    ones ``drop_first`` / ``drop_last``; ``windowed_mob`` averages the batch variances,
    ``ema_bc`` is the bias-corrected EMA.
    """
    from ..estimators import EMA, WindowedAverage, default_estimators

    p = settings_like["momentum"]
    first, last = settings_like["drop_first"], settings_like["drop_last"]
    made: dict[str, Callable[[], Any]] = {
        "ema": lambda: EMA(p),
        "windowed": lambda: WindowedAverage(first, last),
        "windowed_mob": lambda: WindowedAverage(first, last, "mean_of_batch"),
        "ema_bc": lambda: EMA(p, bias_correction=True),
    }
    defaults = default_estimators()
    known = sorted({*defaults, *made})
    unknown = [e for e in names if e not in known]
    if unknown:
        raise InputError(f"unknown estimators {unknown}; choose from {known}")
    return {e: made[e]() if e in made else defaults[e] for e in names}


def _check_seeds(seeds: Any) -> list[int]:
    if isinstance(seeds, bool):
        raise InputTypeError(f"seeds must be an int count or a sequence of ints, got {seeds!r}")
    if is_int(seeds):
        if seeds < 1:
            raise InputError(f"seeds must be >= 1, got {seeds}")
        return list(range(int(seeds)))
    seed_list = [int(s) for s in seeds]
    if not seed_list or any(s < 0 for s in seed_list) or len(set(seed_list)) != len(seed_list):
        raise InputError(f"seeds must be distinct non-negative ints, got {list(seeds)}")
    return seed_list


def _check_estimators(estimators: Any, named: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(estimators, Mapping):
        protos = dict(estimators)
        if not protos or not all(isinstance(k, str) for k in protos):
            raise InputError("estimators must map at least one str name to an estimator")
        return protos
    if isinstance(estimators, str):
        raise InputTypeError(
            f"estimators must be a sequence of names, got the string {estimators!r}"
        )
    names = list(estimators)
    if not names or len(set(names)) != len(names):
        raise InputError(f"estimators must be distinct names, got {names}")
    return named_estimators(named, names)


def check_settings(**kw: Any) -> Settings:
    """:class:`Settings` from :func:`~streamnorm.compare.compare`'s keywords, checked."""
    epochs = check_positive_int("epochs", kw["epochs"])
    batch_size = kw["batch_size"]
    if not is_int(batch_size) or batch_size < 2:
        raise InputError(
            f"batch_size must be an int >= 2 (BatchNorm needs 2 samples), got {batch_size!r}"
        )
    momentum = check_momentum(kw["momentum"])
    schedule = check_choice("schedule", kw["schedule"], SCHEDULES)
    lr = check_fraction("lr", kw["lr"], low=0.0, high=float("inf"), closed="neither")
    drops = {k: check_drop(k, kw[k]) for k in ("drop_first", "drop_last")}
    if all(is_int(v) for v in drops.values()) and sum(drops.values()) >= epochs:
        raise InputError(
            f"drop_first + drop_last = {sum(drops.values())} epochs leaves nothing of the "
            f"{epochs} epochs for the windowed average; train longer or drop fewer"
        )
    last_steps = check_optional_positive_int("last_steps", kw["last_steps"])
    return Settings(
        epochs=epochs,
        batch_size=int(batch_size),
        momentum=momentum,
        seeds=_check_seeds(kw["seeds"]),
        estimators=_check_estimators(kw["estimators"], {"momentum": momentum, **drops}),
        width=kw["width"],
        lr=lr,
        schedule=schedule,
        last_steps=last_steps,
        threads=check_optional_positive_int("threads", kw["threads"]),
        progress=bool(kw["progress"]),
        **drops,
    )


__all__ = ["DEFAULT_ESTIMATORS", "SCHEDULES", "Settings", "check_settings", "named_estimators"]
