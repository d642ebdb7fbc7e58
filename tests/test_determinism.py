"""Same bits for any number of threads (subprocesses with NUMBA_NUM_THREADS)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import hashlib, numpy as np, streamnorm as sn
rng = np.random.default_rng(0)
h = hashlib.sha256()
cases = [
    (rng.standard_normal((300_001, 16)).astype(np.float32), 0),
    (rng.standard_normal((64, 32, 17, 19)).astype(np.float32), (0, 2, 3)),
    (rng.standard_normal((64, 17, 19, 32)), (0, 1, 2)),
    (rng.standard_normal((64, 32, 17, 19)), (2, 3)),
    (rng.standard_normal(1_000_003), 0),
    (rng.standard_normal((2000, 301))[:, ::3], 0),
]
for x, axis in cases:
    m = sn.moments(x, axis)
    h.update(m.mean.tobytes()); h.update(m.m2.tobytes())
x = rng.standard_normal((5000, 40))
w = rng.random(5000)
x[3, 4] = np.nan
for kw in ({"weights": w}, {"nan_policy": "omit"}):
    m = sn.moments(x, 0, **kw)
    h.update(m.mean.tobytes()); h.update(m.m2.tobytes())
print(h.hexdigest())
"""


@pytest.mark.slow
def test_bits_identical_for_1_2_4_threads():
    # a first run fills Numba's cache, so that every thread count below runs the same machine code
    # (a channels-first kernel compiled afresh can vectorize its sums differently from the cached
    # one, which moves the last bits; that is a property of the compiled code, not of threads)
    warm = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert warm.returncode == 0, warm.stderr
    digests = set()
    for threads in ("1", "2", "4"):
        env = {**os.environ, "NUMBA_NUM_THREADS": threads}
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests
