"""streamnorm.compare and ``streamnorm compare``: metrics, ground truth, a real short run, CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from streamnorm import cli  # noqa: E402
from streamnorm.compare import compare, ground_truth, layer_errors  # noqa: E402
from streamnorm.digits import accuracy, load_digits_nchw, make_cnn, shift_domain, train  # noqa: E402
from streamnorm.torch import bn_layers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# metrics


def test_layer_errors_against_hand_computed_values():
    mean, var = np.array([0.0, 10.0]), np.array([4.0, 1.0])
    got = layer_errors([1.0, 9.0], [16.0, 1.0], mean, var, eps=0.0)
    assert got["mean_err"] == pytest.approx((1 / 2 + 1 / 1) / 2)
    assert got["mean_err_max"] == pytest.approx(1.0)
    assert got["logvar"] == pytest.approx(math.log(4) / 2)
    assert got["logvar_abs"] == pytest.approx(math.log(4) / 2)
    under = layer_errors(mean, [1.0, 0.25], mean, var, eps=0.0)
    assert under["mean_err"] == 0.0
    assert under["logvar"] == pytest.approx(-math.log(4))  # signed: underestimated
    assert under["logvar_abs"] == pytest.approx(math.log(4))
    # a dead channel (variance 0) stays finite through eps, like BatchNorm itself
    dead = layer_errors([0.1], [0.0], [0.0], [0.0], eps=1e-2)
    assert dead["mean_err"] == pytest.approx(1.0) and dead["logvar"] == 0.0


def test_layer_errors_equal_a_direct_numpy_computation():
    rng = np.random.default_rng(7)
    mean, var = rng.normal(size=6), rng.uniform(0.0, 3.0, size=6)
    var[2] = 0.0  # a dead channel
    mh, vh = mean + rng.normal(scale=0.3, size=6), var * rng.uniform(0.2, 5.0, size=6)
    eps = 1e-3
    me = [abs(a - b) / math.sqrt(v + eps) for a, b, v in zip(mh, mean, var, strict=True)]
    lv = [math.log(a + eps) - math.log(b + eps) for a, b in zip(vh, var, strict=True)]
    got = layer_errors(mh, vh, mean, var, eps=eps)
    assert got == pytest.approx(
        {
            "mean_err": sum(me) / 6,
            "mean_err_max": max(me),
            "logvar": sum(lv) / 6,
            "logvar_abs": sum(abs(v) for v in lv) / 6,
            "logvar_abs_max": max(abs(v) for v in lv),
        },
        rel=1e-13,
    )


def test_layer_errors_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        layer_errors([0.0, 1.0], [1.0], [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="empty"):
        layer_errors([], [], [], [])
    with pytest.raises(ValueError, match=">= 0"):
        layer_errors([0.0], [-1.0], [0.0], [1.0])


# --------------------------------------------------------------------------------------------
# ground truth against a slow float64 reference


def reference_truth(model, x):
    """Layer by layer in float64: pool the input of layer k over all of x in one forward, in eval
    mode with layers < k holding the (unbiased) truth found so far."""
    m = copy.deepcopy(model).double().eval()
    out = {}
    for name, bn in bn_layers(m):
        seen: list = []
        h = bn.register_forward_pre_hook(lambda mod, a, seen=seen: seen.append(a[0].detach()))
        with torch.no_grad():
            m(x.double())
        h.remove()
        (z,) = seen
        axes = (0, *range(2, z.ndim))
        mu, var = z.mean(dim=axes), z.var(dim=axes, unbiased=True)
        out[name] = (mu.numpy(), var.numpy())
        bn.running_mean.copy_(mu)
        bn.running_var.copy_(var)
    return out


def sequential_truth_float32(model, x, batch_size):
    """The truth as an eval-mode forward computes it: layer by layer on a float32 copy, each
    layer's input pooled over all of x with float64 numpy, then rounded into the buffers."""
    m = copy.deepcopy(model).eval()
    out = {}
    for name, bn in bn_layers(m):
        seen: list = []
        h = bn.register_forward_pre_hook(lambda mod, a, seen=seen: seen.append(a[0].detach()))
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                m(x[i : i + batch_size])
        h.remove()
        z = np.concatenate([t.double().numpy() for t in seen])
        z = np.moveaxis(z, 1, -1).reshape(-1, z.shape[1])
        mu, var = z.mean(axis=0), z.var(axis=0, ddof=1)
        out[name] = (len(z), mu, var)
        bn.running_mean.copy_(torch.tensor(mu, dtype=torch.float32))
        bn.running_var.copy_(torch.tensor(var, dtype=torch.float32))
    return out


@pytest.mark.slow
def test_ground_truth_equals_the_sequential_eval_mode_statistics():
    x, y, _, _ = load_digits_nchw()
    model = make_cnn(seed=2, width=6)
    train(model, x[:400], y[:400], epochs=1, batch_size=50, seed=2)
    truth = ground_truth(model, x, batch_size=200)
    ref = sequential_truth_float32(model, x, 200)
    for name, (n, mu, var) in ref.items():
        assert int(np.min(truth[name].count)) == n
        np.testing.assert_allclose(truth[name].mean, mu, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(truth[name].var(ddof=1), var, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_ground_truth_matches_reference_and_restores_the_model():
    x, y, _, _ = load_digits_nchw()
    x, y = x[:300], y[:300]
    model = make_cnn(seed=3, width=4)
    train(model, x, y, epochs=1, batch_size=100, seed=3)
    model.train()
    model.bn2.eval()  # a mixed mode must be restored too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    truth = ground_truth(model, x, batch_size=37)  # uneven chunks on purpose
    ref = reference_truth(model, x)
    assert list(truth) == ["bn1", "bn2", "bn3", "bn4"]
    for name, (mu, var) in ref.items():
        np.testing.assert_allclose(truth[name].mean, mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(truth[name].var(ddof=1), var, rtol=1e-4, atol=1e-6)
    assert int(np.max(truth["bn1"].count)) == 300 * 64 and int(np.max(truth["bn4"].count)) == 300
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    # chunking does not change the result beyond rounding
    again = ground_truth(model, x, batch_size=300)
    for name in truth:
        np.testing.assert_allclose(again[name].mean, truth[name].mean, rtol=1e-9, atol=1e-9)


def test_ground_truth_bad_input():
    with pytest.raises(ValueError, match="no BatchNorm"):
        ground_truth(torch.nn.Linear(2, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="track_running_stats"):
        ground_truth(torch.nn.BatchNorm1d(2, track_running_stats=False), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        ground_truth(torch.nn.BatchNorm1d(2), torch.zeros(1, 2))


# --------------------------------------------------------------------------------------------
# a real short run


@pytest.fixture(scope="module")
def short_run():
    torch.set_num_threads(2)
    try:
        result = compare(epochs=3, batch_size=128, seeds=2, width=4, drop_first=1, drop_last=1)
        assert torch.get_num_threads() == 2  # the run used 1 thread and restored the setting
    finally:
        torch.set_num_threads(1)
    return result


def direct_errors(est, truth, eps=1e-5):
    """mean err and log var of one layer, straight from the definitions, in numpy."""
    mh, vh = np.asarray(est["mean"]), np.asarray(est["var"])
    m, v = np.asarray(truth["mean"]), np.asarray(truth["var"])
    me = np.abs(mh - m) / np.sqrt(v + eps)
    lv = np.log(vh + eps) - np.log(v + eps)
    return {"mean_err": me.mean(), "logvar": lv.mean(), "logvar_abs": np.abs(lv).mean()}


def step_noise(run, est, layers):
    """Mean over layers of the spread (ddof 1) of the mean error over the recorded steps."""
    steps = run["steps_per_layer"]
    return np.mean([np.std([st[est][n]["mean_err"] for st in steps], ddof=1) for n in layers])


def evaluate(model, stats, x, y):
    """Accuracy of a copy of ``model`` with ``stats`` ({layer: (mean, var)}) in its buffers."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, bn in bn_layers(m):
            if stats is not None:
                bn.running_mean.copy_(torch.tensor(stats[name][0], dtype=torch.float32))
                bn.running_var.copy_(torch.tensor(stats[name][1], dtype=torch.float32))
        pred = m(x).argmax(dim=1)
    return int((pred == y).sum()) / len(y)


@pytest.mark.slow
def test_compare_short_run_scores_equal_direct_computations(short_run):
    r = short_run
    assert r.config["threads"] == 1
    assert r.layers == ["bn1", "bn2", "bn3", "bn4"]
    assert r.estimators == ["population", "ema", "ema_keras", "cumulative", "windowed"]
    assert len(r.runs) == 2 and [run["seed"] for run in r.runs] == [0, 1]
    for run in r.runs:
        # the tracked torch-convention EMA is PyTorch's own running statistics
        assert run["pytorch_ema_max_abs_diff"] < 1e-4
        assert len(run["epochs"]) == 3 and len(run["steps"]) == 1347 // 128
        for est in r.estimators:
            for name in r.layers:
                want = direct_errors(run["estimates"][name][est], run["truth"][name])
                got = run["final"][est][name]
                for key, value in want.items():
                    assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15)
            over = run["final_overall"][est]
            assert over["mean_err"] == pytest.approx(
                np.mean([run["final"][est][n]["mean_err"] for n in r.layers]), rel=1e-14
            )
    for est in r.estimators:
        s = r.summary[est]
        finals = [run["final_overall"][est]["mean_err"] for run in r.runs]
        assert s["mean_err"] == pytest.approx(np.mean(finals), rel=1e-14)
        assert s["mean_err_seed_sd"] == pytest.approx(np.std(finals, ddof=1), rel=1e-12)
        noise = [step_noise(run, est, r.layers) for run in r.runs]
        assert s["mean_err_step_noise"] == pytest.approx(np.mean(noise), rel=1e-12, abs=1e-15)
        accs = [run["accuracy"][est] for run in r.runs]
        assert s["accuracy"] == pytest.approx(np.mean(accs), rel=1e-14)
        assert s["accuracy_seed_sd"] == pytest.approx(np.std(accs, ddof=1), rel=1e-12, abs=1e-15)
    # the EMA forgets early epochs, the pooled average over all of training does not: its mean
    # error against the final weights' truth is larger (weights move during training)
    assert r.summary["population"]["mean_err"] > r.summary["ema"]["mean_err"]


@pytest.mark.slow
def test_compare_short_run_accuracy_and_truth_equal_an_independent_rerun(short_run):
    # training is deterministic: the same seed and settings rebuild seed 0's final model
    x, y, xt, yt = load_digits_nchw()
    model = make_cnn(seed=0, width=4)
    for _, bn in bn_layers(model):
        bn.momentum = 0.1
    train(model, x, y, epochs=3, batch_size=128, seed=0)
    run = short_run.runs[0]
    ref = reference_truth(model, x)  # float64 forward, so close but not bit-equal
    for name, (mu, var) in ref.items():
        np.testing.assert_allclose(run["truth"][name]["mean"], mu, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(run["truth"][name]["var"], var, rtol=1e-3, atol=1e-6)
        per_image = {"bn1": 64, "bn2": 64, "bn3": 16, "bn4": 1}[name]  # 8x8, 8x8, 4x4, flat
        assert run["truth"][name]["count"] == len(x) * per_image
    truth = {n: (t["mean"], t["var"]) for n, t in run["truth"].items()}
    assert run["accuracy"]["truth"] == evaluate(model, truth, xt, yt)
    assert run["accuracy"]["pytorch_buffers"] == evaluate(model, None, xt, yt)
    for est in short_run.estimators:
        stats = {n: (e[est]["mean"], e[est]["var"]) for n, e in run["estimates"].items()}
        assert run["accuracy"][est] == evaluate(model, stats, xt, yt), est
    # after 3 short epochs the truth statistics already give a working classifier
    assert run["accuracy"]["truth"] > 0.6


@pytest.mark.slow
def test_compare_windowed_uses_the_middle_epoch(short_run):
    # 3 epochs, drop 1 first and 1 last: the window is epoch 1, constant during the last epoch
    run = short_run.runs[0]
    steps = run["steps_per_layer"]
    first = steps[0]["windowed"]["bn1"]["mean_err"]
    assert all(s["windowed"]["bn1"]["mean_err"] == first for s in steps)
    assert short_run.summary["windowed"]["mean_err_step_noise"] < 1e-12
    # at the end of epoch 0 the window (epochs >= 1 only) was empty: reported as NaN
    assert math.isnan(run["epochs"][0]["windowed"]["mean_err"])


@pytest.mark.slow
def test_compare_table_json_png(short_run, tmp_path):
    table = short_run.table()
    for name in short_run.estimators + ["truth", "pytorch buffers", "bn4"]:
        assert name in table
    paths = short_run.save(tmp_path / "out")
    d = json.loads(paths["json"].read_text())
    assert d["config"]["epochs"] == 3 and d["config"]["seeds"] == [0, 1]
    assert d["summary"]["ema"]["accuracy"] == pytest.approx(short_run.summary["ema"]["accuracy"])
    assert d["runs"][0]["epochs"][0]["windowed"]["mean_err"] is None  # NaN -> null, strict JSON
    assert len(d["runs"][1]["truth"]["bn2"]["mean"]) == 8
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(ValueError, match="folder"):
        short_run.save(paths["json"])


def test_compare_bad_input():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        compare(epochs=1, momentum=0.0)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        compare(epochs=1, drop_first=0.5)
    with pytest.raises(ValueError, match=">= 0 epochs"):
        compare(epochs=1, drop_last=-1)
    with pytest.raises(ValueError, match="leaves nothing"):
        compare(epochs=2, drop_first=1, drop_last=1)
    with pytest.raises(ValueError, match="batch_size"):
        compare(epochs=1, batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        compare(epochs=1, batch_size=5000)
    with pytest.raises(ValueError, match="seeds"):
        compare(epochs=1, seeds=0)
    with pytest.raises(ValueError, match="seeds"):
        compare(epochs=1, seeds=[1, 1])
    with pytest.raises(ValueError, match="unknown estimators"):
        compare(epochs=1, estimators=["median"])
    with pytest.raises(ValueError, match="epochs"):
        compare(epochs=0)
    with pytest.raises(ValueError, match="threads"):
        compare(epochs=1, threads=0)
    with pytest.raises(ValueError, match="schedule"):
        compare(epochs=1, schedule="linear")


# --------------------------------------------------------------------------------------------
# the command line


@pytest.mark.slow
def test_cli_compare_writes_its_files(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli.main(
        [
            "compare",
            "--epochs",
            "2",
            "--seeds",
            "1",
            "--batch-size",
            "256",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ema_keras" in printed and "compare.json" in printed
    d = json.loads((out / "compare.json").read_text())
    assert d["config"]["epochs"] == 2 and d["config"]["batch_size"] == 256
    assert (out / "compare.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--momentum", "0"], "(0, 1]"),
        (["--momentum", "1.5"], "(0, 1]"),
        (["--drop-first", "0.5"], "[0, 0.5)"),
        (["--drop-last", "-2"], ">= 0"),
        (["--batch-size", "1"], ">= 2"),
        (["--epochs", "0"], ">= 1"),
        (["--seeds", "0"], "seeds"),
    ],
)
def test_cli_compare_bad_flags_exit_2_with_one_line(args, message, capsys, tmp_path):
    rc = cli.main(["compare", "--out", str(tmp_path / "x"), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_cli_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    rc = cli.main(["compare", "--epochs", "1", "--seeds", "1", "--out", str(f), "--quiet"])
    assert rc == 2 and "folder" in capsys.readouterr().err


def _no_training(monkeypatch):
    import streamnorm.compare

    def fail(**kw):
        raise AssertionError("the run started although --out cannot be written")

    monkeypatch.setattr(streamnorm.compare, "compare", fail)


def test_cli_out_below_a_file_fails_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    f = tmp_path / "afile"
    f.write_text("keep")
    rc = cli.main(["compare", "--out", str(f / "sub"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "is a file" in err and str(f) in err
    assert f.read_text() == "keep"


def test_cli_out_not_writable_fails_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    # as root permissions are not enforced, so deny the check itself for this folder
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode)
    )
    rc = cli.main(["compare", "--out", str(locked / "sub"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no permission" in err
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_cli_out_read_only_folder(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc = cli.main(["compare", "--out", str(ro / "sub"), "--quiet"])
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "no permission" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_compare_subprocess(tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run(
        [sys.executable, "-m", "streamnorm.cli", "compare", "--epochs", "2", "--seeds", "1"]
        + ["--batch-size", "256", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "population" in proc.stdout
    assert (out / "compare.json").is_file() and (out / "compare.png").is_file()
    assert "streamnorm compare" in proc.stderr  # the progress bar


# --------------------------------------------------------------------------------------------
# the digits run itself


def test_digits_split_is_fixed_stratified_and_scaled():
    x, y, xt, yt = load_digits_nchw()
    assert x.shape == (1347, 1, 8, 8) and xt.shape == (450, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # stratified: every class keeps its share within one image
    full = np.bincount(np.r_[y.numpy(), yt.numpy()], minlength=10)
    assert np.all(np.abs(np.bincount(yt.numpy(), minlength=10) - full * 0.25) <= 1)
    x2, _, xt2, _ = load_digits_nchw()
    assert torch.equal(x, x2) and torch.equal(xt, xt2)
    assert not torch.equal(load_digits_nchw(seed=1)[2], xt)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_nchw(test_fraction=1.0)
    with pytest.raises(ValueError, match="seed"):
        load_digits_nchw(seed=-1)


@pytest.mark.slow
def test_training_is_deterministic_and_leaves_global_rng_alone():
    x, y, xt, yt = load_digits_nchw()
    state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    seen = []
    models = []
    for _ in range(2):
        m = make_cnn(seed=4, width=4)
        train(
            m,
            x[:256],
            y[:256],
            epochs=2,
            batch_size=50,
            seed=4,
            schedule="cosine",
            on_batch=lambda e, s, loss: seen.append((e, s, loss)),
            on_epoch=seen.append,
        )
        models.append(m)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # 256 // 50 = 5 full steps per epoch (the last partial batch is dropped), 2 epochs
    first = seen[: len(seen) // 2]
    assert [s[:2] for s in first if isinstance(s, tuple)] == [
        (e, s) for e in range(2) for s in range(5)
    ]
    assert [s for s in first if not isinstance(s, tuple)] == [0, 1]
    assert models[0].bn1.num_batches_tracked.item() == 10
    assert not torch.equal(
        make_cnn(seed=5, width=4).conv1.weight, make_cnn(seed=4, width=4).conv1.weight
    )


def test_accuracy_restores_mode_and_shift_domain():
    x, y, xt, yt = load_digits_nchw()
    m = make_cnn(width=4)
    m.train()
    acc = accuracy(m, xt, yt, batch_size=64)
    assert m.training and acc == evaluate(m, None, xt, yt)
    assert accuracy(m, xt, yt, batch_size=7) == acc  # eval mode: batching does not matter
    m.eval()
    accuracy(m, xt, yt)
    assert not m.training
    before = xt.clone()
    s = shift_domain(xt, contrast=0.5, brightness=0.3, noise=0.0)
    assert torch.equal(xt, before) and s.dtype == xt.dtype
    torch.testing.assert_close(s, 0.5 * xt + 0.3)
    noisy = shift_domain(xt.numpy(), seed=1)
    assert isinstance(noisy, np.ndarray) and noisy.dtype == np.float32
    assert np.array_equal(noisy, shift_domain(xt.numpy(), seed=1))
    assert abs(float(np.std(noisy - (0.5 * xt.numpy() + 0.3))) - 0.1) < 0.01
    with pytest.raises(ValueError, match="contrast"):
        shift_domain(xt, contrast=-1.0)
    with pytest.raises(TypeError, match="floating"):
        shift_domain(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="batch_size"):
        train(m, x, y, epochs=1, batch_size=1)
    with pytest.raises(ValueError, match="schedule"):
        train(m, x, y, epochs=1, batch_size=8, schedule="step")
    with pytest.raises(ValueError, match="shape"):
        train(m, x, y[:-1], epochs=1, batch_size=8)


@pytest.mark.slow
def test_compare_with_estimator_objects_and_an_empty_window():
    import streamnorm as sn

    r = compare(
        epochs=2,
        batch_size=256,
        seeds=1,
        width=4,
        estimators={"never": sn.WindowedAverage(5, 0), "ema_fast": sn.EMA(0.5)},
    )
    assert r.estimators == ["never", "ema_fast"]
    assert math.isnan(r.summary["never"]["accuracy"]) and math.isnan(r.summary["never"]["mean_err"])
    x, y, xt, yt = load_digits_nchw()
    model = make_cnn(seed=0, width=4)
    train(model, x, y, epochs=2, batch_size=256, seed=0)
    est = r.runs[0]["estimates"]
    stats = {n: (e["ema_fast"]["mean"], e["ema_fast"]["var"]) for n, e in est.items()}
    assert r.summary["ema_fast"]["accuracy"] == evaluate(model, stats, xt, yt)
    assert "nan" in r.table()
    assert json.loads(json.dumps(r.to_dict(), allow_nan=True))["estimators"] == r.estimators


def test_cli_compare_parses_drops_and_seeds(capsys):
    p = cli.build_parser("compare")
    a = p.parse_args(["compare", "--drop-first", "2", "--drop-last", "0.1", "--seeds", "4,7"])
    assert a.drop_first == 2 and isinstance(a.drop_first, int)
    assert a.drop_last == 0.1 and a.seeds == [4, 7]
    a = p.parse_args(["compare"])
    defaults = (a.epochs, a.batch_size, a.momentum, a.seeds, a.out)
    assert defaults == (12, 32, 0.1, 3, "./streamnorm-compare")
    with pytest.raises(SystemExit):
        p.parse_args(["compare", "--seeds", "a,b"])
    assert "comma-separated" in capsys.readouterr().err
