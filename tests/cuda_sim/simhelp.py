"""Producers of device arrays for the simulator tests (host memory is device memory there)."""

from __future__ import annotations

import numpy as np


class CAI:
    """A minimal producer of ``__cuda_array_interface__`` over host memory (the simulator's
    device memory), like a CuPy array."""

    def __init__(self, a: np.ndarray, stream: int | None = None, mask: object = None) -> None:
        self.a = a
        self.__cuda_array_interface__ = {
            "shape": a.shape,
            "strides": None if a.flags.c_contiguous and a.ndim else a.strides,
            "typestr": a.dtype.str,
            "data": (a.ctypes.data, False),
            "version": 3,
            "stream": stream,
            "mask": mask,
        }


class DLPackOnly:
    """An object that exposes only DLPack and claims to live on a CUDA device."""

    def __init__(self, a: object) -> None:
        self.a = a

    def __dlpack__(self, stream: object = None) -> object:
        return self.a.__dlpack__()  # type: ignore[attr-defined]

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)
