"""streamnorm.torch: bn_layers, track and load_estimates against slow references."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import streamnorm  # noqa: E402
from streamnorm.torch import bn_layers, load_estimates, track  # noqa: E402


class Recorder:
    """A tracker that pools moments per layer and keeps what it was handed."""

    def __init__(self) -> None:
        self.moments: dict[str, streamnorm.Moments] = {}
        self.calls: list[tuple[str, object, tuple[int, ...]]] = []

    def update(self, layer, x, axis):
        self.calls.append((layer, x, tuple(axis)))
        m = self.moments.setdefault(layer, streamnorm.Moments())
        m.update(x, axis=axis)
        return m


def ref_moments(xs, axes):
    """float64 per-channel mean and biased variance of the concatenated batches."""
    x = torch.cat([t.detach().double() for t in xs], dim=0)
    return x.mean(dim=axes).numpy(), x.var(dim=axes, unbiased=False).numpy()


def capture_inputs(module):
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    return seen, h


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# bn_layers


def test_bn_layers_finds_every_kind_in_order_once():
    shared = torch.nn.BatchNorm1d(4)
    inner = torch.nn.Sequential(torch.nn.BatchNorm3d(2), torch.nn.InstanceNorm2d(3), shared)
    model = torch.nn.Sequential()
    model.add_module("a", torch.nn.BatchNorm2d(3))
    model.add_module("gn", torch.nn.GroupNorm(1, 3))
    model.add_module("block", inner)
    model.add_module("sync", torch.nn.SyncBatchNorm(5))
    model.add_module("lazy", torch.nn.LazyBatchNorm2d())
    model.add_module("ln", torch.nn.LayerNorm(3))
    model.add_module("again", shared)  # shared module: listed once
    names = [n for n, _ in bn_layers(model)]
    assert names == ["a", "block.0", "block.2", "sync", "lazy"]
    assert bn_layers(model)[2][1] is shared
    assert bn_layers(torch.nn.Linear(2, 2)) == []
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bn_layers("model")


def test_bn_axes():
    from streamnorm.torch import bn_axes

    assert [bn_axes(n) for n in (2, 3, 4, 5)] == [(0,), (0, 2), (0, 2, 3), (0, 2, 3, 4)]
    with pytest.raises(ValueError, match="at least 2"):
        bn_axes(1)


def test_digits_cnn_layers():
    from streamnorm.digits import make_cnn

    layers = bn_layers(make_cnn(width=4))
    assert [n for n, _ in layers] == ["bn1", "bn2", "bn3", "bn4"]
    assert [type(m).__name__ for _, m in layers] == ["BatchNorm2d"] * 3 + ["BatchNorm1d"]


# --------------------------------------------------------------------------------------------
# track: what reaches the tracker


@pytest.mark.parametrize(
    ("bn", "shape", "axes"),
    [
        (torch.nn.BatchNorm1d, (7, 5), (0,)),
        (torch.nn.BatchNorm1d, (6, 5, 9), (0, 2)),
        (torch.nn.BatchNorm2d, (4, 5, 3, 6), (0, 2, 3)),
        (torch.nn.BatchNorm3d, (3, 5, 2, 3, 4), (0, 2, 3, 4)),
        (torch.nn.LazyBatchNorm2d, (4, 5, 3, 3), (0, 2, 3)),
    ],
)
def test_track_pools_bn_input_like_reference(bn, shape, axes):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(shape[-1], shape[-1])
    model = torch.nn.Sequential(lin, bn(5) if bn is not torch.nn.LazyBatchNorm2d else bn())
    model.train()
    rec = Recorder()
    batches = [torch.randn(*shape, generator=g) * 3 + 100 for _ in range(3)]
    seen, h = capture_inputs(model[1])
    with track(model, rec) as t:
        assert t is rec
        for b in batches:
            model(b).sum().backward()  # inputs require grad: the hook must detach
    h.remove()
    assert [c[0] for c in rec.calls] == ["1"] * 3
    assert all(c[2] == axes for c in rec.calls)
    mean, var = ref_moments(seen, axes)
    m = rec.moments["1"]
    np.testing.assert_allclose(m.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.var(), var, rtol=1e-9)
    assert int(np.max(m.count)) == len(batches) * int(np.prod([shape[a] for a in axes]))


def test_track_channels_last_reaches_tracker_without_copy():
    g = torch.Generator().manual_seed(2)
    bn = torch.nn.BatchNorm2d(6)
    x = torch.randn(5, 6, 4, 7, generator=g).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    rec = Recorder()
    with track(bn, rec):
        bn(x)
    ((_, passed, axes),) = rec.calls
    assert passed.data_ptr() == x.data_ptr()
    view = np.asarray(passed)
    assert np.shares_memory(view, x.numpy())
    assert view.strides == tuple(s * 4 for s in x.stride())  # a strided view, not a copy
    mean, var = ref_moments([x], axes)
    np.testing.assert_allclose(rec.moments[""].mean, mean, atol=1e-12)
    np.testing.assert_allclose(rec.moments[""].var(), var, rtol=1e-9)


def test_track_passes_non_cpu_tensors_as_tensors_on_their_device():
    # CUDA tensors must reach tracker.update as they are (no .cpu() copy); the meta device
    # stands in for a GPU here: any conversion to numpy or to the CPU would fail or show
    class Keep:
        def __init__(self):
            self.seen = []

        def update(self, layer, x, axis):
            self.seen.append((x, axis))

    bn = torch.nn.BatchNorm2d(3, device="meta")
    x = torch.empty(4, 3, 5, 5, device="meta", requires_grad=True)
    keep = Keep()
    with track(bn, keep):
        bn(x)
    ((passed, axis),) = keep.seen
    assert passed.device.type == "meta" and not passed.requires_grad and axis == (0, 2, 3)


def test_track_half_precision_inputs_are_upcast():
    bn = torch.nn.BatchNorm2d(3).to(torch.bfloat16)
    x = (torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(3)) + 2).bfloat16()
    rec = Recorder()
    with track(bn, rec):
        bn(x)
    mean, var = ref_moments([x.float()], (0, 2, 3))
    np.testing.assert_allclose(rec.moments[""].mean, mean, rtol=1e-12)
    np.testing.assert_allclose(rec.moments[""].var(), var, rtol=1e-9)


def test_track_ignores_eval_mode_and_selected_layers():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
    rec = Recorder()
    x = torch.randn(8, 3)
    with track(model, rec, layers=["1"]):
        model(x)
        model.eval()
        model(x)  # eval: nothing recorded
        model.train()
        model[1].eval()
        model(x)  # layer 1 evaluates, layer 0 is not tracked
    assert [c[0] for c in rec.calls] == ["1"]


def test_hooks_removed_on_exit_and_on_error():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    )
    rec = Recorder()
    with track(model, rec):
        assert all(len(m._forward_pre_hooks) == 1 for _, m in bn_layers(model))
        model(torch.randn(4, 3))
    assert all(len(m._forward_pre_hooks) == 0 for _, m in bn_layers(model))
    n = len(rec.calls)
    with pytest.raises(RuntimeError, match="boom"):
        with track(model, rec):
            model(torch.randn(4, 3))
            raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for _, m in bn_layers(model))
    # a forward that raises inside the block (wrong shape) also leaves no hooks behind
    with pytest.raises(RuntimeError):
        with track(model, rec):
            model(torch.randn(4, 5))
    assert all(len(m._forward_pre_hooks) == 0 for _, m in bn_layers(model))
    model(torch.randn(4, 3))
    assert len(rec.calls) == n + 2


def test_hooks_removed_when_the_tracker_raises():
    class Broken:
        def update(self, layer, x, axis):
            raise ValueError("dimension mismatch")

    bn = torch.nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="dimension mismatch"):
        with track(bn, Broken()):
            bn(torch.randn(4, 3))
    assert len(bn._forward_pre_hooks) == 0


def test_track_bad_input():
    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match="update"):
        with track(bn, object()):
            pass
    with pytest.raises(ValueError, match="not a BatchNorm layer"):
        with track(bn, Recorder(), layers=["nope"]):
            pass
    with pytest.raises(TypeError, match="iterable of layer names"):
        with track(bn, Recorder(), layers="0"):
            pass
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with track(np.zeros(3), Recorder()):
            pass
    assert len(bn[0]._forward_pre_hooks) == 0


# --------------------------------------------------------------------------------------------
# with the real Tracker, and load_estimates


def small_net(momentum=0.1):
    g = torch.Generator().manual_seed(5)
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    return torch.nn.Sequential(
        conv,
        torch.nn.BatchNorm2d(4, momentum=momentum),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.BatchNorm1d(4 * 5 * 5, momentum=momentum),
    )


def batches(k, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 5, 5, generator=g) * 2 + 1 for _ in range(k)]


def test_tracked_ema_and_cumulative_are_pytorch_running_stats():
    for momentum, name in ((0.1, "ema"), (None, "cumulative")):
        model = small_net(momentum)
        tracker = streamnorm.Tracker()
        with track(model, tracker):
            for x in batches(7):
                model(x.to(memory_format=torch.channels_last))
        assert tracker.layers == ["1", "4"]
        for layer, bn in bn_layers(model):
            est = tracker.estimator(layer, name)
            np.testing.assert_allclose(est.mean, bn.running_mean.double(), rtol=2e-6, atol=1e-6)
            np.testing.assert_allclose(
                est.running_var("unbiased"), bn.running_var.double(), rtol=2e-6, atol=1e-6
            )
        # loading the estimates into a fresh model reproduces PyTorch's buffers
        fresh = small_net(momentum)
        assert load_estimates(fresh, tracker, estimator=name) == ["1", "4"]
        for (_, a), (_, b) in zip(bn_layers(fresh), bn_layers(model), strict=True):
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)


def test_load_population_writes_unbiased_variance_and_keeps_dtype():
    model = small_net().double()
    tracker = streamnorm.Tracker({"population": streamnorm.Population()})
    xs = batches(3, n=5, seed=1)
    inputs = []
    h = model[1].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    with track(model, tracker):
        for x in xs:
            model(x.double())
    h.remove()
    z = torch.cat(inputs)
    before_nbt = model[1].num_batches_tracked.clone()
    load_estimates(model, tracker)  # default estimator: population
    bn = model[1]
    assert bn.running_mean.dtype == torch.float64 and bn.running_var.dtype == torch.float64
    torch.testing.assert_close(bn.running_mean, z.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    # Population.var is biased (M2 / N); running_var must be M2 / (N - 1)
    torch.testing.assert_close(
        bn.running_var, z.var(dim=(0, 2, 3), unbiased=True), rtol=1e-12, atol=0
    )
    assert not torch.allclose(bn.running_var, z.var(dim=(0, 2, 3), unbiased=False), rtol=1e-3)
    assert torch.equal(bn.num_batches_tracked, before_nbt)


def test_load_keras_ema_is_converted_to_the_unbiased_convention():
    model = small_net()
    proto = streamnorm.EMA(0.9, style="keras", unbiased=False)
    tracker = streamnorm.Tracker({"keras": proto})
    with track(model, tracker):
        for x in batches(4, n=2):
            model(x)
    load_estimates(model, tracker, estimator="keras")
    est = tracker.estimator("4", "keras")
    # BatchNorm1d on (N, C) with N = 2: unbiased batch variances are twice the biased ones
    np.testing.assert_allclose(
        model[4].running_var.double(), est.running_var("unbiased"), rtol=1e-6
    )
    # both start at 1 with weight 0.9**4 left; each unbiased batch variance is 2x the biased one
    start = 0.9**4
    np.testing.assert_allclose(
        np.asarray(est.running_var("unbiased")) - start,
        2 * (np.asarray(est.var) - start),
        atol=1e-12,
    )


def test_load_estimates_from_dict_and_bad_input():
    model = small_net()
    good = {"1": {"e": (np.arange(4.0), np.full(4, 2.0))}}
    assert load_estimates(model, good, estimator="e") == ["1"]
    torch.testing.assert_close(model[1].running_mean, torch.arange(4.0))
    torch.testing.assert_close(model[1].running_var, torch.full((4,), 2.0))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    bad_cases = [
        ({"nope": {"e": (np.zeros(4), np.ones(4))}}, "e", ValueError, "not a BatchNorm layer"),
        ({"1": {"e": (np.zeros(3), np.ones(3))}}, "e", ValueError, "4 channels"),
        ({"1": {"e": (np.zeros(4), np.ones(4))}}, "median", ValueError, "unknown estimator"),
        ({"1": {"e": (np.zeros(4), -np.ones(4))}}, "e", ValueError, "negative"),
        ({"1": {"e": np.zeros(4)}}, "e", TypeError, "pair"),
        ([1, 2], "e", TypeError, "Tracker"),
        # the first layer is fine, the second is not: nothing may be written
        (
            {"1": {"e": (np.ones(4), np.ones(4))}, "4": {"e": (np.ones(3), np.ones(3))}},
            "e",
            ValueError,
            "channels",
        ),
    ]
    for est, name, exc, msg in bad_cases:
        with pytest.raises(exc, match=msg):
            load_estimates(model, est, estimator=name)
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    tracker = streamnorm.Tracker()
    with track(model, tracker):
        model(batches(1)[0])
    with pytest.raises(ValueError, match="unknown estimator 'median'"):
        load_estimates(model, tracker, estimator="median")
    with pytest.raises(ValueError, match="not a BatchNorm layer"):
        load_estimates(small_net()[:3], tracker, estimator="ema")
    lazy = torch.nn.Sequential(torch.nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="not initialized"):
        load_estimates(lazy, {"0": {"e": (np.zeros(2), np.ones(2))}}, estimator="e")
    no_stats = torch.nn.Sequential(torch.nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats"):
        load_estimates(no_stats, {"0": {"e": (np.zeros(2), np.ones(2))}}, estimator="e")
