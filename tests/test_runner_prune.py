"""Old runner versions on a host: `hosts install` removes those older than the one it
replaced that no process uses, says so, and keeps those a running job needs (a flock the
bootstrap holds for the life of every runner process, or a job directory with a live pid)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from helpers import PROGRAMS, RUNNER_VERSION, sshwasm, wait_for, wait_for_state

from sshwasm.runner.jobdir import _write_pid_file

HOLD_LOCK = """\
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(120)
"""


def install(cluster: Path) -> str:
    result = sshwasm("--cluster", str(cluster), "hosts", "install")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_hosts_install_removes_old_runners_that_no_process_uses(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    workdir = cluster.parent / "workers" / "alpha"
    assert "old runner" not in install(cluster)  # a new host: nothing to remove
    bin_dir = workdir / "bin"
    unused, locked, running, previous = (f"{n:016x}" for n in (1, 2, 3, 4))
    for version in (unused, locked, running, previous):
        (bin_dir / version).mkdir(mode=0o700)
        (bin_dir / version / "sshwasm_exec").mkdir(mode=0o700)
    (bin_dir / "current").write_text(previous + "\n")
    # A process of version `locked` (as the bootstrap holds its version's directory), and a
    # job of version `running` whose pid is alive and which has no result yet.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(bin_dir / locked)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        job_dir = workdir / "jobs" / "9-old"
        job_dir.mkdir(parents=True, mode=0o700)
        (job_dir / "spec.json").write_text(json.dumps({"runner_version": running}))
        _write_pid_file(str(job_dir), holder.pid)

        said = install(cluster)
        assert f"alpha: removed old runner versions from {workdir}/bin: {unused}\n" in said
        kept = f"alpha: kept old runner versions still in use by running jobs: {locked}, {running}"
        assert kept in said
        assert sorted(os.listdir(bin_dir)) == sorted(
            ["current", RUNNER_VERSION, locked, running, previous]
        )
        assert (bin_dir / "current").read_text() == RUNNER_VERSION + "\n"

        # A detached job's executor holds its runner's lock for its life.
        started = sshwasm("--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"),
                          "--detach", "--", "30")  # fmt: skip
        assert started.returncode == 0, started.stderr
        wait_for_state(1, {"running"})
        jobs = workdir / "jobs"
        wait_for(lambda: any((path / "pid").exists() for path in jobs.glob("1-*")))
        (job,) = jobs.glob("1-*")
        pid = int((job / "pid").read_text())
        held = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        assert str(bin_dir / RUNNER_VERSION) in held, held
        fd = os.open(bin_dir / RUNNER_VERSION, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("the running job's runner is not locked")
            except BlockingIOError:
                pass
        finally:
            os.close(fd)
        assert sshwasm("cancel", "1").returncode == 0
    finally:
        holder.kill()
        holder.wait()
    # Nothing uses them now: all but the current one go (it replaced itself this time).
    said = install(cluster)
    assert (
        f"alpha: removed old runner versions from {workdir}/bin: {locked}, {running}, {previous}\n"
        in said
    )
    assert sorted(os.listdir(bin_dir)) == sorted(["current", RUNNER_VERSION])
