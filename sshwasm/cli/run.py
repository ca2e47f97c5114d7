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
from .arrays import array_shape
from .context import Context
from .exits import ExitStatus, job_exit_status
from .show import (
    copy_output,
    notice,
    print_json,
    report_end,
    say,
    table,
    write_err,
    write_out,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..cluster import Cluster
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
        try:
            stdin_data = Path(args.stdin).read_bytes()
        except OSError as exc:
            raise UsageError(f"--stdin {args.stdin}: {exc.strerror or exc}") from exc
    if args.input is not None:
        check_input(Path(args.input))
    if args.output is not None and Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output}: not a directory")
    _check_attempt_flags(ctx)
    interactive = sys.stderr.isatty() and not args.json and not args.quiet
    spec = dataclasses.replace(_build_spec(ctx, interactive), **shape.spec_fields())
    job_ids = ctx.store.submit_tasks(spec)
    if stdin_data is not None:
        ctx.store.keep_stdin(job_ids, stdin_data)
    if cluster.engine == "dask":  # engine: dask (issue 12)
        from .dask_run import run_on_dask

        return run_on_dask(ctx, job_ids, shape.size is not None, interactive)
    if args.detach:
        spawn_coordinator(ctx, job_ids)
        print("\n".join(str(job_id) for job_id in job_ids))
        return ExitStatus.OK
    if shape.size is not None:
        return run_array(ctx, job_ids, interactive)
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
    )


def _check_attempt_flags(ctx: Context) -> None:
    """--retries, --retry-failed, --after and --after-any make sense together; the jobs
    named exist (checked before anything is submitted)."""
    from ..dependencies import check_dependencies

    args = ctx.args
    if args.retry_failed and not args.retries:
        raise UsageError("--retry-failed needs --retries N (how many more attempts)")
    if args.after is not None and args.after_any is not None:
        raise UsageError("--after and --after-any cannot be combined; give one list")
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


def run_array(ctx: Context, job_ids: list[int], interactive: bool) -> int:
    """Run an array's tasks side by side, printing each task's output whole as it ends."""
    from .coordinate import coordinate_jobs, coordinator_handlers

    args = ctx.args

    def show(job: Job) -> None:
        if not args.json:
            directory = paths.job_output_dir(ctx.store.path, job.id)
            prefix = f"{job.array_task}\t".encode() if args.tag else None
            for stream, write in (("stdout", write_out), ("stderr", write_err)):
                copy_output(directory / stream, write, prefix)
        report_end(job)

    handlers = coordinator_handlers(show_output=False, show_notices=interactive)
    progress = _progress(ctx, job_ids, interactive)
    on_done: Callable[[Job], None] = show
    if progress is not None:
        on_done = progress.around_end(show)
        handlers.notice = progress.around(handlers.notice)
        handlers.warning = progress.around(handlers.warning)
    try:
        jobs = coordinate_jobs(
            ctx,
            job_ids,
            handlers,
            on_done=on_done,
            on_tick=progress.tick if progress is not None else None,
        )
    finally:
        if progress is not None:
            progress.clear()
    if args.json:
        print_json([job.record() for job in jobs])
    failed = [job for job in jobs if job.state != JobState.SUCCEEDED]
    if not failed:
        return ExitStatus.OK
    return job_exit_status(failed[0]) or ExitStatus.ERROR


def _progress(ctx: Context, job_ids: list[int], interactive: bool) -> Progress | None:
    """The array's progress line, when stderr is a terminal (not with --quiet or --json)."""
    if not interactive:
        return None
    from .progress import Progress

    return Progress(ctx.store, ctx.store.get(job_ids[0]).array_id or job_ids[0], len(job_ids))
