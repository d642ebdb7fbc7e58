"""Estimators against PyTorch's BatchNorm, exact references and the theory of pooled variances."""

from __future__ import annotations

import numpy as np
import pytest

import streamnorm
from streamnorm import EMA, CumulativeAverage, Moments, Population, WindowedAverage, moments
from streamnorm import estimators as E

BN_CASES = [  # (BatchNorm class name, batch shape, reduced axes)
    ("BatchNorm1d", (16, 5), (0,)),
    ("BatchNorm1d", (8, 5, 7), (0, 2)),
    ("BatchNorm2d", (8, 3, 6, 5), (0, 2, 3)),
    ("BatchNorm3d", (4, 2, 3, 4, 5), (0, 2, 3, 4)),
]


def _batches(shape, count, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(count):  # batches from shifting distributions, as during training
        scale = rng.uniform(0.5, 3.0)
        out.append((rng.standard_normal(shape) * scale + 0.3 * b - 1.0).astype(dtype))
    return out


def _fill(est, batches, axis=0, epochs=None):
    for i, x in enumerate(batches):
        est.update(moments(x, axis), epoch=0 if epochs is None else epochs[i])
    return est


# ---- against PyTorch


@pytest.mark.parametrize("cls, shape, axis", BN_CASES)
@pytest.mark.parametrize("momentum", [0.1, 0.37, 1.0])
def test_ema_matches_torch_batchnorm(cls, shape, axis, momentum):
    torch = pytest.importorskip("torch")
    C = shape[1]
    bn = getattr(torch.nn, cls)(C, momentum=momentum).train()
    ema = EMA(momentum, "torch")
    with torch.no_grad():
        for x in _batches(shape, 12, seed=1):
            bn(torch.from_numpy(x))
            ema.update(moments(x, axis))
    np.testing.assert_allclose(ema.mean, bn.running_mean.numpy(), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ema.var, bn.running_var.numpy(), rtol=2e-6, atol=1e-6)
    assert ema.var_convention == "unbiased"
    np.testing.assert_array_equal(ema.running_var(), ema.var)
    assert ema.batches == 12 and ema.count == 12 * int(np.prod(shape)) // C


@pytest.mark.parametrize("cls, shape, axis", BN_CASES)
def test_cumulative_matches_torch_momentum_none(cls, shape, axis):
    torch = pytest.importorskip("torch")
    bn = getattr(torch.nn, cls)(shape[1], momentum=None).train()
    cum = CumulativeAverage()
    with torch.no_grad():
        for x in _batches(shape, 9, seed=2):
            bn(torch.from_numpy(x))
            cum.update(moments(x, axis))
    np.testing.assert_allclose(cum.mean, bn.running_mean.numpy(), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(cum.var, bn.running_var.numpy(), rtol=2e-6, atol=1e-6)
    assert cum.batches == int(bn.num_batches_tracked)


def test_ema_channels_last_input_matches_torch():
    torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm2d(4).train()
    ema = EMA()
    with torch.no_grad():
        for x in _batches((6, 4, 5, 5), 5, seed=3):
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            bn(t)
            ema.update(moments(t, (0, 2, 3)))
    np.testing.assert_allclose(ema.mean, bn.running_mean.numpy(), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ema.var, bn.running_var.numpy(), rtol=2e-6, atol=1e-6)


# ---- EMA styles


def _ema_reference(batches, decay, unbiased, start_var=1.0):
    m, v = 0.0, start_var
    for x in batches:
        x = x.astype(np.float64)
        m = decay * m + (1 - decay) * x.mean(0)
        v = decay * v + (1 - decay) * x.var(0, ddof=1 if unbiased else 0)
    return m, v


@pytest.mark.parametrize("p", [0.99, 0.9, 0.0])
def test_ema_keras_style(p):
    xs = _batches((10, 3), 20, seed=4, dtype=np.float64)
    ema = _fill(EMA(p, "keras", unbiased=False), xs)
    m, v = _ema_reference(xs, p, unbiased=False)
    np.testing.assert_allclose(ema.mean, m, rtol=1e-12)
    np.testing.assert_allclose(ema.var, v, rtol=1e-12)
    assert ema.var_convention == "biased"
    _, vu = _ema_reference(xs, p, unbiased=True)
    np.testing.assert_allclose(ema.running_var("unbiased"), vu, rtol=1e-12)
    np.testing.assert_allclose(ema.running_var("biased"), v, rtol=1e-12)


def test_ema_torch_and_keras_are_the_same_average():
    xs = _batches((7, 4), 15, seed=5, dtype=np.float64)
    a = _fill(EMA(0.25, "torch"), xs)
    b = _fill(EMA(0.75, "keras"), xs)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-13)
    np.testing.assert_allclose(a.var, b.var, rtol=1e-13)


@pytest.mark.parametrize("style, p", [("torch", 0.1), ("keras", 0.99), ("torch", 1.0)])
def test_bias_correction_first_batch_equals_batch_statistics(style, p):
    x = _batches((9, 4), 1, seed=6, dtype=np.float64)[0]
    ema = EMA(p, style, bias_correction=True).update(moments(x))
    np.testing.assert_allclose(ema.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ema.var, x.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(ema.running_var("biased"), x.var(0), rtol=1e-12)
    raw_mean, raw_var = ema.state  # what a BatchNorm layer would hold: pulled toward 0 and 1
    if p not in (1.0,):
        assert not np.allclose(raw_mean, x.mean(0))
        assert not np.allclose(raw_var, x.var(0, ddof=1))


def test_bias_correction_formula_after_several_batches():
    xs = _batches((6, 2), 5, seed=7, dtype=np.float64)
    decay = 0.8
    ema = _fill(EMA(0.2, bias_correction=True), xs)
    w = np.array([(1 - decay) * decay ** (4 - i) for i in range(5)])
    w /= w.sum()  # bias correction = weights renormalized over the batches seen
    means = np.array([x.mean(0) for x in xs])
    vars_ = np.array([x.var(0, ddof=1) for x in xs])
    np.testing.assert_allclose(ema.mean, w @ means, rtol=1e-12)
    np.testing.assert_allclose(ema.var, w @ vars_, rtol=1e-12)


# ---- Population


def test_population_equals_moments_of_concatenated_data():
    rng = np.random.default_rng(8)
    data = rng.standard_normal((1000, 6)) * rng.uniform(0.1, 10, 6) + rng.uniform(-5, 5, 6)
    cuts = np.sort(rng.choice(np.arange(1, 1000), 17, replace=False))
    parts = np.split(data, cuts)
    pop = _fill(Population(), parts)
    np.testing.assert_allclose(pop.mean, data.mean(0), rtol=1e-13)
    np.testing.assert_allclose(pop.var, data.var(0), rtol=1e-12)
    np.testing.assert_allclose(pop.running_var("unbiased"), data.var(0, ddof=1), rtol=1e-12)
    assert pop.count == 1000 and pop.batches == 18
    # the same merge as Moments.merge_all of the batch moments (up to the last bit)
    ref = Moments.merge_all(moments(p) for p in parts)
    np.testing.assert_allclose(pop.mean, ref.mean, rtol=1e-14)
    np.testing.assert_allclose(pop.var, ref.var(), rtol=1e-14)
    m = pop.moments
    assert isinstance(m, Moments) and m.count == 1000


def test_population_far_from_zero_keeps_digits():
    # mean 1e8, std 1: sum-of-squares formulas lose every digit here
    rng = np.random.default_rng(9)
    data = 1e8 + rng.standard_normal((4000, 3))
    pop = _fill(Population(), np.array_split(data, 13))
    exact = np.array([float(np.var(np.asarray(c, dtype=np.longdouble))) for c in data.T])
    np.testing.assert_allclose(pop.var, exact, rtol=1e-9)
    naive = (data**2).mean(0) - data.mean(0) ** 2
    assert np.max(np.abs(naive - exact) / exact) > 1e-3  # the naive formula demonstrably fails


def test_population_nan_omit_matches_nanvar():
    rng = np.random.default_rng(10)
    data = rng.standard_normal((60, 4))
    data[rng.random(data.shape) < 0.2] = np.nan
    data[:, 3] = np.nan
    data[5, 3] = 2.0
    pop = Population()
    for part in np.array_split(data, 6):
        pop.update(moments(part, nan_policy="omit"))
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(pop.mean, np.nanmean(data, 0), rtol=1e-13)
        np.testing.assert_allclose(pop.var, np.nanvar(data, 0), rtol=1e-12, atol=1e-15)
    assert pop.count.tolist() == np.sum(~np.isnan(data), 0).tolist()


def test_population_dimension_shape_kept():
    x = np.random.default_rng(11).standard_normal((10, 2, 3))
    pop = Population().update(moments(x[:4])).update(moments(x[4:]))
    assert pop.mean.shape == (2, 3) and pop.var.shape == (2, 3)
    np.testing.assert_allclose(pop.var, x.var(0), rtol=1e-12)
    one = Population().update(moments(np.arange(5.0)))  # 1-D data: scalar estimates
    assert np.ndim(one.mean) == 0 and float(one.var) == 2.0


# ---- pooled vs mean of batch


def test_pooled_vs_mean_of_batch_on_two_small_batches():
    a, b = np.array([[0.0], [2.0]]), np.array([[10.0], [12.0]])
    both = np.concatenate([a, b])
    for est in (
        CumulativeAverage(unbiased=False, var_mode="pooled"),
        WindowedAverage(0, 0, "pooled", unbiased=False),
        Population(),
    ):
        _fill(est, [a, b])
        np.testing.assert_allclose(est.var, both.var(0))  # 26: the total variance
        np.testing.assert_allclose(est.mean, [6.0])
    mob = _fill(CumulativeAverage(unbiased=True), [a, b])
    np.testing.assert_allclose(mob.var, [2.0])  # mean of the unbiased batch variances (2, 2)
    np.testing.assert_allclose(mob.running_var("biased"), [1.0])
    wmob = _fill(WindowedAverage(0, 0, "mean_of_batch"), [a, b])
    np.testing.assert_allclose(wmob.var, [2.0])
    np.testing.assert_allclose(wmob.mean, [6.0])


def test_law_of_total_variance_with_drifting_small_batches():
    rng = np.random.default_rng(12)
    n, B = 4, 300
    shifts = np.linspace(-3, 3, B)  # drift: batch means scatter with variance var(shifts)
    xs = [rng.standard_normal((n, 2)) + s for s in shifts]
    pooled = _fill(CumulativeAverage(unbiased=False, var_mode="pooled"), xs)
    mob = _fill(CumulativeAverage(unbiased=False, var_mode="mean_of_batch"), xs)
    means = np.array([x.mean(0) for x in xs])
    within = np.array([x.var(0) for x in xs]).mean(0)
    between = means.var(0)
    np.testing.assert_allclose(pooled.var, within + between, rtol=1e-12)  # exact identity
    np.testing.assert_allclose(pooled.var, np.concatenate(xs).var(0), rtol=1e-12)
    np.testing.assert_allclose(mob.var, within, rtol=1e-12)
    # mean_of_batch misses the between-batch variance: about var(shifts) = 3.0
    assert np.all(pooled.var - mob.var > 2.5)
    # with Bessel correction, the pooled estimate is N / (N - 1) times the biased one
    up = _fill(CumulativeAverage(unbiased=True, var_mode="pooled"), xs)
    N = n * B
    np.testing.assert_allclose(up.var, pooled.var * N / (N - 1), rtol=1e-12)


def test_windowed_pooled_is_count_weighted_with_uneven_batches():
    rng = np.random.default_rng(13)
    xs = [rng.standard_normal((k, 3)) * (1 + k) for k in (2, 9, 3, 30, 5)]
    w = _fill(WindowedAverage(0, 0, unbiased=False), xs)
    allx = np.concatenate(xs)
    np.testing.assert_allclose(w.mean, allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(w.var, allx.var(0), rtol=1e-12)
    wm = _fill(WindowedAverage(0, 0, "mean_of_batch"), xs)
    np.testing.assert_allclose(wm.mean, np.mean([x.mean(0) for x in xs], 0), rtol=1e-12)
    np.testing.assert_allclose(wm.var, np.mean([x.var(0, ddof=1) for x in xs], 0), rtol=1e-12)


# ---- WindowedAverage epochs


def _epoch_data(E, per_epoch=3, seed=14):
    rng = np.random.default_rng(seed)
    xs, epochs = [], []
    for e in range(E):
        for _ in range(per_epoch):
            xs.append(rng.standard_normal((5, 2)) + 10.0 * e)
            epochs.append(e)
    return xs, epochs


@pytest.mark.parametrize(
    "E, first, last, used",
    [
        (10, 0.25, 0.25, list(range(2, 8))),
        (10, 1, 3, list(range(1, 7))),
        (10, 0, 0, list(range(10))),
        (3, 0.25, 0.25, [0, 1, 2]),
        (4, 0.25, 0.25, [1, 2]),
        (7, 0.49, 0.0, [3, 4, 5, 6]),
        (100, 0.29, 0.0, list(range(29, 100))),
    ],
)
def test_windowed_picks_the_right_epochs(E, first, last, used):
    xs, epochs = _epoch_data(E)
    w = _fill(WindowedAverage(first, last), xs, epochs=epochs)
    assert w.epochs_used == used and w.epochs_seen == list(range(E))
    sel = np.concatenate([x for x, e in zip(xs, epochs, strict=True) if e in used])
    np.testing.assert_allclose(w.mean, sel.mean(0), rtol=1e-12)
    np.testing.assert_allclose(w.var, sel.var(0, ddof=1), rtol=1e-12)
    assert w.count == len(xs) * 5  # every sample seen, used or not


def test_windowed_counts_only_epochs_with_batches():
    xs, _ = _epoch_data(4)
    xs = xs[:4]
    w = _fill(WindowedAverage(1, 1), xs, epochs=[0, 3, 7, 9])
    assert w.epochs_seen == [0, 3, 7, 9] and w.epochs_used == [3, 7]


def test_windowed_empty_window_is_a_clear_error():
    xs, epochs = _epoch_data(2)
    w = _fill(WindowedAverage(1, 1), xs, epochs=epochs)
    assert w.epochs_used == []
    with pytest.raises(ValueError, match="leave none"):
        _ = w.mean


def test_windowed_epochs_must_not_go_backwards():
    w = WindowedAverage().update(moments(np.ones((3, 1))), epoch=4)
    with pytest.raises(ValueError, match="backwards"):
        w.update(moments(np.ones((3, 1))), epoch=3)
    assert w.batches == 1  # state unchanged


# ---- merging


def test_cumulative_merge_with_equal_batch_weights():
    xs = _batches((4, 3), 10, seed=16, dtype=np.float64)
    full = _fill(CumulativeAverage(var_mode="pooled"), xs)
    merged = _fill(CumulativeAverage(var_mode="pooled"), xs[:3]).merge(
        _fill(CumulativeAverage(var_mode="pooled"), xs[3:])
    )
    np.testing.assert_allclose(merged.mean, full.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.var, full.var, rtol=1e-12)


def test_ema_cannot_merge():
    with pytest.raises(TypeError, match="order of the batches"):
        EMA().merge(EMA())
    with pytest.raises(TypeError):
        _ = EMA() + EMA()


def test_merge_rejects_mismatches():
    x = moments(np.ones((3, 2)))
    with pytest.raises(TypeError, match="Population"):
        Population().merge(CumulativeAverage())
    with pytest.raises(ValueError, match="different parameters"):
        WindowedAverage(1, 1).merge(WindowedAverage(2, 1))
    with pytest.raises(ValueError, match="dimension shapes"):
        Population().update(x).merge(Population().update(moments(np.ones((3, 4)))))


# ---- protocol


ALL = [
    lambda: Population(),
    lambda: EMA(),
    lambda: EMA(0.9, "keras", unbiased=False, bias_correction=True),
    lambda: CumulativeAverage(),
    lambda: CumulativeAverage(unbiased=False, var_mode="pooled"),
    lambda: WindowedAverage(),
    lambda: WindowedAverage(2, 0.1, "mean_of_batch", unbiased=False),
]


def test_from_dict_rejects_foreign_records():
    d = Population().update(moments(np.ones((3, 2)))).to_dict()
    with pytest.raises(ValueError, match="not a Population"):
        Population.from_dict(EMA().to_dict())
    with pytest.raises(ValueError, match="unknown estimator"):
        E.from_dict({**d, "estimator": "Nope"})
    with pytest.raises(ValueError, match="format"):
        E.from_dict({**d, "format": "something else"})
    with pytest.raises(ValueError, match="version"):
        E.from_dict({**d, "version": 99})
    with pytest.raises(ValueError, match="missing"):
        E.from_dict({"format": d["format"]})
    with pytest.raises(ValueError, match="corrupt"):
        E.from_dict({**d, "state_mean": np.zeros(5)})
    with pytest.raises(TypeError):
        E.from_dict([1, 2])


@pytest.mark.parametrize("make", ALL)
def test_reset_and_reading_before_data(make):
    est = make()
    with pytest.raises(ValueError, match="no batches"):
        _ = est.mean
    with pytest.raises(ValueError, match="no batches"):
        _ = est.var
    _fill(est, [np.ones((4, 2)), np.zeros((4, 2))])
    assert est.reset() is est and est.batches == 0 and est.shape is None
    est.update(moments(np.ones((4, 5))))  # a new dimension shape is fine after reset
    assert est.shape == (5,) and est.count == 4


def test_weighted_counts_are_floats():
    x = np.arange(8.0).reshape(4, 2)
    pop = Population().update(moments(x, weights=[0.5, 1.0, 1.5, 2.0]))
    assert isinstance(pop.count, float) and pop.count == 5.0
    ref = np.average(x, axis=0, weights=[0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(pop.mean, ref)


def test_default_estimators():
    d = E.default_estimators()
    assert list(d) == ["population", "ema", "ema_keras", "cumulative", "windowed"]
    assert d["ema_keras"].momentum == 0.99 and d["ema_keras"].var_convention == "biased"
    assert d["ema"].var_convention == "unbiased"
    assert E.default_estimators()["ema"] is not d["ema"]


def test_public_names():
    for name in ("Population", "EMA", "CumulativeAverage", "WindowedAverage"):
        assert getattr(streamnorm, name) is getattr(E, name)


# ---- bad input


def test_mismatched_dimension_is_a_value_error():
    for make in ALL:
        est = make().update(moments(np.ones((4, 3))))
        with pytest.raises(ValueError, match="dimension mismatch"):
            est.update(moments(np.ones((4, 2))))
        assert est.batches == 1


@pytest.mark.parametrize("epoch", [-1, -100])
def test_negative_epochs(epoch):
    for make in ALL:
        with pytest.raises(ValueError, match="epoch must be >= 0"):
            make().update(moments(np.ones((3, 1))), epoch=epoch)


@pytest.mark.parametrize("epoch", [1.5, "1", True, None])
def test_epoch_type(epoch):
    with pytest.raises(TypeError, match="epoch"):
        Population().update(moments(np.ones((3, 1))), epoch=epoch)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.0000001, 2.0, float("nan"), float("inf")])
def test_torch_momentum_outside_0_1(p):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        EMA(p)


@pytest.mark.parametrize("p", [1.0, -0.5, 1.5])
def test_keras_momentum_outside_0_1(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EMA(p, "keras")


def test_bad_parameters():
    with pytest.raises(TypeError, match="momentum"):
        EMA("0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="momentum"):
        EMA(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="style"):
        EMA(0.1, "caffe")
    with pytest.raises(TypeError, match="unbiased"):
        EMA(unbiased="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="var_mode"):
        CumulativeAverage(var_mode="total")
    with pytest.raises(ValueError, match="var_mode"):
        WindowedAverage(var_mode="mean")
    with pytest.raises(ValueError, match="convention"):
        Population().update(moments(np.ones((3, 1)))).running_var("ddof1")


@pytest.mark.parametrize("drop", [0.5, 0.75, 1.0, -0.1, -1, float("nan")])
def test_bad_drop_fractions(drop):
    with pytest.raises(ValueError):
        WindowedAverage(drop_first=drop)
    with pytest.raises(ValueError):
        WindowedAverage(drop_last=drop)


@pytest.mark.parametrize("drop", [True, "0.25", None])
def test_bad_drop_types(drop):
    with pytest.raises(TypeError):
        WindowedAverage(drop_first=drop)


def test_not_moments_is_a_type_error():
    with pytest.raises(TypeError, match="streamnorm.moments"):
        Population().update(np.ones((3, 2)))  # type: ignore[arg-type]


def test_batches_too_small_for_unbiased_variance():
    one = moments(np.ones((1, 3)))
    for est in (EMA(), CumulativeAverage(), WindowedAverage(var_mode="mean_of_batch")):
        with pytest.raises(ValueError, match="more than 1 sample"):
            est.update(one)
        assert est.batches == 0
    for est in (EMA(unbiased=False), CumulativeAverage(var_mode="pooled"), Population()):
        est.update(one)  # fine without Bessel's correction
        assert est.batches == 1
    empty_dim = moments(np.array([[np.nan, 1.0], [np.nan, 2.0]]), nan_policy="omit")
    with pytest.raises(ValueError, match="at least 1 sample"):
        EMA(unbiased=False).update(empty_dim)
    assert np.isnan(Population().update(empty_dim).mean[0])


def test_empty_moments_are_ignored():
    est = Population().update(Moments())
    assert est.batches == 0 and est.shape is None


# ---- renamed keywords (deprecated for one release)


def test_ema_convention_keyword_is_deprecated_for_style():
    xs = _batches((6, 3), 4, seed=20, dtype=np.float64)
    with pytest.warns(DeprecationWarning, match="style='keras'") as rec:
        old = EMA(0.9, convention="keras", unbiased=False)
    assert rec[0].filename == __file__  # the warning points at the caller
    new = EMA(0.9, style="keras", unbiased=False)
    assert old.style == "keras" and repr(old) == repr(new)
    np.testing.assert_array_equal(_fill(old, xs).var, _fill(new, xs).var)
    with pytest.warns(DeprecationWarning, match="EMA.style"):
        assert new.convention == "keras"
    with pytest.raises(TypeError, match="pass only style"):
        EMA(0.9, "keras", convention="torch")
    with pytest.raises(ValueError, match="style"), pytest.warns(DeprecationWarning):
        EMA(0.9, convention="caffe")


def test_windowed_mode_keyword_is_deprecated_for_var_mode():
    xs, epochs = _epoch_data(4, seed=21)
    with pytest.warns(DeprecationWarning, match="var_mode='mean_of_batch'"):
        old = WindowedAverage(1, 1, mode="mean_of_batch")
    new = WindowedAverage(1, 1, var_mode="mean_of_batch")
    assert old.var_mode == "mean_of_batch" and repr(old) == repr(new)
    np.testing.assert_array_equal(
        _fill(old, xs, epochs=epochs).var, _fill(new, xs, epochs=epochs).var
    )
    with pytest.warns(DeprecationWarning, match="WindowedAverage.var_mode"):
        assert new.mode == "mean_of_batch"
    with pytest.raises(TypeError, match="pass only var_mode"):
        WindowedAverage(var_mode="mean_of_batch", mode="pooled")


@pytest.mark.parametrize(
    "est, old, new",
    [
        (EMA(0.9, "keras", unbiased=False), "param_convention", "param_style"),
        (WindowedAverage(0, 0, "mean_of_batch"), "param_mode", "param_var_mode"),
    ],
)
def test_records_with_the_old_parameter_names_still_load(est, old, new, recwarn):
    xs = _batches((5, 2), 3, seed=22, dtype=np.float64)
    rec = _fill(est, xs).to_dict()
    assert new in rec and old not in rec
    legacy = {(old if k == new else k): v for k, v in rec.items()}
    back = E.from_dict(legacy)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    assert repr(back) == repr(est)
    np.testing.assert_array_equal(back.var, est.var)
