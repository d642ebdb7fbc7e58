"""Sequential passes at about the cost of one: each batch's forward pass is kept where it paused.

``mode="sequential"`` needs every layer's input computed with all the layers of the earlier
passes already recalibrated. Recomputing the network from the data for every pass costs one
pass per group of layers. An adapter that can pause a forward pass offers cursors instead
(:meth:`Adapter.cursors`, optional): one :class:`Cursor` per batch holds that batch's forward
pass where it stopped, and each pass only runs it on to the next group. The results are those
of the recomputing passes (the same operations on the same values), in the same batch order.

Memory is bounded: :class:`Cache` keeps cursors while the bytes they hold stay within
``Settings.cache_bytes``; a batch beyond it (or whose cursor outgrows it, evicted from then on)
is recomputed from the data on every pass, as without cursors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ._stats import NormLayer

__all__ = ["DEFAULT_CACHE_BYTES", "Cache", "Cursor", "CursorFactory"]

#: the default ``Settings.cache_bytes``: the forward passes kept between sequential passes
DEFAULT_CACHE_BYTES = 1 << 30

_Emit = Callable[[str, np.ndarray], None]
_Run = Callable[[Any, Sequence[NormLayer], _Emit], None]


class Cursor(Protocol):
    """One batch's forward pass, paused between the passes of a sequential recalibration."""

    @property
    def finished(self) -> bool:
        """The forward pass has run to its end (it reaches no further layer)."""
        ...

    def advance(self, index: int, emit: _Emit) -> set[str]:
        """Run on until the layers of pass ``index`` had their input; the names handed.

        Every layer of the passes before ``index`` has its new statistics. The forward pass
        hands (``emit(name, x)``) the first input of each layer of pass ``index`` it reaches and
        pauses before any layer whose statistics are not final yet (one of pass ``index`` once
        its input was handed, one of a later pass before). A layer of pass ``index`` it did not
        hand is recomputed from the data by the core (when the cursor is not finished).
        """
        ...

    def nbytes(self) -> int:
        """About the bytes the paused pass holds (its batch and activations)."""
        ...

    def close(self) -> None:
        """Drop the paused pass (idempotent; never raises for the pass's own errors)."""
        ...


#: ``adapter.cursors(passes)``: a context manager (set up once per recalibration, torn down
#: whatever happens) that gives ``start(batch) -> Cursor``
CursorFactory = Callable[[list[list[NormLayer]]], AbstractContextManager[Callable[[Any], Cursor]]]


@dataclass
class _Entry:
    """One batch of the data: its cursor while it has one."""

    cursor: Cursor | None = None
    batch: Any = None
    evicted: bool = False
    nbytes: int = 0


@dataclass
class Cache:
    """The cursors of one sequential recalibration, one per batch within ``budget`` bytes.

    Attributes
    ----------
    start : callable
        ``start(batch) -> Cursor`` of the adapter.
    budget : int
        The bytes the cursors may hold together. A batch gets a cursor while the cursors hold
        less; a cursor that takes them beyond it is closed and its batch recomputed on every
        later pass (so the budget can be exceeded by one batch's pass at most).
    run : callable
        ``run(batch, targets, emit)`` of the adapter: one pass from the data.
    """

    start: Callable[[Any], Cursor]
    budget: int
    run: _Run
    entries: list[_Entry] = field(default_factory=list)
    total: int = 0
    complete: bool = False

    def batches(self, stream: Any) -> Iterator[tuple[int, Any]]:
        """``(index, batch)`` of one pass: from the cursors alone when every batch has one."""
        if self.complete and all(e.cursor is not None for e in self.entries):
            yield from enumerate(e.batch for e in self.entries)
            return
        yield from enumerate(stream.batches())
        self.complete = True

    def feed(self, k: int, batch: Any, index: int, group: Sequence[NormLayer], emit: _Emit) -> None:
        """Hand the inputs of the layers of pass ``index`` (``group``) on batch ``k``."""
        if k == len(self.entries):
            self.entries.append(_Entry())
        e = self.entries[k]
        if e.cursor is None and not e.evicted and self.total < self.budget:
            e.cursor, e.batch = self.start(batch), batch
        if e.cursor is None:
            self.run(batch, group, emit)
            return
        handed = e.cursor.advance(index, emit)
        rest = [x for x in group if x.name not in handed]
        if rest and not e.cursor.finished:
            self.run(e.batch, rest, emit)
        held = e.cursor.nbytes()
        self.total += held - e.nbytes
        e.nbytes = held
        if self.total > self.budget:
            self._evict(e)

    def _evict(self, e: _Entry) -> None:
        if e.cursor is not None:
            e.cursor.close()
        self.total -= e.nbytes
        e.cursor, e.batch, e.nbytes, e.evicted = None, None, 0, True

    def close(self) -> None:
        """Close every cursor."""
        for e in self.entries:
            if e.cursor is not None:
                self._evict(e)
