"""streamnorm.dask.moments equals the in-memory result whatever the chunking, layout, policy."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from naive import moments_ld

import streamnorm

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
sd = pytest.importorskip("streamnorm.dask")

RTOL = 1e-12


# --------------------------------------------------------------------------------------------
# helpers


def assert_same(got: streamnorm.Moments, ref: streamnorm.Moments, rtol: float = RTOL) -> None:
    """``got`` equals ``ref`` to ``rtol`` (means: relative to the spread), NaNs where ``ref``'s."""
    assert got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got.count), np.asarray(ref.count), rtol=1e-15)
    assert (
        type(got.count) is type(ref.count)
        or np.asarray(got.count).dtype == np.asarray(ref.count).dtype
    )
    sd_ = np.sqrt(np.asarray(ref.var(), dtype=float))
    scale = float(np.nanmax(sd_)) if np.isfinite(sd_).any() else 1.0
    np.testing.assert_allclose(got.mean, ref.mean, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(got.m2, ref.m2, rtol=rtol, atol=rtol * scale**2)


def both(x: np.ndarray, chunks, axis=0, **kw) -> tuple[streamnorm.Moments, streamnorm.Moments]:
    got = sd.moments(da.from_array(x, chunks=chunks), axis, **kw)
    ref = streamnorm.moments(x, axis, **kw)
    return got, ref


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------------------------
# chunkings and layouts

ROWS_CHUNKS = {
    "regular": (50, 7),
    "irregular": ((1, 99, 3, 150, 47), 7),
    "one-chunk": (300, 7),
    "kept-axis": (60, (2, 3, 2)),
    "empty-chunk": ((100, 0, 200), (4, 0, 3)),
    "single-rows": ((1,) * 300, 7),
}


@pytest.mark.parametrize("chunks", list(ROWS_CHUNKS.values()), ids=list(ROWS_CHUNKS))
def test_rows_any_chunking(rng, chunks):
    x = rng.normal(3.0, 2.0, size=(300, 7))
    got, ref = both(x, chunks)
    assert_same(got, ref)
    n, mu, m2 = moments_ld(x, 0)
    assert got.count == 300
    np.testing.assert_allclose(got.m2, m2, rtol=RTOL)


LAYOUTS = {
    # name: (shape, axis, chunks)
    "nchw": ((6, 4, 5, 7), (0, 2, 3), (2, 3, 2, 4)),
    "nhwc": ((6, 5, 7, 4), (0, 1, 2), (4, 2, 7, 3)),
    "per-sample": ((6, 4, 5, 7), (2, 3), (3, 2, 3, 3)),
    "ncl": ((5, 3, 40), (0, 2), (2, 3, 9)),
    "all-axes": ((6, 4, 5), None, (2, 3, 2)),
    "middle-axis": ((6, 4, 5), 1, (3, 3, 2)),
    "negative-axes": ((6, 4, 5, 7), (-4, -2, -1), (5, 1, 2, 7)),
    "3d-axis0": ((9, 4, 5), 0, (4, 4, 3)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_layouts(rng, layout):
    shape, axis, chunks = layout
    x = rng.normal(-5.0, 3.0, size=shape)
    got, ref = both(x, chunks, axis)
    assert_same(got, ref)
    _, mu, m2 = moments_ld(x, axis)
    np.testing.assert_allclose(got.m2, m2, rtol=RTOL)


def test_strided_and_transposed_sources(rng):
    base = rng.normal(1.0, 1.0, size=(40, 6, 8))
    for x in (base.transpose(2, 0, 1), base[::-2, :, ::3], np.asfortranarray(base)):
        got, ref = both(x, (7, 3, 2), axis=(0, 2))
        assert_same(got, ref)


@pytest.mark.parametrize("dtype", ["float32", "int16", "uint8", "bool"])
def test_dtypes(rng, dtype):
    x = (rng.normal(50, 20, size=(97, 5))).clip(0, 255).astype(dtype)
    got, ref = both(x, ((40, 57), (2, 3)))
    assert_same(got, ref)


def test_far_from_zero_tiny_chunks_keep_digits(rng):
    """Chunk means near 1e8 with a unit spread: merging rounded chunk means would lose digits."""
    x = rng.normal(1e8, 1.0, size=(2000, 3))
    n, mu, m2 = moments_ld(x, 0)
    got = sd.moments(da.from_array(x, chunks=(10, 3)))
    np.testing.assert_allclose(got.m2, m2, rtol=1e-12)
    np.testing.assert_allclose(got.mean, mu, rtol=1e-15)
    assert_same(got, streamnorm.moments(x))
    # views and channels-first blocks, also far from zero
    y = rng.normal(-1e8, 3.0, size=(12, 3, 5, 5))
    _, _, m2y = moments_ld(y, (0, 2, 3))
    got_y = sd.moments(da.from_array(y, chunks=(1, 2, 3, 4)), (0, 2, 3))
    np.testing.assert_allclose(got_y.m2, m2y, rtol=1e-12)
    got_v = sd.moments(da.from_array(x, chunks=(7, (1, 2))))
    np.testing.assert_allclose(got_v.m2, m2, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# weights, NaN policies


def test_weights_numpy_and_dask(rng):
    x = rng.normal(7.0, 2.0, size=(6, 4, 5, 5))
    w = rng.uniform(0, 3, size=6)
    w[2] = 0.0  # a zero weight, and a whole zero-weight chunk below
    got, ref = both(x, (2, 3, 2, 4), (0, 2, 3), weights=w)
    assert_same(got, ref)
    assert isinstance(got.count, float)
    # dask weights with a different chunking are rechunked to x's first reduced axis
    wd = da.from_array(w, chunks=4)
    got2 = sd.moments(da.from_array(x, chunks=(2, 3, 2, 4)), (0, 2, 3), weights=wd)
    assert_same(got2, ref)
    # weights along a kept-chunked rows array, and zero weights over a whole chunk
    xr = rng.normal(size=(90, 6))
    wr = rng.uniform(0, 1, 90)
    wr[30:60] = 0.0
    got3, ref3 = both(xr, (30, (4, 2)), weights=wr)
    assert_same(got3, ref3)
    ref_drop = streamnorm.moments(
        np.concatenate([xr[:30], xr[60:]]), weights=np.r_[wr[:30], wr[60:]]
    )
    assert_same(got3, ref_drop)


def test_weights_per_sample_layout(rng):
    x = rng.normal(size=(4, 3, 6, 6))
    w = rng.uniform(0, 2, size=6)  # first reduced axis is 2 (H)
    got, ref = both(x, (2, 2, 4, 3), (2, 3), weights=w)
    assert_same(got, ref)


def test_integer_weights_equal_repetition(rng):
    x = rng.normal(size=(30, 3))
    w = rng.integers(0, 4, size=30)
    got = sd.moments(da.from_array(x, chunks=(7, 2)), weights=w)
    rep = streamnorm.moments(np.repeat(x, w, axis=0))
    np.testing.assert_allclose(got.mean, rep.mean, rtol=1e-12)
    np.testing.assert_allclose(got.var(ddof=1), rep.var(ddof=1), rtol=1e-12)
    assert got.count == rep.count


def test_nan_propagate(rng):
    x = rng.normal(size=(100, 5))
    x[37, 1] = np.nan
    x[80, 3] = np.inf
    got, ref = both(x, ((30, 30, 40), (3, 2)))
    assert np.isnan(got.mean[[1, 3]]).all() and np.isnan(got.m2[[1, 3]]).all()
    assert_same(got, ref)


def test_nan_omit_per_dimension_counts(rng):
    x = rng.normal(2.0, 1.0, size=(120, 4))
    x[rng.random(x.shape) < 0.3] = np.nan
    x[:40, 2] = np.nan  # a whole chunk without finite values in one dimension
    x[:, 3] = np.nan  # a dimension without any
    got, ref = both(x, (40, (3, 1)), nan_policy="omit")
    np.testing.assert_array_equal(got.count, np.isfinite(x).sum(axis=0))
    assert got.count.dtype == np.int64
    assert np.isnan(got.mean[3]) and got.m2[3] == 0
    assert_same(got, ref)
    with np.errstate(all="ignore"):
        np.testing.assert_allclose(got.mean[:3], np.nanmean(x[:, :3], axis=0), rtol=1e-12)
        np.testing.assert_allclose(got.var()[:3], np.nanvar(x[:, :3], axis=0), rtol=1e-12)


def test_nan_omit_first_sample_missing_far_from_zero(rng):
    x = rng.normal(1e7, 1.0, size=(200, 2))
    x[0, :] = np.nan  # the chunk's reference cannot be its first sample
    got = sd.moments(da.from_array(x, chunks=(50, 2)), nan_policy="omit")
    _, mu, m2 = moments_ld(x[1:], 0)
    np.testing.assert_allclose(got.m2, m2, rtol=1e-12)


def test_nan_raise_names_global_dimensions(rng):
    x = rng.normal(size=(60, 3, 4))
    x[50, 2, 3] = np.nan
    x[10, 2, 3] = np.nan
    x[5, 0, 1] = np.inf
    with pytest.raises(ValueError, match=r"3 non-finite value\(s\).*\[\(0, 1\), \(2, 3\)\]"):
        sd.moments(da.from_array(x, chunks=(20, 2, 2)), nan_policy="raise")
    clean = rng.normal(size=(60, 3))
    got, ref = both(clean, 20, nan_policy="raise")
    assert_same(got, ref)


# --------------------------------------------------------------------------------------------
# edge shapes, split_every, determinism


def test_empty_and_degenerate_shapes(rng):
    empty = sd.moments(da.zeros((0, 4), chunks=2))
    assert empty.shape is None and repr(empty) == "Moments(empty)"
    nodims, ref = both(rng.normal(size=(10, 0)), 5)
    assert nodims.shape == (0,) == ref.shape and nodims.count == 10
    one, ref = both(rng.normal(size=(1, 3)), 1)
    assert_same(one, ref)
    assert np.all(one.m2 == 0)
    got, ref = both(rng.normal(size=(5, 3)), 2, axis=())
    assert_same(got, ref)
    w0, ref = both(rng.normal(size=(0, 3)), 2, weights=np.zeros(0))
    assert w0.shape is None and ref.shape is None


@pytest.mark.parametrize("split_every", [2, 3, {0: 2, 1: 4}, None])
def test_split_every(rng, split_every):
    x = rng.normal(10.0, 1.0, size=(64, 6, 6))
    got = sd.moments(da.from_array(x, chunks=(4, 3, 2)), (0, 2), split_every=split_every)
    assert_same(got, streamnorm.moments(x, (0, 2)))


def test_deterministic_across_schedulers(rng):
    x = da.from_array(rng.normal(5.0, 2.0, size=(500, 4)), chunks=(23, 3))
    with dask.config.set(scheduler="sync"):
        a = sd.moments(x, split_every=3)
    with dask.config.set(scheduler="threads", num_workers=2):
        b = sd.moments(x, split_every=3)
        c = sd.moments(x, split_every=3)
    for s in (b, c):
        np.testing.assert_array_equal(a.mean, s.mean)
        np.testing.assert_array_equal(a.m2, s.m2)


def test_merges_with_in_memory_state(rng):
    x = rng.normal(size=(50, 3))
    y = rng.normal(4.0, 1.0, size=(30, 3))
    got = sd.moments(da.from_array(x, chunks=20)) + streamnorm.moments(y)
    assert_same(got, streamnorm.moments(np.concatenate([x, y])))


def test_random_partitions_property():
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=25, deadline=None)
    @hyp.given(
        cuts=st.lists(st.integers(0, 80), max_size=6),
        dcut=st.integers(1, 5),
        offset=st.sampled_from([0.0, 1e4, -1e8]),
        seed=st.integers(0, 2**16),
    )
    def check(cuts, dcut, offset, seed):
        r = np.random.default_rng(seed)
        x = r.normal(offset, 1.0 + abs(offset) * 1e-6, size=(80, 5))
        edges = sorted({0, 80, *cuts})
        rows = tuple(b - a for a, b in zip(edges[:-1], edges[1:], strict=True))
        cols = (dcut, 5 - dcut) if dcut < 5 else (5,)
        got, ref = both(x, (rows, cols))
        assert_same(got, ref)

    check()


# --------------------------------------------------------------------------------------------
# bad input


def test_non_dask_input_is_a_type_error():
    with pytest.raises(TypeError, match=r"streamnorm\.moments.*from_array"):
        sd.moments(np.ones((3, 2)))
    with pytest.raises(TypeError, match="dask.array.Array"):
        sd.moments([[1.0, 2.0]])


def test_bad_arguments(rng):
    x = da.from_array(rng.normal(size=(10, 3)), chunks=5)
    with pytest.raises(TypeError, match="complex"):
        sd.moments(x.astype(complex))
    with pytest.raises(ValueError, match="nan_policy"):
        sd.moments(x, nan_policy="ignore")
    with pytest.raises(ValueError, match="split_every"):
        sd.moments(x, split_every=1)
    with pytest.raises(TypeError, match="split_every"):
        sd.moments(x, split_every=2.5)
    with pytest.raises(ValueError, match="length 10"):
        sd.moments(x, weights=np.ones(9))
    with pytest.raises(ValueError, match="non-negative"):
        sd.moments(x, weights=-np.ones(10))
    with pytest.raises(TypeError, match="real numbers"):
        sd.moments(x, weights=np.array(["a"] * 10))
    with pytest.raises(ValueError, match="non-negative"):  # found inside the computation
        sd.moments(x, weights=da.from_array(-np.ones(10), chunks=5))
    with pytest.raises(ValueError, match="axis=()"):
        sd.moments(x, axis=(), weights=np.ones(10))
    with pytest.raises(np.exceptions.AxisError):
        sd.moments(x, axis=2)
    with pytest.raises(ValueError, match="0-d"):
        sd.moments(da.from_array(np.float64(1.0)))
    unknown = x[x[:, 0] > 0]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        sd.moments(unknown)
    assert_same(sd.moments(unknown.compute_chunk_sizes()), streamnorm.moments(unknown.compute()))


# --------------------------------------------------------------------------------------------
# a real cluster: two worker processes, and one of them killed mid-computation


def _slow(block: np.ndarray, delay: float) -> np.ndarray:
    time.sleep(delay)
    return block


@pytest.mark.slow
def test_local_cluster_two_processes(dask_client):
    rng = np.random.default_rng(5)
    x = rng.normal(1e5, 2.0, size=(400, 3, 8)).astype(np.float32)
    w = rng.uniform(0, 1, size=400)
    xd = da.from_array(x, chunks=(37, 2, 8))
    got = sd.moments(xd, (0, 2), weights=w)
    assert_same(got, streamnorm.moments(x, (0, 2), weights=w))
    pids = set(dask_client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids


@pytest.mark.slow
def test_killed_worker_result_still_exact(dask_client):
    rng = np.random.default_rng(6)
    x = rng.normal(-3e6, 1.5, size=(2400, 4))
    xd = da.from_array(x, chunks=(100, 4)).map_blocks(_slow, 0.15, dtype=x.dtype)
    pids = dask_client.run(os.getpid)
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["m"] = sd.moments(xd)
        except BaseException as e:  # reported below
            out["err"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    time.sleep(1.2)  # both workers are busy, and each holds finished chunks
    assert th.is_alive(), "the computation ended before the worker could be killed"
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    th.join(timeout=90)
    assert not th.is_alive(), "the computation did not finish after the worker died"
    assert "err" not in out, out.get("err")
    got = out["m"]
    assert isinstance(got, streamnorm.Moments)
    assert_same(got, streamnorm.moments(x))
    assert victim not in set(dask_client.run(os.getpid).values())
