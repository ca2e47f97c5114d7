#!/usr/bin/env python3
"""sshwasm-exec: the worker side of sshwasm, one file needing only the stdlib and wasmtime.

Commands (argv never carries user-controlled words; those come as JSON on stdin):

    launch WORKDIR JOB_ID            stdin: a spec JSON line, then the job's stdin bytes
    attach WORKDIR JOB_ID OUT ERR    stream output from byte offsets until the result
    poll WORKDIR JOB_ID OUT ERR      send the output there is now, then the result or liveness
    put-module WORKDIR SHA256        stdin: module bytes, kept as WORKDIR/wasm/SHA256.wasm
    cancel WORKDIR JOB_ID            kill a running job and record it as cancelled
    info                             one JSON line describing this host
    execute JOB_DIR                  internal: the detached process that runs the module

launch, attach and poll answer in frames (1 byte kind, 4 bytes big-endian length, payload);
put-module, cancel and info answer in plain text. Usage errors exit 2.

Hosts may have an older Python than the coordinator: keep this file to Python 3.8 syntax
and APIs (annotations are never evaluated, thanks to the __future__ import).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, BinaryIO, NoReturn

KIND_NEED = b"N"
KIND_STARTED = b"S"
KIND_STDOUT = b"O"
KIND_STDERR = b"E"
KIND_RESULT = b"R"
KIND_ERROR = b"X"
KIND_ALIVE = b"A"

CHUNK_BYTES = 64 * 1024
# Far above any real frame (output chunks are 64 KiB): a bigger length means the stream is
# not ours, e.g. a login shell printed a banner before the runner started.
MAX_FRAME_BYTES = 16 << 20
GRACE_S = 1.0
DEAD_GRACE_S = 0.5
STARTUP_GRACE_S = 10.0
POLL_MIN_S = 0.002
POLL_MAX_S = 0.05
KILL_WAIT_S = 2.0

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
_WASM_PAGE_BYTES = 64 * 1024
# Resolved at import, before anything could change the working directory.
_SCRIPT_PATH = os.path.abspath(__file__)


def runner_source() -> bytes:
    """The bytes of this file: what the coordinator installs as `sshwasm-exec`."""
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


class FrameError(ValueError):
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


def _read_pid(job_dir: str) -> int | None:
    try:
        with open(os.path.join(job_dir, "pid"), "rb") as pid_file:
            pid = int(pid_file.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _is_executor(pid: int, job_dir: str) -> bool:
    """True when `pid` is alive and is the executor of `job_dir`, not a zombie or reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the pid was reused
    if not os.path.isdir("/proc/self"):
        return True  # no procfs (e.g. macOS): kill(0) is all there is
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
    pid = _read_pid(job_dir)
    if pid is None:
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
    if _is_executor(pid, job_dir):
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
) -> None:
    """Send output from `offsets`; then R, or with follow=False an A frame if still running."""
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
            time.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)
    finally:
        for tail in tails:
            tail.close()


# -------------------------------------------------------------------------- commands


def _validate_spec(raw: dict[str, Any]) -> dict[str, Any]:
    """The launch spec with every field checked; raises ValueError naming the bad field."""

    def is_text(value: object) -> bool:
        return isinstance(value, str) and "\0" not in value

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
    if limit is not None and (
        type(limit) not in (int, float) or not math.isfinite(limit) or limit <= 0
    ):
        raise ValueError("time_limit_s must be a positive number or null")
    has_stdin = raw.get("has_stdin")
    if not isinstance(has_stdin, bool):
        raise ValueError("has_stdin must be true or false")
    return {
        "runner_version": raw["runner_version"],
        "wasm_sha256": sha,
        "argv": argv,
        "env": env,
        "memory_mb": memory_mb,
        "time_limit_s": None if limit is None else float(limit),
        "has_stdin": has_stdin,
    }


def _copy_to_file(source: BinaryIO, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while chunk := source.read(1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _spawn_executor(job_dir: str) -> subprocess.Popen[bytes]:
    log_fd = os.open(
        os.path.join(job_dir, "runner.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    try:
        # A new session: neither the SSH channel closing nor a hangup signal reaches it.
        return subprocess.Popen(
            [sys.executable, _SCRIPT_PATH, "execute", job_dir],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_fd,
            close_fds=True,
            start_new_session=True,
            cwd="/",
        )
    finally:
        os.close(log_fd)


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
    if raw.get("runner_version") != runner_version():
        writer.send_json(KIND_NEED, {"need": "runner"})
        return 0
    try:
        spec = _validate_spec(raw)
    except ValueError as exc:
        writer.send_error("spec", f"invalid launch spec: {exc}")
        return 0
    if not os.path.isfile(os.path.join(workdir, "wasm", f"{spec['wasm_sha256']}.wasm")):
        writer.send_json(KIND_NEED, {"need": "module"})
        return 0
    problem = _wasmtime_problem()
    if problem is not None:
        writer.send_error("no_wasmtime", problem)
        return 0
    try:
        os.makedirs(os.path.join(workdir, "jobs"), mode=0o700, exist_ok=True)
    except OSError as exc:
        writer.send_error("io", exc)
        return 0
    try:
        os.mkdir(job_dir, 0o700)
    except FileExistsError:
        writer.send_error("exists", f"job directory {job_dir} already exists")
        return 0
    except OSError as exc:
        writer.send_error("io", exc)
        return 0
    try:
        _write_new_file(os.path.join(job_dir, "spec.json"), _json_bytes(spec))
        if spec["has_stdin"]:
            _copy_to_file(stdin, os.path.join(job_dir, "stdin"))
        executor = _spawn_executor(job_dir)
    except OSError as exc:
        # Nothing runs yet: remove the half-made job so that a retry can launch it.
        shutil.rmtree(job_dir, ignore_errors=True)
        writer.send_error("io", exc)
        return 0
    with contextlib.suppress(OSError):
        # The executor writes it too; writing it here closes the window before it starts.
        _replace_atomically(os.path.join(job_dir, "pid"), f"{executor.pid}\n".encode())
    writer.send_json(KIND_STARTED, {"pid": executor.pid, "job_dir": job_dir})

    def death() -> str | None:
        # poll() also reaps our child, which kill(0) would see as a live zombie.
        return None if executor.poll() is None else "runner process died without a result"

    _stream_job(writer, job_dir, (0, 0), death, follow=True)
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
    pid = _read_pid(job_dir)
    if pid is None or not _is_executor(pid, job_dir):
        return
    try:
        # start_new_session made it a group leader; the group takes anything it spawned.
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_WAIT_S
    while _is_executor(pid, job_dir) and time.monotonic() < deadline:
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


def _watchdog(execution: _Execution, limit: float) -> None:
    # Epoch interruption cannot reach a guest blocked in a host call (sleep, read):
    # after a grace period, record the timeout and end the whole process.
    if execution.done.wait(limit + GRACE_S):
        return
    message = f"time limit of {limit:g} s exceeded (ended while blocked in a host call)"
    if execution.finish("timeout", 124, message, **execution.measures()):
        sys.stderr.flush()
        os._exit(124)


def _load_module(
    wasmtime: Any, engine: Any, module_path: str, cache_path: str
) -> tuple[Any, float, bool]:
    """The compiled module, from the precompiled cache when it can; (module, compile_s, hit)."""
    if os.path.isfile(cache_path):
        try:
            return wasmtime.Module.deserialize_file(engine, cache_path), 0.0, True
        except wasmtime.WasmtimeError as exc:
            print(
                f"precompiled cache unusable, recompiling: {_one_line(str(exc))}", file=sys.stderr
            )
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
        print(f"cannot write precompiled cache: {exc}", file=sys.stderr)
    return module, compile_s, False


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


def _run_job(execution: _Execution) -> None:
    job_dir = execution.job_dir
    with open(os.path.join(job_dir, "spec.json"), "rb") as spec_file:
        spec = json.loads(spec_file.read())
    workdir = os.path.dirname(os.path.dirname(job_dir))
    try:
        import wasmtime
    except ImportError as exc:
        execution.finish("failed", 1, f"cannot import wasmtime with {sys.executable}: {exc}")
        return
    version = _wasmtime_version() or "unknown"
    execution.facts["wasmtime_version"] = version
    limit: float | None = spec["time_limit_s"]
    memory_mb: int = spec["memory_mb"]
    sha = spec["wasm_sha256"]

    config = wasmtime.Config()
    # Epoch checks cost up to 17% on loops, so only pay for them with a time limit.
    config.epoch_interruption = limit is not None
    engine = wasmtime.Engine(config)
    flags = "epoch" if limit is not None else "noepoch"
    safe_version = re.sub(r"[^A-Za-z0-9.+_-]", "_", version)
    cache_path = os.path.join(workdir, "cache", f"{sha}-{safe_version}-{flags}.cwasm")
    module_path = os.path.join(workdir, "wasm", f"{sha}.wasm")
    try:
        module, compile_s, cached = _load_module(wasmtime, engine, module_path, cache_path)
    except (wasmtime.WasmtimeError, OSError) as exc:
        execution.finish("failed", 1, f"cannot load the module: {_one_line(str(exc))}")
        return
    execution.facts.update(module_compile_s=round(compile_s, 6), module_cached=cached)

    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    limit_bytes = memory_mb << 20
    store.set_limits(memory_size=limit_bytes)
    wasi = wasmtime.WasiConfig()
    # Exactly the argv and env of the spec: nothing of this process's environment.
    wasi.argv = spec["argv"]
    wasi.env = [(name, value) for name, value in spec["env"]]
    stdin_path = os.path.join(job_dir, "stdin")
    if os.path.isfile(stdin_path):
        wasi.stdin_file = stdin_path
    wasi.stdout_file = os.path.join(job_dir, "stdout")
    wasi.stderr_file = os.path.join(job_dir, "stderr")
    store.set_wasi(wasi)

    timer: threading.Timer | None = None
    if limit is not None:
        store.set_epoch_deadline(1)
        timer = threading.Timer(limit, engine.increment_epoch)
        timer.daemon = True
    execution.begin_run()
    if timer is not None and limit is not None:
        timer.start()
        threading.Thread(target=_watchdog, args=(execution, limit), daemon=True).start()

    instance = None
    state, exit_code, error = "succeeded", 0, None
    try:
        instance = linker.instantiate(store, module)
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
        else:
            state, exit_code, error = "failed", 1, message
    finally:
        execution.done.set()
        if timer is not None:
            timer.cancel()
    measures = execution.measures()
    peak = _linear_memory_bytes(wasmtime, instance, store)
    if state == "failed" and looks_out_of_memory(peak, limit_bytes, _stderr_tail(job_dir)):
        state = "out_of_memory"
        cause = error or f"exit code {exit_code}"
        error = f"out of memory (limit {memory_mb} MiB): {cause}"
    execution.finish(state, exit_code, error, peak_memory_bytes=peak, **measures)


def _cmd_execute(job_dir_argument: str) -> NoReturn:
    job_dir = os.path.abspath(job_dir_argument)
    try:
        _replace_atomically(os.path.join(job_dir, "pid"), f"{os.getpid()}\n".encode())
    except OSError:
        traceback.print_exc()
    execution = _Execution(job_dir)
    try:
        # A cancel that came before we started has written the result already.
        if not os.path.exists(execution.result_path):
            _run_job(execution)
    except BaseException as exc:
        traceback.print_exc()
        error = _one_line(f"runner error: {type(exc).__name__}: {exc}")
        execution.finish("failed", 1, error, **execution.measures())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Skips interpreter teardown, where wasmtime's tokio threads can panic (pitfall 5).
        os._exit(0)


# ------------------------------------------------------------------------------ main

_FRAME_COMMANDS: dict[str, tuple[str, Callable[..., int]]] = {
    "launch": ("WORKDIR JOB_ID", _cmd_launch),
    "attach": ("WORKDIR JOB_ID STDOUT_OFFSET STDERR_OFFSET", _cmd_attach),
    "poll": ("WORKDIR JOB_ID STDOUT_OFFSET STDERR_OFFSET", _cmd_poll),
}
_TEXT_COMMANDS: dict[str, tuple[str, Callable[..., int]]] = {
    "put-module": ("WORKDIR SHA256", _cmd_put_module),
    "cancel": ("WORKDIR JOB_ID", _cmd_cancel),
    "info": ("", _cmd_info),
    "execute": ("JOB_DIR", _cmd_execute),
}


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
    if len(params) != len(arg_names.split()):
        print(f"usage: sshwasm-exec {name} {arg_names}".rstrip(), file=sys.stderr)
        return 2
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
