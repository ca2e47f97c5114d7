"""`sshwasm run` on an `engine: dask` cluster: the jobs go to the pool, followed here."""

from __future__ import annotations

from collections.abc import Sequence

from .. import paths
from ..errors import UsageError
from ..states import JobState
from ..store import Job
from .context import Context
from .coordinate import coordinator_handlers
from .exits import ExitStatus, job_exit_status
from .show import copy_output, print_json, report_end, warn, write_err, write_out


def collect_detached(ctx: Context, jobs: list[Job]) -> dict[int, Job]:
    """Bring detached `engine: dask` jobs up to date from the pool (for `jobs`, `status`)."""
    from ..engines.dask_engine import DaskRun

    cluster = ctx.cluster()
    if cluster.engine != "dask":
        warn(
            f"{len(jobs)} job(s) ran on a Dask pool; name its cluster file (--cluster) "
            "to collect them"
        )
        return {}
    return DaskRun(ctx.store, cluster, coordinator_handlers(False, False)).collect(jobs)


def refuse_on_dask(jobs: Sequence[Job]) -> None:
    """A UsageError for the first job recorded with what `engine: dask` does not run yet
    (as `run` refuses those flags there): nothing is queued again half-way."""
    for job in jobs:
        if job.dirs not in ("", "[]"):
            what = "works on directories (--dir, --host-dir)"
        elif job.verify:
            what = "is a --verify run"
        else:
            continue
        raise UsageError(f"job {job.id} {what}: not supported with engine: dask yet")


def cancel_detached(ctx: Context, jobs: list[Job]) -> dict[int, str]:
    """Cancel `engine: dask` jobs no process follows, in the pool; a problem per job that
    could not be cancelled (their records are left as they are)."""
    from ..engines.dask_engine import DaskRun

    cluster = ctx.cluster()
    if cluster.engine != "dask":
        problem = "it runs on a Dask pool; name its cluster file (--cluster) to cancel it"
        return {job.id: problem for job in jobs}
    return DaskRun(ctx.store, cluster, coordinator_handlers(False, False)).cancel(jobs)


def run_on_dask(ctx: Context, job_ids: list[int], is_array: bool, interactive: bool) -> int:
    """Follow `job_ids` through the Dask pool; the same output and exit status as the SSH
    engine's foreground `run` (a single job streams its output as it ends)."""
    from ..engines.dask_engine import DaskRun

    args = ctx.args
    if args.detach:  # the scheduler holds the tasks: no local process follows them
        DaskRun(ctx.store, ctx.cluster(), coordinator_handlers(False, False)).detach(job_ids)
        print("\n".join(str(job_id) for job_id in job_ids))
        return ExitStatus.OK

    def show(job: Job) -> None:
        if not args.json and is_array:
            directory = paths.job_output_dir(ctx.store.path, job.id)
            prefix = f"{job.array_task}\t".encode() if args.tag else None
            for stream, write in (("stdout", write_out), ("stderr", write_err)):
                copy_output(directory / stream, write, prefix)
        report_end(job)

    handlers = coordinator_handlers(
        show_output=not args.json and not is_array, show_notices=interactive
    )
    jobs = DaskRun(ctx.store, ctx.cluster(), handlers, on_done=show).run(job_ids)
    if args.json:
        print_json([job.record() for job in jobs] if is_array else jobs[0].record())
    failed = [job for job in jobs if job.state != JobState.SUCCEEDED]
    if not failed:
        return ExitStatus.OK
    return job_exit_status(failed[0]) or ExitStatus.ERROR
