"""`sshwasm run` on an `engine: dask` cluster: the jobs go to the pool, followed here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from .. import paths
from ..cluster import Host
from ..errors import UsageError
from ..job_output import Handlers
from ..states import JobState
from ..store import Job
from .arrays import print_submitted
from .context import Context
from .coordinate import coordinator_handlers
from .exits import ExitStatus, job_exit_status
from .show import copy_output, print_json, report_end, tag_lines, warn, write_err, write_out

_T = TypeVar("_T")


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
    # A --verify job's twin is hidden from listings: collected with it, so that the pair
    # is judged once both ended (as the detached coordinator of the SSH engine does).
    ids = {job.id for job in jobs}
    for job in list(jobs):
        twin = ctx.store.verify_twin(job.id) if job.verify and not job.is_verify_twin else None
        if twin is not None and twin.id not in ids and twin.engine == "dask":
            jobs.append(twin)
    return DaskRun(ctx.store, cluster, coordinator_handlers(False, False)).collect(jobs)


def refuse_on_dask(jobs: Sequence[Job]) -> None:
    """A UsageError for the first job recorded with what `engine: dask` does not run yet
    (a --verify run: its twin is not an array task to queue again): nothing is queued
    again half-way."""
    for job in jobs:
        if job.verify:
            raise UsageError(f"job {job.id} is a --verify run: not resumed on engine: dask")


def check_staging(ctx: Context, stdin: bytes | None, dirs: str) -> None:
    """`run` on a dask cluster: refuse, before anything is submitted, a job whose staged
    content (stdin, --input, --dir copies) is more than one task carries to serve."""
    from ..directories import job_mounts
    from ..engines.dask_staging import check_size, staged_size_estimate

    trees = [mount.local for mount in job_mounts(dirs) if mount.local is not None]
    others = [len(stdin or b"")]
    if ctx.args.input is not None:
        path = Path(ctx.args.input)
        if path.is_dir():
            trees.append(str(path))
        else:
            others.append(path.stat().st_size)
    check_size(staged_size_estimate(trees, *others))


def cancel_detached(ctx: Context, jobs: list[Job]) -> dict[int, str]:
    """Cancel `engine: dask` jobs no process follows, in the pool; a problem per job that
    could not be cancelled (their records are left as they are)."""
    from ..engines.dask_engine import DaskRun

    cluster = ctx.cluster()
    if cluster.engine != "dask":
        problem = "it runs on a Dask pool; name its cluster file (--cluster) to cancel it"
        return {job.id: problem for job in jobs}
    return DaskRun(ctx.store, cluster, coordinator_handlers(False, False)).cancel(jobs)


def run_on_dask(
    ctx: Context,
    job_ids: list[int],
    is_array: bool,
    interactive: bool,
    reused: Sequence[int] = (),
) -> int:
    """Follow `job_ids` through the Dask pool; the same output and exit status as the SSH
    engine's foreground `run` (a single job streams its output as it ends). `reused` jobs
    (`--reuse`) ended already without running: shown first, as the SSH engine shows them."""
    from ..engines.dask_engine import DaskRun

    args = ctx.args
    done = ctx.store.get_many(list(reused))
    if args.detach:  # the scheduler holds the tasks: no local process follows them
        if job_ids:
            detach_on_dask(ctx, job_ids)
        print_submitted(ctx, sorted([*reused, *job_ids]), is_array)
        return ExitStatus.OK

    def show(job: Job) -> None:
        if not args.json and is_array:
            directory = paths.job_output_dir(ctx.store.path, job.id)
            prefix = f"{job.array_task}\t".encode() if args.tag else None
            for stream, write in (("stdout", write_out), ("stderr", write_err)):
                recorded = _recorded_output(job, stream)
                if recorded is None:
                    copy_output(directory / stream, write, prefix)
                elif recorded:
                    write(tag_lines(recorded, prefix, True)[0] if prefix else recorded)
        report_end(job)

    if not is_array and done:  # nothing ran: the reused job's output, as a run shows it
        from .run import show_single

        return show_single(ctx, done[0])
    for job in done:
        show(job)
    handlers = coordinator_handlers(
        show_output=not args.json and not is_array, show_notices=interactive
    )
    jobs = done
    if job_ids:
        run = DaskRun(ctx.store, ctx.cluster(), handlers, on_done=show).run
        jobs = jobs + _handing_over(ctx, job_ids, run)
    jobs.sort(key=lambda job: job.id)
    if args.json:
        print_json([job.record() for job in jobs] if is_array else jobs[0].record())
    failed = [job for job in jobs if job.state != JobState.SUCCEEDED]
    if not failed:
        return ExitStatus.OK
    return job_exit_status(failed[0]) or ExitStatus.ERROR


def _recorded_output(job: Job, stream: str) -> bytes | None:
    """A task's whole output of `stream` from its record, as its file holds it; None when
    only the file has it (cut to head and tail, or not valid UTF-8): a task of a big array
    is shown without opening its files again, just written."""
    text: str | None = getattr(job, stream)
    size: int = getattr(job, f"{stream}_bytes")
    if not size:
        return b""
    if text is None or "\ufffd" in text:  # (a decoding that replaced bytes is not them)
        return None
    data = text.encode()
    return data if len(data) == size else None


def _handing_over(ctx: Context, job_ids: list[int], hand: Callable[[list[int]], _T]) -> _T:
    """`hand(job_ids)`; if it cannot give them to the pool (a --dir that can no longer be
    read, or outgrew what a task carries), the jobs not yet placed say why in their
    records, not only on stderr, and nothing is left queued. (A lost scheduler is not
    this: `jobs` settles those later.)"""
    try:
        return hand(job_ids)
    except UsageError as exc:
        for job in ctx.store.get_many(job_ids):
            if not job.is_final and job.host is None:
                ctx.store.finish(job.id, JobState.FAILED, error=f"not submitted: {exc}")
        raise


def detach_on_dask(ctx: Context, job_ids: list[int]) -> None:
    """Leave `job_ids` to the pool's scheduler (`run --detach`)."""
    from ..engines.dask_engine import DaskRun

    handlers = coordinator_handlers(False, False)
    _handing_over(ctx, job_ids, DaskRun(ctx.store, ctx.cluster(), handlers).detach)


def follow_on_dask(ctx: Context, job_ids: list[int], handlers: Handlers) -> list[Job]:
    """Run `job_ids` through the pool and follow them to their end, as `coordinate_jobs`
    does for the SSH engine (a --verify job and its twin)."""
    from ..engines.dask_engine import DaskRun

    return _handing_over(ctx, job_ids, DaskRun(ctx.store, ctx.cluster(), handlers).run)


def pool_hosts(ctx: Context) -> list[Host]:
    """The cluster's hosts whose worker is connected to the pool's scheduler now (where a
    task pinned to a host can run): `run --verify` picks its two among them."""
    from ..pool import connect, plan_for

    cluster = ctx.cluster()
    client = connect(plan_for(cluster))
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        names = {str(worker.get("name")) for worker in workers.values()}
    finally:
        client.close()
    return [host for host in cluster.hosts if host.name in names]
