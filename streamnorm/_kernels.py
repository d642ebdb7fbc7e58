"""Numba kernels: block moments for each layout and the Chan merge.

Pure array-in/array-out functions, no validation. ``streamnorm._moments`` decides which kernel an
array reaches and in which shape.

Every kernel follows the same scheme:

1. the reduced elements are cut into fixed-size blocks (rows of a ``(rows, D)`` view, or contiguous
   segments of a ``(A, C, L)`` view); the cut depends only on the shape and dtype;
2. each block's ``(n, mean, M2)`` is computed in one pass shifted by one of the block's own samples,
   checked, and redone as a two-pass over the cache-resident block where the check finds the
   cancellation too large (see :func:`_rows_block_shifted`); means are kept relative to a
   per-dimension reference value ``ref`` (the shift keeps digits when the data sit far from zero);
3. the blocks of a chunk are merged in order into the chunk's own slot (one parallel task a chunk,
   no shared accumulators), then the chunk slots are merged serially in order.

Results are therefore bit-identical for any number of threads. Means are returned un-shifted.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._config import (
    JIT,
    ORDERED_JIT,
    REFINE,
    STRICT_JIT,
    STRICT_PARALLEL_JIT,
)
from ._jit import twins


@njit(**STRICT_JIT)
def zeros(rows, cols):
    """A zeroed float64 (rows, cols) array, for the parallel kernels to allocate with.

    Inside a ``parallel=True`` function Numba turns ``np.zeros`` into a parallel loop of its own,
    one more launch of the thread pool (about 2 us each, three per small batch before this);
    allocated in a plain compiled function it is a ``calloc``-like serial fill.
    """
    return np.zeros((rows, cols))


@njit(**STRICT_JIT)
def chan_merge_into(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge state ``b`` into state ``a`` in place (flat float64 arrays of one length)."""
    for d in range(n_a.shape[0]):
        nb = n_b[d]
        if nb == 0.0:
            continue
        na = n_a[d]
        if na == 0.0:
            n_a[d] = nb
            mean_a[d] = mean_b[d]
            m2_a[d] = m2_b[d]
            continue
        n = na + nb
        delta = mean_b[d] - mean_a[d]
        mean_a[d] = mean_a[d] + delta * (nb / n)
        m2_a[d] = m2_a[d] + m2_b[d] + delta * delta * (na * (nb / n))
        n_a[d] = n


@njit(**STRICT_JIT)
def chan_merge_dd(n_a, mean_a, lo_a, m2_a, n_b, mean_b, lo_b, m2_b):
    """Chan merge of state ``b`` into ``a`` in place, with means kept as ``mean + lo``.

    ``lo`` is the rounding residual of the mean (a double-double mean). Far from zero the stored
    float64 mean alone carries ``ulp(mean)`` of error, which the merge term ``d**2 na nb / n``
    would amplify; with the residual, ``d`` keeps full precision. Compiled without fastmath: the
    two-sum below must not be reassociated away.
    """
    for d in range(n_a.shape[0]):
        nb = n_b[d]
        if nb == 0.0:
            continue
        na = n_a[d]
        if na == 0.0:
            n_a[d] = nb
            mean_a[d] = mean_b[d]
            lo_a[d] = lo_b[d]
            m2_a[d] = m2_b[d]
            continue
        n = na + nb
        delta = (mean_b[d] - mean_a[d]) + (lo_b[d] - lo_a[d])
        t = delta * (nb / n)
        a = mean_a[d]
        hi = a + t
        bb = hi - a
        err = (a - (hi - bb)) + (t - bb)
        mean_a[d] = hi
        lo_a[d] = lo_a[d] + err
        m2_a[d] = m2_a[d] + m2_b[d] + delta * delta * (na * (nb / n))
        n_a[d] = n


@njit(**STRICT_JIT)
def chan_rows(n, mu, m2, cnt, mean, q, uniform):
    """Chan-merge the rows of ``(n, mu, m2)`` into the state ``(cnt, mean, q)``, in order.

    ``n = na + nb; d = mb - ma; mean = ma + d nb / n; M2 = M2a + M2b + d^2 na nb / n``; a
    dimension with ``nb == 0`` is skipped, one with ``na == 0`` takes the row's values. With
    ``uniform`` every dimension of a row (and of the state) has the same count, ``n`` may be
    ``(k, 1)``, and the two divisions are done once per row: the same values as
    :func:`chan_merge_into` per dimension, so the same bits. Compiled without fastmath, as every
    merge here. Used for the kernels' chunk slots and for the estimators' groups of batches.
    """
    k, D = mu.shape
    if uniform:
        na = cnt[0] if D else 0.0
        for i in range(k):
            nb = n[i, 0]
            if nb == 0.0:
                continue
            mi = mu[i]
            qi = m2[i]
            if na == 0.0:
                mean[:] = mi
                q[:] = qi
                na = nb
                continue
            tot = na + nb
            f = nb / tot
            g = na * f
            for d in range(D):
                delta = mi[d] - mean[d]
                q[d] = q[d] + qi[d] + delta * delta * g
                mean[d] = mean[d] + delta * f
            na = tot
        cnt[:] = na
        return
    for i in range(k):
        for d in range(D):
            nb = n[i, d]
            if nb == 0.0:
                continue
            na = cnt[d]
            if na == 0.0:
                cnt[d] = nb
                mean[d] = mu[i, d]
                q[d] = m2[i, d]
                continue
            tot = na + nb
            f = nb / tot
            delta = mu[i, d] - mean[d]
            mean[d] = mean[d] + delta * f
            q[d] = q[d] + m2[i, d] + delta * delta * (na * f)
            cnt[d] = tot


@njit(**STRICT_JIT)
def _finish(n, mean, m2, ref):
    """Add the reference back, returning the residual ``lo`` of that addition.

    Dimensions with a NaN/Inf become NaN; empty ones get NaN mean and 0 M2.
    """
    lo = np.zeros(mean.shape[0])
    for d in range(mean.shape[0]):
        if n[d] == 0.0:
            mean[d] = np.nan
            m2[d] = 0.0
            continue
        s = mean[d]
        r = ref[d]
        hi = r + s
        bb = hi - r
        mean[d] = hi
        lo[d] = (r - (hi - bb)) + (s - bb)
        if not (np.isfinite(mean[d]) and np.isfinite(m2[d])):
            mean[d] = np.nan
            m2[d] = np.nan
            lo[d] = 0.0
    return lo


@njit(**STRICT_JIT)
def merge_slots(c_n, c_mean, c_m2, ref):
    """Merge per-chunk slots in chunk order into the kernel result ``(n, mean, m2, lo)``.

    ``c_mean``/``c_m2`` are (K, D), means shifted by ``ref`` (D,); ``c_n`` is (K, D) for
    per-dimension counts or (K, 1) when every dimension of a chunk has the same count.
    """
    D = c_mean.shape[1]
    n_out = np.zeros(D)
    mean_out = np.zeros(D)
    m2_out = np.zeros(D)
    chan_rows(c_n, c_mean, c_m2, n_out, mean_out, m2_out, c_n.shape[1] != D)
    lo = _finish(n_out, mean_out, m2_out, ref)
    return n_out, mean_out, m2_out, lo


@njit(**STRICT_JIT)
def finite_or_zero(v):
    """The shift reference of a kernel: ``v`` as float64, non-finite entries replaced by 0."""
    ref = np.empty(v.shape[0])
    for i in range(v.shape[0]):
        f = float(v[i])
        ref[i] = f if np.isfinite(f) else 0.0
    return ref


@njit(**ORDERED_JIT)
def _rows_block(x, r0, r1, ref, s, q):
    """Two-pass moments of rows ``r0:r1`` of ``x`` shifted by ``ref``: mean to ``s``, M2 to ``q``.

    The first pass streams rows one at a time (what the hardware prefetcher follows best from
    memory); the second, over the cache-resident block, takes four rows at a time so that each
    accumulator is loaded and stored once per four rows. Both passes subtract ``ref`` first
    (exact for data near it) and never form ``ref + s``, whose rounding would bias M2 by
    ``n * ulp(ref)**2``.
    """
    D = x.shape[1]
    nb = r1 - r0
    r4 = r0 + nb // 4 * 4
    s[:] = 0.0
    for r in range(r0, r1):
        xr = x[r]
        for d in range(D):
            s[d] += xr[d] - ref[d]
    for d in range(D):
        s[d] /= nb
    q[:] = 0.0
    for r in range(r0, r4, 4):
        x0 = x[r]
        x1 = x[r + 1]
        x2 = x[r + 2]
        x3 = x[r + 3]
        for d in range(D):
            rd = ref[d]
            sd = s[d]
            t0 = (x0[d] - rd) - sd
            t1 = (x1[d] - rd) - sd
            t2 = (x2[d] - rd) - sd
            t3 = (x3[d] - rd) - sd
            q[d] += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3)
    for r in range(r4, r1):
        xr = x[r]
        for d in range(D):
            t = (xr[d] - ref[d]) - s[d]
            q[d] += t * t


@njit(**ORDERED_JIT)
def _rows_block_shifted(x, r0, r1, ref, s, q, x0):
    """One pass over rows ``r0:r1`` shifted by the block's own first row, checked.

    Accumulates ``v = x - x0`` and ``v**2`` per column and forms ``M2 = sum v**2 - (sum v)**2/n``.
    Because ``x0`` is a sample of the block, ``(mean - x0)**2 <= n * var`` and the cancellation
    loses at most ``log10(n + 1)`` digits; the block is redone with the two-pass
    (:func:`_rows_block`) whenever ``sum v**2 > REFINE * M2`` in some column, so no more than
    ``log10(REFINE)`` digits are ever lost. Writes the mean relative to ``ref`` into ``s``.
    """
    D = x.shape[1]
    nb = r1 - r0
    p = nb // 4
    r4 = r0 + 4 * p
    for d in range(D):
        x0[d] = x[r0, d]
    s[:] = 0.0
    q[:] = 0.0
    # four rows at a time: each accumulator is loaded and stored once per four rows, not once
    # per element (a loop over one row at a time is bound by those loads and stores). The four
    # rows come from the four quarters of the block: four sequential streams, which the
    # hardware prefetcher follows while the loop computes. Four consecutive rows a step read
    # memory about 25 % slower on one thread, as if reading and computing took turns; two
    # consecutive rows from each half of the block lost as much at some row widths (1-2 KB
    # rows), four streams at none (``bench/bench_streams.py``)
    for i in range(p):
        r = r0 + i
        a0 = x[r]
        a1 = x[r + p]
        a2 = x[r + 2 * p]
        a3 = x[r + 3 * p]
        for d in range(D):
            c = x0[d]
            v0 = a0[d] - c
            v1 = a1[d] - c
            v2 = a2[d] - c
            v3 = a3[d] - c
            s[d] += (v0 + v1) + (v2 + v3)
            # a chain of four multiply-adds: one vector op per element (the pairwise form
            # (v0*v0 + v1*v1) + (v2*v2 + v3*v3) + q takes six per four elements)
            qd = q[d]
            qd += v0 * v0
            qd += v1 * v1
            qd += v2 * v2
            qd += v3 * v3
            q[d] = qd
    for r in range(r4, r1):
        xr = x[r]
        for d in range(D):
            v = xr[d] - x0[d]
            s[d] += v
            q[d] += v * v
    refine = False
    for d in range(D):
        mb = s[d] / nb
        m2 = q[d] - s[d] * mb
        if q[d] > REFINE * m2:
            refine = True
        q[d] = m2
        s[d] = (x0[d] - ref[d]) + mb
    if refine:
        _rows_block(x, r0, r1, ref, s, q)


def _rows_slots(x, block_rows, chunk_blocks):
    """The chunk slots of the moments of the columns of ``x`` (R, D), reduced over R.

    Returns ``(c_n, c_mean, c_m2, ref)``: one row of ``(K, 1)`` counts and ``(K, D)`` means
    (relative to ``ref``) and M2s per parallel chunk, for :func:`merge_slots` or
    :func:`merge_slots_into` to merge in chunk order.
    """
    R, D = x.shape
    ref = finite_or_zero(x[0])
    nblocks = (R + block_rows - 1) // block_rows
    nchunks = (nblocks + chunk_blocks - 1) // chunk_blocks
    c_n = zeros(nchunks, 1)
    c_mean = zeros(nchunks, D)
    c_m2 = zeros(nchunks, D)
    for k in prange(nchunks):
        s = np.empty(D)
        q = np.empty(D)
        x0 = np.empty(D)
        cm = c_mean[k]
        cq = c_m2[k]
        n_acc = 0.0
        b1 = min(nblocks, (k + 1) * chunk_blocks)
        for b in range(k * chunk_blocks, b1):
            r0 = b * block_rows
            r1 = min(R, r0 + block_rows)
            _rows_block_shifted(x, r0, r1, ref, s, q, x0)
            nb = float(r1 - r0)
            n = n_acc + nb
            f = nb / n
            g = n_acc * f
            for d in range(D):
                delta = s[d] - cm[d]
                cm[d] += delta * f
                cq[d] += q[d] + delta * delta * g
            n_acc = n
        c_n[k, 0] = n_acc
    return c_n, c_mean, c_m2, ref


#: the kernel, and its twin without threads for batches too small to repay a parallel launch
rows_slots, rows_slots_serial = twins(_rows_slots, STRICT_PARALLEL_JIT, STRICT_JIT)


@njit(**STRICT_JIT)
def rows_moments(x, block_rows, chunk_blocks):
    """Moments of the columns of a 2-D array ``x`` of shape (R, D), reduced over R.

    Returns ``(n, mean, m2, lo)``, each float64 of shape (D,); ``lo`` is the residual of ``mean``.
    """
    c_n, c_mean, c_m2, ref = rows_slots(x, block_rows, chunk_blocks)
    return merge_slots(c_n, c_mean, c_m2, ref)


@njit(**STRICT_JIT)
def rows_moments_serial(x, block_rows, chunk_blocks):
    """:func:`rows_moments` without threads, for batches too small to repay a parallel launch."""
    c_n, c_mean, c_m2, ref = rows_slots_serial(x, block_rows, chunk_blocks)
    return merge_slots(c_n, c_mean, c_m2, ref)


@njit(**STRICT_JIT)
def _same(v):
    """All entries of ``v`` are equal (branch-free, so that it vectorizes)."""
    u = True
    for d in range(v.shape[0]):
        u &= v[d] == v[0]
    return u


@njit(**STRICT_JIT)
def _finish_merge(s, q, ref, f, g, mean, lo, m2):
    """:func:`_finish` of ``(s, q)`` then :func:`chan_merge_dd` into a state, for uniform counts.

    ``f = nb / n`` and ``g = na * f`` are the merge's weights, the same for every dimension;
    written without branches (a non-finite result is selected to NaN) so that it vectorizes.
    """
    inf = np.inf
    for d in range(s.shape[0]):
        sd = s[d]
        qd = q[d]
        r = ref[d]
        hi = r + sd
        bb = hi - r
        lb = (r - (hi - bb)) + (sd - bb)
        ok = (abs(hi) < inf) & (abs(qd) < inf)
        # non-finite: NaN, as _finish makes it (its lo = 0 is moot: delta is NaN either way)
        hi = hi if ok else np.nan
        qd = qd if ok else np.nan
        a = mean[d]
        delta = (hi - a) + (lb - lo[d])
        t = delta * f
        h2 = a + t
        b2 = h2 - a
        err = (a - (h2 - b2)) + (t - b2)
        mean[d] = h2
        lo[d] = lo[d] + err
        m2[d] = m2[d] + qd + delta * delta * g


@njit(**STRICT_JIT)
def merge_slots_into(c_n, c_mean, c_m2, ref, check, n, mean, lo, m2):
    """Merge a kernel's chunk slots straight into the state ``(n, mean, lo, m2)``, in place.

    The arithmetic of :func:`merge_slots` followed by :func:`chan_merge_dd`, bit for bit; where
    the slots and the state each have one count for every dimension (a stream of plain
    batches), the per-dimension divisions and branches of those two go and the last steps run
    as one vectorized loop (2.7 -> 1.5 us for 512 dimensions). With ``check``, returns False and
    leaves the state unchanged when some dimension that received samples came out non-finite.
    """
    D = c_mean.shape[1]
    if D == 0:
        return True
    if c_n.shape[1] != 1 or not _same(n):
        bn, bm, bq, blo = merge_slots(c_n, c_mean, c_m2, ref)
        if check:
            for d in range(D):
                if bn[d] > 0.0 and not (np.isfinite(bm[d]) and np.isfinite(bq[d])):
                    return False
        chan_merge_dd(n, mean, lo, m2, bn, bm, blo, bq)
        return True
    s = np.zeros(D)
    q = np.zeros(D)
    cnt = np.zeros(1)
    chan_rows(c_n, c_mean, c_m2, cnt, s, q, True)
    nb = cnt[0]
    if nb == 0.0:
        return True
    if check:
        inf = np.inf
        ok = True
        for d in range(D):
            ok &= (abs(ref[d] + s[d]) < inf) & (abs(q[d]) < inf)
        if not ok:
            return False
    na = n[0]
    if na == 0.0:
        lb = _finish(np.full(D, nb), s, q, ref)
        mean[:] = s
        lo[:] = lb
        m2[:] = q
        n[:] = nb
        return True
    tot = na + nb
    f = nb / tot
    _finish_merge(s, q, ref, f, na * f, mean, lo, m2)
    n[:] = tot
    return True


@njit(**STRICT_JIT)
def rows_merge(x, block_rows, chunk_blocks, parallel, n, mean, lo, m2):
    """The moments of ``x`` (rows kernel) merged into ``(n, mean, lo, m2)`` in place, one call.

    ``parallel`` picks :func:`rows_slots` or its serial twin; the slots are merged by
    :func:`merge_slots_into`. Returns False, with the state unchanged, when ``x`` is float64
    and some dimension came out non-finite (the caller's general path rescues overflow). Kept
    in this module so that Numba's on-disk cache, which checks only the defining file, is
    invalidated together with the kernels it calls.
    """
    if parallel:
        c_n, c_mean, c_m2, ref = rows_slots(x, block_rows, chunk_blocks)
    else:
        c_n, c_mean, c_m2, ref = rows_slots_serial(x, block_rows, chunk_blocks)
    return merge_slots_into(c_n, c_mean, c_m2, ref, x.itemsize == 8, n, mean, lo, m2)


def _rows_moments_general(x, ref, w, use_w, omit, block_rows, chunk_blocks):
    """Like :func:`rows_moments`, with optional per-row weights ``w`` and NaN/Inf omission.

    With ``omit`` a non-finite value is skipped and counts are per column. With ``use_w`` row ``r``
    counts ``w[r]`` times (frequency weights). Returns ``(n, mean, m2, lo)`` of shape (D,).
    """
    R, D = x.shape
    nblocks = (R + block_rows - 1) // block_rows
    nchunks = (nblocks + chunk_blocks - 1) // chunk_blocks
    c_n = zeros(nchunks, D)
    c_mean = zeros(nchunks, D)
    c_m2 = zeros(nchunks, D)
    for k in prange(nchunks):
        s = np.empty(D)
        q = np.empty(D)
        cn = np.empty(D)
        b1 = min(nblocks, (k + 1) * chunk_blocks)
        for b in range(k * chunk_blocks, b1):
            r0 = b * block_rows
            r1 = min(R, r0 + block_rows)
            s[:] = 0.0
            q[:] = 0.0
            cn[:] = 0.0
            for r in range(r0, r1):
                wr = w[r] if use_w else 1.0
                if wr == 0.0:
                    continue
                for d in range(D):
                    xv = x[r, d]
                    if omit and not np.isfinite(xv):
                        continue
                    v = xv - ref[d]
                    s[d] += wr * v
                    cn[d] += wr
            for d in range(D):
                if cn[d] > 0.0:
                    s[d] /= cn[d]
            for r in range(r0, r1):
                wr = w[r] if use_w else 1.0
                if wr == 0.0:
                    continue
                for d in range(D):
                    xv = x[r, d]
                    if omit and not np.isfinite(xv):
                        continue
                    v = xv - ref[d]
                    t = v - s[d]
                    q[d] += wr * (t * t)
            chan_merge_into(c_n[k], c_mean[k], c_m2[k], cn, s, q)
    return merge_slots(c_n, c_mean, c_m2, ref)


rows_moments_general, rows_moments_general_serial = twins(
    _rows_moments_general, STRICT_PARALLEL_JIT, STRICT_JIT
)


@njit(**JIT)
def _cf_block(x, c, a0, a1, l0, l1, r):
    """(mean - r, M2) of ``x[a0:a1, c, l0:l1]``: a checked shifted pass, else a two-pass.

    A jitted function of its own: the reassociation that vectorizes these contiguous sums is
    applied to jitted functions, not to loop bodies inlined into a ``prange``.
    """
    n = (a1 - a0) * (l1 - l0)
    # one pass shifted by the block's first element, checked as in _rows_block_shifted
    x0 = np.float64(x[a0, c, l0])  # float() of a float32 stays float32 in Numba
    s1 = 0.0
    s2 = 0.0
    for a in range(a0, a1):
        row = x[a, c, l0:l1]
        for i in range(row.shape[0]):
            v = row[i] - x0
            s1 += v
            s2 += v * v
    mb = s1 / n
    m2 = s2 - s1 * mb
    if not s2 > REFINE * m2:
        return (x0 - r) + mb, m2
    tot = 0.0
    for a in range(a0, a1):
        row = x[a, c, l0:l1]
        for i in range(row.shape[0]):
            tot += row[i] - r
    mb = tot / n
    qq = 0.0
    for a in range(a0, a1):
        row = x[a, c, l0:l1]
        for i in range(row.shape[0]):
            v = (row[i] - r) - mb
            qq += v * v
    return mb, qq


def _cf_moments(x, seg_len, chunk_blocks):
    """Moments of a 3-D array ``x`` of shape (A, C, L), reduced over A and L (channels-first).

    ``L`` should be the contiguous axis. Covers NCL/NCHW/NCDHW (as ``(N, C, H*W...)``),
    per-sample statistics (``(1, rows, L)``) and 1-D data (``(1, 1, n)``). A block is a run of
    about ``seg_len`` contiguous elements: part of one row when ``L > seg_len``, else several
    whole rows ``x[a0:a1, c, :]``. Returns ``(n, mean, m2, lo)`` of shape (C,).
    """
    A, C, L = x.shape
    ref = finite_or_zero(x[0, :, 0])
    if L > seg_len:
        rows_per = 1
        seg_per_row = (L + seg_len - 1) // seg_len
        nblk = A * seg_per_row
    else:
        rows_per = max(1, seg_len // L)
        seg_per_row = 1
        nblk = (A + rows_per - 1) // rows_per
    ncpc = (nblk + chunk_blocks - 1) // chunk_blocks
    c_n = zeros(ncpc, C)
    c_mean = zeros(ncpc, C)
    c_m2 = zeros(ncpc, C)
    for t in prange(C * ncpc):
        # chunk-major order: consecutive tasks read neighbouring channels of the same samples,
        # so the threads stream through memory in address order
        k = t // C
        c = t - k * C
        r = ref[c]
        n_acc = 0.0
        m_acc = 0.0
        q_acc = 0.0
        for b in range(k * chunk_blocks, min(nblk, (k + 1) * chunk_blocks)):
            if rows_per > 1 or seg_per_row == 1:
                a0 = b * rows_per
                a1 = min(A, a0 + rows_per)
                l0 = 0
                l1 = L
            else:
                a0 = b // seg_per_row
                a1 = a0 + 1
                l0 = (b - a0 * seg_per_row) * seg_len
                l1 = min(L, l0 + seg_len)
            mb, qq = _cf_block(x, c, a0, a1, l0, l1, r)
            nb = float((a1 - a0) * (l1 - l0))
            n = n_acc + nb
            f = nb / n
            delta = mb - m_acc
            m_acc += delta * f
            q_acc += qq + delta * delta * (n_acc * f)
            n_acc = n
        c_n[k, c] = n_acc
        c_mean[k, c] = m_acc
        c_m2[k, c] = q_acc
    return merge_slots(c_n, c_mean, c_m2, ref)


@njit(**JIT)
def _cf_rows_block(x, a0, a1, ref, s, q, x0):
    """Every channel of samples ``a0:a1`` of ``x`` (A, C, L), read as two sequential streams.

    Per channel one pass over ``v = x - x0[c]`` (``x0[c]`` the block's first element of that
    channel), checked and redone as a two-pass as in :func:`_rows_block_shifted`. Writes the
    mean relative to ``ref`` into ``s`` and M2 into ``q``. Sample ``a`` of the first half of the
    run is read together with sample ``a + h`` of the second half (a sample left over: the two
    halves of its rows): two address-ordered streams that the prefetcher follows while the loop
    computes (one stream a step read about 20 % slower, the same effect as in the rows kernel).
    """
    C = x.shape[1]
    L = x.shape[2]
    n = (a1 - a0) * L
    h = (a1 - a0) // 2
    s1 = np.zeros(C)
    s2 = np.zeros(C)
    for c in range(C):
        x0[c] = np.float64(x[a0, c, 0])
    for a in range(a0, a0 + h):
        for c in range(C):
            row = x[a, c]
            far = x[a + h, c]
            xc = x0[c]
            t1 = 0.0
            t2 = 0.0
            for i in range(L):
                v = row[i] - xc
                w = far[i] - xc
                t1 += v + w
                t2 += v * v + w * w
            s1[c] += t1
            s2[c] += t2
    # a sample left over (an odd run, or a run of one): the two halves of each of its rows
    hl = L // 2
    for a in range(a0 + 2 * h, a1):
        for c in range(C):
            row = x[a, c]
            xc = x0[c]
            t1 = 0.0
            t2 = 0.0
            for i in range(hl):
                v = row[i] - xc
                w = row[i + hl] - xc
                t1 += v + w
                t2 += v * v + w * w
            for i in range(2 * hl, L):
                v = row[i] - xc
                t1 += v
                t2 += v * v
            s1[c] += t1
            s2[c] += t2
    for c in range(C):
        mb = s1[c] / n
        m2 = s2[c] - s1[c] * mb
        if s2[c] > REFINE * m2:
            mb, m2 = _cf_block(x, c, a0, a1, 0, L, ref[c])
            s[c] = mb
        else:
            s[c] = (x0[c] - ref[c]) + mb
        q[c] = m2


def _cf_rows_moments(x, rows_per):
    """Channels-first moments for short rows: parallel over runs of ``rows_per`` samples.

    Each task reads its samples' memory in order (all channels), keeping per-channel block
    sums; the tasks' slots are merged in order. Same result contract as :func:`cf_moments`.
    """
    A, C, L = x.shape
    ref = finite_or_zero(x[0, :, 0])
    nt = (A + rows_per - 1) // rows_per
    c_n = zeros(nt, 1)
    c_mean = zeros(nt, C)
    c_m2 = zeros(nt, C)
    for k in prange(nt):
        a0 = k * rows_per
        a1 = min(A, a0 + rows_per)
        x0 = np.empty(C)
        _cf_rows_block(x, a0, a1, ref, c_mean[k], c_m2[k], x0)
        c_n[k, 0] = float((a1 - a0) * L)
    return merge_slots(c_n, c_mean, c_m2, ref)


cf_rows_moments, cf_rows_moments_serial = twins(_cf_rows_moments, STRICT_PARALLEL_JIT, STRICT_JIT)
cf_moments, cf_moments_serial = twins(_cf_moments, STRICT_PARALLEL_JIT, STRICT_JIT)


@njit(**STRICT_JIT)
def first_finite_rows(x):
    """Per column of a 2-D array, its first finite value (0.0 where there is none)."""
    R, D = x.shape
    ref = np.zeros(D)
    found = np.zeros(D, dtype=np.bool_)
    left = D
    for r in range(R):
        if left == 0:
            break
        for d in range(D):
            if not found[d]:
                v = float(x[r, d])
                if np.isfinite(v):
                    ref[d] = v
                    found[d] = True
                    left -= 1
    return ref


#: The innermost loops, each a jitted function of its own, with the options they are compiled
#: with and the float64 work they do per element of input. ``streamnorm bench`` compiles copies
#: of them to read their machine code (which loops vectorize, at which width).
LEAF_LOOPS = {
    "rows, one pass (4 rows a step)": (
        _rows_block_shifted,
        ORDERED_JIT,
        "convert, subtract, add, multiply-add: 4 vector ops, 3 flops",
    ),
    "rows, two-pass (refinement only)": (
        _rows_block,
        ORDERED_JIT,
        "two reads; convert, 2 subtract, add; then convert, 3 subtract, multiply-add",
    ),
    "channels-first, two samples' rows": (
        _cf_rows_block,
        JIT,
        "convert, subtract, add, multiply-add: 4 vector ops, 3 flops",
    ),
    "channels-first, one long row": (
        _cf_block,
        JIT,
        "convert, subtract, add, multiply-add: 4 vector ops, 3 flops",
    ),
}
