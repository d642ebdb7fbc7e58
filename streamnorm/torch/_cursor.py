"""Paused forward passes for sequential recalibration (:class:`streamnorm.calibrate.Cursor`).

A PyTorch forward pass cannot be stopped and resumed, so each cursor runs its batch's forward
pass in a thread of its own that waits in the pre-hook of every norm layer whose new statistics
are not written yet. The core drives one cursor at a time and waits while it runs: the threads
never run together (the work and its order are those of one pass after another), and every
layer's input reaches the core's ``emit`` on the calling thread.

Grad mode and autocast are per thread: the thread runs its forward pass under
``torch.no_grad()``, as the passes from the data do, and under the caller's autocast (CPU and
CUDA). Other thread-local settings (``torch.cuda.set_device``) are not carried over.

An exception in a thread ends that thread and is raised by :meth:`ThreadCursor.advance` in the
caller; closing a cursor (the core closes every one whatever happens, ``KeyboardInterrupt``
included) makes a waiting thread raise out of its forward pass and waits for it to end.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._extras import require
from ..calibrate import Cursor, NormLayer
from ._hooks import UPCAST

torch = require("torch")

__all__ = ["ThreadCursor", "thread_cursors"]


class _Abort(BaseException):
    """Unwinds a closed cursor's forward pass (a ``BaseException``: user code that catches
    ``Exception`` lets it through)."""


class _Pool:
    """What the cursors of one recalibration share: the pass of each layer, the model call,
    and which cursor (if any) the current thread runs."""

    def __init__(self, index: dict[str, int], call: Callable[[Any], None]) -> None:
        self.index = index
        self.call = call
        self.local = threading.local()
        self.autocast = _autocast_now()

    def run(self, batch: Any) -> None:
        """``call(batch)`` without gradients, under the autocast of the thread that made the
        pool."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            for device, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            self.call(batch)

    def hook(self, name: str) -> Callable[..., None]:
        def pre_hook(module: Any, args: tuple[Any, ...]) -> None:
            cursor = getattr(self.local, "cursor", None)
            if cursor is not None:
                cursor.reached(name, args[0])

        return pre_hook


def _nbytes(x: Any) -> int:
    n = getattr(x, "nbytes", 0)
    return int(n) if isinstance(n, int) else 0


class ThreadCursor:
    """One batch's forward pass in a thread, paused before norm layers (see the module)."""

    def __init__(self, pool: _Pool, batch: Any) -> None:
        self.pool = pool
        self.batch = batch
        self.cond = threading.Condition()
        self.now = -1
        self.started = False
        self.running = False
        self.done = False
        self.abort = False
        self.error: BaseException | None = None
        self.waiting_for = -1
        self.handed: set[str] = set()
        self.out: list[tuple[str, np.ndarray]] = []
        self.held = 0
        self.thread = threading.Thread(target=self._main, name="streamnorm-cursor", daemon=True)

    # ---------------------------------------------------------------- the calling thread

    @property
    def finished(self) -> bool:
        return self.done

    def advance(self, index: int, emit: Callable[[str, np.ndarray], None]) -> set[str]:
        """Let the pass run until it pauses again (see :class:`~streamnorm.calibrate.Cursor`)."""
        with self.cond:
            self.now = index
            if self.done:
                return set()
            if self.started and self.waiting_for > index:
                return set()  # it waits before a layer of a later pass
            self.running = True
            if self.started:
                self.cond.notify_all()
            else:
                self.started = True
                self.thread.start()
            while self.running:
                self.cond.wait()
            out, self.out = self.out, []
            if self.error is not None:
                raise self.error
        for name, x in out:
            emit(name, x)
        return {name for name, _ in out}

    def nbytes(self) -> int:
        """The batch and twice the input of the layer the pass waits at (what the paused
        frames hold besides it, a residual or a list of features, is about as large)."""
        return 0 if self.done else _nbytes(self.batch) + 2 * self.held

    def close(self) -> None:
        with self.cond:
            if not self.started or self.done:
                return
            self.abort = True
            self.running = True
            self.cond.notify_all()
        self.thread.join()

    # ---------------------------------------------------------------- the cursor's thread

    def _main(self) -> None:
        self.pool.local.cursor = self
        try:
            self.pool.run(self.batch)
        except _Abort:
            pass
        except BaseException as e:  # raised in the caller by advance()
            self.error = e
        finally:
            self.pool.local.cursor = None
            with self.cond:
                self.done = True
                self.running = False
                self.held = 0
                self.cond.notify_all()

    def reached(self, name: str, x: Any) -> None:
        """The pre-hook of layer ``name`` in this cursor's thread: hand its first input when its
        pass is the current one, and wait while its statistics are not final."""
        j = self.pool.index[name]
        with self.cond:
            while True:
                if self.abort:
                    raise _Abort
                if j < self.now or name in self.handed:
                    return  # final (a layer called again is handed once, as a pass would)
                if j == self.now:
                    self.out.append((name, _numpy(x)))
                    self.handed.add(name)
                self.held = _nbytes_tensor(x)
                self.waiting_for = j if name not in self.handed else j + 1
                self.running = False
                self.cond.notify_all()
                while not self.running:
                    self.cond.wait()


def _autocast_now() -> list[tuple[str, Any]]:
    """The devices with autocast on in this thread, and their dtypes."""
    on = []
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            on.append((device, torch.get_autocast_dtype(device)))
    return on


def _nbytes_tensor(x: Any) -> int:
    return int(x.element_size() * x.numel()) if isinstance(x, torch.Tensor) else 0


def _numpy(x: Any) -> np.ndarray:
    t = x.detach()
    if t.dtype in UPCAST:
        t = t.float()
    return np.asarray(t.cpu().numpy())


@contextlib.contextmanager
def thread_cursors(
    modules: dict[str, Any], passes: list[list[NormLayer]], call: Callable[[Any], None]
) -> Iterator[Callable[[Any], Cursor]]:
    """``start(batch) -> ThreadCursor`` for one sequential recalibration.

    Parameters
    ----------
    modules : dict of str to torch.nn.Module
        The norm layers by name; each gets a pre-hook, removed on exit.
    passes : list of list of NormLayer
        The passes, in order.
    call : callable
        ``call(batch)`` runs the model on a batch (in the cursor's thread).

    Every cursor started is closed on exit (its thread ended), whatever happens.
    """
    pool = _Pool({x.name: i for i, group in enumerate(passes) for x in group}, call)
    made: list[ThreadCursor] = []
    handles = [modules[name].register_forward_pre_hook(pool.hook(name)) for name in pool.index]

    def start(batch: Any) -> Cursor:
        cursor = ThreadCursor(pool, batch)
        made.append(cursor)
        return cursor

    try:
        yield start
    finally:
        try:
            for cursor in made:
                cursor.close()
        finally:
            for h in handles:
                h.remove()
