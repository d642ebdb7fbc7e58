"""Norm-layer registry: torchvision's FrozenBatchNorm2d recognised by name, registered custom
layers (biased variance, channels last), eval mode for everything else, the error for
unregistered norm-like layers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from streamnorm.torch import bn_layers, recalibrate, register_norm  # noqa: E402
from streamnorm.torch._hooks import norm_layers, norm_spec  # noqa: E402


class FrozenBatchNorm2d(torch.nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d as torchvision defines it (not imported here)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


class ChannelsLastNorm(torch.nn.Module):
    """A BN-like layer on (N, H, W, C) that stores a biased variance under other names."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.epsilon = 1e-3
        self.momentum = 0.1
        self.register_buffer("mu", torch.zeros(c))
        self.register_buffer("sigma2", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var = x.mean(dim=(0, 1, 2)), x.var(dim=(0, 1, 2), unbiased=False)
            with torch.no_grad():
                self.mu.lerp_(mean, self.momentum)
                self.sigma2.lerp_(var, self.momentum)
        else:
            mean, var = self.mu, self.sigma2
        return (x - mean) / (var + self.epsilon).sqrt()


class Unknown(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.running_mean.reshape(1, -1, 1, 1)


def _x(n: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1.0 + 2.0 * rng.standard_normal((n, 2, 5, 5))).astype(np.float32)


def _frozen_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3),
        FrozenBatchNorm2d(3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4),
    )


def test_frozen_is_recognised_by_name_not_bn_layers() -> None:
    m = _frozen_model()
    spec = norm_spec(m[1])
    assert spec is not None and spec.count is None and not spec.batch_stats
    assert [n for n, _, _ in norm_layers(m)] == ["1", "4"]
    assert [n for n, _ in bn_layers(m)] == ["4"]  # bn_layers stays _BatchNorm only


@pytest.mark.parametrize("mode", ["sequential", "one-pass"])
def test_frozen_population_statistics(mode: str) -> None:
    m, x = _frozen_model(), _x()
    report = recalibrate(m, x, mode=mode, batch_size=16, progress=False)
    assert [r.name for r in report.layers] == ["1", "4"]
    t = torch.from_numpy(x)
    with torch.no_grad():
        a = m[0](t).double()
        np.testing.assert_allclose(m[1].running_mean.numpy(), a.mean((0, 2, 3)).numpy(), 1e-5)
        np.testing.assert_allclose(m[1].running_var.numpy(), a.var((0, 2, 3)).numpy(), 1e-5)
        # FrozenBatchNorm2d always normalizes with its buffers: the BN after it sees the input
        # made with the new ones (sequential) or the old ones (one-pass)
        if mode == "one-pass":
            fresh = _frozen_model()
            b = fresh[3](fresh[2](fresh[1](m[0](t)))).double()
        else:
            b = m[3](m[2](m[1](m[0](t)))).double()
        np.testing.assert_allclose(m[4].running_mean.numpy(), b.mean((0, 2, 3)).numpy(), 1e-5)
    # restore puts the frozen buffers back
    report.restore()
    np.testing.assert_array_equal(m[1].running_mean.numpy(), np.zeros(3))


def test_registered_channels_last_biased_layer() -> None:
    register_norm(
        ChannelsLastNorm,
        mean="mu",
        var="sigma2",
        convention="biased",
        channel_axis=-1,
        eps="epsilon",
        count=None,
    )
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), ChannelsLastNorm(4), torch.nn.Dropout(0.5))
    x = np.random.default_rng(1).normal(2.0, 3.0, (40, 5, 5, 3)).astype(np.float32)
    seen: list[bool] = []
    m[2].register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    recalibrate(m, x, batch_size=8, progress=False)  # one-pass: the norm layer trains
    with torch.no_grad():
        a = m[0](torch.from_numpy(x)).double()
    np.testing.assert_allclose(m[1].mu.numpy(), a.mean((0, 1, 2)).numpy(), 1e-5)
    np.testing.assert_allclose(m[1].sigma2.numpy(), a.var((0, 1, 2), unbiased=False).numpy(), 1e-5)
    assert seen and not any(seen)  # dropout stayed in eval mode throughout
    assert m[1].momentum == 0.1 and m.training  # modes and momentum restored


def test_unregistered_norm_like_layers_are_listed() -> None:
    m = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), Unknown(3))
    with pytest.raises(
        ValueError, match=r"no BatchNorm.*1 \(test_registry\.Unknown\).*register_norm"
    ):
        recalibrate(m, _x(), progress=False)


def test_register_norm_checks() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module subclass"):
        register_norm(int)
    with pytest.raises(ValueError, match="module.ClassName"):
        register_norm("Frozen")
    with pytest.raises(ValueError, match="convention"):
        register_norm(Unknown, convention="sample")
    with pytest.raises(TypeError, match="attribute name"):
        register_norm(Unknown, mean=3)
