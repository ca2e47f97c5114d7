"""Where sshwasm keeps its files locally; every location can be moved by an env variable."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import platformdirs

APP_NAME = "sshwasm"

# What sshwasm keeps locally (the jobs file holds --env values; outputs, stdin copies and
# logs are the user's data) is private to the user, whatever the umask says.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


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


def runtime_dir() -> Path:
    """The connection process's socket and lock: `$SSHWASM_RUNTIME_DIR`, else
    `$XDG_RUNTIME_DIR/sshwasm`, else `/run/user/<uid>/sshwasm`, else `<cache dir>/run`.

    A runtime dir is private to the user and emptied at logout; the cache dir is the last
    resort for systems without one (the checks in sshwasm.mux hold wherever it is).
    """
    explicit = _from_env("SSHWASM_RUNTIME_DIR")
    if explicit is not None:
        return explicit
    xdg = _from_env("XDG_RUNTIME_DIR")
    if xdg is not None and xdg.is_absolute():
        return xdg / APP_NAME
    per_user = Path("/run/user") / str(os.geteuid())
    if per_user.is_dir():
        return per_user / APP_NAME
    return cache_dir() / "run"


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
    return job_outputs_root(db_path) / str(job_id)


def make_job_output_dir(db_path: Path, job_id: int) -> Path:
    """Create a job's output directory (and the outputs root) private to the user."""
    make_private_dir(job_outputs_root(db_path))
    directory = job_output_dir(db_path, job_id)
    make_private_dir(directory)
    return directory


def make_private_dir(directory: Path) -> None:
    """Create `directory` (and missing parents) as 0700, and tighten it if it exists."""
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    tighten(directory, PRIVATE_DIR_MODE)


def tighten(path: Path, mode: int) -> None:
    """Take group and other permissions away from a file or directory of ours, if it is one.

    Files made by older versions (0644) are fixed here; a path owned by someone else, or
    a symlink, is left alone (chmod would follow it to a file that is not ours).
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
        return
    if stat.S_IMODE(info.st_mode) & ~mode & 0o777:
        path.chmod(stat.S_IMODE(info.st_mode) & mode)


def open_private(path: Path, mode: str = "ab") -> BinaryIO:
    """Open a file of ours for binary writing, created 0600 (an existing one is tightened)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    flags |= os.O_APPEND if mode == "ab" else os.O_TRUNC
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        return cast(BinaryIO, os.fdopen(fd, mode))
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class IgnoredClusterFile:
    """A cluster file found implicitly but not trusted, and why."""

    path: Path
    reason: str


def _untrusted_because(path: Path) -> str | None:
    """Why an implicitly found cluster file must not be used, or None when it may be.

    As git's safe.directory: a file someone else could have written (another owner, or
    writable by group or others) could name a local `python:` to run and hosts to send
    jobs to, so it is not taken without being named.
    """
    try:
        info = path.stat()
    except OSError as exc:
        return f"cannot check it: {exc.strerror or exc}"
    if info.st_uid not in (os.geteuid(), 0):
        return f"it is owned by uid {info.st_uid}, not by you or root"
    writers = [
        who
        for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH))
        if info.st_mode & bit
    ]
    if writers:
        return f"it is writable by {' and '.join(writers)}"
    return None


def find_cluster_file(
    explicit: str | None = None,
) -> tuple[Path | None, list[IgnoredClusterFile]]:
    """The cluster file to use (None: the embedded default), and implicit ones ignored.

    Order: `--cluster`, `$SSHWASM_CLUSTER`, `./cluster.yaml`, `<config dir>/cluster.yaml`.
    An explicit path is trusted and returned even when missing, so the caller can report
    it. An implicit one is skipped, with the reason, unless it is owned by the user (or
    root) and not writable by group or others; the next candidate is then tried.
    """
    if explicit:
        return Path(explicit).expanduser(), []
    from_env = _from_env("SSHWASM_CLUSTER")
    if from_env:
        return from_env, []
    ignored: list[IgnoredClusterFile] = []
    for candidate in (Path("cluster.yaml"), config_dir() / "cluster.yaml"):
        if not candidate.is_file():
            continue
        reason = _untrusted_because(candidate)
        if reason is None:
            return candidate, ignored
        ignored.append(IgnoredClusterFile(candidate, reason))
    return None, ignored


def cluster_file(explicit: str | None = None) -> Path | None:
    """The cluster file to use, or None for the embedded default (see find_cluster_file)."""
    return find_cluster_file(explicit)[0]
