"""One job end to end: wait for a place, launch on the host, stream output, record the result.

The job row exists before this module runs (the CLI submits it), and every step updates it,
so whatever fails later, the jobs file says how far the job got. The runner on the host is
detached and writes its result to disk first, so a dropped connection or a killed
coordinator costs a re-attach (`recorded_jobs.refresh_job`), not the job. Waiting for a
place is the placement queue's (`placement_queue`); the job's output files are
`job_output`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .attempts import (
    LATE_CHECK_S,
    Failure,
    RetryAttempt,
    collect_late,
    may_retry,
    outcome_failure,
    requeue,
)
from .backoff import Backoff
from .cluster import Host
from .dependencies import wait_for_dependencies
from .directories import stage_dirs
from .errors import (
    ContactLost,
    CoordinatorFailed,
    HostUnreachable,
    RemoteError,
    SshwasmError,
)
from .fingerprint import save_input_fingerprint
from .job_output import Handlers, JobOutput, OutputSink
from .placement_queue import PlacementQueue
from .recorded_jobs import record_end
from .runner_client import (
    SERVE_MAX_PAYLOAD_BYTES,
    LaunchSpec,
    RunnerClient,
    ServeSession,
    StreamOutcome,
)
from .schedule import candidate_hosts
from .staging import pack_input
from .states import JobState
from .store import Job, JobStore
from .transport import Transport, TransportPool, silence_limit_s

# Also what the CLI imports from here: how jobs are driven, and the calls on jobs this
# process does not drive (their own modules hold them).
HEARTBEAT_S = 3.0
CANCEL_POLL_S = 0.3
# After a dropped connection the foreground run retries this long before leaving the job
# to `sshwasm status`; the job itself keeps running on its host meanwhile.
RECONNECT_WINDOW_S = 60.0
# A job with a retry left is given up on its host sooner: once the host has been out of
# reach for the keepalive bound (`transport.silence_limit_s`), it is placed again elsewhere.
# Between tries to re-attach within that window.
REATTACH_BACKOFF = Backoff(first=0.5, factor=2.0, most=8.0)
# Jobs given no --time-limit end after this long (24 h), so a forgotten loop cannot hold a
# host forever. Enforced by the runner's watchdog alone: no epoch checks slow the guest.
DEFAULT_WALL_LIMIT_S = 24 * 3600.0

_T = TypeVar("_T")
# drive_tasks follows at least this many tasks at once (more with more cpus): each
# placement pass costs what the window holds, so it is kept small.
WINDOW_MIN = 64
# How often the tasks it does not follow yet are said alive: well within the queue's
# QUEUE_STALE_S, and rarely, since an array can have 100,000 of them.
PENDING_HEARTBEAT_S = 10.0
# How often drive_tasks calls its on_tick (a progress line redraws this often).
PROGRESS_TICK_S = 0.5


async def _tick_every(tick: Callable[[], None]) -> None:
    while True:
        tick()
        await asyncio.sleep(PROGRESS_TICK_S)


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
        fuel=job.fuel,
    )


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
        # An array's tasks not yet followed (drive_tasks' window): the ids from the index
        # on, ascending; queued in the jobs file, kept alive there by the heartbeat.
        self._pending: tuple[list[int], int] = ([], 0)
        # Of the tasks drive_tasks starts next, those with no --after (read once per window).
        self._no_dependencies: set[int] = set()
        # Handlers may be swapped after this: the queue asks for the current one.
        self.queue = PlacementQueue(store, hosts, lambda text: self.handlers.notice(text))
        self._skips_said: set[str] = set()
        # Jobs placed again after their host failed them: their old hosts are asked, at
        # the end of the run, how those attempts ended (attempts.collect_late).
        self._retried: set[int] = set()

    async def drive(self, job_id: int) -> Job:
        """Run a submitted job to its final state (or until its host is out of reach)."""
        job = await self._supervised(self._drive_and_signal(job_id))
        await self._collect_late()
        return self.store.get(job_id) if self._retried else job

    async def _collect_late(self) -> None:
        """Hear, for a few seconds at most, from the hosts that failed earlier attempts."""
        if not self._retried:
            return
        checks = [
            collect_late(self.store, job_id, self.hosts, self.pool)
            for job_id in sorted(self._retried)
        ]
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(*checks, return_exceptions=True), LATE_CHECK_S)

    async def drive_tasks(
        self,
        job_ids: Sequence[int],
        on_done: Callable[[Job], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        keep: bool = True,
    ) -> list[Job]:
        """Run the tasks of an array side by side; a task's failure does not stop the rest
        (unless the array's --halt-after-failures is reached). `on_tick` is called every
        PROGRESS_TICK_S on the loop while they run (a progress line).

        At most `window_size` tasks are followed at once, oldest first; the others wait in
        the jobs file (queued, their heartbeat kept) and hold no Python object here, so a
        100,000-task array costs per task what a 100-task one does. With `keep` false the
        ended jobs are not kept either: the list returned is empty (each went to `on_done`).
        """

        async def one(job_id: int) -> Job:
            try:
                job = await self._drive_and_signal(job_id)
            except SshwasmError as exc:
                job = self.store.get(job_id)
                # A running task whose host went away stays running for `status` to
                # collect (this process no longer follows it: say so, or no other
                # process would while this one lives); one that never started failed.
                if job.state is JobState.QUEUED:
                    self.store.finish(job_id, JobState.FAILED, error=str(exc))
                    job = self.store.get(job_id)
                elif not job.is_final:
                    self.store.disown(job_id)
            self._halt_if_failed(job)
            if on_done is not None:
                on_done(job)
            return job

        if len(job_ids) > 1:
            self._serve = {}
        ticker = asyncio.create_task(_tick_every(on_tick)) if on_tick is not None else None
        ended: dict[int, Job] = {}
        try:
            await self._supervised(self._windowed(job_ids, one, ended if keep else None))
            await self._collect_late()
            return [ended[job_id] for job_id in job_ids] if keep else []
        finally:
            self._pending, self._no_dependencies = ([], 0), set()
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            sessions, self._serve = self._serve or {}, None
            # All at once: one after another, each host's close added to the run's end.
            await asyncio.gather(*(session.close() for session in sessions.values()))

    def window_size(self) -> int:
        """How many tasks of an array are followed at once: twice what every host together
        could run (tasks take a cpu at least), so that the placer always has the next ones."""
        return max(WINDOW_MIN, 2 * sum(host.cpus for host in self.hosts))

    async def _windowed(
        self,
        job_ids: Sequence[int],
        one: Callable[[int], Coroutine[Any, Any, Job]],
        ended: dict[int, Job] | None,
    ) -> None:
        """Run `one` for each job, at most `window_size` at once, oldest job first (a job's
        --after dependencies are older than it, so they are never held back behind it)."""
        order = sorted(set(job_ids))
        window = self.window_size()
        running: set[asyncio.Task[Job]] = set()
        # Tasks put themselves here when they end: waiting for one costs the same whatever
        # the window holds (asyncio.wait would walk all of it at every end).
        finished: asyncio.Queue[asyncio.Task[Job]] = asyncio.Queue()

        async def collect() -> None:
            ended_now = [await finished.get()]
            while not finished.empty():
                ended_now.append(finished.get_nowait())
            for task in ended_now:
                running.discard(task)
                job = task.result()  # a failure of the coordinator itself propagates
                if ended is not None:
                    ended[job.id] = job

        try:
            for index, job_id in enumerate(order):
                while len(running) >= window:
                    await collect()
                if index % window == 0:
                    # The next window's tasks that wait for nothing: one read, not one each.
                    self._no_dependencies |= self.store.without_dependencies(
                        order[index : index + window]
                    )
                self._pending = (order, index + 1)
                task = asyncio.create_task(one(job_id))
                task.add_done_callback(finished.put_nowait)
                running.add(task)
            self._pending = ([], 0)
            while running:
                await collect()
        finally:
            for task in running:
                task.cancel()
            for task in running:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _halt_if_failed(self, job: Job) -> None:
        """After a task of an array with --halt-after-failures failed: cancel its unstarted
        tasks now if that was one failure too many (the placer checks too, in the same
        transaction that places, so none can start meanwhile)."""
        if job.halt_after_failures is None or job.state in (
            JobState.SUCCEEDED,
            JobState.CANCELLED,
        ):
            return
        if not job.is_final:
            return
        halted = self.store.halt_arrays([job.array_id] if job.array_id is not None else [])
        if halted:
            self.queue.signal_room()  # their waiters leave the queue at the next pass
            self.handlers.warning(
                f"array {job.array_id}: halted after {job.halt_after_failures} failures; "
                f"{len(halted)} task(s) not started were cancelled"
            )

    async def _supervised(self, work: Awaitable[_T]) -> _T:
        """Run `work` beside the background tasks every job needs; if one of those fails,
        the whole run fails with CoordinatorFailed (never a hang waiting for it)."""
        main = asyncio.ensure_future(work)
        background = {
            asyncio.create_task(self._heartbeat()): "heartbeat",
            asyncio.create_task(self._watch_cancellations()): "cancel watcher",
            asyncio.create_task(self.queue.run()): "placer",
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
            if job.state is JobState.QUEUED:
                self.store.cancel_unstarted(job_id)
                self.queue.signal_room()  # wakes its waiting loop, which then sees the state
                continue
            host = self._launched.get(job_id)
            if host is not None:
                # The runner records `cancelled`; our stream then delivers that result.
                with contextlib.suppress(SshwasmError):
                    await RunnerClient(await self.pool.get(host)).cancel(job.remote_key)
            await asyncio.sleep(CANCEL_POLL_S)

    async def _heartbeat(self) -> None:
        pending_said = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            # On the loop itself: the store's connection belongs to this thread, and the
            # write is one short transaction for all our jobs.
            if self._active:
                self.store.heartbeat_many(sorted(self._active))
            order, start = self._pending
            if start < len(order) and time.monotonic() - pending_said >= PENDING_HEARTBEAT_S:
                # The tasks not yet followed keep their place in line: one statement per
                # run of consecutive ids (an array's are one run), not one per task.
                self.store.heartbeat_queued(order[start:])
                pending_said = time.monotonic()

    async def _drive_and_signal(self, job_id: int) -> Job:
        self._active.add(job_id)
        try:
            return await self._drive(job_id)
        finally:
            self._active.discard(job_id)
            self.queue.signal_room()

    async def _drive(self, job_id: int) -> Job:
        excluded: dict[str, str] = {}
        if job_id in self._no_dependencies:
            self._no_dependencies.discard(job_id)  # read with its window (drive_tasks)
        elif not await wait_for_dependencies(self.store, job_id, self.pool, self.handlers.notice):
            return self.store.get(job_id)  # cancelled: a dependency failed, or by the user
        while True:
            host = await self.queue.placement(job_id, excluded)
            if host is None:
                return self.store.get(job_id)  # cancelled or finished elsewhere meanwhile
            try:
                return await self._run_on(job_id, host)
            except RetryAttempt as retry:
                self.queue.signal_room()
                if retry.failure.by_host:
                    self._retried.add(job_id)
                job = self.store.get(job_id)
                # Another host if one could ever take it; else the same one again.
                others = {**excluded, host.name: retry.failure.error}
                if retry.failure.by_host and candidate_hosts(self.hosts, job.request, others):
                    excluded = others
                self.handlers.warning(
                    f"job {job_id}: attempt {job.attempts - 1} on '{host.name}' ended: "
                    f"{retry.failure.error}; placing attempt {job.attempts} of "
                    f"{job.retries + 1} (its output starts again from the beginning)"
                )
            except HostUnreachable as exc:
                # The job never started there: give the capacity back and try elsewhere.
                self.store.release(job_id)
                self.queue.signal_room()
                await self.pool.drop(host)
                excluded[host.name] = exc.reason
                warning = f"skipping host '{host.name}': {exc.reason}"
                if warning not in self._skips_said:  # once, not once per array task
                    self._skips_said.add(warning)
                    self.handlers.warning(warning)

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
            # What `rerun` and --reuse check the input against later (content only).
            await asyncio.to_thread(save_input_fingerprint, self.store.path, job_id, input_tar)
            self.store.update(
                job_id,
                input_bytes=len(input_tar),
                stage_in_s=round(time.monotonic() - started, 6),
            )
        if job.dirs != "[]":  # --dir, --host-dir (directories.py)
            spec = await asyncio.to_thread(stage_dirs, spec, job)
        # Read again only after staging took a while: the row read above is a moment old,
        # and a cancel asked later than that reaches the host through _cancel anyway.
        staged = bool(job.stdin_path or job.input_path or job.dirs != "[]")
        if self.store.cancel_requested([job_id]) if staged else job.cancel_requested:
            self.store.cancel_unstarted(job_id, placed=True)
            return self.store.get(job_id)
        output = JobOutput.open(self.store, job)
        # The placing transaction recorded this attempt's host (store.place_waiting).
        self._launched[job_id] = host
        try:
            try:
                outcome, upload = await self._attempt(
                    job, host, client, output, stdin, spec, input_tar
                )
            except (RemoteError, ContactLost) as exc:
                self._maybe_retry(job, host, Failure(True, JobState.FAILED, str(exc)), output)
                raise
            failure = outcome_failure(host.name, outcome)
            if failure is not None:
                self._maybe_retry(job, host, failure, output)
            warnings = await record_end(self.store, job, host, client, outcome, output, upload)
            for warning in warnings:
                self.handlers.warning(warning)
            # The row its end wrote, unless something was written since: not read back.
            return self.store.finished_job(job_id) or self.store.get(job_id)
        except RemoteError as exc:
            self.store.finish(job_id, JobState.FAILED, error=str(exc), **output.fields())
            raise
        finally:
            self._launched.pop(job_id, None)
            output.close()

    def _maybe_retry(self, job: Job, host: Host, failure: Failure, output: JobOutput) -> None:
        """Queue the job again (raising RetryAttempt) if `failure` leaves it an attempt."""
        job = self.store.get(job.id)
        if job.is_final or not may_retry(job, failure):
            return
        if job.cancel_requested:  # the user's word stands: no attempt after a cancel
            return
        output.close()  # its files are set aside for the next attempt's
        if requeue(self.store, job, failure):
            raise RetryAttempt(host.name, failure)

    async def _attempt(
        self,
        job: Job,
        host: Host,
        client: RunnerClient,
        output: JobOutput,
        stdin: bytes | None,
        spec: LaunchSpec,
        input_tar: bytes,
    ) -> tuple[StreamOutcome, dict[str, Any]]:
        """Launch the job on the host and follow it (re-attaching) until its final answer;
        with the upload's record fields when they are left for the job's final write."""
        job_id = job.id
        transport = client.transport
        outcome, stats = await client.launch(
            job.remote_key,
            spec,
            stdin,
            Path(job.wasm_path),
            self._tee(output.stdout, self.handlers.stdout),
            self._tee(output.stderr, self.handlers.stderr),
            notice=self.handlers.notice,
            input_tar=input_tar,
            session=self._serve_session(
                host, transport, len(stdin or b"") + len(input_tar) + spec.dir_bytes
            ),
        )
        upload = {"upload_bytes": stats.upload_bytes, "upload_s": round(stats.upload_s, 6)}
        if outcome.result is not None:
            # Ended already (an array task's answer comes whole): recorded with its end,
            # in the same transaction, not one write more per task.
            return outcome, upload
        self.store.update(job_id, **upload)
        return await self._until_result(job, host, client, output, outcome), {}

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
        retry_left = job.attempts <= job.retries
        window = silence_limit_s(host) if retry_left else RECONNECT_WINDOW_S
        deadline = time.monotonic() + window
        delays = REATTACH_BACKOFF.delays()
        confirmed = outcome.pid is not None or outcome.frames > 0
        while outcome.result is None and outcome.error is None:
            if not outcome.connection_lost:
                done = outcome.completed
                stderr = done.stderr.decode(errors="replace").strip() if done else ""
                raise RemoteError(host.name, f"the runner ended without a result: {stderr}")
            self.handlers.warning(f"connection to '{host.name}' lost; re-attaching to job {job.id}")
            await self.pool.drop(host)
            while True:
                # Each try waits only for what is left of the window: a host that accepts
                # TCP and never answers would otherwise hold one for the connect timeout.
                left = deadline - time.monotonic()
                if left > 0:
                    await asyncio.sleep(min(next(delays), left))
                    left = deadline - time.monotonic()
                if left <= 0:
                    # Not HostUnreachable: that would put the job back in the queue.
                    raise ContactLost(host.name, job.id, window)
                try:
                    client = RunnerClient(await self.pool.get(host, within=left))
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
                    # A try that failed leaves a broken connection; one cut short by the
                    # window may still be connecting for the host's other jobs: kept.
                    if time.monotonic() < deadline:
                        await self.pool.drop(host)
            confirmed = confirmed or outcome.frames > 0
        if not confirmed and outcome.error is not None and outcome.error.get("kind") == "missing":
            # The connection dropped before the host confirmed the launch, and the host has no
            # trace of it: it never started, so it may be placed again (HostUnreachable).
            raise HostUnreachable(host.name, "connection lost before the job started")
        return outcome
