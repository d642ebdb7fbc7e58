"""Distributed calibration on a real two-process LocalCluster equals the single-process result.

Also the plumbing under it: ``map_merge`` (fixed-order tree) and ``get_client`` (fails fast).
"""

from __future__ import annotations

import copy
import functools
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import streamnorm

distributed = pytest.importorskip("distributed")

from streamnorm.calibrate._distributed import (  # noqa: E402
    SchedulerUnreachableError,
    get_client,
    map_merge,
    merge_results,
)

TOL = 1e-10


@pytest.fixture
def client(dask_client):
    """The session's two-worker cluster (tests/conftest.py)."""
    return dask_client


# --------------------------------------------------------------------------------------------
# map_merge


def _shard_fn(shard: np.ndarray, offset: float = 0.0) -> dict[str, streamnorm.Moments]:
    out = {"x": streamnorm.moments(shard + offset)}
    if shard.shape[0] % 2:  # a name that only some shards produce
        out["odd"] = streamnorm.moments(shard[:, :2] * 3.0)
    return out


def _shards(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(1e6 * (i % 3), 1.0 + i, size=(5 + i, 4)) for i in range(19)]


@pytest.mark.slow
def test_map_merge_equals_one_pass_and_same_bits_everywhere(client):
    shards = _shards()
    fn = functools.partial(_shard_fn, offset=2.0)
    on_cluster = map_merge(client, shards, fn, fan_in=3)
    here = map_merge(None, shards, fn, fan_in=3)
    assert list(on_cluster) == ["x", "odd"]
    whole = streamnorm.moments(np.concatenate(shards) + 2.0)
    got = on_cluster["x"]
    assert got.count == whole.count
    np.testing.assert_allclose(got.mean, whole.mean, rtol=1e-14)
    np.testing.assert_allclose(got.m2, whole.m2, rtol=1e-12)
    odd = [s for s in shards if s.shape[0] % 2]
    ref_odd = streamnorm.moments(np.concatenate(odd)[:, :2] * 3.0)
    np.testing.assert_allclose(on_cluster["odd"].m2, ref_odd.m2, rtol=1e-12)
    assert on_cluster["odd"].count == ref_odd.count
    for k in on_cluster:  # the tree depends on the shard order only: the same bits
        np.testing.assert_array_equal(on_cluster[k].mean, here[k].mean)
        np.testing.assert_array_equal(on_cluster[k].m2, here[k].m2)
    again = map_merge(client, shards, fn, fan_in=3)
    np.testing.assert_array_equal(again["x"].m2, got.m2)


@pytest.mark.slow
def test_map_merge_edge_cases_and_errors(client):
    assert map_merge(client, [], _shard_fn) == {}
    one = map_merge(client, [np.ones((3, 4))], _shard_fn)
    assert one["x"].count == 3 and set(one) == {"x", "odd"}
    a = {"x": streamnorm.moments(np.ones((2, 2)))}
    before = a["x"].m2.copy()
    merge_results(a, a)
    np.testing.assert_array_equal(a["x"].m2, before)  # inputs are not modified
    with pytest.raises(TypeError, match="shard 1 it returned list"):
        map_merge(client, [1, 2], _returns_list_for_two)
    with pytest.raises(TypeError, match="dict of str -> streamnorm.Moments"):
        map_merge(None, [1], lambda s: {"a": 1.0})
    with pytest.raises(ZeroDivisionError):  # an error on a worker comes back as itself
        map_merge(client, [1, 0], _inverse)
    with pytest.raises(TypeError, match="callable"):
        map_merge(client, [1], "not a function")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="distributed.Client"):
        map_merge(object(), [1], _shard_fn)
    with pytest.raises(ValueError, match="fan_in"):
        map_merge(None, [1], _shard_fn, fan_in=1)


def _inverse(s: int) -> dict[str, streamnorm.Moments]:
    return {"a": streamnorm.moments(np.full((1, 1), 1 / s))}


def _returns_list_for_two(s: int):
    return [] if s == 2 else {"a": streamnorm.moments(np.ones((2, 1)))}


# --------------------------------------------------------------------------------------------
# get_client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_scheduler_fails_fast_and_clearly():
    addr = f"tcp://127.0.0.1:{_free_port()}"
    t = time.monotonic()
    with pytest.raises(SchedulerUnreachableError, match="no Dask scheduler reachable"):
        with get_client(addr, timeout=3):
            pass
    assert time.monotonic() - t < 10
    # a listening socket that is not a scheduler: no hang either, an error within the timeout
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        t = time.monotonic()
        with pytest.raises(SchedulerUnreachableError, match="within 1"):
            with get_client(f"tcp://127.0.0.1:{port}", timeout=1):
                pass
        assert time.monotonic() - t < 15
    assert issubclass(SchedulerUnreachableError, ConnectionError)
    assert issubclass(SchedulerUnreachableError, ValueError)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"scheduler": "nonsense://x:1"}, ValueError, "unknown scheme"),
        ({"scheduler": "tcp://localhost"}, ValueError, "no port"),
        ({"scheduler": 8786}, TypeError, "address string"),
        ({"scheduler": "tcp://a:1", "workers": 2}, ValueError, "not both"),
        ({"workers": 0}, ValueError, "positive int"),
        ({"workers": 1.5}, ValueError, "positive int"),
        ({"scheduler": "tcp://a:1", "timeout": 0}, ValueError, "timeout"),
    ],
)
def test_get_client_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        with get_client(**kwargs):
            pass


@pytest.mark.slow
def test_get_client_to_running_scheduler(client):
    with get_client(client.scheduler.address, timeout=5) as c:
        assert c.submit(lambda: 41 + 1).result() == 42
        assert len(c.scheduler_info()["workers"]) == 2


# --------------------------------------------------------------------------------------------
# PyTorch


def _torch_setup():
    torch = pytest.importorskip("torch")
    from streamnorm import digits as D

    x = D.load_digits_nchw(seed=0)[0][:600].double().numpy()
    with torch.random.fork_rng():
        model = D.make_cnn(seed=0, width=8).double()
    return torch, model, x


@pytest.mark.parametrize(
    "estimator, mode",
    [("population", "one-pass"), ("population", "sequential"), ("cumulative", "one-pass")],
)
@pytest.mark.slow
def test_torch_distributed_equals_local(client, estimator, mode):
    torch, model, x = _torch_setup()
    from streamnorm.torch import recalibrate

    local = model
    dist = copy.deepcopy(model)
    kw = dict(estimator=estimator, mode=mode, batch_size=32, progress=False)
    rep_local = recalibrate(local, x, **kw)
    rep_dist = recalibrate(dist, x, client=client, **kw)
    assert rep_dist.samples == rep_local.samples == 600
    a, b = local.state_dict(), dist.state_dict()
    checked = 0
    for k in a:
        if k.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), rtol=TOL, atol=TOL, err_msg=k)
            checked += 1
        elif k.endswith("num_batches_tracked"):
            assert int(b[k]) == int(a[k]), k
        else:  # weights untouched
            assert torch.equal(a[k], b[k]), k
    assert checked >= 4
    # and the result is the statistics, not a no-op: they moved from the initial 0 / 1
    assert any(not np.allclose(b[k].numpy(), 0.0) for k in b if k.endswith("running_mean"))


@pytest.mark.slow
def test_torch_population_is_the_exact_pooled_statistic(client):
    """The distributed population estimate of the first BN equals numpy on its full input."""
    torch, model, x = _torch_setup()
    from streamnorm.torch import bn_layers, recalibrate

    first_name, first_bn = bn_layers(model)[0]
    captured = []
    h = first_bn.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 32):
            model(torch.from_numpy(x[i : i + 32]))
    h.remove()
    a = torch.cat(captured).numpy()
    axes = (0, *range(2, a.ndim))
    recalibrate(model, x, batch_size=32, progress=False, client=client)
    np.testing.assert_allclose(first_bn.running_mean.numpy(), a.mean(axis=axes), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(first_bn.running_var.numpy(), a.var(axis=axes, ddof=1), rtol=TOL)


@pytest.mark.slow
def test_torch_client_restores_on_failure(client):
    torch, model, x = _torch_setup()
    from streamnorm.torch import recalibrate

    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = x.copy()
    bad[300, 0, 3, 3] = np.nan
    with pytest.raises(ValueError):
        recalibrate(model, bad, batch_size=32, progress=False, client=client)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------------------------
# ONNX


def _onnx_double_model(path: str) -> None:
    """x (N, 3, 5, 5) float64 -> Mul -> Add -> BN1 -> Relu -> Mul -> BN2, statistics in float64.

    Two depths, so ``sequential`` makes two passes, the second depending on the first's result.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)

    def init(name: str, a: np.ndarray):
        return numpy_helper.from_array(np.asarray(a, dtype=np.float64), name)

    c = 3
    inits = [
        init("s", rng.uniform(0.5, 2.0, (1, c, 1, 1))),
        init("o", rng.normal(5.0, 1.0, (1, c, 1, 1))),
        init("g1", rng.uniform(0.5, 1.5, c)),
        init("b1", rng.normal(0, 0.1, c)),
        init("m1", np.zeros(c)),
        init("v1", np.ones(c)),
        init("s2", rng.uniform(0.5, 2.0, (1, c, 1, 1))),
        init("g2", rng.uniform(0.5, 1.5, c)),
        init("b2", rng.normal(0, 0.1, c)),
        init("m2", np.zeros(c)),
        init("v2", np.ones(c)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["a"]),
        helper.make_node("Add", ["a", "o"], ["b"]),
        helper.make_node("BatchNormalization", ["b", "g1", "b1", "m1", "v1"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r"]),
        helper.make_node("Mul", ["r", "s2"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g2", "b2", "m2", "v2"], ["y"], name="bn2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", c, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", c, 5, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _stored(path: str) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "one-pass"])
def test_onnx_distributed_equals_local(client, tmp_path, mode):
    pytest.importorskip("onnxruntime")
    from streamnorm.onnx import recalibrate

    src = str(tmp_path / "m.onnx")
    _onnx_double_model(src)
    x = np.random.default_rng(4).normal(1.0, 2.0, size=(500, 3, 5, 5))
    out_l, out_d = str(tmp_path / "local.onnx"), str(tmp_path / "dist.onnx")
    rep_l = recalibrate(src, x, out_l, mode=mode, batch_size=40, progress=False)
    rep_d = recalibrate(src, x, out_d, mode=mode, batch_size=40, progress=False, client=client)
    assert rep_l.samples == rep_d.samples == 500
    a, b = _stored(out_l), _stored(out_d)
    for k in ("m1", "v1", "m2", "v2"):
        assert b[k].dtype == np.float64
        np.testing.assert_allclose(b[k], a[k], rtol=TOL, atol=TOL, err_msg=k)
    # the first node's statistics are those of its input over all the data (biased var)
    s = _stored(src)
    inp = x * s["s"] + s["o"]
    np.testing.assert_allclose(b["m1"], inp.mean(axis=(0, 2, 3)), rtol=TOL)
    np.testing.assert_allclose(b["v1"], inp.var(axis=(0, 2, 3)), rtol=TOL)


@pytest.mark.slow
def test_cli_calibrate_on_a_scheduler(client, tmp_path):
    pytest.importorskip("onnxruntime")
    from streamnorm.cli import main

    src = str(tmp_path / "m.onnx")
    _onnx_double_model(src)
    x = np.random.default_rng(5).normal(size=(300, 3, 5, 5))
    np.save(tmp_path / "x.npy", x)
    from streamnorm.onnx import recalibrate

    recalibrate(src, x, str(tmp_path / "ref.onnx"), batch_size=32, progress=False)
    out = str(tmp_path / "cli.onnx")
    rc = main(
        [
            "calibrate",
            src,
            "--data",
            str(tmp_path / "x.npy"),
            "--out",
            out,
            "--batch-size",
            "32",
            "--scheduler",
            client.scheduler.address,
            "--no-progress",
        ]
    )
    assert rc == 0
    a, b = _stored(str(tmp_path / "ref.onnx")), _stored(out)
    for k in ("m1", "v1", "m2", "v2"):
        np.testing.assert_allclose(b[k], a[k], rtol=TOL, atol=TOL, err_msg=k)


@pytest.mark.slow
def test_cli_unreachable_scheduler_exit_code(tmp_path):
    pytest.importorskip("onnxruntime")
    src = str(tmp_path / "m.onnx")
    _onnx_double_model(src)
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 5, 5)))
    addr = f"tcp://127.0.0.1:{_free_port()}"
    t = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamnorm.cli",
            "calibrate",
            src,
            "--data",
            str(tmp_path / "x.npy"),
            "--out",
            str(tmp_path / "o.onnx"),
            "--scheduler",
            addr,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NUMBA_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "no Dask scheduler reachable" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t < 60
    assert not os.path.exists(tmp_path / "o.onnx")
