"""`sshwasm report`: how well jobs used their requests, and the HTML timeline of them."""

from __future__ import annotations

import os
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SshwasmError
from .context import Context
from .exits import ExitStatus
from .jobs import refresh
from .show import error, notice, print_json, say, table

if TYPE_CHECKING:
    from ..report import Efficiency
    from ..store import Job

# Without an ID, `report` covers this many of the newest jobs unless told otherwise.
DEFAULT_LAST = 20
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """`--since`: a duration back from now (`90m`, `2h`, `1d`) or an ISO 8601 date or time
    (local time unless it names its zone); returns a Unix time. Raises ValueError."""
    now = time.time() if now is None else now
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since '{text}' is neither a duration (30m, 2h, 1d) nor a date (2026-11-30T08:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a naive time is the user's local time
    return moment.timestamp()


def _select(ctx: Context) -> tuple[list[Job], str, int | None] | None:
    """The jobs the command covers, a title, and the array id when it is one array; None
    (after an error line) when the options contradict each other."""
    args = ctx.args
    store = ctx.store
    if args.job_id is not None:
        if args.last is not None or args.since is not None:
            error("give a job ID or --last/--since, not both")
            return None
        job = store.get(args.job_id)
        if job.array_id is None:
            return [job], f"sshwasm job {job.id}", None
        tasks = [other for other in store.list_jobs() if other.array_id == job.array_id]
        tasks.sort(key=lambda task: task.array_task or 0)
        name = f" ({job.name})" if job.name else ""
        return tasks, f"sshwasm array {job.array_id}{name}: {len(tasks)} tasks", job.array_id
    if args.since is not None:
        try:
            since = parse_since(args.since)
        except ValueError as exc:
            error(exc)
            return None
        jobs = [job for job in store.list_jobs(limit=args.last) if job.submitted_ts >= since]
        title = f"sshwasm jobs since {datetime.fromtimestamp(since).isoformat(timespec='seconds')}"
    else:
        jobs = store.list_jobs(limit=args.last or DEFAULT_LAST)
        title = f"sshwasm: the last {len(jobs)} jobs"
    jobs.reverse()  # oldest first, as on a timeline
    return jobs, title, None


def _declared_cpus(ctx: Context) -> dict[str, int]:
    """Cpus per host from the cluster file, for jobs that carry no snapshot of their host."""
    try:
        return {host.name: host.cpus for host in ctx.cluster().hosts}
    except (SshwasmError, OSError):
        return {}  # the page still draws; utilisation then uses the jobs' snapshots alone


def _write_html(path: Path, page: str) -> None:
    """Write the page whole or not at all: a temporary file beside it, then a rename."""
    directory = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(page)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _job_fields(job: Job, figures: Efficiency) -> dict[str, Any]:
    fields = figures.fields()
    for group_only in ("jobs", "measured", "unfinished"):
        del fields[group_only]
    return {
        "id": job.id,
        "name": job.name,
        "array_id": job.array_id,
        "array_task": job.array_task,
        "state": job.state.value,
        "exit_code": job.exit_code,
        "host": job.host,
        **fields,
    }


def _show_figures(figures: Efficiency) -> None:
    from ..report import format_bytes, format_ratio

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    say(f"cpus requested: {figures.cpus}")
    say(f"memory requested: {figures.memory_mb} MB")
    say(f"run time: {seconds(figures.run_s)}")
    say(f"cpu time: {seconds(figures.cpu_s)}")
    say(f"cpu efficiency: {format_ratio(figures.cpu_efficiency)}")
    say(f"peak memory: {format_bytes(figures.peak_memory_bytes)}")
    say(f"memory efficiency: {format_ratio(figures.memory_efficiency)}")
    if figures.fuel_used is not None:
        say(f"fuel used: {figures.fuel_used:,}")
    if figures.note:
        say(f"note: {figures.note}")
    if figures.advice:
        say(f"advice: {figures.advice}")


def cmd_report(ctx: Context) -> int:
    """`sshwasm report [ID]`: efficiency per job and in sum; `--html FILE`: the timeline."""
    from ..report import format_bytes, format_ratio, group_efficiency, job_efficiency

    args = ctx.args
    selected = _select(ctx)
    if selected is None:
        return ExitStatus.USAGE
    jobs, title, array_id = selected
    jobs = refresh(ctx, jobs)
    if args.html is not None:
        from ..timeline import render

        path = Path(args.html)
        try:
            _write_html(path, render(jobs, title, _declared_cpus(ctx)))
        except OSError as exc:
            error(f"cannot write {path}: {exc.strerror or exc}")
            return ExitStatus.ERROR
        notice(f"wrote {path} ({len(jobs)} jobs)")
        if not args.json:
            return ExitStatus.OK
    per_job = [(job, job_efficiency(job)) for job in jobs]
    single = len(jobs) == 1 and array_id is None and args.job_id is not None
    if args.json:
        if single:
            print_json(_job_fields(*per_job[0]))
            return ExitStatus.OK
        states: dict[str, int] = {}
        for job in jobs:
            states[job.state.value] = states.get(job.state.value, 0) + 1
        print_json(
            {
                "array_id": array_id,
                "states": states,
                **group_efficiency(jobs).fields(),
                "per_job": [_job_fields(job, figures) for job, figures in per_job],
            }
        )
        return ExitStatus.OK
    if single:
        job, figures = per_job[0]
        say(f"job: {job.id}" + (f" ({job.name})" if job.name else ""))
        code = "" if job.exit_code is None else f" (exit {job.exit_code})"
        say(f"state: {job.state}{code}")
        say(f"host: {job.host or '-'}")
        _show_figures(figures)
        return ExitStatus.OK
    if not jobs:
        say("no jobs")
        return ExitStatus.OK
    rows = [
        [
            job.id,
            "" if job.array_task is None else job.array_task,
            job.state,
            job.host or "",
            job.cpus,
            job.memory_mb,
            "" if job.run_s is None else f"{job.run_s:.3f}",
            "" if job.cpu_s is None else f"{job.cpu_s:.3f}",
            format_ratio(figures.cpu_efficiency),
            format_bytes(job.peak_memory_bytes),
            format_ratio(figures.memory_efficiency),
        ]
        for job, figures in per_job
    ]
    headers = ["ID", "TASK", "STATE", "HOST", "CPUS", "MEM_MB", "RUN_S", "CPU_S", "CPU_EFF"]
    table(rows, headers=[*headers, "PEAK_MEM", "MEM_EFF"])
    say("")
    say(title)
    _show_figures(group_efficiency(jobs))
    return ExitStatus.OK
