"""What both ends of the connection process share: where its socket is, the checks that make
it safe to use, and the frames that carry one remote command's bytes.

One Unix connection carries one request: a JSON line (`version`, `op`, `host`, `persist_s`,
and for `exec` the `command`), then one JSON line of answer (`ok`, else `kind` and `reason`).
After an `exec` answered ok, frames follow, each a kind byte, a 4-byte big-endian length and
that many bytes: the client sends `I` (stdin bytes) and `C` (end of stdin); the process sends
`O` (stdout bytes), then `E` (the end of stderr) and `X` (the exit status, JSON) last. A
client that closes its end stops the command's channel, as closing an SSH channel does.

A `launch` request (`job`: the job's id, `runner`: the client's runner version) hands one
job to the connection's warm serve (`warm.py`). Answered ok, the client sends the launch
spec as `I` frames and `C`; the process sends the runner's frames about the job, unkeyed as
a `launch` command sends them (`S`, then `O`/`E` and `R`, or one `N` or `X`), inside `O`
frames, then `E` and `X` as for `exec`: status 0 after the job's last frame, null if serve
was lost, NOT_LAUNCHED if the job was never handed to serve. Answered `kind: cold`, there
is no warm serve yet (one is being started): the client launches the job as a command.

A `session` request (`runner`: the client's runner version) hands an array's tasks to the
connection's warm serve, started for it if there is none (`session.py`). Answered ok,
serve's hello is done: the client sends runner L frames (each spec keyed by its task) as
`I` frames, and `C` once it sends no more; the process sends serve's keyed frames about
those tasks (`S`, `O`, `E`, `R`, `N`, `X`) inside `O` frames, then `E` and `X`: status 0
once every task was answered after `C`, null when the session ended first (serve lost, or
the client fell too far behind), and the client follows its unanswered tasks with
`attach`. Answered `kind: cold`, no warm serve could start: the client starts its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from ..cluster import Host

# Both ends must speak the same version: it is in the socket's name, so an upgraded sshwasm
# starts its own process beside an older one instead of talking to it.
MUX_VERSION = 1
SOCKET_NAME = f"mux-{MUX_VERSION}.sock"
LOCK_NAME = f"mux-{MUX_VERSION}.lock"
LOG_NAME = "mux.log"

MAX_MESSAGE_BYTES = 1 << 20
MAX_FRAME_BYTES = 1 << 20
STDIN = b"I"
STDIN_EOF = b"C"
STDOUT = b"O"
STDERR = b"E"
EXIT = b"X"
_FRAME = struct.Struct(">cI")
# The exit status of a `launch` relay whose job never reached serve (no exit status of a
# remote command is negative): the client launches it as a command instead.
NOT_LAUNCHED = -1
# sun_path holds 108 bytes; longer paths are reached through the directory's descriptor.
_SUN_PATH_MAX = 100


class MuxUnavailable(Exception):
    """The connection process cannot be used (gone, broken, not ours); `str()` says why."""


def connection_key(host: Host) -> str:
    """What a connection is kept under: every setting of the host but how long it persists.

    An edited address, port, user, key or known_hosts makes a new key, so a command never
    reaches the old settings' host through a connection opened before the edit.
    """
    settings = host.to_dict()
    settings.pop("connection_persist_s", None)
    return json.dumps(settings, sort_keys=True)


def encode_message(message: dict[str, Any]) -> bytes:
    """One request or answer: a JSON line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next JSON line; raises MuxUnavailable on end of stream or anything malformed."""
    try:
        line = await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
        raise MuxUnavailable(f"no answer ({type(exc).__name__})") from exc
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise MuxUnavailable("a malformed answer") from exc
    if not isinstance(message, dict):
        raise MuxUnavailable("a malformed answer")
    return message


def write_frame(writer: asyncio.StreamWriter, kind: bytes, payload: bytes = b"") -> None:
    """Queue one frame (payloads longer than a frame holds are split)."""
    if not payload:
        writer.write(_FRAME.pack(kind, 0))
        return
    for start in range(0, len(payload), MAX_FRAME_BYTES):
        chunk = payload[start : start + MAX_FRAME_BYTES]
        writer.write(_FRAME.pack(kind, len(chunk)) + chunk)


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """The next frame as (kind, payload); None when the stream ended or broke."""
    try:
        kind, size = _FRAME.unpack(await reader.readexactly(_FRAME.size))
        if size > MAX_FRAME_BYTES:
            return None
        return kind, await reader.readexactly(size)
    except (asyncio.IncompleteReadError, OSError):
        return None


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def path_problem(path: Path, want_socket: bool) -> str | None:
    """Why the runtime dir (or the socket in it) must not be used, or None.

    It must be the user's own, not a symlink, and out of reach of group and others: another
    user's socket could take the commands (and their stdin) of ours.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot check {path}: {exc.strerror or exc}"
    kind_ok = stat.S_ISSOCK(info.st_mode) if want_socket else stat.S_ISDIR(info.st_mode)
    if not kind_ok:
        return f"{path} is not a {'socket' if want_socket else 'directory'}"
    if info.st_uid != os.geteuid():
        return f"{path} is owned by uid {info.st_uid}, not by you"
    if stat.S_IMODE(info.st_mode) & 0o077:
        return f"{path} is open to group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def connect_unix(path: Path) -> socket.socket:
    """A connected (blocking) Unix socket to `path`; OSError as connect(2) raises it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            sock.connect(os.fspath(path))
        else:
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                sock.connect(f"/proc/self/fd/{directory}/{path.name}")
            finally:
                os.close(directory)
    except BaseException:
        sock.close()
        raise
    return sock
