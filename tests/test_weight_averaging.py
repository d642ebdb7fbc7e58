"""Weight averaging end to end: the digits CNN trained with torch.optim.swa_utils.AveragedModel,
its BN statistics (a) averaged, (b) from update_bn, (c) from streamnorm's population estimator,
(d) from num_samples="auto"."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.optim.swa_utils import AveragedModel, update_bn  # noqa: E402

from streamnorm import digits as D  # noqa: E402
from streamnorm.torch import bn_layers, recalibrate  # noqa: E402

pytestmark = pytest.mark.slow  # trains a model


@pytest.fixture(scope="module")
def averaged() -> tuple[Any, ...]:
    xtr, ytr, xte, yte = D.load_digits_nchw(0)
    model = D.make_cnn(0, width=8)
    swa = AveragedModel(model, use_buffers=True)

    def on_epoch(e: int) -> None:
        if e >= 2:
            swa.update_parameters(model)

    D.train(model, xtr, ytr, epochs=6, batch_size=32, lr=0.05, on_epoch=on_epoch)
    return swa.module, xtr, ytr, xte, yte


def _eval_inputs(model: Any, x: Any) -> dict[str, np.ndarray]:
    """Every BN layer's input over ``x`` with the model in eval mode, float64."""
    got: dict[str, list[np.ndarray]] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args, name=name: got.setdefault(name, []).append(
                args[0].detach().double().numpy()
            )
        )
        for name, m in bn_layers(model)
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return {k: np.concatenate(v) for k, v in got.items()}


def test_recalibrated_average(averaged: tuple[Any, ...]) -> None:
    avg, xtr, _, xte, yte = averaged
    acc_a = D.accuracy(avg, xte, yte)

    b = copy.deepcopy(avg)
    update_bn([(xtr[i : i + 64],) for i in range(0, len(xtr), 64)], b)
    acc_b = D.accuracy(b, xte, yte)

    # (c) population, sequential: afterwards every BN input (eval mode, all training data) has
    # exactly the stored mean and unbiased variance: the population statistics of the averaged
    # weights
    c = copy.deepcopy(avg)
    recalibrate(c, xtr.numpy(), mode="sequential", batch_size=64, progress=False)
    for name, a in _eval_inputs(c, xtr).items():
        axes = (0, *range(2, a.ndim))
        m = dict(bn_layers(c))[name]
        np.testing.assert_allclose(m.running_mean.numpy(), a.mean(axis=axes), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(m.running_var.numpy(), a.var(axis=axes, ddof=1), rtol=1e-4)
    acc_c = D.accuracy(c, xte, yte)

    # (d) auto: the statistics of the first report.samples samples, exactly
    # (a tolerance the training set can meet: twice the errors of all of it)
    full = recalibrate(copy.deepcopy(avg), xtr.numpy(), batch_size=32, progress=False)
    tol = 2 * max(full.max_mean_se, full.max_var_se)
    d = copy.deepcopy(avg)
    rep = recalibrate(d, xtr.numpy(), num_samples="auto", tol=tol, batch_size=32, progress=False)
    assert rep.converged is True and rep.samples < len(xtr)
    assert rep.max_mean_se < tol and rep.max_var_se < tol
    same = copy.deepcopy(avg)
    recalibrate(same, xtr.numpy(), num_samples=rep.samples, batch_size=32, progress=False)
    for (_, m1), (_, m2) in zip(bn_layers(d), bn_layers(same), strict=True):
        assert torch.equal(m1.running_mean, m2.running_mean)
        assert torch.equal(m1.running_var, m2.running_var)
    acc_d = D.accuracy(d, xte, yte)

    # the averaged buffers are not the statistics of the averaged weights
    bn1 = dict(bn_layers(avg))["bn4"]
    bn1c = dict(bn_layers(c))["bn4"]
    assert not torch.allclose(bn1.running_var, bn1c.running_var, rtol=0.05)
    # recalibrated statistics do not lose accuracy against the averaged buffers
    assert acc_c >= acc_a - 0.01, (acc_a, acc_b, acc_c, acc_d)
    assert min(acc_b, acc_d) >= acc_a - 0.02, (acc_a, acc_b, acc_c, acc_d)
