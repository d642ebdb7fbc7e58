"""streamnorm.torch.adapt: test-time statistics in a model's BatchNorm layers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import streamnorm  # noqa: E402
import streamnorm.torch as snt  # noqa: E402
from streamnorm import PriorPopulation  # noqa: E402


def small_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.BatchNorm1d(4 * 5 * 5),
        torch.nn.Linear(4 * 5 * 5, 3),
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        for m in model:
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g).double())
                m.running_var.copy_(torch.rand(m.num_features, generator=g).double() + 0.5)
    return model.eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [
        m.__dict__.get("forward") for m in model.modules()
    ]


def assert_restored(model, snap):
    state, forwards = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.__dict__.get("forward") for m in model.modules()] == forwards


def manual_prior_population(model, xs, prior):
    """The same computation written out: each BN layer pools its source prior (N samples of
    P positions, unbiased running_var) with every input it has seen, then normalizes."""
    seen = {}
    outs = []
    for x in xs:
        h = x
        for i, m in enumerate(model):
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                v = np.moveaxis(h.detach().numpy(), 1, -1).reshape(-1, m.num_features)
                seen[i] = v if i not in seen else np.concatenate([seen[i], v])
                pos = int(np.prod(h.shape[2:]))
                t = seen[i]
                n = t.shape[0] / pos
                w = prior / (prior + n)
                ms = m.running_mean.numpy()
                vs = m.running_var.numpy() * (prior * pos - 1) / (prior * pos)
                mt, vt = t.mean(0), t.var(0)
                mean = w * ms + (1 - w) * mt
                var = w * vs + (1 - w) * vt + w * (1 - w) * (ms - mt) ** 2
                shape = (1, -1) + (1,) * (h.ndim - 2)
                mean_t = torch.from_numpy(mean).reshape(shape)
                var_t = torch.from_numpy(var).reshape(shape)
                h = (h - mean_t) / torch.sqrt(var_t + m.eps) * m.weight.reshape(shape)
                h = h + m.bias.reshape(shape)
            else:
                h = m(h)
        outs.append(h)
    return outs


def test_prior_population_equals_manual_and_restores():
    model = small_model()
    snap = snapshot(model)
    xs = [torch.randn(n, 2, 5, 5, dtype=torch.float64) * 2 + 1 for n in (1, 3, 1)]
    want = manual_prior_population(model, xs, prior=4)
    with snt.adapt(model, PriorPopulation(prior=4)) as ada:
        got = [model(x) for x in xs]
        assert not model.training
        assert sorted(ada.estimators) == ["1", "4"]
        assert ada.estimators["1"].positions == 25
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert_restored(model, snap)


def test_batch_equals_training_mode_and_channels_last():
    model = small_model()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    ref = small_model()
    ref.train()
    with torch.no_grad():
        want = ref(x)  # training mode normalizes with the batch's biased variance
    snap = snapshot(model)
    with snt.adapt(model, "batch"), torch.no_grad():
        got = model(x)
        got_cl = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_cl, want, rtol=1e-10, atol=1e-10)
    assert_restored(model, snap)


def test_restore_after_exception_and_plain_handle():
    model = small_model()
    model.train()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with snt.adapt(model, "prior_mix"):
            model(torch.randn(2, 2, 5, 5, dtype=torch.float64))
            raise RuntimeError("boom")
    assert_restored(model, snap)
    assert model.training and all(m.training for m in model.modules())
    handle = snt.adapt(model, "alpha_mix")
    assert not model.training
    with torch.no_grad():
        out = model(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert out.shape == (1, 3)
    handle.restore()
    handle.restore()  # idempotent
    assert_restored(model, snap)


@pytest.mark.parametrize("name", ["prior_mix", "alpha_mix", "decaying_ema", "prior_population"])
def test_batch_size_one(name):
    model = small_model()
    with snt.adapt(model, name), torch.no_grad():
        for _ in range(3):
            out = model(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_batch_size_one_prediction_time_bn_errors():
    model = small_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="at least 2 values per dimension"):
        with snt.adapt(model, "batch"), torch.no_grad():
            model(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert_restored(model, snap)


def test_bn3d_and_bn1d_sequence_inputs():
    for bn, shape in (
        (torch.nn.BatchNorm3d(3), (2, 3, 2, 2, 2)),
        (torch.nn.BatchNorm1d(3), (2, 3, 4)),
    ):
        bn = bn.double().eval()
        with torch.no_grad():
            bn.running_var.fill_(2.0)
        x = torch.randn(*shape, dtype=torch.float64)
        with snt.adapt(bn, PriorPopulation(prior=0)), torch.no_grad():
            got = bn(x)
        m = streamnorm.moments(x.numpy(), axis=streamnorm.torch.bn_axes(x.ndim))
        want = streamnorm.normalize(
            x.numpy(), m.mean, m.var(ddof=0), axis=streamnorm.torch.bn_axes(x.ndim)
        )
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


def test_bad_arguments():
    model = small_model()
    with pytest.raises(ValueError, match="unknown estimator"):
        snt.adapt(model, "adabn2")
    with pytest.raises(TypeError, match="estimator must be"):
        snt.adapt(model, 3)
    with pytest.raises(ValueError, match="no BatchNorm layer named"):
        snt.adapt(model, "batch", layers=["nope"])
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        snt.adapt(torch.nn.Linear(2, 2), "batch")


@pytest.mark.parametrize(
    "name", ["batch", "prior_mix", "alpha_mix", "decaying_ema", "prior_population"]
)
@pytest.mark.parametrize("n", [1, 3])
def test_groups_equal_separate_adaptations(name, n):
    from streamnorm.torch._adapt import adapt_groups

    model = small_model()
    snap = snapshot(model)
    groups, steps = 3, 4
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64).reshape(3, 1, 1, 1, 1)
    xs = torch.randn(groups, steps * n, 2, 5, 5, generator=g, dtype=torch.float64) * scale + 1
    if name == "batch" and n == 1:  # a (1, C) batch has no variance: every group fails
        with pytest.raises(ValueError, match="at least 2 values per dimension"):
            with adapt_groups(model, name, groups), torch.no_grad():
                model(xs[:, :1].reshape(groups, 2, 5, 5))
        assert_restored(model, snap)
        return
    want = []
    for k in range(groups):
        with snt.adapt(model, name), torch.no_grad():
            want.append(torch.stack([model(xs[k, i : i + n]) for i in range(0, steps * n, n)]))
    with adapt_groups(model, name, groups) as ada, torch.no_grad():
        got = []
        for i in range(0, steps * n, n):
            x = xs[:, i : i + n].reshape(groups * n, 2, 5, 5)
            if i == n:
                x = x.contiguous(memory_format=torch.channels_last)
            got.append(model(x).reshape(groups, n, 3))
        assert ada.estimators["1"].shape == (groups * 4,)
        assert ada.estimators["4"].shape == (groups * 100,)
    assert_restored(model, snap)
    for k in range(groups):
        torch.testing.assert_close(
            torch.stack([o[k] for o in got]), want[k], rtol=1e-12, atol=1e-12
        )


def test_groups_bad_arguments():
    from streamnorm.torch._adapt import adapt_groups

    model = small_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        adapt_groups(model, "batch", 0)
    with pytest.raises(ValueError, match="cannot be split into 2 groups"):
        with adapt_groups(model, "prior_population", 2), torch.no_grad():
            model(torch.randn(3, 2, 5, 5, dtype=torch.float64))
    assert_restored(model, snap)
