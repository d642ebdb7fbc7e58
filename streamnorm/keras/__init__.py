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

from .._errors import MissingExtraError
from .._extras import lazy_names, require

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

__all__ = ["bn_layers", "recalibrate", "recalibrate_file", "track"]

__getattr__, __dir__ = lazy_names(__name__, {"._adapter": __all__})
