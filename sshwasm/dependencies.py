"""`--after` and `--after-any`: a job held in the queue until the jobs it names have ended.

The held job is recorded `queued` at once and takes no place in line (the placer skips
held rows) until its dependencies allow it. A dependency whose own coordinator is gone
is brought up to date from its host, as `jobs` does, so a dead coordinator cannot leave
the held job waiting forever (a dependency that never started ends `lost` that way).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from .errors import JobNotFound, UsageError
from .liveness import needs_refresh
from .recorded_jobs import refresh_job
from .states import JobState
from .store import CANCELLED_EXIT_CODE, Job, JobStore
from .transport import TransportPool

# How often a held job looks at its dependencies.
DEPENDENCY_POLL_S = 0.5


def check_dependencies(store: JobStore, job_ids: Sequence[int]) -> None:
    """Refuse unknown dependency ids before anything is submitted (UsageError)."""
    for job_id in job_ids:
        try:
            store.get(job_id)
        except JobNotFound:
            raise UsageError(f"--after: no job {job_id} in {store.path}") from None


def dependency_problem(job: Job, dependencies: Sequence[Job]) -> str | None:
    """Why the held job can never run (a dependency ended otherwise than needed), or None."""
    if job.after_any:
        return None
    for dependency in dependencies:
        if dependency.is_final and dependency.state is not JobState.SUCCEEDED:
            return f"dependency job {dependency.id} ended {dependency.state.value}"
    return None


async def wait_for_dependencies(
    store: JobStore, job_id: int, pool: TransportPool, notice: Callable[[str], None]
) -> bool:
    """Hold the job until its dependencies allow it to be placed; True when they do.

    False when the job ended meanwhile: cancelled by the user, or here because a
    dependency of `--after` ended in any state but succeeded.
    """
    job = store.get(job_id)
    if not job.dependencies:
        return True
    announced = False
    while True:
        job = store.get(job_id)
        if job.is_final:
            return False
        try:
            dependencies = [await _current(store, dep_id, pool) for dep_id in job.dependencies]
            problem = dependency_problem(job, dependencies)
        except JobNotFound as exc:
            # Its row went away (another jobs file was put in place): it can never succeed.
            dependencies, problem = [], f"dependency job {exc.job_id} is no longer recorded"
        if problem is not None:
            store.finish(job_id, JobState.CANCELLED, exit_code=CANCELLED_EXIT_CODE, error=problem)
            return False
        if all(dependency.is_final for dependency in dependencies):
            store.update(job_id, held=0)
            return True
        if not announced:
            announced = True
            waiting = ", ".join(str(dep.id) for dep in dependencies if not dep.is_final)
            notice(f"job {job_id} waits for job(s) {waiting}")
        await asyncio.sleep(DEPENDENCY_POLL_S)


async def _current(store: JobStore, job_id: int, pool: TransportPool) -> Job:
    """A dependency as it is now; refreshed from its host if nobody follows it any more."""
    job = store.get(job_id)
    if needs_refresh(job):
        job = await refresh_job(store, job, pool)
    return job
