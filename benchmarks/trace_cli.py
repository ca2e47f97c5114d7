"""Run the sshwasm CLI in this process with wall-clock stamps on its phases (for warm_run.py).

    python benchmarks/trace_cli.py OUT.json run tiny.rs ...   (any cwd)

It wraps, without changing any file of the package, the functions a `run` passes through
(cluster loading, build, the jobs file, the SSH connection, the runner's frames) and writes
`{"marks": {name: time}, "spans": [[name, start, end], ...], "status": N}` to OUT.json,
times from `time.time()` so the parent can line them up with its own clock. Modules the
CLI would import lazily are imported up front (and timed) so they can be wrapped; asyncssh
stays lazy and its import is timed inside the connect span.
"""

from __future__ import annotations

import time

_CHILD_START = time.time()

import sys  # noqa: E402 - the first stamp must come before any import

# Run as a file, this directory comes first on sys.path, where array.py would shadow the
# standard library's `array` (which `socket`, hence asyncssh, imports).
_HERE = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path[:] = [entry for entry in sys.path if entry not in (_HERE, "")]

import functools  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

MARKS: dict[str, float] = {"child_start": _CHILD_START}
SPANS: list[tuple[str, float, float]] = []


def mark(name: str) -> None:
    """Stamp `name` now, once (the first time wins)."""
    MARKS.setdefault(name, time.time())


def _wrapped(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def async_span(*args: Any, **kwargs: Any) -> Any:
            began = time.time()
            try:
                return await function(*args, **kwargs)
            finally:
                SPANS.append((name, began, time.time()))

        return async_span

    @functools.wraps(function)
    def span(*args: Any, **kwargs: Any) -> Any:
        began = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            SPANS.append((name, began, time.time()))

    return span


def wrap(owner: Any, attribute: str, name: str) -> None:
    """Replace `owner.attribute` by a version that records a span called `name`.

    A function that no longer exists is skipped (its phase then reads n/a), so the trace
    survives refactoring of the package.
    """
    function = getattr(owner, attribute, None)
    if function is None:
        print(f"trace_cli: no {owner.__name__}.{attribute} to trace", file=sys.stderr)
        return
    setattr(owner, attribute, _wrapped(name, function))


def install() -> None:
    """Import the CLI's modules (timed) and wrap the functions a `run` goes through."""
    began = time.time()
    import sshwasm.cli

    mark("imported_cli")
    SPANS.append(("import sshwasm.cli", began, MARKS["imported_cli"]))
    began = time.time()
    # The CLI imports the modules of `run` and of following jobs only when `run` starts.
    import sshwasm.cli.coordinate
    import sshwasm.cli.run
    from sshwasm import build, cluster, coordinator, runner_client, store, transport
    from sshwasm.runner import protocol

    SPANS.append(("import build/store/coordinator/transport (lazy in the CLI)", began, time.time()))

    wrap(cluster, "load_cluster", "load cluster file")
    wrap(build, "build", "build (cache lookup)")
    wrap(store.JobStore, "__init__", "open jobs file")
    for submit in ("submit", "submit_tasks"):
        if hasattr(store.JobStore, submit):
            wrap(store.JobStore, submit, "store.submit")
    wrap(store.JobStore, "place_waiting", "store.place_waiting")
    wrap(store.JobStore, "update", "store.update")
    wrap(store.JobStore, "finish", "store.finish")
    wrap(sshwasm.cli.coordinate, "coordinate_jobs", "cli coordinate_jobs (event loop)")
    wrap(coordinator.Coordinator, "drive", "Coordinator.drive")
    wrap(runner_client.RunnerClient, "launch", "RunnerClient.launch (remote command)")
    wrap(transport.TransportPool, "close", "close connections")
    wrap(transport._SshProcess, "finish", "channel exit status")

    original_connect = transport.SshTransport.connect

    async def connect(self: Any) -> None:
        began = time.time()
        import asyncssh  # noqa: F401 - timed here: the CLI imports it on first connect

        imported = time.time()
        SPANS.append(("import asyncssh", began, imported))
        await original_connect(self)
        SPANS.append(("ssh connect (tcp + kex + auth)", imported, time.time()))

    transport.SshTransport.connect = connect  # type: ignore[method-assign]

    wrap(transport.SshTransport, "_open", "open channel + exec request")

    # Through the connection process (sshwasm.mux): its own connect and open, same names for
    # the open so that warm_run's remote phases are measured from it either way.
    from sshwasm.mux import client as mux_client

    wrap(mux_client.MuxTransport, "connect", "connection process: connect request")
    wrap(mux_client.MuxTransport, "_open", "open channel + exec request")
    original_launch_warm = mux_client.MuxTransport.launch_warm

    async def launch_warm(self: Any, job_id: str) -> Any:
        began = time.time()
        process = await original_launch_warm(self, job_id)
        if process is not None:  # else the job is launched as a command: the spans above
            SPANS.append(("warm serve: launch request", began, time.time()))
        return process

    mux_client.MuxTransport.launch_warm = launch_warm  # type: ignore[method-assign]

    original_feed = protocol.FrameDecoder.feed

    def feed(self: Any, data: bytes) -> list[tuple[bytes, bytes]]:
        frames: list[tuple[bytes, bytes]] = original_feed(self, data)
        for kind, _payload in frames:
            mark(f"first frame {kind.decode()}")
        return frames

    protocol.FrameDecoder.feed = feed  # type: ignore[method-assign]


def main() -> None:
    """Trace one CLI invocation; exit with its status."""
    out_path, args = sys.argv[1], sys.argv[2:]
    install()
    import sshwasm.cli

    mark("main_start")
    status = 1
    try:
        status = sshwasm.cli.main(args)
    finally:
        mark("main_end")
        with open(out_path, "w") as out:
            json.dump({"marks": MARKS, "spans": SPANS, "status": status}, out)
    sys.exit(status)


if __name__ == "__main__":
    main()
