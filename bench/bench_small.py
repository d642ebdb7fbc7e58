"""Small batches: the cost of one ``Moments.update`` on a stream of (256, 512) float32 batches.

Times, interleaved in one process and reported as the best block of ``--reps`` calls (the
machine is shared; the minimum is what the code costs, the rest is other jobs):

1. ``Moments.update`` on a long-lived state (the fast path: kernel and merge in one call);
2. the same kernel pass alone, parallel (``rows_moments``) and serial (its twin);
3. the kernel, then the merge as a second compiled call (what the fast path saves);
4. ``streamnorm.moments`` (one batch, a new ``Moments``);
5. the fixed cost of a parallel launch: an empty ``prange`` kernel with two iterations;
6. the read limit of this stream: a fastmath parallel Numba sum of each batch;
7. the last step of the fast path alone, in a compiled loop: two chunk slots of ``--dim``
   dimensions merged into a state, as ``merge_slots`` then ``chan_merge_dd`` (before) and as
   ``merge_slots_into`` (the fused, vectorized merge the update runs now).

Run: ``python bench/bench_small.py [--rows 256] [--dim 512] [--blocks 40] [--reps 100]``
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit, prange

import streamnorm
from streamnorm import _kernels as K
from streamnorm._config import SERIAL_BYTES
from streamnorm._reduce import run_rows


@njit(parallel=True, cache=False)
def empty_launch(k: int) -> float:
    s = np.empty(k)  # np.zeros here would be a parallel loop, a launch, of its own
    for i in prange(k):
        s[i] = i
    return float(s[0])


@njit(cache=False)
def merge_two_steps(c_n, c_mean, c_m2, ref, st, reps):  # type: ignore[no-untyped-def]
    n, mean, lo, m2 = st[0].copy(), st[1].copy(), st[2].copy(), st[3].copy()
    for _ in range(reps):
        n[:] = st[0]
        bn, bm, bq, blo = K.merge_slots(c_n, c_mean, c_m2, ref)
        K.chan_merge_dd(n, mean, lo, m2, bn, bm, blo, bq)
    return mean


@njit(cache=False)
def merge_fused(c_n, c_mean, c_m2, ref, st, reps):  # type: ignore[no-untyped-def]
    n, mean, lo, m2 = st[0].copy(), st[1].copy(), st[2].copy(), st[3].copy()
    for _ in range(reps):
        n[:] = st[0]
        K.merge_slots_into(c_n, c_mean, c_m2, ref, False, n, mean, lo, m2)
    return mean


def merge_table(D: int) -> None:
    rng = np.random.default_rng(0)
    c_n = np.full((2, 1), 128.0)
    c_mean, c_m2 = rng.random((2, D)), rng.random((2, D)) + 1
    ref = rng.random(D) * 100
    st = np.stack([np.full(D, 1024.0), rng.random(D) * 100, np.zeros(D), rng.random(D) * 1e3])
    a = merge_two_steps(c_n, c_mean, c_m2, ref, st, 3)
    assert np.array_equal(a, merge_fused(c_n, c_mean, c_m2, ref, st, 3))  # the same bits
    cases = {
        "`merge_slots` then `chan_merge_dd`": merge_two_steps,
        "`merge_slots_into`": merge_fused,
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(5):
        for name, f in cases.items():
            t = time.perf_counter()
            f(c_n, c_mean, c_m2, ref, st, 20000)
            best[name] = min(best[name], (time.perf_counter() - t) / 20000)
    print(f"\n| two chunk slots of {D} dimensions merged into a state | us |")
    print("|---|---|")
    for name, v in best.items():
        print(f"| {name} | {v * 1e6:.2f} |")


@njit(parallel=True, fastmath=True, cache=False)
def parallel_sum(x: np.ndarray) -> float:
    flat = x.reshape(-1)
    t = 0.0
    for i in prange(flat.shape[0]):
        t += flat[i]
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((args.rows, args.dim), dtype=np.float32) for _ in range(8)]
    R, D = xs[0].shape
    # the blocking run_rows uses (BLOCK_BYTES rows a block, one block a chunk at this size)
    br, cb = max(1, 256 * 1024 // (D * 4)), 1
    m = streamnorm.Moments(xs[0])
    acc = [np.zeros(D) for _ in range(4)]

    def unfused(x: np.ndarray) -> None:
        n, mu, q, lo = run_rows(x, None, False)
        K.chan_merge_dd(acc[0], acc[1], acc[2], acc[3], n, mu, lo, q)

    cases: dict[str, Callable[[np.ndarray], Any]] = {
        "`Moments.update` (kernel + merge, one call)": m.update,
        "kernel alone, parallel (`rows_moments`)": lambda x: K.rows_moments(x, br, cb),
        "kernel alone, serial (`rows_moments_serial`)": lambda x: K.rows_moments_serial(x, br, cb),
        "kernel, then merge as a second call": unfused,
        "`streamnorm.moments(x, 0)` (new Moments)": lambda x: streamnorm.moments(x, 0),
        "empty parallel launch (prange over 2)": lambda x: empty_launch(2),
        "read limit: fastmath parallel Numba sum of the batch": parallel_sum,
    }
    for f in cases.values():
        f(xs[0])
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.blocks):
        for name, f in cases.items():
            t = time.perf_counter()
            for i in range(args.reps):
                f(xs[i & 7])
            best[name] = min(best[name], (time.perf_counter() - t) / args.reps)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    nbytes = xs[0].nbytes
    print(
        f"({R}, {D}) float32 = {nbytes // 1024} KB a batch; the update path runs the "
        f"{'parallel' if nbytes >= SERIAL_BYTES else 'serial'} kernel "
        f"(SERIAL_BYTES = {SERIAL_BYTES // 1024} KB), "
        f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'default')}"
    )
    print("| per batch (best block) | us |")
    print("|---|---|")
    for name, v in best.items():
        print(f"| {name} | {v * 1e6:.1f} |")
    merge_table(D)


if __name__ == "__main__":
    main()
