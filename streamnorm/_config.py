"""Numba options and blocking constants, kept in one place.

Every ``@njit`` in the package takes its options from here, never from a literal at the decorator.

The fastmath set follows stumpy's: it allows reassociation (needed to vectorize the contiguous
reductions) but leaves out ``nnan``/``ninf`` so that NaN and Inf checks survive compilation.

The blocking constants fix how rows are cut into blocks and blocks into parallel chunks. They
depend only on the array's shape and dtype, never on the thread count, which is what makes the
parallel kernels bit-identical for any ``NUMBA_NUM_THREADS``.
"""

from __future__ import annotations

from typing import Any

FASTMATH: set[str] = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: The same without ``reassoc``, for kernels that vectorize across independent columns and need
#: no reassociation: with it, LLVM may turn ``(x0 - ref) + (x1 - ref)`` into ``(x0 + x1) - 2 ref``
#: and lose the digits the shift by ``ref`` is there to keep.
FASTMATH_ORDERED: set[str] = FASTMATH - {"reassoc"}

#: Options for serial kernels.
JIT: dict[str, Any] = {"nogil": True, "cache": True, "fastmath": FASTMATH, "error_model": "numpy"}

#: Options for the few helpers whose floating-point semantics must stay exact (NaN/Inf tests):
#: LLVM may fold a finiteness test away under a combination of the flags above.
STRICT_JIT: dict[str, Any] = {"nogil": True, "cache": True, "error_model": "numpy"}

#: Options for parallel kernels.
PARALLEL_JIT: dict[str, Any] = {**JIT, "parallel": True}

#: Options for the column-wise block loops (no reassociation; see ``FASTMATH_ORDERED``).
ORDERED_JIT: dict[str, Any] = {**JIT, "fastmath": FASTMATH_ORDERED}

#: Options for the outer parallel kernels: they only schedule blocks and merge them, and hold
#: no fastmath flag at all, so that the merges and the residual two-sums called from them stay
#: exact however Numba inlines and caches them (fast-math leaf loops are functions of their own).
STRICT_PARALLEL_JIT: dict[str, Any] = {**STRICT_JIT, "parallel": True}

#: Bytes of input per block in the (rows, D) kernel: read once, and again from L2 only when the
#: block's one-pass sums cancel (see ``REFINE``).
BLOCK_BYTES = 256 * 1024

#: Wide rows get blocks of at least this many rows, up to ``MAX_BLOCK_BYTES``: a block's fixed
#: work (its first row as the shift, the check, the merge) is a few passes over one row, which
#: at 64 rows of 1024 float32 cost 6-9 % of the read rate.
MIN_BLOCK_ROWS = 128
MAX_BLOCK_BYTES = 1024 * 1024

#: Elements per contiguous segment in the channels-first kernel.
SEG_LEN = 4096

#: Elements of input that one parallel task (a chunk of blocks or segments) handles at least.
CHUNK_ELEMS = 64 * 1024

#: Upper bound on the number of parallel chunks of the (rows, D) kernel.
MAX_CHUNKS = 256

#: Each chunk of the (rows, D) kernel owns a slot of D means and D M2s, allocated per call and
#: merged serially after the parallel loop; wide rows get fewer chunks, so that the two slot
#: arrays stay within this many elements each (but at least ``MIN_CHUNKS`` chunks). Slots of
#: 224 x 1024 float64 took 1 ms to allocate and zero (fresh pages), 3 % of the (2e5, 1024)
#: read; with 2048 to 4096 columns the kernel read 17-25 GB/s with 256 chunks and 25-26 with 16
#: to 64 (``bench/bench_streams.py --chunks``).
SLOT_ELEMS = 1 << 15
MIN_CHUNKS = 16

#: Bytes of input per block copied by the generic (any-stride) path.
GENERIC_BLOCK_BYTES = 1024 * 1024

#: Batches smaller than this (bytes) run the serial twin of a kernel: a parallel launch costs
#: more than it saves on them. The choice depends on the size only, never on the thread count.
SERIAL_BYTES = 256 * 1024

#: A block's one-pass sums (shifted by one of its own samples) are trusted while
#: ``sum v**2 <= REFINE * M2``, i.e. while the subtraction lost at most log10(REFINE) digits;
#: otherwise the block is redone with a two-pass.
REFINE = 1e3

#: Channels-first batches are read sample by sample, a task per run of samples, with runs of
#: about this many elements per channel (and at least 8 runs when there are enough samples).
CF_RUN_ELEMS = 16384

#: (rows, D) arrays with D below half of this are read as (rows / k, k * D) with k * D close
#: to it, then the k column groups of each dimension are merged: narrow rows vectorize poorly.
#: By item size: float32 rows of 128 columns read 3-6 % faster than rows of 256; float64 rows
#: of 256 columns keep the blocks (256 KB) at 128 rows, whose shorter sums measure about half
#: the rounding error at mean/std = 1e8 (7e-16 against 1.1e-15 for 128 columns).
NARROW_WIDTH = {1: 256, 2: 256, 4: 128, 8: 256}
