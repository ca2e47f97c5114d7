"""Whether a job's coordinator is alive: a killed one is dead at once, zombie or not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from sshwasm.liveness import pid_alive


def test_a_running_process_is_alive_and_a_killed_unreaped_one_is_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        # Not reaped yet: a zombie, as a killed coordinator is until init reaps it.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert os.path.exists(f"/proc/{child.pid}")
        assert not pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)


def test_no_pid_is_not_alive() -> None:
    assert not pid_alive(None) and not pid_alive(0) and not pid_alive(-1)
    assert pid_alive(os.getpid())
