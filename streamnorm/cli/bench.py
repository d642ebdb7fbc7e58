"""``streamnorm bench``: the moments kernels against the memory-read limit and other libraries.

Every number is measured in one run on the same arrays. Speeds are GB/s of input read (the
array's bytes divided by the best of several timings) and ratios to the read limit of this
machine: the faster of a plain parallel Numba sum with ``fastmath=True`` and ``torch.sum`` over
the same memory. Each case is timed with all threads and with one. The report also names the
CPU, its SIMD width and thread count, reads the machine code of the kernels' leaf loops (which
vectorize, at which width) and times each serial kernel on cache-resident data, so that each
kernel can be said to be bound by memory or by the core. Libraries that are not installed are
skipped; pure-Python ones (River, welford) run on a slice of the array, and the table says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit, prange

from .. import _kernels as K
from .._io import atomic_write, check_output
from .._moments import Moments, moments
from . import UsageError


@njit(nogil=True, cache=True, fastmath=True)
def _sum(x):
    acc = 0.0
    for i in range(x.shape[0]):
        acc += x[i]
    return acc


@njit(nogil=True, cache=True, fastmath=True, parallel=True)
def parallel_sum(x):
    """Plain parallel sum of a contiguous 1-D array: the memory-read limit for benchmarks.

    Float64 accumulation as in the moments kernels, every fastmath flag on; the vectorized loop
    is the jitted function ``_sum`` of its own, one call per chunk of the array.
    """
    n = x.shape[0]
    nchunks = max(1, min(1024, n // 65536))
    step = (n + nchunks - 1) // nchunks
    part = np.zeros(nchunks)
    for k in prange(nchunks):
        part[k] = _sum(x[k * step : min(n, (k + 1) * step)])
    return part.sum()


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


def _torch_sum(flat: np.ndarray) -> Callable[[], Any] | None:
    try:
        import torch
    except ImportError:
        return None
    t = torch.from_numpy(flat)
    return lambda: t.sum()


def _set_threads(n: int) -> None:
    """Numba's and (if imported) torch's thread counts."""
    import numba

    numba.set_num_threads(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def _torch_time(flat: np.ndarray, repeat: int) -> float:
    """Best seconds of ``torch.sum`` over ``flat`` (inf without torch)."""
    f = _torch_sum(flat)
    if f is None:
        return float("inf")
    t = best_time(f, repeat)
    # torch's OpenMP threads (a runtime of their own, not Numba's) spin a while after a call and
    # would slow the next Numba kernel: let them fall asleep
    time.sleep(0.2)
    return t


def run_speed(cases: list[Case], repeat: int, others: bool) -> list[dict[str, Any]]:
    """Each case: the read limit and streamnorm, with all threads and with one, interleaved."""
    import numba

    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    threads = numba.get_num_threads()
    for case in cases:
        x = make(case, rng)
        flat = x.reshape(-1)
        gb = x.nbytes / 1e9

        def ours(x: np.ndarray = x, axis: Any = case.axis) -> Any:
            return moments(x, axis)

        def read(flat: np.ndarray = flat) -> Any:
            return parallel_sum(flat)

        row: dict[str, Any] = {"case": case.name, "GB": gb}
        for label, n in (("", threads), (" 1 thread", 1)):
            _set_threads(n)
            try:
                # the Numba sum and ours alternate three times on the same array, best of each;
                # torch.sum after them (its threads would disturb the next timing)
                t_num = t_sn = float("inf")
                for _ in range(3):
                    t_num = min(t_num, best_time(read, repeat))
                    t_sn = min(t_sn, best_time(ours, repeat))
                t_tor = _torch_time(flat, repeat)
            finally:
                _set_threads(threads)
            t_lim = min(t_num, t_tor)
            row[f"numba sum GB/s{label}"] = gb / t_num
            row[f"torch.sum GB/s{label}"] = gb / t_tor if t_tor < float("inf") else float("nan")
            row[f"read limit GB/s{label}"] = gb / t_lim
            row[f"streamnorm GB/s{label}"] = gb / t_sn
            row[f"ratio{label}"] = t_lim / t_sn
        if others:
            for name, (f, part) in _competitors(x, case.axis).items():
                nbytes = (part if part is not None else x).nbytes / 1e9
                row[name] = nbytes / best_time(f, max(1, repeat // 2), budget=8.0)
        rows.append(row)
        print(_speed_line(row), flush=True)
    return rows


def _speed_line(row: dict[str, Any]) -> str:
    return (
        f"{row['case']:<26} read limit {row['read limit GB/s']:6.1f} GB/s  "
        f"streamnorm {row['streamnorm GB/s']:6.1f} GB/s  ratio {row['ratio']:.2f}  "
        f"(1 thread: {row['read limit GB/s 1 thread']:5.1f}, "
        f"{row['streamnorm GB/s 1 thread']:5.1f}, {row['ratio 1 thread']:.2f})"
    )


def simd_width() -> tuple[str, int]:
    """LLVM's target CPU name and the widest SIMD register of its feature set, in bits."""
    import llvmlite.binding as ll
    from numba.core import config

    cpu_name = getattr(config, "CPU_NAME", None)  # NUMBA_CPU_NAME, set at import
    name = cpu_name or ll.get_host_cpu_name()
    if cpu_name:  # a named target: ask LLVM nothing about the host
        feats = {"haswell": 256, "skylake-avx512": 512, "generic": 128}
        return name, feats.get(name, 0)
    f = ll.get_host_cpu_features()
    bits = 512 if f.get("avx512f") else 256 if f.get("avx2") or f.get("avx") else 128
    return name, bits


_VEC_OP = re.compile(r"\n\s+v(?:add|sub|mul|fmadd\w*|fmsub\w*|cvtps2pd)\w*pd\s+[^\n]*%([xyz])mm")


def _leaf_args(name: str) -> tuple[Any, ...]:
    D, r = 64, np.zeros(64)
    if name.startswith("rows, two"):
        return (np.zeros((16, D), np.float32), 0, 16, r, r.copy(), r.copy())
    if name.startswith("rows"):
        return (np.zeros((16, D), np.float32), 0, 16, r, r.copy(), r.copy(), r.copy())
    if "rows" in name:
        return (np.zeros((2, D, 49), np.float32), 0, 2, r, r.copy(), r.copy(), r.copy())
    return (np.zeros((2, D, 49), np.float32), 0, 0, 2, 0, 49, 0.0)


def vector_report() -> list[dict[str, Any]]:
    """Which leaf loops vectorize, at which width: a ``cache=False`` copy of each, its asm read.

    Counts packed double-precision arithmetic instructions (``v...pd``) by register: ``zmm``
    (512 bits, 8 float64), ``ymm`` (256, 4), ``xmm`` (128, 2).
    """
    out = []
    for name, (disp, opts, work) in K.LEAF_LOOPS.items():
        f = njit(**{**opts, "cache": False})(disp.py_func)
        f(*_leaf_args(name))
        asm = "\n".join(f.inspect_asm().values())
        regs = _VEC_OP.findall(asm)
        counts = {r: regs.count(r) for r in "zyx"}
        widest = next((r for r in "zyx" if counts[r]), None)
        width = {"z": "512-bit (8 x f64)", "y": "256-bit (4 x f64)", "x": "128-bit (2 x f64)"}
        out.append(
            {
                "loop": name,
                "work per element": work,
                "vectorized": width[widest] if widest else "no (scalar)",
                "packed ops zmm/ymm/xmm": f"{counts['z']}/{counts['y']}/{counts['x']}",
            }
        )
    return out


def core_rates(repeat: int, read_1t: float) -> list[dict[str, Any]]:
    """Each serial kernel on cache-resident float32 data, one thread: G elements/s.

    Against one thread's read limit from memory (``read_1t`` G elements/s of float32): a kernel
    whose in-cache rate is below it is bound by the core, else it could keep up with memory.
    """
    rng = np.random.default_rng(3)
    kernels: list[tuple[str, np.ndarray, Callable[[np.ndarray], Any]]] = [
        (
            "rows (256, 256)",
            rng.standard_normal((256, 256), dtype=np.float32),
            lambda a: K.rows_moments_serial(a, 256, 1),
        ),
        (
            "rows (64, 1024)",
            rng.standard_normal((64, 1024), dtype=np.float32),
            lambda a: K.rows_moments_serial(a, 64, 1),
        ),
        (
            "channels-first (2, 16, 3136)",
            rng.standard_normal((2, 16, 3136), dtype=np.float32),
            lambda a: K.cf_rows_moments_serial(a, 1),
        ),
        (
            "channels-first (8, 256, 49)",
            rng.standard_normal((8, 256, 49), dtype=np.float32),
            lambda a: K.cf_rows_moments_serial(a, 1),
        ),
    ]
    out = []
    for name, a, f in kernels:
        loops = 50

        def many(a: np.ndarray = a, f: Callable[[np.ndarray], Any] = f, loops: int = loops) -> None:
            for _ in range(loops):
                f(a)

        rate = a.size * loops / best_time(many, repeat) / 1e9
        out.append(
            {
                "kernel (serial, in cache)": name,
                "G elem/s": rate,
                "read limit G elem/s (1 thread, memory)": read_1t,
                "bound": "memory" if rate >= read_1t else "core",
            }
        )
    return out


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
    out["read limit: parallel Numba sum of each batch"] = per_update(
        lambda b: parallel_sum(b.reshape(-1))
    )
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
    """CPU model, cores, SIMD width, threads and library versions, on one line."""
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

    target, bits = simd_width()
    layer: str
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = "not yet chosen"
    return (
        f"{cpu}, {os.cpu_count()} cores, LLVM target {target} ({bits}-bit SIMD), "
        f"numba {numba.__version__} ({numba.get_num_threads()} threads, {layer} layer), "
        f"numpy {np.__version__}, Python {platform.python_version()}"
    )


@dataclass
class Results:
    """Everything one ``streamnorm bench`` run measured."""

    command: str
    speed: list[dict[str, Any]]
    stream: dict[str, float]
    acc: list[dict[str, Any]] = field(default_factory=list)
    startup: dict[str, float] = field(default_factory=dict)
    vectors: list[dict[str, Any]] = field(default_factory=list)
    cores: list[dict[str, Any]] = field(default_factory=list)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """A markdown table of dicts with the same keys; floats with 3 significant digits."""
    if not rows:
        return []
    keys = list(rows[0])

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(fmt(r.get(k, "-")) for k in keys) + " |" for r in rows]


_SPEED_KEYS = [
    "read limit GB/s",
    "streamnorm GB/s",
    "ratio",
    "read limit GB/s 1 thread",
    "streamnorm GB/s 1 thread",
    "ratio 1 thread",
    "numba sum GB/s",
    "torch.sum GB/s",
]


def report(res: Results) -> str:
    lines = [f"Machine: {machine()}", f"Command: `{res.command}`", ""]
    lines += [
        "Read limit: the faster of a fastmath parallel Numba sum and torch.sum over the same "
        "memory; ratio: read limit time / streamnorm time (1 = at the limit).",
        "",
    ]
    fixed = {"case", "GB", *_SPEED_KEYS} | {k + " 1 thread" for k in _SPEED_KEYS}
    others = sorted({k for r in res.speed for k in r} - fixed)
    head = ["case", *_SPEED_KEYS, *others]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res.speed:
        vals = [r["case"]]
        for k in head[1:]:
            v = r.get(k)
            if v is None:
                vals.append("-")
            elif k.startswith("ratio"):
                vals.append(f"**{v:.2f}**")
            else:
                vals.append(f"{v:.3g}")
        lines.append("| " + " | ".join(vals) + " |")
    if res.vectors:
        lines += ["", "Leaf loops, machine code of this build (LLVM's choice of width):", ""]
        lines += _table(res.vectors)
    if res.cores:
        lines += ["", "Serial kernels on cache-resident data against one thread's read limit:", ""]
        lines += _table(res.cores)
    lines += [
        "",
        "Stream of (256, 512) float32 batches, microseconds per update (Python included):",
        "",
    ]
    lines += ["| method | us / update |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in res.stream.items()]
    if res.acc:
        lines += [
            "",
            "Accuracy: max relative error of the variance against a long-double two-pass:",
            "",
        ]
        keys = list(res.acc[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for a in res.acc:
            lines.append(
                "| " + " | ".join(a[k] if k == "data" else f"{a[k]:.1e}" for k in keys) + " |"
            )
    if res.startup:
        lines += ["", "Start-up (seconds, fresh processes):", "", "| what | s |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in res.startup.items()]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small arrays, a few seconds")
    parser.add_argument("--repeat", type=int, default=None, help="timings per measurement")
    parser.add_argument("--no-others", action="store_true", help="skip numpy/torch/sklearn/...")
    parser.add_argument("--out", default=None, help="also write the markdown report to this file")


def run(args: argparse.Namespace) -> int:
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 7)
    if repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {repeat}")
    if args.out:
        check_output(args.out)  # before the benchmark, not after it
    cases = QUICK if args.quick else FULL
    command = "streamnorm bench" + (" --quick" if args.quick else "")
    print(f"streamnorm bench on {machine()}", flush=True)
    speed = run_speed(cases, repeat, not args.no_others)
    # one thread's read rate from memory: the first case, the largest array (float32 elements)
    read_1t = speed[0]["read limit GB/s 1 thread"] / 4
    res = Results(command, speed, run_stream(repeat))
    res.vectors = vector_report()
    res.cores = core_rates(repeat, read_1t)
    if not args.quick:
        res.acc = run_accuracy()
        res.startup = run_startup()
    text = report(res)
    print()
    print(text)
    if args.out:
        atomic_write(args.out, lambda f: f.write(text), mode="w")
    return 0
