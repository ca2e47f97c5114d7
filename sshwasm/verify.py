"""Comparing two runs of the same job: exit code, stdout, stderr and the /output tree by
sha256. What `rerun --compare` prints and what `run --verify` judges its two runs by.

A deterministic guest gives the same on every host and run; one that reads the clock or
random numbers (WASI clock_time_get, random_get) does not, and is said to differ.

`run --verify` submits the job and its twin, a second row pinned to another host (the
store's VERIFY_TWIN_SQL: hidden from `jobs`), both placed and reserving capacity as any
job. When the second of the two ends (`settle`, from recorded_jobs.record_end), the job
stays as it ended if both agree, and is made `failed`, naming the differences, if not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from . import paths
from .cluster import Host
from .errors import UsageError
from .fingerprint import output_manifest, stream_sha256
from .schedule import Request, Usage, candidate_hosts, choose_host
from .states import JobState
from .store import Job, JobSpec, JobStore

# How a --verify job's error starts when its two runs disagreed (settle is idempotent).
DISAGREED = "--verify: the runs on"

_CHUNK = 1 << 20


def differences(db_path: Path, first: Job, second: Job) -> list[str]:
    """One line per way the two jobs' results differ; empty when they are identical."""
    lines: list[str] = []
    a, b = f"job {first.id}", f"job {second.id}"
    if first.state != second.state:
        lines.append(f"state: {first.state} ({a}) vs {second.state} ({b})")
    if first.exit_code != second.exit_code:
        lines.append(f"exit code: {first.exit_code} ({a}) vs {second.exit_code} ({b})")
    for stream in ("stdout", "stderr"):
        line = _stream_difference(db_path, first, second, stream)
        if line:
            lines.append(line)
    lines.extend(_output_differences(db_path, first, second))
    return lines


def _stream_difference(db_path: Path, first: Job, second: Job, stream: str) -> str | None:
    ours = stream_sha256(db_path, first.id, stream)
    theirs = stream_sha256(db_path, second.id, stream)
    if ours is None or theirs is None:
        missing = first if ours is None else second
        return f"{stream}: the saved {stream} of job {missing.id} cannot be read"
    if ours == theirs:
        return None
    left = paths.job_output_dir(db_path, first.id) / stream
    right = paths.job_output_dir(db_path, second.id) / stream
    sizes = f"{_size(left)} bytes (job {first.id}) vs {_size(right)} bytes (job {second.id})"
    return f"{stream} differs: {sizes}, first at byte {_first_difference(left, right)}"


def _output_differences(db_path: Path, first: Job, second: Job) -> list[str]:
    ours = output_manifest(db_path, first.id)
    theirs = output_manifest(db_path, second.id)
    if ours is None and theirs is None:
        return []
    if ours is None or theirs is None:
        missing = first if ours is None else second
        return [f"/output: job {missing.id} has no recorded /output to compare"]
    lines: list[str] = []
    for name in sorted(set(ours) | set(theirs)):
        if name not in theirs:
            lines.append(f"/output/{name}: only in job {first.id}")
        elif name not in ours:
            lines.append(f"/output/{name}: only in job {second.id}")
        elif ours[name] != theirs[name]:
            lines.append(
                f"/output/{name} differs (sha256 {ours[name][:12]} vs {theirs[name][:12]})"
            )
    return lines


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _first_difference(left: Path, right: Path) -> int:
    """The offset of the first byte where two files differ (one may be a prefix)."""
    offset = 0
    try:
        with open(left, "rb") as ours, open(right, "rb") as theirs:
            while True:
                a, b = ours.read(_CHUNK), theirs.read(_CHUNK)
                if a != b:
                    same = next(
                        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                        min(len(a), len(b)),
                    )
                    return offset + same
                if not a:
                    return offset
                offset += len(a)
    except OSError:
        return 0


def choose_pair(
    hosts: Sequence[Host], usage: dict[str, Usage], request: Request
) -> tuple[Host, Host]:
    """The two hosts a --verify job runs on: the best fits now (or, when nothing has room
    now, any that could take it); a UsageError when fewer than two ever could."""
    possible = candidate_hosts(hosts, request)
    if len(possible) < 2:
        could = ", ".join(host.name for host in possible) or "none"
        raise UsageError(
            f"--verify runs the job on two different hosts; only one could take it: {could}"
        )
    first = choose_host(possible, usage, request) or possible[0]
    second = choose_host(possible, usage, request, excluded=[first.name]) or next(
        host for host in possible if host.name != first.name
    )
    return first, second


def submit_verified(store: JobStore, spec: JobSpec, pair: tuple[Host, Host]) -> tuple[int, int]:
    """Submit a --verify job on pair[0] and its twin on pair[1]; returns their ids. The
    twin's /output (if the job has one) goes to a private directory, never to the user's."""
    main_id = store.submit(dataclasses.replace(spec, verify=True, pinned_host=pair[0].name))
    twin_spec = dataclasses.replace(
        spec, verify=True, pinned_host=pair[1].name, rerun_of=main_id, output_dir=None
    )
    twin_id = store.submit(twin_spec)
    if spec.output_dir is not None:
        private = paths.make_job_output_dir(store.path, twin_id) / "output-tree"
        store.update(twin_id, output_dir=str(private))
    return main_id, twin_id


def settle(store: JobStore, job_id: int) -> None:
    """Once both runs of a --verify job ended: if they disagree, the job is `failed` with an
    error naming the hosts and each difference. Does nothing for other jobs, or before."""
    job = store.get(job_id)
    if not job.verify:
        return
    main = store.get(job.rerun_of) if job.is_verify_twin and job.rerun_of else job
    twin = store.verify_twin(main.id)
    if twin is None or not (main.is_final and twin.is_final):
        return
    if main.error and main.error.startswith(DISAGREED):
        return  # judged already
    lines = differences(store.path, main, twin)
    if not lines:
        return
    error = (
        f"{DISAGREED} {main.host} (job {main.id}) and {twin.host} (job {twin.id}) "
        f"disagree: {'; '.join(lines)}"
    )
    store.update(main.id, state=JobState.FAILED.value, error=error)
