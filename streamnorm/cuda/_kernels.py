"""CUDA kernels (numba-cuda): block moments for the two layouts, the partial merge, the state merge.

Kernels are made by small factories and cached per variant: the number of reduced groups, whether
kept offsets come from a table, weights, NaN omission and bfloat16 decoding are compile-time
constants of a variant, so the fast path carries none of the other paths' work.

Scheme (the same as the CPU kernels, mapped to threads):

1. every block owns a fixed piece of the reduced elements of some dimensions (the cut depends on
   shape and :mod:`._config` only);
2. each thread loads ``UNROLL`` elements into registers, shifts them by the dimension's reference
   (its first element), computes the tile's mean and then its M2 around that mean (two-pass), and
   merges the tile into its running ``(n, mean, M2)`` (Chan et al.);
3. the threads of a block that share a dimension are merged by a fixed binary tree in shared
   memory, and the block writes one partial per dimension;
4. :func:`finalize_kernel` merges a dimension's partials (strided per thread, then the same
   tree), adds the reference back and merges the batch into the device-resident state.

No atomics: the result is the same bits on every run. The tree in shared memory is also what the
CUDA simulator runs, so the simulator exercises the same merge logic as the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .._extras import require
from . import _config as C

cuda = require("numba.cuda", "cuda")

_CACHE: dict[tuple[Any, ...], Any] = {}


# --------------------------------------------------------------------------------------------
# device helpers


@cuda.jit(device=True)
def chan(na, ma, qa, nb, mb, qb):  # type: ignore[no-untyped-def]
    """Chan merge of ``(nb, mb, qb)`` into ``(na, ma, qa)``; returns the merged triple."""
    if nb == 0.0:
        return na, ma, qa
    if na == 0.0:
        return nb, mb, qb
    n = na + nb
    delta = mb - ma
    f = nb / n
    return n, ma + delta * f, qa + qb + delta * delta * (na * f)


@cuda.jit(device=True)
def dec_plain(raw):  # type: ignore[no-untyped-def]
    """A stored element as float64 (float16/32/64, ints)."""
    return float(raw)


@cuda.jit(device=True)
def dec_bf16(raw):  # type: ignore[no-untyped-def]
    """A bfloat16 element stored as its 16 raw bits (uint16 or int16) as float64."""
    b = int(raw) & 0xFFFF
    e = (b >> 7) & 0xFF
    m = b & 0x7F
    if e == 255:
        v = math.inf if m == 0 else math.nan
    elif e == 0:
        v = math.ldexp(float(m), -133)
    else:
        v = math.ldexp(float(m | 128), e - 134)
    if b & 0x8000:
        v = -v
    return v


@cuda.jit(device=True)
def is_finite(v):  # type: ignore[no-untyped-def]
    return not (math.isinf(v) or math.isnan(v))


def _make_goff(ng: int) -> Callable[..., Any]:
    """Device function: offset of reduced row ``r`` over ``ng`` groups (sizes/strides arrays)."""
    if ng == 0:

        @cuda.jit(device=True)
        def goff0(r, gsz, gst):  # type: ignore[no-untyped-def]
            return 0

        return goff0  # type: ignore[no-any-return]
    if ng == 1:

        @cuda.jit(device=True)
        def goff1(r, gsz, gst):  # type: ignore[no-untyped-def]
            return r * gst[0]

        return goff1  # type: ignore[no-any-return]

    @cuda.jit(device=True)
    def goffn(r, gsz, gst):  # type: ignore[no-untyped-def]
        off = 0
        for j in range(ng - 1, 0, -1):
            q = r // gsz[j]
            off += (r - q * gsz[j]) * gst[j]
            r = q
        return off + r * gst[0]

    return goffn  # type: ignore[no-any-return]


def _block_tree(sh_n, sh_m, sh_q, t, lane, nlanes, width):  # type: ignore[no-untyped-def]
    """Merge slot ``t + s * width`` into slot ``t`` for ``s = nlanes/2, ..., 1`` (a fixed tree).

    ``lane`` is this thread's position among the ``nlanes`` threads (a power of two) that share a
    dimension; slots of one dimension are ``width`` apart.
    """
    s = nlanes // 2
    while s > 0:
        if lane < s:
            o = t + s * width
            n, m, q = chan(sh_n[t], sh_m[t], sh_q[t], sh_n[o], sh_m[o], sh_q[o])
            sh_n[t] = n
            sh_m[t] = m
            sh_q[t] = q
        cuda.syncthreads()
        s //= 2


block_tree = cuda.jit(device=True)(_block_tree)


# --------------------------------------------------------------------------------------------
# moments kernels


def rows_kernel(ng: int, ktab: bool, use_w: bool, omit: bool, bf16: bool) -> Any:
    """Kernel for reduced rows ``r`` (``ng`` strided groups) of ``D`` dimensions.

    Launch: ``blockDim = (TX, TY)`` with ``TX * TY == BLOCK_THREADS`` (both powers of two), a 1-D
    grid of ``ncol_tiles * nchunks`` blocks; block ``b`` takes column tile ``b % ncol_tiles`` and
    rows ``[chunk * rows_per_chunk, ...)`` of chunk ``b // ncol_tiles``. Partials go to
    ``pn/pm/pq[d, chunk]``; the reference of dimension ``d`` to ``ref[d]``.
    """
    key = ("rows", ng, ktab, use_w, omit, bf16, C.UNROLL, C.BLOCK_THREADS)
    if key in _CACHE:
        return _CACHE[key]
    KU = C.UNROLL
    NT = C.BLOCK_THREADS
    dec = dec_bf16 if bf16 else dec_plain
    goff = _make_goff(ng)
    f8 = np.float64
    FAST = not (use_w or omit)
    FKU = float(KU)
    INV_KU = 1.0 / KU  # exact: UNROLL is a power of two

    @cuda.jit
    def kern(x, koff, kbase, kstride, D, R, gsz, gst, rows_per_chunk, ntiles,  # type: ignore[no-untyped-def]
             w, w_inner, w_n, ref, pn, pm, pq):  # fmt: skip
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TX = cuda.blockDim.x
        TY = cuda.blockDim.y
        b = cuda.blockIdx.x
        chunk = b // ntiles
        d = (b - chunk * ntiles) * TX + tx
        sh_n = cuda.shared.array(NT, f8)
        sh_m = cuda.shared.array(NT, f8)
        sh_q = cuda.shared.array(NT, f8)
        vals = cuda.local.array(KU, f8)
        wts = cuda.local.array(KU, f8)
        na = 0.0
        ma = 0.0
        qa = 0.0
        if d < D:
            ko = koff[d] if ktab else kbase + d * kstride
            rv = dec(x[ko])
            if not is_finite(rv):
                rv = 0.0
            if chunk == 0 and ty == 0:
                ref[d] = rv
            r0 = chunk * rows_per_chunk
            r1 = min(R, r0 + rows_per_chunk)
            r = r0 + ty
            while r < r1:
                if FAST and r + (KU - 1) * TY < r1:  # a full tile, every weight 1
                    s = 0.0
                    for i in range(KU):
                        v = dec(x[ko + goff(r + i * TY, gsz, gst)]) - rv
                        vals[i] = v
                        s += v
                    mt = s * INV_KU
                    q = 0.0
                    for i in range(KU):
                        dv = vals[i] - mt
                        q += dv * dv
                    na, ma, qa = chan(na, ma, qa, FKU, mt, q)
                    r += KU * TY
                    continue
                cnt = 0.0
                s = 0.0
                for i in range(KU):
                    rr = r + i * TY
                    v = 0.0
                    wt = 0.0
                    if rr < r1:
                        v = dec(x[ko + goff(rr, gsz, gst)]) - rv
                        wt = 1.0
                        if use_w:
                            wt = w[(rr // w_inner) % w_n]
                        if omit:
                            if not is_finite(v):
                                wt = 0.0
                        if wt == 0.0:
                            v = 0.0
                    vals[i] = v
                    wts[i] = wt
                    cnt += wt
                    s += wt * v
                if cnt > 0.0:
                    mt = s / cnt
                    q = 0.0
                    for i in range(KU):
                        dv = vals[i] - mt
                        q += wts[i] * (dv * dv)
                    na, ma, qa = chan(na, ma, qa, cnt, mt, q)
                r += KU * TY
        t = ty * TX + tx
        sh_n[t] = na
        sh_m[t] = ma
        sh_q[t] = qa
        cuda.syncthreads()
        block_tree(sh_n, sh_m, sh_q, t, ty, TY, TX)
        if ty == 0 and d < D:
            pn[d, chunk] = sh_n[t]
            pm[d, chunk] = sh_m[t]
            pq[d, chunk] = sh_q[t]

    _CACHE[key] = kern
    return kern


def cf_kernel(ng: int, ktab: bool, use_w: bool, omit: bool, bf16: bool) -> Any:
    """Kernel for channels-first data: per dimension ``A`` outer rows x ``L`` contiguous elements.

    Launch: ``blockDim = BLOCK_THREADS``, a 1-D grid of ``D * P`` blocks; block ``b`` takes
    dimension ``b // P`` and segments ``[k * segs_per_chunk, ...)`` of chunk ``k = b % P``, a
    segment being ``seg_len`` elements of one row. Partials go to ``pn/pm/pq[d, k]``.
    """
    key = ("cf", ng, ktab, use_w, omit, bf16, C.UNROLL, C.BLOCK_THREADS)
    if key in _CACHE:
        return _CACHE[key]
    KU = C.UNROLL
    NT = C.BLOCK_THREADS
    dec = dec_bf16 if bf16 else dec_plain
    goff = _make_goff(ng)
    f8 = np.float64
    FAST = not (use_w or omit)
    FKU = float(KU)
    INV_KU = 1.0 / KU  # exact: UNROLL is a power of two

    @cuda.jit
    def kern(x, koff, kbase, kstride, D, A, L, gsz, gst, nseg_row, seg_len, segs_per_chunk, P,  # type: ignore[no-untyped-def]
             w, w_inner, w_n, ref, pn, pm, pq):  # fmt: skip
        tid = cuda.threadIdx.x
        nth = cuda.blockDim.x
        b = cuda.blockIdx.x
        c = b // P
        k = b - c * P
        sh_n = cuda.shared.array(NT, f8)
        sh_m = cuda.shared.array(NT, f8)
        sh_q = cuda.shared.array(NT, f8)
        vals = cuda.local.array(KU, f8)
        wts = cuda.local.array(KU, f8)
        na = 0.0
        ma = 0.0
        qa = 0.0
        ko = koff[c] if ktab else kbase + c * kstride
        rv = dec(x[ko])
        if not is_finite(rv):
            rv = 0.0
        if k == 0 and tid == 0:
            ref[c] = rv
        nseg = A * nseg_row
        s0 = k * segs_per_chunk
        s1 = min(nseg, s0 + segs_per_chunk)
        for sg in range(s0, s1):
            a = sg // nseg_row
            l0 = (sg - a * nseg_row) * seg_len
            l1 = min(L, l0 + seg_len)
            ao = ko + goff(a, gsz, gst)
            flat0 = a * L
            li = l0 + tid
            while li < l1:
                if FAST and li + (KU - 1) * nth < l1:  # a full tile, every weight 1
                    s = 0.0
                    for i in range(KU):
                        v = dec(x[ao + li + i * nth]) - rv
                        vals[i] = v
                        s += v
                    mt = s * INV_KU
                    q = 0.0
                    for i in range(KU):
                        dv = vals[i] - mt
                        q += dv * dv
                    na, ma, qa = chan(na, ma, qa, FKU, mt, q)
                    li += KU * nth
                    continue
                cnt = 0.0
                s = 0.0
                for i in range(KU):
                    ll = li + i * nth
                    v = 0.0
                    wt = 0.0
                    if ll < l1:
                        v = dec(x[ao + ll]) - rv
                        wt = 1.0
                        if use_w:
                            wt = w[((flat0 + ll) // w_inner) % w_n]
                        if omit:
                            if not is_finite(v):
                                wt = 0.0
                        if wt == 0.0:
                            v = 0.0
                    vals[i] = v
                    wts[i] = wt
                    cnt += wt
                    s += wt * v
                if cnt > 0.0:
                    mt = s / cnt
                    q = 0.0
                    for i in range(KU):
                        dv = vals[i] - mt
                        q += wts[i] * (dv * dv)
                    na, ma, qa = chan(na, ma, qa, cnt, mt, q)
                li += KU * nth
        sh_n[tid] = na
        sh_m[tid] = ma
        sh_q[tid] = qa
        cuda.syncthreads()
        block_tree(sh_n, sh_m, sh_q, tid, tid, nth, 1)
        if tid == 0:
            pn[c, k] = sh_n[0]
            pm[c, k] = sh_m[0]
            pq[c, k] = sh_q[0]

    _CACHE[key] = kern
    return kern


# --------------------------------------------------------------------------------------------
# merging


def finalize_kernel() -> Any:
    """Merge the ``P`` partials of each dimension, add the reference back, merge into the state.

    Launch: one block of ``FINAL_THREADS`` (or fewer, a power of two) threads per dimension.
    Thread ``t`` merges partials ``t, t + nth, ...`` in order, then the block tree merges the
    threads. The batch then follows the CPU's rule (empty: NaN mean and 0 M2; NaN/Inf: NaN mean
    and M2) and is Chan-merged into ``sn/sm/sq[d]``.
    """
    key = ("final", C.FINAL_THREADS)
    if key in _CACHE:
        return _CACHE[key]
    NT = C.FINAL_THREADS
    f8 = np.float64

    @cuda.jit
    def kern(pn, pm, pq, P, ref, sn, sm, sq):  # type: ignore[no-untyped-def]
        d = cuda.blockIdx.x
        t = cuda.threadIdx.x
        nth = cuda.blockDim.x
        sh_n = cuda.shared.array(NT, f8)
        sh_m = cuda.shared.array(NT, f8)
        sh_q = cuda.shared.array(NT, f8)
        na = 0.0
        ma = 0.0
        qa = 0.0
        p = t
        while p < P:
            na, ma, qa = chan(na, ma, qa, pn[d, p], pm[d, p], pq[d, p])
            p += nth
        sh_n[t] = na
        sh_m[t] = ma
        sh_q[t] = qa
        cuda.syncthreads()
        block_tree(sh_n, sh_m, sh_q, t, t, nth, 1)
        if t == 0:
            n = sh_n[0]
            m = sh_m[0]
            q = sh_q[0]
            if n == 0.0:
                m = math.nan
                q = 0.0
            else:
                m = m + ref[d]
                if not (is_finite(m) and is_finite(q)):
                    m = math.nan
                    q = math.nan
            n2, m2, q2 = chan(sn[d], sm[d], sq[d], n, m, q)
            sn[d] = n2
            sm[d] = m2
            sq[d] = q2

    _CACHE[key] = kern
    return kern


def merge_kernel() -> Any:
    """Chan-merge state ``b`` into state ``a`` elementwise (one thread per dimension)."""
    key = ("merge",)
    if key in _CACHE:
        return _CACHE[key]

    @cuda.jit
    def kern(an, am, aq, bn, bm, bq):  # type: ignore[no-untyped-def]
        d = cuda.grid(1)
        if d < an.shape[0]:
            n, m, q = chan(an[d], am[d], aq[d], bn[d], bm[d], bq[d])
            an[d] = n
            am[d] = m
            aq[d] = q

    _CACHE[key] = kern
    return kern
