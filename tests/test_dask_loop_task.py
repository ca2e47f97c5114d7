"""engine: dask, a job's task in the worker's event loop (issue 12 throughput), without a pool.

A plain job's task is `sshwasm_run`, a coroutine function Dask awaits in the worker's event
loop: no thread of the worker's pool is woken per task, and serve's answers are read by a
callback of that loop, not by a thread of their own. A task of a limited array or with
dependencies still runs in a thread (`sshwasm_job`, `sshwasm_flow_job`), on the same serve.
Held here against a stand-in `serve` (the real frame protocol, no guests): both kinds of
caller at once, each getting its own frames; a serve that dies under its tasks; a worker
that stops (Reschedule).
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from distributed import Reschedule
from distributed.utils import iscoroutinefunction

import sshwasm.runner.protocol as runner_protocol
from sshwasm.engines import dask_engine, dask_preload

# The stand-in runner's `serve`: greets, then answers each L frame with O and R frames (the
# job's argv echoed), except a job whose first argument is "hang" (no answer) or "die"
# (serve exits at once, leaving every task unanswered).
FAKE_COMMANDS = """
import json, os, sys
from . import protocol as p

def main(argv):
    out = sys.stdout.buffer
    decoder = p.FrameDecoder()
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return 0
        for kind, payload in decoder.feed(chunk):
            if kind == p.KIND_HELLO:
                hello = {"pid": os.getpid(), "wasmtime_version": "0", "error": None}
                out.write(p.encode_frame(p.KIND_HELLO, json.dumps(hello).encode()))
            elif kind == p.KIND_LAUNCH:
                header = json.loads(payload.partition(b"\\n")[0])
                key, word = header["key"].encode(), header["argv"][0]
                if word == "die":
                    os._exit(3)
                if word == "hang":
                    continue
                out.write(p.encode_frame(p.KIND_STDOUT, key + b"\\n" + word.encode()))
                result = {"state": "succeeded", "exit_code": 0}
                out.write(p.encode_frame(p.KIND_RESULT, key + b"\\n" + json.dumps(result).encode()))
        out.flush()
"""


class _Worker:
    """What the plugin uses of a Dask worker: its name and event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.name = "alpha"
        self.loop = self
        self.asyncio_loop = loop
        self.events: list[Any] = []

    def add_callback(self, callback: Any) -> None:
        self.asyncio_loop.call_soon_threadsafe(callback)

    def call_later(self, delay: float, callback: Any) -> None:
        self.asyncio_loop.call_later(delay, callback)

    def log_event(self, topic: str, message: Any) -> None:
        self.events.append((topic, message))


def _workdir(tmp_path: Path) -> Path:
    """A host workdir whose current runner is the stand-in."""
    workdir = tmp_path / "workdir"
    package = workdir / "bin" / "0" / dask_preload.RUNNER_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(runner_protocol.__file__, package / "protocol.py")
    (package / "commands.py").write_text(FAKE_COMMANDS)
    (workdir / "bin" / "current").write_text("0\n")
    return workdir


def _payload(index: int, word: str) -> bytes:
    header = {"key": f"job{index}", "argv": [word], "wasm_sha256": "0" * 64}
    return json.dumps(header).encode() + b"\n"


def _frames(answer: bytes) -> tuple[dict[str, Any], list[tuple[bytes, bytes]]]:
    head, _, body = answer.partition(b"\n")
    return json.loads(head), runner_protocol.FrameDecoder().feed(body)


def test_the_loop_task_goes_by_reference_and_is_awaited(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's task function of a plain job pickles as a name, and Dask takes it for a
    coroutine function on both sides: here (its mark) and on the worker (the real one)."""
    task = dask_engine._async_task_function()
    data = pickle.dumps(task, protocol=5)
    assert b"sshwasm_run" in data and len(data) < 200
    monkeypatch.setitem(sys.modules, dask_engine.TASK_MODULE, dask_preload)
    assert pickle.loads(data) is dask_preload.sshwasm_run
    assert iscoroutinefunction(task) and iscoroutinefunction(dask_preload.sshwasm_run)
    assert not iscoroutinefunction(dask_engine._task_function())


def test_loop_and_thread_tasks_share_serve(tmp_path: Path) -> None:
    """Tasks in the event loop and in threads at once, on one serve: each its own frames;
    a serve that dies under its tasks fails them (ServeLost) and the next task starts a
    new one; a worker that stops reschedules what ran."""
    workdir = _workdir(tmp_path)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        worker = _Worker(loop)
        plugin = dask_preload.RunnerPlugin(str(workdir))
        plugin.setup(worker)
        # 40 tasks in the loop, 6 from threads (as a flow task runs), interleaved.
        threaded: dict[int, bytes] = {}

        def in_thread(index: int) -> None:
            threaded[index] = plugin.run(_payload(index, f"t{index}"), b"")

        threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(100, 106)]
        for thread in threads:
            thread.start()
        answers = await asyncio.wait_for(
            asyncio.gather(*(plugin.run_async(_payload(i, f"w{i}"), b"") for i in range(40))),
            30,
        )
        await asyncio.to_thread(lambda: [thread.join(30) for thread in threads])
        for index, answer in [*enumerate(answers), *threaded.items()]:
            head, frames = _frames(answer)
            assert head["host"] == "alpha" and head["state"] == "succeeded", head
            assert head["key"].startswith(f"job{index}.alpha-{os.getpid()}-")
            word = f"w{index}" if index < 100 else f"t{index}"
            assert frames[0] == (b"O", word.encode()), frames
            assert frames[-1][0] == b"R"
        assert not plugin.waiting and not plugin.runs

        # serve dies under a waiting task: it fails (not answered), the next one runs.
        hanging = asyncio.ensure_future(plugin.run_async(_payload(200, "hang"), b""))
        await asyncio.sleep(0.2)
        with pytest.raises(dask_preload.ServeLost):
            await asyncio.wait_for(plugin.run_async(_payload(201, "die"), b""), 30)
        with pytest.raises(dask_preload.ServeLost):
            await asyncio.wait_for(hanging, 30)
        again = await asyncio.wait_for(plugin.run_async(_payload(202, "again"), b""), 30)
        assert _frames(again)[1][0] == (b"O", b"again")

        # The worker stops while a task runs: rescheduled, not failed.
        hanging = asyncio.ensure_future(plugin.run_async(_payload(203, "hang"), b""))
        await asyncio.sleep(0.2)
        serve = plugin.serve
        assert serve is not None
        await asyncio.to_thread(plugin.teardown, worker)
        with pytest.raises(Reschedule):
            await asyncio.wait_for(hanging, 30)
        assert serve.poll() is not None
        with pytest.raises(ProcessLookupError):
            os.kill(serve.pid, signal.SIGKILL)

    asyncio.run(scenario())
