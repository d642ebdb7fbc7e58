"""The GPU kernels under the CUDA simulator against the CPU path and slow references."""

from __future__ import annotations

import numpy as np
import pytest
from naive import reference
from simhelp import CAI, DLPackOnly

import streamnorm
from streamnorm.cuda import BFloat16Bits, DeviceMoments
from streamnorm.cuda import moments as cuda_moments


def close(g: streamnorm.Moments, c: streamnorm.Moments, tol: float = 1e-12) -> None:
    """``g`` equals ``c`` to ``tol`` relative to the data's scale; NaNs in the same places."""
    assert g.shape == c.shape
    np.testing.assert_allclose(np.asarray(g.count, float), np.asarray(c.count, float), rtol=1e-15)
    gm, cm = np.asarray(g.mean), np.asarray(c.mean)
    gq, cq = np.asarray(g.m2), np.asarray(c.m2)
    np.testing.assert_array_equal(np.isnan(gm), np.isnan(cm))
    np.testing.assert_array_equal(np.isnan(gq), np.isnan(cq))
    n = np.maximum(np.asarray(c.count, dtype=float), 1.0)
    scale = np.abs(np.nan_to_num(cm)) + np.sqrt(np.nan_to_num(cq) / n) + 1e-300
    ok = ~np.isnan(cm)
    assert np.all(np.abs(gm - cm)[ok] <= tol * scale[ok]), (gm, cm)
    okq = ~np.isnan(cq)
    assert np.all(np.abs(gq - cq)[okq] <= tol * (np.abs(cq[okq]) + 1e-300)), (gq, cq)


RNG = np.random.default_rng(20261126)

LAYOUTS = [
    # name, array, axis
    ("rows", RNG.normal(3.0, 2.0, (40, 5)).astype(np.float32), 0),
    ("rows_wide", RNG.normal(-1.0, 1.0, (9, 37)), 0),
    ("nchw", RNG.normal(0.5, 1.5, (3, 4, 5, 6)), (0, 2, 3)),
    ("nhwc", RNG.normal(0.5, 1.5, (3, 4, 5, 6)).astype(np.float32), (0, 1, 2)),
    ("channels_last_view", np.transpose(RNG.normal(2, 1, (3, 5, 6, 4)), (0, 3, 1, 2)), (0, 2, 3)),
    ("per_sample", RNG.normal(1, 3, (2, 3, 4, 5)), (2, 3)),
    ("one_d", RNG.normal(7, 2, 150), 0),
    ("fortran", np.asfortranarray(RNG.normal(0, 1, (40, 3))), 0),
    ("transposed", RNG.normal(0, 1, (40, 3)).T, 1),
    ("negative_strides", RNG.normal(0, 1, (6, 5, 8))[::-1, ::-2, ::3], (0, 2)),
    ("middle_axis", RNG.normal(0, 1, (4, 9, 3)), 1),
    ("interleaved", RNG.normal(0, 1, (3, 4, 5, 2)), (0, 2)),
    ("all", RNG.normal(0, 1, (5, 6)), None),
    ("broadcast", np.broadcast_to(RNG.normal(0, 1, (1, 6)), (20, 6)), 0),
    ("float16", RNG.normal(0, 1, (30, 4)).astype(np.float16), 0),
    ("int8", RNG.integers(-100, 100, (30, 4)).astype(np.int8), 0),
    ("uint32", RNG.integers(0, 2**32 - 1, (30, 4), dtype=np.uint32), 0),
    ("bool", RNG.random((30, 4)) < 0.3, 0),
    ("nothing_reduced", RNG.normal(0, 1, (4, 3)), ()),
    ("size_one_axes", RNG.normal(0, 1, (1, 3, 1, 20)), (0, 2, 3)),
]


#: layouts also compared with the CPU path (each CPU kernel variant costs a compilation)
CPU_TOO = {"rows", "nchw", "one_d", "negative_strides"}


@pytest.mark.parametrize("name,a,axis", LAYOUTS, ids=[t[0] for t in LAYOUTS])
def test_layouts_equal_reference_and_cpu(name: str, a: np.ndarray, axis: object) -> None:
    g = streamnorm.moments(CAI(a), axis)
    close(g, reference(a, axis))
    if name in CPU_TOO:
        close(g, streamnorm.moments(a, axis))


def test_kernel_kinds_are_both_exercised() -> None:
    from streamnorm.cuda._plan import plan

    assert plan((3, 4, 30), (120, 30, 1), (0, 2)).kind == "cf"
    assert plan((30, 4), (4, 1), (0,)).kind == "rows"
    assert plan((30, 4), (1, 30), (0,)).kind == "cf"


def test_large_offset_keeps_digits() -> None:
    """mean 1e8, std 1: a naive sum-of-squares loses every digit; the shift keeps ~1e-13."""
    a = 1e8 + RNG.normal(0, 1, (64, 3))
    g = streamnorm.moments(CAI(a), 0)
    r = reference(a, 0)
    mean, m2 = r.mean, r.m2
    assert np.all(np.abs(g.mean - mean) <= 1e-12 * 1e8)
    assert np.all(np.abs(g.m2 - m2) <= 1e-9 * m2)
    naive = (a**2).sum(0) - a.sum(0) ** 2 / 64
    assert np.max(np.abs(naive - m2) / m2) > 1e-3  # the test data do defeat the naive formula


def test_nearly_constant_and_constant_columns() -> None:
    a = np.full((50, 3), 0.1)
    a[:, 1] += RNG.normal(0, 1e-12, 50)
    g = streamnorm.moments(CAI(a), 0)
    assert g.m2[0] == 0.0 and g.m2[2] == 0.0
    m2 = reference(a, 0).m2
    assert abs(g.m2[1] - m2[1]) <= 1e-9 * m2[1]


def test_bfloat16_by_bits_and_by_dlpack() -> None:
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(RNG.normal(3, 2, (40, 3)).astype(np.float32)).to(torch.bfloat16)
    t[0, 0] = float("inf") * 0  # a NaN in column 0
    t[1, 1] = -0.0
    t[2, 2] = 1e-40  # a subnormal bfloat16
    exact = t.float().numpy()
    c = streamnorm.moments(exact, 0)
    bits = t.view(torch.int16).numpy()
    close(streamnorm.moments(BFloat16Bits(CAI(bits)), 0), c)
    close(streamnorm.moments(BFloat16Bits(CAI(bits.view(np.uint16))), 0), c)
    close(streamnorm.moments(DLPackOnly(t), 0), c)  # torch exports kDLBfloat through DLPack
    close(streamnorm.moments(CAI(bits.view("V2")), 0), c)  # "<V2": bfloat16 in CAI (torch)
    assert np.isnan(c.mean[0])


def test_dlpack_only_objects() -> None:
    a = RNG.normal(0, 1, (5, 4, 9))
    close(streamnorm.moments(DLPackOnly(a), (0, 2)), streamnorm.moments(a, (0, 2)))
    s = a[:, ::2, ::-1]
    close(streamnorm.moments(DLPackOnly(s), (0, 2)), streamnorm.moments(s, (0, 2)))


def test_simulator_device_arrays() -> None:
    from numba import cuda

    a = RNG.normal(0, 1, (20, 3))
    close(DeviceMoments(cuda.to_device(a), 0).to_host(), streamnorm.moments(a, 0))


@pytest.mark.parametrize("axis", [0, (0, 2), 1])
def test_weights_equal_cpu(axis: object) -> None:
    a = RNG.normal(2, 1, (6, 5, 16))
    first = min(np.atleast_1d(axis))
    w = RNG.random(a.shape[first])
    w[3] = 0.0
    a[3, 0, 0] = np.nan  # weight 0: ignored, as on the CPU
    g = streamnorm.moments(CAI(a), axis, weights=w)
    close(g, reference(a, axis, w))
    if axis == 0:
        c = streamnorm.moments(a, axis, weights=w)
        close(g, c)
        assert g.count == pytest.approx(c.count)


def test_weights_on_a_flipped_axis() -> None:
    w = np.arange(10.0)
    a = RNG.normal(0, 1, (10, 3))[::-1]
    close(streamnorm.moments(CAI(a), 0, weights=w), reference(a, 0, w))
    b = RNG.normal(0, 1, (20, 10)).T[::-1]  # weighted axis 0 is flipped and contiguous
    close(streamnorm.moments(CAI(b), 0, weights=w), reference(b, 0, w))


@pytest.mark.parametrize("axis", [0, (0, 2)])
def test_nan_policies(axis: object) -> None:
    a = RNG.normal(0, 1, (4, 4, 16))
    a[0, 1, 0] = np.nan  # the reference element of dimension 1 itself
    a[2, 2, 5] = np.inf
    a[:, 3, :] = np.nan  # a dimension with no finite value
    for policy in ("propagate", "omit"):
        g = streamnorm.moments(CAI(a), axis, nan_policy=policy)
        close(g, reference(a, axis, omit=policy == "omit"))
        close(g, streamnorm.moments(a, axis, nan_policy=policy))
    assert streamnorm.moments(CAI(a), axis, nan_policy="omit").count.dtype == np.int64
    with pytest.raises(ValueError, match="non-finite") as cpu:
        streamnorm.moments(a, axis, nan_policy="raise")
    with pytest.raises(ValueError, match="non-finite") as gpu:
        streamnorm.moments(CAI(a), axis, nan_policy="raise")
    assert str(gpu.value) == str(cpu.value)


def test_raise_leaves_state_unchanged() -> None:
    a = RNG.normal(0, 1, (20, 3))
    dm = DeviceMoments(CAI(a))
    bad = a.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) .* \[1\]"):
        dm.update(CAI(bad), nan_policy="raise")
    close(dm.to_host(), streamnorm.moments(a))
    dm.update(CAI(a), nan_policy="raise")  # finite data pass
    close(dm.to_host(), streamnorm.moments(np.concatenate([a, a])))


def test_moments_update_mixes_host_and_device() -> None:
    a = RNG.normal(0, 1, (30, 4))
    m = streamnorm.Moments().update(a[:10]).update(CAI(a[10:25])).update(a[25:])
    close(m, streamnorm.moments(a))
    assert cuda_moments(CAI(a)).count == 30


def test_empty_inputs() -> None:
    assert streamnorm.moments(CAI(np.zeros((0, 3))), 0).shape is None
    m = streamnorm.moments(CAI(np.zeros((5, 0))), 0)
    c = streamnorm.moments(np.zeros((5, 0)), 0)
    assert m.shape == c.shape == (0,) and m.count == c.count == 5
    dm = DeviceMoments()
    assert dm.shape is None and dm.to_host().shape is None and repr(dm) == "DeviceMoments(empty)"


def test_bad_input() -> None:
    a = np.zeros((4, 3))
    with pytest.raises(TypeError, match="complex"):
        streamnorm.moments(CAI(a.astype(np.complex128)))
    with pytest.raises(ValueError, match="0-d"):
        streamnorm.moments(CAI(np.array(1.0)))
    with pytest.raises(ValueError, match="nan_policy"):
        streamnorm.moments(CAI(a), nan_policy="skip")
    with pytest.raises(TypeError, match="masked"):
        streamnorm.moments(CAI(a, mask=object()))
    with pytest.raises(np.exceptions.AxisError):
        streamnorm.moments(CAI(a), axis=2)
    with pytest.raises(ValueError, match="weights must be 1-D"):
        streamnorm.moments(CAI(a), weights=np.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        streamnorm.moments(CAI(a), weights=-np.ones(4))
    odd = CAI(a)
    odd.__cuda_array_interface__["strides"] = (20, 4)
    with pytest.raises(ValueError, match="multiples of the item size"):
        streamnorm.moments(odd)
    with pytest.raises(TypeError, match="16-bit"):
        streamnorm.moments(BFloat16Bits(CAI(a.astype(np.float32))))
    with pytest.raises(TypeError, match="device array"):
        DeviceMoments(object())
    with pytest.raises(ValueError, match="dimension mismatch"):
        DeviceMoments(CAI(a)).update(CAI(np.zeros((4, 2))))


@pytest.mark.parametrize("drift", [0.0, 1e3])
def test_long_runs_of_full_tiles(monkeypatch: pytest.MonkeyPatch, drift: float) -> None:
    """Many full tiles per thread (merged without divisions), then a partial one; with a drift
    along the rows and an outlier first sample (the per-dimension shift) it keeps 1e-12."""
    from streamnorm.cuda import _config as C

    monkeypatch.setattr(C, "UNROLL", 2)
    monkeypatch.setattr(C, "CF_UNROLL", 2)
    monkeypatch.setattr(C, "ROWS_CHUNK_ELEMS", 1024)
    monkeypatch.setattr(C, "CF_SEG_TILES", 16)
    r = np.arange(201)[:, None]
    a = 5e6 + drift * r / 200 + RNG.normal(0, 1, (201, 3))
    a[0] += 1e4  # the reference element is far from the rest
    close(streamnorm.moments(CAI(a), 0), reference(a, 0))  # rows: 50 tiles a thread
    b = np.ascontiguousarray(a.T)[None]  # (1, 3, 201): channels-first, 12 tiles a lane
    close(streamnorm.moments(CAI(b), (0, 2)), reference(b, (0, 2)))
