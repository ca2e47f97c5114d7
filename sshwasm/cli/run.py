"""`sshwasm run`: compile, submit, then follow in the foreground or detach."""

from __future__ import annotations

import dataclasses
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .. import paths
from ..errors import SshwasmError, UsageError
from ..states import JobState
from .arrays import array_shape, print_submitted, read_file_or_stdin
from .context import Context
from .exits import ExitStatus, job_exit_status
from .show import (
    copy_output,
    notice,
    print_json,
    report_end,
    say,
    table,
    warn,
    write_err,
    write_out,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ..cluster import Cluster, Host
    from ..schedule import Request
    from ..store import Job, JobSpec
    from .progress import Progress


def cmd_run(ctx: Context) -> int:
    """`sshwasm run`: submit, then follow in the foreground or detach."""
    from ..schedule import Request, check_feasible
    from ..staging import check_input

    # Looked up when called, so benchmarks/trace_cli.py can time it.
    from .coordinate import coordinate_jobs, coordinator_handlers, spawn_coordinator

    args = ctx.args
    shape = array_shape(args)
    cluster = ctx.cluster()
    request = Request(args.cpus, args.memory_mb, args.host, tuple(args.label))
    if args.dry_run:
        return _dry_run(ctx, cluster, request)
    check_feasible(cluster.hosts, request)
    stdin_data: bytes | None = None
    if args.stdin is not None:
        stdin_data = read_file_or_stdin(Path(args.stdin), "--stdin")
    if args.input is not None:
        check_input(Path(args.input))
    if args.output is not None and Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output}: not a directory")
    if cluster.engine == "dask":
        _refuse_unheld_dependencies_on_dask(ctx)
    _check_attempt_flags(ctx)
    dirs = _dirs_json(ctx)
    if cluster.engine == "dask":  # what one task carries to the pool (issue 12)
        from .dask_run import check_staging

        check_staging(ctx, stdin_data, dirs)
    _check_dirs_with_reruns(ctx, dirs)
    pair = _verify_pair(ctx, cluster, request) if args.verify else None
    interactive = sys.stderr.isatty() and not args.json and not args.quiet
    spec = dataclasses.replace(_build_spec(ctx, interactive), **shape.spec_fields(), dirs=dirs)
    if pair is not None:
        return _run_verified(ctx, spec, pair, stdin_data, interactive)
    job_ids = ctx.store.submit_tasks(spec)
    if stdin_data is not None:
        ctx.store.keep_stdin(job_ids, stdin_data)
    reused = _reuse(ctx, job_ids, stdin_data, interactive) if args.reuse else []
    taken = set(reused)
    to_run = [job_id for job_id in job_ids if job_id not in taken]
    if cluster.engine == "dask":  # engine: dask (issue 12)
        from .dask_run import run_on_dask

        return run_on_dask(ctx, to_run, shape.size is not None, interactive, reused)
    if args.detach:
        if to_run:
            spawn_coordinator(ctx, to_run)
        print_submitted(ctx, job_ids, shape.size is not None)
        return ExitStatus.OK
    if shape.size is not None:
        return run_array(ctx, to_run, interactive, reused)
    if reused:
        # Nothing ran: the output is the reused job's, as a run would have shown it.
        return show_single(ctx, ctx.store.get(reused[0]))
    handlers = coordinator_handlers(show_output=not args.json, show_notices=interactive)
    (job,) = coordinate_jobs(ctx, job_ids, handlers)
    if args.json:
        print_json(job.record())
    report_end(job)
    return job_exit_status(job)


def _build_spec(ctx: Context, interactive: bool) -> JobSpec:
    """Build the source (or take it from the cache) and describe the job(s) to submit."""
    from ..build import build
    from ..submission import module_job_spec

    args = ctx.args
    source = Path(args.source)
    # Say so only when compiling takes a while (a cache hit takes milliseconds).
    slow_compile = threading.Timer(0.5, notice, [f"compiling {source} ..."])
    if interactive:
        slow_compile.start()
    try:
        artifact = build(source)
    finally:
        slow_compile.cancel()
    if interactive and not artifact.cached:
        notice(f"compiled {source} in {artifact.compile_s:.1f}s ({artifact.size} bytes)")
    return module_job_spec(
        artifact,
        source,
        args.args,
        memory_mb=args.memory_mb,
        memory_setting=f"--memory-mb {args.memory_mb}",
        name=args.job_name,
        cpus=args.cpus,
        time_limit_s=args.time_limit,
        env=tuple(args.env),
        pinned_host=args.host,
        array_size=args.array,
        labels=tuple(args.label),
        input_path=str(Path(args.input).resolve()) if args.input is not None else None,
        output_dir=str(Path(args.output).resolve()) if args.output is not None else None,
        max_output_mb=args.max_output_mb,
        output_overwrite=args.overwrite,
        retries=args.retries,
        retry_failed=args.retry_failed,
        after=tuple(args.after or args.after_any or ()),
        after_any=args.after_any is not None,
        fuel=args.fuel,
        verify=args.verify,
    )


def _dirs_json(ctx: Context) -> str:
    """--dir and --host-dir, checked, as the record keeps them (directories.mounts_json)."""
    from ..directories import check_mounts, mounts_json, parse_dir, parse_host_dir

    args = ctx.args
    mounts = [*map(parse_dir, args.dirs), *map(parse_host_dir, args.host_dirs)]
    check_mounts(
        mounts,
        ctx.store.path,
        uses_input=args.input is not None or args.input_each is not None,
        uses_output=args.output is not None,
    )
    return mounts_json(mounts)


def _verify_pair(ctx: Context, cluster: Cluster, request: Request) -> tuple[Host, Host]:
    """--verify's two hosts, chosen before anything is built or submitted."""
    from ..verify import choose_pair

    hosts: Sequence[Host] = cluster.hosts
    if cluster.engine == "dask":  # two hosts whose workers are in the pool (issue 12)
        from .dask_run import pool_hosts

        hosts = pool_hosts(ctx)
    return choose_pair(hosts, ctx.store.usage(), request)


def _run_verified(
    ctx: Context,
    spec: JobSpec,
    pair: tuple[Host, Host],
    stdin_data: bytes | None,
    interactive: bool,
) -> int:
    """`run --verify`: the job and its twin on two hosts at once, judged when both ended;
    the job's output is shown once it is known (the twin's is not shown)."""
    from ..verify import settle, submit_verified
    from .coordinate import coordinate_jobs, coordinator_handlers, spawn_coordinator

    args = ctx.args
    store = ctx.store
    main_id, twin_id = submit_verified(store, spec, pair)
    if stdin_data is not None:
        store.keep_stdin([main_id, twin_id], stdin_data)
    if args.reuse and _reuse(ctx, [main_id], stdin_data, interactive):
        # A verified result: the twin has nothing left to check.
        store.cancel_unstarted(twin_id)
        return show_single(ctx, store.get(main_id))
    on_dask = ctx.cluster().engine == "dask"
    if args.detach:
        if on_dask:  # the scheduler holds both tasks (issue 12)
            from .dask_run import detach_on_dask

            detach_on_dask(ctx, [main_id, twin_id])
        else:
            spawn_coordinator(ctx, [main_id, twin_id])
        print(main_id)
        return ExitStatus.OK
    if interactive:
        notice(f"job {main_id} runs on {pair[0].name} and {pair[1].name} (--verify)")
    handlers = coordinator_handlers(show_output=False, show_notices=interactive)
    # Side by side: each run's failure is its own, and the judgment says what differs.
    if on_dask:  # both through the pool, each pinned to its host (issue 12)
        from .dask_run import follow_on_dask

        follow_on_dask(ctx, [main_id, twin_id], handlers)
    else:
        coordinate_jobs(ctx, [main_id, twin_id], handlers, on_done=_ignore_job)
    settle(store, main_id)
    job = store.get(main_id)
    status = show_single(ctx, job)
    report_end(job)
    return status


def _ignore_job(_: Job) -> None:
    return None


def show_single(ctx: Context, job: Job) -> int:
    """Print a job that ended without streaming: its record with --json, else its output."""
    if ctx.args.json:
        print_json(job.record())
    else:
        directory = paths.job_output_dir(ctx.store.path, job.id)
        copy_output(directory / "stdout", write_out, None)
        copy_output(directory / "stderr", write_err, None)
    return job_exit_status(job)


def _reuse(ctx: Context, job_ids: list[int], stdin: bytes | None, interactive: bool) -> list[int]:
    """--reuse: the ids of the just-submitted jobs that took a succeeded job's result."""
    from ..reuse import reuse_jobs

    def say_notice(text: str) -> None:
        if interactive:
            notice(text)

    reused = reuse_jobs(ctx.store, job_ids, stdin, say_notice)
    for taken in reused:
        say_notice(f"job {taken.job_id} reused the result of job {taken.source_id}: nothing ran")
        for warning in taken.warnings:
            warn(warning)
    return [taken.job_id for taken in reused]


def _check_dirs_with_reruns(ctx: Context, dirs: str) -> None:
    """--reuse takes and --verify compares results: neither can hold a directory whose
    changes come back (a reused job would not make them, two runs would make them twice),
    and --reuse cannot vouch for a --host-dir's content. Read-only --dir copies are fine."""
    from ..directories import job_mounts
    from ..fingerprint import reusable_dirs

    if ctx.args.reuse and not reusable_dirs(dirs):
        raise UsageError("--reuse works with read-only --dir copies only (LOCAL::GUEST:ro)")
    if ctx.args.verify and any(not mount.read_only for mount in job_mounts(dirs)):
        raise UsageError("--verify runs the job twice: its directories must be read-only (:ro)")


def _refuse_unheld_dependencies_on_dask(ctx: Context) -> None:
    """On `engine: dask` the scheduler holds --after/--after-any (engines/dask_dependencies)
    and an array's limits (engines/dask_limits), but only behind the pool's own tasks: a
    dependency on an unfinished job of the SSH engine is refused in one line."""
    from ..engines.dask_dependencies import refuse_unheld

    args = ctx.args
    refuse_unheld(ctx.store, args.after or args.after_any or [])


def _check_attempt_flags(ctx: Context) -> None:
    """--retries, --retry-failed, --after and --after-any make sense together; the jobs
    named exist (checked before anything is submitted)."""
    from ..dependencies import check_dependencies

    args = ctx.args
    if args.retry_failed and not args.retries:
        raise UsageError("--retry-failed needs --retries N (how many more attempts)")
    if args.after is not None and args.after_any is not None:
        raise UsageError("--after and --after-any cannot be combined; give one list")
    if args.verify and (args.array is not None or args.host is not None):
        raise UsageError("--verify picks two hosts for one job: not with --array or --host")
    if args.reuse and (args.after is not None or args.after_any is not None):
        # The inputs may be what the dependencies write: only known once they ended.
        raise UsageError("--reuse cannot be combined with --after or --after-any")
    check_dependencies(ctx.store, args.after or args.after_any or [])


def _dry_run(ctx: Context, cluster: Cluster, request: Request) -> int:
    """`run --dry-run`: the placement decision, host by host, without running anything."""
    import asyncio

    from ..build import detect_language
    from ..hosts import check_hosts
    from ..schedule import check_feasible, explain

    source = Path(ctx.args.source)
    detect_language(source)
    if not source.exists():
        raise UsageError(f"no such file: {source}")
    reports = asyncio.run(check_hosts(cluster.hosts))
    unreachable = {
        host.name: report["error"] or "unreachable"
        for host, report in zip(cluster.hosts, reports, strict=True)
        if not report["reachable"]
    }
    chosen, reasons = explain(cluster.hosts, ctx.store.usage(), request, unreachable)
    table(sorted(reasons.items()), headers=["HOST", "VERDICT"])
    if chosen is not None:
        say(f"would run on {chosen.name}")
        return ExitStatus.OK
    try:
        check_feasible([h for h in cluster.hosts if h.name not in unreachable], request)
    except SshwasmError as exc:
        say(f"would not run: {exc}")
        return ExitStatus.ERROR
    print("would wait in the queue until a host has room")
    return ExitStatus.OK


def run_array(
    ctx: Context, job_ids: list[int], interactive: bool, reused: Sequence[int] = ()
) -> int:
    """Run an array's tasks side by side, printing each task's output whole as it ends;
    `reused` tasks (--reuse) ended already: their output is printed first."""
    from .coordinate import coordinate_jobs, coordinator_handlers

    args = ctx.args

    def show(job: Job) -> None:
        if not args.json:
            directory = paths.job_output_dir(ctx.store.path, job.id)
            prefix = f"{job.array_task}\t".encode() if args.tag else None
            for stream, write in (("stdout", write_out), ("stderr", write_err)):
                copy_output(directory / stream, write, prefix)
        report_end(job)

    done = ctx.store.get_many(reused)
    for job in done:
        show(job)
    handlers = coordinator_handlers(show_output=False, show_notices=interactive)
    progress = _progress(ctx, [*reused, *job_ids], interactive) if job_ids else None
    # The lowest task that did not succeed (its exit status is run's), kept as they end.
    failed: list[Job] = []

    def show_and_note(job: Job) -> None:
        show(job)
        if job.state != JobState.SUCCEEDED and (not failed or job.id < failed[0].id):
            failed[:] = [job]

    on_done: Callable[[Job], None] = show_and_note
    if progress is not None:
        on_done = progress.around_end(show_and_note)
        handlers.notice = progress.around(handlers.notice)
        handlers.warning = progress.around(handlers.warning)
    try:
        jobs = done + (
            coordinate_jobs(
                ctx,
                job_ids,
                handlers,
                on_done=on_done,
                on_tick=progress.tick if progress is not None else None,
                # Only --json needs every record at the end; else none is held (100,000 tasks).
                keep=bool(args.json),
            )
            if job_ids
            else []
        )
    finally:
        if progress is not None:
            progress.clear()
    jobs.sort(key=lambda job: job.id)
    if args.json:
        print_json([job.record() for job in jobs])
        failed[:] = [job for job in jobs if job.state != JobState.SUCCEEDED][:1]
    if not failed:
        return ExitStatus.OK
    return job_exit_status(failed[0]) or ExitStatus.ERROR


def _progress(ctx: Context, job_ids: list[int], interactive: bool) -> Progress | None:
    """The array's progress line, when stderr is a terminal (not with --quiet or --json)."""
    if not interactive:
        return None
    from .progress import Progress

    return Progress(ctx.store, ctx.store.get(job_ids[0]).array_id or job_ids[0], len(job_ids))
