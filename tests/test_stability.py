"""Adversarial data where E[x^2] - E[x]^2 fails and streamnorm keeps its digits."""

from __future__ import annotations

import numpy as np
import pytest
from naive import moments_ld, naive_var, var_exact

from streamnorm import Moments, moments

CASES = [
    # dtype, offset (mean/std), tolerance required by the targets
    ("float32", 1e3, 1e-12),
    ("float32", 1e5, 1e-12),
    ("float64", 1e8, 1e-10),
]
LAYOUTS = [
    ((200_001, 4), 0),
    ((32, 6, 40, 41), (0, 2, 3)),
    ((32, 40, 41, 6), (0, 1, 2)),
    ((100_001,), 0),
]


@pytest.mark.parametrize("dtype,offset,tol", CASES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=["rows", "nchw", "nhwc", "1d"])
def test_large_offset(dtype, offset, tol, shape, axis):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) + offset).astype(dtype)
    n, mu, m2 = moments_ld(x, axis)
    truth = (m2 / n).astype(np.float64)
    got = moments(x, axis).var()
    err = np.max(np.abs(got / truth - 1))
    naive_err = np.max(np.abs(naive_var(x, axis) / truth - 1))
    assert err <= tol, err
    # the same data defeats the textbook formula: the test can fail
    assert naive_err > 1e3 * tol, naive_err


def test_streamed_offset_batches():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50_000, 3)) + 1e8
    m = Moments()
    for lo in range(0, 50_000, 777):
        m.update(x[lo : lo + 777])
    n, mu, m2 = moments_ld(x, 0)
    assert np.max(np.abs(m.var() / (m2 / n).astype(float) - 1)) < 1e-10


def test_sorted_data():
    rng = np.random.default_rng(2)
    x = np.sort(rng.standard_normal(200_000) * 1e3 + 1e7).reshape(-1, 2)
    n, mu, m2 = moments_ld(x, 0)
    np.testing.assert_allclose(moments(x).var(), (m2 / n).astype(np.float64), rtol=1e-12)


def test_nearly_constant_columns():
    const = np.full((5_000, 3), 123456.789)
    const[7, 1] += 1e-6  # one tiny deviation
    const[::2, 2] += 1e-9
    got = moments(const).var()
    assert got[0] == 0.0
    for j in (1, 2):
        np.testing.assert_allclose(got[j], var_exact(const[:, j]), rtol=1e-6)
    assert np.all(moments(const[::-1]).var() >= 0)


def test_tiny_and_huge_counts():
    m = moments(np.array([[3.0, -1.0]]))
    assert m.count == 1 and np.all(m.var() == 0)
    # a huge weighted count merged with a tiny one
    big = Moments.from_arrays(1e15, [0.0], [1e15])
    small = moments(np.array([[1e3]]))
    merged = big + small
    n = 1e15 + 1
    mean = 1e3 / n
    np.testing.assert_allclose(merged.mean, [mean], rtol=1e-12)
    np.testing.assert_allclose(merged.m2, [1e15 + 1e6 * 1e15 / n], rtol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_blocks_starting_with_an_outlier(seed):
    """Each block's one-pass sums are shifted by its first sample; an outlier there must not cost
    digits (the block is redone with a two-pass, else this loses about 1e-11)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40_000, 1)) * 1e-3 + 1.0
    x[::4096] = 1e3
    n, mu, m2 = moments_ld(x, 0)
    truth = float((m2 / n)[0])
    for arr, axis in ((x, 0), (np.ascontiguousarray(x[:, 0]), 0), (x.reshape(10, 1, 4000), (0, 2))):
        assert abs(float(np.ravel(moments(arr, axis).var())[0]) / truth - 1) < 1e-13
