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
