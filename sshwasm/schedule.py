"""Pure placement: which host a job goes to, or why none. No I/O, so it can be hit hard in tests.

Rule (best fit): a host fits a request when its declared cpus and memory, minus what jobs
already placed on it hold, cover the request. Among fitting hosts the one left with the least
spare capacity wins, where spare = spare_cpus / largest_cpus + spare_memory / largest_memory
(both normalised by the largest host in the cluster so that a CPU and a gigabyte weigh alike
whatever the units). Ties go to the host whose name sorts first. Small jobs thus fill small or
busy hosts first and keep big hosts free for big jobs.
"""

from __future__ import annotations

import bisect
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
    labels: tuple[str, ...] = ()  # the host must carry every one of these


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


def eligible(host: Host, request: Request) -> bool:
    """Whether the request may go to this host at all (pinning and labels)."""
    return (request.host is None or host.name == request.host) and set(request.labels) <= set(
        host.labels
    )


def candidate_hosts(
    hosts: Sequence[Host], request: Request, excluded: Iterable[str] = ()
) -> list[Host]:
    """Hosts that could ever take the request (pinning, labels and exclusions applied)."""
    skip = set(excluded)
    return [
        host
        for host in hosts
        if host.name not in skip and eligible(host, request) and could_ever_fit(host, request)
    ]


def check_feasible(hosts: Sequence[Host], request: Request) -> None:
    """Raise NoHostFits when no host of the cluster could ever take the request."""
    pool = [h for h in hosts if eligible(h, request)]
    if candidate_hosts(pool, request):
        return
    asked = Capacity(request.cpus, request.memory_mb)
    if request.host is not None and not any(h.name == request.host for h in hosts):
        names = ", ".join(sorted(h.name for h in hosts))
        raise NoHostFits(asked, {}, f"there is no host named '{request.host}'; hosts: {names}")
    if not pool:
        wanted = ", ".join(request.labels)
        where = f"host '{request.host}' does not" if request.host else "no host does"
        raise NoHostFits(asked, {}, f"{where} carry the label(s) {wanted}")
    why = []
    if request.host is not None:
        why.append(f"pinned to host '{request.host}'")
    if request.labels:
        why.append(f"with label(s) {', '.join(request.labels)}")
    raise NoHostFits(asked, largest_hosts(pool), "; ".join(why))


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


def _scales(hosts: Sequence[Host]) -> tuple[int, int]:
    return max(h.cpus for h in hosts), max(h.memory_mb for h in hosts)


def _spare_key(free_cpus: int, free_memory: int, scales: tuple[int, int]) -> int:
    # spare_cpus / largest_cpus + spare_memory / largest_memory, times both largest values:
    # the same order, in exact integers.
    largest_cpus, largest_memory = scales
    return free_cpus * largest_memory + free_memory * largest_cpus


def choose_host(
    hosts: Sequence[Host],
    usage: Mapping[str, Usage],
    request: Request,
    excluded: Iterable[str] = (),
) -> Host | None:
    """The best-fitting host with room now, or None when the job must wait."""
    if not hosts:
        return None
    skip = set(excluded)
    scales = _scales(hosts)
    best: tuple[int, str] | None = None
    chosen: Host | None = None
    for host in hosts:
        used = usage.get(host.name, NO_USAGE)
        free_cpus = host.cpus - used.cpus
        free_memory = host.memory_mb - used.memory_mb
        if (
            free_cpus < request.cpus
            or free_memory < request.memory_mb
            or host.name in skip
            or not eligible(host, request)
        ):
            continue
        # Placing the request takes the same amount from every host, so the host with the
        # least spare now is the one left with the least spare after.
        key = (_spare_key(free_cpus, free_memory, scales), host.name)
        if best is None or key < best:
            best, chosen = key, host
    return chosen


def plan(
    hosts: Sequence[Host],
    usage: Mapping[str, Usage],
    queue: Iterable[tuple[int, Request]],
    excluded: Mapping[int, Iterable[str]] | None = None,
) -> dict[int, str]:
    """Place waiting jobs in submission order; returns job id -> host name for those that fit.

    Older jobs are placed first and what they take counts against younger ones, so a younger
    job never takes room an older one could use now. A job too big for the room left does not
    hold back smaller ones behind it (backfill); it starts when enough room frees at once.
    Each job gets exactly what `choose_host` would give it; hosts are kept ordered by spare
    capacity so that a long queue over many hosts costs little more than a scan per job.
    """
    if not hosts:
        return {}
    scales = _scales(hosts)
    free: dict[str, list[int]] = {}
    order: list[tuple[int, str]] = []  # (spare key, name), least spare first
    by_name = {host.name: host for host in hosts}
    for host in hosts:
        used = usage.get(host.name, NO_USAGE)
        room = [host.cpus - used.cpus, host.memory_mb - used.memory_mb]
        free[host.name] = room
        if room[0] > 0 and room[1] > 0:
            order.append((_spare_key(room[0], room[1], scales), host.name))
    order.sort()
    placed: dict[int, str] = {}
    for job_id, request in queue:
        if not order:
            break  # every host is full: no job behind fits either
        skip = set(excluded.get(job_id, ())) if excluded else set()
        for position, (_, name) in enumerate(order):
            room = free[name]
            if room[0] < request.cpus or room[1] < request.memory_mb:
                continue
            if name in skip or not eligible(by_name[name], request):
                continue
            placed[job_id] = name
            room[0] -= request.cpus
            room[1] -= request.memory_mb
            del order[position]
            if room[0] > 0 and room[1] > 0:  # a full host never fits again: drop it
                bisect.insort(order, (_spare_key(room[0], room[1], scales), name))
            break
    return placed


def explain(
    hosts: Sequence[Host],
    usage: Mapping[str, Usage],
    request: Request,
    unreachable: Mapping[str, str],
) -> tuple[Host | None, dict[str, str]]:
    """Where the request would go now, and for every host why it is or is not the one."""
    chosen = choose_host(hosts, usage, request, excluded=unreachable)
    reasons: dict[str, str] = {}
    for host in hosts:
        used = usage.get(host.name, NO_USAGE)
        missing = sorted(set(request.labels) - set(host.labels))
        if request.host is not None and host.name != request.host:
            reasons[host.name] = f"not the pinned host '{request.host}'"
        elif missing:
            reasons[host.name] = f"lacks label(s) {', '.join(missing)}"
        elif not could_ever_fit(host, request):
            reasons[host.name] = f"too small ({host.cpus} cpus, {host.memory_mb} MB)"
        elif host.name in unreachable:
            reasons[host.name] = f"unreachable: {unreachable[host.name]}"
        elif not fits_now(host, used, request):
            reasons[host.name] = (
                f"no room now ({host.cpus - used.cpus} cpus, "
                f"{host.memory_mb - used.memory_mb} MB free)"
            )
        elif chosen is not None and host.name == chosen.name:
            reasons[host.name] = "chosen: the best fit"
        else:
            reasons[host.name] = "fits, but leaves more spare capacity than the chosen one"
    return chosen, reasons
