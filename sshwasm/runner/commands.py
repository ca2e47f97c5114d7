"""The text commands (fetch-output, put-module, cancel, info) and `main`, which checks the
workdir and runs one command of the runner."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from importlib import import_module

from .jobdir import (
    _create_atomically,
    _error_json,
    _is_executor,
    _job_dir,
    _make_result,
    _offset,
    _one_line,
    _read_pid,
    _temp_path,
    _unlink_quietly,
    _UsageError,
    _wasmtime_problem,
    _wasmtime_version,
    _workdir,
    workdir_problem,
)
from .protocol import (
    DIR_CHANGES_KEYS,
    DIR_CHANGES_MEMBER,
    DIR_FILES_PREFIX,
    DIR_LEFT_OUT_KEY,
    FETCH_STOPPED_AT_LIMIT,
    KIND_ERROR,
    SHA256_RE,
    UNSAFE_WORKDIR_EXIT,
    runner_version,
)
from .safetar import (
    MAX_OUTPUT_DEPTH,
    OutputLimitReached,
    tree_changes,
    tree_manifest,
    write_changes_as_tar,
    write_tree_as_tar,
)
from .stream import _CoordinatorGone, _detach_stdout, _FrameWriter

KILL_WAIT_S = 2.0


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


def _left_out_past(root: str, changed: dict[str, str | None], limit: int) -> list[str]:
    """The changed files (paths under `root`) that do not fit in `limit` bytes, taken whole
    in path order (a file that does not fit is left out, a smaller one after it may fit)."""
    left_out: list[str] = []
    for path in sorted(changed):
        try:
            size = os.lstat(os.path.join(root, path)).st_size
        except OSError:
            continue  # gone: the tar leaves it out anyway
        if size > limit:
            left_out.append(path)
        else:
            limit -= size
    return left_out


def _cmd_fetch_dir(workdir: str, job_id: str, index: str, max_bytes: str | None = None) -> int:
    job_dir = _job_dir(workdir, job_id)
    limit = None if max_bytes is None else _offset(max_bytes)
    if not index.isdigit():
        raise _UsageError(f"invalid directory index {index!r}")
    root = os.path.join(job_dir, "dirs", str(int(index)))
    manifest_path = os.path.join(job_dir, "dirs", f"{int(index)}.manifest.json")
    if not os.path.isdir(job_dir):
        print(f"sshwasm-exec: error: no job directory {job_dir}", file=sys.stderr)
        return 1
    try:
        with open(manifest_path, "rb") as manifest_file:
            before = json.loads(manifest_file.read())
    except (OSError, ValueError):
        print(
            f"sshwasm-exec: error: job {job_id} has no staged read-write directory {index}",
            file=sys.stderr,
        )
        return 1
    if not os.path.isdir(root) or os.path.islink(root):
        print(f"sshwasm-exec: error: job {job_id} lost its directory {index}", file=sys.stderr)
        return 1
    changes = tree_changes(before, tree_manifest(root))
    # What is left of the job's output cap bounds what comes back; the rest is named.
    left_out = [] if limit is None else _left_out_past(root, changes["changed"], limit)
    for path in left_out:
        del changes["changed"][path]
    answer = {key: changes[key] for key in DIR_CHANGES_KEYS}
    trailer = json.dumps({**answer, DIR_LEFT_OUT_KEY: left_out}).encode()
    write_changes_as_tar(
        root, changes, sys.stdout.buffer, DIR_FILES_PREFIX, (DIR_CHANGES_MEMBER, trailer)
    )
    sys.stdout.buffer.flush()
    return 0


def _cmd_put_module(workdir_argument: str, sha256: str) -> int:
    if not SHA256_RE.fullmatch(sha256):
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
        # The module is the same on every worker; wasmtime compiles it for this machine.
        "os": platform.system(),
        "arch": platform.machine(),
    }
    print(json.dumps(info))
    return 0


# ------------------------------------------------------------------------------ main


def _handler(module: str, name: str, **options: object) -> Callable[[], Callable[..., int]]:
    """A command's function, imported when it runs: a command loads only the modules it
    needs (poll, cancel and info none of launch, execute and serve)."""

    def load() -> Callable[..., int]:
        function: Callable[..., int] = getattr(import_module(f".{module}", __package__), name)
        return partial(function, **options) if options else function

    return load


_FRAME_COMMANDS: dict[str, tuple[str, Callable[[], Callable[..., int]]]] = {
    "launch": ("WORKDIR JOB_ID", _handler("launch", "_cmd_launch")),
    "serve": ("WORKDIR", _handler("serve", "_cmd_serve")),
    # One stream: attach follows the job to its result, poll sends what there is now.
    "attach": (
        "WORKDIR JOB_ID STDOUT_OFFSET STDERR_OFFSET",
        _handler("stream", "_cmd_stream", follow=True),
    ),
    "poll": (
        "WORKDIR JOB_ID STDOUT_OFFSET STDERR_OFFSET",
        _handler("stream", "_cmd_stream", follow=False),
    ),
}
_TEXT_COMMANDS: dict[str, tuple[str, Callable[[], Callable[..., int]]]] = {
    "fetch-output": ("WORKDIR JOB_ID [MAX_BYTES]", lambda: _cmd_fetch_output),
    "fetch-dir": ("WORKDIR JOB_ID INDEX [MAX_BYTES]", lambda: _cmd_fetch_dir),
    "put-module": ("WORKDIR SHA256", lambda: _cmd_put_module),
    "cancel": ("WORKDIR JOB_ID", lambda: _cmd_cancel),
    "info": ("", lambda: _cmd_info),
    "execute": ("JOB_DIR", _handler("execute", "_cmd_execute")),
    # Run by the bootstrap right after `install` (transport.RUNNER_BOOTSTRAP).
    "prune-runners": ("WORKDIR [PREVIOUS]", _handler("prune", "_cmd_prune_runners")),
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
    arg_names, load = (_FRAME_COMMANDS if is_frame_command else _TEXT_COMMANDS)[name]
    words = arg_names.split()
    required = [word for word in words if not word.startswith("[")]
    if not len(required) <= len(params) <= len(words):
        print(f"usage: sshwasm-exec {name} {arg_names}".rstrip(), file=sys.stderr)
        return 2
    refusal = _refuse_unsafe_workdir(name, params)
    if refusal is not None:
        return refusal
    handler = load()
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
