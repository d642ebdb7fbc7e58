"""Networks nobody here wrote, for the zoo tests: timm and torchvision architectures with random
weights, and the PaddleOCR ONNX models that ship inside the ``rapidocr-onnxruntime`` wheel.

Nothing is downloaded: timm and torchvision build their networks with ``pretrained=False`` /
``weights=None``, and the PaddleOCR files are read from the installed package.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import pytest


def _declare_torchvision_ops(torch: Any) -> None:
    """Let torchvision's pure-Python models import where its compiled ops cannot load.

    PyPI's torchvision wheel is built against the CUDA build of torch; beside a CPU build its
    ``_C`` extension fails to load, and ``torchvision/_meta_registrations.py`` then registers
    fake kernels for ``nms``/``qnms`` on operators that were never declared. Declaring the two
    schemas (as ``_C`` would) lets the import finish; the models, ``FrozenBatchNorm2d`` and
    every other layer the tests use are plain PyTorch modules and do not call these ops.
    """
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declare_torchvision_ops.lib = lib  # type: ignore[attr-defined]  # keep the library alive


def make_torchvision_importable() -> bool:
    """Import torchvision once, declaring its ops first where its compiled part cannot load
    (see :func:`_declare_torchvision_ops`); ``False`` when it is not installed.

    Other packages import torchvision too (Lightning through torchmetrics, timm): the test
    session calls this at start (``conftest.py``) so that they all find it importable.
    """
    try:
        import torch
    except ImportError:
        return False
    try:
        import torchvision as tv  # noqa: F401

        return True
    except ImportError:
        return False
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _declare_torchvision_ops(torch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchvision as tv  # noqa: F401
    return True


def torchvision() -> Any:
    """``import torchvision`` (skip the test when it is not installed)."""
    pytest.importorskip("torch")
    if not make_torchvision_importable():
        pytest.skip("torchvision is not installed")
    import torchvision as tv

    return tv


def timm() -> Any:
    """``import timm`` (skip the test when it is not installed); timm imports torchvision."""
    torchvision()
    return pytest.importorskip("timm")


def paddleocr_model(name: str) -> str:
    """Path of one of the ONNX models inside the installed ``rapidocr-onnxruntime`` wheel:
    ``"det"`` (PP-OCRv4 detector), ``"rec"`` (PP-OCRv4 recognizer) or ``"cls"`` (v2.0 mobile
    orientation classifier)."""
    pkg = pytest.importorskip("rapidocr_onnxruntime")
    files = {
        "det": "ch_PP-OCRv4_det_infer.onnx",
        "rec": "ch_PP-OCRv4_rec_infer.onnx",
        "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    }
    path = os.path.join(os.path.dirname(pkg.__file__), "models", files[name])
    if not os.path.exists(path):
        pytest.skip(f"{files[name]} is not in the installed rapidocr-onnxruntime")
    return path
