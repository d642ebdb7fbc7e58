"""Weights whose total overflows float64: divided by a power of two, mean and variance kept."""

from __future__ import annotations

import numpy as np
import pytest

import streamnorm as sn

X = np.array([[1.0, 2.0], [3.0, 5.0], [5.0, 11.0]])


def _same_as_unweighted(m: sn.Moments, ref: sn.Moments) -> None:
    np.testing.assert_allclose(m.mean, ref.mean, rtol=1e-15)
    np.testing.assert_allclose(m.var(), ref.var(), rtol=1e-14)
    assert np.isfinite(m.count) and 0 < m.count


def test_rows_weights_summing_past_float64() -> None:
    m = sn.moments(X, weights=[1e308] * 3)
    np.testing.assert_array_equal(m.mean, [3.0, 6.0])
    _same_as_unweighted(m, sn.moments(X))
    # the count is the total of the weights divided by 2**1024 (1e308 < 2**1024)
    assert m.count == pytest.approx(3 * np.ldexp(1e308, -1024), rel=1e-15)


def test_uneven_huge_weights_keep_their_ratios() -> None:
    w = np.array([1e308, 5e307, 2.5e307])
    m = sn.moments(X, weights=w)
    ref = sn.moments(X, weights=w / 1e307)
    np.testing.assert_allclose(m.mean, ref.mean, rtol=1e-15)
    np.testing.assert_allclose(m.var(), ref.var(), rtol=1e-14)


def test_float32_values_times_huge_weights() -> None:
    # the total fits float64, but a weight times a float32 value near its range does not
    x = (X * 1e37).astype(np.float32)
    m = sn.moments(x, weights=[1e300] * 3)
    _same_as_unweighted(m, sn.moments(x))


def test_nchw_weights_along_the_batch() -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    for xx in (x, x.astype(np.float32)):
        m = sn.moments(xx, axis=(0, 2, 3), weights=[1e308, 1e308])
        _same_as_unweighted(m, sn.moments(xx, axis=(0, 2, 3)))


def test_ordinary_weights_keep_their_count() -> None:
    assert sn.moments(X, weights=[1.0, 2.0, 3.0]).count == 6.0
    assert sn.moments(X, weights=[1e150] * 3).count == pytest.approx(3e150, rel=1e-15)


def test_dask_weights_summing_past_float64() -> None:
    da = pytest.importorskip("dask.array")
    import streamnorm.dask as sd

    x = da.from_array(X, chunks=(1, 2))
    ref = sn.moments(X)
    _same_as_unweighted(sd.moments(x, weights=[1e308] * 3), ref)
    lazy = da.from_array(np.full(3, 1e308), chunks=1)
    _same_as_unweighted(sd.moments(x, weights=lazy), ref)
    x4 = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    m = sd.moments(da.from_array(x4, chunks=1), axis=(0, 2, 3), weights=[1e308, 1e308])
    _same_as_unweighted(m, sn.moments(x4, axis=(0, 2, 3)))
