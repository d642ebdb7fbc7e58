"""Tracking overhead: all default estimators on top of the moments kernel pass.

50 layers of 512 channels, batches of (256, 512) float32 per layer, a long-lived ``Tracker``
with the default estimators (as in a training run). Each round times, call by call and
interleaved so that both see the same machine load:

* the kernel pass alone, ``streamnorm.moments(x, 0)``;
* ``tracker.update(layer, x)`` (the same kernel pass plus feeding the five estimators), on a
  copy of the same data;

with a new epoch every 25 steps and ``tracker.estimates()`` at the end of every round of 100
steps (so every pending estimator update, and reading all estimates, is paid inside the round).
The one-off costs (a layer's first batch, which allocates its estimators) are reported
separately.

Run: ``python bench/bench_tracker.py [--layers 50] [--channels 512] [--batch 256] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import streamnorm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100, help="steps per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    xs = [
        rng.standard_normal((args.batch, args.channels), dtype=np.float32)
        for _ in range(args.layers)
    ]
    # a separate copy for the kernel-only pass, so that neither pass reads data the other one
    # has just brought into the cache
    xk = [x.copy() for x in xs]
    names = [f"layer{i}" for i in range(args.layers)]
    clock = time.perf_counter

    warm = streamnorm.Tracker()  # compile and load every kernel
    warm.update("warm-up", xs[0])
    warm.estimates()
    tr = streamnorm.Tracker()
    t0 = clock()
    for name, x in zip(names, xs, strict=True):
        tr.update(name, x)
    first = (clock() - t0) / args.layers
    t0 = clock()
    tr.estimates()
    est_cost = clock() - t0

    step = 0
    ks, ts, ratios = [], [], []
    for _ in range(args.rounds + 1):
        k_tot = t_tot = 0.0
        for _ in range(args.steps):
            step += 1
            if step % 25 == 0:
                tr.next_epoch()
            for name, x, x2 in zip(names, xs, xk, strict=True):
                t0 = clock()
                streamnorm.moments(x2, 0)
                t1 = clock()
                tr.update(name, x)
                t2 = clock()
                k_tot += t1 - t0
                t_tot += t2 - t1
        t0 = clock()
        tr.estimates()
        t_tot += clock() - t0
        ks.append(k_tot)
        ts.append(t_tot)
        ratios.append(t_tot / k_tot)
    ks, ts, ratios = ks[1:], ts[1:], ratios[1:]  # the first round warms the caches
    n = args.steps * args.layers
    k_med, t_med, r_med = statistics.median(ks), statistics.median(ts), statistics.median(ratios)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(
        f"{args.layers} layers x ({args.batch}, {args.channels}) float32, {args.steps} steps x "
        f"{args.rounds} rounds, NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'default')}"
    )
    print("| what | median time per layer and batch | ratio |")
    print("|---|---|---|")
    print(f"| kernel pass only (`streamnorm.moments`) | {k_med / n * 1e6:.1f} us | 1.000 |")
    print(f"| `Tracker.update`, 5 default estimators | {t_med / n * 1e6:.1f} us | {r_med:.3f} |")
    print(f"tracking overhead (median of per-round ratios - 1): {100 * (r_med - 1):.1f} %")
    print(f"per-round overheads: {', '.join(f'{100 * (r - 1):.1f}' for r in ratios)} %")
    print(
        f"one-off: first batch of a layer {first * 1e6:.0f} us; "
        f"estimates() of {args.layers} layers {est_cost * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
