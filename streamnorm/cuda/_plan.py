"""How a strided device array reaches a CUDA kernel (pure Python, no GPU needed).

:func:`plan` looks at shape and element strides only. Reduced axes are flipped to positive
strides, sorted outer to inner and merged where memory allows; kept axes keep the caller's order
and may have any strides (their per-dimension offsets come from a table, or from one stride when
they form a single C-ordered run). Two kernels cover every layout:

=====  ====================================  ============================================
kind   reduced elements of a dimension       covers
=====  ====================================  ============================================
cf     ``A`` outer groups x ``L`` contiguous  NCHW / NCL, per-sample (N, C, L), 1-D,
                                             Fortran-ordered (rows, D)
rows   ``R`` rows in any groups              (rows, D), NHWC / channels-last, any other
=====  ====================================  ============================================

All offsets are in elements, relative to ``base``, the lowest element the array uses; they are
never negative, so the kernels read the array through one flat 1-D view of ``span`` elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import _config as C


@dataclass(frozen=True)
class DevicePlan:
    kind: str
    #: caller's kept shape; the kernels enumerate dimensions in its C order
    kept_shape: tuple[int, ...]
    D: int
    #: samples per dimension (product of the reduced sizes)
    nsamp: int
    #: element offset of the lowest used element from the array's ``[0, ..., 0]`` element
    base: int
    #: number of elements from ``base`` to the highest used element, inclusive
    span: int
    #: per-dimension offsets from ``base`` (None when ``offset = kbase + d * kstride``)
    koff: np.ndarray | None
    kbase: int
    kstride: int
    #: reduced groups, outer to inner (for ``cf``: the outer groups only)
    gsizes: tuple[int, ...]
    gstrides: tuple[int, ...]
    #: ``cf``: length of the contiguous innermost reduced run; ``rows``: 1
    L: int
    #: weights: index of a sample along the weighted axis is ``(flat // w_inner) % w_n``,
    #: ``flat`` the reduced index in physical order; ``w_flip``: the axis was flipped
    w_inner: int
    w_n: int
    w_flip: bool

    @property
    def rows(self) -> int:
        """Reduced elements per dimension outside the contiguous run (``rows``: all of them)."""
        return int(np.prod(self.gsizes, dtype=np.int64)) if self.gsizes else 1


def _single_stride(sizes: list[int], strides: list[int]) -> int | None:
    """The stride of the kept axes if they form one C-ordered run with a positive stride."""
    live = [(n, s) for n, s in zip(sizes, strides, strict=True) if n > 1]
    if not live:
        return 0
    inner = live[-1][1]
    if inner <= 0:
        return None
    expect = inner
    for n, s in reversed(live):
        if s != expect:
            return None
        expect = n * s
    return inner


@lru_cache(maxsize=256)
def plan(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    axes: tuple[int, ...],
    w_axis: int | None = None,
    *,
    min_l: int | None = None,
) -> DevicePlan:
    """Plan the reduction of an array with ``shape`` and element ``strides`` over ``axes``.

    ``axes`` are normalized (sorted, non-negative); ``w_axis`` is the weighted axis, if any.
    Plans are cached (a training loop sees the same few layouts again and again); treat the
    returned plan and its ``koff`` table as read-only.
    """
    min_l = C.CF_MIN_L if min_l is None else min_l
    red = set(axes)
    origin = 0
    w_flip = False
    reduced: list[tuple[int, int, int]] = []  # (stride, size, axis), positive strides
    for a in sorted(red):
        n, s = shape[a], strides[a]
        if n <= 1:
            continue
        if s < 0:
            origin += (n - 1) * s
            s = -s
            w_flip = w_flip or a == w_axis
        reduced.append((s, n, a))
    reduced.sort(key=lambda t: -t[0])  # stable: outer first, ties keep axis order
    # weights: product of reduced sizes physically inside the weighted axis
    w_inner, w_n = 1, 1
    if w_axis is not None and shape[w_axis] > 1:
        pos = [t[2] for t in reduced].index(w_axis)
        w_inner = int(np.prod([t[1] for t in reduced[pos + 1 :]], dtype=np.int64))
        w_n = shape[w_axis]
    groups: list[list[int]] = []  # [size, stride]
    for s, n, _ in reduced:
        if groups and groups[-1][1] == n * s:
            groups[-1][0] *= n
            groups[-1][1] = s
        else:
            groups.append([n, s])

    kept = [a for a in range(len(shape)) if a not in red]
    ksizes = [shape[a] for a in kept]
    kstr = [strides[a] for a in kept]
    kept_shape = tuple(ksizes)
    D = int(np.prod(ksizes, dtype=np.int64))
    kmin = sum((n - 1) * s for n, s in zip(ksizes, kstr, strict=True) if s < 0 and n > 1)
    base = origin + kmin
    single = _single_stride(ksizes, kstr)
    koff: np.ndarray | None = None
    kbase = origin - base  # offset of kept index 0 from base
    kmax = sum((n - 1) * s for n, s in zip(ksizes, kstr, strict=True) if s > 0 and n > 1)
    if single is None:
        koff = np.full(1, kbase, dtype=np.int64)
        for n, s in zip(ksizes, kstr, strict=True):
            koff = (koff[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).reshape(-1)
        kstride = 0
    else:
        kstride = single
    rmax = sum((n - 1) * s for n, s in groups)
    span = kbase + kmax + rmax + 1
    nsamp = int(np.prod([g[0] for g in groups], dtype=np.int64)) if groups else 1
    if groups and groups[-1][1] == 1 and groups[-1][0] >= min_l:
        kind, L, outer = "cf", groups[-1][0], groups[:-1]
    else:
        kind, L, outer = "rows", 1, groups
    if len(outer) > C.MAX_GROUPS:
        raise ValueError(
            f"the reduced axes of this array form {len(outer)} separate strided groups, more "
            f"than the {C.MAX_GROUPS} the CUDA kernels handle; make the array contiguous first "
            "(e.g. .contiguous() or cupy.ascontiguousarray)"
        )
    return DevicePlan(
        kind=kind,
        kept_shape=kept_shape,
        D=D,
        nsamp=nsamp,
        base=base,
        span=span,
        koff=koff,
        kbase=kbase,
        kstride=kstride,
        gsizes=tuple(g[0] for g in outer),
        gstrides=tuple(g[1] for g in outer),
        L=L,
        w_inner=w_inner,
        w_n=w_n,
        w_flip=w_flip,
    )
