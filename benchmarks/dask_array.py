"""`sshwasm run tiny.rs --array 10000` on `engine: dask` vs the SSH engine, same hosts, same run.

Three loopback sshd hosts. The SSH engine's `--array` runs first (its coordinator drives
every task over SSH), then `sshwasm pool up` starts a Dask pool on the same hosts (mutual
TLS, as by default) and the same array runs on it. Both are warm: each ran a small array
before it is timed. Prints tasks per second of both, the ratio, and the peak RSS of the
`sshwasm run` process of each (the coordinator on this machine), and checks that every task
printed its one line, whole, exactly once.

Target (issue 12): the dask engine reaches at least the SSH engine's throughput. Exits 1
when it does not. The pool is taken down at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.array import check_lines
from benchmarks.common import Bench, BenchError, HostShape, banner, program, run_main, verdict

TARGET_RATIO = 1.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="array size (default 10000)")
    parser.add_argument("--hosts", type=int, default=3, help="loopback hosts (default 3)")
    parser.add_argument(
        "--cpus-per-host", type=int, default=2, help="cpus each host declares (default 2)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def timed_run(bench: Bench, cluster: Path, tasks: int) -> tuple[float, int, bytes]:
    """Seconds, peak RSS (KiB) and stdout of `sshwasm run tiny.rs --array N` on `cluster`."""
    out_path = bench.root / f"out-{cluster.stem}-{tasks}.txt"
    err_path = bench.root / f"err-{cluster.stem}-{tasks}.txt"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        process = bench.sshwasm_popen(
            "--cluster",
            str(cluster),
            "run",
            "--quiet",
            str(program("tiny.rs")),
            "--array",
            str(tasks),
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = err_path.read_bytes()[-2000:].decode(errors="replace")
        raise BenchError(f"{cluster.stem}: --array {tasks} exited {process.returncode}: {tail}")
    output = out_path.read_bytes()
    check_lines(output, tasks, f"{cluster.stem} --array {tasks}")
    return seconds, usage.ru_maxrss, output


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


def main() -> int:
    """Run the benchmark and print its report."""
    args = parse_args()
    banner(
        f"`sshwasm run tiny.rs --array {args.tasks}`: engine dask vs ssh, "
        f"{args.hosts} loopback hosts x {args.cpus_per_host} cpus"
    )
    shape = HostShape(cpus=args.cpus_per_host, memory_mb=2048)
    warm = args.hosts * args.cpus_per_host * 2
    with Bench(args.hosts, shape, keep=args.keep) as bench:
        ssh_cluster = bench.cluster_path
        timed_run(bench, ssh_cluster, warm)
        ssh_s, ssh_rss, _ = timed_run(bench, ssh_cluster, args.tasks)
        ssh_rate = args.tasks / ssh_s
        print(f"engine ssh:  {ssh_s:.1f} s, {ssh_rate:.1f} tasks/s, peak RSS {ssh_rss >> 10} MiB")
        cluster = dask_cluster(bench)
        try:
            up = bench.sshwasm("--cluster", str(cluster), "pool", "up", timeout=300)
            if up.returncode != 0:
                raise BenchError("pool up failed", up)
            timed_run(bench, cluster, warm)
            dask_s, dask_rss, _ = timed_run(bench, cluster, args.tasks)
        finally:
            down = bench.sshwasm("--cluster", str(cluster), "pool", "down", timeout=300)
            if down.returncode != 0:
                print(down.stderr.decode(errors="replace"))
        dask_rate = args.tasks / dask_s
        print(
            f"engine dask: {dask_s:.1f} s, {dask_rate:.1f} tasks/s, peak RSS {dask_rss >> 10} MiB"
        )
    ratio = dask_rate / ssh_rate
    ok = ratio >= TARGET_RATIO
    print(f"ratio: {ratio:.2f}x the SSH engine's throughput (target >= 1x: {verdict(ok)})")
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
