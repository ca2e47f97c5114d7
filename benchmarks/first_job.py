"""The first job on a host never used before against bare `ssh host true` (OpenSSH).

Each round gives the loopback host a fresh, empty workdir (a new cluster file naming it), so
`sshwasm run tiny.rs` pays what a new host costs: a new SSH connection (a host's settings
changed, so the connection process opens a new one; `--direct` connects from the command
itself), the runner's install, the module's upload and its precompilation on the host.
The module itself is compiled locally once, before the rounds (what a user's second host
would find). Both sides run interleaved, median of --runs each.

Target (issue 13): first job <= 3x `ssh host true`; exits 1 when missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Sequence

from benchmarks.common import (
    Bench,
    BenchError,
    banner,
    median,
    program,
    run_main,
    sshd,
    summary,
    verdict,
)

TARGET_RATIO = 3.0
HOST = "alpha"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="timed runs of each (default 9)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--direct", action="store_true", help="without the connection process")
    return parser.parse_args(argv)


def timed(argv: Sequence[str], bench: Bench) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Wall seconds from spawn to exit of one process in the bench's environment."""
    started = time.perf_counter()
    completed = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, env=bench.env, cwd=bench.root
    )
    return time.perf_counter() - started, completed


def fresh_cluster(bench: Bench, round_number: int) -> str:
    """A cluster file whose one host has a workdir nothing was ever installed in."""
    path = bench.root / f"cluster-{round_number}.yaml"
    root = bench.root / f"fresh-{round_number}"
    sshd.write_cluster(path, bench.servers, bench.kit, {HOST: (2, 2048)}, root)
    return str(path)


def main() -> int:
    """Run the benchmark and print its report."""
    args = parse_args()
    tiny = str(program("tiny.rs"))
    banner("first `sshwasm run tiny.rs` on a fresh host vs `ssh host true` (one loopback host)")
    with Bench(1, keep=args.keep) as bench:
        if args.direct:
            bench.env["SSHWASM_CONNECTION_PERSIST_S"] = "0"
        bench.sshwasm("--cluster", fresh_cluster(bench, 0), "run", tiny, check=True)
        first_times: list[float] = []
        ssh_times: list[float] = []
        uploads: list[int] = []
        for round_number in range(1, args.runs + 1):
            cluster = fresh_cluster(bench, round_number)
            argv = bench.sshwasm_argv("--cluster", cluster, "run", tiny, "--json")
            seconds, completed = timed(argv, bench)
            if completed.returncode != 0:
                raise BenchError("first sshwasm run failed", completed)
            record = json.loads(completed.stdout)
            if record["compile_s"] != 0 or record["stdout"] != "tiny -\n":
                raise BenchError(f"unexpected record: {record}", completed)
            uploads.append(record["upload_bytes"])
            first_times.append(seconds)
            seconds, completed = timed(bench.ssh_argv(HOST, "true"), bench)
            if completed.returncode != 0:
                raise BenchError("ssh host true failed", completed)
            ssh_times.append(seconds)
        if not all(uploads):
            print(f"note: a round uploaded nothing (not a fresh host?): {uploads}")
        ratio = median(first_times) / median(ssh_times)
        print(f"first job on a fresh host: {summary(first_times)}")
        print(f"ssh host true:             {summary(ssh_times)}")
        print(f"ratio: {ratio:.2f}x  (target <= {TARGET_RATIO}x: {verdict(ratio <= TARGET_RATIO)})")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    run_main(main)
