"""Device arrays in: ``__cuda_array_interface__`` and DLPack, without copies.

:func:`describe` turns numba device arrays, CuPy arrays, PyTorch CUDA tensors and any object with
``__cuda_array_interface__`` or ``__dlpack__`` into a :class:`DeviceInput`: pointer, shape,
element strides, storage dtype, whether the 16-bit elements are bfloat16, the object that keeps
the memory alive, and the producer's stream. :func:`flat_view` makes the 1-D device array the
kernels read from.

Under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) device memory is host memory: the
simulator's own device arrays are accepted, DLPack capsules of host memory count as device
memory, and :func:`flat_view` wraps host memory without copying it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .._extras import require
from .._validate import check_real_dtype

cuda = require("numba.cuda", "cuda")

KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
_DL_INT, _DL_UINT, _DL_FLOAT, _DL_BFLOAT, _DL_COMPLEX, _DL_BOOL = 0, 1, 2, 4, 5, 6


def simulated() -> bool:
    """True when numba runs its CUDA simulator instead of a GPU."""
    from numba import config

    return bool(getattr(config, "ENABLE_CUDASIM", False))


@dataclass
class DeviceInput:
    ptr: int
    shape: tuple[int, ...]
    #: strides in elements (may be negative or zero)
    strides: tuple[int, ...]
    #: storage dtype (bool is read as uint8, bfloat16 as uint16)
    dtype: np.dtype[Any]
    bf16: bool
    owner: Any
    #: producer stream handle: None (unknown, use the default stream), 1 legacy default,
    #: 2 per-thread default, or a ``cudaStream_t`` as an int
    stream: int | None


# --------------------------------------------------------------------------------------------
# __cuda_array_interface__


def _from_cai(x: Any, desc: dict[str, Any], stream: int | None, bf16: bool) -> DeviceInput:
    if desc.get("mask") is not None:
        raise TypeError("masked device arrays are not supported; fill or drop the masked values")
    shape = tuple(int(s) for s in desc["shape"])
    dt = np.dtype(desc["typestr"])
    bf16 = bf16 or (dt.kind == "V" and dt.itemsize == 2)  # "<V2": bfloat16 (torch, ml_dtypes)
    storage = _storage_dtype(dt, bf16)
    ptr = int(desc["data"][0] or 0)
    raw = desc.get("strides")
    if raw is None:
        strides = _c_strides(shape)
    else:
        strides = _elem_strides(tuple(int(s) for s in raw), dt.itemsize)
    if stream is None:
        s = desc.get("stream")
        stream = None if s is None else int(s)
    return DeviceInput(ptr, shape, strides, storage, bf16, x, stream)


@lru_cache(maxsize=64)
def _storage_dtype(dt: np.dtype[Any], bf16: bool) -> np.dtype[Any]:
    if bf16:
        if dt.itemsize != 2 or dt.kind not in "iuV":
            raise TypeError(f"bfloat16 data must be stored as 16-bit integers, got {dt}")
        return np.dtype(np.int16) if dt.kind == "i" else np.dtype(np.uint16)
    if dt.kind == "b":
        return np.dtype(np.uint8)
    if dt.kind == "f" and dt.itemsize not in (2, 4, 8):
        raise TypeError(f"unsupported float dtype {dt} on the GPU: use float16/32/64 or bfloat16")
    check_real_dtype(np.empty(0, dtype=dt))  # same messages as the CPU for complex, object, ...
    if not dt.isnative:
        raise TypeError(f"non-native byte order {dt} is not supported on the GPU")
    return dt


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    acc = 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


def _elem_strides(strides: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    if any(s % itemsize for s in strides):
        raise ValueError(
            f"byte strides {strides} are not multiples of the item size {itemsize}; "
            "make the array contiguous first"
        )
    return tuple(s // itemsize for s in strides)


# --------------------------------------------------------------------------------------------
# DLPack


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", _DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


def _capsule_pointer(capsule: Any) -> tuple[int, bool]:
    api = ctypes.pythonapi
    api.PyCapsule_IsValid.restype = ctypes.c_int
    api.PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    for name, versioned in ((b"dltensor", False), (b"dltensor_versioned", True)):
        if api.PyCapsule_IsValid(capsule, name):
            return int(api.PyCapsule_GetPointer(capsule, name)), versioned
    raise TypeError("__dlpack__() did not return an unused DLPack capsule")


_DL_TYPES = {
    (_DL_FLOAT, 16): "<f2",
    (_DL_FLOAT, 32): "<f4",
    (_DL_FLOAT, 64): "<f8",
    (_DL_INT, 8): "|i1",
    (_DL_INT, 16): "<i2",
    (_DL_INT, 32): "<i4",
    (_DL_INT, 64): "<i8",
    (_DL_UINT, 8): "|u1",
    (_DL_UINT, 16): "<u2",
    (_DL_UINT, 32): "<u4",
    (_DL_UINT, 64): "<u8",
    (_DL_BOOL, 8): "|u1",
    (_DL_BFLOAT, 16): "<u2",
}


def _from_dlpack(x: Any) -> DeviceInput:
    dev_type = int(x.__dlpack_device__()[0])
    ok = {KDL_CUDA, KDL_CUDA_MANAGED} | ({KDL_CPU} if simulated() else set())
    if dev_type not in ok:
        raise TypeError(
            f"DLPack device type {dev_type} is not CUDA memory; pass host arrays as numpy "
            "arrays or CPU tensors (they take the CPU path)"
        )
    try:
        capsule = x.__dlpack__(stream=None if dev_type == KDL_CPU else 1)
    except TypeError:
        capsule = x.__dlpack__()
    addr, versioned = _capsule_pointer(capsule)
    cls = _DLManagedTensorVersioned if versioned else _DLManagedTensor
    t = cls.from_address(addr).dl_tensor
    code, bits, lanes = int(t.dtype.code), int(t.dtype.bits), int(t.dtype.lanes)
    if lanes != 1:
        raise TypeError(f"DLPack vector dtypes (lanes={lanes}) are not supported")
    if code == _DL_COMPLEX:
        check_real_dtype(np.empty(0, dtype=np.complex128))
    typestr = _DL_TYPES.get((code, bits))
    if typestr is None:
        raise TypeError(f"unsupported DLPack dtype (code {code}, {bits} bits) for moments")
    ndim = int(t.ndim)
    shape = tuple(int(t.shape[i]) for i in range(ndim))
    if t.strides:
        strides = tuple(int(t.strides[i]) for i in range(ndim))
    else:
        strides = _c_strides(shape)
    ptr = int(t.data or 0) + int(t.byte_offset)
    # the capsule stays referenced by the DeviceInput: its destructor frees the tensor later
    return DeviceInput(ptr, shape, strides, np.dtype(typestr), code == _DL_BFLOAT, capsule, 1)


# --------------------------------------------------------------------------------------------
# entry points


def _torch_stream(x: Any) -> int | None:
    try:
        import torch

        return int(torch.cuda.current_stream(x.device).cuda_stream)
    except Exception:
        return None


def describe(x: Any) -> DeviceInput:
    """Describe a device array without copying it (see the module docstring)."""
    if simulated():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        if isinstance(x, FakeCUDAArray):
            a = x._ary
            return DeviceInput(
                a.ctypes.data,
                a.shape,
                _elem_strides(a.strides, a.itemsize),
                _storage_dtype(a.dtype, False),
                False,
                x,
                None,
            )
    stream = None
    bf16 = False
    if hasattr(x, "detach") and getattr(x, "is_cuda", False):  # a torch CUDA tensor
        x = x.detach()
        stream = _torch_stream(x)
        bf16 = str(getattr(x, "dtype", "")) == "torch.bfloat16"
    try:
        desc = x.__cuda_array_interface__
    except (AttributeError, TypeError, RuntimeError, KeyError):
        desc = None  # a dtype the producer has no CAI typestr for: DLPack below
    if desc is not None:
        return _from_cai(x, desc, stream, bf16)
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return _from_dlpack(x)
    raise TypeError(
        f"expected a device array (__cuda_array_interface__ or DLPack), got {type(x).__name__}"
    )


def from_bits(x: Any) -> DeviceInput:
    """Describe a device array of 16-bit integers that holds bfloat16 bit patterns."""
    d = describe(x)
    return DeviceInput(
        d.ptr, d.shape, d.strides, _storage_dtype(d.dtype, True), True, d.owner, d.stream
    )


def flat_view(d: DeviceInput, base: int, span: int) -> Any:
    """A 1-D device array of ``span`` elements starting ``base`` elements after ``d.ptr``."""
    ptr = d.ptr + base * d.dtype.itemsize
    if simulated():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        nbytes = span * d.dtype.itemsize
        buf = (ctypes.c_char * nbytes).from_address(ptr)
        return FakeCUDAArray(np.frombuffer(buf, dtype=d.dtype))  # type: ignore[call-overload]
    desc = {
        "shape": (span,),
        "strides": None,
        "typestr": d.dtype.str,
        "data": (ptr, False),
        "version": 3,
    }
    return cuda.from_cuda_array_interface(desc, owner=d.owner, sync=False)


def stream_for(handle: int | None) -> Any:
    """The numba stream object for a producer's stream handle."""
    if simulated() or handle is None or handle == 0:
        return cuda.default_stream()
    if handle == 1:
        return cuda.legacy_default_stream()
    if handle == 2:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)
