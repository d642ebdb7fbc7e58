"""pytest-benchmark suite for the moments kernels.

Run: ``pytest bench/test_kernels_benchmark.py --benchmark-enable``. Each case also times the
plain parallel sum over the same memory, so the ratio to the read limit can be read off one run
(``streamnorm bench`` prints that ratio directly).
"""

from __future__ import annotations

import numpy as np
import pytest

import streamnorm
from streamnorm.cli.bench import parallel_sum

CASES = {
    "rows (2e5, 128)": ((200_000, 128), 0),
    "rows (4e5, 16)": ((400_000, 16), 0),
    "NCHW (16, 64, 56, 56)": ((16, 64, 56, 56), (0, 2, 3)),
    "NHWC (16, 56, 56, 64)": ((16, 56, 56, 64), (0, 1, 2)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    shape, axis = CASES[request.param]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return request.param, x, axis


def test_moments(benchmark, case):
    name, x, axis = case
    benchmark.group = name
    benchmark.extra_info["GB"] = x.nbytes / 1e9
    benchmark(streamnorm.moments, x, axis)


def test_read_limit(benchmark, case):
    name, x, _ = case
    benchmark.group = name
    benchmark.extra_info["GB"] = x.nbytes / 1e9
    benchmark(parallel_sum, x.reshape(-1))


def test_stream_update(benchmark):
    x = np.random.default_rng(1).standard_normal((256, 512), dtype=np.float32)
    m = streamnorm.Moments()
    benchmark.group = "stream (256, 512)"
    benchmark(m.update, x)
