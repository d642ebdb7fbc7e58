"""Kernel dispatch: one batch of a validated array to flat float64 ``(n, mean, m2, lo)``.

Picks the Numba kernel for the layout that :func:`streamnorm._layout.plan` found and sizes its
blocks. Validates nothing: callers (``_moments``) have checked dtype, axes and weights.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from . import _kernels as K
from ._config import (
    BLOCK_BYTES,
    CF_RUN_ELEMS,
    CHUNK_ELEMS,
    GENERIC_BLOCK_BYTES,
    MAX_BLOCK_BYTES,
    MAX_CHUNKS,
    MIN_BLOCK_ROWS,
    MIN_CHUNKS,
    NARROW_WIDTH,
    SEG_LEN,
    SERIAL_BYTES,
    SLOT_ELEMS,
)
from ._jit import threads_ok
from ._layout import KERNEL_DTYPES, Plan, plan, row_weights

#: one batch from a kernel: flat float64 (n, mean, m2, lo), lo the rounding residual of mean
Stats = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@lru_cache(maxsize=256)
def _rows_params(D: int, itemsize: int, R: int) -> tuple[int, int]:
    # cached: a stream repeats a handful of shapes, and this costs 0.6 us a call, a lookup 0.1
    row_bytes = max(1, D * itemsize)
    block_rows = max(1, BLOCK_BYTES // row_bytes, min(MIN_BLOCK_ROWS, MAX_BLOCK_BYTES // row_bytes))
    nblocks = -(-R // block_rows)
    max_chunks = min(MAX_CHUNKS, max(MIN_CHUNKS, SLOT_ELEMS // max(1, D)))
    chunk_blocks = max(1, -(-nblocks // max_chunks), CHUNK_ELEMS // max(1, block_rows * D))
    return block_rows, chunk_blocks


def _cf_params(A: int, L: int) -> tuple[int, int]:
    """Segment length and blocks per parallel chunk of the channels-first kernel (A, C, L).

    A block is ``seg`` contiguous elements of a long row, or whole short rows of up to
    ``seg // L`` samples (never more than the ``A`` there are).
    """
    block = L * min(A, max(1, SEG_LEN // L)) if L <= SEG_LEN else SEG_LEN
    return SEG_LEN, max(1, CHUNK_ELEMS // max(1, block))


def run_rows(x: np.ndarray, w: np.ndarray | None, omit: bool) -> Stats:
    R, D = x.shape
    k = NARROW_WIDTH[x.itemsize] // D if D else 0
    if k > 1 and w is None and not omit and x.flags.c_contiguous and R >= 2 * k:
        # narrow rows: k consecutive rows side by side make a (R // k, k * D) array whose rows
        # vectorize well; the k column groups of each dimension are merged afterwards
        r1 = R // k * k
        wide = run_rows(x[:r1].reshape(r1 // k, k * D), None, False)
        acc = [np.zeros(D), np.full(D, np.nan), np.zeros(D), np.zeros(D)]  # n, mean, lo, m2
        n, m, q, lo = (a.reshape(k, D) for a in wide)
        for j in range(k):
            K.chan_merge_dd(*acc, n[j], m[j], lo[j], q[j])
        if r1 < R:
            n, m, q, lo = run_rows(x[r1:], None, False)
            K.chan_merge_dd(*acc, n, m, lo, q)
        return acc[0], acc[1], acc[3], acc[2]
    br, cb = _rows_params(D, x.itemsize, R)
    if w is None and not omit:
        par = x.nbytes >= SERIAL_BYTES and threads_ok()
        kernel = K.rows_moments if par else K.rows_moments_serial
        return kernel(x, br, cb)
    ref = K.first_finite_rows(x) if omit else K.finite_or_zero(x[0])
    ww = w if w is not None else np.empty(0)
    general = K.rows_moments_general if threads_ok() else K.rows_moments_general_serial
    return general(x, ref, ww, w is not None, omit, br, cb)


# --------------------------------------------------------------------------------------------
# small batches: the kernel and what follows it in one compiled call
#
# A (256, 512) float32 batch takes some 20-25 us in the kernel. Boxing its four result arrays
# (0.9 us), sizing its blocks in Python (0.6 us) and entering compiled code again to merge them
# (0.5 us) add as much again as the rest of an update. The function below runs the very kernel
# of :func:`run_rows`, then the merge, in one call; the arithmetic, and every bit, is the same.


def plain_rows(x: np.ndarray) -> bool:
    """``x`` (2-D, C-contiguous, native float32/float64) takes the plain rows kernel in run_rows.

    True where :func:`run_rows` would run ``rows_moments`` or its serial twin on ``x`` itself
    (no weights, no omission, rows wide enough not to be regrouped).
    """
    R, D = x.shape
    return R > 0 and NARROW_WIDTH[x.itemsize] // max(1, D) <= 1


@lru_cache(maxsize=256)
def rows_plan(R: int, D: int, itemsize: int) -> tuple[int, int, bool]:
    """``(block_rows, chunk_blocks, parallel)`` of the plain rows kernel for an (R, D) batch.

    The blocking :func:`run_rows` uses, and whether it runs the parallel kernel; a caller that
    streams batches of one shape may keep it (see :func:`merge_rows`).
    """
    br, cb = _rows_params(D, itemsize, R)
    return br, cb, R * D * itemsize >= SERIAL_BYTES


def merge_rows(
    x: np.ndarray,
    n: np.ndarray,
    mean: np.ndarray,
    lo: np.ndarray,
    m2: np.ndarray,
    blocking: tuple[int, int, bool] | None = None,
) -> bool:
    """Merge the moments of ``x`` (see :func:`plain_rows`) into a state's arrays in place.

    Runs the kernel :func:`run_rows` would run, with the same blocking (``blocking``, from
    :func:`rows_plan`, saves looking it up again), and the Chan merge of
    ``_kernels.chan_merge_dd`` in one compiled call (``_kernels.rows_merge``). Returns False, with
    the arrays unchanged, when ``x`` is float64 and some dimension came out non-finite: the
    caller then takes the general path, which rescues overflow.
    """
    br, cb, par = blocking if blocking is not None else rows_plan(*x.shape, x.itemsize)
    return bool(K.rows_merge(x, br, cb, par and threads_ok(), n, mean, lo, m2))


def _run_cf(x: np.ndarray) -> Stats:
    A, C, L = x.shape
    if A > 1:
        # several samples: tasks over runs of samples read memory in address order
        rows_per = max(1, min(-(-CF_RUN_ELEMS // max(1, L)), -(-A // 8)))
        parallel = x.nbytes >= SERIAL_BYTES and threads_ok()
        kernel = K.cf_rows_moments if parallel else K.cf_rows_moments_serial
        return kernel(x, rows_per)
    seg, cs = _cf_params(A, L)
    parallel = x.nbytes >= SERIAL_BYTES and threads_ok()
    kernel = K.cf_moments if parallel else K.cf_moments_serial
    return kernel(x, seg, cs)


def _generic(p: Plan, axes: tuple[int, ...], w: np.ndarray | None, omit: bool) -> Stats:
    """Any layout: copy blocks of the reduced axes into contiguous (rows, D) buffers."""
    base = p.base
    # size-1 axes are not in the physical lists; they go anywhere without changing the order
    red = p.red_phys + [a for a in axes if a not in p.red_phys]
    kept = p.kept_phys + [a for a in range(base.ndim) if a not in axes and a not in p.kept_phys]
    y = np.transpose(base, red + kept)
    nr = len(red)
    rshape = y.shape[:nr]
    D = int(np.prod(y.shape[nr:], dtype=np.int64))
    work_dtype = base.dtype if base.dtype in KERNEL_DTYPES else np.dtype(np.float64)
    if base.dtype == np.float16:
        work_dtype = np.dtype(np.float32)
    target = max(1, GENERIC_BLOCK_BYTES // max(1, D * work_dtype.itemsize))
    wR = None
    if w is not None:
        a0 = axes[0]
        ww = w[::-1] if a0 in p.flipped else w
        if a0 in red:
            bshape = [1] * nr
            bshape[red.index(a0)] = -1
            wR = np.broadcast_to(ww.reshape(bshape), rshape)
        else:
            wR = np.broadcast_to(
                ww[:1].reshape([1] * nr) if ww.size else np.zeros([1] * nr), rshape
            )
    # split: iterate over rshape[:j], take whole rshape[j:] per block (or slices of the last axis)
    j = nr
    inner = 1
    while j > 0 and inner * rshape[j - 1] <= target:
        inner *= rshape[j - 1]
        j -= 1
    acc = [np.zeros(D), np.full(D, np.nan), np.zeros(D), np.zeros(D)]  # n, mean, lo, m2
    if j == nr:  # even one row of the innermost reduced axis is too big: slice it
        outer_idx = list(np.ndindex(*rshape[: nr - 1]))
        step = target
        slices: list[tuple[Any, ...]] = [
            (*o, slice(s, s + step)) for o in outer_idx for s in range(0, rshape[nr - 1], step)
        ]
    else:
        slices = list(np.ndindex(*rshape[:j]))
    for idx in slices:
        blk = np.ascontiguousarray(y[idx], dtype=work_dtype).reshape(-1, D)
        wb = None if wR is None else np.ascontiguousarray(wR[idx]).reshape(-1)
        n, m, q, lo = run_rows(blk, wb, omit)
        K.chan_merge_dd(*acc, n, m, lo, q)
    return acc[0], acc[1], acc[3], acc[2]


def reduce_batch(
    x: np.ndarray, axes: tuple[int, ...], w: np.ndarray | None, nan_policy: str
) -> Stats:
    """(n, mean, m2, lo) of one batch as flat float64 arrays over the kept dims."""
    omit = nan_policy == "omit"
    p = plan(x, axes)
    native = x.dtype in KERNEL_DTYPES and x.dtype.isnative
    if p.kind == "none":  # nothing reduced: every dimension holds one sample
        flat = p.view.astype(np.float64).reshape(-1)
        n = np.ones(flat.shape[0]) if w is None else np.full(flat.shape[0], float(w[0]))
        bad = ~np.isfinite(flat)
        if omit:
            n[bad] = 0.0
        m2 = np.where(bad & ~omit, np.nan, 0.0)
        flat[bad | (n == 0)] = np.nan
        stats: Stats = (n, flat, m2, np.zeros_like(flat))
    elif not native or p.kind == "generic" or (p.kind == "cf" and (w is not None or omit)):
        stats = _generic(p, axes, w, omit)
    elif p.kind == "rows":
        wr = None if w is None else row_weights(p, w, axes[0])
        stats = run_rows(p.view, wr, omit)
    else:
        stats = _run_cf(p.view)
    if p.kept_phys != sorted(p.kept_phys) or p.flipped:
        stats = tuple(p.restore(a).reshape(-1) for a in stats)  # type: ignore[assignment]
    return stats


__all__ = [
    "Stats",
    "merge_rows",
    "plain_rows",
    "reduce_batch",
    "rows_plan",
    "run_rows",
]
