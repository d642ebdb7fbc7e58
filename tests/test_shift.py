"""streamnorm.shift: deterministic corruptions and a small benchmark run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamnorm.shift import CORRUPTIONS, ShiftConfig, corrupt, summarize


def test_corruptions_are_deterministic_and_distinct():
    x = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float32)
    assert len(CORRUPTIONS) >= 8
    for c in CORRUPTIONS:
        y1, y5 = corrupt(x, c, 1), corrupt(x, c, 5)
        assert y1.shape == x.shape and y1.dtype == x.dtype
        np.testing.assert_array_equal(y1, corrupt(x, c, 1))
        assert not np.array_equal(y1, x) and not np.array_equal(y1, y5)
        # severity 5 moves the images further than severity 1
        assert np.abs(y5 - x).mean() > np.abs(y1 - x).mean()
    want = (x.astype(np.float64) + 0.2).astype(np.float32)
    np.testing.assert_array_equal(corrupt(x, "brightness", 2), want)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 6)


def test_summarize_gap_recovered():
    cells = [
        {"corruption": c, "severity": 5, "source": s, "oracle": o, "estimators": {"e": {"8": e}}}
        for c, s, o, e in (("a", 0.5, 0.1, 0.2), ("b", 0.3, 0.1, 0.2))
    ]
    s = summarize(cells, 5)
    assert s["source"] == pytest.approx(0.4) and s["oracle"] == pytest.approx(0.1)
    # mean errors: source 0.4, oracle 0.1, estimator 0.2 -> (0.4 - 0.2) / (0.4 - 0.1)
    assert s["estimators"]["e"]["8"]["gap_recovered"] == pytest.approx(2 / 3)


def test_config_checks():
    with pytest.raises(ValueError, match="unknown estimator"):
        ShiftConfig(estimators=("tent",)).checked()
    with pytest.raises(ValueError, match="severity"):
        ShiftConfig(severities=(0,)).checked()


@pytest.mark.slow
def test_small_run_through_the_cli(tmp_path, capsys):
    from streamnorm import cli

    code = cli.main(
        [
            "shift",
            "--out",
            str(tmp_path),
            "--epochs",
            "2",
            "--corruptions",
            "contrast",
            "--severities",
            "5",
            "--batch-sizes",
            "1,16",
            "--online-samples",
            "8",
            "--warmup",
            "20",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "severity 5" in out and "prior_population" in out
    result = json.loads((tmp_path / "shift.json").read_text())
    cell = result["cells"][0]
    assert cell["estimators"]["batch"]["1"] is None  # prediction-time BN cannot run at 1
    assert 0 <= cell["oracle"] <= 1 and 0 <= cell["estimators"]["batch"]["16"] <= 1
    assert (tmp_path / "shift.png").stat().st_size > 1000
    assert cli.main(["shift", "--severities", "7", "--out", str(tmp_path)]) == 2


@pytest.fixture
def one_thread():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run() does
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_shared_forward_passes_equal_one_adaptation_per_cell(one_thread, monkeypatch):
    """run() streams every cell in the same forward passes; the errors are those of one
    streamnorm.torch.adapt run per (cell, estimator, batch size), written out here."""
    torch = pytest.importorskip("torch")
    # at most 16 images a pass: 1 cell a pass at batch size 16, 2 at 8, all 4 at 1
    monkeypatch.setattr("streamnorm.shift._runner._MAX_IMAGES", 16)
    import copy

    from streamnorm import digits
    from streamnorm.shift import run
    from streamnorm.torch import adapt

    cfg = ShiftConfig(
        epochs=1,
        corruptions=("gaussian_noise", "pixelate"),
        severities=(4, 5),
        batch_sizes=(1, 8, 16),
        online_samples=8,
        max_batches=3,
        warmup=12,
        warmup_severity=5,
    )
    got = run(cfg)
    x_tr, y_tr, x_te, y_te = digits.load_digits_nchw(cfg.seed, cfg.test_fraction)
    model = digits.make_cnn(cfg.seed)
    digits.train(model, x_tr, y_tr, epochs=1, batch_size=32, seed=cfg.seed, schedule="cosine")
    model.eval()
    order = np.random.default_rng(cfg.seed).permutation(len(y_te))
    y = y_te[torch.from_numpy(order)]
    cells = iter(got["cells"])
    for c in cfg.corruptions:
        for s in cfg.severities:
            x = torch.from_numpy(corrupt(x_te.numpy()[order], c, s, cfg.seed))
            cell = next(cells)
            assert (cell["corruption"], cell["severity"]) == (c, s)
            with torch.no_grad():
                assert cell["source"] == int((model(x).argmax(1) != y).sum()) / len(y)
                with adapt(model, "batch"):
                    assert cell["oracle"] == int((model(x).argmax(1) != y).sum()) / len(y)
            for name in cfg.estimators:
                for bs in cfg.batch_sizes:
                    n = 8 if bs == 1 else 3 * bs
                    if name == "batch" and bs == 1:
                        assert cell["estimators"][name]["1"] is None
                        continue
                    wrong = 0
                    with adapt(model, name), torch.no_grad():
                        for i in range(0, n, bs):
                            pred = model(x[i : i + bs]).argmax(1)
                            wrong += int((pred != y[i : i + bs]).sum())
                    assert cell["estimators"][name][str(bs)] == wrong / n, (c, s, name, bs)
    # the batch-size-1 check: 12 samples one at a time, then the frozen statistics
    for w, c in zip(got["warmup"], cfg.corruptions, strict=True):
        x = torch.from_numpy(corrupt(x_te.numpy()[order], c, 5, cfg.seed))
        with adapt(model, "prior_population") as ada, torch.no_grad():
            for i in range(12):
                model(x[i : i + 1])
            stats = {k: (e.mean, e.running_var("biased")) for k, e in ada.estimators.items()}
        frozen = copy.deepcopy(model)
        modules = dict(frozen.named_modules())
        with torch.no_grad():
            for k, (mean, var) in stats.items():
                modules[k].running_mean.copy_(torch.as_tensor(mean))
                modules[k].running_var.copy_(torch.as_tensor(var))
            want = int((frozen(x).argmax(1) != y).sum()) / len(y)
        assert w["corruption"] == c and w["prior_population"] == want
