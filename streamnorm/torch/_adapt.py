"""Test-time adaptation of BatchNorm statistics: ``adapt(model, estimator)``.

``adapt_groups`` runs several independent streams through each forward pass (the benchmark
``streamnorm shift`` uses it to stream every corrupted target set at once).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .._errors import InputError, InputTypeError
from .._moments import moments
from .._validate import check_positive_int
from ..estimators import (
    AlphaMix,
    BatchStats,
    DecayingEMA,
    Estimator,
    Population,
    PriorMix,
    PriorPopulation,
)
from ._hooks import UPCAST, NormSpec, bn_axes, norm_candidates, norm_spec, unregistered_hint

#: estimator names ``adapt`` accepts, with the class each builds with its defaults
ESTIMATORS: dict[str, type[Estimator]] = {
    "batch": BatchStats,
    "prior_mix": PriorMix,
    "alpha_mix": AlphaMix,
    "decaying_ema": DecayingEMA,
    "prior_population": PriorPopulation,
    "population": Population,
}


def _template(estimator: Any) -> Estimator:
    if isinstance(estimator, str):
        klass = ESTIMATORS.get(estimator)
        if klass is None:
            raise InputError(
                f"unknown estimator {estimator!r}; pass one of {sorted(ESTIMATORS)} or an "
                "estimator instance such as streamnorm.PriorPopulation(prior=32)"
            )
        return klass()
    if not isinstance(estimator, Estimator):
        raise InputTypeError(
            "estimator must be a name such as 'prior_population' or a streamnorm estimator "
            f"instance, got {type(estimator).__name__}"
        )
    return estimator


def _accepts(klass: type, name: str) -> bool:
    return name in inspect.signature(klass).parameters


#: a layer chosen for adaptation: qualified name, module, registry entry
Chosen = tuple[str, Any, NormSpec]


def _stat(module: Any, attr: str) -> Any:
    """The statistics tensor ``module.<attr>``, or ``None`` (``track_running_stats=False``)."""
    t = getattr(module, attr, None)
    return t if isinstance(t, torch.Tensor) else None


def layer_estimator(
    template: Estimator,
    source: tuple[Any, Any] | None,
    spec: NormSpec,
    positions: int,
    groups: int = 1,
) -> Estimator:
    """A fresh estimator with ``template``'s parameters for one norm layer.

    The source is the layer's stored ``(mean, var)`` (``source``, in the variance convention of
    ``spec``, ``None`` for a layer without statistics); ``positions`` (values per sample per
    channel) is the product of the input's sizes other than the batch and channel axes. With
    ``groups > 1`` the estimator has ``groups * C`` dimensions (group-major), the source
    repeated once per group: one independent estimate per group and channel.
    """
    klass = type(template)
    params = {k[6:]: v for k, v in template.to_dict().items() if k.startswith("param_")}
    if _accepts(klass, "source"):
        if source is None:
            raise InputError(
                f"{klass.__name__} needs the layer's running statistics as its source, but the "
                "layer was built with track_running_stats=False; use 'batch' for such layers"
            )
        mean, var = source[0].detach(), source[1].detach()
        if groups > 1:
            mean, var = mean.repeat(groups), var.repeat(groups)
        params["source"] = (mean, var)
        params["source_var"] = spec.convention
    if _accepts(klass, "positions"):
        params["positions"] = positions
    return klass(**params)


def _needs_source(template: Estimator) -> bool:
    return _accepts(type(template), "source")


def _input_of(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise InputError(
            f"norm layer {name!r} expects a tensor (N, C, ...), got "
            f"{getattr(x, 'shape', type(x).__name__)}"
        )
    return x


def _with_input(x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``(args, kwargs)`` with the layer's input replaced by ``x``."""
    if args:
        return (x, *args[1:]), kwargs
    first = next(iter(kwargs))
    return args, {**kwargs, first: x}


#: norm layers whose forward normalizes exactly ``(x - mean) / sqrt(var + eps)`` per channel
#: (axis 1) with their buffers before anything else it does: what ``adapt_groups`` relies on
_PLAIN = ("torchvision.ops.misc.FrozenBatchNorm2d", "timm.layers.norm_act.FrozenBatchNormAct2d")


def _plain_batchnorm(module: Any) -> bool:
    if isinstance(module, _BatchNorm):
        return True
    return any(f"{k.__module__}.{k.__qualname__}" in _PLAIN for k in type(module).__mro__)


#: every module of a model under an active adaptation -> that adaptation (a weak reference:
#: the hooks keep an adaptation alive until it is restored)
_ACTIVE: weakref.WeakKeyDictionary[Any, weakref.ref[Adaptation]] = weakref.WeakKeyDictionary()

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _caller() -> str:
    """``file:line`` of the first caller outside streamnorm."""
    f = inspect.currentframe()
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_PACKAGE + os.sep):
        f = f.f_back
    return "an unknown place" if f is None else f"{f.f_code.co_filename}:{f.f_lineno}"


def _claim(model: Any, ada: Adaptation) -> None:
    """Mark every module of ``model`` as adapted by ``ada``; ``InputError`` naming the first
    adaptation if one of them (the model, a part of it or a model it is part of) already is."""
    modules = list(model.modules())
    for m in modules:
        ref = _ACTIVE.get(m)
        first = ref() if ref is not None else None
        if first is not None and first._active:
            raise InputError(
                f"the model is already adapted by {first.describe()}, which is still active; "
                "two adaptations of one model could not both be undone in any order: call "
                "restore() on that one (or leave its with block) before adapting again, or "
                "adapt a copy (copy.deepcopy(model))"
            )
    for m in modules:
        _ACTIVE[m] = weakref.ref(ada)


class Adaptation:
    """The handle :func:`adapt` returns: a context manager, or call :meth:`restore` yourself.

    A model (or a part of it) is adapted by one active handle at a time: adapting it again
    before :meth:`restore` raises ``InputError`` naming the active one.

    Attributes
    ----------
    estimators : dict of str to Estimator
        Each adapted layer's estimator by qualified name, created at the layer's first forward
        pass (its source is the layer's statistics as they were on entry).
    groups : int
        Independent streams per batch (1 for :func:`adapt`; see :func:`adapt_groups`).
    """

    def __init__(
        self, model: Any, template: Estimator, chosen: list[Chosen], groups: int = 1
    ) -> None:
        self._where = _caller()
        self._names = [name for name, _, _ in chosen]
        _claim(model, self)
        self.model = model
        self.template = template
        self.groups = groups
        self.estimators: dict[str, Estimator] = {}
        self._modes = [(m, m.training) for m in model.modules()]
        # per layer: module, its statistics tensors (the objects), every own buffer's value
        self._saved: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []
        self._handles: list[Any] = []
        self._active = True
        try:
            for name, module, spec in chosen:
                stats = {spec.mean: _stat(module, spec.mean), spec.var: _stat(module, spec.var)}
                values = {k: b.detach().clone() for k, b in module.named_buffers(recurse=False)}
                self._saved.append((module, stats, values))
                self._handles.append(
                    module.register_forward_pre_hook(
                        self._make_pre_hook(name, spec, stats), with_kwargs=True
                    )
                )
                self._handles.append(
                    module.register_forward_hook(
                        _make_put_back(stats), prepend=True, always_call=True
                    )
                )
            model.eval()
        except BaseException:
            self.restore()
            raise

    def _make_pre_hook(self, name: str, spec: NormSpec, stats: dict[str, Any]) -> Any:
        """Before the layer's forward: update its estimator with the input and put the estimate
        where the layer reads its statistics (put back by the forward hook after the call)."""

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = _input_of(name, args, kwargs)
            if self.groups > 1:
                x, mean, var = self._shift_groups(name, module, spec, stats, x)
                _put(module, spec, stats, mean, var, x)
                return _with_input(x, args, kwargs)
            axis = spec.channel_axis % x.ndim if -x.ndim <= spec.channel_axis < x.ndim else None
            if axis is None or axis == 0:
                raise InputError(
                    f"norm layer {name!r} keeps its channels on axis {spec.channel_axis}, which "
                    f"an input of shape {tuple(x.shape)} does not have (after the batch axis 0)"
                )
            positions = x.numel() // max(x.shape[0] * x.shape[axis], 1)
            axes = tuple(i for i in range(x.ndim) if i != axis)
            mean, var = self._estimate(name, spec, stats, x, axes, positions, 1)
            _put(module, spec, stats, mean, var, x)
            return None

        return hook

    def _estimate(
        self,
        name: str,
        spec: NormSpec,
        stats: dict[str, Any],
        x: Any,
        axes: tuple[int, ...],
        positions: int,
        groups: int,
    ) -> Any:
        """Update layer ``name``'s estimator with the moments of ``x`` over ``axes`` and return
        its mean and biased variance (what the layer normalizes with), float64 arrays."""
        est = self.estimators.get(name)
        if est is None:
            source = stats[spec.mean], stats[spec.var]
            est = layer_estimator(
                self.template,
                None if source[0] is None or source[1] is None else source,
                spec,
                positions,
                groups,
            )
            self.estimators[name] = est
        xd = x.detach()
        if xd.dtype in UPCAST and not xd.is_cuda:
            xd = xd.float()
        m = moments(xd, axis=axes)
        bad = ~(np.isfinite(m.mean) & np.isfinite(m.var()))
        if np.any(bad):
            # never fed to the estimator: one NaN would stay in every later estimate
            where = np.flatnonzero(bad)
            raise InputError(
                f"the input of layer {name!r} has non-finite values (NaN/Inf) in "
                f"{where.size} channel(s) (first: {where[:5].tolist()}); the batch was not used "
                "and the estimates are unchanged: check the data, or skip this batch and go on"
            )
        est.update(m)
        return est.mean, est.running_var("biased")

    def _shift_groups(
        self, name: str, module: Any, spec: NormSpec, stats: dict[str, Any], x: Any
    ) -> Any:
        """``groups`` consecutive blocks of the batch, each with its own estimate.

        The estimator sees the blocks side by side along the channel axis, ``(n, groups * C,
        ...)``: one estimator of ``groups * C`` dimensions does what one per block would. The
        layer then reads mean 0 and variance ``1 - eps`` and gets block ``g``'s input as
        ``(x - mean_g) * sqrt(1 - eps + eps) / sqrt(var_g + eps)``, so that its own
        ``(x - mean) / sqrt(var + eps)`` gives each block its own normalization and the rest of
        its forward (affine, activation) runs unchanged.
        """
        g = self.groups
        if x.shape[0] % g:
            raise InputError(
                f"BatchNorm layer {name!r}: a batch of {x.shape[0]} samples cannot be split into "
                f"{g} groups of equal size; pass groups * n samples, group after group"
            )
        n, c, rest = x.shape[0] // g, x.shape[1], tuple(x.shape[2:])
        side = x.reshape(g, n, c, *rest).transpose(0, 1).reshape(n, g * c, *rest)
        mean, var = self._estimate(name, spec, stats, side, bn_axes(x.ndim), math.prod(rest), g)
        eps = float(getattr(module, spec.eps, 0.0))
        ref = stats[spec.var]
        dtype = ref.dtype if ref is not None else x.dtype
        var0 = torch.full((c,), max(1.0 - eps, 0.0), dtype=dtype, device=x.device)
        norm0 = math.sqrt(float(var0[0]) + eps)
        shape = (g, 1, c) + (1,) * len(rest)
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
        scale = torch.as_tensor(norm0 / np.sqrt(var + eps), dtype=x.dtype, device=x.device)
        shifted = (x.reshape(g, n, c, *rest) - m) * scale.reshape(shape)
        zero = torch.zeros(c, dtype=dtype, device=x.device)
        return shifted.reshape(x.shape), zero, var0

    def describe(self) -> str:
        """What this adaptation is and where it was made: its call, layers and ``file:line``."""
        call = "adapt" if self.groups == 1 else f"adapt_groups(groups={self.groups})"
        shown = self._names[:4] + (["..."] if len(self._names) > 4 else [])
        return (
            f"{call} with {type(self.template).__name__} on layers {shown}, made at {self._where}"
        )

    def reset(self) -> Adaptation:
        """Forget the target data seen so far (every layer starts again from its source)."""
        self.estimators.clear()
        return self

    def restore(self) -> None:
        """Remove the hooks, put back the statistics tensors and every buffer's value, and the
        train/eval modes, exactly as they were (idempotent)."""
        if not self._active:
            return
        self._active = False
        for m in list(_ACTIVE.keys()):
            ref = _ACTIVE.get(m)
            if ref is not None and ref() is self:
                del _ACTIVE[m]
        for h in self._handles:
            h.remove()
        for module, stats, values in reversed(self._saved):
            for k, t in stats.items():
                setattr(module, k, t)
            with torch.no_grad():
                for k, b in module.named_buffers(recurse=False):
                    if k in values:
                        b.copy_(values[k])
        for m, mode in self._modes:
            m.training = mode

    def __enter__(self) -> Adaptation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def _put(module: Any, spec: NormSpec, stats: dict[str, Any], mean: Any, var: Any, x: Any) -> None:
    """Make the layer read ``mean`` / ``var`` as its statistics (new tensors in place of its
    own, of their dtype and device; of the input's for a layer without statistics)."""
    for attr, value in ((spec.mean, mean), (spec.var, var)):
        ref = stats[attr]
        like = ref if ref is not None else x
        setattr(module, attr, torch.as_tensor(value, dtype=like.dtype, device=like.device))


def _make_put_back(stats: dict[str, Any]) -> Any:
    """After the layer's forward (also when it raised): its own statistics tensors again."""

    def hook(module: Any, args: Any, output: Any) -> None:
        for k, t in stats.items():
            setattr(module, k, t)

    return hook


def adapt(
    model: Any, estimator: Any = "prior_population", *, layers: Iterable[str] | None = None
) -> Adaptation:
    """Normalize the norm layers of ``model`` with a test-time estimator of their input.

    Parameters
    ----------
    model : torch.nn.Module
        Put in evaluation mode (dropout off) until the adaptation ends; no gradients are needed.
    estimator : str or Estimator, default "prior_population"
        A name (``"batch"``, ``"prior_mix"``, ``"alpha_mix"``, ``"decaying_ema"``,
        ``"prior_population"``, ``"population"``; each with its defaults) or an estimator
        instance used as a template: every layer gets a fresh estimator with its parameters, the
        layer's stored ``(mean, var)`` as ``source`` (``source_var`` the convention its class
        was registered with: ``"unbiased"`` for ``running_var``) and ``positions`` = the size of
        its input per sample and channel (``H * W`` for ``BatchNorm2d``). The template's own
        source and batches are not used.
    layers : iterable of str, optional
        Qualified names of the norm layers to adapt; all of them by default.

    Returns
    -------
    Adaptation
        Already active. Use it as a context manager (leaving the block restores), or call its
        ``restore()``. ``estimators`` holds each layer's estimator.

    Notes
    -----
    The layers adapted are those recalibration recognises: every ``_BatchNorm``
    (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, subclasses such as timm's ``BatchNormAct2d``),
    torchvision's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d`` and every class
    registered with :func:`~streamnorm.torch.register_norm`. Each keeps its own forward: a
    forward pre-hook feeds the moments of the layer's input (over every axis but its channel
    axis) to its estimator and puts the updated estimate, mean and biased variance (what
    training mode normalizes with), in place of the layer's statistics tensors for that call;
    a forward hook puts the layer's own tensors back right after it (also when it raises). So
    whatever the layer does with its statistics, and after them (timm's activation and drop
    path), is done as without adaptation. A ``_BatchNorm`` built with
    ``track_running_stats=False`` reads the estimate too (estimators without a source only).
    Modules that hold ``running_mean`` / ``running_var`` but whose class is not registered are
    left as they are, with a warning naming them.

    A batch whose input to an adapted layer holds a NaN or an infinity raises ``InputError``
    from that layer's forward pre-hook, as recalibration does, before its estimator sees it:
    the estimates stay as they were, and the next clean batch goes on from them (an estimator
    that keeps a running state would otherwise carry the NaN into every later batch).

    On :meth:`Adaptation.restore` (or leaving the block, also by an exception) the hooks are
    removed, and every adapted layer's statistics tensors, its buffers' values and every
    module's train/eval mode are put back exactly as they were.

    Examples
    --------
    >>> with streamnorm.torch.adapt(model, "prior_population") as ada:   # doctest: +SKIP
    ...     for x in target_stream:
    ...         pred = model(x).argmax(1)
    """
    template = _template(estimator)
    chosen = _chosen(model, layers, template, 1)
    return Adaptation(model, template, chosen)


def adapt_groups(
    model: Any,
    estimator: Any,
    groups: int,
    *,
    layers: Iterable[str] | None = None,
) -> Adaptation:
    """:func:`adapt` for ``groups`` independent streams that share each forward pass.

    Every batch fed to ``model`` is ``groups`` blocks of ``n`` samples, one block after the other
    along axis 0 (``groups * n`` samples). Each adapted layer keeps one estimate per block
    (its estimator has ``groups * C`` dimensions, group-major, the layer's source repeated per
    group) and normalizes each block with its own. The outputs are those of ``groups`` separate
    :func:`adapt` runs fed the blocks, up to the rounding of sums taken in another order: one
    forward pass does the work of ``groups``, which pays off for small ``n``.

    Parameters
    ----------
    model, estimator, layers
        As in :func:`adapt`.
    groups : int
        Number of streams, ``>= 1`` (1 is :func:`adapt`).

    Returns
    -------
    Adaptation
        ``estimators`` hold ``groups * C`` dimensions per layer: group ``g``'s estimate is
        ``est.mean.reshape(groups, C)[g]``.

    Notes
    -----
    A layer holds one mean and variance per channel, so the blocks cannot each have theirs in
    its buffers. Instead the layer reads mean 0 and variance ``1 - eps``, and the pre-hook
    hands it block ``g``'s input already normalized by the block's estimate,
    ``(x - mean_g) / sqrt(var_g + eps)``; the layer's forward then runs unchanged (affine,
    activation, drop path). This relies on the layer normalizing as BatchNorm does,
    ``(x - running_mean) / sqrt(running_var + eps)`` over channel axis 1, first thing: true of
    every ``_BatchNorm`` (timm's ``BatchNormAct2d`` included), ``FrozenBatchNorm2d`` and timm's
    ``FrozenBatchNormAct2d``. Other registered classes are refused (``InputError``); adapt
    them with :func:`adapt`, one stream at a time.
    """
    template = _template(estimator)
    groups = check_positive_int("groups", groups)
    chosen = _chosen(model, layers, template, groups)
    return Adaptation(model, template, chosen, groups)


def _chosen(
    model: Any, layers: Iterable[str] | None, template: Estimator, groups: int
) -> list[Chosen]:
    """The layers to adapt, checked: ``InputError`` for those that cannot be."""
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = []
    for name, m in model.named_modules():
        spec = norm_spec(m)
        if spec is None:
            continue
        if isinstance(m, _BatchNorm) or (
            _stat(m, spec.mean) is not None and _stat(m, spec.var) is not None
        ):
            found.append((name, m, spec))
    if layers is None:
        chosen = found
    else:
        by_name = {n: (n, m, spec) for n, m, spec in found}
        wanted = [layers] if isinstance(layers, str) else list(layers)
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise InputError(
                f"no BatchNorm layer named {missing}; the model's BatchNorm layers are "
                f"{sorted(by_name)}"
            )
        chosen = [by_name[n] for n in wanted]
    if not chosen:
        raise InputError(
            "the model has no BatchNorm layer to adapt" + unregistered_hint(norm_candidates(model))
        )
    for name, m, spec in chosen:
        klass = f"{type(m).__module__}.{type(m).__qualname__}"
        if _needs_source(template) and (_stat(m, spec.mean) is None or _stat(m, spec.var) is None):
            raise InputError(
                f"{type(template).__name__} needs each layer's running statistics as its source, "
                f"but layer {name!r} ({klass}) was built with track_running_stats=False; use "
                "'batch' or 'population', or leave the layer out with layers="
            )
        if groups > 1 and not _plain_batchnorm(m):
            raise InputError(
                f"adapt_groups cannot adapt layer {name!r} ({klass}): it needs layers that "
                "normalize as BatchNorm does, (x - running_mean) / sqrt(running_var + eps) over "
                "channel axis 1, and cannot know what this class does with its statistics; "
                "adapt such a model with adapt(), one stream at a time, or leave the layer out "
                "with layers="
            )
    if layers is None:
        candidates = norm_candidates(model)
        if candidates:
            warnings.warn(
                "adapt leaves these modules as they are" + unregistered_hint(candidates),
                stacklevel=3,
            )
    return chosen
