"""The coordinator's peak memory while a job streams 100 MB of output in the foreground.

tests/programs/bigout.rs prints `line 1` .. `line N`; N is chosen so the output is just over
--megabytes MiB. `sshwasm run bigout.rs -- N` runs on one loopback host with its stdout
going to /dev/null; the coordinator's peak RSS is taken from the kernel (`wait4`'s
ru_maxrss, and VmHWM polled from /proc while it runs). The baseline is an idle
`python -c 'import asyncssh, sshwasm.cli'`. Then the local copy of the output is checked
byte for byte (size and sha256 against what bigout must print), and so is the foreground
stream of a second run whose stdout is piped to this process. A third run's stdout goes to
a slow reader on a pipe (--slow-megabytes at --slow-mib-per-s): the coordinator must neither
buffer what the reader has not taken (its peak RSS is measured the same way) nor lose any
of it. The connection process's own peak (VmHWM) is shown too when one relayed the runs.

Target (issue 5): coordinator peak RSS < 100 MB, with /dev/null and with the slow reader;
exits 1 when missed.
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--megabytes", type=int, default=100, help="MiB of output to stream (default 100)"
    )
    parser.add_argument(
        "--slow-megabytes", type=int, default=20, help="MiB for the slow reader (default 20)"
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


def run_measured(argv: Sequence[str], env: dict[str, str], cwd: Path) -> tuple[int, float, float]:
    """Run with stdout to /dev/null; (exit code, peak RSS in MiB, wall seconds)."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=devnull, stderr=subprocess.PIPE, env=env, cwd=cwd
        )
    sampler = PeakSampler(process.pid)
    sampler.start()
    assert process.stderr is not None
    stderr = process.stderr.read()
    # wait4 reaps it and returns the kernel's ru_maxrss (KiB) for it.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    sampler.stop()
    sampler.join()
    if process.returncode != 0:
        raise BenchError(
            f"{' '.join(argv[:6])} ... exited {process.returncode}: "
            f"{stderr.decode(errors='replace')[-2000:]}"
        )
    peak_kib = max(usage.ru_maxrss, sampler.peak_kib)
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
    argv: Sequence[str], env: dict[str, str], cwd: Path, mib_per_s: float
) -> tuple[float, int, str]:
    """Run with stdout piped to a reader taking 64 KiB at a time at `mib_per_s`; (peak RSS in
    MiB, bytes read, sha256)."""
    chunk = 64 << 10
    pause = chunk / (mib_per_s * MIB)
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
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop()
    sampler.join()
    if process.returncode != 0:
        stderr = b"".join(errors).decode(errors="replace")[-2000:]
        raise BenchError(f"slow-reader run exited {process.returncode}: {stderr}")
    return max(usage.ru_maxrss, sampler.peak_kib) / 1024, size, digest.hexdigest()


def mux_peak_mib(bench: Bench) -> float | None:
    """VmHWM of the bench's connection process, if one is running (its PID is in its lock)."""
    try:
        pid = int((bench.runtime_dir / "mux-1.lock").read_text().split()[0])
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
        bench.sshwasm("run", str(source), "--", "3", check=True)  # compile, install, precompile
        _, baseline_mb, _ = run_measured(
            [sys.executable, "-c", "import asyncssh, sshwasm.cli"], bench.env, bench.root
        )
        _, peak_mb, seconds = run_measured(
            bench.sshwasm_argv("run", str(source), "--", str(lines)), bench.env, bench.root
        )
        listing = json.loads(bench.sshwasm("jobs", "--json", "--limit", "1", check=True).stdout)
        job = listing[0]
        local_copy = paths.job_output_dir(bench.root / "data" / "jobs.sqlite", job["id"]) / "stdout"
        got_size = local_copy.stat().st_size
        got_sha = hashlib.sha256(local_copy.read_bytes()).hexdigest()
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
        slow_lines = lines_for(args.slow_megabytes * MIB)
        slow_peak_mb, slow_size, slow_sha = slow_reader_run(
            bench.sshwasm_argv("run", str(source), "--", str(slow_lines)),
            bench.env,
            bench.root,
            args.slow_mib_per_s,
        )
        slow_whole = slow_size == output_bytes(slow_lines) and slow_sha == expected_sha256(
            slow_lines
        )
        slow_met = slow_peak_mb * MIB / 1e6 < TARGET_MB
        print(
            f"a slow reader on a pipe ({args.slow_mib_per_s:g} MiB/s, {slow_size:,} bytes): "
            f"coordinator peak {slow_peak_mb:.1f} MiB, {slow_peak_mb / baseline_mb:.2f}x the idle "
            f"baseline (target < {TARGET_MB:g} MB: {verdict(slow_met)}); "
            f"whole: {'yes' if slow_whole else 'NO'}"
        )
        relay = mux_peak_mib(bench)
        if relay is not None:
            print(f"the connection process that relayed the runs: peak {relay:.1f} MiB")
        if not whole:
            raise BenchError(f"the local copy {local_copy} differs from what bigout printed")
        if not piped_whole:
            raise BenchError("the foreground stream differs from what bigout printed")
        if not slow_whole:
            raise BenchError("the slow reader's stream differs from what bigout printed")
    return 0 if peak_mb * MIB / 1e6 < TARGET_MB and slow_met else 1


if __name__ == "__main__":
    run_main(main)
