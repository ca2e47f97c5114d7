"""`MuxTransport`: an SSH transport whose commands go through the connection process.

Never required: when the process is missing it is started (detached) and waited for a
moment; when it cannot be started, answers wrongly, or its socket or directory is not the
user's own and private, the transport connects directly as `SshTransport` does, for the rest
of its life. Only an unreachable host is reported as such (a direct attempt would fail
the same way, after as long again). A process that dies under a running command looks like
a dropped connection: the coordinator re-attaches to the job, which runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import paths
from ..cluster import Host
from ..errors import HostUnreachable
from ..runner.protocol import runner_version
from ..transport import STDERR_KEEP_BYTES, Completed, RunnerProcess, SshTransport
from . import wire

# How long a command waits for a process it started to listen.
SPAWN_WAIT_S = 5.0
# How long a command waits for the process's answer to a request (it includes the SSH
# handshake, which retries a busy sshd for longer than CONNECT_TIMEOUT_S).
ANSWER_TIMEOUT_S = 120.0
SEND_CHUNK = 1 << 20
# Set to 1 to have each fallback to a direct connection said on stderr.
VERBOSE_ENV = "SSHWASM_MUX_VERBOSE"

# When this process last started one, per runtime dir: one that did not come up is not
# started again for every job, but one that exited idle since (a long-lived Python API
# user) is.
_spawned: dict[Path, float] = {}
RESPAWN_AFTER_S = 60.0


def _say(message: str) -> None:
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        sys.stderr.write(f"sshwasm: {message}\n")


def spawn(directory: Path, persist_s: float) -> None:
    """Start the connection process for `directory`, detached, its output in mux.log."""
    paths.make_private_dir(directory)
    problem = wire.path_problem(directory, want_socket=False)
    if problem is not None:
        raise wire.MuxUnavailable(problem)
    command = [
        sys.executable,
        "-m",
        "sshwasm.mux",
        "--dir",
        str(directory),
        "--idle",
        repr(persist_s),
    ]
    with paths.open_private(directory / wire.LOG_NAME) as log:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # outlives this command and its terminal
            cwd="/",
        )
    # Reaped when it exits, should this process (the Python API, say) outlive it.
    threading.Thread(target=child.wait, daemon=True).start()


def open_socket(directory: Path, persist_s: float) -> socket.socket:
    """A connected socket to the connection process, started if it is not running.

    Raises MuxUnavailable when it cannot be used: the directory or socket is not private to
    the user, the peer is another user, or it does not come up.
    """
    socket_path = directory / wire.SOCKET_NAME
    paths.tighten(directory, paths.PRIVATE_DIR_MODE)  # ours made 0755 by hand: fixed
    for path, is_socket in ((directory, False), (socket_path, True)):
        problem = wire.path_problem(path, want_socket=is_socket)
        if problem is not None:
            raise wire.MuxUnavailable(problem)
    deadline: float | None = None
    while True:
        try:
            sock = wire.connect_unix(socket_path)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if deadline is None:
                last = _spawned.get(directory)
                if last is not None and time.monotonic() - last < RESPAWN_AFTER_S:
                    raise wire.MuxUnavailable("the connection process did not start") from exc
                _spawned[directory] = time.monotonic()
                spawn(directory, persist_s)
                deadline = time.monotonic() + SPAWN_WAIT_S
            elif time.monotonic() >= deadline:
                raise wire.MuxUnavailable(
                    f"the connection process did not listen within {SPAWN_WAIT_S:g}s "
                    f"(see {directory / wire.LOG_NAME})"
                ) from exc
            time.sleep(0.01)
        except OSError as exc:
            raise wire.MuxUnavailable(f"cannot reach it: {exc.strerror or exc}") from exc
    try:
        # Checked again once connected: the path may have been swapped after the check.
        problem = wire.path_problem(socket_path, want_socket=True)
        uid = wire.peer_uid(sock)
        if uid != os.geteuid():
            problem = f"its socket is served by uid {uid}, not by you"
        if problem is not None:
            raise wire.MuxUnavailable(problem)
    except BaseException:
        sock.close()
        raise
    return sock


class _Cold(Exception):
    """The connection process has no warm serve for the job: launch it as a command."""


class _MuxProcess(RunnerProcess):
    """A remote command relayed by the connection process."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending = b""
        self._stderr = b""
        self._ended = False
        self._status: int | None = None

    async def send(self, data: bytes, *, close: bool = True) -> None:
        try:
            for start in range(0, len(data), SEND_CHUNK):
                wire.write_frame(self._writer, wire.STDIN, data[start : start + SEND_CHUNK])
            if close:
                wire.write_frame(self._writer, wire.STDIN_EOF)
            await self._writer.drain()
        except (ConnectionError, OSError):
            pass  # the relay ended early: finish() reports how

    async def _next(self) -> bytes:
        """The next stdout payload; b'' once the command ended (or the relay broke)."""
        while not self._ended:
            frame = await wire.read_frame(self._reader)
            if frame is None:
                self._ended = True  # exit status None: the connection was lost
                break
            kind, payload = frame
            if kind == wire.STDOUT and payload:
                return payload
            if kind == wire.STDERR:
                self._stderr = (self._stderr + payload)[-STDERR_KEEP_BYTES:]
            elif kind == wire.EXIT:
                self._ended = True
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    status = json.loads(payload).get("status")
                    if isinstance(status, int) and not isinstance(status, bool):
                        self._status = status
            elif kind != wire.STDOUT:
                self._ended = True  # a frame the protocol does not have: broken
        return b""

    async def read(self, size: int = 65536) -> bytes:
        if not self._pending:
            self._pending = await self._next()
        chunk, self._pending = self._pending[:size], self._pending[size:]
        return chunk

    async def finish(self) -> Completed:
        while not self._ended:
            await self._next()  # stdout left unread is dropped, as on a direct channel
        self._writer.close()
        return Completed(self._status, b"", self._stderr)

    def abort(self) -> None:
        self._ended = True
        self._writer.close()


class MuxTransport(SshTransport):
    """SSH through the connection process; a direct connection whenever it cannot be used."""

    def __init__(self, host: Host, persist_s: float) -> None:
        super().__init__(host)
        self.persist_s = persist_s
        self.direct = False
        self._mux_ready = False

    @property
    def is_connected(self) -> bool:
        return super().is_connected if self.direct else self._mux_ready

    def _fall_back(self, why: str) -> None:
        self.direct = True
        self._mux_ready = False
        _say(f"connecting to '{self.host.name}' directly: the connection process {why}")

    async def _request(
        self, op: str, command: str | None = None, **fields: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Send a request; return the streams after an answer of ok.

        Raises HostUnreachable as the process reports it, MuxUnavailable for the rest.
        """
        # In a thread: starting the process waits for it to listen, which must not hold up
        # the event loop's other jobs (their keepalives, say).
        sock = await asyncio.to_thread(open_socket, paths.runtime_dir(), self.persist_s)
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            request = {
                "version": wire.MUX_VERSION,
                "op": op,
                "host": self.host.to_dict(),
                "persist_s": self.persist_s,
            }
            if command is not None:
                request["command"] = command
            request.update(fields)
            writer.write(wire.encode_message(request))
            await writer.drain()
            try:
                answer = await asyncio.wait_for(wire.read_message(reader), ANSWER_TIMEOUT_S)
            except asyncio.TimeoutError as exc:
                raise wire.MuxUnavailable(f"did not answer within {ANSWER_TIMEOUT_S:g}s") from exc
            if answer.get("ok") is True:
                return reader, writer
            reason = answer.get("reason")
            if answer.get("kind") == "unreachable" and isinstance(reason, str):
                raise HostUnreachable(self.host.name, reason)
            if op in ("launch", "session") and answer.get("kind") in ("cold", "bad"):
                # No warm serve (yet), or a process from before warm serves (or before
                # array sessions): not broken.
                raise _Cold(str(reason))
            raise wire.MuxUnavailable(f"refused: {reason}")
        except BaseException:
            writer.close()
            raise

    async def connect(self) -> None:
        if not self.direct and not self._mux_ready:
            try:
                _reader, writer = await self._request("connect")
                writer.close()
                self._mux_ready = True
                return
            except (wire.MuxUnavailable, OSError) as exc:
                self._fall_back(str(exc))
        if self.direct:
            await super().connect()

    async def launch_warm(self, job_id: str) -> RunnerProcess | None:
        """The job's launch channel on the host's warm serve (see mux/warm.py), or None when
        the process has none ready (it starts one) or is not used."""
        return await self._warm_channel("launch", job=job_id)

    async def serve_session(self) -> RunnerProcess | None:
        """An array session on the host's warm serve (see mux/session.py): a channel that
        takes L frames and answers serve's keyed frames, serve's hello already exchanged;
        None when the process cannot give one (the array starts its own serve)."""
        return await self._warm_channel("session")

    async def _warm_channel(self, op: str, **fields: str) -> RunnerProcess | None:
        """A channel to the host's warm serve for request `op` (this runner's version
        added), or None: not used, not ready (cold), or the process unreachable (then
        this transport falls back to connecting directly)."""
        if self.direct:
            return None
        try:
            reader, writer = await self._request(op, **fields, runner=runner_version())
        except _Cold:
            return None
        except (wire.MuxUnavailable, OSError) as exc:
            self._fall_back(str(exc))
            return None
        self._mux_ready = True
        return _MuxProcess(reader, writer)

    async def _open(self, command: str) -> RunnerProcess:
        if not self.direct:
            try:
                reader, writer = await self._request("exec", command)
                return _MuxProcess(reader, writer)
            except (wire.MuxUnavailable, OSError) as exc:
                self._fall_back(str(exc))
        return await super()._open(command)

    async def close(self) -> None:
        self._mux_ready = False  # the connection process keeps the host's connection
        await super().close()
