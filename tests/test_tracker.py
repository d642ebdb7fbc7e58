"""Tracker: one kernel pass per batch feeding every estimator, epochs, save/resume."""

from __future__ import annotations

import os

import numpy as np
import pytest

import streamnorm
from streamnorm import EMA, CumulativeAverage, Moments, Population, Tracker, WindowedAverage
from streamnorm import _tracker as tracker_module
from streamnorm.estimators import default_estimators


def _run(tr, steps, rng, layers=(("conv", (6, 3, 4, 4)), ("fc", (6, 5)), ("head", (6,)))):
    """Feed ``steps`` steps of random batches; a new epoch every 4 steps."""
    for _ in range(steps):
        if tr._step and tr._step % 4 == 0:
            tr.next_epoch()
        tr._step += 1
        for name, shape in layers:
            tr.update(name, rng.standard_normal(shape) * 2.0 + tr.epoch)


def _new_tracker(**kw):
    tr = Tracker(**kw)
    tr._step = 0  # test bookkeeping only
    return tr


def test_default_set_and_layers_in_first_seen_order():
    tr = Tracker()
    assert tr.estimator_names == list(default_estimators())
    rng = np.random.default_rng(0)
    tr.update("b", rng.standard_normal((4, 3)))
    tr.update("a", rng.standard_normal((4, 2, 5, 5)))
    tr.update("b", rng.standard_normal((4, 3)))
    assert tr.layers == ["b", "a"]
    est = tr.estimates()
    assert list(est) == ["b", "a"] and list(est["a"]) == tr.estimator_names
    mean, var = est["a"]["population"]
    assert mean.shape == (2,) and var.shape == (2,) and mean.dtype == np.float64


def test_default_axis_is_every_axis_but_channels():
    rng = np.random.default_rng(1)
    x4, x2, x1 = (
        rng.standard_normal((5, 3, 4, 2)),
        rng.standard_normal((7, 4)),
        rng.standard_normal(9),
    )
    tr = Tracker({"pop": Population()})
    m = tr.update("nchw", x4)
    assert m.shape == (3,)
    tr.update("nd", x2)
    tr.update("flat", x1)
    e = tr.estimates()
    np.testing.assert_allclose(e["nchw"]["pop"][1], x4.var(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(e["nd"]["pop"][1], x2.var(0), rtol=1e-12)
    np.testing.assert_allclose(e["flat"]["pop"][1], x1.var(), rtol=1e-12)
    tr.update("nhwc", np.moveaxis(x4, 1, -1), axis=(0, 1, 2))  # explicit axis
    np.testing.assert_allclose(tr.estimates()["nhwc"]["pop"][1], e["nchw"]["pop"][1], rtol=1e-12)


def test_torch_channels_last_tensor():
    torch = pytest.importorskip("torch")
    x = torch.randn(6, 4, 5, 5)
    a, b = Tracker({"pop": Population()}), Tracker({"pop": Population()})
    a.update("bn", x)
    b.update("bn", x.contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(a.estimates()["bn"]["pop"][1], b.estimates()["bn"]["pop"][1])


def test_tracker_equals_estimators_fed_directly_bit_for_bit():
    # more batches than a pending group holds, epochs changing inside groups
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((8, 3)) * (1 + i % 3) + i for i in range(53)]
    epochs = [i // 7 for i in range(53)]
    tr = Tracker()
    direct = default_estimators()
    for x, e in zip(xs, epochs, strict=True):
        tr.set_epoch(e)
        m = tr.update("l", x)
        for est in direct.values():
            est.update(m, epoch=e)
    got = tr.estimates()["l"]
    for name, est in direct.items():
        np.testing.assert_array_equal(got[name][0], est.mean)
        np.testing.assert_array_equal(got[name][1], est.var)
        assert tr.estimator("l", name).batches == 53
    assert tr.estimator("l", "windowed").epochs_used == [2, 3, 4, 5]


def test_estimator_objects_are_live():
    tr = Tracker({"pop": Population()})
    tr.update("l", np.zeros((4, 2)))
    pop = tr.estimator("l", "pop")
    assert pop.count == 4
    tr.update("l", np.ones((4, 2)))  # pending in the tracker...
    assert pop.count == 8  # ...and applied as soon as the estimator is read
    np.testing.assert_allclose(pop.mean, [0.5, 0.5])


def test_nan_omit_per_dimension_counts_mixed_with_uniform_batches():
    rng = np.random.default_rng(3)
    data = rng.standard_normal((40, 3))
    data[rng.random(data.shape) < 0.25] = np.nan
    tr = Tracker({"pop": Population(), "pooled": WindowedAverage(0, 0, unbiased=False)})
    clean = rng.standard_normal((10, 3))
    tr.update("l", clean[:5])
    for part in np.array_split(data, 4):
        tr.update("l", part, nan_policy="omit")
    tr.update("l", clean[5:])
    allx = np.concatenate([clean[:5], data, clean[5:]])
    for name in ("pop", "pooled"):
        mean, var = tr.estimates()["l"][name]
        np.testing.assert_allclose(mean, np.nanmean(allx, 0), rtol=1e-12)
        np.testing.assert_allclose(var, np.nanvar(allx, 0), rtol=1e-12)
    assert tr.estimator("l", "pop").count.tolist() == np.sum(~np.isnan(allx), 0).tolist()


def test_save_and_resume_equals_an_uninterrupted_run(tmp_path):
    ests = {
        **default_estimators(),
        "ema_bc": EMA(0.3, bias_correction=True),
        "mob": WindowedAverage(1, 1, "mean_of_batch"),
        "cum_pooled": CumulativeAverage(var_mode="pooled"),
    }
    full = _new_tracker(estimators=ests)
    _run(full, 23, np.random.default_rng(4))

    rng = np.random.default_rng(4)
    first = _new_tracker(estimators=ests)
    _run(first, 10, rng)  # stops mid-epoch, with batches pending
    path = tmp_path / "tracker.npz"
    first.save(path)
    resumed = Tracker.load(path)
    resumed._step = first._step
    assert resumed.epoch == first.epoch and resumed.layers == first.layers
    assert resumed.estimator_names == list(ests)
    _run(resumed, 13, rng)

    a, b = full.estimates(), resumed.estimates()
    for layer in a:
        for name in a[layer]:
            np.testing.assert_array_equal(a[layer][name][0], b[layer][name][0])
            np.testing.assert_array_equal(a[layer][name][1], b[layer][name][1])
    da, db = full.to_dict(), resumed.to_dict()
    assert da.keys() == db.keys()
    for k in da:
        np.testing.assert_array_equal(np.asarray(da[k]), np.asarray(db[k]), err_msg=k)
    # a layer first seen after the resume gets the same prototypes
    resumed.update("late", np.ones((3, 2)))
    assert resumed.estimator("late", "ema_bc").bias_correction is True
    assert sorted(os.listdir(tmp_path)) == ["tracker.npz"]  # no temp files left behind


def test_pickle_and_deepcopy_continue_like_the_original():
    import copy
    import pickle

    rng = np.random.default_rng(7)
    tr = Tracker()
    for _ in range(5):
        tr.update("l", rng.standard_normal((6, 3)))  # leaves batches pending
    for clone in (pickle.loads(pickle.dumps(tr)), copy.deepcopy(tr)):
        x = rng.standard_normal((6, 3))
        tr2 = copy.deepcopy(tr)
        clone.update("l", x)
        tr2.update("l", x)
        a, b = clone.estimates()["l"], tr2.estimates()["l"]
        for name in a:
            np.testing.assert_array_equal(a[name][1], b[name][1])
        assert clone.estimator("l", "ema").batches == 6


def test_save_overwrites_and_empty_tracker_round_trips(tmp_path):
    path = tmp_path / "t.npz"
    Tracker().save(path)
    back = Tracker.load(path)
    assert back.layers == [] and back.estimator_names == list(default_estimators())
    tr = Tracker({"pop": Population()})
    tr.update("x", np.arange(6.0).reshape(3, 2))
    tr.save(path)
    assert Tracker.load(path).layers == ["x"]


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tracker.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable"):
        Tracker.load(junk)
    other = tmp_path / "moments.npz"
    streamnorm.moments(np.ones((3, 2))).save(other)
    with pytest.raises(ValueError, match="Tracker"):
        Tracker.load(other)
    tr = Tracker({"pop": Population()})
    tr.update("x", np.ones((3, 2)))
    d = tr.to_dict()
    with pytest.raises(ValueError, match="version"):
        Tracker.from_dict({**d, "version": 7})


def test_reduce_is_applied_before_the_estimators():
    other = streamnorm.moments(np.full((4, 2), 10.0))  # "the other process's" batch

    def all_reduce(m: Moments) -> Moments:
        return m + other

    tr = Tracker({"pop": Population(), "ema": EMA(1.0)}, reduce=all_reduce)
    x = np.zeros((4, 2))
    m = tr.update("l", x)
    assert m.count == 8
    pop_mean, pop_var = tr.estimates()["l"]["pop"]
    np.testing.assert_allclose(pop_mean, [5.0, 5.0])
    np.testing.assert_allclose(pop_var, [25.0, 25.0])
    tr.update_moments("l", streamnorm.moments(x))
    assert tr.estimator("l", "pop").count == 16
    bad = Tracker(reduce=lambda m: 3)
    with pytest.raises(TypeError, match="reduce must return"):
        bad.update("l", x)
    with pytest.raises(TypeError, match="reduce"):
        Tracker(reduce=5)  # type: ignore[arg-type]


class _Counter:
    """A duck-typed estimator (not a streamnorm Estimator): updated immediately."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def update(self, batch, *, epoch=0):
        self.seen.append(epoch)
        return self

    @property
    def mean(self):
        return np.zeros(1)

    @property
    def var(self):
        return np.ones(1)


def test_custom_estimator_objects(tmp_path):
    tr = Tracker({"n": _Counter(), "pop": Population()})
    tr.update("l", np.ones((3, 1)))
    tr.next_epoch()
    tr.update("l", np.ones((3, 1)))
    assert tr.estimator("l", "n").seen == [0, 1]
    assert tr.estimates()["l"]["n"][1].tolist() == [1.0]
    with pytest.raises(TypeError, match="cannot be saved"):
        tr.save(tmp_path / "t.npz")
    with pytest.raises(TypeError, match="running_var"):
        tr.estimates(convention="unbiased")


def test_estimates_in_a_given_convention():
    tr = Tracker()
    x = np.random.default_rng(5).standard_normal((10, 3))
    tr.update("l", x)
    unb = tr.estimates(convention="unbiased")["l"]
    bia = tr.estimates(convention="biased")["l"]
    np.testing.assert_allclose(unb["population"][1], x.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(bia["population"][1], x.var(0), rtol=1e-12)
    np.testing.assert_allclose(unb["cumulative"][1], x.var(0, ddof=1), rtol=1e-12)
    with pytest.raises(ValueError, match="convention"):
        tr.estimates(convention="torch")


def test_epochs():
    tr = Tracker()
    assert tr.epoch == 0 and tr.next_epoch() == 1 and tr.epoch == 1
    tr.set_epoch(5)
    tr.set_epoch(5)
    with pytest.raises(ValueError, match="backwards"):
        tr.set_epoch(4)
    with pytest.raises(ValueError, match=">= 0"):
        Tracker().set_epoch(-1)
    with pytest.raises(TypeError):
        tr.set_epoch(2.0)  # type: ignore[arg-type]
    assert tr.epoch == 5


def test_bad_input():
    tr = Tracker()
    tr.update("l", np.ones((4, 3)))
    with pytest.raises(ValueError, match="dimension mismatch in layer 'l'"):
        tr.update("l", np.ones((4, 2)))
    assert tr.estimator("l", "population").batches == 1  # nothing was fed
    with pytest.raises(ValueError, match="layer 'l', estimator 'ema'.*more than 1"):
        tr.update("l", np.ones((1, 3)))
    with pytest.raises(ValueError, match="layer 'new'"):
        tr.update("new", np.ones((1, 3)))
    assert tr.layers == ["l"]
    with pytest.raises(TypeError, match="layer must be a str"):
        tr.update(3, np.ones((4, 3)))  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="no layer"):
        tr.estimator("nope", "ema")
    with pytest.raises(KeyError, match="no estimator"):
        tr.estimator("l", "nope")
    with pytest.raises(TypeError, match="dict"):
        Tracker([Population()])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        Tracker({})
    with pytest.raises(TypeError, match="update"):
        Tracker({"x": 3})
    with pytest.raises(TypeError, match="names"):
        Tracker({1: Population()})  # type: ignore[dict-item]
    used = Population().update(streamnorm.moments(np.ones((3, 1))))
    with pytest.raises(ValueError, match="fresh"):
        Tracker({"p": used})
    with pytest.raises(TypeError, match="Moments"):
        tr.update_moments("l", np.ones((4, 3)))  # type: ignore[arg-type]


def test_prototypes_are_copied():
    proto = EMA(0.5)
    tr = Tracker({"ema": proto})
    tr.update("a", np.ones((3, 2)))
    tr.update("b", np.zeros((3, 2)))
    assert proto.batches == 0
    assert tr.estimator("a", "ema") is not tr.estimator("b", "ema")
    np.testing.assert_allclose(tr.estimator("a", "ema").mean, [0.5, 0.5])
    np.testing.assert_allclose(tr.estimator("b", "ema").mean, [0.0, 0.0])


def test_pending_group_size_is_bounded():
    tr = Tracker({"pop": Population()})
    lay = None
    for i in range(3 * tracker_module.MAX_PENDING):
        tr.update("wide", np.full((2, 100_000), float(i)))
        lay = tr._layers["wide"]
        assert 0 <= lay.k < lay.cap  # a full group is applied as soon as it fills
    assert lay is not None
    assert 1 <= lay.cap <= tracker_module.MAX_PENDING
    assert lay.cap * 16 * 100_000 <= max(tracker_module.PENDING_BYTES, 16 * 100_000)
    # what was filed and what was applied add up to every batch
    pop = tr.estimator("wide", "pop")
    assert pop.batches == 3 * tracker_module.MAX_PENDING


def test_returned_moments_can_be_changed_without_touching_the_estimators():
    rng = np.random.default_rng(6)
    xs = [rng.standard_normal((5, 3)) for _ in range(4)]
    tr, ref = Tracker({"pop": Population()}), Tracker({"pop": Population()})
    for x in xs:
        m = tr.update("l", x)  # pending in the tracker, sharing its arrays
        ref.update("l", x)
        assert isinstance(m, Moments)
        m.update(x * 100.0 + 7.0)  # the caller reuses it as an accumulator
        m += streamnorm.moments(x - 3.0)
        np.testing.assert_allclose(m.mean, np.concatenate([x, x * 100 + 7, x - 3]).mean(0))
    np.testing.assert_array_equal(tr.estimates()["l"]["pop"][1], ref.estimates()["l"]["pop"][1])
    np.testing.assert_allclose(tr.estimates()["l"]["pop"][1], np.concatenate(xs).var(0))
