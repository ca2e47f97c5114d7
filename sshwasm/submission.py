"""A job's description from its built module: what `run` and the Python API both submit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .store import JobSpec

if TYPE_CHECKING:
    from .build import Artifact


def program_name(source: Path) -> str:
    """argv[0] of the job: the source's name without its extension (or the project's)."""
    return source.resolve().stem or "main"


def module_job_spec(
    artifact: Artifact,
    source: Path,
    args: tuple[str, ...] | list[str],
    *,
    memory_mb: int,
    memory_setting: str,
    **fields: Any,
) -> JobSpec:
    """The JobSpec of `artifact` (built from `source`) run with `args`; `fields` are the rest.

    A module whose memory at start exceeds `memory_mb` could never run: a UsageError that
    names the setting as the caller's user knows it (`--memory-mb 16`, `memory_mb=16`).
    """
    needed_mb = -(-artifact.info.initial_memory_bytes // (1 << 20))
    if needed_mb > memory_mb:
        raise UsageError(
            f"{source} needs at least {needed_mb} MB of memory at start; "
            f"{memory_setting} is too small"
        )
    return JobSpec(
        memory_mb=memory_mb,
        source=str(source.resolve()),
        language=artifact.language,
        wasm_sha256=artifact.sha256,
        wasm_bytes=artifact.size,
        wasm_path=str(artifact.path),
        compile_s=round(artifact.compile_s, 6),
        argv=(program_name(source), *args),
        **fields,
    )
