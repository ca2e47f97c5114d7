"""How the CLI shows things: escaped lines, tables, JSON, notices, a job's saved output and
the line that says how a job ended. Every byte the CLI writes goes through here."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..states import JobState

if TYPE_CHECKING:
    from ..store import Job

PROG = "sshwasm"

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


def say(text: object) -> None:
    """One line of a command's result on stdout, escaped."""
    print(printable(text))


def table(rows: Sequence[Sequence[Any]] | Sequence[dict[str, Any]], headers: Any) -> None:
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


def print_json(value: Any) -> None:
    """`value` as indented JSON on stdout."""
    print(json.dumps(value, indent=2))


def write_out(data: bytes) -> None:
    """A job's bytes to stdout, as they are."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def write_err(data: bytes) -> None:
    """A job's bytes to stderr, as they are."""
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def notice(message: str) -> None:
    """A `sshwasm: ...` line on stderr."""
    print(f"{PROG}: {printable(message)}", file=sys.stderr, flush=True)


def error(message: object) -> None:
    """A `sshwasm: error: ...` line on stderr."""
    print(f"{PROG}: error: {printable(message)}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A `sshwasm: warning: ...` line on stderr."""
    notice(f"warning: {message}")


def show_sshwasm_warnings() -> None:
    """Have `warnings.warn(..., SshwasmWarning)` from the library print as `warn` does,
    not as Python's two lines with a file name; every other warning as before. Once per
    process, however many commands run in it."""
    import warnings

    from ..errors import SshwasmWarning

    shown_before = warnings.showwarning
    if getattr(shown_before, "sshwasm", False):
        return

    def show(message: Any, category: type[Warning], *where: Any, **more: Any) -> None:
        if issubclass(category, SshwasmWarning):
            warn(str(message))
        else:
            shown_before(message, category, *where, **more)

    show.sshwasm = True  # type: ignore[attr-defined]
    warnings.showwarning = show


# -- how a job ended ---------------------------------------------------------------------


def job_label(job: Job) -> str:
    """How `run` names a job in its messages."""
    if job.array_task is None:
        return f"job {job.id}"
    return f"task {job.array_task} (job {job.id})"


def report_end(job: Job) -> None:
    """Say on stderr how a job ended, unless its own exit code says all there is.

    Every `run` that does not exit with the job's own code says why in an error line; a job
    that has its own code and an error text (timeout, trap, cancelled) gets a notice.
    """
    if job.state == JobState.SUCCEEDED:
        return
    what = f"{job_label(job)} {job.state}"
    code = job.exit_code
    if not job.is_final:
        detail = f" ({job.error})" if job.error else ""
        error(f"{what}{detail}; `{PROG} status {job.id}` collects it later")
    elif code is None or (job.state == JobState.FAILED and not 0 < code < 256):
        error(f"{what}: {job.error or f'exit code {code}'}")
    elif job.error:
        notice(f"{what}: {job.error}")


# -- a job's saved output ----------------------------------------------------------------


def copy_output(path: Path, write: Callable[[bytes], None], prefix: bytes | None) -> None:
    """Write a task's saved output, with `prefix` at the start of each line when tagging.

    Read in chunks, never by line: a stream without newlines is not held in memory whole.
    """
    if not path.exists():
        return
    at_line_start = True
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            if prefix is not None:
                chunk, at_line_start = tag_lines(chunk, prefix, at_line_start)
            write(chunk)


def tag_lines(chunk: bytes, prefix: bytes, at_line_start: bool) -> tuple[bytes, bool]:
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


# -- the jobs table ----------------------------------------------------------------------

JOB_HEADERS = ["ID", "NAME", "STATE", "HOST", "CPUS", "MEM_MB", "SUBMITTED", "RUNTIME", "EXIT"]


def job_row(job: Job) -> list[Any]:
    """A job's row under JOB_HEADERS."""
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
        local_time(job.submitted_at),
        runtime(job),
        "" if job.exit_code is None else job.exit_code,
    ]


def folded_rows(jobs: Sequence[Job]) -> list[list[Any]]:
    """One row per array (the array's id, a count per state), plain jobs as they are."""
    rows: list[list[Any]] = []
    arrays: dict[int, list[Job]] = {}
    for job in jobs:
        if job.array_id is None:
            rows.append(job_row(job))
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
            local_time(first.submitted_at),
            f"{total_s:.2f}s" if total_s else "",
            max(codes) if codes else "",
        ]
    return rows


def local_time(iso: str | None) -> str:
    """A stored UTC timestamp in local time, to the second."""
    if not iso:
        return ""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):  # a row written before host results were checked
        return str(iso)


def runtime(job: Job) -> str:
    """How long a job ran (or has been running)."""
    return runtime_of(job.run_s, job.state, job.started_at)


def runtime_of(run_s: object, state: str, started_at: str | None) -> str:
    """`runtime` from a row's run_s, state and started_at (the `jobs` table's light rows)."""
    seconds = run_s if isinstance(run_s, (int, float)) else None  # None: an old bad row
    if seconds is None and state == JobState.RUNNING and started_at:
        seconds = time.time() - datetime.fromisoformat(started_at).timestamp()
    if seconds is None:
        return ""
    return f"{seconds:.2f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:04.1f}s"
