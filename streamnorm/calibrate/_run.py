"""Scheduling a recalibration: one pass or sequential passes, locally or on a Dask cluster.

:func:`calibrate` drives an :class:`Adapter` (the framework's side, see the package docstring)
over a :class:`~streamnorm.calibrate.Stream` of batches and returns the report.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .._errors import InputError, InputTypeError
from .._validate import check_choice, check_int, check_optional_positive_int, is_number
from ._data import Stream, iter_batches
from ._progress import progress_bar
from ._report import CalibrationReport, LayerReport, Stats, layer_report
from ._sequential import DEFAULT_CACHE_BYTES, Cache
from ._stats import LayerStats, NormLayer, StatsSpec

__all__ = [
    "AUTO_MIN_BATCHES",
    "MODES",
    "Adapter",
    "Emit",
    "LayerResult",
    "Settings",
    "ShardJob",
    "calibrate",
    "check_budget",
]

#: ``num_samples="auto"`` decides only after this many batches (the standard errors of fewer
#: batches are too noisy to stop on: their relative error is about ``1 / sqrt(2 (k - 1))``)
AUTO_MIN_BATCHES = 16

#: the tolerance of ``num_samples="auto"`` when none is given
DEFAULT_TOL = 0.01

#: ``one-pass``: every layer from one pass with batch statistics upstream; ``sequential``: one
#: pass per group of layers, upstream layers already recalibrated
MODES = ("sequential", "one-pass")

#: ``emit(layer_name, x)``: hand one batch of a layer's input to the core
Emit = Callable[[str, np.ndarray], None]


@dataclass(frozen=True)
class LayerResult:
    """New statistics for one layer, as :meth:`Adapter.write` receives them.

    Attributes
    ----------
    mean, var : numpy.ndarray, shape (C,), float64
        ``var`` in the layer's ``var_convention``.
    samples, batches : int
        What reached the layer.
    continued : bool
        The statistics continue the stored ones (an EMA): a batch counter should be added to,
        not replaced.
    """

    mean: np.ndarray
    var: np.ndarray
    samples: int
    batches: int
    continued: bool


class Adapter(Protocol):
    """What a framework provides to the calibration core (see the package docstring)."""

    def layers(self) -> list[NormLayer]:
        """The norm layers to calibrate, in model order."""
        ...

    def read(self, layer: NormLayer) -> Stats:
        """The layer's stored (mean, var) as float64, in its variance convention."""
        ...

    def write(self, layer: NormLayer, result: LayerResult) -> None:
        """Store new statistics; later batches must be computed with them."""
        ...

    def run(self, batch: Any, targets: Sequence[NormLayer], emit: Emit) -> None:
        """Run the model on one batch and call ``emit(name, x)`` with each target's input."""
        ...

    def sequential_passes(
        self, layers: list[NormLayer], first: Callable[[], Any]
    ) -> list[list[NormLayer]]:
        """The groups of layers of the sequential mode, in order (``first()``: a batch)."""
        ...

    def remote(self) -> Callable[[], Adapter]:
        """A picklable factory that rebuilds this adapter, with its current statistics, on a
        Dask worker."""
        ...


@dataclass(frozen=True)
class Settings:
    """How to calibrate.

    Attributes
    ----------
    stats : StatsSpec
        The estimator of every layer.
    mode : {"sequential", "one-pass"}
    progress : bool
        A progress bar on a terminal.
    client : distributed.Client, optional
        Run each pass on a Dask cluster, one task per shard of the data.
    tol : float, optional
        ``num_samples="auto"``: each pass stops once every channel's ``mean_se`` and
        ``var_se`` are below ``tol`` (after at least :data:`AUTO_MIN_BATCHES` batches).
    cache_bytes : int, default 1 GiB
        ``mode="sequential"`` with an adapter that offers cursors (``Adapter.cursors``): the
        bytes of paused forward passes kept between passes, so that each pass runs a batch on
        from where the previous one stopped instead of from the data (see
        :mod:`streamnorm.calibrate._sequential`); 0 recomputes every pass from the data. The
        results are the same either way.
    """

    stats: StatsSpec
    mode: str = "one-pass"
    progress: bool = True
    client: Any = None
    tol: float | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES

    @classmethod
    def checked(
        cls,
        stats: StatsSpec,
        mode: Any,
        progress: bool = True,
        client: Any = None,
        tol: float | None = None,
        cache_bytes: Any = None,
    ) -> Settings:
        """Settings from user arguments (``tol`` from :func:`check_budget`; ``cache_bytes``
        ``None`` for the default), or ``InputError``."""
        cache = (
            DEFAULT_CACHE_BYTES
            if cache_bytes is None
            else check_int("cache_bytes", cache_bytes, minimum=0)
        )
        settings = cls(stats, check_choice("mode", mode, MODES), bool(progress), client, tol, cache)
        if tol is not None and stats.estimator == "ema":
            raise InputError(
                "num_samples='auto' needs estimator='population' or 'cumulative': an EMA's "
                "error does not shrink with more data; give num_samples as a number"
            )
        if tol is not None and client is not None:
            raise InputError(
                "num_samples='auto' decides batch by batch and cannot run on a cluster "
                "(client=); give num_samples as a number, or run locally"
            )
        return settings


def check_budget(num_samples: Any, tol: Any) -> tuple[int | None, float | None]:
    """``(num_samples, tol)`` from user arguments: ``num_samples`` an int >= 1, ``None`` (all)
    or ``"auto"`` (then ``tol`` > 0, default 0.01, and the returned ``num_samples`` is None)."""
    if isinstance(num_samples, str):
        if num_samples != "auto":
            raise InputError(
                f"num_samples must be an integer >= 1, None or 'auto', got {num_samples!r}"
            )
        if tol is None:
            return None, DEFAULT_TOL
        if not is_number(tol):
            raise InputTypeError(f"tol must be a number, got {type(tol).__name__}")
        t = float(tol)
        if not (np.isfinite(t) and t > 0):
            raise InputError(f"tol must be a finite number > 0 (e.g. 0.01), got {tol!r}")
        return None, t
    if tol is not None:
        raise InputError(f"tol applies to num_samples='auto' only; got num_samples={num_samples!r}")
    return check_optional_positive_int("num_samples", num_samples), None


@dataclass(frozen=True)
class ShardJob:
    """One pass over one shard on a worker (picklable).

    Attributes
    ----------
    factory : callable
        :meth:`Adapter.remote` of the local adapter.
    names : tuple of str
        The layers to collect.
    stats : StatsSpec
    batch_size : int
    """

    factory: Callable[[], Adapter]
    names: tuple[str, ...]
    stats: StatsSpec
    batch_size: int


def shard_pass(shard: Any, *, job: ShardJob) -> dict[str, LayerStats]:
    """Per-layer statistics of one shard (runs on a Dask worker)."""
    adapter = job.factory()
    by_name = {layer.name: layer for layer in adapter.layers()}
    group = [by_name[n] for n in job.names]
    return _feed(adapter, iter_batches(shard, job.batch_size), group, job.stats, None)


def _feed(
    adapter: Adapter,
    batches: Any,
    group: list[NormLayer],
    spec: StatsSpec,
    bar: Any,
    tol: float | None = None,
    step: Callable[[Any, Emit], None] | None = None,
) -> dict[str, LayerStats]:
    """One pass of ``batches`` through ``adapter``, collecting the inputs of ``group``; with
    ``tol``, stop once every channel's standard errors are below it. ``step(item, emit)``
    handles one item of ``batches`` instead of ``adapter.run(item, group, emit)``."""
    starts = {x.name: adapter.read(x) for x in group} if spec.estimator == "ema" else {}
    stats = {x.name: LayerStats.new(x, spec, starts.get(x.name)) for x in group}
    axis = {x.name: x.channel_axis for x in group}

    def emit(name: str, x: np.ndarray) -> None:
        stats[name].add(x, axis[name])

    for batch in batches:
        if step is None:
            adapter.run(batch, group, emit)
        else:
            step(batch, emit)
        if bar is not None:
            bar.update(1)
        if tol is not None and _precise(stats.values(), tol):
            break
    return stats


def _precise(stats: Any, tol: float) -> bool:
    """Every layer saw :data:`AUTO_MIN_BATCHES` batches and has all its standard errors below
    ``tol``."""
    for st in stats:
        if st.batches < AUTO_MIN_BATCHES:
            return False
        mean_se, var_se = st.errors()
        if not (np.all(mean_se < tol) and np.all(var_se < tol)):
            return False
    return True


def _collect(
    adapter: Adapter,
    stream: Stream,
    group: list[NormLayer],
    settings: Settings,
    bar: Any,
    cached: tuple[Cache, int] | None = None,
) -> dict[str, LayerStats]:
    """The statistics of ``group`` over one pass; ``cached``: the cursors and the pass's
    index."""
    if cached is not None:
        cache, index = cached

        def step(item: tuple[int, Any], emit: Emit) -> None:
            cache.feed(item[0], item[1], index, group, emit)

        return _feed(adapter, cache.batches(stream), group, settings.stats, bar, settings.tol, step)
    if settings.client is None:
        return _feed(adapter, stream.batches(), group, settings.stats, bar, settings.tol)
    from ._distributed import map_merge

    job = ShardJob(
        adapter.remote(), tuple(x.name for x in group), settings.stats, stream.batch_size
    )
    merged = map_merge(settings.client, stream.shards(), functools.partial(shard_pass, job=job))
    if bar is not None:
        bar.update(stream.batches_per_pass() or 0)
    return {x.name: merged.get(x.name) or LayerStats.new(x, settings.stats) for x in group}


def _check_distributed(stream: Stream, settings: Settings) -> None:
    if settings.client is None:
        return
    if not stream.arraylike:
        raise InputTypeError(
            "client= needs array, tensor or file data, which can be split into shards; "
            f"got {type(stream.data).__name__}"
        )
    if settings.stats.estimator == "ema":
        raise InputError(
            "estimator='ema' depends on the order of all batches and cannot be split over "
            "workers; use 'population' or 'cumulative' with client="
        )


def calibrate(
    adapter: Adapter,
    stream: Stream,
    settings: Settings,
    undo: Callable[[], None] | None = None,
) -> CalibrationReport:
    """Recalibrate every layer of ``adapter`` on ``stream``; the report carries ``undo``.

    ``one-pass`` collects every layer in one pass; ``sequential`` makes one pass per group of
    :meth:`Adapter.sequential_passes` and writes each group's statistics before the next pass.
    All results of a group are computed and checked before any is written. If anything raises
    (``KeyboardInterrupt`` included), ``undo()`` puts the old statistics back before the
    exception propagates; the adapter's other changes to the model (modes, momenta) are the
    caller's to restore.
    """
    try:
        return _calibrate(adapter, stream, settings, undo)
    except BaseException:
        if undo is not None:
            undo()
        raise


def _write(
    adapter: Adapter, group: list[NormLayer], stats: dict[str, LayerStats], settings: Settings
) -> None:
    """Store the new statistics of ``group`` (all computed before any is written)."""
    new = {x.name: stats[x.name].result(x) for x in group if stats[x.name].batches}
    for x in group:
        st = stats[x.name]
        if x.name in new:
            result = LayerResult(
                new[x.name].mean,
                new[x.name].var,
                st.samples,
                st.batches,
                settings.stats.estimator == "ema",
            )
            adapter.write(x, result)


def _calibrate(
    adapter: Adapter,
    stream: Stream,
    settings: Settings,
    undo: Callable[[], None] | None,
) -> CalibrationReport:
    _check_distributed(stream, settings)
    layers = adapter.layers()
    before = {x.name: adapter.read(x) for x in layers}
    if settings.mode == "one-pass":
        passes = [list(layers)]
    else:
        passes = adapter.sequential_passes(list(layers), stream.first)
    per_pass = stream.batches_per_pass()
    bar = progress_bar(None if per_pass is None else per_pass * len(passes), settings.progress)
    seen: dict[str, LayerStats] = {}
    factory: Any = getattr(adapter, "cursors", None)
    use_cursors = (
        settings.mode == "sequential"
        and settings.client is None
        and settings.cache_bytes > 0
        and len(passes) > 1
        and callable(factory)
    )
    try:
        with factory(passes) if use_cursors else contextlib.nullcontext() as start:
            cache = None if start is None else Cache(start, settings.cache_bytes, adapter.run)
            try:
                for i, group in enumerate(passes):
                    if bar is not None and len(passes) > 1:
                        bar.set_description(f"pass {i + 1}/{len(passes)}")
                    cached = None if cache is None else (cache, i)
                    stats = _collect(adapter, stream, group, settings, bar, cached)
                    _write(adapter, group, stats, settings)
                    seen.update(stats)
            finally:
                if cache is not None:
                    cache.close()
    finally:
        if bar is not None:
            bar.close()
    reports: list[LayerReport] = []
    for group in passes:
        for x in group:
            st = seen[x.name]
            reports.append(
                layer_report(
                    x.name,
                    st.samples,
                    st.batches,
                    before[x.name],
                    adapter.read(x),
                    x.eps,
                    se=st.errors(),
                    spread=st.spread,
                    estimator=st.kind,
                )
            )
    total = max((r.samples for r in reports), default=0)
    if total == 0:
        raise InputError("data is empty: no batch reached any BatchNorm layer")
    converged = None
    if settings.tol is not None:
        converged = all(_precise([seen[x.name]], settings.tol) for x in layers if x.name in seen)
    return CalibrationReport(
        reports, settings.stats.estimator, settings.mode, total, undo, settings.tol, converged
    )
