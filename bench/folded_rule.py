"""Precision and recall of the default choice of folded Conv / Gemm layers on real models.

For each model: the truth (the Conv / Gemm layers that carry a folded BatchNorm), the layers the
rule before this change took (a Conv / Gemm output read by an activation or a Conv) and the
layers :func:`streamnorm.onnx.folded_layers` takes now, with precision and recall of both.

Truth
-----
* torchvision resnet50, mobilenet_v3_large, densenet121 and timm efficientnet_b0 (random
  weights, eval mode): exported twice with ``torch.onnx.export`` (TorchScript exporter,
  opset 17): with constant folding (the default, which folds every BatchNorm after a Conv into
  it) and without (``do_constant_folding=False`` keeps the ``BatchNormalization`` nodes). The
  truth is every Conv / Gemm whose output a ``BatchNormalization`` node reads in the unfolded
  export, matched to the folded export by node name (``/layer1/layer1.0/conv1/Conv``: the names
  are the module scopes, the same in both).
* PaddleOCR PP-OCRv4 det and rec, v2.0 cls (the ONNX files of rapidocr-onnxruntime, exported by
  paddle2onnx): no unfolded export exists, so the truth comes from the architecture as the graph
  shows it. PP-OCRv4's PPLCNetV3 backbone reparameterizes each Conv-BN (and its 1x1 and
  identity branches) into one Conv with a bias, followed by a LearnableAffineBlock: a ``Mul`` by
  a constant, then an ``Add`` of a constant. Truth = the Conv / Gemm nodes with a bias whose only
  reader is a constant ``Mul`` whose only reader is a constant ``Add``. The other Convs are not
  folded: the stem Conv and the SVTR neck / DB head Convs keep their ``BatchNormalization``
  nodes, the squeeze-excitation Convs (after ``GlobalAveragePool``) and the det neck's plain
  Convs (RSE-FPN, no bias or no BatchNorm in the model) never had one. The cls model keeps every
  BatchNorm as a node: its truth is empty (precision and recall are then 1 when nothing is
  taken).

Run: ``python bench/folded_rule.py`` (about a minute on 2 cores; the exports are cached in
``--cache``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import onnx  # noqa: E402

from streamnorm.onnx import folded_layers  # noqa: E402

TORCH_MODELS = ("resnet50", "mobilenet_v3_large", "densenet121", "efficientnet_b0")
PADDLE_MODELS = ("det", "rec", "cls")
FOLDABLE = ("Conv", "Gemm")
OLD_ACTIVATIONS = {
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Celu",
    "Gelu",
    "Mish",
    "Softplus",
    "Softsign",
    "ThresholdedRelu",
}


def _label(node: Any) -> str:
    return str(node.name or node.output[0])


def _readers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for n in graph.node:
        for x in n.input:
            if x:
                out.setdefault(x, []).append(n)
    return out


def old_rule(model: Any) -> set[str]:
    """The rule before: a Conv / Gemm output read by an activation or a Conv."""
    readers = _readers(model.graph)
    return {
        _label(n)
        for n in model.graph.node
        if n.op_type in FOLDABLE
        and any(
            r.op_type in OLD_ACTIVATIONS or r.op_type == "Conv"
            for r in readers.get(n.output[0], [])
        )
    }


def new_rule(path: str) -> set[str]:
    return {c.name for c in folded_layers(path, annotated=False) if c.chosen}


def _build(name: str) -> Any:
    import _zoo  # tests/_zoo.py: torchvision beside the CPU torch, no downloads
    import torch

    torch.manual_seed(0)
    if name == "efficientnet_b0":
        model = _zoo.timm().create_model("efficientnet_b0", pretrained=False)
    else:
        model = getattr(_zoo.torchvision().models, name)(weights=None)
    return model.eval()


def torch_exports(name: str, cache: str) -> tuple[str, str]:
    """``(folded, unfolded)`` exports of ``name``, made once into ``cache``."""
    import torch

    paths = (os.path.join(cache, f"{name}.onnx"), os.path.join(cache, f"{name}_bn.onnx"))
    if all(os.path.exists(p) for p in paths):
        return paths
    model = _build(name)
    x = torch.randn(1, 3, 224, 224)
    for path, fold in zip(paths, (True, False), strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), path, dynamo=False, do_constant_folding=fold, input_names=["x"]
            )
    return paths


def torch_truth(folded: str, unfolded: str) -> set[str]:
    """Conv / Gemm nodes read by a BatchNormalization node in the unfolded export."""
    g = onnx.load(unfolded, load_external_data=False).graph
    readers = _readers(g)
    truth = {
        _label(n)
        for n in g.node
        if n.op_type in FOLDABLE
        and any(r.op_type == "BatchNormalization" for r in readers.get(n.output[0], []))
    }
    names = {_label(n) for n in onnx.load(folded, load_external_data=False).graph.node}
    missing = truth - names
    if missing:
        raise SystemExit(f"{folded}: no node named {sorted(missing)[:3]} in the folded export")
    return truth


def _is_const(graph: Any, name: str) -> bool:
    if name in {t.name for t in graph.initializer}:
        return True
    return any(n.op_type == "Constant" and name in n.output for n in graph.node)


def paddle_truth(path: str) -> set[str]:
    """Conv / Gemm with a bias -> Mul(constant) -> Add(constant), each the only reader: a
    reparameterized Conv-BN followed by PPLCNetV3's LearnableAffineBlock."""
    g = onnx.load(path).graph
    readers = _readers(g)
    out = set()
    for n in g.node:
        if n.op_type not in FOLDABLE or len(n.input) < 3 or not n.input[2]:
            continue
        chain, t = [], n.output[0]
        for op in ("Mul", "Add"):
            rs = readers.get(t, [])
            if len(rs) != 1 or rs[0].op_type != op:
                break
            other = [x for x in rs[0].input if x != t]
            if len(other) != 1 or not _is_const(g, other[0]):
                break
            chain.append(op)
            t = rs[0].output[0]
        if chain == ["Mul", "Add"]:
            out.add(_label(n))
    return out


def _pr(chosen: set[str], truth: set[str]) -> tuple[float, float]:
    hit = len(chosen & truth)
    precision = hit / len(chosen) if chosen else (1.0 if not truth else 0.0)
    recall = hit / len(truth) if truth else 1.0
    return precision, recall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "streamnorm_zoo"))
    p.add_argument("--show", action="store_true", help="name the missed and the wrong layers")
    args = p.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    rows = []
    for name in TORCH_MODELS + PADDLE_MODELS:
        if name in TORCH_MODELS:
            path, unfolded = torch_exports(name, args.cache)
            truth = torch_truth(path, unfolded)
        else:
            import _zoo

            path = _zoo.paddleocr_model(name)
            truth = paddle_truth(path)
            name = f"PP-OCR {name}"
        old = old_rule(onnx.load(path, load_external_data=False))
        new = new_rule(path)
        rows.append((name, len(truth), old, new, truth))
    head = (
        f"{'model':<20} {'#truth':>6}  {'#before':>7} {'prec':>5} {'recall':>6}"
        f"  {'#after':>6} {'prec':>5} {'recall':>6}"
    )
    print(head)
    print("-" * len(head))
    for name, n, old, new, truth in rows:
        po, ro = _pr(old, truth)
        pn, rn = _pr(new, truth)
        print(
            f"{name:<20} {n:>6}  {len(old):>7} {po:>5.3f} {ro:>6.3f}"
            f"  {len(new):>6} {pn:>5.3f} {rn:>6.3f}"
        )
        if args.show:
            for what, names in (("missed", truth - new), ("wrong", new - truth)):
                for x in sorted(names):
                    print(f"    {what}: {x}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
