"""Frames to the coordinator (FrameWriter), and a job's output and result as one stream:
attach follows it to its end, poll sends what there is now."""

from __future__ import annotations

import errno
import json
import os
import select
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from .jobdir import DEAD_GRACE_S, _executor_death, _job_dir, _offset, _one_line, _write_died_result
from .protocol import (
    CHUNK_BYTES,
    KIND_ALIVE,
    KIND_ERROR,
    KIND_RESULT,
    KIND_STDERR,
    KIND_STDOUT,
    encode_frame,
)
from .safetar import write_all

POLL_MIN_S = 0.002
POLL_MAX_S = 0.05


class _CoordinatorGone(Exception):
    """Our stdout is closed: the coordinator went away (the detached job keeps running)."""


class _FrameWriter:
    """Writes whole frames to stdout's descriptor; turns a broken pipe into _CoordinatorGone.

    Frames go to the file descriptor with os.write, not through the stream's buffer: serve
    has a Python-level SIGCHLD handler, and a write of a 64 KiB frame to a full pipe that the
    signal interrupts after moving part of it returns early. CPython's BufferedWriter then
    lost the rest of the frame (measured on 3.11.7: a few bytes of one frame in about one
    serve session of 20 under load, and 2.7% of all bytes in a reproducer that writes
    64 KiB frames while children exit), and the coordinator read garbage after it.
    """

    def __init__(self, stream: BinaryIO) -> None:
        stream.flush()
        self._stream = stream
        self._fd = stream.fileno()

    def send(self, kind: bytes, payload: bytes) -> None:
        self.send_raw(encode_frame(kind, payload))

    def send_raw(self, frames: bytes) -> None:
        """Whole encoded frames in one write (serve answers several tasks at once)."""
        try:
            write_all(self._fd, frames)
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
            poller.register(self._fd, select.POLLOUT)
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


def _cmd_stream(
    writer: _FrameWriter, workdir: str, job_id: str, out: str, err: str, *, follow: bool
) -> int:
    """attach (follow=True: until the result) and poll (what there is now, then R or A)."""
    job_dir = _job_dir(workdir, job_id)
    offsets = (_offset(out), _offset(err))
    if not os.path.isdir(job_dir):
        writer.send_error("missing", f"no job directory {job_dir}")
        return 0
    _stream_job(writer, job_dir, offsets, lambda: _executor_death(job_dir), follow=follow)
    return 0
