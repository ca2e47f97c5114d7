"""An array's serve session on the connection's warm serve: the tasks of a `run --array`
handed to a `serve` that outlives the command, the way ControlPersist keeps a connection.

An array's coordinator used to start its own `serve` per host (`runner_client.ServeSession`):
the host then paid, every run, an interpreter start and `import wasmtime` (0.1-0.25 s), a
module load and the fork of each executor, all before the first task could start. A
`session` request instead relays the coordinator's L frames to the connection's warm serve
(`warm.WarmServe`, started for the session if the connection has none) and serve's keyed
frames about those tasks back, so the next array finds serve running with wasmtime
imported, the module loaded and its executors forked.

Each task still runs detached in its own job directory and its result is on the host's
disk before serve reports it; what the relay cannot carry ends the session, never a task:
serve lost, or a client more than SESSION_QUEUE_BYTES behind (its frames are not held
here), closes the client's stream without an exit status, and the coordinator follows each
task it still waits for with `attach`, as after a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field

from ..runner.jobdir import JOB_ID_RE
from ..runner.protocol import (
    KIND_ERROR,
    KIND_LAUNCH,
    SERVE_MAX_REQUEST_BYTES,
    FrameDecoder,
    FrameError,
    encode_frame,
)
from . import wire
from .warm import FINAL_KINDS, Route, WarmServe

# Bytes of serve's frames held for a session's client at most (a burst of tasks ending
# together, each with a little output, is far less); past that the session ends (above).
SESSION_QUEUE_BYTES = 8 << 20


@dataclass
class SessionRoute(Route):
    """One task of a session: its frames go, keyed, to the session's one stream."""

    session: Session | None = None
    key: str = ""

    def offer(self, kind: bytes, body: bytes) -> None:
        if self.session is not None and not self.closed:
            self.session.offer(self.key, kind, body)

    def lost(self) -> None:
        if self.session is not None and not self.closed:
            self.session.end()


@dataclass
class Session:
    """One client's array tasks on a warm serve (see the module)."""

    warm: WarmServe
    writer: asyncio.StreamWriter
    routes: dict[str, SessionRoute] = field(default_factory=dict)
    ended: bool = False  # serve lost, or the client too far behind: no more frames
    _out: list[bytes] = field(default_factory=list)
    _out_bytes: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)  # frames queued: the pump
    _changed: asyncio.Event = field(default_factory=asyncio.Event)  # a task answered, or end

    def offer(self, key: str, kind: bytes, body: bytes) -> None:
        """Queue one of serve's frames about a task of ours (keyed, as serve sent it)."""
        if self.ended:
            return
        if kind in FINAL_KINDS:
            self.routes.pop(key, None)
            self._changed.set()
        self._queue(key, kind, body)

    def _queue(self, key: str, kind: bytes, body: bytes) -> None:
        if self.ended:
            return
        frame = encode_frame(kind, key.encode() + b"\n" + body)
        self._out_bytes += len(frame)
        if self._out_bytes > SESSION_QUEUE_BYTES:
            self.end()
            return
        self._out.append(frame)
        self._wake.set()

    def end(self) -> None:
        """No more frames for the client: its tasks are followed with attach instead."""
        if self.ended:
            return
        self.ended = True
        for key, route in list(self.routes.items()):
            self.warm.drop(key, route)
        self.routes.clear()
        self._out.clear()
        self._wake.set()
        self._changed.set()

    async def run(self, reader: asyncio.StreamReader) -> None:
        """Relay until the client said EOF and every task of its was answered, or until the
        session ends (serve lost, client behind) or the client goes away."""
        pumping = asyncio.ensure_future(self._pump())
        feeding = asyncio.ensure_future(self._feed(reader))
        gone: asyncio.Future[bytes] | None = None
        try:
            while not self.ended:
                self._changed.clear()
                if feeding.done():
                    if not feeding.result():
                        return  # the client went away
                    if not self.routes:
                        break  # EOF, and every task sent was answered
                    if gone is None:
                        # After EOF, the client's end closing means it left.
                        gone = asyncio.ensure_future(reader.read(1))
                    elif gone.done():
                        return
                waiting = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({waiting, gone or feeding}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
            # Ended (serve lost, client behind) or done: the exit frame says which.
            while self._out and not pumping.done():
                await asyncio.sleep(0)  # the pump writes what is left
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await pumping
            status = None if self.ended or self.routes else 0
            wire.write_frame(self.writer, wire.STDERR, b"")
            wire.write_frame(self.writer, wire.EXIT, json.dumps({"status": status}).encode())
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.drain()
        finally:
            for task in (feeding, gone, pumping):
                if task is not None:
                    task.cancel()
            self.end()  # a client gone: serve's frames about its tasks are dropped

    async def _pump(self) -> None:
        """Write the queued frames to the client, all that came since the last write in one."""
        while not self.ended:
            await self._wake.wait()
            self._wake.clear()
            if not self._out:
                continue
            data = b"".join(self._out)
            self._out.clear()
            wire.write_frame(self.writer, wire.STDOUT, data)
            await self.writer.drain()
            self._out_bytes -= len(data)

    async def _feed(self, reader: asyncio.StreamReader) -> bool:
        """Hand the client's L frames to serve, those of one read in one write; True at
        the client's EOF, False if it went away (or broke the protocol)."""
        decoder = FrameDecoder(SERVE_MAX_REQUEST_BYTES)
        while True:
            frame = await wire.read_frame(reader)
            if frame is None or frame[0] not in (wire.STDIN, wire.STDIN_EOF):
                return False
            if frame[0] == wire.STDIN_EOF:
                return True
            try:
                frames = decoder.feed(frame[1])
            except FrameError:
                return False
            launches = []
            for kind, payload in frames:
                if kind != KIND_LAUNCH:
                    return False
                key = _key_of(payload)
                if key is None or key in self.warm.routes:
                    # As serve answers a launch it cannot take (nothing was started).
                    reason = "invalid key" if key is None else "a task of this key runs"
                    answer = {"error": f"serve session: {reason}", "kind": "spec"}
                    self._queue(key or "", KIND_ERROR, json.dumps(answer).encode())
                    continue
                route = SessionRoute(session=self, key=key)
                self.warm.routes[key] = self.routes[key] = route
                launches.append(encode_frame(KIND_LAUNCH, payload))
            if launches and not await self.warm.send(b"".join(launches)):
                self.end()  # serve is gone: its tasks are followed with attach


def _key_of(payload: bytes) -> str | None:
    """The job key of an L frame (its spec line's `key`), if it is a valid one."""
    try:
        spec = json.loads(payload.partition(b"\n")[0])
    except ValueError:
        return None
    key = spec.get("key") if isinstance(spec, dict) else None
    return key if isinstance(key, str) and JOB_ID_RE.fullmatch(key) else None
