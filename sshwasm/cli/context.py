"""What every command shares: the parsed options, the jobs file and the cluster file (opened
lazily, once), and one way to run a coroutine over SSH connections."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .. import paths
from .show import warn

if TYPE_CHECKING:
    from ..cluster import Cluster
    from ..store import JobStore
    from ..transport import TransportPool

_T = TypeVar("_T")


class Context:
    """What every command shares: parsed global options, opened lazily."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.db_path = paths.jobs_db(args.db)
        self._store: JobStore | None = None
        self._cluster: Cluster | None = None
        self._cluster_path: Path | None = None
        self._cluster_found = False

    @property
    def store(self) -> JobStore:
        if self._store is None:
            from ..store import JobStore

            self._store = JobStore(self.db_path, on_wait=warn)
        return self._store

    def cluster(self) -> Cluster:
        """The cluster file, read and checked once per command."""
        if self._cluster is None:
            from ..cluster import load_cluster

            self._cluster = load_cluster(self._find_cluster())
        return self._cluster

    def cluster_path(self) -> Path | None:
        path = self._find_cluster()
        return path.resolve() if path is not None else None

    def _find_cluster(self) -> Path | None:
        """The cluster file's path, warning once about implicit ones not trusted."""
        if not self._cluster_found:
            self._cluster_path, ignored = paths.find_cluster_file(self.args.cluster)
            self._cluster_found = True
            for skipped in ignored:
                warn(
                    f"ignoring cluster file {skipped.path}: {skipped.reason} "
                    f"(name it with --cluster or $SSHWASM_CLUSTER to use it anyway)"
                )
        return self._cluster_path

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def with_pool(work: Callable[[TransportPool], Awaitable[_T]]) -> _T:
    """Run `work` in a new event loop with one pool of SSH connections, all closed after.

    asyncio and the transport are imported here, not at the top: commands that never
    connect (`--help`, `jobs` with nothing to refresh) start without them.
    """
    import asyncio

    from ..transport import TransportPool

    async def pooled() -> _T:
        async with TransportPool() as pool:
            return await work(pool)

    return asyncio.run(pooled())
