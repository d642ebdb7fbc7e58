"""``normalize``: apply per-channel statistics, ``gamma * (x - mean) / sqrt(var + eps) + beta``."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _kernels_normalize as KN
from ._config import CHUNK_ELEMS, GENERIC_BLOCK_BYTES, SEG_LEN, SERIAL_BYTES
from ._extras import require
from ._jit import threads_ok
from ._layout import KERNEL_DTYPES, plan
from ._validate import Axis, check_axes, check_nonnegative, is_torch_tensor

_OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if is_torch_tensor(x):
        if getattr(x, "is_cuda", False) or str(getattr(x, "device", "cpu")) != "cpu":
            raise TypeError(f"{name} is a tensor on {x.device}; call .cpu() first")
        return np.asarray(x.detach())
    return np.asarray(x)


def _result_dtype(x: np.ndarray) -> np.dtype[Any]:
    kind = x.dtype.kind
    if kind == "f":
        return np.dtype(np.float64) if x.dtype.itemsize >= 8 else np.dtype(np.float32)
    if kind in "iub":
        return np.dtype(np.float64)
    raise TypeError(
        f"normalize takes real numbers (float, int, unsigned or bool), got dtype {x.dtype}; "
        "convert first, e.g. x.astype(np.float32)"
    )


def _param(p: Any, name: str, kept: tuple[int, ...], default: float) -> np.ndarray:
    if p is None:
        return np.full(kept, default)
    a = _as_numpy(p, name)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be real numbers, got dtype {a.dtype}")
    try:
        return np.array(np.broadcast_to(a, kept), dtype=np.float64)
    except ValueError:
        raise ValueError(
            f"{name} has shape {a.shape}, expected {kept} (the dimensions of x not in axis, as "
            "the mean of streamnorm.moments(x, axis) has)"
        ) from None


def _check_out(out: Any, x: np.ndarray) -> np.ndarray:
    o = _as_numpy(out, "out")
    if not isinstance(o, np.ndarray) or (not is_torch_tensor(out) and o is not out):
        raise TypeError(
            f"out must be a numpy array or a CPU torch tensor, got {type(out).__name__}"
        )
    if o.shape != x.shape:
        raise ValueError(f"out has shape {o.shape}, expected x's shape {x.shape}")
    if o.dtype not in _OUT_DTYPES or not o.dtype.isnative:
        raise TypeError(f"out must be float32 or float64 (native byte order), got dtype {o.dtype}")
    if not o.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array (e.g. np.empty_like(x))")
    return o


def _physical(
    p: np.ndarray, kept: list[int], kept_phys: list[int], flips: tuple[int, ...]
) -> np.ndarray:
    """A kept-shape parameter as a flat array in the kernel's (physical) channel order."""
    pf = [kept.index(a) for a in flips if a in kept]
    if pf:
        p = np.flip(p, tuple(pf))
    live = [a for a in kept if a in kept_phys]
    p = p.reshape([p.shape[kept.index(a)] for a in live])
    return np.ascontiguousarray(np.transpose(p, [live.index(a) for a in kept_phys])).reshape(-1)


def _generic(
    x: np.ndarray,
    out: np.ndarray,
    red: set[int],
    shift: np.ndarray,
    scale: np.ndarray,
    beta: np.ndarray,
) -> None:
    """Any layout or dtype: numpy in float64, block by block along axis 0."""
    full = [1 if a in red else x.shape[a] for a in range(x.ndim)]
    m, s, b = (p.reshape(full) for p in (shift, scale, beta))
    if x.ndim == 0:
        out[()] = (np.float64(x) - m) * s + b
        return
    per_row = max(1, int(np.prod(x.shape[1:], dtype=np.int64)))
    step = max(1, GENERIC_BLOCK_BYTES // (8 * per_row))
    for i in range(0, x.shape[0], step):
        j = min(x.shape[0], i + step)
        sl = slice(i, j)
        t = x[sl].astype(np.float64)
        t -= m if m.shape[0] == 1 else m[sl]
        t *= s if s.shape[0] == 1 else s[sl]
        t += b if b.shape[0] == 1 else b[sl]
        out[sl] = t


def normalize(
    x: Any,
    mean: Any,
    var: Any,
    *,
    axis: Axis,
    eps: float = 1e-5,
    gamma: Any = None,
    beta: Any = None,
    out: Any = None,
) -> Any:
    """Normalize with given statistics: ``gamma * (x - mean) / sqrt(var + eps) + beta``.

    Inference-time BatchNorm (with a layer's ``running_mean``/``running_var`` or any estimator's
    estimates), or feature scaling of raw inputs with a :class:`~streamnorm.Population` of the
    training set. Validates the input, picks a fused parallel Numba kernel for the layout (one
    read of ``x``, one write of ``out``) and returns the result.

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (..., D...)
        Real numbers, any strides: (N, D), NCHW, NHWC / channels_last, per-sample.
    mean, var : array_like, shape (D...)
        Per-dimension statistics; ``D...`` are the axes of ``x`` not in ``axis`` (the shape of
        ``streamnorm.moments(x, axis).mean``); a scalar broadcasts. ``var`` must be >= 0.
    axis : int or tuple of int or None
        The axes the statistics were reduced over, as in :func:`streamnorm.moments`: ``0`` for
        (N, D), ``(0, 2, 3)`` for NCHW, ``(0, 1, 2)`` for NHWC, ``(2, 3)`` per sample.
    eps : float, default 1e-5
        Added to ``var`` before the square root (PyTorch's default), >= 0.
    gamma, beta : array_like, shape (D...), optional
        Scale and shift (BatchNorm's ``weight`` and ``bias``); default 1 and 0.
    out : ndarray or torch.Tensor, shape of x, optional
        Where to write the result (float32 or float64, writeable); may be ``x`` itself.

    Returns
    -------
    ndarray or torch.Tensor, shape of x
        float32 for float32 (and float16) input, float64 for float64, integer and bool input, or
        ``out``'s dtype. A torch tensor when ``x`` is one (sharing memory with the result).

    Notes
    -----
    The kernel computes ``(x - mean) * (gamma / sqrt(var + eps)) + beta`` in float64 and rounds
    once on the store. Folding the mean into the shift instead (``x * scale + shift``, as
    inference engines do in float32) loses the digits of data far from zero; subtracting first
    does not. NaN/Inf in ``x`` propagate to the same elements of the result.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]], dtype=np.float32)
    >>> m = streamnorm.moments(x, axis=0)
    >>> streamnorm.normalize(x, m.mean, m.var(), axis=0, eps=0.0)
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    """
    as_torch = is_torch_tensor(x)
    a = _as_numpy(x, "x")
    res_dtype = _result_dtype(a)
    axes = check_axes(axis, a.ndim)
    red = set(axes)
    kept_axes = [i for i in range(a.ndim) if i not in red]
    kept = tuple(a.shape[i] for i in kept_axes)
    eps = check_nonnegative("eps", eps)
    mu = _param(mean, "mean", kept, 0.0)
    v = _param(var, "var", kept, 1.0)
    g = _param(gamma, "gamma", kept, 1.0)
    b = _param(beta, "beta", kept, 0.0)
    if np.any(v < 0):
        raise ValueError(
            f"var must be >= 0, got {int(np.sum(v < 0))} negative value(s) (min {v.min()!r})"
        )
    den = v + eps
    if np.any(den == 0):
        raise ValueError("var + eps is 0 for some dimension (constant data and eps=0); use eps > 0")
    scale = g / np.sqrt(den)

    if out is None:
        res = np.empty_like(a, dtype=res_dtype)
        ret: Any = res
    else:
        res = _check_out(out, a)
        ret = out
        same = (
            res.__array_interface__["data"][0] == a.__array_interface__["data"][0]
            and res.strides == a.strides
            and res.dtype == a.dtype
        )
        if not same and np.may_share_memory(a, res):
            a = a.copy()  # overlapping but not identical: read from a copy
    if res.size == 0:
        return ret

    xk = a.view(np.uint8) if a.dtype.kind == "b" else a
    kind = "generic"
    if xk.dtype in KERNEL_DTYPES and xk.dtype.isnative:
        lay = plan(xk, axes, out=res)
        kind, xv, ov = lay.kind, lay.view, lay.out_view
    if kind == "generic" or ov is None:
        _generic(a, res, red, mu, scale, b)
    else:
        flips = tuple(sorted(lay.flipped))
        shift_p, scale_p, beta_p = (
            _physical(p, kept_axes, lay.kept_phys, flips) for p in (mu, scale, b)
        )
        if kind == "none":  # nothing reduced: one row of every element
            kind, xv, ov = "rows", xv[np.newaxis], ov[np.newaxis]
        serial = xk.nbytes < SERIAL_BYTES or not threads_ok()
        if kind == "rows":
            chunk = max(1, CHUNK_ELEMS // max(1, xv.shape[1]))
            rows = KN.normalize_rows_serial if serial else KN.normalize_rows
            rows(xv, shift_p, scale_p, beta_p, ov, chunk)
        else:
            cf = KN.normalize_cf_serial if serial else KN.normalize_cf
            cf(xv, shift_p, scale_p, beta_p, ov, SEG_LEN)
    if as_torch and out is None:
        return require("torch").from_numpy(res)
    return ret
