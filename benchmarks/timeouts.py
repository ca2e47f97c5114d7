"""Tasks that time out: an array whose every task runs past `--time-limit 0.3`, and what
replacing a pooled executor costs serve.

A time limit is held by the runner's watchdog, which ends the job's process at the deadline
(issue 13: epoch checks cost a compute-bound guest 7-11% on every run); a pooled executor
whose task timed out is then replaced. Two figures say what that costs:

- `--array N` (60) of `spin.rs` (a busy loop) with `--time-limit 0.3` on one loopback host
  of 2 cpus: the wall time against the ideal (N x 0.3 s over 2 cpus), each task's state,
  exit code and error (`timeout`, 124, `time limit of 0.3 s exceeded...`) and its `run_s`
  (in time: at most the limit plus 0.25 s).
- serve run locally (`python -m sshwasm.runner serve`): a tiny task's latency (L frame sent
  to R frame read) on an executor that ran a task before, against the same on a new
  executor started because the one before it timed out (the replacement's cost); and how
  long after the 0.3 s deadline a timed-out task's R frame comes.

Targets: the array's wall time <= 1.25x the ideal; the replacement <= 25 ms. Exits 1 when
one is missed. Run it on a checkout with epoch interruption for short limits to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from sshwasm.runner.protocol import FrameDecoder, encode_frame, runner_version

LIMIT_S = 0.3
CPUS = 2
# A task ends this long past its limit at most (the watchdog's wake-up, writing the result).
IN_TIME_SLACK_S = 0.25
TARGET_ARRAY_RATIO = 1.25
TARGET_REPLACEMENT_S = 0.025
ERROR_PREFIX = f"time limit of {LIMIT_S:g} s exceeded"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=60, help="array size (default 60)")
    parser.add_argument("--repeat", type=int, default=3, help="timed arrays (median)")
    parser.add_argument("--rounds", type=int, default=15, help="serve rounds (median)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def run_array(bench: Bench, source: Path, tasks: int) -> tuple[float, list[dict[str, Any]]]:
    """Wall seconds of one `--array` run and its records."""
    started = time.perf_counter()
    completed = bench.sshwasm("run", str(source), "--json", "--memory-mb", "16",
                              "--array", str(tasks), "--time-limit", f"{LIMIT_S:g}")  # fmt: skip
    seconds = time.perf_counter() - started
    try:
        records = json.loads(completed.stdout)
    except ValueError as exc:
        raise BenchError(f"the array's --json is not JSON: {exc}", completed) from exc
    if not isinstance(records, list):
        records = [records]
    return seconds, records


def check_records(records: list[dict[str, Any]], tasks: int) -> float:
    """Raise BenchError unless every task timed out in time as it should; the longest run_s."""
    if len(records) != tasks:
        raise BenchError(f"{len(records)} records for {tasks} tasks")
    longest = 0.0
    for record in records:
        error = str(record.get("error"))
        if (record["state"], record["exit_code"]) != ("timeout", 124) or not error.startswith(
            ERROR_PREFIX
        ):
            raise BenchError(f"task {record.get('array_index')}: {record}")
        longest = max(longest, float(record["run_s"] or 0.0))
    if longest > LIMIT_S + IN_TIME_SLACK_S:
        raise BenchError(f"a task ran {longest:.3f} s, past its {LIMIT_S} s limit")
    return longest


class Serve:
    """A local serve process, driven frame by frame."""

    def __init__(self, workdir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sshwasm.runner", "serve", str(workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.decoder = FrameDecoder()
        self.send(b"H", json.dumps({"runner_version": runner_version()}).encode())
        self.wait_for(lambda kind, key: kind == b"H")

    def send(self, kind: bytes, payload: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(encode_frame(kind, payload))
        self.process.stdin.flush()

    def wait_for(self, match: Any) -> bytes:
        """Read frames until one matches (kind, key); its payload (after the key line)."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], 60)
            data = os.read(fd, 1 << 16) if ready else b""
            if not data:
                raise BenchError("serve went silent or ended")
            for kind, payload in self.decoder.feed(data):
                key, _, body = payload.partition(b"\n")
                if match(kind, key.decode(errors="replace")):
                    return body if kind != b"H" else payload

    def run(self, key: str, sha: str, argv: list[str], limit: float | None) -> tuple[float, Any]:
        """Seconds from the L frame to the R frame of one task, and its result."""
        spec = {"runner_version": runner_version(), "key": key, "wasm_sha256": sha,
                "argv": argv, "env": [], "memory_mb": 16, "time_limit_s": limit}  # fmt: skip
        started = time.perf_counter()
        self.send(b"L", json.dumps(spec).encode() + b"\n")
        body = self.wait_for(lambda kind, got: kind in (b"R", b"X", b"N") and got == key)
        return time.perf_counter() - started, json.loads(body)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def module_of(bench: Bench, source: Path, workdir: Path) -> str:
    """Build `source` with sshwasm, put its module into `workdir`; its sha256."""
    # spin.rs ends `timeout` (exit 124): its record is what counts.
    record = json.loads(bench.sshwasm("run", str(source), "--json", "--time-limit", "1").stdout)
    path = bench.root / f"{source.stem}.wasm"
    bench.sshwasm("wasm", str(record["id"]), "-o", str(path), check=True)
    sha = str(record["wasm_sha256"])
    subprocess.run([sys.executable, "-m", "sshwasm.runner", "put-module", str(workdir), sha],
                   input=path.read_bytes(), check=True, capture_output=True)  # fmt: skip
    return sha


def measure_serve(bench: Bench, rounds: int) -> tuple[float, float, float]:
    """(reused executor's latency, new executor's latency, R after the deadline), medians."""
    workdir = Path(tempfile.mkdtemp(dir=bench.root, prefix="serve-"))
    tiny = module_of(bench, program("tiny.rs"), workdir)
    spin = module_of(bench, program("spin.rs"), workdir)
    serve = Serve(workdir)
    try:
        serve.run("warm", tiny, ["tiny"], None)
        reused: list[float] = []
        fresh: list[float] = []
        late: list[float] = []
        for i in range(rounds):
            reused.append(serve.run(f"r{i}", tiny, ["tiny"], None)[0])
            seconds, result = serve.run(f"s{i}", spin, ["spin"], LIMIT_S)
            if result["state"] != "timeout" or not str(result["error"]).startswith(ERROR_PREFIX):
                raise BenchError(f"serve: a spinning task ended {result}")
            late.append(seconds - LIMIT_S)
            seconds, result = serve.run(f"f{i}", tiny, ["tiny"], None)
            if result["state"] != "succeeded":
                raise BenchError(f"serve: the task after a timeout ended {result}")
            fresh.append(seconds)
    finally:
        serve.close()
    return median(reused), median(fresh), median(late)


def main() -> int:
    """Run the benchmark and print its report."""
    args = parse_args()
    banner(f"tasks that time out: --array {args.tasks} --time-limit {LIMIT_S:g}, and serve")
    with Bench(1, HostShape(cpus=CPUS, memory_mb=2048), keep=args.keep) as bench:
        source = program("spin.rs")
        run_array(bench, source, CPUS)  # warm-up: build, runner, module
        walls: list[float] = []
        longest: list[float] = []
        for _ in range(args.repeat):
            seconds, records = run_array(bench, source, args.tasks)
            longest.append(check_records(records, args.tasks))
            walls.append(seconds)
        reused, fresh, late = measure_serve(bench, args.rounds)
    ideal = args.tasks * LIMIT_S / CPUS
    wall = median(walls)
    ratio = wall / ideal
    replacement = fresh - reused
    met_array = ratio <= TARGET_ARRAY_RATIO
    met_serve = replacement <= TARGET_REPLACEMENT_S
    print(f"every task: timeout, 124, '{ERROR_PREFIX}...'; longest run_s {max(longest):.3f} s")
    print(
        f"array of {args.tasks}: {wall:.2f} s, {args.tasks / wall:.1f} tasks/s; ideal "
        f"{ideal:.2f} s: {ratio:.2f}x (target <= {TARGET_ARRAY_RATIO}x: {verdict(met_array)})"
    )
    print(
        f"serve: tiny task on a reused executor {reused * 1000:.1f} ms, on a new one after a "
        f"timeout {fresh * 1000:.1f} ms: replacement {replacement * 1000:.1f} ms (target <= "
        f"{TARGET_REPLACEMENT_S * 1000:g} ms: {verdict(met_serve)}); a timed-out task's R "
        f"{late * 1000:.1f} ms after its deadline"
    )
    return 0 if met_array and met_serve else 1


if __name__ == "__main__":
    run_main(main)
