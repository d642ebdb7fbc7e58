"""CUDA kernels (numba-cuda): block moments for the two layouts, the partial merge, the state merge.

Kernels are made by small factories and cached per variant: the number of reduced groups, whether
kept offsets come from a table, weights, NaN omission and bfloat16 decoding are compile-time
constants of a variant, so the fast path carries none of the other paths' work.

Scheme (the CPU kernels' scheme, mapped to threads):

1. every block owns a fixed piece of the reduced elements of some dimensions (the cut depends on
   shape and :mod:`._config` only, never on the GPU);
2. a thread reads tiles of ``UNROLL`` elements (independent loads, all in flight at once) and
   reduces each in one pass around the tile's first element: ``mean = x0 + s/k`` and
   ``M2 = q - s^2/k`` with ``s, q`` the sums of ``x - x0`` and ``(x - x0)^2``. Since ``x0`` is
   one of the ``k`` values, ``(mean - x0)^2 <= (k - 1) var`` (Samuelson), so the cancellation
   costs at most a factor ``k`` in rounding: the accuracy of a two-pass without holding the tile
   in registers. Values are shifted by the dimension's first element (the reference) first.
   Partial tiles, weights and NaN omission use Welford's update per element instead;
3. a thread's equal-count tiles are merged by the law of total variance around its first tile's
   mean (no division per tile), then Chan-merged with the rest;
4. the threads of a block that share a dimension are merged by a fixed binary tree in shared
   memory, and the block writes one partial per dimension;
5. :func:`finalize_kernel` merges a dimension's partials (strided per thread, then the same
   tree), adds the reference back and merges the batch into the device-resident state.

No atomics: the same bits on every run. The shared-memory tree is also what the CUDA simulator
runs, so the simulator exercises the same merge logic as the GPU (it has no warp shuffles; none
are used).
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
def chan(na, ma, qa, nb, mb, qb):
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
def chan_dd(na, ma, la, qa, nb, mb, lb, qb):
    """Chan merge with double-double means ``m + l`` (as the CPU's ``chan_merge_dd``)."""
    if nb == 0.0:
        return na, ma, la, qa
    if na == 0.0:
        return nb, mb, lb, qb
    n = na + nb
    delta = (mb - ma) + (lb - la)
    f = nb / n
    t = delta * f
    hi = ma + t
    bb = hi - ma
    err = (ma - (hi - bb)) + (t - bb)
    return n, hi, la + err, qa + qb + delta * delta * (na * f)


@cuda.jit(device=True)
def dec_plain(raw):
    """A stored element as float64 (float16/32/64, ints).

    ``np.float64`` rather than ``float``: for a float16 element ``float`` stays a half on the
    GPU, and the arithmetic after it would run in half precision.
    """
    return np.float64(raw)


@cuda.jit(device=True)
def dec_bf16(raw):
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
def is_finite(v):
    return not (math.isinf(v) or math.isnan(v))


@cuda.jit(device=True)
def tile_push(k, m0, s1, s2, qs, base, s, q, inv):
    """Add a full tile to a thread's run of ``k`` tiles; returns the run's new sums.

    The tile's elements are ``x0 + v_i`` (``v_0 = 0``): ``base`` is ``x0`` less the reference,
    ``s`` and ``q`` the sums of ``v_i`` and ``v_i^2``, ``inv`` one over its count. The run keeps
    the first tile's mean ``m0``, the sums ``s1``, ``s2`` of the tiles' means less ``m0`` and of
    their squares, and the sum ``qs`` of the tiles' M2 (no division until the run ends).
    """
    mt = base + s * inv
    q -= s * (s * inv)
    if q < 0.0:
        q = 0.0
    if k == 0:
        m0 = mt
    dm = mt - m0
    return k + 1, m0, s1 + dm, s2 + dm * dm, qs + q


@cuda.jit(device=True)
def run_merge(na, ma, qa, k, m0, s1, s2, qs, size):
    """Chan-merge a run of ``k > 0`` full tiles of ``size`` elements (:func:`tile_push`'s sums)
    into ``(na, ma, qa)``; the tiles' scatter is added to their M2 exactly once."""
    fk = float(k)
    between = s2 - s1 * s1 / fk
    if not between > 0.0:
        between = between if between != between else 0.0  # keep NaN, clip -0
    return chan(na, ma, qa, fk * size, m0 + s1 / fk, qs + size * between)


@cuda.jit(device=True)
def welford_one(cnt, mt, q, v):
    """Add the value ``v`` (weight 1) to ``(cnt, mt, q)``."""
    cnt += 1.0
    dv = v - mt
    mt += dv / cnt
    q += dv * (v - mt)
    return cnt, mt, q


@cuda.jit(device=True)
def welford_add(cnt, mt, q, v, wt):
    """Add the value ``v`` of weight ``wt`` (skipped unless ``> 0``) to ``(cnt, mt, q)``."""
    if wt > 0.0:
        cnt += wt
        dv = v - mt
        mt += dv * (wt / cnt)
        q += wt * dv * (v - mt)
    return cnt, mt, q


# --------------------------------------------------------------------------------------------
# 16-byte loads
#
# ``load4(x, i)`` reads ``x[i:i + 4]``: for float32 one ``ld.global.nc.v4.f32`` (the caller
# guarantees that ``x[i]`` lies on a 16-byte boundary), for other dtypes four plain loads.
# ``phase4(x)`` is the position of ``x[0]`` within its 16-byte word, in elements (0 for dtypes
# read without vector loads), so that ``x[i]`` is aligned when ``(phase4(x) + i) % 4 == 0``.
# Under the simulator both are Python functions, and ``load4`` checks the alignment contract.


def _vector_intrinsics() -> tuple[Any, Any]:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def load4(typingctx, arr, idx):
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
            return None
        sig = types.UniTuple(arr.dtype, 4)(arr, idx)

        def codegen(context, builder, signature, args):
            aryty, idxty = signature.args
            ary = context.make_array(aryty)(context, builder, args[0])
            i = context.cast(builder, args[1], idxty, types.intp)
            ptr = builder.gep(ary.data, [i])
            if aryty.dtype == types.float32:
                f4 = ir.VectorType(ir.FloatType(), 4)
                gp = builder.addrspacecast(ptr, ir.PointerType(ir.FloatType(), 1))
                vec = builder.load(builder.bitcast(gp, ir.PointerType(f4, 1)), align=16)
                vec.set_metadata("invariant.load", builder.module.add_metadata([]))
                vals = [
                    builder.extract_element(vec, ir.Constant(ir.IntType(32), k)) for k in range(4)
                ]
            else:
                one = ir.Constant(ir.IntType(64), 1)
                vals = []
                for _ in range(4):
                    vals.append(builder.load(ptr))
                    ptr = builder.gep(ptr, [one])
            return context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

    @intrinsic
    def phase4(typingctx, arr):
        if not isinstance(arr, types.Array):
            return None
        sig = types.intp(arr)

        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            if aryty.dtype != types.float32:
                return ir.Constant(ir.IntType(64), 0)
            ary = context.make_array(aryty)(context, builder, args[0])
            addr = builder.ptrtoint(ary.data, ir.IntType(64))
            return builder.and_(
                builder.lshr(addr, ir.Constant(ir.IntType(64), 2)), ir.Constant(ir.IntType(64), 3)
            )

        return sig, codegen

    return load4, phase4


def _simulated_vector_helpers() -> tuple[Any, Any]:
    def load4(x, i):
        if x.dtype == np.float32:
            addr = x.ctypes.data + int(i) * 4
            if addr % 16:
                raise AssertionError(f"16-byte load at a misaligned address ({addr % 16})")
        return x[i], x[i + 1], x[i + 2], x[i + 3]

    def phase4(x):
        return (x.ctypes.data // 4) % 4 if x.dtype == np.float32 else 0

    return cuda.jit(device=True)(load4), cuda.jit(device=True)(phase4)


def vector_helpers() -> tuple[Any, Any]:
    """``(load4, phase4)`` for the GPU, or their Python versions under the simulator."""
    from ._intake import simulated

    key = ("vec", simulated())
    if key not in _CACHE:
        _CACHE[key] = _simulated_vector_helpers() if simulated() else _vector_intrinsics()
    return _CACHE[key]


def _make_goff(ng: int, mg: int) -> Callable[..., Any]:
    """Device function: offset of reduced row ``r`` over ``ng`` groups.

    Group sizes are ``itab[0:ng]``, strides ``itab[mg:mg + ng]``, outer to inner.
    """
    if ng == 0:

        @cuda.jit(device=True)
        def goff0(r, itab):
            return 0

        return goff0
    if ng == 1:

        @cuda.jit(device=True)
        def goff1(r, itab):
            return r * itab[mg]

        return goff1

    @cuda.jit(device=True)
    def goffn(r, itab):
        off = 0
        for j in range(ng - 1, 0, -1):
            q = r // itab[j]
            off += (r - q * itab[j]) * itab[mg + j]
            r = q
        return off + r * itab[mg]

    return goffn


def _block_tree(sh_n, sh_m, sh_q, t, lane, nlanes, width):
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
#
# Offsets table ``itab`` (int64): ``[gsz[0:MAX_GROUPS], gst[0:MAX_GROUPS], koff[0:D]]``: the sizes
# and strides of the reduced groups, then (when ``ktab``) each dimension's offset.
# Partials ``part`` (float64, shape (3, D, P)): count, mean (shifted by ``ref``) and M2.


def _jit(max_registers: int | None) -> Any:
    """``cuda.jit``, with a register cap where one is asked for (the simulator takes none)."""
    from ._intake import simulated

    if max_registers and not simulated():
        return cuda.jit(max_registers=max_registers)
    return cuda.jit


def _tile_code(KU: int) -> tuple[float, float]:
    return float(KU), 1.0 / KU  # exact: UNROLL is a power of two


def rows_kernel(ng: int, ktab: bool, use_w: bool, omit: bool, bf16: bool) -> Any:
    """Kernel for reduced rows ``r`` (``ng`` strided groups) of ``D`` dimensions.

    Launch: ``blockDim = (TX, TY)`` with ``TX * TY == BLOCK_THREADS`` (both powers of two), a 1-D
    grid of ``ntiles * P`` blocks; block ``b`` takes column tile ``b % ntiles`` and rows
    ``[chunk * rows_per_chunk, ...)`` of chunk ``b // ntiles``. Partials go to
    ``part[:, d, chunk]``; the reference of dimension ``d`` to ``ref[d]``.
    """
    KU, NT, MG, REG = C.UNROLL, C.BLOCK_THREADS, C.MAX_GROUPS, C.MAX_REGISTERS
    key = ("rows", ng, ktab, use_w, omit, bf16, KU, NT, MG, REG)
    if key in _CACHE:
        return _CACHE[key]
    dec = dec_bf16 if bf16 else dec_plain
    goff = _make_goff(ng, MG)
    f8 = np.float64
    FAST = not (use_w or omit)
    FKU, INV_KU = _tile_code(KU)

    @_jit(REG)
    def kern(x, itab, kbase, kstride, D, R, rows_per_chunk, ntiles, w, w_inner, w_n, ref, part):
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
        na = 0.0
        ma = 0.0
        qa = 0.0
        if d < D:
            ko = itab[2 * MG + d] if ktab else kbase + d * kstride
            rv = dec(x[ko])
            if not is_finite(rv):
                rv = 0.0
            if chunk == 0 and ty == 0:
                ref[d] = rv
            r0 = chunk * rows_per_chunk
            r1 = min(R, r0 + rows_per_chunk)
            r = r0 + ty
            # full tiles: equal counts, merged at the end of the run without divisions
            k = 0
            m0 = 0.0
            s1 = 0.0
            s2 = 0.0
            qs = 0.0
            # one reduced group (contiguous rows, NHWC): a tile's offsets advance by one
            # stride, read once (no index decomposition and no multiply per element)
            rs = TY * itab[MG] if ng == 1 else 0
            while r < r1:
                if FAST and r + (KU - 1) * TY < r1:
                    o = ko + goff(r, itab)
                    x0 = dec(x[o])
                    s = 0.0
                    q = 0.0
                    for i in range(1, KU):
                        if ng == 1:
                            o += rs
                        else:
                            o = ko + goff(r + i * TY, itab)
                        v = dec(x[o]) - x0
                        s += v
                        q += v * v
                    k, m0, s1, s2, qs = tile_push(k, m0, s1, s2, qs, x0 - rv, s, q, INV_KU)
                    r += KU * TY
                    continue
                cnt = 0.0
                mt = 0.0
                q = 0.0
                for i in range(KU):
                    rr = r + i * TY
                    if rr < r1:
                        v = dec(x[ko + goff(rr, itab)]) - rv
                        wt = 1.0
                        if use_w:
                            wt = w[(rr // w_inner) % w_n]
                        if omit:
                            if not is_finite(v):
                                wt = 0.0
                        cnt, mt, q = welford_add(cnt, mt, q, v, wt)
                if cnt > 0.0:
                    na, ma, qa = chan(na, ma, qa, cnt, mt, q)
                r += KU * TY
            if k > 0:
                na, ma, qa = run_merge(na, ma, qa, k, m0, s1, s2, qs, FKU)
        t = ty * TX + tx
        sh_n[t] = na
        sh_m[t] = ma
        sh_q[t] = qa
        cuda.syncthreads()
        block_tree(sh_n, sh_m, sh_q, t, ty, TY, TX)
        if ty == 0 and d < D:
            part[0, d, chunk] = sh_n[t]
            part[1, d, chunk] = sh_m[t]
            part[2, d, chunk] = sh_q[t]

    _CACHE[key] = kern
    return kern


def cf_kernel(ng: int, ktab: bool, use_w: bool, omit: bool, bf16: bool) -> Any:
    """Kernel for channels-first data: per dimension ``A`` outer rows x ``L`` contiguous elements.

    The reduced elements of a dimension are cut into items (a row, or a segment of ``seg_len``
    elements of a row when rows are long). Launch: ``blockDim = CF_THREADS``, a 1-D grid of
    ``D * P`` blocks; block ``b`` takes dimension ``b // P`` and items
    ``[k * items_per_chunk, ...)`` of chunk ``k = b % P``. The block's threads form groups of
    ``rg`` (a power of two); group ``g`` takes items ``g, g + ngroups, ...`` of the chunk and its
    lanes read an item's elements ``lane, lane + rg, ...`` (coalesced). On the fast path
    (``CF_VECTOR_LOADS``) they read 4-element vectors ``lane, lane + rg, ...`` of the item's
    16-byte-aligned body instead, and its unaligned head and tail (fewer than 4 elements each)
    one element a lane. Partials go to ``part[:, d, k]``.
    """
    KU, NT, MG, REG = C.CF_UNROLL, C.CF_THREADS, C.MAX_GROUPS, C.CF_MAX_REGISTERS
    VEC = C.CF_VECTOR_LOADS and not (use_w or omit or bf16)
    key = ("cf", ng, ktab, use_w, omit, bf16, KU, NT, MG, REG, VEC)
    if key in _CACHE:
        return _CACHE[key]
    dec = dec_bf16 if bf16 else dec_plain
    goff = _make_goff(ng, MG)
    load4, phase4 = vector_helpers()
    f8 = np.float64
    FAST = not (use_w or omit)
    FKU, INV_KU = _tile_code(KU)
    FKV, INV_KV = _tile_code(4 * KU)  # a vector tile: KU loads of 4 elements

    @_jit(REG)
    def kern(
        x,
        itab,
        kbase,
        kstride,
        D,
        A,
        L,
        nseg_row,
        seg_len,
        items_per_chunk,
        P,
        rg,
        w,
        w_inner,
        w_n,
        ref,
        part,
    ):
        tid = cuda.threadIdx.x
        nth = cuda.blockDim.x
        b = cuda.blockIdx.x
        c = b // P
        kc = b - c * P
        g = tid // rg
        lane = tid - g * rg
        ngroups = nth // rg
        sh_n = cuda.shared.array(NT, f8)
        sh_m = cuda.shared.array(NT, f8)
        sh_q = cuda.shared.array(NT, f8)
        na = 0.0
        ma = 0.0
        qa = 0.0
        ko = itab[2 * MG + c] if ktab else kbase + c * kstride
        rv = dec(x[ko])
        if not is_finite(rv):
            rv = 0.0
        if kc == 0 and tid == 0:
            ref[c] = rv
        nitems = A * nseg_row
        i0 = kc * items_per_chunk
        i1 = min(nitems, i0 + items_per_chunk)
        k = 0
        m0 = 0.0
        s1 = 0.0
        s2 = 0.0
        qs = 0.0
        step = KU * rg
        # leftovers of the vector path (unaligned head and tail, short runs): Welford around rv
        wc = 0.0
        wm = 0.0
        wq = 0.0
        ph = phase4(x) if VEC else 0
        for it in range(i0 + g, i1, ngroups):
            a = it // nseg_row
            l0 = (it - a * nseg_row) * seg_len
            l1 = min(L, l0 + seg_len)
            ao = ko + goff(a, itab)
            flat0 = a * L
            if VEC:
                # [l0, hb): scalars up to the first 16-byte boundary; [hb, he): nv vectors of 4
                # (tiles of KU vectors per lane, lanes interleaved by vector); [he, l1): scalars
                hb = min(l1, l0 + ((4 - ((ph + ao + l0) & 3)) & 3))
                nv = (l1 - hb) >> 2
                he = hb + 4 * nv
                e = l0 + lane
                if e < hb:
                    wc, wm, wq = welford_one(wc, wm, wq, dec(x[ao + e]) - rv)
                e = he + lane
                if e < l1:
                    wc, wm, wq = welford_one(wc, wm, wq, dec(x[ao + e]) - rv)
                j = lane
                while j < nv:
                    p = ao + hb + 4 * j
                    if j + (KU - 1) * rg < nv:
                        x0 = dec(x[p])
                        s = 0.0
                        q = 0.0
                        for i in range(KU):
                            e0, e1, e2, e3 = load4(x, p + i * 4 * rg)
                            v0 = dec(e0) - x0
                            v1 = dec(e1) - x0
                            v2 = dec(e2) - x0
                            v3 = dec(e3) - x0
                            s += (v0 + v1) + (v2 + v3)
                            q += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)
                        k, m0, s1, s2, qs = tile_push(k, m0, s1, s2, qs, x0 - rv, s, q, INV_KV)
                    else:
                        # this lane's last, shorter tile: the same one-pass, its own count
                        x0 = dec(x[p])
                        s = 0.0
                        q = 0.0
                        cnt = 0.0
                        for i in range(KU):
                            if j + i * rg < nv:
                                e0, e1, e2, e3 = load4(x, p + i * 4 * rg)
                                v0 = dec(e0) - x0
                                v1 = dec(e1) - x0
                                v2 = dec(e2) - x0
                                v3 = dec(e3) - x0
                                s += (v0 + v1) + (v2 + v3)
                                q += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)
                                cnt += 4.0
                        mb = s / cnt
                        q -= s * mb
                        if q < 0.0:
                            q = 0.0
                        na, ma, qa = chan(na, ma, qa, cnt, (x0 - rv) + mb, q)
                    j += step
                continue
            li = l0 + lane
            while li < l1:
                if FAST and li + (KU - 1) * rg < l1:
                    x0 = dec(x[ao + li])
                    s = 0.0
                    q = 0.0
                    for i in range(1, KU):
                        v = dec(x[ao + li + i * rg]) - x0
                        s += v
                        q += v * v
                    k, m0, s1, s2, qs = tile_push(k, m0, s1, s2, qs, x0 - rv, s, q, INV_KU)
                    li += step
                    continue
                cnt = 0.0
                mt = 0.0
                q = 0.0
                for i in range(KU):
                    ll = li + i * rg
                    if ll < l1:
                        v = dec(x[ao + ll]) - rv
                        wt = 1.0
                        if use_w:
                            wt = w[((flat0 + ll) // w_inner) % w_n]
                        if omit:
                            if not is_finite(v):
                                wt = 0.0
                        cnt, mt, q = welford_add(cnt, mt, q, v, wt)
                if cnt > 0.0:
                    na, ma, qa = chan(na, ma, qa, cnt, mt, q)
                li += step
        if k > 0:
            na, ma, qa = run_merge(na, ma, qa, k, m0, s1, s2, qs, FKV if VEC else FKU)
        if VEC:
            na, ma, qa = chan(na, ma, qa, wc, wm, wq)
        sh_n[tid] = na
        sh_m[tid] = ma
        sh_q[tid] = qa
        cuda.syncthreads()
        block_tree(sh_n, sh_m, sh_q, tid, tid, nth, 1)
        if tid == 0:
            part[0, c, kc] = sh_n[0]
            part[1, c, kc] = sh_m[0]
            part[2, c, kc] = sh_q[0]

    _CACHE[key] = kern
    return kern


# --------------------------------------------------------------------------------------------
# merging


def finalize_kernel() -> Any:
    """Merge the ``P`` partials of each dimension, add the reference back, merge into the state.

    Launch: one block of ``FINAL_THREADS`` (or fewer, a power of two) threads per dimension.
    Thread ``t`` merges partials ``t, t + nth, ...`` in order, then the block tree merges the
    threads. The batch then follows the CPU's rule (empty: NaN mean and 0 M2; NaN/Inf: NaN mean
    and M2) and is Chan-merged into ``state[:, d]`` (or written there when ``init``). The state
    is float64 ``(4, D)``: count, mean, M2 and the mean's rounding residual (the exact mean is
    ``mean + residual``; adding the reference back gives it exactly, by a two-sum).
    """
    NT = C.FINAL_THREADS
    key = ("final", NT)
    if key in _CACHE:
        return _CACHE[key]
    f8 = np.float64

    @cuda.jit
    def kern(part, P, ref, state, init):
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
            na, ma, qa = chan(na, ma, qa, part[0, d, p], part[1, d, p], part[2, d, p])
            p += nth
        sh_n[t] = na
        sh_m[t] = ma
        sh_q[t] = qa
        cuda.syncthreads()
        block_tree(sh_n, sh_m, sh_q, t, t, nth, 1)
        if t == 0:
            n = sh_n[0]
            s = sh_m[0]
            q = sh_q[0]
            lo = 0.0
            if n == 0.0:
                m = math.nan
                q = 0.0
            else:
                r = ref[d]
                m = r + s  # two-sum: m + lo == r + s exactly
                bb = m - r
                lo = (r - (m - bb)) + (s - bb)
                if not (is_finite(m) and is_finite(q)):
                    m = math.nan
                    q = math.nan
                    lo = 0.0
            if init:
                state[0, d] = n
                state[1, d] = m
                state[2, d] = q
                state[3, d] = lo
            else:
                n2, m2, l2, q2 = chan_dd(
                    state[0, d], state[1, d], state[3, d], state[2, d], n, m, lo, q
                )
                state[0, d] = n2
                state[1, d] = m2
                state[2, d] = q2
                state[3, d] = l2

    _CACHE[key] = kern
    return kern


def merge_kernel() -> Any:
    """Chan-merge state ``b`` into state ``a`` (each float64 of shape (4, D)), one thread a dim."""
    key = ("merge",)
    if key in _CACHE:
        return _CACHE[key]

    @cuda.jit
    def kern(a, b):
        d = cuda.grid(1)
        if d < a.shape[1]:
            n, m, lo, q = chan_dd(
                a[0, d], a[1, d], a[3, d], a[2, d], b[0, d], b[1, d], b[3, d], b[2, d]
            )
            a[0, d] = n
            a[1, d] = m
            a[2, d] = q
            a[3, d] = lo

    _CACHE[key] = kern
    return kern
