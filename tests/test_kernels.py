"""The CPU kernels called directly: serial twins, slot merges, the row loop's remainders, plans."""

from __future__ import annotations

import numpy as np
import pytest
from naive import moments_ld

from streamnorm import _kernels as K
from streamnorm import _kernels_normalize as KN
from streamnorm._jit import renamed, twins
from streamnorm._layout import plan
from streamnorm._reduce import run_rows


def _rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def test_serial_twins_are_distinct_functions_with_their_own_cache_names():
    for par, ser in (
        (K.rows_slots, K.rows_slots_serial),
        (K.cf_moments, K.cf_moments_serial),
        (K.cf_rows_moments, K.cf_rows_moments_serial),
        (KN.normalize_rows, KN.normalize_rows_serial),
        (KN.normalize_cf, KN.normalize_cf_serial),
    ):
        assert par.py_func is not ser.py_func
        assert ser.py_func.__qualname__ == par.py_func.__qualname__ + "_serial"
        assert par.targetoptions.get("parallel") and not ser.targetoptions.get("parallel")


@pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")
def test_twins_helper_copies_code_under_a_new_name():
    def f(a, b=2):
        return a * b

    g = renamed(f, "g")
    assert g.__name__ == g.__qualname__ == "g" and g(3) == 6 and g.__code__ is f.__code__
    par, ser = twins(f, {"parallel": True, "cache": False}, {"cache": False})
    assert par(4, 3) == ser(4, 3) == 12
    assert ser.py_func.__name__ == "f_serial"
    with pytest.raises(TypeError, match="plain Python function"):
        renamed(len, "x")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 130, 1027])
@pytest.mark.parametrize("block_rows", [1, 3, 4, 64])
def test_rows_kernel_every_remainder_of_the_four_row_step(rows, block_rows):
    rng = np.random.default_rng(rows * 7 + block_rows)
    x = (rng.standard_normal((rows, 37)) * 3 + 1e4).astype(np.float32)
    n, m, q, lo = K.rows_moments(x, block_rows, 2)
    n_s, m_s, q_s, lo_s = K.rows_moments_serial(x, block_rows, 2)
    for a, b in ((n, n_s), (m, m_s), (q, q_s), (lo, lo_s)):
        assert np.array_equal(a, b)
    cnt, mean, m2 = moments_ld(x, 0)
    assert np.array_equal(n, cnt.astype(np.float64))
    assert _rel(np.longdouble(m) + np.longdouble(lo), mean) < 1e-15
    if rows > 1:
        assert _rel(q, m2) < 1e-12


@pytest.mark.parametrize("A", [1, 2, 3, 4, 5, 7, 12])
@pytest.mark.parametrize("rows_per", [1, 2, 3, 5])
@pytest.mark.parametrize("L", [1, 2, 7, 49])
def test_cf_rows_kernel_every_pairing_of_samples_and_row_halves(A, rows_per, L):
    """Samples are read two at a time (a, a + h); a left-over sample by the halves of its rows."""
    rng = np.random.default_rng(A * 100 + rows_per * 10 + L)
    x = (rng.standard_normal((A, 3, L)) * 2 + 5e3).astype(np.float32)
    n, m, q, lo = K.cf_rows_moments(x, rows_per)
    n_s, m_s, q_s, lo_s = K.cf_rows_moments_serial(x, rows_per)
    for a, b in ((n, n_s), (m, m_s), (q, q_s), (lo, lo_s)):
        assert np.array_equal(a, b)
    cnt, mean, m2 = moments_ld(x, (0, 2))
    assert np.array_equal(n, cnt.astype(np.float64))
    assert _rel(np.longdouble(m) + np.longdouble(lo), mean) < 1e-15
    if A * L > 1:
        assert _rel(q, m2) < 1e-12


@pytest.mark.parametrize("rows_per", [1, 3, 4])
def test_cf_rows_kernel_refines_a_run_that_starts_with_an_outlier(rows_per):
    """Each run's one-pass sums are shifted by its first element: an outlier there costs ~3000x
    cancellation, above REFINE, so the run is redone with a two-pass (else ~3e-13)."""
    rng = np.random.default_rng(rows_per)
    x = rng.standard_normal((12, 2, 3001)) * 1e-3 + 1.0
    x[::rows_per, :, 0] = 1e3
    cnt, mean, m2 = moments_ld(x, (0, 2))
    n, m, q, lo = K.cf_rows_moments(x, rows_per)
    assert _rel(q, m2) < 1e-14


@pytest.mark.parametrize(
    "counts",
    [[3.0, 1.0, 7.0, 2.0, 4.0], [0.0, 3.0, 0.0, 7.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0] * 5],
)
def test_merge_slots_uniform_counts_bit_equal_per_dim_counts(counts):
    """The one-count-per-chunk path (scalar divisions) gives the per-dimension path's bits."""
    rng = np.random.default_rng(1)
    c_mean = rng.standard_normal((5, 3)) * 1e3
    c_mean[2, 1] = np.inf
    c_m2 = rng.random((5, 3))
    counts = np.array(counts)
    ref = np.array([1.0, -2.0, 0.5])
    a = K.merge_slots(counts[:, None].copy(), c_mean, c_m2, ref)
    b = K.merge_slots(np.repeat(counts[:, None], 3, axis=1), c_mean, c_m2, ref)
    for u, v in zip(a, b, strict=True):
        assert np.array_equal(u, v, equal_nan=True)


def _two_step(c_n, c_mean, c_m2, ref, check, state):
    """merge_slots, the finite check, then chan_merge_dd: what merge_slots_into replaces."""
    n, mean, lo, m2 = (a.copy() for a in state)
    bn, bm, bq, blo = K.merge_slots(c_n, c_mean, c_m2, ref)
    fed = bn > 0
    if check and not (np.isfinite(bm[fed]).all() and np.isfinite(bq[fed]).all()):
        return False, (n, mean, lo, m2)
    K.chan_merge_dd(n, mean, lo, m2, bn, bm, blo, bq)
    return True, (n, mean, lo, m2)


def _states(D, rng):
    empty = (np.zeros(D), np.full(D, np.nan), np.zeros(D), np.zeros(D))
    full = (np.full(D, 900.0), rng.standard_normal(D) * 1e4, rng.random(D) * 1e-12, rng.random(D))
    mixed = (np.arange(D, dtype=float), *full[1:])  # one count per dimension: the general path
    return {"empty": empty, "uniform": full, "per-dimension": mixed}


@pytest.mark.parametrize("counts", [[128.0, 128.0], [3.0, 0.0, 7.0, 1.0], [0.0, 0.0], [5.0]])
@pytest.mark.parametrize("bad", [None, "inf", "nan", "m2"])
@pytest.mark.parametrize("check", [False, True])
def test_merge_slots_into_bit_equal_two_steps(counts, bad, check):
    """The fused merge of slots into a state gives merge_slots + chan_merge_dd's bits."""
    rng = np.random.default_rng(3)
    k, D = len(counts), 37
    c_n = np.array(counts)[:, None]
    c_mean = rng.standard_normal((k, D)) * 1e3
    c_m2 = rng.random((k, D)) * 10
    ref = rng.standard_normal(D) * 1e5
    if bad == "inf":
        c_mean[-1, 4] = np.inf
    elif bad == "nan":
        c_mean[0, 5] = np.nan
    elif bad == "m2":
        c_m2[-1, 6] = np.inf
    for name, state in _states(D, rng).items():
        ok, want = _two_step(c_n, c_mean, c_m2, ref, check, state)
        got = tuple(a.copy() for a in state)
        assert K.merge_slots_into(c_n, c_mean, c_m2, ref, check, *got) == ok, name
        for u, v in zip(got, want, strict=True):
            assert np.array_equal(u, v, equal_nan=True), name
        if not ok:  # refused: the state is left as it was
            for u, v in zip(got, state, strict=True):
                assert np.array_equal(u, v, equal_nan=True), name


def test_merge_slots_into_zero_dimensions():
    z, slots = np.zeros(0), np.zeros((2, 0))
    assert K.merge_slots_into(np.ones((2, 1)), slots, slots, z, True, z, z, z, z)


def test_merge_slots_against_chan_formula():
    rng = np.random.default_rng(1)
    c_mean = rng.standard_normal((5, 3))
    c_m2 = rng.random((5, 3))
    counts = np.array([3.0, 1.0, 7.0, 2.0, 4.0])
    ref = np.array([1.0, -2.0, 0.5])
    a = K.merge_slots(counts[:, None].copy(), c_mean, c_m2, ref)
    # against merging the raw samples these slots stand for: Chan's formula, in float64
    n_tot = counts.sum()
    mean = (counts[:, None] * c_mean).sum(0) / n_tot
    m2 = c_m2.sum(0) + (counts[:, None] * (c_mean - mean) ** 2).sum(0)
    assert np.allclose(a[1] + a[3], mean + ref, rtol=1e-14, atol=1e-14)
    assert np.allclose(a[2], m2, rtol=1e-13)


def test_rows_general_matches_plain_kernel_and_oracle():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((301, 9)).astype(np.float32) + 50
    w = rng.integers(0, 3, 301).astype(np.float64)
    n, m, q, lo = run_rows(x, w, False)
    cnt, mean, m2 = moments_ld(x, 0, weights=w)
    assert np.array_equal(n, cnt.astype(np.float64))
    assert _rel(m, mean) < 1e-14
    assert _rel(q, m2) < 1e-12
    x[5, 2] = np.nan
    n, m, q, lo = run_rows(x, None, True)
    cnt, mean, m2 = moments_ld(x, 0, omit=True)
    assert n[2] == 300 and np.array_equal(n, cnt.astype(np.float64))
    assert _rel(q, m2) < 1e-12


@pytest.mark.parametrize("shape", [(1, 3, 10), (1, 1, 5000), (1, 4, 9000)])
def test_channels_first_single_sample_chunks(shape):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) + 1e3).astype(np.float32)
    cnt, mean, m2 = moments_ld(x, (0, 2))
    for cs in (1, 3):  # blocks per chunk: a different merge tree, the same bits with threads
        par = K.cf_moments(x, 4096, cs)
        for a, b in zip(par, K.cf_moments_serial(x, 4096, cs), strict=True):
            assert np.array_equal(a, b)
        assert np.array_equal(par[0], cnt.astype(np.float64))
        assert _rel(np.longdouble(par[1]) + np.longdouble(par[3]), mean) < 1e-15
        assert _rel(par[2], m2) < 1e-12


def test_plan_with_out_merges_only_where_both_arrays_allow():
    x = np.zeros((4, 6, 5), np.float32)
    out = np.zeros((4, 6, 5), np.float32)
    p = plan(x, (0,), out=out)
    assert p.kind == "rows" and p.view.shape == (4, 30) and p.out_view.shape == (4, 30)
    assert p.out_view.flags.writeable and not p.view.flags.writeable
    # out transposed in its last two axes: they cannot merge for out, so the plan keeps them
    out_t = np.zeros((4, 5, 6), np.float32).transpose(0, 2, 1)
    p = plan(x, (0,), out=out_t)
    assert p.kind == "generic"
    p = plan(x, (0,))
    assert p.kind == "rows" and p.out_view is None
    # negative strides: out is flipped with x
    xf = x[::-1]
    of = out[::-1]
    p = plan(xf, (0, 2), out=of)
    assert p.kind == "cf" and p.flipped == {0}
    assert np.shares_memory(p.out_view, out)


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((5, 3), (0,)),
        ((4, 6, 5), (0, 1)),
        ((4, 6, 5), (0, 2)),
        ((2, 3, 4, 5), (0, 2, 3)),
        ((2, 3, 4, 5), (0, 1, 2)),
        ((2, 3, 4, 5, 6), (0, 2, 3, 4)),
        ((1, 3, 4, 5), (0, 2, 3)),
        ((2, 1, 4, 5), (0, 2, 3)),
        ((2, 3, 1, 5), (0, 2, 3)),
        ((7, 1), (0,)),
        ((4, 6, 5), (1, 2)),
    ],
)
def test_quick_plan_equals_the_general_search(monkeypatch, shape, axes):
    """The shortcut for C-contiguous NCHW / (N, D) arrays finds exactly the general plan."""
    from streamnorm import _layout

    x = np.zeros(shape, np.float32)
    quick = plan(x, axes)
    monkeypatch.setattr(_layout, "_quick_plan", lambda x, axes: None)
    full = plan(x, axes)
    assert quick.kind == full.kind
    assert (quick.kept_phys, quick.red_phys) == (full.kept_phys, full.red_phys)
    assert quick.view.shape == full.view.shape and quick.view.strides == full.view.strides
    assert quick.kept_shape == full.kept_shape and not quick.view.flags.writeable
    assert np.shares_memory(quick.view, x)


@pytest.mark.slow
def test_leaf_loops_vectorize():
    from streamnorm.cli.bench import vector_report

    rows = {r["loop"]: r for r in vector_report()}
    assert set(rows) == set(K.LEAF_LOOPS)
    for r in rows.values():
        assert r["vectorized"] != "no (scalar)", r
