"""The launch command: a job directory made from a launch spec (shared with serve), then the
job's process forked from the launcher, whose output is streamed until the result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from typing import Any, BinaryIO

from .execute import _execute, _run_job
from .jobdir import (
    _describe_wait_status,
    _job_dir,
    _json_bytes,
    _one_line,
    _wasmtime_problem,
    _write_new_file,
    _write_pid_file,
)
from .protocol import KIND_ERROR, KIND_NEED, KIND_STARTED, runner_version, validate_spec
from .safetar import (
    BoundedReader,
    UnsafeArchive,
    extract_tar_safely,
    tree_manifest,
    write_all,
)
from .stream import _FrameWriter, _stream_job


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
            write_all(fd, chunk)
    finally:
        os.close(fd)


def _stage_input(source: BinaryIO, size: int, destination: str) -> None:
    os.mkdir(destination, 0o700)
    part = BoundedReader(source.read, size)
    try:
        extract_tar_safely(part, destination)  # type: ignore[arg-type]
    except UnsafeArchive as exc:
        raise _LaunchRefused.error("input", f"input refused: {exc}") from exc
    part.drain()
    if part.remaining:
        raise _LaunchRefused.error(
            "spec", f"the launch stream ended {part.remaining} bytes short of input_tar_bytes"
        )


def _stage_dirs(source: BinaryIO, dirs: list[dict[str, Any]], job_dir: str) -> None:
    """Extract each staged directory's tar (in the spec's order) to dirs/INDEX, with a
    manifest of a read-write one's files, and check each host directory exists."""
    os.mkdir(os.path.join(job_dir, "dirs"), 0o700)
    for index, entry in enumerate(dirs):
        if "host_path" in entry:
            continue
        destination = os.path.join(job_dir, "dirs", str(index))
        os.mkdir(destination, 0o700)
        part = BoundedReader(source.read, entry["tar_bytes"])
        if entry["tar_bytes"]:
            try:
                extract_tar_safely(part, destination)  # type: ignore[arg-type]
            except UnsafeArchive as exc:
                raise _LaunchRefused.error(
                    "input", f"directory for {entry['guest']} refused: {exc}"
                ) from exc
            part.drain()
        if part.remaining:
            raise _LaunchRefused.error(
                "spec", f"the launch stream ended {part.remaining} bytes short of a dir's tar"
            )
        if not entry["read_only"]:
            manifest = json.dumps(tree_manifest(destination)).encode()
            _write_new_file(os.path.join(job_dir, "dirs", f"{index}.manifest.json"), manifest)


def host_dir_problem(dirs: list[dict[str, Any]]) -> str | None:
    """Why a --host-dir of the spec cannot be preopened on this host, or None."""
    for entry in dirs:
        if "host_path" in entry:
            path = os.path.expanduser(entry["host_path"])
            if not os.path.isdir(path):
                return f"--host-dir {entry['host_path']}: no such directory on this host"
            if not os.access(path, os.R_OK | os.X_OK):
                return f"--host-dir {entry['host_path']}: not readable on this host"
    return None


def _set_up_job(
    workdir: str,
    job_dir: str,
    raw: dict[str, Any],
    source: BinaryIO,
    *,
    check_wasmtime: bool,
    jobs_dir_made: bool = False,
) -> dict[str, Any]:
    """Check a launch spec and make the job directory; raises _LaunchRefused if it cannot.

    The directory gets spec.json, then stdin, input/ and output/ as the spec asks, read
    from `source` (what follows the spec line). Nothing is left behind on refusal.
    `jobs_dir_made`: WORKDIR/jobs exists already (serve made it for an earlier task).
    """
    if raw.get("runner_version") != runner_version():
        raise _LaunchRefused.need("runner")
    try:
        spec = validate_spec(raw)
    except ValueError as exc:
        raise _LaunchRefused.error("spec", f"invalid launch spec: {exc}") from exc
    if not os.path.isfile(os.path.join(workdir, "wasm", f"{spec['wasm_sha256']}.wasm")):
        raise _LaunchRefused.need("module")
    if check_wasmtime:
        problem = _wasmtime_problem()
        if problem is not None:
            raise _LaunchRefused.error("no_wasmtime", problem)
    missing_dir = host_dir_problem(spec["dirs"])
    if missing_dir is not None:
        raise _LaunchRefused.error("host_dir", missing_dir)
    try:
        if not jobs_dir_made:
            os.makedirs(os.path.join(workdir, "jobs"), mode=0o700, exist_ok=True)
    except OSError as exc:
        raise _LaunchRefused.error("io", exc) from exc
    try:
        try:
            os.mkdir(job_dir, 0o700)
        except FileNotFoundError:
            if not jobs_dir_made:
                raise
            # WORKDIR/jobs was removed since serve made it: made again.
            os.makedirs(os.path.join(workdir, "jobs"), mode=0o700, exist_ok=True)
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
        if spec["dirs"]:
            _stage_dirs(source, spec["dirs"], job_dir)
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
