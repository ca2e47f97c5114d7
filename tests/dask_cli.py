"""The command line run in the test's own process, for the dask tests (tests/test_dask_*.py).

A separate `sshwasm` process pays its interpreter's start and the import of `distributed`
(seconds under load) and proves nothing more where the test is about the pool: a test that
polls `jobs` spent most of its time importing. A process of its own stays where it matters
(a client killed mid-run, a coordinator that must outlive the command).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import subprocess
import sys
import threading
from typing import Any

from sshwasm.cli import main

# A command run in this process that has not returned by then fails its test with every
# thread's stack, rather than stall the suite (a separate process would have a timeout).
RUN_LIMIT_S = 300.0


def run_in_process(*args: str, timeout: float = 0) -> subprocess.CompletedProcess[str]:
    """The command line in this process (`main`), as `helpers.sshwasm` gives it. `timeout`
    is the subprocess's: unused (RUN_LIMIT_S)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    ended: dict[str, Any] = {}

    def call() -> None:
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                ended["status"] = main(list(args))
        except BaseException as exc:  # raised again in the test's thread
            ended["error"] = exc

    thread = threading.Thread(target=call, name=f"sshwasm {args[-1]}", daemon=True)
    thread.start()
    thread.join(RUN_LIMIT_S)
    if thread.is_alive():
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        raise AssertionError(f"sshwasm {' '.join(args)} has not returned in {RUN_LIMIT_S:.0f} s")
    if "error" in ended:
        raise ended["error"]
    return subprocess.CompletedProcess(list(args), int(ended["status"]), _text(out), _text(err))


def _text(stream: io.TextIOWrapper) -> str:
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode()


# Test only: the pool's processes spend less of a machine the whole suite shares on
# themselves (no statistical profiler sampling every 10 ms, a slower system monitor and
# event-loop tick), and give up sooner on a peer that is gone (`pool down` stops all at once).
DASK_TEST_CONFIG = """\
distributed:
  worker:
    profile:
      enabled: false
  admin:
    tick:
      interval: 200ms
    system-monitor:
      interval: 2s
  comm:
    timeouts:
      connect: 5s
"""
