"""Threads: one ``Moments`` or ``Tracker`` shared between threads loses no batch; separate
objects in separate threads give the bits of a serial run.

The kernels release the GIL, so without the lock two updates of one state interleave and
overwrite each other's merge (counts of 16,000-52,000 instead of 64,000 were seen).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

import streamnorm as sn

THREADS = 4
BATCHES = 250


def _batches(seed: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(3.0, 2.0, shape) for _ in range(BATCHES)]


def _run_threads(work: Callable[[int], None]) -> None:
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            start.wait()
            work(t)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors


def _check_against_serial(m: sn.Moments, data: list[list[np.ndarray]], axis: object) -> None:
    ref = sn.Moments()
    for bs in data:
        for b in bs:
            ref.update(b, axis)
    assert m.count == ref.count
    np.testing.assert_allclose(m.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(m.var(), ref.var(), rtol=1e-12)


def test_shared_moments_lean_batches() -> None:
    # (64, 8) float64 batches: the in-place merge of the small-batch stream
    data = [_batches(t, (64, 8)) for t in range(THREADS)]
    m = sn.Moments()
    _run_threads(lambda t: [m.update(b) for b in data[t]] and None)
    assert m.count == THREADS * BATCHES * 64
    _check_against_serial(m, data, 0)


def test_shared_moments_general_path() -> None:
    # NCHW with weights 1: the general path (kernel, then a merge of the batch's state)
    data = [_batches(t, (4, 3, 4, 4)) for t in range(THREADS)]
    m = sn.Moments()
    ones = np.ones(4)
    _run_threads(lambda t: [m.update(b, (0, 2, 3), weights=ones) for b in data[t]] and None)
    assert m.count == THREADS * BATCHES * 4 * 16
    ref = sn.Moments()
    for bs in data:
        for b in bs:
            ref.update(b, (0, 2, 3))
    np.testing.assert_allclose(m.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(m.var(), ref.var(), rtol=1e-12)


def test_shared_moments_in_place_add() -> None:
    parts = [[sn.moments(b) for b in _batches(t, (32, 8))] for t in range(THREADS)]
    m = sn.Moments()

    def work(t: int) -> None:
        nonlocal m
        for p in parts[t]:
            m += p  # rebinding the same object: Moments.__iadd__ returns self

    _run_threads(work)
    assert m.count == THREADS * BATCHES * 32


def test_shared_tracker() -> None:
    data = [_batches(t, (64, 8)) for t in range(THREADS)]
    tr = sn.Tracker()
    _run_threads(lambda t: [tr.update("bn", b) for b in data[t]] and None)
    pop = tr.estimator("bn", "population")
    assert pop.count == THREADS * BATCHES * 64
    ref = sn.Moments()
    for bs in data:
        for b in bs:
            ref.update(b)
    np.testing.assert_allclose(pop.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(pop.var, ref.var(), rtol=1e-12)


def test_separate_objects_in_separate_threads() -> None:
    data = [_batches(t, (256, 64)) for t in range(THREADS)]
    own = [sn.Moments() for _ in range(THREADS)]
    trs = [sn.Tracker() for _ in range(THREADS)]

    def work(t: int) -> None:
        for b in data[t]:
            own[t].update(b)
            trs[t].update("bn", b)

    _run_threads(work)
    for t in range(THREADS):
        ref = sn.Moments()
        tr = sn.Tracker()
        for b in data[t]:
            ref.update(b)
            tr.update("bn", b)
        assert own[t].count == ref.count
        np.testing.assert_array_equal(own[t].mean, ref.mean)
        np.testing.assert_array_equal(own[t].var(), ref.var())
        for name, (mu, var) in tr.estimates()["bn"].items():
            got = trs[t].estimates()["bn"][name]
            np.testing.assert_array_equal(got[0], mu)
            np.testing.assert_array_equal(got[1], var)
