"""The command line. The only package that prints or decides exit codes.

`main` parses and dispatches; the grammar is in parser.py, what commands share in
context.py, how things are shown in show.py, exit codes in exits.py, and each command in
its own module (run, jobs, hosts, wasm, and coordinate for the detached coordinator).
Heavy imports (asyncio, asyncssh, wasmtime, the build and transport modules) and each
command's module happen only when a command needs them, so `sshwasm jobs` starts in a
fraction of the time `run` does.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from ..errors import CompileError, SshwasmError, StoreError
from .context import Context
from .exits import ExitStatus, job_exit_status
from .parser import COMPLETE_COMMAND, COORDINATE_COMMAND, MAX_ARRAY_TASKS, build_parser
from .show import PROG, error, printable, show_sshwasm_warnings

__all__ = [
    "MAX_ARRAY_TASKS",
    "ExitStatus",
    "build_parser",
    "entry_point",
    "job_exit_status",
    "main",
    "printable",
]

# Each command: the module of this package that holds it, and its function. A command's
# module is imported only when that command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "cmd_run"),
    "resume": ("resume", "cmd_resume"),
    "rerun": ("rerun", "cmd_rerun"),
    "jobs": ("jobs", "cmd_jobs"),
    "status": ("jobs", "cmd_status"),
    "logs": ("jobs", "cmd_logs"),
    "cancel": ("jobs", "cmd_cancel"),
    "wasm": ("wasm", "cmd_wasm"),
    "hosts": ("hosts", "cmd_hosts"),
    "report": ("report", "cmd_report"),
    # engine: dask (issue 12)
    "pool": ("pool", "cmd_pool"),
    "completion": ("completion", "cmd_completion"),
    COORDINATE_COMMAND: ("coordinate", "cmd_coordinate"),
    COMPLETE_COMMAND: ("completion", "cmd_complete_words"),
}


def _command(name: str) -> Callable[[Context], int]:
    """The function of command `name`, its module imported now."""
    module_name, function_name = COMMANDS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    command: Callable[[Context], int] = getattr(module, function_name)
    return command


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
    ctx = Context(args)
    show_sshwasm_warnings()
    try:
        return _command(args.command)(ctx)
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
    error(exc)
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
