"""Sequential recalibration from paused forward passes (cursors) equals the passes recomputed
from the data (``cache_bytes=0``), costs one forward pass per batch, and cleans up on failure."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.filterwarnings("ignore:no data reached"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
nn = torch.nn

from streamnorm.torch import recalibrate  # noqa: E402


class _Net(nn.Module):
    """A residual add, a dense concat, a norm layer called twice, one on a branch never taken
    in eval mode, and a dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.res = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1)
        )
        self.res_bn = nn.BatchNorm2d(8)
        self.dense_bn = nn.BatchNorm2d(16)
        self.dense_conv = nn.Conv2d(16, 8, 3, padding=1)
        self.twice = nn.BatchNorm2d(8)
        self.never = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 4)
        self.head_bn = nn.BatchNorm1d(4)

        self.branch = True

    def forward(self, x: Any) -> Any:
        h = self.stem(x)
        h = torch.relu(self.res_bn(self.res(h) + h))
        h2 = self.dense_conv(torch.relu(self.dense_bn(torch.cat([h, h * 0.5 + 1.0], 1))))
        h = self.twice(h2 + 0.5)
        h = self.twice(h * 2.0)
        if self.branch and h.abs().max() > 1e9:  # never in practice
            h = self.never(h)
        return self.head_bn(self.head(self.drop(h.mean((2, 3)))))


def _net(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    m = _Net()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    return m


def _data(n: int = 48, seed: int = 1) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g) * 2 + 0.3


def _stats(model: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_b" in k}


def _same(a: dict[str, Any], b: dict[str, Any], rtol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(
            a[k].double().numpy(), b[k].double().numpy(), rtol=rtol, atol=1e-7, err_msg=k
        )


def _run(cache: int | None, data: Any = None, **kw: Any) -> tuple[dict[str, Any], Any, int]:
    model = _net()
    calls = []

    def fwd(m: Any, batch: Any) -> None:
        calls.append(1)
        m(batch)

    report = recalibrate(
        model,
        _data() if data is None else data,
        mode="sequential",
        batch_size=8,
        progress=False,
        cache_bytes=cache,
        forward_fn=fwd,
        **kw,
    )
    return _stats(model), report, len(calls)


@pytest.mark.parametrize("estimator", ["population", "cumulative", "ema"])
def test_cached_equals_recomputed_at_one_forward_per_batch(estimator: str) -> None:
    threads = threading.active_count()
    old, old_report, old_calls = _run(0, estimator=estimator)
    new, new_report, new_calls = _run(None, estimator=estimator)
    _same(new, old)
    assert [(x.name, x.samples, x.batches) for x in new_report.layers] == [
        (x.name, x.samples, x.batches) for x in old_report.layers
    ]
    assert new_calls == 1 + 6  # the forward that orders the layers, then one per batch
    assert old_calls > 6 * 6
    assert threading.active_count() == threads


def test_a_budget_for_some_batches_gives_the_same_result() -> None:
    old, _, old_calls = _run(0)
    # a paused pass holds about its batch and twice a layer input: 8*3*12*12*4 + 2*8*8*12*12*4
    # = 87552 bytes, so three of the six batches keep theirs at first
    new, _, calls = _run(300_000)
    _same(new, old)
    assert 7 < calls < old_calls  # some batches kept, the others recomputed


def test_auto_num_samples_is_the_same() -> None:
    data = _data(20 * 8)
    old, old_report, _ = _run(0, data, num_samples="auto", tol=0.5)
    new, new_report, _ = _run(None, data, num_samples="auto", tol=0.5)
    _same(new, old)
    assert new_report.samples == old_report.samples


def test_unreached_layer_and_second_call() -> None:
    new, report, _ = _run(None)
    model = _net()
    assert torch.equal(new["never.running_mean"], model.never.running_mean)
    by_name = {x.name: x for x in report.layers}
    assert by_name["twice"].samples == 48  # the first call's input only, as a pass would


def test_threads_run_under_the_callers_autocast() -> None:
    out = []
    for cache in (0, None):
        model = _net()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            recalibrate(
                model, _data(), mode="sequential", batch_size=8, progress=False, cache_bytes=cache
            )
        out.append(_stats(model))
    _same(out[1], out[0], rtol=0)


class _Boom(nn.Module):
    def __init__(self, at: int, exc: type[BaseException]) -> None:
        super().__init__()
        self.n, self.at, self.exc = 0, at, exc

    def forward(self, x: Any) -> Any:
        self.n += 1
        if self.n == self.at:
            raise self.exc("boom")
        return x


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_pass_restores_and_leaves_no_thread(exc: type[BaseException]) -> None:
    model = _net()
    model.dense_bn = nn.Sequential(_Boom(5, exc), model.dense_bn)  # batch 3, after stem/res
    before = _stats(model)
    flags = [m.training for m in model.modules()]
    threads = threading.active_count()
    with pytest.raises(exc, match="boom"):
        recalibrate(model, _data(), mode="sequential", batch_size=8, progress=False)
    assert threading.active_count() == threads
    _same(_stats(model), before, rtol=0)
    assert [m.training for m in model.modules()] == flags
    for m in model.modules():
        assert not m._forward_pre_hooks


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_zoo_cached_equals_recomputed(arch: str) -> None:
    import _zoo

    tv = _zoo.torchvision()
    torch.manual_seed(0)
    ref = getattr(tv.models, arch)(weights=None)
    x = torch.randn(8, 3, 32, 32)
    out = []
    for cache in (0, None):
        m = getattr(tv.models, arch)(weights=None)
        m.load_state_dict(ref.state_dict())
        recalibrate(m, x, mode="sequential", batch_size=4, progress=False, cache_bytes=cache)
        out.append(_stats(m))
    _same(out[1], out[0])


# ------------------------------------------------------------------------------------------
# ONNX: the graph cut into segments


def _onnx_inits(path: Any) -> dict[str, np.ndarray]:
    onnx = pytest.importorskip("onnx")
    m = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


def _same_inits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(
            b[k].astype(np.float64), a[k].astype(np.float64), rtol=1e-5, atol=1e-6, err_msg=k
        )


def _export(tmp_path: Any, folding: bool) -> Any:
    pytest.importorskip("onnxruntime")
    import io

    model = _net().eval()
    model.branch = False
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (_data(4),),
        buf,
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        do_constant_folding=folding,
        opset_version=15,
    )
    path = tmp_path / f"net_{folding}.onnx"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("folding", [False, True])
def test_onnx_cached_equals_recomputed(tmp_path: Any, folding: bool) -> None:
    from streamnorm.onnx import recalibrate as onnx_recalibrate

    src = _export(tmp_path, folding)
    x = _data(40, seed=5).numpy()
    kw = {"source": _data(24, seed=6).numpy()}  # folded layers too (a residual Conv unfolded)
    out = {}
    for cache in (0, None, 40_000):  # 40 kB: some batches keep their tensors
        path = tmp_path / f"out_{cache}.onnx"
        report = onnx_recalibrate(
            src, x, path, batch_size=8, progress=False, cache_bytes=cache, **kw
        )
        out[cache] = _onnx_inits(path)
        assert len(report.layers) >= 5
    _same_inits(out[0], out[None])
    _same_inits(out[0], out[40_000])


def test_onnx_every_node_runs_once_per_batch(tmp_path: Any, monkeypatch: Any) -> None:
    """The segments hold each node of the graph once (a folded layer twice: before and after
    its weights are adapted), not once per pass."""
    from streamnorm.onnx import _segments
    from streamnorm.onnx import recalibrate as onnx_recalibrate

    built: list[Any] = []
    model_of = _segments._Plan._model

    def spy(self: Any, seg: Any, fed: Any) -> bytes:
        built.append(seg)
        return model_of(self, seg, fed)

    monkeypatch.setattr(_segments._Plan, "_model", spy)
    src = _export(tmp_path, True)
    report = onnx_recalibrate(
        src,
        _data(16).numpy(),
        tmp_path / "o.onnx",
        batch_size=8,
        progress=False,
        source=_data(16, seed=6).numpy(),
    )
    onnx = pytest.importorskip("onnx")
    nodes = [n for n in onnx.load(str(src)).graph.node if n.op_type != "Constant"]
    folded = sum(1 for x in report.layers if x.kind == "folded")
    ran = [n for seg in built for n in seg.nodes if n.op_type != "Constant"]
    assert len(built) > 3  # one segment per depth
    assert len(ran) <= len(nodes) + folded


@pytest.mark.slow
def test_onnx_paddleocr_det_cached_equals_recomputed(tmp_path: Any) -> None:
    import _zoo

    from streamnorm.onnx import recalibrate as onnx_recalibrate

    src = _zoo.paddleocr_model("det")
    rng = np.random.default_rng(0)
    x = rng.random((6, 3, 96, 96), dtype=np.float32)
    source = rng.random((4, 3, 96, 96), dtype=np.float32) * 0.8 + 0.1
    out = {}
    for cache in (0, None):
        path = tmp_path / f"det_{cache}.onnx"
        onnx_recalibrate(
            src, x, path, batch_size=2, source=source, progress=False, cache_bytes=cache
        )
        out[cache] = _onnx_inits(path)
    _same_inits(out[0], out[None])


def test_bad_cache_bytes() -> None:
    from streamnorm._errors import InputError, InputTypeError

    with pytest.raises(InputError, match="cache_bytes"):
        recalibrate(_net(), _data(8), mode="sequential", progress=False, cache_bytes=-1)
    with pytest.raises(InputTypeError, match="cache_bytes"):
        recalibrate(_net(), _data(8), mode="sequential", progress=False, cache_bytes="1 GiB")
