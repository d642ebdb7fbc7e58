"""Tests of the GPU backend under numba's CUDA simulator.

They run only in a process started with ``NUMBA_ENABLE_CUDASIM=1`` (``tests/test_cuda.py``
starts one); in any other process this folder is skipped, since the simulator must be chosen
before numba is imported.
"""

from __future__ import annotations

import os

import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

if not SIM:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Small blocks and chunks: the simulator runs a Python thread per GPU thread, and small
    chunks make every array span several blocks, tiles and tree levels."""
    if request.node.get_closest_marker("real_config"):
        return
    from streamnorm.cuda import _config as C

    monkeypatch.setattr(C, "BLOCK_THREADS", 16)
    monkeypatch.setattr(C, "UNROLL", 4)
    monkeypatch.setattr(C, "CF_THREADS", 16)
    monkeypatch.setattr(C, "CF_UNROLL", 4)
    monkeypatch.setattr(C, "ROWS_CHUNK_ELEMS", 64)
    monkeypatch.setattr(C, "CF_ITEMS_PER_CHUNK", 2)
    monkeypatch.setattr(C, "CF_SEG_TILES", 1)
    monkeypatch.setattr(C, "CF_MIN_L", 8)
    monkeypatch.setattr(C, "FINAL_THREADS", 4)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_config: run with the production block sizes")
