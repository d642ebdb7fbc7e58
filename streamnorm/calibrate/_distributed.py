"""Distributed plumbing on Dask (extra ``dask``): a client to a cluster, and map-then-tree-merge.

Every distributed computation in streamnorm has the same shape: a function turns one shard of
the data into per-name mergeable statistics (a :class:`~streamnorm.Moments`, or an object with an
exact ``merge``, such as the per-layer estimators of a calibration), and the shard results are
merged in a tree whose shape depends only on the number of shards.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._errors import InputError, InputTypeError, SchedulerUnreachableError
from .._extras import require
from .._moments import Moments
from .._validate import check_int, check_optional_positive_int, is_number

__all__ = ["SchedulerUnreachableError", "get_client", "map_merge", "merge_results"]

#: Shard results merged per node of the merge tree.
MERGE_FAN_IN = 8

ShardResult = dict[str, Any]

_SCHEMES = ("tcp", "tls", "ws", "wss", "inproc", "ucx")


# --------------------------------------------------------------------------------------------
# map and merge


def _mergeable(v: Any) -> bool:
    return isinstance(v, Moments) or callable(getattr(v, "merge", None))


def _run_shard(fn: Callable[[Any], ShardResult], shard: Any, index: int) -> ShardResult:
    """Run ``fn`` on one shard and check that it returned ``{name: mergeable statistics}``."""
    out = fn(shard)
    if not isinstance(out, dict):
        raise InputTypeError(
            f"the shard function must return a dict of name -> streamnorm.Moments; for shard "
            f"{index} it returned {type(out).__name__}"
        )
    for k, v in out.items():
        if not isinstance(k, str) or not _mergeable(v):
            raise InputTypeError(
                f"the shard function must return a dict of str -> streamnorm.Moments (or objects "
                f"with an exact merge()); for shard {index} it returned {k!r}: "
                f"{type(v).__name__}"
            )
    return out


def merge_results(*parts: ShardResult) -> ShardResult:
    """Merge shard results in the order given (names in order of first appearance).

    ``Moments`` are Chan-merged; other values with ``a.merge(b)``, which returns a new object.
    A name missing from some shards is merged from the shards that have it. Inputs are unchanged.
    """
    out: ShardResult = {}
    for part in parts:
        for name, m in part.items():
            if name not in out:
                out[name] = m.copy() if isinstance(m, Moments) else m
            elif isinstance(m, Moments):
                out[name] += m
            else:
                out[name] = out[name].merge(m)
    return out


def _tree(items: list[Any], merge: Callable[..., Any], fan_in: int) -> Any:
    """Reduce ``items`` level by level, ``fan_in`` consecutive items per node (fixed shape)."""
    level = items
    while len(level) > 1:
        level = [merge(*level[i : i + fan_in]) for i in range(0, len(level), fan_in)]
    return level[0]


def map_merge(
    client: Any,
    shards: Iterable[Any],
    fn: Callable[[Any], ShardResult],
    *,
    fan_in: int = MERGE_FAN_IN,
) -> ShardResult:
    """Run ``fn`` on every shard on a Dask cluster and merge the results in a fixed-order tree.

    Parameters
    ----------
    client : distributed.Client or None
        Where to run. ``None`` runs the shards one after the other in this process, with the same
        merge tree (so the result has the same bits as on a cluster).
    shards : iterable, length S
        The pieces of work: data, file names, index ranges... anything picklable. Each is sent
        with its task, so a shard lost with a worker is simply recomputed elsewhere.
    fn : callable ``fn(shard) -> dict[str, Moments or mergeable]``
        Picklable (a module-level function or a ``functools.partial`` of one; cloudpickle also
        takes closures). It runs on the workers. A value other than ``Moments`` must have an
        exact ``merge(other)`` that returns a new object (the estimators of
        :mod:`streamnorm.estimators` but ``EMA``, a calibration's per-layer statistics).
    fan_in : int, default 8
        Shard results merged per node of the tree.

    Returns
    -------
    dict of str to Moments (or the mergeable values)
        Per name, the merge of all shards' states (an empty dict for no shards).

    Notes
    -----
    The merge is Chan's exact parallel formula, so the result equals a single pass over all the
    data up to rounding. The tree is built from the shard order only (shard ``i`` is leaf
    ``i``; nodes merge ``fan_in`` consecutive children in order), never from the order in which
    workers finish: the same shards give the same bits on any cluster, and with ``client=None``.
    """
    if not callable(fn):
        raise InputTypeError(f"fn must be callable, got {type(fn).__name__}")
    fan_in = check_int("fan_in", fan_in, minimum=2)
    items = list(shards)
    if not items:
        return {}
    if client is None:
        leaves = [_run_shard(fn, s, i) for i, s in enumerate(items)]
        result: ShardResult = _tree(leaves, merge_results, fan_in)
        return result
    if not callable(getattr(client, "submit", None)):
        raise InputTypeError(
            "client must be a distributed.Client (or None to run in this process), "
            f"got {type(client).__name__}"
        )
    futures = [client.submit(_run_shard, fn, s, i, pure=False) for i, s in enumerate(items)]

    def submit_merge(*parts: Any) -> Any:
        return client.submit(merge_results, *parts, pure=False)

    top = _tree(futures, submit_merge, fan_in)
    merged: ShardResult = top.result()
    return merged


# --------------------------------------------------------------------------------------------
# clients


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast, with a clear message, if nothing listens at a TCP-like scheduler address."""
    comm = require("distributed.comm", "dask")
    try:
        scheme, loc = comm.parse_address(address)
    except (ValueError, TypeError) as e:
        raise InputError(
            f"scheduler address {address!r} is not a Dask address: {e}; expected e.g. "
            "'tcp://10.0.0.5:8786'"
        ) from e
    if scheme not in _SCHEMES:
        raise InputError(
            f"scheduler address {address!r} has an unknown scheme {scheme!r}; expected one of "
            f"{sorted(_SCHEMES)}, e.g. 'tcp://10.0.0.5:8786'"
        )
    if scheme not in ("tcp", "tls", "ws", "wss"):
        return
    try:
        host, port = comm.parse_host_port(loc)
    except (ValueError, TypeError) as e:
        raise InputError(
            f"scheduler address {address!r} has no port: {e}; expected e.g. 'tcp://10.0.0.5:8786'"
        ) from e
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise SchedulerUnreachableError(
            f"no Dask scheduler reachable at {address!r} ({e}); start one with "
            "`dask scheduler` and pass its address, or use workers=N for a local cluster"
        ) from e
    if scheme == "tcp":
        _check_is_scheduler(address, timeout)


async def _identity(address: str, timeout: float) -> Any:
    comm_mod = require("distributed.comm", "dask")
    comm = await comm_mod.connect(address, timeout=timeout)
    try:
        await comm.write({"op": "identity", "reply": True})
        return await comm.read()
    finally:
        comm.abort()


def _check_is_scheduler(address: str, timeout: float) -> None:
    """Ask the listener who it is, with a hard deadline (a foreign server may never answer).

    The question runs on its own event loop in a helper thread, so that it works whether or not
    the caller already runs one.
    """

    def ask() -> Any:
        return asyncio.run(asyncio.wait_for(_identity(address, timeout), timeout))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(ask)
        try:
            info = fut.result(timeout=timeout + 1.0)
        except (OSError, TimeoutError, concurrent.futures.TimeoutError, EOFError) as e:
            raise SchedulerUnreachableError(
                f"something listens at {address!r} but no Dask scheduler answered within "
                f"{timeout} s ({type(e).__name__}: {e}); check that the address is a "
                "scheduler's (not a worker's or the dashboard's)"
            ) from e
        except Exception as e:  # a foreign protocol: any decoding error
            raise SchedulerUnreachableError(
                f"the server at {address!r} does not speak Dask's protocol ({type(e).__name__}: "
                f"{e}); pass the address of a Dask scheduler"
            ) from e
    kind = info.get("type") if isinstance(info, dict) else None
    if kind != "Scheduler":
        raise SchedulerUnreachableError(
            f"{address!r} is a Dask {kind or 'server'}, not a scheduler; pass the scheduler's "
            "address (printed by `dask scheduler`, or client.scheduler.address)"
        )


def _check_args(scheduler: Any, workers: Any, timeout: Any) -> None:
    if scheduler is not None and workers is not None:
        raise InputError(
            "give either scheduler (the address of a running cluster) or workers (the size of a "
            f"new local cluster), not both; got scheduler={scheduler!r}, workers={workers!r}"
        )
    if scheduler is not None and not isinstance(scheduler, str):
        raise InputTypeError(
            f"scheduler must be an address string such as 'tcp://10.0.0.5:8786', "
            f"got {type(scheduler).__name__}"
        )
    check_optional_positive_int("workers", workers)
    if not is_number(timeout) or not timeout > 0:
        raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")


@contextlib.contextmanager
def get_client(
    scheduler: str | None = None,
    workers: int | None = None,
    timeout: float = 10.0,
) -> Iterator[Any]:
    """A ``distributed.Client`` to a running scheduler, or to a new local cluster, closed on exit.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running Dask scheduler, e.g. ``"tcp://10.0.0.5:8786"``.
    workers : int, optional
        Without ``scheduler``: the number of worker processes of a new
        ``LocalCluster(processes=True, threads_per_worker=1)`` (Dask's default if omitted).
    timeout : float, default 10
        Seconds to wait for the scheduler before giving up.

    Yields
    ------
    distributed.Client
        Also Dask's default scheduler inside the ``with`` block.

    Raises
    ------
    SchedulerUnreachableError
        Nothing answers at ``scheduler`` within ``timeout`` (never a hang).
    ValueError
        A malformed address, or both ``scheduler`` and ``workers``.
    """
    _check_args(scheduler, workers, timeout)
    distributed = require("distributed", "dask")
    if scheduler is not None:
        _check_reachable(scheduler, float(timeout))
        try:
            client = distributed.Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as e:
            raise SchedulerUnreachableError(
                f"could not connect to a Dask scheduler at {scheduler!r} within {timeout} s "
                f"({e}); check that the address is a scheduler's (not a worker's or dashboard's)"
            ) from e
        try:
            yield client
        finally:
            client.close()
        return
    cluster = distributed.LocalCluster(
        n_workers=workers,
        processes=True,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    try:
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()
