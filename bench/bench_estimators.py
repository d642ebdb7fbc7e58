"""Estimator-quality sweep on the digits CNN: which test-time estimator is best where.

Trains the small BatchNorm CNN of ``streamnorm compare`` for every batch size (2 ... 256) and a
few seeds, feeding one Tracker with many estimators at once (EMA momenta 0.01 ... 0.5, Keras EMA,
cumulative average, population, several windows, pooled and mean-of-batch), and scores each
against the population of the final weights (``streamnorm.compare.ground_truth``). Writes
``bench/results/estimators_quality.md``; text after the ``<!-- notes -->`` marker of an existing
file is kept.

    python bench/bench_estimators.py                      # the full sweep (a few minutes)
    python bench/bench_estimators.py --batch-sizes 32 --seeds 1 --epochs 4 --out /tmp/q.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import streamnorm as sn
from streamnorm.compare import compare

NOTES = "<!-- notes -->"
LECTURE = "win_25_25"


def estimator_set(epochs: int) -> dict[str, Any]:
    """Every estimator of the sweep, fed from the same kernel pass."""
    ests: dict[str, Any] = {"population": sn.Population(), "cumulative": sn.CumulativeAverage()}
    ests["cumulative_pooled"] = sn.CumulativeAverage(var_mode="pooled")
    for p in (0.01, 0.03, 0.1, 0.3, 0.5):
        ests[f"ema_{p:g}"] = sn.EMA(p)
    ests["ema_0.01_bc"] = sn.EMA(0.01, bias_correction=True)
    ests["ema_keras"] = sn.EMA(0.99, style="keras", unbiased=False)
    ests[LECTURE] = sn.WindowedAverage(0.25, 0.25)
    ests["win_25_25_mob"] = sn.WindowedAverage(0.25, 0.25, var_mode="mean_of_batch")
    ests["win_25_0"] = sn.WindowedAverage(0.25, 0)
    ests["win_last"] = sn.WindowedAverage(epochs - 1, 0)  # only the last epoch
    return ests


def lr_for(batch_size: int) -> float:
    """SGD learning rate, scaled with the square root of the batch size (0.05 at 32)."""
    return 0.05 * math.sqrt(batch_size / 32)


def run_one(schedule: str, bs: int, epochs: int, seeds: int) -> tuple[Any, float]:
    """One training configuration (all seeds); returns its CompareResult and wall time."""
    t = time.perf_counter()
    steps = 1347 // bs
    r = compare(
        epochs=epochs,
        batch_size=bs,
        seeds=seeds,
        estimators=estimator_set(epochs),
        lr=lr_for(bs),
        schedule=schedule,
        last_steps=min(steps, 50),
    )
    return r, time.perf_counter() - t


def run(configs: list[tuple[str, int]], epochs: int, seeds: int, jobs: int) -> dict:
    """Every configuration, the most expensive (smallest batches) first, on ``jobs`` processes."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    order = sorted(configs, key=lambda c: c[1])
    results: dict[tuple[str, int], Any] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, sch, bs, epochs, seeds): (sch, bs) for sch, bs in order}
        for f in as_completed(futures):
            sch, bs = futures[f]
            r, wall = f.result()
            results[(sch, bs)] = r
            best = min(r.estimators, key=lambda e: r.summary[e]["mean_err"])
            print(f"{sch:>8} batch {bs:>4}: {wall:6.1f} s  best mean err {best}", file=sys.stderr)
    return results


def _fmt(v: float, spec: str, best: bool) -> str:
    text = format(v, spec)
    return f"**{text}**" if best else text


def metric_table(
    results: dict, schedule: str, sizes: list[int], key: str, spec: str, better: str
) -> list[str]:
    """Rows: estimators; columns: batch sizes; the best of each column in bold."""
    names = results[(schedule, sizes[0])].estimators
    head = "| estimator | " + " | ".join(f"bs {bs}" for bs in sizes) + " |"
    lines = [head, "|---" * (len(sizes) + 1) + "|"]
    best = {}
    for bs in sizes:
        s = results[(schedule, bs)].summary
        vals = {e: s[e][key] for e in names}
        score = {
            e: (abs(v) if better == "abs" else (-v if better == "max" else v))
            for e, v in vals.items()
        }
        best[bs] = min(score, key=lambda e: score[e])
    for e in names:
        cells = [_fmt(results[(schedule, bs)].summary[e][key], spec, best[bs] == e) for bs in sizes]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    for ref in ("truth", "pytorch_buffers"):
        if key == "accuracy":
            cells = [format(results[(schedule, bs)].summary[ref][key], spec) for bs in sizes]
            lines.append(f"| *{ref}* | " + " | ".join(cells) + " |")
    return lines


def findings(results: dict, schedule: str, sizes: list[int]) -> list[str]:
    out = []
    for bs in sizes:
        r = results[(schedule, bs)]
        s = r.summary
        names = r.estimators
        by_mean = min(names, key=lambda e: s[e]["mean_err"])
        by_var = min(names, key=lambda e: s[e]["logvar_abs"])
        by_acc = max(names, key=lambda e: s[e]["accuracy"])
        lec = s[LECTURE]
        ema = s["ema_0.1"]
        verdict = "wins" if lec["mean_err"] < ema["mean_err"] else "loses"
        out.append(
            f"- bs {bs}: lowest mean error **{by_mean}** ({s[by_mean]['mean_err']:.4f}), lowest "
            f"|log var| **{by_var}** ({s[by_var]['logvar_abs']:.4f}), best accuracy **{by_acc}** "
            f"({s[by_acc]['accuracy']:.4f}; truth {s['truth']['accuracy']:.4f}). Lecture window "
            f"{verdict} against PyTorch's EMA 0.1: mean error {lec['mean_err']:.4f} vs "
            f"{ema['mean_err']:.4f}, log var {lec['logvar']:+.4f} vs {ema['logvar']:+.4f}, "
            f"accuracy {lec['accuracy']:.4f} vs {ema['accuracy']:.4f}."
        )
    return out


def noise_table(results: dict, schedule: str, sizes: list[int]) -> list[str]:
    """Bias vs noise of a few estimators: seed spread and step noise of the mean error."""
    pick = ["population", "cumulative", "ema_0.01", "ema_0.1", "ema_0.5", LECTURE, "win_last"]
    head = "| estimator | " + " | ".join(f"bs {bs}" for bs in sizes) + " |"
    lines = [head, "|---" * (len(sizes) + 1) + "|"]
    for e in pick:
        cells = []
        for bs in sizes:
            s = results[(schedule, bs)].summary[e]
            cells.append(f"{s['mean_err_seed_sd']:.4f} / {s['mean_err_step_noise']:.4f}")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return lines


def write(results: dict, args: argparse.Namespace, wall: float, path: Path) -> None:
    import numba
    import torch

    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES in old:
            notes = old[old.index(NOTES) :]
    if not notes:
        notes = NOTES + "\n"
    sizes = [bs for bs in args.batch_sizes if ("constant", bs) in results]
    cos = [bs for bs in args.cosine_batch_sizes if ("cosine", bs) in results]
    lines = [
        "# Estimator quality on a real training run (digits CNN)",
        "",
        f"Command: `{args.command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__} (1 thread), numba "
        f"{numba.__version__}, numpy {np.__version__}; wall time {wall / 60:.1f} min.",
        "",
        f"Setup: the `streamnorm compare` network (3 conv + BatchNorm2d, 1 BatchNorm1d, width 16) "
        f"on scikit-learn's digits (1347 training, 450 test images), SGD momentum 0.9, "
        f"lr = 0.05 * sqrt(bs / 32), {args.epochs} epochs, seeds 0..{args.seeds - 1}, "
        f"{args.jobs} worker process(es). Noise over steps: the last min(50, one epoch) steps. All "
        "estimators are fed the same batches from one kernel pass per layer and step. Truth: the "
        "population of each BN input over the whole training set with the final weights (earlier "
        "BN layers using their own population statistics). Numbers are averages over the 4 BN "
        "layers, their channels and the seeds: **mean err** = |mu_hat - mu| / sigma, **log var** "
        "= log(var_hat / var) (signed: > 0 overestimates), **acc** = test accuracy with the "
        "estimator's statistics loaded. Best of each column in bold.",
        "",
        "Estimators: `ema_p` = PyTorch EMA with momentum p (`ema_0.1` is PyTorch's default), "
        "`ema_0.01_bc` with bias correction, `ema_keras` = Keras (0.99, biased batch variances), "
        "`cumulative` = PyTorch `momentum=None` / `update_bn` (mean of batch variances), "
        "`cumulative_pooled` its law-of-total-variance twin, `population` = pooled over all of "
        "training, `win_a_b` = windowed average dropping the first a % and last b % of the "
        "epochs (`win_25_25` is the lecture's; `_mob` = mean of batch variances instead of "
        "pooled), `win_last` = the last epoch only.",
        "",
        "## Constant learning rate: batch-size sweep",
        "",
        *schedule_section(results, "constant", sizes),
    ]
    if cos:
        lines += [
            "## Cosine learning-rate schedule (weights settle at the end)",
            "",
            *schedule_section(results, "cosine", cos),
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + notes)


def schedule_section(results: Any, schedule: str, sizes: list[int]) -> list[str]:
    """The tables of one learning-rate schedule: error, bias, accuracy, noise, best where."""
    return [
        "### Mean error |mu_hat - mu| / sigma",
        "",
        *metric_table(results, schedule, sizes, "mean_err", ".4f", "min"),
        "",
        "### Variance bias log(var_hat / var)",
        "",
        *metric_table(results, schedule, sizes, "logvar", "+.4f", "abs"),
        "",
        "### Test accuracy",
        "",
        *metric_table(results, schedule, sizes, "accuracy", ".4f", "max"),
        "",
        "### Noise of the mean error: spread across seeds / spread over the last steps",
        "",
        *noise_table(results, schedule, sizes),
        "",
        "### Best where (computed)",
        "",
        *findings(results, schedule, sizes),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    ap.add_argument("--batch-sizes", type=ints, default=[2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--cosine-batch-sizes", type=ints, default=[8, 32, 128])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (1 torch thread each)")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "estimators_quality.md"
    )
    args = ap.parse_args(argv)
    args.command = " ".join(
        ["python bench/bench_estimators.py", *(sys.argv[1:] if argv is None else argv)]
    )
    configs = [("constant", bs) for bs in args.batch_sizes]
    configs += [("cosine", bs) for bs in args.cosine_batch_sizes]
    compare(epochs=2, batch_size=256, seeds=1, estimators=estimator_set(2))  # compile the kernels
    t = time.perf_counter()
    results = run(configs, args.epochs, args.seeds, args.jobs)
    wall = time.perf_counter() - t
    write(results, args, wall, args.out)
    print(f"wrote {args.out} in {wall / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
