"""Launch shapes and blocking constants of the CUDA kernels, kept in one place.

The cut of an array into per-block work depends only on its shape, dtype and these constants,
never on the GPU model or the number of multiprocessors, and the partial results are merged in a
fixed order: the same input gives the same bits on every run and every GPU.
"""

from __future__ import annotations

#: Threads per block of the ``rows`` kernel (a power of two, at most 1024).
BLOCK_THREADS = 128

#: Threads per block of the channels-first kernel (a power of two, at least 32).
CF_THREADS = 64

#: Register caps of the ``rows`` and channels-first kernels (None: the compiler's choice). The
#: float64 state makes the kernels register-hungry; without a cap the channels-first kernel took
#: 118 registers a thread on an H200 (25% occupancy) and read HBM at 47% of its peak.
MAX_REGISTERS: int | None = None
CF_MAX_REGISTERS: int | None = 64

#: Elements each thread holds in registers per tile (the two-pass runs over these); a power
#: of two, so that a full tile's mean is an exact multiplication.
UNROLL = 16

#: Loads per thread tile of the channels-first kernel (a power of two as well). With vector
#: loads (``CF_VECTOR_LOADS``) a tile is ``CF_UNROLL`` loads of 4 elements.
CF_UNROLL = 8

#: Channels-first: read the contiguous runs 4 elements (16 bytes of float32) a load, with
#: scalar loads for the unaligned head and the tail of each run. Used by the fast path only
#: (no weights, no NaN omission, no bfloat16).
CF_VECTOR_LOADS = True

#: Input elements per block of the ``rows`` kernel (rows x columns of one work unit).
ROWS_CHUNK_ELEMS = 64 * 1024

#: Items (rows, or segments of long rows) per block of the channels-first kernel.
CF_ITEMS_PER_CHUNK = 32

#: Channels-first: a thread group is sized so that each thread gets about this many full
#: tiles of a row.
CF_TILES_PER_LANE = 4

#: Channels-first: rows longer than ``group threads * UNROLL * CF_SEG_TILES`` are cut into
#: segments of that many elements (so that 1-D data and long rows still fill the GPU).
CF_SEG_TILES = 16

#: The innermost reduced axis must hold at least this many contiguous elements for the
#: channels-first kernel; shorter ones go to the ``rows`` kernel.
CF_MIN_L = 32

#: Threads per block of the kernel that merges the per-block partial results of one dimension.
FINAL_THREADS = 128

#: Most reduced-axis groups (after merging adjacent axes) a kernel decomposes an index into.
MAX_GROUPS = 6
