"""Numba kernels of :func:`streamnorm.normalize`: ``out = (x - shift) * scale + beta`` per channel.

Pure array-in/array-out, no validation. The arithmetic is float64 whatever the input dtype, with
one rounding on the store (float32 output for float32 input). Each output element depends on one
input element only, so the result is the same for any number of threads.
"""

from __future__ import annotations

from numba import prange

from ._config import JIT, PARALLEL_JIT
from ._jit import twins


def _normalize_rows(x, shift, scale, beta, out, chunk_rows):
    """Rows layout: ``x`` and ``out`` of shape (R, D), parameters of shape (D,).

    One parallel task per ``chunk_rows`` rows; the inner loop runs over a whole row (views of one
    row keep it simple enough to vectorize).
    """
    R, D = x.shape
    nchunks = (R + chunk_rows - 1) // chunk_rows
    for k in prange(nchunks):
        for r in range(k * chunk_rows, min(R, (k + 1) * chunk_rows)):
            xr = x[r]
            orow = out[r]
            for d in range(D):
                orow[d] = (xr[d] - shift[d]) * scale[d] + beta[d]


def _normalize_cf(x, shift, scale, beta, out, seg_len):
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
        xr = x[a, c, l0:l1]
        orow = out[a, c, l0:l1]
        m = shift[c]
        s = scale[c]
        b = beta[c]
        for i in range(l1 - l0):
            orow[i] = (xr[i] - m) * s + b


#: Each with a serial twin for small inputs, where a parallel launch costs more than it saves.
normalize_rows, normalize_rows_serial = twins(_normalize_rows, PARALLEL_JIT, JIT)
normalize_cf, normalize_cf_serial = twins(_normalize_cf, PARALLEL_JIT, JIT)
