"""Lazy imports of optional extras, with an install hint when one is missing."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

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


def lazy_names(
    package: str, modules: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of a package whose public names live in private
    modules imported on first use.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    modules : mapping of str to iterable of str
        Each private module, relative to ``package`` (``"._hooks"``), and the names it defines.

    Returns
    -------
    (__getattr__, __dir__)
        To assign at the package's top level. A name is imported once, then cached in the
        package's namespace; an unknown name raises ``AttributeError``.
    """
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
