"""The channels-first kernel's 16-byte loads under the CUDA simulator.

The simulator's ``load4`` raises on a float32 load that does not start on a 16-byte boundary,
and the spy below counts the vector loads, so these tests check both the alignment contract and
that the vector path really ran, against the long-double reference (and the CPU path).
"""

from __future__ import annotations

import numpy as np
import pytest
from naive import reference
from simhelp import CAI
from test_sim_moments import close

import streamnorm
from streamnorm.cuda import _config as C
from streamnorm.cuda import _kernels as K

RNG = np.random.default_rng(20261212)


def at_phase(shape: tuple[int, ...], phase: int, mean: float = 3.0) -> np.ndarray:
    """A C-contiguous float32 array whose first element sits ``phase`` elements past a 16-byte
    boundary, filled with normal data around ``mean``."""
    n = int(np.prod(shape))
    buf = np.empty(n + 8, np.float32)
    off = (phase - buf.ctypes.data // 4) % 4
    a = buf[off : off + n].reshape(shape)
    a[...] = RNG.normal(mean, 2.0, shape)
    assert (a.ctypes.data // 4) % 4 == phase
    return a


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Fresh kernel cache with counting vector helpers; returns the list of load offsets."""
    monkeypatch.setattr(K, "_CACHE", {})
    load4, phase4 = K.vector_helpers()
    seen: list[int] = []

    def counted(x, i):  # type: ignore[no-untyped-def]
        seen.append(int(i))
        return load4.py_func(x, i)

    from numba import cuda

    K._CACHE[("vec", True)] = (cuda.jit(device=True)(counted), phase4)
    return seen


def expected_vectors(shape: tuple[int, ...], phase: int, seg: int) -> int:
    """Vector loads the kernel makes on a C-contiguous (A, C, L) float32 array at ``phase``."""
    A, Cc, L = shape
    total = 0
    for a in range(A):
        for c in range(Cc):
            for l0 in range(0, L, seg):
                l1 = min(L, l0 + seg)
                start = (a * Cc + c) * L + l0
                hb = min(l1, l0 + (-(phase + start)) % 4)
                total += (l1 - hb) // 4
    return total


@pytest.mark.parametrize("phase", [0, 1, 2, 3])
@pytest.mark.parametrize("L", [96, 49, 13])
def test_nchw_any_base_and_row_length(spy: list[int], phase: int, L: int) -> None:
    """Aligned and misaligned bases, rows whose length is a multiple of 4 and odd ones (each
    row then starts at another phase): equal to the reference; every vector load aligned."""
    a = at_phase((3, 2, L), phase)
    g = streamnorm.moments(CAI(a), (0, 2))
    close(g, reference(a, (0, 2)))
    from streamnorm.cuda._accumulator import _cf_groups

    seg = _cf_groups(3, L)[1]
    assert len(spy) == expected_vectors((3, 2, L), phase, seg) > 0


def test_nchw_4d_equals_cpu(spy: list[int]) -> None:
    a = at_phase((2, 3, 5, 7), 1, mean=1e4)
    g = streamnorm.moments(CAI(a), (0, 2, 3))
    close(g, reference(a, (0, 2, 3)))
    close(g, streamnorm.moments(a, (0, 2, 3)))
    assert spy


@pytest.mark.parametrize("phase", [0, 3])
def test_full_vector_tiles_and_segments(
    spy: list[int], monkeypatch: pytest.MonkeyPatch, phase: int
) -> None:
    """Long rows: several full tiles of CF_UNROLL vectors per lane, rows cut into segments, a
    shorter last tile; far from zero (shift by the reference) with a drift along the row."""
    monkeypatch.setattr(C, "CF_SEG_TILES", 16)
    L = 1500
    a = at_phase((1, 2, L), phase, mean=5e6)
    a += (np.arange(L, dtype=np.float32) / 10)[None, None, :]
    g = streamnorm.moments(CAI(a), (0, 2))
    close(g, reference(a, (0, 2)))
    from streamnorm.cuda._accumulator import _cf_groups

    seg = _cf_groups(1, L)[1]
    assert seg < L  # more than one segment a row
    assert len(spy) == expected_vectors((1, 2, L), phase, seg)
    assert len(set(spy)) == len(spy)  # every vector read once


@pytest.mark.parametrize("phase", [0, 2])
def test_one_d_and_per_sample(spy: list[int], phase: int) -> None:
    a = at_phase((1001,), phase)
    close(streamnorm.moments(CAI(a), 0), reference(a, 0))
    b = at_phase((2, 3, 4, 5), phase)
    close(streamnorm.moments(CAI(b), (2, 3)), reference(b, (2, 3)))
    assert spy


def test_channels_last_and_strided_views_stay_correct(spy: list[int]) -> None:
    """channels_last goes to the rows kernel; a channel-strided view to the vector path with a
    stride that is not a multiple of 4."""
    base = at_phase((2, 5, 6, 4), 1)
    nchw_view = np.transpose(base, (0, 3, 1, 2))  # channels_last memory
    close(streamnorm.moments(CAI(nchw_view), (0, 2, 3)), reference(nchw_view, (0, 2, 3)))
    big = at_phase((3, 5, 40), 2)
    view = big[:, 1:4, 3:37]  # rows of 34 starting at odd offsets
    close(streamnorm.moments(CAI(view), (0, 2)), reference(view, (0, 2)))
    assert spy


def test_weights_omit_and_float64_use_the_scalar_path(spy: list[int]) -> None:
    a = at_phase((3, 2, 40), 0)
    a[1, 0, 5] = np.nan
    g = streamnorm.moments(CAI(a), (0, 2), nan_policy="omit")
    close(g, reference(a, (0, 2), omit=True))
    w = np.array([1.0, 2.0, 0.5])
    gw = streamnorm.moments(CAI(np.where(np.isnan(a), 0, a)), (0, 2), weights=w)
    close(gw, streamnorm.moments(np.where(np.isnan(a), 0, a), (0, 2), weights=w))
    assert not spy
    b = a.astype(np.float64)
    b[1, 0, 5] = 0.0
    close(streamnorm.moments(CAI(b), (0, 2)), reference(b, (0, 2)))
    assert spy  # float64 takes the vector code with four plain loads (any phase)
