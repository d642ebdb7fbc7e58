"""streamnorm.lightning.RecalibrateBN: exact population statistics after a Lightning fit."""

from __future__ import annotations

import copy
import math
import os

import _zoo
import numpy as np
import pytest

torch = pytest.importorskip("torch")
# before Lightning, also in the processes ddp_spawn starts (they import this module)
_zoo.make_torchvision_importable()
pl = pytest.importorskip("lightning.pytorch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from streamnorm.lightning import RecalibrateBN  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ConvNet(pl.LightningModule):
    """Two BatchNorm layers (the second one's input depends on the first) and a dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(4, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(3, 2),
        )

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class DenseNet(pl.LightningModule):
    """One BatchNorm layer right after the input layer: its input does not depend on how the
    data are cut into batches, so the population over ranks equals the full data's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g) * 2.0 + 1.0
    y = torch.randint(0, 2, (n,), generator=g)
    return x, y


def _trainer(tmp_path, callbacks, **kw):
    opts = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=tmp_path,
    )
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def _population(model, batches):
    """Reference: every BatchNorm layer's input over ``batches`` (eval mode, BatchNorm layers
    normalizing by batch statistics), concatenated, and numpy's mean and unbiased variance."""
    m = copy.deepcopy(model).eval()
    bns = {n: b for n, b in m.named_modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)}
    seen = {n: [] for n in bns}
    for n, b in bns.items():
        b.train()
        b.momentum = 0.0
        b.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].double().numpy()))
    with torch.no_grad():
        for x in batches:
            m(x)
    out = {}
    for n, parts in seen.items():
        x = np.moveaxis(np.concatenate(parts), 1, -1).reshape(-1, parts[0].shape[1])
        out[n] = (x.mean(axis=0), x.var(axis=0, ddof=1))
    return out


def _check_buffers(model, ref):
    bns = dict(model.named_modules())
    for name, (mean, var) in ref.items():
        bn = bns[name]
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_end_of_fit_population_with_budget(tmp_path):
    torch.manual_seed(0)
    x, y = _images()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model = ConvNet()
    cb = RecalibrateBN(num_samples=40)
    _trainer(tmp_path, [cb]).fit(model, loader)
    # the last weights, 40 samples in the train loader's batches: 16, 16, 8
    ref = _population(model, [x[:16], x[16:32], x[32:40]])
    _check_buffers(model, ref)
    assert model.body[1].num_batches_tracked.item() == 3
    assert cb.report is not None and cb.report.samples == 40
    assert [r.name for r in cb.report.layers] == ["body.1", "body.5"]
    assert model.training  # modes come back: Lightning leaves the module in training mode
    assert model.body[1].momentum == 0.1


@pytest.mark.slow
def test_given_dataloader_and_every_validation(tmp_path):
    torch.manual_seed(1)
    x, y = _images()
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    xc, _ = _images(50, seed=3)
    calib = DataLoader(TensorDataset(xc), batch_size=20)
    val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    model = ConvNet()
    cb = RecalibrateBN(dataloader=calib, every_validation=True)
    _trainer(tmp_path, [cb], max_epochs=2, num_sanity_val_steps=1).fit(model, train, val)
    assert len(cb.reports) == 3  # before each of 2 validation epochs, and at the end
    _check_buffers(model, _population(model, [xc[:20], xc[20:40], xc[40:]]))
    assert cb.report.samples == 50


@pytest.mark.slow
def test_weight_averaging_recalibrates_averaged_weights(tmp_path):
    averaging = pytest.importorskip("lightning.pytorch.callbacks").WeightAveraging
    torch.manual_seed(2)
    x, y = _images()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model = ConvNet()
    wa = averaging()
    cb = RecalibrateBN()  # listed first: it must still run after the averaging callback
    _trainer(tmp_path, [cb, wa]).fit(model, loader)
    avg = wa._average_model.module
    for p, q in zip(model.parameters(), avg.parameters(), strict=True):
        torch.testing.assert_close(p, q)  # the module holds the averaged weights
    ref = _population(model, list(x.split(16)))
    _check_buffers(model, ref)
    # the averaged buffers would be something else
    assert not np.allclose(avg.body[1].running_var.numpy(), ref["body.1"][1], rtol=1e-3)


@pytest.mark.slow
def test_swa_and_logged_shift(tmp_path):
    torch.manual_seed(3)
    x, y = _images()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model = ConvNet()
    cb = RecalibrateBN()
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    logger = pl.loggers.CSVLogger(tmp_path, name="log")
    _trainer(tmp_path, [cb, swa], max_epochs=3, logger=logger).fit(model, loader)
    ref = _population(model, list(x.split(16)))
    _check_buffers(model, ref)
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("recalibrate_bn/body.1/mean_shift")]
    assert len(logged) == 1
    rep = cb.report["body.1"]
    assert math.isclose(
        float(logged[0]["recalibrate_bn/body.1/mean_shift"]), rep.max_mean_shift, rel_tol=1e-6
    )
    assert math.isclose(
        float(logged[0]["recalibrate_bn/body.5/std_shift"]),
        cb.report["body.5"].max_std_shift,
        rel_tol=1e-6,
    )


class _SaveBuffers(pl.Callback):
    """Saves each rank's state after training (runs after RecalibrateBN)."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_ranks_identical_and_exact(tmp_path, monkeypatch):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    spawned = os.path.join(os.path.dirname(__file__), "_spawned")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([spawned, os.environ.get("PYTHONPATH", "")]))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(96, 3, generator=g) * torch.tensor([1.0, 3.0, 0.5]) + 2.0
    y = torch.randint(0, 2, (96,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = DenseNet()
    trainer = _trainer(
        tmp_path,
        [RecalibrateBN(), _SaveBuffers(str(tmp_path))],
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=3,
    )
    trainer.fit(model, loader)
    s0 = torch.load(tmp_path / "rank0.pt")
    s1 = torch.load(tmp_path / "rank1.pt")
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k  # same bits on both ranks
    w, b = s0["fc1.weight"].double().numpy(), s0["fc1.bias"].double().numpy()
    h = x.double().numpy() @ w.T + b  # the BatchNorm input on all 96 samples (both ranks' halves)
    np.testing.assert_allclose(s0["bn.running_mean"].double().numpy(), h.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s0["bn.running_var"].double().numpy(), h.var(0, ddof=1), rtol=1e-6)
    # a single rank's half would give other statistics
    assert not np.allclose(s0["bn.running_var"].double().numpy(), h[::2].var(0, ddof=1))
    assert int(s0["bn.num_batches_tracked"]) == 12  # 6 batches of 8 on each rank


def test_arguments_checked():
    with pytest.raises(ValueError, match="num_samples"):
        RecalibrateBN(num_samples=0)
    with pytest.raises(TypeError, match="dataloader"):
        RecalibrateBN(dataloader=3)
    with pytest.raises(TypeError, match="forward_fn"):
        RecalibrateBN(forward_fn="no")


def test_list_of_batches_is_checked_when_built_and_reports_standard_errors(tmp_path):
    """``dataloader=[(x, y), ...]`` calibrates at the end of fit (it used to fail there) with the
    standard errors ``streamnorm.torch.recalibrate`` gives on the same batches; what is not one
    iterable of batches fails when the callback is built, before any training."""
    from streamnorm.torch import recalibrate

    torch.manual_seed(2)
    x, y = _images(64)
    train = DataLoader(TensorDataset(x, y), batch_size=32)
    xc, yc = _images(60, seed=4)
    batches = [(xc[i : i + 20], yc[i : i + 20]) for i in range(0, 60, 20)]
    model = ConvNet()
    cb = RecalibrateBN(dataloader=batches)
    _trainer(tmp_path, [cb], max_epochs=1).fit(model, train)
    assert cb.report is not None and cb.report.samples == 60
    _check_buffers(model, _population(model, [b[0] for b in batches]))
    ref = recalibrate(copy.deepcopy(model), DataLoader(TensorDataset(xc, yc), batch_size=20))
    for got, want in zip(cb.report.layers, ref.layers, strict=True):
        assert got.name == want.name and got.batches == want.batches == 3
        for key in ("mean_se", "var_se"):
            g, w = getattr(got, key), getattr(want, key)
            assert g.shape == w.shape and w.size and np.isfinite(w).all()
            np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=key)
    loader = DataLoader(TensorDataset(xc), batch_size=20)
    for bad, err in (([loader, loader], TypeError), ({"a": loader}, TypeError), ([], ValueError)):
        with pytest.raises(err, match="dataloader"):
            RecalibrateBN(dataloader=bad)
