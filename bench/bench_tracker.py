"""Tracking overhead: all default estimators on top of the moments kernel pass.

50 layers of 512 channels, batches of (256, 512) float32 per layer, long-lived trackers with
the default estimators (as in a training run), a new epoch every 25 steps and
``tracker.estimates()`` at the end of every round of 100 steps (so every pending estimator update,
and reading all the estimates, is paid inside the round). Per layer and step, interleaved:

1. the kernel pass alone, ``streamnorm.moments(x, 0)``;
2. ``tracker.update(layer, x)`` on a copy of the same data: the same kernel pass plus feeding
   the five estimators;
3. the memory floor of keeping per-batch statistics per layer at all: the batch's mean and M2
   (two rows of ``channels`` float64, what the tracker files per batch) copied into a buffer of
   that layer's own, in one compiled call, right after the kernel pass of (1). With 50 layers
   rotating, each layer's buffer has left the caches by the time the layer comes round again;
   whatever the estimators do, a batch's statistics have to be written somewhere per layer.

Both are timed by the wall clock and by this thread's CPU time (the calling thread runs one of
the kernel's two chunks and waits for the other; the estimators always run in it). Wall-clock
ratios suffer from whatever else runs on the machine, CPU times somewhat less, so the overhead
is reported both ways.
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
from numba import njit

import streamnorm


@njit(cache=False)
def _file(buf, i, mean, m2):
    for d in range(mean.shape[0]):
        buf[0, i, d] = mean[d]
        buf[1, i, d] = m2[d]


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
    # a copy for the kernel-only pass, so that neither pass reads data the other one has just
    # brought into the cache
    xk = [x.copy() for x in xs]
    names = [f"layer{i}" for i in range(args.layers)]
    wall, cpu = time.perf_counter, time.thread_time

    warm = streamnorm.Tracker()  # compile and load every kernel
    warm.update("warm-up", xs[0])
    warm.estimates()
    tr = streamnorm.Tracker()
    t0 = wall()
    for name, x in zip(names, xs, strict=True):
        tr.update(name, x)
    first = (wall() - t0) / args.layers
    t0 = wall()
    tr.estimates()
    est_cost = wall() - t0

    cap = 32  # batches a layer's buffer holds (the tracker's group size for 512 channels)
    bufs = [np.zeros((2, cap, args.channels)) for _ in names]
    probe = streamnorm.moments(xs[0], 0)
    _file(bufs[0], 0, probe.mean, probe.m2)  # compile
    step = 0
    rows: list[tuple[float, float, float, float]] = []
    floor: list[float] = []
    for _ in range(args.rounds + 1):
        k_wall = k_cpu = t_wall = t_cpu = f_wall = 0.0
        for _ in range(args.steps):
            step += 1
            if step % 25 == 0:
                tr.next_epoch()
            for j, (name, x, x2) in enumerate(zip(names, xs, xk, strict=True)):
                a, c = wall(), cpu()
                m = streamnorm.moments(x2, 0)
                b, d = wall(), cpu()
                k_wall += b - a
                k_cpu += d - c
                mean, m2 = m.mean, m.m2  # fresh arrays, as the kernel's own results are
                g = wall()
                _file(bufs[j], step % cap, mean, m2)
                f_wall += wall() - g
                b, d = wall(), cpu()
                tr.update(name, x)
                e, f = wall(), cpu()
                t_wall += e - b
                t_cpu += f - d
        a, c = wall(), cpu()
        tr.estimates()
        t_wall += wall() - a
        t_cpu += cpu() - c
        rows.append((k_wall, k_cpu, t_wall, t_cpu))
        floor.append(f_wall / k_wall)
    rows = rows[1:]  # the first round warms the caches
    floor = floor[1:]
    n = args.steps * args.layers

    def med(i: int) -> float:
        return statistics.median(r[i] for r in rows) / n * 1e6

    wall_ratio = statistics.median(r[2] / r[0] for r in rows)
    cpu_ratio = statistics.median(r[3] / r[1] for r in rows)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(
        f"{args.layers} layers x ({args.batch}, {args.channels}) float32, {args.steps} steps x "
        f"{args.rounds} rounds, NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'default')}"
    )
    print("| per layer and batch | wall clock | CPU time |")
    print("|---|---|---|")
    print(f"| kernel pass only (`streamnorm.moments`) | {med(0):.1f} us | {med(1):.1f} us |")
    print(f"| `Tracker.update`, 5 default estimators | {med(2):.1f} us | {med(3):.1f} us |")
    print(
        f"tracking overhead, wall clock (median per-round ratio - 1): "
        f"{100 * (wall_ratio - 1):.1f} %"
    )
    print(
        f"tracking overhead, CPU time (median per-round ratio - 1): {100 * (cpu_ratio - 1):.1f} %"
    )
    print(
        f"memory floor, filing a batch's mean and M2 into the layer's own buffer: "
        f"{100 * statistics.median(floor):.1f} % of the kernel pass (per round: "
        + ", ".join(f"{100 * v:.1f}" for v in floor)
        + " %)"
    )
    print(
        "per-round overheads, wall / CPU: "
        + ", ".join(f"{100 * (r[2] / r[0] - 1):.1f} / {100 * (r[3] / r[1] - 1):.1f}" for r in rows)
        + " %"
    )
    print(
        f"one-off: first batch of a layer {first * 1e6:.0f} us; "
        f"estimates() of {args.layers} layers {est_cost * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
