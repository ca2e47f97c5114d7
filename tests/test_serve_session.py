"""ServeSession against a scripted serve (no host): the launches of tasks started together
go out in one write, every task gets its own answer, and a write that fails fails each
task whose launch it carried."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sshwasm.cluster import Host
from sshwasm.runner.jobdir import _make_result
from sshwasm.runner.protocol import (
    KIND_HELLO,
    KIND_RESULT,
    KIND_STARTED,
    KIND_STDOUT,
    FrameDecoder,
    encode_frame,
)
from sshwasm.runner_client import ServeSession
from sshwasm.transport import Completed, RunnerProcess

HOST = Host(name="solo", address="127.0.0.1", cpus=4, memory_mb=1024, workdir="/nowhere")


class ScriptedServe(RunnerProcess):
    """Answers the hello, then each L frame with S, O and R frames (all in one read)."""

    def __init__(self, fail_launches: bool = False) -> None:
        self.writes: list[bytes] = []
        self.fail_launches = fail_launches
        self._decoder = FrameDecoder()
        self._replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def send(self, data: bytes, *, close: bool = True) -> None:
        frames = self._decoder.feed(data)
        if frames and frames[0][0] == b"L":
            if self.fail_launches:
                raise ConnectionResetError("the channel went away")
            self.writes.append(data)
        reply = b""
        for kind, payload in frames:
            if kind == KIND_HELLO:
                hello = {"pid": 4242, "wasmtime_version": "1", "error": None}
                reply += encode_frame(KIND_HELLO, json.dumps(hello).encode())
                continue
            key = json.loads(payload.partition(b"\n")[0])["key"].encode() + b"\n"
            reply += encode_frame(KIND_STARTED, key + b'{"pid": 4243, "job_dir": "/x"}')
            reply += encode_frame(KIND_STDOUT, key + b"out of " + key)
            reply += encode_frame(KIND_RESULT, key + _make_result("succeeded", 0, None))
        if reply:
            self._replies.put_nowait(reply)

    async def read(self, size: int = 65536) -> bytes:
        return await self._replies.get()

    async def finish(self) -> Completed:
        return Completed(0, b"", b"")

    def abort(self) -> None:
        self._replies.put_nowait(b"")


class ScriptedTransport:
    """What ServeSession asks of a transport: the host and one serve process."""

    def __init__(self, process: ScriptedServe) -> None:
        self.host = HOST
        self.process = process
        self.runner_sent = True

    async def start_runner(self, argv: list[str]) -> RunnerProcess:
        assert argv == ["serve", HOST.workdir]
        return self.process

    async def serve_session(self) -> RunnerProcess | None:
        return None  # no connection process: the session starts its own serve


def launch_payload(key: str) -> bytes:
    return json.dumps({"key": key}).encode() + b"\n"


async def run_tasks(session: ServeSession, keys: list[str]) -> list[Any]:
    outputs: dict[str, list[bytes]] = {key: [] for key in keys}
    outcomes = await asyncio.gather(
        *(
            session.run_task(key, launch_payload(key), outputs[key].append, lambda _: None)
            for key in keys
        ),
        return_exceptions=True,
    )
    return [(outcome, b"".join(outputs[key])) for key, outcome in zip(keys, outcomes, strict=True)]


def test_launches_started_together_go_out_in_one_write_and_each_task_gets_its_answer() -> None:
    serve = ScriptedServe()
    session = ServeSession(ScriptedTransport(serve))  # type: ignore[arg-type]
    keys = [f"{n}-k" for n in range(1, 6)]

    async def started_then_together() -> list[Any]:
        await run_tasks(session, ["0-start"])  # the session's first task starts serve
        return await run_tasks(session, keys)

    answers = asyncio.run(started_then_together())
    assert len(serve.writes) == 2
    assert len(FrameDecoder().feed(serve.writes[1])) == len(keys)
    for key, (outcome, stdout) in zip(keys, answers, strict=True):
        assert outcome.result["state"] == "succeeded" and outcome.pid == 4243
        assert stdout == f"out of {key}\n".encode()


def test_a_failed_write_fails_every_task_it_carried() -> None:
    serve = ScriptedServe(fail_launches=True)
    session = ServeSession(ScriptedTransport(serve))  # type: ignore[arg-type]
    answers = asyncio.run(run_tasks(session, ["1-a", "2-b", "3-c"]))
    for outcome, stdout in answers:
        assert isinstance(outcome, ConnectionResetError) and stdout == b""


@pytest.mark.parametrize("count", [1, 3])
def test_later_launches_still_go_out_after_a_batch(count: int) -> None:
    serve = ScriptedServe()
    session = ServeSession(ScriptedTransport(serve))  # type: ignore[arg-type]

    async def twice() -> list[Any]:
        first = await run_tasks(session, [f"{n}-x" for n in range(1, count + 1)])
        second = await run_tasks(session, [f"{n}-y" for n in range(11, 11 + count)])
        return first + second

    answers = asyncio.run(twice())
    assert len(serve.writes) == 2
    assert all(outcome.result["state"] == "succeeded" for outcome, _ in answers)


class SlowToExit(ScriptedServe):
    """A serve whose exit (its interpreter's teardown, the channel's close) is slow."""

    def __init__(self) -> None:
        super().__init__()
        self.closed_stdin = False
        self.aborted = False

    async def send(self, data: bytes, *, close: bool = True) -> None:
        self.closed_stdin = self.closed_stdin or close
        await super().send(data, close=close)

    async def finish(self) -> Completed:
        await asyncio.sleep(3)
        return Completed(0, b"", b"")

    def abort(self) -> None:
        self.aborted = True
        super().abort()


def test_close_with_no_task_left_sends_eof_and_does_not_wait_for_serve_to_exit() -> None:
    """Every task was answered: the run's end does not wait for serve's exit (EOF ends it
    on the host); the channel is let go."""
    serve = SlowToExit()
    session = ServeSession(ScriptedTransport(serve))  # type: ignore[arg-type]

    async def run_then_close() -> list[Any]:
        answers = await run_tasks(session, ["1-a", "2-b"])
        await asyncio.wait_for(session.close(), 2.0)
        return answers

    answers = asyncio.run(run_then_close())
    assert all(outcome.result["state"] == "succeeded" for outcome, _ in answers)
    assert serve.closed_stdin and serve.aborted
