"""Fixtures shared by several test files."""

from __future__ import annotations

import importlib.util
import logging

import pytest


def pytest_configure(config):
    """torchvision imports wherever it is installed (see ``_zoo.make_torchvision_importable``)."""
    if importlib.util.find_spec("torchvision") is not None:
        import _zoo

        _zoo.make_torchvision_importable()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks: one intra-op thread is fastest (and immune to a busy machine)."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def _dask_cluster():
    """One two-process ``LocalCluster`` for the whole session (starting one takes seconds)."""
    distributed = pytest.importorskip("distributed")
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    cluster = distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.CRITICAL,
    )
    try:
        yield cluster
    finally:
        cluster.close()
        logger.setLevel(level)


@pytest.fixture
def dask_client(_dask_cluster):
    """A client of the session's two-worker cluster, Dask's default scheduler during one test.

    A new client per test (cheap; the cluster is not) so that no other test computes on the
    cluster. Waits until both workers are up: a test may have killed one, its nanny restarts it.
    """
    distributed = pytest.importorskip("distributed")
    client = distributed.Client(_dask_cluster)
    try:
        client.wait_for_workers(2, timeout=60)
        yield client
    finally:
        client.close()
