"""`engine: dask`: submitted jobs run as Dask tasks on the pool `sshwasm pool up` started.

Each job is one Dask task asking for the resources `cpus` and `memory_mb` (and, for `--host`
and `--label`, only the workers of the hosts that qualify). Dask queues and places the tasks,
notices dead workers and runs their tasks again elsewhere. The task itself does not run the
guest: it hands the launch spec to the worker plugin (engines/dask_preload.py), which sends
it to the host's unmodified runner through its `serve` child, so limits, `result.json` and
the job directory on the host's disk are the SSH engine's. The task returns the runner's
frames; here they are taken in (`apply_frame`) and recorded (`record_end`) exactly as the
SSH engine does, so `jobs`, `status`, `logs` and the record read the same.

The module travels once per worker as Dask data keyed by its content (`scatter`), and is
written to the host's module cache only when the runner asks for it.

Throughput (benchmarks/dask_array.py): a foreground run keeps a window of tasks submitted
(WINDOW_PER_CPU per cpu of the pool, at least WINDOW_MIN), topped up a quarter at a time
with one `client.map` per kind of task, so the client and the scheduler hold a window of a
big array, not all of it. The answers of the tasks that ended since the last wake-up come
back in one `gather`, and their records are written in one transaction (`finish_many`), as
are the starts the workers told (`mark_running_many`). The task function goes by reference
to the plugin's module on the hosts (`_TaskOnHosts`), and a task's answer is one bytes
object: the scheduler and the workers pickle a name and a string per task, not code and a
structure. The scheduler is asked about reruns once a second, not per wake-up.

Failures (what Dask does not settle by itself): each task started is an event on the
scheduler (the plugin's STARTED_TOPIC), so a job shows `running` on its host while it runs,
followed or detached. `sshwasm cancel` of a job nobody follows cancels its task in the
scheduler and its guest on whichever worker runs it (`cancel`). A job the scheduler has no
trace of (it restarted, or the client that submitted the job was killed) is settled once
from the hosts' job directories (`_settle`): collected from `result.json` if it ran,
submitted again if it never started or its worker stopped under it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cluster import Cluster, Host
from ..errors import SshwasmError
from ..job_output import Handlers, JobOutput
from ..pool import PRELOAD_NAME, PoolPlan, Run, connect, find_runs, plan_for
from ..recorded_jobs import end_of_answer, record_end, refresh_job
from ..runner.parent_death import WORKER_STOPPED
from ..runner.protocol import FrameDecoder, ProtocolError
from ..runner_client import RunnerClient, StreamOutcome, apply_frame
from ..states import JobState
from ..store import CANCELLED_EXIT_CODE, Job, JobStore, utc_now
from ..transport import TransportPool, transport_for
from .dask_dependencies import (
    Flows,
    dataset_name,
    decide_at_submit,
    detached_dependants,
    settle_dependants,
    take_flow,
    wants_flow,
)
from .dask_limits import ArrayLimits, annotated, halted_end
from .dask_staging import DaskStaging
from .dask_waits import (
    ANSWER_TIMEOUT_S,
    FORGET_TIMEOUT_S,
    PoolSilent,
    answer_of,
    asked,
    next_ended,
    ready_within,
)

# The task each job is: `sshwasm_job` of the worker plugin's module (dask_preload.py), which
# `pool up` put beside the scheduler and every worker (their working directory).
TASK_MODULE = PRELOAD_NAME.removesuffix(".py")
TASK_FUNCTION = "sshwasm_job"
# ... or, for a job of no limited array, `sshwasm_run`: the same, run in the worker's event
# loop (a coroutine function), not in a thread of its pool.
ASYNC_TASK_FUNCTION = "sshwasm_run"


# Runs on every worker (`Client.run`): cancels what runs there for some jobs.
_CANCEL_SOURCE = """
def sshwasm_cancel(bases, dask_worker=None):
    plugin = dask_worker.plugins["sshwasm-runner"]
    return [key for base in bases for key in plugin.cancel(base)]
"""
# Runs on every worker (`Client.run`): the started events of the tasks running there.
_RUNNING_SOURCE = """
def sshwasm_running(dask_worker=None):
    return dask_worker.plugins["sshwasm-runner"].running()
"""
# Runs in the scheduler: how often each task was started again after its worker died.
_RERUNS_SOURCE = """
def sshwasm_reruns(keys, dask_scheduler=None):
    found = {}
    for key in keys:
        task = dask_scheduler.tasks.get(key)
        if task is not None and task.suspicious:
            found[key] = task.suspicious
    return found
"""
RERUNS_BATCH = 2000
# Runs in the scheduler: the state of each task (memory: ended with an answer).
_STATES_SOURCE = """
def sshwasm_states(keys, dask_scheduler=None):
    return {key: dask_scheduler.tasks[key].state for key in keys if key in dask_scheduler.tasks}
"""
# The scheduler's event topic of started tasks (dask_preload.STARTED_TOPIC).
STARTED_TOPIC = "sshwasm-started"
# How long `jobs` waits (x10) for the answers of detached tasks that ended.
COLLECT_WAIT_S = 2.0
# How often a foreground run looks for jobs cancelled by `sshwasm cancel`.
CANCEL_CHECK_S = 0.3
# How many tasks a foreground run keeps submitted, per cpu of the pool (and at least
# WINDOW_MIN): enough that no worker waits for the client's next wake-up, while the client
# (futures, payloads) and the scheduler hold a window of a big array, not all of it.
WINDOW_PER_CPU = 16
WINDOW_MIN = 256
# ... topped up only when a quarter of it is free: each top-up is a `map`, which costs the
# scheduler the same whether it brings 5 tasks or 64.
WINDOW_TOP_UP = 4
# How often a foreground run asks the scheduler which of its ended tasks were run again
# after their worker died (`attempts`): their futures are kept until it asked.
RERUNS_EVERY_S = 1.0
# How often a foreground run looks again at jobs set aside because a dependency's task erred
# or was cancelled (dask_dependencies: `Flows.unheld`), waiting for their records.
UNHELD_POLL_S = 0.5
# A foreground run takes the tasks that ended at most this often while others still run:
# each wake-up gathers the answers (a question to every worker holding one, through the
# scheduler) and writes the jobs file once, whether 2 tasks ended or 30. The window keeps
# the workers busy meanwhile; a task's record comes at most this much later.
BATCH_EVERY_S = 0.1


def _by_value(source: str, name: str) -> Callable[..., Any]:
    """A function from `source` that pickles by value (its module exists nowhere else)."""
    namespace: dict[str, Any] = {"__name__": "sshwasm_dask_task"}
    exec(compile(source, f"<sshwasm {name}>", "exec"), namespace)
    function: Callable[..., Any] = namespace[name]
    return function


class _ModuleOnHosts:
    """Unpickles as TASK_MODULE, imported where it is unpickled (the pool's hosts)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (importlib.import_module, (TASK_MODULE,))


class _TaskOnHosts:
    """The task function as the client submits it: it pickles as a reference to the
    hosts' TASK_MODULE.TASK_FUNCTION, not by value. The scheduler pickles each task's
    function again for the worker that runs it: by value that cost a code object and a
    failed import (a search of sys.path) per task; by reference it is a name."""

    __name__ = __qualname__ = TASK_FUNCTION

    def __call__(self, payload: bytes, module: bytes) -> Any:
        raise RuntimeError(f"{TASK_FUNCTION} runs on the pool's workers only")

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (_ModuleOnHosts(), self.__name__))


class _AsyncTaskOnHosts(_TaskOnHosts):
    """ASYNC_TASK_FUNCTION by reference. Said to be a coroutine function (tornado's mark,
    which distributed reads), so that Dask awaits it in the worker's event loop whether it
    asks here or on the worker."""

    __name__ = __qualname__ = ASYNC_TASK_FUNCTION
    __tornado_coroutine__ = True


def _task_function() -> Callable[..., Any]:
    return _TaskOnHosts()


def _async_task_function() -> Callable[..., Any]:
    return _AsyncTaskOnHosts()


def eligible_workers(cluster: Cluster, job: Job) -> list[str] | None:
    """Where `job` may run, as Dask worker restrictions; None: anywhere.

    Each host by its address (Dask's restriction by host), not by its worker's name: the
    scheduler turns a name into the worker's address of the moment (host and port), so a
    worker its nanny started anew (after a crash, on another port) would never again get a
    task pinned to it, and a task submitted while the host's worker was away could never
    run. A host sharing its address with another host of the cluster is named instead.
    """
    labels = set(json.loads(job.labels or "[]"))
    if job.pinned_host is None and not labels:
        return None
    addresses = Counter(host.address for host in cluster.hosts)
    return [
        host.address if addresses[host.address] == 1 else host.name
        for host in cluster.hosts
        if (job.pinned_host is None or host.name == job.pinned_host)
        and labels.issubset(host.labels)
    ]


def job_base(job: Job) -> str:
    """The job's key as submitted: its runs on hosts are `<base>.<worker>-<pid>-<n>`."""
    return job.remote_key.split(".", 1)[0]


def task_key(job: Job) -> str:
    """The job's Dask key: unique in the scheduler, and naming the job for the dashboard.
    The same whichever run the record shows (`remote_key` names the run once it started)."""
    return f"sshwasm-{job_base(job)}"


def _run_to_collect(runs: Sequence[Run]) -> Run | None:
    """The run whose outcome is the job's: the newest that ended by itself (not killed with
    its worker), else one still running; None: none, the job must run again."""
    for run in runs:
        if run.state is not None and run.error != WORKER_STOPPED:
            return run
    for run in runs:
        if run.state is None and run.alive:
            return run
    return None


def _pairs_together(done: dict[Any, int], jobs: Sequence[Job]) -> dict[Any, int]:
    """`done` without the half of a --verify pair (both among `jobs`) whose other half is
    neither ended nor recorded: the pair is recorded together. (Recorded alone, the job
    would leave the listings' unfinished jobs, and its twin, which listings hide, would
    wait for a `jobs` that never again collected it.)"""
    by_id = {job.id: job for job in jobs}
    other: dict[int, int] = {}
    for job in jobs:
        if job.is_verify_twin and job.rerun_of in by_id:
            other[job.id], other[job.rerun_of] = job.rerun_of, job.id
    ended = set(done.values()) | {job.id for job in jobs if job.is_final}
    return {
        future: job_id
        for future, job_id in done.items()
        if job_id not in other or other[job_id] in ended
    }


def _gather_finished(client: Any, batch: Sequence[Any]) -> dict[Any, dict[str, Any]]:
    """The answers of the batch's finished tasks, in one gather. Empty when that fails (a
    worker holding one died meanwhile, or no answer in time): each is then asked for alone,
    as it is recorded (`answer_of`)."""
    finished = [future for future in batch if future.status == "finished"]
    if not finished:
        return {}
    try:
        answers = asked(client, client.gather, finished, what="for the answers of ended tasks")
    except Exception:
        return {}
    return dict(zip(finished, answers, strict=True))


@dataclass(frozen=True)
class _Answer:
    """A task's answer: the worker's host, the run's key and the runner's frames."""

    host: str
    key: str
    frames: list[tuple[bytes, bytes]]
    halted: int | None = None  # not run: its array halted after this many failures

    @classmethod
    def of(cls, answer: Any) -> _Answer:
        """Read what the plugin returned: bytes, a JSON line {"host", "key"} and the frames
        as the runner encodes them (one object: Dask sizes, pickles and sends it whole,
        where a structure cost it a step per item), or the dict of an older pool's workers.
        Raises ValueError for anything else."""
        try:
            if isinstance(answer, dict):
                return cls(str(answer["host"]), str(answer["key"]), list(answer["frames"]))
            head, _, body = bytes(answer).partition(b"\n")
            fields = json.loads(head)
            decoder = FrameDecoder()
            frames = decoder.feed(body)
            if decoder.pending:
                raise ProtocolError("it ends inside a frame")
            halted = fields.get("halted")
            return cls(str(fields["host"]), str(fields["key"]), frames, halted)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a task's answer: {exc!r}") from exc


@dataclass(frozen=True)
class _Prepared:
    """What one job's task is submitted with (DaskRun._prepare)."""

    payload: bytes  # the launch spec, stdin and input (its --dir tars go as Dask data)
    workers: list[str] | None  # the workers it may run on; None: any
    limits: dict[str, Any] | None = None  # its array's --max-running etc. (dask_limits)


class _Flight:
    """A foreground run's jobs: those not submitted yet (oldest first), and the tasks
    submitted and not ended, at most `window` of them."""

    def __init__(self, job_ids: Sequence[int], window: int) -> None:
        self.waiting = deque(job_ids)
        self.window = window
        self.futures: dict[Any, int] = {}  # job id of each task's future
        self.by_id: dict[int, Any] = {}
        self.by_base: dict[str, int] = {}  # job key (job_base) -> id: the started events
        self.bases: dict[int, str] = {}
        self.singles: set[int] = set()  # submitted jobs that are not array tasks
        self.taken = 0
        self.ended: dict[Any, int] = {}  # ended, kept until the scheduler was asked for reruns
        self.arrays: set[int] = set()

    def take(self) -> list[int]:
        """The next jobs to submit: as many as the window has room for (counting those
        taken and not added yet)."""
        room = min(self.window - len(self.futures) - self.taken, len(self.waiting))
        if room < min(max(1, self.window // WINDOW_TOP_UP), len(self.waiting)):
            return []
        taken = [self.waiting.popleft() for _ in range(room)]
        self.taken += len(taken)
        return taken

    def add(self, futures: dict[Any, int], jobs: Sequence[Job]) -> None:
        """The tasks of the jobs last taken (those not cancelled meanwhile) were submitted."""
        self.taken = 0
        self.futures.update(futures)
        self.by_id.update((job_id, future) for future, job_id in futures.items())
        for job in jobs:
            base = job_base(job)
            self.by_base[base], self.bases[job.id] = job.id, base
            if job.array_id is None:
                self.singles.add(job.id)
            else:
                self.arrays.add(job.array_id)

    def end(self, futures: Sequence[Any]) -> None:
        """Ended tasks leave the window (their futures wait in `ended` for `release`)."""
        for future in futures:
            job_id = self.ended[future] = self.futures.pop(future)
            self.by_id.pop(job_id, None)
            self.by_base.pop(self.bases.pop(job_id, ""), None)
            self.singles.discard(job_id)

    def release(self) -> None:
        """Let the scheduler forget the ended tasks (and their answers)."""
        for future in self.ended:
            future.release()
        self.ended.clear()


class DaskRun:
    """Submits jobs to the pool and records each as its task ends."""

    def __init__(
        self,
        store: JobStore,
        cluster: Cluster,
        handlers: Handlers,
        on_done: Callable[[Job], None] | None = None,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.plan: PoolPlan = plan_for(cluster)
        self.handlers = handlers
        self.on_done = on_done
        # Each module's Dask data (scattered once per run), each host's record snapshot.
        self._modules: dict[str, Any] = {}
        self._host_configs: dict[str, str] = {}
        # Stdin, inputs and directories, each packed (and scattered) once per run.
        self._staging: DaskStaging | None = None
        self._limits = ArrayLimits(store)
        # --after/--after-any/--retry-failed: each such job's task (dask_dependencies).
        self._flows = Flows(store)

    def run(self, job_ids: Sequence[int]) -> list[Job]:
        """Submit the jobs and follow them until every one has ended; returns their records."""
        decide_at_submit(self.store, job_ids, self.handlers.notice)  # not submitted: _refill
        client = self._connect_for(job_ids)
        try:
            return asyncio.run(self._collect(client, list(job_ids)))
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
            lost = f"lost the pool's scheduler at {self.plan.scheduler_address}: {exc}"
            if isinstance(exc, PoolSilent):  # it says which scheduler, and for how long
                lost = str(exc)
            raise SshwasmError(f"{lost}; unfinished jobs are settled by `sshwasm jobs`") from exc
        finally:
            client.close()

    def detach(self, job_ids: Sequence[int]) -> None:
        """Submit the jobs and leave them to the scheduler: each task's future is published
        under its key, so the tasks and their answers outlive this process, and a later
        `jobs`/`status` collects them (`collect_detached`)."""
        ended = set(decide_at_submit(self.store, job_ids, self.handlers.notice))
        job_ids = [job_id for job_id in job_ids if job_id not in ended]
        if not job_ids:
            return
        client = self._connect_for(job_ids)
        try:
            self._publish(client, list(job_ids))
        except TimeoutError as exc:  # PoolSilent: `jobs` settles them (nobody follows them)
            raise SshwasmError(f"{exc}; the jobs are settled by `sshwasm jobs`") from None
        finally:
            client.close()

    def _connect_for(self, job_ids: Sequence[int]) -> Any:
        """The pool's client for submitting these jobs. A pool that cannot be reached ends
        them `failed` with why (nothing was submitted) before the error is raised: left
        queued, `jobs` would later call them lost, "its coordinator exited"."""
        try:
            return connect(self.plan)
        except SshwasmError as exc:
            self.store.finish_many(
                [(job_id, JobState.FAILED, {"error": str(exc)}) for job_id in job_ids]
            )
            raise

    def _publish(self, client: Any, job_ids: list[int]) -> None:
        futures = self._submit(client, job_ids)
        datasets = {dataset_name(future.key): future for future in futures}
        asked(client, client.publish_dataset, datasets, override=True, what="to keep the tasks")
        self.store.update_many(job_ids, coordinator_pid=None)

    def cancel(self, jobs: Sequence[Job]) -> dict[int, str]:
        """Cancel jobs nobody follows (detached, or their client was killed): each task in
        the scheduler (so a queued one never starts) and its guest on whichever worker runs
        it; the records say cancelled. Returns a problem per job that could not be."""
        try:
            client = connect(self.plan)
        except SshwasmError as exc:
            return {job.id: str(exc) for job in jobs}
        try:
            # The guests first (a cancel must stop them within a second), then the tasks.
            self._cancel_on_workers(client, {job_base(job) for job in jobs})
            published = set(asked(client, client.list_datasets, what="its datasets"))
            names = [task_key(job) for job in jobs if task_key(job) in published]
            futures = [asked(client, client.get_dataset, name, what=name) for name in names]
            # force: the published dataset wants the key too, not only this client.
            asked(client, client.cancel, futures, force=True, what="the cancel")
        except Exception as exc:  # distributed raises its own kinds, and a worker's errors
            client.close()
            return {job.id: f"cancelling on the pool: {exc}" for job in jobs}
        for job in jobs:
            self.store.finish(
                job.id, JobState.CANCELLED, exit_code=CANCELLED_EXIT_CODE, error="cancelled"
            )
        try:  # cancelled: its dataset only names forgotten tasks now
            self._forget(client, [dataset_name(future.key) for future in futures])
        finally:
            client.close()
        # The forced cancel took the tasks of the detached jobs held behind these with it.
        dependants = detached_dependants(self.store, [job.id for job in jobs])
        if dependants:
            again = settle_dependants(self.store, dependants)
            try:
                self._submit_again(again, dependants)
            except Exception as exc:  # the scheduler went away: `jobs` settles them later
                self.handlers.warning(f"submitting the jobs held behind them again: {exc}")
        return {}

    def _forget(self, client: Any, names: list[str]) -> None:
        """Unpublish these datasets, bounded (FORGET_TIMEOUT_S): one the scheduler keeps
        names only tasks that ended (a warning says so; nothing reads it again)."""
        if not names:
            return
        try:
            asked(
                client,
                client.unpublish_dataset,
                names,
                what=f"to forget {len(names)} published task(s)",
                timeout=FORGET_TIMEOUT_S,
            )
        except Exception as exc:
            self.handlers.warning(f"{exc}; the pool keeps their names")

    def _submit_again(self, job_ids: list[int], dependants: Sequence[Job]) -> None:
        """Forget the published futures of `dependants`, whose tasks a cancel took, and
        publish the tasks of `job_ids` (those of them that still run) anew."""
        client = connect(self.plan)
        try:
            published = set(asked(client, client.list_datasets, what="its datasets"))
            self._forget(
                client, [task_key(job) for job in dependants if task_key(job) in published]
            )
            if job_ids:
                self._publish(client, job_ids)
        finally:
            client.close()

    @staticmethod
    def _cancel_on_workers(client: Any, bases: set[str]) -> None:
        """The runner's cancel of every run of these jobs, on every worker (each worker
        also remembers them, so a task of theirs that comes later never starts)."""
        cancel = _by_value(_CANCEL_SOURCE, "sshwasm_cancel")
        asked(client, client.run, cancel, sorted(bases), what="the cancel on its workers")

    @staticmethod
    def _running(client: Any) -> list[Any]:
        """What runs on the workers now, as STARTED_TOPIC events: asked of each worker's
        plugin (the scheduler keeps only the last 1,000 events, which a long task's start
        leaves behind in a big array). The events, from a worker that cannot be asked."""
        probe = _by_value(_RUNNING_SOURCE, "sshwasm_running")
        try:
            answers: dict[str, Any] = asked(client, client.run, probe, what="what runs")
        except PoolSilent:
            raise
        except Exception:  # a worker of an older pool, or gone meanwhile
            return list(client.get_events(STARTED_TOPIC))
        return [(0.0, {"started": started}) for started in answers.values()]

    def collect(self, jobs: Sequence[Job]) -> dict[int, Job]:
        """Record the detached jobs whose tasks ended, and show those that run `running`;
        those the scheduler does not know (it restarted, or the client that followed them
        was killed) are settled from the hosts (`_settle`). Returns the jobs as they are."""
        try:
            client = connect(self.plan)
        except SshwasmError as exc:
            self.handlers.warning(f"cannot collect {len(jobs)} job(s) from the pool: {exc}")
            return {}
        try:
            return asyncio.run(self._collect_published(client, jobs))
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
            # The scheduler went away meanwhile: what was recorded stays; `jobs` tries again.
            self.handlers.warning(f"collecting {len(jobs)} job(s) from the pool: {exc}")
            return {job.id: job for job in self.store.get_many([job.id for job in jobs])}
        finally:
            client.close()

    async def _collect_published(self, client: Any, jobs: Sequence[Job]) -> dict[int, Job]:
        names = {task_key(job): job for job in jobs}
        published = set(
            await asyncio.to_thread(asked, client, client.list_datasets, what="its datasets")
        )
        found: dict[Any, int] = {}
        unknown: list[Job] = []
        for name, job in names.items():
            if name not in published:
                unknown.append(job)
                continue
            try:
                found[
                    await asyncio.to_thread(asked, client, client.get_dataset, name, what=name)
                ] = job.id
            except KeyError:  # another `jobs` (or follower) collected it just now
                continue
        states: dict[str, str] = {}
        if found:
            probe = _by_value(_STATES_SOURCE, "sshwasm_states")
            keys = [future.key for future in found]
            states = await asyncio.to_thread(
                asked, client, client.run_on_scheduler, probe, keys, what="its tasks' states"
            )
        # Ended: in memory (an answer) or erred; a future new to this client may not know yet.
        done = _pairs_together(
            {
                future: job_id
                for future, job_id in found.items()
                if states.get(future.key) in ("memory", "erred")
            },
            jobs,
        )
        if done:
            import distributed

            wait: Any = distributed.wait  # untyped; needs the client made default here
            with client.as_current():
                await asyncio.to_thread(wait, list(done), timeout=COLLECT_WAIT_S * 10)
        async with TransportPool() as pool:
            for future, job_id in done.items():
                await self._record(pool, client, future, job_id)
        kept = await self._settle_published(client, list(done.values()))
        running = {job_base(job): job.id for job in jobs if job.id in found.values()}
        running = {base: job_id for base, job_id in running.items() if job_id not in done.values()}
        if running:
            self._note_starts(await asyncio.to_thread(self._running, client), running)
        if unknown:
            await self._settle(client, unknown)
        self._note_reruns(await asyncio.to_thread(self._reruns, client, done))
        collected = [dataset_name(f.key) for f, job_id in done.items() if job_id not in kept]
        await asyncio.to_thread(self._forget, client, collected)
        for future in found:
            future.release()
        return {job.id: job for job in self.store.get_many([job.id for job in jobs])}

    async def _settle(self, client: Any, jobs: Sequence[Job]) -> None:
        """Settle, once, jobs the scheduler has no trace of, from their runs on the hosts: a
        run with a result is collected from its `result.json` (the runner's `poll`, as for
        the SSH engine); a run still going is shown running and collected by a later
        `jobs`; a job that never started, or whose worker stopped under it (the scheduler's
        restart takes the workers with it), is submitted again, counted as an attempt if it
        had started. A job whose hosts cannot all be asked is left for a later `jobs`."""
        bases = {job_base(job): job for job in jobs}
        runs, failures = await find_runs(self.plan, list(bases))
        if failures:
            for failure in failures:
                self.handlers.warning(f"cannot settle {len(jobs)} dask job(s) yet: {failure}")
            return
        again: list[int] = []
        async with TransportPool() as pool:
            for base, job in bases.items():
                job_runs = runs.get(base, [])
                run = _run_to_collect(job_runs)
                if run is not None:
                    await self._collect_run(pool, job, run)
                    continue
                if not Path(job.wasm_path).exists():
                    self.store.finish(
                        job.id,
                        JobState.LOST,
                        error="the scheduler lost its task and its module is gone "
                        f"({job.wasm_path}): it cannot be submitted again",
                    )
                    continue
                if job_runs or job.host is not None:  # it started: another attempt
                    ended = {"state": JobState.LOST.value, "error": WORKER_STOPPED}
                    if not self.store.requeue(job, ended):
                        continue  # another `jobs` settled it just now
                elif not self.store.claim(job):
                    continue
                again.append(job.id)
        if again:  # in this thread: the jobs file's connection is this thread's
            self._publish(client, again)

    async def _collect_run(self, pool: TransportPool, job: Job, run: Run) -> None:
        """Take `run` as the job's run, and bring the record up to date from its host."""
        host = self.cluster.host(run.host)
        assert host is not None  # find_runs asks only the cluster's hosts
        self.store.update(
            job.id,
            state=JobState.RUNNING.value,
            host=host.name,
            host_config=json.dumps(host.to_dict()),
            remote_key=run.key,
            attempt_hosts=job.attempt_hosts or host.name,
            started_at=job.started_at or utc_now(),
        )
        await refresh_job(self.store, self.store.get(job.id), pool)

    def _submit(self, client: Any, job_ids: list[int]) -> dict[Any, int]:
        """Submit every one of the jobs at once (a detached run: the scheduler holds them)."""
        self._own(job_ids)
        jobs = self.store.get_many(job_ids)
        return self._submit_jobs(client, jobs, self._prepare(client, jobs))

    def _prepare(self, client: Any, jobs: Sequence[Job]) -> dict[int, _Prepared]:
        """Each job's payload and the workers it may run on (dask_staging), made in the
        jobs file's thread: staging records the input's size and fingerprint, and fails a
        --host-dir job that no host can run."""
        if self._staging is None:
            self._staging = DaskStaging(self.store, self.cluster, client, self.handlers.warning)
        staging = self._staging
        prepared: dict[int, _Prepared] = {}
        for job in jobs:
            workers = staging.workers(job, eligible_workers(self.cluster, job))
            if job.id not in staging.refused:  # no host can run it: it failed already
                prepared[job.id] = _Prepared(staging.payload(job), workers, self._limits.of(job))
        self._flows.prepare(client, [job for job in jobs if job.id in prepared])
        return prepared

    def _own(self, job_ids: Sequence[int]) -> None:
        # This process follows them (`jobs` elsewhere sees their coordinator alive), and no
        # heartbeat: they wait in Dask's queue, not in the SSH engine's (`place_waiting`
        # takes only queued jobs with a fresh heartbeat).
        self.store.update_many(
            job_ids, engine="dask", coordinator_pid=os.getpid(), heartbeat_ts=0.0
        )

    def _submit_jobs(
        self, client: Any, jobs: Sequence[Job], prepared: Mapping[int, _Prepared]
    ) -> dict[Any, int]:
        """Submit the jobs' tasks, `prepared` by `_prepare`; the job id of each task's
        future. Touches no jobs file (it may run in another thread than the jobs file's)."""
        assert self._staging is not None  # set by _prepare
        staging = self._staging
        groups: dict[tuple[Any, ...], list[Job]] = {}
        flows: list[Job] = []  # each its own task (dask_dependencies)
        for job in [job for job in jobs if job.id in prepared]:  # not those staging failed
            if job.wasm_sha256 not in self._modules:
                data = Path(job.wasm_path).read_bytes()
                # Keyed by content, and on every worker (a worker that dies must not take the
                # only copy with it): each gets a module once, whatever the jobs.
                self._modules[job.wasm_sha256] = client.scatter(data, hash=True, broadcast=True)
            if self._flows.wants(job):
                flows.append(job)
                continue
            workers = prepared[job.id].workers
            shape = (
                job.wasm_sha256,
                job.cpus,
                job.memory_mb,
                None if workers is None else tuple(workers),
                job.retries,
                (prepared[job.id].limits or {}).get("array"),  # its limits (dask_limits)
            )
            groups.setdefault(shape, []).append(job)
        futures: dict[Any, int] = {}
        # One `map` (one message to the scheduler, the task function pickled once) per kind
        # of task: an array's window is one. Its order is the tasks' priority, oldest first.
        for (sha256, cpus, memory_mb, workers, retries, _limits), group in groups.items():
            limits = prepared[group[0].id].limits
            task = _task_function() if limits else _async_task_function()
            with annotated(limits):
                submitted = client.map(
                    task,
                    [prepared[job.id].payload for job in group],
                    # The module, or with --dir copies a tuple of it and their tars' data.
                    [staging.data(job, self._modules[sha256]) for job in group],
                    key=[task_key(job) for job in group],
                    resources={"cpus": cpus, "memory_mb": memory_mb},
                    workers=None if workers is None else list(workers),
                    allow_other_workers=False,
                    retries=retries,
                    pure=False,
                )
            futures.update(zip(submitted, (job.id for job in group), strict=True))
        for job in flows:
            data = staging.data(job, self._modules[job.wasm_sha256])
            ready, key = prepared[job.id], task_key(job)
            flow = self._flows.submit(
                client, job, ready.payload, data, key, ready.workers, ready.limits
            )
            futures[flow] = job.id
        return futures

    def _window(self) -> int:
        """How many tasks a foreground run keeps submitted at once."""
        return max(WINDOW_MIN, WINDOW_PER_CPU * sum(host.cpus for host in self.cluster.hosts))

    async def _refill(self, client: Any, flight: _Flight, pending: Any) -> list[int]:
        """Submit the next jobs the window has room for. Those cancelled before their turn
        are not submitted (and recorded cancelled): their ids are returned."""
        job_ids = flight.take()
        if not job_ids:
            return []
        jobs = self.store.get_many(job_ids)
        skipped = [job.id for job in jobs if job.is_final or job.cancel_requested]
        for job_id in skipped:
            self.store.finish(
                job_id, JobState.CANCELLED, exit_code=CANCELLED_EXIT_CODE, error="cancelled"
            )
        jobs = [job for job in jobs if job.id not in skipped]
        return skipped + await self._submit_into(client, jobs, flight, pending)

    async def _submit_into(
        self, client: Any, jobs: list[Job], flight: _Flight, pending: Any
    ) -> list[int]:
        """Stage and submit `jobs` into the window; the ids of those that ended in staging."""
        submitted: dict[Any, int] = {}
        ended: list[int] = []
        if jobs:
            prepared = self._prepare(client, jobs)
            ended = [job.id for job in jobs if job.id not in prepared]
            jobs = [job for job in jobs if job.id in prepared]
            submitted = await asyncio.to_thread(self._submit_jobs, client, jobs, prepared)
        flight.add(submitted, jobs)
        pending.update(submitted)
        return ended

    async def _collect(self, client: Any, job_ids: list[int]) -> list[Job]:
        """Submit the jobs a window at a time and record each as its task ends: every task
        that ended since the last wake-up, their answers in one gather and their records in
        one transaction; then as many new tasks as ended."""
        import distributed

        as_completed: Any = distributed.as_completed  # untyped
        self._own(job_ids)
        flight = _Flight(job_ids, self._window())
        pending = as_completed([], loop=client.loop)
        watcher: asyncio.Task[None] | None = None
        asked_reruns = time.monotonic()
        try:
            self._done(await self._refill(client, flight, pending))
            watcher = asyncio.create_task(self._watch_cancels(client, flight))
            async with TransportPool() as pool:
                woke = time.monotonic()
                while (batch := await self._next_ended(client, flight, pending)) is not None:
                    if len(batch) < len(flight.futures):  # others run: let more end
                        await asyncio.sleep(woke + BATCH_EVERY_S - time.monotonic())
                        batch += ready_within(pending, 0) or []  # (it does not wait)
                    woke = time.monotonic()
                    ended = {future: flight.futures[future] for future in batch}
                    answers = await asyncio.to_thread(_gather_finished, client, batch)
                    await self._record_batch(pool, client, ended, answers)
                    flight.end(batch)
                    skipped = await self._refill(client, flight, pending)
                    self._done([*ended.values(), *skipped])
                    if time.monotonic() - asked_reruns >= RERUNS_EVERY_S:
                        await self._ask_reruns(client, flight)
                        asked_reruns = time.monotonic()
            await self._ask_reruns(client, flight)
        finally:
            if watcher is not None:
                watcher.cancel()
            for future in [*flight.futures, *flight.ended]:
                future.release()
            self._modules.clear()
            self._staging = None
        return self.store.get_many(job_ids)

    async def _ask_reruns(self, client: Any, flight: _Flight) -> None:
        """Count the reruns of the tasks that ended since the last time in their records'
        `attempts`, then let the scheduler forget those tasks (it forgets their reruns too)."""
        if flight.ended:
            self._note_reruns(await asyncio.to_thread(self._reruns, client, flight.ended))
            flight.release()

    def _done(self, job_ids: Sequence[int]) -> None:
        """Tell `on_done` about jobs that ended (one read of their records)."""
        if self.on_done is not None and job_ids:
            for job in self.store.get_many(job_ids):
                if job.is_final:  # not one set aside for its dependencies (Flows.unheld)
                    self.on_done(job)

    async def _next_ended(self, client: Any, flight: _Flight, pending: Any) -> list[Any] | None:
        """The next tasks that ended (waiting for one); None when nothing is left to follow.
        Meanwhile the jobs set aside because a dependency's task erred or was cancelled
        (`Flows.unheld`) are settled as their dependencies' records end."""
        while True:
            if self._flows.unheld:
                self._done(await self._settle_unheld(client, flight, pending))
            if not self._flows.unheld:
                if not flight.futures:
                    return None
                return await asyncio.to_thread(next_ended, client, pending) or None
            if not flight.futures:
                await asyncio.sleep(UNHELD_POLL_S)
                continue
            batch = await asyncio.to_thread(ready_within, pending, UNHELD_POLL_S)
            if batch:
                return batch

    async def _settle_unheld(self, client: Any, flight: _Flight, pending: Any) -> list[int]:
        """Settle the followed jobs set aside (`Flows.settle`): those cancelled by the rule,
        and those submitted again into the window; the dependencies no process follows
        (detached) are collected meanwhile. Returns the ids that ended here."""
        ended, again, collect = self._flows.settle(sorted(self._flows.unheld))
        if collect:
            await self._collect_published(client, collect)
        if again:
            ended += await self._submit_into(client, self.store.get_many(again), flight, pending)
        return ended

    async def _settle_published(self, client: Any, job_ids: Sequence[int]) -> set[int]:
        """Settle the detached jobs among `job_ids` set aside (`Flows.unheld`): cancelled by
        the rule, or published again under their names; one whose dependencies have not all
        ended is left as it is for a later `jobs`. Returns the ids whose dataset stays."""
        ids = self._flows.unheld.intersection(job_ids)
        if not ids:
            return set()
        _ended, again, _collect = self._flows.settle(sorted(ids))
        waiting = self._flows.unheld.intersection(ids)
        self._flows.unheld -= ids
        if again:
            self._publish(client, again)  # in this thread: the jobs file's is this one
        return waiting | set(again)

    async def _record_batch(
        self,
        pool: TransportPool,
        client: Any,
        ended: dict[Any, int],
        answers: dict[Any, dict[str, Any]],
    ) -> None:
        """Record the jobs of ended tasks: those whose answer says all there is to say in
        one transaction; those that need their host (/output, directories) or went wrong
        one by one (`_record`)."""
        jobs = {job.id: job for job in self.store.get_many(list(ended.values()))}
        ends: list[tuple[int, JobState, dict[str, Any]]] = []
        others: list[Any] = []
        for future, job_id in ended.items():
            end = self._end_from_answer(jobs[job_id], future, answers.get(future))
            if end is None:
                others.append(future)
            else:
                ends.append(end)
        self.store.finish_many(ends)
        for future in others:
            await self._record(pool, client, future, ended[future], answers.get(future))

    def _end_from_answer(
        self, job: Job, future: Any, answer: Any
    ) -> tuple[int, JobState, dict[str, Any]] | None:
        """How the job ended, from its task's answer alone (its output taken in meanwhile);
        None when that is not all there is (its host must be asked, or the task failed)."""
        if future.status != "finished" or answer is None or wants_flow(job):
            return None  # a flow task's answer is read by `_record` (take_flow)
        try:
            answer = _Answer.of(answer)
        except ValueError:
            return None  # `_record` says so
        if answer.halted is not None:  # it did not run: its array halted (dask_limits)
            return self._limits.halted(job, answer.halted, self.handlers.warning)
        host = self.cluster.host(answer.host)
        if host is None or job.output_dir or job.dirs not in ("", "[]") or job.verify:
            return None
        ran = self._ran_fields(job, host, answer.key)
        output = JobOutput.open(self.store, job)
        try:
            outcome = StreamOutcome()
            try:
                self._take_frames(outcome, answer, output)
            except ProtocolError as exc:
                error = f"host '{host.name}': {exc}"
                return job.id, JobState.FAILED, {**ran, "error": error, **output.fields()}
            end = end_of_answer(self.store, job, host, outcome, output)
            if end is None:
                error = f"host '{host.name}': the runner gave no result"
                return job.id, JobState.LOST, {**ran, "error": error, **output.fields()}
            state, fields = end
            return job.id, state, {**ran, **_host_start(job, outcome), **fields}
        finally:
            output.close()

    def _take_frames(self, outcome: StreamOutcome, answer: _Answer, output: JobOutput) -> None:
        """The runner's frames of a task into its outcome, its output files and the
        terminal."""
        for kind, body in answer.frames:
            apply_frame(outcome, kind, body, output.stdout.write, output.stderr.write)
            if kind == b"O":
                self.handlers.stdout(body)
            elif kind == b"E":
                self.handlers.stderr(body)

    def _reruns(self, client: Any, futures: dict[Any, int]) -> dict[int, int]:
        """Per job, how often Dask started its task again because its worker died."""
        keys = {future.key: job_id for future, job_id in futures.items()}
        probe = _by_value(_RERUNS_SOURCE, "sshwasm_reruns")
        names = list(keys)
        found: dict[int, int] = {}
        for start in range(0, len(names), RERUNS_BATCH):
            try:
                reruns: dict[str, int] = asked(
                    client,
                    client.run_on_scheduler,
                    probe,
                    names[start : start + RERUNS_BATCH],
                    what="about reruns",
                )
            except Exception as exc:  # the scheduler is gone: the records say one attempt
                self.handlers.warning(f"cannot ask the scheduler about reruns: {exc}")
                break
            found.update((keys[key], count) for key, count in reruns.items())
        return found

    def _note_reruns(self, reruns: dict[int, int]) -> None:
        """Count each rerun in `attempts` (the lost runs' hosts are not known: empty names)."""
        for job_id, count in reruns.items():
            job = self.store.get(job_id)
            hosts = (job.attempt_hosts or "").split(",")
            self.store.update(
                job_id,
                attempts=job.attempts + count,
                attempt_hosts=",".join([""] * count + hosts),
            )

    async def _watch_cancels(self, client: Any, flight: _Flight) -> None:
        """Stop the tasks of jobs `sshwasm cancel` marked: unstarted ones in Dask, running
        ones by the runner's `cancel` on whichever worker runs them (jobs not submitted yet
        are left out when their turn comes: `_refill`). Also shows each job `running` on its
        host once its task started (the workers' STARTED_TOPIC events)."""
        done: set[int] = set()
        # The client's event handler runs in its own thread; the jobs file is this thread's.
        starts: list[Any] = []
        await asyncio.to_thread(client.subscribe_topic, STARTED_TOPIC, starts.append)
        cancelled_before = -1
        while True:
            await asyncio.sleep(CANCEL_CHECK_S)
            if starts:
                events, starts[:] = list(starts), []
                self._note_starts(events, flight.by_base)
            # An array's tasks are read only when its count of cancelled tasks moved: cheap
            # with tens of thousands of tasks. (The jobs file's connection is this thread's.)
            cancelled = sum(
                self.store.array_counts(array_id).get(JobState.CANCELLED, 0)
                for array_id in flight.arrays
            )
            candidates = list(flight.singles)
            if cancelled != cancelled_before:
                candidates, cancelled_before = list(flight.by_id), cancelled
            waiting = [job_id for job_id in candidates if job_id not in done]
            if not waiting:
                continue
            jobs = self.store.get_many(waiting)
            marked = [job for job in jobs if job.cancel_requested or job.is_final]
            for job in marked:
                future = flight.by_id.get(job.id)
                if future is None:  # its task ended meanwhile
                    continue
                done.add(job.id)
                if not job.is_final:
                    self.store.finish(
                        job.id,
                        JobState.CANCELLED,
                        exit_code=CANCELLED_EXIT_CODE,
                        error="cancelled",
                    )
                future.cancel()
                try:
                    await asyncio.to_thread(self._cancel_on_workers, client, {job_base(job)})
                except Exception as exc:  # a worker gone meanwhile: its guest went with it
                    self.handlers.warning(f"job {job.id}: cancelling on the pool: {exc}")

    async def _record(
        self,
        pool: TransportPool,
        client: Any,
        future: Any,
        job_id: int,
        gathered: Any = None,
    ) -> Job:
        """Record how the job of an ended task ended (`gathered`: its answer, when gathered
        already), asking its host for its /output and directories if it has them."""
        job = self.store.get(job_id)
        if future.status == "cancelled" and client.status != "running":
            # distributed cancels every future of a client that lost its scheduler: not the
            # job's end (its task may run on); left for `sshwasm jobs` to settle.
            raise OSError("the connection to it was lost")
        held = future.status != "finished" and job.dependencies and not job.is_final
        if held and await asyncio.to_thread(self._flows.by_dependency, client, future):
            self._flows.unheld.add(job_id)  # settled once its dependencies' records end
            return job
        if future.status != "finished":
            try:
                error = future.exception(timeout=ANSWER_TIMEOUT_S)
            except Exception as exc:  # a cancelled future raises instead of returning it
                error = exc
            self.store.finish(job_id, JobState.FAILED, error=f"dask: task {future.status}: {error}")
            return self.store.get(job_id)
        try:
            raw = gathered
            if raw is None:
                raw = answer_of(client, future, f"for job {job_id}'s answer")
            job, raw = take_flow(self.store, job, raw, self.handlers.warning)
            if raw is None:  # --after not satisfied: the guest never ran
                return job
            answer = _Answer.of(raw)
        except ValueError as exc:
            self.store.finish(job_id, JobState.FAILED, error=f"dask: an unreadable answer: {exc}")
            return self.store.get(job_id)
        if answer.halted is not None:  # it did not run: its array halted (dask_limits)
            _, state, fields = halted_end(job, answer.halted)
            self.store.finish(job_id, state, **fields)
            return self.store.get(job_id)
        host = self.cluster.host(answer.host)
        if host is None:
            self.store.finish(
                job_id, JobState.FAILED, error=f"dask: a worker named {answer.host!r} ran it"
            )
            return self.store.get(job_id)
        started_before = job
        self.store.update(job.id, **self._ran_fields(job, host, answer.key))
        job = self.store.get(job_id)
        output = JobOutput.open(self.store, job)
        outcome = StreamOutcome()
        try:
            self._take_frames(outcome, answer, output)
            self.store.update(job_id, **_host_start(started_before, outcome))
            # The host is asked only for the job's /output and directories: a job without
            # them costs no SSH connection here (the pool brought its answer).
            needs_host = bool(job.output_dir) or job.dirs not in ("", "[]")
            transport = await pool.get(host) if needs_host else transport_for(host)
            client_of_host = RunnerClient(transport)
            for warning in await record_end(self.store, job, host, client_of_host, outcome, output):
                self.handlers.warning(warning)
        except ProtocolError as exc:
            self.store.finish(
                job_id, JobState.FAILED, error=f"host '{host.name}': {exc}", **output.fields()
            )
        except SshwasmError as exc:
            self.store.finish(job_id, JobState.FAILED, error=str(exc), **output.fields())
        finally:
            output.close()
        job = self.store.get(job_id)
        if not job.is_final:
            self.store.finish(
                job_id,
                JobState.LOST,
                error=f"host '{host.name}': the runner gave no result",
                **output.fields(),
            )
            job = self.store.get(job_id)
        return job

    def _host_config(self, host: Host) -> str:
        """The host's snapshot for the record (made once per host)."""
        config = self._host_configs.get(host.name)
        if config is None:
            config = self._host_configs[host.name] = json.dumps(host.to_dict())
        return config

    def _ran_fields(self, job: Job, host: Host, key: str) -> dict[str, Any]:
        """Where the job ran and under which key (its directory on that host)."""
        return {
            "engine": "dask",
            "host": host.name,
            "host_config": self._host_config(host),
            "remote_key": key,
            "attempt_hosts": _with_attempt_host(job, host.name),
            "started_at": job.started_at or utc_now(),
        }

    def _note_starts(self, events: Sequence[Any], by_base: dict[str, int]) -> None:
        """Show jobs whose task started `running`, with the host and time, in one
        transaction: the workers' STARTED_TOPIC events, (scheduler time, {"started":
        [{"base", "key", "host", "at"}, ...]}) (or one start each, from an older pool's
        workers). An event of a job already ended (its answer came first) changes nothing."""
        latest: dict[int, dict[str, Any]] = {}
        for start in _starts_of(events):
            job_id = by_base.get(str(start.get("base")))
            if job_id is not None and start.get("key"):
                latest[job_id] = start  # a rerun's event comes after the first run's
        starts: list[tuple[int, dict[str, Any]]] = []
        for job_id, start in latest.items():
            host = self.cluster.host(str(start.get("host")))
            if host is None:
                continue
            fields = {
                "host": host.name,
                "host_config": self._host_config(host),
                "remote_key": str(start["key"]),
                "started_at": str(start.get("at") or utc_now()),
            }
            starts.append((job_id, fields))
        if starts:
            self.store.mark_running_many(starts)


def _host_start(job: Job, outcome: StreamOutcome) -> dict[str, Any]:
    """The job's `started_at` from its host's result when no start event told it: a
    detached job collected later by `jobs` (the scheduler keeps 1,000 events) would
    otherwise show when it was collected. Nothing when the record has one already."""
    result = outcome.result or {}
    if job.started_at is None and isinstance(result.get("started_at"), str):
        return {"started_at": result["started_at"]}
    return {}


def _with_attempt_host(job: Job, host: str) -> str:
    """`attempt_hosts` with the current attempt's host: one name per attempt."""
    hosts = job.attempt_hosts.split(",") if job.attempt_hosts else []
    hosts = (hosts + [""] * job.attempts)[: job.attempts - 1]
    return ",".join([*hosts, host])


def _starts_of(events: Sequence[Any]) -> list[dict[str, Any]]:
    """The starts the STARTED_TOPIC events tell, oldest first."""
    starts: list[dict[str, Any]] = []
    for _when, message in events:
        if not isinstance(message, dict):
            continue
        told = message.get("started", [message])
        starts.extend(start for start in told if isinstance(start, dict))
    return starts
