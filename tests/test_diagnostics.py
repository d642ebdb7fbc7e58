"""Standard errors of recalibrated statistics (from the spread between batches), checked against
a slow reference and a Monte-Carlo simulation; ``num_samples="auto"``; the ``--plot`` figure."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from streamnorm.calibrate import (
    AUTO_MIN_BATCHES,
    LayerStats,
    NormLayer,
    StatsSpec,
    check_budget,
)
from streamnorm.calibrate._spread import MAX_CLUSTERS

LAYER = NormLayer("bn", 3, 1e-5)


def _clustered(rng: np.random.Generator, n: int, c: int = 3, hw: int = 4) -> np.ndarray:
    """Images whose pixels share a per-image offset per channel (correlated values): a naive
    ``sigma / sqrt(values)`` is far too small for these."""
    offset = rng.normal(0.0, 1.0, (n, c, 1, 1)) * np.array([1.5, 1.0, 2.0])[None, :, None, None]
    noise = rng.gamma(2.0, 1.0, (n, c, hw, hw))  # skewed, so the variance's error is not normal
    return 3.0 + offset + noise


def _batches(rng: np.random.Generator, sizes: list[int]) -> list[np.ndarray]:
    return [_clustered(rng, s) for s in sizes]


def _feed(batches: list[np.ndarray], estimator: str = "population") -> LayerStats:
    st = LayerStats.new(LAYER, StatsSpec(estimator))
    for b in batches:
        st.add(b)
    return st


def _reference(batches: list[np.ndarray], estimator: str) -> tuple[np.ndarray, np.ndarray]:
    """The Notes' formulas, written out with one batch at a time in float64."""
    k = len(batches)
    n = np.array([b.size / b.shape[1] for b in batches])
    m = np.array([b.mean(axis=(0, 2, 3)) for b in batches])
    v = np.array([b.var(axis=(0, 2, 3)) for b in batches])
    if estimator == "population":
        w = n / n.sum()
        mu = sum(w[j] * m[j] for j in range(k))
        d = np.array([v[j] + (m[j] - mu) ** 2 for j in range(k)])
        var = sum(w[j] * d[j] for j in range(k))
        tm, tv = m, d
    else:
        w = np.full(k, 1.0 / k)
        u = np.array([b.var(axis=(0, 2, 3), ddof=1) for b in batches])
        mu, var = m.mean(axis=0), u.mean(axis=0)
        tm, tv = m, u
    c = k / (k - 1)
    se_m = np.sqrt(c * sum(w[j] ** 2 * (tm[j] - mu) ** 2 for j in range(k)))
    se_v = np.sqrt(c * sum(w[j] ** 2 * (tv[j] - var) ** 2 for j in range(k)))
    return se_m / np.sqrt(var), se_v / var


@pytest.mark.parametrize("estimator", ["population", "cumulative"])
def test_errors_equal_the_formulas(estimator: str) -> None:
    rng = np.random.default_rng(0)
    batches = _batches(rng, [16, 9, 16, 5, 16, 12, 16])
    mean_se, var_se = _feed(batches, estimator).errors()
    ref_m, ref_v = _reference(batches, estimator)
    np.testing.assert_allclose(mean_se, ref_m, rtol=1e-10)
    np.testing.assert_allclose(var_se, ref_v, rtol=1e-10)


def test_coarsening_keeps_estimates_and_merges_clusters() -> None:
    """Past MAX_CLUSTERS batches neighbours merge; the pooled estimates stay exact and the errors
    are those of the merged clusters."""
    rng = np.random.default_rng(1)
    batches = _batches(rng, [4] * (MAX_CLUSTERS + 3))
    st = _feed(batches)
    assert st.spread is not None and len(st.spread) < MAX_CLUSTERS
    allx = np.concatenate(batches)
    np.testing.assert_allclose(
        st.spread.mean.T @ st.spread.n / st.spread.n.sum(), allx.mean(axis=(0, 2, 3)), rtol=1e-12
    )
    tr = st.spread.trace("population")  # the final prefix is the whole stream
    assert tr.samples[-1] == len(allx) and tr.mean_dev[-1] == 0.0
    # the clusters are pairs of consecutive batches (and the last batches alone, in order)
    sizes = np.cumsum(st.spread.batches)
    groups = np.split(np.arange(len(batches)), sizes[:-1])
    merged = [np.concatenate([batches[i] for i in g]) for g in groups]
    ref_m, ref_v = _reference(merged, "population")
    mean_se, var_se = st.errors()
    np.testing.assert_allclose(mean_se, ref_m, rtol=1e-9)
    np.testing.assert_allclose(var_se, ref_v, rtol=1e-9)


def test_merge_of_shards_equals_one_stream() -> None:
    rng = np.random.default_rng(2)
    batches = _batches(rng, [8, 8, 8, 6, 8, 8, 3])
    one = _feed(batches)
    two = _feed(batches[:4]).merge(_feed(batches[4:]))
    for a, b in zip(one.errors(), two.errors(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_ema_has_no_errors_and_one_batch_is_nan() -> None:
    rng = np.random.default_rng(3)
    ema = _feed(_batches(rng, [8, 8, 8]), "ema")
    assert ema.spread is None and np.isnan(ema.errors()[0]).all()
    one = _feed(_batches(rng, [8]))
    assert np.isnan(one.errors()[0]).all() and np.isnan(one.errors()[1]).all()


def test_constant_channel_has_zero_error() -> None:
    x = np.ones((8, 3, 2, 2))
    st = _feed([x, x, x])
    np.testing.assert_array_equal(st.errors()[0], 0.0)
    np.testing.assert_array_equal(st.errors()[1], 0.0)


@pytest.mark.parametrize("estimator", ["population", "cumulative"])
def test_monte_carlo(estimator: str) -> None:
    """Repeat the calibration on independent data: the spread of the estimates matches the
    reported standard errors (within 1.3x), while the naive iid error is far off."""
    rng = np.random.default_rng(10)
    reps, k = 300, 24
    sizes = [12] * (k - 1) + [5]  # a short last batch, as a cut stream gives
    means, variances, m_se, v_se, naive = [], [], [], [], []
    for _ in range(reps):
        batches = _batches(rng, sizes)
        st = _feed(batches, estimator)
        mean = np.asarray(st.estimator.mean, dtype=np.float64)  # what is written to the model
        var = np.asarray(st.estimator.var, dtype=np.float64)
        means.append(mean)
        variances.append(var)
        a, b = st.errors()
        m_se.append(a * np.sqrt(var))  # back to absolute units
        v_se.append(b * var)
        naive.append(np.sqrt(var / (sum(sizes) * 16)))
    sd_mean = np.std(means, axis=0, ddof=1)
    sd_var = np.std(variances, axis=0, ddof=1)
    ratio_m = np.mean(m_se, axis=0) / sd_mean
    ratio_v = np.mean(v_se, axis=0) / sd_var
    assert np.all((ratio_m > 1 / 1.3) & (ratio_m < 1.3)), ratio_m
    assert np.all((ratio_v > 1 / 1.3) & (ratio_v < 1.3)), ratio_v
    # the data are correlated inside an image: an iid formula would be several times too small
    assert np.all(np.mean(naive, axis=0) < sd_mean / 2)


# ------------------------------------------------------------------------------------------
# num_samples="auto"


def test_check_budget() -> None:
    assert check_budget(None, None) == (None, None)
    assert check_budget(7, None) == (7, None)
    assert check_budget("auto", None) == (None, 0.01)
    assert check_budget("auto", 0.001) == (None, 0.001)
    with pytest.raises(ValueError, match="auto"):
        check_budget("all", None)
    with pytest.raises(ValueError, match="tol applies"):
        check_budget(100, 0.01)
    with pytest.raises(ValueError, match="> 0"):
        check_budget("auto", 0.0)
    with pytest.raises(TypeError, match="number"):
        check_budget("auto", "0.1")


torch = pytest.importorskip("torch")


def _bn_model(c: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.BatchNorm2d(c))


def _auto_reference(x: np.ndarray, batch: int, tol: float) -> tuple[int, bool]:
    """Samples at which the first prefix of >= AUTO_MIN_BATCHES batches has all errors < tol."""
    st = LayerStats.new(LAYER, StatsSpec())
    for i in range(0, len(x), batch):
        st.add(x[i : i + batch].astype(np.float32).astype(np.float64))
        if st.batches >= AUTO_MIN_BATCHES:
            m, v = st.errors()
            if np.all(m < tol) and np.all(v < tol):
                return st.samples, True
    return st.samples, False


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_auto_stops_when_errors_are_below_tol(mode: str) -> None:
    from streamnorm.torch import recalibrate

    rng = np.random.default_rng(5)
    x = _clustered(rng, 4000).astype(np.float32)
    want, ok = _auto_reference(x, 32, 0.05)
    assert ok and 32 * AUTO_MIN_BATCHES <= want < 4000
    model = _bn_model()
    report = recalibrate(
        model, x, num_samples="auto", tol=0.05, batch_size=32, progress=False, mode=mode
    )
    assert report.samples == want and report.converged is True and report.tol == 0.05
    assert "every standard error below tol=0.05" in str(report)
    assert report.max_mean_se < 0.05 and report.max_var_se < 0.05
    # the buffers are the exact statistics of the samples used
    used = x[:want].astype(np.float64)
    np.testing.assert_allclose(model[0].running_mean.numpy(), used.mean(axis=(0, 2, 3)), 1e-5)
    np.testing.assert_allclose(model[0].running_var.numpy(), used.var(axis=(0, 2, 3), ddof=1), 1e-5)


def test_auto_data_end_first() -> None:
    from streamnorm.torch import recalibrate

    rng = np.random.default_rng(6)
    x = _clustered(rng, 200).astype(np.float32)
    report = recalibrate(_bn_model(), x, num_samples="auto", tol=1e-4, progress=False)
    assert report.samples == 200 and report.converged is False
    assert "the data ended after 200 samples" in str(report)


def test_auto_bad_combinations() -> None:
    from streamnorm.torch import recalibrate

    x = np.zeros((8, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="EMA"):
        recalibrate(_bn_model(), x, num_samples="auto", estimator="ema", progress=False)
    with pytest.raises(ValueError, match="tol applies"):
        recalibrate(_bn_model(), x, num_samples=4, tol=0.1, progress=False)


def test_report_errors_match_the_core() -> None:
    """The torch report's arrays are the core's errors of the layer's input."""
    from streamnorm.torch import recalibrate

    rng = np.random.default_rng(7)
    x = _clustered(rng, 100).astype(np.float32)
    report = recalibrate(_bn_model(), x, batch_size=16, progress=False)
    batches = [x[i : i + 16].astype(np.float64) for i in range(0, 100, 16)]
    ref_m, ref_v = _reference(batches, "population")
    np.testing.assert_allclose(report["0"].mean_se, ref_m, rtol=1e-5)
    np.testing.assert_allclose(report["0"].var_se, ref_v, rtol=1e-5)
    assert "max mean_se" in report.table()
    tr = report["0"].trace()
    assert tr is not None
    np.testing.assert_array_equal(tr.samples, [16, 32, 48, 64, 80, 96, 100])
    assert tr.mean_dev[-1] == 0.0 and tr.var_dev[-1] == 0.0
    np.testing.assert_allclose(tr.mean_se[-1], np.max(ref_m), rtol=1e-5)


def test_cli_auto_and_plot(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("matplotlib")
    from _calib_fixtures import onnx_cnn

    from streamnorm.cli import main

    src, data, out, png = (tmp_path / n for n in ("m.onnx", "x.npy", "o.onnx", "p.png"))
    onnx.save(onnx_cnn(15), str(src))
    np.save(data, np.random.default_rng(0).normal(0.5, 2.0, (600, 2, 6, 6)).astype(np.float32))
    args = ["calibrate", str(src), "--data", str(data), "--out", str(out), "--no-progress"]
    rc = main([*args, "--num-samples", "auto", "--tol", "0.05", "--batch-size", "16"])
    text = capsys.readouterr().out
    assert rc == 0 and "every standard error below tol=0.05 after" in text
    assert "max mean_se" in text and "max var_se" in text
    assert main([*args, "--plot", str(png), "--batch-size", "32"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*args, "--tol", "0.1"]) == 2
    assert "--tol applies to --num-samples auto only" in capsys.readouterr().err
