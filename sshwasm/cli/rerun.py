"""`sshwasm rerun ID [--host NAME] [--compare]`: run a job again exactly, as a new job."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..store import Job, JobSpec, JobStore
from .context import Context
from .exits import ExitStatus, job_exit_status
from .show import print_json, report_end, say

if TYPE_CHECKING:
    from ..schedule import Request


def cmd_rerun(ctx: Context) -> int:
    """Submit job ID's exact module, argv, env, stdin and staged input again (placed normally,
    or on --host), follow it as `run` does, and with --compare say whether it agreed."""
    from ..schedule import check_feasible
    from ..verify import differences
    from .coordinate import coordinate_jobs, coordinator_handlers

    args = ctx.args
    store = ctx.store
    original = store.get(args.job_id)
    if args.compare and not original.is_final:
        raise UsageError(f"job {original.id} is still {original.state}: nothing to compare yet")
    spec, stdin = rerun_spec(store, original, args.host)
    cluster = ctx.cluster()
    check_feasible(cluster.hosts, spec_request(spec))
    job_ids = store.submit_tasks(spec)
    if stdin is not None:
        store.keep_stdin(job_ids, stdin)
    interactive = sys.stderr.isatty() and not args.json and not args.quiet
    show_output = not args.json and not args.compare
    handlers = coordinator_handlers(show_output=show_output, show_notices=interactive)
    if cluster.engine == "dask":  # engine: dask (issue 12): through the pool, as `run`
        from ..engines.dask_engine import DaskRun

        (job,) = DaskRun(store, cluster, handlers).run(job_ids)
    else:
        (job,) = coordinate_jobs(ctx, job_ids, handlers)
    if args.json:
        print_json(job.record())
    report_end(job)
    if not args.compare:
        return job_exit_status(job)
    if not job.is_final:
        return ExitStatus.ERROR  # report_end said why
    lines = differences(store.path, original, job)
    for line in lines or ["identical"]:
        say(line)
    return ExitStatus.ERROR if lines else ExitStatus.OK


def spec_request(spec: JobSpec) -> Request:
    """The placement request of a spec about to be submitted."""
    from ..schedule import Request

    return Request(spec.cpus, spec.memory_mb, spec.pinned_host, spec.labels)


def rerun_spec(store: JobStore, original: Job, host: str | None) -> tuple[JobSpec, bytes | None]:
    """The spec of a new job running `original` again exactly, and its stdin; a UsageError
    naming what is gone or changed when that is no longer possible."""
    from ..fingerprint import input_fingerprint, tar_fingerprint
    from ..staging import pack_input

    label = f"job {original.id}"
    module = Path(original.wasm_path or "")
    try:
        data = module.read_bytes()
    except OSError as exc:
        raise UsageError(
            f"{label}'s module (sha256 {original.wasm_sha256[:12]}) is no longer cached at "
            f"{module}: {exc.strerror or exc}"
        ) from exc
    if hashlib.sha256(data).hexdigest() != original.wasm_sha256:
        raise UsageError(f"{label}'s cached module at {module} changed since it ran")
    if original.dirs not in ("", "[]"):
        raise UsageError(
            f"{label} worked on directories (--dir) it may have changed: a rerun cannot be given "
            f"what it saw"
        )
    stdin: bytes | None = None
    if original.stdin_path:
        try:
            stdin = Path(original.stdin_path).read_bytes()
        except OSError as exc:
            raise UsageError(
                f"{label}'s stdin copy {original.stdin_path} is gone: {exc.strerror or exc}"
            ) from exc
    if original.input_path:
        recorded = input_fingerprint(store.path, original.id)
        if recorded is None:
            raise UsageError(f"{label} never staged its --input {original.input_path}")
        if not Path(original.input_path).exists():
            raise UsageError(f"{label}'s --input {original.input_path} is gone")
        if tar_fingerprint(pack_input(Path(original.input_path))) != recorded:
            raise UsageError(
                f"{label}'s --input {original.input_path} no longer holds what the job was "
                f"given; not rerunning it with something different"
            )
    spec = JobSpec(
        name=original.name,
        cpus=original.cpus,
        memory_mb=original.memory_mb,
        time_limit_s=original.time_limit_s,
        source=original.source,
        language=original.language,
        wasm_sha256=original.wasm_sha256,
        wasm_bytes=original.wasm_bytes,
        wasm_path=str(module),
        compile_s=0.0,
        argv=tuple(original.argv_list),
        # Exactly as the original saw it (an array task's SSHWASM_ARRAY_TASK_* included).
        env=tuple(original.env_pairs),
        pinned_host=host,
        labels=original.request.labels,
        input_path=original.input_path,
        # Into the same directory, under the same rules: nothing there is lost, and a file
        # that differs lands beside it as NAME.sshwasm-ID.
        output_dir=original.output_dir,
        max_output_mb=original.max_output_mb,
        fuel=original.fuel,
        rerun_of=original.id,
    )
    return spec, stdin
