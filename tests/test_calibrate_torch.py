"""streamnorm.torch.recalibrate: exactness against slow references, update_bn, PyTorch's EMA,
the sequential fixed point, exact restore on failure, and bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _calib_fixtures import bn_input_moments, trained_digits  # noqa: E402

from streamnorm import digits as D  # noqa: E402
from streamnorm.torch import CalibrationReport, recalibrate  # noqa: E402


def _one_bn_model(kind: str, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    if kind == "2d":
        m = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    elif kind == "1d":
        m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    else:
        m = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 2), torch.nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _data(kind: str, n: int, seed: int = 0, offset: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = {"2d": (n, 2, 6, 5), "1d": (n, 5), "seq": (n, 2, 7)}[kind]
    return (offset + 2.0 * rng.standard_normal(shape)).astype(np.float32)


def _first_layer_ref(model: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact pooled mean / unbiased var of the BN input, in float64 with numpy."""
    with torch.no_grad():
        a = model[0](torch.from_numpy(x)).double().numpy()
    axes = (0, *range(2, a.ndim))
    return a.mean(axis=axes), a.var(axis=axes, ddof=1)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("kind", ["2d", "1d", "seq"])
@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_population_equals_exact_pooled_statistics(kind: str, mode: str) -> None:
    model = _one_bn_model(kind)
    x = _data(kind, 53)
    report = recalibrate(model, x, batch_size=10, mode=mode, progress=False)
    mean, var = _first_layer_ref(model, x)
    bn = model[1]
    np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 6
    assert report["1"].samples == 53 and report["1"].batches == 6


def test_population_does_not_depend_on_batching() -> None:
    x = _data("2d", 61, seed=3)
    states = []
    for bs in (1, 7, 61):
        m = _one_bn_model("2d")
        recalibrate(m, x, batch_size=bs, mode="sequential", progress=False)
        states.append(m[1].running_var.double().numpy())
    np.testing.assert_allclose(states[0], states[1], rtol=1e-6)
    np.testing.assert_allclose(states[1], states[2], rtol=1e-6)


def test_population_includes_between_batch_spread() -> None:
    # batches with very different means: the pooled variance sees the spread, the mean of
    # batch variances does not (the statistical point of the population estimator)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-5, 1, (40, 5)), rng.normal(5, 1, (40, 5))]).astype(np.float32)
    m_pop = torch.nn.Sequential(torch.nn.Identity(), torch.nn.BatchNorm1d(5))
    m_cum = copy.deepcopy(m_pop)
    recalibrate(m_pop, x, batch_size=40, progress=False)
    recalibrate(m_cum, x, batch_size=40, estimator="cumulative", progress=False)
    _, var = _first_layer_ref(m_pop, x)
    np.testing.assert_allclose(m_pop[1].running_var.double().numpy(), var, rtol=1e-5)
    assert np.all(m_cum[1].running_var.numpy() < 0.5 * m_pop[1].running_var.numpy())


def test_cumulative_equals_update_bn() -> None:
    model, data = trained_digits()
    x = D.shift_domain(data[2], seed=1)
    ref = copy.deepcopy(model)
    loader = [x[i : i + 50] for i in range(0, len(x), 50)]
    torch.optim.swa_utils.update_bn(loader, ref)
    report = recalibrate(model, loader, estimator="cumulative", progress=False)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        if "running" in name:
            np.testing.assert_allclose(a.double().numpy(), b.double().numpy(), atol=1e-5, rtol=0)
        if "num_batches" in name:
            assert int(a) == int(b) == len(loader)
    assert report.estimator == "cumulative" and report.samples == len(x)


def test_ema_equals_pytorch_training_mode_forward() -> None:
    model, data = trained_digits()
    x = data[2][:200]
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.3
    ref.train()
    nbt0 = int(model.bn1.num_batches_tracked)
    with torch.no_grad():
        for i in range(0, 200, 32):
            ref(x[i : i + 32])
    recalibrate(model, x, estimator="ema", momentum=0.3, batch_size=32, progress=False)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        if "running" in name:
            np.testing.assert_allclose(a.double().numpy(), b.double().numpy(), atol=1e-5, rtol=1e-5)
    assert int(model.bn1.num_batches_tracked) == nbt0 + 7
    assert model.bn1.momentum == 0.1  # the layer's own momentum is untouched


def test_sequential_reaches_the_fixed_point_one_pass_does_not() -> None:
    model, data = trained_digits()
    x = D.shift_domain(data[2], seed=2)
    seq = copy.deepcopy(model)
    recalibrate(seq, x, mode="sequential", batch_size=37, progress=False)
    got = bn_input_moments(seq, x)
    worst_seq = 0.0
    for name, m in seq.named_modules():
        if name in got:
            mean, var = got[name]
            scale = np.sqrt(var)
            worst_seq = max(worst_seq, float(np.max(np.abs(m.running_mean.numpy() - mean) / scale)))
            np.testing.assert_allclose(
                m.running_mean.double().numpy(), mean, atol=1e-4 * scale.max()
            )
            np.testing.assert_allclose(m.running_var.double().numpy(), var, rtol=1e-4)
    one = copy.deepcopy(model)
    recalibrate(one, x, mode="one-pass", batch_size=37, progress=False)
    got1 = bn_input_moments(one, x)
    mean, var = got1["bn4"]
    worst_one = float(np.max(np.abs(one.bn4.running_mean.numpy() - mean) / np.sqrt(var)))
    assert worst_one > 100 * max(worst_seq, 1e-7)


def test_domain_shift_accuracy_recovers_and_restore_undoes_it() -> None:
    model, (_, _, x_te, y_te) = trained_digits()
    x_shift = D.shift_domain(x_te, contrast=0.5, brightness=0.3, noise=0.1, seed=0)
    clean = D.accuracy(model, x_te, y_te)
    before = D.accuracy(model, x_shift, y_te)
    state = _buffers(model)
    report = recalibrate(model, x_shift, mode="sequential", progress=False)
    after = D.accuracy(model, x_shift, y_te)
    assert clean > 0.85
    assert after > before + 0.15, (clean, before, after)
    report.restore()
    assert _same_state(_buffers(model), state)
    assert D.accuracy(model, x_shift, y_te) == before


# ------------------------------------------------------------------------------------------
# data forms


def test_data_forms_give_the_same_statistics(tmp_path: object) -> None:
    import pathlib

    x = _data("2d", 40)
    ref = _one_bn_model("2d")
    recalibrate(ref, x, batch_size=8, progress=False)
    want = ref[1].running_var.clone()
    path = pathlib.Path(str(tmp_path)) / "x.npy"
    np.save(path, x)
    t = torch.from_numpy(x)
    forms = [
        t,
        x.astype(np.float64),  # converted to the model's dtype
        str(path),
        [t[i : i + 8] for i in range(0, 40, 8)],
        [(t[i : i + 8], torch.zeros(8)) for i in range(0, 40, 8)],
        [{"image": t[i : i + 8], "label": 0} for i in range(0, 40, 8)],
    ]
    for form in forms:
        m = _one_bn_model("2d")
        recalibrate(m, form, batch_size=8, progress=False)
        torch.testing.assert_close(m[1].running_var, want, rtol=1e-6, atol=1e-6)
    m = _one_bn_model("2d")
    batches = [{"pixels": t[i : i + 8]} for i in range(0, 40, 8)]
    recalibrate(m, batches, input_key="pixels", progress=False)
    torch.testing.assert_close(m[1].running_var, want, rtol=1e-6, atol=1e-6)
    m = _one_bn_model("2d")
    calls = []

    def fwd(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        calls.append(1)
        model(batch["pixels"] * 1.0)

    recalibrate(m, batches, forward_fn=fwd, progress=False)
    assert len(calls) == 5
    torch.testing.assert_close(m[1].running_var, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("as_list", [False, True])
def test_num_samples_cuts_the_last_batch(as_list: bool) -> None:
    x = _data("2d", 50)
    ref = _one_bn_model("2d")
    recalibrate(ref, x[:23], batch_size=10, progress=False)
    m = _one_bn_model("2d")
    data = [(torch.from_numpy(x[i : i + 10]), i) for i in range(0, 50, 10)] if as_list else x
    report = recalibrate(m, data, batch_size=10, num_samples=23, progress=False)
    torch.testing.assert_close(m[1].running_var, ref[1].running_var, rtol=1e-6, atol=1e-6)
    assert report.samples == 23 and report["1"].batches == 3


def test_report_shifts_in_units_of_old_sigma() -> None:
    m = _one_bn_model("1d")
    old_mean = m[1].running_mean.double().numpy().copy()
    old_var = m[1].running_var.double().numpy().copy()
    report = recalibrate(m, _data("1d", 30), progress=False)
    assert isinstance(report, CalibrationReport)
    new_mean, new_var = m[1].running_mean.double().numpy(), m[1].running_var.double().numpy()
    sigma = np.sqrt(old_var + m[1].eps)
    np.testing.assert_allclose(
        report["1"].mean_shift, np.abs(new_mean - old_mean) / sigma, rtol=1e-5
    )
    np.testing.assert_allclose(
        report["1"].std_shift, np.abs(np.sqrt(new_var + m[1].eps) - sigma) / sigma, rtol=1e-5
    )
    assert "1" in report.table() and "max |dmean|/sigma" in str(report)
    assert report["1"].max_mean_shift > 1.0  # data offset 3, old mean 0, old var 1


def test_layers_without_running_stats_are_skipped() -> None:
    m = torch.nn.Sequential(
        torch.nn.Linear(5, 4),
        torch.nn.BatchNorm1d(4, track_running_stats=False),
        torch.nn.BatchNorm1d(4),
    )
    with pytest.warns(UserWarning, match=r"leaves \['1'\].*track_running_stats=False"):
        report = recalibrate(m, _data("1d", 20), progress=False)
    assert [(r.name, r.status) for r in report.layers] == [("2", "recalibrated"), ("1", "skipped")]


# ------------------------------------------------------------------------------------------
# restore on failure


def _model_with_settings() -> torch.nn.Module:
    model, _ = trained_digits()
    model.bn2.momentum = None
    model.bn3.momentum = 0.3
    model.train()
    model.fc.eval()
    return model


def _flags(model: torch.nn.Module) -> list[tuple[bool, object]]:
    return [(m.training, getattr(m, "momentum", "-")) for m in model.modules()]


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_bad_batch_restores_everything(mode: str) -> None:
    model = _model_with_settings()
    state, flags = _buffers(model), _flags(model)
    x = D.load_digits_nchw()[2][:90]
    batches = [x[:30], x[30:60], torch.zeros(30, 3, 8, 8)]
    with pytest.raises(RuntimeError):
        recalibrate(model, batches, mode=mode, progress=False)
    assert _same_state(_buffers(model), state)
    assert _flags(model) == flags
    assert _no_hooks(model)


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_keyboard_interrupt_restores_everything(mode: str) -> None:
    model = _model_with_settings()
    state, flags = _buffers(model), _flags(model)
    x = D.load_digits_nchw()[2][:120]
    calls = []
    stop_at = 3 if mode == "one-pass" else 7  # sequential: after the first layers were written
    # (passes from the data: paused passes call forward_fn once per batch, in the first pass;
    # tests/test_sequential_cache.py interrupts those later)
    cache = 0 if mode == "sequential" else None

    def fwd(m: torch.nn.Module, batch: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        m(batch)

    with pytest.raises(KeyboardInterrupt):
        recalibrate(
            model, x, batch_size=30, forward_fn=fwd, mode=mode, progress=False, cache_bytes=cache
        )
    assert _same_state(_buffers(model), state)
    assert _flags(model) == flags
    assert _no_hooks(model)


def test_non_finite_input_is_refused_and_restored() -> None:
    model = _model_with_settings()
    state = _buffers(model)
    x = D.load_digits_nchw()[2][:64].clone()
    x[5, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        recalibrate(model, x, progress=False)
    assert _same_state(_buffers(model), state)


def test_success_keeps_modes_and_momenta() -> None:
    model = _model_with_settings()
    flags = _flags(model)
    recalibrate(model, D.load_digits_nchw()[2][:64], mode="sequential", progress=False)
    assert _flags(model) == flags
    assert _no_hooks(model)
    model.eval()
    recalibrate(model, D.load_digits_nchw()[2][:64], progress=False)
    assert not any(m.training for m in model.modules())


# ------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"estimator": "median"}, ValueError, "estimator"),
        ({"mode": "twice"}, ValueError, "mode"),
        ({"momentum": 0.0}, ValueError, "momentum"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"forward_fn": 3}, TypeError, "forward_fn"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], exc: type, match: str) -> None:
    m = _one_bn_model("1d")
    state = _buffers(m)
    with pytest.raises(exc, match=match):
        recalibrate(m, _data("1d", 10), progress=False, **kwargs)  # type: ignore[arg-type]
    assert _same_state(_buffers(m), state)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bad_models_and_data() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        recalibrate("model", _data("1d", 10))
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate(torch.nn.Linear(5, 2), _data("1d", 10))
    with pytest.raises(TypeError, match="TorchScript"):
        recalibrate(torch.jit.script(_one_bn_model("1d")), _data("1d", 10))
    m = _one_bn_model("1d")
    with pytest.raises(ValueError, match="empty"):
        recalibrate(m, np.zeros((0, 5), np.float32), progress=False)
    with pytest.raises(ValueError, match="empty"):
        recalibrate(m, [], progress=False)
    with pytest.raises(TypeError, match="real numbers"):
        recalibrate(m, np.array([["a"] * 5] * 4), progress=False)
    with pytest.raises(TypeError, match="iterable"):
        recalibrate(m, 3.0, progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        recalibrate(m, (b for b in [torch.zeros(4, 5)]), mode="sequential", progress=False)
    with pytest.raises(ValueError, match="input_key"):
        recalibrate(m, [{"a": torch.zeros(4, 5)}], progress=False)
    with pytest.raises(TypeError, match="batch of type"):
        recalibrate(m, [object()], progress=False)
    with pytest.raises(ValueError, match="cannot be split"):
        recalibrate(m, _data("1d", 10), estimator="ema", client=object(), progress=False)
    with pytest.raises(TypeError, match="shards"):
        recalibrate(m, [torch.zeros(4, 5)], client=object(), progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        recalibrate(m, _data("1d", 1), mode="sequential", progress=False)
    with pytest.raises(ValueError, match="single value"):
        recalibrate(
            m,
            [torch.randn(4, 5), torch.randn(1, 5)],
            estimator="cumulative",
            mode="sequential",
            progress=False,
        )
    assert _no_hooks(m)
