"""Tracker: named layers x named estimators, fed from one kernel pass per batch."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._compute import lean_rows, lean_state
from ._errors import InputError, InputTypeError, RecordError
from ._io import atomic_write, check_header, read_npz, record_int
from ._moments import Moments, moments
from ._validate import Axis, check_epoch, check_var_convention
from .estimators import Estimator, default_estimators
from .estimators import _kernels as EK
from .estimators import from_dict as estimator_from_dict
from .estimators._base import Owner, unpack

FORMAT_NAME = "streamnorm.Tracker"
FORMAT_VERSION = 1

#: Bytes of pending batch moments a layer holds before applying them to its estimators.
PENDING_BYTES = 512 * 1024
#: At most this many pending batches per layer.
MAX_PENDING = 32

_DEFAULT_AXIS: Any = object()


class _Layer(Owner):
    """One tracked layer: its estimators and the batches not yet applied to them.

    Built-in estimators receive batches in groups of up to ``MAX_PENDING``: one kernel call per
    estimator and group instead of one per batch. Any read of an estimator (``mean``, ``var``,
    ``to_dict``...) first applies what is pending, so nothing stale is ever visible. A group
    holds either batches whose dimensions all have the same count (one count per batch is
    kept) or batches with per-dimension counts, never both.

    The group is filed into arrays the layer owns (a batch's mean and M2 are copied there as
    it arrives), never kept as references to the batch's own arrays: those are then freed at
    once and their memory reused by the next batch, where holding them would draw fresh, cold
    memory for every batch.
    """

    def __init__(self, shape: tuple[int, ...], ests: dict[str, Any]) -> None:
        self.shape = shape
        self.ests = ests
        self.fast = [e for e in ests.values() if isinstance(e, Estimator)]
        self.slow = [e for e in ests.values() if not isinstance(e, Estimator)]
        self.need = max((e.min_batch_count for e in self.fast), default=0)
        self.D = D = int(np.prod(shape, dtype=np.int64))
        self.cap = cap = max(1, min(MAX_PENDING, PENDING_BYTES // max(1, 16 * D)))
        self.k = 0  # batches filed in the current group
        self.rows = np.empty((2, cap, D))  # the batches' means and M2s
        self.means, self.m2s = self.rows[0], self.rows[1]
        self.counts = np.empty((cap, 1))  # one count per batch (uniform groups)
        self.dim_counts: np.ndarray | None = None  # (cap, D), for groups of per-dim counts
        self.epochs = np.empty(cap, dtype=np.int64)
        self.uniform = True
        self.weighted = False
        for e in self.fast:
            e.attach(self)

    def push(
        self, n: Any, mu: np.ndarray, m2: np.ndarray, epoch: int, weighted: bool, uniform: bool
    ) -> None:
        """File a batch: ``n`` one count (``uniform``) or per-dimension counts ``(D,)``."""
        if uniform != self.uniform:
            self.flush()
            self.uniform = uniform
        i = self.k
        self.means[i] = mu
        self.m2s[i] = m2
        if uniform:
            self.counts[i, 0] = n
        else:
            if self.dim_counts is None:
                self.dim_counts = np.empty((self.cap, self.D))
            self.dim_counts[i] = n
        self.epochs[i] = epoch
        self.k = i + 1
        self.weighted = self.weighted or weighted
        if self.k == self.cap:
            self.flush()

    def flush(self) -> None:
        k = self.k
        if k == 0:
            return
        self.k = 0
        dim_counts = self.dim_counts
        n = self.counts[:k] if self.uniform or dim_counts is None else dim_counts[:k]
        mu, m2, ep = self.means[:k], self.m2s[:k], self.epochs[:k]
        weighted = self.weighted
        self.weighted = False
        for e in self.fast:
            e.feed_batches(self.shape, n, mu, m2, ep, weighted, self.uniform)


def _check_estimators(estimators: Any) -> dict[str, Any]:
    if estimators is None:
        return default_estimators()
    if not isinstance(estimators, Mapping):
        raise InputTypeError(
            "estimators must be a dict of name -> estimator (e.g. {'ema': streamnorm.EMA()}), "
            f"got {type(estimators).__name__}"
        )
    if not estimators:
        raise InputError("estimators is empty; pass at least one, or None for the default set")
    out: dict[str, Any] = {}
    for name, est in estimators.items():
        if not isinstance(name, str) or not name:
            raise InputTypeError(f"estimator names must be non-empty strings, got {name!r}")
        if not callable(getattr(est, "update", None)):
            raise InputTypeError(
                f"estimator {name!r} must have update(batch, *, epoch) (e.g. streamnorm.EMA()), "
                f"got {type(est).__name__}"
            )
        if isinstance(est, Estimator) and est.batches:
            raise InputError(
                f"estimator {name!r} has already seen {est.batches} batches; the Tracker copies "
                "prototypes for every layer, pass fresh ones (est.copy().reset())"
            )
        out[name] = copy.deepcopy(est)
    return out


class Tracker:
    """Named layers x named estimators, each batch moments computed once and fed to all.

    Parameters
    ----------
    estimators : dict of str to estimator, optional
        Prototypes: every layer gets its own deep copy of each at its first batch. ``None`` gives
        the default set (:func:`streamnorm.estimators.default_estimators`): ``population``,
        ``ema`` (PyTorch), ``ema_keras`` (Keras), ``cumulative`` (PyTorch ``momentum=None``),
        ``windowed`` (middle half of the epochs).
    reduce : callable, optional
        ``Moments -> Moments`` applied to every batch's moments before the estimators see them,
        e.g. an all-reduce across data-parallel processes.

    Notes
    -----
    The built-in estimators receive each layer's batches in small groups (one compiled call per
    estimator and group); reading any estimate, or an estimator object returned by
    :meth:`estimator`, first applies the pending batches, so results never lag and are
    bit-identical to feeding batch by batch. A saved and reloaded tracker continues exactly as
    an uninterrupted one. A tracker is not thread-safe: feed it from one thread at a time (with
    ``nn.DataParallel``'s replica threads, guard ``update`` with a lock).

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> rng = np.random.default_rng(0)
    >>> tr = streamnorm.Tracker({"pop": streamnorm.Population(), "ema": streamnorm.EMA(0.5)})
    >>> for epoch in range(2):
    ...     for _ in range(3):
    ...         _ = tr.update("bn1", rng.normal(2.0, 1.0, (16, 4, 5, 5)))  # NCHW: 4 channels
    ...     _ = tr.next_epoch()
    >>> tr.layers, tr.estimator_names, tr.estimator("bn1", "pop").count
    (['bn1'], ['pop', 'ema'], 2400)
    """

    def __init__(
        self,
        estimators: Mapping[str, Any] | None = None,
        *,
        reduce: Callable[[Moments], Moments] | None = None,
    ) -> None:
        if reduce is not None and not callable(reduce):
            raise InputTypeError(f"reduce must be a callable Moments -> Moments, got {reduce!r}")
        self._protos = _check_estimators(estimators)
        self._reduce = reduce
        self._layers: dict[str, _Layer] = {}
        self._epoch = 0
        # held while a batch is filed, buffered rows are flushed or the epoch moves
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- epochs
    @property
    def epoch(self) -> int:
        """The epoch the next batches belong to (starts at 0)."""
        return self._epoch

    def next_epoch(self) -> int:
        """Start the next epoch; returns its number."""
        with self._lock:
            self._epoch += 1
            return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Set the current epoch (``>= 0``, never lower than the current one)."""
        e = check_epoch(epoch)
        if e < self._epoch:
            raise InputError(
                f"epochs must not go backwards: the tracker is at epoch {self._epoch}, got {e}"
            )
        self._epoch = e

    # ---------------------------------------------------------------- feeding
    def update(
        self, layer: str, x: Any, axis: Axis = _DEFAULT_AXIS, **moments_kwargs: Any
    ) -> Moments:
        """Compute one batch's moments (one kernel pass) and feed every estimator of ``layer``.

        Parameters
        ----------
        layer : str
            The layer's name (e.g. a module name); new names are added in first-seen order.
        x : array_like or torch.Tensor, shape (N, C, ...) or (N,)
            The batch. CPU torch tensors are read without a copy (channels_last too).
        axis : int or tuple of int, optional
            Reduced axes, as in :func:`streamnorm.moments`. Default: every axis but 1 (BatchNorm
            channels: ``(N, C)`` -> ``0``, NCHW -> ``(0, 2, 3)``), and ``0`` for 1-D input.
        **moments_kwargs
            ``weights`` / ``nan_policy``, passed to :func:`streamnorm.moments`.

        Returns
        -------
        Moments
            The batch's moments as the estimators saw them (after ``reduce``).
        """
        if axis is _DEFAULT_AXIS and not moments_kwargs and type(x) is np.ndarray and x.ndim <= 2:
            # the common case, kept short: an (N, C) array
            if lean_rows(x, 0, None, "propagate"):
                return self._feed(layer, Moments.from_state(lean_state(x)))
            axis = 0
        elif axis is _DEFAULT_AXIS:
            nd = getattr(x, "ndim", None)
            nd = int(np.ndim(x)) if nd is None else int(nd)
            axis = 0 if nd <= 2 else (0, *range(2, nd))
        elif type(axis) is tuple and len(axis) == 1:
            axis = axis[0]  # the same reduction; an int takes the fast path of moments
        m = moments(x, axis, **moments_kwargs) if moments_kwargs else moments(x, axis)
        return self._feed(layer, m)

    def update_moments(self, layer: str, m: Moments) -> None:
        """Feed precomputed batch moments to every estimator of ``layer`` (``reduce`` applies)."""
        self._feed(layer, m)

    def _feed(self, layer: str, m: Moments) -> Moments:
        if self._reduce is not None:
            m = self._reduce(m)
            if not isinstance(m, Moments):
                raise InputTypeError(f"reduce must return a Moments, got {type(m).__name__}")
        with self._lock:  # one batch at a time, so that threads may share a tracker
            lay = self._layers.get(layer)
            st = m.state() if isinstance(m, Moments) else None
            if (
                lay is not None
                and st is not None
                and lay.uniform
                and not lay.slow
                and not st.per_dim
                and st.shape == lay.shape
                and st.total > lay.need - 1
            ):
                # the common case, kept short: every dimension with the same count, filed into the
                # group in one compiled call
                i = lay.k
                EK.file_row(lay.rows, i, st.mean, st.lo, st.m2)
                lay.counts[i, 0] = st.total
                lay.epochs[i] = self._epoch
                lay.k = i + 1
                if st.weighted:
                    lay.weighted = True
                if i + 1 == lay.cap:
                    lay.flush()
                return m
            return self._feed_general(layer, m, lay)

    def _feed_general(self, layer: str, m: Moments, lay: _Layer | None) -> Moments:
        if not isinstance(layer, str):
            raise InputTypeError(f"layer must be a str name, got {type(layer).__name__}")
        shape, n, mu, m2, cmin, weighted, uniform = unpack(m)
        if shape is None or n.size == 0:
            return m
        if lay is None:
            self._check_min(layer, shape, cmin, None)
            ests = {k: copy.deepcopy(v) for k, v in self._protos.items()}
            lay = self._layers[layer] = _Layer(shape, ests)
        elif shape != lay.shape:
            raise InputError(
                f"dimension mismatch in layer {layer!r}: it has dimension shape {lay.shape}, the "
                f"batch has {shape}; reduce over the axes that leave {lay.shape}"
            )
        elif lay.need and not cmin > lay.need - 1:
            self._check_min(layer, shape, cmin, lay)
        for e in lay.slow:
            e.update(m, epoch=self._epoch)
        lay.push(cmin if uniform else n, mu, m2, self._epoch, weighted, uniform)
        return m

    def _check_min(
        self, layer: str, shape: tuple[int, ...], cmin: float, lay: _Layer | None
    ) -> None:
        ests = lay.ests if lay is not None else self._protos
        for name, e in ests.items():
            if isinstance(e, Estimator):
                try:
                    e.check_batch(shape, cmin)
                except ValueError as err:
                    raise InputError(f"layer {layer!r}, estimator {name!r}: {err}") from None

    # ---------------------------------------------------------------- reading
    @property
    def layers(self) -> list[str]:
        """Layer names in first-seen order."""
        return list(self._layers)

    @property
    def estimator_names(self) -> list[str]:
        """Estimator names, in the order given."""
        return list(self._protos)

    def estimator(self, layer: str, name: str) -> Any:
        """The estimator object ``name`` of ``layer`` (live: it sees later batches)."""
        lay = self._layers.get(layer)
        if lay is None:
            raise KeyError(f"no layer {layer!r}; layers seen: {self.layers}")
        if name not in lay.ests:
            raise KeyError(f"no estimator {name!r}; estimators: {self.estimator_names}")
        with self._lock:
            lay.flush()
        return lay.ests[name]

    def estimates(self, *, convention: str | None = None) -> dict[str, dict[str, tuple[Any, Any]]]:
        """``{layer: {estimator: (mean, var)}}`` as float64 arrays (copies).

        Parameters
        ----------
        convention : {None, "unbiased", "biased"}
            ``None``: each estimator's own ``var`` (see its ``var_convention``). ``"unbiased"``:
            every variance in PyTorch's ``running_var`` convention; ``"biased"``: Keras/ONNX.
        """
        if convention is not None:
            check_var_convention(convention)
        out: dict[str, dict[str, tuple[Any, Any]]] = {}
        for layer, lay in list(self._layers.items()):
            with self._lock:
                lay.flush()
            row: dict[str, tuple[Any, Any]] = {}
            for name, e in lay.ests.items():
                if convention is None:
                    row[name] = (
                        np.asarray(e.mean, dtype=np.float64),
                        np.asarray(e.var, dtype=np.float64),
                    )
                elif not hasattr(e, "running_var"):
                    raise InputTypeError(
                        f"estimator {name!r} ({type(e).__name__}) has no running_var(convention); "
                        "call estimates() without convention"
                    )
                else:
                    row[name] = (
                        np.asarray(e.mean, dtype=np.float64),
                        np.asarray(e.running_var(convention), dtype=np.float64),
                    )
            out[layer] = row
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (_from_record, (self.to_dict(), self._reduce))

    def __repr__(self) -> str:
        return (
            f"Tracker(layers={len(self._layers)}, estimators={self.estimator_names}, "
            f"epoch={self._epoch})"
        )

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """Flat dict of numpy arrays and scalars (the content of :meth:`save`'s ``.npz``)."""
        d: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "epoch": self._epoch,
            "layers": np.array(list(self._layers), dtype=str),
            "estimators": np.array(list(self._protos), dtype=str),
        }
        for j, (name, proto) in enumerate(self._protos.items()):
            for k, v in _record(name, proto).items():
                d[f"proto.{j}.{k}"] = v
        for i, lay in enumerate(list(self._layers.values())):
            with self._lock:
                lay.flush()
            for j, (name, est) in enumerate(lay.ests.items()):
                for k, v in _record(name, est).items():
                    d[f"layer.{i}.{j}.{k}"] = v
        return d

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write every estimator's state to ``path`` (``.npz``, no pickle), atomically.

        Every estimator must provide ``to_dict()`` (the built-in ones do).
        """
        d = self.to_dict()
        atomic_write(path, lambda f: np.savez(f, **d))

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], *, reduce: Callable[[Moments], Moments] | None = None
    ) -> Tracker:
        """Rebuild a tracker from :meth:`to_dict`'s output.

        Raises
        ------
        ValueError
            Not a Tracker record, an unsupported version, or a corrupt or impossible state
            (:class:`~streamnorm._errors.RecordError`).
        """
        check_header(d, FORMAT_NAME, FORMAT_VERSION, "Tracker")
        for key in ("epoch", "layers", "estimators"):
            if key not in d.keys():
                raise RecordError(f"not a streamnorm Tracker record: missing {key!r}")
        epoch = record_int(d, "epoch", "Tracker", low=0)
        names = [str(s) for s in np.asarray(d["estimators"]).reshape(-1)]
        layers = [str(s) for s in np.asarray(d["layers"]).reshape(-1)]
        groups: dict[str, dict[str, Any]] = {}
        for key in d.keys():
            head, _, rest = str(key).rpartition(".")
            if head.startswith(("proto.", "layer.")):
                groups.setdefault(head, {})[rest] = d[key]
        protos = {
            name: estimator_from_dict(groups.get(f"proto.{j}", {})) for j, name in enumerate(names)
        }
        out = cls(protos, reduce=reduce)
        out._epoch = epoch
        for i, layer in enumerate(layers):
            ests = {
                name: estimator_from_dict(groups.get(f"layer.{i}.{j}", {}))
                for j, name in enumerate(names)
            }
            shapes = {e.shape for e in ests.values()}
            if len(shapes) != 1 or None in shapes:
                raise RecordError(
                    f"corrupt Tracker record: layer {layer!r} has inconsistent estimators"
                )
            shape = shapes.pop()
            if shape is None:  # pragma: no cover - excluded above
                raise RecordError(f"corrupt Tracker record: layer {layer!r} is empty")
            out._layers[layer] = _Layer(shape, ests)
        return out

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, reduce: Callable[[Moments], Moments] | None = None
    ) -> Tracker:
        """Read a file written by :meth:`save`; ``ValueError`` for a truncated or foreign file."""
        return cls.from_dict(read_npz(path, "Tracker"), reduce=reduce)


def _from_record(d: dict[str, Any], reduce: Callable[[Moments], Moments] | None) -> Tracker:
    """Unpickling: a tracker from its record (the ``reduce`` callable must pickle too)."""
    return Tracker.from_dict(d, reduce=reduce)


def _record(name: str, est: Any) -> dict[str, Any]:
    to_dict = getattr(est, "to_dict", None)
    if not isinstance(est, Estimator) or to_dict is None:
        raise InputTypeError(
            f"estimator {name!r} ({type(est).__name__}) cannot be saved: only streamnorm "
            "estimators (subclasses of streamnorm.estimators.Estimator) can"
        )
    return to_dict()
