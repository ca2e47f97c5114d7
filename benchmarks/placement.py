"""Pure placement: 10,000 jobs onto 1,000 simulated hosts with `sshwasm.schedule` (no SSH).

Three timings over the same seeded hosts and requests:

- `choose_host` per job, with the usage bookkeeping a coordinator does (`Usage.plus`);
- `plan()` over the whole queue at once (what `JobStore.place_waiting` calls);
- the baseline: the same loop doing a trivial first-fit in pure Python.

For reference it also times the same best-fit rule done with hosts kept sorted by spare
capacity (not sshwasm code) and says how many of its choices match sshwasm's.

Prints seconds, microseconds per job and the ratio to the baseline; when a timing misses
the target it profiles it (cProfile) and names the functions that dominate.

Target (issue 5): < 1 s for 10,000 jobs on 1,000 hosts.
"""

from __future__ import annotations

import argparse
import bisect
import cProfile
import io
import pstats
import random
import time
from collections.abc import Callable, Sequence

from benchmarks.common import banner, run_main, verdict
from sshwasm.cluster import Host
from sshwasm.schedule import NO_USAGE, Request, Usage, choose_host, plan

TARGET_S = 1.0
HOST_CPUS = (4, 8, 16, 32, 64)
HOST_MB_PER_CPU = (1024, 2048, 4096)
JOB_CPUS = (1, 1, 1, 1, 1, 2, 2, 2, 4, 8)
JOB_MEMORY_MB = (128, 256, 512, 1024, 2048, 4096)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs to place (default 10000)")
    parser.add_argument("--hosts", type=int, default=1_000, help="hosts (default 1000)")
    parser.add_argument("--seed", type=int, default=5, help="random seed (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, best kept")
    return parser.parse_args(argv)


def make_hosts(count: int, rng: random.Random) -> list[Host]:
    """`count` hosts of mixed sizes (as a cluster file would list them)."""
    hosts = []
    for index in range(count):
        cpus = rng.choice(HOST_CPUS)
        hosts.append(
            Host(
                name=f"host{index:05d}",
                address=f"10.{index // 65536}.{index // 256 % 256}.{index % 256}",
                cpus=cpus,
                memory_mb=cpus * rng.choice(HOST_MB_PER_CPU),
            )
        )
    return hosts


def make_requests(count: int, rng: random.Random) -> list[Request]:
    """`count` job requests, mostly small (enough to nearly fill the hosts)."""
    return [Request(rng.choice(JOB_CPUS), rng.choice(JOB_MEMORY_MB)) for _ in range(count)]


Assignment = list[str | None]
"""The host each job went to, in submission order (None: it did not fit)."""


def place_with_choose_host(hosts: Sequence[Host], requests: Sequence[Request]) -> Assignment:
    """sshwasm's best fit, one job at a time, with the coordinator's usage bookkeeping."""
    usage: dict[str, Usage] = {}
    chosen: Assignment = []
    for request in requests:
        host = choose_host(hosts, usage, request)
        if host is not None:
            usage[host.name] = usage.get(host.name, NO_USAGE).plus(request)
        chosen.append(None if host is None else host.name)
    return chosen


def place_with_plan(hosts: Sequence[Host], requests: Sequence[Request]) -> Assignment:
    """sshwasm's `plan()` over the whole queue."""
    placement = plan(hosts, {}, list(enumerate(requests)))
    return [placement.get(index) for index in range(len(requests))]


def place_first_fit(hosts: Sequence[Host], requests: Sequence[Request]) -> Assignment:
    """The baseline: the first host with room takes the job."""
    free = [[host.cpus, host.memory_mb] for host in hosts]
    chosen: Assignment = []
    for request in requests:
        for index, room in enumerate(free):
            if room[0] >= request.cpus and room[1] >= request.memory_mb:
                room[0] -= request.cpus
                room[1] -= request.memory_mb
                chosen.append(hosts[index].name)
                break
        else:
            chosen.append(None)
    return chosen


def place_sorted_best_fit(hosts: Sequence[Host], requests: Sequence[Request]) -> Assignment:
    """A reference, not sshwasm: the same best-fit rule with hosts kept sorted by spare.

    spare-after-placing = spare-now - (a constant for the request), so the best fit is the
    fitting host with the least spare *now*: scan hosts in that order, take the first with
    room, and move only that host in the order. Spare is kept as an exact integer
    (free_cpus * max_memory + free_memory * max_cpus), ties broken by name as sshwasm does.
    """
    scale_cpus = max(host.cpus for host in hosts)
    scale_memory = max(host.memory_mb for host in hosts)
    free = {host.name: [host.cpus, host.memory_mb] for host in hosts}
    order = sorted((h.cpus * scale_memory + h.memory_mb * scale_cpus, h.name) for h in hosts)
    chosen: Assignment = []
    for request in requests:
        for index, (_spare, name) in enumerate(order):
            room = free[name]
            if room[0] >= request.cpus and room[1] >= request.memory_mb:
                room[0] -= request.cpus
                room[1] -= request.memory_mb
                del order[index]
                bisect.insort(order, (room[0] * scale_memory + room[1] * scale_cpus, name))
                chosen.append(name)
                break
        else:
            chosen.append(None)
    return chosen


Placer = Callable[[Sequence[Host], Sequence[Request]], Assignment]


def best_time(
    placer: Placer, hosts: Sequence[Host], requests: Sequence[Request], repeat: int
) -> tuple[float, Assignment]:
    """The fastest of `repeat` runs, in seconds, and where the jobs went."""
    best = float("inf")
    chosen: Assignment = []
    for _ in range(repeat):
        started = time.perf_counter()
        chosen = placer(hosts, requests)
        best = min(best, time.perf_counter() - started)
    return best, chosen


def placed(chosen: Assignment) -> int:
    """How many jobs found a host."""
    return sum(name is not None for name in chosen)


def profile(placer: Placer, hosts: Sequence[Host], requests: Sequence[Request]) -> str:
    """The top of a cProfile of one run, by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    placer(hosts, requests)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(8)
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join("    " + line for line in lines[start:] if line.strip())


def main() -> int:
    """Run the benchmark and print its report."""
    args = parse_args()
    rng = random.Random(args.seed)
    hosts = make_hosts(args.hosts, rng)
    requests = make_requests(args.jobs, rng)
    banner(f"placement of {args.jobs:,} jobs onto {args.hosts:,} simulated hosts")
    print(
        f"capacity {sum(h.cpus for h in hosts):,} cpus / {sum(h.memory_mb for h in hosts):,} MB; "
        f"asked {sum(r.cpus for r in requests):,} cpus / {sum(r.memory_mb for r in requests):,} MB"
    )
    baseline_s, baseline = best_time(place_first_fit, hosts, requests, args.repeat)
    print(
        f"baseline first-fit (pure Python): {baseline_s:.3f} s, "
        f"{baseline_s / args.jobs * 1e6:.1f} us/job, {placed(baseline):,} placed"
    )
    slow: list[tuple[str, Placer]] = []
    sshwasm_choice: Assignment = []
    for label, placer in (
        ("choose_host + Usage.plus", place_with_choose_host),
        ("plan() over the queue", place_with_plan),
    ):
        seconds, chosen = best_time(placer, hosts, requests, args.repeat)
        sshwasm_choice = sshwasm_choice or chosen
        ok = seconds < TARGET_S
        print(
            f"sshwasm {label}: {seconds:.3f} s, {seconds / args.jobs * 1e6:.1f} us/job, "
            f"{placed(chosen):,} placed; {seconds / baseline_s:.1f}x the baseline "
            f"(target < {TARGET_S:g} s: {verdict(ok)})"
        )
        if not ok:
            slow.append((label, placer))
    seconds, reference = best_time(place_sorted_best_fit, hosts, requests, args.repeat)
    same = sum(a == b for a, b in zip(reference, sshwasm_choice, strict=True))
    print(
        f"reference (not sshwasm): same best fit, hosts kept sorted by spare: {seconds:.3f} s, "
        f"{seconds / baseline_s:.1f}x the baseline; same host as choose_host for "
        f"{same:,} of {args.jobs:,} jobs"
    )
    for label, placer in slow:
        print(f"\nwhere `{label}` spends its time (cProfile, by own time):")
        print(profile(placer, hosts, requests))
    return 0


if __name__ == "__main__":
    run_main(main)
