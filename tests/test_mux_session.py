"""An array session relayed to a warm serve (sshwasm/mux/session.py), against a scripted
serve (no host): the launches of one read go to serve in one write, every task's frames come
back keyed, EOF waits for the tasks sent, a duplicate key is refused without reaching serve,
and a client too far behind ends the session (null status) instead of being held in memory."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from sshwasm.mux import session as session_module
from sshwasm.mux import wire
from sshwasm.mux.session import Session
from sshwasm.mux.warm import Route
from sshwasm.runner.protocol import (
    KIND_ERROR,
    KIND_LAUNCH,
    KIND_RESULT,
    KIND_STARTED,
    FrameDecoder,
    encode_frame,
)


class ScriptedWarm:
    """What Session asks of a WarmServe: its routes, send, drop."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.writes: list[list[tuple[bytes, bytes]]] = []
        self.alive = True

    async def send(self, frames: bytes) -> bool:
        self.writes.append(FrameDecoder().feed(frames))
        return self.alive

    def drop(self, key: str, route: Route) -> None:
        route.close()
        if self.routes.get(key) is route:
            del self.routes[key]

    def answer(self, key: str, kind: bytes, body: bytes) -> None:
        """serve's frame about a task, as WarmServe._dispatch hands it on."""
        route = self.routes.get(key)
        if route is None:
            return
        if kind in (KIND_RESULT, KIND_ERROR):
            del self.routes[key]
        route.offer(kind, body)


def launch(key: str) -> bytes:
    return encode_frame(KIND_LAUNCH, json.dumps({"key": key}).encode() + b"\n")


async def relay() -> tuple[ScriptedWarm, asyncio.Task[None], Any, Any]:
    """A session over a socket pair: (warm, the relay's task, client reader, client writer)."""
    ours, theirs = socket.socketpair()
    warm = ScriptedWarm()
    relay_reader, relay_writer = await asyncio.open_unix_connection(sock=ours)
    client_reader, client_writer = await asyncio.open_unix_connection(sock=theirs)
    session = Session(warm, relay_writer)  # type: ignore[arg-type]
    return warm, asyncio.ensure_future(session.run(relay_reader)), client_reader, client_writer


async def frames_until_exit(reader: asyncio.StreamReader) -> tuple[list[tuple[bytes, bytes]], Any]:
    """serve's frames the client got, and the session's exit status."""
    decoder = FrameDecoder()
    got: list[tuple[bytes, bytes]] = []
    while True:
        frame = await asyncio.wait_for(wire.read_frame(reader), 10)
        assert frame is not None, "the stream ended without an exit frame"
        kind, payload = frame
        if kind == wire.STDOUT:
            got += decoder.feed(payload)
        elif kind == wire.EXIT:
            return got, json.loads(payload)["status"]


def test_tasks_go_out_together_come_back_keyed_and_eof_waits_for_them() -> None:
    async def scenario() -> None:
        warm, relayed, reader, writer = await relay()
        wire.write_frame(writer, wire.STDIN, launch("7") + launch("8") + launch("7"))
        await writer.drain()
        await asyncio.sleep(0.05)
        # One write to serve for both, the second "7" refused as serve would (never sent).
        assert [[kind for kind, _ in write] for write in warm.writes] == [[b"L", b"L"]]
        assert sorted(warm.routes) == ["7", "8"]
        wire.write_frame(writer, wire.STDIN_EOF)
        await writer.drain()
        warm.answer("7", KIND_STARTED, b"{}")
        warm.answer("7", KIND_RESULT, b'{"state": "succeeded"}')
        await asyncio.sleep(0.05)
        assert not relayed.done()  # "8" is still running: EOF waits for it
        warm.answer("8", KIND_RESULT, b'{"state": "failed"}')
        got, status = await frames_until_exit(reader)
        assert status == 0
        assert (got[0][0], got[0][1][:2]) == (KIND_ERROR, b"7\n")  # the refused duplicate
        assert got[1:] == [
            (KIND_STARTED, b"7\n{}"),
            (KIND_RESULT, b'7\n{"state": "succeeded"}'),
            (KIND_RESULT, b'8\n{"state": "failed"}'),
        ]
        await asyncio.wait_for(relayed, 5)
        writer.close()

    asyncio.run(scenario())


def test_a_client_too_far_behind_ends_the_session_and_its_tasks_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "SESSION_QUEUE_BYTES", 1000)

    async def scenario() -> None:
        warm, relayed, reader, writer = await relay()
        wire.write_frame(writer, wire.STDIN, launch("1") + launch("2"))
        await writer.drain()
        await asyncio.sleep(0.05)
        route = warm.routes["2"]
        # Before the relay's pump runs once: more than the session may hold for its client.
        for _ in range(5):
            warm.answer("1", b"O", b"x" * 300)
        assert route.closed and not warm.routes  # its tasks run on; their frames go nowhere
        # Told at once, though it sent no EOF: it waits for its tasks' frames otherwise.
        got, status = await frames_until_exit(reader)
        assert status is None  # the client follows its tasks with attach
        assert sum(len(payload) for _, payload in got) <= 1000
        await asyncio.wait_for(relayed, 5)
        writer.close()

    asyncio.run(scenario())


def test_serve_lost_on_sending_ends_the_session() -> None:
    async def scenario() -> None:
        warm, relayed, reader, writer = await relay()
        warm.alive = False
        wire.write_frame(writer, wire.STDIN, launch("3"))
        wire.write_frame(writer, wire.STDIN_EOF)
        await writer.drain()
        got, status = await frames_until_exit(reader)
        assert (got, status) == ([], None)
        assert not warm.routes
        await asyncio.wait_for(relayed, 5)
        writer.close()

    asyncio.run(scenario())
