"""The one internal state type for moments: what every producer returns and every consumer reads.

The CPU kernels, the GPU path, Dask chunks and the ``torch.distributed`` all-reduce all produce a
:class:`State`; :class:`~streamnorm.Moments` wraps one, and the estimators read one. Nothing
outside this module and ``_moments.py`` needs to know how ``Moments`` stores its arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(slots=True, eq=False)
class State:
    """Per-dimension moments as flat float64 arrays over the kept dimensions.

    Attributes
    ----------
    n : numpy.ndarray, shape (D,)
        Count (total weight) per dimension.
    mean : numpy.ndarray, shape (D,)
        Mean per dimension, rounded to float64; the exact mean is ``mean + lo``.
    lo : numpy.ndarray, shape (D,)
        Rounding residual of ``mean`` (a double-double pair with it; zeros when unknown).
    m2 : numpy.ndarray, shape (D,)
        Sum of squared deviations from the mean per dimension.
    shape : tuple of int
        The dimension shape (``D = prod(shape)``).
    total : float
        Samples (or total weight) seen, when every dimension has the same count.
    weighted : bool
        Counts are weights (``count`` reads as a float).
    per_dim : bool
        Counts differ between dimensions (``nan_policy="omit"``); ``total`` is then meaningless.

    Notes
    -----
    A ``State`` is a value: producers hand over fresh arrays and consumers copy before they
    change anything. It is not frozen only because building a frozen dataclass costs about
    2 us, a tenth of a small batch's whole update; only :class:`~streamnorm.Moments` changes
    the states it owns (never one it has handed out), and nothing else changes any.
    """

    n: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    m2: np.ndarray
    shape: tuple[int, ...]
    total: float
    weighted: bool = False
    per_dim: bool = False

    @property
    def size(self) -> int:
        """Number of dimensions ``D``."""
        return int(self.mean.shape[0])

    @property
    def min_count(self) -> float:
        """The smallest per-dimension count (``total`` when the counts are uniform)."""
        if self.per_dim:
            return float(self.n.min()) if self.n.size else 0.0
        return float(self.total)

    def copy(self) -> State:
        """A state with its own arrays."""
        return replace(
            self, n=self.n.copy(), mean=self.mean.copy(), lo=self.lo.copy(), m2=self.m2.copy()
        )


def empty_state(shape: tuple[int, ...]) -> State:
    """A state of ``shape`` whose dimensions have seen nothing (count 0, mean NaN)."""
    size = int(np.prod(shape, dtype=np.int64))
    zeros = np.zeros(size)
    return State(
        n=zeros,
        mean=np.full(size, np.nan),
        lo=zeros.copy(),
        m2=zeros.copy(),
        shape=tuple(shape),
        total=0.0,
    )


__all__ = ["State", "empty_state"]
