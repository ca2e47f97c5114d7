"""serve under a Dask worker (engine: dask): its guests end with the worker.

Under the SSH engine a task outlives the coordinator that launched it (its result waits on
the host's disk for `attach` or `poll`). Under a Dask worker it must not: when the worker
dies, Dask runs the task again elsewhere, so a guest left running would run twice and its
answer could be taken for the task's. The worker plugin starts serve with
`SSHWASM_SERVE_END_WITH_PARENT=1`, and then:

- serve's stdin is a pipe only the worker process holds: EOF on it (the worker stopped or
  was SIGKILLed; the kernel closes the pipe either way) or a SIGTERM (`pool down` signals
  the worker's whole process group) makes serve kill every executor's process group and
  write each task's result (`failed`, WORKER_STOPPED) before it exits;
- each executor asks the kernel for SIGKILL when serve dies (PR_SET_PDEATHSIG), so a
  serve that is SIGKILLed itself cannot leave a guest behind either.

Stdlib only, as all of the runner.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

END_WITH_PARENT_VARIABLE = "SSHWASM_SERVE_END_WITH_PARENT"
# The error of a task killed because its worker stopped: the task did not run to an end,
# and `jobs` (settling after a scheduler restart) submits it again.
WORKER_STOPPED = "killed with its Dask worker, which stopped before the task ended"
# prctl(2): ask for a signal when the parent (the thread that forked us) dies.
_PR_SET_PDEATHSIG = 1


def ends_with_parent() -> bool:
    """Whether this serve runs under a Dask worker (its guests end with it)."""
    return os.environ.get(END_WITH_PARENT_VARIABLE) == "1"


def die_with_parent(parent_pid: int) -> None:
    """In a forked executor: SIGKILL when `parent_pid` (serve) dies, where the kernel offers
    it (Linux); exit at once if serve already died before the request was made."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)


def kill_group(pid: int) -> None:
    """SIGKILL the executor `pid` and its process group (it made a session of its own)."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(OSError):
            kill(pid, signal.SIGKILL)
