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

Throughput (benchmarks/dask_array.py): an array goes to the scheduler as one `client.map`
(one message, the task function pickled once, not a `submit` per task), and the answers of
the tasks that ended since the last wake-up come back in one `gather` rather than a round
trip to the scheduler and a worker per task.

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
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..cluster import Cluster, Host
from ..errors import SshwasmError
from ..job_output import Handlers, JobOutput
from ..pool import PoolPlan, Run, connect, find_runs, plan_for
from ..recorded_jobs import record_end, refresh_job
from ..runner.parent_death import WORKER_STOPPED
from ..runner.protocol import ProtocolError
from ..runner_client import RunnerClient, StreamOutcome, apply_frame
from ..states import JobState
from ..store import CANCELLED_EXIT_CODE, Job, JobStore, utc_now
from ..transport import TransportPool, transport_for
from .dask_staging import DaskStaging

# Runs on the worker, sent by value (the worker has no sshwasm): hands the job to the plugin.
_TASK_SOURCE = """
def sshwasm_job(payload, module):
    from distributed import get_worker
    if isinstance(module, tuple):  # --dir copies: their tars end the spec (dask_staging)
        module, *tars = module
        payload = b"".join([payload, *tars])
    return get_worker().plugins["sshwasm-runner"].run(payload, module)
"""


# Runs on every worker (`Client.run`): cancels what runs there for some jobs.
_CANCEL_SOURCE = """
def sshwasm_cancel(bases, dask_worker=None):
    plugin = dask_worker.plugins["sshwasm-runner"]
    return [key for base in bases for key in plugin.cancel(base)]
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


def _by_value(source: str, name: str) -> Callable[..., Any]:
    """A function from `source` that pickles by value (its module exists nowhere else)."""
    namespace: dict[str, Any] = {"__name__": "sshwasm_dask_task"}
    exec(compile(source, f"<sshwasm {name}>", "exec"), namespace)
    function: Callable[..., Any] = namespace[name]
    return function


def _task_function() -> Callable[..., Any]:
    return _by_value(_TASK_SOURCE, "sshwasm_job")


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


def _next_batch(pending: Any) -> list[Any]:
    """The futures of `as_completed` that ended: at least one (waiting for it), or none when
    every one was handed out."""
    try:
        return list(pending.next_batch(block=True))
    except StopIteration:
        return []


def _gather_finished(client: Any, batch: Sequence[Any]) -> dict[Any, dict[str, Any]]:
    """The answers of the batch's finished tasks, in one gather. Empty when that fails (a
    worker holding one died meanwhile): each is then asked for alone, as it is recorded."""
    finished = [future for future in batch if future.status == "finished"]
    if not finished:
        return {}
    try:
        answers = client.gather(finished)
    except Exception:
        return {}
    return dict(zip(finished, answers, strict=True))


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

    def run(self, job_ids: Sequence[int]) -> list[Job]:
        """Submit the jobs and follow them until every one has ended; returns their records."""
        client = connect(self.plan)
        try:
            futures = self._submit(client, list(job_ids))
            return asyncio.run(self._collect(client, futures))
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
            raise SshwasmError(
                f"lost the pool's scheduler at {self.plan.scheduler_address}: {exc}; "
                "unfinished jobs are settled by `sshwasm jobs`"
            ) from exc
        finally:
            client.close()

    def detach(self, job_ids: Sequence[int]) -> None:
        """Submit the jobs and leave them to the scheduler: each task's future is published
        under its key, so the tasks and their answers outlive this process, and a later
        `jobs`/`status` collects them (`collect_detached`)."""
        client = connect(self.plan)
        try:
            self._publish(client, list(job_ids))
        finally:
            client.close()

    def _publish(self, client: Any, job_ids: list[int]) -> None:
        futures = self._submit(client, job_ids)
        client.publish_dataset(**{future.key: future for future in futures})
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
            published = set(client.list_datasets())
            futures = [
                client.get_dataset(task_key(job)) for job in jobs if task_key(job) in published
            ]
            # force: the published dataset wants the key too, not only this client.
            client.cancel(futures, force=True)
            for future in futures:
                client.unpublish_dataset(future.key)
        except Exception as exc:  # distributed raises its own kinds, and a worker's errors
            return {job.id: f"cancelling on the pool: {exc}" for job in jobs}
        finally:
            client.close()
        for job in jobs:
            self.store.finish(
                job.id, JobState.CANCELLED, exit_code=CANCELLED_EXIT_CODE, error="cancelled"
            )
        return {}

    @staticmethod
    def _cancel_on_workers(client: Any, bases: set[str]) -> None:
        """The runner's cancel of every run of these jobs, on every worker (each worker
        also remembers them, so a task of theirs that comes later never starts)."""
        cancel = _by_value(_CANCEL_SOURCE, "sshwasm_cancel")
        client.run(cancel, sorted(bases))

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
        published = set(await asyncio.to_thread(client.list_datasets))
        found: dict[Any, int] = {}
        unknown: list[Job] = []
        for name, job in names.items():
            if name not in published:
                unknown.append(job)
                continue
            found[await asyncio.to_thread(client.get_dataset, name)] = job.id
        states: dict[str, str] = {}
        if found:
            probe = _by_value(_STATES_SOURCE, "sshwasm_states")
            states = await asyncio.to_thread(
                client.run_on_scheduler, probe, [future.key for future in found]
            )
        # Ended: in memory (an answer) or erred; a future new to this client may not know yet.
        done = {
            future: job_id
            for future, job_id in found.items()
            if states.get(future.key) in ("memory", "erred")
        }
        if done:
            import distributed

            wait: Any = distributed.wait  # untyped; needs the client made default here
            with client.as_current():
                await asyncio.to_thread(wait, list(done), timeout=COLLECT_WAIT_S * 10)
        async with TransportPool() as pool:
            for future, job_id in done.items():
                await self._record(pool, client, future, job_id)
        running = {job_base(job): job.id for job in jobs if job.id in found.values()}
        running = {base: job_id for base, job_id in running.items() if job_id not in done.values()}
        if running:
            events = await asyncio.to_thread(client.get_events, STARTED_TOPIC)
            self._note_starts(events, running)
        if unknown:
            await self._settle(client, unknown)
        self._note_reruns(await asyncio.to_thread(self._reruns, client, done))
        for future in done:
            await asyncio.to_thread(client.unpublish_dataset, future.key)
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
        # This process follows them (`jobs` elsewhere sees their coordinator alive), and no
        # heartbeat: they wait in Dask's queue, not in the SSH engine's (`place_waiting`
        # takes only queued jobs with a fresh heartbeat).
        self.store.update_many(
            job_ids, engine="dask", coordinator_pid=os.getpid(), heartbeat_ts=0.0
        )
        jobs = self.store.get_many(job_ids)
        staging = DaskStaging(self.store, self.cluster, client, self.handlers.warning)
        modules: dict[str, Any] = {}
        groups: dict[tuple[Any, ...], list[Job]] = {}
        for job in jobs:
            if job.wasm_sha256 not in modules:
                data = Path(job.wasm_path).read_bytes()
                # Keyed by content, and on every worker (a worker that dies must not take the
                # only copy with it): each gets a module once, whatever the jobs.
                modules[job.wasm_sha256] = client.scatter(data, hash=True, broadcast=True)
            workers = staging.workers(job, eligible_workers(self.cluster, job))
            shape = (
                job.wasm_sha256,
                job.cpus,
                job.memory_mb,
                None if workers is None else tuple(workers),
                job.retries,
            )
            groups.setdefault(shape, []).append(job)
        task = _task_function()
        futures: dict[Any, int] = {}
        # One `map` (one message to the scheduler, the task function pickled once) per kind
        # of task: an array is one. Its order is the tasks' priority, oldest first.
        for (sha256, cpus, memory_mb, workers, retries), group in groups.items():
            submitted = client.map(
                task,
                [staging.payload(job) for job in group],
                [staging.data(job, modules[sha256]) for job in group],
                key=[task_key(job) for job in group],
                resources={"cpus": cpus, "memory_mb": memory_mb},
                workers=None if workers is None else list(workers),
                allow_other_workers=False,
                retries=retries,
                pure=False,
            )
            futures.update(zip(submitted, (job.id for job in group), strict=True))
        return futures

    async def _collect(self, client: Any, futures: dict[Any, int]) -> list[Job]:
        import distributed

        as_completed: Any = distributed.as_completed  # untyped
        ended: dict[int, Job] = {}
        pending = as_completed(list(futures), loop=client.loop)
        watcher = asyncio.create_task(self._watch_cancels(client, futures, ended))
        try:
            async with TransportPool() as pool:
                while True:
                    # Every task that ended since the last wake-up, and their answers in one
                    # gather (not a round trip to the scheduler and worker per task).
                    batch = await asyncio.to_thread(_next_batch, pending)
                    if not batch:
                        break
                    answers = await asyncio.to_thread(_gather_finished, client, batch)
                    for future in batch:
                        job_id = futures[future]
                        ended[job_id] = await self._record(
                            pool, client, future, job_id, answers.get(future)
                        )
                        if self.on_done is not None:
                            self.on_done(ended[job_id])
        finally:
            watcher.cancel()
        # Held until now so the scheduler still knows each task's reruns.
        reruns = await asyncio.to_thread(self._reruns, client, futures)
        self._note_reruns(reruns)
        for future in futures:
            future.release()
        return self.store.get_many(list(futures.values()))

    def _reruns(self, client: Any, futures: dict[Any, int]) -> dict[int, int]:
        """Per job, how often Dask started its task again because its worker died."""
        keys = {future.key: job_id for future, job_id in futures.items()}
        probe = _by_value(_RERUNS_SOURCE, "sshwasm_reruns")
        names = list(keys)
        found: dict[int, int] = {}
        for start in range(0, len(names), RERUNS_BATCH):
            try:
                reruns: dict[str, int] = client.run_on_scheduler(
                    probe, names[start : start + RERUNS_BATCH]
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

    async def _watch_cancels(
        self, client: Any, futures: dict[Any, int], ended: dict[int, Job]
    ) -> None:
        """Stop the tasks of jobs `sshwasm cancel` marked: unstarted ones in Dask, running
        ones by the runner's `cancel` on whichever worker runs them. Also shows each job
        `running` on its host once its task started (the workers' STARTED_TOPIC events)."""
        done: set[int] = set()
        by_id = {job_id: future for future, job_id in futures.items()}
        jobs = self.store.get_many(list(by_id))
        # The client's event handler runs in its own thread; the jobs file is this thread's.
        starts: list[Any] = []
        await asyncio.to_thread(client.subscribe_topic, STARTED_TOPIC, starts.append)
        by_base = {job_base(job): job.id for job in jobs}
        arrays = {job.array_id for job in jobs if job.array_id is not None}
        singles = [job.id for job in jobs if job.array_id is None]
        cancelled_before = -1
        while True:
            await asyncio.sleep(CANCEL_CHECK_S)
            if starts:
                events, starts[:] = list(starts), []
                self._note_starts(events, by_base)
            # An array's tasks are read only when its count of cancelled tasks moved: cheap
            # with tens of thousands of tasks. (The jobs file's connection is this thread's.)
            cancelled = sum(
                self.store.array_counts(array_id).get(JobState.CANCELLED, 0) for array_id in arrays
            )
            candidates = singles
            if cancelled != cancelled_before:
                candidates, cancelled_before = list(by_id), cancelled
            waiting = [
                job_id for job_id in candidates if job_id not in ended and job_id not in done
            ]
            if not waiting:
                continue
            jobs = self.store.get_many(waiting)
            marked = [job for job in jobs if job.cancel_requested or job.is_final]
            for job in marked:
                done.add(job.id)
                if not job.is_final:
                    self.store.finish(
                        job.id,
                        JobState.CANCELLED,
                        exit_code=CANCELLED_EXIT_CODE,
                        error="cancelled",
                    )
                by_id[job.id].cancel()
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
        answer: dict[str, Any] | None = None,
    ) -> Job:
        """Record how the job of an ended task ended (`answer`: its result, when gathered
        already)."""
        job = self.store.get(job_id)
        if future.status != "finished":
            try:
                error = future.exception()
            except Exception as exc:  # a cancelled future raises instead of returning it
                error = exc
            self.store.finish(job_id, JobState.FAILED, error=f"dask: task {future.status}: {error}")
            return self.store.get(job_id)
        if answer is None:
            answer = future.result()
        host = self.cluster.host(str(answer["host"]))
        if host is None:
            self.store.finish(
                job_id, JobState.FAILED, error=f"dask: a worker named {answer['host']!r} ran it"
            )
            return self.store.get(job_id)
        self._mark_ran(job, host, str(answer["key"]))
        job = self.store.get(job_id)
        output = JobOutput.open(self.store, job)
        outcome = StreamOutcome()
        try:
            for kind, body in answer["frames"]:
                apply_frame(outcome, kind, body, output.stdout.write, output.stderr.write)
                if kind == b"O":
                    self.handlers.stdout(body)
                elif kind == b"E":
                    self.handlers.stderr(body)
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

    def _mark_ran(self, job: Job, host: Host, key: str) -> None:
        """Say where the job ran and under which key (its directory on that host)."""
        self.store.update(
            job.id,
            engine="dask",
            host=host.name,
            host_config=json.dumps(host.to_dict()),
            remote_key=key,
            attempt_hosts=host.name,
            started_at=job.started_at or utc_now(),
        )

    def _note_starts(self, events: Sequence[Any], by_base: dict[str, int]) -> None:
        """Show jobs whose task started `running`, with the host and time: the workers'
        STARTED_TOPIC events, (scheduler time, {"base", "key", "host", "at"}). An event of a
        job already ended (its answer came first) changes nothing."""
        latest: dict[int, dict[str, Any]] = {}
        for _when, message in events:
            if not isinstance(message, dict):
                continue
            job_id = by_base.get(str(message.get("base")))
            if job_id is not None:
                latest[job_id] = message  # a rerun's event comes after the first run's
        for job in self.store.get_many(list(latest)):
            message = latest[job.id]
            host = self.cluster.host(str(message.get("host")))
            if job.is_final or host is None or job.remote_key == message.get("key"):
                continue
            self.store.update(
                job.id,
                state=JobState.RUNNING.value,
                host=host.name,
                host_config=json.dumps(host.to_dict()),
                remote_key=str(message["key"]),
                started_at=str(message.get("at") or utc_now()),
            )
