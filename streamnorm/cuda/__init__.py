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

from .._moments import Axis, Moments  # noqa: E402
from ._accumulator import BFloat16Bits, DeviceMoments  # noqa: E402
from ._intake import simulated  # noqa: E402

__all__ = ["BFloat16Bits", "DeviceMoments", "is_device_array", "moments", "simulated"]


def is_device_array(x: Any) -> bool:
    """True if ``x`` is CUDA memory that :func:`streamnorm.moments` reduces on the GPU."""
    from .._moments import _on_cuda_device

    return _on_cuda_device(x)


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
    return DeviceMoments(x, axis, weights=weights, nan_policy=nan_policy).to_host()


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
    return work  # type: ignore[no-any-return]


def _host_batch(
    x: Any, axis: Axis, weights: Any, nan_policy: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...], float, bool, bool] | None:
    """One device batch for :func:`streamnorm._moments._compute`: flat float64 host arrays."""
    dm = DeviceMoments()
    dm._work = _workspace()
    dm.update(x, axis, weights=weights, nan_policy=nan_policy)
    if dm.shape is None:
        return None
    h = dm.to_host()
    return h._n, h._mean, h._m2, dm.shape, dm._total, dm._weighted, dm._per_dim
