"""Recalibrating an exported ONNX model against recalibrating the PyTorch model, on the zoo.

For each network (random weights, nothing downloaded): the BatchNorm statistics are first made
the population statistics of source data (``streamnorm.torch.recalibrate``, sequential), then
the model is exported with :func:`streamnorm.onnx.export` (``torch.onnx.export`` plus the record
of where each BatchNorm went). The reference is the PyTorch model recalibrated on the target
data ``3 x + 1`` (sequential). Three ONNX recalibrations on the same target data are compared
with it, by the relative error ``|y - y_ref| / |y_ref|`` of the outputs on held-out target
samples:

- ``default``: the graph without the record, annotated on the source data with the default
  (heuristic) folded layers, then recalibrated (moment matching);
- ``right layers``: the same, with exactly the folded Conv layers of the record annotated
  (moment matching; eps is lost);
- ``exported``: the recorded graph recalibrated (exact path, no source data);
- ``floor``: the recalibrated PyTorch model itself exported and run by onnxruntime (float32
  rounding between the two runtimes: no ONNX recalibration can be closer than this).

Run from the repository root: ``python bench/zoo_onnx.py`` (``--models``, ``--size``,
``--samples``, ``--dynamo``).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import _zoo  # noqa: E402

from streamnorm.onnx import annotate, export, recalibrate  # noqa: E402
from streamnorm.torch import recalibrate as torch_recalibrate  # noqa: E402

MODELS = ["resnet50", "mobilenet_v3_large", "densenet121", "efficientnet_b0"]
KEY = "streamnorm.batchnorms"


def build(name: str) -> torch.nn.Module:
    if name == "efficientnet_b0":
        return _zoo.timm().create_model("efficientnet_b0", pretrained=False).eval()
    return getattr(_zoo.torchvision().models, name)(weights=None).eval()


def outputs(path: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def strip(path: str, out: str) -> None:
    """``path`` without the BatchNorm record (what a plain torch.onnx.export writes)."""
    m = onnx.load(path)
    keep = [(p.key, p.value) for p in m.metadata_props if p.key != KEY]
    del m.metadata_props[:]
    for k, v in keep:
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, out)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def one(name: str, size: int, n: int, dynamo: bool, tmp: str) -> dict[str, float]:
    rng = np.random.default_rng(0)
    shape = (n, 3, size, size)
    src = rng.standard_normal(shape).astype(np.float32)
    tgt = (3 * rng.standard_normal(shape) + 1).astype(np.float32)
    held = (3 * rng.standard_normal((32, 3, size, size)) + 1).astype(np.float32)
    torch.manual_seed(0)
    m = build(name)
    t0 = time.perf_counter()
    torch_recalibrate(m, src, mode="sequential", progress=False)
    ref = copy.deepcopy(m)
    torch_recalibrate(ref, tgt, mode="sequential", progress=False)
    with torch.no_grad():
        want = ref(torch.from_numpy(held)).numpy()
    t1 = time.perf_counter()

    p = os.path.join(tmp, f"{name}.onnx")
    kw: dict = {"input_names": ["x"], "dynamo": dynamo}
    if dynamo:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("N")},)
    else:
        kw["dynamic_axes"] = {"x": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = export(m, (torch.from_numpy(src[:2]),), p, **kw)
    t2 = time.perf_counter()
    folded = [r.output for r in rec.values() if r.op in ("Conv", "Gemm")]
    plain = os.path.join(tmp, f"{name}_plain.onnx")
    strip(p, plain)
    errs: dict[str, float] = {}
    for label, layers in (("default", None), ("right layers", folded)):
        ann, out = os.path.join(tmp, "ann.onnx"), os.path.join(tmp, "old.onnx")
        annotate(plain, src, ann, layers=layers, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recalibrate(ann, tgt, out, progress=False)
        errs[label] = rel(outputs(out, held), want)
    t3 = time.perf_counter()
    out = os.path.join(tmp, "new.onnx")
    recalibrate(p, tgt, out, progress=False)
    errs["exported"] = rel(outputs(out, held), want)
    t4 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(ref, (torch.from_numpy(src[:2]),), out, **kw)
    errs["floor"] = rel(outputs(out, held), want)
    ops = [r.op for r in rec.values()]
    print(
        f"{name}: {len(folded)} folded, {ops.count('BatchNormalization')} BN nodes; torch "
        f"{t1 - t0:.0f} s, export {t2 - t1:.0f} s, moment matching {t3 - t2:.0f} s, exact "
        f"{t4 - t3:.0f} s",
        file=sys.stderr,
    )
    return {**errs, "folded": len(folded), "eps": min(r.eps for r in rec.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--size", type=int, default=64, help="image side (default 64)")
    ap.add_argument("--samples", type=int, default=64, help="source and target samples")
    ap.add_argument("--dynamo", action="store_true", help="the dynamo exporter")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| model | folded BN (eps) | default layers | right layers | exported (exact) | floor |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            r = one(name, a.size, a.samples, a.dynamo, tmp)
            print(
                f"| {name} | {r['folded']} ({r['eps']:g}) | {r['default']:.3g} | "
                f"{r['right layers']:.3g} | {r['exported']:.2g} | {r['floor']:.2g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
