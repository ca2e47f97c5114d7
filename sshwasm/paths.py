"""Where sshwasm keeps its files locally; every location can be moved by an env variable."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "sshwasm"


def _from_env(variable: str) -> Path | None:
    value = os.environ.get(variable)
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """Jobs file and fetched job output: `$SSHWASM_DATA_DIR` or the platform data dir."""
    return _from_env("SSHWASM_DATA_DIR") or Path(platformdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    """Compiled modules and toolchain facts: `$SSHWASM_CACHE_DIR` or the platform cache dir."""
    return _from_env("SSHWASM_CACHE_DIR") or Path(platformdirs.user_cache_dir(APP_NAME))


def config_dir() -> Path:
    """Where the default cluster file lives: `$SSHWASM_CONFIG_DIR` or the platform config dir."""
    return _from_env("SSHWASM_CONFIG_DIR") or Path(platformdirs.user_config_dir(APP_NAME))


def jobs_db(explicit: str | None = None) -> Path:
    """The jobs file: `--db`, else `$SSHWASM_DB`, else `<data dir>/jobs.sqlite`."""
    # Absolute: paths derived from it (output files, stdin copies) are stored in the jobs
    # file and must name the same files for a process started from another directory.
    if explicit:
        return Path(explicit).expanduser().absolute()
    return (_from_env("SSHWASM_DB") or data_dir() / "jobs.sqlite").absolute()


def job_outputs_root(db_path: Path) -> Path:
    """The directory holding every job's output directory for this jobs file."""
    return db_path.parent / f"{db_path.stem}-output"


def job_output_dir(db_path: Path, job_id: int) -> Path:
    """Full stdout/stderr of a job, kept beside the jobs file it belongs to."""
    return db_path.parent / f"{db_path.stem}-output" / str(job_id)


def cluster_file(explicit: str | None = None) -> Path | None:
    """The cluster file to use, or None for the embedded default (one local host).

    Order: `--cluster`, `$SSHWASM_CLUSTER`, `./cluster.yaml`, `<config dir>/cluster.yaml`.
    An explicit path is returned even when missing, so the caller can report it.
    """
    if explicit:
        return Path(explicit).expanduser()
    from_env = _from_env("SSHWASM_CLUSTER")
    if from_env:
        return from_env
    for candidate in (Path("cluster.yaml"), config_dir() / "cluster.yaml"):
        if candidate.is_file():
            return candidate
    return None
