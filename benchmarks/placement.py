"""Pure placement: 10,000 jobs onto 1,000 simulated hosts with `sshwasm.schedule` (no SSH).

Three timings over the same seeded hosts and requests:

- `choose_host` per job, with the usage bookkeeping a coordinator does (`Usage.plus`);
- `plan()` over the whole queue at once (what `JobStore.try_place` calls);
- the baseline: the same loop doing a trivial first-fit in pure Python.

Prints seconds, microseconds per job and the ratio to the baseline; when a timing misses
the target it profiles it (cProfile) and names the functions that dominate.

Target (issue 5): < 1 s for 10,000 jobs on 1,000 hosts.
"""

from __future__ import annotations

import argparse
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


def place_with_choose_host(hosts: Sequence[Host], requests: Sequence[Request]) -> int:
    """sshwasm's best fit, one job at a time; returns how many were placed."""
    usage: dict[str, Usage] = {}
    placed = 0
    for request in requests:
        host = choose_host(hosts, usage, request)
        if host is None:
            continue
        usage[host.name] = usage.get(host.name, NO_USAGE).plus(request)
        placed += 1
    return placed


def place_with_plan(hosts: Sequence[Host], requests: Sequence[Request]) -> int:
    """sshwasm's `plan()` over the whole queue; returns how many were placed."""
    return len(plan(hosts, {}, list(enumerate(requests))))


def place_first_fit(hosts: Sequence[Host], requests: Sequence[Request]) -> int:
    """The baseline: first host with room takes the job; returns how many were placed."""
    free = [[host.cpus, host.memory_mb] for host in hosts]
    placed = 0
    for request in requests:
        for room in free:
            if room[0] >= request.cpus and room[1] >= request.memory_mb:
                room[0] -= request.cpus
                room[1] -= request.memory_mb
                placed += 1
                break
    return placed


Placer = Callable[[Sequence[Host], Sequence[Request]], int]


def best_time(
    placer: Placer, hosts: Sequence[Host], requests: Sequence[Request], repeat: int
) -> tuple[float, int]:
    """The fastest of `repeat` runs, in seconds, and how many jobs were placed."""
    best = float("inf")
    placed = 0
    for _ in range(repeat):
        started = time.perf_counter()
        placed = placer(hosts, requests)
        best = min(best, time.perf_counter() - started)
    return best, placed


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
    baseline_s, baseline_placed = best_time(place_first_fit, hosts, requests, args.repeat)
    print(
        f"baseline first-fit (pure Python): {baseline_s:.3f} s, "
        f"{baseline_s / args.jobs * 1e6:.1f} us/job, {baseline_placed:,} placed"
    )
    slow: list[tuple[str, Placer]] = []
    for label, placer in (
        ("choose_host + Usage.plus", place_with_choose_host),
        ("plan() over the queue", place_with_plan),
    ):
        seconds, placed = best_time(placer, hosts, requests, args.repeat)
        ok = seconds < TARGET_S
        print(
            f"sshwasm {label}: {seconds:.3f} s, {seconds / args.jobs * 1e6:.1f} us/job, "
            f"{placed:,} placed; {seconds / baseline_s:.1f}x the baseline "
            f"(target < {TARGET_S:g} s: {verdict(ok)})"
        )
        if not ok:
            slow.append((label, placer))
    for label, placer in slow:
        print(f"\nwhere `{label}` spends its time (cProfile, by own time):")
        print(profile(placer, hosts, requests))
    return 0


if __name__ == "__main__":
    run_main(main)
