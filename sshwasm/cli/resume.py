"""`sshwasm resume`: rerun the tasks of an array that did not succeed."""

from __future__ import annotations

import sys

from ..errors import UsageError
from .context import Context
from .exits import ExitStatus
from .show import say


def cmd_resume(ctx: Context) -> int:
    """Queue again the array's failed, timed out, out of memory, cancelled and lost tasks
    (same row: same id, array id and task index, one attempt more), then follow them as
    `run --array` does, or detach."""
    from ..attempts import resumable, resume_task
    from .coordinate import spawn_coordinator
    from .jobs import refresh
    from .run import run_array

    args = ctx.args
    job = ctx.store.get(args.job_id)
    if job.array_id is None:
        raise UsageError(
            f"job {job.id} is not a task of an array; `resume` reruns an array's tasks "
            f"(run a single job again with `run`)"
        )
    # Tasks whose coordinator died are brought up to date first, as `jobs` would.
    tasks = refresh(ctx, ctx.store.array_tasks(job.array_id))
    chosen = resumable(tasks)
    if not chosen:
        still = sum(1 for task in tasks if not task.is_final)
        why = f"{still} still queued or running, the rest" if still else "every task"
        say(f"nothing to resume in array {job.array_id}: {why} succeeded")
        return ExitStatus.OK
    on_dask = ctx.cluster().engine == "dask"
    if on_dask:  # engine: dask (issue 12): refused before anything is queued again
        from .dask_run import refuse_on_dask

        refuse_on_dask(chosen)
    job_ids = [task.id for task in chosen if resume_task(ctx.store, task)]
    if not job_ids:
        say(f"nothing to resume in array {job.array_id}: another process resumed it first")
        return ExitStatus.OK
    interactive = sys.stderr.isatty() and not args.json and not args.quiet
    if on_dask:  # through the pool, as `run --array` (and --detach) there
        from .dask_run import run_on_dask

        return run_on_dask(ctx, job_ids, True, interactive)
    if args.detach:
        spawn_coordinator(ctx, job_ids)
        print("\n".join(str(job_id) for job_id in job_ids))
        return ExitStatus.OK
    return run_array(ctx, job_ids, interactive)
