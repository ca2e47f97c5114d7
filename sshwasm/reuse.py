"""`run --reuse`: a job whose reuse key (fingerprint.reuse_key: content only) matches a job
that already succeeded in this jobs file takes that job's result and output at once, and
nothing runs, nor is any host contacted.

A candidate is used only if its output can still be given whole: its stdout and stderr
files beside the jobs file and, for a job with an /output, every file of its recorded
/output tree, found with the same sha256 in the candidate's `--output DIR` (as it was
merged there: under its own name, or beside another file as NAME.sshwasm-ID). Otherwise
the next candidate is tried, and without one the job runs as usual.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .fingerprint import (
    bytes_sha256,
    file_sha256,
    output_manifest,
    reuse_key,
    save_output_manifest,
    tar_fingerprint,
)
from .staging import merge_output, pack_input
from .states import JobState
from .store import Job, JobStore, utc_now


@dataclass(frozen=True)
class Reused:
    """A job that took another's result: its id, the job it took it from, and warnings."""

    job_id: int
    source_id: int
    warnings: tuple[str, ...] = ()


class _InputFingerprints:
    """Fingerprints of --input paths, each packed once (an array shares one input)."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}

    def of(self, path: str) -> str:
        known = self._known.get(path)
        if known is None:
            known = self._known[path] = tar_fingerprint(pack_input(Path(path)))
        return known


def reuse_jobs(
    store: JobStore,
    job_ids: list[int],
    stdin: bytes | None,
    notice: Callable[[str], None],
) -> list[Reused]:
    """Give each of the just-submitted `job_ids` (still queued) the result of a succeeded
    job with its reuse key, where one can be given whole; returns those that took one."""
    stdin_sha = None if stdin is None else bytes_sha256(stdin)
    inputs = _InputFingerprints()
    reused: list[Reused] = []
    for job in store.get_many(job_ids):
        staged = {} if job.input_path is None else {"input": inputs.of(job.input_path)}
        key = reuse_key(job, stdin_sha, staged)
        for candidate in store.succeeded_with_reuse_key(key):
            if candidate.id == job.id:
                continue
            try:
                taken = _take_result(store, job, candidate, key)
            except OSError as exc:
                # The job then runs, and its own output goes where this could not.
                notice(f"cannot reuse the result of job {candidate.id}: {exc}")
                continue
            if taken is not None:
                reused.append(taken)
                break
            notice(
                f"job {candidate.id} had the same inputs, but its output is no longer all "
                f"there to reuse"
            )
    return reused


def _take_result(store: JobStore, job: Job, source: Job, key: str) -> Reused | None:
    """Record `job` as having `source`'s result, its output copied; None (and nothing
    changed) when `source`'s output cannot be given whole."""
    source_dir = paths.job_output_dir(store.path, source.id)
    streams = {name: source_dir / name for name in ("stdout", "stderr")}
    for path in streams.values():
        size = path.stat().st_size if path.is_file() else 0
        if size != _recorded_bytes(source, path):
            return None  # removed, or not the whole stream
    manifest: dict[str, str] | None = None
    if job.output_dir:
        manifest = output_manifest(store.path, source.id)
        if manifest is None or not source.output_dir:
            return None
    target_dir = paths.make_job_output_dir(store.path, job.id)
    warnings: list[str] = []
    output_fields: dict[str, object] = {}
    if manifest is not None and job.output_dir and source.output_dir:
        destination = Path(job.output_dir)
        with tempfile.TemporaryDirectory(dir=target_dir, prefix=".reuse-") as scratch:
            tree = Path(scratch)
            if not _rebuild_tree(manifest, Path(source.output_dir), source.id, tree):
                return None
            save_output_manifest(store.path, job.id, tree)
            destination.mkdir(parents=True, exist_ok=True)
            merged = merge_output(tree, destination, job.id, job.output_overwrite)
        output_fields = {"output_bytes": merged.size, "output_conflicts": len(merged.beside)}
        if merged.beside:
            warnings.append(
                f"job {job.id}: {len(merged.beside)} of its output files differ from what "
                f"was already in {destination}; the job's versions are beside them as "
                f"NAME.sshwasm-{job.id}"
            )
    for name, path in streams.items():
        if path.is_file():
            shutil.copyfile(path, target_dir / name)
            (target_dir / name).chmod(paths.PRIVATE_FILE_MODE)
    now = utc_now()
    finished = store.finish(
        job.id,
        JobState.SUCCEEDED,
        exit_code=source.exit_code,
        stdout=source.stdout,
        stderr=source.stderr,
        stdout_bytes=source.stdout_bytes,
        stderr_bytes=source.stderr_bytes,
        fuel_used=source.fuel_used,
        reused_from=source.id,
        reuse_key=key,
        started_at=now,
        finished_at=now,
        queue_s=0.0,
        **output_fields,
    )
    if not finished:
        return None
    return Reused(job.id, source.id, tuple(warnings))


def _recorded_bytes(job: Job, path: Path) -> int:
    return job.stdout_bytes if path.name == "stdout" else job.stderr_bytes


def _rebuild_tree(manifest: dict[str, str], source_dir: Path, source_id: int, tree: Path) -> bool:
    """Copy the files of a recorded /output tree from where they were merged into `tree`,
    each checked against its sha256; False when one is missing or changed."""
    for name, digest in manifest.items():
        target = tree / name
        if name.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            continue
        for place in (source_dir / name, source_dir / f"{name}.sshwasm-{source_id}"):
            try:
                if place.is_file() and not place.is_symlink() and file_sha256(place) == digest:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(place, target)
                    break
            except OSError:
                continue
        else:
            return False
    return True
