"""The commands about submitted jobs: `jobs`, `status`, `logs` and `cancel`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import paths
from .context import Context, with_pool
from .exits import ExitStatus
from .show import (
    JOB_HEADERS,
    error,
    folded_rows,
    job_row,
    print_json,
    say,
    table,
    write_err,
    write_out,
)

if TYPE_CHECKING:
    from ..store import Job
    from ..transport import TransportPool


def refresh(ctx: Context, jobs: Sequence[Job]) -> list[Job]:
    """Refresh unfinished jobs whose coordinator is gone; others are returned as they are."""
    from ..liveness import needs_refresh

    orphans = [job for job in jobs if needs_refresh(job)]
    if any(job.engine == "dask" for job in orphans):  # engine: dask (issue 12)
        from .dask_run import collect_detached

        collected = collect_detached(ctx, [job for job in orphans if job.engine == "dask"])
        jobs = [collected.get(job.id, job) for job in jobs]
        orphans = [job for job in orphans if job.engine != "dask"]
    if not orphans:
        return list(jobs)
    import asyncio

    from ..recorded_jobs import refresh_job

    async def refresh_orphans(pool: TransportPool) -> dict[int, Job]:
        fresh = await asyncio.gather(*(refresh_job(ctx.store, job, pool) for job in orphans))
        return {job.id: job for job in fresh}

    updated = with_pool(refresh_orphans)
    return [updated.get(job.id, job) for job in jobs]


def cmd_jobs(ctx: Context) -> int:
    """`sshwasm jobs`: a table (or JSON array) of jobs, newest first."""

    args = ctx.args
    jobs = refresh(ctx, ctx.store.list_jobs(limit=args.limit, state=args.state))
    if args.state is not None:
        jobs = [job for job in jobs if job.state == args.state]
    if args.json:
        print_json([job.record() for job in jobs])
        return ExitStatus.OK
    rows = folded_rows(jobs) if args.fold else [job_row(job) for job in jobs]
    table(rows, headers=JOB_HEADERS)
    return ExitStatus.OK


def cmd_status(ctx: Context) -> int:
    """`sshwasm status ID`: one job, refreshed from its host if nobody else follows it."""
    job = refresh(ctx, [ctx.store.get(ctx.args.job_id)])[0]
    record = job.record()
    if ctx.args.json:
        print_json(record)
        return ExitStatus.OK
    for key, value in record.items():
        if key in ("stdout", "stderr"):
            continue
        if value is not None:
            say(f"{key}: {value}")
    for entry in job.history:  # earlier attempts (--retries, resume), oldest first
        late = entry.get("late")
        heard = f" (its host later said: {late['state']})" if late else ""
        ended = f"{entry['host']}: {entry['state']}: {entry['error']}"
        say(f"attempt {entry['attempt']}: {ended}{heard}")
    return ExitStatus.OK


def cmd_logs(ctx: Context) -> int:
    """`sshwasm logs ID`: the job's full output, from the local copy (brought up to date
    from the host first when nobody else follows the job)."""
    from ..liveness import needs_refresh

    args = ctx.args
    store = ctx.store
    job = refresh(ctx, [store.get(args.job_id)])[0]
    stream = "stderr" if args.stderr else "stdout"
    path = paths.job_output_dir(store.path, job.id) / stream
    write = write_err if args.stderr else write_out
    offset = 0
    while True:
        if path.exists():
            with open(path, "rb") as handle:
                handle.seek(offset)
                while chunk := handle.read(1 << 20):
                    write(chunk)
                    offset += len(chunk)
        if not args.follow:
            break
        job = store.get(job.id)
        # A live coordinator appends to the local copy; else ask the host, less often.
        orphan = needs_refresh(job)
        if orphan:
            job = refresh(ctx, [job])[0]
        if job.is_final and (not path.exists() or path.stat().st_size == offset):
            break
        time.sleep(1.0 if orphan else 0.2)
    return ExitStatus.OK


def cmd_cancel(ctx: Context) -> int:
    """`sshwasm cancel ID...`: stop queued or running jobs."""
    from ..recorded_jobs import cancel_jobs

    store = ctx.store
    jobs = [store.get(job_id) for job_id in ctx.args.job_ids]

    status = ExitStatus.OK
    for job, problem in with_pool(lambda pool: cancel_jobs(store, jobs, pool)):
        if problem is None:
            say(f"job {job.id}: {job.state}")
        else:
            status = ExitStatus.ERROR
            error(f"job {job.id}: {problem}")
    return status
