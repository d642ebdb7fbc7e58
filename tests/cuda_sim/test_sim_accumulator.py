"""DeviceMoments under the CUDA simulator: streaming, merging, determinism, production sizes."""

from __future__ import annotations

import numpy as np
import pytest
from simhelp import CAI

import streamnorm
from streamnorm.cuda import DeviceMoments, is_device_array, simulated

RNG = np.random.default_rng(7)


def test_runs_in_the_simulator() -> None:
    assert simulated()


def test_stream_of_uneven_batches_equals_one_pass() -> None:
    """Batch-partition invariance: the same data cut anywhere give the same statistics."""
    a = RNG.normal(5.0, 3.0, (61, 4)).astype(np.float32)
    whole = streamnorm.moments(CAI(a), 0)
    dm = DeviceMoments()
    for lo, hi in [(0, 1), (1, 17), (17, 18), (18, 61)]:
        dm.update(CAI(a[lo:hi]))
    got = dm.to_host()
    assert got.count == 61
    np.testing.assert_allclose(got.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(got.m2, whole.m2, rtol=1e-12)
    host = streamnorm.Moments()
    for lo, hi in [(0, 30), (30, 61)]:
        host.update(a[lo:hi])
    np.testing.assert_allclose(got.var(ddof=1), host.var(ddof=1), rtol=1e-12)


def test_mixed_layouts_and_dtypes_in_one_state() -> None:
    """NCHW, then channels-last, then float16: one state per channel whatever the layout."""
    x1 = RNG.normal(1, 2, (2, 3, 4, 5))
    x2 = np.transpose(RNG.normal(1, 2, (2, 4, 5, 3)), (0, 3, 1, 2))  # channels-last NCHW view
    x3 = RNG.normal(1, 2, (2, 3, 4, 5)).astype(np.float16)
    dm = DeviceMoments()
    for x in (x1, x2, x3):
        dm.update(CAI(x), axis=(0, 2, 3))
    allx = np.concatenate([x1, x2, x3.astype(np.float64)])
    ref = streamnorm.moments(allx, (0, 2, 3))
    got = dm.to_host()
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(got.m2, ref.m2, rtol=1e-12)
    assert got.count == allx.shape[0] * 20


def test_same_bits_every_run() -> None:
    a = RNG.normal(0, 1, (45, 3)) * 1e3 + 7
    runs = [DeviceMoments(CAI(a)).to_host() for _ in range(3)]
    for r in runs[1:]:
        assert r.mean.tobytes() == runs[0].mean.tobytes()
        assert r.m2.tobytes() == runs[0].m2.tobytes()


def test_device_merge_equals_host_merge() -> None:
    a, b = RNG.normal(0, 1, (20, 3)), RNG.normal(4, 2, (9, 3))
    da, db = DeviceMoments(CAI(a)), DeviceMoments(CAI(b))
    da += db
    ref = streamnorm.moments(a) + streamnorm.moments(b)
    got = da.to_host()
    assert got.count == 29
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-14)
    np.testing.assert_allclose(got.m2, ref.m2, rtol=1e-13)
    empty = DeviceMoments()
    empty += da
    np.testing.assert_array_equal(empty.to_host().m2, got.m2)
    with pytest.raises(ValueError, match="dimension mismatch"):
        da += DeviceMoments(CAI(np.zeros((3, 2))))
    assert da.__iadd__(3) is NotImplemented  # type: ignore[operator]


def test_state_stays_on_the_device_until_asked() -> None:
    a = RNG.normal(0, 1, (10, 3))
    dm = DeviceMoments(CAI(a))
    n, mean, m2 = dm.device_arrays()
    assert not isinstance(n, np.ndarray) and n.shape == (3,)
    np.testing.assert_allclose(mean.copy_to_host(), a.mean(0), rtol=1e-14)
    assert repr(dm) == "DeviceMoments(shape=(3,), samples=10.0)"
    dm.reset()
    assert dm.shape is None
    with pytest.raises(ValueError, match="empty"):
        dm.device_arrays()


def test_omit_counts_are_per_dimension() -> None:
    a = RNG.normal(0, 1, (12, 3))
    a[:5, 0] = np.nan
    dm = DeviceMoments(CAI(a), nan_policy="omit")
    dm.update(CAI(a[:4]), nan_policy="omit")
    got = dm.to_host()
    np.testing.assert_array_equal(got.count, [7 + 0, 12 + 4, 12 + 4])


def test_weights_given_as_device_array() -> None:
    from numba import cuda

    a = RNG.normal(0, 1, (8, 3))
    w = RNG.random(8)
    got = DeviceMoments(CAI(a), weights=cuda.to_device(w)).to_host()
    assert got.count == pytest.approx(w.sum())
    np.testing.assert_allclose(got.mean, (w[:, None] * a).sum(0) / w.sum(), rtol=1e-13)


def test_is_device_array() -> None:
    assert is_device_array(CAI(np.zeros(3)))
    assert not is_device_array(np.zeros(3))


@pytest.mark.real_config
def test_production_block_sizes() -> None:
    """The real launch shapes (256 threads, 8-element tiles) on arrays that fill a block."""
    from streamnorm.cuda import _config as C

    assert C.BLOCK_THREADS == 128 and C.CF_THREADS == 64 and C.UNROLL == 16
    a = RNG.normal(2, 3, (70, 2)).astype(np.float32)  # rows: TX = 2, TY = 64, tiles of 16
    got = streamnorm.moments(CAI(a), 0)
    ref = streamnorm.moments(a.astype(np.float64), 0)
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-13)
    np.testing.assert_allclose(got.m2, ref.m2, rtol=1e-12)
    b = RNG.normal(2, 3, (1, 1, 2100))  # channels-first: one row, the whole block on it
    got = streamnorm.moments(CAI(b), (0, 2))
    ref = streamnorm.moments(b, (0, 2))
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-13)
    np.testing.assert_allclose(got.m2, ref.m2, rtol=1e-12)
