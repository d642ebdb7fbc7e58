"""Sequential recalibration: paused forward passes against the passes recomputed from the data.

Times, in one process and interleaved per model, with random weights (nothing downloaded):

- ``one-pass``: one pass with batch statistics (PyTorch ``mode="one-pass"``; ONNX its train-mode
  graph);
- ``seq (recompute)``: ``mode="sequential"``, every pass from the data (``cache_bytes=0``, the
  only way before paused passes): one (truncated) forward pass per layer (PyTorch) or depth
  (ONNX);
- ``seq (cached)``: ``mode="sequential"``, default ``cache_bytes``: each batch's forward pass
  paused between passes (a thread per batch in PyTorch; the ONNX graph cut into one segment per
  depth);
- ONNX also ``inference``: one plain onnxruntime pass over the same data (the original model).

Models: torchvision ``resnet50`` and ``densenet121`` (64 samples of 3x112x112, batch 32) and
the PP-OCRv4 detector of the ``rapidocr-onnxruntime`` wheel (a few 3x320x320 images made here,
batch 2; annotated beforehand on other images, so no mode measures source moments). Ratios are
to ``one-pass`` of the same run; the machine is shared, so compare ratios, not seconds. CPU
seconds (``time.process_time``, every thread of the process) suffer less from other processes
than wall-clock seconds.

Run: ``python bench/bench_sequential.py [--repeat 1] [--no-recompute] [--only resnet50,...]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """The best wall-clock and the best process CPU seconds (all threads) of ``repeat`` runs."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu


def _torch_rows(arch: str, repeat: int, recompute: bool) -> dict[str, tuple[float, float]]:
    import _zoo
    import torch

    from streamnorm.torch import recalibrate

    tv = _zoo.torchvision()
    torch.manual_seed(0)
    ref = getattr(tv.models, arch)(weights=None)
    x = torch.randn(64, 3, 112, 112)

    def run(mode: str, cache: int | None) -> Callable[[], Any]:
        def go() -> None:
            m = getattr(tv.models, arch)(weights=None)
            m.load_state_dict(ref.state_dict())
            recalibrate(m, x, mode=mode, batch_size=32, progress=False, cache_bytes=cache)

        return go

    out = {"one-pass": _best(run("one-pass", None), repeat)}
    if recompute:
        out["seq (recompute)"] = _best(run("sequential", 0), repeat)
    out["seq (cached)"] = _best(run("sequential", None), repeat)
    return out


def _det_rows(repeat: int, recompute: bool, images: int) -> dict[str, tuple[float, float]]:
    import _zoo
    import onnxruntime as ort

    from streamnorm.onnx import annotate, recalibrate

    src = _zoo.paddleocr_model("det")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:320, 0:320] / 320.0
    base = np.stack([np.sin(7 * xx + 3 * yy), np.cos(5 * yy), xx * yy]).astype(np.float32)
    x = (base[None] + 0.3 * rng.standard_normal((images, 3, 320, 320))).astype(np.float32)
    source = (0.8 * base[None] + 0.2 * rng.random((4, 3, 320, 320))).astype(np.float32)
    tmp = tempfile.mkdtemp()
    annotated = os.path.join(tmp, "det_annotated.onnx")
    annotate(src, source, annotated, batch_size=2, progress=False)
    out_path = os.path.join(tmp, "out.onnx")
    sess = ort.InferenceSession(annotated, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def infer() -> None:
        for i in range(0, images, 2):
            sess.run(None, {name: x[i : i + 2]})

    def run(mode: str, cache: int | None) -> Callable[[], Any]:
        def go() -> None:
            recalibrate(
                annotated, x, out_path, mode=mode, batch_size=2, progress=False, cache_bytes=cache
            )

        return go

    infer()  # warm the session
    out = {"inference": _best(infer, repeat), "one-pass": _best(run("one-pass", None), repeat)}
    if recompute:
        out["seq (recompute)"] = _best(run("sequential", 0), repeat)
    out["seq (cached)"] = _best(run("sequential", None), repeat)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs per cell")
    ap.add_argument("--no-recompute", action="store_true", help="skip the slow recomputing mode")
    ap.add_argument("--only", default="resnet50,densenet121,ppocr-det")
    ap.add_argument("--images", type=int, default=6, help="PP-OCRv4 det images")
    args = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeat {args.repeat}")
    rows = []
    for model in args.only.split(","):
        if model == "ppocr-det":
            times = _det_rows(args.repeat, not args.no_recompute, args.images)
            label = f"PP-OCRv4 det, {args.images}x3x320x320, batch 2 (ONNX)"
        else:
            times = _torch_rows(model, args.repeat, not args.no_recompute)
            label = f"{model}, 64x3x112x112, batch 32 (PyTorch)"
        rows.append((label, times))
        print(label, {k: (round(w, 2), round(c, 2)) for k, (w, c) in times.items()}, flush=True)
    print()
    print("| model | mode | wall s | / one-pass | CPU s | / one-pass |")
    print("|---|---|---:|---:|---:|---:|")
    for label, times in rows:
        w1, c1 = times["one-pass"]
        for mode, (w, c) in times.items():
            print(f"| {label} | {mode} | {w:.2f} | {w / w1:.2f} | {c:.2f} | {c / c1:.2f} |")


if __name__ == "__main__":
    main()
