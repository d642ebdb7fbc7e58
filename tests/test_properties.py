"""Property tests: batch partitions, merge associativity, permutations, ddof."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from naive import moments_ld

from streamnorm import Moments, moments

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def data_and_cuts(draw):
    n = draw(st.integers(1, 120))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    # mean/std up to 1e4: merging stored float64 means keeps ~1e-16 * (mean/std) of the spread
    offset = draw(st.sampled_from([0.0, 5.0, -1e4]))
    x = (np.random.default_rng(seed).standard_normal((n, d)) + offset) * scale
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=8)))
    return x, cuts


def _close(a: Moments, b: Moments, rtol=1e-10):
    assert a.count == b.count
    np.testing.assert_allclose(a.mean, b.mean, rtol=rtol, atol=1e-12 * (1 + np.abs(b.mean).max()))
    scale = max(float(np.max(b.m2)), 1e-300)
    np.testing.assert_allclose(a.m2, b.m2, rtol=rtol, atol=1e-10 * scale)


@SETTINGS
@given(data_and_cuts())
def test_uneven_batches_equal_one_shot(xc):
    """Any split into batches (empty and single-row ones included) gives the one-shot result."""
    x, cuts = xc
    bounds = [0, *cuts, x.shape[0]]
    m = Moments()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        m.update(x[lo:hi])
    _close(m, moments(x))


@SETTINGS
@given(data_and_cuts())
def test_merge_is_associative(xc):
    x, cuts = xc
    bounds = [0, *cuts, x.shape[0]]
    pairs = zip(bounds[:-1], bounds[1:], strict=True)
    parts = [moments(x[lo:hi]) if hi > lo else Moments() for lo, hi in pairs]
    left = Moments.merge_all(parts)
    right = Moments()
    for p in reversed(parts):
        right = p + right
    _close(left, right)
    _close(left, moments(x))


@SETTINGS
@given(data_and_cuts(), st.integers(0, 2**32 - 1))
def test_permutation_invariance(xc, seed):
    x, _ = xc
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    _close(moments(x[perm]), moments(x))


@SETTINGS
@given(data_and_cuts(), st.integers(0, 3))
def test_ddof(xc, ddof):
    x, _ = xc
    m = moments(x)
    n, _, m2 = moments_ld(x, 0)
    expect = np.where(n > ddof, (m2 / np.maximum(n - ddof, 1)).astype(np.float64), np.nan)
    np.testing.assert_allclose(m.var(ddof), expect, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(m.std(ddof), np.sqrt(expect), rtol=1e-12, atol=1e-300)


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_weights_equal_repeated_rows(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w = rng.integers(0, 4, size=n)
    m = moments(x, weights=w)
    rep = np.repeat(x, w, axis=0)
    assert m.count == float(w.sum())
    if w.sum():
        r = moments(rep)
        np.testing.assert_allclose(m.mean, r.mean, rtol=1e-12, atol=1e-14)
        ddof = 1 if w.sum() > 1 else 0
        np.testing.assert_allclose(m.var(ddof), r.var(ddof), rtol=1e-10, atol=1e-14)
