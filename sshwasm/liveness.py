"""Whether a job's coordinator is still alive, and so whether this process should take
the job over (bring it up to date from its host itself).
"""

from __future__ import annotations

import itertools
import os
import time

from .store import Job

# A coordinator silent for this long is taken for dead (its pid is also checked).
COORDINATOR_STALE_S = 30.0


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid runs on this machine (a zombie does not)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A killed coordinator stays a zombie until its parent (or init) reaps it: seconds, in
    # which its job would otherwise count as looked after (its empty cmdline says nothing).
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return False  # no procfs: cannot tell, so trust kill()
    # Field 3, after the command name in parentheses (which may itself hold ") ").
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


def is_sshwasm_process(pid: int) -> bool | None:
    """Whether the process `pid` runs sshwasm (its command line says so); None: cannot tell."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except FileNotFoundError:
        # No procfs at all, or the process just exited: only the first is "cannot tell".
        return None if not os.path.isdir("/proc/self") else False
    except OSError:
        return None
    # `sshwasm ...` (the console script, run by its interpreter) or `python -m sshwasm ...`.
    head = argv[:4]
    if any(os.path.basename(arg) == b"sshwasm" for arg in head):
        return True
    return any(a == b"-m" and b == b"sshwasm" for a, b in itertools.pairwise(head))


def coordinator_alive(job: Job) -> bool:
    """Whether some sshwasm process is still looking after this job.

    A live sshwasm process is never taken for dead, however stale its heartbeat: one that
    is only slow (a lock held by another process, a stopped terminal) would otherwise be
    taken over, and the job followed by two processes, its output written twice. The
    heartbeat decides only for a live pid that is no sshwasm command (a program using the
    API, or a pid that was reused).
    """
    pid = job.coordinator_pid
    if pid is None or not pid_alive(pid):
        return False
    if is_sshwasm_process(pid) is not False:
        return True
    return job.heartbeat_ts is not None and time.time() - job.heartbeat_ts < COORDINATOR_STALE_S


def needs_refresh(job: Job) -> bool:
    """Whether this process should bring the job up to date from its host: it is unfinished
    and no other process follows it (this one may have taken it over by an earlier refresh)."""
    if job.is_final:
        return False
    return job.coordinator_pid == os.getpid() or not coordinator_alive(job)
