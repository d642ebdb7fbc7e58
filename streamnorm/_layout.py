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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import as_strided


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


def plan(x: np.ndarray, axes: tuple[int, ...]) -> Plan:
    """Choose a kernel for reducing ``x`` over ``axes`` (normalized, sorted, non-negative)."""
    red = set(axes)
    kept_shape = tuple(s for a, s in enumerate(x.shape) if a not in red)
    flipped = {a for a in range(x.ndim) if x.strides[a] < 0 and x.shape[a] > 1}
    base = np.flip(x, tuple(sorted(flipped))) if flipped else x
    live = [a for a in range(x.ndim) if x.shape[a] > 1]
    # stable sort: outer (large stride) first, ties keep axis order
    phys = sorted(live, key=lambda a: -base.strides[a])
    kept_phys = [a for a in phys if a not in red]
    red_phys = [a for a in phys if a in red]

    groups: list[list[int]] = []  # each: [is_reduced, size, stride]
    for a in phys:
        size, stride, is_red = base.shape[a], base.strides[a], int(a in red)
        if groups:
            g = groups[-1]
            if g[0] == is_red and g[2] == size * stride and stride != 0:
                g[1] *= size
                g[2] = stride
                continue
        groups.append([is_red, size, stride])
    kinds = tuple(g[0] for g in groups)
    p = Plan("generic", base, kept_phys, red_phys, base, flipped, kept_shape)

    def view(gs: list[list[int]]) -> np.ndarray:
        return as_strided(
            base, shape=tuple(g[1] for g in gs), strides=tuple(g[2] for g in gs), writeable=False
        )

    one = [0, 1, base.itemsize]
    if kinds == ():
        p.kind, p.view = "none", base.reshape(-1)
    elif kinds == (0,):
        p.kind, p.view = "none", view(groups)
    elif kinds == (1,):
        p.kind, p.view = "cf", view([one, [0, 1, base.itemsize], groups[0]])
    elif kinds == (1, 0):
        p.kind, p.view = "rows", view(groups)
    elif kinds == (0, 1):
        p.kind, p.view = "cf", view([one, groups[0], groups[1]])
    elif kinds == (1, 0, 1):
        p.kind, p.view = "cf", view(groups)
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
