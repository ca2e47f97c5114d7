"""Warm `sshwasm run tiny.rs` against bare `ssh host true` (OpenSSH), on one loopback host.

Warm means the module is compiled and cached locally, already on the host, and its machine
code precompiled there, and the connection process (sshwasm.mux) holds the host's connection
and its warm serve from the warm-up: what is left is the CLI start-up and one job handed to
that serve (an executor that already imported wasmtime and loaded the module).
`--direct` measures without it (SSHWASM_CONNECTION_PERSIST_S=0), as before. Both sides
run interleaved, median of --runs each. Then a breakdown of where a warm run's time goes:
the CLI traced in-process (benchmarks/trace_cli.py), `-X importtime`, and the pieces
measured alone (interpreter start, imports, handshake, remote commands).

Target (issue 13): warm run <= 0.8x `ssh host true`; exits 1 when missed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Bench,
    BenchError,
    banner,
    median,
    print_table,
    program,
    run_main,
    summary,
    verdict,
)

TARGET_RATIO = 0.8
TRACE_SCRIPT = Path(__file__).resolve().parent / "trace_cli.py"
HOST = "alpha"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each (default 15)")
    parser.add_argument("--traces", type=int, default=5, help="traced runs (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--direct", action="store_true", help="without the connection process (each run connects)"
    )
    return parser.parse_args(argv)


def time_process(
    argv: Sequence[str], bench: Bench
) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Wall seconds from spawn to exit of one process in the bench's environment."""
    started = time.perf_counter()
    completed = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, env=bench.env, cwd=bench.root
    )
    return time.perf_counter() - started, completed


def warm_up(bench: Bench, tiny: Path) -> dict[str, Any]:
    """Run tiny three times (compile, install runner, upload, precompile; the connection
    process's warm serve starts behind the first); return the last record."""
    bench.sshwasm("run", str(tiny), check=True)
    bench.sshwasm("run", str(tiny), check=True)
    record: dict[str, Any] = json.loads(
        bench.sshwasm("run", str(tiny), "--json", check=True).stdout
    )
    if record["compile_s"] != 0 or record["upload_bytes"] != 0:
        print(f"note: the second run still compiled or uploaded: {record}")
    return record


def compare(bench: Bench, tiny: Path, runs: int) -> tuple[list[float], list[float]]:
    """Interleaved timings of the warm sshwasm run and of `ssh host true`."""
    sshwasm_times: list[float] = []
    ssh_times: list[float] = []
    for _ in range(runs):
        seconds, completed = time_process(bench.sshwasm_argv("run", str(tiny)), bench)
        if completed.returncode != 0 or completed.stdout != b"tiny -\n":
            raise BenchError("warm sshwasm run failed", completed)
        sshwasm_times.append(seconds)
        seconds, completed = time_process(bench.ssh_argv(HOST, "true"), bench)
        if completed.returncode != 0:
            raise BenchError("ssh host true failed", completed)
        ssh_times.append(seconds)
    return sshwasm_times, ssh_times


# -- breakdown --------------------------------------------------------------------------------


def median_or_nan(values: Sequence[float]) -> float:
    """The median, or NaN when any value is missing (NaN)."""
    return float("nan") if any(math.isnan(value) for value in values) else median(values)


def milliseconds(seconds: float) -> str:
    """`  12.3 ms`, or `n/a` for a phase that could not be measured."""
    return "    n/a" if math.isnan(seconds) else f"{seconds * 1000:7.1f} ms"


def trace_once(bench: Bench, tiny: Path) -> dict[str, float]:
    """One traced warm run: phase name -> seconds (first occurrence of each span)."""
    out = bench.root / "trace.json"
    spawned = time.time()
    completed = subprocess.run(
        [sys.executable, str(TRACE_SCRIPT), str(out), "run", str(tiny)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=bench.env,
        cwd=bench.root,
    )
    exited = time.time()
    if completed.returncode != 0:
        raise BenchError("traced run failed", completed)
    trace = json.loads(out.read_text())
    nan = float("nan")
    # A missing stamp (a wrapped function renamed since) shows as n/a, not as an error.
    marks: dict[str, float] = collections.defaultdict(lambda: nan, trace["marks"])
    spans: dict[str, tuple[float, float]] = {}
    for name, began, ended in trace["spans"]:
        spans.setdefault(name, (began, ended))

    def length(*names: str) -> float:
        return sum(
            spans.get(name, (nan, nan))[1] - spans.get(name, (nan, nan))[0] for name in names
        )

    channel_open = spans.get("open channel + exec request", (nan, nan))[1]
    warm_request = spans.get("warm serve: launch request", (nan, nan))[1]
    remote: dict[str, float] = collections.defaultdict(lambda: nan, remote_stamps(bench))
    return {
        "interpreter start (until trace_cli's first line)": marks["child_start"] - spawned,
        "import sshwasm.cli": length("import sshwasm.cli"),
        "import build/store/coordinator/transport": length(
            "import build/store/coordinator/transport (lazy in the CLI)"
        ),
        "cluster + build cache + jobs file + submit": length(
            "load cluster file", "build (cache lookup)", "open jobs file", "store.submit"
        ),
        "store.place_waiting": length("store.place_waiting"),
        "import asyncssh": length("import asyncssh"),
        "ssh connect (tcp + kex + auth)": length("ssh connect (tcp + kex + auth)"),
        "connection process: connect request": length("connection process: connect request"),
        "open channel + exec request": length("open channel + exec request"),
        "warm serve: launch request (connection process)": length("warm serve: launch request"),
        "remote (warm serve): request -> spec.json written": remote["spec.json"] - warm_request,
        "remote: login shell, runner start -> spec.json written": (
            remote["spec.json"] - channel_open
        ),
        "remote: spawn executor -> S frame here": marks["first frame S"] - remote["spec.json"],
        "remote: executor interpreter start -> pid written": remote["pid"] - remote["spec.json"],
        "remote: import wasmtime, load module -> stdout opened": remote["stdout"]
        - (remote["spec.json"] if math.isnan(remote["pid"]) else remote["pid"]),
        "remote: instantiate + run + result -> result.json": (
            remote["result.json"] - remote["stdout"]
        ),
        "remote: result.json -> R frame here (launch's polling)": (
            marks["first frame R"] - remote["result.json"]
        ),
        "after R: exit status, store.finish, close": marks["main_end"] - marks["first frame R"],
        "interpreter exit": exited - marks["main_end"],
        "total (spawn to exit)": exited - spawned,
    }


def remote_stamps(bench: Bench) -> dict[str, float]:
    """Modification times of the newest job's files on the host (loopback: same disk, clock).

    spec.json is written by the launch command just before it spawns the executor; pid by
    the executor once its interpreter is up; stdout when the WASI context opens it (after
    wasmtime is imported and the module loaded); result.json when the run is over. File
    times are coarse (one kernel tick, a few ms).
    """
    jobs = bench.workdir(HOST) / "jobs"
    job_dir = max(jobs.iterdir(), key=lambda path: path.stat().st_mtime_ns)
    stamps: dict[str, float] = {}
    for name in ("spec.json", "pid", "stdout", "result.json"):
        with contextlib.suppress(OSError):
            stamps[name] = (job_dir / name).stat().st_mtime_ns / 1e9
    if stamps.get("pid", 0.0) < stamps.get("spec.json", 0.0):
        # A pooled executor (warm serve): its pid file is a hard link to the one its first
        # task wrote, so it tells nothing of this run (the executor was up already).
        del stamps["pid"]
    return stamps


def importtime(bench: Bench, tiny: Path) -> tuple[float, list[tuple[str, float]]]:
    """`-X importtime` of one warm run: total seconds and the biggest top-level imports."""
    completed = bench.sshwasm("run", str(tiny), python_flags=("-X", "importtime"))
    top: list[tuple[str, float]] = []
    pattern = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)")
    for line in completed.stderr.decode(errors="replace").splitlines():
        match = pattern.match(line)
        if match and len(match.group(3)) == 1:
            top.append((match.group(4), int(match.group(2)) / 1e6))
    total = sum(seconds for _, seconds in top)
    top.sort(key=lambda item: item[1], reverse=True)
    return total, top[:8]


def local_piece(bench: Bench, code: str, runs: int = 7) -> float:
    """Median seconds of `python -c CODE` here."""
    return median([time_process([sys.executable, "-c", code], bench)[0] for _ in range(runs)])


async def remote_pieces(bench: Bench, runs: int = 7) -> dict[str, float]:
    """Medians of the SSH pieces on their own, with asyncssh like the coordinator uses."""
    import asyncssh

    python = sys.executable
    kwargs = bench.connect_kwargs(HOST)
    connects: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        connection = await asyncssh.connect(**kwargs)
        connects.append(time.perf_counter() - started)
        connection.close()
        await connection.wait_closed()
    pieces = {"asyncssh connect (tcp + kex + auth)": median(connects)}
    commands = {
        "remote `true` on an open connection (login shell)": "true",
        "remote `python -c pass`": f"{python} -c pass",
        "remote `python -c 'import wasmtime'`": f"{python} -c 'import wasmtime'",
    }
    async with asyncssh.connect(**kwargs) as connection:
        # The first channel of a connection waits ~45 ms for sshd's post-auth setup.
        await connection.run("true")
        for label, command in commands.items():
            times: list[float] = []
            for _ in range(runs):
                started = time.perf_counter()
                result = await connection.run(command, check=True)
                times.append(time.perf_counter() - started)
                assert result.exit_status == 0
            pieces[label] = median(times)
    return pieces


def breakdown(bench: Bench, tiny: Path, traces: int) -> None:
    """Print where a warm run's time goes."""
    runs = [trace_once(bench, tiny) for _ in range(traces)]
    print(f"\nbreakdown of a warm run (in-process trace, median of {traces}):")
    print_table(
        (phase, milliseconds(median_or_nan([run[phase] for run in runs]))) for phase in runs[0]
    )

    total, top = importtime(bench, tiny)
    print(f"\n-X importtime of a warm run: {total * 1000:.0f} ms of imports; biggest:")
    print_table((name, f"{seconds * 1000:7.1f} ms") for name, seconds in top)

    print("\npieces measured alone (median of 7):")
    local = {
        "local `python -c pass`": local_piece(bench, "pass"),
        "local `import sshwasm.cli`": local_piece(bench, "import sshwasm.cli"),
        "local `import asyncssh`": local_piece(bench, "import asyncssh"),
        "local `import asyncssh, sshwasm.coordinator`": local_piece(
            bench, "import asyncssh, sshwasm.coordinator"
        ),
    }
    remote = asyncio.run(remote_pieces(bench))
    print_table(
        (label, f"{seconds * 1000:7.1f} ms") for label, seconds in {**local, **remote}.items()
    )


def main() -> int:
    """Run the benchmark and print its report."""
    args = parse_args()
    tiny = program("tiny.rs")
    banner("warm `sshwasm run tiny.rs` vs `ssh host true` (one loopback host)")
    with Bench(1, keep=args.keep) as bench:
        if args.direct:
            bench.env["SSHWASM_CONNECTION_PERSIST_S"] = "0"
        record = warm_up(bench, tiny)
        print(
            f"warm record: compile_s={record['compile_s']} upload_bytes={record['upload_bytes']} "
            f"queue_s={record['queue_s']} run_s={record['run_s']}"
        )
        sshwasm_times, ssh_times = compare(bench, tiny, args.runs)
        ratio = median(sshwasm_times) / median(ssh_times)
        print(f"sshwasm run (warm):   {summary(sshwasm_times)}")
        print(f"ssh host true:        {summary(ssh_times)}")
        print(f"ratio: {ratio:.2f}x  (target <= {TARGET_RATIO}x: {verdict(ratio <= TARGET_RATIO)})")
        breakdown(bench, tiny, args.traces)
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    run_main(main)
