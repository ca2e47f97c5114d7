"""Attempts of a job: which endings are worth another attempt (`--retries`,
`--retry-failed`), putting a job back in the queue for one, and `resume` of an array.

A job's host failing it (unreachable past the keepalive bound while it ran, the runner
gone, its job directory vanished) is retried; a guest's own failure only with
`--retry-failed`. Each attempt runs under its own remote key, so a late answer from an
earlier attempt's host can never be taken for the job's result: it only joins the
attempt history.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import paths
from .cluster import Host
from .errors import SshwasmError
from .runner_client import RunnerClient, StreamOutcome
from .states import JobState
from .store import Job, JobStore

# The guest's own endings, retried only with --retry-failed.
GUEST_FAILURES = frozenset({JobState.FAILED, JobState.TIMEOUT, JobState.OUT_OF_MEMORY})
# What `resume` reruns: every final state but success.
RESUMABLE = frozenset(
    {JobState.FAILED, JobState.TIMEOUT, JobState.OUT_OF_MEMORY, JobState.CANCELLED, JobState.LOST}
)


@dataclass(frozen=True)
class Failure:
    """How an attempt ended, when that may be worth another one."""

    by_host: bool  # the host failed the job (not the guest)
    state: JobState  # what the job would have ended as
    error: str
    exit_code: int | None = None


class RetryAttempt(Exception):
    """Internal: the attempt on `host` ended as `failure` and the job is queued again."""

    def __init__(self, host: str, failure: Failure) -> None:
        super().__init__(failure.error)
        self.host = host
        self.failure = failure


def outcome_failure(host: str, outcome: StreamOutcome) -> Failure | None:
    """The failure a runner's final answer reports, if it is one a retry may cure."""
    if outcome.result is not None:
        state = JobState(str(outcome.result.get("state", JobState.FAILED.value)))
        if state not in GUEST_FAILURES:
            return None
        error = str(outcome.result.get("error") or f"exit code {outcome.result.get('exit_code')}")
        return Failure(False, state, error, outcome.result.get("exit_code"))
    if outcome.error is not None:
        if outcome.error.get("kind") == "missing":
            return Failure(True, JobState.LOST, f"host '{host}' has no trace of the job")
        message = outcome.error.get("error", "the runner failed")
        return Failure(True, JobState.FAILED, f"host '{host}': {message}")
    return None


def may_retry(job: Job, failure: Failure) -> bool:
    """Whether the job has an attempt left for this failure."""
    if job.attempts > job.retries:
        return False
    return failure.by_host or job.retry_failed


def requeue(store: JobStore, job: Job, failure: Failure) -> bool:
    """Queue the job again after `failure`: the attempt joins the history, its output files
    are kept beside the job's as stdout.N and stderr.N, and the next attempt's output
    starts from nothing (the record never holds two attempts' output)."""
    ended: dict[str, Any] = {
        "state": failure.state.value,
        "exit_code": failure.exit_code,
        "error": failure.error,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "remote_key": job.remote_key,
        "by_host": failure.by_host,
    }
    if not store.requeue(job, ended):
        return False
    set_aside_output(store, job)
    return True


def set_aside_output(store: JobStore, job: Job) -> None:
    """Move the output files of the job's current attempt to stdout.N and stderr.N."""
    directory = paths.job_output_dir(store.path, job.id)
    for name in ("stdout", "stderr"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(directory / name, directory / f"{name}.{job.attempts}")


def resumable(tasks: list[Job]) -> list[Job]:
    """The tasks `resume` reruns: ended, and not succeeded."""
    return [task for task in tasks if task.state in RESUMABLE]


def resume_task(store: JobStore, task: Job) -> bool:
    """Queue an ended task again for `resume` (an attempt more, the same row); True if done.

    The task gets its --retries again: retries count from this attempt on.
    """
    failure = Failure(False, task.state, task.error or task.state.value, task.exit_code)
    if not requeue(store, task, failure):
        return False
    store.update(task.id, retries=task.retries + task.attempts)
    return True


# How long, at most, a run waits at its end for the hosts of failed attempts to answer.
LATE_CHECK_S = 5.0


def _ignore(_: bytes) -> None:
    return None


async def collect_late(store: JobStore, job_id: int, hosts: Sequence[Host], pool: Any) -> None:
    """Ask the hosts that failed the job's earlier attempts how those attempts ended.

    A host that comes back may have finished the old attempt after all: its answer is kept
    in the attempt history only (the job's result is the attempt followed to its end). One
    still running there is cancelled, so it holds no host that the jobs file thinks free.
    A host still out of reach is left alone (bounded by the caller).
    """
    by_name = {host.name: host for host in hosts}
    job = store.get(job_id)
    for entry in job.history:
        host = by_name.get(str(entry.get("host")))
        if not entry.get("by_host") or "late" in entry or host is None:
            continue
        key = str(entry["remote_key"])
        try:
            client = RunnerClient(await pool.get(host))
            outcome = await client.stream(key, 0, 0, _ignore, _ignore, follow=False)
            late: dict[str, Any]
            if outcome.result is not None:
                late = {
                    "state": str(outcome.result.get("state")),
                    "exit_code": outcome.result.get("exit_code"),
                    "finished_at": outcome.result.get("finished_at"),
                }
            elif outcome.error is not None:
                continue  # no trace of it there: nothing to record
            else:
                await client.cancel(key)
                late = {"state": JobState.CANCELLED.value, "error": "still running; cancelled"}
        except SshwasmError:
            continue
        store.note_late_result(job_id, int(entry["attempt"]), late)
