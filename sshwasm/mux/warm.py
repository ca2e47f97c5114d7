"""A warm `serve` per connection: single jobs launched as L frames, not as a new command.

A job launched on its own costs the host a runner start (login shell or spare, interpreter,
imports) and an executor that imports wasmtime and loads the module: about 150 ms of a warm
`sshwasm run`. The connection process instead keeps one `sshwasm-exec serve` per connection
(the array path: runner/serve.py, pre-forked executors that already imported wasmtime and
keep the module loaded) and hands it each single job as an L frame keyed by the job's id.

Each job still runs detached in its own job directory and its result is on the host's disk
before serve reports it, so a relay lost on the way is re-attached like a dropped
connection. A warm serve is started in the background the first time a job finds none (that
job launches as before), replaced when a client brings another runner version (a new
install), and ends with its connection (idle exit): EOF on its stdin lets it finish what
runs and exit, and its idle executors with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field

from ..runner.protocol import (
    KIND_ERROR,
    KIND_HELLO,
    KIND_LAUNCH,
    KIND_NEED,
    KIND_RESULT,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    parse_frame_json,
)
from ..transport import RunnerProcess, SshTransport

# How long serve may take to answer its hello (its interpreter start and `import wasmtime`).
START_TIMEOUT_S = 60.0
# After these serve says nothing more about a job (runner_client.FINAL_KINDS).
FINAL_KINDS = (KIND_RESULT, KIND_NEED, KIND_ERROR)
# Bytes of frames (its output, mostly) queued for one job's client at most. A client that falls
# further behind (its reader is slow: `sshwasm run ... | less`) neither holds up serve's
# channel, which every job of the host shares, nor grows this process's memory: its route
# overflows, serve's later frames about the job are dropped (they are on the host's disk),
# and the relay follows the job with `attach` from the bytes it relayed, on a channel of its
# own whose SSH window paces the host's sending to the reader (server.relay_route).
ROUTE_QUEUE_BYTES = 1 << 20
# Put on a route in place of the frames it had no room for.
OVERFLOW = (b"", b"")
# Held here: the reader of a serve already replaced still delivers its running jobs' frames.
_READERS: set[asyncio.Future[None]] = set()


class WarmUnavailable(Exception):
    """serve could not be started or said no to its hello; `str()` says why."""

    def __init__(self, reason: str, *, need_runner: bool = False) -> None:
        super().__init__(reason)
        self.need_runner = need_runner


@dataclass
class Route:
    """One job's frames on their way to its client: (kind, body), then None if serve is lost,
    or OVERFLOW (and nothing after it) once its client fell ROUTE_QUEUE_BYTES behind.

    Never waited on by serve's reader: a route takes a frame or drops it at once.
    """

    frames: asyncio.Queue[tuple[bytes, bytes] | None] = field(default_factory=asyncio.Queue)
    closed: bool = False
    overflowed: bool = False
    queued_bytes: int = 0

    def offer(self, kind: bytes, body: bytes) -> None:
        """Queue a frame, unless the client went away or is too far behind."""
        if self.closed or self.overflowed:
            return
        if self.queued_bytes + len(body) > ROUTE_QUEUE_BYTES:
            self.overflowed = True
            self.frames.put_nowait(OVERFLOW)
            return
        self.queued_bytes += len(body)
        self.frames.put_nowait((kind, body))

    async def take(self) -> tuple[bytes, bytes] | None:
        """The next frame (see the class)."""
        item = await self.frames.get()
        if item is not None:
            self.queued_bytes -= len(item[1])
        return item

    def lost(self) -> None:
        """serve is gone: None after what the client has yet to take."""
        if not self.closed and not self.overflowed:
            self.frames.put_nowait(None)

    def close(self) -> None:
        """The client went away: what is queued is dropped, and so is what comes."""
        self.closed = True
        while not self.frames.empty():
            self.frames.get_nowait()
        self.queued_bytes = 0


class WarmServe:
    """One `sshwasm-exec serve` on a connection, started for one runner version."""

    def __init__(self, transport: SshTransport, version: str) -> None:
        self.transport = transport
        self.version = version
        self.routes: dict[str, Route] = {}
        self.broken = False
        self._process: RunnerProcess | None = None

    @property
    def ready(self) -> bool:
        """Whether a job may be handed to it now."""
        return self._process is not None and not self.broken

    async def start(self) -> None:
        """Start serve and say hello with the client's runner version; WarmUnavailable if
        it cannot take jobs (the host has another runner, no wasmtime, an unsafe workdir)."""
        process = await self.transport.start_runner(["serve", self.transport.host.workdir])
        try:
            hello = json.dumps({"runner_version": self.version}).encode()
            await process.send(encode_frame(KIND_HELLO, hello), close=False)
            decoder = FrameDecoder()
            frames: list[tuple[bytes, bytes]] = []
            while not frames:
                chunk = await asyncio.wait_for(process.read(), START_TIMEOUT_S)
                if not chunk:
                    done = await process.finish()
                    stderr = done.stderr.decode(errors="replace").strip().splitlines()
                    # No frame at all: most likely no runner installed yet.
                    raise WarmUnavailable(
                        f"serve ended before its hello (exit {done.exit_status}"
                        f"{': ' + stderr[-1] if stderr else ''})",
                        need_runner=done.exit_status not in (None, 0),
                    )
                frames = decoder.feed(chunk)
            kind, payload = frames.pop(0)
            if kind == KIND_NEED:
                raise WarmUnavailable("the host has another runner version", need_runner=True)
            if kind != KIND_HELLO:
                raise WarmUnavailable(f"serve answered {kind!r} to its hello")
            answer = parse_frame_json(KIND_HELLO, payload)
            if answer["error"]:
                raise WarmUnavailable(str(answer["error"]))
        except (ProtocolError, asyncio.TimeoutError) as exc:
            process.abort()
            raise WarmUnavailable(f"serve's hello: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            process.abort()
            raise
        self._process = process
        reader = asyncio.ensure_future(self._read(process, decoder, frames))
        _READERS.add(reader)
        reader.add_done_callback(_READERS.discard)

    async def _read(
        self, process: RunnerProcess, decoder: FrameDecoder, early: list[tuple[bytes, bytes]]
    ) -> None:
        """Hand each frame to its job's route until serve's stdout ends."""
        try:
            for kind, payload in early:
                self._dispatch(kind, payload)
            while chunk := await process.read():
                for kind, payload in decoder.feed(chunk):
                    self._dispatch(kind, payload)
        except ProtocolError:
            process.abort()  # nothing more of it is believed
        finally:
            self.broken = True
            for route in list(self.routes.values()):
                route.lost()
            self.routes.clear()
            with contextlib.suppress(Exception):
                await process.finish()

    def _dispatch(self, kind: bytes, payload: bytes) -> None:
        key_bytes, _, body = payload.partition(b"\n")
        key = key_bytes.decode(errors="replace")
        route = self.routes.get(key)
        if route is None:
            return  # a session note (empty key), or a job whose client went away
        if kind in FINAL_KINDS:
            del self.routes[key]
        route.offer(kind, body)

    async def launch(self, key: str, payload: bytes) -> Route | None:
        """Send one job's L frame; its route, or None if serve is gone (nothing was sent)."""
        process = self._process
        if process is None or self.broken or key in self.routes:
            return None
        route = self.routes[key] = Route()
        try:
            await process.send(encode_frame(KIND_LAUNCH, payload), close=False)
        except (ConnectionError, OSError):
            self.broken = True
        if self.broken:
            # Not sent (or lost with serve at once): the client launches the job as before.
            self.drop(key, route)
            return None
        return route

    async def send(self, frames: bytes) -> bool:
        """Send L frames whose routes are in place (an array session's); False if serve is
        gone (its reader then tells their routes)."""
        process = self._process
        if process is None or self.broken:
            return False
        try:
            await process.send(frames, close=False)
        except (ConnectionError, OSError):
            self.broken = True
        return not self.broken

    def drop(self, key: str, route: Route) -> None:
        """Forget a job's route (its client went away): serve's frames about it are dropped;
        the job runs on and its result is on disk."""
        route.close()
        if self.routes.get(key) is route:
            del self.routes[key]

    async def close(self) -> None:
        """EOF on serve's stdin: it takes no more jobs, finishes what runs (their frames
        still reach their clients), then exits with its idle executors."""
        self.broken = True
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(Exception):
                await process.send(b"", close=True)
