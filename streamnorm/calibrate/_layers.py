"""What the adapters of frameworks with hooks share: choosing norm layers by name, watching a
forward pass (:class:`WatchedAdapter`), ordering layers by it."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .._errors import InputError, InputTypeError
from ._run import Emit
from ._stats import NormLayer

__all__ = ["ForwardPass", "StopPass", "WatchedAdapter", "forward_order", "select_layers"]

T = TypeVar("T")


def select_layers(
    found: list[tuple[str, T]], layers: Iterable[str] | None, kind: str = "BatchNorm"
) -> list[tuple[str, T]]:
    """The ``(name, layer)`` pairs of ``found`` named in ``layers``, in the order given.

    Parameters
    ----------
    found : list of (str, layer)
        Every norm layer of the model, with its name.
    layers : iterable of str, optional
        The names to keep; all of ``found`` when ``None``.
    kind : str, default "BatchNorm"
        What the layers are called in the framework, for the error message.

    Returns
    -------
    list of (str, layer)
        ``InputTypeError`` for a single string, ``InputError`` for a name not in ``found``.
    """
    if layers is None:
        return found
    if isinstance(layers, str):
        raise InputTypeError(
            f"layers must be an iterable of layer names, got the string {layers!r}"
        )
    by_name = dict(found)
    chosen = []
    for name in layers:
        if name not in by_name:
            raise InputError(
                f"layer {name!r} is not a {kind} layer of the model; "
                f"its {kind} layers are {sorted(by_name)}"
            )
        chosen.append((name, by_name[name]))
    return chosen


def forward_order(layers: list[NormLayer], forward: Callable[[Emit], Any]) -> list[list[NormLayer]]:
    """One layer per pass, in the order a forward pass reaches them: the sequential passes of
    an adapter that can watch a forward pass.

    Parameters
    ----------
    layers : list of NormLayer
    forward : callable
        ``forward(emit)`` runs the model on one batch and calls ``emit(name, x)`` when each of
        ``layers`` gets its input.

    Returns
    -------
    list of list of NormLayer
        ``[[first reached], [second reached], ...]``; layers the pass did not reach come last,
        in their given order.
    """
    order: list[str] = []

    def record(name: str, x: np.ndarray) -> None:
        if name not in order:
            order.append(name)

    forward(record)
    by_name = {x.name: x for x in layers}
    rest = [x.name for x in layers if x.name not in order]
    return [[by_name[n]] for n in order + rest]


class StopPass(BaseException):
    """Ends a forward pass once its targets had their input (the rest is not needed). A
    ``BaseException``, so that frameworks and user code that catch or rewrap ``Exception``
    (Keras' traceback filtering) let it through unchanged."""


@dataclass
class ForwardPass:
    """The layers a running forward pass collects, and where their inputs go.

    Attributes
    ----------
    emit : callable
        ``emit(name, x)`` of the core.
    pending : set of str
        The targets that have not had their input yet.
    stop_early : bool
        End the pass (:class:`StopPass`) once ``pending`` is empty.
    """

    emit: Emit
    pending: set[str]
    stop_early: bool

    def hand(self, name: str, x: np.ndarray) -> None:
        """Emit one input of layer ``name``; raise :class:`StopPass` when it was the last
        one needed."""
        self.emit(name, x)
        self.pending.discard(name)
        if self.stop_early and not self.pending:
            raise StopPass


class WatchedAdapter(abc.ABC):
    """The ``run`` and ``sequential_passes`` of an :class:`~streamnorm.calibrate.Adapter` that
    sees each layer's input during a forward pass (hooks, patched calls).

    A subclass says whether it runs ``one_pass`` and implements :meth:`call_model`; in
    sequential mode each pass stops once its layer had its input, and the passes follow the
    order a forward pass on the first batch reaches the layers (:func:`forward_order`).
    """

    one_pass: bool

    @abc.abstractmethod
    def call_model(self, batch: Any, current: ForwardPass) -> None:
        """Run the model on ``batch``, calling ``current.hand(name, x)`` with the input of each
        layer named in ``current.pending``."""

    def watch(
        self, batch: Any, targets: Sequence[NormLayer], emit: Emit, *, stop_early: bool
    ) -> None:
        """One forward pass that hands the targets' inputs to ``emit``."""
        try:
            self.call_model(batch, ForwardPass(emit, {x.name for x in targets}, stop_early))
        except StopPass:
            pass

    def run(self, batch: Any, targets: Sequence[NormLayer], emit: Emit) -> None:
        self.watch(batch, targets, emit, stop_early=not self.one_pass)

    def sequential_passes(
        self, layers: list[NormLayer], first: Callable[[], Any]
    ) -> list[list[NormLayer]]:
        """One layer per pass, in the order a forward pass on the first batch reaches them."""
        return forward_order(
            layers, lambda emit: self.watch(first(), layers, emit, stop_early=False)
        )
