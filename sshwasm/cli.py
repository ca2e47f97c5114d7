"""The command line. The only module that prints or decides exit codes.

Heavy imports (asyncssh, wasmtime, the build and transport modules) happen inside the
commands that need them, so `sshwasm jobs` starts in a fraction of the time `run` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__, paths
from .errors import CompileError, SshwasmError, StoreError, UsageError

if TYPE_CHECKING:
    from .cluster import Cluster
    from .coordinator import Handlers
    from .schedule import Request
    from .store import Job, JobStore

PROG = "sshwasm"
DEFAULT_CPUS = 1
DEFAULT_MEMORY_MB = 256
DEFAULT_MAX_OUTPUT_MB = 1024
# 1 PiB: far past any disk, and its byte count still fits every rlimit and file offset.
MAX_OUTPUT_MB_LIMIT = 1 << 30
# Tasks one `run --array` may submit: their rows are written in one transaction (about a
# second for the cap), and a coordinator follows them all.
MAX_ARRAY_TASKS = 100_000


class ExitStatus(IntEnum):
    """Exit codes of sshwasm itself; a foreground job's own code passes through as it is."""

    OK = 0
    ERROR = 1
    USAGE = 2
    TIMEOUT = 124
    INTERRUPTED = 130


# Control characters (C0, DEL, C1): a job name or a host's message holding ESC sequences
# could recolour, retitle or rewrite the user's terminal, or fake a line of ours.
_READABLE_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_PRINTABLE = str.maketrans(
    {
        code: _READABLE_ESCAPES.get(chr(code), f"\\x{code:02x}")
        for code in (*range(0x20), *range(0x7F, 0xA0))
    }
)


def printable(text: object) -> str:
    """`text` safe to show on a terminal: control characters appear as escapes (`\\x1b`)."""
    return str(text).translate(_PRINTABLE)


def _say(text: object) -> None:
    """One line of a command's result on stdout, escaped."""
    print(printable(text))


def _table(rows: Sequence[Sequence[Any]] | Sequence[dict[str, Any]], headers: Any) -> None:
    """A plain table on stdout, every cell escaped."""
    from tabulate import tabulate

    def cell(value: Any) -> str:
        return "" if value is None else printable(value)  # tabulate's own missing value

    cells: list[Any] = [
        {key: cell(value) for key, value in row.items()}
        if isinstance(row, dict)
        else [cell(value) for value in row]
        for row in rows
    ]
    print(tabulate(cells, headers=headers, tablefmt="plain", disable_numparse=True))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with sshwasm's one-line error format."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(ExitStatus.USAGE, f"{PROG}: error: {printable(message)}{hint}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_int_up_to(maximum: int, unit: str) -> Callable[[str], int]:
    """An argument type for a whole number from 1 to `maximum` (`unit` names what it counts)."""

    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"at most {maximum} {unit}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _time_limit(text: str) -> float:
    # The runner defines the bound (it refuses more in a spec); imported only when needed.
    from .runner.protocol import MAX_TIME_LIMIT_S

    value = _positive_float(text)
    if value > MAX_TIME_LIMIT_S:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_TIME_LIMIT_S} seconds (365 days), got {text}"
        )
    return value


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"'{text}' is not of the form NAME=VALUE")
    return name, value


def build_parser() -> ArgumentParser:
    """The full argument parser (every command has help)."""
    parser = ArgumentParser(
        prog=PROG,
        description="Run WebAssembly jobs on the machines you can reach over SSH.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--cluster", metavar="FILE", help="cluster YAML (default: see README)")
    parser.add_argument("--db", metavar="FILE", help="jobs file (default: $SSHWASM_DB or data dir)")
    parser.add_argument(
        "--traceback", action="store_true", help="show the Python traceback of an error"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True

    run = commands.add_parser(
        "run",
        help="compile a source file and run it on the best-fitting host",
        description="Compile SOURCE to wasm32-wasi, place it on the host that fits best, run "
        "it there and stream its output. Exits with the job's exit code.",
    )
    run.add_argument(
        "source",
        metavar="SOURCE",
        help="a .rs, .c, .cc/.cpp/.cxx or .go file, a Cargo or Go module directory, "
        "or a ready .wasm module",
    )
    run.add_argument("args", nargs="*", metavar="ARG", help="arguments for the job (after --)")
    run.add_argument(
        "--cpus", type=_positive_int, default=DEFAULT_CPUS, help="cpus to reserve (default 1)"
    )
    run.add_argument(
        "--memory-mb",
        type=_positive_int,
        default=DEFAULT_MEMORY_MB,
        help=f"memory limit and reservation in MB (default {DEFAULT_MEMORY_MB})",
    )
    run.add_argument("--job-name", metavar="NAME", help="a name to show in `sshwasm jobs`")
    run.add_argument(
        "--time-limit",
        type=_time_limit,
        metavar="SECONDS",
        help="end the job as `timeout` (exit 124) after this long (at most 365 days)",
    )
    run.add_argument("--host", metavar="NAME", help="run on this host only")
    run.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME",
        help="only on hosts carrying this label (repeatable: all of them)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="show which host would be chosen and why not the others, then exit",
    )
    run.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    run.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="K=V",
        help="set an environment variable for the job (repeatable); nothing else is passed",
    )
    run.add_argument("--stdin", metavar="FILE", help="feed this file to the job's stdin")
    run.add_argument(
        "--input",
        metavar="PATH",
        help="stage a file or directory in; the job sees it read-only at /input",
    )
    run.add_argument(
        "--output",
        metavar="DIR",
        help="give the job an empty writable /output, copied back into DIR when it ends "
        "(DIR/<task> for array tasks); nothing in DIR is deleted or overwritten: a file "
        "that differs is written beside it as NAME.sshwasm-ID",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="with --output: the job's files replace different files of the same name "
        "(never a directory, never deleting anything)",
    )
    run.add_argument(
        "--max-output-mb",
        type=_positive_int_up_to(MAX_OUTPUT_MB_LIMIT, "MB"),
        default=DEFAULT_MAX_OUTPUT_MB,
        metavar="N",
        help=f"end the job as failed once its stdout, stderr and /output together pass N MB "
        f"(default {DEFAULT_MAX_OUTPUT_MB})",
    )
    run.add_argument(
        "--array",
        type=_positive_int_up_to(MAX_ARRAY_TASKS, "tasks"),
        metavar="N",
        help=f"run N tasks of the module (N <= {MAX_ARRAY_TASKS}); task i sees "
        "SSHWASM_ARRAY_TASK_ID=i and SSHWASM_ARRAY_TASK_COUNT=N",
    )
    run.add_argument(
        "--tag", action="store_true", help="with --array: prefix each output line with its task"
    )
    run.add_argument("--detach", action="store_true", help="print the job id(s) and return at once")
    run.add_argument(
        "--json", action="store_true", help="print the job record as JSON instead of its output"
    )

    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--json", action="store_true", help="print a JSON array of job records")
    jobs.add_argument("--limit", type=_positive_int, metavar="N", help="show at most N jobs")
    jobs.add_argument("--state", choices=_states(), help="only jobs in this state")
    jobs.add_argument("--fold", action="store_true", help="one row per array instead of per task")

    status = commands.add_parser("status", help="show one job (refreshed from its host)")
    status.add_argument("job_id", type=_positive_int, metavar="ID")
    status.add_argument("--json", action="store_true", help="print the job record as JSON")

    logs = commands.add_parser("logs", help="print a job's output")
    logs.add_argument("job_id", type=_positive_int, metavar="ID")
    logs.add_argument("--stderr", action="store_true", help="print its stderr instead of stdout")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")

    cancel = commands.add_parser("cancel", help="stop queued or running jobs")
    cancel.add_argument("job_ids", type=_positive_int, nargs="+", metavar="ID")

    wasm = commands.add_parser("wasm", help="save the exact module a job ran")
    wasm.add_argument("job_id", type=_positive_int, metavar="ID")
    wasm.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it")

    hosts = commands.add_parser("hosts", help="list the cluster's hosts and their free capacity")
    hosts.add_argument("--json", action="store_true", help="print a JSON array")
    hosts.add_argument("--check", action="store_true", help="connect to each host and report")
    hosts_commands = hosts.add_subparsers(
        dest="hosts_command", metavar="install", parser_class=ArgumentParser
    )
    install = hosts_commands.add_parser(
        "install", help="install the runner, and wasmtime if missing, on hosts (default: all)"
    )
    install.add_argument("names", nargs="*", metavar="NAME")

    # No help=: argparse would list a suppressed choice as "_drive ==SUPPRESS==".
    drive = commands.add_parser("_drive")
    drive.add_argument("job_ids", type=int, nargs="+")
    return parser


def _states() -> tuple[str, ...]:
    from .store import STATES

    return STATES


# -- helpers -----------------------------------------------------------------------------


class _Context:
    """What every command shares: parsed global options, opened lazily."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.db_path = paths.jobs_db(args.db)
        self._store: JobStore | None = None
        self._cluster: Cluster | None = None
        self._cluster_path: Path | None = None
        self._cluster_found = False

    @property
    def store(self) -> JobStore:
        if self._store is None:
            from .store import JobStore

            self._store = JobStore(self.db_path, on_wait=_warn)
        return self._store

    def cluster(self) -> Cluster:
        """The cluster file, read and checked once per command."""
        if self._cluster is None:
            from .cluster import load_cluster

            self._cluster = load_cluster(self._find_cluster())
        return self._cluster

    def cluster_path(self) -> Path | None:
        path = self._find_cluster()
        return path.resolve() if path is not None else None

    def _find_cluster(self) -> Path | None:
        """The cluster file's path, warning once about implicit ones not trusted."""
        if not self._cluster_found:
            self._cluster_path, ignored = paths.find_cluster_file(self.args.cluster)
            self._cluster_found = True
            for skipped in ignored:
                _warn(
                    f"ignoring cluster file {skipped.path}: {skipped.reason} "
                    f"(name it with --cluster or $SSHWASM_CLUSTER to use it anyway)"
                )
        return self._cluster_path

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _write_out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _write_err(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def _notice(message: str) -> None:
    print(f"{PROG}: {printable(message)}", file=sys.stderr, flush=True)


def _error(message: object) -> None:
    print(f"{PROG}: error: {printable(message)}", file=sys.stderr, flush=True)


def _label(job: Job) -> str:
    """How `run` names a job in its messages."""
    if job.array_task is None:
        return f"job {job.id}"
    return f"task {job.array_task} (job {job.id})"


def _report_end(job: Job) -> None:
    """Say on stderr how a job ended, unless its own exit code says all there is.

    Every `run` that does not exit with the job's own code says why in an error line; a job
    that has its own code and an error text (timeout, trap, cancelled) gets a notice.
    """
    if job.state == "succeeded":
        return
    what = f"{_label(job)} {job.state}"
    code = job.exit_code
    if not job.is_final:
        detail = f" ({job.error})" if job.error else ""
        _error(f"{what}{detail}; `{PROG} status {job.id}` collects it later")
    elif code is None or (job.state == "failed" and not 0 < code < 256):
        _error(f"{what}: {job.error or f'exit code {code}'}")
    elif job.error:
        _notice(f"{what}: {job.error}")


def _warn(message: str) -> None:
    _notice(f"warning: {message}")


def _handlers(show_output: bool, show_notices: bool) -> Handlers:
    from .coordinator import Handlers

    handlers = Handlers(warning=_notice)
    if show_output:
        handlers.stdout = _write_out
        handlers.stderr = _write_err
    if show_notices:
        handlers.notice = _notice
    return handlers


def job_exit_status(job: Job) -> int:
    """The exit code `run` returns for a finished job."""
    if job.state == "succeeded":
        return 0
    if job.state == "timeout":
        return ExitStatus.TIMEOUT
    if job.state == "cancelled":
        return ExitStatus.INTERRUPTED
    code = job.exit_code
    return code if isinstance(code, int) and 0 < code < 256 else ExitStatus.ERROR


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _local_time(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):  # a row written before host results were checked
        return str(iso)


def _runtime(job: Job) -> str:
    seconds = job.run_s
    if not isinstance(seconds, (int, float)):  # a row written before results were checked
        seconds = None
    if seconds is None and job.state == "running" and job.started_at:
        seconds = time.time() - datetime.fromisoformat(job.started_at).timestamp()
    if seconds is None:
        return ""
    return f"{seconds:.2f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


# -- commands ----------------------------------------------------------------------------


def cmd_run(ctx: _Context) -> int:
    """`sshwasm run`: submit, then follow in the foreground or detach."""
    from .build import build
    from .schedule import Request, check_feasible
    from .staging import check_input
    from .store import JobSpec

    args = ctx.args
    source = Path(args.source)
    cluster = ctx.cluster()
    request = Request(args.cpus, args.memory_mb, args.host, tuple(args.label))
    if args.dry_run:
        return _dry_run(ctx, cluster, request)
    check_feasible(cluster.hosts, request)
    stdin_data: bytes | None = None
    if args.stdin is not None:
        try:
            stdin_data = Path(args.stdin).read_bytes()
        except OSError as exc:
            raise UsageError(f"--stdin {args.stdin}: {exc.strerror or exc}") from exc
    if args.input is not None:
        check_input(Path(args.input))
    if args.output is not None and Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output}: not a directory")
    interactive = sys.stderr.isatty() and not args.json and not args.quiet
    # Say so only when compiling takes a while (a cache hit takes milliseconds).
    slow_compile = threading.Timer(0.5, _notice, [f"compiling {source} ..."])
    if interactive:
        slow_compile.start()
    try:
        artifact = build(source)
    finally:
        slow_compile.cancel()
    if interactive and not artifact.cached:
        _notice(f"compiled {source} in {artifact.compile_s:.1f}s ({artifact.size} bytes)")
    needed_mb = -(-artifact.info.initial_memory_bytes // (1 << 20))
    if needed_mb > args.memory_mb:
        raise UsageError(
            f"{source} needs at least {needed_mb} MB of memory at start; "
            f"--memory-mb {args.memory_mb} is too small"
        )
    spec = JobSpec(
        name=args.job_name,
        cpus=args.cpus,
        memory_mb=args.memory_mb,
        time_limit_s=args.time_limit,
        source=str(source.resolve()),
        language=artifact.language,
        wasm_sha256=artifact.sha256,
        wasm_bytes=artifact.size,
        wasm_path=str(artifact.path),
        compile_s=round(artifact.compile_s, 6),
        argv=(_program_name(source), *args.args),
        env=tuple(args.env),
        pinned_host=args.host,
        array_size=args.array,
        labels=tuple(args.label),
        input_path=str(Path(args.input).resolve()) if args.input is not None else None,
        output_dir=str(Path(args.output).resolve()) if args.output is not None else None,
        max_output_mb=args.max_output_mb,
        output_overwrite=args.overwrite,
    )
    store = ctx.store
    job_ids = store.submit_tasks(spec)
    if stdin_data is not None:
        # A copy, so the job reads what was there at submission even if it starts later.
        stdin_copy = paths.make_job_output_dir(store.path, job_ids[0]) / "stdin"
        with paths.open_private(stdin_copy, "wb") as copy:
            copy.write(stdin_data)
        store.update_many(job_ids, stdin_path=str(stdin_copy))
    if args.detach:
        _spawn_driver(ctx, job_ids)
        print("\n".join(str(job_id) for job_id in job_ids))
        return ExitStatus.OK
    if args.array:
        return _run_array(ctx, job_ids, interactive)
    (job_id,) = job_ids
    job = _drive(ctx, job_id, _handlers(show_output=not args.json, show_notices=interactive))
    if args.json:
        _print_json(job.record())
    _report_end(job)
    return job_exit_status(job)


def _program_name(source: Path) -> str:
    """argv[0] of the job: the source's name without its extension (or the project's)."""
    return source.resolve().stem or "main"


def _dry_run(ctx: _Context, cluster: Cluster, request: Request) -> int:
    """`run --dry-run`: the placement decision, host by host, without running anything."""

    from .build import detect_language
    from .hosts import check_hosts
    from .schedule import check_feasible, explain

    source = Path(ctx.args.source)
    detect_language(source)
    if not source.exists():
        raise UsageError(f"no such file: {source}")
    reports = asyncio.run(check_hosts(cluster.hosts))
    unreachable = {
        host.name: report["error"] or "unreachable"
        for host, report in zip(cluster.hosts, reports, strict=True)
        if not report["reachable"]
    }
    chosen, reasons = explain(cluster.hosts, ctx.store.usage(), request, unreachable)
    _table(sorted(reasons.items()), headers=["HOST", "VERDICT"])
    if chosen is not None:
        _say(f"would run on {chosen.name}")
        return ExitStatus.OK
    try:
        check_feasible([h for h in cluster.hosts if h.name not in unreachable], request)
    except SshwasmError as exc:
        _say(f"would not run: {exc}")
        return ExitStatus.ERROR
    print("would wait in the queue until a host has room")
    return ExitStatus.OK


def _drive_tasks(
    ctx: _Context,
    job_ids: Sequence[int],
    handlers: Handlers,
    on_done: Callable[[Job], None] | None = None,
) -> list[Job]:
    """Coordinate several jobs (an array's tasks) in this process until each has ended."""
    from .coordinator import Coordinator
    from .transport import TransportPool

    cluster = ctx.cluster()

    async def go() -> list[Job]:
        async with TransportPool() as pool:
            coordinator = Coordinator(ctx.store, cluster.hosts, pool, handlers)
            return await coordinator.drive_tasks(job_ids, on_done=on_done)

    return asyncio.run(go())


def _run_array(ctx: _Context, job_ids: list[int], interactive: bool) -> int:
    """Run an array's tasks side by side, printing each task's output whole as it ends."""
    args = ctx.args

    def show(job: Job) -> None:
        if not args.json:
            directory = paths.job_output_dir(ctx.store.path, job.id)
            prefix = f"{job.array_task}\t".encode() if args.tag else None
            for stream, write in (("stdout", _write_out), ("stderr", _write_err)):
                _copy_output(directory / stream, write, prefix)
        _report_end(job)

    handlers = _handlers(show_output=False, show_notices=interactive)
    jobs = _drive_tasks(ctx, job_ids, handlers, on_done=show)
    if args.json:
        _print_json([job.record() for job in jobs])
    failed = [job for job in jobs if job.state != "succeeded"]
    if not failed:
        return ExitStatus.OK
    return job_exit_status(failed[0]) or ExitStatus.ERROR


def _copy_output(path: Path, write: Callable[[bytes], None], prefix: bytes | None) -> None:
    """Write a task's saved output, with `prefix` at the start of each line when tagging.

    Read in chunks, never by line: a stream without newlines is not held in memory whole.
    """
    if not path.exists():
        return
    at_line_start = True
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            if prefix is not None:
                chunk, at_line_start = _tag_lines(chunk, prefix, at_line_start)
            write(chunk)


def _tag_lines(chunk: bytes, prefix: bytes, at_line_start: bool) -> tuple[bytes, bool]:
    """`prefix` before each line that starts in `chunk`; and whether the next chunk starts
    a line (a prefix at the very end waits for a line that may never come)."""
    first, *rest = chunk.split(b"\n")
    pieces = [(prefix if at_line_start else b"") + first]
    if rest:
        *middle, last = rest
        pieces += [prefix + line for line in middle]
        pieces.append(prefix + last if last else b"")
        return b"\n".join(pieces), not last
    return pieces[0], False


def _drive(ctx: _Context, job_id: int, handlers: Handlers) -> Job:
    from .coordinator import Coordinator
    from .transport import TransportPool

    cluster = ctx.cluster()

    async def go() -> Job:
        async with TransportPool() as pool:
            return await Coordinator(ctx.store, cluster.hosts, pool, handlers).drive(job_id)

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        _notice(
            f"interrupted; job {job_id} goes on where it was placed: "
            f"`{PROG} cancel {job_id}` stops it, `{PROG} status {job_id}` collects it"
        )
        raise


def _spawn_driver(ctx: _Context, job_ids: list[int]) -> None:
    command = [sys.executable, "-m", "sshwasm", "--db", str(ctx.db_path.resolve())]
    cluster_path = ctx.cluster_path()
    if cluster_path is not None:
        command += ["--cluster", str(cluster_path)]
    command += ["_drive", *map(str, job_ids)]
    log = paths.make_job_output_dir(ctx.db_path, job_ids[0]) / "coordinator.log"
    with paths.open_private(log) as log_file:
        driver = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # survives this terminal closing
        )
    ctx.store.heartbeat_as(job_ids, driver.pid)


def cmd_drive(ctx: _Context) -> int:
    """Hidden: the detached coordinator of `run --detach`."""
    handlers = _handlers(show_output=False, show_notices=True)
    # Its stderr is the coordinator.log beside the job's output: how each job ended goes there.
    jobs = _drive_tasks(ctx, ctx.args.job_ids, handlers, on_done=_report_end)
    return max((job_exit_status(job) for job in jobs), default=ExitStatus.OK)


def _refresh(ctx: _Context, jobs: Sequence[Job]) -> list[Job]:
    """Refresh unfinished jobs whose coordinator is gone; others are returned as they are."""
    from .coordinator import needs_refresh

    orphans = [job for job in jobs if needs_refresh(job)]
    if not orphans:
        return list(jobs)
    from .coordinator import refresh_job
    from .transport import TransportPool

    async def go() -> dict[int, Job]:
        async with TransportPool() as pool:
            fresh = await asyncio.gather(*(refresh_job(ctx.store, job, pool) for job in orphans))
        return {job.id: job for job in fresh}

    updated = asyncio.run(go())
    return [updated.get(job.id, job) for job in jobs]


def cmd_jobs(ctx: _Context) -> int:
    """`sshwasm jobs`: a table (or JSON array) of jobs, newest first."""

    args = ctx.args
    jobs = _refresh(ctx, ctx.store.list_jobs(limit=args.limit, state=args.state))
    if args.state is not None:
        jobs = [job for job in jobs if job.state == args.state]
    if args.json:
        _print_json([job.record() for job in jobs])
        return ExitStatus.OK
    rows = _folded_rows(jobs) if args.fold else [_job_row(job) for job in jobs]
    headers = ["ID", "NAME", "STATE", "HOST", "CPUS", "MEM_MB", "SUBMITTED", "RUNTIME", "EXIT"]
    _table(rows, headers=headers)
    return ExitStatus.OK


def _job_row(job: Job) -> list[Any]:
    name = job.name or ""
    if job.array_task is not None:
        name = f"{name}[{job.array_task}]"
    return [
        job.id,
        name,
        job.state,
        job.host or "",
        job.cpus,
        job.memory_mb,
        _local_time(job.submitted_at),
        _runtime(job),
        "" if job.exit_code is None else job.exit_code,
    ]


def _folded_rows(jobs: Sequence[Job]) -> list[list[Any]]:
    """One row per array (the array's id, a count per state), plain jobs as they are."""
    rows: list[list[Any]] = []
    arrays: dict[int, list[Job]] = {}
    for job in jobs:
        if job.array_id is None:
            rows.append(_job_row(job))
        elif job.array_id not in arrays:
            arrays[job.array_id] = [job]
            rows.append([job.array_id])  # filled in below, keeping the newest-first order
        else:
            arrays[job.array_id].append(job)
    for row in rows:
        tasks = arrays.get(row[0]) if len(row) == 1 else None
        if tasks is None:
            continue
        first = tasks[0]
        states: dict[str, int] = {}
        for task in tasks:
            states[task.state] = states.get(task.state, 0) + 1
        hosts = {task.host for task in tasks if task.host}
        codes = [task.exit_code for task in tasks if task.exit_code is not None]
        total_s = sum(task.run_s or 0.0 for task in tasks)
        row[1:] = [
            f"{first.name or ''}[{len(tasks)} tasks]",
            ", ".join(f"{count} {state}" for state, count in sorted(states.items())),
            hosts.pop() if len(hosts) == 1 else f"{len(hosts)} hosts" if hosts else "",
            first.cpus,
            first.memory_mb,
            _local_time(first.submitted_at),
            f"{total_s:.2f}s" if total_s else "",
            max(codes) if codes else "",
        ]
    return rows


def cmd_status(ctx: _Context) -> int:
    """`sshwasm status ID`: one job, refreshed from its host if nobody else follows it."""
    job = _refresh(ctx, [ctx.store.get(ctx.args.job_id)])[0]
    record = job.record()
    if ctx.args.json:
        _print_json(record)
        return ExitStatus.OK
    for key, value in record.items():
        if key in ("stdout", "stderr"):
            continue
        if value is not None:
            _say(f"{key}: {value}")
    return ExitStatus.OK


def cmd_logs(ctx: _Context) -> int:
    """`sshwasm logs ID`: the job's full output, from the local copy (brought up to date
    from the host first when nobody else follows the job)."""
    from .coordinator import needs_refresh

    args = ctx.args
    store = ctx.store
    job = _refresh(ctx, [store.get(args.job_id)])[0]
    stream = "stderr" if args.stderr else "stdout"
    path = paths.job_output_dir(store.path, job.id) / stream
    write = _write_err if args.stderr else _write_out
    offset = 0
    while True:
        if path.exists():
            with open(path, "rb") as handle:
                handle.seek(offset)
                while chunk := handle.read(1 << 20):
                    write(chunk)
                    offset += len(chunk)
        if not args.follow:
            break
        job = store.get(job.id)
        # A live coordinator appends to the local copy; else ask the host, less often.
        orphan = needs_refresh(job)
        if orphan:
            job = _refresh(ctx, [job])[0]
        if job.is_final and (not path.exists() or path.stat().st_size == offset):
            break
        time.sleep(1.0 if orphan else 0.2)
    return ExitStatus.OK


def cmd_cancel(ctx: _Context) -> int:
    """`sshwasm cancel ID...`: stop queued or running jobs."""
    from .coordinator import cancel_jobs
    from .transport import TransportPool

    store = ctx.store
    jobs = [store.get(job_id) for job_id in ctx.args.job_ids]

    async def go() -> list[tuple[Job, str | None]]:
        async with TransportPool() as pool:
            return await cancel_jobs(store, jobs, pool)

    status = ExitStatus.OK
    for job, problem in asyncio.run(go()):
        if problem is None:
            _say(f"job {job.id}: {job.state}")
        else:
            status = ExitStatus.ERROR
            _error(f"job {job.id}: {problem}")
    return status


def cmd_wasm(ctx: _Context) -> int:
    """`sshwasm wasm ID -o FILE`: the exact module the job ran."""
    import hashlib

    job = ctx.store.get(ctx.args.job_id)
    module = Path(job.wasm_path or "")
    try:
        data = module.read_bytes()
    except OSError as exc:
        raise UsageError(f"the module of job {job.id} is no longer cached ({exc})") from exc
    if hashlib.sha256(data).hexdigest() != job.wasm_sha256:
        raise UsageError(f"the cached module of job {job.id} changed since it ran")
    output = Path(ctx.args.output)
    try:
        shutil.copyfile(module, output)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
    _say(f"{output}: {len(data)} bytes, sha256 {job.wasm_sha256}")
    return ExitStatus.OK


def cmd_hosts(ctx: _Context) -> int:
    """`sshwasm hosts`: each host with its capacity and what this jobs file holds there."""

    if ctx.args.hosts_command == "install":
        return cmd_hosts_install(ctx)
    cluster = ctx.cluster()
    usage = ctx.store.usage()
    running = ctx.store.running_counts()
    rows: list[dict[str, Any]] = []
    for host in cluster.hosts:
        used = usage.get(host.name)
        rows.append(
            {
                "name": host.name,
                "address": host.address,
                "cpus": host.cpus,
                "memory_mb": host.memory_mb,
                "cpus_free": host.cpus - (used.cpus if used else 0),
                "memory_free_mb": host.memory_mb - (used.memory_mb if used else 0),
                "running": running.get(host.name, 0),
                "labels": list(host.labels),
            }
        )
    status = ExitStatus.OK
    if ctx.args.check:
        from .hosts import check_hosts

        for row, report in zip(rows, asyncio.run(check_hosts(cluster.hosts)), strict=True):
            row.update(report)
            if report.get("error"):
                status = ExitStatus.ERROR
    if ctx.args.json:
        _print_json(rows)
        return status
    shown = ("warnings", "host_cpus", "host_memory_mb", "python_version")
    table = [
        {**{k: v for k, v in row.items() if k not in shown}, "labels": ",".join(row["labels"])}
        for row in rows
    ]
    _table(table, headers="keys")
    for row in rows:
        for warning in row.get("warnings", []):
            _notice(f"warning: {row['name']}: {warning}")
    return status


def cmd_hosts_install(ctx: _Context) -> int:
    """`sshwasm hosts install [NAME...]`: runner and wasmtime on each host."""
    from .hosts import for_each_host, install_host

    cluster = ctx.cluster()
    names = ctx.args.names
    unknown = [name for name in names if cluster.host(name) is None]
    if unknown:
        raise UsageError(f"no host named {', '.join(unknown)} in {cluster.source}")
    hosts = [h for h in cluster.hosts if not names or h.name in names]
    status = ExitStatus.OK
    for host, result in zip(hosts, asyncio.run(for_each_host(hosts, install_host)), strict=True):
        if isinstance(result, SshwasmError):
            status = ExitStatus.ERROR
            _error(result)
        else:
            for line in result:
                _say(f"{host.name}: {line}")
    return status


COMMANDS = {
    "run": cmd_run,
    "jobs": cmd_jobs,
    "status": cmd_status,
    "logs": cmd_logs,
    "cancel": cmd_cancel,
    "wasm": cmd_wasm,
    "hosts": cmd_hosts,
    "_drive": cmd_drive,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status instead of exiting."""
    raw = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` belongs to the job. argparse alone cannot take
    # `run SOURCE --env K=V -- ARG...` (its positionals are consumed before the options).
    job_args: list[str] = []
    if "--" in raw:
        split = raw.index("--")
        raw, job_args = raw[:split], raw[split + 1 :]
    try:
        args = build_parser().parse_args(raw)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else ExitStatus.USAGE
    if job_args:
        if args.command != "run":
            print(f"{PROG}: error: only `run` takes job arguments after `--`", file=sys.stderr)
            return ExitStatus.USAGE
        args.args = [*args.args, *job_args]
    ctx = _Context(args)
    try:
        return COMMANDS[args.command](ctx)
    except CompileError as exc:
        sys.stderr.write(
            exc.diagnostics if exc.diagnostics.endswith("\n") else exc.diagnostics + "\n"
        )
        return _fail(args, exc)
    except SshwasmError as exc:
        return _fail(args, exc)
    except sqlite3.Error as exc:  # a damaged or foreign jobs file, found past opening it
        return _fail(args, StoreError(f"jobs file {ctx.db_path}: {exc}"))
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        # `sshwasm jobs | head`: the reader left; nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitStatus.OK
    finally:
        ctx.close()


def _fail(args: argparse.Namespace, exc: BaseException) -> int:
    if args.traceback:
        import traceback

        traceback.print_exception(exc)
    _error(exc)
    return ExitStatus.ERROR


def entry_point() -> NoReturn:
    """Console script entry."""
    status = main()
    # Everything is written and closed by now; skipping the interpreter's teardown (module
    # and thread cleanup of asyncssh and cryptography) saves ~40 ms on every command.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    os._exit(status)
