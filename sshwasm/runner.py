#!/usr/bin/env python3
"""sshwasm-exec: the worker side of sshwasm, one file needing only the stdlib and wasmtime.

Commands (argv never carries user-controlled words; those come as JSON on stdin):

    launch WORKDIR JOB_ID            stdin: a spec JSON line, then the job's stdin and input
    serve WORKDIR                    stdin: request frames; runs many jobs as forks of itself
    attach WORKDIR JOB_ID OUT ERR    stream output from byte offsets until the result
    poll WORKDIR JOB_ID OUT ERR      send the output there is now, then the result or liveness
    fetch-output WORKDIR JOB_ID [MAX_BYTES]
                                     stdout: the job's /output directory as a tar stream;
                                     with MAX_BYTES, stops before a file that would take the
                                     files' total past it, and exits 3
    put-module WORKDIR SHA256        stdin: module bytes, kept as WORKDIR/wasm/SHA256.wasm
    cancel WORKDIR JOB_ID            kill a running job and record it as cancelled
    info                             one JSON line describing this host
    execute JOB_DIR                  internal: the detached process that runs the module

launch, serve, attach and poll answer in frames (1 byte kind, 4 bytes big-endian length,
payload); fetch-output answers with a raw tar stream; put-module, cancel and info in plain
text. Usage errors exit 2. Only execute and serve import wasmtime.

Every command with a WORKDIR first checks it (workdir_problem): the workdir and its bin,
wasm, cache and jobs directories must be no symbolic links, owned by this user and not
group- or world-writable. If not, nothing is done: frame commands answer one X frame of
kind "workdir" (serve's with an empty key), the others a line on stderr, and the exit
status is UNSAFE_WORKDIR_EXIT. Over SSH the coordinator runs this file through a bootstrap
(transport.RUNNER_BOOTSTRAP) that checks bin/ and this file the same way before importing
it, and refuses with a stderr line and the same exit status.

Launch spec (launch's first stdin line, one JSON object): runner_version, wasm_sha256,
argv, env ([name, value] pairs), memory_mb (caps the guest's one memory, its one table
takes at most an eighth more: see guest_limits), time_limit_s (number or null: enforced by
epoch interruption plus a watchdog), and optionally wall_limit_s (a cap enforced by the
watchdog alone, at no cost to the running guest; used when time_limit_s is null), and
optionally the fields below. Both limits are at most MAX_TIME_LIMIT_S and count from when
the runner got the launch, so loading and compiling the module count too.

    stdin_bytes: int        exactly this many bytes of job stdin follow the spec line
    has_stdin: bool         older form: job stdin is everything up to EOF (or the L frame's end)
    input_tar_bytes: int    after the stdin bytes, this many bytes of an uncompressed tar
                            (regular files and directories only), extracted to the job's
                            input/ and seen read-only by the job at /input
    output: bool            the job gets an empty writable /output (fetch it with fetch-output)
    max_output_bytes: int   a cap on stdout + stderr + /output (apparent sizes) together:
                            each file the job writes is held to it (RLIMIT_FSIZE), and a
                            monitor thread ends the job when the sum passes it; either way
                            the result is "failed" with exit_code null and an error naming
                            the limit (null or absent: no cap)

Absent fields mean false or 0, so a spec without them runs as before: no stdin (EOF), and
no filesystem at all. input_tar_bytes with has_stdin needs stdin_bytes. A refused input
tar (absolute or '..' names, links, devices, fifos, sparse files) is an X frame of kind
"input" and leaves no job directory.

serve protocol. The coordinator writes frames on serve's stdin; serve answers in frames.

    -> H {"runner_version": str}          first; answered by exactly one of:
    <- N {"need": "runner"}               another version: serve exits
    <- H {"pid": int, "wasmtime_version": str|null, "error": str|null}
                                          error set: wasmtime is unusable and serve exits
    -> L SPEC_LINE \\n STDIN INPUT_TAR     launch's stdin bytes; the spec has "key": JOB_ID

Replies about a task carry payload JOB_ID + b"\\n" + body, in this order:

    N {"need": "module"}     nothing launched: put-module over another channel, resend L
    N {"need": "runner"}     the spec's runner_version differs: nothing launched
    X {"error", "kind"}      not launched (kinds as launch: spec, exists, io, input)
    S {"pid", "job_dir"}     launched; later, once it ended and result.json is on disk:
    O <chunk>...             its whole stdout, chunks of at most 64 KiB
    E <chunk>...             its whole stderr
    R <result.json bytes>    the last frame about the task

Frames of different tasks may interleave; a task's own O and E frames are sent only after
it ended. A task whose module cannot be loaded still gets S, then an R "failed", as under
execute. An X frame whose key is empty (payload starting with b"\\n") concerns no task:
kind "spec" for an L whose spec or key is unreadable, "protocol" for a stream that is not
frames or a request out of order (serve then accepts nothing more), "io" if serve itself
fails. On EOF serve accepts nothing more, sends the results of the tasks still running,
and exits 0. If its stdout breaks, it leaves the tasks running (each writes its result to
its job directory; use attach, poll or cancel per task) and exits once all have ended.
Requests larger than SERVE_MAX_REQUEST_BYTES are a protocol error: launch such tasks with
launch instead.

The coordinator believes none of these answers unchecked: parse_result (R, result.json),
parse_frame_json (S, N, X, A, H), parse_cancel_answer and parse_info below define what each
may hold and raise ProtocolError for anything else.

Every job dir holds "pid" (the job process's pid) and, where there is procfs, "pid-start"
("PID START_TIME", field 22 of /proc/PID/stat): a serve task's cmdline is serve's, so
attach, poll and cancel tell the job's process from a reused pid by its start time.

Hosts may have an older Python than the coordinator: keep this file to Python 3.8 syntax
and APIs (annotations are never evaluated, thanks to the __future__ import).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import select
import shutil
import signal
import stat
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

KIND_NEED = b"N"
KIND_STARTED = b"S"
KIND_STDOUT = b"O"
KIND_STDERR = b"E"
KIND_RESULT = b"R"
KIND_ERROR = b"X"
KIND_ALIVE = b"A"
KIND_HELLO = b"H"
KIND_LAUNCH = b"L"

CHUNK_BYTES = 64 * 1024
# Far above any real frame (output chunks are 64 KiB): a bigger length means the stream is
# not ours, e.g. a login shell printed a banner before the runner started.
MAX_FRAME_BYTES = 16 << 20
# An L frame holds a task's stdin and input tar in memory; bigger tasks go through launch.
SERVE_MAX_REQUEST_BYTES = 64 << 20
GRACE_S = 1.0
DEAD_GRACE_S = 0.5
STARTUP_GRACE_S = 10.0
POLL_MIN_S = 0.002
POLL_MAX_S = 0.05
KILL_WAIT_S = 2.0
# The longest time_limit_s or wall_limit_s a spec may ask for (365 days); the CLI refuses
# more at once. Far below threading.TIMEOUT_MAX, so a watchdog can always wait for it.
MAX_TIME_LIMIT_S = 365 * 24 * 3600
# A watchdog waits in slices no longer than this, so no wait can overflow a platform timeout.
_WATCHDOG_SLICE_S = 3600.0
# What a guest may allocate besides its one linear memory of memory_mb (wasmtime store
# limits; a multi-memory module or extra tables would multiply the budget): one memory, one
# table, one instance, and a table of at most an eighth of memory_mb (elements are 8 bytes).
# Every Rust, C and Go guest has exactly one memory and one table of a few thousand entries.
GUEST_MEMORIES = 1
GUEST_TABLES = 1
GUEST_INSTANCES = 1
TABLE_ELEMENT_BYTES = 8
TABLE_SHARE_OF_MEMORY = 8
# fetch-output walks directories down to this many levels below the output directory (one
# open descriptor per level) and skips what lies deeper.
MAX_OUTPUT_DEPTH = 64
# How often the output monitor sums a capped job's output sizes.
OUTPUT_CHECK_S = 0.05
# fetch-output's exit status when it stopped at its MAX_BYTES argument.
FETCH_STOPPED_AT_LIMIT = 3

RESULT_KEYS = (
    "state",
    "exit_code",
    "error",
    "run_s",
    "cpu_s",
    "peak_memory_bytes",
    "started_at",
    "finished_at",
    "module_compile_s",
    "module_cached",
    "wasmtime_version",
)

_HEADER = struct.Struct(">cI")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_OOM_STDERR_RE = re.compile(rb"memory allocation of .{0,64}failed|out of memory", re.DOTALL)
_MIN_MEMORY_RE = re.compile(r"memory minimum size of (\d+) pages")
# How instantiation reports a module over the store's count or table limits.
_STORE_LIMIT_RE = re.compile(r"resource limit exceeded|table minimum size of \d+ elements")
_WASM_PAGE_BYTES = 64 * 1024
# Resolved at import, before anything could change the working directory.
_SCRIPT_PATH = os.path.abspath(__file__)


def runner_source() -> bytes:
    """The bytes of this file: what the coordinator installs as `<workdir>/bin/sshwasm_exec.py`."""
    with open(_SCRIPT_PATH, "rb") as source:
        return source.read()


def runner_version() -> str:
    """First 16 hex chars of the sha256 of this file, so any edit changes the version."""
    return hashlib.sha256(runner_source()).hexdigest()[:16]


RUNNER_VERSION = runner_version()


# ---------------------------------------------------------------------------- frames


def encode_frame(kind: bytes, payload: bytes) -> bytes:
    """One frame: 1 byte kind, 4 bytes big-endian payload length, then the payload."""
    if len(kind) != 1:
        raise ValueError(f"a frame kind is one byte, not {kind!r}")
    if len(payload) > 0xFFFFFFFF:
        raise ValueError("frame payload too large")
    return _HEADER.pack(kind, len(payload)) + payload


class ProtocolError(ValueError):
    """A message from the other side does not follow the protocol (bad JSON, key or value)."""


class FrameError(ProtocolError):
    """The byte stream does not consist of sshwasm-exec frames."""


class FrameDecoder:
    """Incremental frame decoder: feed bytes as they arrive, get whole frames back."""

    def __init__(self, max_payload: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add received bytes; return the (kind, payload) frames completed by them."""
        buffer = self._buffer
        buffer += data
        frames: list[tuple[bytes, bytes]] = []
        start = 0
        while len(buffer) - start >= _HEADER.size:
            kind, length = _HEADER.unpack_from(buffer, start)
            if length > self._max_payload:
                preview = bytes(buffer[start : start + 40])
                raise FrameError(
                    f"frame of {length} bytes is larger than {self._max_payload}: the stream "
                    f"does not come from sshwasm-exec (does a login script print text?) "
                    f"starting {preview!r}"
                )
            end = start + _HEADER.size + length
            if end > len(buffer):
                break
            frames.append((kind, bytes(buffer[start + _HEADER.size : end])))
            start = end
        del buffer[:start]
        return frames


# -------------------------------------------------------------------------- messages
#
# What the coordinator believes of a host is checked here first: the JSON of R, S, N, X and
# H frames and of `cancel` and `info`. A host that sends something else is broken (or not
# ours), and every parser below says so with a ProtocolError instead of letting a bad value
# reach the jobs file.

# States a job's result.json may hold (a job the runner cannot vouch for is `failed`).
RESULT_STATES = ("succeeded", "failed", "timeout", "out_of_memory", "cancelled")
# X frame kinds in use: spec, exists, io, input, no_wasmtime, missing, protocol. The
# coordinator acts on some and reports the rest as they are, so a kind is only checked to
# be a short identifier: a newer runner may add one.
_ERROR_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
NEEDS = ("runner", "module")
# Far above anything this runner writes (its messages are cut to 500 characters).
MAX_MESSAGE_CHARS = 16 * 1024
MAX_SHORT_CHARS = 256
MAX_MESSAGE_BYTES = 1 << 20
# Exit codes as WASI and wasmtime can report them (a u32, or a signed i32).
_EXIT_CODE_RANGE = (-(1 << 31), (1 << 32) - 1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _is_iso_time(value: object) -> bool:
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _text(limit: int) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        return isinstance(value, str) and len(value) <= limit

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        return isinstance(value, str) and value in choices

    return check


def _in_range(low: int, high: int) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        return _is_int(value) and low <= value <= high  # type: ignore[operator]

    return check


def _optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    def either(value: object) -> bool:
        return value is None or check(value)

    return either


if TYPE_CHECKING:  # Python 3.8 cannot subscript dict at run time
    _Schema = dict[str, Callable[[object], bool]]

RESULT_SCHEMA: _Schema = {
    "state": _one_of(RESULT_STATES),
    "exit_code": _optional(_in_range(*_EXIT_CODE_RANGE)),
    "error": _optional(_text(MAX_MESSAGE_CHARS)),
    "run_s": _optional(_is_seconds),
    "cpu_s": _optional(_is_seconds),
    "peak_memory_bytes": _optional(_in_range(0, 1 << 62)),
    "started_at": _optional(_is_iso_time),
    "finished_at": _optional(_is_iso_time),
    "module_compile_s": _optional(_is_seconds),
    "module_cached": _optional(lambda value: isinstance(value, bool)),
    "wasmtime_version": _optional(_text(MAX_SHORT_CHARS)),
}
_PID = _in_range(1, (1 << 31) - 1)
_MESSAGE_SCHEMAS: dict[bytes, _Schema] = {
    KIND_STARTED: {"pid": _PID, "job_dir": _text(4096)},
    KIND_NEED: {"need": _one_of(NEEDS)},
    KIND_ERROR: {
        "error": _text(MAX_MESSAGE_CHARS),
        "kind": lambda value: isinstance(value, str) and bool(_ERROR_KIND_RE.fullmatch(value)),
    },
    KIND_ALIVE: {"alive": lambda value: value is True},
    KIND_HELLO: {
        "pid": _PID,
        "wasmtime_version": _optional(_text(MAX_SHORT_CHARS)),
        "error": _optional(_text(MAX_MESSAGE_CHARS)),
    },
}
CANCEL_SCHEMA: _Schema = {
    "state": _one_of((*RESULT_STATES, "unknown")),
    "already_finished": _optional(lambda value: isinstance(value, bool)),
}
INFO_SCHEMA: _Schema = {
    "runner_version": _text(MAX_SHORT_CHARS),
    "python": _text(MAX_SHORT_CHARS),
    "wasmtime_version": _optional(_text(MAX_SHORT_CHARS)),
    "wasmtime_error": _optional(_text(MAX_MESSAGE_CHARS)),
    "cpus": _optional(_in_range(1, 1 << 24)),
    "memory_mb": _optional(_in_range(0, 1 << 40)),
}


def parse_message(
    payload: bytes, schema: _Schema, what: str, optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Decode one JSON object and check it against `schema`; unknown keys are dropped.

    Every key of the schema is required, but those in `optional`, which mean None if absent.
    """
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{what} of {len(payload)} bytes is too large")
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not JSON: {_preview(payload)}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object: {_preview(payload)}")
    checked: dict[str, Any] = {}
    for key, check in schema.items():
        if key not in value:
            if key in optional:
                checked[key] = None
                continue
            raise ProtocolError(f"{what} lacks {key!r}")
        if not check(value[key]):
            raise ProtocolError(f"{what} has an invalid {key!r}: {_preview(value[key])}")
        checked[key] = value[key]
    return checked


def parse_result(payload: bytes) -> dict[str, Any]:
    """A job's result.json (R frame) as the coordinator may believe it; raises ProtocolError."""
    return parse_message(payload, RESULT_SCHEMA, "result")


def parse_cancel_answer(payload: bytes) -> dict[str, Any]:
    """What `cancel` printed, checked; raises ProtocolError."""
    return parse_message(payload, CANCEL_SCHEMA, "cancel answer", frozenset({"already_finished"}))


def parse_info(payload: bytes, what: str = "info answer") -> dict[str, Any]:
    """What `info` (or a probe of the host's python) printed, checked; raises ProtocolError.

    Only what is there is checked: an older runner's `info` has fewer keys.
    """
    return parse_message(payload, INFO_SCHEMA, what, frozenset(INFO_SCHEMA))


def parse_frame_json(kind: bytes, payload: bytes) -> dict[str, Any]:
    """The JSON body of an S, N, X, A or H frame, checked; raises ProtocolError."""
    schema = _MESSAGE_SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError(f"unexpected frame kind {kind!r}")
    return parse_message(payload, schema, f"{kind.decode('latin-1')} frame")


def _preview(value: object, limit: int = 60) -> str:
    """A short, printable rendering of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _CoordinatorGone(Exception):
    """Our stdout is closed: the coordinator went away (the detached job keeps running)."""


class _UsageError(Exception):
    """A command-line argument is malformed."""


class _FrameWriter:
    """Writes frames to stdout, flushing each one; turns a broken pipe into _CoordinatorGone."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def send(self, kind: bytes, payload: bytes) -> None:
        try:
            self._stream.write(encode_frame(kind, payload))
            self._stream.flush()
        except BrokenPipeError as exc:
            raise _CoordinatorGone from exc
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise _CoordinatorGone from exc
            raise

    def send_json(self, kind: bytes, value: dict[str, Any]) -> None:
        self.send(kind, json.dumps(value).encode())

    def send_error(self, kind: str, message: object) -> None:
        self.send_json(KIND_ERROR, {"error": _one_line(str(message)), "kind": kind})

    def send_keyed(self, kind: bytes, key: str, body: bytes) -> None:
        """A serve reply about one task: its job id, a newline, then the body."""
        self.send(kind, key.encode() + b"\n" + body)

    def reader_gone(self) -> bool:
        """True when nobody can read our stdout any more, found without writing to it."""
        # While a job is quiet nothing is written, so a broken pipe would go unnoticed
        # until the job ends; poll() reports POLLERR/POLLHUP once the reader has closed.
        try:
            poller = select.poll()
            poller.register(self._stream.fileno(), select.POLLOUT)
            events = poller.poll(0)
        except (AttributeError, OSError, ValueError):
            return False
        return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)


def _detach_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush cannot fail noisily."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------------- utilities


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _one_line(text: str, limit: int = 500) -> str:
    """Collapse a message to one line; wasmtime errors keep only what follows 'Caused by:'."""
    if "Caused by:" in text:
        tail = text.split("Caused by:", 1)[1]
        # Nested causes appear as "0: outer", "1: inner"; drop the indices.
        parts = [re.sub(r"^\d+:\s*", "", line.strip()) for line in tail.splitlines()]
        line = ": ".join(part for part in parts if part)
    else:
        line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _json_bytes(value: dict[str, Any]) -> bytes:
    return (json.dumps(value) + "\n").encode()


def _workdir(argument: str) -> str:
    return os.path.abspath(os.path.expanduser(argument))


# Exit status of a command refused for an unsafe workdir, by the runner or its bootstrap
# (sysexits' EX_NOPERM): the coordinator then says why instead of reinstalling the runner.
UNSAFE_WORKDIR_EXIT = 77
# The workdir's subdirectories the runner reads code or results from.
WORKDIR_SUBDIRS = ("bin", "wasm", "cache", "jobs")


def path_problem(path: str) -> str | None:
    """Why the runner must not trust `path`, or None (also when it does not exist).

    Trusted means: not a symbolic link, owned by this user (the effective uid), and not
    group- or world-writable, so that nobody else can put code or results there. Checked
    with lstat, before anything in the path is read. Needs only `os` and `stat`: the SSH
    bootstrap (transport.RUNNER_BOOTSTRAP) carries this function's source.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path} cannot be checked ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    if info.st_uid != os.geteuid():
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def workdir_problem(workdir: str) -> str | None:
    """Why the runner must not use `workdir`: its own or its subdirectories' path_problem,
    as one line; None when it is safe (or does not exist yet)."""
    for path in (workdir, *(os.path.join(workdir, name) for name in WORKDIR_SUBDIRS)):
        problem = path_problem(path)
        if problem is not None:
            return unsafe_workdir_message(problem)
    return None


def unsafe_workdir_message(problem: str) -> str:
    """The one line that refuses a workdir for `problem` (shared with the bootstrap)."""
    return (
        f"unsafe workdir: {problem}; the runner uses only a workdir, and bin, wasm, cache "
        f"and jobs in it, that belong to the SSH user, are no links and that no one else "
        f"can write"
    )


def _job_dir(workdir_argument: str, job_id: str) -> str:
    if not _JOB_ID_RE.fullmatch(job_id):
        raise _UsageError(f"invalid job id {job_id!r}")
    return os.path.join(_workdir(workdir_argument), "jobs", job_id)


def _offset(argument: str) -> int:
    if not argument.isdigit():
        raise _UsageError(f"invalid byte offset {argument!r}")
    return int(argument)


def _write_new_file(path: str, data: bytes, *, durable: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _replace_atomically(path: str, data: bytes, *, durable: bool = False) -> None:
    temp = _temp_path(path)
    try:
        _write_new_file(temp, data, durable=durable)
        os.replace(temp, path)
    except BaseException:
        _unlink_quietly(temp)
        raise


def _create_atomically(path: str, data: bytes) -> bool:
    """Write `path` whole unless it already exists; False when it did (nothing written)."""
    temp = _temp_path(path)
    try:
        _write_new_file(temp, data, durable=True)
        try:
            # link() fails on an existing target, unlike rename(): the first result wins.
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # A filesystem without hard links: O_EXCL still never overwrites.
            try:
                _write_new_file(path, data, durable=True)
            except FileExistsError:
                return False
        return True
    finally:
        _unlink_quietly(temp)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of `pid` from /proc; None when it does not exist there."""
    with open(f"/proc/{pid}/stat", "rb") as stat_file:
        raw = stat_file.read()
    # The command name (field 2) may hold spaces and parentheses; the rest follows the last ')'.
    fields = raw.rsplit(b")", 1)[-1].split()
    if len(fields) < 20:
        return None
    # fields[0] is field 3 (state); field 22, starttime, counts clock ticks since boot.
    return fields[0].decode(), fields[19].decode()


def _start_time(pid: int) -> str | None:
    """When `pid` was created, as the kernel says: a reused pid has another start time."""
    try:
        found = _proc_stat(pid)
    except OSError:
        return None
    return None if found is None else found[1]


def _write_pid_file(job_dir: str, pid: int) -> None:
    """Record the job's process: 'PID' in pid, and 'PID START_TIME' in pid-start.

    pid-start comes first, so that whoever finds pid finds pid-start too (on procfs hosts);
    pid keeps its one-number form for whoever reads it.
    """
    started = _start_time(pid)
    if started:
        _replace_atomically(os.path.join(job_dir, "pid-start"), f"{pid} {started}\n".encode())
    _replace_atomically(os.path.join(job_dir, "pid"), f"{pid}\n".encode())


def _read_pid(job_dir: str) -> tuple[int, str | None] | None:
    """(pid, start time or None) from the job's pid-start file, else from its pid file."""
    for name in ("pid-start", "pid"):
        try:
            with open(os.path.join(job_dir, name), "rb") as pid_file:
                words = pid_file.read().decode("ascii").split()
        except FileNotFoundError:
            continue
        except OSError:
            return None
        try:
            pid = int(words[0])
        except (ValueError, IndexError):
            return None
        if pid <= 0:
            return None
        return pid, (words[1] if len(words) > 1 else None)
    return None


def _is_executor(process: tuple[int, str | None], job_dir: str) -> bool:
    """True when the pid file's process is alive and still the job's, not a zombie or reused pid."""
    pid, started = process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the pid was reused
    if not os.path.isdir("/proc/self"):
        return True  # no procfs (e.g. macOS): kill(0) is all there is
    if started is not None:
        # A job forked by serve has serve's cmdline; its start time identifies it instead.
        try:
            found = _proc_stat(pid)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return found is not None and found[0] not in ("Z", "X") and found[1] == started
    # A pid file without a start time (an older runner's): the executor's cmdline names it.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    args = raw.split(b"\0")
    if args and not args[-1]:
        args.pop()
    # A zombie has an empty cmdline; kill(0) alone would call it alive.
    if len(args) < 2 or args[-2] != b"execute":
        return False
    try:
        return os.path.samefile(os.fsdecode(args[-1]), job_dir)
    except OSError:
        return False


def _executor_death(job_dir: str) -> str | None:
    """None while the job's executor may still write a result; else why it never will."""
    process = _read_pid(job_dir)
    if process is None:
        try:
            born = os.stat(os.path.join(job_dir, "spec.json")).st_mtime
        except OSError:
            try:
                born = os.stat(job_dir).st_mtime
            except OSError:
                return "job directory vanished"
        if time.time() - born < STARTUP_GRACE_S:
            return None
        return "runner process never started"
    if _is_executor(process, job_dir):
        return None
    return "runner process died without a result"


def _log_tail(job_dir: str) -> str:
    """Last line of the executor's log, which names the cause of a crash if anything does."""
    try:
        with open(os.path.join(job_dir, "runner.log"), "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 4096))
            lines = [line.strip() for line in log.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else ""


def _make_result(state: str, exit_code: int | None, error: str | None, **facts: Any) -> bytes:
    result: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    result.update(facts)
    result.update(state=state, exit_code=exit_code, error=error)
    if result["finished_at"] is None:
        result["finished_at"] = _now_iso()
    return _json_bytes(result)


def _write_died_result(job_dir: str, reason: str) -> None:
    detail = _log_tail(job_dir)
    error = f"{reason} (runner.log: {detail})" if detail else reason
    _create_atomically(os.path.join(job_dir, "result.json"), _make_result("failed", None, error))


def _wasmtime_problem() -> str | None:
    """Why `import wasmtime` cannot work here, found without importing it (slow)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("wasmtime")
    except (ImportError, ValueError) as exc:
        return f"cannot import wasmtime with {sys.executable}: {exc}"
    if found is None:
        return f"cannot import wasmtime with {sys.executable}: No module named 'wasmtime'"
    return None


def _wasmtime_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------- streaming


class _Tail:
    """Sends a file that may still grow, from a byte offset, as frames of one kind."""

    def __init__(self, path: str, offset: int, kind: bytes) -> None:
        self._path = path
        self.offset = offset
        self._kind = kind
        self._fd: int | None = None

    def _opened(self) -> int | None:
        if self._fd is None:
            try:
                self._fd = os.open(self._path, os.O_RDONLY)
            except FileNotFoundError:
                return None  # the executor has not created it yet
        return self._fd

    def available(self) -> int:
        """Bytes written beyond the offset so far."""
        fd = self._opened()
        return 0 if fd is None else max(0, os.fstat(fd).st_size - self.offset)

    def pump(self, writer: _FrameWriter, budget: int = 16 * CHUNK_BYTES) -> int:
        """Send up to `budget` new bytes; return how many were sent."""
        fd = self._opened()
        sent = 0
        while fd is not None and sent < budget:
            chunk = os.pread(fd, min(CHUNK_BYTES, budget - sent), self.offset)
            if not chunk:
                break
            writer.send(self._kind, chunk)
            self.offset += len(chunk)
            sent += len(chunk)
        return sent

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_result(path: str) -> bytes:
    data = b""
    # Only the no-hard-link fallback can expose a half-written file; give it a moment.
    for _ in range(40):
        with open(path, "rb") as result:
            data = result.read()
        try:
            json.loads(data)
            return data
        except ValueError:
            time.sleep(0.05)
    return data


def _send_rest_and_result(writer: _FrameWriter, tails: list[_Tail], result_path: str) -> None:
    # The result is written after the guest stopped writing, so what is there now is all.
    while sum(tail.pump(writer) for tail in tails):
        pass
    writer.send(KIND_RESULT, _read_result(result_path))


def _stream_job(
    writer: _FrameWriter,
    job_dir: str,
    offsets: tuple[int, int],
    death: Callable[[], str | None],
    *,
    follow: bool,
    wake_fd: int | None = None,
) -> None:
    """Send output from `offsets`; then R, or with follow=False an A frame if still running.

    `wake_fd` (the read end of a pipe the executor holds open) ends an idle wait the moment
    the executor exits, so its result is sent at once rather than at the next poll.
    """
    result_path = os.path.join(job_dir, "result.json")
    tails = [
        _Tail(os.path.join(job_dir, "stdout"), offsets[0], KIND_STDOUT),
        _Tail(os.path.join(job_dir, "stderr"), offsets[1], KIND_STDERR),
    ]
    try:
        if not follow:
            finished = os.path.exists(result_path)
            for tail in tails:
                # Stop at the size seen now, so a chatty job cannot keep a poll going.
                tail.pump(writer, budget=tail.available())
            if not finished and death() is None:
                writer.send_json(KIND_ALIVE, {"alive": True})
                return
        delay = POLL_MIN_S
        dead_since: float | None = None
        while True:
            finished = os.path.exists(result_path)
            sent = sum(tail.pump(writer) for tail in tails)
            if finished:
                _send_rest_and_result(writer, tails, result_path)
                return
            if sent:
                delay = POLL_MIN_S
                continue
            reason = death()
            if reason is None:
                dead_since = None
            elif dead_since is None:
                dead_since = time.monotonic()
            elif time.monotonic() - dead_since >= DEAD_GRACE_S:
                # Gone for good without a word: record that, so the job has an end.
                _write_died_result(job_dir, reason)
                continue
            if writer.reader_gone():
                raise _CoordinatorGone
            if wake_fd is None:
                time.sleep(delay)
            elif select.select([wake_fd], [], [], delay)[0]:
                wake_fd = None  # the executor is gone: its result (or death) shows next
            delay = min(delay * 2, POLL_MAX_S)
    finally:
        for tail in tails:
            tail.close()


# --------------------------------------------------------------------------- staging


class UnsafeArchive(ValueError):
    """A tar stream holds something other than plain files and directories under its root."""


class ArchiveTooLarge(UnsafeArchive):
    """A tar stream's files add up to more than the bytes allowed; what fit is extracted."""


class OutputLimitReached(Exception):
    """write_tree_as_tar stopped before a file that would pass its max_bytes."""

    def __init__(self, skipped: int) -> None:
        super().__init__(skipped)
        self.skipped = skipped


class _LimitedReader(io.RawIOBase):
    """Reads at most `limit` bytes of `source`, so a tar reader cannot run past its part."""

    def __init__(self, source: BinaryIO, limit: int) -> None:
        super().__init__()
        self._source = source
        self.remaining = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self.remaining)
        if wanted <= 0:
            return 0
        data = self._source.read(wanted)
        view[: len(data)] = data
        self.remaining -= len(data)
        return len(data)

    def drain(self) -> None:
        """Read and drop what is left of the part (a tar's trailing padding)."""
        while self.remaining > 0:
            chunk = self._source.read(min(self.remaining, 1 << 20))
            if not chunk:
                break
            self.remaining -= len(chunk)


def member_parts(name: str) -> list[str]:
    """The path components of a tar member name, refusing any that could leave the root."""
    if "\0" in name:
        raise UnsafeArchive(f"member name {name!r} holds a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchive(f"member {name!r} has an absolute name")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"member {name!r} has a '..' component")
    return parts


def _member_kind(member: Any) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    if member.issparse():
        return "sparse file"
    return f"member of type {member.type!r}"


def make_extraction_directory(path: str) -> None:
    """Make a directory of an archive being extracted (0700); fine if it is one already."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        # Only this extraction writes here and it never makes links: lstat is the truth.
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise UnsafeArchive(f"{path!r} is both a file and a directory") from None


def extract_tar_safely(source: BinaryIO, destination: str, max_bytes: int | None = None) -> int:
    """Extract an uncompressed tar stream into the existing directory `destination`.

    Accepts only regular files and directories whose names stay inside; refuses the whole
    archive (UnsafeArchive) at the first absolute name, '..' component, link, device, fifo
    or sparse file. Tar modes and owners are ignored: files are 0600, directories 0700.
    Checks each member itself, so it is safe on every Python without tarfile's filters.
    With `max_bytes`, stops (ArchiveTooLarge) before a file that would take the files'
    total past it, judged by the size its header claims, so it is never written.
    Returns the number of members extracted.
    """
    import tarfile

    count = 0
    left = max_bytes
    try:
        with tarfile.open(fileobj=source, mode="r|") as archive:
            for member in archive:
                parts = member_parts(member.name)
                is_file = member.isreg() and not member.issparse()
                if not (is_file or member.isdir()):
                    raise UnsafeArchive(
                        f"{member.name!r} is a {_member_kind(member)}: only regular files "
                        f"and directories can be staged"
                    )
                if not parts:
                    if is_file:
                        raise UnsafeArchive(f"file member {member.name!r} has no name")
                    continue  # the root itself, as in `tar -C dir -cf - .`
                path = destination
                for part in parts[:-1]:
                    path = os.path.join(path, part)
                    make_extraction_directory(path)
                path = os.path.join(path, parts[-1])
                if member.isdir():
                    make_extraction_directory(path)
                else:
                    if left is not None:
                        if member.size > left:
                            raise ArchiveTooLarge(
                                f"{member.name!r} ({member.size} bytes) would pass the limit "
                                f"of {max_bytes} bytes"
                            )
                        left -= member.size
                    _extract_file(archive, member, path)
                count += 1
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"not a readable tar stream: {exc}") from exc
    return count


def _extract_file(archive: Any, member: Any, path: str) -> None:
    data = archive.extractfile(member)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise UnsafeArchive(f"{member.name!r} appears twice in the archive") from None
    try:
        left = member.size
        while left > 0:
            chunk = data.read(min(left, 1 << 20))
            if not chunk:
                raise UnsafeArchive(f"the archive ends inside {member.name!r}")
            left -= len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class _SizedReader(io.RawIOBase):
    """Reads exactly `size` bytes of an open file: cut if it grew, zero-padded if it shrank,
    so a file a running job is still writing cannot corrupt the tar stream around it."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self._left)
        filled = 0
        while filled < wanted:
            data = os.read(self._fd, wanted - filled)
            if not data:
                view[filled:wanted] = bytes(wanted - filled)
                filled = wanted
                break
            view[filled : filled + len(data)] = data
            filled += len(data)
        self._left -= filled
        return filled


def write_tree_as_tar(root: str, sink: BinaryIO, max_bytes: int | None = None) -> int:
    """Write the regular files and directories under `root` to `sink` as an uncompressed tar.

    Symbolic links are never followed nor included, nor is anything but regular files and
    directories, nor what lies deeper than MAX_OUTPUT_DEPTH: a job may have made any of
    them. Each directory is opened relative to its parent with O_NOFOLLOW, so a running job
    swapping a directory for a link cannot redirect the walk. Member modes are 0600/0700.
    With `max_bytes`, the archive ends (well-formed) before the first file that would take
    the files' total past it, and OutputLimitReached is raised after it is written: a
    sparse file counts by its apparent size, so it never travels. Returns the number of
    entries skipped.
    """
    import tarfile

    left = max_bytes
    stopped = False
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    directory_flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow
    file_flags = os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0)
    skipped = 0
    root_fd = os.open(root, directory_flags)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        # Depth-first with an explicit stack of (directory fd, member prefix, names left).
        stack: list[tuple[int, str, list[str]]] = [(root_fd, "", sorted(os.listdir(root_fd)))]
        try:
            while stack:
                dir_fd, prefix, names = stack[-1]
                if not names:
                    os.close(dir_fd)
                    stack.pop()
                    continue
                name = names.pop(0)
                try:
                    fd = os.open(name, file_flags, dir_fd=dir_fd)
                except OSError:
                    skipped += 1  # a symlink (ELOOP), vanished, or unreadable
                    continue
                info = os.fstat(fd)
                member = tarfile.TarInfo(prefix + name)
                member.mtime = int(info.st_mtime)
                if stat.S_ISDIR(info.st_mode) and len(stack) <= MAX_OUTPUT_DEPTH:
                    member.type, member.mode = tarfile.DIRTYPE, 0o700
                    archive.addfile(member)
                    try:
                        children = sorted(os.listdir(fd))
                    except OSError:
                        children = []
                    stack.append((fd, member.name + "/", children))
                    continue
                try:
                    if stat.S_ISREG(info.st_mode):
                        if left is not None and info.st_size > left:
                            stopped = True
                            break
                        if left is not None:
                            left -= info.st_size
                        member.mode, member.size = 0o600, info.st_size
                        archive.addfile(member, _SizedReader(fd, info.st_size))
                    else:
                        skipped += 1
                finally:
                    os.close(fd)
        finally:
            for dir_fd, _, _ in stack:
                os.close(dir_fd)
    if stopped:
        raise OutputLimitReached(skipped)
    return skipped


# -------------------------------------------------------------------------- commands


def _validate_spec(raw: dict[str, Any]) -> dict[str, Any]:
    """The launch spec with every field checked; raises ValueError naming the bad field."""

    def is_text(value: object) -> bool:
        return isinstance(value, str) and "\0" not in value

    def is_count(value: object) -> bool:
        return type(value) is int and value >= 0

    def is_time_limit(value: object) -> bool:
        # A bool is an int but no number of seconds; NaN fails both comparisons.
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and 0 < value <= MAX_TIME_LIMIT_S
        )

    sha = raw.get("wasm_sha256")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise ValueError("wasm_sha256 must be 64 lowercase hex digits")
    argv = raw.get("argv")
    if not isinstance(argv, list) or not argv or not all(is_text(word) for word in argv):
        raise ValueError("argv must be a non-empty list of strings without NUL")
    env = raw.get("env")
    if not isinstance(env, list) or not all(
        isinstance(pair, list)
        and len(pair) == 2
        and is_text(pair[0])
        and pair[0]
        and "=" not in pair[0]
        and is_text(pair[1])
        for pair in env
    ):
        raise ValueError("env must be a list of [name, value] string pairs")
    memory_mb = raw.get("memory_mb")
    if type(memory_mb) is not int or not 1 <= memory_mb <= 1 << 20:
        raise ValueError("memory_mb must be a positive integer")
    limit = raw.get("time_limit_s")
    if limit is not None and not is_time_limit(limit):
        raise ValueError(
            f"time_limit_s must be a positive number of seconds up to {MAX_TIME_LIMIT_S} "
            f"(365 days), or null"
        )
    wall_limit = raw.get("wall_limit_s")
    if wall_limit is not None and not is_time_limit(wall_limit):
        raise ValueError(
            f"wall_limit_s must be a positive number of seconds up to {MAX_TIME_LIMIT_S} "
            f"(365 days), or null"
        )
    has_stdin = raw.get("has_stdin", False)
    if not isinstance(has_stdin, bool):
        raise ValueError("has_stdin must be true or false")
    stdin_bytes = raw.get("stdin_bytes")
    if stdin_bytes is not None and not is_count(stdin_bytes):
        raise ValueError("stdin_bytes must be a non-negative integer")
    input_tar_bytes = raw.get("input_tar_bytes", 0)
    if not is_count(input_tar_bytes):
        raise ValueError("input_tar_bytes must be a non-negative integer")
    if input_tar_bytes and has_stdin and stdin_bytes is None:
        raise ValueError("input_tar_bytes with has_stdin needs stdin_bytes")
    output = raw.get("output", False)
    if not isinstance(output, bool):
        raise ValueError("output must be true or false")
    max_output_bytes = raw.get("max_output_bytes")
    if max_output_bytes is not None and not (is_count(max_output_bytes) and max_output_bytes):
        raise ValueError("max_output_bytes must be a positive integer or null")
    return {
        "runner_version": raw["runner_version"],
        "wasm_sha256": sha,
        "argv": argv,
        "env": env,
        "memory_mb": memory_mb,
        "time_limit_s": None if limit is None else float(limit),
        "wall_limit_s": None if wall_limit is None else float(wall_limit),
        "has_stdin": has_stdin or stdin_bytes is not None,
        "stdin_bytes": stdin_bytes,
        "input": input_tar_bytes > 0,
        "input_tar_bytes": input_tar_bytes,
        "output": output,
        "max_output_bytes": max_output_bytes,
    }


class _LaunchRefused(Exception):
    """A launch that started nothing, answered by one N or X frame."""

    def __init__(self, frame_kind: bytes, answer: dict[str, Any]) -> None:
        super().__init__(answer)
        self.frame_kind = frame_kind
        self.answer = answer

    @classmethod
    def need(cls, what: str) -> _LaunchRefused:
        return cls(KIND_NEED, {"need": what})

    @classmethod
    def error(cls, kind: str, message: object) -> _LaunchRefused:
        return cls(KIND_ERROR, {"error": _one_line(str(message)), "kind": kind})


def _copy_to_file(source: BinaryIO, path: str, size: int | None = None) -> None:
    """Copy `size` bytes of `source` (all of it when None) to the new file `path`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        left = size
        while left is None or left > 0:
            chunk = source.read(1 << 20 if left is None else min(left, 1 << 20))
            if not chunk:
                if left is not None:
                    raise _LaunchRefused.error(
                        "spec", f"the launch stream ended {left} bytes short of stdin_bytes"
                    )
                break
            if left is not None:
                left -= len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _stage_input(source: BinaryIO, size: int, destination: str) -> None:
    os.mkdir(destination, 0o700)
    part = _LimitedReader(source, size)
    try:
        extract_tar_safely(part, destination)  # type: ignore[arg-type]
    except UnsafeArchive as exc:
        raise _LaunchRefused.error("input", f"input refused: {exc}") from exc
    part.drain()
    if part.remaining:
        raise _LaunchRefused.error(
            "spec", f"the launch stream ended {part.remaining} bytes short of input_tar_bytes"
        )


def _set_up_job(
    workdir: str, job_dir: str, raw: dict[str, Any], source: BinaryIO, *, check_wasmtime: bool
) -> dict[str, Any]:
    """Check a launch spec and make the job directory; raises _LaunchRefused if it cannot.

    The directory gets spec.json, then stdin, input/ and output/ as the spec asks, read
    from `source` (what follows the spec line). Nothing is left behind on refusal.
    """
    if raw.get("runner_version") != runner_version():
        raise _LaunchRefused.need("runner")
    try:
        spec = _validate_spec(raw)
    except ValueError as exc:
        raise _LaunchRefused.error("spec", f"invalid launch spec: {exc}") from exc
    if not os.path.isfile(os.path.join(workdir, "wasm", f"{spec['wasm_sha256']}.wasm")):
        raise _LaunchRefused.need("module")
    if check_wasmtime:
        problem = _wasmtime_problem()
        if problem is not None:
            raise _LaunchRefused.error("no_wasmtime", problem)
    try:
        os.makedirs(os.path.join(workdir, "jobs"), mode=0o700, exist_ok=True)
    except OSError as exc:
        raise _LaunchRefused.error("io", exc) from exc
    try:
        os.mkdir(job_dir, 0o700)
    except FileExistsError as exc:
        raise _LaunchRefused.error("exists", f"job directory {job_dir} already exists") from exc
    except OSError as exc:
        raise _LaunchRefused.error("io", exc) from exc
    try:
        _write_new_file(os.path.join(job_dir, "spec.json"), _json_bytes(spec))
        if spec["has_stdin"]:
            _copy_to_file(source, os.path.join(job_dir, "stdin"), spec["stdin_bytes"])
        if spec["input"]:
            _stage_input(source, spec["input_tar_bytes"], os.path.join(job_dir, "input"))
        if spec["output"]:
            os.mkdir(os.path.join(job_dir, "output"), 0o700)
    except BaseException as exc:
        # Nothing runs yet: remove the half-made job so that a retry can launch it.
        shutil.rmtree(job_dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _LaunchRefused.error("io", exc) from exc
        raise
    return spec


def _fork_executor(job_dir: str, wake_write: int, wake_read: int) -> int:
    """Start the job's process as a fork of this launcher; returns its pid.

    A fork rather than a new interpreter saves the executor's start-up (~45 ms) on every
    job. The child leaves the launcher's session and streams (the SSH channel must be free
    to close), keeps only `wake_write` (its end closes, waking the launcher, when it exits)
    and then runs the job exactly as `execute` would. The launcher has no threads and has
    not imported wasmtime, so the fork is safe.
    """
    log_fd = os.open(
        os.path.join(job_dir, "runner.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            # A new session: neither the SSH channel closing nor a hangup signal reaches it.
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(log_fd, 2)
            for fd in (null, log_fd, wake_read):
                os.close(fd)
            os.chdir("/")
        except BaseException:
            os._exit(1)
        _execute(job_dir, _run_job)
    os.close(log_fd)
    return pid


def _cmd_launch(writer: _FrameWriter, workdir_argument: str, job_id: str) -> int:
    job_dir = _job_dir(workdir_argument, job_id)
    workdir = os.path.dirname(os.path.dirname(job_dir))
    stdin = sys.stdin.buffer
    try:
        raw = json.loads(stdin.readline())
        if not isinstance(raw, dict):
            raise ValueError("the spec is not a JSON object")
    except ValueError as exc:
        writer.send_error("spec", f"unreadable launch spec: {exc}")
        return 0
    wake_read, wake_write = os.pipe()
    try:
        _set_up_job(workdir, job_dir, raw, stdin, check_wasmtime=True)
        executor = _fork_executor(job_dir, wake_write, wake_read)
    except _LaunchRefused as refused:
        writer.send_json(refused.frame_kind, refused.answer)
        return 0
    except OSError as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        writer.send_error("io", exc)
        return 0
    finally:
        os.close(wake_write)  # only the executor holds it now
    with contextlib.suppress(OSError):
        # The executor writes it too; writing it here closes the window before it starts.
        _write_pid_file(job_dir, executor)
    writer.send_json(KIND_STARTED, {"pid": executor, "job_dir": job_dir})

    def death() -> str | None:
        # waitpid also reaps our child, which kill(0) would see as a live zombie.
        try:
            ended, status = os.waitpid(executor, os.WNOHANG)
        except ChildProcessError:
            return "runner process died without a result"
        if ended == 0:
            return None
        return f"runner process died without a result ({_describe_wait_status(status)})"

    try:
        _stream_job(writer, job_dir, (0, 0), death, follow=True, wake_fd=wake_read)
    finally:
        os.close(wake_read)
    return 0


def _cmd_attach(writer: _FrameWriter, workdir: str, job_id: str, out: str, err: str) -> int:
    job_dir = _job_dir(workdir, job_id)
    offsets = (_offset(out), _offset(err))
    if not os.path.isdir(job_dir):
        writer.send_error("missing", f"no job directory {job_dir}")
        return 0
    _stream_job(writer, job_dir, offsets, lambda: _executor_death(job_dir), follow=True)
    return 0


def _cmd_poll(writer: _FrameWriter, workdir: str, job_id: str, out: str, err: str) -> int:
    job_dir = _job_dir(workdir, job_id)
    offsets = (_offset(out), _offset(err))
    if not os.path.isdir(job_dir):
        writer.send_error("missing", f"no job directory {job_dir}")
        return 0
    _stream_job(writer, job_dir, offsets, lambda: _executor_death(job_dir), follow=False)
    return 0


def _cmd_fetch_output(workdir: str, job_id: str, max_bytes: str | None = None) -> int:
    job_dir = _job_dir(workdir, job_id)
    limit = None if max_bytes is None else _offset(max_bytes)
    if not os.path.isdir(job_dir):
        print(f"sshwasm-exec: error: no job directory {job_dir}", file=sys.stderr)
        return 1
    output = os.path.join(job_dir, "output")
    if not os.path.isdir(output) or os.path.islink(output):
        print(f"sshwasm-exec: error: job {job_id} has no output directory", file=sys.stderr)
        return 1
    status = 0
    try:
        skipped = write_tree_as_tar(output, sys.stdout.buffer, limit)
    except OutputLimitReached as reached:
        skipped, status = reached.skipped, FETCH_STOPPED_AT_LIMIT
        print(
            f"sshwasm-exec: the output passes the limit of {limit} bytes: the rest was not sent",
            file=sys.stderr,
        )
    sys.stdout.buffer.flush()
    if skipped:
        print(
            f"sshwasm-exec: skipped {skipped} entries of the output that are not regular "
            f"files or directories (or nest deeper than {MAX_OUTPUT_DEPTH} levels)",
            file=sys.stderr,
        )
    return status


def _cmd_put_module(workdir_argument: str, sha256: str) -> int:
    if not _SHA256_RE.fullmatch(sha256):
        raise _UsageError(f"invalid sha256 {sha256!r}: expected 64 lowercase hex digits")
    wasm_dir = os.path.join(_workdir(workdir_argument), "wasm")
    os.makedirs(wasm_dir, mode=0o700, exist_ok=True)
    final = os.path.join(wasm_dir, f"{sha256}.wasm")
    temp = _temp_path(final)
    digest = hashlib.sha256()
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while chunk := sys.stdin.buffer.read(1 << 20):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if digest.hexdigest() != sha256:
            print(
                f"sshwasm-exec: error: module bytes hash to {digest.hexdigest()}, not {sha256}",
                file=sys.stderr,
            )
            return 1
        os.replace(temp, final)
    finally:
        _unlink_quietly(temp)
    return 0


def _kill_executor(job_dir: str) -> None:
    process = _read_pid(job_dir)
    if process is None or not _is_executor(process, job_dir):
        return
    pid = process[0]
    try:
        # A new session made it a group leader; the group takes anything it spawned.
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_WAIT_S
    while _is_executor(process, job_dir) and time.monotonic() < deadline:
        time.sleep(0.01)


def _result_state(path: str) -> str | None:
    try:
        with open(path, "rb") as result:
            state = json.loads(result.read()).get("state")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return state if isinstance(state, str) else "unknown"


def _cmd_cancel(workdir: str, job_id: str) -> int:
    job_dir = _job_dir(workdir, job_id)
    if not os.path.isdir(job_dir):
        print(f"sshwasm-exec: error: no job directory {job_dir}", file=sys.stderr)
        return 1
    result_path = os.path.join(job_dir, "result.json")
    state = _result_state(result_path)
    if state is None:
        _kill_executor(job_dir)
        if _create_atomically(result_path, _make_result("cancelled", 143, "cancelled")):
            # An executor that wrote its pid after our first look sees the result and
            # stops by itself; one already past that check is killed here.
            _kill_executor(job_dir)
            print(json.dumps({"state": "cancelled"}))
            return 0
        state = _result_state(result_path) or "unknown"
    print(json.dumps({"state": state, "already_finished": True}))
    return 0


def _physical_memory_mb() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        return None


def _cmd_info() -> int:
    problem = _wasmtime_problem()
    version = _wasmtime_version()
    if version is None and problem is None:
        problem = "the wasmtime package has no installed metadata"
    info = {
        "runner_version": runner_version(),
        "python": sys.version.split()[0],
        "wasmtime_version": version,
        "wasmtime_error": problem,
        "cpus": os.cpu_count(),
        "memory_mb": _physical_memory_mb(),
    }
    print(json.dumps(info))
    return 0


# ------------------------------------------------------------------------- execution


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Execution:
    """One run of a job's module in this process; its result is written exactly once."""

    def __init__(self, job_dir: str) -> None:
        self.job_dir = job_dir
        self.result_path = os.path.join(job_dir, "result.json")
        self.done = threading.Event()
        self.facts: dict[str, Any] = {
            "module_compile_s": None,
            "module_cached": None,
            "wasmtime_version": None,
        }
        self._lock = threading.Lock()
        self._written = False
        self._wall_start: float | None = None
        self._cpu_start: float | None = None

    def begin_run(self) -> None:
        """Start the clocks: run_s and cpu_s cover instantiation and _start."""
        self.facts["started_at"] = _now_iso()
        self._wall_start = time.monotonic()
        self._cpu_start = _cpu_seconds()

    def measures(self) -> dict[str, Any]:
        """run_s and cpu_s so far; empty before the run began."""
        if self._wall_start is None or self._cpu_start is None:
            return {}
        return {
            "run_s": round(time.monotonic() - self._wall_start, 6),
            "cpu_s": round(_cpu_seconds() - self._cpu_start, 6),
        }

    def finish(self, state: str, exit_code: int | None, error: str | None, **more: Any) -> bool:
        """Write result.json unless this process or anyone else (a cancel) already did."""
        with self._lock:
            if self._written:
                return False
            self._written = True
            result = _make_result(state, exit_code, error, **{**self.facts, **more})
            try:
                return _create_atomically(self.result_path, result)
            except OSError:
                traceback.print_exc()
                return False


class _Watchdog:
    """Ends a job at its limit, counted from `started` (time.monotonic), so that loading and
    compiling the module count too.

    With a time limit (grace > 0) it first interrupts the guest by incrementing the epoch of
    the engine given to `interrupt_with`; epoch interruption cannot reach a guest blocked in
    a host call (sleep, read), so after the grace period it records the timeout and ends the
    whole process. Alone (grace 0) it is the default wall-clock cap, which costs the guest
    nothing while it runs. It never dies silently: a job whose watchdog failed is ended.
    """

    def __init__(self, execution: _Execution, limit: float, grace: float, started: float) -> None:
        self.execution = execution
        self.limit = limit
        self.grace = grace
        self.started = started
        self._lock = threading.Lock()
        self._engine: Any = None
        self._expired = False

    @classmethod
    def for_spec(
        cls, execution: _Execution, spec: dict[str, Any], started: float
    ) -> _Watchdog | None:
        """The watchdog a spec asks for (time_limit_s, else wall_limit_s), not yet started."""
        if spec["time_limit_s"] is not None:
            return cls(execution, spec["time_limit_s"], GRACE_S, started)
        if spec.get("wall_limit_s") is not None:
            return cls(execution, spec["wall_limit_s"], 0.0, started)
        return None

    def start(self) -> None:
        threading.Thread(target=self._guard, daemon=True).start()

    def interrupt_with(self, engine: Any) -> None:
        """Interrupt guests of `engine` at the deadline (at once if it has passed)."""
        with self._lock:
            self._engine = engine
            if self._expired:
                engine.increment_epoch()

    def _wait_until(self, deadline: float) -> bool:
        """Wait until `deadline`; True if the job ended first."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.execution.done.wait(min(left, _WATCHDOG_SLICE_S)):
                return True

    def _guard(self) -> None:
        execution = self.execution
        try:
            deadline = self.started + self.limit
            if self._wait_until(deadline):
                return
            if self.grace:
                with self._lock:
                    self._expired = True
                    if self._engine is not None:
                        self._engine.increment_epoch()
                if self._wait_until(deadline + self.grace):
                    return
            how = "ended while blocked in a host call" if self.grace else "ended by the watchdog"
            message = f"time limit of {self.limit:g} s exceeded ({how})"
            if execution.finish("timeout", 124, message, **execution.measures()):
                sys.stderr.flush()
                os._exit(124)
        except BaseException as exc:
            # Without its watchdog the job would have no limit at all: end it instead.
            traceback.print_exc()
            error = _one_line(f"runner error: the time-limit watchdog failed: {exc}")
            if execution.finish("failed", 1, error, **execution.measures()):
                sys.stderr.flush()
                os._exit(1)


class _OutputLimit:
    """Holds a job to its max_output_bytes: stdout + stderr + /output, apparent sizes.

    Each file is held to the cap by RLIMIT_FSIZE, with SIGXFSZ caught (not fatal: the
    write fails with EFBIG) and reported through a wakeup pipe, so a write refused in any
    thread is seen at once. A monitor thread also sums the sizes, for a total spread over
    several files. Past the cap the job's result is written, then the process ends, as
    the watchdog does; the disk holds at most about the cap.
    """

    def __init__(self, execution: _Execution, max_bytes: int, output_dir: str | None) -> None:
        self.execution = execution
        self.max_bytes = max_bytes
        self.output_dir = output_dir
        self.hit = False
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    @property
    def message(self) -> str:
        """The job's error once over the cap."""
        return (
            f"output limit of {_format_mb(self.max_bytes)} MB exceeded "
            f"(stdout, stderr and /output together)"
        )

    def start(self) -> None:
        """Apply the file size limit and start the monitor; call in the main thread."""
        import resource

        signal.signal(signal.SIGXFSZ, _ignore_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if self.max_bytes < (hard if hard != resource.RLIM_INFINITY else 1 << 62):
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_bytes, hard))
        threading.Thread(target=self._monitor, daemon=True).start()

    def used(self) -> int:
        """Apparent bytes of the job's stdout, stderr and /output so far."""
        job_dir = self.execution.job_dir
        total = 0
        for name in ("stdout", "stderr"):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(job_dir, name)).st_size
        if self.output_dir is not None:
            total += _tree_bytes(self.output_dir, self.max_bytes - total)
        return total

    def exceeded(self) -> bool:
        """Whether the job went past the cap (a refused write or a total over it)."""
        if not self.hit:
            self.hit = self._write_refused() or self.used() > self.max_bytes
        return self.hit

    def _write_refused(self) -> bool:
        """Whether SIGXFSZ came (the wakeup pipe carries the numbers of caught signals)."""
        try:
            if signal.SIGXFSZ in os.read(self._wake_r, 4096):
                self.hit = True
        except BlockingIOError:
            pass
        return self.hit

    def _monitor(self) -> None:
        pause = OUTPUT_CHECK_S
        while not self.execution.done.is_set():
            select.select([self._wake_r], [], [], pause)
            if self.execution.done.is_set():
                return
            started = time.monotonic()
            over = self._write_refused() or self.used() > self.max_bytes
            # A job with many files makes the sum slow: look less often rather than
            # spend the host's cpu on it.
            pause = max(OUTPUT_CHECK_S, 4 * (time.monotonic() - started))
            if over:
                self.hit = True
                if self.execution.finish("failed", None, self.message, **self.execution.measures()):
                    sys.stderr.flush()
                    os._exit(1)
                return


def _format_mb(size: int) -> str:
    return f"{size / (1 << 20):g}"


def _tree_bytes(root: str, stop_above: int) -> int:
    """Apparent size of the regular files under `root` (links not followed); stops early
    once past `stop_above`, since the caller only needs to know that."""
    total = 0
    pending = [root]
    while pending and total <= stop_above:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _load_module(
    wasmtime: Any,
    engine: Any,
    module_path: str,
    cache_path: str,
    log: Callable[[str], None] = _log_to_stderr,
) -> tuple[Any, float, bool]:
    """The compiled module, from the precompiled cache when it can; (module, compile_s, hit)."""
    if os.path.isfile(cache_path):
        try:
            return wasmtime.Module.deserialize_file(engine, cache_path), 0.0, True
        except wasmtime.WasmtimeError as exc:
            log(f"precompiled cache unusable, recompiling: {_one_line(str(exc))}")
    with open(module_path, "rb") as module_file:
        wasm = module_file.read()
    started = time.monotonic()
    module = wasmtime.Module(engine, wasm)
    compile_s = time.monotonic() - started
    try:
        os.makedirs(os.path.dirname(cache_path), mode=0o700, exist_ok=True)
        # Durable: a torn artifact after a crash would be loaded as machine code.
        _replace_atomically(cache_path, bytes(module.serialize()), durable=True)
    except OSError as exc:
        # The cache only saves time: a full disk must not fail the job.
        log(f"cannot write precompiled cache: {exc}")
    return module, compile_s, False


class _LoadedModule:
    """A compiled module, the engine it belongs to, and what loading it cost this job."""

    def __init__(self, engine: Any, module: Any, compile_s: float, cached: bool) -> None:
        self.engine = engine
        self.module = module
        self.compile_s = compile_s
        self.cached = cached


class _Runtime:
    """wasmtime, imported: one Engine per epoch setting, and the host's module caches."""

    def __init__(self, wasmtime: Any, workdir: str) -> None:
        self.wasmtime = wasmtime
        self.workdir = workdir
        self.version = _wasmtime_version() or "unknown"
        self._engines: dict[bool, Any] = {}

    def config(self, epoch: bool) -> Any:
        config = self.wasmtime.Config()
        # Epoch checks cost up to 17% on loops, so only pay for them with a time limit.
        config.epoch_interruption = epoch
        return config

    def engine(self, epoch: bool) -> Any:
        engine = self._engines.get(epoch)
        if engine is None:
            engine = self._engines[epoch] = self.wasmtime.Engine(self.config(epoch))
        return engine

    def module_paths(self, sha: str, epoch: bool) -> tuple[str, str]:
        """(uploaded .wasm, precompiled .cwasm keyed by wasmtime version and engine flags)."""
        flags = "epoch" if epoch else "noepoch"
        safe_version = re.sub(r"[^A-Za-z0-9.+_-]", "_", self.version)
        cache = os.path.join(self.workdir, "cache", f"{sha}-{safe_version}-{flags}.cwasm")
        return os.path.join(self.workdir, "wasm", f"{sha}.wasm"), cache

    def load(
        self, sha: str, epoch: bool, log: Callable[[str], None] = _log_to_stderr
    ) -> _LoadedModule:
        """The module of hash `sha` for an engine with or without epoch interruption."""
        module_path, cache_path = self.module_paths(sha, epoch)
        engine = self.engine(epoch)
        module, compile_s, cached = _load_module(
            self.wasmtime, engine, module_path, cache_path, log
        )
        return _LoadedModule(engine, module, compile_s, cached)


def _linear_memory_bytes(wasmtime: Any, instance: Any, store: Any) -> int | None:
    if instance is None:
        return None
    try:
        memory = instance.exports(store).get("memory")
        if isinstance(memory, wasmtime.Memory):
            return int(memory.data_len(store))
    except Exception:
        traceback.print_exc()
    return None


def _stderr_tail(job_dir: str) -> bytes:
    try:
        with open(os.path.join(job_dir, "stderr"), "rb") as stderr:
            stderr.seek(0, os.SEEK_END)
            stderr.seek(max(0, stderr.tell() - 4096))
            return stderr.read()
    except OSError:
        return b""


def looks_out_of_memory(peak_bytes: int | None, limit_bytes: int, stderr_tail: bytes) -> bool:
    """Whether a failed run failed for want of memory: at the limit, or said so on stderr."""
    if peak_bytes is not None and limit_bytes - peak_bytes <= 1 << 20:
        return True
    return _OOM_STDERR_RE.search(stderr_tail.lower()) is not None


def guest_limits(memory_mb: int) -> dict[str, int]:
    """wasmtime Store.set_limits arguments holding everything a guest can allocate to
    `memory_mb`: its one linear memory, plus one table of at most an eighth of that."""
    limit_bytes = memory_mb << 20
    return {
        "memory_size": limit_bytes,
        "memories": GUEST_MEMORIES,
        "tables": GUEST_TABLES,
        "table_elements": limit_bytes // TABLE_SHARE_OF_MEMORY // TABLE_ELEMENT_BYTES,
        "instances": GUEST_INSTANCES,
    }


def _run_module(
    execution: _Execution,
    runtime: _Runtime,
    loaded: _LoadedModule,
    spec: dict[str, Any],
    watchdog: _Watchdog | None,
) -> None:
    """Run the job's module once in this process and write its result: the part of a job
    that execute and serve share. `watchdog` (already started) enforces its time limit."""
    job_dir = execution.job_dir
    wasmtime = runtime.wasmtime
    engine = loaded.engine
    limit: float | None = spec["time_limit_s"]
    memory_mb: int = spec["memory_mb"]
    execution.facts.update(module_compile_s=round(loaded.compile_s, 6), module_cached=loaded.cached)

    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    limit_bytes = memory_mb << 20
    store.set_limits(**guest_limits(memory_mb))
    wasi = wasmtime.WasiConfig()
    # Exactly the argv and env of the spec: nothing of this process's environment.
    wasi.argv = spec["argv"]
    wasi.env = [(name, value) for name, value in spec["env"]]
    stdin_path = os.path.join(job_dir, "stdin")
    if os.path.isfile(stdin_path):
        wasi.stdin_file = stdin_path
    wasi.stdout_file = os.path.join(job_dir, "stdout")
    wasi.stderr_file = os.path.join(job_dir, "stderr")
    # Only what was staged: without these the guest sees no filesystem at all.
    if spec.get("input"):
        wasi.preopen_dir(os.path.join(job_dir, "input"), "/input", False)
    if spec.get("output"):
        wasi.preopen_dir(os.path.join(job_dir, "output"), "/output", True)
    store.set_wasi(wasi)

    if limit is not None:
        store.set_epoch_deadline(1)
        if watchdog is not None:
            # At the time left of the limit, which loading the module has used up in part.
            watchdog.interrupt_with(engine)
    output_limit: _OutputLimit | None = None
    if spec.get("max_output_bytes"):
        output_dir = os.path.join(job_dir, "output") if spec.get("output") else None
        output_limit = _OutputLimit(execution, spec["max_output_bytes"], output_dir)
        output_limit.start()
    execution.begin_run()

    instance = None
    exit_code: int | None
    state, exit_code, error = "succeeded", 0, None
    try:
        instance = linker.instantiate(store, loaded.module)
        start = instance.exports(store).get("_start")
        if not isinstance(start, wasmtime.Func):
            state, exit_code, error = "failed", 1, "the module has no _start: not a WASI command"
        else:
            start(store)
    except wasmtime.ExitTrap as exc:
        if exc.code != 0:
            state, exit_code = "failed", exc.code
    except wasmtime.Trap as exc:
        if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
            state, exit_code, error = "timeout", 124, f"time limit of {limit:g} s exceeded"
        else:
            name = exc.trap_code.name if exc.trap_code is not None else "TRAP"
            detail = _one_line(str(exc))
            if detail.startswith("wasm trap: "):
                detail = detail[len("wasm trap: ") :]
            # 134 (SIGABRT's status) is what the wasmtime CLI reports for a trap.
            state, exit_code, error = "failed", 134, f"{name}: {detail}"
    except wasmtime.WasmtimeError as exc:
        message = _one_line(str(exc))
        too_small = _MIN_MEMORY_RE.search(message)
        if instance is None and too_small:
            need_mb = math.ceil(int(too_small.group(1)) * _WASM_PAGE_BYTES / (1 << 20))
            state, exit_code = "out_of_memory", 1
            error = (
                f"the module needs at least {need_mb} MiB of memory to start; "
                f"the limit is {memory_mb} MiB"
            )
        elif instance is None and _STORE_LIMIT_RE.search(message):
            state, exit_code = "out_of_memory", 1
            error = (
                f"the module asks for more than a job may have ({message}): one linear "
                f"memory of up to {memory_mb} MiB and one table of up to "
                f"{guest_limits(memory_mb)['table_elements']} elements"
            )
        else:
            state, exit_code, error = "failed", 1, message
    finally:
        execution.done.set()
    measures = execution.measures()
    peak = _linear_memory_bytes(wasmtime, instance, store)
    if output_limit is not None and output_limit.exceeded():
        state, exit_code, error = "failed", None, output_limit.message
    elif state == "failed" and looks_out_of_memory(peak, limit_bytes, _stderr_tail(job_dir)):
        state = "out_of_memory"
        cause = error or f"exit code {exit_code}"
        error = f"out of memory (limit {memory_mb} MiB): {cause}"
    execution.finish(state, exit_code, error, peak_memory_bytes=peak, **measures)


def _run_job(execution: _Execution) -> None:
    """execute's job: import wasmtime, load the module, run it."""
    started = time.monotonic()
    job_dir = execution.job_dir
    with open(os.path.join(job_dir, "spec.json"), "rb") as spec_file:
        spec = json.loads(spec_file.read())
    # Before the module is loaded: a module that takes long to compile counts against the
    # time limit (and the wall-clock cap) like a guest that runs long.
    watchdog = _Watchdog.for_spec(execution, spec, started)
    if watchdog is not None:
        watchdog.start()
    try:
        import wasmtime
    except ImportError as exc:
        execution.finish("failed", 1, f"cannot import wasmtime with {sys.executable}: {exc}")
        return
    runtime = _Runtime(wasmtime, os.path.dirname(os.path.dirname(job_dir)))
    execution.facts["wasmtime_version"] = runtime.version
    try:
        loaded = runtime.load(spec["wasm_sha256"], spec["time_limit_s"] is not None)
    except (wasmtime.WasmtimeError, OSError) as exc:
        execution.finish("failed", 1, f"cannot load the module: {_one_line(str(exc))}")
        return
    _run_module(execution, runtime, loaded, spec, watchdog)


def _execute(job_dir: str, run: Callable[[_Execution], None]) -> NoReturn:
    """Be the job's process: record the pid, run, make sure of a result, and exit at once."""
    try:
        _write_pid_file(job_dir, os.getpid())
    except OSError:
        traceback.print_exc()
    execution = _Execution(job_dir)
    try:
        # A cancel that came before we started has written the result already.
        if not os.path.exists(execution.result_path):
            run(execution)
    except BaseException as exc:
        traceback.print_exc()
        error = _one_line(f"runner error: {type(exc).__name__}: {exc}")
        execution.finish("failed", 1, error, **execution.measures())
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        # Skips interpreter teardown, where wasmtime's tokio threads can panic (pitfall 5).
        os._exit(0)


def _cmd_execute(job_dir_argument: str) -> NoReturn:
    _execute(os.path.abspath(job_dir_argument), _run_job)


# ----------------------------------------------------------------------------- serve


def _log_appender(path: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        with contextlib.suppress(OSError), open(path, "a") as log_file:
            log_file.write(line + "\n")

    return log


def _ignore_signal(signum: int, frame: Any) -> None:
    """A Python-level handler, so that the signal reaches the wakeup fd."""


class _ServeRuntime(_Runtime):
    """serve's runtime: wasmtime imported once, engines and modules kept across tasks.

    serve forks a child per task, and a child inherits none of its parent's threads, only
    their bookkeeping: it hangs at the first use of a thread pool whose threads existed in
    the parent. Measured with wasmtime-py 50: running a guest starts a tokio pool (forked
    children then hang in WASI calls), compiling starts a compile pool, while importing,
    creating engines and deserializing start no thread. So this process only deserializes;
    a module missing from the precompiled cache is compiled by a short-lived forked helper
    (in parallel, as execute does) that writes the cache; guests run only in the children.
    """

    def __init__(self, wasmtime: Any, workdir: str) -> None:
        super().__init__(wasmtime, workdir)
        self._modules: dict[tuple[str, bool], _LoadedModule] = {}

    def config(self, epoch: bool) -> Any:
        config = super().config(epoch)
        # Compiling here happens only if the helper could not fill the cache: then serially,
        # so that no thread pool is left behind.
        config.parallel_compilation = False
        return config

    def load_for_task(
        self, sha: str, epoch: bool, log_path: str, deadline: float | None
    ) -> _LoadedModule:
        """The module for a task, loaded once per serve; what loading cost goes to the first.

        A compile that runs past `deadline` (time.monotonic) is killed: _CompileTimeout.
        """
        known = self._modules.get((sha, epoch))
        if known is not None:
            return _LoadedModule(known.engine, known.module, 0.0, True)
        module_path, cache_path = self.module_paths(sha, epoch)
        helper_s = 0.0
        if not os.path.isfile(cache_path):
            helper_s = self._compile_in_helper(epoch, module_path, cache_path, log_path, deadline)
        loaded = self.load(sha, epoch, _log_appender(log_path))
        if helper_s and loaded.cached:
            loaded = _LoadedModule(loaded.engine, loaded.module, helper_s, False)
        self._modules[(sha, epoch)] = loaded
        return loaded

    def _compile_in_helper(
        self,
        epoch: bool,
        module_path: str,
        cache_path: str,
        log_path: str,
        deadline: float | None,
    ) -> float:
        started = time.monotonic()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    os.dup2(log_fd, 2)
                    engine = self.wasmtime.Engine(_Runtime.config(self, epoch))
                    _load_module(self.wasmtime, engine, module_path, cache_path)
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(0)
        finally:
            os.close(log_fd)
        if not _wait_for_child(pid, deadline):
            # A compile bomb must not hold serve (and every task behind it) past the limit.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise _CompileTimeout
        return time.monotonic() - started


class _CompileTimeout(Exception):
    """serve's compile helper ran past the task's time limit and was killed."""


def _wait_for_child(pid: int, deadline: float | None) -> bool:
    """Reap child `pid`; False if `deadline` (time.monotonic) came first (it still runs)."""
    if deadline is None:
        os.waitpid(pid, 0)
        return True
    delay = POLL_MIN_S
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, POLL_MAX_S)
    return True


class _NotLoaded:
    """How a serve task ends whose module could not be loaded (it still gets S, then R)."""

    def __init__(self, state: str, exit_code: int, error: str) -> None:
        self.state = state
        self.exit_code = exit_code
        self.error = error


class _ServeTask:
    """A task serve forked, until its result has been sent."""

    def __init__(self, key: str, job_dir: str) -> None:
        self.key = key
        self.job_dir = job_dir
        self.status = 0
        self.ended_at = 0.0


def _describe_wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


class _Server:
    """The serve command: launch requests in, one forked child per task, results out."""

    def __init__(self, writer: _FrameWriter, workdir: str, stdin_fd: int) -> None:
        self.writer = writer
        self.workdir = workdir
        self.stdin_fd = stdin_fd
        self.runtime: _ServeRuntime | None = None
        self.accepting = True
        self.coordinator_gone = False
        self.running: dict[int, _ServeTask] = {}
        self.ended: list[_ServeTask] = []
        self.decoder = FrameDecoder(SERVE_MAX_REQUEST_BYTES)
        self._wake_r, self._wake_w = os.pipe()

    def serve(self) -> int:
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        # SIGCHLD writes a byte to the pipe, so select() wakes when a task ends.
        previous = signal.signal(signal.SIGCHLD, _ignore_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            while self.accepting or self.running or self.ended:
                readable = [self._wake_r] + ([self.stdin_fd] if self.accepting else [])
                ready, _, _ = select.select(readable, [], [], self._settle_timeout())
                if self._wake_r in ready:
                    with contextlib.suppress(OSError):
                        while os.read(self._wake_r, 4096):
                            pass
                try:
                    self._reap()
                    if self.stdin_fd in ready:
                        self._read_requests()
                    self._settle()
                except _CoordinatorGone:
                    self._lose_coordinator()
        finally:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, previous)
            os.close(self._wake_r)
            os.close(self._wake_w)
        return 0

    # -- requests

    def _read_requests(self) -> None:
        try:
            data = os.read(self.stdin_fd, 1 << 16)
        except OSError:
            data = b""
        if not data:
            self.accepting = False  # EOF: finish what runs, then exit
            return
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self._refuse_session("protocol", exc)
            return
        for kind, payload in frames:
            if not self.accepting:
                return
            if kind == KIND_HELLO:
                self._hello(payload)
            elif kind == KIND_LAUNCH and self.runtime is not None:
                self._launch(payload)
            elif kind == KIND_LAUNCH:
                self._refuse_session("protocol", "an L request came before the H handshake")
            else:
                self._refuse_session("protocol", f"unknown request kind {kind!r}")

    def _refuse_session(self, kind: str, message: object) -> None:
        """An X frame about no task (empty key); after a protocol error, accept nothing more."""
        self.writer.send_keyed(KIND_ERROR, "", _error_json(kind, message))
        if kind == "protocol":
            self.accepting = False

    def _hello(self, payload: bytes) -> None:
        if self.runtime is not None:
            self._refuse_session("protocol", "a second H handshake")
            return
        try:
            value = json.loads(payload)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            self._refuse_session("protocol", f"unreadable H handshake: {exc}")
            return
        if value.get("runner_version") != runner_version():
            self.writer.send_json(KIND_NEED, {"need": "runner"})
            self.accepting = False
            return
        try:
            import wasmtime
        except Exception as exc:
            error = _one_line(f"cannot import wasmtime with {sys.executable}: {exc}")
            self._send_hello(_wasmtime_version(), error)
            self.accepting = False
            return
        self.runtime = _ServeRuntime(wasmtime, self.workdir)
        self._send_hello(self.runtime.version, None)

    def _send_hello(self, version: str | None, error: str | None) -> None:
        hello = {"pid": os.getpid(), "wasmtime_version": version, "error": error}
        self.writer.send_json(KIND_HELLO, hello)

    def _launch(self, payload: bytes) -> None:
        started = time.monotonic()
        runtime = self.runtime
        assert runtime is not None
        line, _, rest = payload.partition(b"\n")
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError("the spec is not a JSON object")
        except ValueError as exc:
            self._refuse_session("spec", f"unreadable launch spec: {exc}")
            return
        key = raw.get("key")
        if not isinstance(key, str) or not _JOB_ID_RE.fullmatch(key):
            self._refuse_session("spec", f"invalid key {key!r}: the job id of the task")
            return
        job_dir = os.path.join(self.workdir, "jobs", key)
        try:
            spec = _set_up_job(self.workdir, job_dir, raw, io.BytesIO(rest), check_wasmtime=False)
        except _LaunchRefused as refused:
            self.writer.send_keyed(refused.frame_kind, key, json.dumps(refused.answer).encode())
            return
        log_path = os.path.join(job_dir, "runner.log")
        # As under execute, loading the module counts against the task's time limit.
        limit, grace = spec["time_limit_s"], GRACE_S
        if limit is None:
            limit, grace = spec["wall_limit_s"], 0.0
        deadline = None if limit is None else started + limit + grace
        loaded: _LoadedModule | _NotLoaded
        try:
            loaded = runtime.load_for_task(
                spec["wasm_sha256"], spec["time_limit_s"] is not None, log_path, deadline
            )
        except _CompileTimeout:
            error = f"time limit of {limit:g} s exceeded while compiling the module"
            loaded = _NotLoaded("timeout", 124, error)
        except (runtime.wasmtime.WasmtimeError, OSError) as exc:
            # As under execute: the task runs and fails with this as its result.
            loaded = _NotLoaded("failed", 1, f"cannot load the module: {_one_line(str(exc))}")
        try:
            pid = self._fork_task(job_dir, spec, loaded, log_path, started)
        except OSError as exc:
            shutil.rmtree(job_dir, ignore_errors=True)
            self.writer.send_keyed(KIND_ERROR, key, _error_json("io", exc))
            return
        self.running[pid] = _ServeTask(key, job_dir)
        answer = {"pid": pid, "job_dir": job_dir}
        self.writer.send_keyed(KIND_STARTED, key, json.dumps(answer).encode())

    # -- tasks

    def _fork_task(
        self,
        job_dir: str,
        spec: dict[str, Any],
        loaded: _LoadedModule | _NotLoaded,
        log_path: str,
        started: float,
    ) -> int:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                self._become_task(job_dir, spec, loaded, log_fd, started)
        finally:
            os.close(log_fd)
        with contextlib.suppress(OSError):
            # The child writes it too; writing it here means it exists once S is sent.
            _write_pid_file(job_dir, pid)
        return pid

    def _become_task(
        self,
        job_dir: str,
        spec: dict[str, Any],
        loaded: _LoadedModule | _NotLoaded,
        log_fd: int,
        started: float,
    ) -> NoReturn:
        """In the forked child: detach from serve's session and streams, then run the task
        exactly as execute would. Never returns into serve's loop."""
        runtime = self.runtime
        try:
            # A new session: cancel kills its group, and serve's end does not reach it.
            os.setsid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            # Serve's frames are not ours to read or write: stdin and stdout become
            # /dev/null, stderr the job's runner.log, as for an execute process.
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(log_fd, 2)
            os.close(devnull)
            os.close(log_fd)
            os.chdir("/")
        except BaseException:
            os._exit(1)

        def run(execution: _Execution) -> None:
            assert runtime is not None
            execution.facts["wasmtime_version"] = runtime.version
            if isinstance(loaded, _NotLoaded):
                execution.finish(loaded.state, loaded.exit_code, loaded.error)
                return
            # Counted from when serve got the task, so the time its module took to load is
            # not given again.
            watchdog = _Watchdog.for_spec(execution, spec, started)
            if watchdog is not None:
                watchdog.start()
            _run_module(execution, runtime, loaded, spec, watchdog)

        _execute(job_dir, run)

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            task = self.running.pop(pid, None)
            if task is not None:
                task.status, task.ended_at = status, time.monotonic()
                self.ended.append(task)

    def _settle_timeout(self) -> float | None:
        if not self.ended:
            return None
        first = min(task.ended_at for task in self.ended)
        return max(0.01, first + DEAD_GRACE_S - time.monotonic())

    def _settle(self) -> None:
        """Send the outcome of every ended task whose result is on disk."""
        now = time.monotonic()
        for task in list(self.ended):
            result_path = os.path.join(task.job_dir, "result.json")
            if not os.path.exists(result_path):
                # A cancel kills first and writes its result next: give it that moment.
                if now - task.ended_at < DEAD_GRACE_S:
                    continue
                reason = "runner process died without a result"
                with contextlib.suppress(OSError):
                    _write_died_result(
                        task.job_dir, f"{reason} ({_describe_wait_status(task.status)})"
                    )
            self.ended.remove(task)
            if not self.coordinator_gone:
                self._send_outcome(task, result_path)

    def _send_outcome(self, task: _ServeTask, result_path: str) -> None:
        for name, kind in (("stdout", KIND_STDOUT), ("stderr", KIND_STDERR)):
            self._send_file(kind, task.key, os.path.join(task.job_dir, name))
        try:
            result = _read_result(result_path)
        except OSError as exc:
            result = _make_result("failed", None, f"cannot read the result: {exc}")
        self.writer.send_keyed(KIND_RESULT, task.key, result)

    def _send_file(self, kind: bytes, key: str, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # the task ended before its output files were made
        try:
            offset = 0
            while True:
                chunk = os.pread(fd, CHUNK_BYTES, offset)
                if not chunk:
                    return
                self.writer.send_keyed(kind, key, chunk)
                offset += len(chunk)
        finally:
            os.close(fd)

    def _lose_coordinator(self) -> None:
        # The tasks keep running and write their results to disk; serve stays only to reap.
        self.coordinator_gone = True
        self.accepting = False
        _detach_stdout()


def _error_json(kind: str, message: object) -> bytes:
    return json.dumps({"error": _one_line(str(message)), "kind": kind}).encode()


def _cmd_serve(writer: _FrameWriter, workdir_argument: str) -> int:
    try:
        return _Server(writer, _workdir(workdir_argument), sys.stdin.fileno()).serve()
    except OSError as exc:
        # Tasks already forked run on and write their results; attach collects them.
        writer.send_keyed(KIND_ERROR, "", _error_json("io", exc))
        return 0


# ------------------------------------------------------------------------------ main

_FRAME_COMMANDS: dict[str, tuple[str, Callable[..., int]]] = {
    "launch": ("WORKDIR JOB_ID", _cmd_launch),
    "serve": ("WORKDIR", _cmd_serve),
    "attach": ("WORKDIR JOB_ID STDOUT_OFFSET STDERR_OFFSET", _cmd_attach),
    "poll": ("WORKDIR JOB_ID STDOUT_OFFSET STDERR_OFFSET", _cmd_poll),
}
_TEXT_COMMANDS: dict[str, tuple[str, Callable[..., int]]] = {
    "fetch-output": ("WORKDIR JOB_ID [MAX_BYTES]", _cmd_fetch_output),
    "put-module": ("WORKDIR SHA256", _cmd_put_module),
    "cancel": ("WORKDIR JOB_ID", _cmd_cancel),
    "info": ("", _cmd_info),
    "execute": ("JOB_DIR", _cmd_execute),
}


def _refuse_unsafe_workdir(name: str, params: list[str]) -> int | None:
    """Refuse a command whose workdir (its first argument) is unsafe: an X frame of kind
    "workdir" for a frame command, else a line on stderr; returns the exit status then."""
    arg_names = {**_FRAME_COMMANDS, **_TEXT_COMMANDS}[name][0].split()
    if not arg_names or arg_names[0] != "WORKDIR":
        return None
    problem = workdir_problem(_workdir(params[0]))
    if problem is None:
        return None
    if name in _FRAME_COMMANDS:
        writer = _FrameWriter(sys.stdout.buffer)
        with contextlib.suppress(_CoordinatorGone):
            if name == "serve":
                writer.send_keyed(KIND_ERROR, "", _error_json("workdir", problem))
            else:
                writer.send_error("workdir", problem)
    else:
        print(f"sshwasm-exec: error: {problem}", file=sys.stderr)
    return UNSAFE_WORKDIR_EXIT


def _usage() -> str:
    commands = {**_FRAME_COMMANDS, **_TEXT_COMMANDS}
    return "\n".join(
        f"usage: sshwasm-exec {name} {args}".rstrip() for name, (args, _) in commands.items()
    )


def main(argv: list[str] | None = None) -> int:
    """Run one sshwasm-exec command and return its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Job output and modules are private to the account: dirs 0700, files 0600.
    os.umask(0o077)
    if not args or args[0] not in {**_FRAME_COMMANDS, **_TEXT_COMMANDS}:
        print(_usage(), file=sys.stderr)
        return 2
    name, params = args[0], args[1:]
    is_frame_command = name in _FRAME_COMMANDS
    arg_names, handler = (_FRAME_COMMANDS if is_frame_command else _TEXT_COMMANDS)[name]
    words = arg_names.split()
    required = [word for word in words if not word.startswith("[")]
    if not len(required) <= len(params) <= len(words):
        print(f"usage: sshwasm-exec {name} {arg_names}".rstrip(), file=sys.stderr)
        return 2
    refusal = _refuse_unsafe_workdir(name, params)
    if refusal is not None:
        return refusal
    try:
        if is_frame_command:
            writer = _FrameWriter(sys.stdout.buffer)
            try:
                return handler(writer, *params)
            except OSError as exc:
                writer.send_error("io", exc)
                return 0
        return handler(*params)
    except _UsageError as exc:
        print(f"sshwasm-exec: error: {exc}", file=sys.stderr)
        return 2
    except (_CoordinatorGone, BrokenPipeError):
        _detach_stdout()
        return 0
    except OSError as exc:
        print(f"sshwasm-exec: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
