"""A parameter sweep from Python: `python examples/sweep.py [--cluster FILE]`.

Runs examples/pi.rs over a grid of (points, seed) as one array with `Client.map`, prints
each estimate as its job ends (first ended first), then the mean error per size.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import sshwasm

PI_SOURCE = Path(__file__).resolve().parent / "pi.rs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", help="cluster file (default: as the sshwasm command)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per size (default 3)")
    options = parser.parse_args()

    sizes = [10_000, 100_000, 1_000_000]
    grid = [(points, seed) for points in sizes for seed in range(options.seeds)]
    errors: dict[int, list[float]] = {points: [] for points in sizes}
    try:
        with sshwasm.Client(cluster=options.cluster) as client:
            jobs = client.map(PI_SOURCE, grid, name="pi-sweep")
            size_of = {job.id: points for job, (points, _) in zip(jobs, grid, strict=True)}
            print(f"submitted array {jobs[0].id}: {len(jobs)} tasks", flush=True)
            for job in sshwasm.as_completed(jobs):
                record = job.result()  # a failed task is a record too, never an exception
                if not record.succeeded:
                    print(f"task {record.array_task}: {record.state} {record.error or ''}")
                    continue
                line = (record.stdout or "").strip()
                errors[size_of[job.id]].append(abs(float(line.rsplit("~", 1)[1]) - math.pi))
                print(f"task {record.array_task} on {record.host}: {line}")
    except sshwasm.SshwasmError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 1
    for points in sizes:
        if errors[points]:
            print(f"{points:>9} points: mean error {statistics.mean(errors[points]):.5f}")
    return 0 if all(len(found) == options.seeds for found in errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
