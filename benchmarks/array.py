"""`sshwasm run tiny.rs --array 120` over three loopback hosts vs GNU parallel over ssh.

The baseline is the hand-made way: `parallel -j HOSTS*CPUS` running, per task,
`ssh host <python> <workdir>/runner_baseline.py <workdir>/tiny.wasm <task>` with the module and
the runner already on every host (tasks go round-robin over the hosts). Each task pays an
SSH handshake, an interpreter start and a Cranelift compile. Both sides are warm: sshwasm
ran the same module on every host before it is timed. Prints tasks per second of both and
the ratio, and checks that every task printed its one line, whole.

Target (issue 5): the array >= 10x the GNU parallel baseline. Exits 2 (after saying so) when
this checkout's `sshwasm run` has no `--array` yet; `--baseline-anyway` still measures
the baseline then.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import (
    EXIT_UNAVAILABLE,
    SYSTEM_RUSTC,
    Bench,
    BenchError,
    HostShape,
    banner,
    median,
    program,
    run_main,
    sshwasm_has_option,
    verdict,
)

TARGET_RATIO = 10.0
BASELINE_RUNNER = Path(__file__).resolve().parent / "runner_baseline.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=120, help="array size (default 120)")
    parser.add_argument("--hosts", type=int, default=3, help="loopback hosts (default 3)")
    parser.add_argument(
        "--cpus-per-host", type=int, default=2, help="cpus each host declares (default 2)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each (median)")
    parser.add_argument(
        "--baseline-anyway",
        action="store_true",
        help="measure the GNU parallel baseline even when --array is missing",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def check_lines(output: bytes, tasks: int, what: str) -> None:
    """Raise BenchError unless `output` is exactly one whole `tiny i` line per task."""
    lines = output.decode(errors="replace").splitlines()
    expected = collections.Counter(f"tiny {i}" for i in range(tasks))
    got = collections.Counter(lines)
    if got != expected:
        missing = sorted(expected - got)[:5]
        extra = sorted(got - expected)[:5]
        raise BenchError(
            f"{what}: {len(lines)} lines; missing {missing}, unexpected {extra} (first 5 each)"
        )
    if not output.endswith(b"\n"):
        raise BenchError(f"{what}: output does not end with a newline")


def compile_tiny(bench: Bench) -> Path:
    """tiny.rs compiled to wasm32-wasi with sshwasm's flags (for the baseline's hosts)."""
    wasm = bench.root / "tiny.wasm"
    completed = subprocess.run(
        [
            str(SYSTEM_RUSTC),
            "--edition",
            "2021",
            "--target",
            "wasm32-wasi",
            "-O",
            "-C",
            "strip=symbols",
            "-o",
            str(wasm),
            str(program("tiny.rs")),
        ],
        capture_output=True,
        cwd=bench.root,
        check=False,
    )
    if completed.returncode != 0:
        raise BenchError("rustc could not build tiny.wasm", completed)
    return wasm


def stage_baseline(bench: Bench, wasm: Path) -> None:
    """Copy the module and the baseline runner into every host's workdir (over ssh)."""
    for name in bench.names:
        workdir = bench.workdir(name)
        bench.ssh(name, "mkdir", "-p", str(workdir))
        for source in (wasm, BASELINE_RUNNER):
            target = shlex.quote(str(workdir / source.name))
            bench.ssh(name, f"cat > {target}", input_bytes=source.read_bytes())


def run_baseline(bench: Bench, tasks: int, jobs: int) -> float:
    """Seconds GNU parallel takes to run every task over ssh; checks the output."""
    commands = bench.root / "parallel-commands.txt"
    lines = []
    for task in range(tasks):
        name = bench.names[task % len(bench.names)]
        workdir = bench.workdir(name)
        remote = [
            sys.executable,
            str(workdir / BASELINE_RUNNER.name),
            str(workdir / "tiny.wasm"),
            str(task),
        ]
        lines.append(shlex.join(bench.ssh_argv(name, *remote)))
    commands.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    completed = subprocess.run(
        ["parallel", "--will-cite", "-j", str(jobs), "-a", str(commands)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=bench.env,
        cwd=bench.root,
        check=False,
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise BenchError(f"GNU parallel exited {completed.returncode}", completed)
    check_lines(completed.stdout, tasks, "GNU parallel")
    return seconds


def run_array(bench: Bench, tasks: int) -> float:
    """Seconds `sshwasm run tiny.rs --array N` takes in the foreground; checks the output."""
    started = time.perf_counter()
    completed = bench.sshwasm("run", str(program("tiny.rs")), "--array", str(tasks))
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise BenchError(f"sshwasm --array {tasks} exited {completed.returncode}", completed)
    check_lines(completed.stdout, tasks, "sshwasm --array")
    return seconds


def spread(bench: Bench, tasks: int) -> str:
    """How the last array's tasks were spread over the hosts (from `sshwasm jobs --json`)."""
    completed = bench.sshwasm("jobs", "--json", "--limit", str(tasks))
    try:
        records = json.loads(completed.stdout)
    except ValueError:
        return "unknown"
    counts = collections.Counter(record.get("host") for record in records)
    return ", ".join(f"{host}: {count}" for host, count in sorted(counts.items(), key=str))


def main() -> int:
    """Run the benchmark and print its report."""
    args = parse_args()
    banner(
        f"`sshwasm run tiny.rs --array {args.tasks}` vs GNU parallel + ssh, "
        f"{args.hosts} loopback hosts x {args.cpus_per_host} cpus"
    )
    if shutil.which("parallel") is None:
        raise BenchError("GNU parallel is not installed (apt-get install parallel)")
    has_array = sshwasm_has_option("--array")
    if not has_array:
        print(
            "sshwasm run has no --array option in this checkout yet: "
            "the array side cannot be measured (exit 2)."
        )
        if not args.baseline_anyway:
            return EXIT_UNAVAILABLE
    jobs = args.hosts * args.cpus_per_host
    shape = HostShape(cpus=args.cpus_per_host, memory_mb=2048)
    with Bench(args.hosts, shape, keep=args.keep) as bench:
        stage_baseline(bench, compile_tiny(bench))
        array_times: list[float] = []
        if has_array:
            # Warm: compiled, runner installed and module precompiled on every host.
            run_array(bench, jobs * 2)
        for _ in range(args.repeat):
            if has_array:
                array_times.append(run_array(bench, args.tasks))
        baseline_times = [run_baseline(bench, args.tasks, jobs) for _ in range(args.repeat)]
        baseline_rate = args.tasks / median(baseline_times)
        print(
            f"GNU parallel -j {jobs} + ssh + runner_baseline.py: {median(baseline_times):.2f} s, "
            f"{baseline_rate:.1f} tasks/s"
        )
        if not has_array:
            return EXIT_UNAVAILABLE
        array_rate = args.tasks / median(array_times)
        print(
            f"sshwasm --array {args.tasks}: {median(array_times):.2f} s, {array_rate:.1f} tasks/s "
            f"(tasks per host: {spread(bench, args.tasks)})"
        )
        ratio = array_rate / baseline_rate
        print(
            f"ratio: {ratio:.1f}x faster  "
            f"(target >= {TARGET_RATIO:g}x: {verdict(ratio >= TARGET_RATIO)})"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
