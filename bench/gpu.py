"""GPU read throughput of streamnorm's CUDA kernels against torch reductions, plus a CPU check.

Needs a CUDA GPU with torch and numba-cuda::

    python bench/gpu.py                 # full sizes: (8e6, 256), NCHW and NHWC (256, 256, 56, 56)
    python bench/gpu.py --quick         # small sizes, to try the script
    python bench/gpu.py --out gpu.md    # also write the markdown tables to a file

For each layout it times, on the same float32 tensor, ``torch.sum`` (a plain reduction: the
read limit), ``torch.var_mean``, ``torch.batch_norm_stats`` and streamnorm, with CUDA events
(median of several trials of several calls), and reports GB/s of input read and the ratio to
``torch.sum``. ``streamnorm (device)`` is ``DeviceMoments.update`` (the batch stays on the GPU,
no synchronization); ``streamnorm.moments`` also copies the per-channel result to the host.
Before timing it checks the GPU results against the CPU path on smaller arrays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import streamnorm
from streamnorm.cuda import DeviceMoments
from streamnorm.cuda import _config as C

#: launch shapes tried by the tuning table: threads per block, elements per thread tile and
#: register cap of the rows kernel, then threads, loads per tile, register cap and 16-byte loads
#: of the channels-first kernel (the first row is the default of ``streamnorm.cuda._config``)
TUNING = (
    (128, 16, None, 64, 8, 64, True),
    (128, 16, None, 64, 8, 64, False),
    (128, 16, None, 64, 4, 64, True),
    (128, 16, None, 128, 4, None, True),
)

#: the goal of every layout, as a ratio of streamnorm (device) to torch.sum
GOAL = 0.90


def host_profile(x: torch.Tensor, axis: Any, calls: int = 200) -> str:
    """Where the host time of ``DeviceMoments.update`` goes (cProfile, top entries)."""
    import cProfile
    import io
    import pstats

    dm = DeviceMoments()
    dm.update(x, axis)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        dm.update(x, axis)
    pr.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()


def timed(fn: Callable[[], Any], inner: int, trials: int) -> float:
    """Median seconds per call over ``trials`` runs of ``inner`` back-to-back calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(trials):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(out)


def enqueue_time(fn: Callable[[], Any], calls: int = 20) -> float:
    """Host seconds per call to enqueue ``fn`` (launch overhead, no synchronization inside)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t) / calls
    torch.cuda.synchronize()
    return dt


def rel_err(g: streamnorm.Moments, c: streamnorm.Moments) -> tuple[float, float]:
    """Max error of mean (relative to |mean| + std) and of M2 (relative), NaNs must match."""
    gm, cm = np.asarray(g.mean), np.asarray(c.mean)
    gq, cq = np.asarray(g.m2), np.asarray(c.m2)
    if not (
        np.array_equal(np.isnan(gm), np.isnan(cm)) and np.array_equal(np.isnan(gq), np.isnan(cq))
    ):
        return float("inf"), float("inf")
    n = np.maximum(np.asarray(c.count, dtype=float), 1)
    scale = np.abs(np.nan_to_num(cm)) + np.sqrt(np.nan_to_num(cq) / n) + 1e-300
    em = np.nanmax(np.abs(gm - cm) / scale) if gm.size else 0.0
    eq = np.nanmax(np.abs(gq - cq) / (np.abs(cq) + 1e-300)) if gq.size else 0.0
    return float(em), float(eq)


def checks(dev: torch.device) -> list[tuple[str, float, float, bool]]:
    """GPU against CPU on smaller arrays: (case, mean error, M2 error, same count)."""
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []

    def case(name: str, xg: Any, xc: np.ndarray, axis: Any, **kw: Any) -> None:
        mg = streamnorm.moments(xg, axis, **kw)
        mc = streamnorm.moments(xc, axis, **kw)
        em, eq = rel_err(mg, mc)
        # weighted counts are float sums: equal up to the summation order
        same = np.allclose(np.asarray(mg.count), np.asarray(mc.count), rtol=1e-14, atol=0)
        rows.append((name, em, eq, same))

    x = torch.randn(100_000, 64, device=dev, generator=g) * 3 + 5
    case("(1e5, 64) f32", x, x.cpu().numpy(), 0)
    y = torch.randn(16, 32, 14, 14, device=dev, generator=g) * 2 - 1
    case("NCHW f32", y, y.cpu().numpy(), (0, 2, 3))
    ycl = y.contiguous(memory_format=torch.channels_last)
    case("NCHW channels_last f32", ycl, ycl.cpu().numpy(), (0, 2, 3))
    case("per-sample (2, 3) f32", y, y.cpu().numpy(), (2, 3))
    h = y.half()
    case("NCHW f16", h, h.float().cpu().numpy(), (0, 2, 3))
    bf = y.bfloat16()
    case("NCHW bf16 (DLPack)", bf, bf.float().cpu().numpy(), (0, 2, 3))
    case("NHWC bf16 channels_last", bf.contiguous(memory_format=torch.channels_last),
         bf.float().cpu().numpy(), (0, 2, 3))  # fmt: skip
    big = torch.randn(65_536, 8, device=dev, dtype=torch.float64, generator=g) + 1e8
    case("f64 mean 1e8, std 1", big, big.cpu().numpy(), 0)
    one = torch.randn(1_000_000, device=dev, generator=g)
    case("1-D (1e6,)", one, one.cpu().numpy(), 0)
    nan = torch.randn(5_000, 16, device=dev, dtype=torch.float64, generator=g)
    nan[::7, 3] = float("nan")
    w = np.random.default_rng(1).random(5_000)
    case("omit + weights", nan, nan.cpu().numpy(), 0, nan_policy="omit", weights=w)
    st = x[::3, ::2]
    case("strided view", st, st.cpu().numpy(), 0)
    try:
        from numba import cuda

        a = np.random.default_rng(2).normal(3, 1, (1000, 7)).astype(np.float32)
        case("numba device array", cuda.to_device(a), a, 0)
    except Exception as e:  # pragma: no cover - report, keep going
        print(f"numba device array check failed: {e!r}")
    try:
        import cupy

        a = np.random.default_rng(3).normal(3, 1, (1000, 7))
        case("CuPy array", cupy.asarray(a), a, 0)
    except Exception as e:  # pragma: no cover
        print(f"CuPy check skipped: {e!r}")
    # determinism: the same bits run to run
    r1 = DeviceMoments(x).to_host()
    r2 = DeviceMoments(x).to_host()
    same = r1.mean.tobytes() == r2.mean.tobytes() and r1.m2.tobytes() == r2.m2.tobytes()
    rows.append(("same bits on a second run", 0.0 if same else float("inf"), 0.0, same))
    return rows


def hooks_check(dev: torch.device) -> str:
    """BatchNorm hooks: a CUDA model's BN inputs reach the GPU path."""
    try:
        from streamnorm.torch import track
    except Exception as e:  # pragma: no cover
        return f"hooks unavailable: {e!r}"

    seen: list[tuple[bool, streamnorm.Moments, streamnorm.Moments]] = []

    class Rec:
        def update(self, layer: str, x: Any, axis: Any = (0, 2, 3)) -> streamnorm.Moments:
            m = streamnorm.moments(x, axis)
            ref = streamnorm.moments(x.detach().cpu().numpy(), axis)
            seen.append((bool(getattr(x, "is_cuda", False)), m, ref))
            return m

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).to(dev)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 16, 16, device=dev).contiguous(memory_format=torch.channels_last)
    try:
        with track(model, Rec()):
            model.train()
            model(x)
    except Exception as e:  # pragma: no cover
        return f"hooks failed: {e!r}"
    if not seen:
        return "hooks: no batch reached the tracker"
    on_gpu, m, ref = seen[0]
    em, eq = rel_err(m, ref)
    return f"hooks: BN input on the GPU={on_gpu}, mean err {em:.1e}, M2 err {eq:.1e} (vs CPU path)"


def bench_layout(name: str, x: torch.Tensor, axis: Any, inner: int, trials: int) -> list[Any]:
    nbytes = x.numel() * x.element_size()
    dims = axis
    rows = []
    dm = DeviceMoments()
    methods: list[tuple[str, Callable[[], Any]]] = [
        ("torch.sum (read limit)", lambda: torch.sum(x)),
        ("torch.var_mean", lambda: torch.var_mean(x, dim=dims)),
        ("torch.batch_norm_stats", lambda: torch.batch_norm_stats(x, 1e-5)),
        ("streamnorm (device)", lambda: dm.update(x, axis)),
        ("streamnorm.moments (to host)", lambda: streamnorm.moments(x, axis)),
    ]
    base = None
    for label, fn in methods:
        try:
            t = timed(fn, inner, trials)
        except Exception as e:  # pragma: no cover
            rows.append((name, label, float("nan"), float("nan"), float("nan"), repr(e)[:60]))
            continue
        gbs = nbytes / t / 1e9
        if base is None:
            base = gbs
        rows.append((name, label, t * 1e3, gbs, gbs / base, ""))
    enq = enqueue_time(lambda: dm.update(x, axis))
    rows.append((name, "streamnorm host enqueue only", enq * 1e3, float("nan"), float("nan"), ""))
    return rows


def tuning(x: torch.Tensor, axis: Any, inner: int, trials: int) -> list[tuple[str, float]]:
    """streamnorm GB/s for a few launch shapes (threads per block, elements per thread)."""
    names = ("BLOCK_THREADS", "UNROLL", "MAX_REGISTERS", "CF_THREADS", "CF_UNROLL")
    names += ("CF_MAX_REGISTERS", "CF_VECTOR_LOADS")
    keep = tuple(getattr(C, n) for n in names)
    out = []
    try:
        for shape in TUNING:
            for n, v in zip(names, shape, strict=True):
                setattr(C, n, v)
            nt, ku, reg, cnt, cku, creg, vec = shape
            dm = DeviceMoments()
            try:
                t = timed(lambda dm=dm: dm.update(x, axis), inner, trials)
            except Exception as e:  # e.g. too many registers for the block size
                print(f"launch shape {shape} failed: {str(e)[:90]}", flush=True)
                torch.cuda.synchronize()
                continue
            cf = f"cf {cnt} x {cku} {'x4 (16-byte loads)' if vec else '(4-byte loads)'}"
            label = f"rows {nt} x {ku} (regs {reg}), {cf} (regs {creg})"
            out.append((label, x.numel() * x.element_size() / t / 1e9))
    finally:
        for n, v in zip(names, keep, strict=True):
            setattr(C, n, v)
    return out


def run_once(layout: str) -> int:
    """Two ``DeviceMoments.update`` calls on one full-size layout, nothing else."""
    g = torch.Generator(device="cuda").manual_seed(1)
    if layout == "nd":
        x, axis = torch.randn(8_000_000, 256, device="cuda", generator=g), 0
    else:
        x = torch.randn(256, 256, 56, 56, device="cuda", generator=g)
        axis = (0, 2, 3)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
    dm = DeviceMoments()
    for _ in range(2):
        dm.update(x, axis)
    torch.cuda.synchronize()
    print(layout, dm.to_host().count)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small arrays (a smoke test)")
    ap.add_argument("--out", help="also write the tables (markdown) to this file")
    ap.add_argument("--no-tuning", action="store_true", help="skip the launch-shape table")
    ap.add_argument("--profile", action="store_true", help="profile the host side of an update")
    ap.add_argument(
        "--once",
        choices=["nd", "nchw", "nhwc"],
        help="only run two updates on one full-size layout (for a kernel profiler such as ncu)",
    )
    args = ap.parse_args(argv)
    if args.once:
        return run_once(args.once)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    from numba import __version__ as nbv
    from numba import cuda

    gpu = torch.cuda.get_device_name()
    lines = [
        f"GPU: {gpu}; torch {torch.__version__}, numba {nbv}, numpy {np.__version__}, "
        f"CUDA runtime of torch {torch.version.cuda}; numba sees {cuda.get_current_device().name}",
        "",
    ]
    t0 = time.time()
    res = checks(dev)
    lines += [
        "### GPU vs CPU path (max error; pass: <= 1e-12)",
        "",
        "| case | mean err | M2 err | counts equal | pass |",
        "|---|---|---|---|---|",
    ]
    ok_all = True
    for name, em, eq, same in res:
        ok = em <= 1e-12 and eq <= 1e-12 and same
        ok_all &= ok
        lines.append(f"| {name} | {em:.1e} | {eq:.1e} | {same} | {'yes' if ok else 'NO'} |")
    lines += [
        "",
        hooks_check(dev),
        "",
        f"(checks took {time.time() - t0:.1f} s, compiles included)",
    ]
    print("\n".join(lines), flush=True)

    if args.quick:
        shapes = [((200_000, 256), 0), ((32, 64, 56, 56), (0, 2, 3))]
        inner, trials = 3, 3
    else:
        shapes = [((8_000_000, 256), 0), ((256, 256, 56, 56), (0, 2, 3))]
        inner, trials = 5, 5
    table = [
        "",
        "### Throughput (float32, GB/s of input read; ratio to torch.sum)",
        "",
        "| layout | method | ms | GB/s | x sum | note |",
        "|---|---|---|---|---|---|",
    ]
    tune = [
        "",
        "### streamnorm launch shapes (GB/s)",
        "",
        "| layout | shape | GB/s |",
        "|---|---|---|",
    ]
    summary = [
        "",
        f"### Result against the goal (streamnorm (device) >= {GOAL:.2f}x torch.sum)",
        "",
        "| layout | torch.sum GB/s | streamnorm GB/s | ratio | goal met |",
        "|---|---|---|---|---|",
    ]
    sum_gbs = float("nan")
    g = torch.Generator(device=dev).manual_seed(1)
    profile_input = None
    for shape, axis in shapes:
        x = torch.randn(*shape, device=dev, generator=g)
        variants = [(f"(N, D) {shape}", x)] if len(shape) == 2 else [
            (f"NCHW {shape}", x),
            (f"NHWC (channels_last) {shape}", x.contiguous(memory_format=torch.channels_last)),
        ]  # fmt: skip
        for name, xv in variants:
            for row in bench_layout(name, xv, axis, inner, trials):
                n, label, ms, gbs, ratio, note = row
                table.append(f"| {n} | {label} | {ms:.3f} | {gbs:.0f} | {ratio:.2f} | {note} |")
                if label == "torch.sum (read limit)":
                    sum_gbs = gbs
                if label == "streamnorm (device)":
                    met = "yes" if ratio >= GOAL else f"no ({ratio - GOAL:+.2f})"
                    summary.append(f"| {n} | {sum_gbs:.0f} | {gbs:.0f} | {ratio:.2f} | {met} |")
                print(table[-1], flush=True)
            if not args.no_tuning:
                for label, gbs in tuning(xv, axis, inner, trials):
                    tune.append(f"| {name} | {label} | {gbs:.0f} |")
                    print(tune[-1], flush=True)
            if args.profile and name.startswith("NCHW"):
                small = xv[:16].contiguous()
                profile_input = (f"NCHW {tuple(small.shape)}", small)
            del xv
        del x, variants
        torch.cuda.empty_cache()
    if args.profile and profile_input is not None:
        print(f"### host profile of DeviceMoments.update, {profile_input[0]}")
        print(host_profile(profile_input[1], (0, 2, 3)))
    text = "\n".join(summary + [""] + lines + (tune if not args.no_tuning else []) + table)
    print("\n".join(summary + (tune if not args.no_tuning else []) + table))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
