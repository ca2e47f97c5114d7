"""`sshwasm run tiny.rs --array 10000` on `engine: dask` vs the SSH engine, same hosts, same run.

Three loopback sshd hosts. `sshwasm pool up` starts a Dask pool on them (mutual TLS, as by
default); each engine runs a small array to be warm, then the timed arrays run interleaved,
`--repeat` (3) of each, each round in the other order, so that a change of the machine's
load hits both alike; each engine's figure is the median of its runs. Prints tasks per
second of both, the ratio, and the peak RSS of the `sshwasm run` process of each (the
coordinator on this machine), and checks that every task printed its one line, whole,
exactly once. Also prints where each engine's CPU went per task (medians; the figure to
read on a loaded machine): for dask the client (`sshwasm run`), the scheduler, the workers
(Dask's worker and nanny processes) and the runner under them (serve and its executors,
where the guests run); for ssh the coordinator, the connection process and the hosts' sshd
and serve (not the executors, which outlive serve: compare the dask engine's scheduler and
workers with the SSH engine's connection process and sshd). `--profile FILE` runs the
first timed dask client under cProfile (its time then counts the profiler too) and writes
the profile to FILE.

Then, on the same pool, Dask's own floor (`--floor`, the array's size by default; 0: none):
as many no-op tasks (`asyncio.sleep(0)`, awaited in the worker's event loop as sshwasm's
tasks are, with the same resources, a window at a time, their results gathered in batches)
from a bare `distributed.Client`, with the CPU per task of that client, the scheduler and
the workers: what no change of sshwasm's own code takes away.

Target (issue 12): the dask engine reaches at least the SSH engine's throughput (median
against median). Exits 1 when it does not. The pool is taken down at the end, whatever
happened.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.array import check_lines, hosts_cpu_s, mux_cpu_s, process_cpu_s
from benchmarks.common import (
    Bench,
    BenchError,
    HostShape,
    banner,
    median,
    program,
    run_main,
    verdict,
)

TARGET_RATIO = 1.0
# `python -c PROFILED FILE ARGS...`: sshwasm's main under cProfile, the profile into FILE.
PROFILED = (
    "import cProfile, sys; from sshwasm.cli import main; "
    "profile = cProfile.Profile(); status = profile.runcall(main, sys.argv[2:]); "
    "profile.dump_stats(sys.argv[1]); sys.exit(status)"
)
# `python -c FLOOR CLUSTER TASKS WINDOW`: no-op tasks through the pool from a bare client,
# submitted a window at a time (topped up when a quarter is free) and gathered in batches
# as they end, as `sshwasm run` does with its tasks.
FLOOR = """
import asyncio, sys
from pathlib import Path
from distributed import as_completed
from sshwasm.cluster import load_cluster
from sshwasm.pool import connect, plan_for

tasks, window = int(sys.argv[2]), int(sys.argv[3])
client = connect(plan_for(load_cluster(Path(sys.argv[1]))))
def submit(count):
    return client.map(
        asyncio.sleep, [0] * count, resources={"cpus": 1, "memory_mb": 256}, pure=False
    )
first = submit(min(window, tasks))
left, running, ended = tasks - len(first), len(first), 0
pending = as_completed(first, loop=client.loop)
for batch in pending.batches():
    client.gather(batch)
    for future in batch:
        future.release()
    ended += len(batch)
    running -= len(batch)
    if left and window - running >= window // 4:
        more = submit(min(window - running, left))
        left, running = left - len(more), running + len(more)
        pending.update(more)
client.close()
assert ended == tasks, (ended, tasks)
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="array size (default 10000)")
    parser.add_argument("--hosts", type=int, default=3, help="loopback hosts (default 3)")
    parser.add_argument(
        "--cpus-per-host", type=int, default=2, help="cpus each host declares (default 2)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed runs of each engine, interleaved (median)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--dask-only", action="store_true", help="time the dask engine only (no ratio, exit 0)"
    )
    parser.add_argument(
        "--profile", type=Path, help="run the timed dask client under cProfile, into this file"
    )
    parser.add_argument(
        "--floor",
        type=int,
        help="no-op tasks of Dask's own floor, after the timed runs (default: --tasks; 0: none)",
    )
    return parser.parse_args(argv)


def _children() -> dict[int, list[int]]:
    """Every live process's children, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    return children


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    """`root` and every process below it."""
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier.extend(children.get(pid, []))
    return found


def _is_runner(pid: int) -> bool:
    """Whether `pid` is the runner (serve, or an executor it forked), not Dask's."""
    try:
        return b"sshwasm_exec" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def pool_cpu_s(bench: Bench) -> dict[str, float]:
    """CPU seconds so far of the pool's processes (from the pid files `pool up` wrote: the
    loopback hosts share this filesystem): the scheduler, the workers (Dask's processes)
    and the runner under them (serve and its executors)."""
    children = _children()
    used = {"scheduler": 0.0, "workers": 0.0, "runner (serve, executors)": 0.0}
    for name in bench.names:
        for role in ("scheduler", "worker"):
            try:
                pid = int((bench.workdir(name) / "dask" / f"{role}.pid").read_text())
            except (OSError, ValueError):
                continue
            for member in _tree(pid, children):
                if role == "scheduler":
                    kind = "scheduler"
                else:
                    kind = "runner (serve, executors)" if _is_runner(member) else "workers"
                used[kind] += process_cpu_s(member)
    return used


class Timed:
    """One timed `sshwasm run --array`: seconds, peak RSS (KiB), CPU seconds of the process."""

    def __init__(self, seconds: float, rss_kib: int, cpu_s: float) -> None:
        self.seconds, self.rss_kib, self.cpu_s = seconds, rss_kib, cpu_s


def timed_run(bench: Bench, cluster: Path, tasks: int, profile: Path | None = None) -> Timed:
    """`sshwasm run tiny.rs --array N` on `cluster` (under cProfile into `profile`); checks
    that every task printed its line exactly once."""
    out_path = bench.root / f"out-{cluster.stem}-{tasks}.txt"
    err_path = bench.root / f"err-{cluster.stem}-{tasks}.txt"
    args = ("--cluster", str(cluster), "run", "--quiet", str(program("tiny.rs")))
    argv = bench.sshwasm_argv(*args, "--array", str(tasks))
    if profile is not None:  # main(), not `-m sshwasm`: its os._exit would drop the profile
        argv = [sys.executable, "-c", PROFILED, str(profile), *argv[3:]]
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=bench.env, cwd=bench.root
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = err_path.read_bytes()[-2000:].decode(errors="replace")
        raise BenchError(f"{cluster.stem}: --array {tasks} exited {process.returncode}: {tail}")
    check_lines(out_path.read_bytes(), tasks, f"{cluster.stem} --array {tasks}")
    return Timed(seconds, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)


def dask_cluster(bench: Bench) -> Path:
    """The bench's cluster file with `engine: dask` (scheduler on the first host)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dashboard = probe.getsockname()[1]
    path = bench.root / "dask.yaml"
    path.write_text(
        f"engine: dask\ndask:\n  scheduler: {bench.names[0]}\n  port: {port}\n"
        f"  dashboard_port: {dashboard}\n" + bench.cluster_path.read_text()
    )
    return path


class Engine:
    """One engine's timed runs: seconds, the client's peak RSS and CPU per task per process."""

    def __init__(self, name: str, client: str) -> None:
        self.name, self.client = name, client
        self.seconds: list[float] = []
        self.rss_kib: list[int] = []
        self.cpu_ms: dict[str, list[float]] = {}

    def add(
        self, timed: Timed, tasks: int, before: dict[str, float], after: dict[str, float]
    ) -> None:
        """One timed run, with the CPU seconds of the engine's other processes around it."""
        self.seconds.append(timed.seconds)
        self.rss_kib.append(timed.rss_kib)
        used = {self.client: timed.cpu_s * 1000 / tasks}
        for name, value in after.items():
            used[name] = max(0.0, value - before.get(name, 0.0)) * 1000 / tasks
        for name, value in used.items():
            self.cpu_ms.setdefault(name, []).append(value)

    def rate(self, tasks: int) -> float:
        """Tasks per second of the median run."""
        return tasks / median(self.seconds)

    def report(self, tasks: int, note: str = "") -> None:
        runs = ", ".join(f"{tasks / seconds:.0f}" for seconds in self.seconds)
        print(
            f"engine {self.name}: median {median(self.seconds):.1f} s, "
            f"{self.rate(tasks):.1f} tasks/s (runs: {runs} tasks/s), "
            f"{self.client}'s peak RSS {max(self.rss_kib) >> 10} MiB{note}"
        )
        cpu = ", ".join(f"{name} {median(values):.2f} ms" for name, values in self.cpu_ms.items())
        total = sum(median(values) for values in self.cpu_ms.values())
        print(f"  CPU per task (median): {cpu}; total {total:.2f} ms")


def run_ssh(bench: Bench, tasks: int, engine: Engine) -> None:
    """One timed array of the SSH engine."""
    before = {"connection process": mux_cpu_s(bench), "hosts' sshd and serve": hosts_cpu_s(bench)}
    ssh = timed_run(bench, bench.cluster_path, tasks)
    after = {"connection process": mux_cpu_s(bench), "hosts' sshd and serve": hosts_cpu_s(bench)}
    engine.add(ssh, tasks, before, after)
    print(f"  ssh:  {ssh.seconds:.1f} s, {tasks / ssh.seconds:.1f} tasks/s", flush=True)


def run_dask(bench: Bench, cluster: Path, tasks: int, engine: Engine, profile: Path | None) -> None:
    """One timed array of the dask engine (on the pool already up)."""
    before = pool_cpu_s(bench)
    dask = timed_run(bench, cluster, tasks, profile)
    engine.add(dask, tasks, before, pool_cpu_s(bench))
    print(f"  dask: {dask.seconds:.1f} s, {tasks / dask.seconds:.1f} tasks/s", flush=True)


def run_floor(bench: Bench, cluster: Path, tasks: int, window: int) -> Engine:
    """Dask's own cost per task on this pool: no-op tasks from a bare client (FLOOR)."""
    floor = Engine("dask's own floor (no-op tasks)", "bare client")
    before = pool_cpu_s(bench)
    argv = [sys.executable, "-c", FLOOR, str(cluster), str(tasks), str(window)]
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=bench.env, cwd=bench.root
    )
    assert process.stderr is not None
    error = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise BenchError(
            f"the floor's no-op tasks failed: {error[-2000:].decode(errors='replace')}"
        )
    timed = Timed(seconds, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
    floor.add(timed, tasks, before, pool_cpu_s(bench))
    return floor


def main() -> int:
    """Run the benchmark and print its report."""
    args = parse_args()
    banner(
        f"`sshwasm run tiny.rs --array {args.tasks}`: engine dask vs ssh, "
        f"{args.hosts} loopback hosts x {args.cpus_per_host} cpus, median of {args.repeat}"
    )
    shape = HostShape(cpus=args.cpus_per_host, memory_mb=2048)
    warm = args.hosts * args.cpus_per_host * 2
    ssh = Engine("ssh", "coordinator")
    dask = Engine("dask", "client")
    floor: Engine | None = None
    floor_tasks = 0
    with Bench(args.hosts, shape, keep=args.keep) as bench:
        cluster = dask_cluster(bench)
        up = bench.sshwasm("--cluster", str(cluster), "pool", "up", timeout=300)
        try:
            if up.returncode != 0:
                raise BenchError("pool up failed", up)
            # Both warm (a small array each), then the timed runs interleaved, each round in
            # the other order: a change of the machine's load hits both engines alike.
            timed_run(bench, cluster, warm)
            if not args.dask_only:
                timed_run(bench, bench.cluster_path, warm)
            for index in range(args.repeat):
                profile = args.profile if index == 0 else None
                order = [False, True] if index % 2 == 0 else [True, False]
                for is_dask in order:
                    if is_dask:
                        run_dask(bench, cluster, args.tasks, dask, profile)
                    elif not args.dask_only:
                        run_ssh(bench, args.tasks, ssh)
            floor_tasks = args.tasks if args.floor is None else args.floor
            if floor_tasks > 0:
                window = max(256, 16 * args.hosts * args.cpus_per_host)  # (dask_engine's)
                try:
                    floor = run_floor(bench, cluster, floor_tasks, window)
                except BenchError as exc:  # the engines' figures are still reported
                    print(f"  floor: {exc}", flush=True)
        finally:
            down = bench.sshwasm("--cluster", str(cluster), "pool", "down", timeout=300)
            if down.returncode != 0:
                print(down.stderr.decode(errors="replace"))
    if not args.dask_only:
        ssh.report(args.tasks)
    dask.report(args.tasks, " (first run under cProfile)" if args.profile else "")
    if floor is not None:
        floor.report(floor_tasks)
    if args.dask_only:
        return 0
    ratio = dask.rate(args.tasks) / ssh.rate(args.tasks)
    ok = ratio >= TARGET_RATIO
    print(
        f"ratio: {ratio:.2f}x the SSH engine's throughput, medians of {args.repeat} "
        f"(target >= {TARGET_RATIO:g}x: {verdict(ok)})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
