"""How the order of rows changes the read rate of the one-pass moments loops.

Run: ``NUMBA_NUM_THREADS=1 python bench/bench_streams.py`` (rows, one thread),
``NUMBA_NUM_THREADS=1 python bench/bench_streams.py --widths`` (rows of every width), and
``python bench/bench_streams.py --cf`` (channels-first, one and all threads),
``python bench/bench_streams.py --chunks`` (parallel chunks of wide rows). For the plain AVX2
build add ``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES= NUMBA_CACHE_DIR=/tmp/nc-avx2``
(``NUMBA_CPU_NAME=haswell`` alone keeps the host's AVX-512 features and emits 512-bit code).

Each loop does the rows kernel's arithmetic (shift, sum, sum of squares in float64) over a
(2e6, 128) float32 array, taking rows in a different order: four consecutive rows a step, one
row a step, four rows from the four quarters of the array, two rows from its two halves, two
consecutive rows from each half of every 256 KB block, and one row from each quarter of every
256 KB block (what ``streamnorm._kernels`` does). Printed: GB/s from memory and from cache
(a 256 KB array), best of several runs, each loop three times in turn, next to a fastmath Numba
sum over the same memory.

``--widths``: the loop with two consecutive rows from each half of a 256 KB block against one
row from each of its four quarters, over one 512 MB float32 array seen as rows of 128 to 2048
columns; then ``streamnorm``'s own rows kernel on the same memory regrouped to rows of 128, 256
and 512 columns (float32 and float64: the choice of ``NARROW_WIDTH``), and on (2e5, 1024)
float32 with blocks of 64, 128 and 256 rows (the choice of ``MIN_BLOCK_ROWS``); last, on that
array, the Numba sum, the four-quarter loop, the kernel's leaf loop alone (no merges) and the
whole kernel, three rounds.

``--chunks``: ``streamnorm``'s rows kernel over one 512 MB float32 array seen as rows of 512 to
4096 columns, all threads, with at most 256 parallel chunks at any width (the rule before
``SLOT_ELEMS``) against the chunks ``streamnorm._reduce`` picks now, beside the Numba sum; then
(2e5, 1024) float32 with the blocking ``streamnorm._reduce`` picks: the Numba sum, the kernel's
leaf loop alone over every block in the same parallel chunks (no merges), and the whole kernel.

``--cf``: the channels-first loop over NCHW (128, 64, 56, 56) and (256, 512, 7, 7) float32, each
parallel task a run of samples as in ``streamnorm._kernels``: one sample's rows at a time (the loop
before it changed) against two samples of the run at a time (the loop as shipped), beside the
Numba sum (float64 and float32 accumulation) and ``torch.sum`` (where torch is installed), three
rounds, best of 7 each, GB/s.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

OPT = dict(fastmath={"nsz", "arcp", "contract", "afn"}, error_model="numpy", boundscheck=False)


@njit(**OPT)
def consecutive4(x, br):
    R, D = x.shape
    s, q, c = np.zeros(D), np.zeros(D), x[0].astype(np.float64)
    for r in range(0, R - 3, 4):
        a0, a1, a2, a3 = x[r], x[r + 1], x[r + 2], x[r + 3]
        for d in range(D):
            w0, w1, w2, w3 = a0[d] - c[d], a1[d] - c[d], a2[d] - c[d], a3[d] - c[d]
            s[d] += (w0 + w1) + (w2 + w3)
            qd = q[d]
            qd += w0 * w0
            qd += w1 * w1
            qd += w2 * w2
            qd += w3 * w3
            q[d] = qd
    return s, q


@njit(**OPT)
def one_row(x, br):
    R, D = x.shape
    s, q, c = np.zeros(D), np.zeros(D), x[0].astype(np.float64)
    for r in range(R):
        a0 = x[r]
        for d in range(D):
            w0 = a0[d] - c[d]
            s[d] += w0
            q[d] += w0 * w0
    return s, q


@njit(**OPT)
def quarters(x, br):
    R, D = x.shape
    s, q, c = np.zeros(D), np.zeros(D), x[0].astype(np.float64)
    Q = R // 4
    for i in range(Q):
        a0, a1, a2, a3 = x[i], x[Q + i], x[2 * Q + i], x[3 * Q + i]
        for d in range(D):
            w0, w1, w2, w3 = a0[d] - c[d], a1[d] - c[d], a2[d] - c[d], a3[d] - c[d]
            s[d] += (w0 + w1) + (w2 + w3)
            qd = q[d]
            qd += w0 * w0
            qd += w1 * w1
            qd += w2 * w2
            qd += w3 * w3
            q[d] = qd
    return s, q


@njit(**OPT)
def halves(x, br):
    R, D = x.shape
    s, q, c = np.zeros(D), np.zeros(D), x[0].astype(np.float64)
    H = R // 2
    for i in range(H):
        a0, a1 = x[i], x[H + i]
        for d in range(D):
            w0, w1 = a0[d] - c[d], a1[d] - c[d]
            s[d] += w0 + w1
            qd = q[d]
            qd += w0 * w0
            qd += w1 * w1
            q[d] = qd
    return s, q


@njit(**OPT)
def block_halves(x, br):
    R, D = x.shape
    s, q, c = np.zeros(D), np.zeros(D), x[0].astype(np.float64)
    p = br // 4
    for r0 in range(0, R - br + 1, br):
        for i in range(p):
            r = r0 + 2 * i
            a0, a1, a2, a3 = x[r], x[r + 1], x[r + 2 * p], x[r + 2 * p + 1]
            for d in range(D):
                w0, w1, w2, w3 = a0[d] - c[d], a1[d] - c[d], a2[d] - c[d], a3[d] - c[d]
                s[d] += (w0 + w1) + (w2 + w3)
                qd = q[d]
                qd += w0 * w0
                qd += w1 * w1
                qd += w2 * w2
                qd += w3 * w3
                q[d] = qd
    return s, q


@njit(**OPT)
def block_quarters(x, br):
    R, D = x.shape
    s, q, c = np.zeros(D), np.zeros(D), x[0].astype(np.float64)
    p = br // 4
    for r0 in range(0, R - br + 1, br):
        for i in range(p):
            r = r0 + i
            a0, a1, a2, a3 = x[r], x[r + p], x[r + 2 * p], x[r + 3 * p]
            for d in range(D):
                w0, w1, w2, w3 = a0[d] - c[d], a1[d] - c[d], a2[d] - c[d], a3[d] - c[d]
                s[d] += (w0 + w1) + (w2 + w3)
                qd = q[d]
                qd += w0 * w0
                qd += w1 * w1
                qd += w2 * w2
                qd += w3 * w3
                q[d] = qd
    return s, q


@njit(fastmath=True, parallel=True)
def flat_sum(a):
    t = 0.0
    for i in prange(a.size):
        t += a[i]
    return t


@njit(fastmath=True, parallel=True)
def flat_sum32(a):
    """The same sum accumulated in float32: less work than any float64 loop can do."""
    t = np.float32(0.0)
    for i in prange(a.size):
        t += a[i]
    return t


CF_OPT = dict(fastmath=True, error_model="numpy", boundscheck=False)


@njit(**CF_OPT)
def cf_one_sample(x, a0, a1, s1, s2, x0):
    C, L = x.shape[1], x.shape[2]
    for c in range(C):
        x0[c] = np.float64(x[a0, c, 0])
    for a in range(a0, a1):
        for c in range(C):
            row, xc, t1, t2 = x[a, c], x0[c], 0.0, 0.0
            for i in range(L):
                v = row[i] - xc
                t1 += v
                t2 += v * v
            s1[c] += t1
            s2[c] += t2


@njit(**CF_OPT)
def cf_two_samples(x, a0, a1, s1, s2, x0):
    C, L = x.shape[1], x.shape[2]
    h = (a1 - a0) // 2
    for c in range(C):
        x0[c] = np.float64(x[a0, c, 0])
    for a in range(a0, a0 + h):
        for c in range(C):
            row, far, xc, t1, t2 = x[a, c], x[a + h, c], x0[c], 0.0, 0.0
            for i in range(L):
                v = row[i] - xc
                w = far[i] - xc
                t1 += v + w
                t2 += v * v + w * w
            s1[c] += t1
            s2[c] += t2
    for a in range(a0 + 2 * h, a1):
        for c in range(C):
            row, xc, t1, t2 = x[a, c], x0[c], 0.0, 0.0
            for i in range(L):
                v = row[i] - xc
                t1 += v
                t2 += v * v
            s1[c] += t1
            s2[c] += t2


def _cf_driver(leaf):
    @njit(parallel=True)
    def run(x, rows_per):
        A, C = x.shape[0], x.shape[1]
        nt = (A + rows_per - 1) // rows_per
        out = np.empty((nt, 3, C))
        for k in prange(nt):
            out[k, 0] = 0.0
            out[k, 1] = 0.0
            leaf(x, k * rows_per, min(A, (k + 1) * rows_per), out[k, 0], out[k, 1], out[k, 2])
        return out

    return run


def _rate(nbytes: int, f, *args) -> float:
    """GB/s of ``f(*args)``, best of 5."""
    return nbytes / _best(lambda: f(*args), 5) / 1e9


def _leaf_driver():
    """The kernel's one-pass leaf over every block of ``x``, serially, without any merge."""
    from streamnorm._kernels import _rows_block_shifted as leaf

    @njit
    def run(x, br):
        R, D = x.shape
        s, q, x0, ref = np.empty(D), np.empty(D), np.empty(D), np.zeros(D)
        for r0 in range(0, R - br + 1, br):
            leaf(x, r0, r0 + br, ref, s, q, x0)
        return s

    return run


def widths_main() -> None:
    from streamnorm._kernels import rows_moments

    def blocks(rows: int, width: int, itemsize: int, block_rows: int = 0) -> tuple[int, int]:
        br = block_rows or max(1, 256 * 1024 // (width * itemsize))
        nblocks = (rows + br - 1) // br
        return br, max(1, (nblocks + 255) // 256)

    flat = np.random.default_rng(0).standard_normal(128_000_000, dtype=np.float32)
    print(f"numba sum {_rate(flat.nbytes, flat_sum, flat):6.2f} GB/s; block loops (GB/s):")
    for _ in range(2):
        for width in (128, 256, 512, 1024, 2048):
            x = flat.reshape(-1, width)
            br = 256 * 1024 // (4 * width)
            half = _rate(flat.nbytes, block_halves, x, br)
            quarter = _rate(flat.nbytes, block_quarters, x, br)
            print(f"{width:5d} columns: two from each half {half:5.1f}, quarters {quarter:5.1f}")
    print("rows_moments over the same memory, regrouped (GB/s, two rounds):")
    for dtype in (np.float32, np.float64):
        data = flat if dtype == np.float32 else flat[: flat.size // 2].astype(np.float64)
        for width in (128, 256, 512):
            x = data.reshape(-1, width)
            args = (x, *blocks(x.shape[0], width, data.itemsize))
            r = [_rate(data.nbytes, rows_moments, *args) for _ in range(2)]
            print(f"  {np.dtype(dtype).name} rows of {width}: " + " ".join(f"{g:5.1f}" for g in r))
    del data
    x = np.random.default_rng(1).standard_normal((200_000, 1024), dtype=np.float32)
    for br in (64, 128, 256):
        args = (x, *blocks(200_000, 1024, 4, br))
        r = [_rate(x.nbytes, rows_moments, *args) for _ in range(2)]
        print(f"  (2e5, 1024) float32, blocks of {br} rows: " + " ".join(f"{g:5.1f}" for g in r))
    leaf_only = _leaf_driver()
    b, cb = blocks(200_000, 1024, 4, 128)
    for _ in range(3):
        parts = (
            ("Numba sum", _rate(x.nbytes, flat_sum, x.reshape(-1))),
            ("four-quarter loop", _rate(x.nbytes, block_quarters, x, b)),
            ("kernel's leaf alone", _rate(x.nbytes, leaf_only, x, b)),
            ("whole kernel", _rate(x.nbytes, rows_moments, x, b, cb)),
        )
        print("  (2e5, 1024), 128-row blocks: " + ", ".join(f"{n} {g:.1f}" for n, g in parts))


def _parallel_leaf_driver():
    """The kernel's one-pass leaf over every block, in parallel chunks, without any merge."""
    from streamnorm._kernels import _rows_block_shifted as leaf

    @njit(parallel=True)
    def run(x, br, cb):
        R, D = x.shape
        nblocks = R // br
        nch = (nblocks + cb - 1) // cb
        out = np.zeros(nch)
        ref = np.zeros(D)
        for k in prange(nch):
            s, q, x0 = np.empty(D), np.empty(D), np.empty(D)
            for b in range(k * cb, min(nblocks, (k + 1) * cb)):
                leaf(x, b * br, b * br + br, ref, s, q, x0)
            out[k] = s[0] + q[0]
        return out

    return run


def chunks_main() -> None:
    from streamnorm._kernels import rows_moments
    from streamnorm._reduce import _rows_params

    flat = np.random.default_rng(0).standard_normal(128_000_000, dtype=np.float32)
    print("rows_moments over 512 MB float32, all threads, GB/s (three rounds):")
    for _ in range(3):
        parts = [f"Numba sum {_rate(flat.nbytes, flat_sum, flat):.1f}"]
        for width in (512, 1024, 2048, 4096):
            x = flat.reshape(-1, width)
            br, cb = _rows_params(width, 4, x.shape[0])
            nblocks = -(-x.shape[0] // br)
            old = max(1, -(-nblocks // 256))  # at most 256 chunks, at any width
            a = _rate(flat.nbytes, rows_moments, x, br, old)
            b = _rate(flat.nbytes, rows_moments, x, br, cb)
            n_old, n_new = -(-x.shape[0] // (br * old)), -(-x.shape[0] // (br * cb))
            parts.append(f"{width}: {n_old} chunks {a:.1f}, {n_new} chunks {b:.1f}")
        print("  " + " | ".join(parts))
    del flat
    x = np.random.default_rng(1).standard_normal((200_000, 1024), dtype=np.float32)
    br, cb = _rows_params(1024, 4, x.shape[0])
    leaf = _parallel_leaf_driver()
    print(f"(2e5, 1024) float32, all threads, blocks of {br} rows, {cb} blocks a chunk (GB/s):")
    for _ in range(3):
        parts = (
            ("Numba sum", _rate(x.nbytes, flat_sum, x.reshape(-1))),
            ("kernel's leaf alone", _rate(x.nbytes, leaf, x, br, cb)),
            ("whole kernel", _rate(x.nbytes, rows_moments, x, br, cb)),
        )
        print("  " + ", ".join(f"{n} {g:.1f}" for n, g in parts))


def cf_main() -> None:
    import numba

    try:
        import torch
    except ImportError:
        torch = None
    one, two = _cf_driver(cf_one_sample), _cf_driver(cf_two_samples)
    print(f"CPU build: {numba.config.CPU_NAME or 'native'}")
    for shape in ((128, 64, 56, 56), (256, 512, 7, 7)):
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        A, C = shape[:2]
        v = x.reshape(A, C, -1)
        rows_per = max(1, min(-(-16384 // v.shape[2]), -(-A // 8)))  # as streamnorm._reduce
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            if torch is not None:
                torch.set_num_threads(threads)
            cands = [
                ("numba sum", lambda x=x: flat_sum(x.reshape(-1))),
                ("numba sum, float32 adds", lambda x=x: flat_sum32(x.reshape(-1))),
            ]
            if torch is not None:
                tx = torch.from_numpy(x)
                cands.append(("torch.sum", lambda tx=tx: tx.sum()))
            cands += [
                ("one sample's rows a step", lambda v=v, r=rows_per: one(v, r)),
                ("two samples' rows a step", lambda v=v, r=rows_per: two(v, r)),
            ]
            rates: dict[str, list[float]] = {}
            for _ in range(3):
                for name, f in cands:
                    rates.setdefault(name, []).append(x.nbytes / _best(f, 7) / 1e9)
            print(f"NCHW {shape}, {threads} thread(s), runs of {rows_per} samples:")
            for name, r in rates.items():
                print(f"  {name:26s} " + " ".join(f"{g:6.1f}" for g in r) + " GB/s")


def _best(f, n):
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    x = np.random.default_rng(0).normal(3.0, 1.0, (2_000_000, 128)).astype(np.float32)
    small = x[:512].copy()  # 256 KB: cache-resident
    br = 512  # rows of a 256 KB block
    t = _best(lambda: flat_sum(x.reshape(-1)), 7)
    print(f"{'numba sum':32s} memory {x.nbytes / t / 1e9:6.2f} GB/s")
    for name, f in 3 * [
        ("four consecutive rows a step", consecutive4),
        ("one row a step", one_row),
        ("four quarters of the array", quarters),
        ("two halves of the array", halves),
        ("two rows from each block half", block_halves),
        ("one row from each block quarter", block_quarters),
    ]:
        tm = _best(lambda f=f: f(x, br), 7)
        tc = _best(lambda f=f: f(small, br), 200)
        print(
            f"{name:32s} memory {x.nbytes / tm / 1e9:6.2f} GB/s   "
            f"cache {small.nbytes / tc / 1e9:6.2f} GB/s"
        )


if __name__ == "__main__":
    import sys

    if "--cf" in sys.argv[1:]:
        cf_main()
    elif "--widths" in sys.argv[1:]:
        widths_main()
    elif "--chunks" in sys.argv[1:]:
        chunks_main()
    else:
        main()
