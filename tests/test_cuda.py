"""GPU backend: the simulator suite in a subprocess, plus the parts that need no GPU at all.

The kernels themselves run under numba's CUDA simulator in ``tests/cuda_sim`` (the simulator
must be chosen before numba is imported, hence the subprocess). What the simulator cannot show:
speed, memory coalescing, real streams and events, DLPack capsules from a CUDA producer, and
compilation to GPU code. The last is checked here when NVRTC is installed: the kernels are
compiled to PTX for sm_90 and searched for local-memory spills and half-precision arithmetic.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("numba.cuda")


def test_simulator_suite_passes() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pytest", "tests/cuda_sim", "-q", "-p", "no:cacheprovider"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "failed" not in r.stdout and "error" not in r.stdout, tail


def test_import_streamnorm_does_not_import_numba_cuda() -> None:
    code = (
        "import sys, numpy as np, streamnorm; "
        "streamnorm.moments(np.ones((4, 2))); "
        "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'; "
        "assert 'streamnorm.cuda' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# routing: which objects go to the GPU path (attributes only, nothing imported)


class _CAI:
    __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False), "version": 3}


class _BadCAI:
    @property
    def __cuda_array_interface__(self) -> dict[str, object]:
        raise TypeError("no typestr for this dtype")


class _DL:
    def __init__(self, device: int) -> None:
        self.device = device

    def __dlpack__(self, stream: object = None) -> object:
        raise AssertionError("routing must not export the data")

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self.device, 0)


def test_routing_to_the_gpu_path() -> None:
    from streamnorm._validate import on_cuda_device as _on_cuda_device

    torch = pytest.importorskip("torch")
    assert not _on_cuda_device(np.zeros(3))
    assert not _on_cuda_device(torch.zeros(3))  # CPU tensor: the CPU path
    assert not _on_cuda_device([1.0, 2.0])
    assert not _on_cuda_device(_DL(1))  # kDLCPU
    assert not _on_cuda_device(_DL(3))  # pinned host memory
    assert _on_cuda_device(_CAI())
    assert _on_cuda_device(_BadCAI())  # has CAI, just not for this dtype: DLPack then
    assert _on_cuda_device(_DL(2))  # kDLCUDA
    assert _on_cuda_device(_DL(13))  # kDLCUDAManaged


# --------------------------------------------------------------------------------------------
# the planner (pure Python)


def _naive_offsets(shape, strides, axes):  # type: ignore[no-untyped-def]
    """Element offsets of every (dimension, sample) pair: the obvious way."""
    idx = np.indices(shape).reshape(len(shape), -1).T
    off = idx @ np.asarray(strides)
    kept = [a for a in range(len(shape)) if a not in axes]
    key = np.ravel_multi_index(idx[:, kept].T, [shape[a] for a in kept]) if kept else 0
    D = int(np.prod([shape[a] for a in kept]))
    return [sorted(off[key == d]) for d in range(D)] if kept else [sorted(off)]


def _plan_offsets(p):  # type: ignore[no-untyped-def]
    """The same, from a plan, as the kernels compute them."""
    out = []
    for d in range(p.D):
        ko = p.koff[d] if p.koff is not None else p.kbase + d * p.kstride
        offs = []
        for r in range(p.rows):
            g, rem = 0, r
            for n, s in zip(reversed(p.gsizes), reversed(p.gstrides), strict=True):
                g += (rem % n) * s
                rem //= n
            offs.extend(ko + g + np.arange(p.L))
        out.append(sorted(int(o) + p.base for o in offs))
    return out


@pytest.mark.parametrize(
    "shape,strides,axes",
    [
        ((5, 3), (3, 1), (0,)),  # (N, D)
        ((2, 3, 4, 5), (60, 20, 5, 1), (0, 2, 3)),  # NCHW
        ((2, 3, 4, 5), (60, 1, 15, 3), (0, 2, 3)),  # channels-last NCHW view
        ((2, 3, 4, 5), (60, 20, 5, 1), (2, 3)),  # per sample
        ((4, 3), (1, 4), (0,)),  # Fortran
        ((4, 3, 2), (-6, 2, 1), (0, 2)),  # a flipped reduced axis
        ((4, 3, 2), (6, -2, 1), (0, 2)),  # a flipped kept axis
        ((3, 4, 2), (8, 2, 1), (1,)),  # reduce the middle axis
        ((3, 4, 5, 2), (40, 10, 2, 1), (0, 2)),  # interleaved
        ((6, 3), (0, 1), (0,)),  # broadcast along the rows
        ((7,), (1,), (0,)),  # 1-D
        ((2, 3), (3, 1), ()),  # nothing reduced
    ],
)
def test_plan_visits_every_element_once(shape, strides, axes) -> None:  # type: ignore[no-untyped-def]
    from streamnorm.cuda._plan import plan

    p = plan(shape, strides, axes, min_l=2)
    assert _plan_offsets(p) == _naive_offsets(shape, strides, axes)
    assert p.nsamp == int(np.prod([shape[a] for a in axes]))
    assert p.base + p.span - 1 == max(max(o) for o in _naive_offsets(shape, strides, axes))


def test_plan_weights_index() -> None:
    from streamnorm.cuda._plan import plan

    p = plan((4, 3, 5), (15, 5, 1), (0, 2), w_axis=0, min_l=2)
    assert p.kind == "cf" and (p.w_inner, p.w_n, p.w_flip) == (5, 4, False)
    p = plan((4, 3, 5), (-15, 5, 1), (0, 2), w_axis=0, min_l=2)
    assert p.w_flip


def test_plan_refuses_too_many_groups() -> None:
    from streamnorm.cuda import _config as C
    from streamnorm.cuda._plan import plan

    n = C.MAX_GROUPS + 1
    shape = (2,) * (2 * n)
    strides = tuple(2 ** (2 * n - 1 - i) for i in range(2 * n))
    with pytest.raises(ValueError, match="contiguous"):
        plan(shape, strides, tuple(range(0, 2 * n, 2)))


# --------------------------------------------------------------------------------------------
# GPU code generation (needs NVRTC, not a GPU)


def _nvrtc_available() -> bool:
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("nvrtc")
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC is not installed")
def test_kernels_compile_for_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compile the float32 and float16 fast paths to PTX: no spills to local memory, and no
    half-precision arithmetic (a float16 element is widened to float64 first)."""
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda, types

    from streamnorm.cuda import _kernels as K

    class _Hopper:
        compute_capability = (9, 0)

    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _Hopper())
    i8, f8 = types.int64, types.float64

    def arr(t, nd=1):  # type: ignore[no-untyped-def]
        return types.Array(t, nd, "C")

    for dt in (types.float32, types.float16):
        k = K.rows_kernel(1, False, False, False, False)
        sig = (arr(dt), arr(i8), i8, i8, i8, i8, i8, i8, arr(f8), i8, i8, arr(f8), arr(f8, 3))
        ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0))
        assert ".local" not in ptx and "cuda_fp16" not in ptx
        assert ptx.count("ld.global") >= 16  # the tile's loads are there, unrolled
