"""A small, real BatchNorm training run: scikit-learn's bundled digits and a tiny conv net.

Used by ``streamnorm compare``, the estimator-quality benchmark, the recalibration examples and
the tests. Nothing is downloaded: the 1797 8x8 digit images ship inside scikit-learn. PyTorch
and scikit-learn are imported when a function is called, never at ``import streamnorm``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ._errors import InputError, InputTypeError
from ._extras import require
from ._validate import (
    check_callable,
    check_choice,
    check_fraction,
    check_positive_int,
    is_int,
    is_number,
)

#: optimizers and learning-rate schedules of :func:`train`
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")

__all__ = ["accuracy", "load_digits_nchw", "make_cnn", "shift_domain", "train"]


def _check_seed(seed: Any) -> int:
    if not is_int(seed) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def load_digits_nchw(seed: int = 0, test_fraction: float = 0.25) -> tuple[Any, Any, Any, Any]:
    """scikit-learn's bundled digits as float32 NCHW images with a fixed stratified split.

    Parameters
    ----------
    seed : int, default 0
        Seed of the split (the same seed always gives the same split).
    test_fraction : float, default 0.25
        Fraction of the 1797 images held out for testing, in (0, 1).

    Returns
    -------
    x_train : torch.Tensor, shape (N_train, 1, 8, 8), float32
        Pixel intensities scaled from 0..16 to [0, 1].
    y_train : torch.Tensor, shape (N_train,), int64
        Class labels 0..9.
    x_test : torch.Tensor, shape (N_test, 1, 8, 8), float32
    y_test : torch.Tensor, shape (N_test,), int64

    Notes
    -----
    The split is stratified by class, so both parts have the same class proportions; with the
    default fraction there are 1347 training and 450 test images.
    """
    torch = require("torch")
    datasets = require("sklearn.datasets", "bench")
    model_selection = require("sklearn.model_selection", "bench")
    seed = _check_seed(seed)
    test_fraction = check_fraction("test_fraction", test_fraction, closed="neither")
    data = datasets.load_digits()
    x = (np.asarray(data.data, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(data.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=float(test_fraction), random_state=seed, stratify=y
    )
    return (
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(np.ascontiguousarray(y_tr)),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(np.ascontiguousarray(y_te)),
    )


def make_cnn(seed: int = 0, width: int = 16) -> Any:
    """A small BatchNorm conv net for 8x8 single-channel images, initialized from ``seed``.

    Layers (qualified names in brackets)::

        conv1 3x3 (1 -> w)   - bn1 BatchNorm2d(w)   - relu1
        conv2 3x3 (w -> 2w)  - bn2 BatchNorm2d(2w)  - relu2 - pool2 (8x8 -> 4x4)
        conv3 3x3 (2w -> 2w) - bn3 BatchNorm2d(2w)  - relu3 - pool3 (4x4 -> 2x2)
        flatten - bn4 BatchNorm1d(8w) - fc Linear(8w -> 10)

    Parameters
    ----------
    seed : int, default 0
        Seed of a private ``torch.Generator`` for the weights; the global RNG is not touched.
    width : int, default 16
        Channels of the first convolution ``w``.

    Returns
    -------
    torch.nn.Sequential
        Four BatchNorm layers (three ``BatchNorm2d``, one ``BatchNorm1d``), in training mode.

    Notes
    -----
    The weights follow PyTorch's default initialization (Kaiming-uniform with ``a=sqrt(5)``, bias
    uniform in +-1/sqrt(fan_in)) but are drawn from the seeded generator, so two calls with the
    same seed give bit-identical models. The global RNG's state is left as it was.
    """
    torch = require("torch")
    nn = torch.nn
    seed = _check_seed(seed)
    w = check_positive_int("width", width)
    # the default initialization draws from the global RNG: restore its state afterwards
    with torch.random.fork_rng(devices=[]):
        model = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(1, w, 3, padding=1, bias=False)),
                    ("bn1", nn.BatchNorm2d(w)),
                    ("relu1", nn.ReLU()),
                    ("conv2", nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)),
                    ("bn2", nn.BatchNorm2d(2 * w)),
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("conv3", nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False)),
                    ("bn3", nn.BatchNorm2d(2 * w)),
                    ("relu3", nn.ReLU()),
                    ("pool3", nn.MaxPool2d(2)),
                    ("flatten", nn.Flatten()),
                    ("bn4", nn.BatchNorm1d(8 * w)),
                    ("fc", nn.Linear(8 * w, 10)),
                ]
            )
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in)
                    nn.init.uniform_(module.bias, -bound, bound, generator=gen)
    return model


def _as_tensors(x: Any, y: Any) -> tuple[Any, Any]:
    torch = require("torch")
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    if xt.ndim < 2:
        raise InputError(
            f"x must have shape (N, ...) with a batch axis, got shape {tuple(xt.shape)}"
        )
    if yt.ndim != 1 or yt.shape[0] != xt.shape[0]:
        raise InputError(
            f"y must have shape (N,) matching x's first axis {xt.shape[0]}, got {tuple(yt.shape)}"
        )
    if not xt.is_floating_point():
        raise InputTypeError(f"x must be a floating-point tensor, got {xt.dtype}")
    return xt, yt.long()


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train` trains (see its parameters); checked by :meth:`checked`."""

    epochs: int
    batch_size: int
    lr: float = 0.05
    seed: int = 0
    optimizer: str = "sgd"
    schedule: str = "constant"
    on_batch: Callable[[int, int, float], Any] | None = None
    on_epoch: Callable[[int], Any] | None = None

    def checked(self, n: int) -> TrainConfig:
        """This configuration with its values checked for ``n`` training samples."""
        batch_size = check_positive_int("batch_size", self.batch_size)
        if batch_size < 2:
            raise InputError(
                "batch_size must be >= 2 (BatchNorm needs two samples per channel), "
                f"got {batch_size}"
            )
        if batch_size > n:
            raise InputError(f"batch_size {batch_size} is larger than the {n} training samples")
        return replace(
            self,
            epochs=check_positive_int("epochs", self.epochs),
            batch_size=batch_size,
            lr=check_fraction("lr", self.lr, low=0.0, high=math.inf, closed="neither"),
            seed=_check_seed(self.seed),
            optimizer=check_choice("optimizer", self.optimizer, OPTIMIZERS),
            schedule=check_choice("schedule", self.schedule, SCHEDULES),
            on_batch=check_callable("on_batch", self.on_batch),
            on_epoch=check_callable("on_epoch", self.on_epoch),
        )


def _optimizer(model: Any, cfg: TrainConfig) -> Any:
    """SGD with momentum 0.9 and weight decay 5e-4, or Adam, over the trainable parameters."""
    torch = require("torch")
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    return torch.optim.Adam(params, lr=cfg.lr)


def _set_lr(opt: Any, cfg: TrainConfig, t: int, total: int) -> None:
    """The learning rate of step ``t`` of ``total`` under the schedule."""
    if cfg.schedule == "cosine":
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t / total))


def _step(model: Any, opt: Any, x: Any, y: Any) -> float:
    """One optimizer step on the batch ``(x, y)``; its loss."""
    torch = require("torch")
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _run_epochs(model: Any, xt: Any, yt: Any, cfg: TrainConfig) -> None:
    """The training loop: a fresh permutation per epoch, full batches only, callbacks."""
    torch = require("torch")
    opt = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = int(xt.shape[0])
    steps = n // cfg.batch_size
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for step in range(steps):
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            _set_lr(opt, cfg, epoch * steps + step, cfg.epochs * steps)
            loss = _step(model, opt, xt[idx], yt[idx])
            if cfg.on_batch is not None:
                cfg.on_batch(epoch, step, loss)
        if cfg.on_epoch is not None:
            cfg.on_epoch(epoch)


def train(
    model: Any,
    x: Any,
    y: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float = 0.05,
    seed: int = 0,
    optimizer: str = "sgd",
    schedule: str = "constant",
    on_batch: Callable[[int, int, float], Any] | None = None,
    on_epoch: Callable[[int], Any] | None = None,
) -> Any:
    """Train ``model`` on ``(x, y)`` with cross-entropy, deterministically.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier mapping ``x[i:j]`` to logits of shape (j - i, n_classes).
    x : torch.Tensor or numpy.ndarray, shape (N, ...), floating point
    y : torch.Tensor or numpy.ndarray, shape (N,), integer labels
    epochs : int
        Passes over the data (>= 1).
    batch_size : int
        Samples per step (>= 2, BatchNorm needs two samples per channel). Each epoch visits a
        fresh permutation; a last incomplete batch is dropped, so every step has exactly
        ``batch_size`` samples.
    lr : float, default 0.05
        Learning rate.
    seed : int, default 0
        Seed of a private ``torch.Generator`` for the shuffling.
    optimizer : {"sgd", "adam"}, default "sgd"
        SGD with momentum 0.9 and weight decay 5e-4, or Adam.
    schedule : {"constant", "cosine"}, default "constant"
        Learning rate per step: ``lr`` throughout, or cosine annealing from ``lr`` to 0 over all
        the steps, ``lr * (1 + cos(pi * t / T)) / 2`` at step ``t`` of ``T``.
    on_batch : callable, optional
        Called after each optimizer step as ``on_batch(epoch, step, loss)``; ``step`` counts
        from 0 within the epoch and ``loss`` is the batch loss as a float.
    on_epoch : callable, optional
        Called after each epoch as ``on_epoch(epoch)``, epochs counted from 0.

    Returns
    -------
    torch.nn.Module
        The same ``model``, trained in place.

    Notes
    -----
    The model is in training mode during the steps (BatchNorm normalizes with batch statistics
    and updates its running buffers); afterwards the mode it had on entry is restored, also on
    error. The thread count of PyTorch is not changed.
    """
    xt, yt = _as_tensors(x, y)
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        optimizer=optimizer,
        schedule=schedule,
        on_batch=on_batch,
        on_epoch=on_epoch,
    ).checked(int(xt.shape[0]))
    was_training = model.training
    try:
        model.train()
        _run_epochs(model, xt, yt, cfg)
    finally:
        model.train(was_training)
    return model


def accuracy(model: Any, x: Any, y: Any, batch_size: int = 512) -> float:
    """Fraction of ``x`` classified as ``y`` by ``model`` in evaluation mode.

    Parameters
    ----------
    model : torch.nn.Module
    x : torch.Tensor or numpy.ndarray, shape (N, ...)
    y : torch.Tensor or numpy.ndarray, shape (N,)
    batch_size : int, default 512
        Samples per forward pass; the result does not depend on it (evaluation mode).

    Returns
    -------
    float
        Accuracy in [0, 1].

    Notes
    -----
    BatchNorm layers use their running buffers in evaluation mode, so the accuracy measures the
    test-time statistics currently loaded. The model's mode is restored afterwards.
    """
    torch = require("torch")
    xt, yt = _as_tensors(x, y)
    batch_size = check_positive_int("batch_size", batch_size)
    n = int(xt.shape[0])
    if n == 0:
        raise InputError("x is empty; accuracy needs at least one sample")
    was_training = model.training
    correct = 0
    try:
        model.eval()
        with torch.no_grad():
            for i in range(0, n, batch_size):
                pred = model(xt[i : i + batch_size]).argmax(dim=1)
                correct += int((pred == yt[i : i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / n


def shift_domain(
    x: Any, *, contrast: float = 0.5, brightness: float = 0.3, noise: float = 0.1, seed: int = 0
) -> Any:
    """A shifted test domain: ``contrast * x + brightness + noise * N(0, 1)``.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray, shape (N, ...), floating point
        Images, e.g. from :func:`load_digits_nchw`. Not modified.
    contrast : float, default 0.5
        Multiplies the intensities (>= 0).
    brightness : float, default 0.3
        Added to every pixel.
    noise : float, default 0.1
        Standard deviation of independent Gaussian pixel noise (>= 0).
    seed : int, default 0
        Seed of the noise (``numpy.random.default_rng``).

    Returns
    -------
    torch.Tensor or numpy.ndarray
        Same type, shape and dtype as ``x``; intensities are not clipped.

    Notes
    -----
    The shift changes the mean and the variance of every channel of the network's first layer,
    and through it every later one; a model whose BatchNorm statistics were estimated on the
    source domain loses accuracy, and re-estimating them on the shifted inputs (AdaBN) recovers
    most of it.
    """
    for name, v in (("contrast", contrast), ("brightness", brightness), ("noise", noise)):
        if not is_number(v) or not math.isfinite(v):
            raise InputError(f"{name} must be a finite number, got {v!r}")
    if contrast < 0 or noise < 0:
        raise InputError(f"contrast and noise must be >= 0, got {contrast!r} and {noise!r}")
    seed = _check_seed(seed)
    is_numpy = isinstance(x, np.ndarray)
    if is_numpy:
        arr = x
    else:
        torch = require("torch")
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(
                f"x must be a torch.Tensor or a numpy array, got {type(x).__name__}"
            )
        arr = x.detach().cpu().numpy()
    if arr.dtype.kind != "f":
        raise InputTypeError(f"x must be floating point, got {arr.dtype}")
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal(arr.shape)
    out = (contrast * arr.astype(np.float64) + brightness + noise * eps).astype(arr.dtype)
    if is_numpy:
        return out
    return torch.from_numpy(out).to(device=x.device)
