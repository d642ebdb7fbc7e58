"""streamnorm.torch.recalibrate says what it skipped: unregistered norm-like layers in a mixed
model (timm's EvoNorm2dB0), layers no batch reached (a branch run only in training mode, such
as inception_v3's auxiliary head) and layers without statistics to write
(``track_running_stats=False``): a warning names them, their statistics stay as they were, and
the report marks them skipped with a reason."""

from __future__ import annotations

import warnings
from typing import Any

import _zoo
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import streamnorm.torch as snt  # noqa: E402


def _x(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 2.0, shape).astype(np.float32)


def _buffers(model: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class Branchy(torch.nn.Module):
    """A trunk, and an auxiliary head that runs only in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
        self.aux = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.trunk(x)
        if self.training:
            return y.mean() + self.aux(y).mean()
        return y


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_a_branch_no_batch_reaches_is_skipped(mode: str) -> None:
    torch.manual_seed(0)
    model = Branchy()
    with torch.no_grad():
        model.aux[1].running_mean.fill_(0.5)
    before = _buffers(model)
    with pytest.warns(UserWarning, match=r"no data reached \['aux\.1'\].*left as they were"):
        report = snt.recalibrate(model, _x((32, 2, 5, 5)), mode=mode, progress=False)
    assert [x.name for x in report.skipped] == ["aux.1"]
    aux = report["aux.1"]
    assert aux.status == "skipped" and aux.reason == "no data reached it" and aux.samples == 0
    assert report["trunk.1"].status == "recalibrated" and not report["trunk.1"].skipped
    after = model.state_dict()
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(after[f"aux.1.{k}"], before[f"aux.1.{k}"]), k
    assert not torch.equal(after["trunk.1.running_mean"], before["trunk.1.running_mean"])
    text = str(report)
    assert "recalibrated 1 BatchNorm layer(s)" in text and "skipped 1" in text
    row = next(line for line in report.table().splitlines() if line.startswith("aux.1"))
    assert "skipped: no data reached it" in row and "0.0" not in row


def test_unregistered_evonorm_in_a_mixed_model_is_named() -> None:
    _zoo.timm()
    from timm.layers import EvoNorm2dB0, EvoNorm2dS0

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Conv2d(4, 4, 1),
        EvoNorm2dB0(4),
        torch.nn.Conv2d(4, 4, 1),
        EvoNorm2dS0(4, group_size=2),  # no running statistics: not norm-like for the registry
    ).eval()
    with torch.no_grad():
        model[3].running_var.fill_(3.0)
    with pytest.warns(UserWarning) as caught:
        report = snt.recalibrate(model, _x((16, 2, 5, 5)), progress=False)
    messages = [str(w.message) for w in caught]
    evo = [m for m in messages if "3 (timm.layers.evo_norm.EvoNorm2dB0)" in m]
    assert len(evo) == 1 and "register_norm" in evo[0], messages
    assert "EvoNorm2dS0" not in evo[0]
    assert torch.equal(model[3].running_var, torch.full((4,), 3.0))
    assert [(x.name, x.status) for x in report.layers] == [("1", "recalibrated"), ("3", "skipped")]
    assert report["3"].reason == "class not registered (register_norm)"
    assert report["3"].channels == 4
    # adapt names it too
    with pytest.warns(UserWarning, match=r"3 \(timm\.layers\.evo_norm\.EvoNorm2dB0\)"):
        with snt.adapt(model, "batch"), torch.no_grad():
            model(torch.from_numpy(_x((4, 2, 5, 5))))


def test_layers_without_statistics_are_named() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3),
        torch.nn.BatchNorm2d(3),
        torch.nn.Conv2d(3, 3, 1),
        torch.nn.BatchNorm2d(3, track_running_stats=False),
    )
    with pytest.warns(UserWarning, match=r"leaves \['3'\].*track_running_stats=False"):
        report = snt.recalibrate(model, _x((16, 2, 5, 5)), progress=False)
    assert [(x.name, x.status) for x in report.layers] == [("1", "recalibrated"), ("3", "skipped")]
    assert report["3"].reason == "no running statistics (track_running_stats=False)"
    assert model[3].running_mean is None


def test_nothing_skipped_no_warning() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = snt.recalibrate(model, _x((16, 2, 5, 5)), progress=False)
    assert report.skipped == [] and report["1"].reason == ""
    assert "skipped" not in str(report)


@pytest.mark.slow
def test_inception_v3_aux_head_is_skipped() -> None:
    tv = _zoo.torchvision()
    torch.manual_seed(0)
    model = tv.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.eval()
    before = _buffers(model)
    with pytest.warns(UserWarning, match=r"no data reached \['AuxLogits\.conv0\.bn'"):
        report = snt.recalibrate(model, _x((4, 3, 75, 75)), batch_size=2, progress=False)
    skipped = [x.name for x in report.skipped]
    assert skipped == ["AuxLogits.conv0.bn", "AuxLogits.conv1.bn"]
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("AuxLogits."):
            assert torch.equal(after[k], v), k
    assert not torch.equal(
        after["Conv2d_1a_3x3.bn.running_mean"], before["Conv2d_1a_3x3.bn.running_mean"]
    )
