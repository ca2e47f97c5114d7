"""The parsed cluster file, kept as JSON: a command whose cluster file has not changed since
it was last read neither imports PyYAML nor parses the file again (importing PyYAML is a
sizeable part of a warm `run`'s start-up).

There is one entry per cluster file path, HOME and interpreter (relative key files are
resolved against the file's directory, `~` is expanded, a local host runs the Python that
runs sshwasm), used only while the file's bytes (sha256) and this
sshwasm's cluster.py (size and mtime: an upgrade parses again) are those it was made from. Only a
file that parsed without error is kept, so a mistake is always reported by the parser with
its line. Entries are the user's own: 0600 in the private cache dir; one that is not, or
does not read back as a cluster, is ignored and the file parsed again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import paths

if TYPE_CHECKING:
    from .cluster import Cluster

FORMAT = 1
CACHE_SUBDIR = "clusters"


def _entry_path(path: Path) -> Path:
    """One entry per cluster file, HOME and interpreter: a new parse replaces the old one."""
    where = "\0".join((str(FORMAT), os.path.abspath(path), os.path.expanduser("~"), sys.executable))
    name = hashlib.sha256(where.encode()).hexdigest()[:32]
    return paths.cache_dir() / CACHE_SUBDIR / f"{name}.json"


def _digest(data: bytes) -> str:
    """The file's bytes and the parser's version."""
    here = Path(__file__).resolve().parent / "cluster.py"
    try:
        info = here.stat()
        code = f"{info.st_size}:{info.st_mtime_ns}"
    except OSError:
        code = "?"
    return f"{hashlib.sha256(data).hexdigest()}:{code}"


def load(path: Path, data: bytes) -> Cluster | None:
    """The cluster parsed before from exactly these bytes at this path, or None."""
    from .cluster import Cluster, DaskSettings, Host

    entry = _entry_path(path)
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.geteuid()
            or stat.S_IMODE(info.st_mode) & 0o077
        ):
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = json.load(handle)
        if raw["digest"] != _digest(data):
            return None  # the file (or sshwasm) changed since
        dask = raw["dask"]
        return Cluster(
            hosts=tuple(Host.from_dict(host) for host in raw["hosts"]),
            source=str(raw["source"]),
            engine=str(raw["engine"]),
            dask=None if dask is None else DaskSettings(**dask),
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    finally:
        os.close(fd)


def save(path: Path, data: bytes, cluster: Cluster) -> None:
    """Keep the cluster parsed from these bytes; a failure only costs the next parse."""
    entry = _entry_path(path)
    record: dict[str, Any] = {
        "digest": _digest(data),
        "hosts": [host.to_dict() for host in cluster.hosts],
        "source": cluster.source,
        "engine": cluster.engine,
        "dask": None if cluster.dask is None else dataclasses.asdict(cluster.dask),
    }
    temporary = entry.with_name(f".{entry.name}.{os.getpid()}")
    try:
        paths.make_private_dir(entry.parent)
        with paths.open_private(temporary, "wb") as out:
            out.write(json.dumps(record).encode())
        os.replace(temporary, entry)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
