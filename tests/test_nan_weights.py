"""NaN policies and weights."""

from __future__ import annotations

import numpy as np
import pytest
from naive import moments_ld

from streamnorm import Moments, moments


def _with_bad(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, size=max(1, flat.size // 20), replace=False)
    flat[idx[::3]] = np.nan
    flat[idx[1::3]] = np.inf
    flat[idx[2::3]] = -np.inf
    return x


LAYOUTS = [
    ((200, 6), 0),
    ((8, 5, 6, 7), (0, 2, 3)),
    ((8, 6, 7, 5), (0, 1, 2)),
    ((8, 5, 6, 7), (2, 3)),
    ((300,), 0),
]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_omit_equals_nanmean_nanvar(shape, axis, dtype):
    x = _with_bad(shape).astype(dtype)
    m = moments(x, axis, nan_policy="omit")
    clean = np.where(np.isfinite(x), x, np.nan).astype(np.float64)
    np.testing.assert_allclose(m.mean, np.nanmean(clean, axis=axis), rtol=1e-12)
    np.testing.assert_allclose(m.var(), np.nanvar(clean, axis=axis), rtol=1e-10)
    np.testing.assert_array_equal(m.count, np.sum(np.isfinite(x), axis=axis))
    assert np.asarray(m.count).dtype == np.int64


def test_omit_all_nan_dimension():
    x = np.ones((5, 3))
    x[:, 1] = np.nan
    m = moments(x, nan_policy="omit")
    np.testing.assert_array_equal(m.count, [5, 0, 5])
    assert np.isnan(m.mean[1]) and np.isnan(m.var()[1])
    m.update(np.array([[1.0, 4.0, 1.0], [1.0, 6.0, 1.0]]), nan_policy="omit")
    np.testing.assert_array_equal(m.count, [7, 2, 7])
    assert m.mean[1] == 5.0 and m.var()[1] == 1.0


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_propagate_only_touches_bad_dims(shape, axis):
    x = np.random.default_rng(1).standard_normal(shape)
    idx = (0,) * x.ndim
    x[idx] = np.nan
    m = moments(x, axis)
    bad = ~np.isfinite(np.sum(x, axis=axis))
    assert np.all(np.isnan(np.asarray(m.mean)[bad]))
    assert np.all(np.isnan(np.asarray(m.var())[bad]))
    good = ~bad
    np.testing.assert_allclose(np.asarray(m.mean)[good], np.mean(x, axis=axis)[good], rtol=1e-12)
    # Inf also gives NaN (not inf) for the mean
    x2 = np.ones((4, 2))
    x2[1, 0] = np.inf
    assert np.isnan(moments(x2).mean[0]) and moments(x2).mean[1] == 1.0


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_raise_names_count_and_dims(shape, axis):
    x = _with_bad(shape)
    m = Moments().update(np.zeros_like(x), axis)
    before = m.to_dict()
    nbad = int(np.sum(~np.isfinite(x)))
    with pytest.raises(ValueError, match=f"{nbad} non-finite value") as e:
        m.update(x, axis, nan_policy="raise")
    assert "dimension" in str(e.value)
    for k, v in before.items():
        np.testing.assert_array_equal(m.to_dict()[k], v)
    moments(np.ones(shape), axis, nan_policy="raise")  # finite data passes


def test_bad_nan_policy():
    with pytest.raises(ValueError, match="nan_policy"):
        moments(np.ones(3), nan_policy="ignore")


@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
def test_weights_equal_repeated_samples(shape, axis):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    a0 = min(np.atleast_1d(axis))  # weights run along the first reduced axis
    w = rng.integers(0, 4, size=x.shape[a0])
    m = moments(x, axis, weights=w)
    rep = np.repeat(x, w, axis=a0)
    r = moments(rep, axis)
    per_sample = int(np.prod([x.shape[a] for a in np.atleast_1d(axis) if a != a0]))
    assert m.count == pytest.approx(w.sum() * per_sample)
    assert isinstance(m.count, float)
    np.testing.assert_allclose(m.mean, r.mean, rtol=1e-12)
    np.testing.assert_allclose(m.var(ddof=1), r.var(ddof=1), rtol=1e-10)


def test_weights_with_views_and_omit():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 4, 5))
    w = rng.random(30)
    for v, wv in (
        (x[::-1], w[::-1]),
        (x[:, ::2], w),
        (np.asfortranarray(x), w),
        (x[::-2], w[::-2]),
    ):
        m = moments(v, (0, 2), weights=wv)
        n, mu, m2 = moments_ld(v, (0, 2), weights=wv)
        np.testing.assert_allclose(m.mean, mu.astype(float), rtol=1e-12)
        np.testing.assert_allclose(m.m2, m2.astype(float), rtol=1e-10)
    xb = x.copy()
    xb[3, 1, 2] = np.nan
    m = moments(xb, (0, 2), weights=w, nan_policy="omit")
    n, mu, m2 = moments_ld(xb, (0, 2), weights=w, omit=True)
    np.testing.assert_allclose(m.count, n.astype(float), rtol=1e-12)
    np.testing.assert_allclose(m.mean, mu.astype(float), rtol=1e-12)


@pytest.mark.parametrize(
    "w,err",
    [
        (np.ones(5), "length 4"),
        (np.ones((4, 1)), "1-D"),
        (-np.ones(4), "non-negative"),
        (np.array([1.0, np.nan, 1.0, 1.0]), "finite"),
    ],
)
def test_bad_weights(w, err):
    with pytest.raises(ValueError, match=err):
        moments(np.ones((4, 3)), weights=w)


def test_weights_type_and_axis():
    with pytest.raises(TypeError, match="weights"):
        moments(np.ones((4, 3)), weights=np.array(["a"] * 4))
    with pytest.raises(ValueError, match="axis"):
        moments(np.ones((4, 3)), axis=(), weights=np.ones(4))
