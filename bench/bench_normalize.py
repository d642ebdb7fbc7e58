"""``streamnorm.normalize`` against numpy and ``torch.nn.functional.batch_norm`` (eval mode).

Float32 batches in three layouts, the same statistics for every implementation; each round
times every implementation once, interleaved, and the table reports the median over rounds
and the ratio to ``streamnorm.normalize`` (above 1: slower than streamnorm).

* numpy: ``(x - mean) * (gamma / sqrt(var + eps)) + beta`` with float32 parameters broadcast
  over the layout (the usual one-liner: three passes and two temporaries).
* torch: ``F.batch_norm(x, mean, var, gamma, beta, training=False)`` with torch's default
  intra-op threads (a channels_last tensor for NHWC).

Run: ``python bench/bench_normalize.py [--rounds 9] [--scale 1.0]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import streamnorm


def _implementations(x: np.ndarray, axis: Any, rng: np.random.Generator) -> dict[str, Any]:
    C = x.shape[1]
    mean = rng.standard_normal(C)
    var = rng.uniform(0.5, 2.0, C)
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    out = np.empty_like(x)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    m32, b32 = (a.astype(np.float32).reshape(bshape) for a in (mean, beta))
    s32 = (gamma / np.sqrt(var + 1e-5)).astype(np.float32).reshape(bshape)

    def run_streamnorm() -> None:
        streamnorm.normalize(x, mean, var, axis=axis, gamma=gamma, beta=beta, out=out)

    def run_numpy() -> None:
        np.add(np.multiply(np.subtract(x, m32), s32), b32)

    impls: dict[str, Callable[[], object]] = {"streamnorm": run_streamnorm, "numpy": run_numpy}
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:  # pragma: no cover - optional comparison
        return impls
    tx = torch.from_numpy(x)
    tm, tv, tg, tb = (torch.from_numpy(a.astype(np.float32)) for a in (mean, var, gamma, beta))

    def run_torch() -> None:
        with torch.no_grad():
            F.batch_norm(tx, tm, tv, tg, tb, training=False, eps=1e-5)

    impls["torch"] = run_torch
    return impls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the batch sizes")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = max(1, int(64 * args.scale))
    cases = [
        (f"(N, D) = ({256 * n}, 512)", (256 * n, 512), 0, "nc"),
        (f"NCHW ({n}, 64, 28, 28)", (n, 64, 28, 28), (0, 2, 3), "nchw"),
        (f"NHWC / channels_last ({n}, 64, 28, 28)", (n, 64, 28, 28), (0, 2, 3), "nhwc"),
    ]
    try:
        import torch

        threads: Any = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = "-"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(
        f"float32, {args.rounds} rounds, NUMBA_NUM_THREADS="
        f"{os.environ.get('NUMBA_NUM_THREADS', 'default')}, torch threads={threads}"
    )
    print("| layout | MB | streamnorm | numpy | torch eval batch_norm |")
    print("|---|---|---|---|---|")
    for label, shape, axis, kind in cases:
        x = rng.standard_normal(shape, dtype=np.float32) * 3 + 1
        if kind == "nhwc":
            x = np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2)
        impls = _implementations(x, axis, rng)
        for fn in impls.values():  # compile and warm up
            fn()
        times: dict[str, list[float]] = {k: [] for k in impls}
        for _ in range(args.rounds):
            for k, fn in impls.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = med["streamnorm"]
        cells = [f"{ref * 1e3:.2f} ms (1.00)"]
        for k in ("numpy", "torch"):
            cells.append(f"{med[k] * 1e3:.2f} ms ({med[k] / ref:.2f})" if k in med else "-")
        print(f"| {label} | {x.nbytes / 2**20:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
