"""Test-time estimators against direct numpy implementations of their papers' formulas."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import streamnorm
from streamnorm import AlphaMix, BatchStats, DecayingEMA, PriorMix, PriorPopulation
from streamnorm.estimators import from_dict

RNG = np.random.default_rng(7)
C, P = 3, 4  # channels, positions per sample (a 2x2 feature map)
SRC_MEAN = np.array([0.5, -1.0, 2.0])
SRC_VAR = np.array([1.5, 0.25, 4.0])  # unbiased (PyTorch's running_var)


def batches(sizes):
    """NCHW batches (n, C, 2, 2) and their moments over (0, 2, 3)."""
    out = []
    for n in sizes:
        x = RNG.normal(1.0, 2.0, size=(n, C, 2, 2))
        out.append((x, streamnorm.moments(x, axis=(0, 2, 3))))
    return out


def flat(x):
    """(values, C): every spatial position of every sample."""
    return np.moveaxis(x, 1, -1).reshape(-1, C)


def src_biased(values):
    if values == 0 or math.isinf(values):  # no prior, or a prior of infinite weight
        return SRC_VAR
    return SRC_VAR * (values - 1) / values


@pytest.mark.parametrize("n", [2, 5])
def test_batch_stats_is_the_last_batch(n):
    est = BatchStats()
    data = batches([3, n])
    for _, m in data:
        est.update(m)
    x = data[-1][0]
    v = flat(x)
    np.testing.assert_allclose(est.mean, v.mean(0), rtol=1e-12)
    np.testing.assert_allclose(est.var, v.var(0), rtol=1e-12)
    np.testing.assert_allclose(est.running_var("unbiased"), v.var(0, ddof=1), rtol=1e-12)


def test_batch_stats_rejects_one_value():
    est = BatchStats()
    with pytest.raises(ValueError, match="at least 2 values per dimension"):
        est.update(streamnorm.moments(np.ones((1, 3))))
    # one sample with spatial positions is fine
    est.update(streamnorm.moments(RNG.normal(size=(1, 3, 2, 2)), axis=(0, 2, 3)))
    assert est.count == 4


@pytest.mark.parametrize("prior", [0.0, 1.0, 16.0, math.inf])
@pytest.mark.parametrize("pooled", [False, True])
def test_prior_mix_formula(prior, pooled):
    est = PriorMix(source=(SRC_MEAN, SRC_VAR), prior=prior, positions=P, pooled=pooled)
    data = batches([5, 3])
    for _, m in data:
        est.update(m)
    x = data[-1][0]
    v = flat(x)
    n = x.shape[0]
    w = 1.0 if math.isinf(prior) else prior / (prior + n)
    vs = src_biased(prior * P)
    mean = w * SRC_MEAN + (1 - w) * v.mean(0)
    var = w * vs + (1 - w) * v.var(0)
    if pooled:
        var = var + w * (1 - w) * (SRC_MEAN - v.mean(0)) ** 2
    np.testing.assert_allclose(est.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(est.var, var, rtol=1e-12)
    if prior == 0:  # pure target: prediction-time BN
        np.testing.assert_allclose(est.var, v.var(0), rtol=1e-12)
    if math.isinf(prior):  # pure source
        np.testing.assert_array_equal(est.mean, SRC_MEAN)
        np.testing.assert_array_equal(est.var, SRC_VAR)


def test_prior_mix_pooled_is_the_union_of_values():
    # a prior worth N samples of P positions: N * P values with the source's mean and variance
    prior = 2
    src_vals = RNG.normal(size=(prior * P, C))
    source = (src_vals.mean(0), src_vals.var(0, ddof=1))
    est = PriorMix(source=source, prior=prior, positions=P, pooled=True)
    x, m = batches([3])[0]
    est.update(m)
    union = np.concatenate([src_vals, flat(x)])
    np.testing.assert_allclose(est.mean, union.mean(0), rtol=1e-12)
    np.testing.assert_allclose(est.var, union.var(0), rtol=1e-12)
    np.testing.assert_allclose(est.running_var("unbiased"), union.var(0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_alpha_mix_formula(alpha):
    est = AlphaMix(source=(SRC_MEAN, SRC_VAR), alpha=alpha)
    data = batches([4, 6])
    for _, m in data:
        est.update(m)
    x = data[-1][0]
    v = flat(x)
    np.testing.assert_allclose(est.mean, alpha * v.mean(0) + (1 - alpha) * SRC_MEAN, rtol=1e-12)
    np.testing.assert_allclose(est.var, alpha * v.var(0) + (1 - alpha) * SRC_VAR, rtol=1e-12)
    np.testing.assert_allclose(
        est.running_var("unbiased"), alpha * v.var(0, ddof=1) + (1 - alpha) * SRC_VAR, rtol=1e-12
    )


@pytest.mark.parametrize("with_source", [True, False])
def test_decaying_ema_formula(with_source):
    m0, decay, m_min = 0.5, 0.7, 0.2
    source = (SRC_MEAN, SRC_VAR) if with_source else None
    est = DecayingEMA(source=source, m0=m0, decay=decay, m_min=m_min)
    data = batches([2, 3, 1, 4, 2])
    mean = SRC_MEAN.copy() if with_source else None
    var = SRC_VAR.copy() if with_source else None
    for t, (x, m) in enumerate(data):
        est.update(m)
        v = flat(x)
        if mean is None:
            mean, var = v.mean(0), v.var(0)
            continue
        mt = max(m_min, m0 * decay ** (t if with_source else t))
        mean = (1 - mt) * mean + mt * v.mean(0)
        var = (1 - mt) * var + mt * v.var(0)
    np.testing.assert_allclose(est.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(est.var, var, rtol=1e-12)


def test_decaying_ema_limits():
    data = batches([3, 4])
    keep = DecayingEMA(source=(SRC_MEAN, SRC_VAR), m0=0.0, m_min=0.0)
    last = DecayingEMA(source=(SRC_MEAN, SRC_VAR), m0=1.0, decay=1.0)
    for _, m in data:
        keep.update(m)
        last.update(m)
    np.testing.assert_array_equal(keep.mean, SRC_MEAN)
    v = flat(data[-1][0])
    np.testing.assert_allclose(last.var, v.var(0), rtol=1e-12)
    with pytest.raises(TypeError, match="cannot be merged"):
        keep.merge(last)


@pytest.mark.parametrize("prior", [0.0, 3.0, 16.0, math.inf])
def test_prior_population_formula(prior):
    est = PriorPopulation(source=(SRC_MEAN, SRC_VAR), prior=prior, positions=P)
    np.testing.assert_array_equal(est.mean, SRC_MEAN)  # no target yet: the source
    data = batches([1, 1, 4, 2])
    for _, m in data:
        est.update(m)
    v = np.concatenate([flat(x) for x, _ in data])
    n = sum(x.shape[0] for x, _ in data)
    w = 1.0 if math.isinf(prior) else prior / (prior + n)
    d = SRC_MEAN - v.mean(0)
    mean = w * SRC_MEAN + (1 - w) * v.mean(0)
    var = w * src_biased(prior * P) + (1 - w) * v.var(0) + w * (1 - w) * d * d
    np.testing.assert_allclose(est.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(est.var, var, rtol=1e-12)
    if prior == 0:  # AdaBN: the population of the target
        np.testing.assert_allclose(est.var, v.var(0), rtol=1e-12)
    if math.isinf(prior):
        np.testing.assert_array_equal(est.var, SRC_VAR)


def test_prior_population_equals_exact_pooled_values_and_merges():
    prior = 3
    src_vals = RNG.normal(size=(prior * P, C))
    source = (src_vals.mean(0), src_vals.var(0, ddof=1))
    data = batches([1, 2, 1, 5])
    one = PriorPopulation(source=source, prior=prior, positions=P)
    a = PriorPopulation(source=source, prior=prior, positions=P)
    b = PriorPopulation(source=source, prior=prior, positions=P)
    for i, (_, m) in enumerate(data):
        one.update(m)
        (a if i < 2 else b).update(m)
    union = np.concatenate([src_vals] + [flat(x) for x, _ in data])
    for est in (one, a.merge(b), from_dict(one.to_dict()), one.copy()):
        np.testing.assert_allclose(est.mean, union.mean(0), rtol=1e-12)
        np.testing.assert_allclose(est.var, union.var(0), rtol=1e-12)
        np.testing.assert_allclose(est.running_var("unbiased"), union.var(0, ddof=1), rtol=1e-12)
    assert a.merge(b).count == one.count == sum(x.size // C for x, _ in data)
    other = PriorPopulation(source=(SRC_MEAN, SRC_VAR), prior=prior, positions=P)
    with pytest.raises(ValueError, match="different source"):
        a.merge(other)


@pytest.mark.parametrize(
    "est",
    [
        BatchStats(),
        PriorMix(source=(SRC_MEAN, SRC_VAR)),
        AlphaMix(source=(SRC_MEAN, SRC_VAR)),
        DecayingEMA(source=(SRC_MEAN, SRC_VAR)),
        DecayingEMA(),
        PriorPopulation(source=(SRC_MEAN, SRC_VAR), positions=P),
    ],
    ids=lambda e: repr(e),
)
def test_roundtrip_reset_and_errors(est):
    for _, m in batches([2, 3]):
        est.update(m)
    back = from_dict(est.to_dict())
    np.testing.assert_array_equal(back.mean, est.mean)
    np.testing.assert_array_equal(back.var, est.var)
    np.testing.assert_array_equal(est.copy().running_var(), est.running_var())
    with pytest.raises(ValueError, match="dimension mismatch"):
        est.update(streamnorm.moments(np.ones((4, 5))))
    est.reset()
    assert est.count == 0


def test_source_is_required_and_checked():
    with pytest.raises(ValueError, match="no source statistics"):
        PriorPopulation().update(streamnorm.moments(np.ones((2, 3))))
    with pytest.raises(TypeError, match=r"\(mean, var\) pair"):
        PriorMix(source=np.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        AlphaMix(source=(np.ones(3), np.ones(2)))
    with pytest.raises(ValueError, match=">= 0"):
        PriorPopulation(source=(np.ones(3), -np.ones(3)))
    with pytest.raises(ValueError, match="prior"):
        PriorMix(source=(np.ones(3), np.ones(3)), prior=-1)


@pytest.mark.parametrize("cls", [AlphaMix, DecayingEMA, PriorMix, PriorPopulation])
def test_complex_sources_are_refused_as_moments_refuses_complex(cls):
    """A complex source raises ``TypeError`` (as ``moments()``), never keeps the real part."""
    torch = pytest.importorskip("torch")
    real = np.ones(3)
    for bad in (real + 1j, torch.ones(3, dtype=torch.complex64), [1 + 0j, 2.0, 3.0]):
        for source in ((bad, real), (real, bad)):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no ComplexWarning: an error instead
                with pytest.raises(TypeError, match="complex"):
                    cls(source=source)
    with pytest.raises(TypeError, match="complex"):
        streamnorm.moments(real + 1j)


def test_decaying_ema_zero_momentum_and_decay_are_documented_and_work():
    """``m0`` and ``decay`` take ``[0, 1]``, as the docstring says."""
    doc = DecayingEMA.__doc__ or ""
    assert "m0 : float, default 0.1\n        Momentum of the first update, in ``[0, 1]``" in doc
    assert "after every batch, in ``[0, 1]``" in doc
    data = batches([3, 4, 5])
    est = DecayingEMA(source=(SRC_MEAN, SRC_VAR), m0=0.5, decay=0.0, m_min=0.25)
    ref = SRC_MEAN.copy()
    for i, (_, m) in enumerate(data):
        est.update(m)
        w = 0.5 if i == 0 else 0.25  # decay 0: m0 for the first batch, m_min after
        ref = (1 - w) * ref + w * np.asarray(m.mean)
    np.testing.assert_allclose(est.mean, ref, rtol=1e-12)
