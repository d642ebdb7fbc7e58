"""Lazy imports of optional extras, with an install hint when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from ._errors import MissingExtraError

_HINTS = {
    "torch": "torch",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "dask": "dask",
    "distributed": "dask",
    "matplotlib": "plot",
    "tqdm": "torch",
    "numba.cuda": "cuda",
    "sklearn": "bench",
    "keras": "keras",
    "lightning": "lightning",
}


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise ``MissingExtraError`` (an ``ImportError``) naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = extra or _HINTS.get(module.split(".")[0], module)
        raise MissingExtraError(
            f"{module} is needed for this and is not installed: "
            f"pip install 'streamnorm[{extra}]' (or pip install {module.split('.')[0]})"
        ) from e
