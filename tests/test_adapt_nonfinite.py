"""adapt: a batch with a NaN or an infinity raises, and never reaches the estimators."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import streamnorm.torch as snt  # noqa: E402


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 2, 3, padding=1),
        torch.nn.BatchNorm2d(2),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("estimator", ["prior_population", "decaying_ema", "population"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_bad_batch_does_not_poison_the_stream(estimator: str, bad: float) -> None:
    g = torch.Generator().manual_seed(1)
    clean = [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)]
    poisoned = clean[1].clone()
    poisoned[2, 1, 3, 4] = bad

    model = _model()
    with snt.adapt(model, estimator) as ada, torch.no_grad():
        model(clean[0])
        before = {k: (np.copy(e.mean), np.copy(e.var)) for k, e in ada.estimators.items()}
        with pytest.raises(ValueError, match="non-finite"):
            model(poisoned)
        for k, e in ada.estimators.items():  # the estimates did not move
            np.testing.assert_array_equal(e.mean, before[k][0])
            np.testing.assert_array_equal(e.var, before[k][1])
        got = [model(x) for x in clean[1:]]

    ref_model = _model()
    with snt.adapt(ref_model, estimator), torch.no_grad():
        ref_model(clean[0])
        ref = [ref_model(x) for x in clean[1:]]
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the layer's own statistics are back after the error, and after restore
    torch.testing.assert_close(model(clean[0]), _model()(clean[0]), rtol=0, atol=0)
