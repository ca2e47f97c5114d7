"""The Python API: submit jobs from a program and get each one back as a future.

A `Client` is a client of the same machinery as the command line: the source is built
(`build.build`), checked against the cluster (`schedule.check_feasible`), recorded
(`JobStore.submit_tasks`) and handed to a detached coordinator, the one `run --detach`
starts (`cli.coordinate.spawn_coordinator`). The jobs therefore survive the program that
submitted them: if it exits, is killed or closes its client, they run to their end and
`sshwasm status`, `jobs` or a later `Client().job(id)` collect them.

Each `Job` is a `concurrent.futures.Future` whose result is the job's record. One daemon
thread per client (the watcher) reads the jobs file for the jobs it follows and completes
their futures when they reach a final state; a job whose coordinator died is brought up
to date from its host, as `status` does (`recorded_jobs.refresh_job`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from .cli.context import Context, with_pool
from .cli.parser import (
    DEFAULT_CPUS,
    DEFAULT_MAX_OUTPUT_MB,
    DEFAULT_MEMORY_MB,
    MAX_ARRAY_TASKS,
    MAX_OUTPUT_MB_LIMIT,
    MAX_RETRIES,
)
from .cli.show import warn
from .errors import SshwasmError, StoreError, UsageError
from .states import JobState
from .store import Job as StoredJob
from .store import JobSpec, JobStore

if TYPE_CHECKING:
    from .cluster import Cluster
    from .schedule import Request
    from .transport import TransportPool

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "AsyncClient",
    "Client",
    "HostStatus",
    "Job",
    "JobRecord",
    "as_completed",
    "wait",
]

# What `wait` may return at, as in concurrent.futures.
FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
ALL_COMPLETED = concurrent.futures.ALL_COMPLETED

# How often the watcher reads the jobs file: quickly at first (a cached build and a short
# job end within a second), then less often while the jobs it follows go on running.
WATCH_FIRST_S = 0.05
WATCH_MOST_S = 0.5
# How often a job without a live coordinator is asked for from its host.
REFRESH_EVERY_S = 2.0

Arg: TypeAlias = "str | int | float | os.PathLike[str]"
PathArg: TypeAlias = "str | os.PathLike[str]"
_R = TypeVar("_R")


@dataclass(frozen=True)
class JobRecord:
    """A job's record, as `sshwasm status --json` shows it (README.md, "The job record").

    A job that failed, timed out or was cancelled is a record with that `state`, never an
    exception. `stdout` and `stderr` hold the first and last 64 KiB of each stream (the
    whole streams: `Client.output`); times are in seconds, moments ISO 8601 UTC.
    """

    id: int
    name: str | None
    state: JobState
    exit_code: int | None
    host: str | None
    cpus: int
    memory_mb: int
    time_limit_s: float | None
    source: str
    language: str
    wasm_sha256: str
    wasm_bytes: int
    upload_bytes: int | None
    submitted_at: str
    started_at: str | None
    finished_at: str | None
    queue_s: float | None
    compile_s: float
    upload_s: float | None
    run_s: float | None
    cpu_s: float | None
    peak_memory_bytes: int | None
    stdout: str | None
    stderr: str | None
    error: str | None
    array_id: int | None
    array_task: int | None
    input_bytes: int | None
    output_bytes: int | None
    stage_in_s: float | None
    stage_out_s: float | None
    max_output_mb: int | None
    output_conflicts: int | None
    attempts: int
    attempt_hosts: str | None
    # --dir, --host-dir
    dirs: str | None
    fuel: int | None
    fuel_used: int | None
    rerun_of: int | None
    verify: bool
    reused_from: int | None
    engine: str  # "ssh" or "dask" (issue 12)

    @classmethod
    def of(cls, job: StoredJob) -> JobRecord:
        """The record of a row of the jobs file."""
        return cls(
            id=job.id,
            name=job.name,
            state=job.state,
            exit_code=job.exit_code,
            host=job.host,
            cpus=job.cpus,
            memory_mb=job.memory_mb,
            time_limit_s=job.time_limit_s,
            source=job.source,
            language=job.language,
            wasm_sha256=job.wasm_sha256,
            wasm_bytes=job.wasm_bytes,
            upload_bytes=job.upload_bytes,
            submitted_at=job.submitted_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            queue_s=job.queue_s,
            compile_s=job.compile_s,
            upload_s=job.upload_s,
            run_s=job.run_s,
            cpu_s=job.cpu_s,
            peak_memory_bytes=job.peak_memory_bytes,
            stdout=job.stdout,
            stderr=job.stderr,
            error=job.error,
            array_id=job.array_id,
            array_task=job.array_task,
            input_bytes=job.input_bytes,
            output_bytes=job.output_bytes,
            stage_in_s=job.stage_in_s,
            stage_out_s=job.stage_out_s,
            max_output_mb=job.max_output_mb,
            output_conflicts=job.output_conflicts,
            attempts=job.attempts,
            attempt_hosts=job.attempt_hosts,
            dirs=job.record()["dirs"],  # type: ignore[arg-type]
            fuel=job.fuel,
            fuel_used=job.fuel_used,
            rerun_of=job.rerun_of,
            verify=job.verify,
            reused_from=job.reused_from,
            engine=job.engine,
        )

    @property
    def succeeded(self) -> bool:
        """Whether the job ended `succeeded` (exit code 0)."""
        return self.state is JobState.SUCCEEDED

    @property
    def is_final(self) -> bool:
        """Whether the job reached a final state (this record will not change again)."""
        return self.state.is_final

    def to_dict(self) -> dict[str, str | int | float | None]:
        """The record as JSON values, exactly as `status --json` prints it."""
        record: dict[str, str | int | float | None] = dict(vars(self))
        record["state"] = self.state.value
        return record


@dataclass(frozen=True)
class HostStatus:
    """One host of the cluster, as `sshwasm hosts` shows it (`check`: `hosts --check`)."""

    name: str
    address: str
    cpus: int
    memory_mb: int
    cpus_free: int
    memory_free_mb: int
    running: int
    labels: tuple[str, ...]
    # With `check=True`: whether the host answered, and why not; None when not checked.
    reachable: bool | None = None
    error: str | None = None
    # The whole report of `hosts --check --json` for this host (empty when not checked).
    report: Mapping[str, Any] | None = None


class Job(concurrent.futures.Future[JobRecord]):
    """A submitted job, as a `concurrent.futures.Future` whose result is its `JobRecord`.

    `result(timeout=None)` waits for the job to end and returns its record, whatever its
    state (`TimeoutError` if it has not ended in time; the job goes on). `done()`,
    `add_done_callback()` (called once, with the job, in the client's watcher thread or at
    once if it has ended), `wait` and `as_completed` behave as for any future, and in an
    asyncio program `await job` gives the record. `cancel()` stops the job, queued or
    running; its result is then its record, in state `cancelled` if the cancel came first.
    """

    def __init__(self, client: Client, job_id: int) -> None:
        super().__init__()
        self._client = client
        self.id = job_id
        """The job's id in the jobs file (the one `sshwasm status ID` takes)."""
        self._last_state = JobState.QUEUED

    def __repr__(self) -> str:
        return f"<sshwasm.Job {self.id} {self.state.value}>"

    @property
    def state(self) -> JobState:
        """The job's state when the client last read it (its final one once done)."""
        if self.done() and self.exception() is None:
            return self.result().state
        return self._last_state

    def running(self) -> bool:
        """Whether the job was running on a host when the client last read it."""
        return not self.done() and self._last_state is JobState.RUNNING

    def cancelled(self) -> bool:
        """Whether the job ended `cancelled`."""
        return (
            self.done() and self.exception() is None and self.result().state is JobState.CANCELLED
        )

    def cancel(self) -> bool:
        """Stop the job (queued: at once; running: its host kills it); False if it had
        already ended. Its result then says how it ended (`cancelled`, unless it ended by
        itself first). Raises SshwasmError if the cancel could not be delivered."""
        if self.done():
            return False
        ended = self._client._cancel(self.id)
        if ended is not None:
            self._settle(ended)
        return True

    def status(self) -> JobRecord:
        """The job's record now, without waiting (brought up to date from its host first
        when no coordinator follows it, as `sshwasm status` does)."""
        return self._client._record_now(self.id)

    def output(self, stream: str = "stdout") -> bytes:
        """The job's whole stdout (or `"stderr"`) so far, byte for byte (`sshwasm logs`)."""
        return self._client.output(self.id, stream)

    def __await__(self) -> Generator[Any, None, JobRecord]:
        """`await job` in an asyncio program: the record, once the job has ended.

        Cancelling the awaiting task (`asyncio.wait_for` timing out, the program being
        interrupted) does not cancel the job, as `asyncio.wrap_future` would: the job goes
        on, as it does after `result(timeout)`; `cancel()` is the one way to stop it.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[JobRecord] = loop.create_future()

        def copy(job: concurrent.futures.Future[JobRecord]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits now
                loop.call_soon_threadsafe(_copy_outcome, job, waiter)

        self.add_done_callback(copy)
        return waiter.__await__()

    def _settle(self, record: JobRecord) -> None:
        """Complete the future with its final record (once; later calls do nothing)."""
        self._last_state = record.state
        with self._condition:
            if self.done():
                return
            self.set_result(record)

    def _fail(self, problem: BaseException) -> None:
        with self._condition:
            if self.done():
                return
            self.set_exception(problem)


def _copy_outcome(job: concurrent.futures.Future[JobRecord], waiter: Any) -> None:
    """Complete an asyncio future as the job's future completed (unless it was cancelled)."""
    if waiter.cancelled():
        return
    problem = job.exception()
    if problem is not None:
        waiter.set_exception(problem)
    else:
        waiter.set_result(job.result())


def wait(
    jobs: Iterable[Job], timeout: float | None = None, return_when: str = ALL_COMPLETED
) -> tuple[set[Job], set[Job]]:
    """Wait for jobs to end (`return_when`: ALL_COMPLETED or FIRST_COMPLETED); returns the
    sets (done, not_done), as `concurrent.futures.wait` does. Never raises on a timeout."""
    done, not_done = concurrent.futures.wait(list(jobs), timeout, return_when)
    return _jobs(done), _jobs(not_done)


def as_completed(jobs: Iterable[Job], timeout: float | None = None) -> Iterator[Job]:
    """Yield jobs as they end, first ended first; `TimeoutError` if `timeout` seconds pass
    before all have, as `concurrent.futures.as_completed` does."""
    for future in concurrent.futures.as_completed(list(jobs), timeout):
        assert isinstance(future, Job)
        yield future


def _jobs(futures: Iterable[concurrent.futures.Future[JobRecord]]) -> set[Job]:
    return {future for future in futures if isinstance(future, Job)}


class _ApiContext(Context):
    """The command line's context, with one jobs-file connection per thread: SQLite binds a
    connection to the thread that opened it, and a program may call its client from many."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self._local = threading.local()

    @property
    def store(self) -> JobStore:
        store: JobStore | None = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = JobStore(self.db_path, on_wait=warn)
        return store

    def close(self) -> None:
        store: JobStore | None = getattr(self._local, "store", None)
        if store is not None:
            store.close()
            self._local.store = None


class Client:
    """Submit and follow jobs from Python, as `sshwasm` does from the shell.

    `cluster` and `db` are found as the command line finds them (`--cluster`,
    `$SSHWASM_CLUSTER`, `./cluster.yaml`, ...; `--db`, `$SSHWASM_DB`, the data dir); the
    cluster file is read and checked here (ClusterError). Use it as a context manager or
    call `close()`. Closing does not stop the jobs, nor following them: their futures
    still complete while the program runs, and the jobs run to their end after it exits.
    sshwasm's own failures raise the `SshwasmError` subclasses the command line reports
    (CompileError, NoHostFits, ClusterError, UsageError for a bad argument, ...).
    """

    def __init__(self, cluster: PathArg | None = None, db: PathArg | None = None) -> None:
        args = argparse.Namespace(
            cluster=os.fspath(cluster) if cluster is not None else None,
            db=os.fspath(db) if db is not None else None,
        )
        self._ctx = _ApiContext(args)
        self._cluster: Cluster = self._ctx.cluster()
        self._lock = threading.Lock()
        # One Job per id while the program holds it; the watcher follows the unfinished.
        self._followed: weakref.WeakValueDictionary[int, Job] = weakref.WeakValueDictionary()
        self._pending: dict[int, Job] = {}
        self._watcher: _Watcher | None = None
        self._closed = False

    @property
    def db_path(self) -> Path:
        """The jobs file this client records its jobs in."""
        return self._ctx.db_path

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """No more calls on this client; its jobs go on and their futures still complete."""
        self._closed = True
        self._ctx.close()

    # -- submitting ---------------------------------------------------------------------

    def submit(
        self,
        source: PathArg,
        *args: Arg,
        cpus: int = DEFAULT_CPUS,
        memory_mb: int = DEFAULT_MEMORY_MB,
        time_limit: float | None = None,
        env: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        stdin: bytes | PathArg | None = None,
        input: PathArg | None = None,
        output: PathArg | None = None,
        name: str | None = None,
        host: str | None = None,
        labels: Iterable[str] = (),
        max_output_mb: int = DEFAULT_MAX_OUTPUT_MB,
        overwrite: bool = False,
        dirs: Iterable[str] = (),
        host_dirs: Iterable[str] = (),
        fuel: int | None = None,
        retries: int = 0,
        retry_failed: bool = False,
        after: Iterable[int | Job] = (),
        after_any: Iterable[int | Job] = (),
    ) -> Job:
        """Build `source` and submit one job running it with `args`, as `sshwasm run
        --detach` does; returns its `Job` at once (the job waits for room if need be).

        `stdin`: bytes, or the path of a file. `input`/`output`: as `--input`/`--output`
        (`overwrite`: `--overwrite`). `time_limit` in seconds; `env` a mapping or pairs.
        `dirs`/`host_dirs`: each as `--dir`/`--host-dir` takes it (`"data::/data:ro"`).
        `fuel`: a fuel budget, as `--fuel` (the record's `fuel_used` says what was used).
        `retries`/`retry_failed`: as `--retries N`/`--retry-failed`. `after`/`after_any`:
        jobs (a `Job` or an id) to wait for, as `--after`/`--after-any`.
        """
        (job,) = self._submit(
            source,
            [[_one_arg(arg) for arg in args]],
            array=False,
            options=_Options(
                cpus, memory_mb, time_limit, env, stdin, input, output, name, host,
                labels, max_output_mb, overwrite, fuel,
            ),
            mounts=(dirs, host_dirs),
            flow=_Flow(retries, retry_failed, after, after_any),
        )  # fmt: skip
        return job

    def map(
        self,
        source: PathArg,
        arg_lists: Iterable[Sequence[Arg] | Arg],
        *,
        cpus: int = DEFAULT_CPUS,
        memory_mb: int = DEFAULT_MEMORY_MB,
        time_limit: float | None = None,
        env: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        stdin: bytes | PathArg | None = None,
        input: PathArg | None = None,
        output: PathArg | None = None,
        name: str | None = None,
        host: str | None = None,
        labels: Iterable[str] = (),
        max_output_mb: int = DEFAULT_MAX_OUTPUT_MB,
        overwrite: bool = False,
        dirs: Iterable[str] = (),
        host_dirs: Iterable[str] = (),
        fuel: int | None = None,
        retries: int = 0,
        retry_failed: bool = False,
        after: Iterable[int | Job] = (),
        after_any: Iterable[int | Job] = (),
        max_running: int | None = None,
        halt_after_failures: int | None = None,
    ) -> list[Job]:
        """Submit one array: task i runs `source` with the arguments `arg_lists[i]` (a lone
        string or number is one argument) and sees `SSHWASM_ARRAY_TASK_ID=i`, as `run
        --array` tasks do. Built once, recorded in one transaction; returns the tasks' jobs
        in order (an empty list for no argument lists). Options as for `submit`, and
        `max_running`/`halt_after_failures` as `--max-running`/`--halt-after-failures`."""
        lists = [_one_arg_list(item) for item in arg_lists]
        if not lists:
            return []
        return self._submit(
            source,
            lists,
            array=True,
            options=_Options(
                cpus, memory_mb, time_limit, env, stdin, input, output, name, host,
                labels, max_output_mb, overwrite, fuel,
            ),
            mounts=(dirs, host_dirs),
            flow=_Flow(
                retries, retry_failed, after, after_any, max_running, halt_after_failures
            ),
        )  # fmt: skip

    def _submit(
        self,
        source: PathArg,
        arg_lists: list[list[str]],
        array: bool,
        options: _Options,
        mounts: tuple[Iterable[str], Iterable[str]] = ((), ()),
        flow: _Flow | None = None,
    ) -> list[Job]:
        from .schedule import check_feasible
        from .staging import check_input

        self._check_open()
        if len(arg_lists) > MAX_ARRAY_TASKS:
            raise UsageError(f"at most {MAX_ARRAY_TASKS} tasks in one map, got {len(arg_lists)}")
        request = options.request()
        check_feasible(self._cluster.hosts, request)
        flow_fields = (flow or _Flow()).spec_fields(self._ctx.store, self._cluster.engine)
        stdin_data = options.stdin_data()
        if options.input is not None:
            check_input(Path(options.input))
        if options.output is not None:
            out = Path(options.output)
            if out.exists() and not out.is_dir():
                raise UsageError(f"output {out}: not a directory")
        dirs = _dirs_json(mounts, self.db_path, options)
        if array:
            # Each task's arguments go in with its row, in the one submitting transaction.
            spec = _spec(Path(os.fspath(source)), [], len(arg_lists), options)
            spec = dataclasses.replace(spec, task_args=tuple(tuple(args) for args in arg_lists))
        else:
            spec = _spec(Path(os.fspath(source)), arg_lists[0], False, options)
        spec = dataclasses.replace(spec, dirs=dirs, **flow_fields)
        store = self._ctx.store
        job_ids = store.submit_tasks(spec)
        try:
            if stdin_data is not None:
                store.keep_stdin(job_ids, stdin_data)
            self._hand_over(job_ids)
        except (OSError, TimeoutError, SshwasmError) as exc:
            # Recorded but nobody will run them: say so in their records, not only here.
            why = (
                f"could not hand it to the pool: {exc}"
                if self._cluster.engine == "dask"
                else f"could not start its coordinator: {exc}"
            )
            for job_id in job_ids:
                store.finish(job_id, JobState.FAILED, error=why)
            raise SshwasmError(f"jobs {job_ids[0]}..{job_ids[-1]}: {why}") from exc
        return [self._follow(job_id) for job_id in job_ids]

    def _hand_over(self, job_ids: list[int]) -> None:
        """Start what runs the recorded jobs: a detached coordinator, or on `engine: dask`
        the pool's scheduler, which holds their tasks as for `run --detach` (the watcher
        collects them from it)."""
        if self._cluster.engine == "dask":  # engine: dask (issue 12)
            from .cli.coordinate import coordinator_handlers
            from .engines.dask_engine import DaskRun

            handlers = coordinator_handlers(show_output=False, show_notices=False)
            DaskRun(self._ctx.store, self._cluster, handlers).detach(job_ids)
            return
        from .cli.coordinate import spawn_coordinator

        spawn_coordinator(self._ctx, job_ids)

    # -- looking at jobs ----------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        """The job with this id (submitted by any program or command on this jobs file), as
        a `Job` to wait on or cancel; JobNotFound if there is none."""
        self._check_open()
        self._ctx.store.get(job_id)  # JobNotFound
        return self._follow(job_id)

    def jobs(
        self, limit: int | None = None, state: JobState | str | None = None
    ) -> list[JobRecord]:
        """Records of the jobs file's jobs, newest first, as `sshwasm jobs --json` lists
        them (jobs whose coordinator is gone are brought up to date from their hosts)."""
        from .cli.jobs import refresh

        self._check_open()
        wanted = _state_of(state)
        jobs = refresh(self._ctx, self._ctx.store.list_jobs(limit=limit, state=wanted))
        return [JobRecord.of(job) for job in jobs if wanted is None or job.state is wanted]

    def output(self, job_id: int, stream: str = "stdout") -> bytes:
        """A job's whole stdout (or `"stderr"`) as kept beside the jobs file, byte for byte."""
        from . import paths

        if stream not in ("stdout", "stderr"):
            raise UsageError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        self._ctx.store.get(job_id)  # JobNotFound
        path = paths.job_output_dir(self.db_path, job_id) / stream
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise SshwasmError(f"{path}: {exc.strerror or exc}") from exc

    def hosts(self, check: bool = False) -> list[HostStatus]:
        """The cluster's hosts with their capacity and what this jobs file holds there, as
        `sshwasm hosts`; `check=True` also connects to each (as `hosts --check`)."""
        self._check_open()
        hosts = self._cluster.hosts
        usage = self._ctx.store.usage()
        running = self._ctx.store.running_counts()
        reports: list[dict[str, Any] | None] = [None] * len(hosts)
        if check:
            import asyncio

            from .hosts import check_hosts

            reports = list(asyncio.run(check_hosts(hosts)))
        rows = []
        for host, report in zip(hosts, reports, strict=True):
            used = usage.get(host.name)
            rows.append(
                HostStatus(
                    name=host.name,
                    address=host.address,
                    cpus=host.cpus,
                    memory_mb=host.memory_mb,
                    cpus_free=host.cpus - (used.cpus if used else 0),
                    memory_free_mb=host.memory_mb - (used.memory_mb if used else 0),
                    running=running.get(host.name, 0),
                    labels=tuple(host.labels),
                    reachable=None if report is None else bool(report.get("reachable")),
                    error=None if report is None else report.get("error"),
                    report=report,
                )
            )
        return rows

    # -- for Job and the watcher --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this sshwasm Client is closed")

    def _follow(self, job_id: int) -> Job:
        """The one Job of this client for this id, followed by the watcher until it ends."""
        with self._lock:
            job = self._followed.get(job_id)
            if job is None:
                job = self._followed[job_id] = Job(self, job_id)
            if not job.done():
                self._pending[job_id] = job
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = _Watcher(self)
                self._watcher.start()
            self._watcher.wake.set()
        return job

    def _unfinished(self) -> list[Job]:
        with self._lock:
            for job_id in [i for i, job in self._pending.items() if job.done()]:
                del self._pending[job_id]
            return list(self._pending.values())

    def _record_now(self, job_id: int) -> JobRecord:
        from .cli.jobs import refresh

        (job,) = refresh(self._ctx, [self._ctx.store.get(job_id)])
        return JobRecord.of(job)

    def _cancel(self, job_id: int) -> JobRecord | None:
        """Cancel a job; its final record if it ended now, else None (it ends soon)."""
        from .liveness import needs_refresh
        from .recorded_jobs import cancel_jobs

        store = self._ctx.store
        job = store.get(job_id)
        if job.state is JobState.QUEUED:
            store.cancel_unstarted(job_id)
            job = store.get(job_id)
        if job.is_final:
            return JobRecord.of(job)
        if not needs_refresh(job):
            # Its coordinator (the detached one) owns the connection: ask it, do not wait.
            store.request_cancel(job_id)
            return None
        # Nobody follows it any more: stop it on its host from here, as `sshwasm cancel`.
        ((job, problem),) = with_pool(lambda pool: cancel_jobs(store, [job], pool))
        if problem is not None:
            raise SshwasmError(f"job {job_id}: {problem}")
        return JobRecord.of(job) if job.is_final else None


class _Watcher(threading.Thread):
    """Completes a client's futures: reads the jobs file for the unfinished ones, and brings
    jobs whose coordinator is gone up to date from their hosts. Ends when none is left."""

    def __init__(self, client: Client) -> None:
        super().__init__(name="sshwasm-watcher", daemon=True)
        self.client = client
        self.wake = threading.Event()
        self._last_refresh = 0.0

    def run(self) -> None:
        try:
            store = JobStore(self.client.db_path, on_wait=warn)
        except SshwasmError as exc:
            for job in self.client._unfinished():
                job._fail(exc)
            return
        try:
            self._watch(store)
        finally:
            store.close()

    def _watch(self, store: JobStore) -> None:
        delay = WATCH_FIRST_S
        while True:
            pending = self.client._unfinished()
            if not pending:
                with self.client._lock:
                    # Checked under the lock `_follow` takes: a job added now starts anew.
                    if not any(not job.done() for job in self.client._pending.values()):
                        self.client._watcher = None
                        return
                continue
            try:
                changed = self._look(store, pending)
            except Exception as exc:  # the jobs file is gone or broken: say so, never hang
                problem = (
                    exc if isinstance(exc, SshwasmError) else StoreError(f"{store.path}: {exc}")
                )
                for job in pending:
                    job._fail(problem)
                continue
            delay = WATCH_FIRST_S if changed else min(delay * 1.5, WATCH_MOST_S)
            self.wake.wait(delay)
            self.wake.clear()

    def _look(self, store: JobStore, pending: list[Job]) -> bool:
        """Settle the jobs that ended; True if any changed state."""
        from .liveness import needs_refresh

        by_id = {job.id: job for job in pending}
        changed = False
        orphans: list[StoredJob] = []
        found = store.get_many(list(by_id))
        for row in found:
            job = by_id.pop(row.id)
            if row.state is not job._last_state:
                changed = True
                job._last_state = row.state
            if row.is_final:
                job._settle(JobRecord.of(row))
            elif needs_refresh(row):
                orphans.append(row)
        for job in by_id.values():  # deleted from the jobs file under us
            job._fail(StoreError(f"job {job.id} is no longer in the jobs file {store.path}"))
        if orphans and time.monotonic() - self._last_refresh >= REFRESH_EVERY_S:
            self._last_refresh = time.monotonic()
            self._refresh(store, orphans)
            changed = True
        return changed

    def _refresh(self, store: JobStore, orphans: list[StoredJob]) -> None:
        import asyncio

        from .recorded_jobs import refresh_job

        on_dask = [job for job in orphans if job.engine == "dask"]
        if on_dask:  # engine: dask (issue 12): their tasks are the pool's, collected there
            from .cli.coordinate import coordinator_handlers
            from .engines.dask_engine import DaskRun

            handlers = coordinator_handlers(show_output=False, show_notices=False)
            DaskRun(store, self.client._cluster, handlers).collect(on_dask)
            orphans = [job for job in orphans if job.engine != "dask"]
        if not orphans:
            return

        async def refresh_all(pool: TransportPool) -> None:
            await asyncio.gather(*(refresh_job(store, job, pool) for job in orphans))

        with_pool(refresh_all)


@dataclass(frozen=True)
class _Flow:
    """Retries, dependencies and an array's limits, checked as `run` checks `--retries`,
    `--retry-failed`, `--after`, `--after-any`, `--max-running` and
    `--halt-after-failures`."""

    retries: int = 0
    retry_failed: bool = False
    after: Iterable[int | Job] = ()
    after_any: Iterable[int | Job] = ()
    max_running: int | None = None
    halt_after_failures: int | None = None

    def spec_fields(self, store: JobStore, engine: str) -> dict[str, Any]:
        """The JobSpec fields these set; a UsageError for a value `run` would refuse."""
        from .dependencies import check_dependencies

        retries = self.retries
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise UsageError(f"retries must be a whole number, got {retries!r}")
        if not 0 <= retries <= MAX_RETRIES:
            raise UsageError(f"retries must be from 0 to {MAX_RETRIES}, got {retries}")
        if self.retry_failed and not retries:
            raise UsageError("retry_failed needs retries (how many more attempts)")
        after, after_any = _job_ids("after", self.after), _job_ids("after_any", self.after_any)
        if after and after_any:
            raise UsageError("after and after_any cannot be combined; give one list")
        for what, value in (
            ("max_running", self.max_running),
            ("halt_after_failures", self.halt_after_failures),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise UsageError(f"{what} must be a whole number of at least 1, got {value!r}")
        if engine == "dask":  # as `run` refuses it: the pool holds jobs behind its own only
            from .engines.dask_dependencies import refuse_unheld

            refuse_unheld(store, after or after_any)
        check_dependencies(store, after or after_any)
        return {
            "retries": retries,
            "retry_failed": bool(self.retry_failed),
            "after": after or after_any,
            "after_any": bool(after_any),
            "max_running": self.max_running,
            "halt_after_failures": self.halt_after_failures,
        }


def _job_ids(what: str, given: Iterable[int | Job]) -> tuple[int, ...]:
    """Job ids from `Job`s and ids; a UsageError for anything else."""
    if isinstance(given, (str, bytes, int, Job)):
        raise UsageError(f"{what} must be a list of jobs or job ids, got {given!r}")
    ids = []
    for item in given:
        if isinstance(item, Job):
            ids.append(item.id)
        elif isinstance(item, int) and not isinstance(item, bool) and item >= 1:
            ids.append(item)
        else:
            raise UsageError(f"{what}: {item!r} is not a job or a job id")
    return tuple(ids)


@dataclass(frozen=True)
class _Options:
    """The options `submit` and `map` share, checked as the command line checks its flags."""

    cpus: int
    memory_mb: int
    time_limit: float | None
    env: Mapping[str, str] | Iterable[tuple[str, str]] | None
    stdin: bytes | PathArg | None
    input: PathArg | None
    output: PathArg | None
    name: str | None
    host: str | None
    labels: Iterable[str]
    max_output_mb: int
    overwrite: bool
    fuel: int | None = None

    def request(self) -> Request:
        from .schedule import Request

        for what, value in (("cpus", self.cpus), ("memory_mb", self.memory_mb)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{what} must be a whole number of at least 1, got {value!r}")
        if isinstance(self.labels, str):
            raise UsageError(f"labels must be a list of names, not the string {self.labels!r}")
        labels = tuple(self.labels)
        for label in labels:
            if not isinstance(label, str) or not label:
                raise UsageError(f"a label must be a non-empty string, got {label!r}")
        if self.host is not None and not isinstance(self.host, str):
            raise UsageError(f"host must be a host's name, got {self.host!r}")
        return Request(self.cpus, self.memory_mb, self.host, labels)

    def stdin_data(self) -> bytes | None:
        if self.stdin is None or isinstance(self.stdin, bytes):
            return self.stdin
        try:
            return Path(self.stdin).read_bytes()
        except (OSError, TypeError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise UsageError(f"stdin {self.stdin!r}: {text}") from exc

    def env_pairs(self) -> tuple[tuple[str, str], ...]:
        if self.env is None:
            return ()
        items = self.env.items() if isinstance(self.env, Mapping) else self.env
        pairs = []
        for item in items:
            try:
                key, value = item
            except (TypeError, ValueError):
                raise UsageError(f"env: {item!r} is not a (NAME, VALUE) pair") from None
            if not isinstance(key, str) or not key or "=" in key:
                raise UsageError(f"env: {key!r} is not a variable name (non-empty, no '=')")
            if not isinstance(value, str):
                raise UsageError(f"env: the value of {key} must be a string, got {value!r}")
            pairs.append((key, value))
        return tuple(pairs)

    def checked_time_limit(self) -> float | None:
        from .runner.protocol import MAX_TIME_LIMIT_S

        limit = self.time_limit
        if limit is None:
            return None
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise UsageError(f"time_limit must be a number of seconds, got {limit!r}")
        if not 0 < limit <= MAX_TIME_LIMIT_S:
            raise UsageError(
                f"time_limit must be more than 0 and at most {MAX_TIME_LIMIT_S} seconds, "
                f"got {limit!r}"
            )
        return float(limit)

    def checked_fuel(self) -> int | None:
        from .runner.protocol import MAX_FUEL

        value = self.fuel
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FUEL
        ):
            raise UsageError(f"fuel must be a whole number from 1 to {MAX_FUEL}, got {value!r}")
        return value

    def checked_max_output_mb(self) -> int:
        value = self.max_output_mb
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"max_output_mb must be a whole number, got {value!r}")
        if not 1 <= value <= MAX_OUTPUT_MB_LIMIT:
            raise UsageError(f"max_output_mb must be from 1 to {MAX_OUTPUT_MB_LIMIT}, got {value}")
        return value


def _spec(source: Path, args: list[str], array_size: int | bool, options: _Options) -> JobSpec:
    """Build the source (or take it from the cache) and describe the job(s), as `run`."""
    from .build import build
    from .submission import module_job_spec

    env = options.env_pairs()
    time_limit = options.checked_time_limit()
    max_output_mb = options.checked_max_output_mb()
    fuel = options.checked_fuel()
    if options.name is not None and not isinstance(options.name, str):
        raise UsageError(f"name must be a string, got {options.name!r}")
    artifact = build(source)
    return module_job_spec(
        artifact,
        source,
        args,
        memory_mb=options.memory_mb,
        memory_setting=f"memory_mb={options.memory_mb}",
        name=options.name,
        cpus=options.cpus,
        time_limit_s=time_limit,
        env=env,
        pinned_host=options.host,
        array_size=int(array_size) or None,
        labels=tuple(options.labels),
        input_path=str(Path(options.input).resolve()) if options.input is not None else None,
        output_dir=str(Path(options.output).resolve()) if options.output is not None else None,
        max_output_mb=max_output_mb,
        output_overwrite=bool(options.overwrite),
        fuel=fuel,
    )


def _dirs_json(
    mounts: tuple[Iterable[str], Iterable[str]], db_path: Path, options: _Options
) -> str:
    """`dirs` and `host_dirs`, checked as `--dir` and `--host-dir` are (Job.dirs)."""
    from .directories import check_mounts, mounts_json, parse_dir, parse_host_dir

    lists: list[tuple[str, ...]] = []
    for name, given in zip(("dirs", "host_dirs"), mounts, strict=True):
        texts = () if isinstance(given, str) else tuple(given)
        if isinstance(given, str) or not all(isinstance(text, str) for text in texts):
            raise UsageError(f"{name} must be a list of strings, got {given!r}")
        lists.append(texts)
    parsed = [*map(parse_dir, lists[0]), *map(parse_host_dir, lists[1])]
    uses_output = options.output is not None
    check_mounts(parsed, db_path, uses_input=options.input is not None, uses_output=uses_output)
    return mounts_json(parsed)


def _one_arg(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float, os.PathLike)):
        raise UsageError(f"a job argument must be a string, number or path, got {value!r}")
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def _one_arg_list(item: object) -> list[str]:
    if isinstance(item, (str, int, float, os.PathLike)) and not isinstance(item, bool):
        return [_one_arg(item)]
    if not isinstance(item, Iterable):
        raise UsageError(f"each item of map's list must be a list of arguments, got {item!r}")
    return [_one_arg(value) for value in item]


def _state_of(state: JobState | str | None) -> JobState | None:
    if state is None:
        return None
    try:
        return JobState(state)
    except ValueError:
        words = ", ".join(s.value for s in JobState)
        raise UsageError(f"no job state {state!r} (one of: {words})") from None


class AsyncClient:
    """`Client` for asyncio programs: the same calls, as coroutines that never block the
    event loop (each runs in a worker thread); a `Job` is awaited with `await job`.

        async with sshwasm.AsyncClient() as client:
            job = await client.submit("hello.rs")
            record = await job
    """

    def __init__(self, cluster: PathArg | None = None, db: PathArg | None = None) -> None:
        self.client = Client(cluster, db)
        """The `Client` doing the work (for `Job`s, `wait` and `as_completed`)."""

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """As `Client.close`: the jobs go on, their futures still complete."""
        self.client.close()

    async def submit(self, source: PathArg, *args: Arg, **options: Any) -> Job:
        """As `Client.submit` (its options too)."""
        return await self._in_thread(self.client.submit, source, *args, **options)

    async def map(
        self, source: PathArg, arg_lists: Iterable[Sequence[Arg] | Arg], **options: Any
    ) -> list[Job]:
        """As `Client.map` (its options too)."""
        return await self._in_thread(self.client.map, source, list(arg_lists), **options)

    async def job(self, job_id: int) -> Job:
        """As `Client.job`."""
        return await self._in_thread(self.client.job, job_id)

    async def jobs(
        self, limit: int | None = None, state: JobState | str | None = None
    ) -> list[JobRecord]:
        """As `Client.jobs`."""
        return await self._in_thread(self.client.jobs, limit, state)

    async def output(self, job_id: int, stream: str = "stdout") -> bytes:
        """As `Client.output`."""
        return await self._in_thread(self.client.output, job_id, stream)

    async def hosts(self, check: bool = False) -> list[HostStatus]:
        """As `Client.hosts`."""
        return await self._in_thread(self.client.hosts, check)

    @staticmethod
    async def _in_thread(call: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
        import asyncio

        return await asyncio.to_thread(call, *args, **kwargs)
