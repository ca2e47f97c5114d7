"""`sshwasm run tiny.rs --array 100000` over three loopback hosts: the coordinator's peak RSS
and the run's time; then `jobs --fold` and `jobs` on the jobs file it left.

Targets (issue 13): coordinator peak RSS < 250 MB; `jobs --fold` after it < 1 s; `jobs`
with 100,000 rows in the jobs file < 0.5 s. Each listing is timed as the median of 3 runs
of the real command (output to /dev/null), against `sshwasm --version` in the same run, so
the interpreter's start is shown apart. Every task's line is checked. `--rows-only` skips
the array and fills the jobs file with the same number of finished tasks directly (the
listings' targets alone, in seconds). Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Sequence

from benchmarks.common import (
    Bench,
    BenchError,
    HostShape,
    banner,
    median,
    print_table,
    program,
    run_main,
    verdict,
)

RSS_TARGET_MB = 250.0
FOLD_TARGET_S = 1.0
JOBS_TARGET_S = 0.5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="array size (100000)")
    parser.add_argument("--hosts", type=int, default=3, help="loopback hosts (default 3)")
    parser.add_argument("--cpus-per-host", type=int, default=2, help="cpus per host (2)")
    parser.add_argument(
        "--rows-only",
        action="store_true",
        help="no array: fill the jobs file with --tasks finished tasks, time the listings",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def run_array(bench: Bench, tasks: int) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of `sshwasm run tiny.rs --array N`; checks its output."""
    out_path = bench.root / "array.out"
    with open(out_path, "wb") as out, open(bench.root / "array.err", "wb") as err:
        started = time.perf_counter()
        process = bench.sshwasm_popen(
            "run", str(program("tiny.rs")), "--array", str(tasks), stdout=out, stderr=err
        )
        # wait4 gives this child's own peak RSS (ru_maxrss, KiB on Linux).
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = (bench.root / "array.err").read_bytes()[-2000:].decode(errors="replace")
        raise BenchError(f"sshwasm --array {tasks} exited {process.returncode}: {tail}")
    lines = 0
    seen = set()
    with open(out_path, "rb") as handle:
        for line in handle:
            lines += 1
            seen.add(line)
    if lines != tasks or len(seen) != tasks:
        raise BenchError(f"sshwasm --array {tasks}: {lines} lines, {len(seen)} distinct")
    return seconds, usage.ru_maxrss / 1024


def fill_rows(bench: Bench, tasks: int) -> None:
    """A jobs file holding one finished array of `tasks` tasks, as a run over the bench's
    hosts leaves it: each task on one of the hosts in turn, with its own run time (to the
    microsecond, as the runner measures it: hardly two tasks share one), start and end.
    Rows whose every value repeats would flatter the listing, which lays out each distinct
    value once."""
    code = f"""
import random, sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from sshwasm.store import JobSpec, JobStore
spec = JobSpec(name="tiny", cpus=1, memory_mb=64, time_limit_s=None, source="tiny.rs",
    language="rust", wasm_sha256="0" * 64, wasm_bytes=10, wasm_path="/x.wasm",
    compile_s=0.1, argv=("tiny",), env=(), array_size={tasks})
hosts = {list(bench.names)!r}
chance = random.Random(13)
start = datetime.now(timezone.utc)
with JobStore(Path(sys.argv[1])) as store:
    ids = store.submit_tasks(spec)
    rows = []
    for index, job_id in enumerate(ids):
        run_s = round(chance.uniform(0.002, 0.030), 6)
        began = start + timedelta(seconds=index / 250)
        ended = began + timedelta(seconds=run_s + 0.003)
        rows.append((
            hosts[index % len(hosts)], run_s, round(run_s * 0.9, 6),
            began.isoformat(timespec="milliseconds"), ended.isoformat(timespec="milliseconds"),
            job_id,
        ))
    with store._transaction() as db:
        db.executemany(
            "UPDATE jobs SET state = 'succeeded', exit_code = 0, coordinator_pid = NULL, "
            "host = ?, run_s = ?, cpu_s = ?, started_at = ?, finished_at = ? WHERE id = ?",
            rows,
        )
"""
    db = bench.root / "data" / "jobs.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [bench.sshwasm_argv()[0], "-c", code, str(db)], env=bench.env, check=True, cwd=bench.root
    )


def time_command(bench: Bench, *args: str, repeat: int = 3) -> float:
    """Median wall seconds of `sshwasm ARGS` (stdout to /dev/null)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        completed = bench.sshwasm(*args, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
        if completed.returncode != 0:
            raise BenchError(f"sshwasm {' '.join(args)} exited {completed.returncode}", completed)
    return median(times)


def main() -> int:
    """Run the benchmark and print its report."""
    args = parse_args()
    banner(
        f"`sshwasm run tiny.rs --array {args.tasks}`, {args.hosts} loopback hosts x "
        f"{args.cpus_per_host} cpus; then `jobs --fold` and `jobs`"
    )
    shape = HostShape(cpus=args.cpus_per_host, memory_mb=2048)
    missed = False
    with Bench(args.hosts, shape, keep=args.keep) as bench:
        rows = []
        if args.rows_only:
            fill_rows(bench, args.tasks)
        else:
            bench.sshwasm("run", str(program("tiny.rs")), "--array", "12", check=True)  # warm
            seconds, rss_mb = run_array(bench, args.tasks)
            ok = rss_mb < RSS_TARGET_MB
            missed |= not ok
            rows += [
                ("array", f"{seconds:.1f} s, {args.tasks / seconds:.0f} tasks/s"),
                (
                    "coordinator peak RSS",
                    f"{rss_mb:.0f} MB (target < {RSS_TARGET_MB:g} MB: {verdict(ok)})",
                ),
            ]
        start_s = time_command(bench, "--version")
        rows.append(("`sshwasm --version` (interpreter start)", f"{start_s:.3f} s"))
        for label, words, target in (
            ("`jobs --fold`", ("jobs", "--fold"), FOLD_TARGET_S),
            ("`jobs`", ("jobs",), JOBS_TARGET_S),
        ):
            seconds = time_command(bench, *words)
            ok = seconds < target
            missed |= not ok
            rows.append((label, f"{seconds:.3f} s (target < {target:g} s: {verdict(ok)})"))
        print_table(rows)
    return 1 if missed else 0


if __name__ == "__main__":
    run_main(main)
