"""What every Dask worker of an sshwasm pool loads (`dask worker --preload FILE`).

This file is copied to each host by `sshwasm pool up` (as `<workdir>/dask/sshwasm_preload.py`)
and runs in the host's Python beside `distributed`, so it imports nothing from sshwasm: only
the standard library and distributed.

It registers the `sshwasm-runner` worker plugin. The plugin does not run guests in the
worker's own process: it keeps one `serve` child of the host's unmodified runner (the runner
that `sshwasm hosts install` and `pool up` put in `<workdir>/bin`), the same program the SSH
engine's arrays use, so memory and time limits, cancel and `result.json` on the host's disk
work as they do there, and a guest that crashes cannot take the worker down. When the worker
stops (or its nanny kills it), the plugin ends that child and its process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN_NAME = "sshwasm-runner"
# Set by `pool up`'s launcher for the worker: the host's sshwasm workdir (absolute).
WORKDIR_VARIABLE = "SSHWASM_WORKDIR"
RUNNER_PACKAGE = "sshwasm_exec"


def runner_home(workdir: str) -> str:
    """The directory of the current runner version (`<workdir>/bin/<version>`)."""
    with open(os.path.join(workdir, "bin", "current")) as pointer:
        version = pointer.read().strip()
    return os.path.join(workdir, "bin", version)


class RunnerPlugin(WorkerPlugin):
    """The worker's link to the host's runner: a `serve` child started on first use."""

    name = PLUGIN_NAME

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.worker: Any = None
        self.lock = threading.Lock()
        self.serve: subprocess.Popen[bytes] | None = None

    def setup(self, worker: Any) -> None:
        self.worker = worker

    def serve_process(self) -> subprocess.Popen[bytes]:
        """The running `serve` child, started (in its own process group) when needed."""
        with self.lock:
            if self.serve is not None and self.serve.poll() is None:
                return self.serve
            home = runner_home(self.workdir)
            code = (
                "import sys; sys.path.insert(0, sys.argv[1]); "
                f"from {RUNNER_PACKAGE}.commands import main; sys.exit(main(sys.argv[2:]))"
            )
            self.serve = subprocess.Popen(
                [sys.executable, "-c", code, home, "serve", self.workdir],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            return self.serve

    def teardown(self, worker: Any) -> None:
        with self.lock:
            serve, self.serve = self.serve, None
        if serve is None or serve.poll() is not None:
            return
        with contextlib.suppress(OSError):
            os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


async def dask_setup(worker: Any) -> None:
    """Called by distributed once the worker has started."""
    workdir = os.environ.get(WORKDIR_VARIABLE) or os.path.expanduser("~/.sshwasm")
    await worker.plugin_add(RunnerPlugin(workdir), name=PLUGIN_NAME)
