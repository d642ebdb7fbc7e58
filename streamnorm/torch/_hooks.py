"""Norm-layer registry, hooks that feed every BatchNorm layer's input to a Tracker, and writing
estimates back.

:func:`register_norm` says, for a layer class, which buffers hold its statistics, which axis holds
its channels and which variance convention it stores; :func:`norm_layers` finds the registered
layers of a model (every ``_BatchNorm`` and torchvision's ``FrozenBatchNorm2d`` are built in).
:func:`track` registers a forward pre-hook on each BatchNorm layer; while the layer trains, the
hook hands its input, without copying it, to ``tracker.update(name, x, axis=...)`` with the axes
BatchNorm reduces over. :func:`load_estimates` writes a Tracker's estimates into the layers'
``running_mean`` / ``running_var`` buffers in PyTorch's (unbiased) convention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputError, InputTypeError
from .._extras import require
from .._validate import check_bool, check_int, check_tracker, check_var_convention
from ..calibrate import select_layers

torch = require("torch")

from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

__all__ = [
    "UPCAST",
    "NormSpec",
    "bn_axes",
    "bn_layers",
    "load_estimates",
    "norm_candidates",
    "norm_layers",
    "norm_spec",
    "register_norm",
    "track",
    "unregistered_hint",
]

#: half-precision dtypes that CPU inputs are converted from to float32 (a copy, the only one)
UPCAST = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# the registry of norm layers


@dataclass(frozen=True)
class NormSpec:
    """How a registered norm-layer class stores its statistics.

    Attributes
    ----------
    mean, var : str
        Names of the buffers holding the per-channel mean and variance, shape (C,).
    convention : {"unbiased", "biased"}
        What the stored variance means (``_BatchNorm``: unbiased).
    channel_axis : int
        The axis of the layer's input holding the channels (negative counts from the end);
        every other axis is reduced.
    eps : str
        The attribute holding the epsilon added to the variance.
    count : str or None
        A batch-counter buffer set to the batches seen (``num_batches_tracked``), if any.
    batch_stats : bool
        The layer normalizes with batch statistics in training mode (``_BatchNorm``); ``False``
        for layers that always normalize with their buffers (``FrozenBatchNorm2d``).
    """

    mean: str = "running_mean"
    var: str = "running_var"
    convention: str = "unbiased"
    channel_axis: int = 1
    eps: str = "eps"
    count: str | None = "num_batches_tracked"
    batch_stats: bool = True


#: registered classes (matched with issubclass) and "module.Name" keys (matched by name along
#: the MRO, for classes of packages that are not imported)
_REGISTRY: dict[Any, NormSpec] = {
    _BatchNorm: NormSpec(),
    "torchvision.ops.misc.FrozenBatchNorm2d": NormSpec(count=None, batch_stats=False),
    "timm.layers.norm_act.FrozenBatchNormAct2d": NormSpec(count=None, batch_stats=False),
}


def _check_attr(what: str, value: Any, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.isidentifier():
        raise InputTypeError(f"{what} must be an attribute name (str), got {value!r}")
    return value


def _check_channel_axis(channel_axis: Any) -> int:
    axis = check_int("channel_axis", channel_axis)
    if axis == 0:
        raise InputError(
            "channel_axis must not be 0, the batch axis; pass the axis of the layer's input "
            "that holds the channels (1 for NCHW, -1 for channels-last)"
        )
    return axis


def register_norm(
    cls: Any,
    *,
    mean: str = "running_mean",
    var: str = "running_var",
    convention: str = "unbiased",
    channel_axis: int = 1,
    eps: str = "eps",
    count: str | None = "num_batches_tracked",
    batch_stats: bool = True,
) -> NormSpec:
    """Make recalibration recognise the layers of class ``cls`` (and its subclasses).

    Parameters
    ----------
    cls : type or str
        A ``torch.nn.Module`` subclass, or ``"package.module.ClassName"`` to match a class by its
        ``__module__`` and ``__name__`` without importing its package.
    mean, var : str, default "running_mean", "running_var"
        Buffers holding the statistics, shape (C,).
    convention : {"unbiased", "biased"}, default "unbiased"
        What ``var`` stores: PyTorch's ``running_var`` is unbiased (``M2 / (n - 1)``).
    channel_axis : int, default 1
        The channel axis of the layer's input; all other axes are reduced (``-1`` for
        channels-last layers). Not 0 (the batch axis); an axis the input does not have (``7``
        or ``-5`` for 4-D input) is refused when the layer's input arrives.
    eps : str, default "eps"
        The attribute holding the layer's epsilon (used for the report's shifts; a layer without
        it counts as 0).
    count : str or None, default "num_batches_tracked"
        A batch counter to set to the batches seen (skipped when the layer has none).
    batch_stats : bool, default True
        ``True``: in training mode the layer normalizes with batch statistics (as
        ``_BatchNorm``), so one-pass recalibration runs it in training mode. ``False``: it
        always normalizes with its buffers (it is left in eval mode; in one-pass mode the
        inputs downstream of it are computed with its stored statistics).

    Returns
    -------
    NormSpec
        The registered entry (a later registration of the same ``cls`` replaces it).

    Notes
    -----
    A layer is matched by its class's method resolution order, nearest class first, so a
    registration of a subclass wins over one of its base. Built in: every
    ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, the lazy
    variants), ``torchvision.ops.misc.FrozenBatchNorm2d`` and timm's
    ``timm.layers.norm_act.FrozenBatchNormAct2d`` (matched by name; they have no
    ``num_batches_tracked`` and always normalize with their buffers).

    Examples
    --------
    >>> register_norm(MyNorm, var="running_var", convention="biased")   # doctest: +SKIP
    """
    if isinstance(cls, str):
        if "." not in cls:
            raise InputError(f"cls as a string must be 'package.module.ClassName', got {cls!r}")
        key: Any = cls
    elif isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        key = cls
    else:
        raise InputTypeError(
            f"cls must be a torch.nn.Module subclass or 'module.ClassName', got {cls!r}"
        )
    spec = NormSpec(
        mean=_check_attr("mean", mean),
        var=_check_attr("var", var),
        convention=check_var_convention(convention, "convention"),
        channel_axis=_check_channel_axis(channel_axis),
        eps=_check_attr("eps", eps),
        count=_check_attr("count", count, optional=True),
        batch_stats=check_bool("batch_stats", batch_stats),
    )
    _REGISTRY[key] = spec
    return spec


def norm_spec(module: Any) -> NormSpec | None:
    """The registry entry of ``module``'s class (nearest in its MRO), or ``None``."""
    for klass in type(module).__mro__:
        spec = _REGISTRY.get(klass)
        if spec is None:
            spec = _REGISTRY.get(f"{klass.__module__}.{klass.__qualname__}")
        if spec is not None:
            return spec
    return None


def norm_layers(model: Any) -> list[tuple[str, Any, NormSpec]]:
    """Every registered norm layer of ``model`` holding statistics, in definition order.

    Returns
    -------
    list of (str, torch.nn.Module, NormSpec)
        Layers whose class is registered (see :func:`register_norm`) and whose ``mean`` and
        ``var`` buffers are tensors (a ``_BatchNorm`` with ``track_running_stats=False`` has
        none and is left out).
    """
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = []
    for name, m in model.named_modules():
        spec = norm_spec(m)
        if spec is None:
            continue
        if isinstance(getattr(m, spec.mean, None), torch.Tensor) and isinstance(
            getattr(m, spec.var, None), torch.Tensor
        ):
            out.append((name, m, spec))
    return out


def norm_candidates(model: Any) -> list[tuple[str, str]]:
    """``(name, class)`` of unregistered modules with a ``running_mean`` or ``running_var``
    buffer: layers that look like norm layers but that recalibration does not know."""
    out = []
    for name, m in model.named_modules():
        if norm_spec(m) is not None:
            continue
        own = {k for k, _ in m.named_buffers(recurse=False)}
        if own & {"running_mean", "running_var"}:
            out.append((name, f"{type(m).__module__}.{type(m).__qualname__}"))
    return out


def unregistered_hint(candidates: list[tuple[str, str]]) -> str:
    """``": <names> hold running_mean/running_var buffers ...; register them with ..."``, the
    tail of a message about the :func:`norm_candidates` of a model (``""`` for none)."""
    if not candidates:
        return ""
    listed = ", ".join(f"{name or '<model>'} ({cls})" for name, cls in candidates[:10])
    more = f" and {len(candidates) - 10} more" if len(candidates) > 10 else ""
    return (
        f": these modules hold running_mean/running_var buffers but their classes are not "
        f"registered norm layers: {listed}{more}; to include them, register their classes with "
        "streamnorm.torch.register_norm(cls, mean=..., var=..., convention=..., channel_axis=...)"
    )


def bn_layers(model: Any) -> list[tuple[str, Any]]:
    """Every BatchNorm module of ``model`` with its qualified name, in definition order.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    list of (str, torch.nn.Module)
        ``(name, module)`` for each subclass of ``torch.nn.modules.batchnorm._BatchNorm``
        (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and the ``LazyBatchNorm`` variants), in the
        order ``model.named_modules()`` visits them (the order the modules were assigned). A
        module shared at several places appears once, under its first name. ``InstanceNorm``,
        ``GroupNorm`` and ``LayerNorm`` have no running statistics and are not listed.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def bn_axes(ndim: int) -> tuple[int, ...]:
    """The axes BatchNorm reduces over for an input with ``ndim`` dimensions.

    Parameters
    ----------
    ndim : int
        2 for ``(N, C)``, 3 for ``(N, C, L)``, 4 for ``(N, C, H, W)``, 5 for ``(N, C, D, H, W)``.

    Returns
    -------
    tuple of int
        Every axis but the channel axis 1: ``(0,)``, ``(0, 2)``, ``(0, 2, 3)``, ``(0, 2, 3, 4)``.
    """
    if ndim < 2:
        raise InputError(f"BatchNorm input needs at least 2 dimensions (N, C, ...), got {ndim}")
    return (0, *range(2, ndim))


def _make_hook(tracker: Any, name: str) -> Any:
    def hook(module: Any, args: tuple[Any, ...]) -> None:
        if not module.training or not args:
            return
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.numel() == 0:
            return  # BatchNorm itself reports a malformed input
        x = x.detach()
        if x.dtype in UPCAST and not x.is_cuda:  # the GPU kernels read half precision as is
            x = x.float()
        tracker.update(name, x, axis=bn_axes(x.ndim))

    return hook


@contextlib.contextmanager
def track(model: Any, tracker: Any, *, layers: Iterable[str] | None = None) -> Iterator[Any]:
    """Feed the input of every training BatchNorm layer of ``model`` to ``tracker``.

    Parameters
    ----------
    model : torch.nn.Module
    tracker : streamnorm.Tracker
        Anything with ``update(layer: str, x, axis=...)``; layers are named by their qualified
        module names (see :func:`bn_layers`).
    layers : iterable of str, optional
        Only these BatchNorm layers (qualified names); all of them by default.

    Yields
    ------
    tracker : streamnorm.Tracker
        The ``tracker`` given, fed by the hooks until the block exits.

    Notes
    -----
    A forward pre-hook runs before each BatchNorm forward. It does nothing while the layer is
    in evaluation mode, so evaluation passes inside the block do not pollute the statistics.
    In training mode the input is detached and passed on as is: a CPU tensor reaches the kernel
    as a zero-copy strided view (``channels_last`` included), a CUDA tensor is passed as a CUDA
    tensor. Only ``float16`` / ``bfloat16`` CPU inputs are converted to ``float32`` first,
    because numpy cannot view them; the GPU kernels read them as they are. The axes are those
    BatchNorm reduces: all but the channel axis 1 (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``,
    ``(N, C, D, H, W)``).

    The hooks are removed when the block exits, also when it raises.

    Examples
    --------
    >>> with track(model, tracker):                                    # doctest: +SKIP
    ...     train(model, x, y, epochs=5, batch_size=32, on_epoch=lambda e: tracker.next_epoch())
    """
    check_tracker(tracker)
    chosen = select_layers(bn_layers(model), layers)
    handles = []
    try:
        for name, module in chosen:
            handles.append(module.register_forward_pre_hook(_make_hook(tracker, name)))
        yield tracker
    finally:
        for h in handles:
            h.remove()


def _running_var(est: Any) -> Any:
    """An estimator's variance in PyTorch's ``running_var`` convention (unbiased).

    The estimators keep what the conversion needs (the counts, or the other convention's batch
    variances), and ``running_var("unbiased")`` does it exactly; an object without it is taken
    to report the unbiased convention already.
    """
    convert = getattr(est, "running_var", None)
    if callable(convert):
        return convert("unbiased")
    return est.var


def _collect(estimates: Any, estimator: str) -> dict[str, tuple[Any, Any]]:
    """``{layer: (mean, running_var)}`` from a Tracker or an ``estimates()`` dict."""
    if not isinstance(estimator, str):
        raise InputTypeError(f"estimator must be a name (str), got {type(estimator).__name__}")
    if hasattr(estimates, "estimator") and hasattr(estimates, "estimator_names"):
        names = list(estimates.estimator_names)
        if estimator not in names:
            raise InputError(f"unknown estimator {estimator!r}; the tracker has {names}")
        out = {}
        for layer in estimates.layers:
            est = estimates.estimator(layer, estimator)
            out[layer] = (est.mean, _running_var(est))
        return out
    if not isinstance(estimates, Mapping):
        raise InputTypeError(
            "estimates must be a streamnorm.Tracker or its estimates() dict "
            f"{{layer: {{estimator: (mean, var)}}}}, got {type(estimates).__name__}"
        )
    out = {}
    for layer, per_est in estimates.items():
        if not isinstance(per_est, Mapping):
            raise InputTypeError(
                f"estimates[{layer!r}] must map estimator names to (mean, var), "
                f"got {type(per_est).__name__}"
            )
        if estimator not in per_est:
            raise InputError(
                f"unknown estimator {estimator!r} for layer {layer!r}; it has {sorted(per_est)}"
            )
        pair = per_est[estimator]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputTypeError(f"estimates[{layer!r}][{estimator!r}] must be a (mean, var) pair")
        out[layer] = (pair[0], pair[1])
    return out


def load_estimates(model: Any, estimates: Any, estimator: str = "population") -> list[str]:
    """Write one estimator's statistics into the BatchNorm buffers of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
    estimates : streamnorm.Tracker or dict
        A Tracker whose layers are named by qualified module names (as :func:`track` names
        them), or its ``estimates()`` dict ``{layer: {estimator: (mean, var)}}`` with arrays of
        shape (C,).
    estimator : str, default "population"
        Which estimator's statistics to load.

    Returns
    -------
    list of str
        The layers written, in model order. Layers of the model not named in ``estimates``
        are left as they are.

    Notes
    -----
    ``running_var`` holds an unbiased estimate of the variance (PyTorch's convention). From a
    Tracker, each estimator's variance is converted to it exactly with
    ``estimator.running_var("unbiased")``: a ``Population`` (biased ``M2 / N``) is written as
    ``M2 / (N - 1)``, a Keras-style EMA of biased batch variances as the EMA of the unbiased
    ones, which it keeps alongside. From a plain dict the variance is written as given, so it
    must already be unbiased: pass the Tracker itself when an estimator reports biased
    variances (``var_convention == "biased"``). The values are
    cast to the buffers' dtype and device; ``num_batches_tracked`` is left unchanged. All
    layers are checked before any buffer is written, so on error the model is unchanged.
    """
    layers = dict(bn_layers(model))
    stats = _collect(estimates, estimator)
    staged = []
    for layer, (mean, var) in stats.items():
        bn = layers.get(layer)
        if bn is None:
            raise InputError(
                f"layer {layer!r} of the estimates is not a BatchNorm layer of the model; "
                f"its BatchNorm layers are {sorted(layers)}"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise InputError(
                f"BatchNorm layer {layer!r} has track_running_stats=False and no buffers to load"
            )
        if isinstance(bn.running_mean, torch.nn.parameter.UninitializedBuffer):
            raise InputError(
                f"lazy BatchNorm layer {layer!r} is not initialized yet; run one forward pass first"
            )
        m = np.array(mean, dtype=np.float64).reshape(-1)  # a writable copy
        v = np.array(var, dtype=np.float64).reshape(-1)
        want = tuple(bn.running_mean.shape)
        if m.shape != want or v.shape != want:
            raise InputError(
                f"layer {layer!r} has {want[0]} channels but the {estimator!r} estimate has "
                f"mean shape {m.shape} and var shape {v.shape}; estimates come from another model"
            )
        if np.any(v < 0):
            raise InputError(f"the {estimator!r} variance of layer {layer!r} has negative entries")
        staged.append((layer, bn, m, v))
    with torch.no_grad():
        for _, bn, m, v in staged:
            bn.running_mean.copy_(torch.from_numpy(m))
            bn.running_var.copy_(torch.from_numpy(v))
    order = list(layers)
    return sorted((s[0] for s in staged), key=order.index)
