"""Exact all-reduce of :class:`~streamnorm.Moments` across ``torch.distributed`` ranks."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import InputError, InputTypeError
from .._extras import require
from .._moments import Moments
from .._state import State

__all__ = ["all_reduce_moments"]

#: Header slots before the padded dimension shape: empty, ndim, size, total, weighted, per_dim.
_HEAD = 6
#: Largest number of dimension axes a state may have (numpy's own limit).
_MAX_NDIM = 64


def _device(dist: Any, torch: Any, group: Any) -> Any:
    """CPU tensors for gloo/mpi, the current CUDA device for NCCL (which only moves GPU memory)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(
    dist: Any, torch: Any, arr: np.ndarray, group: Any, device: Any, world: int
) -> list[np.ndarray]:
    """``all_gather`` of a float64 array of the same shape on every rank, in rank order."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).to(device)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return [o.cpu().numpy() for o in out]


def _header(st: State | None) -> np.ndarray:
    h = np.zeros(_HEAD + _MAX_NDIM)
    h[0] = 1.0 if st is None else 0.0
    if st is not None:
        h[1] = len(st.shape)
        h[2] = st.size
        h[_HEAD : _HEAD + len(st.shape)] = st.shape
        h[3] = st.total
        h[4] = float(st.weighted)
        h[5] = float(st.per_dim)
    return h


def all_reduce_moments(m: Moments, group: Any = None) -> Moments:
    """Merge a :class:`~streamnorm.Moments` across all ranks of a ``torch.distributed`` group.

    Every rank calls it with its own state and gets the same merged state back (same bits on
    every rank); the input is not changed. Pass it as ``Tracker(reduce=all_reduce_moments)`` so
    that every rank's estimators see the statistics of the global batch.

    Parameters
    ----------
    m : Moments, dimension shape (D...)
        This rank's state; the same dimension shape on every rank, or empty (no data on this
        rank; it then contributes nothing).
    group : torch.distributed.ProcessGroup, optional
        The ranks to merge over (the default group if omitted).

    Returns
    -------
    Moments
        The Chan merge of all ranks' states, in rank order.

    Raises
    ------
    ValueError
        ``torch.distributed`` is not initialized, or the ranks' dimension shapes differ (raised
        on every rank, so none is left waiting).

    Notes
    -----
    The ranks exchange counts, means (with their rounding residuals) and M2 (two ``all_gather``
    calls, float64, exact) and merge them with ``M2 = sum M2_r + sum n_r (mean_r - mean)^2``,
    the law of total variance. Averaging
    the ranks' variances instead (what a plain ``all_reduce(var) / world`` gives) ignores the
    spread between the ranks' means and weighs ranks equally whatever their counts, so the
    ranks' running statistics drift apart from the global ones. With NCCL the tensors go through
    the current CUDA device.
    """
    torch = require("torch")
    if not isinstance(m, Moments):
        raise InputTypeError(
            f"all_reduce_moments takes a streamnorm.Moments, got {type(m).__name__}"
        )
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise InputError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group(...) "
            "in every process first (or do not all-reduce in a single process)"
        )
    world = dist.get_world_size(group)
    if world == 1:
        return m.copy()
    if m.shape is not None and len(m.shape) > _MAX_NDIM:
        raise InputError(f"states with more than {_MAX_NDIM} dimension axes are not supported")
    device = _device(dist, torch, group)
    st = m.state()
    heads = _gather(dist, torch, _header(st), group, device, world)
    shapes = {tuple(int(s) for s in h[_HEAD : _HEAD + int(h[1])]) for h in heads if h[0] == 0.0}
    if len(shapes) > 1:
        raise InputError(
            f"ranks hold Moments of different dimension shapes {sorted(shapes)}; every rank must "
            "reduce over the same axes of inputs with the same dimensions"
        )
    if not shapes:  # no rank has data yet
        return Moments()
    (shape,) = shapes
    size = int(np.prod(shape, dtype=np.int64))
    if st is None:
        mine = np.stack([np.zeros(size), np.full(size, np.nan), np.zeros(size), np.zeros(size)])
    else:
        mine = np.stack([st.n, st.mean, st.lo, st.m2])
    parts = _gather(dist, torch, mine, group, device, world)
    out = Moments()
    for h, p in zip(heads, parts, strict=True):
        if h[0] != 0.0:
            continue
        out += Moments.from_state(
            State(
                n=p[0],
                mean=p[1],
                lo=p[2],
                m2=p[3],
                shape=shape,
                total=float(h[3]),
                weighted=bool(h[4]),
                per_dim=bool(h[5]),
            )
        )
    return out
