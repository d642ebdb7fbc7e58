"""Keras 3 adapter (extra ``keras``): training hooks and recalibration of BatchNormalization.

:func:`track` feeds the input of every ``keras.layers.BatchNormalization`` layer to a
:class:`~streamnorm.Tracker` while the model trains; :func:`recalibrate` re-estimates their
``moving_mean`` / ``moving_variance`` from data (the Keras side of :mod:`streamnorm.calibrate`);
:func:`recalibrate_file` does it for a saved ``.keras`` file and writes a new one. Any Keras
backend works (PyTorch, JAX, TensorFlow); set ``KERAS_BACKEND`` before Keras is first imported.

The names live in a private module imported on first use, so that ``import streamnorm`` never
loads Keras and a missing extra reports itself clearly.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .._errors import MissingExtraError
from .._extras import require

if importlib.util.find_spec("keras") is None:
    require("keras")
try:
    importlib.import_module("keras")
except ImportError as e:  # keras is there, its backend is not
    raise MissingExtraError(
        f"keras is installed but cannot load its backend ({e}); set the environment variable "
        "KERAS_BACKEND to an installed backend (torch, jax or tensorflow) before keras is first "
        "imported"
    ) from e

_NAMES = {
    "track": "._adapter",
    "bn_layers": "._adapter",
    "recalibrate": "._adapter",
    "recalibrate_file": "._adapter",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'streamnorm.keras' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __package__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
