"""One job end to end: wait for a place, launch on the host, stream output, record the result.

The job row exists before this module runs (the CLI submits it), and every step updates it,
so whatever fails later, the jobs file says how far the job got. The runner on the host is
detached and writes its result to disk first, so a dropped connection or a killed
coordinator costs a re-attach (`refresh_job`), not the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import paths
from .cluster import Host
from .errors import (
    ContactLost,
    CoordinatorFailed,
    HostUnreachable,
    NoHostReachable,
    RemoteError,
    SshwasmError,
)
from .runner_client import (
    SERVE_MAX_PAYLOAD_BYTES,
    LaunchSpec,
    RunnerClient,
    ServeSession,
    StreamOutcome,
)
from .schedule import candidate_hosts, explain
from .staging import merge_output, output_scratch, pack_input
from .store import CANCELLED_EXIT_CODE, Job, JobStore
from .transport import Transport, TransportPool

POLL_INITIAL_S = 0.05
POLL_MAX_S = 1.0
HEARTBEAT_S = 3.0
CANCEL_POLL_S = 0.3
# A coordinator silent for this long is taken for dead (its pid is also checked).
COORDINATOR_STALE_S = 30.0
# After a dropped connection the foreground run retries this long before leaving the job
# to `sshwasm status`; the job itself keeps running on its host meanwhile.
RECONNECT_WINDOW_S = 60.0
# Jobs given no --time-limit end after this long (24 h), so a forgotten loop cannot hold a
# host forever. Enforced by the runner's watchdog alone: no epoch checks slow the guest.
DEFAULT_WALL_LIMIT_S = 24 * 3600.0
# A job whose host stays unreachable this long after its coordinator is gone becomes `lost`
# (the next `status` or `jobs` past that time decides); reaching the host again resets it.
LOST_AFTER_UNREACHABLE_S = 900.0
# How long `status`/`jobs` wait for a host when refreshing a job from it.
REFRESH_TIMEOUT_S = 20.0
# How much of each stream the job record keeps; the full output stays in files.
RECORD_HEAD_BYTES = 64 * 1024
RECORD_TAIL_BYTES = 64 * 1024
# How a stream cut at the output cap ends (the whole line is in OutputSink.write).
_CUT_MARKER_END = b"the rest of this stream was dropped]\n"
# How many of the files written beside existing ones a warning names.
BESIDE_NAMED = 3

Notify = Callable[[str], None]
_T = TypeVar("_T")


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
        """Close the file."""
        self._file.close()


@dataclass
class JobOutput:
    """Both streams of one job."""

    stdout: OutputSink
    stderr: OutputSink

    @classmethod
    def open(cls, store: JobStore, job: Job) -> JobOutput:
        """Open (for appending) the local output files of a job, held to its output cap."""
        directory = paths.make_job_output_dir(store.path, job.id)
        sizes = 0
        for name in ("stdout", "stderr"):
            with contextlib.suppress(OSError):
                sizes += (directory / name).stat().st_size
        budget = OutputBudget(job.max_output_mb, sizes)
        output = cls(
            OutputSink(directory / "stdout", budget), OutputSink(directory / "stderr", budget)
        )
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


def launch_spec(job: Job) -> LaunchSpec:
    """What the runner is told about a job."""
    return LaunchSpec(
        wasm_sha256=job.wasm_sha256,
        argv=job.argv_list,
        env=job.env_pairs,
        memory_mb=job.memory_mb,
        time_limit_s=job.time_limit_s,
        # Without --time-limit, a cap that costs nothing while the guest runs (no epochs).
        wall_limit_s=None if job.time_limit_s is not None else DEFAULT_WALL_LIMIT_S,
        output=bool(job.output_dir),
        max_output_bytes=None if job.max_output_mb is None else job.max_output_mb << 20,
    )


@dataclass
class OutputCollected:
    """How fetching a job's /output went: a problem for the record, a warning only."""

    problem: str | None = None
    warning: str | None = None


async def collect_output(
    store: JobStore, job: Job, client: RunnerClient, budget: OutputBudget
) -> OutputCollected:
    """Fetch a finished job's /output into its --output directory, streamed and held to
    what is left of the job's output budget, and merge it there without loss."""
    started = time.monotonic()
    destination = Path(job.output_dir)
    try:
        with output_scratch(destination) as scratch:
            cut = await client.fetch_output(job.remote_key, scratch, budget.left)
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


def result_fields(result: dict[str, Any]) -> dict[str, Any]:
    """Record columns from the runner's result.json."""
    return {
        "exit_code": result.get("exit_code"),
        "error": result.get("error"),
        "run_s": result.get("run_s"),
        "cpu_s": result.get("cpu_s"),
        "peak_memory_bytes": result.get("peak_memory_bytes"),
        "finished_at": result.get("finished_at"),
    }


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists on this machine."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_sshwasm_process(pid: int) -> bool | None:
    """Whether the process `pid` runs sshwasm (its command line says so); None: cannot tell."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except FileNotFoundError:
        # No procfs at all, or the process just exited: only the first is "cannot tell".
        return None if not os.path.isdir("/proc/self") else False
    except OSError:
        return None
    # `sshwasm ...` (the console script, run by its interpreter) or `python -m sshwasm ...`.
    head = argv[:4]
    if any(os.path.basename(arg) == b"sshwasm" for arg in head):
        return True
    return any(a == b"-m" and b == b"sshwasm" for a, b in itertools.pairwise(head))


def coordinator_alive(job: Job) -> bool:
    """Whether some sshwasm process is still looking after this job.

    A live sshwasm process is never taken for dead, however stale its heartbeat: one that
    is only slow (a lock held by another process, a stopped terminal) would otherwise be
    taken over, and the job followed by two processes, its output written twice. The
    heartbeat decides only for a live pid that is no sshwasm command (a program using the
    API, or a pid that was reused).
    """
    pid = job.coordinator_pid
    if not pid_alive(pid):
        return False
    if is_sshwasm_process(pid) is not False:
        return True
    return job.heartbeat_ts is not None and time.time() - job.heartbeat_ts < COORDINATOR_STALE_S


def needs_refresh(job: Job) -> bool:
    """Whether this process should bring the job up to date from its host: it is unfinished
    and no other process follows it (this one may have taken it over by an earlier refresh)."""
    if job.is_final:
        return False
    return job.coordinator_pid == os.getpid() or not coordinator_alive(job)


class Coordinator:
    """Drives jobs of one jobs file over one pool of connections."""

    def __init__(
        self, store: JobStore, hosts: Sequence[Host], pool: TransportPool, handlers: Handlers
    ) -> None:
        self.store = store
        self.hosts = hosts
        self.pool = pool
        self.handlers = handlers
        self._active: set[int] = set()
        self._launched: dict[int, Host] = {}  # jobs whose launch was sent, by host
        # Array tasks go through one serve session per host (None: launch each job alone).
        self._serve: dict[str, ServeSession] | None = None
        self._cancellers: dict[int, asyncio.Task[None]] = {}
        # Set (and replaced) whenever one of our jobs frees capacity, so our own queued
        # jobs start at once instead of at their next poll.
        self._room_freed = asyncio.Event()
        # Jobs waiting for a host: their waiter and the hosts excluded for them (with why).
        self._waiting: dict[int, tuple[asyncio.Future[Host | None], dict[str, str]]] = {}
        self._skips_said: set[str] = set()

    async def drive(self, job_id: int) -> Job:
        """Run a submitted job to its final state (or until its host is out of reach)."""
        return await self._supervised(self._drive_and_signal(job_id))

    async def drive_tasks(
        self, job_ids: Sequence[int], on_done: Callable[[Job], None] | None = None
    ) -> list[Job]:
        """Run the tasks of an array side by side; a task's failure does not stop the rest."""

        async def one(job_id: int) -> Job:
            try:
                job = await self._drive_and_signal(job_id)
            except SshwasmError as exc:
                job = self.store.get(job_id)
                # A running task whose host went away stays running for `status` to
                # collect (this process no longer follows it: say so, or no other
                # process would while this one lives); one that never started failed.
                if job.state == "queued":
                    self.store.finish(job_id, "failed", error=str(exc))
                    job = self.store.get(job_id)
                elif not job.is_final:
                    self.store.disown(job_id)
            if on_done is not None:
                on_done(job)
            return job

        if len(job_ids) > 1:
            self._serve = {}
        try:
            return list(
                await self._supervised(asyncio.gather(*(one(job_id) for job_id in job_ids)))
            )
        finally:
            sessions, self._serve = self._serve or {}, None
            for session in sessions.values():
                await session.close()

    async def _supervised(self, work: Awaitable[_T]) -> _T:
        """Run `work` beside the background tasks every job needs; if one of those fails,
        the whole run fails with CoordinatorFailed (never a hang waiting for it)."""
        main = asyncio.ensure_future(work)
        background = {
            asyncio.create_task(self._heartbeat()): "heartbeat",
            asyncio.create_task(self._watch_cancellations()): "cancel watcher",
            asyncio.create_task(self._place_waiting_jobs()): "placer",
        }
        try:
            await asyncio.wait({main, *background}, return_when=asyncio.FIRST_COMPLETED)
            if main.done():
                return main.result()
            failed = next(task for task in background if task.done())
            problem = None if failed.cancelled() else failed.exception()
            placed = sorted(self._launched)
            raise CoordinatorFailed(
                background[failed], self._describe(problem), placed
            ) from problem
        finally:
            tasks = (main, *background, *self._cancellers.values())
            for task in tasks:
                task.cancel()
            for task in tasks:
                # Their failures are reported above (or the run's own is on its way).
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _describe(self, problem: BaseException | None) -> str:
        if problem is None:
            return "it stopped"
        text = str(problem) or type(problem).__name__
        if isinstance(problem, sqlite3.Error):
            return f"jobs file {self.store.path}: {text}"
        return text

    async def _watch_cancellations(self) -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            for canceller in self._cancellers.values():
                # A canceller that failed would leave its job uncancelled and nobody told.
                if canceller.done() and not canceller.cancelled():
                    problem = canceller.exception()
                    if problem is not None:
                        raise problem
            if not self._active:
                continue
            for job_id in self.store.cancel_requested(sorted(self._active)):
                if job_id not in self._cancellers:
                    self._cancellers[job_id] = asyncio.create_task(self._cancel(job_id))

    async def _cancel(self, job_id: int) -> None:
        """Stop one of our jobs: in the queue, or on its host (retried until it ends)."""
        while True:
            job = self.store.get(job_id)
            if job.is_final:
                return
            if job.state == "queued":
                self.store.cancel_unstarted(job_id)
                self._signal_room()  # wakes its waiting loop, which then sees the state
                continue
            host = self._launched.get(job_id)
            if host is not None:
                # The runner records `cancelled`; our stream then delivers that result.
                with contextlib.suppress(SshwasmError):
                    await RunnerClient(await self.pool.get(host)).cancel(job.remote_key)
            await asyncio.sleep(CANCEL_POLL_S)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            # On the loop itself: the store's connection belongs to this thread, and the
            # write is one short transaction for all our jobs.
            if self._active:
                self.store.heartbeat_many(sorted(self._active))

    async def _drive_and_signal(self, job_id: int) -> Job:
        self._active.add(job_id)
        try:
            return await self._drive(job_id)
        finally:
            self._active.discard(job_id)
            self._signal_room()

    def _signal_room(self) -> None:
        freed, self._room_freed = self._room_freed, asyncio.Event()
        freed.set()

    async def _wait_for_room(self, seconds: float | None) -> None:
        # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that
        # arrives as the event is set, and the placer would then never stop.
        woken = asyncio.ensure_future(self._room_freed.wait())
        try:
            await asyncio.wait({woken}, timeout=seconds)
        finally:
            woken.cancel()

    async def _drive(self, job_id: int) -> Job:
        excluded: dict[str, str] = {}
        while True:
            host = await self._placement(job_id, excluded)
            if host is None:
                return self.store.get(job_id)  # cancelled or finished elsewhere meanwhile
            try:
                return await self._run_on(job_id, host)
            except HostUnreachable as exc:
                # The job never started there: give the capacity back and try elsewhere.
                self.store.release(job_id)
                self._signal_room()
                await self.pool.drop(host)
                excluded[host.name] = exc.reason
                warning = f"skipping host '{host.name}': {exc.reason}"
                if warning not in self._skips_said:  # once, not once per array task
                    self._skips_said.add(warning)
                    self.handlers.warning(warning)

    async def _placement(self, job_id: int, excluded: dict[str, str]) -> Host | None:
        """Wait until the placer reserves a host for the job (None: it left the queue)."""
        waiter: asyncio.Future[Host | None] = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = (waiter, excluded)
        self._signal_room()
        return await waiter

    async def _place_waiting_jobs(self) -> None:
        """One placement pass for all our waiting jobs per wake-up (not one per job).

        Woken when one of our jobs frees room or joins the queue; polls with backoff for
        room that other processes' jobs free.
        """
        delay = POLL_INITIAL_S
        announced: set[int] = set()
        while True:
            if not self._waiting:
                await self._wait_for_room(None)
                delay = POLL_INITIAL_S
                continue
            waiting = dict(self._waiting)
            placed, gone = self.store.place_waiting(
                sorted(waiting),
                self.hosts,
                {job_id: list(excluded) for job_id, (_, excluded) in waiting.items()},
            )
            for job_id, (waiter, excluded) in waiting.items():
                outcome: Host | SshwasmError | None
                if job_id in placed:
                    outcome = placed[job_id]
                elif job_id in gone:
                    outcome = None
                else:
                    job = self.store.get(job_id)
                    if candidate_hosts(self.hosts, job.request, excluded):
                        if job_id not in announced:
                            announced.add(job_id)
                            self.handlers.notice(f"job {job_id} queued: {self._why_waiting(job)}")
                        continue
                    outcome = NoHostReachable(excluded)
                    self.store.finish(job_id, "failed", error=str(outcome))
                del self._waiting[job_id]
                if waiter.done():
                    continue
                if isinstance(outcome, SshwasmError):
                    waiter.set_exception(outcome)
                else:
                    waiter.set_result(outcome)
            if placed:
                delay = POLL_INITIAL_S
                continue  # others may fit too, now that the plan changed
            # Other processes' jobs free room too; only polling sees those.
            await self._wait_for_room(delay)
            delay = min(delay * 1.5, POLL_MAX_S)

    def _why_waiting(self, job: Job) -> str:
        _, reasons = explain(self.hosts, self.store.usage(), job.request, {})
        busy = [f"{name} {why}" for name, why in reasons.items() if why.startswith("no room")]
        return "; ".join(busy) if busy else "waiting for a host with room"

    async def _run_on(self, job_id: int, host: Host) -> Job:
        job = self.store.get(job_id)
        self.handlers.notice(f"job {job_id} running on {host.name}")
        transport = await self.pool.get(host)
        client = RunnerClient(transport)
        stdin = await asyncio.to_thread(Path(job.stdin_path).read_bytes) if job.stdin_path else None
        spec = launch_spec(job)
        input_tar = b""
        if job.input_path:
            started = time.monotonic()
            input_tar = await asyncio.to_thread(pack_input, Path(job.input_path))
            self.store.update(
                job_id,
                input_bytes=len(input_tar),
                stage_in_s=round(time.monotonic() - started, 6),
            )
        if self.store.cancel_requested([job_id]):
            self.store.cancel_unstarted(job_id)
            return self.store.get(job_id)
        output = JobOutput.open(self.store, job)
        self._launched[job_id] = host
        try:
            outcome, stats = await client.launch(
                job.remote_key,
                spec,
                stdin,
                Path(job.wasm_path),
                self._tee(output.stdout, self.handlers.stdout),
                self._tee(output.stderr, self.handlers.stderr),
                notice=self.handlers.notice,
                input_tar=input_tar,
                session=self._serve_session(host, transport, len(stdin or b"") + len(input_tar)),
            )
            self.store.update(
                job_id, upload_bytes=stats.upload_bytes, upload_s=round(stats.upload_s, 6)
            )
            outcome = await self._until_result(job, host, client, output, outcome)
            for warning in await record_end(self.store, job, host, client, outcome, output):
                self.handlers.warning(warning)
            return self.store.get(job_id)
        except RemoteError as exc:
            self.store.finish(job_id, "failed", error=str(exc), **output.fields())
            raise
        finally:
            self._launched.pop(job_id, None)
            output.close()

    def _serve_session(
        self, host: Host, transport: Transport, payload_bytes: int
    ) -> ServeSession | None:
        """The host's serve session for array tasks; None to launch the job on its own."""
        if self._serve is None or payload_bytes > SERVE_MAX_PAYLOAD_BYTES:
            return None
        session = self._serve.get(host.name)
        if session is None or session.broken or session.transport is not transport:
            session = self._serve[host.name] = ServeSession(transport)
        return session

    @staticmethod
    def _tee(sink: OutputSink, show: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def both(data: bytes) -> None:
            kept = sink.write(data)
            if kept:
                show(kept)

        return both

    async def _until_result(
        self,
        job: Job,
        host: Host,
        client: RunnerClient,
        output: JobOutput,
        outcome: StreamOutcome,
    ) -> StreamOutcome:
        """Re-attach after dropped connections until the runner sends the result."""
        deadline = time.monotonic() + RECONNECT_WINDOW_S
        delay = 0.5
        confirmed = outcome.pid is not None or outcome.frames > 0
        while outcome.result is None and outcome.error is None:
            if not outcome.connection_lost:
                done = outcome.completed
                stderr = done.stderr.decode(errors="replace").strip() if done else ""
                raise RemoteError(host.name, f"the runner ended without a result: {stderr}")
            self.handlers.warning(f"connection to '{host.name}' lost; re-attaching to job {job.id}")
            while True:
                await self.pool.drop(host)
                if time.monotonic() > deadline:
                    # Not HostUnreachable: that would put the job back in the queue.
                    raise ContactLost(host.name, job.id, RECONNECT_WINDOW_S)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
                try:
                    client = RunnerClient(await self.pool.get(host))
                    outcome = await client.stream(
                        job.remote_key,
                        output.stdout.size,
                        output.stderr.size,
                        self._tee(output.stdout, self.handlers.stdout),
                        self._tee(output.stderr, self.handlers.stderr),
                        follow=True,
                    )
                    break
                except HostUnreachable:
                    continue
            confirmed = confirmed or outcome.frames > 0
        if not confirmed and outcome.error is not None and outcome.error.get("kind") == "missing":
            # The connection dropped before the host confirmed the launch, and the host has no
            # trace of it: it never started, so it may be placed again (HostUnreachable).
            raise HostUnreachable(host.name, "connection lost before the job started")
        return outcome


async def record_end(
    store: JobStore,
    job: Job,
    host: Host,
    client: RunnerClient,
    outcome: StreamOutcome,
    output: JobOutput,
) -> list[str]:
    """Record how a job ended, from its runner's final answer (fetching its /output first).

    Returns what is worth a warning (output not fetched, or written beside existing
    files). Does nothing when the answer is not final (the job is still running).
    """
    if outcome.result is not None:
        collected = OutputCollected()
        if job.output_dir:
            collected = await collect_output(store, job, client, output.budget)
        state = str(outcome.result.get("state", "failed"))
        fields = result_fields(outcome.result)
        if collected.problem and not fields["error"]:
            # The record says what went wrong, if nothing else did.
            fields["error"] = collected.problem
        if output.budget.exceeded and job.max_output_mb is not None:
            # Held here too, whatever the host said: the job ends as over its cap.
            state, fields["exit_code"] = "failed", None
            fields["error"] = output_limit_error(job.max_output_mb)
        store.finish(job.id, state, **fields, **output.fields())
        return [text for text in (collected.problem, collected.warning) if text]
    if outcome.error is not None:
        if outcome.error.get("kind") == "missing":
            error = f"host '{host.name}' has no trace of the job"
            store.finish(job.id, "lost", error=error, **output.fields())
        else:
            message = outcome.error.get("error", "the runner failed")
            store.finish(
                job.id, "failed", error=f"host '{host.name}': {message}", **output.fields()
            )
    return []


async def refresh_job(store: JobStore, job: Job, pool: TransportPool) -> Job:
    """Bring an unfinished job whose coordinator is gone up to date from its host."""
    if not needs_refresh(job):
        return job
    if not store.claim(job):
        return store.get(job.id)  # another process took it over just now
    if job.state == "queued":
        store.finish(job.id, "lost", error="its coordinator exited before the job was placed")
        return store.get(job.id)
    host = job.host_snapshot
    if host is None:
        store.finish(job.id, "lost", error="no record of the host the job was placed on")
        return store.get(job.id)
    output = JobOutput.open(store, job)

    async def ask_host() -> tuple[RunnerClient, StreamOutcome]:
        client = RunnerClient(await pool.get(host))
        outcome = await client.stream(
            job.remote_key,
            output.stdout.size,
            output.stderr.size,
            output.stdout.write,
            output.stderr.write,
            follow=False,
        )
        return client, outcome

    try:
        try:
            # Bounded: `jobs` must not hang on a host that went silent.
            client, outcome = await asyncio.wait_for(ask_host(), REFRESH_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError):
            raise HostUnreachable(host.name, f"no answer within {REFRESH_TIMEOUT_S:g}s") from None
    except RemoteError as exc:
        # The host answered, outside the protocol: asking again would not make it true.
        store.finish(job.id, "failed", error=str(exc), **output.fields())
        return store.get(job.id)
    except SshwasmError as exc:
        now = time.time()
        since = job.unreachable_since or now
        if now - since > LOST_AFTER_UNREACHABLE_S:
            store.finish(
                job.id,
                "lost",
                error=f"host '{host.name}' unreachable for over "
                f"{LOST_AFTER_UNREACHABLE_S:g}s: {exc}",
                **output.fields(),
            )
        else:
            store.update(job.id, error=f"cannot reach its host: {exc}", unreachable_since=since)
        return store.get(job.id)
    finally:
        output.close()
    if outcome.result is None and outcome.error is None:
        # Still running there (the runner records a dead job's end itself, as a result).
        store.update(job.id, unreachable_since=None, error=None, **output.fields())
    else:
        await record_end(store, job, host, client, outcome, output)
    return store.get(job.id)


CANCEL_WAIT_S = 15.0


async def cancel_jobs(
    store: JobStore, jobs: Sequence[Job], pool: TransportPool
) -> list[tuple[Job, str | None]]:
    """Cancel each job; returns each job as it ends up, with a problem text or None.

    A job with a live coordinator is cancelled by that coordinator (it owns the job's
    connection and output); this only asks and waits. Otherwise it is done here.
    """
    results: list[tuple[Job, str | None]] = []
    for job in jobs:
        job = store.get(job.id)
        if job.state == "queued" and store.cancel_unstarted(job.id):
            job = store.get(job.id)
        if job.is_final:
            results.append((job, None))
            continue
        if not needs_refresh(job):  # another live process follows it: ask that one
            store.request_cancel(job.id)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while not job.is_final and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                job = store.get(job.id)
            problem = None if job.is_final else "its coordinator did not confirm in time"
            results.append((job, problem))
            continue
        host = job.host_snapshot
        if host is None:
            store.finish(job.id, "cancelled", exit_code=CANCELLED_EXIT_CODE, error="cancelled")
            results.append((store.get(job.id), None))
            continue
        try:
            await RunnerClient(await pool.get(host)).cancel(job.remote_key)
        except SshwasmError as exc:
            results.append((job, str(exc)))
            continue
        results.append((await refresh_job(store, job, pool), None))
    return results
