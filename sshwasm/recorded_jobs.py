"""Jobs as the jobs file records them, for a process that does not drive them: how a job's
end is recorded from its runner's answer, bringing a job whose coordinator is gone up to
date from its host (re-attach), and cancelling jobs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .cluster import Host
from .directories import collect_dirs
from .errors import HostUnreachable, RemoteError, SshwasmError
from .fingerprint import recorded_reuse_key
from .job_output import JobOutput, OutputCollected, collect_output, output_limit_error
from .liveness import needs_refresh
from .runner_client import RunnerClient, StreamOutcome
from .states import JobState
from .store import CANCELLED_EXIT_CODE, Job, JobStore
from .transport import TransportPool
from .verify import settle

# A job whose host stays unreachable this long after its coordinator is gone becomes `lost`
# (the next `status` or `jobs` past that time decides); reaching the host again resets it.
LOST_AFTER_UNREACHABLE_S = 900.0
# How long `status`/`jobs` wait for a host when refreshing a job from it.
REFRESH_TIMEOUT_S = 20.0


def result_state(result: dict[str, Any]) -> JobState:
    """The final state the runner's result.json names (its `state` word; absent: failed)."""
    return JobState(str(result.get("state", JobState.FAILED.value)))


def result_fields(result: dict[str, Any]) -> dict[str, Any]:
    """Record columns from the runner's result.json."""
    return {
        "exit_code": result.get("exit_code"),
        "error": result.get("error"),
        "run_s": result.get("run_s"),
        "cpu_s": result.get("cpu_s"),
        "peak_memory_bytes": result.get("peak_memory_bytes"),
        "finished_at": result.get("finished_at"),
        "fuel_used": result.get("fuel_used"),
    }


def end_of_answer(
    store: JobStore,
    job: Job,
    host: Host,
    outcome: StreamOutcome,
    output: JobOutput,
    problem: str | None = None,
) -> tuple[JobState, dict[str, Any]] | None:
    """The final state and record columns (output included) of a job from its runner's
    final answer: its result, or an error about it; None when the answer is not final.
    `problem`: what went wrong bringing back its /output or directories, for the record's
    error if nothing else went wrong. Writes nothing: `record_end` writes one job's, the
    dask engine a wake-up's worth in one transaction."""
    if outcome.result is not None:
        state = result_state(outcome.result)
        fields = result_fields(outcome.result)
        if problem and not fields["error"]:
            # The record says what went wrong, if nothing else did.
            fields["error"] = problem
        if output.budget.exceeded and job.max_output_mb is not None:
            # Held here too, whatever the host said: the job ends as over its cap.
            state, fields["exit_code"] = JobState.FAILED, None
            fields["error"] = output_limit_error(job.max_output_mb)
            if problem:  # e.g. the --dir files past the cap, not brought back
                fields["error"] += f"; {problem}"
        if state is JobState.SUCCEEDED:
            # Only a success can be reused (--reuse): its key, from content alone.
            fields["reuse_key"] = recorded_reuse_key(store.path, job)
        return state, {**fields, **output.fields()}
    if outcome.error is not None:
        if outcome.error.get("kind") == "missing":
            error = f"host '{host.name}' has no trace of the job"
            return JobState.LOST, {"error": error, **output.fields()}
        message = outcome.error.get("error", "the runner failed")
        error = f"host '{host.name}': {message}"
        return JobState.FAILED, {"error": error, **output.fields()}
    return None


async def record_end(
    store: JobStore,
    job: Job,
    host: Host,
    client: RunnerClient,
    outcome: StreamOutcome,
    output: JobOutput,
    extra: Mapping[str, Any] | None = None,
) -> list[str]:
    """Record how a job ended, from its runner's final answer (fetching its /output first).

    Returns what is worth a warning (output not fetched, or written beside existing
    files). Does nothing when the answer is not final (the job is still running). `extra`
    are more record columns written with the end (one transaction).
    """
    collected, dir_problem = OutputCollected(), None
    dir_warnings: list[str] = []
    if outcome.result is not None:
        if job.output_dir:
            collected = await collect_output(
                store, job, Path(job.output_dir), client, output.budget
            )
        if job.dirs != "[]":
            dir_problem, dir_warnings = await collect_dirs(store, job, client, output.budget)
    end = end_of_answer(store, job, host, outcome, output, collected.problem or dir_problem)
    if end is None:
        return []
    state, fields = end
    store.finish(job.id, state, **fields, **(extra or {}))
    if outcome.result is None:
        return []
    if job.verify:
        settle(store, job.id)  # judged once both runs ended
    return [text for text in (collected.problem, collected.warning) if text] + dir_warnings


# Why a queued job whose coordinator is gone ends as lost.
UNPLACED_ERROR = "its coordinator exited before the job was placed"


async def refresh_job(store: JobStore, job: Job, pool: TransportPool) -> Job:
    """Bring an unfinished job whose coordinator is gone up to date from its host."""
    if not needs_refresh(job):
        return job
    if not store.claim(job):
        return store.get(job.id)  # another process took it over just now
    if job.state is JobState.QUEUED:
        store.finish(job.id, JobState.LOST, error=UNPLACED_ERROR)
        return store.get(job.id)
    host = job.host_snapshot
    if host is None:
        store.finish(job.id, JobState.LOST, error="no record of the host the job was placed on")
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
        store.finish(job.id, JobState.FAILED, error=str(exc), **output.fields())
        return store.get(job.id)
    except SshwasmError as exc:
        now = time.time()
        since = job.unreachable_since or now
        if now - since > LOST_AFTER_UNREACHABLE_S:
            store.finish(
                job.id,
                JobState.LOST,
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
    # The queued ones first: a running one cancelled frees room on which a queued one
    # named in the same command could otherwise be placed before its turn came here.
    for job in jobs:
        if store.get(job.id).state is JobState.QUEUED:
            store.cancel_unstarted(job.id)
    results: list[tuple[Job, str | None]] = []
    for job in jobs:
        job = store.get(job.id)
        if job.state is JobState.QUEUED and store.cancel_unstarted(job.id):
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
            store.finish(
                job.id, JobState.CANCELLED, exit_code=CANCELLED_EXIT_CODE, error="cancelled"
            )
            results.append((store.get(job.id), None))
            continue
        try:
            await RunnerClient(await pool.get(host)).cancel(job.remote_key)
        except SshwasmError as exc:
            results.append((job, str(exc)))
            continue
        results.append((await refresh_job(store, job, pool), None))
    return results
