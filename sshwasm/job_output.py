"""A job's output on this machine: the files its streams go to, the record's head and tail of
them, the one cap stdout, stderr and /output share, and fetching /output into --output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from . import paths
from .errors import SshwasmError
from .fingerprint import save_output_manifest
from .runner_client import RunnerClient
from .staging import merge_output, output_scratch
from .store import Job, JobStore

# How much of each stream the job record keeps; the full output stays in files.
RECORD_HEAD_BYTES = 64 * 1024
RECORD_TAIL_BYTES = 64 * 1024
# How a stream cut at the output cap ends (the whole line is in OutputSink.write).
_CUT_MARKER_END = b"the rest of this stream was dropped]\n"
# How many of the files written beside existing ones a warning names.
BESIDE_NAMED = 3

Notify = Callable[[str], None]


def _ignore(_: bytes) -> None:
    return None


def _quiet(_: str) -> None:
    return None


@dataclass
class Handlers:
    """Where a coordinator sends live output and notices (the CLI decides what to show)."""

    stdout: Callable[[bytes], None] = _ignore
    stderr: Callable[[bytes], None] = _ignore
    notice: Notify = _quiet  # progress: compiling, queued, running on a host
    warning: Notify = _quiet  # something went wrong and was worked around


def output_limit_error(max_output_mb: int) -> str:
    """A job's error when it went past --max-output-mb (the runner says the same)."""
    return f"output limit of {max_output_mb} MB exceeded (stdout, stderr and /output together)"


class OutputBudget:
    """What a job may still bring back: its stdout, stderr and /output share one cap."""

    def __init__(self, max_output_mb: int | None, used: int) -> None:
        self.max_output_mb = max_output_mb
        self.left = None if max_output_mb is None else max(0, (max_output_mb << 20) - used)
        self.exceeded = False

    def take(self, size: int) -> int:
        """How many of `size` new bytes may be kept (they are counted as spent)."""
        if self.left is None:
            return size
        allowed = min(size, self.left)
        self.left -= allowed
        if allowed < size:
            self.exceeded = True
        return allowed


class OutputSink:
    """Appends one stream of a job to its local file and keeps a head and tail for the record.

    Never writes past the job's output budget: the first byte over it is replaced by one
    marker line, and nothing more is written.
    """

    def __init__(self, path: Path, budget: OutputBudget | None = None) -> None:
        self.path = path
        self.budget = budget or OutputBudget(None, 0)
        # Opened on the first byte: most array tasks print to one stream or none, and each
        # file made costs a wait on the file system's journal (0.3-0.5 ms). Readers of the
        # output (logs, copy_output, the API) take a missing file for an empty stream.
        self._file: BinaryIO | None = None
        try:
            self.size = path.stat().st_size
        except FileNotFoundError:
            self.size = 0
        if self.size:
            self._file = paths.open_private(path)  # closed in close()
            self.size = self._file.tell()
        self._head = bytearray()
        self._tail = bytearray()
        if self.size:
            with open(path, "rb") as existing:
                self._head += existing.read(RECORD_HEAD_BYTES)
                if self.size > RECORD_HEAD_BYTES:
                    existing.seek(max(RECORD_HEAD_BYTES, self.size - RECORD_TAIL_BYTES))
                    self._tail += existing.read()
        # Cut by an earlier coordinator of this job: the marker is the file's last line.
        self.cut = (bytes(self._tail) or bytes(self._head)).endswith(_CUT_MARKER_END)

    def write(self, data: bytes) -> bytes:
        """Keep a chunk (flushed at once: its size is the re-attach offset); returns what
        was kept, for showing: all of it, or what fit in the budget and the marker."""
        if self.cut:
            return b""
        allowed = self.budget.take(len(data))
        if allowed < len(data):
            self.cut = True
            mb = self.budget.max_output_mb
            data = data[:allowed] + (
                f"\n[sshwasm: output limit of {mb} MB reached; the rest of this stream was "
                f"dropped]\n".encode()
            )
        self._append(data)
        return data

    def _append(self, data: bytes) -> None:
        if not data:
            return
        if self._file is None:
            _make_parent(self.path.parent)
            self._file = paths.open_private(self.path)
        self._file.write(data)
        self._file.flush()
        self.size += len(data)
        room = RECORD_HEAD_BYTES - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            if len(self._tail) > 2 * RECORD_TAIL_BYTES:
                del self._tail[: len(self._tail) - RECORD_TAIL_BYTES]

    def text(self) -> str:
        """The stream for the job record: whole, or head and tail around a marker."""
        tail = bytes(self._tail[-RECORD_TAIL_BYTES:])
        omitted = self.size - len(self._head) - len(tail)
        if omitted <= 0:
            return (bytes(self._head) + tail).decode(errors="replace")
        marker = f"\n[sshwasm: {omitted} bytes omitted here; full output in {self.path}]\n"
        return bytes(self._head).decode(errors="replace") + marker + tail.decode(errors="replace")

    def close(self) -> None:
        """Close the file (if a byte was written, or it existed)."""
        if self._file is not None:
            self._file.close()


# Output roots (beside jobs files) made private by this process: made once, not per task.
_ROOTS_MADE: set[Path] = set()


def _make_parent(directory: Path) -> None:
    """Make a job's output directory (0700) on its first byte of output: the outputs
    root once per process, then the job's own directory."""
    root = directory.parent
    if root not in _ROOTS_MADE:
        paths.make_private_dir(root)
        _ROOTS_MADE.add(root)
    try:
        directory.mkdir(mode=paths.PRIVATE_DIR_MODE)
    except FileExistsError:
        paths.tighten(directory, paths.PRIVATE_DIR_MODE)
    except FileNotFoundError:  # the root was removed meanwhile
        _ROOTS_MADE.discard(root)
        paths.make_private_dir(directory)


@dataclass
class JobOutput:
    """Both streams of one job."""

    stdout: OutputSink
    stderr: OutputSink

    @classmethod
    def open(cls, store: JobStore, job: Job) -> JobOutput:
        """Open (for appending) the local output files of a job, held to its output cap.

        Neither the job's directory nor its files are made until the job prints a byte
        to that stream (a task with no output makes none)."""
        directory = paths.job_output_dir(store.path, job.id)
        budget = OutputBudget(job.max_output_mb, 0)
        output = cls(
            OutputSink(directory / "stdout", budget), OutputSink(directory / "stderr", budget)
        )
        budget = OutputBudget(job.max_output_mb, output.stdout.size + output.stderr.size)
        output.stdout.budget = output.stderr.budget = budget
        budget.exceeded = output.stdout.cut or output.stderr.cut
        return output

    @property
    def budget(self) -> OutputBudget:
        """The budget both streams (and /output) share."""
        return self.stdout.budget

    def fields(self) -> dict[str, Any]:
        """Record columns describing the output."""
        return {
            "stdout": self.stdout.text(),
            "stderr": self.stderr.text(),
            "stdout_bytes": self.stdout.size,
            "stderr_bytes": self.stderr.size,
        }

    def close(self) -> None:
        """Close both files."""
        self.stdout.close()
        self.stderr.close()


@dataclass
class OutputCollected:
    """How fetching a job's /output went: a problem for the record, a warning only."""

    problem: str | None = None
    warning: str | None = None


async def collect_output(
    store: JobStore, job: Job, destination: Path, client: RunnerClient, budget: OutputBudget
) -> OutputCollected:
    """Fetch a finished job's /output into its --output directory (`destination`), streamed
    and held to what is left of the job's output budget, and merge it there without loss."""
    started = time.monotonic()
    try:
        with output_scratch(destination) as scratch:
            cut = await client.fetch_output(job.remote_key, scratch, budget.left)
            # The job's own tree, before merging mixes it with what DIR held: for
            # `rerun --compare`, --verify and --reuse.
            await asyncio.to_thread(save_output_manifest, store.path, job.id, scratch)
            merged = await asyncio.to_thread(
                merge_output, scratch, destination, job.id, bool(job.output_overwrite)
            )
    except (SshwasmError, OSError) as exc:
        return OutputCollected(f"output of job {job.id} not fetched into {destination}: {exc}")
    budget.take(merged.size)
    budget.exceeded = budget.exceeded or cut
    store.update(
        job.id,
        output_bytes=merged.size,
        stage_out_s=round(time.monotonic() - started, 6),
        output_conflicts=len(merged.beside),
    )
    if not merged.beside:
        return OutputCollected()
    count = len(merged.beside)
    named = ", ".join(merged.beside[:BESIDE_NAMED])
    more = f" and {count - BESIDE_NAMED} more" if count > BESIDE_NAMED else ""
    return OutputCollected(
        warning=f"job {job.id}: {count} of its output files differ from what was already in "
        f"{destination}, which was left as it was; the job's versions are beside them as "
        f"NAME.sshwasm-{job.id}: {named}{more}"
    )
