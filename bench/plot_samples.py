"""How many samples does BatchNorm recalibration need? Weight averaging on the digits CNN.

Trains the bundled-digits CNN with ``torch.optim.swa_utils.AveragedModel`` (one average per
epoch over the second half of training, buffers averaged too) and compares the test accuracy of
the averaged weights with

* (a) the averaged BN buffers (what ``AveragedModel(use_buffers=True)`` leaves);
* (b) ``torch.optim.swa_utils.update_bn`` on the training set;
* (c) ``streamnorm.torch.recalibrate`` (population estimator, one pass and sequential) on the
  training set;
* (d) ``num_samples="auto"`` at ``--tol`` 0.01 and 0.001.

The digits training set (1,347 images) is small, so the sample counts of ``auto`` are also
measured on an endless stream: training images drawn with replacement, shifted by up to one
pixel and with Gaussian pixel noise (sd 0.05) added. Against it the "true" statistics are those
of 200,000 stream samples (the same batch size: in one-pass mode the statistics depend on it);
the error of the population estimate after ``n`` samples is plotted with its reported standard
error (the band), next to fvcore's default of 200 batches and
mmpretrain's 8192 samples.

Run: ``python bench/plot_samples.py [--out bench/results/auto_samples.md]
[--plot bench/results/auto_samples.png]``
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from streamnorm import digits as D
from streamnorm.calibrate import SampleCurve, plot_samples
from streamnorm.torch import bn_layers, recalibrate

BATCH = 64


def train_averaged(seed: int, epochs: int) -> tuple[Any, Any, Any, Any, Any]:
    """The averaged digits CNN and the data."""
    xtr, ytr, xte, yte = D.load_digits_nchw(seed)
    model = D.make_cnn(seed)
    swa = AveragedModel(model, use_buffers=True)

    def on_epoch(e: int) -> None:
        if e >= epochs // 2:
            swa.update_parameters(model)

    D.train(model, xtr, ytr, epochs=epochs, batch_size=32, lr=0.05, seed=seed, on_epoch=on_epoch)
    return swa.module, xtr, ytr, xte, yte


class Augmented:
    """An endless stream of training images: drawn with replacement, shifted by up to one pixel,
    with Gaussian pixel noise; ``limit`` samples in batches of ``batch`` (re-iterable, the same
    batches each time)."""

    def __init__(self, x: np.ndarray, limit: int, batch: int = BATCH, seed: int = 0) -> None:
        self.x, self.limit, self.batch, self.seed = x, limit, batch, seed

    def __iter__(self) -> Iterator[Any]:
        rng = np.random.default_rng(self.seed)
        done = 0
        while done < self.limit:
            n = min(self.batch, self.limit - done)
            idx = rng.integers(0, len(self.x), n)
            imgs = self.x[idx]
            dy, dx = rng.integers(-1, 2, 2)
            imgs = np.roll(imgs, (int(dy), int(dx)), axis=(2, 3))
            yield torch.from_numpy((imgs + rng.normal(0.0, 0.05, imgs.shape)).astype(np.float32))
            done += n


def buffers(model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        n: (m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy())
        for n, m in bn_layers(model)
    }


def errors(est: dict[str, Any], ref: dict[str, Any]) -> tuple[float, float]:
    """Largest |mu - mu_ref| / sigma_ref and |var / var_ref - 1| over layers and channels."""
    me = max(float(np.max(np.abs(est[k][0] - r[0]) / np.sqrt(r[1]))) for k, r in ref.items())
    ve = max(float(np.max(np.abs(est[k][1] / r[1] - 1))) for k, r in ref.items())
    return me, ve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default="bench/results/auto_samples.md")
    ap.add_argument("--plot", default="bench/results/auto_samples.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    avg, xtr, ytr, xte, yte = train_averaged(args.seed, args.epochs)
    xtr_np = xtr.numpy()
    acc: dict[str, float] = {"(a) averaged BN buffers": D.accuracy(avg, xte, yte)}
    b = copy.deepcopy(avg)
    loader = [(xtr[i : i + BATCH],) for i in range(0, len(xtr), BATCH)]
    update_bn(loader, b)
    acc["(b) update_bn"] = D.accuracy(b, xte, yte)
    rows_auto = []
    for mode in ("one-pass", "sequential"):
        c = copy.deepcopy(avg)
        recalibrate(c, xtr_np, batch_size=BATCH, mode=mode, progress=False)
        acc[f"(c) streamnorm population, {mode}"] = D.accuracy(c, xte, yte)
    for tol in (0.01, 0.001):
        d = copy.deepcopy(avg)
        rep = recalibrate(d, xtr_np, batch_size=BATCH, num_samples="auto", tol=tol, progress=False)
        acc[f"(d) num_samples='auto', tol={tol:g}"] = D.accuracy(d, xte, yte)
        rows_auto.append(("digits training set", tol, rep))

    # the endless augmented stream: reference statistics from 200,000 samples
    big = 200_000
    ref_model = copy.deepcopy(avg)
    recalibrate(ref_model, Augmented(xtr_np, big, seed=99), progress=False)
    ref = buffers(ref_model)
    for tol in (0.01, 0.001):
        d = copy.deepcopy(avg)
        rep = recalibrate(d, Augmented(xtr_np, big), num_samples="auto", tol=tol, progress=False)
        acc[f"(d) num_samples='auto', tol={tol:g}, stream"] = D.accuracy(d, xte, yte)
        rows_auto.append(("augmented stream", tol, rep, errors(buffers(d), ref)))
    curve_n, curve_m, curve_v = [], [], []
    for n in (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768):
        d = copy.deepcopy(avg)
        recalibrate(d, Augmented(xtr_np, n), progress=False)
        me, ve = errors(buffers(d), ref)
        curve_n.append(n)
        curve_m.append(me)
        curve_v.append(ve)
    trace_model = copy.deepcopy(avg)
    trace_rep = recalibrate(trace_model, Augmented(xtr_np, 32768), progress=False)
    fixed = {
        "fvcore PreciseBN (200 batches of 64)": 200 * BATCH,
        "mmpretrain (8192 samples)": 8192,
    }
    for label, n in fixed.items():
        d = copy.deepcopy(avg)
        recalibrate(d, Augmented(xtr_np, n), progress=False)
        acc[f"{label}, stream"] = D.accuracy(d, xte, yte)
    plot_samples(
        trace_rep,
        args.plot,
        curves=[
            SampleCurve(
                "error vs 200k-sample reference",
                np.array(curve_n),
                np.array(curve_m),
                np.array(curve_v),
            )
        ],
        title="digits CNN (averaged weights), augmented stream: error and 2 standard errors",
    )
    elapsed = time.perf_counter() - t0

    lines = [
        "# How many samples: weight averaging and num_samples='auto' on the digits CNN",
        "",
        f"Command: `python bench/plot_samples.py --seed {args.seed} --epochs {args.epochs}` "
        f"({elapsed:.0f} s; Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.machine()}, 1 torch thread).",
        "",
        f"Digits CNN (`streamnorm.digits.make_cnn`), SGD, batch 32, {args.epochs} epochs; "
        "`AveragedModel(use_buffers=True)` averages the weights (and buffers) of the epochs of "
        f"the second half. Recalibration batches: {BATCH}. Test set: {len(xte)} images.",
        "",
        "## Test accuracy of the averaged weights",
        "",
        "| BN statistics | test accuracy |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in acc.items()]
    lines += [
        "",
        "## Samples chosen by num_samples='auto'",
        "",
        "| data | tol | samples | batches | converged | max mean_se | max var_se | "
        "max error vs reference (mean, var) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows_auto:
        data, tol, rep = row[0], row[1], row[2]
        err = f"{row[3][0]:.4f}, {row[3][1]:.4f}" if len(row) > 3 else "-"
        lines.append(
            f"| {data} | {tol:g} | {rep.samples} | {max(x.batches for x in rep.layers)} | "
            f"{rep.converged} | {rep.max_mean_se:.4f} | {rep.max_var_se:.4f} | {err} |"
        )
    lines += [
        "",
        f"For comparison: fvcore's PreciseBN default is 200 batches ({200 * BATCH} samples at "
        f"batch {BATCH}); mmpretrain's is 8192 samples.",
        "",
        "## Error against the number of samples (augmented stream, population, one pass)",
        "",
        "| samples | max mean error (sigma) | max relative variance error |",
        "|---|---|---|",
    ]
    lines += [
        f"| {n} | {m:.4f} | {v:.4f} |" for n, m, v in zip(curve_n, curve_m, curve_v, strict=True)
    ]
    lines += ["", f"Plot: `{args.plot}`.", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
