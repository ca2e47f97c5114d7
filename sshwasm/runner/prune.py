"""The prune-runners command: after an install, remove the runner versions under
`<workdir>/bin/` older than the previous one that no process uses.

Each upgrade of sshwasm installs another runner version on a host; without this they pile
up. Kept: the current version and the one it replaced (a command that read the pointer
just before the switch may still be starting it). A version is in use while a process
started from it lives: the bootstrap (transport.RUNNER_BOOTSTRAP) holds a shared flock on
the version's directory for its whole life, and so does every process forked from it (a
detached job's executor, serve and its executors), so an exclusive flock that cannot be
taken at once means in use. A job started by a runner older than that lock is found by its
job directory: no result yet, its spec's runner_version, its pid alive.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile

from .jobdir import _executor_death
from .protocol import VERSION_RE


def _running_jobs_versions(workdir: str) -> set[str]:
    """The runner versions of the jobs under WORKDIR/jobs that have no result and whose
    process is alive (or only starting)."""
    versions: set[str] = set()
    jobs = os.path.join(workdir, "jobs")
    try:
        entries = list(os.scandir(jobs))
    except OSError:
        return versions
    for entry in entries:
        job_dir = entry.path
        if os.path.exists(os.path.join(job_dir, "result.json")):
            continue
        try:
            with open(os.path.join(job_dir, "spec.json"), "rb") as spec_file:
                version = json.loads(spec_file.read()).get("runner_version")
        except (OSError, ValueError, AttributeError):
            continue
        # Alive, or just started (no pid file yet): its runner may still be needed.
        if isinstance(version, str) and _executor_death(job_dir) is None:
            versions.add(version)
    return versions


def _remove_unless_locked(bin_dir: str, version: str) -> bool:
    """Remove bin/VERSION unless a process holds its lock; whether it was removed."""
    path = os.path.join(bin_dir, version)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # Moved aside whole first: no command ever finds half a runner under its name.
        trash = tempfile.mkdtemp(prefix=".old-", dir=bin_dir)
        os.rename(path, os.path.join(trash, version))
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def prune_runners(workdir: str, current: str, previous: str | None) -> dict[str, list[str]]:
    """Remove the versions in WORKDIR/bin but `current` and `previous` that no process uses;
    {"removed": [...], "in_use": [...]} (versions, sorted)."""
    bin_dir = os.path.join(workdir, "bin")
    removed: list[str] = []
    in_use: list[str] = []
    running = None
    for name in sorted(os.listdir(bin_dir)):
        if name in (current, previous) or not VERSION_RE.fullmatch(name):
            continue
        if not os.path.isdir(os.path.join(bin_dir, name)):
            continue
        if running is None:
            running = _running_jobs_versions(workdir)
        try:
            if name not in running and _remove_unless_locked(bin_dir, name):
                removed.append(name)
                continue
        except OSError:
            pass  # unreadable or vanished: left as it is
        if os.path.isdir(os.path.join(bin_dir, name)):
            in_use.append(name)
    return {"removed": removed, "in_use": in_use}


def _cmd_prune_runners(workdir: str, previous: str = "") -> int:
    from .protocol import runner_version

    try:
        result = prune_runners(os.path.abspath(workdir), runner_version(), previous or None)
    except OSError as exc:
        # The install itself succeeded: old versions stay, and the next install tries again.
        print(f"sshwasm-exec: cannot remove old runners: {exc}", file=sys.stderr)
        result = {"removed": [], "in_use": []}
    print(json.dumps(result))
    return 0
