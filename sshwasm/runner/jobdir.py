"""The workdir and job directories: which paths the runner trusts, files written whole
(atomically), the job process's pid files, and results written for a job that cannot write
its own."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import sys
import time
from datetime import datetime, timezone
from typing import Any

from .protocol import RESULT_KEYS

DEAD_GRACE_S = 0.5
STARTUP_GRACE_S = 10.0

# A job id, the name of its job directory (and a serve task's key): never a path.
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class _UsageError(Exception):
    """A command-line argument is malformed."""


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
    if not JOB_ID_RE.fullmatch(job_id):
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


def _describe_wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _error_json(kind: str, message: object) -> bytes:
    return json.dumps({"error": _one_line(str(message)), "kind": kind}).encode()
