"""Pure placement: which host a job goes to, or why none. No I/O, so it can be hit hard in tests.

Rule (best fit): a host fits a request when its declared cpus and memory, minus what jobs
already placed on it hold, cover the request. Among fitting hosts the one left with the least
spare capacity wins, where spare = spare_cpus / largest_cpus + spare_memory / largest_memory
(both normalised by the largest host in the cluster so that a CPU and a gigabyte weigh alike
whatever the units). Ties go to the host whose name sorts first. Small jobs thus fill small or
busy hosts first and keep big hosts free for big jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .cluster import Host
from .errors import Capacity, NoHostFits


@dataclass(frozen=True)
class Request:
    """What one job asks for; `host` pins it to one host by name."""

    cpus: int
    memory_mb: int
    host: str | None = None


@dataclass(frozen=True)
class Usage:
    """Capacity currently held on one host by placed jobs."""

    cpus: int = 0
    memory_mb: int = 0

    def plus(self, request: Request) -> Usage:
        """Usage after also placing `request`."""
        return Usage(self.cpus + request.cpus, self.memory_mb + request.memory_mb)


NO_USAGE = Usage()


def could_ever_fit(host: Host, request: Request) -> bool:
    """Whether the host could hold the request when idle."""
    return host.cpus >= request.cpus and host.memory_mb >= request.memory_mb


def fits_now(host: Host, used: Usage, request: Request) -> bool:
    """Whether the host has room for the request beside what it already holds."""
    return (
        host.cpus - used.cpus >= request.cpus
        and host.memory_mb - used.memory_mb >= request.memory_mb
    )


def candidate_hosts(
    hosts: Sequence[Host], request: Request, excluded: Iterable[str] = ()
) -> list[Host]:
    """Hosts that could ever take the request (pinning and exclusions applied)."""
    skip = set(excluded)
    return [
        host
        for host in hosts
        if host.name not in skip
        and (request.host is None or host.name == request.host)
        and could_ever_fit(host, request)
    ]


def check_feasible(hosts: Sequence[Host], request: Request) -> None:
    """Raise NoHostFits when no host of the cluster could ever take the request."""
    pool = [h for h in hosts if request.host is None or h.name == request.host]
    if candidate_hosts(pool, request):
        return
    why = ""
    if request.host is not None:
        if not pool:
            names = ", ".join(sorted(h.name for h in hosts))
            raise NoHostFits(
                Capacity(request.cpus, request.memory_mb),
                {},
                f"there is no host named '{request.host}'; hosts: {names}",
            )
        why = f"pinned to host '{request.host}'"
    raise NoHostFits(Capacity(request.cpus, request.memory_mb), largest_hosts(pool), why)


def largest_hosts(hosts: Sequence[Host]) -> dict[str, Capacity]:
    """The host with the most cpus and the one with the most memory (one entry if the same)."""
    if not hosts:
        return {}
    by_cpus = max(hosts, key=lambda h: (h.cpus, h.memory_mb, _reverse_name(h)))
    by_memory = max(hosts, key=lambda h: (h.memory_mb, h.cpus, _reverse_name(h)))
    return {h.name: Capacity(h.cpus, h.memory_mb) for h in (by_cpus, by_memory)}


def _reverse_name(host: Host) -> tuple[int, ...]:
    # max() must prefer the name that sorts first on a tie.
    return tuple(-ord(c) for c in host.name)


def choose_host(
    hosts: Sequence[Host],
    usage: Mapping[str, Usage],
    request: Request,
    excluded: Iterable[str] = (),
) -> Host | None:
    """The best-fitting host with room now, or None when the job must wait."""
    candidates = candidate_hosts(hosts, request, excluded)
    if not candidates:
        return None
    scale_cpus = max(h.cpus for h in hosts)
    scale_memory = max(h.memory_mb for h in hosts)
    best: tuple[float, str] | None = None
    chosen: Host | None = None
    for host in candidates:
        used = usage.get(host.name, NO_USAGE)
        if not fits_now(host, used, request):
            continue
        spare = (host.cpus - used.cpus - request.cpus) / scale_cpus + (
            host.memory_mb - used.memory_mb - request.memory_mb
        ) / scale_memory
        key = (spare, host.name)
        if best is None or key < best:
            best, chosen = key, host
    return chosen


def plan(
    hosts: Sequence[Host],
    usage: Mapping[str, Usage],
    queue: Sequence[tuple[int, Request]],
    excluded: Mapping[int, Iterable[str]] | None = None,
) -> dict[int, str]:
    """Place waiting jobs in submission order; returns job id -> host name for those that fit.

    Older jobs are placed first and what they take counts against younger ones, so a younger
    job never takes room an older one could use now. A job too big for the room left does not
    hold back smaller ones behind it (backfill); it starts when enough room frees at once.
    """
    held = dict(usage)
    placed: dict[int, str] = {}
    for job_id, request in queue:
        skip = excluded.get(job_id, ()) if excluded else ()
        host = choose_host(hosts, held, request, skip)
        if host is None:
            continue
        placed[job_id] = host.name
        held[host.name] = held.get(host.name, NO_USAGE).plus(request)
    return placed
