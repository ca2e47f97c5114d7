"""The coordinator's peak memory while a job streams 100 MB of output in the foreground.

tests/programs/bigout.rs prints `line 1` .. `line N`; N is chosen so the output is just over
--megabytes MiB. `sshwasm run bigout.rs -- N` runs on one loopback host with its stdout
going to /dev/null. The baseline is an idle `python -c 'import asyncssh, sshwasm.cli'`.
Then the local copy of the output is checked byte for byte (size and sha256 against what
bigout must print), and so is the foreground stream of a second run whose stdout is piped
to this process. A third run's stdout goes to a slow reader on a pipe (--slow-megabytes at
--slow-mib-per-s): neither the coordinator nor the connection process (which relays the
runs) may buffer what the reader has not taken, and none of it may be lost.

A peak is the process's own VmHWM: the process reports it as it exits (the CLI runs in a
small wrapper that calls `sshwasm.cli.main`), and /proc is polled while it runs. Not
`wait4`'s ru_maxrss: Linux counts in it the RSS of the image the child was forked from,
before its exec, so a child of a benchmark that had read 100 MB showed 122 MiB. The
connection process's peak for the slow run alone is taken after resetting its VmHWM
(`/proc/PID/clear_refs`).

Target (issues 5 and 13): coordinator peak RSS < 100 MB, with /dev/null and with the slow
reader, and the connection process's < 100 MB during the slow run; exits 1 when missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import Bench, BenchError, banner, program, run_main, verdict
from sshwasm import paths

TARGET_MB = 100.0
MIB = 1 << 20

# Reports the process's own peak (VmHWM, KiB) to the file in argv[1] as it ends.
_REPORT_PEAK = """
def _report_peak(path):
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            with open(path, 'w') as out:
                out.write(line.split()[1])
"""
# The CLI, as `python -m sshwasm` runs it, with its peak reported before it exits.
_CLI_WRAPPER = (
    _REPORT_PEAK
    + """
import os, sys
from sshwasm.cli import main
status = main(sys.argv[2:])
sys.stdout.flush()
sys.stderr.flush()
_report_peak(sys.argv[1])
os._exit(status)
"""
)
_IDLE_BASELINE = (
    _REPORT_PEAK
    + """
import sys
import asyncssh, sshwasm.cli
_report_peak(sys.argv[1])
"""
)


def cli_argv(peak_file: Path, *args: str) -> list[str]:
    """`sshwasm ARGS...` that writes its peak RSS (KiB) to `peak_file` as it exits."""
    return [sys.executable, "-c", _CLI_WRAPPER, str(peak_file), *args]


def reported_peak_kib(peak_file: Path) -> int:
    """What a wrapped process reported (0 if it did not get that far)."""
    try:
        return int(peak_file.read_text())
    except (OSError, ValueError):
        return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--megabytes", type=int, default=100, help="MiB of output to stream (default 100)"
    )
    parser.add_argument(
        "--slow-megabytes", type=int, default=100, help="MiB for the slow reader (default 100)"
    )
    parser.add_argument(
        "--slow-mib-per-s", type=float, default=4.0, help="the slow reader's pace (default 4)"
    )
    parser.add_argument("--direct", action="store_true", help="without the connection process")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def output_bytes(lines: int) -> int:
    """Bytes bigout prints for `lines` lines (`line <i>\\n`, i from 1)."""
    total = 0
    digits = 1
    low = 1
    while low <= lines:
        high = min(lines, 10**digits - 1)
        total += (high - low + 1) * (len("line \n") + digits)
        low, digits = high + 1, digits + 1
    return total


def lines_for(size: int) -> int:
    """The fewest lines whose output is at least `size` bytes."""
    low, high = 1, size
    while low < high:
        middle = (low + high) // 2
        if output_bytes(middle) >= size:
            high = middle
        else:
            low = middle + 1
    return low


def expected_sha256(lines: int) -> str:
    """sha256 of what bigout prints for `lines` lines."""
    digest = hashlib.sha256()
    step = 200_000
    for start in range(1, lines + 1, step):
        stop = min(lines + 1, start + step)
        digest.update(b"".join(b"line %d\n" % index for index in range(start, stop)))
    return digest.hexdigest()


class PeakSampler(threading.Thread):
    """Polls a process's VmHWM (peak resident set) from /proc until it goes away."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        """Sample until stopped or the process is gone."""
        status = Path(f"/proc/{self.pid}/status")
        while not self._halt.is_set():
            try:
                text = status.read_text()
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                    self.samples += 1
            time.sleep(self.interval)

    def stop(self) -> None:
        """Ask the thread to end."""
        self._halt.set()


def run_measured(
    argv: Sequence[str], peak_file: Path, env: dict[str, str], cwd: Path
) -> tuple[int, float, float]:
    """Run with stdout to /dev/null; (exit code, peak RSS in MiB, wall seconds)."""
    peak_file.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=devnull, stderr=subprocess.PIPE, env=env, cwd=cwd
        )
    sampler = PeakSampler(process.pid)
    sampler.start()
    assert process.stderr is not None
    stderr = process.stderr.read()
    process.wait()
    seconds = time.perf_counter() - started
    sampler.stop()
    sampler.join()
    if process.returncode != 0:
        raise BenchError(
            f"{' '.join(argv[:6])} ... exited {process.returncode}: "
            f"{stderr.decode(errors='replace')[-2000:]}"
        )
    peak_kib = max(reported_peak_kib(peak_file), sampler.peak_kib)
    return process.returncode, peak_kib / 1024, seconds


def foreground_digest(argv: Sequence[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run with stdout piped here; (bytes, sha256) of what the foreground printed."""
    digest = hashlib.sha256()
    size = 0
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, cwd=cwd,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    while chunk := process.stdout.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    stderr = process.stderr.read()
    if process.wait() != 0:
        raise BenchError(f"piped run exited {process.returncode}: {stderr.decode()[-2000:]}")
    return size, digest.hexdigest()


def slow_reader_run(
    argv: Sequence[str], peak_file: Path, env: dict[str, str], cwd: Path, mib_per_s: float
) -> tuple[float, int, str]:
    """Run with stdout piped to a reader taking 64 KiB at a time at `mib_per_s`; (peak RSS in
    MiB, bytes read, sha256)."""
    chunk = 64 << 10
    pause = chunk / (mib_per_s * MIB)
    peak_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, cwd=cwd,
    )  # fmt: skip
    sampler = PeakSampler(process.pid)
    sampler.start()
    assert process.stdout is not None and process.stderr is not None
    errors: list[bytes] = []
    err_pipe = process.stderr
    drain = threading.Thread(target=lambda: errors.append(err_pipe.read()), daemon=True)
    drain.start()
    digest = hashlib.sha256()
    size = 0
    while data := process.stdout.read(chunk):
        digest.update(data)
        size += len(data)
        time.sleep(pause)
    drain.join()
    process.wait()
    sampler.stop()
    sampler.join()
    if process.returncode != 0:
        stderr = b"".join(errors).decode(errors="replace")[-2000:]
        raise BenchError(f"slow-reader run exited {process.returncode}: {stderr}")
    peak_kib = max(reported_peak_kib(peak_file), sampler.peak_kib)
    return peak_kib / 1024, size, digest.hexdigest()


def file_sha256(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file, read a MiB at a time (this process stays small)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as data:
        while chunk := data.read(MIB):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def mux_pid(bench: Bench) -> int | None:
    """The PID of the bench's connection process (in its lock), if one is running."""
    try:
        pid = int((bench.runtime_dir / "mux-1.lock").read_text().split()[0])
        if b"sshwasm.mux" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux: `5` to clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mux_peak_mib(bench: Bench) -> float | None:
    """VmHWM of the bench's connection process, if one is running."""
    pid = mux_pid(bench)
    try:
        if pid is not None:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def main() -> int:
    """Run the benchmark and print its report."""
    args = parse_args()
    size = args.megabytes * MIB
    lines = lines_for(size)
    expected_size = output_bytes(lines)
    source = program("bigout.rs")
    banner(f"coordinator peak RSS while streaming {expected_size / MIB:.1f} MiB ({lines:,} lines)")
    with Bench(1, keep=args.keep) as bench:
        if args.direct:
            bench.env["SSHWASM_CONNECTION_PERSIST_S"] = "0"
        peak_file = bench.root / "peak-kib"
        bench.sshwasm("run", str(source), "--", "3", check=True)  # compile, install, precompile
        bench.sshwasm("run", str(source), "--", "3", check=True)  # and a warm serve, if one
        _, baseline_mb, _ = run_measured(
            [sys.executable, "-c", _IDLE_BASELINE, str(peak_file)], peak_file, bench.env, bench.root
        )
        _, peak_mb, seconds = run_measured(
            cli_argv(peak_file, "run", str(source), "--", str(lines)),
            peak_file,
            bench.env,
            bench.root,
        )
        listing = json.loads(bench.sshwasm("jobs", "--json", "--limit", "1", check=True).stdout)
        job = listing[0]
        local_copy = paths.job_output_dir(bench.root / "data" / "jobs.sqlite", job["id"]) / "stdout"
        got_size, got_sha = file_sha256(local_copy)
        want_sha = expected_sha256(lines)
        whole = got_size == expected_size and got_sha == want_sha
        piped_size, piped_sha = foreground_digest(
            bench.sshwasm_argv("run", str(source), "--", str(lines)), bench.env, bench.root
        )
        piped_whole = piped_size == expected_size and piped_sha == want_sha
        print(f"idle `python -c 'import asyncssh, sshwasm.cli'`: {baseline_mb:.1f} MiB")
        print(
            f"sshwasm run bigout.rs > /dev/null: peak {peak_mb:.1f} MiB, "
            f"{peak_mb / baseline_mb:.2f}x the idle baseline "
            f"(target < {TARGET_MB:g} MB: {verdict(peak_mb * MIB / 1e6 < TARGET_MB)})"
        )
        print(
            f"streamed {got_size:,} bytes in {seconds:.2f} s "
            f"({got_size / MIB / seconds:.1f} MiB/s); "
            f"job {job['state']}; local copy whole: {'yes' if whole else 'NO'} "
            f"(expected {expected_size:,} bytes)"
        )
        print(
            f"a second run piped here: {piped_size:,} bytes on the coordinator's stdout; "
            f"whole: {'yes' if piped_whole else 'NO'}"
        )
        relay_before = mux_peak_mib(bench)
        relay_pid = mux_pid(bench)
        relay_reset = relay_pid is not None and reset_peak(relay_pid)
        slow_lines = lines_for(args.slow_megabytes * MIB)
        slow_started = time.perf_counter()
        slow_peak_mb, slow_size, slow_sha = slow_reader_run(
            cli_argv(peak_file, "run", str(source), "--", str(slow_lines)),
            peak_file,
            bench.env,
            bench.root,
            args.slow_mib_per_s,
        )
        slow_seconds = time.perf_counter() - slow_started
        slow_whole = slow_size == output_bytes(slow_lines) and slow_sha == expected_sha256(
            slow_lines
        )
        slow_met = slow_peak_mb * MIB / 1e6 < TARGET_MB
        print(
            f"a slow reader on a pipe ({args.slow_mib_per_s:g} MiB/s, {slow_size:,} bytes in "
            f"{slow_seconds:.1f} s): coordinator peak {slow_peak_mb:.1f} MiB, "
            f"{slow_peak_mb / baseline_mb:.2f}x the idle baseline "
            f"(target < {TARGET_MB:g} MB: {verdict(slow_met)}); "
            f"whole: {'yes' if slow_whole else 'NO'}"
        )
        relay = mux_peak_mib(bench)
        relay_met = True
        if relay is not None and relay_before is not None:
            if relay_reset:
                relay_met = relay * MIB / 1e6 < TARGET_MB
                print(
                    f"the connection process that relayed the runs: peak {relay_before:.1f} MiB "
                    f"over the fast runs; {relay:.1f} MiB during the slow run, "
                    f"{relay / baseline_mb:.2f}x the idle baseline "
                    f"(target < {TARGET_MB:g} MB: {verdict(relay_met)})"
                )
            else:
                print(f"the connection process that relayed the runs: peak {relay:.1f} MiB")
        if not whole:
            raise BenchError(f"the local copy {local_copy} differs from what bigout printed")
        if not piped_whole:
            raise BenchError("the foreground stream differs from what bigout printed")
        if not slow_whole:
            raise BenchError("the slow reader's stream differs from what bigout printed")
    return 0 if peak_mb * MIB / 1e6 < TARGET_MB and slow_met and relay_met else 1


if __name__ == "__main__":
    run_main(main)
