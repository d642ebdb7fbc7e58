"""Keras 3 BatchNormalization: tracking while training, recalibration (the Keras side of
:mod:`streamnorm.calibrate`), and recalibration of a saved ``.keras`` file.

Keras 3 has no forward hooks, so each ``BatchNormalization`` layer's ``call`` is replaced, on the
instance and only inside a ``with`` block (or a recalibration), by a wrapper that hands the
layer's input to streamnorm and then calls the original. The wrapper works with every backend in
eager mode; under ``jax.jit`` (Keras' JAX training loop) the input reaches the host through
``jax.debug.callback``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import calibrate as core
from .._errors import (
    InputError,
    InputNotFoundError,
    InputTypeError,
    OutputPathError,
    StreamnormError,
)
from .._extras import require
from .._io import atomic_write, check_output
from .._validate import check_callable, check_fraction, check_tracker

keras = require("keras")

__all__ = ["bn_layers", "recalibrate", "recalibrate_file", "track"]

_MISSING = object()


# --------------------------------------------------------------------------------------------
# finding the layers


def bn_layers(model: Any) -> list[tuple[str, Any]]:
    """Every ``keras.layers.BatchNormalization`` layer of ``model`` with its qualified name.

    Parameters
    ----------
    model : keras.Model or keras.layers.Layer
        Functional, Sequential or subclassed; nested models and layers are searched.

    Returns
    -------
    list of (str, keras.layers.BatchNormalization)
        In the order Keras tracks the sub-layers; names join the layer names from the model
        down with ``"/"`` (``"block1/batch_normalization"``). A layer used at several places
        appears once.
    """
    if not isinstance(model, keras.layers.Layer):
        raise InputTypeError(f"model must be a keras.Model or Layer, got {type(model).__name__}")
    out: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def walk(layer: Any, prefix: str) -> None:
        # Keras' own list of tracked sub-layers (what Model.layers and summary() read)
        for sub in getattr(layer, "_layers", ()):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            name = prefix + sub.name
            if isinstance(sub, keras.layers.BatchNormalization):
                out.append((name, sub))
            walk(sub, name + "/")

    walk(model, "")
    return out


def _reduce_axes(layer: Any, ndim: int) -> tuple[int, ...]:
    """Every axis of an input of rank ``ndim`` but the layer's ``axis`` (any sign)."""
    axis = int(layer.axis)
    if not -ndim <= axis < ndim:
        raise InputError(
            f"BatchNormalization layer {layer.name!r} has axis={axis}, out of range for an "
            f"input of rank {ndim}"
        )
    channel = axis % ndim
    return tuple(i for i in range(ndim) if i != channel)


def _numpy(x: Any) -> np.ndarray:
    """A backend tensor or a Keras variable (eager) as a float32/float64 numpy array."""
    if isinstance(x, keras.Variable):
        x = x.value  # the backend tensor (numpy reads a variable through a deprecated path)
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor (torch backend)
        if not x.is_floating_point() or x.element_size() < 4:
            x = x.float()
        a = x.detach().cpu().numpy()
    else:
        a = np.asarray(keras.ops.convert_to_numpy(x))
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)  # float16, bfloat16: numpy kernels read float32/64
    return a


def _to_host(x: Any, fn: Callable[[np.ndarray], None]) -> None:
    """Call ``fn`` on ``x`` as a numpy array, now (eager) or when a traced JAX step runs."""
    if keras.backend.backend() == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            jax.debug.callback(lambda a: fn(_numpy(a)), x, ordered=True)
            return
    try:
        a = _numpy(x)
    except Exception as e:
        raise InputError(
            "the BatchNormalization input is a symbolic tensor that cannot be read while the "
            f"graph is built ({type(e).__name__}); run the model eagerly, e.g. "
            "model.compile(..., run_eagerly=True)"
        ) from e
    fn(a)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _message(e: BaseException) -> str:
    """The informative line of a framework error (without Keras' "Exception encountered when
    calling ..." preamble and terminal colours), at most 300 characters."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Exception encountered when")]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _shapes(model: Any, x: Any) -> str:
    """`` (a batch of shape ...; the model takes ...)``, as far as both are known."""
    shape = getattr(x, "shape", None)
    if shape is None:
        return ""
    try:
        want = model.input_shape
    except (AttributeError, ValueError, RuntimeError):  # a subclassed model not yet built
        want = None
    takes = "" if want is None else f"; the model takes {want}"
    return f" (a batch of shape {tuple(shape)}{takes})"


def _check_mask(name: str, mask: Any) -> None:
    if mask is not None:
        raise InputError(
            f"BatchNormalization layer {name!r} got a mask; masked inputs (weighted moments) "
            "are not supported"
        )


@contextlib.contextmanager
def _patched(
    layers: Sequence[tuple[str, Any]], make: Callable[[str, Any, Callable[..., Any]], Any]
) -> Iterator[None]:
    """Replace each layer's ``call`` by ``make(name, layer, original_call)`` inside the block."""
    saved: list[tuple[Any, Any]] = []
    try:
        for name, layer in layers:
            own = vars(layer).get("call", _MISSING)
            original = layer.call
            # bypass the framework's attribute tracking: a plain instance attribute
            object.__setattr__(layer, "call", make(name, layer, original))
            saved.append((layer, own))
        yield
    finally:
        for layer, own in reversed(saved):
            if own is _MISSING:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", own)


# --------------------------------------------------------------------------------------------
# tracking


@contextlib.contextmanager
def track(model: Any, tracker: Any, *, layers: Iterable[str] | None = None) -> Iterator[Any]:
    """Feed the input of every training BatchNormalization layer of ``model`` to ``tracker``.

    Parameters
    ----------
    model : keras.Model or keras.layers.Layer
    tracker : streamnorm.Tracker
        Anything with ``update(layer: str, x, axis=...)``; layers are named as
        :func:`bn_layers` names them.
    layers : iterable of str, optional
        Only these layers; all of them by default.

    Yields
    ------
    tracker : streamnorm.Tracker
        The ``tracker`` given, fed by the patched ``call`` methods until the block exits.

    Notes
    -----
    A layer's input is fed when the layer updates its moving statistics: called with
    ``training=True`` (``model.fit``, ``model(x, training=True)``) while ``layer.trainable``.
    The axes are every axis but the layer's ``axis`` (any axis, negative included), as Keras
    reduces. ``float16`` / ``bfloat16`` inputs are converted to ``float32``. Keras keeps the
    biased variance in ``moving_variance`` and updates ``s <- momentum * s + (1 - momentum) *
    batch`` with ``momentum`` 0.99 by default: ``streamnorm.EMA(0.99, style="keras",
    unbiased=False)`` in the tracker reproduces it.

    With the JAX backend the (jitted) training step sends each input to the host with
    ``jax.debug.callback``; with TensorFlow compile the model with ``run_eagerly=True``. Masked
    inputs are refused. The original ``call`` methods come back when the block exits, also when
    it raises.

    Examples
    --------
    >>> tracker = streamnorm.Tracker({"ema": streamnorm.EMA(0.99, "keras", unbiased=False)})
    >>> with streamnorm.keras.track(model, tracker):                  # doctest: +SKIP
    ...     model.fit(x, y, epochs=3)
    """
    check_tracker(tracker)
    chosen = core.select_layers(bn_layers(model), layers, "BatchNormalization")

    def make(name: str, layer: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
            if training and layer.trainable:
                _check_mask(name, mask)
                axes = _reduce_axes(layer, len(inputs.shape))
                _to_host(inputs, lambda a: tracker.update(name, a, axis=axes))
            return original(inputs, training=training, mask=mask)

        return call

    with _patched(chosen, make):
        yield tracker


# --------------------------------------------------------------------------------------------
# the adapter


@dataclass
class _KerasAdapter(core.WatchedAdapter):
    """:class:`streamnorm.calibrate.Adapter` for a Keras model whose BatchNormalization layers'
    ``call`` is patched with :meth:`make_call` (see :func:`recalibrate`).

    Attributes
    ----------
    model : keras.Model
    bns : dict of str to keras.layers.BatchNormalization
    axes : dict of str to int
        Each layer's channel axis (non-negative).
    one_pass : bool
        Layers normalize by batch statistics (``training=True``) rather than stored ones.
    forward_fn : callable, optional
    input_key : str, optional
    """

    model: Any
    bns: dict[str, Any]
    axes: dict[str, int]
    one_pass: bool
    forward_fn: Callable[[Any, Any], Any] | None = None
    input_key: str | None = None
    current: core.ForwardPass | None = field(default=None, init=False)

    def make_call(self, name: str, layer: Any, original: Callable[..., Any]) -> Any:
        def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
            cur = self.current
            if cur is not None and name in cur.pending:
                _check_mask(name, mask)
                cur.hand(name, _numpy(inputs))
            return original(inputs, training=self.one_pass, mask=mask)

        return call

    def layers(self) -> list[core.NormLayer]:
        return [
            core.NormLayer(
                name, int(m.moving_mean.shape[0]), float(m.epsilon), "biased", self.axes[name]
            )
            for name, m in self.bns.items()
        ]

    def read(self, layer: core.NormLayer) -> core.Stats:
        m = self.bns[layer.name]
        return core.Stats(
            _numpy(m.moving_mean).astype(np.float64), _numpy(m.moving_variance).astype(np.float64)
        )

    def write(self, layer: core.NormLayer, result: core.LayerResult) -> None:
        """``moving_variance`` biased (Keras' convention), in the variables' dtype."""
        m = self.bns[layer.name]
        m.moving_mean.assign(keras.ops.cast(result.mean, m.moving_mean.dtype))
        m.moving_variance.assign(keras.ops.cast(result.var, m.moving_variance.dtype))

    def _call(self, batch: Any) -> None:
        """Run the model on ``batch``; what the framework raises about the data is an InputError.

        Keras reports data that do not fit the model (shape, rank, dtype) as plain
        ``ValueError`` / ``TypeError`` and its backends as ``RuntimeError``: they become one
        :class:`~streamnorm._errors.InputError` line, as the PyTorch and ONNX adapters do.
        """
        x = batch
        try:
            if self.forward_fn is not None:
                self.forward_fn(self.model, batch)
                return
            x = core.input_of(batch, self.input_key)
            if isinstance(x, np.ndarray) and x.dtype.kind == "f":
                x = x.astype(keras.backend.floatx(), copy=False)
            self.model(x, training=False)
        except StreamnormError:
            raise
        except (ValueError, TypeError, RuntimeError) as e:
            raise InputError(
                f"the data do not fit the model{_shapes(self.model, x)}: {_message(e)}"
            ) from e

    def call_model(self, batch: Any, current: core.ForwardPass) -> None:
        """A forward pass whose patched calls hand their inputs to ``current``."""
        self.current = current
        try:
            self._call(batch)
        finally:
            self.current = None

    def remote(self) -> Callable[[], _KerasAdapter]:
        raise InputError("Keras models are recalibrated locally; client= is not supported")


class _Snapshot:
    """Moving statistics, momenta and ``trainable`` flags of the layers, to put back exactly."""

    def __init__(self, bns: dict[str, Any]) -> None:
        self.values = [
            (v, _numpy(v).copy()) for m in bns.values() for v in (m.moving_mean, m.moving_variance)
        ]
        self.modes = [(m, m.momentum, m.trainable) for m in bns.values()]

    def restore_values(self) -> None:
        for v, value in self.values:
            v.assign(value)

    def restore_modes(self) -> None:
        for m, momentum, trainable in self.modes:
            m.momentum = momentum
            if m.trainable != trainable:
                m.trainable = trainable


def _prepare(model: Any) -> tuple[dict[str, Any], dict[str, int]]:
    if not isinstance(model, keras.layers.Layer):
        raise InputTypeError(f"model must be a keras.Model, got {type(model).__name__}")
    bns = dict(bn_layers(model))
    if not bns:
        raise InputError("the model has no BatchNormalization layer to calibrate")
    axes: dict[str, int] = {}
    for name, m in bns.items():
        if not m.built:
            raise InputError(
                f"BatchNormalization layer {name!r} is not built yet; build the model (call it "
                "on a batch) before recalibrating"
            )
        if getattr(m, "renorm", False):
            raise InputError(
                f"BatchNormalization layer {name!r} uses renorm=True, whose moving statistics "
                "are kept differently; it is not supported"
            )
        ndim = m.input_spec.ndim if m.input_spec is not None else None
        axis = int(m.axis)
        axes[name] = axis % ndim if ndim else axis
        if axes[name] < 0:
            raise InputError(f"cannot tell the input rank of layer {name!r} (axis={axis})")
    return bns, axes


def recalibrate(
    model: Any,
    data: Any,
    *,
    estimator: str = "population",
    num_samples: int | None = None,
    mode: str = "one-pass",
    momentum: float = 0.99,
    batch_size: int = 64,
    forward_fn: Callable[[Any, Any], Any] | None = None,
    input_key: str | None = None,
    progress: bool = True,
) -> core.CalibrationReport:
    """Re-estimate every BatchNormalization layer's ``moving_mean`` / ``moving_variance``.

    Parameters
    ----------
    model : keras.Model
        Built. Changed in place: only the moving statistics; the layers' ``momentum`` and
        ``trainable`` come back as they were.
    data : numpy.ndarray, path, streamnorm Dataset or iterable of batches
        Arrays and files (see :func:`streamnorm.calibrate.open_data`) are cut into batches of
        ``batch_size`` (floating arrays cast to ``keras.backend.floatx()``). Any other iterable
        yields batches: arrays / tensors, ``(input, ...)`` tuples, or dicts (``input_key``).
        ``mode="sequential"`` needs a re-iterable.
    estimator : {"population", "cumulative", "ema"}
        ``population``: exact pooled mean and biased variance of all values each layer saw.
        ``cumulative``: equal-weight mean of the batch means and biased batch variances.
        ``ema``: Keras' own update ``s <- momentum * s + (1 - momentum) * batch``, continued
        from the stored statistics.
    num_samples : int, optional
        Use only the first ``num_samples`` samples (the last batch is cut).
    mode : {"one-pass", "sequential"}
        ``one-pass``: one pass with every BatchNormalization layer normalizing by batch
        statistics (as ``training=True``, moving statistics frozen). ``sequential``: one pass per
        layer in call order, earlier layers already recalibrated and in inference mode, which
        reaches the fixed point (afterwards every layer's inference-mode input has exactly the
        stored mean and variance on the data).
    momentum : float, default 0.99
        Keras' momentum (the old state's weight, in ``[0, 1)``) of ``estimator="ema"``.
    batch_size : int, default 64
    forward_fn : callable, optional
        ``forward_fn(model, batch)`` runs the model on a batch; by default
        ``model(input, training=False)``.
    input_key : str, optional
        The input's key in dict batches.
    progress : bool, default True
        A tqdm bar on a terminal.

    Returns
    -------
    CalibrationReport
        Per layer: samples, batches and the shift of mean and sigma in units of the old sigma;
        ``report.restore()`` puts the old statistics back.

    Notes
    -----
    Keras stores the biased variance (``M2 / n``) and this writes it so, for every estimator.
    The statistics are taken over every axis but the layer's ``axis``. Every other layer
    (dropout included) runs in inference mode (``training=False``). Layers with
    ``trainable=False`` are recalibrated too (in ``one-pass`` mode they are made trainable for
    the pass, then frozen again). On any error the model is restored exactly.
    """
    bns, axes = _prepare(model)
    m = check_fraction(
        "momentum (Keras' convention: the old state's weight)", momentum, closed="left"
    )
    settings = core.Settings.checked(core.StatsSpec.checked(estimator, 1.0 - m), mode, progress)
    check_callable("forward_fn", forward_fn)
    stream = core.Stream.of(data, batch_size, num_samples, input_key)
    stream.check_passes(settings.mode, "BatchNormalization")
    one_pass = settings.mode == "one-pass"
    adapter = _KerasAdapter(model, bns, axes, one_pass, forward_fn, input_key)
    snap = _Snapshot(bns)
    try:
        if one_pass:
            for layer in bns.values():
                layer.momentum = 1.0  # batch statistics normalize, moving ones stay
                if not layer.trainable:
                    layer.trainable = True
        with _patched(list(bns.items()), adapter.make_call):
            return core.calibrate(adapter, stream, settings, undo=snap.restore_values)
    finally:
        snap.restore_modes()


# --------------------------------------------------------------------------------------------
# files


def _check_paths(model_path: Any, out_path: Any) -> tuple[str, str]:
    for what, p in (("model_path", model_path), ("out_path", out_path)):
        if not isinstance(p, (str, os.PathLike)):
            raise InputTypeError(f"{what} must be a str or path-like, got {type(p).__name__}")
    mp, op = os.fspath(model_path), os.fspath(out_path)
    if not os.path.isfile(mp):
        raise InputNotFoundError(f"model file {mp!r} does not exist")
    if not op.endswith(".keras"):
        raise OutputPathError(f"out_path must end in .keras (Keras' file format), got {op!r}")
    if os.path.realpath(mp) == os.path.realpath(op):
        raise OutputPathError(
            f"out_path {op!r} is the input model; the input file is never modified, write to "
            "another path"
        )
    check_output(op, [mp])
    return mp, op


def recalibrate_file(
    model_path: str | os.PathLike[str],
    data: Any,
    out_path: str | os.PathLike[str],
    **options: Any,
) -> core.CalibrationReport:
    """Write a copy of a ``.keras`` model whose BatchNormalization statistics are recalibrated.

    Parameters
    ----------
    model_path : str or path-like
        A ``.keras`` file (``model.save``). Never modified.
    data : numpy.ndarray, path or streamnorm Dataset
        As for :func:`recalibrate`.
    out_path : str or path-like
        Ends in ``.keras``; written atomically (a temporary file in the same folder, then
        renamed), so that on any error nothing is written.
    **options
        Passed to :func:`recalibrate` (``estimator``, ``mode``, ``num_samples``...).

    Returns
    -------
    CalibrationReport
    """
    mp, op = _check_paths(model_path, out_path)
    try:
        model = keras.saving.load_model(mp)
    except Exception as e:
        raise InputError(f"{mp!r} is not a readable .keras model: {e}") from e
    report = recalibrate(model, data, **options)
    report.undo = None  # the input file is untouched; nothing to restore
    try:
        # Keras saves to paths ending in .keras: a scratch file, then an atomic copy
        with tempfile.TemporaryDirectory(
            prefix=".tmp-", dir=os.path.dirname(os.path.abspath(op))
        ) as tmp:
            scratch = os.path.join(tmp, "model.keras")
            keras.saving.save_model(model, scratch)
            with open(scratch, "rb") as src:
                atomic_write(op, lambda f: shutil.copyfileobj(src, f))
    except OSError as e:
        raise OutputPathError(f"cannot write {op!r}: {e.strerror or e}") from e
    return report
