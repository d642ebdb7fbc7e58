"""Fork safety: a child forked after a parallel kernel computes the same bits on one thread.

GNU OpenMP does not survive ``fork()``: Numba terminates a forked child at its first parallel
launch ("fork() called from a process already using GNU OpenMP"), and a fork ``Pool`` may hang.
Each case runs in a fresh interpreter under a timeout, so that a hang fails instead of blocking.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")

# the parent runs every parallel kernel on a large batch before it forks
_PARENT = """
import os, sys
import numpy as np
import streamnorm as sn

rng = np.random.default_rng(0)
X = rng.standard_normal((120_000, 64)).astype(np.float32)
W = rng.random(X.shape[0])
CF = rng.standard_normal((8, 16, 4096)).astype(np.float32)


def stats(_=None):
    m = sn.moments(X, axis=0)
    w = sn.moments(X, axis=0, weights=W)
    o = sn.moments(X, axis=0, nan_policy="omit")
    c = sn.moments(CF, axis=(0, 2))
    s = sn.Moments().update(X).update(X)
    y = sn.normalize(X, m.mean, m.var(), axis=0)
    return np.concatenate(
        [m.mean, m.var(), w.mean, w.var(), o.mean, c.mean, c.var(), s.mean, s.var(), y[:3].ravel()]
    )


REF = stats()
"""


def _run(body: str, timeout: float = 240, parent: str = _PARENT) -> None:
    code = textwrap.dedent(parent) + textwrap.dedent(body)
    try:
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:  # a hang is a failure, not a blocked test run
        pytest.fail(f"forked children hung (no exit within {timeout} s): {e.stderr!r}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
def test_os_fork_after_parallel_kernel() -> None:
    _run(
        """
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                same = np.array_equal(stats(), REF, equal_nan=True)
                pid2 = os.fork()  # and a grandchild
                if pid2 == 0:
                    os._exit(0 if np.array_equal(stats(), REF, equal_nan=True) else 3)
                _, st2 = os.waitpid(pid2, 0)
                os.write(w, b"same" if same and st2 == 0 else b"differ")
            finally:
                os._exit(0)
        os.close(w)
        msg = os.read(r, 64)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert msg == b"same", msg
        assert np.array_equal(stats(), REF, equal_nan=True)  # the parent keeps its threads
        print("OK")
        """
    )


@pytest.mark.slow
def test_fork_pool_map() -> None:
    _run(
        """
        import multiprocessing as mp

        with mp.get_context("fork").Pool(2) as pool:
            out = pool.map(stats, range(4), chunksize=1)
        assert all(np.array_equal(o, REF, equal_nan=True) for o in out)
        print("OK")
        """
    )


@pytest.mark.slow
def test_dataloader_workers_call_moments() -> None:
    pytest.importorskip("torch")
    _run(
        """
        import torch
        from torch.utils.data import DataLoader, Dataset

        class Stats(Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                return torch.from_numpy(stats())

        loader = DataLoader(
            Stats(), batch_size=None, num_workers=2, multiprocessing_context="fork"
        )
        out = [b.numpy() for b in loader]
        assert len(out) == 4
        assert all(np.array_equal(o, REF, equal_nan=True) for o in out)
        print("OK")
        """
    )


@pytest.mark.slow
def test_fork_after_torch_threads_only() -> None:
    # the parent never ran a Numba kernel, but PyTorch's CPU ops started the OpenMP runtime
    # that Numba's threading layer shares: a parallel kernel in the child would hang
    pytest.importorskip("torch")
    _run(
        """
        import os
        import numpy as np
        import torch
        import streamnorm as sn

        torch.set_num_threads(2)
        a = torch.randn(1000, 1000)
        for _ in range(3):
            float((a @ a).sum())
        X = np.random.default_rng(0).standard_normal((120_000, 64)).astype(np.float32)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if np.isfinite(sn.moments(X).mean).all() else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        print("OK")
        """,
        timeout=120,
        parent="",
    )
