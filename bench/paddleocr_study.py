"""PaddleOCR under recalibration: the ONNX files shipped in rapidocr-onnxruntime (PP-OCRv4
detector and recognizer, v2.0 orientation classifier) on text rendered here.

Data (made by the code, nothing downloaded): random words and numbers drawn with DejaVu Sans
(the TTF shipped in matplotlib) in black on white.

- ``det``: pages of ``--size`` x ``--size`` pixels with lines at random positions; the truth is
  each line's box. Input as rapidocr feeds it: ``(x / 255 - 0.5) / 0.5``, NCHW, 3 equal channels.
  Score: the detector's probability map goes through rapidocr's ``DBPostProcess`` (thresh 0.3,
  box_thresh 0.5, unclip 1.6, dilation: rapidocr's defaults); each detected quadrilateral becomes
  its axis-aligned box, boxes and truth lines are matched greedily by IoU >= 0.5 (best first), and
  F1 = 2PR / (P + R) over all pages.
- ``rec``: one line of 4-12 characters, resized to height 48, padded with zeros to width 320 as
  rapidocr's ``resize_norm_img`` does; CTC greedy decoding with the model's character list
  (metadata ``character``); score: exact match of the whole line.
- ``cls``: one line at 3 x 48 x 192 (padded with zeros), half of them rotated by 180 degrees;
  score: accuracy of the label (0 / 180).

Shift: low contrast (``128 + c (x - 128)``) plus Gaussian noise, clipped to 0..255.

Recalibration goes through the command line (``streamnorm annotate`` on clean samples,
``streamnorm calibrate`` on the calibration set) in this process; the evaluation sets are other
samples. Run from the repository root::

    python bench/paddleocr_study.py det --pages 40                       # the detector table
    python bench/paddleocr_study.py rec cls --lines 80 --n-values 8 24   # recognizer, classifier
    python bench/paddleocr_study.py det --pages 12                       # smaller

Besides the recalibrations through the command line, the study edits copies of the models to
test hypotheses: BatchNorm nodes turned into their own per-channel ``Mul`` + ``Add`` (so that
a recalibration leaves them alone), original statistics written back into some nodes, other
``epsilon``. Every number is printed as a table row; bench/RESULTS.md section 10 keeps a run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import math
import os
import string
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import _zoo  # noqa: E402

# --------------------------------------------------------------------------------------------
# rendering


def _font_path() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/fonts/ttf/DejaVuSans.ttf")


_FONTS: dict[int, Any] = {}


def _font(size: int) -> Any:
    from PIL import ImageFont

    if size not in _FONTS:
        _FONTS[size] = ImageFont.truetype(_font_path(), size)
    return _FONTS[size]


_ALNUM = string.ascii_letters + string.digits


def _word(rng: np.random.Generator, lo: int = 2, hi: int = 9) -> str:
    kind = rng.integers(3)
    n = int(rng.integers(lo, hi))
    if kind == 0:
        return "".join(rng.choice(list(string.digits), n))
    if kind == 1:
        return "".join(rng.choice(list(string.ascii_lowercase), n))
    return "".join(rng.choice(list(_ALNUM), n))


def page(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A white ``size`` x ``size`` page (uint8) with lines of words; the lines' boxes
    ``(x0, y0, x1, y1)``."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    boxes = []
    y = int(rng.integers(4, 20))
    while True:
        fs = int(rng.integers(max(12, size // 40), max(16, size // 20)))
        font = _font(fs)
        text = " ".join(_word(rng) for _ in range(int(rng.integers(1, 5))))
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        w, h = x1 - x0, y1 - y0
        if w >= size - 8:
            continue
        if y + h + 4 > size:
            break
        x = int(rng.integers(4, size - w - 4))
        draw.text((x - x0, y - y0), text, fill=int(rng.integers(0, 60)), font=font)
        boxes.append((x, y, x + w, y + h))
        y += h + int(rng.integers(h // 2 + 2, 3 * h + 6))
    return np.asarray(img), boxes


def line(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A tight crop of one line of text (uint8) and its text."""
    from PIL import Image, ImageDraw

    text = _word(rng, 4, 13)
    font = _font(int(rng.integers(28, 44)))
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    pad = int(rng.integers(3, 9))
    img = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 255)
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, fill=int(rng.integers(0, 60)), font=font)
    return np.asarray(img), text


def shift(img: np.ndarray, rng: np.random.Generator, contrast: float, noise: float) -> np.ndarray:
    """Low contrast around mid-gray plus Gaussian noise, uint8."""
    x = 128.0 + contrast * (img.astype(np.float64) - 128.0)
    x += rng.normal(0.0, noise, img.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def vary(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Black-on-white ``img`` with random paper and ink levels (a third inverted) and noise."""
    paper = rng.uniform(130, 255)
    ink = rng.uniform(0, paper - 70)
    if rng.random() < 1 / 3:
        paper, ink = 255 - paper, 255 - ink
    x = ink + img.astype(np.float64) / 255.0 * (paper - ink)
    x += rng.normal(0.0, rng.uniform(0, 10), img.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W) to rapidocr's float32 (3, H, W): ``(x / 255 - 0.5) / 0.5``."""
    x = (img.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.repeat(x[None], 3, axis=0)


def fit_line(img: np.ndarray, width: int, height: int = 48) -> np.ndarray:
    """rapidocr's ``resize_norm_img``: height 48, width kept in ratio up to ``width``,
    normalized, zero-padded on the right to ``width``."""
    import cv2

    h, w = img.shape
    rw = min(width, int(math.ceil(height * w / h)))
    x = normalize(cv2.resize(img, (rw, height)))
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = x
    return out


# --------------------------------------------------------------------------------------------
# running and scoring


def session(path: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def predict(path: str, x: np.ndarray, batch: int = 8) -> np.ndarray:
    sess = session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def det_f1(probs: np.ndarray, truth: list[list[tuple[int, int, int, int]]]) -> float:
    """F1 of rapidocr's DB boxes against the truth lines, IoU >= 0.5, greedy matching."""
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

    post = DBPostProcess(
        thresh=0.3, box_thresh=0.5, unclip_ratio=1.6, use_dilation=True, score_mode="fast"
    )
    tp = n_det = n_true = 0
    for p, boxes in zip(probs, truth, strict=True):
        quads, _ = post(p[None], p.shape[-2:])
        found = [
            (q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max())
            for q in np.asarray(quads, dtype=np.float64).reshape(-1, 4, 2)
        ]
        pairs = sorted(
            ((_iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(boxes)),
            reverse=True,
        )
        used_f: set[int] = set()
        used_t: set[int] = set()
        for iou, i, j in pairs:
            if iou < 0.5:
                break
            if i not in used_f and j not in used_t:
                used_f.add(i)
                used_t.add(j)
        tp += len(used_f)
        n_det += len(found)
        n_true += len(boxes)
    prec = tp / n_det if n_det else 0.0
    rec = tp / n_true if n_true else 0.0
    return 2 * prec * rec / (prec + rec) if prec + rec else 0.0


def characters(path: str) -> list[str]:
    """The recognizer's CTC classes: blank, the metadata's characters, space (as rapidocr)."""
    meta = session(path).get_modelmeta().custom_metadata_map
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    out = []
    for idx in probs.argmax(axis=2):
        keep = np.ones(len(idx), bool)
        keep[1:] = idx[1:] != idx[:-1]
        out.append("".join(chars[i] for i in idx[keep & (idx != 0)]))
    return out


# --------------------------------------------------------------------------------------------
# recalibration through the command line


def cli(*args: str) -> None:
    """``streamnorm ARGS`` in this process, its output swallowed; raises on failure."""
    from streamnorm.cli import main

    buf = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(buf),
        contextlib.redirect_stderr(buf),
    ):
        warnings.simplefilter("ignore")
        rc = main([*args, "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"streamnorm {' '.join(args)} failed: {buf.getvalue()[-2000:]}")


def adapt(
    model: str,
    work: str,
    src: str | None,
    data: str,
    layers: list[str] | None = None,
    extra: tuple[str, ...] = (),
    tag: str = "m",
) -> str:
    """Annotate ``model`` on ``src`` (with ``layers``; none: no annotation, so BatchNorm
    nodes only), calibrate on ``data``; the path of the result."""
    out = os.path.join(work, f"{tag}.onnx")
    cal_in = model
    if src is not None:
        cal_in = os.path.join(work, f"{tag}.annotated.onnx")
        args = ["annotate", model, "--data", src, "--out", cal_in, "--batch-size", "8"]
        if layers:
            args += ["--layers", *layers]
        cli(*args)
    if src is None:
        extra = ("--bn-only", *extra)
    cli("calibrate", cal_in, "--data", data, "--out", out, "--batch-size", "8", *extra)
    return out


def affine_convs(path: str) -> list[str]:
    """Conv nodes with a bias whose only reader is a ``Mul`` by a constant followed by an ``Add``
    of a constant: paddle2onnx's Conv + (folded BN) + learnable affine, before the activation."""
    import onnx

    g = onnx.load(path).graph
    readers: dict[str, list[Any]] = collections.defaultdict(list)
    for n in g.node:
        for x in n.input:
            readers[x].append(n)
    consts = {n.output[0] for n in g.node if n.op_type == "Constant"}
    consts |= {t.name for t in g.initializer}
    out = []
    for n in g.node:
        if n.op_type != "Conv" or len(n.input) < 3:
            continue
        r = readers[n.output[0]]
        if len(r) != 1 or r[0].op_type != "Mul" or not set(r[0].input) & consts:
            continue
        r2 = readers[r[0].output[0]]
        if len(r2) == 1 and r2[0].op_type == "Add" and set(r2[0].input) & consts:
            out.append(n.output[0])
    return out


def bn_nodes(path: str) -> list[Any]:
    import onnx

    return [n for n in onnx.load(path).graph.node if n.op_type == "BatchNormalization"]


# --------------------------------------------------------------------------------------------
# the detector


def det_study(args: argparse.Namespace, work: str) -> None:
    model = _zoo.paddleocr_model("det")
    rng = np.random.default_rng(args.seed)
    sets = {}
    for name in ("source", "calib", "test"):
        pages = [page(rng, args.size) for _ in range(args.pages)]
        sets[name] = ([p for p, _ in pages], [b for _, b in pages])
    clean = {k: np.stack([normalize(p) for p in v[0]]) for k, v in sets.items()}
    shifted = {
        k: np.stack([normalize(shift(p, rng, args.contrast, args.noise)) for p in v[0]])
        for k, v in sets.items()
    }
    paths = {}
    for k in ("source", "calib"):
        for kind, arrs in (("clean", clean), ("shifted", shifted)):
            paths[kind, k] = os.path.join(work, f"det_{kind}_{k}.npy")
            np.save(paths[kind, k], arrs[k])
    truth = sets["test"][1]
    right = affine_convs(model)
    print(
        f"det: {args.pages} pages of {args.size}x{args.size} per set, "
        f"{sum(len(b) for b in truth)} lines in the test set; {len(bn_nodes(model))} "
        f"BatchNormalization nodes, {len(right)} Conv + affine layers; "
        f"shift: contrast {args.contrast}, noise sigma {args.noise}"
    )
    print("| data | model | F1 | time (s) |\n|---|---|---|---|")

    def row(data: str, label: str, path: str, t: float) -> None:
        x = clean["test"] if data == "clean" else shifted["test"]
        print(f"| {data} | {label} | {det_f1(predict(path, x), truth):.3f} | {t:.0f} |", flush=True)

    row("clean", "original", model, 0)
    row("shifted", "original", model, 0)
    for data in ("shifted", "clean"):
        calib = paths[data, "calib"]
        src = paths["clean", "source"]
        for label, s, layers in (
            ("BN nodes only (no annotation)", None, None),
            ("annotate + calibrate, defaults", src, None),
            (f"BN nodes + the {len(right)} Conv + affine layers", src, right),
        ):
            t = time.perf_counter()
            out = adapt(model, work, s, calib, layers, tag=f"det_{data}")
            row(data, label, out, time.perf_counter() - t)
        # the head's BatchNorm nodes left as they are: the Conv + affine layers only
        head_kept = frozen(model, os.path.join(work, "det_frozen.onnx"), set())
        t = time.perf_counter()
        out = adapt(head_kept, work, src, calib, right, tag=f"det_{data}")
        row(
            data,
            f"the {len(right)} Conv + affine layers only (head BN nodes kept)",
            out,
            time.perf_counter() - t,
        )


# --------------------------------------------------------------------------------------------
# the recognizer and the classifier


def _lines(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[str]]:
    made = [line(rng) for _ in range(n)]
    return [m for m, _ in made], [t for _, t in made]


class _Tensors:
    """Named tensors of an ONNX graph (initializers and ``Constant`` nodes), read and written."""

    def __init__(self, path: str) -> None:
        import onnx

        self.model = onnx.load(path)
        g = self.model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def get(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name]).copy()
        return numpy_helper.to_array(self.consts[name].attribute[0].t).copy()

    def set(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        t = numpy_helper.from_array(value.astype(self.get(name).dtype), name)
        if name in self.inits:
            self.inits[name].CopyFrom(t)
        else:
            self.consts[name].attribute[0].t.CopyFrom(t)

    def bns(self) -> list[Any]:
        return [n for n in self.model.graph.node if n.op_type == "BatchNormalization"]

    def save(self, path: str) -> str:
        import onnx

        onnx.save(self.model, path)
        return path


def bn_stats(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(mean, var)`` of every BatchNormalization node, in graph order."""
    t = _Tensors(path)
    return [(t.get(n.input[3]), t.get(n.input[4])) for n in t.bns()]


def with_stats(path: str, out: str, stats: list[tuple[np.ndarray, np.ndarray] | None]) -> str:
    """A copy of ``path`` whose BatchNormalization nodes get ``stats`` (``None``: unchanged)."""
    t = _Tensors(path)
    for n, st in zip(t.bns(), stats, strict=True):
        if st is not None:
            t.set(n.input[3], st[0])
            t.set(n.input[4], st[1])
    return t.save(out)


def with_eps(path: str, out: str, eps: float) -> str:
    """A copy of ``path`` whose BatchNormalization nodes have ``epsilon = eps``."""
    from onnx import helper

    t = _Tensors(path)
    for n in t.bns():
        kept = [a for a in n.attribute if a.name != "epsilon"]
        del n.attribute[:]
        n.attribute.extend([*kept, helper.make_attribute("epsilon", float(eps))])
    return t.save(out)


def frozen(path: str, out: str, keep: set[int]) -> str:
    """A copy of ``path`` whose BatchNormalization nodes other than ``keep`` (indices in graph
    order) become the same per-channel ``Mul`` + ``Add`` (so that a BN-only recalibration
    leaves them as they are)."""
    import onnx
    from onnx import helper, numpy_helper

    t = _Tensors(path)
    g = t.model.graph
    nodes = list(g.node)
    bns = [n for n in nodes if n.op_type == "BatchNormalization"]
    for i, n in enumerate(bns):
        if i in keep:
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (t.get(x).astype(np.float64) for x in n.input[1:5])
        a = gamma / np.sqrt(var + eps)
        b = beta - mean * a
        shape = (len(a), 1, 1)
        an, bn, mid = f"{n.output[0]}__a", f"{n.output[0]}__b", f"{n.output[0]}__mul"
        g.initializer.extend(
            [
                numpy_helper.from_array(a.reshape(shape).astype(np.float32), an),
                numpy_helper.from_array(b.reshape(shape).astype(np.float32), bn),
            ]
        )
        k = nodes.index(n)
        nodes[k : k + 1] = [
            helper.make_node("Mul", [n.input[0], an], [mid]),
            helper.make_node("Add", [mid, bn], [n.output[0]]),
        ]
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(t.model, out)
    return out


def bn_spatial(path: str, x: np.ndarray) -> list[int]:
    """Positions (H x W) per channel of every BatchNormalization input on ``x`` (one sample)."""
    import onnx

    m = onnx.load(path)
    names = [n.input[0] for n in m.graph.node if n.op_type == "BatchNormalization"]
    m.graph.output.extend([onnx.ValueInfoProto(name=nm) for nm in names])
    with tempfile.TemporaryDirectory() as d:
        tmp = os.path.join(d, "probe.onnx")
        onnx.save(m, tmp)
        sess = session(tmp)
        outs = sess.run(names, {sess.get_inputs()[0].name: x[:1]})
    return [int(np.prod(o.shape[2:])) for o in outs]


def shift_sizes(
    old: list[tuple[np.ndarray, np.ndarray]], new: list[tuple[np.ndarray, np.ndarray]]
) -> list[tuple[float, float, float]]:
    """Per node: median |mean shift| in old sigma, median log(sigma_new / sigma_old) (signed), and
    the fraction of channels whose variance fell below a tenth."""
    out = []
    for (m0, v0), (m1, v1) in zip(old, new, strict=True):
        v0, v1 = v0.astype(np.float64), v1.astype(np.float64)
        s0 = np.sqrt(v0 + 1e-5)
        out.append(
            (
                float(np.median(np.abs(m1 - m0) / s0)),
                float(np.median(0.5 * np.log((v1 + 1e-5) / (v0 + 1e-5)))),
                float(np.mean(v1 < 0.1 * v0)),
            )
        )
    return out


@dataclass
class _Task:
    """One of the two line models: how its inputs are made and scored."""

    which: str
    model: str
    width: int
    make: Callable[[list[np.ndarray], np.ndarray, int], np.ndarray]
    score: Callable[[str, np.ndarray], float]


def _task(which: str, test_text: list[str], test_flips: np.ndarray) -> _Task:
    model = _zoo.paddleocr_model(which)
    if which == "rec":
        chars = characters(model)

        def make(imgs: list[np.ndarray], flips: np.ndarray, width: int) -> np.ndarray:
            return np.stack([fit_line(im, width) for im in imgs])

        def score(path: str, x: np.ndarray) -> float:
            got = ctc_decode(predict(path, x), chars)
            return float(np.mean([g == t for g, t in zip(got, test_text, strict=True)]))

        return _Task(which, model, 320, make, score)

    def make_cls(imgs: list[np.ndarray], flips: np.ndarray, width: int) -> np.ndarray:
        return np.stack(
            [
                fit_line(im[::-1, ::-1] if f else im, width)
                for im, f in zip(imgs, flips, strict=True)
            ]
        )

    def score_cls(path: str, x: np.ndarray) -> float:
        return float(np.mean(predict(path, x).argmax(axis=1) == test_flips.astype(int)))

    return _Task(which, model, 192, make_cls, score_cls)


def rec_cls_study(args: argparse.Namespace, work: str, which: str) -> None:
    rng = np.random.default_rng(args.seed + (1 if which == "rec" else 2))
    n = args.lines
    test_imgs, test_text = _lines(rng, n)
    test_flips = rng.random(n) < 0.5
    cal_imgs, _ = _lines(rng, n)
    cal_flips = rng.random(n) < 0.5
    other_imgs, _ = _lines(rng, n)
    other_flips = rng.random(n) < 0.5
    task = _task(which, test_text, test_flips)
    model, width = task.model, task.width
    test = task.make(test_imgs, test_flips, width)
    cal = task.make(cal_imgs, cal_flips, width)
    other = task.make(other_imgs, other_flips, width)
    old = bn_stats(model)
    spatial = bn_spatial(model, test)
    padded = float(np.mean(np.all(test == 0, axis=(1, 2))))
    print(
        f"\n{which}: {n} test lines, calibration sets of {n} other lines (3 x 48 x {width}, "
        f"zero padding = {padded:.2f} of the width); {len(old)} BatchNormalization nodes "
        f"(eps 1e-5), positions per channel {min(spatial)}..{max(spatial)}; "
        f"{len(affine_convs(model))} Conv + affine layers"
    )
    print("| experiment | setting | score | time (s) |\n|---|---|---|---|")

    def row(label: str, setting: str, path: str, t0: float | None = None) -> None:
        t = "" if t0 is None else f"{time.perf_counter() - t0:.0f}"
        print(f"| {label} | {setting} | {task.score(path, test):.3f} | {t} |", flush=True)

    def calibrate(
        data: np.ndarray | str,
        tag: str,
        src: str | None = None,
        base: str = model,
        extra: tuple[str, ...] = (),
    ) -> str:
        if isinstance(data, np.ndarray):
            path = os.path.join(work, f"{which}_{tag}.npy")
            np.save(path, data)
        else:
            path = data
        return adapt(base, work, src, path, None, extra, tag=f"{which}_{tag}")

    row("original", "as shipped", model)
    # 1. samples: N lines, BN nodes only
    for k in args.n_values:
        t = time.perf_counter()
        row("samples", f"N={k}, BN nodes only", calibrate(cal[:k], f"n{k}"), t)
    t = time.perf_counter()
    full = calibrate(cal, "all")
    row("samples", f"N={n}, BN nodes only", full, t)
    t = time.perf_counter()
    row("samples", f"N={n} (set B), BN nodes only", calibrate(other, "other"), t)
    new, new_b = bn_stats(full), bn_stats(os.path.join(work, f"{which}_other.onnx"))
    if affine_convs(model):
        src = os.path.join(work, f"{which}_src.npy")
        np.save(src, other)
        t = time.perf_counter()
        row(
            "layers",
            f"annotate (set B) + calibrate, defaults, N={n}",
            calibrate(cal, "ann", src),
            t,
        )
    # a broader domain: random ink and paper levels, a third inverted, some noise
    varied = task.make([vary(im, rng) for im in cal_imgs], cal_flips, width)
    t = time.perf_counter()
    varied_path = calibrate(varied, "varied")
    row(
        "domain",
        f"N={n} varied lines (ink/paper levels, inverted, noise), BN nodes only",
        varied_path,
        t,
    )
    # 2. per-layer shifts: original -> rendered text, against set A -> set B (sampling noise)
    print(
        "\n| node | positions | original -> rendered: mean / log sigma / var < 1/10 | "
        "set A -> set B: mean / log sigma | original -> varied: mean / log sigma / var < 1/10 |"
        "\n|---|---|---|---|---|"
    )
    big = shift_sizes(old, new)
    noise = shift_sizes(new_b, new)
    wide = shift_sizes(old, bn_stats(varied_path))
    for i, (a, b, c) in enumerate(zip(big, noise, wide, strict=True)):
        print(
            f"| {i} | {spatial[i]} | {a[0]:.2f} / {a[1]:+.2f} / {a[2]:.2f} | "
            f"{b[0]:.2f} / {b[1]:+.2f} | {c[0]:.2f} / {c[1]:+.2f} / {c[2]:.2f} |"
        )
    print("\n| experiment | setting | score | time (s) |\n|---|---|---|---|")
    # 3. which nodes: recalibrate one group, the others frozen as they were
    nb = len(old)
    groups = (
        {"stem (node 0)": {0}, "neck before SVTR (1, 2)": {1, 2}, "after SVTR (3-5)": {3, 4, 5}}
        if which == "rec"
        else {
            "first third": set(range(nb // 3)),
            "middle third": set(range(nb // 3, 2 * nb // 3)),
            "last third": set(range(2 * nb // 3, nb)),
            f"positions >= 64 ({sum(s >= 64 for s in spatial)} nodes)": {
                i for i, s in enumerate(spatial) if s >= 64
            },
        }
    )
    for label, keep in groups.items():
        base = frozen(model, os.path.join(work, f"{which}_frozen.onnx"), keep)
        t = time.perf_counter()
        row("which nodes", f"only {label} recalibrated", calibrate(cal, "grp", base=base), t)
    for label, drop in groups.items():
        stats = [old[i] if i in drop else None for i in range(nb)]
        path = with_stats(full, os.path.join(work, f"{which}_keep.onnx"), stats)
        row("which nodes", f"all recalibrated, then {label} put back", path)
    # 4. variance: the collapsed channels keep their original variance; eps x 100
    floor = [(m1, np.maximum(v1, v0)) for (m0, v0), (m1, v1) in zip(old, new, strict=True)]
    row(
        "variance",
        "new means, variance never below the original",
        with_stats(full, os.path.join(work, f"{which}_floor.onnx"), list(floor)),
    )
    mean_only = [(m1, v0) for (m0, v0), (m1, v1) in zip(old, new, strict=True)]
    row(
        "variance",
        "new means, original variances",
        with_stats(full, os.path.join(work, f"{which}_mean.onnx"), list(mean_only)),
    )
    var_only = [(m0, v1) for (m0, v0), (m1, v1) in zip(old, new, strict=True)]
    row(
        "variance",
        "original means, new variances",
        with_stats(full, os.path.join(work, f"{which}_var.onnx"), list(var_only)),
    )
    for eps in (1e-3, 1e-2):
        row(
            "eps",
            f"new statistics, every BatchNorm's eps {eps:g} (was 1e-5)",
            with_eps(full, os.path.join(work, f"{which}_eps.onnx"), eps),
        )
    # 5. padding (zeros = mid-gray after normalization): calibration lines stretched to the
    # full width (no padding), or padded with the background (white) instead
    stretched = task.make([_stretch(im, width) for im in cal_imgs], cal_flips, width)
    t = time.perf_counter()
    row(
        "padding",
        "calibration lines stretched to the width (no padding)",
        calibrate(stretched, "stretched"),
        t,
    )
    white = np.where(np.all(cal == 0, axis=(1, 2), keepdims=True), np.float32(1.0), cal)
    t = time.perf_counter()
    row("padding", "calibration lines padded with white", calibrate(white, "white"), t)


def _stretch(img: np.ndarray, width: int, height: int = 48) -> np.ndarray:
    """``img`` resized to ``height`` x ``width`` whatever its ratio."""
    import cv2

    return np.asarray(cv2.resize(img, (width, height)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="+", choices=["det", "rec", "cls"])
    p.add_argument("--pages", type=int, default=40)
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--lines", type=int, default=80)
    p.add_argument("--n-values", type=int, nargs="+", default=[8, 20])
    p.add_argument("--contrast", type=float, default=0.3)
    p.add_argument("--noise", type=float, default=35.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        for what in args.what:
            if what == "det":
                det_study(args, work)
            else:
                rec_cls_study(args, work, what)


if __name__ == "__main__":
    main()
