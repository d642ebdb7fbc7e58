"""How an array of any shape, strides and reduced axes reaches a kernel.

``plan(x, axes)`` looks at the physical layout (axes sorted by stride, negative strides flipped,
adjacent axes merged where memory allows) and returns a :class:`Plan` whose ``kind`` names the
kernel and whose ``view`` is a zero-copy view in that kernel's shape:

========  =========================  ==================================================
kind      view shape                 covers
========  =========================  ==================================================
rows      (R, D)                     (N, D), NHWC / channels-last, transposed views
cf        (A, C, L), L innermost     NCHW / NCL / NCDHW, per-sample (1, N*C, L), 1-D
none      (D,)                       nothing reduced (every count is 1)
generic   any                        everything else: copied block by block
========  =========================  ==================================================

The kernel's result comes out in the physical order of the kept axes; :meth:`Plan.restore` puts it
back in the caller's order and shape.

With ``out`` (an array of ``x``'s shape, as :func:`streamnorm.normalize` writes), axes merge only
where both arrays allow it, and ``Plan.out_view`` is ``out`` seen in the same kernel shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import as_strided

#: dtypes the kernels read directly (any other dtype goes through the generic, converting path)
KERNEL_DTYPES = frozenset(
    np.dtype(t) for t in ("f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")
)


@dataclass
class Plan:
    kind: str
    view: np.ndarray
    #: kept axes (original numbering) in the physical order the kernel's output follows
    kept_phys: list[int]
    #: reduced axes (original numbering) in physical order, outer to inner
    red_phys: list[int]
    #: the array with negative strides flipped (generic path works on it)
    base: np.ndarray
    flipped: set[int] = field(default_factory=set)
    kept_shape: tuple[int, ...] = ()
    #: ``out`` (when given to :func:`plan`) in the kernel's shape, else ``None``
    out_view: np.ndarray | None = None

    def restore(self, flat: np.ndarray) -> np.ndarray:
        """Turn a kernel output (physical kept order, flattened) into the caller's kept shape."""
        shape = self.base.shape
        phys_sizes = [shape[a] for a in self.kept_phys]
        out = flat.reshape(phys_sizes) if phys_sizes else flat.reshape(())
        order = sorted(range(len(self.kept_phys)), key=lambda i: self.kept_phys[i])
        out = np.transpose(out, order)
        kept_sorted = sorted(self.kept_phys)
        flips = tuple(i for i, a in enumerate(kept_sorted) if a in self.flipped)
        if flips:
            out = np.flip(out, flips)
        return np.ascontiguousarray(out).reshape(self.kept_shape)


def _quick_plan(x: np.ndarray, axes: tuple[int, ...]) -> Plan | None:
    """The plan of the two commonest layouts, found without the general search, else ``None``.

    A C-contiguous array with every axis longer than 1, reduced over all axes but the last
    (``rows``: (N, D), NHWC) or all but the second (``cf``: NCHW, NCL, NCDHW). The view and
    kind are exactly those :func:`plan`'s search finds (a test compares them); only the Python
    work is saved, which after a large kernel has evicted the interpreter from the caches costs
    tens of microseconds.
    """
    shape = x.shape
    nd = len(shape)
    if nd < 2 or not x.flags.c_contiguous or min(shape) < 2:
        return None
    view: np.ndarray
    if axes == tuple(range(nd - 1)):
        kind, kept, view = "rows", nd - 1, x.reshape(-1, shape[-1])
    elif nd >= 3 and axes == (0, *range(2, nd)):
        kind, kept, view = "cf", 1, x.reshape(shape[0], shape[1], -1)
    else:
        return None
    view.flags.writeable = False
    return Plan(kind, view, [kept], list(axes), x, set(), (shape[kept],))


def plan(x: np.ndarray, axes: tuple[int, ...], out: np.ndarray | None = None) -> Plan:
    """Choose a kernel for reducing ``x`` over ``axes`` (normalized, sorted, non-negative).

    ``out``, if given, has ``x``'s shape; it is flipped where ``x`` is and merged only where both
    allow, and comes back as ``Plan.out_view`` in the kernel's shape.
    """
    if out is None:
        quick = _quick_plan(x, axes)
        if quick is not None:
            return quick
    red = set(axes)
    kept_shape = tuple(s for a, s in enumerate(x.shape) if a not in red)
    flipped = {a for a in range(x.ndim) if x.strides[a] < 0 and x.shape[a] > 1}
    flips = tuple(sorted(flipped))
    base = np.flip(x, flips) if flipped else x
    obase = None if out is None else (np.flip(out, flips) if flipped else out)
    live = [a for a in range(x.ndim) if x.shape[a] > 1]
    # stable sort: outer (large stride) first, ties keep axis order
    phys = sorted(live, key=lambda a: -base.strides[a])
    kept_phys = [a for a in phys if a not in red]
    red_phys = [a for a in phys if a in red]

    groups: list[list[int]] = []  # each: [is_reduced, size, stride, out stride]
    for a in phys:
        size, stride, is_red = base.shape[a], base.strides[a], int(a in red)
        ostride = stride if obase is None else obase.strides[a]
        if groups:
            g = groups[-1]
            if g[0] == is_red and g[2] == size * stride and stride != 0 and g[3] == size * ostride:
                g[1] *= size
                g[2] = stride
                g[3] = ostride
                continue
        groups.append([is_red, size, stride, ostride])
    kinds = tuple(g[0] for g in groups)
    p = Plan("generic", base, kept_phys, red_phys, base, flipped, kept_shape)

    def view(arr: np.ndarray, gs: list[list[int]], col: int) -> np.ndarray:
        shape = tuple(g[1] for g in gs)
        strides = tuple(g[col] for g in gs)
        if arr.flags.c_contiguous:
            # a plain reshape where it has the strides wanted: Numba's dispatcher takes such an
            # array some 25 us faster than an as_strided view of the same memory (measured on a
            # 26 MB NCHW batch)
            v = arr.reshape(shape)
            if v.strides == strides:
                v.flags.writeable = col == 3 and arr.flags.writeable
                return v
        return as_strided(arr, shape=shape, strides=strides, writeable=col == 3)

    one = [0, 1, base.itemsize, 0 if obase is None else obase.itemsize]
    layouts: dict[tuple[int, ...], tuple[str, list[list[int]]]] = {
        (): ("none", [[0, 1, base.itemsize, one[3]]]),
        (0,): ("none", groups),
        (1,): ("cf", [one, one, *groups]),
        (1, 0): ("rows", groups),
        (0, 1): ("cf", [one, *groups]),
        (1, 0, 1): ("cf", groups),
    }
    if kinds in layouts:
        p.kind, gs = layouts[kinds]
        p.view = view(base, gs, 2)
        if obase is not None:
            p.out_view = view(obase, gs, 3)
    return p


def row_weights(p: Plan, w: np.ndarray, a0: int) -> np.ndarray:
    """Per-row weights of a ``rows`` plan: ``w`` (along original axis ``a0``) over merged rows."""
    shape = [p.base.shape[a] for a in p.red_phys]
    ww = w[::-1] if a0 in p.flipped else w
    if a0 not in p.red_phys:  # a0 has size 1
        return np.full(int(np.prod(shape)), float(ww[0]) if ww.size else 0.0)
    pos = p.red_phys.index(a0)
    bshape = [1] * len(shape)
    bshape[pos] = -1
    return np.ascontiguousarray(np.broadcast_to(ww.reshape(bshape), shape)).reshape(-1)
