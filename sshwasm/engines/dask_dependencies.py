"""`--after`, `--after-any` and `--retry-failed` on `engine: dask`: held and retried by the
pool, not by a process here (a `--detach`ed run has none).

A job whose dependencies already ended is decided when it is handed to the pool
(`decide_at_submit`): cancelled at once with the SSH engine's error (`dependency job N ended
STATE`), or free to run. A dependency that has not ended is a Dask task (of this run, of an
API `submit`, or of an earlier detached run, whose future the scheduler publishes): the
dependant's task is submitted with, as arguments, one tiny task per dependency that reduces
its answer to its state where the answer is (`sshwasm_state` of the worker plugin), so the
scheduler holds the dependant without a slot until they ended, and the answers never move
between workers. The dependant's task (`sshwasm_flow_job`) then runs the guest, or answers
`skipped` without running it when `--after` is not satisfied. A dependency that ended is
told to that task as recorded, so a job submitted again by another path (`jobs` settling
after a lost scheduler, a cancel's dependants) keeps the rule too.

A dependency whose task erred (an exception in the task, not a guest's failure) or was
cancelled in the scheduler takes its dependants' tasks with it: Dask ends them too, without
running them. Such a dependant is not recorded from its task (`Flows.by_dependency`): it is
set aside (`Flows.unheld`) until its dependencies' records ended, then settled by the SSH
engine's rule (`Flows.settle`): an --after one ends `cancelled` (`dependency job N ended
STATE`), an --after-any one (or one whose dependencies all succeeded) is submitted again,
held by nothing, under its key with AGAIN_SUFFIX (the erred key is still the scheduler's).

A dependency on an unfinished job of the SSH engine cannot be held by the pool: it is
refused before anything is submitted (`refuse_unheld`).

`--retry-failed`: the worker runs the guest again after its own failure, up to `--retries`
more times, each attempt in a job directory of its own; the answer brings the earlier
attempts, which are recorded here as the SSH engine records them (`take_flow`: `attempts`,
`attempt_hosts`, the attempt history, their output as `stdout.N`/`stderr.N`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import paths
from ..dependencies import dependency_problem
from ..errors import UsageError
from ..pool import PRELOAD_NAME
from ..runner.protocol import KIND_RESULT, KIND_STDERR, KIND_STDOUT, FrameDecoder, ProtocolError
from ..states import JobState
from ..store import CANCELLED_EXIT_CODE, Job, JobStore
from .dask_waits import asked

# The worker plugin's functions (dask_preload.py), by reference to its module on the hosts.
TASK_MODULE = PRELOAD_NAME.removesuffix(".py")
FLOW_FUNCTION = "sshwasm_flow_job"
STATE_FUNCTION = "sshwasm_state"
# Runs in the scheduler: which of these keys it knows.
_KNOWN_SOURCE = """
def sshwasm_known(keys, dask_scheduler=None):
    return [key for key in keys if key in dask_scheduler.tasks]
"""
# Runs in the scheduler: the key of the task each erred task's error came from (its own
# key: it raised itself; another: a task it was held behind erred or could not run).
_BLAME_SOURCE = """
def sshwasm_blame(keys, dask_scheduler=None):
    found = {}
    for key in keys:
        task = dask_scheduler.tasks.get(key)
        blame = None if task is None else task.exception_blame
        found[key] = None if blame is None else blame.key
    return found
"""
# The key of a dependant's task submitted again once its dependencies ended (`Flows.settle`):
# its first key may still be the scheduler's (erred, wanted by a published dataset or the
# follower's future until it lets go).
AGAIN_SUFFIX = ".again"


def dataset_name(key: str) -> str:
    """The name a detached task's future is published under: its job's `task_key`."""
    return key.removesuffix(AGAIN_SUFFIX)


class _ModuleOnHosts:
    """Unpickles as TASK_MODULE, imported where it is unpickled (the pool's hosts)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (importlib.import_module, (TASK_MODULE,))


class _OnHosts:
    """A function of the worker plugin's module, pickled as a reference to it."""

    def __init__(self, name: str) -> None:
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args: Any) -> Any:
        raise RuntimeError(f"{self.__name__} runs on the pool's workers only")

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (_ModuleOnHosts(), self.__name__))


def wants_flow(job: Job) -> bool:
    """Whether the job's task is `sshwasm_flow_job` (dependencies, or --retry-failed)."""
    return bool(job.dependencies) or (job.retry_failed and job.retries > 0)


def refuse_unheld(store: JobStore, job_ids: Sequence[int]) -> None:
    """A UsageError for a dependency the pool cannot hold the job behind: an unfinished job
    of the SSH engine (its coordinator, not the scheduler, knows when it ends). Unknown ids
    are left to `dependencies.check_dependencies`."""
    for job in store.get_many(list(job_ids)):
        if not job.is_final and job.engine != "dask":
            raise UsageError(
                f"--after: job {job.id} runs on the SSH engine and has not ended; the Dask "
                "pool cannot wait for it (submit this job once it ended)"
            )


def decide_at_submit(
    store: JobStore, job_ids: Sequence[int], notice: Callable[[str], None]
) -> list[int]:
    """Settle, before anything goes to the pool, what the jobs file already knows: a job
    whose --after dependency ended otherwise than succeeded ends `cancelled` with the SSH
    engine's error; one whose dependencies all ended is free (`held` 0). Returns the ids
    that ended here (not to be submitted). One read for an array's tasks."""
    held = sorted(set(job_ids) - store.without_dependencies(job_ids))
    if not held:
        return []
    ends: list[tuple[int, JobState, dict[str, Any]]] = []
    free: list[int] = []
    decided: dict[tuple[int, ...], tuple[str | None, list[int]]] = {}
    for job in store.get_many(held):
        key = (*job.dependencies, int(job.after_any))
        if key not in decided:
            dependencies = store.get_many(job.dependencies)
            problem = dependency_problem(job, dependencies)
            if len(dependencies) < len(job.dependencies):
                gone = sorted(set(job.dependencies) - {dep.id for dep in dependencies})
                problem = f"dependency job {gone[0]} is no longer recorded"
            waiting = [dep.id for dep in dependencies if not dep.is_final]
            decided[key] = (problem, waiting)
        problem, waiting = decided[key]
        if problem is not None:
            fields = {"exit_code": CANCELLED_EXIT_CODE, "error": problem, "engine": "dask"}
            ends.append((job.id, JobState.CANCELLED, fields))
        elif not waiting:
            free.append(job.id)
        elif job.array_id is None or job.array_task == 0:
            notice(f"job {job.id} waits for job(s) {', '.join(map(str, waiting))}")
    store.finish_many(ends)  # one transaction each, whatever the size of an array
    if free:
        store.update_many(free, held=0)
    return [job_id for job_id, _, _ in ends]


@dataclass
class Flows:
    """The flow task of each job that needs one (`prepare`, in the jobs file's thread),
    submitted with the others (`submit`, in any thread)."""

    store: JobStore
    # Each flow job's flow, and per dependency its final state, or None: still going.
    plans: dict[int, tuple[dict[str, Any], list[tuple[int, str | None]]]] = field(
        default_factory=dict
    )
    # Each such dependency's future (with its job key), and its state task once submitted.
    sources: dict[int, tuple[Any, str]] = field(default_factory=dict)
    states: dict[int, Any] = field(default_factory=dict)
    # Dependants whose task a dependency's error or cancel took (`by_dependency`), waiting
    # here for their dependencies' records; those submitted again (their key: AGAIN_SUFFIX).
    unheld: set[int] = field(default_factory=set)
    again: set[int] = field(default_factory=set)

    def prepare(self, client: Any, jobs: Sequence[Job]) -> None:
        """For each job that needs it: its flow (dependencies' ids, --after-any, how many
        retries of a guest's failure) and each dependency not ended as a Dask future.

        A dependency still going is found as the scheduler's task of its key: published
        (detached, API), of this same batch, or held by the client that follows it. One the
        scheduler does not know is refused (UsageError: `sshwasm jobs` settles it first)."""
        from .dask_engine import job_base, task_key

        flows = [job for job in jobs if wants_flow(job)]
        if not flows:
            return
        batch = {job.id for job in jobs}
        wanted = {dep for job in flows for dep in job.dependencies} - set(self.sources)
        dependencies = self.store.get_many(sorted(wanted))
        going = [dep for dep in dependencies if not dep.is_final]
        # Those that ended are told to the task as they are recorded (`decide_at_submit`
        # settled most before; not a job settled again after a lost scheduler).
        ended = {dep.id: dep.state.value for dep in dependencies if dep.is_final}
        published: set[str] = set()
        known: set[str] = set()
        if going:
            import distributed

            published = set(asked(client, client.list_datasets, what="its datasets"))
            probe = _by_value(_KNOWN_SOURCE, "sshwasm_known")
            keys = [task_key(dep) + suffix for dep in going for suffix in ("", AGAIN_SUFFIX)]
            known = set(asked(client, client.run_on_scheduler, probe, keys, what="its tasks"))
        for dep in going:
            key = task_key(dep)
            if key in published:
                future = asked(client, client.get_dataset, key, what=key)
            elif key + AGAIN_SUFFIX in known:  # submitted again (`settle`), followed
                future = distributed.Future(key + AGAIN_SUFFIX, client)
            elif key in known or dep.id in batch:  # submitted before it (`submit`)
                future = distributed.Future(key, client)
            else:
                raise UsageError(
                    f"--after: job {dep.id} has not ended and the pool's scheduler does not "
                    "know it (run `sshwasm jobs` to settle it, then submit again)"
                )
            self.sources[dep.id] = (future, job_base(dep))
        for job in flows:
            flow = {
                "after": job.dependencies,
                "after_any": job.after_any,
                "retries": job.retries if job.retry_failed else 0,
            }
            known_states = [(dep, ended.get(dep, "lost")) for dep in job.dependencies]
            states = [(dep, None if dep in self.sources else state) for dep, state in known_states]
            self.plans[job.id] = (flow, states)

    def wants(self, job: Job) -> bool:
        return job.id in self.plans

    def _state(self, client: Any, dep_id: int) -> Any:
        """The state task of a dependency (one per dependency, whatever its dependants)."""
        state = self.states.get(dep_id)
        if state is None:
            import distributed

            future, base = self.sources[dep_id]
            state = client.submit(
                _OnHosts(STATE_FUNCTION), future, key=f"sshwasm-after-{base}", pure=False
            )
            # Wanted by the scheduler itself until it ran: no client's cancel or exit takes
            # it from the dependants waiting for it.
            forget: Any = distributed.fire_and_forget  # untyped
            forget(state)
            self.states[dep_id] = state
        return state

    def submit(
        self,
        client: Any,
        job: Job,
        payload: bytes,
        data: Any,
        key: str,
        workers: Sequence[str] | None,
        limits: dict[str, Any] | None = None,
    ) -> Any:
        """Submit the job's flow task (held by Dask behind its dependencies' state tasks,
        each submitted now: a dependency of the same batch was submitted before it), with
        its array's `limits` (dask_limits; the state tasks count in no array)."""
        from .dask_limits import annotated

        flow, known = self.plans.pop(job.id)
        if job.id in self.again:
            key += AGAIN_SUFFIX
        states = [self._state(client, dep) if state is None else state for dep, state in known]
        with annotated(limits):
            return client.submit(
                _OnHosts(FLOW_FUNCTION),
                payload,
                data,
                flow,
                states,
                key=key,
                resources={"cpus": job.cpus, "memory_mb": job.memory_mb},
                workers=None if workers is None else list(workers),
                allow_other_workers=False,
                retries=job.retries,
                pure=False,
            )

    def by_dependency(self, client: Any, future: Any) -> bool:
        """Whether a dependant's task that did not finish was ended by a dependency's (its
        error, or a cancel in the scheduler), not by its own error. Touches no jobs file."""
        if future.key.endswith(AGAIN_SUFFIX) or client.status != "running":
            return False  # held behind nothing, or the client lost the scheduler: its own
        if future.status != "error":
            return True  # cancelled: a cancel of the job itself ended its record first
        try:
            probe = _by_value(_BLAME_SOURCE, "sshwasm_blame")
            keys = [future.key]
            blamed = asked(client, client.run_on_scheduler, probe, keys, what="why").get(future.key)
        except Exception:  # the scheduler is gone: it cannot be told; its record says why
            return False
        return blamed is not None and blamed != future.key

    def settle(self, job_ids: Sequence[int]) -> tuple[list[int], list[int], list[Job]]:
        """Settle the `unheld` jobs among `job_ids` whose dependencies' records ended, by
        the SSH engine's rule: (ended here: `cancelled`, with the dependency's end or by a
        cancel of the job itself; free to be submitted again, with the dependencies'
        states as recorded; the dependencies not ended that no process follows, for the
        caller to collect). The others wait on."""
        from ..liveness import needs_refresh

        ended: list[int] = []
        again: list[int] = []
        collect: dict[int, Job] = {}
        for job in self.store.get_many(sorted(self.unheld.intersection(job_ids))):
            if job.is_final or job.cancel_requested:
                self.unheld.discard(job.id)
                if self.store.finish(
                    job.id, JobState.CANCELLED, exit_code=CANCELLED_EXIT_CODE, error="cancelled"
                ):
                    ended.append(job.id)
                continue
            dependencies = self.store.get_many(job.dependencies)
            problem = dependency_problem(job, dependencies)
            if len(dependencies) < len(job.dependencies):
                gone = sorted(set(job.dependencies) - {dep.id for dep in dependencies})
                problem = f"dependency job {gone[0]} is no longer recorded"
            going = [dep for dep in dependencies if not dep.is_final]
            if going and problem is None:
                collect.update((dep.id, dep) for dep in going if needs_refresh(dep))
                continue
            self.unheld.discard(job.id)
            if problem is not None:
                fields = {"exit_code": CANCELLED_EXIT_CODE, "error": problem, "engine": "dask"}
                self.store.finish(job.id, JobState.CANCELLED, **fields)
                ended.append(job.id)
                continue
            for dep_id in job.dependencies:  # told as recorded, not through their tasks
                self.sources.pop(dep_id, None)
                self.states.pop(dep_id, None)
            self.again.add(job.id)
            again.append(job.id)
        return ended, again, list(collect.values())


def detached_dependants(store: JobStore, job_ids: Sequence[int]) -> list[Job]:
    """The detached dask jobs held (directly or through others) behind these jobs, oldest
    first: a forced cancel in the scheduler takes their tasks with it (`settle_dependants`)."""
    ids = set(job_ids)
    queued = [job_id for job_id, pid in store.unfinished(JobState.QUEUED) if pid is None]
    found: list[Job] = []
    for job in store.get_many(queued):  # in id order: a dependency before its dependants
        if job.engine == "dask" and ids.intersection(job.dependencies):
            found.append(job)
            ids.add(job.id)
    return found


def settle_dependants(store: JobStore, dependants: Sequence[Job]) -> list[int]:
    """Apply the SSH engine's rule to dependants whose tasks went with a cancelled job's:
    an --after one ends `cancelled` (`dependency job N ended cancelled`); the others (an
    --after-any one, or one whose dependency of those is still going) are returned, to be
    submitted again behind what they still wait for."""
    again: list[int] = []
    for job in dependants:  # oldest first: a dependency is settled before its dependants
        problem = dependency_problem(job, store.get_many(job.dependencies))
        if problem is None:
            again.append(job.id)
        else:
            store.finish(job.id, JobState.CANCELLED, exit_code=CANCELLED_EXIT_CODE, error=problem)
    return again


def _by_value(source: str, name: str) -> Callable[..., Any]:
    """A function from `source` that pickles by value (its module exists nowhere else)."""
    namespace: dict[str, Any] = {"__name__": "sshwasm_dask_task"}
    exec(compile(source, f"<sshwasm {name}>", "exec"), namespace)
    function: Callable[..., Any] = namespace[name]
    return function


def take_flow(
    store: JobStore, job: Job, answer: Any, warning: Callable[[str], None]
) -> tuple[Job, Any]:
    """Read a flow task's answer: a `skipped` one ends the job `cancelled` with its reason
    (the answer returned is None); earlier attempts are recorded (history, `attempts`,
    `attempt_hosts`, their output as stdout.N/stderr.N) and the last attempt's answer is
    returned, with the job as it is now. Raises ValueError for an unreadable answer."""
    if isinstance(answer, dict) or not wants_flow(job):
        return job, answer
    try:
        head_line, _, body = bytes(answer).partition(b"\n")
        head = json.loads(head_line)
        skipped = head.get("skipped")
        earlier = list(head.pop("earlier", []))
        lengths = [int(entry["length"]) for entry in earlier]
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a task's answer: {exc!r}") from exc
    if skipped is not None:
        store.finish(
            job.id,
            JobState.CANCELLED,
            exit_code=CANCELLED_EXIT_CODE,
            error=str(skipped),
            engine="dask",
        )
        return store.get(job.id), None
    if job.held:  # it ran: no longer waiting (as the SSH engine clears it when placed)
        store.update(job.id, held=0)
    if not earlier:
        return store.get(job.id), answer
    history = job.history
    hosts = (job.attempt_hosts or "").split(",") if job.attempt_hosts else []
    hosts = (hosts + [""] * job.attempts)[: job.attempts - 1]
    offset = 0
    for number, (entry, length) in enumerate(zip(earlier, lengths, strict=True), job.attempts):
        frames = _frames(body[offset : offset + length])
        offset += length
        result = _attempt_output(store, job.id, number, frames)
        host = str(entry.get("host", ""))
        error = str(result.get("error") or f"exit code {result.get('exit_code')}")
        history.append(
            {
                "attempt": number,
                "host": host,
                "state": str(result.get("state") or entry.get("state")),
                "exit_code": result.get("exit_code"),
                "error": error,
                "started_at": result.get("started_at"),
                "finished_at": result.get("finished_at"),
                "remote_key": str(entry.get("key", "")),
                "by_host": False,
            }
        )
        hosts.append(host)
        warning(
            f"job {job.id}: attempt {number} on '{host}' ended: {error}; placed attempt "
            f"{number + 1} of {job.retries + 1} (its output starts again from the beginning)"
        )
    store.update(
        job.id,
        attempts=job.attempts + len(earlier),
        attempt_hosts=",".join(hosts),
        attempt_history=json.dumps(history),
    )
    return store.get(job.id), json.dumps(head).encode() + b"\n" + body[offset:]


def _frames(data: bytes) -> list[tuple[bytes, bytes]]:
    decoder = FrameDecoder()
    try:
        frames = decoder.feed(data)
    except ProtocolError as exc:
        raise ValueError(f"an earlier attempt's frames: {exc}") from exc
    if decoder.pending:
        raise ValueError("an earlier attempt's frames end inside a frame")
    return frames


def _attempt_output(
    store: JobStore, job_id: int, number: int, frames: Sequence[tuple[bytes, bytes]]
) -> dict[str, Any]:
    """Keep an earlier attempt's output beside the job's as stdout.N and stderr.N (as the
    SSH engine sets it aside); its result, as the runner gave it."""
    directory = paths.make_job_output_dir(store.path, job_id)
    result: dict[str, Any] = {}
    with (
        paths.open_private(directory / f"stdout.{number}", "wb") as out,
        paths.open_private(directory / f"stderr.{number}", "wb") as err,
    ):
        for kind, body in frames:
            if kind == KIND_STDOUT:
                out.write(body)
            elif kind == KIND_STDERR:
                err.write(body)
            elif kind == KIND_RESULT:
                result = dict(json.loads(body))
    return result
