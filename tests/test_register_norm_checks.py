"""register_norm: the strict checks of the rest of the library (no wrapped axes, real bools)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from streamnorm.torch import adapt, recalibrate, register_norm  # noqa: E402
from streamnorm.torch._hooks import norm_spec  # noqa: E402


def _norm_class() -> type:
    class AxisNorm(torch.nn.Module):
        """BN-like, channels on axis 1, always normalizes with its buffers."""

        def __init__(self, c: int) -> None:
            super().__init__()
            self.eps = 1e-5
            self.register_buffer("running_mean", torch.zeros(c))
            self.register_buffer("running_var", torch.ones(c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.running_mean.reshape(1, -1, 1, 1)
            v = self.running_var.reshape(1, -1, 1, 1)
            return (x - m) / torch.sqrt(v + self.eps)

    return AxisNorm


def test_batch_stats_and_channel_axis_types() -> None:
    cls = _norm_class()
    with pytest.raises(TypeError, match="batch_stats must be True or False"):
        register_norm(cls, batch_stats="no")
    with pytest.raises(TypeError, match="channel_axis must be an int"):
        register_norm(cls, channel_axis=True)
    with pytest.raises(ValueError, match="batch axis"):
        register_norm(cls, channel_axis=0)
    assert norm_spec(cls(2)) is None  # nothing was registered
    assert register_norm(cls, batch_stats=np.bool_(False)).batch_stats is False


@pytest.mark.parametrize("axis", [7, -5, 4, -4])
def test_channel_axis_the_input_does_not_have(axis: int) -> None:
    # 4-D input whose width equals the channel count: a wrapped axis (7 % 4 == 3) would
    # silently compute per-width statistics
    cls = _norm_class()
    register_norm(cls, channel_axis=axis, batch_stats=False, count=None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), cls(4))
    data = [torch.randn(8, 3, 4, 4) for _ in range(2)]
    with pytest.raises(ValueError, match=rf"layer '1' keeps its channels on axis {axis}"):
        recalibrate(model, data, progress=False)
    np.testing.assert_array_equal(model[1].running_mean.numpy(), np.zeros(4))
    with adapt(model, "prior_population"), pytest.raises(ValueError, match=f"axis {axis}"):
        model(data[0])
    np.testing.assert_array_equal(model[1].running_var.numpy(), np.ones(4))
