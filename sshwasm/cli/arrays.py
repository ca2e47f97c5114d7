"""How `run`'s flags shape an array: its size, each task's arguments (--args-from) and
/input (--input-each), its throttle (--max-running, --array N%K) and its halt rule
(--halt-after-failures). Checked whole before anything is compiled or submitted."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .context import Context
from .parser import MAX_ARRAY_TASKS


@dataclass(frozen=True)
class ArrayShape:
    """What the array flags ask for; `size` None: not an array."""

    size: int | None = None
    task_args: tuple[tuple[str, ...], ...] | None = None
    task_inputs: tuple[str, ...] | None = None
    max_running: int | None = None
    halt_after_failures: int | None = None

    def spec_fields(self) -> dict[str, Any]:
        """The JobSpec fields these set."""
        return {
            "array_size": self.size,
            "task_args": self.task_args,
            "task_inputs": self.task_inputs,
            "max_running": self.max_running,
            "halt_after_failures": self.halt_after_failures,
        }


def read_args_file(path: Path) -> tuple[tuple[str, ...], ...]:
    """One tuple of arguments per non-empty line of `path` (`-`: standard input), split as a
    shell would.

    Lines of only blanks are skipped; a line that cannot be split (an unbalanced quote, a
    trailing backslash) is an error naming FILE:LINE.
    """
    data = read_file_or_stdin(path, "--args-from")
    tasks: list[tuple[str, ...]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"--args-from {path}:{number}"
        try:
            line = raw.removesuffix(b"\r").decode()
        except UnicodeDecodeError:
            raise UsageError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        if "\0" in line:
            raise UsageError(f"{where}: contains a NUL character")
        try:
            tasks.append(tuple(shlex.split(line)))
        except ValueError as exc:
            raise UsageError(f"{where}: {str(exc).lower()}: {line.strip()}") from None
    if not tasks:
        raise UsageError(f"--args-from {path}: no tasks (every line is empty)")
    return tuple(tasks)


def read_file_or_stdin(path: Path, flag: str) -> bytes:
    """The bytes of `path`, or all of standard input when it is `-` (as GNU parallel and
    most tools take it); an unreadable file is a UsageError naming the flag."""
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from exc


def input_paths(paths: list[str]) -> tuple[str, ...]:
    """The --input-each paths, absolute; each must be a file or a directory."""
    resolved = []
    for text in paths:
        path = Path(text)
        if not (path.is_file() or path.is_dir()):
            raise UsageError(f"--input-each {text}: no such file or directory")
        resolved.append(str(path.resolve()))
    return tuple(resolved)


def array_shape(args: argparse.Namespace) -> ArrayShape:
    """The array the flags describe, or a UsageError saying which flags disagree."""
    sizes: dict[str, int] = {}
    if args.array is not None:
        sizes[f"--array {args.array}"] = args.array
    task_args = None
    if args.args_from == "-" and args.stdin == "-":
        raise UsageError("--args-from - and --stdin - cannot both read standard input")
    if args.args_from is not None:
        task_args = read_args_file(Path(args.args_from))
        sizes[f"--args-from {args.args_from} ({len(task_args)} lines)"] = len(task_args)
    task_inputs = None
    if args.input_each is not None:
        if args.input is not None:
            raise UsageError("--input and --input-each cannot be used together")
        task_inputs = input_paths(args.input_each)
        sizes[f"--input-each ({len(task_inputs)} paths)"] = len(task_inputs)
    if len(set(sizes.values())) > 1:
        raise UsageError(f"different numbers of tasks: {', '.join(sizes)}")
    size = next(iter(sizes.values()), None)
    if size is not None and size > MAX_ARRAY_TASKS:
        raise UsageError(f"at most {MAX_ARRAY_TASKS} tasks in an array, got {size}")
    max_running = args.max_running
    if args.array_max_running is not None:
        if max_running is not None and max_running != args.array_max_running:
            raise UsageError(
                f"--array {args.array}%{args.array_max_running} and "
                f"--max-running {max_running} disagree"
            )
        max_running = args.array_max_running
    if size is None:
        for flag, value in (
            ("--max-running", max_running),
            ("--halt-after-failures", args.halt_after_failures),
        ):
            if value is not None:
                raise UsageError(f"{flag} needs an array (--array, --args-from or --input-each)")
    return ArrayShape(size, task_args, task_inputs, max_running, args.halt_after_failures)


def id_ranges(ids: Sequence[int]) -> str:
    """Ids as runs of consecutive ones: `12-10011`, or `3-5, 9` when there are gaps."""
    runs: list[list[int]] = []
    for job_id in sorted(ids):
        if runs and job_id == runs[-1][1] + 1:
            runs[-1][1] = job_id
        else:
            runs.append([job_id, job_id])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def submitted_text(job_ids: Sequence[int], array_id: int | None, one_line: bool) -> str:
    """What `run --detach` prints: each job id on its own line (what scripts read), or with
    `one_line` (a terminal), an array's in one line, however many tasks it has."""
    if not one_line or array_id is None:
        return "\n".join(map(str, job_ids))
    return f"submitted array {array_id} of {len(job_ids)} jobs: ids {id_ranges(job_ids)}"


def print_submitted(ctx: Context, job_ids: Sequence[int], is_array: bool) -> None:
    """Print what `run --detach` submitted (`submitted_text`): one line for an array when
    stdout is a terminal (not with --json); one id per line otherwise."""
    one_line = is_array and len(job_ids) > 1 and not ctx.args.json and sys.stdout.isatty()
    array_id = ctx.store.get(job_ids[0]).array_id if one_line else None
    print(submitted_text(job_ids, array_id, one_line))
