"""Comparing two runs of the same job: exit code, stdout, stderr and the /output tree by
sha256. What `rerun --compare` prints and what `run --verify` judges its two runs by.

A deterministic guest gives the same on every host and run; one that reads the clock or
random numbers (WASI clock_time_get, random_get) does not, and is said to differ.
"""

from __future__ import annotations

from pathlib import Path

from . import paths
from .fingerprint import output_manifest, stream_sha256
from .store import Job

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
    except FileNotFoundError:
        return 0
