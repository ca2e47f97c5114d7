"""README promises about SSH connections: "a silent host is declared gone after 15 s
(keepalives)", and "channels refused by `MaxSessions` are retried with backoff; one
coordinator keeps one connection per host and at most 8 channels on it".

Channels are counted from the host's side: sshd logs `no more sessions` for each channel
it refuses past its `MaxSessions`, and `Accepted publickey` for each connection.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
from helpers import (
    PROGRAMS,
    Guest,
    detached_coordinators,
    holds,
    process_gone,
    record_of,
    release,
    sshwasm,
    start_streaming,
    wait_for,
)
from sshd import SshServer

from sshwasm.cluster import Host
from sshwasm.transport import silence_limit_s

SLEEP = str(PROGRAMS / "sleep.rs")
# More array tasks than a connection may hold channels (8), each its own orphaned job.
TASKS = 12
REFUSED = "no more sessions"  # sshd's log line for a channel past MaxSessions
ACCEPTED = "Accepted publickey for"


@pytest.mark.slow
def test_a_silent_host_is_declared_gone_after_keepalives_and_the_job_reattached(
    fresh_host: Callable[..., SshServer], make_cluster: Callable[..., Path]
) -> None:
    """Three missed keepalives and the host is gone: with the host's `keepalive_s` at 2 s,
    after 6 s of silence (the default 5 s gives the README's 15 s; `silence_limit_s` is held
    to it below). The command runs as its own process, so only the cluster file shortens it."""
    assert silence_limit_s(Host(name="h", address="h", cpus=1, memory_mb=1)) == 15.0
    server = fresh_host("delta")
    cluster = make_cluster(
        {"delta": {"cpus": 2, "memory_mb": 1024, "keepalive_s": 2}}, servers=[server]
    )
    # Long enough to outlast the 6 s of silence and the re-attach after it.
    running = start_streaming("--cluster", str(cluster), "run", SLEEP, "--", "9")
    assert running.stdout is not None and running.stderr is not None
    try:
        assert running.stdout.readline() == b"start\n"
        # sshd and its sessions freeze: TCP still accepts and acknowledges, nothing answers.
        # Only keepalives can tell; the runner itself is detached from the session.
        server.pause()
        paused = time.monotonic()
        try:
            # Without keepalives this line would never come.
            warning = _line_within(running.stderr, 90)
            silent_for = time.monotonic() - paused
        finally:
            server.resume()
        # Three keepalive intervals of 2 s after the host's last packet (its "start"
        # frame, just before the pause): not sooner, and before a fourth would end.
        assert 5 <= silent_for < 8.5, silent_for
        assert warning == b"sshwasm: connection to 'delta' lost; re-attaching to job 1\n", warning
        out, err = running.communicate(timeout=120)
    finally:
        if running.poll() is None:
            running.kill()
            running.communicate()
    assert running.returncode == 0, err
    assert out == b"end\n"  # nothing printed twice, nothing missing


def _line_within(stream: IO[bytes], seconds: float) -> bytes:
    """The next line of an unbuffered pipe; fails if none is complete within `seconds`."""
    deadline = time.monotonic() + seconds
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(left, 0))
        assert ready, f"no line within {seconds:g}s; got {line!r}"
        byte = os.read(stream.fileno(), 1)  # one at a time: nothing read past the line
        assert byte, f"the stream ended; got {line!r}"
        line += byte
    return line


def _orphaned_tasks(cluster: Path, server_name: str, db: Path, guest: Guest) -> None:
    """Start TASKS array tasks and let them end on the host with their coordinator gone.

    `jobs` must then collect every one of them itself, all at once: TASKS channels wanted
    on one host by one process. The tasks are the probe guest's `held` mode, which runs
    until the test releases it: each is surely running when the coordinator is killed.
    """
    module = cluster.parent / "probe.wasm"
    module.write_bytes(guest.data)
    inputs = cluster.parent / "inputs"
    inputs.mkdir()
    (inputs / "held").write_bytes(b"")
    started = sshwasm(
        "--cluster", str(cluster), "run", str(module), "--array", str(TASKS), "--cpus", "1",
        "--memory-mb", "16", "--input", str(inputs), "--detach", "--", "held",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    jobs_root = cluster.parent / "workers" / server_name / "jobs"

    def job_dirs() -> list[Path]:
        return sorted(jobs_root.iterdir()) if jobs_root.is_dir() else []

    # Every task runs on the host (its guest printed its first line) ...
    wait_for(
        lambda: (
            len(job_dirs()) == TASKS
            and all(holds(path / "stdout", b"start\n") for path in job_dirs())
        ),
        timeout=120,
    )
    # ... when its coordinator dies, as a laptop's would.
    (coordinator,) = detached_coordinators(db)
    os.kill(coordinator, signal.SIGKILL)
    # Dead, even as a zombie that init has not reaped yet (liveness.pid_alive says so too).
    wait_for(lambda: process_gone(coordinator), timeout=90)
    # The runner goes on without it: every task ends on the host.
    for job_dir in job_dirs():
        release(job_dir)
    wait_for(lambda: all((path / "result.json").exists() for path in job_dirs()), timeout=120)


def _collect_all(server: SshServer) -> str:
    """`sshwasm jobs`, which refreshes every orphaned job at once; what sshd logged meanwhile."""
    before = len(server.log_text())
    listed = sshwasm("jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    records = record_of(listed)
    assert isinstance(records, list)
    problems = [
        (r["id"], r["state"], r["error"], r["stdout"])
        for r in records
        if r["state"] != "succeeded" or r["stdout"] != "start\nend\n"
    ]
    assert len(records) == TASKS and not problems, problems
    return server.log_text()[before:]


def _peak_sessions(log: str) -> int:
    """The most sessions sshd held open at once, by its Starting/Close session lines."""
    open_now = peak = 0
    for line in log.splitlines():
        if line.startswith("Starting session:"):
            open_now += 1
            peak = max(peak, open_now)
        elif line.startswith("Close session:"):
            open_now -= 1
    return peak


def test_one_connection_per_host_with_at_most_8_channels(
    fresh_host: Callable[..., SshServer],
    make_cluster: Callable[..., Path],
    tmp_path: Path,
    guest: Guest,
) -> None:
    """12 channels wanted at once stay within OpenSSH's default MaxSessions of 10.

    Not MaxSessions 8: sshd frees a session slot a moment after the client sees the
    channel close, so a client at exactly the limit is sometimes refused (and retries).
    """
    server = fresh_host("delta", extra_config="MaxSessions 10\n")
    cluster = make_cluster({"delta": (TASKS, 4096)}, servers=[server])
    _orphaned_tasks(cluster, "delta", tmp_path / "data" / "jobs.sqlite", guest)
    log = _collect_all(server)
    assert log.count(ACCEPTED) == 1, log
    assert REFUSED not in log, (_peak_sessions(log), log)


def test_channels_refused_by_max_sessions_are_retried(
    fresh_host: Callable[..., SshServer],
    make_cluster: Callable[..., Path],
    tmp_path: Path,
    guest: Guest,
) -> None:
    server = fresh_host("delta", extra_config="MaxSessions 4\n")
    cluster = make_cluster({"delta": (TASKS, 4096)}, servers=[server])
    _orphaned_tasks(cluster, "delta", tmp_path / "data" / "jobs.sqlite", guest)
    log = _collect_all(server)
    # sshd did refuse channels, and every job was still collected, over one connection.
    assert REFUSED in log, log
    assert log.count(ACCEPTED) == 1, log


def test_the_reattach_window_bounds_each_try_on_a_frozen_host(
    fresh_host: Callable[..., SshServer], make_cluster: Callable[..., Path]
) -> None:
    """A job with a retry left gives its host the keepalive bound to come back (3 x
    `keepalive_s`: 3 s here), and no more: a try to re-attach to a host that accepts TCP
    but never answers (a frozen sshd) is cut short at the window's end, not after the
    connection's own 10 s timeout. Then the job's next attempt runs once the host is back."""
    server = fresh_host("delta")
    cluster = make_cluster(
        {"delta": {"cpus": 2, "memory_mb": 1024, "keepalive_s": 1}}, servers=[server]
    )
    window = silence_limit_s(Host(name="d", address="d", cpus=1, memory_mb=1, keepalive_s=1))
    assert window == 3.0
    running = start_streaming("--cluster", str(cluster), "run", SLEEP, "--retries", "1", "--", "1")
    assert running.stdout is not None and running.stderr is not None
    try:
        assert running.stdout.readline() == b"start\n"
        server.pause()
        try:
            lost = _line_within(running.stderr, 60)
            lost_at = time.monotonic()
            ended = _line_within(running.stderr, 60)
            took = time.monotonic() - lost_at
        finally:
            server.resume()
        assert lost == b"sshwasm: connection to 'delta' lost; re-attaching to job 1\n", lost
        assert ended.startswith(b"sshwasm: job 1: attempt 1 on 'delta' ended: "), ended
        # The window and a margin for a loaded machine; a try left to the connect timeout
        # alone took 10.5 s.
        assert window / 2 <= took < window + 4, took
        out, err = running.communicate(timeout=120)
    finally:
        if running.poll() is None:
            running.kill()
            running.communicate()
    assert running.returncode == 0, err
    assert out == b"start\nend\n"  # the second attempt's output, from its beginning
