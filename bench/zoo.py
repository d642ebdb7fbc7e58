"""The zoo table: recalibration on torchvision and timm networks (random weights, nothing
downloaded), through PyTorch and through ONNX.

Per network (the cases of ``tests/_zoo_cases.py``, the same as ``tests/test_zoo.py``) and path:

- ``torch cumulative``: ``streamnorm.torch.recalibrate(estimator="cumulative", one-pass)``
  against ``torch.optim.swa_utils.update_bn``; error: the largest
  ``max|got - want| / max|want|`` over the layers' ``running_mean`` / ``running_var``;
- ``torch population``: population, one pass, against every BatchNorm input kept by hooks and
  reduced in float64 (same error);
- ``onnx <exporter>``: the network, its statistics first made the population statistics of the
  source data, is exported (``torch.onnx.export``, TorchScript exporter, or
  ``streamnorm.onnx.export``), annotated on the source data and recalibrated on the shifted data
  ``1.5 x + 0.5`` (defaults: sequential, default layers); error: ``||y - y_ref|| / ||y_ref||``
  of the outputs on the shifted data, ``y_ref`` from the PyTorch network recalibrated
  sequentially on it; ``unadapted``: the same for the exported network before recalibration.
  ``eps=1e-9`` rows set every BatchNorm's eps to 1e-9 first, so that folding loses nothing.

Run from the repository root (about a minute per network on 2 busy cores)::

    python bench/zoo.py                         # every network, every path
    python bench/zoo.py --models tv_resnet50 --paths onnx
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import _zoo_cases as zc  # noqa: E402


def _torch_rows(case: zc.Case, n: int, bs: int) -> list[tuple[str, float, str, float]]:
    import torch

    import streamnorm.torch

    rows = []
    model = zc.build(case)
    x, _ = zc.data(n, case.size)
    t = time.perf_counter()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.optim.swa_utils.update_bn(list(x.split(bs)), ref)
    got = copy.deepcopy(model)
    streamnorm.torch.recalibrate(
        got, x, estimator="cumulative", mode="one-pass", batch_size=bs, progress=False
    )
    err, _ = zc.worst_relative(zc.bn_stats(got), zc.bn_stats(ref))
    rows.append(("torch cumulative vs update_bn", err, "", time.perf_counter() - t))
    t = time.perf_counter()
    if case.size <= 128:
        want = zc.reference_stats(copy.deepcopy(model), list(x.split(bs)))
        got = copy.deepcopy(model)
        streamnorm.torch.recalibrate(got, x, mode="one-pass", batch_size=bs, progress=False)
        err, _ = zc.worst_relative(zc.bn_stats(got), want)
        rows.append(("torch population vs float64", err, "", time.perf_counter() - t))
    return rows


def _onnx_rows(case: zc.Case, n: int, bs: int) -> list[tuple[str, float, str, float]]:
    import streamnorm.onnx

    rows = []
    src, tgt = zc.data(n, case.size)
    variants = [
        ("torch.onnx.export", "torch", None),
        ("torch.onnx.export, eps=1e-9", "torch", 1e-9),
    ]
    if hasattr(streamnorm.onnx, "export"):
        variants.append(("streamnorm.onnx.export", "streamnorm", None))
    for label, how, eps in variants:
        t = time.perf_counter()
        model = zc.build(case, eps=eps)
        try:
            res = zc.onnx_error(model, src, tgt, how=how, batch_size=bs)
        except Exception as e:  # a failure is a row of the table, not the end of it
            rows.append((f"onnx {label}", float("nan"), f"{type(e).__name__}: {e}"[:80], 0.0))
            continue
        note = f"unadapted {res.unadapted:.3g}; {res.bn_nodes} BN nodes, {res.convs} Conv"
        rows.append((f"onnx {label}", res.error, note, time.perf_counter() - t))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[c.name for c in zc.CASES])
    p.add_argument("--paths", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(f"{args.samples} samples, batches of {args.batch_size}; torch {torch.__version__}")
    print("| model | #BN | path | relative error | notes | time (s) |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        case = zc.BY_NAME[name]
        nbn = len(zc.bn_layers(zc.build(case)))
        rows = []
        if "torch" in args.paths:
            rows += _torch_rows(case, args.samples, args.batch_size)
        if "onnx" in args.paths and case.onnx:
            rows += _onnx_rows(case, args.samples, args.samples)
        for path, err, note, secs in rows:
            print(f"| {name} | {nbn} | {path} | {err:.2e} | {note} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
