"""Recalibrate the BatchNorm statistics of a PyTorch model from data (PreciseBN, AdaBN).

The PyTorch side of :mod:`streamnorm.calibrate`: :class:`_TorchAdapter` finds the BatchNorm
layers, runs forward passes with pre-hooks that hand each layer's input to the core, and reads
and writes ``running_mean`` / ``running_var``; :func:`recalibrate` checks the arguments, puts the
model in calibration mode and restores it exactly whatever happens.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputError, InputTypeError
from .._extras import require
from .._validate import check_callable
from ..calibrate import (
    CalibrationReport,
    Emit,
    LayerReport,
    LayerResult,
    NormLayer,
    Settings,
    Stats,
    StatsSpec,
    Stream,
    calibrate,
    input_of,
)
from ._hooks import bn_layers

torch = require("torch")

__all__ = ["CalibrationReport", "LayerReport", "recalibrate"]


class _Stop(Exception):
    """Raised by a hook once the layers of interest have their input (the rest is not needed)."""


# --------------------------------------------------------------------------------------------
# model state


def _bn_list(model: Any) -> list[tuple[str, Any]]:
    return [
        (n, m) for n, m in bn_layers(model) if m.track_running_stats and m.running_mean is not None
    ]


def _configure(model: Any, bns: list[Any], one_pass: bool) -> None:
    """Everything in eval mode; BN layers in training mode with momentum 0 for ``one_pass``."""
    model.eval()
    for m in bns:
        m.momentum = 0.0  # batch statistics normalize, buffers stay as they are
        if one_pass:
            m.train()


def _numpy(t: Any) -> np.ndarray:
    return np.asarray(t.detach().double().cpu().numpy())


class _Snapshot:
    """Training flags, momenta and BN buffers of a model, to put back exactly."""

    def __init__(self, model: Any, bns: list[tuple[str, Any]]) -> None:
        self.flags = [(m, m.training) for m in model.modules()]
        self.momenta = [(m, m.momentum) for _, m in bns]
        self.buffers = {
            name: (
                m,
                m.running_mean.detach().clone(),
                m.running_var.detach().clone(),
                None if m.num_batches_tracked is None else m.num_batches_tracked.detach().clone(),
            )
            for name, m in bns
        }

    def base(self, name: str) -> int | None:
        """The ``num_batches_tracked`` the layer had before calibration."""
        nbt = self.buffers[name][3]
        return None if nbt is None else int(nbt)

    def restore_modes(self) -> None:
        for m, flag in self.flags:
            m.training = flag
        for m, p in self.momenta:
            m.momentum = p

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for m, mean, var, nbt in self.buffers.values():
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if nbt is not None and m.num_batches_tracked is not None:
                    m.num_batches_tracked.copy_(nbt)


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
class _Forward:
    """How batches reach the model: converted (array data) or not, through ``forward_fn``; in
    ``one_pass`` mode or not (sequential passes stop a forward once its layer had its input)."""

    input_key: str | None = None
    forward_fn: Callable[[Any, Any], Any] | None = None
    convert: bool = False
    one_pass: bool = True


class _TorchAdapter:
    """:class:`streamnorm.calibrate.Adapter` for a ``torch.nn.Module`` (already configured)."""

    def __init__(self, model: Any, forward: _Forward, base: Callable[[str], int | None]) -> None:
        self.model = model
        self.forward = forward
        self.base = base
        self.modules = dict(_bn_list(model))
        self.convert = _tensor_converter(model) if forward.convert else None

    def layers(self) -> list[NormLayer]:
        return [
            NormLayer(name, int(m.running_mean.numel()), float(m.eps))
            for name, m in self.modules.items()
        ]

    def read(self, layer: NormLayer) -> Stats:
        m = self.modules[layer.name]
        return Stats(_numpy(m.running_mean), _numpy(m.running_var))

    def write(self, layer: NormLayer, result: LayerResult) -> None:
        """``num_batches_tracked`` becomes the batches seen (added to the old count for EMA)."""
        m = self.modules[layer.name]
        with torch.no_grad():
            for buf, value in ((m.running_mean, result.mean), (m.running_var, result.var)):
                buf.copy_(torch.tensor(value, dtype=buf.dtype, device=buf.device))
            nbt = m.num_batches_tracked
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

    def run(self, batch: Any, targets: Sequence[NormLayer], emit: Emit) -> None:
        self._run(batch, targets, emit, stop_early=not self.forward.one_pass)

    def _run(
        self, batch: Any, targets: Sequence[NormLayer], emit: Emit, *, stop_early: bool
    ) -> None:
        pending: set[str] = {x.name for x in targets}

        def make_hook(name: str) -> Callable[..., None]:
            def hook(module: Any, args: tuple[Any, ...]) -> None:
                x = args[0].detach()
                if x.dtype in (torch.float16, torch.bfloat16):
                    x = x.float()
                emit(name, x.cpu().numpy())
                pending.discard(name)
                if stop_early and not pending:
                    raise _Stop

            return hook

        handles = [
            self.modules[x.name].register_forward_pre_hook(make_hook(x.name)) for x in targets
        ]
        try:
            with torch.no_grad():
                self._call(batch)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()

    def sequential_passes(
        self, layers: list[NormLayer], first: Callable[[], Any]
    ) -> list[list[NormLayer]]:
        """One layer per pass, in the order a forward pass on the first batch reaches them."""
        order: list[str] = []

        def record(name: str, x: np.ndarray) -> None:
            if name not in order:
                order.append(name)

        self._run(first(), layers, record, stop_early=False)
        by_name = {x.name: x for x in layers}
        rest = [x.name for x in layers if x.name not in order]
        return [[by_name[n]] for n in order + rest]

    def remote(self) -> Callable[[], _TorchAdapter]:
        buf = io.BytesIO()
        torch.save(self.model, buf)
        return _Remote(buf.getvalue(), self.forward)


@dataclass(frozen=True)
class _Remote:
    """Rebuilds the adapter from a pickled model on a Dask worker."""

    model_bytes: bytes
    forward: _Forward

    def __call__(self) -> _TorchAdapter:
        model = torch.load(io.BytesIO(self.model_bytes), weights_only=False)
        _configure(model, [m for _, m in _bn_list(model)], self.forward.one_pass)
        return _TorchAdapter(model, self.forward, lambda name: None)


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


def recalibrate(
    model: Any,
    data: Any,
    *,
    estimator: str = "population",
    num_samples: int | None = None,
    mode: str = "one-pass",
    forward_fn: Callable[[Any, Any], Any] | None = None,
    progress: bool = True,
    momentum: float = 0.1,
    batch_size: int = 64,
    input_key: str | None = None,
    client: Any = None,
) -> CalibrationReport:
    """Re-estimate every BatchNorm layer's ``running_mean`` / ``running_var`` from data.

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place: only the BatchNorm buffers (``running_mean``, ``running_var``,
        ``num_batches_tracked``). Its train/eval state and momenta come back as they were.
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
    num_samples : int, optional
        Use only the first ``num_samples`` samples (the last batch is cut).
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

    Returns
    -------
    CalibrationReport
        Per layer: samples, batches, and how far mean and standard deviation moved in units of
        the old sigma; ``report.restore()`` puts the old statistics back.

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
    the stored mean and variance (a fixed point), at the cost of one (truncated) pass per layer.
    Modules other than BatchNorm (dropout) run in eval mode throughout, as at inference;
    ``update_bn`` runs them in training mode, so the two agree for models without them.

    If anything fails (a bad batch, ``KeyboardInterrupt``), the model is restored exactly as it
    was, statistics included, before the exception propagates; hooks are always removed.
    """
    _check_model(model)
    settings = Settings.checked(StatsSpec.checked(estimator, momentum), mode, progress, client)
    check_callable("forward_fn", forward_fn)
    stream = Stream.of(data, batch_size, num_samples, input_key)
    if settings.mode == "sequential" and not stream.arraylike and iter(stream.data) is stream.data:
        raise InputTypeError(
            "mode='sequential' passes over the data once per BatchNorm layer; pass a "
            "re-iterable (a list, an array, a DataLoader), not a one-shot iterator or generator"
        )
    bns = _bn_list(model)
    if not bns:
        raise InputError("the model has no BatchNorm layer with running statistics to calibrate")
    one_pass = settings.mode == "one-pass"
    snap = _Snapshot(model, bns)
    forward = _Forward(input_key, forward_fn, stream.arraylike, one_pass)
    try:
        _configure(model, [m for _, m in bns], one_pass)
        adapter = _TorchAdapter(model, forward, snap.base)
        return calibrate(adapter, stream, settings, undo=snap.restore_buffers)
    except BaseException:
        snap.restore_buffers()
        raise
    finally:
        snap.restore_modes()
