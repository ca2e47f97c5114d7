"""Soak: 300 short jobs over three loopback hosts, with faults injected along the way.

The faults: one sshd is killed mid-way and restarted 3 s later; a fourth host (declared
first in line) has a `python` that cannot import wasmtime, so every job must skip it; one
job in 50 fills /output with a 2 GiB sparse file and one in 50 prints past
`--max-output-mb 1` (both must end `failed` naming the limit); and another process holds
the jobs file's write lock for 70 s a third of the way in.

A second round runs 300 array tasks with `--retries 2` and kills one host for good (its
sshd and its runner processes) mid-way: every task must end `succeeded` with its output
exactly once, the ones the dead host held having been placed again elsewhere.

Checks that every job reaches a final state, that every `succeeded` job's output is exact
(a job followed twice would show its output twice), that the capped jobs failed for their
cap, that no host was ever over-committed (both rounds: part of the verdict) and that no
command printed a traceback; prints counts, throughput and the coordinators' peak RSS.
Runs on demand (a few minutes on 2 cores), not in the test suite:

    python -m benchmarks.soak [--jobs 300] [--parallel 12] [--lock-s 70] [--retry-tasks 300]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import yaml

from benchmarks.common import REPO, Bench, HostShape, banner, print_table, program, run_main

ECHO = REPO / "examples" / "echo.rs"
# A host whose runner cannot start: a Python without wasmtime. Its name sorts first, so
# best fit tries it first whenever hosts tie, and every such job must skip it.
BROKEN_HOST = "aardvark"
NO_WASMTIME_PYTHON = "/usr/bin/python3"
SPARSE_EVERY, SPARSE_AT = 50, 7  # job i with i % 50 == 7 writes a 2 GiB sparse file
OVER_CAP_EVERY, OVER_CAP_AT = 50, 17  # job i with i % 50 == 17 prints past its 1 MB cap


def job_kind(index: int) -> str:
    """Which fault job `index` carries: 'sparse', 'over_cap' or 'plain'."""
    if index % SPARSE_EVERY == SPARSE_AT:
        return "sparse"
    if index % OVER_CAP_EVERY == OVER_CAP_AT:
        return "over_cap"
    return "plain"


def run_measured(bench: Bench, argv: list[str]) -> tuple[int, bytes, bytes, int]:
    """Run `sshwasm ARGV...`; returns exit code, stdout, stderr and its own peak RSS (KiB).

    wait4 gives this one process's rusage, so a compiler another run started does not count.
    """
    process = bench.sshwasm_popen(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    streams: dict[str, bytes] = {}

    def drain(name: str, stream: Any) -> None:
        streams[name] = stream.read()

    readers = [
        threading.Thread(target=drain, args=("out", process.stdout)),
        threading.Thread(target=drain, args=("err", process.stderr)),
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, streams["out"], streams["err"], usage.ru_maxrss


def idle_coordinator_kib() -> int:
    """Peak RSS of an interpreter that has imported what a coordinator runs, doing nothing:
    the baseline for the coordinators' peaks."""
    code = "import asyncssh, sshwasm.cli, sshwasm.coordinator, sshwasm.transport"
    process = subprocess.Popen([sys.executable, "-c", code])
    _, _, usage = os.wait4(process.pid, 0)
    return usage.ru_maxrss


def run_one(bench: Bench, index: int) -> tuple[int, dict[str, Any] | None, str, int]:
    """One foreground `sshwasm run --json`; returns exit code, record, stderr, peak RSS."""
    name = ["--job-name", f"soak-{index}"]
    kind = job_kind(index)
    if kind == "sparse":
        output = bench.root / "outputs" / str(index)
        argv = ["run", str(program("writeout.rs")), "--json", *name, "--output", str(output),
                "--", "sparse:big:2147483648"]  # fmt: skip
    elif kind == "over_cap":
        argv = ["run", str(program("writeout.rs")), "--json", *name, "--max-output-mb", "1",
                "--", "print:3000000"]  # fmt: skip
    else:
        argv = ["run", str(ECHO), "--json", *name, "--", f"token-{index}"]
    returncode, stdout, stderr, peak_kib = run_measured(bench, argv)
    try:
        record = json.loads(stdout)
    except ValueError:
        record = None
    return returncode, record, stderr.decode(errors="replace"), peak_kib


def overcommitted(records: list[dict[str, Any]], shape: HostShape) -> list[str]:
    """Hosts whose running jobs ever held more than they have (by the jobs' own times)."""
    events: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for record in records:
        if not (record.get("host") and record.get("started_at") and record.get("finished_at")):
            continue
        start = datetime.fromisoformat(record["started_at"]).timestamp()
        end = datetime.fromisoformat(record["finished_at"]).timestamp()
        events[record["host"]].append((start, record["cpus"], record["memory_mb"]))
        events[record["host"]].append((end, -record["cpus"], -record["memory_mb"]))
    bad = []
    for host, timeline in events.items():
        cpus = memory = 0
        for _, d_cpus, d_memory in sorted(timeline, key=lambda event: (event[0], event[1])):
            cpus += d_cpus
            memory += d_memory
            if cpus > shape.cpus or memory > shape.memory_mb:
                bad.append(host)
                break
    return bad


def add_broken_host(bench: Bench) -> None:
    """Declare a host whose runner cannot start: the first host's sshd, a Python without
    wasmtime, its own workdir."""
    document = yaml.safe_load(bench.cluster_path.read_text())
    first = dict(document["hosts"][0])
    first.update(
        name=BROKEN_HOST,
        python=NO_WASMTIME_PYTHON,
        workdir=str(bench.workers.absolute() / BROKEN_HOST),
    )
    document["hosts"].insert(0, first)
    bench.cluster_path.write_text(yaml.safe_dump(document, sort_keys=False))


def hold_write_lock(database: str, seconds: float, held: list[float]) -> None:
    """Hold the jobs file's write lock as another process would (`BEGIN IMMEDIATE`)."""
    connection = sqlite3.connect(database, timeout=600, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        began = time.monotonic()
        time.sleep(seconds)
        connection.execute("ROLLBACK")
        held.append(time.monotonic() - began)
    finally:
        connection.close()


def kill_host_for_good(bench: Bench, name: str) -> None:
    """Stop a host's sshd and kill its jobs' runner processes, as a power cut would."""
    bench.servers[name].stop()
    for pid_file in (bench.workdir(name) / "jobs").glob("*/pid"):
        with contextlib.suppress(OSError, ValueError):  # ended already
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def retry_round(bench: Bench, tasks: int) -> bool:
    """`run --array TASKS --retries 2` while one host is killed for good mid-way."""
    victim = bench.names[2]
    banner(f"soak, retries: {tasks} array tasks with --retries 2, host {victim} killed mid-way")
    argv = ["run", "--array", str(tasks), "--retries", "2", "--json", "--job-name", "retry"]
    process = bench.sshwasm_popen(
        *argv, str(program("sleep.rs")), "--", "0.5", stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    started = time.monotonic()
    database = str(bench.root / "data" / "jobs.sqlite")

    def finished() -> int:
        with sqlite3.connect(database, timeout=60) as connection:
            return int(
                connection.execute(
                    "SELECT COUNT(*) FROM jobs WHERE name = 'retry' AND state = 'succeeded'"
                ).fetchone()[0]
            )

    while finished() < tasks // 2 and process.poll() is None:
        time.sleep(0.2)
    kill_host_for_good(bench, victim)
    kill_at = time.monotonic() - started
    out, err = process.communicate()
    elapsed = time.monotonic() - started
    try:
        records: list[dict[str, Any]] = json.loads(out)
    except ValueError:
        records = []
    states = Counter(record["state"] for record in records)
    not_once = [r["id"] for r in records if r["stdout"] != "start\nend\n"]
    retried = [r for r in records if r["attempts"] > 1]
    ended_on_victim = [r["id"] for r in records if r["host"] == victim]
    wrong_hosts = [
        r["id"]
        for r in retried
        if r["attempt_hosts"].split(",")[:-1] != [victim] * (r["attempts"] - 1)
    ]
    tracebacks = err.count(b"Traceback")
    over = overcommitted(records, HostShape(cpus=2, memory_mb=2048))
    print_table(
        [
            ("tasks", str(len(records))),
            ("elapsed", f"{elapsed:.1f} s, host killed at {kill_at:.1f} s"),
            ("exit code", str(process.returncode)),
            ("final states", ", ".join(f"{n} {s}" for s, n in sorted(states.items()))),
            ("placed again", f"{len(retried)} tasks"),
            ("retried tasks whose earlier hosts were not the dead one", str(wrong_hosts or "none")),
            ("tasks that ended on the dead host", str(len(ended_on_victim))),
            ("output not exactly once", str(not_once or "none")),
            ("over-committed hosts", str(over or "none")),
            ("tracebacks", str(tracebacks)),
        ]
    )
    ok = len(records) == tasks and states == Counter({"succeeded": tasks}) and not over
    return ok and process.returncode == 0 and not not_once and not tracebacks and not wrong_hosts


def main() -> int:
    """Run the soak and print what it found."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=12)
    parser.add_argument("--lock-s", type=float, default=70.0, help="how long the lock is held")
    parser.add_argument(
        "--retry-tasks", type=int, default=300, help="tasks of the retries round (0: skip it)"
    )
    options = parser.parse_args()
    shape = HostShape(cpus=2, memory_mb=2048)
    banner(
        f"soak: {options.jobs} jobs, {options.parallel} at a time, 3 hosts (one restarted) "
        f"+ one without wasmtime, sparse and over-cap jobs, jobs file locked {options.lock_s:g} s"
    )
    with Bench(hosts=3, shape=shape) as bench:
        add_broken_host(bench)
        # Compiled once before the clock starts, as the soak is about running, not building.
        for warm_up, argument in ((ECHO, "warm-up"), (program("writeout.rs"), "print:1")):
            warm = bench.sshwasm("run", str(warm_up), "--", argument)
            if warm.returncode != 0:
                print(warm.stderr.decode(errors="replace"))
                return 1
        victim = bench.servers[bench.names[1]]
        results: list[tuple[int, dict[str, Any] | None, str, int]] = []
        lock = threading.Lock()

        def job(index: int) -> None:
            outcome = run_one(bench, index)
            with lock:
                results.append(outcome)

        held: list[float] = []
        locker = threading.Thread(
            target=hold_write_lock,
            args=(str(bench.root / "data" / "jobs.sqlite"), options.lock_s, held),
        )
        started = time.monotonic()
        with ThreadPoolExecutor(options.parallel) as pool:
            futures = [pool.submit(job, index) for index in range(options.jobs)]
            # A third of the way in, another process holds the jobs file's write lock.
            while sum(future.done() for future in futures) < options.jobs // 3:
                time.sleep(0.2)
            locker.start()
            lock_at = time.monotonic() - started
            # Mid-way, the second host's sshd dies (with every session under it) and
            # comes back three seconds later.
            while sum(future.done() for future in futures) < options.jobs // 2:
                time.sleep(0.2)
            victim.stop()
            kill_at = time.monotonic() - started
            time.sleep(3)
            victim.start()
            for future in futures:
                future.result()
        locker.join()
        elapsed = time.monotonic() - started
        idle_mib = idle_coordinator_kib() / 1024
        peaks = {job_kind(index): 0.0 for index in range(options.jobs)}
        for _, record, _, peak_kib in results:
            if record is not None:
                kind = job_kind(int(record["name"].split("-")[1]))
                peaks[kind] = max(peaks[kind], peak_kib / 1024)
        listing = json.loads(bench.sshwasm("jobs", "--json", check=True).stdout)
        records = [record for _, record, _, _ in results if record is not None]
        states = Counter(job["state"] for job in listing if (job["name"] or "").startswith("soak-"))
        plain = [r for r in records if job_kind(int(r["name"].split("-")[1])) == "plain"]
        capped = [r for r in records if job_kind(int(r["name"].split("-")[1])) != "plain"]
        wrong_output = [
            record["id"]
            for record in plain
            if record["state"] != "succeeded"
            or record["stdout"]
            != f"arg[1]={record['name'].replace('soak-', 'token-')}\nstdin lines: 0\nsum: 0\n"
        ]
        cap_missed = [
            record["id"]
            for record in capped
            if record["state"] != "failed" or "output limit" not in (record["error"] or "")
        ]
        on_broken = [record["id"] for record in records if record["host"] == BROKEN_HOST]
        skip_warned = sum(f"skipping host '{BROKEN_HOST}'" in err for _, _, err, _ in results)
        unfinished = [job["id"] for job in listing if job["state"] in ("queued", "running")]
        tracebacks = sum("Traceback" in stderr for _, _, stderr, _ in results)
        over = overcommitted(records, shape)
        print_table(
            [
                ("jobs run", str(len(results))),
                ("elapsed", f"{elapsed:.1f} s ({len(results) / elapsed:.1f} jobs/s)"),
                ("jobs file locked at", f"{lock_at:.1f} s, for {sum(held):.1f} s"),
                ("sshd killed at", f"{kill_at:.1f} s, back 3 s later"),
                ("final states", ", ".join(f"{n} {s}" for s, n in sorted(states.items()))),
                ("unfinished", str(unfinished or "none")),
                ("plain jobs not exact", str(wrong_output or "none")),
                (
                    "capped jobs (sparse, over cap)",
                    f"{len(capped)}, missed: {cap_missed or 'none'}",
                ),
                ("jobs run on the broken host", str(on_broken or "none")),
                ("runs that warned of skipping it", str(skip_warned)),
                ("over-committed hosts", str(over or "none")),
                ("tracebacks", str(tracebacks)),
                (
                    "coordinator peak RSS",
                    ", ".join(f"{kind} {mib:.1f} MiB" for kind, mib in sorted(peaks.items()))
                    + f" (idle interpreter with the same imports: {idle_mib:.1f} MiB, "
                    f"largest {max(peaks.values()) / idle_mib:.2f}x)",
                ),
            ]
        )
        ok = not unfinished and not wrong_output and not tracebacks and not cap_missed
        ok = ok and not on_broken and len(records) == options.jobs and not over
        ok = ok and len(listing) == options.jobs + 2
        if options.retry_tasks:
            ok = retry_round(bench, options.retry_tasks) and ok
        print("soak: PASS" if ok else "soak: FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
