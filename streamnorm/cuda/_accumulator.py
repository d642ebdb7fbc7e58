"""The device-resident accumulator :class:`DeviceMoments`."""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

import numpy as np

from .._errors import InputError
from .._extras import require
from .._moments import Moments
from .._state import State
from .._validate import Axis, check_axes, check_nan_policy, check_weights, nonfinite_message
from . import _config as C
from . import _kernels as K
from ._intake import DeviceInput, describe, flat_view, simulated, stream_for
from ._plan import DevicePlan, plan

cuda = require("numba.cuda", "cuda")


class BFloat16Bits:
    """Mark a device array of 16-bit integers as holding bfloat16 bit patterns.

    For producers that cannot export bfloat16 itself: ``BFloat16Bits(t.view(torch.int16))`` or a
    CuPy ``uint16`` array. PyTorch bfloat16 CUDA tensors need no wrapper (they travel by DLPack).

    Parameters
    ----------
    x : device array of uint16 or int16, any shape
    """

    def __init__(self, x: Any) -> None:
        self.array = x

    @property
    def __cuda_array_interface__(self) -> Any:
        return self.array.__cuda_array_interface__


def _pow2_at_most(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def _geometry(
    shape: tuple[int, ...], axis: Axis
) -> tuple[tuple[int, ...], int, tuple[int, ...], int]:
    """``(axes, samples per dimension, kept shape, dimensions)``, cached for hashable ``axis``."""
    try:
        return _geometry_cached(shape, axis)
    except TypeError:  # an unhashable axis (a list)
        return _geometry_cached.__wrapped__(shape, axis)


@lru_cache(maxsize=256)
def _geometry_cached(
    shape: tuple[int, ...], axis: int | tuple[int, ...] | None
) -> tuple[tuple[int, ...], int, tuple[int, ...], int]:
    if len(shape) == 0:
        raise InputError(
            "x is 0-d (a single number, shape ()); moments reduce over samples along an axis, "
            "so pass at least a 1-D array of samples"
        )
    axes = check_axes(axis, len(shape))
    nsamp = int(np.prod([shape[a] for a in axes], dtype=np.int64))
    kept = tuple(s for i, s in enumerate(shape) if i not in axes)
    return axes, nsamp, kept, int(np.prod(kept, dtype=np.int64))


def _itab(p: DevicePlan) -> np.ndarray:
    """The kernels' int64 offsets table: group sizes, group strides, per-dimension offsets."""
    mg = C.MAX_GROUPS
    t = np.zeros(2 * mg + (p.D if p.koff is not None else 0), dtype=np.int64)
    t[: len(p.gsizes)] = p.gsizes
    t[mg : mg + len(p.gstrides)] = p.gstrides
    if p.koff is not None:
        t[2 * mg :] = p.koff
    return t


def _cf_groups(A: int, L: int) -> tuple[int, int, int]:
    """Channels-first geometry: threads per item, elements per item, items per row.

    A group of ``rg`` threads reads one item (a row, or a segment of a long row); ``rg`` grows
    with the row length so that each thread gets a few full tiles, and is the whole block when
    there are too few items to give every group one.
    """
    NT, KU = C.CF_THREADS, C.CF_UNROLL
    rg = min(NT, max(32, _pow2_at_least(max(1, L // (KU * C.CF_TILES_PER_LANE)), NT)))
    seg = rg * KU * C.CF_SEG_TILES
    nseg_row = -(-L // seg)
    if A * nseg_row < NT // rg:
        rg = NT
        seg = rg * KU * C.CF_SEG_TILES
        nseg_row = -(-L // seg)
    return rg, seg, nseg_row


def _pow2_at_least(n: int, cap: int) -> int:
    p = 1
    while p < n and p < cap:
        p *= 2
    return p


class DeviceMoments:
    """Per-dimension count, mean and M2 that stay on the GPU between batches.

    ``update`` launches kernels on the producer's stream and returns without waiting for them;
    :meth:`to_host` synchronizes once and returns a :class:`streamnorm.Moments`. The state is
    float64 whatever the input dtype.

    Parameters
    ----------
    x : device array, optional
        A first batch (``DeviceMoments(x, axis)`` equals ``DeviceMoments().update(x, axis)``).
    axis, weights, nan_policy
        As in :meth:`update`.

    Notes
    -----
    Each batch is reduced in tiles of 8 or 16 elements per thread, each tile in one pass around
    its own first element (which bounds the cancellation by the tile length, as accurate as a
    two-pass; partial and weighted tiles use Welford's update), after a shift by the dimension's
    first element. Tiles, threads (a binary tree in shared memory), blocks (a fixed strided-then-
    tree order) and the batch into the state are combined with Chan et al.'s merge in a fixed
    order and without atomics, so the same data give the same bits on every run. Results agree
    with the CPU path to rounding (about 1e-15 relative, at most a few 1e-14 seen on an H200).

    Updates from different streams are ordered with an event, without a host synchronization.
    ``nan_policy="raise"`` has to look at the result, so it synchronizes. Work buffers are kept
    per instance and reused across batches of the same shape.

    Examples
    --------
    >>> from numba import cuda                                    # doctest: +SKIP
    >>> dm = DeviceMoments()                                      # doctest: +SKIP
    >>> for x in batches:                                         # doctest: +SKIP
    ...     dm.update(cuda.to_device(x), axis=(0, 2, 3))
    >>> dm.to_host().var(ddof=1)                                  # doctest: +SKIP
    """

    def __init__(
        self,
        x: Any = None,
        axis: Axis = 0,
        *,
        weights: Any = None,
        nan_policy: str = "propagate",
    ) -> None:
        self._shape: tuple[int, ...] | None = None
        self._state: Any = None  # float64 (4, D): count, mean, M2, mean residual
        self._fresh = False  # the state holds no batch yet (the next one is written, not merged)
        self._total = 0.0
        self._weighted = False
        self._per_dim = False
        self._stream: Any = None
        self._stream_key = 0
        self._event: Any = None
        self._work: dict[tuple[Any, ...], Any] = {}
        if x is not None:
            self.update(x, axis, weights=weights, nan_policy=nan_policy)

    # ---- read-only
    @property
    def shape(self) -> tuple[int, ...] | None:
        """Dimension shape (the axes not reduced), or ``None`` before the first update."""
        return self._shape

    def device_arrays(self) -> tuple[Any, Any, Any]:
        """The state on the device: ``(count, mean, m2)``, flat float64 numba device arrays.

        Empty dimensions have count 0 and mean NaN. No synchronization: order any use on
        another stream after :attr:`stream`.
        """
        if self._shape is None:
            raise ValueError("empty DeviceMoments: no data yet, call update() first")
        self._settle()
        return self._state[0], self._state[1], self._state[2]

    @property
    def stream(self) -> Any:
        """The stream of the last update (numba stream), or None before the first."""
        return self._stream

    def to_host(self) -> Moments:
        """Copy the state to the host (one synchronization) as a :class:`streamnorm.Moments`."""
        return Moments.from_state(self.host_state())

    def host_state(self) -> State | None:
        """The state copied to the host (one synchronization); ``None`` before the first batch.

        Flat float64 arrays with the means' rounding residuals: the internal state type that
        :meth:`streamnorm.Moments.from_state` takes.
        """
        if self._shape is None:
            return None
        self._settle()
        st = self._stream
        h = self._state.copy_to_host(stream=st)
        st.synchronize()
        return State(
            n=h[0].copy(),
            mean=h[1].copy(),
            lo=h[3].copy(),
            m2=h[2].copy(),
            shape=self._shape,
            total=self._total,
            weighted=self._weighted,
            per_dim=self._per_dim,
        )

    def __repr__(self) -> str:
        if self._shape is None:
            return "DeviceMoments(empty)"
        return f"DeviceMoments(shape={self._shape}, samples={self._total!r})"

    # ---- updating
    def update(
        self,
        x: Any,
        axis: Axis = 0,
        *,
        weights: Any = None,
        nan_policy: str = "propagate",
    ) -> DeviceMoments:
        """Add a device batch without a host synchronization.

        Parameters
        ----------
        x : device array, shape (..., D...)
            Anything with ``__cuda_array_interface__`` or DLPack on a CUDA device (numba device
            arrays, CuPy arrays, PyTorch CUDA tensors of any strides, float16/bfloat16/float32/
            float64, ints, bool), or :class:`BFloat16Bits`. Nothing is copied.
        axis : int or tuple of int or None, default 0
            Axes to reduce over, as in :meth:`streamnorm.Moments.update`: ``(N, D)``: ``0``;
            NCHW: ``(0, 2, 3)``; channels-last NHWC: ``(0, 1, 2)``; per sample: ``(2, 3)``.
        weights : array_like, shape (n,), optional
            One non-negative weight per sample along the first reduced axis. A device array is
            copied to the host for its check and sum (n numbers, one synchronization).
        nan_policy : {"propagate", "raise", "omit"}
            As in :meth:`streamnorm.Moments.update`. ``raise`` synchronizes to look.

        Returns
        -------
        self
        """
        nan_policy = check_nan_policy(nan_policy)
        d = x if isinstance(x, DeviceInput) else describe_input(x)
        if nan_policy == "raise":
            tmp = DeviceMoments()
            tmp._order(d)
            tmp._add(d, axis, weights, omit=False)
            if tmp._shape is not None:
                _raise_if_nonfinite(tmp, d, axis)
                self._merge_state(tmp)
            return self
        self._order(d)
        self._add(d, axis, weights, omit=nan_policy == "omit")
        return self

    def _order(self, d: DeviceInput) -> None:
        """Use the producer's stream; after a switch, the new stream waits for the old one."""
        key = d.stream or 0
        if self._stream is not None and key == self._stream_key:
            return
        st = stream_for(d.stream)
        if self._stream is not None:
            self._event_on(self._stream).wait(st)
        self._stream, self._stream_key = st, key

    def _event_on(self, stream: Any) -> Any:
        """An event recorded now on ``stream`` (after everything enqueued on it so far)."""
        if self._event is None:
            self._event = cuda.event() if simulated() else cuda.event(timing=False)
        self._event.record(stream)
        return self._event

    def _add(self, d: DeviceInput, axis: Axis, weights: Any, *, omit: bool) -> None:
        axes, nsamp, kept, D = _geometry(d.shape, axis)
        w = None
        if weights is not None:
            if not axes:
                raise InputError("weights need at least one reduced axis; got axis=()")
            w = check_weights(host_weights(weights), d.shape[axes[0]], axes[0])
        if nsamp == 0:
            return
        if w is None:
            total = float(nsamp)
        else:
            total = float(w.sum()) * (nsamp // d.shape[axes[0]])
        p = None if D == 0 else plan(d.shape, d.strides, axes, axes[0] if w is not None else None)
        self._ensure_state(kept, D)
        if p is not None:
            self._launch(d, p, w, omit, ("itab", d.shape, d.strides, axes, C.MAX_GROUPS))
        self._total += total
        self._weighted = self._weighted or w is not None
        self._per_dim = self._per_dim or omit

    def _ensure_state(self, kept: tuple[int, ...], D: int) -> None:
        if self._shape is None:
            self._shape = kept
            self._state = cuda.device_array((4, D), np.float64, stream=self._stream)
            self._fresh = True  # the first batch writes it: no initialization needed
        elif kept != self._shape:
            raise InputError(
                f"dimension mismatch: this DeviceMoments has dimension shape {self._shape}, "
                f"the batch has {kept}; reduce over the axes that leave {self._shape}"
            )

    def _settle(self) -> None:
        """Give a state that has seen no batch yet its empty values (count 0, mean NaN)."""
        if self._fresh:
            D = self._state.shape[1]
            init = np.zeros((4, D))
            init[1] = np.nan
            self._state.copy_to_device(init, stream=self._stream)
            self._fresh = False

    def _buffer(self, key: tuple[Any, ...], make: Any) -> Any:
        buf = self._work.get(key)
        if buf is None:
            buf = make()
            self._work[key] = buf
        return buf

    def _launch(
        self, d: DeviceInput, p: DevicePlan, w: np.ndarray | None, omit: bool, key: Any
    ) -> None:
        st = self._stream
        x = flat_view(d, p.base, p.span)
        itab = self._buffer(key, lambda: cuda.to_device(_itab(p), stream=st))
        if w is not None:
            wd = cuda.to_device(np.ascontiguousarray(w[::-1] if p.w_flip else w), stream=st)
        else:
            wd = self._buffer(("dummy_f8",), lambda: cuda.to_device(np.zeros(1), stream=st))
        D = p.D
        if p.kind == "rows":
            NT = C.BLOCK_THREADS
            TX = _pow2_at_least(D, min(32, NT))  # columns per block, coalesced
            TY = NT // TX  # row lanes per column
            step = TY * C.UNROLL
            rpc = max(step, (C.ROWS_CHUNK_ELEMS // TX) // step * step)
            P = -(-p.rows // rpc)
            ntiles = -(-D // TX)
        else:
            NT = C.CF_THREADS
            rg, seg, nseg_row = _cf_groups(p.rows, p.L)
            P = -(-(p.rows * nseg_row) // C.CF_ITEMS_PER_CHUNK)
        part, ref = self._buffer(
            ("part", D, P),
            lambda: (
                cuda.device_array((3, D, P), np.float64, stream=st),
                cuda.device_array(D, np.float64, stream=st),
            ),
        )
        ng, ktab, use_w = len(p.gsizes), p.koff is not None, w is not None
        with warnings.catch_warnings():
            # small batches make small grids; numba's low-occupancy warning is not for users here
            warnings.filterwarnings("ignore", message=".*under-utilization.*")
            if p.kind == "rows":
                kern = K.rows_kernel(ng, ktab, use_w, omit, d.bf16)
                kern[ntiles * P, (TX, TY), st](
                    x,
                    itab,
                    p.kbase,
                    p.kstride,
                    D,
                    p.rows,
                    rpc,
                    ntiles,
                    wd,
                    p.w_inner,
                    p.w_n,
                    ref,
                    part,
                )
            else:
                kern = K.cf_kernel(ng, ktab, use_w, omit, d.bf16)
                kern[D * P, NT, st](
                    x,
                    itab,
                    p.kbase,
                    p.kstride,
                    D,
                    p.rows,
                    p.L,
                    nseg_row,
                    seg,
                    C.CF_ITEMS_PER_CHUNK,
                    P,
                    rg,
                    wd,
                    p.w_inner,
                    p.w_n,
                    ref,
                    part,
                )
            FT = _pow2_at_least(P, C.FINAL_THREADS)
            K.finalize_kernel()[D, FT, st](part, P, ref, self._state, self._fresh)
        self._fresh = False

    # ---- merging
    def _merge_state(self, other: DeviceMoments) -> None:
        if other._shape is None:
            return
        if self._stream is None:
            self._stream, self._stream_key = other._stream, other._stream_key
        elif other._stream_key != self._stream_key:
            other._event_on(other._stream).wait(self._stream)
        self._ensure_state(other._shape, int(np.prod(other._shape, dtype=np.int64)))
        self._settle()
        other._settle()
        D = self._state.shape[1]
        if D:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*under-utilization.*")
                K.merge_kernel()[-(-D // 128), 128, self._stream](self._state, other._state)
        self._total += other._total
        self._weighted = self._weighted or other._weighted
        self._per_dim = self._per_dim or other._per_dim

    def __iadd__(self, other: DeviceMoments) -> DeviceMoments:
        if not isinstance(other, DeviceMoments):
            return NotImplemented
        self._merge_state(other)
        return self

    def reset(self) -> DeviceMoments:
        """Forget all batches (keeps the cached work buffers)."""
        self._shape = None
        self._state = None
        self._fresh = False
        self._total = 0.0
        self._weighted = self._per_dim = False
        return self


def describe_input(x: Any) -> DeviceInput:
    """The :class:`DeviceInput` of a device array or of :class:`BFloat16Bits`."""
    if isinstance(x, BFloat16Bits):
        from ._intake import from_bits

        return from_bits(x.array)
    return describe(x)


def host_weights(weights: Any) -> Any:
    """Weights as a host array: device arrays are copied (they are short)."""
    if hasattr(weights, "copy_to_host"):
        return weights.copy_to_host()
    if hasattr(weights, "detach") and getattr(weights, "is_cuda", False):
        return weights.detach().cpu().numpy()
    if hasattr(weights, "get") and hasattr(weights, "__cuda_array_interface__"):
        return weights.get()  # CuPy
    return weights


def _raise_if_nonfinite(tmp: DeviceMoments, d: DeviceInput, axis: Axis) -> None:
    """``nan_policy="raise"``: count the batch's non-finite values per dimension, if it has any.

    A NaN mean whose dimension holds no NaN/Inf comes from float64 overflow, not from the data,
    and raises nothing here.
    """
    h = tmp.host_state()
    if h is None or not (np.isnan(h.mean) & (h.n > 0)).any():
        return
    cnt = DeviceMoments()
    cnt._order(d)
    cnt._add(d, axis, None, omit=True)
    ok = cnt.host_state()
    if ok is None:  # pragma: no cover - tmp has a state, so cnt has one
        return
    axes = check_axes(axis, len(d.shape))
    nsamp = int(np.prod([d.shape[a] for a in axes], dtype=np.int64))
    per = (nsamp - ok.n).astype(np.int64)
    if per.any():
        raise InputError(nonfinite_message(per, h.shape))
