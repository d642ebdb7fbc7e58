"""The one home of input checks, with plain names (``check_*``), used at the public boundary only.

Kernels and estimator arithmetic validate nothing; public functions call these. Every check raises
one of the library's errors (:mod:`streamnorm._errors`), which subclass ``TypeError`` /
``ValueError``, with a message saying what was expected, what was received and how to fix it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._errors import InputError, InputTypeError

NAN_POLICIES = ("propagate", "raise", "omit")
VAR_CONVENTIONS = ("biased", "unbiased")

Axis = int | Sequence[int] | None


# --------------------------------------------------------------------------------------------
# scalars


def is_int(value: Any) -> bool:
    """An int (Python or numpy) that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A real int or float (Python or numpy) that is not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """An int (not a bool) ``>= minimum``."""
    if not is_int(value):
        raise InputTypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    """An int ``>= 1`` (sizes, counts of samples)."""
    if not is_int(value) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_optional_positive_int(name: str, value: Any) -> int | None:
    """``None`` or an int ``>= 1``."""
    return None if value is None else check_positive_int(name, value)


def check_size(name: str, value: Any) -> int:
    """A positive int (a batch size): ``InputTypeError`` for a non-int, ``InputError`` for < 1."""
    if not is_int(value):
        raise InputTypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise InputError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (numpy bools too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputTypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_fraction(
    name: str, value: Any, *, low: float = 0.0, high: float = 1.0, closed: str = "right"
) -> float:
    """A finite real number in an interval; ``closed`` says which ends are included.

    ``closed`` is one of ``"right"`` (``(low, high]``), ``"left"`` (``[low, high)``), ``"both"``,
    ``"neither"``.
    """
    if not is_number(value):
        raise InputTypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    lo_ok = v >= low if closed in ("left", "both") else v > low
    hi_ok = v <= high if closed in ("right", "both") else v < high
    if not (math.isfinite(v) and lo_ok and hi_ok):
        left = "[" if closed in ("left", "both") else "("
        right = "]" if closed in ("right", "both") else ")"
        raise InputError(f"{name} must be in {left}{low:g}, {high:g}{right}, got {value!r}")
    return v


def check_nonnegative(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """A real number ``>= 0``, finite unless ``allow_inf`` (then ``math.inf`` is accepted)."""
    if not is_number(value):
        raise InputTypeError(f"{name} must be a number >= 0, got {value!r}")
    v = float(value)
    if math.isnan(v) or v < 0 or (math.isinf(v) and not allow_inf):
        bound = "a number >= 0 (math.inf allowed)" if allow_inf else "a finite number >= 0"
        raise InputError(f"{name} must be {bound}, got {value!r}")
    return v


def check_momentum(value: Any, name: str = "momentum") -> float:
    """A momentum in ``(0, 1]``."""
    return check_fraction(name, value, low=0.0, high=1.0, closed="right")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_nan_policy(value: Any) -> str:
    """One of ``"propagate"``, ``"raise"``, ``"omit"``."""
    return check_choice("nan_policy", value, NAN_POLICIES)


def check_var_convention(value: Any, name: str = "convention") -> str:
    """``"biased"`` (divide by n) or ``"unbiased"`` (divide by n - 1)."""
    if value not in VAR_CONVENTIONS:
        raise InputError(
            f"{name} must be 'biased' (divide by n) or 'unbiased' (divide by n - 1), got {value!r}"
        )
    return str(value)


def check_epoch(epoch: Any) -> int:
    """A non-negative int epoch."""
    if not is_int(epoch):
        raise InputTypeError(f"epoch must be a non-negative int, got {epoch!r}")
    if epoch < 0:
        raise InputError(f"epoch must be >= 0, got {epoch}; number epochs 0, 1, 2, ...")
    return int(epoch)


def check_drop(name: str, value: Any) -> int | float:
    """Epochs to drop: an int number of epochs, or a float fraction of the epochs in [0, 0.5)."""
    if is_int(value):
        if value < 0:
            raise InputError(f"{name} must be >= 0 epochs, got {value}")
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not (math.isfinite(v) and 0.0 <= v < 0.5):
            raise InputError(
                f"{name} as a fraction of the epochs must be in [0, 0.5), got {value!r}; "
                "pass an int to drop a number of epochs"
            )
        return v
    raise InputTypeError(f"{name} must be an int (epochs) or a float fraction, got {value!r}")


def check_callable(name: str, value: Any, *, optional: bool = True) -> Any:
    """A callable (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if not callable(value):
        raise InputTypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def check_split_every(split_every: Any) -> Any:
    """Dask's ``split_every``: ``None``, a dict ``{axis: blocks}``, or an int >= 2 (the blocks
    merged per node of the reduction tree)."""
    if split_every is None or isinstance(split_every, dict):
        return split_every
    if not is_int(split_every):
        raise InputTypeError(
            f"split_every must be an int >= 2, a dict or None, got {split_every!r}"
        )
    if split_every < 2:
        raise InputError(
            f"split_every must be >= 2 (blocks merged per tree node), got {split_every}"
        )
    return int(split_every)


def check_tracker(tracker: Any) -> Any:
    """``tracker`` if it has an ``update(layer, x, axis=...)`` method (a Tracker), else
    ``InputTypeError``."""
    if not callable(getattr(tracker, "update", None)):
        raise InputTypeError(
            "tracker must have an update(layer, x, axis=...) method (e.g. streamnorm.Tracker), "
            f"got {type(tracker).__name__}"
        )
    return tracker


def renamed_keyword(
    owner: str, old: str, new: str, old_value: Any, new_value: Any, *, default: Any
) -> Any:
    """The value of a renamed keyword: ``new_value``, or ``old_value`` with a warning.

    ``old_value`` is ``None`` unless the caller used the old name; then a ``DeprecationWarning``
    (pointing at the caller of ``owner``) says to use ``new``, and ``old_value`` is returned.
    Passing both names, the new one with a value other than its ``default`` and the old one's,
    raises :class:`InputTypeError`.
    """
    if old_value is None:
        return new_value
    if new_value != default and new_value != old_value:
        raise InputTypeError(
            f"{owner} got {old}={old_value!r} and {new}={new_value!r}; {old} is the old name "
            f"of {new}: pass only {new}={old_value!r}"
        )
    warnings.warn(
        f"{owner}({old}=...) is deprecated and will be removed in the next release; "
        f"use {new}={old_value!r}",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


def renamed_attribute(owner: str, old: str, new: str) -> Any:
    """A read-only property ``old`` that returns attribute ``new`` with a ``DeprecationWarning``.

    For a renamed attribute kept under its old name for one release (the class ``owner``'s
    ``old`` reads ``new``); the warning points at the code that reads it.
    """

    def read(self: Any) -> Any:
        warnings.warn(
            f"{owner}.{old} is deprecated and will be removed in the next release; "
            f"use {owner}.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self, new)

    return property(read, doc=f"Deprecated name of :attr:`{new}`.")


# --------------------------------------------------------------------------------------------
# arrays


def on_cuda_device(x: Any) -> bool:
    """True for CUDA memory: ``__cuda_array_interface__``, a CUDA DLPack device, a CUDA tensor.

    Looks only at attributes; imports nothing.
    """
    if isinstance(x, np.ndarray):
        return False
    if getattr(x, "is_cuda", False) is True:  # torch, whatever the dtype
        return True
    try:
        if hasattr(x, "__cuda_array_interface__"):
            return True
    except (TypeError, RuntimeError):  # a producer that has CAI but not for this dtype
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is None or not hasattr(x, "__dlpack__"):
        return False
    try:
        kind = int(dev()[0])
    except Exception:
        return False
    return kind in (2, 13)  # kDLCUDA, kDLCUDAManaged


def is_torch_tensor(x: Any) -> bool:
    """A ``torch.Tensor`` (recognised without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "cpu")


_DTYPE_HINTS = {
    "c": "complex numbers have no single variance; pass x.real and x.imag separately",
    "O": "convert object arrays to a numeric dtype first, e.g. np.asarray(x, dtype=float)",
    "U": "convert strings to numbers first, e.g. x.astype(float)",
    "S": "convert bytes to numbers first, e.g. x.astype(float)",
    "M": "convert datetimes to numbers first, e.g. x.astype('datetime64[s]').astype('int64')",
    "m": "convert timedeltas to numbers first, e.g. x / np.timedelta64(1, 's')",
}


def check_real_dtype(x: np.ndarray, what: str = "moments") -> np.ndarray:
    """``x`` itself for real numeric dtypes (a ``uint8`` view for bool), else ``TypeError``."""
    kind = x.dtype.kind
    if kind == "b":
        return x.view(np.uint8)
    if kind in "fiu":
        return x
    hint = _DTYPE_HINTS.get(kind, "pass a real numeric array (float, int, unsigned or bool)")
    raise InputTypeError(f"unsupported dtype {x.dtype} for {what}: {hint}")


def check_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    """Sorted non-negative reduced axes (``None``: all); numpy's ``AxisError`` when out of range."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (bool, np.bool_)):
        raise InputTypeError(f"axis must be an int, a tuple of ints or None, got {axis!r}")
    if isinstance(axis, (int, np.integer)):
        axes: Sequence[Any] = (axis,)
    elif isinstance(axis, Sequence) and not isinstance(axis, str):
        axes = axis
    else:
        raise InputTypeError(
            f"axis must be an int, a tuple of ints or None, got {type(axis).__name__}"
        )
    out = []
    for a in axes:
        if not is_int(a):
            raise InputTypeError(f"axis entries must be ints, got {a!r}")
        if not -ndim <= a < ndim:
            raise np.exceptions.AxisError(int(a), ndim)
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise InputError(f"repeated axis in {tuple(axes)}")
    return tuple(sorted(out))


def check_channel_axis(axis: int, ndim: int, layer: str) -> int:
    """The channel axis ``axis`` of a norm layer's ``ndim``-axis input, as an index in
    ``[1, ndim)``: in range (negative counts from the end, no wrapping around), and not the
    batch axis 0. ``layer`` names the layer for the message."""
    if not -ndim <= axis < ndim or axis % ndim == 0:
        raise InputError(
            f"layer {layer!r} keeps its channels on axis {axis}, which an input of {ndim} "
            "axes does not have after its batch axis 0; register the layer with the channel "
            "axis of its input (1 for NCHW, -1 for channels-last)"
        )
    return axis % ndim


def check_weights_layout(weights: Any, length: int, axis: int) -> Any:
    """``weights`` if its dtype is real and its shape ``(length,)``: one weight per sample along
    ``axis``. Reads only ``dtype``, ``ndim`` and ``shape``, so it checks a lazy (Dask) array
    without computing it; :func:`check_weights` checks the values too."""
    if weights.dtype.kind not in "fiub":
        raise InputTypeError(f"weights must be real numbers, got dtype {weights.dtype}")
    if weights.ndim != 1 or weights.shape[0] != length:
        raise InputError(
            f"weights must be 1-D with one weight per sample along axis {axis} "
            f"(length {length}), got shape {weights.shape}"
        )
    return weights


def check_weights(weights: Any, length: int, axis: int) -> np.ndarray:
    """One finite non-negative weight per sample along ``axis`` (``length`` of them), as float64."""
    w = check_weights_layout(np.asarray(weights), length, axis).astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InputError("weights must be finite and non-negative")
    return w


def nonfinite_message(bad_per_dim: np.ndarray, shape: tuple[int, ...]) -> str:
    """The message for ``nan_policy="raise"``: how many non-finite values, and in which dimensions.

    ``bad_per_dim`` counts the non-finite values of each dimension (array of ``shape``).
    """
    bad = np.asarray(bad_per_dim)
    total = int(np.sum(bad))
    where = np.argwhere(bad.reshape(shape) > 0) if shape else np.zeros((1 if total else 0, 0), int)
    dims = [tuple(int(i) for i in r) if len(r) != 1 else int(r[0]) for r in where[:10]]
    more = "" if len(where) <= 10 else f" and {len(where) - 10} more"
    return (
        f"{total} non-finite value(s) (NaN/Inf) in dimension(s) {dims}{more}; "
        "use nan_policy='omit' to skip them or 'propagate' to get NaN for those dimensions"
    )


def check_state_arrays(count: np.ndarray, mean: np.ndarray, m2: np.ndarray, what: str) -> None:
    """Reject impossible moment states: negative, infinite or NaN counts, and negative M2.

    ``what`` names the record for the message (e.g. ``"Moments record"``).
    """
    if count.size and (not np.all(np.isfinite(count)) or np.any(count < 0)):
        raise InputError(f"impossible {what}: counts must be finite and non-negative")
    if m2.size and np.any(m2 < 0):
        raise InputError(f"impossible {what}: m2 (sum of squared deviations) is negative")


__all__ = [
    "NAN_POLICIES",
    "VAR_CONVENTIONS",
    "Axis",
    "check_axes",
    "check_bool",
    "check_channel_axis",
    "check_callable",
    "check_choice",
    "check_drop",
    "check_epoch",
    "check_fraction",
    "check_int",
    "check_momentum",
    "check_nan_policy",
    "check_optional_positive_int",
    "check_positive_int",
    "check_real_dtype",
    "check_size",
    "check_state_arrays",
    "check_var_convention",
    "check_weights",
    "is_int",
    "is_number",
    "is_torch_tensor",
    "nonfinite_message",
    "on_cuda_device",
    "renamed_keyword",
]
