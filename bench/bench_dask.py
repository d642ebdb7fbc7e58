"""Moments of an on-disk dataset larger than the memory budget: streamnorm on Dask vs. the rest.

A memory-mapped ``.npy`` of ``--gb`` GB of float64 rows ``(N, --cols)``, far from zero (mean
``--offset``, unit spread), is written to a temporary folder (deleted at the end). On it:

* ``kernel``: ``streamnorm.moments`` on the memory map in this process (Numba threads);
* ``streamnorm.dask.moments`` on the threaded scheduler and on a ``LocalCluster`` of 1 and 2
  worker processes (``threads_per_worker=1``, ``memory_limit=--budget`` each, so the file does
  not fit in the cluster's memory);
* Dask's own ``da.var(axis=0)`` (with ``da.mean``, the same information) on the same schedulers.

Workers open the file by path (each task reads its chunk from the memory map), so nothing but
chunk states travels. Throughput is the file size over the wall time of a pass (best of
``--repeat``); accuracy is the largest relative error of the variance against a long-double
two-pass reference.

Run: ``python bench/bench_dask.py [--gb 3] [--cols 32] [--chunk-mb 64] [--budget 1GiB]
[--out bench/results/dask.md]``
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import streamnorm


class NpyRows:
    """A picklable, lazily opened view of a ``.npy`` file: ``da.from_array`` reads it by chunk."""

    def __init__(self, path: str) -> None:
        self.path = path
        mm = np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = mm.shape, mm.dtype, mm.ndim

    def __getitem__(self, idx: Any) -> np.ndarray:
        return np.asarray(np.load(self.path, mmap_mode="r")[idx])


def write_data(path: str, rows: int, cols: int, offset: float, seed: int) -> None:
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(rows, cols))
    rng = np.random.default_rng(seed)
    step = 1 << 20
    for i in range(0, rows, step):
        j = min(rows, i + step)
        mm[i:j] = rng.normal(offset, 1.0, size=(j - i, cols))
    mm.flush()
    del mm


def reference_var(path: str, offset: float) -> np.ndarray:
    """Long-double two-pass variance, block by block (``x - offset`` is exact near ``offset``)."""
    mm = np.load(path, mmap_mode="r")
    n, step = mm.shape[0], 1 << 18
    s = np.zeros(mm.shape[1], dtype=np.longdouble)
    for i in range(0, n, step):
        s += (np.asarray(mm[i : i + step]) - offset).astype(np.longdouble).sum(axis=0)
    mu = s / n  # the mean minus offset
    q = np.zeros(mm.shape[1], dtype=np.longdouble)
    for i in range(0, n, step):
        d = (np.asarray(mm[i : i + step]) - offset).astype(np.longdouble) - mu
        q += (d * d).sum(axis=0)
    return (q / n).astype(np.float64)


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=3.0, help="file size in GB (1e9 bytes)")
    ap.add_argument("--cols", type=int, default=32)
    ap.add_argument("--offset", type=float, default=1e6, help="data mean (spread 1)")
    ap.add_argument("--chunk-mb", type=float, default=64.0, help="rows per Dask chunk, in MB")
    ap.add_argument("--budget", default="1GiB", help="memory_limit of each worker")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--tmp", default=None, help="folder for the temporary file")
    args = ap.parse_args()

    import dask
    import dask.array as da
    import distributed

    import streamnorm.dask as sd

    logging.getLogger("distributed").setLevel(logging.ERROR)
    rows = int(args.gb * 1e9 // (8 * args.cols))
    chunk_rows = max(1, int(args.chunk_mb * 1e6 // (8 * args.cols)))
    tmp = tempfile.mkdtemp(prefix="streamnorm-bench-", dir=args.tmp)
    path = os.path.join(tmp, "x.npy")
    lines: list[str] = []
    try:
        t0 = time.perf_counter()
        write_data(path, rows, args.cols, args.offset, args.seed)
        nbytes = os.path.getsize(path)
        print(f"wrote {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        ref = reference_var(path, args.offset)
        print("reference done", file=sys.stderr)
        mm = np.load(path, mmap_mode="r")
        x = da.from_array(NpyRows(path), chunks=(chunk_rows, args.cols))

        results: list[tuple[str, str, float, float]] = []

        def record(impl: str, sched: str, seconds: float, var: np.ndarray) -> None:
            err = float(np.max(np.abs(np.asarray(var) - ref) / ref))
            results.append((impl, sched, seconds, err))
            print(f"{impl:28s} {sched:12s} {nbytes / seconds / 1e9:6.2f} GB/s  err {err:.1e}",
                  file=sys.stderr)  # fmt: skip

        def ours() -> np.ndarray:
            return np.asarray(sd.moments(x).var())

        def theirs() -> np.ndarray:
            mean, var = dask.compute(x.mean(axis=0), x.var(axis=0))
            return np.asarray(var)

        streamnorm.moments(mm[:1000])  # compile outside the timing
        t, m = best(lambda: streamnorm.moments(mm), args.repeat)
        record("streamnorm.moments (kernel)", "1 process", t, m.var())
        with dask.config.set(scheduler="threads"):
            t, v = best(ours, args.repeat)
            record("streamnorm.dask.moments", "threads", t, v)
            t, v = best(theirs, args.repeat)
            record("da.mean + da.var", "threads", t, v)
        for workers in (1, 2):
            with (
                distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True,
                    memory_limit=args.budget, dashboard_address=None,
                    silence_logs=logging.ERROR,
                ) as cluster,
                distributed.Client(cluster),
            ):  # fmt: skip
                sd.moments(x[: 2 * chunk_rows])  # workers compile and warm up
                t, v = best(ours, args.repeat)
                record("streamnorm.dask.moments", f"{workers} worker(s)", t, v)
                t, v = best(theirs, args.repeat)
                record("da.mean + da.var", f"{workers} worker(s)", t, v)

        kernel_t = results[0][2]
        lines.append(
            f"File: {nbytes / 1e9:.2f} GB float64, shape ({rows}, {args.cols}), mean "
            f"{args.offset:g}, spread 1; Dask chunks of {chunk_rows} rows "
            f"({chunk_rows * args.cols * 8 / 1e6:.0f} MB); worker memory_limit {args.budget}."
        )
        lines.append("")
        lines.append(
            "| implementation | scheduler | time (s) | GB/s | time / kernel "
            "| max rel. error of var |"
        )
        lines.append("|---|---|---:|---:|---:|---:|")
        for impl, sched, t, err in results:
            lines.append(
                f"| {impl} | {sched} | {t:.2f} | {nbytes / t / 1e9:.2f} | {t / kernel_t:.2f} | "
                f"{err:.1e} |"
            )
        lines.append("")
        lines.append(
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{_mem_gb():.0f} GB RAM, Python {platform.python_version()}, numpy {np.__version__}, "
            f"dask {dask.__version__}, distributed {distributed.__version__}. "
            f"Best of {args.repeat}. The file sits in the page cache (RAM is larger than the "
            "file), so this measures compute and scheduling, not the disk."
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def _mem_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return float("nan")


if __name__ == "__main__":
    main()
