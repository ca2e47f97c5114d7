"""Following jobs through a Coordinator: in this process (a foreground `run`), or in a
detached one that `run --detach` starts (the hidden `_coordinate` command)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .. import paths
from .context import Context, with_pool
from .exits import ExitStatus, job_exit_status
from .parser import COORDINATE_COMMAND
from .show import PROG, notice, report_end, write_err, write_out

if TYPE_CHECKING:
    from ..job_output import Handlers
    from ..store import Job
    from ..transport import TransportPool


def coordinator_handlers(show_output: bool, show_notices: bool) -> Handlers:
    """Where a Coordinator's output and messages go: stdout/stderr, or only warnings."""
    from ..job_output import Handlers

    chosen = Handlers(warning=notice)
    if show_output:
        chosen.stdout = write_out
        chosen.stderr = write_err
    if show_notices:
        chosen.notice = notice
    return chosen


def coordinate_jobs(
    ctx: Context,
    job_ids: Sequence[int],
    handlers: Handlers,
    on_done: Callable[[Job], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    keep: bool = True,
) -> list[Job]:
    """Follow submitted jobs through one Coordinator in this process until each has ended.

    With `on_done` the jobs are followed side by side (an array's tasks, a detached run's
    jobs): a job's failure is its own and goes to `on_done` with the job, and the others
    go on, and `on_tick` is called now and then meanwhile (a progress line); with `keep`
    false they are not kept for the list returned (empty: 100,000 tasks). Without it
    the one job is followed alone and what stops it (no host fits, the host is out of
    reach) is raised, for a foreground `run` to say.
    """
    from ..coordinator import Coordinator

    cluster = ctx.cluster()

    async def follow(pool: TransportPool) -> list[Job]:
        coordinator = Coordinator(ctx.store, cluster.hosts, pool, handlers)
        if on_done is None:
            (job_id,) = job_ids
            return [await coordinator.drive(job_id)]
        return await coordinator.drive_tasks(job_ids, on_done=on_done, on_tick=on_tick, keep=keep)

    try:
        return with_pool(follow)
    except KeyboardInterrupt:
        if on_done is None:
            (job_id,) = job_ids
            notice(
                f"interrupted; job {job_id} goes on where it was placed: "
                f"`{PROG} cancel {job_id}` stops it, `{PROG} status {job_id}` collects it"
            )
        raise


def spawn_coordinator(ctx: Context, job_ids: list[int]) -> None:
    """Start the detached coordinator of `run --detach`, recorded as these jobs' own."""
    command = [sys.executable, "-m", "sshwasm", "--db", str(ctx.db_path.resolve())]
    cluster_path = ctx.cluster_path()
    if cluster_path is not None:
        command += ["--cluster", str(cluster_path)]
    command += [COORDINATE_COMMAND, *map(str, job_ids)]
    log = paths.make_job_output_dir(ctx.db_path, job_ids[0]) / "coordinator.log"
    with paths.open_private(log) as log_file:
        coordinator = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # survives this terminal closing
        )
    ctx.store.heartbeat_as(job_ids, coordinator.pid)


def cmd_coordinate(ctx: Context) -> int:
    """Hidden: the detached coordinator of `run --detach`."""
    # Its stderr is the coordinator.log beside the job's output: how each job ended goes there.
    worst = [int(ExitStatus.OK)]
    verified: list[int] = []

    def ended(job: Job) -> None:
        report_end(job)
        worst[0] = max(worst[0], job_exit_status(job))
        if job.verify:
            verified.append(job.id)

    coordinate_jobs(
        ctx,
        ctx.args.job_ids,
        coordinator_handlers(show_output=False, show_notices=True),
        on_done=ended,
        keep=False,
    )
    from ..verify import settle

    for job_id in verified:
        # --verify: judged also when a run ended without a result (never placed, lost).
        settle(ctx.store, job_id)
        worst[0] = max(worst[0], job_exit_status(ctx.store.get(job_id)))
    return worst[0]
