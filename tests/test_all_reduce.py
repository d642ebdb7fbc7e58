"""streamnorm.torch.all_reduce_moments across two gloo processes on this machine.

The two ranks run this file as a script (``python test_all_reduce.py RANK WORLD INIT OUT``); each
writes what it computed to ``OUT/rank<R>.npz`` and the test compares both ranks with the
single-process result on the concatenated data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import streamnorm

WORLD = 2
TIMEOUT_S = 120


# --------------------------------------------------------------------------------------------
# data shared by the ranks and the test (deterministic per rank)


def rank_data(rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + rank)
    n = (37, 501)[rank]  # unequal counts: an average of the ranks' variances would be wrong
    rows = rng.normal((0.0, 1e6)[rank], (1.0, 3.0)[rank], size=(n, 5))  # far apart ranks
    nchw = rng.normal(10.0 * rank, 1.0 + rank, size=(3 + rank, 4, 5, 6)).astype(np.float32)
    w = rng.uniform(0.0, 2.0, size=n)
    nan = rng.normal(size=(n, 4))
    nan[rng.random((n, 4)) < 0.2] = np.nan
    if rank == 0:
        nan[:, 3] = np.nan  # a dimension with no finite value on rank 0 only
    return {"rows": rows, "nchw": nchw, "w": w, "nan": nan}


def cases(d: dict[str, np.ndarray]) -> dict[str, streamnorm.Moments]:
    return {
        "rows": streamnorm.moments(d["rows"]),
        "nchw": streamnorm.moments(d["nchw"], axis=(0, 2, 3)),
        "weighted": streamnorm.moments(d["rows"], weights=d["w"]),
        "omit": streamnorm.moments(d["nan"], nan_policy="omit"),
    }


def _save(path: Path, prefix: str, m: streamnorm.Moments, out: dict[str, np.ndarray]) -> None:
    for k, v in m.to_dict().items():
        out[f"{prefix}.{k}"] = np.asarray(v)


def _same(a: object, b: object) -> bool:
    x, y = np.asarray(a), np.asarray(b)
    return bool(np.array_equal(x, y, equal_nan=x.dtype.kind == "f"))


# --------------------------------------------------------------------------------------------
# the rank process


def _rank_main(rank: int, world: int, init: str, outdir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from streamnorm.torch import all_reduce_moments

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        out: dict[str, np.ndarray] = {}
        d = rank_data(rank)
        mine = cases(d)
        for name, m in mine.items():
            before = m.to_dict()
            r = all_reduce_moments(m)
            _save(Path(outdir), name, r, out)
            after = m.to_dict()
            out[f"{name}.unchanged"] = np.asarray(all(_same(before[k], after[k]) for k in before))
        # an empty state on rank 1 contributes nothing
        r = all_reduce_moments(mine["rows"] if rank == 0 else streamnorm.Moments())
        _save(Path(outdir), "one_empty", r, out)
        out["all_empty"] = np.asarray(all_reduce_moments(streamnorm.Moments()).shape is None)
        # what a plain all_reduce of variances gives (for contrast)
        import torch

        v = torch.from_numpy(np.asarray(mine["rows"].var(ddof=0)).copy())
        dist.all_reduce(v)
        out["naive_var"] = (v / world).numpy()
        # different dimension shapes: a ValueError on every rank, no rank left waiting
        bad = streamnorm.moments(np.ones((4, 3 + rank)))
        try:
            all_reduce_moments(bad)
            out["mismatch"] = np.asarray("no error")
        except ValueError as e:
            out["mismatch"] = np.asarray(str(e))
        _tracker_part(rank, d, out)
        np.savez(os.path.join(outdir, f"rank{rank}.npz"), **out)
    finally:
        dist.destroy_process_group()


def tracker_batches(rank: int) -> list[list[np.ndarray]]:
    """Per epoch, this rank's batches of its ``rows`` data (2 epochs x 4 steps)."""
    rows = rank_data(rank)["rows"]
    return [np.array_split(rows[e::2], 4) for e in range(2)]


def _tracker_part(rank: int, d: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    """Feed a Tracker this rank's batches with reduce=all_reduce_moments."""
    from streamnorm.torch import all_reduce_moments

    t = streamnorm.Tracker(reduce=all_reduce_moments)
    for epoch in tracker_batches(rank):
        for b in epoch:
            t.update("bn", b)
        t.next_epoch()
    for name, (mean, var) in t.estimates()["bn"].items():
        out[f"tracker.{name}.mean"] = mean
        out[f"tracker.{name}.var"] = var


# --------------------------------------------------------------------------------------------
# the test


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, np.ndarray]]:
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("allreduce")
    init = f"file://{tmp / 'init'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    env["NUMBA_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(WORLD), init, str(tmp)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
    res = []
    for r in range(WORLD):
        with np.load(tmp / f"rank{r}.npz") as z:
            res.append({k: z[k] for k in z.files})
    return res


def _state(res: dict[str, np.ndarray], prefix: str) -> streamnorm.Moments:
    return streamnorm.Moments.from_dict(
        {k.split(".", 1)[1]: v for k, v in res.items() if k.startswith(prefix + ".")}
    )


def _expected() -> dict[str, streamnorm.Moments]:
    ds = [rank_data(r) for r in range(WORLD)]
    exp = cases(ds[0])
    for d in ds[1:]:
        for k, m in cases(d).items():
            exp[k] += m
    return exp


def _scale(m: streamnorm.Moments) -> float:
    v = np.asarray(m.var())
    return float(np.nanmax(np.sqrt(v[np.isfinite(v)]))) if np.isfinite(v).any() else 1.0


@pytest.mark.parametrize("name", ["rows", "nchw", "weighted", "omit"])
def test_all_reduce_equals_single_process(ranks, name):
    exp = _expected()[name]
    # the oracle: the concatenated data in one call, independently of the merge
    ds = [rank_data(r) for r in range(WORLD)]
    if name == "rows":
        whole = streamnorm.moments(np.concatenate([d["rows"] for d in ds]))
    elif name == "nchw":
        whole = streamnorm.moments(np.concatenate([d["nchw"] for d in ds]), axis=(0, 2, 3))
    elif name == "weighted":
        whole = streamnorm.moments(
            np.concatenate([d["rows"] for d in ds]), weights=np.concatenate([d["w"] for d in ds])
        )
    else:
        whole = streamnorm.moments(np.concatenate([d["nan"] for d in ds]), nan_policy="omit")
    for r in range(WORLD):
        got = _state(ranks[r], name)
        assert bool(ranks[r][f"{name}.unchanged"]), "the input state was modified"
        np.testing.assert_array_equal(np.asarray(got.count), np.asarray(exp.count))
        s = _scale(whole)
        np.testing.assert_allclose(got.mean, whole.mean, rtol=1e-12, atol=1e-12 * s)
        np.testing.assert_allclose(got.m2, whole.m2, rtol=1e-12, atol=0)
        # the merge is the same as merging in rank order locally: same bits
        np.testing.assert_array_equal(got.mean, exp.mean)
        np.testing.assert_array_equal(got.m2, exp.m2)
    # every rank holds the same bits
    for k in ranks[0]:
        if k.startswith(name + "."):
            np.testing.assert_array_equal(ranks[0][k], ranks[1][k])


def test_omit_counts_are_per_dimension(ranks):
    got = _state(ranks[0], "omit")
    ds = [rank_data(r) for r in range(WORLD)]
    allnan = np.concatenate([d["nan"] for d in ds])
    np.testing.assert_array_equal(got.count, np.isfinite(allnan).sum(axis=0))
    np.testing.assert_allclose(got.mean, np.nanmean(allnan, axis=0), rtol=1e-12)


def test_naive_average_of_variances_is_wrong_here(ranks):
    """The data make the shortcut fail: the exact merge is needed, and is what we got."""
    got = _state(ranks[0], "rows")
    ds = np.concatenate([rank_data(r)["rows"] for r in range(WORLD)])
    exact = ds.astype(np.longdouble).var(axis=0)
    np.testing.assert_allclose(got.var(), exact.astype(np.float64), rtol=1e-12)
    assert np.all(np.abs(ranks[0]["naive_var"] - exact) / exact > 0.5)


def test_empty_ranks(ranks):
    for r in range(WORLD):
        got = _state(ranks[r], "one_empty")
        alone = cases(rank_data(0))["rows"]
        assert got.count == alone.count
        np.testing.assert_array_equal(got.mean, alone.mean)
        np.testing.assert_array_equal(got.m2, alone.m2)
        assert bool(ranks[r]["all_empty"])


def test_shape_mismatch_raises_on_every_rank(ranks):
    for r in range(WORLD):
        msg = str(ranks[r]["mismatch"])
        assert "different dimension shapes" in msg and "(3,)" in msg and "(4,)" in msg


def test_tracker_ranks_see_global_statistics(ranks):
    """Every rank's estimators equal one process fed the global batches (both ranks' rows)."""
    keys = [k for k in ranks[0] if k.startswith("tracker.")]
    assert len(keys) >= 4, "the tracker produced no estimates"
    for k in keys:
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k])
    ref = streamnorm.Tracker()
    per_rank = [tracker_batches(r) for r in range(WORLD)]
    for e in range(2):
        for i in range(4):
            ref.update("bn", np.concatenate([per_rank[r][e][i] for r in range(WORLD)]))
        ref.next_epoch()
    for name, (mean, var) in ref.estimates()["bn"].items():
        got_mean, got_var = ranks[0][f"tracker.{name}.mean"], ranks[0][f"tracker.{name}.var"]
        np.testing.assert_allclose(got_mean, mean, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(got_var, var, rtol=1e-10, err_msg=name)
    # without the all-reduce each rank would see only its own data: far from the global mean
    assert np.all(np.abs(ranks[0]["tracker.population.mean"] - 1e6) < 1e5)


def test_not_initialized_and_bad_input():
    pytest.importorskip("torch")
    from streamnorm.torch import all_reduce_moments

    with pytest.raises(ValueError, match="init_process_group"):
        all_reduce_moments(streamnorm.moments(np.ones((3, 2))))
    with pytest.raises(TypeError, match="streamnorm.Moments"):
        all_reduce_moments(np.ones(3))  # type: ignore[arg-type]


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    sys.stdout.flush()
    os._exit(0)  # the results are on disk; skip the slow interpreter teardown of torch
