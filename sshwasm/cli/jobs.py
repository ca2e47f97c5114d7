"""The commands about submitted jobs: `jobs`, `status`, `logs` and `cancel`."""

from __future__ import annotations

import functools
import gc
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .. import paths
from ..states import JobState
from ..store import TABLE_COLUMNS
from .context import Context, with_pool
from .exits import ExitStatus
from .parser import TERMINAL_WINDOW
from .show import (
    JOB_HEADERS,
    error,
    folded_rows,
    local_time,
    notice,
    print_json,
    printable,
    runtime_of,
    say,
    table,
    write_err,
    write_out,
)

if TYPE_CHECKING:
    from ..store import Job, RecordValue
    from ..transport import TransportPool


def refresh(ctx: Context, jobs: Sequence[Job]) -> list[Job]:
    """Refresh unfinished jobs whose coordinator is gone; others are returned as they are."""
    from ..liveness import needs_refresh

    orphans = [job for job in jobs if needs_refresh(job)]
    listed = {job.id for job in jobs}
    twins = [twin for twin in pool_twins(ctx, listed) if twin.id not in listed]
    if twins or any(job.engine == "dask" for job in orphans):  # engine: dask (issue 12)
        from .dask_run import collect_detached

        dask_jobs = [job for job in orphans if job.engine == "dask"] + twins
        collected = collect_detached(ctx, dask_jobs)
        jobs = [collected.get(job.id, job) for job in jobs]
        orphans = [job for job in orphans if job.engine != "dask"]
    # Queued ones were never placed: lost, all in one transaction, no host to ask.
    unplaced = [job for job in orphans if job.state is JobState.QUEUED]
    if unplaced:
        from ..recorded_jobs import UNPLACED_ERROR

        ctx.store.lose_unplaced(unplaced, UNPLACED_ERROR)
        fresh = {job.id: job for job in ctx.store.get_many([job.id for job in unplaced])}
        jobs = [fresh.get(job.id, job) for job in jobs]
        orphans = [job for job in orphans if job.state is not JobState.QUEUED]
    if not orphans:
        return list(jobs)
    import asyncio

    from ..recorded_jobs import refresh_job

    async def refresh_orphans(pool: TransportPool) -> dict[int, Job]:
        fresh = await asyncio.gather(*(refresh_job(ctx.store, job, pool) for job in orphans))
        return {job.id: job for job in fresh}

    updated = with_pool(refresh_orphans)
    return [updated.get(job.id, job) for job in jobs]


def pool_twins(ctx: Context, listed: set[int] | None) -> list[Job]:
    """The unlisted --verify twins on the pool, not ended and followed by no process, of
    the `listed` jobs (None: of any): every listing collects them with their jobs. (A
    detached --verify job recorded before its twin ended, e.g. by an older version, leaves
    the listings' unfinished jobs; its twin, which they hide, would wait for a `jobs` that
    never again collected it, and the pair would never be judged.)"""
    from ..liveness import needs_refresh

    return [
        twin
        for twin in ctx.store.unfinished_twins()
        if twin.engine == "dask"
        and (listed is None or twin.rerun_of in listed)
        and needs_refresh(twin)
    ]


def cmd_jobs(ctx: Context) -> int:
    """`sshwasm jobs`: a table (or JSON array) of jobs, newest first."""

    args = ctx.args
    if args.json:
        # The unfinished jobs listed refreshed first, then the records read as columns.
        with _no_cyclic_gc():
            listed = functools.partial(ctx.store.listed_ids, args.limit, args.state)
            _refresh_unfinished(ctx, _unfinished_listed(ctx, args.state, listed))
            records = ctx.store.records(limit=args.limit, state=args.state)
        sys.stdout.write(records_json(records))
        sys.stdout.write("\n")
        return ExitStatus.OK
    if args.fold and args.limit is not None:
        # The newest N tasks folded: read as Jobs.
        jobs = refresh(ctx, ctx.store.list_jobs(limit=args.limit, state=args.state))
        if args.state is not None:
            jobs = [job for job in jobs if job.state == args.state]
        table(folded_rows(jobs), headers=JOB_HEADERS)
        return ExitStatus.OK
    # The table reads only its columns, and --fold counts by aggregate queries: a jobs
    # file of 100,000 rows is listed in a fraction of a second, not read as 100,000 Jobs.
    with _no_cyclic_gc():
        _jobs_table(ctx)
    return ExitStatus.OK


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector paused: it would walk the listing's row tuples (none
    of which is in a cycle) again and again while they are made, a tenth of the time of
    `jobs` over 100,000 rows."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _jobs_table(ctx: Context) -> None:
    """`jobs` as a table (JOB_HEADERS), from light rows."""
    args = ctx.args
    fold, limit, state = args.fold, args.limit, args.state
    window = _terminal_window(ctx)
    if window is not None:
        limit = window
    rows = _light_rows(ctx, fold, limit, state)
    listed = None if fold else lambda: (row[0] for row in rows)  # the ids shown
    if _refresh_unfinished(ctx, _unfinished_listed(ctx, state, listed)):
        rows = _light_rows(ctx, fold, limit, state)
    if fold:
        write_table(_folded_cells(ctx, rows, state), JOB_HEADERS)
        return
    _write_rows(ctx, rows, limit, state)
    if window is not None and len(rows) == window:
        _say_hidden(ctx, window, state)


def _unfinished_listed(
    ctx: Context, state: Any, listed: Callable[[], Iterable[int]] | None
) -> list[tuple[int, int | None]]:
    """(id, coordinator pid) of the unfinished jobs in `state` a listing shows, and of the
    unfollowed --verify twins of those: what is refreshed before it is made. `listed`
    gives the ids it shows (None: every job, as --fold), asked only when there is any
    such job (a listing of finished jobs needs none)."""
    unfinished = ctx.store.unfinished(state)
    twins = pool_twins(ctx, None)
    if listed is None or not (unfinished or twins):
        return unfinished + [(twin.id, twin.coordinator_pid) for twin in twins]
    shown = set(listed())  # only the jobs shown, as with whole Jobs
    return [entry for entry in unfinished if entry[0] in shown] + [
        (twin.id, twin.coordinator_pid) for twin in twins if twin.rerun_of in shown
    ]


def _write_rows(ctx: Context, rows: list[Any], limit: int | None, state: Any) -> None:
    """The table of these light rows (`_light_rows`) on stdout."""
    if len(rows) <= TABULATE_MOST_ROWS or _wide_chars():
        local: dict[str, str] = {}
        if rows and len(rows[0]) != len(TABLE_COLUMNS):  # keyed rows: read them whole
            rows = ctx.store.table_rows(limit=limit, state=state)
        table([_row_cells(row, local) for row in rows], headers=JOB_HEADERS)
        return
    # The same layout a column at a time: 100,000 rows in a fraction of a second.
    from .listing import render, render_keyed

    text = render_keyed(rows, JOB_HEADERS) if len(rows[0]) != len(TABLE_COLUMNS) else None
    if text is None:
        text = render(ctx.store.table_rows(limit=limit, state=state), JOB_HEADERS)
    sys.stdout.write(text)


def records_json(records: Sequence[Mapping[str, RecordValue]]) -> str:
    """What `json.dumps(records, indent=2)` gives (print_json), made by json's C encoder
    in one call: the indenting encoder is pure Python, most of `jobs --json` over
    100,000 records (tens of seconds).

    A record is flat (JSON scalars only): the C encoder's item separator carries the
    newline and indent of a record's fields, and the only `},\n    {` in its output is
    between two records (an encoded string holds no raw newline), where the indent of
    the array's items goes instead.
    """
    import json

    first = records[0] if records else None
    if not first or not all(type(value) in _SCALARS for value in first.values()):
        return json.dumps(records, indent=2)
    text = json.dumps(records, separators=(",\n    ", ": "))
    body = text[2:-2].replace("},\n    {", "\n  },\n  {\n    ")
    return "[\n  {\n    " + body + "\n  }\n]"


_SCALARS = (str, int, float, bool, type(None))


def _terminal_window(ctx: Context) -> int | None:
    """How many of the newest jobs the table shows: TERMINAL_WINDOW when stdout is a
    terminal (a person reading, to whom 100,000 lines are no use), unless --all, --limit
    or --fold say otherwise; None (every job) when the table goes to a pipe or a file,
    so what scripts read is unchanged."""
    args = ctx.args
    if args.all or args.limit is not None or args.fold or not _stdout_is_terminal():
        return None
    return TERMINAL_WINDOW


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def _say_hidden(ctx: Context, window: int, state: Any) -> None:
    """The line under a table cut to the newest `window` jobs: how many it left out and
    how to see them (on stderr, after the table)."""
    total = ctx.store.count_listed(state)
    if total <= window:
        return
    sys.stdout.flush()
    kind = "jobs" if state is None else f"{state} jobs"
    notice(
        f"{total - window:,} older {kind} not shown (the newest {window} of {total:,}): "
        "`jobs --all` lists every one, `--limit N` the newest N, `--fold` one row per array"
    )


def _light_rows(ctx: Context, fold: bool, limit: int | None, state: Any) -> list[Any]:
    """The table's rows, each led by the job's id: for --fold those of plain jobs
    (store.TABLE_COLUMNS), else store.keyed_table_rows (or, when a value cannot be keyed,
    TABLE_COLUMNS)."""
    if fold:
        return ctx.store.plain_table_rows(state)
    keyed = ctx.store.keyed_table_rows(limit=limit, state=state)
    return keyed if keyed is not None else ctx.store.table_rows(limit=limit, state=state)


def _refresh_unfinished(ctx: Context, jobs: Sequence[tuple[int, int | None]]) -> bool:
    """Refresh those of these unfinished jobs (id, coordinator pid) whose coordinator is
    gone; True if any was.

    Whether a coordinator lives is asked once per coordinator, not once per job: an array
    of 100,000 tasks has one.
    """
    if not jobs:
        return False
    from ..liveness import needs_refresh

    by_pid: dict[int | None, list[int]] = {}
    for job_id, pid in jobs:
        by_pid.setdefault(pid, []).append(job_id)
    orphans: list[Job] = []
    for ids in by_pid.values():
        # A live sshwasm coordinator holds all its jobs: one of them says so for all.
        # Else (gone, or a live pid that is no sshwasm command) each job is asked.
        sample = ctx.store.get(ids[0])
        pid = sample.coordinator_pid
        if not needs_refresh(sample) and pid is not None and _is_sshwasm_alive(pid):
            continue
        orphans += [job for job in ctx.store.get_many(ids) if needs_refresh(job)]
    if not orphans:
        return False
    refresh(ctx, orphans)
    return True


def _is_sshwasm_alive(pid: int) -> bool:
    from ..liveness import is_sshwasm_process, pid_alive

    return pid_alive(pid) and is_sshwasm_process(pid) is not False


def _row_cells(row: Any, local: dict[str, str] | None = None) -> list[str]:
    """A light row's cells under JOB_HEADERS as the table shows them (escaped, stripped),
    as `job_row` makes them of a Job. `local` caches the local times of stored times (an
    array's tasks share theirs) and of names."""
    (job_id, name, task, state, host, cpus, memory_mb, submitted_at, run_s, started_at) = row[:10]
    exit_code = row[10]
    if local is None:
        local = {}
    when = local.get(submitted_at)
    if when is None:
        when = local[submitted_at] = local_time(submitted_at)
    shown = local.get("\0" + name) if name is not None else ""  # apart from the times
    if shown is None:
        shown = local["\0" + name] = printable(name)
    return [
        str(job_id),
        (f"{shown}[{task}]" if task is not None else shown).strip(),
        state,
        printable(host or "").strip(),
        str(cpus),
        str(memory_mb),
        when,
        runtime_of(run_s, state, started_at),
        "" if exit_code is None else str(exit_code),
    ]


def _folded_cells(ctx: Context, rows: Sequence[Any], state: Any) -> list[list[Any]]:
    """`folded_rows` from aggregate queries: one row per array (at its newest task's
    place), plain jobs as they are."""
    summaries = {summary[0]: summary for summary in ctx.store.array_summaries(state)}
    counts: dict[int, dict[JobState, int]] = {}
    for array_id, word, count in ctx.store.array_state_counts(state):
        counts.setdefault(array_id, {})[_STATES[word]] = count
    newest = {job.id: job for job in ctx.store.get_many([s[1] for s in summaries.values()])}
    # Newest first: an array where its newest task would be, plain jobs as they are.
    placed = [(row[0], row) for row in rows] + [(s[1], s) for s in summaries.values()]
    placed.sort(key=lambda pair: pair[0], reverse=True)
    cells: list[list[Any]] = []
    for _, entry in placed:
        if len(entry) == len(TABLE_COLUMNS):
            cells.append(_row_cells(entry))
            continue
        array_id, newest_id, tasks, host_count, one_host, top_code, total_s = entry
        first = newest[newest_id]
        states = counts.get(array_id, {})
        cells.append(
            [
                array_id,
                f"{first.name or ''}[{tasks} tasks]",
                ", ".join(f"{n} {word}" for word, n in sorted(states.items())),
                one_host if host_count == 1 else f"{host_count} hosts" if host_count else "",
                first.cpus,
                first.memory_mb,
                local_time(first.submitted_at),
                f"{total_s:.2f}s" if total_s else "",
                "" if top_code is None else top_code,
            ]
        )
    return cells


# Each stored state word as the JobState the table shows (a lookup, not an Enum call each).
_STATES = {state.value: state for state in JobState}

# Up to this many rows the table is laid out by tabulate, past it here (the same plain
# layout: tabulate took 30 s over 100,000 rows).
TABULATE_MOST_ROWS = 2000


def write_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """`show.table`'s plain table, laid out in linear time when it is long."""
    if len(rows) <= TABULATE_MOST_ROWS or _wide_chars():
        table(rows, headers=list(headers))
        return
    sys.stdout.write(plain_table(rows, headers))
    sys.stdout.write("\n")


def _wide_chars() -> bool:
    """Whether tabulate measures wide characters (it does when wcwidth is installed):
    then only tabulate lays tables out. Asked without importing tabulate (a long listing
    does not need it, and its imports cost more than laying out 10,000 rows)."""
    from importlib.util import find_spec

    return find_spec("wcwidth") is not None


def plain_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """What tabulate's "plain" format (no number parsing) gives for these rows: every
    cell escaped and stripped, left-aligned, columns as wide as their widest cell or
    their header plus 2, two spaces apart, trailing spaces cut."""
    cells = [
        [
            value
            if type(value) is str and value.isprintable() and value == value.strip()
            else ""
            if value is None
            else printable(value).strip()
            for value in row
        ]
        for row in rows
    ]
    widths = [
        max([len(header) + 2, *(len(row[index]) for row in cells)])
        for index, header in enumerate(headers)
    ]
    line = "  ".join(f"{{:<{width}}}" for width in widths)
    return "\n".join(line.format(*row).rstrip() for row in [list(headers), *cells])


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
        if value is not None and not (key == "verify" and not value):
            say(f"{key}: {value}")
    if job.array_id is not None and job.fuel is not None:
        from ..report import total_fuel_used

        # A sweep's cost in host-independent units: the fuel all its tasks used so far.
        tasks = ctx.store.array_tasks(job.array_id)
        say(f"array_fuel_used: {total_fuel_used(tasks)} ({len(tasks)} tasks)")
    twin = ctx.store.verify_twin(job.id) if job.verify else None
    if twin is not None:
        # --verify's second run, an internal row `jobs` does not list.
        twin = refresh(ctx, [twin])[0]
        say(f"verify_twin: job {twin.id} on {twin.host or '-'} ({twin.state})")
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
    # A --verify job's second run goes with it.
    twins = [store.verify_twin(job.id) for job in jobs if job.verify]
    jobs += [twin for twin in twins if twin is not None and twin.id not in ctx.args.job_ids]

    status = ExitStatus.OK
    if any(job.engine == "dask" for job in jobs):  # engine: dask (issue 12): in the pool
        from ..liveness import needs_refresh
        from .dask_run import cancel_detached

        unfollowed = [job for job in jobs if job.engine == "dask" and needs_refresh(job)]
        problems = cancel_detached(ctx, unfollowed) if unfollowed else {}
        for job_id, why in problems.items():
            status = ExitStatus.ERROR
            error(f"job {job_id}: {why}")
        jobs = [job for job in jobs if job.id not in problems]
    for job, problem in with_pool(lambda pool: cancel_jobs(store, jobs, pool)):
        if problem is None:
            say(f"job {job.id}: {job.state}")
        else:
            status = ExitStatus.ERROR
            error(f"job {job.id}: {problem}")
    return status
