"""streamnorm.torch.adapt keeps each layer's own forward: it changes the statistics a layer
reads, never its computation (timm's BatchNormAct2d: BN, then drop, then act), on every layer
class recalibration recognises (``_BatchNorm``, FrozenBatchNorm2d, ``register_norm``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import _zoo
import pytest

torch = pytest.importorskip("torch")
import streamnorm.torch as snt  # noqa: E402
from streamnorm import PriorPopulation  # noqa: E402
from streamnorm.torch import register_norm  # noqa: E402

#: a prior worth 10**12 samples: the estimate is the layer's own statistics
STRONG = PriorPopulation(prior=10**12)
#: no prior at all: the estimate is the batch's own statistics
WEAK = PriorPopulation(prior=0)


class BiasedActNorm(torch.nn.Module):
    """A channels-last norm layer storing a biased variance under other names, followed by its
    own activation (the kind of layer ``register_norm`` is for)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.epsilon = 1e-3
        self.register_buffer("mu", torch.zeros(c))
        self.register_buffer("sigma2", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh((x - self.mu) / (self.sigma2 + self.epsilon).sqrt()) + 2.0


register_norm(
    BiasedActNorm, mean="mu", var="sigma2", convention="biased", channel_axis=-1, eps="epsilon"
)


def _timm_bn_act(**kwargs: Any) -> Any:
    _zoo.timm()
    from timm.layers import BatchNormAct2d

    return BatchNormAct2d(3, **kwargs)


def _frozen() -> Any:
    _zoo.torchvision()
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNorm2d(3)


def _timm_frozen_act() -> Any:
    _zoo.timm()
    from timm.layers.norm_act import FrozenBatchNormAct2d

    return FrozenBatchNormAct2d(3)


def _drop_block_gelu() -> Any:
    _zoo.timm()
    from timm.layers import DropBlock2d

    return _timm_bn_act(act_layer=torch.nn.GELU, drop_layer=DropBlock2d)


#: (layer factory, input shape, statistics attributes, channel axis)
CASES: dict[str, tuple[Callable[[], Any], tuple[int, ...], tuple[str, str], int]] = {
    "bn1d_nc": (lambda: torch.nn.BatchNorm1d(3), (6, 3), ("running_mean", "running_var"), 1),
    "bn1d_ncl": (lambda: torch.nn.BatchNorm1d(3), (4, 3, 5), ("running_mean", "running_var"), 1),
    "bn2d": (lambda: torch.nn.BatchNorm2d(3), (4, 3, 5, 5), ("running_mean", "running_var"), 1),
    "bn3d": (lambda: torch.nn.BatchNorm3d(3), (2, 3, 3, 4, 4), ("running_mean", "running_var"), 1),
    "sync_bn": (
        lambda: torch.nn.SyncBatchNorm(3),
        (4, 3, 5, 5),
        ("running_mean", "running_var"),
        1,
    ),
    "frozen_bn2d": (_frozen, (4, 3, 5, 5), ("running_mean", "running_var"), 1),
    "timm_bn_act_relu": (
        lambda: _timm_bn_act(act_layer=torch.nn.ReLU),
        (4, 3, 5, 5),
        ("running_mean", "running_var"),
        1,
    ),
    "timm_bn_act_gelu_dropblock": (
        _drop_block_gelu,
        (4, 3, 5, 5),
        ("running_mean", "running_var"),
        1,
    ),
    "timm_frozen_bn_act": (_timm_frozen_act, (4, 3, 5, 5), ("running_mean", "running_var"), 1),
    "registered_custom": (lambda: BiasedActNorm(3), (4, 5, 5, 3), ("mu", "sigma2"), -1),
}


def _layer(case: str) -> tuple[Any, torch.Tensor]:
    """The layer in eval mode, float64, with random statistics and affine parameters."""
    make, shape, (mean, var), _ = CASES[case]
    g = torch.Generator().manual_seed(0)
    layer = make().double().eval()
    with torch.no_grad():
        getattr(layer, mean).copy_(torch.randn(3, generator=g, dtype=torch.float64))
        getattr(layer, var).copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        for k in ("weight", "bias"):
            t = getattr(layer, k, None)
            if isinstance(t, torch.Tensor):
                t.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 2
    return layer, x


def _state(module: Any) -> tuple[dict[str, Any], list[Any]]:
    hooks = [
        (len(m._forward_pre_hooks), len(m._forward_hooks), m.__dict__.get("forward"))
        for m in module.modules()
    ]
    return {k: v.clone() for k, v in module.state_dict().items()}, hooks


def _assert_restored(module: Any, before: tuple[dict[str, Any], list[Any]]) -> None:
    state, hooks = _state(module)
    assert state.keys() == before[0].keys()
    for k, v in state.items():
        assert torch.equal(v, before[0][k]), k
    assert hooks == before[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_strong_prior_keeps_the_eval_output(case: str) -> None:
    layer, x = _layer(case)
    with torch.no_grad():
        want = layer(x)
    before = _state(layer)
    with snt.adapt(layer, STRONG) as ada, torch.no_grad():
        got = layer(x)
        again = layer(x)
    assert list(ada.estimators) == [""]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(again, want, rtol=1e-9, atol=1e-9)
    _assert_restored(layer, before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_prior_normalizes_with_the_batch_inside_the_layer(case: str) -> None:
    """With no prior, the layer computes what it computes with the batch's mean and biased
    variance in its buffers: the outputs change, and the layer's own activation is kept."""
    layer, x = _layer(case)
    _, _, (mean, var), axis = CASES[case]
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        plain = layer(x)
        getattr(ref, mean).copy_(x.mean(axes))
        getattr(ref, var).copy_(x.var(axes, unbiased=False))
        want = ref(x)
    before = _state(layer)
    with snt.adapt(layer, WEAK), torch.no_grad():
        got = layer(x)
    _assert_restored(layer, before)
    assert (got - plain).abs().max() > 0.1  # the statistics did change
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "arch", [pytest.param("efficientnet_b0", marks=pytest.mark.slow), "mobilenetv3_small_100"]
)
def test_timm_network_under_a_strong_prior_keeps_its_output(arch: str) -> None:
    timm = _zoo.timm()
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    before = _state(model)
    with snt.adapt(model, STRONG), torch.no_grad():
        got = model(x)
    _assert_restored(model, before)
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-5, rel
    with snt.adapt(model, PriorPopulation(prior=1)), torch.no_grad():
        moved = model(x)
    _assert_restored(model, before)
    assert float((moved - want).norm() / want.norm()) > 1e-2


def test_torchvision_frozen_bn_network() -> None:
    tv = _zoo.torchvision()
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    before = _state(model)
    with snt.adapt(model, STRONG) as ada, torch.no_grad():
        got = model(x)
    assert len(ada.estimators) == 20
    _assert_restored(model, before)
    assert float((got - want).norm() / want.norm()) < 1e-5


def _act_net() -> Any:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        _timm_bn_act(act_layer=torch.nn.ReLU),
        torch.nn.Conv2d(3, 3, 1),
        _frozen(),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 25, 4),
    ).double()
    with torch.no_grad():
        for i in (1, 3):
            net[i].running_mean.copy_(torch.randn(3, dtype=torch.float64))
            net[i].running_var.copy_(torch.rand(3, dtype=torch.float64) + 0.5)
    return net.eval()


@pytest.mark.parametrize("name", ["batch", "prior_population", "decaying_ema"])
def test_groups_keep_the_layer_forward(name: str) -> None:
    """adapt_groups gives what one adapt run per group gives, activation included."""
    net = _act_net()
    before = _state(net)
    groups, n, steps = 3, 2, 3
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64).reshape(3, 1, 1, 1, 1)
    xs = torch.randn(groups, steps * n, 2, 5, 5, generator=g, dtype=torch.float64) * scale - 1
    want = []
    for k in range(groups):
        with snt.adapt(net, name), torch.no_grad():
            want.append(torch.stack([net(xs[k, i : i + n]) for i in range(0, steps * n, n)]))
    with snt.adapt_groups(net, name, groups), torch.no_grad():
        got = [
            net(xs[:, i : i + n].reshape(groups * n, 2, 5, 5)).reshape(groups, n, 4)
            for i in range(0, steps * n, n)
        ]
    _assert_restored(net, before)
    for k in range(groups):
        torch.testing.assert_close(
            torch.stack([o[k] for o in got]), want[k], rtol=1e-10, atol=1e-10
        )


def test_groups_under_a_strong_prior_keep_the_eval_output() -> None:
    net = _act_net()
    before = _state(net)
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        want = net(x)
    with snt.adapt_groups(net, STRONG, 3) as ada, torch.no_grad():
        got = net(x)
    assert sorted(ada.estimators) == ["1", "3"]
    _assert_restored(net, before)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_groups_refuse_layers_of_unknown_arithmetic() -> None:
    layer, x = _layer("registered_custom")
    before = _state(layer)
    with pytest.raises(ValueError, match="adapt_groups.*BiasedActNorm.*adapt\\(\\)"):
        snt.adapt_groups(layer, "batch", 2)
    _assert_restored(layer, before)


class Boom(BiasedActNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_a_failing_layer_forward_leaves_the_buffers() -> None:
    layer, x = _layer("registered_custom")
    net = torch.nn.Sequential(layer, Boom(3).double())
    mu = net[1].mu
    before = _state(net)
    with snt.adapt(net, WEAK) as ada, torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            net(x)
        # the buffers are the layer's own again right after the failed call
        assert net[1].mu is mu and torch.equal(net[1].mu, torch.zeros(3, dtype=torch.float64))
        assert sorted(ada.estimators) == ["0", "1"]
    _assert_restored(net, before)
    assert net[1].mu is mu


def test_untracked_batchnorm() -> None:
    bn = torch.nn.BatchNorm2d(3, track_running_stats=False).double().eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        want = bn(x)  # no buffers: batch statistics even in eval mode
    with snt.adapt(bn, "batch"), torch.no_grad():
        got = bn(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert bn.running_mean is None and bn.running_var is None
    with pytest.raises(ValueError, match="track_running_stats=False"):
        snt.adapt(bn, "prior_population")
    assert bn.running_mean is None and not bn._forward_pre_hooks
