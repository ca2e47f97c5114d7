"""Content fingerprints of what a job reads and writes: what `--reuse` keys on, and what
`rerun --compare` and `--verify` compare. Content only, never a path, a time or an owner:
two jobs that saw the same bytes get the same fingerprints wherever their files lay.

Beside a job's stdout and stderr (paths.job_output_dir) two small files keep what its
record cannot: INPUT_FILE, the fingerprint of the `--input` tar it was given (written when
it is staged), and OUTPUT_FILE, the sha256 of every file of its /output tree (written when
its /output is fetched, before it is merged into `--output DIR`, where other files may be).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import paths

if TYPE_CHECKING:
    from .store import Job

INPUT_FILE = "input.sha256"
OUTPUT_FILE = "output.json"
_CHUNK = 1 << 20
# Bumped whenever what a reuse key covers changes, so an older key never matches a newer one.
_KEY_VERSION = 1


def bytes_sha256(data: bytes) -> str:
    """The sha256 of `data` (hex)."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex); raises OSError."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _kept_file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """file_sha256 of one of sshwasm's own kept files (a job's stdin copy), remembered by
    its size and mtime: an array's tasks share one copy, hashed once, not once per task."""
    return file_sha256(Path(path))


def tar_fingerprint(tar: bytes) -> str:
    """The sha256 over an input tar's members as the job sees them: each member's name,
    kind, mode and bytes, in order; never its mtime, owner or where it came from."""
    digest = hashlib.sha256()
    if not tar:
        return digest.hexdigest()
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for member in archive:
            kind = "d" if member.isdir() else "f"
            digest.update(f"{kind} {member.mode:o} {member.size} {member.name}\0".encode())
            if member.isfile():
                extracted = archive.extractfile(member)
                if extracted is not None:
                    while chunk := extracted.read(_CHUNK):
                        digest.update(chunk)
    return digest.hexdigest()


def tree_manifest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every regular file under `root` (links not followed);
    a directory is listed as its path with a trailing slash and an empty hash."""
    manifest: dict[str, str] = {}
    for directory, subdirectories, files in os.walk(root):
        here = Path(directory)
        for name in subdirectories:
            if not (here / name).is_symlink():
                manifest[str((here / name).relative_to(root)) + "/"] = ""
        for name in files:
            path = here / name
            if path.is_file() and not path.is_symlink():
                manifest[str(path.relative_to(root))] = file_sha256(path)
    return dict(sorted(manifest.items()))


def save_input_fingerprint(db_path: Path, job_id: int, tar: bytes) -> None:
    """Record the fingerprint of the input tar job `job_id` was given. Never fails the job:
    without it, `rerun` says the input was never recorded and --reuse skips the job."""
    fingerprint = tar_fingerprint(tar)
    with contextlib.suppress(OSError):
        directory = paths.make_job_output_dir(db_path, job_id)
        with paths.open_private(directory / INPUT_FILE, "wb") as handle:
            handle.write(fingerprint.encode())


def input_fingerprint(db_path: Path, job_id: int) -> str | None:
    """The fingerprint of the input tar job `job_id` was given (None: none recorded)."""
    try:
        text = (paths.job_output_dir(db_path, job_id) / INPUT_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def save_output_manifest(db_path: Path, job_id: int, tree: Path) -> None:
    """Record the /output tree of job `job_id` as fetched (before it is merged). Never
    fails the fetch: without it, a comparison says there is no recorded /output."""
    with contextlib.suppress(OSError):
        manifest = tree_manifest(tree)
        directory = paths.make_job_output_dir(db_path, job_id)
        with paths.open_private(directory / OUTPUT_FILE, "wb") as handle:
            handle.write(json.dumps(manifest).encode())


def output_manifest(db_path: Path, job_id: int) -> dict[str, str] | None:
    """The /output tree job `job_id` wrote, as recorded (None: never fetched)."""
    try:
        raw = (paths.job_output_dir(db_path, job_id) / OUTPUT_FILE).read_text()
        value = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    return {str(name): str(digest) for name, digest in value.items()}


def stream_sha256(db_path: Path, job_id: int, stream: str) -> str | None:
    """The sha256 of a job's whole stdout or stderr as kept here (None: no file)."""
    path = paths.job_output_dir(db_path, job_id) / stream
    try:
        return file_sha256(path)
    except FileNotFoundError:
        return bytes_sha256(b"")
    except OSError:
        return None


def reusable_dirs(dirs: str) -> bool:
    """Whether a job with these directories can give or take a result: only read-only
    --dir copies, whose content the key covers. A job's changes to a read-write --dir are
    not kept to be given again, and a --host-dir's content is not seen from here."""
    from .directories import job_mounts

    return all(mount.read_only and mount.local is not None for mount in job_mounts(dirs))


def _dirs_content(dirs: str) -> str | None:
    """The content hash of a job's --dir copies (directories.dirs_digest), None for none."""
    if dirs in ("", "[]"):
        return None
    from .directories import dirs_digest

    return dirs_digest(dirs)


def reuse_key(job: Job, stdin_sha256: str | None, staged: Mapping[str, str]) -> str:
    """The `--reuse` key of a job: a sha256 over what decides its result, content only.

    It covers the module's sha256, argv, env, the stdin's sha256 (`stdin_sha256`, None for
    no stdin), the content hashes of what is staged in (`staged`: "input" is the input
    tar's fingerprint), the content of its read-only --dir copies (by guest path; see
    reusable_dirs), whether the job gets an /output, and the limits
    that can change a result: memory, time limit, fuel budget and output cap, and whether
    the result was verified on two hosts (--verify). Not cpus: a
    wasm32-wasip1 guest runs on one thread whatever it reserved. Not the job's name, host,
    labels, times or the paths its files came from.
    """
    content = {
        "version": _KEY_VERSION,
        "wasm_sha256": job.wasm_sha256,
        "argv": job.argv_list,
        "env": [list(pair) for pair in job.env_pairs],
        "stdin": stdin_sha256,
        "staged": dict(sorted(staged.items())),
        "dirs": _dirs_content(job.dirs),
        "output": bool(job.output_dir),
        "memory_mb": job.memory_mb,
        "time_limit_s": job.time_limit_s,
        "fuel": job.fuel,
        "max_output_mb": job.max_output_mb,
        # A --verify job takes only a verified result.
        "verify": job.verify,
    }
    return bytes_sha256(json.dumps(content, sort_keys=True).encode())


def recorded_reuse_key(db_path: Path, job: Job) -> str | None:
    """The reuse key of a job from what this machine kept of its inputs: its stdin copy and
    its input fingerprint. None when one of them can no longer be read."""
    stdin_sha: str | None = None
    if job.stdin_path:
        try:
            facts = os.stat(job.stdin_path)
            stdin_sha = _kept_file_sha256(job.stdin_path, facts.st_size, facts.st_mtime_ns)
        except OSError:
            return None
    if not reusable_dirs(job.dirs):
        return None
    staged: dict[str, str] = {}
    if job.input_path:
        fingerprint = input_fingerprint(db_path, job.id)
        if fingerprint is None:
            return None
        staged["input"] = fingerprint
    return reuse_key(job, stdin_sha, staged)
