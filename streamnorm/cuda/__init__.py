"""GPU backend (extra ``cuda``): moments of device arrays where they live, with numba-cuda.

``streamnorm.moments`` and ``Moments.update`` send any CUDA array here (numba device arrays,
CuPy arrays, PyTorch CUDA tensors, anything with ``__cuda_array_interface__`` or DLPack): the
batch is reduced on the GPU and only the per-dimension ``(count, mean, M2)`` comes back.
:class:`DeviceMoments` keeps the state on the GPU across batches, so a training loop streams
many batches without a host synchronization per batch and asks for a
:class:`streamnorm.Moments` once.

Layouts are those of the CPU path: ``(rows, D)``, channels-first ``(N, C, L)`` / NCHW,
channels-last NHWC, per-sample, any strides. Dtypes: float16, bfloat16 (PyTorch bfloat16 tensors
through DLPack, or :class:`BFloat16Bits` around 16-bit integer bit patterns), float32, float64,
ints and bool. The state is float64.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .._extras import require

require("numba.cuda", "cuda")

from .._compute import compute  # noqa: E402
from .._moments import Moments  # noqa: E402
from .._state import State  # noqa: E402
from .._validate import Axis, on_cuda_device  # noqa: E402
from ._accumulator import BFloat16Bits, DeviceMoments, describe_input, host_weights  # noqa: E402
from ._intake import simulated  # noqa: E402

__all__ = ["BFloat16Bits", "DeviceMoments", "is_device_array", "moments", "simulated"]


def is_device_array(x: Any) -> bool:
    """True if ``x`` is CUDA memory that :func:`streamnorm.moments` reduces on the GPU."""
    return on_cuda_device(x)


def moments(
    x: Any,
    axis: Axis = 0,
    *,
    weights: Any = None,
    nan_policy: str = "propagate",
) -> Moments:
    """Per-dimension moments of one device array, as a host :class:`streamnorm.Moments`.

    The same as :func:`streamnorm.moments` for a device array (which it is routed to), and
    ``DeviceMoments(x, axis, ...).to_host()``. See :meth:`DeviceMoments.update` for the
    parameters.
    """
    return Moments.from_state(host_state(x, axis, weights, nan_policy))


_LOCAL = threading.local()


def _workspace() -> dict[Any, Any]:
    """Work buffers reused by one-shot calls, one set per thread and GPU (bounded)."""
    from numba import cuda

    cache = getattr(_LOCAL, "work", None)
    if cache is None:
        cache = _LOCAL.work = {}
    dev = getattr(cuda.get_current_device(), "id", 0)
    work = cache.setdefault(dev, {})
    if len(work) > 64:  # many different shapes: start over rather than grow
        work.clear()
    return work


def host_state(x: Any, axis: Axis, weights: Any, nan_policy: str) -> State | None:
    """One device batch reduced on the GPU, as a host :class:`~streamnorm._state.State`.

    This is the adapter interface :func:`streamnorm.moments` uses for device arrays (the core
    loads this package lazily and calls only this). The state carries the means' rounding
    residuals; ``None`` for a batch without samples.

    Notes
    -----
    A dimension whose result is NaN/Inf (a NaN or Inf in the data, or float64 sums that
    overflowed on data spread wider than about ``1e154``) is settled on the host: the batch is
    copied there and reduced by the CPU path, which redoes overflowed dimensions with an exact
    scaling and, for ``nan_policy="raise"``, counts the non-finite values for the message.
    Batches without such dimensions never leave the device.
    """
    gpu_policy = "propagate" if nan_policy == "raise" else nan_policy
    dm = DeviceMoments()
    dm._work = _workspace()
    dm.update(x, axis, weights=weights, nan_policy=gpu_policy)
    st = dm.host_state()
    if st is None:
        return None
    with np.errstate(invalid="ignore"):
        bad = (st.n > 0) & ~(np.isfinite(st.mean) & np.isfinite(st.m2))
    if not bad.any():
        return st
    wide = describe_input(x).dtype.itemsize >= 8  # only float64 sums can overflow
    if nan_policy != "raise" and not wide:
        return st  # NaN/Inf in the data: the GPU's answer is the answer
    host = _copy_to_host(x)
    if host is None:  # a producer we cannot copy from: keep the GPU's answer (and its check)
        if nan_policy == "raise":
            DeviceMoments().update(x, axis, weights=weights, nan_policy="raise")
        return st
    w = None if weights is None else host_weights(weights)
    return compute(host, axis, w, nan_policy)


def _copy_to_host(x: Any) -> Any:
    """A host copy of a device array, or ``None`` if the producer offers no way to make one."""
    if isinstance(x, BFloat16Bits):
        return None
    if getattr(x, "is_cuda", False) is True and hasattr(x, "cpu"):  # torch
        return x.detach().cpu()
    try:
        has_cai = hasattr(x, "__cuda_array_interface__")
    except (TypeError, RuntimeError):
        has_cai = False
    if has_cai:
        from numba import cuda

        as_array = getattr(cuda, "as_cuda_array", None)  # not in the simulator
        return None if as_array is None else as_array(x).copy_to_host()
    return None
