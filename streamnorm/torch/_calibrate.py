"""Recalibrate the BatchNorm statistics of a PyTorch model from data (PreciseBN, AdaBN).

:func:`recalibrate` hooks every BatchNorm layer's input, computes per-channel moments with
streamnorm's kernels, and writes ``running_mean`` / ``running_var`` back. The pass over one piece
of the data is the module-level :func:`_shard_pass`, so that it can also run on Dask workers.
:class:`CalibrationReport` is shared with the ONNX path and imports no framework.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._extras import require
from .._moments import Moments, moments
from ..calibrate import _data

__all__ = ["CalibrationReport", "LayerReport", "recalibrate"]

ESTIMATORS = ("population", "cumulative", "ema")
MODES = ("one-pass", "sequential")
_INPUT_KEYS = ("input", "inputs", "x", "image", "images", "data")
_SEP = "#"


# --------------------------------------------------------------------------------------------
# the report (framework-free, also used by streamnorm.onnx)


@dataclass
class LayerReport:
    """What calibration did to one BatchNorm layer.

    Attributes
    ----------
    name : str
        Qualified module name (PyTorch) or node name (ONNX).
    samples : int
        Samples (batch items) whose activations reached the layer.
    batches : int
        Batches that reached the layer.
    channels : int
    mean_shift : numpy.ndarray, shape (C,)
        ``|new mean - old mean| / old sigma`` per channel, ``old sigma = sqrt(old var + eps)``.
    std_shift : numpy.ndarray, shape (C,)
        ``|new sigma - old sigma| / old sigma`` per channel.
    """

    name: str
    samples: int
    batches: int
    channels: int
    mean_shift: np.ndarray
    std_shift: np.ndarray

    @property
    def max_mean_shift(self) -> float:
        return float(np.max(self.mean_shift)) if self.mean_shift.size else 0.0

    @property
    def max_std_shift(self) -> float:
        return float(np.max(self.std_shift)) if self.std_shift.size else 0.0


@dataclass
class CalibrationReport:
    """Per-layer summary of a recalibration; :meth:`restore` undoes it.

    Attributes
    ----------
    layers : list of LayerReport
        In the order the layers were calibrated.
    estimator, mode : str
    samples : int
        Samples used (after ``num_samples``).
    """

    layers: list[LayerReport]
    estimator: str
    mode: str
    samples: int
    _undo: Callable[[], None] | None = field(default=None, repr=False)

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; layers are {[x.name for x in self.layers]}")

    def __len__(self) -> int:
        return len(self.layers)

    def restore(self) -> None:
        """Put back the statistics the layers had before calibration (PyTorch models).

        An ONNX calibration never modified its input file, so there is nothing to undo there and
        this raises ``ValueError``.
        """
        if self._undo is None:
            raise ValueError(
                "nothing to restore: an ONNX calibration writes a new file and leaves the input "
                "model unchanged; keep using the input file to undo it"
            )
        self._undo()

    def table(self) -> str:
        """A plain-text table: layer, samples, batches, largest mean and std shift (in sigma)."""
        head = ("layer", "samples", "batches", "max |dmean|/sigma", "max |dsigma|/sigma")
        rows = [
            (x.name, str(x.samples), str(x.batches), f"{x.max_mean_shift:.4g}",
             f"{x.max_std_shift:.4g}")
            for x in self.layers
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"recalibrated {len(self.layers)} BatchNorm layer(s) from {self.samples} samples "
            f"(estimator={self.estimator}, mode={self.mode})\n{self.table()}"
        )


def layer_report(
    name: str,
    samples: int,
    batches: int,
    old_mean: np.ndarray,
    old_var: np.ndarray,
    new_mean: np.ndarray,
    new_var: np.ndarray,
    eps: float,
) -> LayerReport:
    """Shifts of one layer in units of its old standard deviation."""
    old_sigma = np.sqrt(np.maximum(old_var.astype(np.float64), 0.0) + eps)
    new_sigma = np.sqrt(np.maximum(new_var.astype(np.float64), 0.0) + eps)
    return LayerReport(
        name=name,
        samples=int(samples),
        batches=int(batches),
        channels=int(old_mean.size),
        mean_shift=np.abs(new_mean.astype(np.float64) - old_mean) / old_sigma,
        std_shift=np.abs(new_sigma - old_sigma) / old_sigma,
    )


def progress_bar(total: int | None, enabled: bool, desc: str) -> Any:
    """A tqdm bar on a terminal when ``enabled`` (none otherwise)."""
    if not enabled:
        return None
    tqdm = require("tqdm").tqdm
    return tqdm(total=total, desc=desc, unit="batch", disable=None, leave=False)


# --------------------------------------------------------------------------------------------
# per-layer statistics of one pass


class _LayerStats:
    """Pooled moments, per-batch moments and an EMA of one layer's input, fed batch by batch."""

    def __init__(self, momentum: float, ema_init: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.pooled = Moments()
        self.batch = Moments()  # samples = batches; dims (2, C): batch mean, unbiased batch var
        self.sizes = Moments()  # samples = batches; value = batch size
        self.momentum = momentum
        self.ema = None if ema_init is None else (ema_init[0].copy(), ema_init[1].copy())

    def add(self, x: np.ndarray) -> None:
        m = moments(x, axis=(0, *range(2, x.ndim)))
        self.pooled += m
        n = float(m.count)
        var1 = m.m2 / (n - 1.0) if n > 1 else np.full(m.mean.shape, np.nan)
        stacked = np.stack([np.asarray(m.mean), np.asarray(var1)])
        self.batch.update(stacked[None], axis=0)
        self.sizes.update(np.array([float(x.shape[0])]))
        if self.ema is not None:
            p = self.momentum
            self.ema = ((1 - p) * self.ema[0] + p * m.mean, (1 - p) * self.ema[1] + p * var1)

    def to_moments(self, name: str) -> dict[str, Moments]:
        return {
            name: self.pooled,
            name + _SEP + "batch": self.batch,
            name + _SEP + "size": self.sizes,
        }

    @classmethod
    def from_moments(cls, name: str, d: Mapping[str, Moments]) -> _LayerStats:
        out = cls(0.0, None)
        out.pooled = d.get(name, Moments())
        out.batch = d.get(name + _SEP + "batch", Moments())
        out.sizes = d.get(name + _SEP + "size", Moments())
        return out

    @property
    def batches(self) -> int:
        return 0 if self.sizes.shape is None else int(self.sizes.count)

    @property
    def samples(self) -> int:
        if self.sizes.shape is None:
            return 0
        return int(round(float(self.sizes.mean) * self.batches))

    def result(self, estimator: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased var) for PyTorch's ``running_mean`` / ``running_var``."""
        if estimator == "population":
            n = float(np.min(np.asarray(self.pooled.count)))
            if n < 2:
                raise ValueError(
                    f"layer {name!r} saw {n:g} value(s) per channel; an unbiased variance needs "
                    "at least 2: give more samples"
                )
            mean, var = np.asarray(self.pooled.mean), np.asarray(self.pooled.var(ddof=1))
        elif estimator == "cumulative":
            mean, var = np.asarray(self.batch.mean[0]), np.asarray(self.batch.mean[1])
            if np.isnan(var).any() and np.isfinite(mean).all():
                raise ValueError(
                    f"layer {name!r} got a batch with a single value per channel, whose unbiased "
                    "variance is undefined; use batches of at least 2 samples (or "
                    "estimator='population')"
                )
        elif self.ema is not None:
            mean, var = self.ema
        else:  # pragma: no cover - ema states are only built with their initial buffers
            raise RuntimeError("no EMA state was kept for this pass")
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise ValueError(
                f"the input of layer {name!r} has non-finite values (NaN/Inf); check the data "
                "and the model (statistics were not changed)"
            )
        return mean, var


# --------------------------------------------------------------------------------------------
# batches


def _batch_len(batch: Any, input_key: str | None) -> int | None:
    try:
        return int(_input_of(batch, input_key).shape[0])
    except (TypeError, ValueError, AttributeError, IndexError):
        return None


def _input_of(batch: Any, input_key: str | None) -> Any:
    torch = require("torch")
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty tuple/list as a batch; expected (input, ...)")
        return batch[0]
    if isinstance(batch, Mapping):
        if input_key is not None:
            if input_key not in batch:
                raise ValueError(f"batch has no key {input_key!r}; its keys are {list(batch)}")
            return batch[input_key]
        for k in _INPUT_KEYS:
            if k in batch:
                return batch[k]
        raise ValueError(
            f"cannot tell which entry of a dict batch is the input (keys {list(batch)}); "
            "pass input_key=NAME or forward_fn"
        )
    raise TypeError(
        f"cannot find the input in a batch of type {type(batch).__name__}; batches must be "
        "tensors, arrays, (input, ...) tuples or dicts, or pass forward_fn(model, batch)"
    )


def _take(batch: Any, n: int, size: int) -> Any:
    """The first ``n`` samples of every per-sample item of ``batch`` (batch size ``size``)."""
    if hasattr(batch, "shape") and len(getattr(batch, "shape", ())) > 0:
        return batch[:n] if batch.shape[0] == size else batch
    if isinstance(batch, tuple):
        return type(batch)(*(_take(b, n, size) for b in batch)) if hasattr(batch, "_fields") \
            else tuple(_take(b, n, size) for b in batch)  # fmt: skip
    if isinstance(batch, list):
        return [_take(b, n, size) for b in batch]
    if isinstance(batch, Mapping):
        return {k: _take(v, n, size) for k, v in batch.items()}
    return batch


class _Stop(Exception):
    """Raised by a hook once the layers of interest have their input (the rest is not needed)."""


def _run_pass(
    model: Any,
    batches: Iterable[Any],
    targets: list[tuple[str, Any]],
    *,
    estimator: str,
    momentum: float,
    input_key: str | None,
    forward_fn: Callable[[Any, Any], Any] | None,
    num_samples: int | None,
    stop_early: bool,
    as_tensor: Callable[[Any], Any] | None,
    bar: Any = None,
) -> dict[str, _LayerStats]:
    """One pass over ``batches`` collecting the inputs of ``targets``; hooks always removed."""
    torch = require("torch")
    stats: dict[str, _LayerStats] = {}
    for name, mod in targets:
        init = None
        if estimator == "ema":
            init = (
                mod.running_mean.detach().cpu().double().numpy(),
                mod.running_var.detach().cpu().double().numpy(),
            )
        stats[name] = _LayerStats(momentum, init)
    pending: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            if x.device.type != "cpu":
                x = x.cpu()
            stats[name].add(x.numpy())
            pending.discard(name)
            if stop_early and not pending:
                raise _Stop

        return hook

    handles = [mod.register_forward_pre_hook(make_hook(name)) for name, mod in targets]
    try:
        seen = 0
        with torch.no_grad():
            for batch in batches:
                if num_samples is not None:
                    size = _batch_len(batch, input_key)
                    if size is None:
                        raise TypeError(
                            "num_samples needs batches whose input has a batch axis; "
                            f"cannot size a batch of type {type(batch).__name__}"
                        )
                    if seen >= num_samples:
                        break
                    if seen + size > num_samples:
                        batch = _take(batch, num_samples - seen, size)
                        size = num_samples - seen
                    seen += size
                if as_tensor is not None:
                    batch = as_tensor(batch)
                pending.update(name for name, _ in targets)
                try:
                    if forward_fn is not None:
                        forward_fn(model, batch)
                    else:
                        model(_input_of(batch, input_key))
                except _Stop:
                    pass
                if bar is not None:
                    bar.update(1)
    finally:
        for h in handles:
            h.remove()
    return stats


def _shard_pass(
    shard: Any,
    *,
    model_bytes: bytes,
    layers: list[str],
    one_pass: bool,
    batch_size: int,
    input_key: str | None,
    forward_fn: Callable[[Any, Any], Any] | None,
) -> dict[str, Moments]:
    """Per-layer moments of one shard on a copy of the model (runs on a Dask worker)."""
    torch = require("torch")
    model = torch.load(io.BytesIO(model_bytes), weights_only=False)
    by_name = dict(model.named_modules())
    targets = [(n, by_name[n]) for n in layers]
    _configure(model, [m for _, m in _bn_list(model)], one_pass)
    stats = _run_pass(
        model,
        _data.iter_batches(shard, batch_size),
        targets,
        estimator="population",
        momentum=0.0,
        input_key=input_key,
        forward_fn=forward_fn,
        num_samples=None,
        stop_early=not one_pass,
        as_tensor=_tensor_converter(model),
    )
    out: dict[str, Moments] = {}
    for name, st in stats.items():
        out.update(st.to_moments(name))
    return out


# --------------------------------------------------------------------------------------------
# model state


def _bn_list(model: Any) -> list[tuple[str, Any]]:
    from ._hooks import bn_layers

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


def _buffers(m: Any) -> tuple[Any, Any, Any]:
    nbt = m.num_batches_tracked
    return (
        m.running_mean.detach().clone(),
        m.running_var.detach().clone(),
        None if nbt is None else nbt.detach().clone(),
    )


class _Snapshot:
    """Training flags, momenta and BN buffers of a model, to put back exactly."""

    def __init__(self, model: Any, bns: list[tuple[str, Any]]) -> None:
        self.flags = [(m, m.training) for m in model.modules()]
        self.momenta = [(m, m.momentum) for _, m in bns]
        self.buffers = {name: (m, *_buffers(m)) for name, m in bns}

    def base(self, name: str, estimator: str) -> Any:
        """The ``num_batches_tracked`` a new count adds to: the old one for ``ema``."""
        nbt = self.buffers[name][3]
        return None if estimator != "ema" or nbt is None else int(nbt)

    def restore_modes(self) -> None:
        for m, flag in self.flags:
            m.training = flag
        for m, p in self.momenta:
            m.momentum = p

    def restore_buffers(self, names: Iterable[str] | None = None) -> None:
        torch = require("torch")
        with torch.no_grad():
            for name in self.buffers if names is None else names:
                m, mean, var, nbt = self.buffers[name]
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if nbt is not None and m.num_batches_tracked is not None:
                    m.num_batches_tracked.copy_(nbt)


def _write(module: Any, mean: np.ndarray, var: np.ndarray, batches: int, base: Any) -> None:
    """Write (mean, unbiased var); ``num_batches_tracked = base + batches``."""
    torch = require("torch")
    with torch.no_grad():
        rm, rv = module.running_mean, module.running_var
        rm.copy_(torch.tensor(np.array(mean, dtype=np.float64), dtype=rm.dtype, device=rm.device))
        rv.copy_(torch.tensor(np.array(var, dtype=np.float64), dtype=rv.dtype, device=rv.device))
        nbt = module.num_batches_tracked
        if nbt is not None:
            nbt.fill_(batches if base is None else int(base) + batches)


def _tensor_converter(model: Any) -> Callable[[Any], Any]:
    """numpy batches -> tensors of the model's floating dtype on its device."""
    torch = require("torch")
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")

    def convert(batch: Any) -> Any:
        t = torch.as_tensor(np.asarray(batch)) if isinstance(batch, np.ndarray) else batch
        if isinstance(t, torch.Tensor):
            if t.dtype.is_complex:
                raise TypeError(f"calibration data must be real numbers, got {t.dtype}")
            return t.to(device=device, dtype=dtype)
        return t

    return convert


def _is_arraylike(data: Any) -> bool:
    torch = require("torch")
    return isinstance(data, (np.ndarray, torch.Tensor, _data.Dataset))


def _check_args(
    estimator: Any, mode: Any, momentum: Any, num_samples: Any, batch_size: Any
) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not (0.0 < float(momentum) <= 1.0)
    ):
        raise ValueError(f"momentum must be a number in (0, 1], got {momentum!r}")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))
        or num_samples < 1
    ):  # fmt: skip
        raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_data(data: Any) -> Any:
    torch = require("torch")
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        return _data.open_data(data if not isinstance(data, bytes) else data.decode())
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if data.ndim < 1 or len(data) == 0:
            raise ValueError(f"data is empty (shape {tuple(data.shape)}); give at least one sample")
        if isinstance(data, np.ndarray) and (data.dtype.kind not in "fiub"):
            raise TypeError(f"data must be real numbers, got dtype {data.dtype}")
        return data
    if isinstance(data, _data.Dataset):
        return data
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an array, a tensor, a path or an iterable of batches, got "
            f"{type(data).__name__}"
        )
    return data


# --------------------------------------------------------------------------------------------
# the public function


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
        Arrays / tensors of shape (N, ...) and files (see :func:`streamnorm._data.open_data`) are
        cut into batches of ``batch_size`` and converted to the model's dtype and device. Any
        other iterable yields batches: tensors, ``(input, ...)`` tuples or lists, or dicts whose
        ``input_key`` entry is the input. ``mode="sequential"`` passes over it several times, so
        it must be re-iterable (a list or a ``DataLoader``, not a generator).
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
    torch = require("torch")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "TorchScript modules cannot be hooked; build the eager model, load the "
            "TorchScript module's state_dict() into it and recalibrate that (the CLI does this "
            "with --arch), or export to ONNX and use streamnorm.onnx.recalibrate"
        )
    _check_args(estimator, mode, momentum, num_samples, batch_size)
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"forward_fn must be callable, got {type(forward_fn).__name__}")
    data = _check_data(data)
    arraylike = _is_arraylike(data)
    if arraylike:
        data = _data.limit(data, num_samples)
    elif mode == "sequential" and iter(data) is data:
        raise TypeError(
            "mode='sequential' passes over the data once per BatchNorm layer; pass a "
            "re-iterable (a list, an array, a DataLoader), not a one-shot iterator or generator"
        )
    if client is not None:
        if not arraylike:
            raise TypeError(
                "client= needs array, tensor or file data, which can be split into shards; "
                f"got {type(data).__name__}"
            )
        if estimator == "ema":
            raise ValueError(
                "estimator='ema' depends on the order of all batches and cannot be split over "
                "workers; use 'population' or 'cumulative' with client="
            )
    bns = _bn_list(model)
    if not bns:
        raise ValueError("the model has no BatchNorm layer with running statistics to calibrate")

    snap = _Snapshot(model, bns)
    convert = _tensor_converter(model)
    pass_kw: dict[str, Any] = dict(
        estimator=estimator, momentum=float(momentum), input_key=input_key,
        forward_fn=forward_fn, num_samples=None if arraylike else num_samples,
        as_tensor=convert if arraylike else None,
    )  # fmt: skip

    def batches() -> Iterator[Any]:
        if arraylike:
            for s in _data.shards(data, batch_size):
                yield from _data.iter_batches(s, batch_size)
        else:
            yield from data

    n_batches = -(-len(data) // batch_size) if arraylike else None

    def one(targets: list[tuple[str, Any]], one_pass: bool, desc: str) -> dict[str, _LayerStats]:
        if client is not None:
            from ..calibrate._distributed import map_merge

            buf = io.BytesIO()
            torch.save(model, buf)
            fn = functools.partial(
                _shard_pass, model_bytes=buf.getvalue(), layers=[n for n, _ in targets],
                one_pass=one_pass, batch_size=batch_size, input_key=input_key,
                forward_fn=forward_fn,
            )  # fmt: skip
            merged = map_merge(client, _data.shards(data, batch_size), fn)
            return {n: _LayerStats.from_moments(n, merged) for n, _ in targets}
        bar = progress_bar(n_batches, progress, desc)
        try:
            return _run_pass(model, batches(), targets, stop_early=not one_pass, bar=bar, **pass_kw)
        finally:
            if bar is not None:
                bar.close()

    reports: list[LayerReport] = []
    total = 0
    try:
        _configure(model, [m for _, m in bns], one_pass=mode == "one-pass")
        results: list[tuple[str, Any, _LayerStats]] = []
        if mode == "one-pass":
            stats = one(bns, True, "calibrating")
            results = [(n, m, stats[n]) for n, m in bns]
        else:
            for i, (name, mod) in enumerate(_forward_order(model, bns, batches(), pass_kw)):
                st = one([(name, mod)], False, f"layer {i + 1}/{len(bns)} {name}")[name]
                if st.batches:
                    mean, var = st.result(estimator, name)
                    _write(mod, mean, var, st.batches, snap.base(name, estimator))
                results.append((name, mod, st))
        for name, mod, st in results:
            _, old_mean, old_var, _ = snap.buffers[name]
            if st.batches == 0:
                new_mean, new_var = old_mean.double().cpu().numpy(), old_var.double().cpu().numpy()
            elif mode == "one-pass":
                new_mean, new_var = st.result(estimator, name)
            else:
                new_mean = mod.running_mean.detach().double().cpu().numpy()
                new_var = mod.running_var.detach().double().cpu().numpy()
            reports.append(
                layer_report(
                    name, st.samples, st.batches, old_mean.double().cpu().numpy(),
                    old_var.double().cpu().numpy(), new_mean, new_var, float(mod.eps),
                )
            )  # fmt: skip
            total = max(total, st.samples)
            if mode == "one-pass" and st.batches:
                _write(mod, new_mean, new_var, st.batches, snap.base(name, estimator))
        if total == 0:
            raise ValueError("data is empty: no batch reached any BatchNorm layer")
    except BaseException:
        snap.restore_buffers()
        raise
    finally:
        snap.restore_modes()
    return CalibrationReport(
        layers=reports, estimator=estimator, mode=mode, samples=total, _undo=snap.restore_buffers
    )


def _forward_order(
    model: Any, bns: list[tuple[str, Any]], batches: Iterable[Any], pass_kw: dict[str, Any]
) -> list[tuple[str, Any]]:
    """BN layers in the order a forward pass on the first batch reaches them."""
    torch = require("torch")
    order: list[str] = []

    def make(name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            if name not in order:
                order.append(name)

        return hook

    first = next(iter(batches), None)
    if first is None:
        raise ValueError("data is empty: it yields no batch")
    if pass_kw["as_tensor"] is not None:
        first = pass_kw["as_tensor"](first)
    handles = [m.register_forward_pre_hook(make(n)) for n, m in bns]
    try:
        with torch.no_grad():
            if pass_kw["forward_fn"] is not None:
                pass_kw["forward_fn"](model, first)
            else:
                model(_input_of(first, pass_kw["input_key"]))
    finally:
        for h in handles:
            h.remove()
    by_name = dict(bns)
    rest = [n for n, _ in bns if n not in order]
    return [(n, by_name[n]) for n in order + rest]
