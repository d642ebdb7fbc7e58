"""Test-time adaptation of BatchNorm statistics: ``adapt(model, estimator)``.

``adapt_groups`` runs several independent streams through each forward pass (the benchmark
``streamnorm shift`` uses it to stream every corrupted target set at once).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch

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
from ._hooks import UPCAST, bn_axes, bn_layers

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


def layer_estimator(template: Estimator, module: Any, positions: int, groups: int = 1) -> Estimator:
    """A fresh estimator with ``template``'s parameters for one BN layer.

    The source is the layer's ``(running_mean, running_var)`` (PyTorch's unbiased convention);
    ``positions`` (values per sample per channel) is the product of the input's spatial sizes.
    With ``groups > 1`` the estimator has ``groups * C`` dimensions (group-major), the source
    repeated once per group: one independent estimate per group and channel.
    """
    klass = type(template)
    params = {k[6:]: v for k, v in template.to_dict().items() if k.startswith("param_")}
    if _accepts(klass, "source"):
        if module.running_mean is None or module.running_var is None:
            raise InputError(
                f"{klass.__name__} needs the layer's running statistics as its source, but the "
                "layer was built with track_running_stats=False; use 'batch' for such layers"
            )
        mean, var = module.running_mean.detach(), module.running_var.detach()
        if groups > 1:
            mean, var = mean.repeat(groups), var.repeat(groups)
        params["source"] = (mean, var)
        params["source_var"] = "unbiased"
    if _accepts(klass, "positions"):
        params["positions"] = positions
    return klass(**params)


class Adaptation:
    """The handle :func:`adapt` returns: a context manager, or call :meth:`restore` yourself.

    Attributes
    ----------
    estimators : dict of str to Estimator
        Each adapted layer's estimator by qualified name, created at the layer's first forward
        pass (its source is the layer's buffers as they were on entry).
    groups : int
        Independent streams per batch (1 for :func:`adapt`; see :func:`adapt_groups`).
    """

    def __init__(
        self, model: Any, template: Estimator, chosen: list[tuple[str, Any]], groups: int = 1
    ) -> None:
        self.model = model
        self.template = template
        self.groups = groups
        self.estimators: dict[str, Estimator] = {}
        self._modes = [(m, m.training) for m in model.modules()]
        self._saved: list[tuple[Any, dict[str, Any], Any]] = []
        self._active = True
        try:
            for name, module in chosen:
                buffers = {k: b.detach().clone() for k, b in module.named_buffers(recurse=False)}
                self._saved.append((module, buffers, module.__dict__.get("forward")))
                module.forward = self._make_forward(name, module)
            model.eval()
        except BaseException:
            self.restore()
            raise

    def _make_forward(self, name: str, module: Any) -> Any:
        def forward(x: Any) -> Any:
            return self._normalize(name, module, x)

        return forward

    def _normalize(self, name: str, module: Any, x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise InputError(
                f"BatchNorm layer {name!r} expects a tensor (N, C, ...), got "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )
        if self.groups > 1:
            return self._normalize_groups(name, module, x)
        mean, var = self._estimate(name, module, x, math.prod(x.shape[2:]), 1)
        return torch.nn.functional.batch_norm(
            x, mean, var, module.weight, module.bias, False, 0.0, module.eps
        )

    def _estimate(self, name: str, module: Any, x: Any, positions: int, groups: int) -> Any:
        """Update layer ``name``'s estimator with ``x`` (NC...) and return its (mean, var)."""
        est = self.estimators.get(name)
        if est is None:
            est = layer_estimator(self.template, module, positions, groups)
            self.estimators[name] = est
        xd = x.detach()
        if xd.dtype in UPCAST and not xd.is_cuda:
            xd = xd.float()
        est.update(moments(xd, axis=bn_axes(x.ndim)))
        mean = torch.as_tensor(est.mean, dtype=x.dtype, device=x.device)
        var = torch.as_tensor(est.running_var("biased"), dtype=x.dtype, device=x.device)
        return mean, var

    def _normalize_groups(self, name: str, module: Any, x: Any) -> Any:
        """``groups`` consecutive blocks of the batch, each normalized with its own estimate.

        The blocks are moved side by side along the channel axis, ``(n, groups * C, ...)``, so
        that one estimator of ``groups * C`` dimensions and one ``batch_norm`` call do what one
        estimator and one call per block would.
        """
        g = self.groups
        if x.shape[0] % g:
            raise InputError(
                f"BatchNorm layer {name!r}: a batch of {x.shape[0]} samples cannot be split into "
                f"{g} groups of equal size; pass groups * n samples, group after group"
            )
        n, c, rest = x.shape[0] // g, x.shape[1], tuple(x.shape[2:])
        side = x.reshape(g, n, c, *rest).transpose(0, 1).reshape(n, g * c, *rest)
        mean, var = self._estimate(name, module, side, math.prod(rest), g)
        weight = None if module.weight is None else module.weight.repeat(g)
        bias = None if module.bias is None else module.bias.repeat(g)
        out = torch.nn.functional.batch_norm(side, mean, var, weight, bias, False, 0.0, module.eps)
        return out.reshape(n, g, c, *rest).transpose(0, 1).reshape(x.shape)

    def reset(self) -> Adaptation:
        """Forget the target data seen so far (every layer starts again from its source)."""
        self.estimators.clear()
        return self

    def restore(self) -> None:
        """Put back the buffers, forward methods and train/eval modes exactly (idempotent)."""
        if not self._active:
            return
        self._active = False
        for module, buffers, forward in reversed(self._saved):
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
            with torch.no_grad():
                for k, b in module.named_buffers(recurse=False):
                    if k in buffers:
                        b.copy_(buffers[k])
        for m, mode in self._modes:
            m.training = mode

    def __enter__(self) -> Adaptation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def adapt(
    model: Any, estimator: Any = "prior_population", *, layers: Iterable[str] | None = None
) -> Adaptation:
    """Normalize the BatchNorm layers of ``model`` with a test-time estimator of their input.

    Parameters
    ----------
    model : torch.nn.Module
        Put in evaluation mode (dropout off) until the adaptation ends; no gradients are needed.
    estimator : str or Estimator, default "prior_population"
        A name (``"batch"``, ``"prior_mix"``, ``"alpha_mix"``, ``"decaying_ema"``,
        ``"prior_population"``, ``"population"``; each with its defaults) or an estimator
        instance used as a template: every layer gets a fresh estimator with its parameters, the
        layer's ``(running_mean, running_var)`` as ``source`` (``source_var="unbiased"``,
        PyTorch's convention) and ``positions`` = the spatial size of its input (``H * W`` for
        ``BatchNorm2d``). The template's own source and batches are not used.
    layers : iterable of str, optional
        Qualified names of the BatchNorm layers to adapt; all of them by default.

    Returns
    -------
    Adaptation
        Already active. Use it as a context manager (leaving the block restores), or call its
        ``restore()``. ``estimators`` holds each layer's estimator.

    Notes
    -----
    On every forward pass each adapted layer (``BatchNorm1d/2d/3d``, channels_last too) feeds
    the moments of its input over ``bn_axes`` (all axes but the channel axis 1) to its estimator,
    then normalizes the batch with the updated estimate: ``weight * (x - mean) / sqrt(var + eps)
    + bias`` with the estimator's mean and biased variance (what training mode normalizes with).
    The buffers are not written. On :meth:`Adaptation.restore` (or leaving the block, also by an
    exception) the buffers, the layers' ``forward`` attributes and every module's
    train/eval mode are put back exactly as they were.

    Examples
    --------
    >>> with streamnorm.torch.adapt(model, "prior_population") as ada:   # doctest: +SKIP
    ...     for x in target_stream:
    ...         pred = model(x).argmax(1)
    """
    chosen = _chosen(model, layers)
    return Adaptation(model, _template(estimator), chosen)


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
    """
    chosen = _chosen(model, layers)
    template = _template(estimator)
    return Adaptation(model, template, chosen, check_positive_int("groups", groups))


def _chosen(model: Any, layers: Iterable[str] | None) -> list[tuple[str, Any]]:
    found = bn_layers(model)
    if layers is None:
        chosen = found
    else:
        by_name = dict(found)
        wanted = [layers] if isinstance(layers, str) else list(layers)
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise InputError(
                f"no BatchNorm layer named {missing}; the model's BatchNorm layers are "
                f"{sorted(by_name)}"
            )
        chosen = [(n, by_name[n]) for n in wanted]
    if not chosen:
        raise InputError("the model has no BatchNorm layer to adapt")
    return chosen
