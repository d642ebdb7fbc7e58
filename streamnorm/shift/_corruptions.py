"""Deterministic corruptions of small grayscale images (numpy / scipy; nothing downloaded)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._errors import InputError

SEVERITIES = (1, 2, 3, 4, 5)

# per corruption, the parameter at severities 1..5 (for 8x8 digits scaled to [0, 1])
_LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60.0, 25.0, 12.0, 6.0, 3.0),
    "salt_pepper": (0.03, 0.06, 0.10, 0.15, 0.22),
    "gaussian_blur": (0.4, 0.55, 0.7, 0.85, 1.0),
    "contrast": (0.75, 0.6, 0.45, 0.32, 0.22),
    "brightness": (0.1, 0.2, 0.3, 0.45, 0.6),
    "pixelate": (7.0, 6.0, 5.0, 4.0, 3.0),
    "occlusion": (2.0, 3.0, 3.0, 4.0, 5.0),
}

CORRUPTIONS = tuple(_LEVELS)


def _gaussian_noise(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return x + s * rng.standard_normal(x.shape)


def _shot_noise(x: np.ndarray, lam: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(np.clip(x, 0.0, None) * lam) / lam


def _salt_pepper(x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(x.shape)
    out = x.copy()
    out[u < p / 2] = 0.0
    out[(u >= p / 2) & (u < p)] = 1.0
    return out


def _gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="constant")


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - m) * c + m


def _brightness(x: np.ndarray, b: float, rng: np.random.Generator) -> np.ndarray:
    return x + b


def _pixelate(x: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    h = x.shape[-1]
    k = int(size)
    small = np.asarray(
        ndimage.zoom(x, (1, 1, k / h, k / h), order=1, grid_mode=True, mode="nearest")
    )
    idx = (np.arange(h) * k) // h
    return small[:, :, idx][:, :, :, idx]


def _occlusion(x: np.ndarray, side: float, rng: np.random.Generator) -> np.ndarray:
    s = int(side)
    h, w = x.shape[-2:]
    out = x.copy()
    rows = rng.integers(0, h - s + 1, size=x.shape[0])
    cols = rng.integers(0, w - s + 1, size=x.shape[0])
    fill = np.asarray(rng.random(x.shape[0]))
    for i in range(x.shape[0]):
        out[i, :, rows[i] : rows[i] + s, cols[i] : cols[i] + s] = fill[i]
    return out


def check_corruption(corruption: str) -> str:
    """``corruption`` if it is one of :data:`CORRUPTIONS`, else :class:`InputError`."""
    if corruption not in CORRUPTIONS:
        raise InputError(f"unknown corruption {corruption!r}; choose from {CORRUPTIONS}")
    return corruption


def check_severity(severity: int) -> int:
    """``severity`` if it is one of :data:`SEVERITIES`, else :class:`InputError`."""
    if severity not in SEVERITIES:
        raise InputError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return severity


_FUNCS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "salt_pepper": _salt_pepper,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
    "occlusion": _occlusion,
}


def corrupt(x: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """A corrupted copy of a batch of images, the same for the same arguments.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), floating point
        Images with intensities in [0, 1] (e.g. ``load_digits_nchw``'s, as numpy). Not modified.
    corruption : str
        One of :data:`CORRUPTIONS`: ``gaussian_noise``, ``shot_noise``, ``salt_pepper``,
        ``gaussian_blur``, ``contrast``, ``brightness``, ``pixelate``, ``occlusion``.
    severity : int
        1 (mild) to 5 (strong).
    seed : int, default 0
        Seed of the random parts (noise, occluder positions), mixed with the corruption and the
        severity, so every (corruption, severity) gets its own reproducible draw.

    Returns
    -------
    ndarray, shape and dtype of ``x``
        Not clipped (brightness may leave [0, 1], as a camera's gain would before saturation).
    """
    check_corruption(corruption)
    check_severity(severity)
    a = np.asarray(x)
    if a.ndim != 4 or a.dtype.kind != "f":
        raise InputError(
            f"x must be a floating-point (N, C, H, W) array, got {a.dtype} shape {a.shape}"
        )
    rng = np.random.default_rng([int(seed), CORRUPTIONS.index(corruption), int(severity)])
    level = _LEVELS[corruption][severity - 1]
    out = _FUNCS[corruption](a.astype(np.float64), level, rng)
    return np.ascontiguousarray(out, dtype=a.dtype)
