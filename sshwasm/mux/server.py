"""The connection process itself: accepts the user's commands on its socket, keeps one SSH
connection per host (by every setting, `wire.connection_key`) and relays commands' bytes.

Started detached by `client.MuxTransport` on first use; exits when idle (see `MuxServer`).
It holds a lock file for its whole life, so two commands starting it at once leave one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from .. import paths
from ..cluster import MAX_CONNECTION_PERSIST_S, Host
from ..errors import HostKeyUntrusted, HostUnreachable, SshwasmError
from ..runner.jobdir import JOB_ID_RE
from ..runner.protocol import KIND_STDERR, KIND_STDOUT, SERVE_MAX_REQUEST_BYTES, encode_frame
from ..transport import RunnerProcess, SshTransport
from . import spare, wire
from .session import Session
from .warm import FINAL_KINDS, OVERFLOW, Route, WarmServe, WarmUnavailable

# A client has this long to send its request after connecting.
REQUEST_TIMEOUT_S = 10.0
# A newly started process waits this long for one that is shutting down to let go of the lock.
LOCK_WAIT_S = 3.0
STDIN_CHUNK = 65536
# A launch spec larger than this is refused by serve: such a job is launched as a command.
LAUNCH_MAX_BYTES = SERVE_MAX_REQUEST_BYTES // 2
# A warm serve that failed to start (no wasmtime, say) is tried again after this long.
WARM_RETRY_AFTER_S = 60.0
# A warm serve starts once its connection has had no command for this long.
WARM_QUIET_S = 0.1
# Starts that find no runner (the job's own commands may be installing it), at most.
WARM_ATTEMPTS = 4


def log(message: str) -> None:
    """One line in the process's log (its stderr, `mux.log` in the runtime dir)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    sys.stderr.write(f"{stamp} sshwasm mux[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


class MuxServer:
    """Connections by key, the relays running over them, and when to stop.

    Each connection is closed once it has had no command for `idle_s`; the process stops
    when it has none left and no client for `idle_s`. `idle_s` is the `connection_persist_s`
    of the latest request (the cluster file a user edits last is the one that counts).
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.transports: dict[str, SshTransport] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.last_used: dict[str, float] = {}
        self.in_use: dict[str, int] = {}
        # A session opened ahead of each connection's next command (see spare.py).
        self.spares: dict[str, RunnerProcess] = {}
        self._refilling: set[str] = set()
        # The warm serve of each connection (see warm.py), and when one last failed to start.
        self.warm: dict[str, WarmServe] = {}
        self._warming: set[str] = set()
        self._want_warm: dict[str, str] = {}  # the runner version a cold job asked for
        self._warm_failed: dict[str, float] = {}
        self.warm_launches = 0
        self._session_locks: dict[str, asyncio.Lock] = {}
        self.sessions = 0  # array sessions relayed to warm serves
        self._tasks: set[asyncio.Future[None]] = set()
        self.commands = 0
        self.on_spares = 0
        self.clients = 0
        self.last_activity = time.monotonic()
        self.stopping = asyncio.Event()

    async def transport(self, host: Host, key: str) -> SshTransport:
        """The connected transport for these settings, opened on first use."""
        async with self.locks.setdefault(key, asyncio.Lock()):
            transport = self.transports.get(key)
            if transport is None:
                transport = SshTransport(host)
                self.transports[key] = transport
            if not transport.is_connected:
                where = f"{host.user or ''}{'@' if host.user else ''}{host.address}"
                log(f"connecting to '{host.name}' at {where} port {host.port or 'default'}")
            self.last_used[key] = time.monotonic()
            try:
                await transport.connect()
            except BaseException:
                self.transports.pop(key, None)
                raise
            return transport

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection: one request, and its relay."""
        sock = writer.get_extra_info("socket")
        try:
            uid = wire.peer_uid(sock)
        except OSError:
            uid = -1
        if uid != os.geteuid():
            log(f"refused a client of uid {uid}")
            writer.close()
            return
        self.clients += 1
        try:
            await self.serve(reader, writer)
        except Exception as exc:  # one client's trouble must not stop the others
            log(f"client failed: {type(exc).__name__}: {exc}")
        finally:
            self.clients -= 1
            self.last_activity = time.monotonic()
            writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await asyncio.wait_for(wire.read_message(reader), REQUEST_TIMEOUT_S)
        op, command = request.get("op"), request.get("command")
        persist = request.get("persist_s")
        job, runner = request.get("job"), request.get("runner")
        if (
            request.get("version") != wire.MUX_VERSION
            or op not in ("connect", "exec", "launch", "session")
            or not isinstance(request.get("host"), dict)
            or (op == "exec" and not isinstance(command, str))
            or (
                op == "launch"
                and not (
                    isinstance(job, str)
                    and JOB_ID_RE.fullmatch(job)
                    and isinstance(runner, str)
                    and runner
                )
            )
            or (op == "session" and not (isinstance(runner, str) and runner))
            or isinstance(persist, bool)
            or not isinstance(persist, (int, float))
        ):
            writer.write(wire.encode_message({"ok": False, "kind": "bad", "reason": "bad request"}))
            return
        self.idle_s = min(max(float(persist), 0.0), MAX_CONNECTION_PERSIST_S)
        host = Host.from_dict(request["host"])
        key = wire.connection_key(host)
        process: RunnerProcess | None = None
        try:
            transport = await self.transport(host, key)
            if op == "launch":
                assert isinstance(job, str) and isinstance(runner, str)
                warm = self.warm_serve(transport, key, runner)
                if warm is not None:
                    writer.write(wire.encode_message({"ok": True}))
                    await self.launch_warm(warm, key, job, reader, writer)
                    return
                # This job launches as a command (on the spare), as before.
                self.refill(transport, key)
                reason = "no warm serve yet"
                writer.write(wire.encode_message({"ok": False, "kind": "cold", "reason": reason}))
                return
            if op == "session":
                assert isinstance(runner, str)
                warm = await self.session_serve(transport, key, runner)
                if warm is None:
                    reason = "no warm serve for an array session"
                    answer = {"ok": False, "kind": "cold", "reason": reason}
                    writer.write(wire.encode_message(answer))
                    return
                writer.write(wire.encode_message({"ok": True}))
                await self.relay_session(warm, key, reader, writer)
                return
            if isinstance(command, str):
                process = await self.start(transport, key, command)
            self.refill(transport, key)
        except HostKeyUntrusted as exc:
            # The client connects directly to say so with every detail of the error.
            answer = {"ok": False, "kind": "untrusted", "reason": str(exc)}
            writer.write(wire.encode_message(answer))
            return
        except HostUnreachable as exc:
            answer = {"ok": False, "kind": "unreachable", "reason": exc.reason}
            writer.write(wire.encode_message(answer))
            return
        except SshwasmError as exc:
            writer.write(wire.encode_message({"ok": False, "kind": "other", "reason": str(exc)}))
            return
        writer.write(wire.encode_message({"ok": True}))
        if process is None:
            return
        self.in_use[key] = self.in_use.get(key, 0) + 1
        try:
            await self.relay(process, reader, writer)
        finally:
            self.in_use[key] -= 1
            self.last_used[key] = time.monotonic()

    def warm_serve(self, transport: SshTransport, key: str, version: str) -> WarmServe | None:
        """The connection's warm serve for this runner version if it is ready; else None,
        and one is started once the connection is quiet (replacing one of another version)."""
        warm = self.warm.get(key)
        if warm is not None and warm.ready and warm.version == version:
            return warm
        if warm is not None and (warm.version != version or warm.broken):
            del self.warm[key]
            self._spawn(warm.close())  # its running jobs finish and reach their clients
        failed = self._warm_failed.get(key)
        if failed is not None and time.monotonic() - failed < WARM_RETRY_AFTER_S:
            return None
        self._want_warm[key] = version
        if key not in self._warming:
            self._warming.add(key)
            self._spawn(self._warm_up(transport, key))
        return None

    async def session_serve(
        self, transport: SshTransport, key: str, version: str
    ) -> WarmServe | None:
        """The connection's warm serve for an array session, started now if there is none
        ready of this runner version (the array waits for it, as it would for its own serve);
        None if it cannot start (no runner installed yet, say): the array starts its own."""
        warm = self.warm.get(key)
        if warm is not None and warm.ready and warm.version == version:
            return warm
        failed = self._warm_failed.get(key)
        if failed is not None and time.monotonic() - failed < WARM_RETRY_AFTER_S:
            return None
        async with self._session_locks.setdefault(key, asyncio.Lock()):
            warm = self.warm.get(key)
            if warm is not None and warm.ready and warm.version == version:
                return warm  # another session started it meanwhile
            starting = WarmServe(transport, version)
            try:
                await starting.start()
            except WarmUnavailable as exc:
                log(f"no warm serve for an array session: {exc}")
                if not exc.need_runner:
                    self._warm_failed[key] = time.monotonic()
                return None
            except (SshwasmError, OSError) as exc:
                log(f"no warm serve for an array session: {type(exc).__name__}: {exc}")
                return None
            if self.transports.get(key) is not transport:
                await starting.close()  # its connection went meanwhile
                return None
            old = self.warm.get(key)
            if old is not None:
                self._spawn(old.close())  # its running jobs finish and reach their clients
            self.warm[key] = starting
            self._want_warm.pop(key, None)
            self._warm_failed.pop(key, None)
            return starting

    async def relay_session(
        self,
        warm: WarmServe,
        key: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Relay an array's tasks to the warm serve and their frames back (session.py)."""
        self.in_use[key] = self.in_use.get(key, 0) + 1
        self.sessions += 1
        try:
            await Session(warm, writer).run(reader)
        finally:
            self.in_use[key] -= 1
            self.last_used[key] = time.monotonic()

    async def _warm_up(self, transport: SshTransport, key: str) -> None:
        """Start the wanted warm serve once the connection has been quiet for WARM_QUIET_S:
        never beside the commands of the job that asked (a first job on a host installs
        the runner and uploads its module; a serve started then would find neither). A
        serve that finds no runner (or another version) is tried again after the
        connection's next commands, which install it."""
        tried_at: float | None = None
        try:
            for _attempt in range(WARM_ATTEMPTS):
                while True:
                    await asyncio.sleep(WARM_QUIET_S / 2)
                    if self.transports.get(key) is not transport or key not in self._want_warm:
                        return  # the connection went, or a serve is no longer wanted
                    used = self.last_used.get(key, 0.0)
                    if (
                        self.in_use.get(key, 0) == 0
                        and time.monotonic() - used >= WARM_QUIET_S
                        and (tried_at is None or used > tried_at)
                    ):
                        break
                version = self._want_warm[key]
                starting = WarmServe(transport, version)
                tried_at = time.monotonic()
                try:
                    await starting.start()
                except WarmUnavailable as exc:
                    log(f"no warm serve yet: {exc}")
                    if exc.need_runner:
                        continue
                    self._warm_failed[key] = time.monotonic()
                    return
                except (SshwasmError, OSError) as exc:
                    log(f"no warm serve: {type(exc).__name__}: {exc}")
                    self._warm_failed[key] = time.monotonic()
                    return
                if self._want_warm.get(key) == version:
                    del self._want_warm[key]
                self._warm_failed.pop(key, None)
                if self.transports.get(key) is transport and key not in self.warm:
                    self.warm[key] = starting
                else:
                    await starting.close()  # its connection went meanwhile
                return
        finally:
            self._warming.discard(key)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def launch_warm(
        self,
        warm: WarmServe,
        key: str,
        job: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Read one job's launch spec from the client, hand it to serve, relay its frames."""
        payload = bytearray()
        while True:
            frame = await wire.read_frame(reader)
            if frame is None or frame[0] not in (wire.STDIN, wire.STDIN_EOF):
                return  # the client went away before it sent the job: nothing ran
            payload += frame[1]
            if len(payload) > LAUNCH_MAX_BYTES:
                self._end_relay(writer, wire.NOT_LAUNCHED)
                await writer.drain()
                return
            if frame[0] == wire.STDIN_EOF:
                break
        self.commands += 1
        self.in_use[key] = self.in_use.get(key, 0) + 1
        try:
            route = await warm.launch(job, bytes(payload))
            if route is None:
                self._end_relay(writer, wire.NOT_LAUNCHED)
                await writer.drain()
                return
            self.warm_launches += 1
            await self.relay_route(warm, job, route, reader, writer)
        finally:
            self.in_use[key] -= 1
            self.last_used[key] = time.monotonic()

    async def relay_route(
        self,
        warm: WarmServe,
        job: str,
        route: Route,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Carry serve's frames about one job to its client, unkeyed as `launch` sends them;
        once the client fell too far behind (the route overflowed), the rest with `attach`."""
        # The client sends nothing more: its end of the socket closing means it went away.
        gone = asyncio.ensure_future(reader.read(1))
        offsets = {KIND_STDOUT: 0, KIND_STDERR: 0}
        try:
            while True:
                getting = asyncio.ensure_future(route.take())
                await asyncio.wait({getting, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    return
                item = getting.result()
                if item is None:
                    self._end_relay(writer, None)  # serve was lost: the client re-attaches
                    await writer.drain()
                    return
                if item is OVERFLOW:
                    warm.drop(job, route)  # serve's channel goes on without waiting for us
                    await self.relay_attach(warm.transport, job, offsets, gone, writer)
                    return
                kind, body = item
                if kind in offsets:
                    offsets[kind] += len(body)
                wire.write_frame(writer, wire.STDOUT, encode_frame(kind, body))
                if kind in FINAL_KINDS:
                    self._end_relay(writer, 0)
                    await writer.drain()
                    return
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            gone.cancel()
            warm.drop(job, route)

    async def relay_attach(
        self,
        transport: SshTransport,
        job: str,
        offsets: dict[bytes, int],
        gone: asyncio.Future[bytes],
        writer: asyncio.StreamWriter,
    ) -> None:
        """Follow a warm job with `attach` from the output bytes its client already has: its
        frames are the ones a `launch` relay sends, at the pace the client takes them (the
        channel's SSH window stops the host's sending while the client is behind)."""
        try:
            process = await transport.start_runner(
                [
                    "attach",
                    transport.host.workdir,
                    job,
                    str(offsets[KIND_STDOUT]),
                    str(offsets[KIND_STDERR]),
                ]
            )
            await process.send(b"")
        except (SshwasmError, OSError) as exc:
            log(f"cannot follow job {job} with attach: {type(exc).__name__}: {exc}")
            self._end_relay(writer, None)  # as if the connection dropped: the client re-attaches
            await writer.drain()
            return
        try:
            while True:
                reading = asyncio.ensure_future(process.read())
                await asyncio.wait({reading, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    reading.cancel()
                    process.abort()  # the client went away: so does the channel
                    return
                chunk = reading.result()
                if not chunk:
                    break
                wire.write_frame(writer, wire.STDOUT, chunk)
                await writer.drain()
            done = await process.finish()
        except BaseException:
            process.abort()
            raise
        # attach's status as the relay's: 0 after its result, None if its channel was lost.
        self._end_relay(writer, done.exit_status)
        await writer.drain()

    @staticmethod
    def _end_relay(writer: asyncio.StreamWriter, status: int | None) -> None:
        wire.write_frame(writer, wire.STDERR, b"")
        wire.write_frame(writer, wire.EXIT, json.dumps({"status": status}).encode())

    async def start(self, transport: SshTransport, key: str, command: str) -> RunnerProcess:
        """Start `command` on the connection's spare channel if one is open, else on a new one."""
        self.commands += 1
        held = self.spares.pop(key, None)
        line = spare.one_line(command)
        if held is not None and line is not None and held.is_open:
            await held.send(line.encode(), close=False)
            self.on_spares += 1
            return held
        if held is not None:
            held.abort()
        return await transport.open_command(command)

    def refill(self, transport: SshTransport, key: str) -> None:
        """Open the connection's next spare channel in the background, unless one is there."""
        if key in self.spares or key in self._refilling:
            return
        self._refilling.add(key)

        async def open_spare() -> None:
            try:
                process = await transport.open_command(spare.SPARE_COMMAND)
            except Exception as exc:  # only a spare: the next command opens its own
                log(f"no spare channel: {type(exc).__name__}: {exc}")
                return
            finally:
                self._refilling.discard(key)
            if self.transports.get(key) is transport and key not in self.spares:
                self.spares[key] = process
            else:
                process.abort()

        task = asyncio.ensure_future(open_spare())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def relay(
        self, process: RunnerProcess, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Carry a command's stdin from the client and its stdout, stderr and exit back."""

        async def feed() -> None:
            while True:
                frame = await wire.read_frame(reader)
                if frame is None or frame[0] not in (wire.STDIN, wire.STDIN_EOF):
                    process.abort()  # the client went away: so does the channel
                    return
                kind, payload = frame
                await process.send(payload, close=kind == wire.STDIN_EOF)
                if kind == wire.STDIN_EOF:
                    return

        feeding = asyncio.ensure_future(feed())
        try:
            while chunk := await process.read():
                wire.write_frame(writer, wire.STDOUT, chunk)
                await writer.drain()
            done = await process.finish()
            wire.write_frame(writer, wire.STDERR, done.stderr)
            wire.write_frame(writer, wire.EXIT, json.dumps({"status": done.exit_status}).encode())
            await writer.drain()
        except (ConnectionError, OSError):
            process.abort()
        finally:
            if feeding.done():
                with contextlib.suppress(Exception):
                    feeding.result()
            else:
                feeding.cancel()

    async def reap(self) -> None:
        """Close connections idle for `idle_s`; stop when none is left and no client came."""
        while not self.stopping.is_set():
            await asyncio.sleep(min(1.0, max(0.05, self.idle_s / 4)))
            now = time.monotonic()
            for key, used in list(self.last_used.items()):
                if self.in_use.get(key, 0) == 0 and now - used >= self.idle_s:
                    await self.forget(key)
            if (
                self.clients == 0
                and not self.transports
                and now - self.last_activity >= self.idle_s
            ):
                self.stopping.set()

    async def forget(self, key: str) -> None:
        """Close one connection."""
        held = self.spares.pop(key, None)
        if held is not None:
            held.abort()
        warm = self.warm.pop(key, None)
        if warm is not None:
            await warm.close()
        self._warm_failed.pop(key, None)
        self._want_warm.pop(key, None)
        self.last_used.pop(key, None)
        self.in_use.pop(key, None)
        transport = self.transports.pop(key, None)
        if transport is not None:
            with contextlib.suppress(Exception):
                await transport.close()

    async def close(self) -> None:
        for key in list(self.transports):
            await self.forget(key)


def take_lock(directory: Path) -> int | None:
    """The lock that makes this the only process on this socket; None if another holds it."""
    fd = os.open(directory / wire.LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


async def serve_forever(directory: Path, idle_s: float) -> int:
    """Listen on the socket until idle or told to stop (SIGTERM, SIGINT)."""
    server = MuxServer(idle_s)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, server.stopping.set)
    # Bound by its name in the directory: a deep runtime dir may not fit in sun_path.
    os.chdir(directory)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(wire.SOCKET_NAME)  # a dead process's socket: the lock says none is alive
    old_umask = os.umask(0o177)
    try:
        listener = await asyncio.start_unix_server(server.handle, path=wire.SOCKET_NAME)
    finally:
        os.umask(old_umask)
    os.chmod(wire.SOCKET_NAME, 0o600)
    bound = os.stat(wire.SOCKET_NAME).st_ino
    log(f"listening on {directory / wire.SOCKET_NAME}, idle exit after {idle_s:g}s")
    reaper = asyncio.ensure_future(server.reap())
    try:
        await server.stopping.wait()
    finally:
        # New clients find no socket (and start a new process) from here on.
        with contextlib.suppress(OSError):
            if os.stat(wire.SOCKET_NAME).st_ino == bound:
                os.unlink(wire.SOCKET_NAME)
        listener.close()
        reaper.cancel()
        await server.close()
        log(
            f"stopped: {server.commands} commands, {server.on_spares} on spare channels, "
            f"{server.warm_launches} jobs on warm serves, {server.sessions} array sessions"
        )
    return 0


def main(argv: list[str]) -> int:
    """Entry point of `python -m sshwasm.mux`."""
    parser = argparse.ArgumentParser(prog="python -m sshwasm.mux")
    parser.add_argument("--dir", required=True, help="the runtime dir holding the socket")
    parser.add_argument("--idle", type=float, default=600.0, help="idle seconds before exiting")
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    paths.make_private_dir(directory)
    problem = wire.path_problem(directory, want_socket=False)
    if problem is not None:
        log(f"not starting: {problem}")
        return 1
    lock = take_lock(directory)
    if lock is None:
        return 0  # another process serves this socket
    try:
        return asyncio.run(serve_forever(directory, args.idle))
    finally:
        os.close(lock)
