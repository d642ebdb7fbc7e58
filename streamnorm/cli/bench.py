"""``streamnorm bench``: the moments kernels against the memory-read limit and other libraries.

Every number is measured in one run on the same arrays. Speeds are GB/s of input read (the
array's bytes divided by the best of several timings) and ratios to a plain parallel Numba sum
over the same memory, the read limit of this machine. Libraries that are not installed are
skipped; pure-Python ones (River, welford) run on a slice of the array, and the table says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _kernels as K
from .._moments import Moments, atomic_write, moments


@dataclass
class Case:
    name: str
    shape: tuple[int, ...]
    axis: int | tuple[int, ...]
    layout: str = "C"  # "C", or "NHWC-view": a channels_last array seen in NCHW order


FULL = [
    Case("(2e6, 128)", (2_000_000, 128), 0),
    Case("(2e5, 1024)", (200_000, 1024), 0),
    Case("(4e6, 16)", (4_000_000, 16), 0),
    Case("NCHW (128, 64, 56, 56)", (128, 64, 56, 56), (0, 2, 3)),
    Case("NCHW (256, 512, 7, 7)", (256, 512, 7, 7), (0, 2, 3)),
    Case("NHWC (128, 56, 56, 64)", (128, 56, 56, 64), (0, 1, 2)),
]
QUICK = [
    Case("(2e5, 128)", (200_000, 128), 0),
    Case("(4e5, 16)", (400_000, 16), 0),
    Case("NCHW (16, 64, 56, 56)", (16, 64, 56, 56), (0, 2, 3)),
    Case("NCHW (32, 512, 7, 7)", (32, 512, 7, 7), (0, 2, 3)),
    Case("NHWC (16, 56, 56, 64)", (16, 56, 56, 64), (0, 1, 2)),
]


def best_time(f: Callable[[], Any], repeat: int, budget: float = 5.0) -> float:
    """Best wall time of ``f`` over ``repeat`` calls (after one warm-up), within ``budget`` s."""
    f()
    best = float("inf")
    start = time.perf_counter()
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget:
            break
    return best


def _competitors(
    x: np.ndarray, axis: Any
) -> dict[str, tuple[Callable[[], Any], np.ndarray | None]]:
    """name -> (callable, the slice it reads, if not the whole array)."""
    out: dict[str, tuple[Callable[[], Any], np.ndarray | None]] = {
        "numpy mean+var (float32 acc.)": (lambda: (x.mean(axis), x.var(axis)), None),
        "numpy mean+var (float64 acc.)": (
            lambda: (x.mean(axis, dtype=np.float64), x.var(axis, dtype=np.float64)),
            None,
        ),
    }
    try:
        import torch

        t = torch.from_numpy(x)
        dims = list(np.atleast_1d(axis))
        out["torch.var_mean"] = (lambda: torch.var_mean(t, dim=dims), None)
    except ImportError:
        pass
    if x.ndim == 2:
        sub = x[: max(1, min(x.shape[0], 20_000))]
        try:
            from sklearn.utils.extmath import _incremental_mean_and_var

            def skl() -> Any:
                z = np.zeros(x.shape[1])
                return _incremental_mean_and_var(x, z, z, np.zeros(x.shape[1], dtype=np.int64))

            out["sklearn _incremental_mean_and_var"] = (skl, None)
        except ImportError:
            pass
        try:
            from welford import Welford

            out["welford (slice)"] = (lambda: Welford(sub), sub)
        except ImportError:
            pass
        try:
            from river import stats

            col = x[:2000, 0]

            def riv() -> Any:
                v = stats.Var()
                for value in col.tolist():
                    v.update(value)
                return v.get()

            out["River stats.Var (one column, slice)"] = (riv, col)
        except ImportError:
            pass
    return out


def make(case: Case, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    shape = tuple(max(1, int(s * scale)) if i == 0 else s for i, s in enumerate(case.shape))
    return rng.standard_normal(shape, dtype=np.float32)


def run_speed(cases: list[Case], repeat: int, others: bool) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for case in cases:
        x = make(case, rng)
        flat = x.reshape(-1)
        gb = x.nbytes / 1e9

        def read(flat: np.ndarray = flat) -> Any:
            return K.parallel_sum(flat)

        def ours(x: np.ndarray = x, axis: Any = case.axis) -> Any:
            return moments(x, axis)

        # the read limit is timed before and after ours, on the same array
        t_sum = best_time(read, repeat)
        t_sn = best_time(ours, repeat)
        t_sum = min(t_sum, best_time(read, repeat))
        row = {"case": case.name, "GB": gb, "sum GB/s": gb / t_sum, "streamnorm GB/s": gb / t_sn}
        row["ratio"] = t_sum / t_sn
        if others:
            for name, (f, part) in _competitors(x, case.axis).items():
                nbytes = (part if part is not None else x).nbytes / 1e9
                row[name] = nbytes / best_time(f, max(1, repeat // 2), budget=8.0)
        rows.append(row)
        print(_speed_line(row), flush=True)
    return rows


def _speed_line(row: dict[str, Any]) -> str:
    return (
        f"{row['case']:<26} sum {row['sum GB/s']:6.1f} GB/s  "
        f"streamnorm {row['streamnorm GB/s']:6.1f} GB/s  ratio {row['ratio']:.2f}"
    )


def run_stream(repeat: int) -> dict[str, float]:
    """Microseconds per update for a stream of (256, 512) float32 batches."""
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((256, 512), dtype=np.float32) for _ in range(16)]
    out: dict[str, float] = {}

    def per_update(f: Callable[[np.ndarray], Any]) -> float:
        def loop() -> None:
            for b in batches:
                f(b)

        return best_time(loop, repeat) / len(batches) * 1e6

    m = Moments()
    out["streamnorm Moments.update"] = per_update(m.update)
    out["numpy mean+var"] = per_update(lambda b: (b.mean(0), b.var(0)))
    try:
        import torch

        bn = torch.nn.BatchNorm1d(512)
        tb = [torch.from_numpy(b) for b in batches]
        it = iter(range(10**9))

        def torch_bn(_: np.ndarray) -> None:
            with torch.no_grad():
                bn(tb[next(it) % len(tb)])

        out["torch BatchNorm1d (train)"] = per_update(torch_bn)
    except ImportError:
        pass
    return out


def run_accuracy() -> list[dict[str, Any]]:
    """Max relative variance error against a long-double two-pass, far from zero."""
    rng = np.random.default_rng(2)
    rows = []
    for dtype, offset in (("float32", 1e3), ("float32", 1e5), ("float64", 1e8)):
        x = (rng.standard_normal((1_000_000, 4)) + offset).astype(dtype)
        xl = x.astype(np.longdouble)
        mu = xl.mean(axis=0)
        truth = (((xl - mu) ** 2).mean(axis=0)).astype(np.float64)

        def err(v: np.ndarray, truth: np.ndarray = truth) -> float:
            return float(np.max(np.abs(np.asarray(v, dtype=np.float64) / truth - 1)))

        rows.append(
            {
                "data": f"{dtype}, mean/std = {offset:g}",
                "streamnorm": err(moments(x).var()),
                "numpy var (default)": err(x.var(axis=0)),
                "E[x^2]-E[x]^2 (float64)": err(
                    (x.astype(np.float64) ** 2).mean(0) - x.astype(np.float64).mean(0) ** 2
                ),
            }
        )
    return rows


_STARTUP = """
import time
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import streamnorm
t2 = time.perf_counter()
x = np.ones((256, 512), dtype=np.float32)
streamnorm.moments(x)
t3 = time.perf_counter()
print(t2 - t1, t3 - t2)
"""


def run_startup() -> dict[str, float]:
    """Import time, first call with an empty Numba cache, first call with a warm cache."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold cache", "warm cache"):
            res = subprocess.run(
                [sys.executable, "-c", _STARTUP],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            imp, first = (float(v) for v in res.stdout.split())
            out[f"import streamnorm ({label})"] = imp
            out[f"first moments() call ({label})"] = first
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba

    return (
        f"{cpu}, {os.cpu_count()} cores, numba {numba.__version__} "
        f"({numba.get_num_threads()} threads), numpy {np.__version__}, "
        f"Python {platform.python_version()}"
    )


def report(speed: list[dict[str, Any]], stream: dict[str, float], acc: list[dict[str, Any]],
           startup: dict[str, float], command: str) -> str:  # fmt: skip
    lines = [f"Machine: {machine()}", f"Command: `{command}`", ""]
    others = sorted(
        {k for r in speed for k in r} - {"case", "GB", "sum GB/s", "streamnorm GB/s", "ratio"}
    )
    head = ["case", "sum GB/s (read limit)", "streamnorm GB/s", "ratio to sum", *others]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in speed:
        vals = [
            r["case"],
            f"{r['sum GB/s']:.1f}",
            f"{r['streamnorm GB/s']:.1f}",
            f"**{r['ratio']:.2f}**",
        ]
        vals += [f"{r[k]:.3g}" if k in r else "-" for k in others]
        lines.append("| " + " | ".join(vals) + " |")
    lines += [
        "",
        "Stream of (256, 512) float32 batches, microseconds per update (Python included):",
        "",
    ]
    lines += ["| method | us / update |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in stream.items()]
    lines += [
        "",
        "Accuracy: max relative error of the variance against a long-double two-pass:",
        "",
    ]
    if acc:
        keys = list(acc[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for a in acc:
            lines.append(
                "| " + " | ".join(a[k] if k == "data" else f"{a[k]:.1e}" for k in keys) + " |"
            )
    if startup:
        lines += ["", "Start-up (seconds, fresh processes):", "", "| what | s |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in startup.items()]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small arrays, a few seconds")
    parser.add_argument("--repeat", type=int, default=None, help="timings per measurement")
    parser.add_argument("--no-others", action="store_true", help="skip numpy/torch/sklearn/...")
    parser.add_argument("--out", default=None, help="also write the markdown report to this file")


def run(args: argparse.Namespace) -> int:
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 7)
    if repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {repeat}")
    cases = QUICK if args.quick else FULL
    command = "streamnorm bench" + (" --quick" if args.quick else "")
    print(f"streamnorm bench on {machine()}", flush=True)
    speed = run_speed(cases, repeat, not args.no_others)
    stream = run_stream(repeat)
    acc = [] if args.quick else run_accuracy()
    startup = {} if args.quick else run_startup()
    text = report(speed, stream, acc, startup, command)
    print()
    print(text)
    if args.out:
        atomic_write(args.out, lambda f: f.write(text), mode="w")
    return 0
