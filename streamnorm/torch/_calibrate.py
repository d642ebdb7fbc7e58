"""Recalibrate the BatchNorm statistics of a PyTorch model from data (PreciseBN, AdaBN).

The PyTorch side of :mod:`streamnorm.calibrate`: :class:`TorchAdapter` finds the registered
norm layers (:func:`~streamnorm.torch.register_norm`: every ``_BatchNorm``, torchvision's
``FrozenBatchNorm2d``, anything registered), runs forward passes with pre-hooks that hand each
layer's input to the core, and reads and writes their statistics buffers; :func:`recalibrate`
checks the arguments, puts the model in calibration mode and restores it exactly whatever
happens.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputError, InputTypeError
from .._extras import require
from .._validate import check_callable
from ..calibrate import (
    CalibrationReport,
    ForwardPass,
    LayerReport,
    LayerResult,
    NormLayer,
    Settings,
    Stats,
    StatsSpec,
    Stream,
    WatchedAdapter,
    calibrate,
    check_budget,
    input_of,
    skipped_layer,
)
from ._cursor import thread_cursors
from ._hooks import (
    UPCAST,
    NormSpec,
    norm_candidates,
    norm_layers,
    norm_spec,
    unregistered_hint,
)

torch = require("torch")

__all__ = ["CalibrationReport", "LayerReport", "recalibrate"]


# --------------------------------------------------------------------------------------------
# model state


Layers = list[tuple[str, Any, NormSpec]]


def norm_list(model: Any) -> Layers:
    """The registered norm layers with statistics (a ``_BatchNorm`` must track them)."""
    return [
        (n, m, spec) for n, m, spec in norm_layers(model) if getattr(m, "track_running_stats", True)
    ]


def _collecting(m: Any, spec: NormSpec) -> bool:
    """The layer normalizes with batch statistics in training mode and has a momentum."""
    return spec.batch_stats and hasattr(m, "momentum")


def configure(model: Any, layers: Layers, one_pass: bool) -> None:
    """Everything in eval mode; for ``one_pass``, the layers that normalize with batch
    statistics in training mode with momentum 0 (their buffers stay as they are)."""
    model.eval()
    for _, m, spec in layers:
        if _collecting(m, spec):
            m.momentum = 0.0
        if one_pass and spec.batch_stats:
            m.train()


def _numpy(t: Any) -> np.ndarray:
    return np.asarray(t.detach().double().cpu().numpy())


class Snapshot:
    """Training flags, momenta and BN buffers of a model, to put back exactly."""

    def __init__(self, model: Any, layers: Layers) -> None:
        self.flags = [(m, m.training) for m in model.modules()]
        self.momenta = [(m, m.momentum) for _, m, spec in layers if _collecting(m, spec)]
        self.buffers = {
            name: [
                (buf, buf.detach().clone())
                for buf in (getattr(m, spec.mean), getattr(m, spec.var), _counter(m, spec))
                if buf is not None
            ]
            for name, m, spec in layers
        }
        self.counts = {name: _counter(m, spec) for name, m, spec in layers}

    def base(self, name: str) -> int | None:
        """The batch counter (``num_batches_tracked``) the layer had before calibration."""
        counter = self.counts[name]
        if counter is None:
            return None
        return int(next(old for buf, old in self.buffers[name] if buf is counter))

    def restore_modes(self) -> None:
        for m, flag in self.flags:
            m.training = flag
        for m, p in self.momenta:
            m.momentum = p

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for saved in self.buffers.values():
                for buf, old in saved:
                    buf.copy_(old)


def _counter(m: Any, spec: NormSpec) -> Any:
    """The layer's batch-counter buffer, or ``None``."""
    if spec.count is None:
        return None
    t = getattr(m, spec.count, None)
    return t if isinstance(t, torch.Tensor) else None


def _tensor_converter(model: Any) -> Callable[[Any], Any]:
    """numpy batches -> tensors of the model's floating dtype on its device."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")

    def convert(batch: Any) -> Any:
        t = torch.as_tensor(np.asarray(batch)) if isinstance(batch, np.ndarray) else batch
        if isinstance(t, torch.Tensor):
            if t.dtype.is_complex:
                raise InputTypeError(f"calibration data must be real numbers, got {t.dtype}")
            return t.to(device=device, dtype=dtype)
        return t

    return convert


# --------------------------------------------------------------------------------------------
# the adapter


@dataclass(frozen=True)
class Forward:
    """How batches reach the model: converted (array data) or not, through ``forward_fn``; in
    ``one_pass`` mode or not (sequential passes stop a forward once its layer had its input)."""

    input_key: str | None = None
    forward_fn: Callable[[Any, Any], Any] | None = None
    convert: bool = False
    one_pass: bool = True


class TorchAdapter(WatchedAdapter):
    """:class:`streamnorm.calibrate.Adapter` for a ``torch.nn.Module`` (already configured).

    ``found`` are the layers it calibrates: :func:`norm_list` of the model, or some of them.
    """

    def __init__(
        self, model: Any, found: Layers, forward: Forward, base: Callable[[str], int | None]
    ) -> None:
        self.model = model
        self.forward = forward
        self.base = base
        self.modules = {name: m for name, m, _ in found}
        self.specs = {name: spec for name, _, spec in found}
        self.convert = _tensor_converter(model) if forward.convert else None
        self.one_pass = forward.one_pass

    def layers(self) -> list[NormLayer]:
        out = []
        for name, m in self.modules.items():
            spec = self.specs[name]
            out.append(
                NormLayer(
                    name,
                    int(getattr(m, spec.mean).numel()),
                    float(getattr(m, spec.eps, 0.0)),
                    spec.convention,
                    spec.channel_axis,
                )
            )
        return out

    def read(self, layer: NormLayer) -> Stats:
        m, spec = self.modules[layer.name], self.specs[layer.name]
        return Stats(_numpy(getattr(m, spec.mean)), _numpy(getattr(m, spec.var)))

    def write(self, layer: NormLayer, result: LayerResult) -> None:
        """The batch counter becomes the batches seen (added to the old count for EMA)."""
        m, spec = self.modules[layer.name], self.specs[layer.name]
        with torch.no_grad():
            for buf, value in (
                (getattr(m, spec.mean), result.mean),
                (getattr(m, spec.var), result.var),
            ):
                buf.copy_(torch.tensor(value, dtype=buf.dtype, device=buf.device))
            nbt = _counter(m, spec)
            if nbt is not None:
                base = self.base(layer.name) if result.continued else None
                nbt.fill_(result.batches + (base or 0))

    def _call(self, batch: Any) -> None:
        if self.convert is not None:
            batch = self.convert(batch)
        if self.forward.forward_fn is not None:
            self.forward.forward_fn(self.model, batch)
        else:
            self.model(input_of(batch, self.forward.input_key))

    def call_model(self, batch: Any, current: ForwardPass) -> None:
        """A forward pass with a pre-hook on each pending layer (removed afterwards)."""

        def make_hook(name: str) -> Callable[..., None]:
            def hook(module: Any, args: tuple[Any, ...]) -> None:
                x = args[0].detach()
                if x.dtype in UPCAST:
                    x = x.float()
                current.hand(name, x.cpu().numpy())

            return hook

        handles = [
            self.modules[name].register_forward_pre_hook(make_hook(name))
            for name in current.pending
        ]
        try:
            with torch.no_grad():
                self._call(batch)
        finally:
            for h in handles:
                h.remove()

    def cursors(self, passes: list[list[NormLayer]]) -> Any:
        """Paused forward passes for the sequential mode: a thread per batch (see
        :mod:`streamnorm.torch._cursor`)."""
        return thread_cursors(self.modules, passes, self._call)

    def remote(self) -> Callable[[], TorchAdapter]:
        buf = io.BytesIO()
        torch.save(self.model, buf)
        return _Remote(buf.getvalue(), self.forward)


@dataclass(frozen=True)
class _Remote:
    """Rebuilds the adapter from a pickled model on a Dask worker."""

    model_bytes: bytes
    forward: Forward

    def __call__(self) -> TorchAdapter:
        model = torch.load(io.BytesIO(self.model_bytes), weights_only=False)
        layers = norm_list(model)
        configure(model, layers, self.forward.one_pass)
        return TorchAdapter(model, layers, self.forward, lambda name: None)


# --------------------------------------------------------------------------------------------
# the public function


def _check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise InputTypeError(
            "TorchScript modules cannot be hooked; build the eager model, load the "
            "TorchScript module's state_dict() into it and recalibrate that (the CLI does this "
            "with --arch), or export to ONNX and use streamnorm.onnx.recalibrate"
        )


def _no_layers_message(model: Any) -> str:
    return "the model has no BatchNorm layer with running statistics to calibrate" + (
        unregistered_hint(norm_candidates(model))
    )


def _left_out(model: Any, layers: Layers) -> list[LayerReport]:
    """The norm-like modules of ``model`` that are not among ``layers``, each reported skipped
    with its reason, and a warning naming them: registered layers without statistics tensors
    (``track_running_stats=False``) and modules of unregistered classes with
    ``running_mean`` / ``running_var`` buffers."""
    chosen = {id(m) for _, m, _ in layers}
    empty: list[LayerReport] = []
    for name, m in model.named_modules():
        spec = norm_spec(m)
        if spec is None or id(m) in chosen:
            continue
        if getattr(m, "track_running_stats", True) is False:
            reason = "no running statistics (track_running_stats=False)"
        else:
            reason = f"no {spec.mean}/{spec.var} tensors to write"
        empty.append(skipped_layer(name, int(getattr(m, "num_features", 0) or 0), reason))
    if empty:
        _warn(
            f"recalibrate leaves {[x.name for x in empty]} as they are: they have no running "
            "statistics to write (a BatchNorm built with track_running_stats=False normalizes "
            "with the statistics of each batch, also in eval mode); the report marks them "
            "skipped"
        )
    candidates = norm_candidates(model)
    if candidates:
        _warn("recalibrate leaves these modules as they are" + unregistered_hint(candidates))
    modules = dict(model.named_modules())
    unknown = []
    for name, _ in candidates:
        own = dict(modules[name].named_buffers(recurse=False))
        stat = own.get("running_mean", own.get("running_var"))
        channels = int(stat.numel()) if isinstance(stat, torch.Tensor) else 0
        unknown.append(skipped_layer(name, channels, "class not registered (register_norm)"))
    return empty + unknown


def _warn(message: str) -> None:
    """A warning attributed to the caller of :func:`recalibrate`."""
    warnings.warn(message, stacklevel=4)


def _mark_unreached(report: CalibrationReport, left_out: list[LayerReport]) -> None:
    """Warn about the layers no batch reached (already marked skipped by the core, their
    statistics untouched) and add the layers left out before calibration to the report."""
    unreached = [x.name for x in report.layers if x.skipped]
    if unreached:
        _warn(
            f"no data reached {unreached}, so their statistics are left as they were: the "
            "model does not run them in eval mode (a branch used only in training, such as "
            "inception_v3's auxiliary head) or forward_fn skips them; the report marks them "
            "skipped"
        )
    report.layers.extend(left_out)


def recalibrate(
    model: Any,
    data: Any,
    *,
    estimator: str = "population",
    num_samples: int | str | None = None,
    mode: str = "one-pass",
    forward_fn: Callable[[Any, Any], Any] | None = None,
    progress: bool = True,
    momentum: float = 0.1,
    batch_size: int = 64,
    input_key: str | None = None,
    client: Any = None,
    tol: float | None = None,
    cache_bytes: int | None = None,
) -> CalibrationReport:
    """Re-estimate every BatchNorm layer's ``running_mean`` / ``running_var`` from data.

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place: only the statistics buffers of its registered norm layers
        (``running_mean``, ``running_var``, ``num_batches_tracked`` of every ``_BatchNorm``,
        torchvision's ``FrozenBatchNorm2d`` and the classes of
        :func:`~streamnorm.torch.register_norm`). Its train/eval state and momenta come back as
        they were.
    data : numpy.ndarray, torch.Tensor, path, streamnorm Dataset or iterable of batches
        Arrays / tensors of shape (N, ...) and files (see
        :func:`streamnorm.calibrate.open_data`) are cut into batches of ``batch_size`` and
        converted to the model's dtype and device. Any other iterable yields batches: tensors,
        ``(input, ...)`` tuples or lists, or dicts whose ``input_key`` entry is the input.
        ``mode="sequential"`` passes over it several times, so it must be re-iterable (a list or
        a ``DataLoader``, not a generator).
    estimator : {"population", "cumulative", "ema"}
        ``population``: exact pooled mean and unbiased variance of all values each layer saw.
        ``cumulative``: equal-weight mean of batch means and of unbiased batch variances, as
        ``torch.optim.swa_utils.update_bn``. ``ema``: PyTorch's moving average
        ``r <- (1 - momentum) r + momentum * batch`` continued from the current buffers.
    num_samples : int or "auto", optional
        Use only the first ``num_samples`` samples (the last batch is cut). ``"auto"``: stream
        batches until every channel's standard errors ``mean_se`` and ``var_se`` (see the
        report) are below ``tol``, or the data end; in ``sequential`` mode the rule applies to
        each pass. ``report.samples`` says how many that took, ``report.converged`` whether
        ``tol`` was reached.
    mode : {"one-pass", "sequential"}
        ``one-pass``: one pass with BatchNorm layers normalizing by batch statistics, as
        PreciseBN and ``update_bn``. ``sequential``: one pass per layer in forward order, every
        earlier layer already recalibrated and in eval mode (see Notes).
    forward_fn : callable, optional
        ``forward_fn(model, batch)`` runs the model on a batch, for models called otherwise.
    progress : bool, default True
        A tqdm bar on a terminal.
    momentum : float, default 0.1
        For ``estimator="ema"``.
    batch_size : int, default 64
        Batch size for array, tensor and file data.
    input_key : str, optional
        The input's key in dict batches; by default the first of "input", "inputs", "x",
        "image", "images", "data" that is present.
    client : distributed.Client, optional
        Run the passes on a Dask cluster, one task per shard of the data (array or file data,
        ``population`` or ``cumulative``; the model and ``forward_fn`` must be picklable).
    tol : float, optional
        The tolerance of ``num_samples="auto"`` (default 0.01): ``mean_se`` in units of the
        channel's standard deviation, ``var_se`` relative to its variance.
    cache_bytes : int, optional
        ``mode="sequential"``: memory for paused forward passes (default 1 GiB). Each batch's
        forward pass waits in a thread of its own before every layer not yet recalibrated and
        runs on once it is, so the passes cost about one forward pass in all; batches beyond
        this budget are recomputed from the data for every layer. 0 recomputes every batch.
        The results are the same.

    Returns
    -------
    CalibrationReport
        Per layer: samples, batches, how far mean and standard deviation moved in units of the
        old sigma, and the standard errors ``mean_se`` / ``var_se`` of the new statistics per
        channel (from the spread between batches, see :mod:`streamnorm.calibrate._spread`);
        ``report.restore()`` puts the old statistics back.

    Notes
    -----
    The per-layer statistics are the estimators of :mod:`streamnorm.estimators`
    (``Population``, ``CumulativeAverage``, ``EMA``; see :mod:`streamnorm.calibrate`).
    ``running_var`` is written unbiased (PyTorch's convention): for ``population`` that is the
    pooled ``M2 / (n - 1)`` over all ``n = N * H * W`` values of a channel, which includes the
    spread between batch means; ``cumulative`` averages unbiased within-batch variances and so
    leaves the between-batch spread out (Ioffe & Szegedy's estimate, biased low when batches
    differ). ``num_batches_tracked`` is set to the number of batches (added to it for ``ema``).

    In ``one-pass`` mode every layer's input is computed with earlier layers normalizing by batch
    statistics, which differ from the final running statistics; in ``sequential`` mode they use
    the new running statistics, so afterwards the inputs of every layer in eval mode have exactly
    the stored mean and variance (a fixed point). Each batch's forward pass is kept paused
    between layers (``cache_bytes``), so this costs about one eval-mode pass; batches beyond the
    budget cost one (truncated) pass per layer.
    Modules other than the norm layers (dropout) run in eval mode throughout, as at inference;
    ``update_bn`` runs them in training mode, so the two agree for models without them. A layer
    registered with ``batch_stats=False`` (``FrozenBatchNorm2d``) always normalizes with its
    buffers: in ``one-pass`` mode the layers after it see its input normalized by its stored
    statistics, in ``sequential`` mode by its new ones.

    A model whose norm-like layers are all unregistered (modules with ``running_mean`` /
    ``running_var`` buffers of an unknown class) raises ``InputError`` listing them; register
    their class with :func:`~streamnorm.torch.register_norm`. Layers left as they were are
    named in a warning and reported with ``status="skipped"`` and a ``reason`` (see
    ``report.skipped``): unregistered norm-like modules in a model that has registered ones
    (timm's ``EvoNorm2dB0``), layers without statistics to write
    (``track_running_stats=False``), and layers no batch reached (a branch the model runs only
    in training mode, such as inception_v3's auxiliary head): their statistics are not touched.

    If anything fails (a bad batch, ``KeyboardInterrupt``), the model is restored exactly as it
    was, statistics included, before the exception propagates; hooks are always removed.
    """
    _check_model(model)
    budget, tol = check_budget(num_samples, tol)
    settings = Settings.checked(
        StatsSpec.checked(estimator, momentum), mode, progress, client, tol, cache_bytes
    )
    check_callable("forward_fn", forward_fn)
    stream = Stream.of(data, batch_size, budget, input_key)
    stream.check_passes(settings.mode, "BatchNorm", "a list, an array, a DataLoader")
    layers = norm_list(model)
    if not layers:
        raise InputError(_no_layers_message(model))
    left_out = _left_out(model, layers)
    one_pass = settings.mode == "one-pass"
    snap = Snapshot(model, layers)
    forward = Forward(input_key, forward_fn, stream.arraylike, one_pass)
    try:
        configure(model, layers, one_pass)
        adapter = TorchAdapter(model, layers, forward, snap.base)
        report = calibrate(adapter, stream, settings, undo=snap.restore_buffers)
    finally:
        snap.restore_modes()
    _mark_unreached(report, left_out)
    return report
