"""Soak: 300 short jobs over three loopback hosts while one sshd is killed and restarted.

Checks that every job reaches a final state, that every `succeeded` job's output is exact,
and that no host was ever over-committed; prints counts and throughput. Runs on demand
(a few minutes on 2 cores), not in the test suite:

    python -m benchmarks.soak [--jobs 300] [--parallel 12]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from benchmarks.common import REPO, Bench, HostShape, banner, print_table, run_main

ECHO = REPO / "examples" / "echo.rs"


def run_one(bench: Bench, index: int) -> tuple[int, dict[str, Any] | None, str]:
    """One foreground `sshwasm run --json`; returns exit code, record, stderr."""
    completed = bench.sshwasm(
        "run", str(ECHO), "--json", "--job-name", f"soak-{index}", "--", f"token-{index}",
        timeout=600,
    )  # fmt: skip
    stderr = completed.stderr.decode(errors="replace")
    try:
        record = json.loads(completed.stdout)
    except ValueError:
        record = None
    return completed.returncode, record, stderr


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


def main() -> int:
    """Run the soak and print what it found."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=12)
    options = parser.parse_args()
    shape = HostShape(cpus=2, memory_mb=2048)
    banner(f"soak: {options.jobs} jobs, {options.parallel} at a time, 3 hosts, one restarted")
    with Bench(hosts=3, shape=shape) as bench:
        warm = bench.sshwasm("run", str(ECHO), "--", "warm-up")
        if warm.returncode != 0:
            print(warm.stderr.decode(errors="replace"))
            return 1
        victim = bench.servers[bench.names[1]]
        results: list[tuple[int, dict[str, Any] | None, str]] = []
        lock = threading.Lock()

        def job(index: int) -> None:
            outcome = run_one(bench, index)
            with lock:
                results.append(outcome)

        started = time.monotonic()
        with ThreadPoolExecutor(options.parallel) as pool:
            futures = [pool.submit(job, index) for index in range(options.jobs)]
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
        elapsed = time.monotonic() - started
        listing = json.loads(bench.sshwasm("jobs", "--json", check=True).stdout)
        records = [record for _, record, _ in results if record is not None]
        states = Counter(job["state"] for job in listing if (job["name"] or "").startswith("soak-"))
        wrong_output = [
            record["id"]
            for record in records
            if record["state"] == "succeeded"
            and record["stdout"]
            != f"arg[1]={record['name'].replace('soak-', 'token-')}\nstdin lines: 0\nsum: 0\n"
        ]
        unfinished = [job["id"] for job in listing if job["state"] in ("queued", "running")]
        tracebacks = sum("Traceback" in stderr for _, _, stderr in results)
        print_table(
            [
                ("jobs run", str(len(results))),
                ("elapsed", f"{elapsed:.1f} s ({len(results) / elapsed:.1f} jobs/s)"),
                ("sshd killed at", f"{kill_at:.1f} s, back 3 s later"),
                ("final states", ", ".join(f"{n} {s}" for s, n in sorted(states.items()))),
                ("unfinished", str(unfinished or "none")),
                ("succeeded with wrong output", str(wrong_output or "none")),
                ("over-committed hosts", str(overcommitted(records, shape) or "none")),
                ("tracebacks", str(tracebacks)),
            ]
        )
        ok = not unfinished and not wrong_output and not tracebacks
        ok = ok and len(listing) == options.jobs + 1
        print("soak: PASS" if ok else "soak: FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
