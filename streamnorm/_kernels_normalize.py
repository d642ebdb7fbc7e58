"""Numba kernels of :func:`streamnorm.normalize`: ``out = (x - shift) * scale + beta`` per channel.

Pure array-in/array-out, no validation. The arithmetic is float64 whatever the input dtype, with
one rounding on the store (float32 output for float32 input). Each output element depends on one
input element only, so the result is the same for any number of threads.
"""

from __future__ import annotations

from numba import njit, prange

from ._config import PARALLEL_JIT


@njit(**PARALLEL_JIT)
def normalize_rows(x, shift, scale, beta, out, tile_rows, tile_cols):  # type: ignore[no-untyped-def]
    """Rows layout: ``x`` and ``out`` of shape (R, D), parameters of shape (D,).

    The (R, D) plane is cut into tiles of ``tile_rows x tile_cols``, one parallel task each.
    """
    R, D = x.shape
    ntr = (R + tile_rows - 1) // tile_rows
    ntc = (D + tile_cols - 1) // tile_cols
    for t in prange(ntr * ntc):
        i = t // ntc
        j = t - i * ntc
        r1 = min(R, (i + 1) * tile_rows)
        d0 = j * tile_cols
        d1 = min(D, d0 + tile_cols)
        for r in range(i * tile_rows, r1):
            for d in range(d0, d1):
                out[r, d] = (x[r, d] - shift[d]) * scale[d] + beta[d]


@njit(**PARALLEL_JIT)
def normalize_cf(x, shift, scale, beta, out, seg_len):  # type: ignore[no-untyped-def]
    """Channels-first layout: ``x`` and ``out`` of shape (A, C, L), parameters of shape (C,).

    Each (a, c) row is cut into segments of ``seg_len`` elements, one parallel task each.
    """
    A, C, L = x.shape
    nseg = (L + seg_len - 1) // seg_len
    per_a = C * nseg
    for t in prange(A * per_a):
        a = t // per_a
        rem = t - a * per_a
        c = rem // nseg
        l0 = (rem - c * nseg) * seg_len
        l1 = min(L, l0 + seg_len)
        m = shift[c]
        s = scale[c]
        b = beta[c]
        for i in range(l0, l1):
            out[a, c, i] = (x[a, c, i] - m) * s + b
