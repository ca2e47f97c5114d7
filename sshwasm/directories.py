"""Directories a job works on: `--dir LOCAL[::GUEST][:ro]` (staged to the host, what the job
changed brought back) and `--host-dir PATH::GUEST[:ro]` (the host's own, preopened as it is).

What a job record keeps (`Job.dirs`) is a JSON list of mounts: {"guest", "read_only",
"local"} for --dir, {"guest", "read_only", "host_path"} for --host-dir. The runner makes a
manifest (each file's sha256) of a read-write --dir as it stages it; after the job,
`fetch-dir` sends back only what differs from it, and `collect_dirs` merges that into LOCAL
three ways: the job's version replaces a file LOCAL still holds as it was staged, and is
written beside one that changed there meanwhile (as NAME.sshwasm-ID); a file the job deleted
is deleted in LOCAL only if it is unchanged there since staging.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import paths
from .errors import SshwasmError, UsageError
from .runner.protocol import (
    DIR_CHANGES_KEYS,
    DIR_CHANGES_MEMBER,
    DIR_FILES_PREFIX,
    DIR_LEFT_OUT_KEY,
    MAX_DIRS,
    SHA256_RE,
    guest_path_problem,
)
from .runner.safetar import tree_manifest, write_tree_as_tar
from .staging import merge_output

if TYPE_CHECKING:
    from .job_output import OutputBudget
    from .runner_client import LaunchSpec, RunnerClient
    from .store import Job, JobStore

# How many of the files kept or written beside a warning names.
NAMED = 3
# Guest paths the job's other files use (--input, --output).
_RESERVED_GUESTS = {"/input": "--input", "/output": "--output"}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW


@dataclass(frozen=True)
class Mount:
    """One directory preopened for a job: staged from `local`, or the host's `host_path`."""

    guest: str
    read_only: bool
    local: str | None = None
    host_path: str | None = None

    @property
    def staged(self) -> bool:
        """Copied from this machine (--dir), not the host's own (--host-dir)."""
        return self.host_path is None

    def as_json(self) -> dict[str, Any]:
        """The mount's entry in `Job.dirs`."""
        where = {"local": self.local} if self.staged else {"host_path": self.host_path}
        return {"guest": self.guest, "read_only": self.read_only, **where}

    def describe(self) -> str:
        """As the record shows it: `LOCAL::GUEST[:ro]`, or `PATH::GUEST[:ro] (host)`."""
        text = f"{self.local if self.staged else self.host_path}::{self.guest}"
        text += ":ro" if self.read_only else ""
        return text if self.staged else text + " (host)"


def _split_mount(flag: str, text: str) -> tuple[str, str | None, bool]:
    """PATH, GUEST (None when not given) and read-only from `PATH[::GUEST][:ro]`."""
    read_only = False
    for suffix, value in ((":ro", True), (":rw", False)):
        if text.endswith(suffix):
            text, read_only = text[: -len(suffix)], value
            break
    path, separator, guest = text.rpartition("::")
    if not separator:
        path, guest = text, ""
    if not path:
        raise UsageError(f"{flag} {text}: no directory before '::'")
    if separator and not guest:
        raise UsageError(f"{flag} {text}: no guest path after '::'")
    return path, guest or None, read_only


def _checked_guest(flag: str, text: str, guest: str) -> str:
    problem = guest_path_problem(guest)
    if problem is not None:
        raise UsageError(f"{flag} {text}: the guest path {guest!r} {problem}")
    return guest


def parse_dir(text: str) -> Mount:
    """A `--dir LOCAL[::GUEST][:ro]`: LOCAL must be a directory (never / or your home);
    GUEST defaults to /NAME, LOCAL's own name."""
    local, guest, read_only = _split_mount("--dir", text)
    path = Path(local).expanduser()
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise UsageError(f"--dir {text}: {what}")
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise UsageError(f"--dir {text}: refusing to stage the whole filesystem")
    if resolved == Path.home().resolve():
        raise UsageError(f"--dir {text}: refusing to stage your whole home directory")
    if guest is None:
        guest = "/" + resolved.name
    return Mount(_checked_guest("--dir", text, guest), read_only, local=str(resolved))


def parse_host_dir(text: str) -> Mount:
    """A `--host-dir PATH::GUEST[:ro]`: PATH as the host knows it (absolute, or ~/...)."""
    path, guest, read_only = _split_mount("--host-dir", text)
    if guest is None:
        raise UsageError(f"--host-dir {text}: say where the job sees it, as PATH::GUEST")
    if not (path.startswith("/") or path == "~" or path.startswith("~/")) or "\0" in path:
        raise UsageError(f"--host-dir {text}: PATH must be absolute on the host (or ~/...)")
    return Mount(_checked_guest("--host-dir", text, guest), read_only, host_path=path)


def check_mounts(
    mounts: Sequence[Mount], jobs_file: Path, *, uses_input: bool, uses_output: bool
) -> None:
    """Refuse mounts that cannot go together: too many, two at one guest path, one at the
    --input or --output guest path in use, or a read-write --dir holding the jobs file."""
    if len(mounts) > MAX_DIRS:
        raise UsageError(f"at most {MAX_DIRS} directories (--dir and --host-dir) per job")
    used = {"/input": uses_input, "/output": uses_output}
    seen: set[str] = set()
    jobs_file = jobs_file.resolve()
    for mount in mounts:
        if mount.guest in seen:
            raise UsageError(f"two directories at {mount.guest}: give each its own ::GUEST")
        seen.add(mount.guest)
        if used.get(mount.guest):
            raise UsageError(f"{mount.guest} is {_RESERVED_GUESTS[mount.guest]}'s: pick another")
        writable = mount.local is not None and not mount.read_only
        if writable and jobs_file.is_relative_to(str(mount.local)):
            raise UsageError(
                f"--dir {mount.local} holds the jobs file {jobs_file}: the job could "
                f"change it; use :ro or another directory"
            )


def mounts_json(mounts: Sequence[Mount]) -> str:
    """`Job.dirs` for these mounts."""
    return json.dumps([mount.as_json() for mount in mounts])


def job_mounts(dirs: str) -> list[Mount]:
    """The mounts `Job.dirs` holds."""
    return [
        Mount(
            entry["guest"],
            bool(entry["read_only"]),
            local=entry.get("local"),
            host_path=entry.get("host_path"),
        )
        for entry in json.loads(dirs or "[]")
    ]


def describe_dirs(dirs: str) -> str | None:
    """The record's `dirs`: each mount as `LOCAL::GUEST[:ro]` or `PATH::GUEST[:ro] (host)`,
    comma-separated; None when the job has none."""
    mounts = job_mounts(dirs)
    return ", ".join(mount.describe() for mount in mounts) if mounts else None


# ------------------------------------------------------------------------- content keys


def tree_digest(path: Path) -> str:
    """The sha256 of a --dir tree by content, as the job would see it staged: each
    directory's and regular file's relative name, and each file's bytes. Never times or
    owners; modes neither, since staged files are all 0600 to the job. Symbolic links and
    special files are left out, as staging leaves them out.

    Every task of an array that succeeds asks again (its reuse key): the bytes are read
    again only when the tree's stat signature changed since, so a big read-only tree is
    hashed once per process, not once per task."""
    root = str(path)
    signature = _tree_signature(root)
    known = _DIGESTS.get(root)
    if known is not None and known[0] == signature:
        return known[1]
    manifest = tree_manifest(root)
    digest = hashlib.sha256(json.dumps(sorted(manifest.items())).encode()).hexdigest()
    # Taken before the read: a change during it shows in the next signature.
    _DIGESTS[root] = (signature, digest)
    return digest


# tree_digest's memory: root -> (its stat signature, its digest).
_DIGESTS: dict[str, tuple[tuple[tuple[str, int, int, int, int], ...], str]] = {}


def _tree_signature(root: str) -> tuple[tuple[str, int, int, int, int], ...]:
    """What changes whenever a file under `root` is written, made, removed or renamed:
    each entry's path, inode, size and change time (which no one can set back), mode."""
    entries: list[tuple[str, int, int, int, int]] = []
    for directory, names, files in os.walk(root):
        for name in sorted([*names, *files]):
            full = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                info = os.lstat(full)
                entries.append((full, info.st_ino, info.st_size, info.st_ctime_ns, info.st_mode))
    with contextlib.suppress(OSError):
        info = os.lstat(root)
        entries.append((root, info.st_ino, info.st_size, info.st_ctime_ns, info.st_mode))
    return tuple(entries)


def dirs_digest(dirs: str) -> str:
    """The sha256 of a job's directories for result reuse: each mount's guest path and
    mode, with a --dir's tree_digest, or a --host-dir's path (the host's content is not
    seen from here). Two jobs with equal digests see the same files at the same places."""
    parts = [
        [mount.guest, mount.read_only, tree_digest(Path(mount.local))]
        if mount.local is not None
        else [mount.guest, mount.read_only, "host", mount.host_path]
        for mount in job_mounts(dirs)
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# ---------------------------------------------------------------------------- staging


def stage_dirs(spec: LaunchSpec, job: Job) -> LaunchSpec:
    """`spec` with the job's directories: each --dir packed as a tar (as it is now), each
    --host-dir named. Raises UsageError if a --dir can no longer be read."""
    import io

    entries: list[dict[str, Any]] = []
    tars: list[bytes] = []
    for mount in job_mounts(job.dirs):
        entry: dict[str, Any] = {"guest": mount.guest, "read_only": mount.read_only}
        if mount.local is None:
            entries.append({**entry, "host_path": mount.host_path})
            continue
        buffer = io.BytesIO()
        try:
            write_tree_as_tar(mount.local, buffer)
        except OSError as exc:
            raise UsageError(f"--dir {mount.local}: {exc.strerror or exc}") from exc
        entries.append(entry)
        tars.append(buffer.getvalue())
    return replace(spec, dirs=tuple(entries), dir_tars=tuple(tars))


# --------------------------------------------------------------------------- bring-back


@dataclass
class DirChanges:
    """What bringing a job's changes back into its --dir directories did."""

    written: int = 0  # files made or replaced
    beside: list[str] | None = None  # changed both there and by the job: NAME.sshwasm-ID
    deleted: int = 0
    kept: list[str] | None = None  # deleted by the job but changed there since staging
    size: int = 0  # bytes of the job's files brought back
    left_out: list[str] | None = None  # changed by the job, past the output cap: not sent


async def collect_dirs(
    store: JobStore, job: Job, client: RunnerClient, budget: OutputBudget | None = None
) -> tuple[str | None, list[str]]:
    """Bring what the ended job changed in each read-write --dir back into LOCAL; returns
    the first problem (for the record, if it has no error) and what is worth a warning
    (problems, files beside or kept). Never deletes a file that differs from what was
    staged, never overwrites one that changed since (unless the job has --overwrite).

    What comes back counts against `budget` (the job's --max-output-mb, shared with its
    stdout, stderr and /output): the host sends the changed files whole while they fit
    and names the rest, which are left out (the budget is then exceeded)."""
    import asyncio

    problem: str | None = None
    warnings: list[str] = []
    conflicts = 0
    started = time.monotonic()
    for index, mount in enumerate(job_mounts(job.dirs)):
        if mount.local is None or mount.read_only:
            continue
        local = Path(mount.local)
        try:
            scratch_root = paths.make_job_output_dir(store.path, job.id)
            with tempfile.TemporaryDirectory(dir=scratch_root, prefix=".dir-") as scratch:
                left = None if budget is None else budget.left
                if await client.fetch_dir(job.remote_key, index, Path(scratch), left):
                    raise ValueError(f"the host sent more than the {left} bytes asked for")
                done = await asyncio.to_thread(
                    apply_dir_changes, Path(scratch), local, job.id, bool(job.output_overwrite)
                )
        except (SshwasmError, OSError, ValueError) as exc:
            warnings.append(f"job {job.id}: changes to --dir {local} not brought back: {exc}")
            problem = problem or warnings[-1]
            continue
        if budget is not None:
            budget.take(done.size)
        if done.left_out:
            # The job ends failed as over its cap, with this in its error (one line).
            if budget is not None:
                budget.exceeded = True
            message = (
                f"job {job.id}: {len(done.left_out)} files it changed in {local} were not "
                f"brought back, past its --max-output-mb: {_named(done.left_out)}"
            )
            if problem is None:
                problem = message
            else:
                warnings.append(message)
        conflicts += len(done.beside or [])
        if done.beside:
            warnings.append(
                f"job {job.id}: {len(done.beside)} files it changed in {local} changed there "
                f"too since it started, and were left as they are; the job's versions are "
                f"beside them as NAME.sshwasm-{job.id}: {_named(done.beside)}"
            )
        if done.kept:
            warnings.append(
                f"job {job.id}: {len(done.kept)} files it deleted in {local} changed there "
                f"since it started, and were kept: {_named(done.kept)}"
            )
    if conflicts:
        current = store.get(job.id).output_conflicts or 0
        store.update(job.id, output_conflicts=current + conflicts)
    if any(mount.staged and not mount.read_only for mount in job_mounts(job.dirs)):
        store.update(
            job.id,
            stage_out_s=round((store.get(job.id).stage_out_s or 0) + time.monotonic() - started, 6),
        )
    return problem, warnings


def _named(names: list[str]) -> str:
    more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
    return ", ".join(names[:NAMED]) + more


def read_changes(scratch: Path) -> dict[str, Any]:
    """fetch-dir's changes.json, checked: paths relative and inside, hashes sha256 hex."""
    raw = json.loads((scratch / DIR_CHANGES_MEMBER).read_bytes())
    if not isinstance(raw, dict) or any(key not in raw for key in DIR_CHANGES_KEYS):
        raise ValueError("the host's list of changes is malformed")

    def safe(path: object) -> bool:
        return (
            isinstance(path, str)
            and bool(path)
            and not path.startswith("/")
            and "\0" not in path
            and all(part not in ("", ".", "..") for part in path.split("/"))
        )

    def sha(value: object) -> bool:
        return isinstance(value, str) and SHA256_RE.fullmatch(value) is not None

    changed, deleted, deleted_dirs = raw["changed"], raw["deleted"], raw["deleted_dirs"]
    left_out = raw.setdefault(DIR_LEFT_OUT_KEY, [])
    if not (
        isinstance(changed, dict)
        and all(safe(path) and (base is None or sha(base)) for path, base in changed.items())
        and isinstance(deleted, dict)
        and all(safe(path) and sha(base) for path, base in deleted.items())
        and isinstance(deleted_dirs, list)
        and all(safe(path) for path in deleted_dirs)
        and isinstance(left_out, list)
        and all(safe(path) and path not in changed for path in left_out)
    ):
        raise ValueError("the host's list of changes holds a bad path or hash")
    return raw


def apply_dir_changes(scratch: Path, local: Path, job_id: int, overwrite: bool) -> DirChanges:
    """Merge a fetched fetch-dir archive (in `scratch`) into the --dir `local`."""
    changes = read_changes(scratch)
    files = scratch / DIR_FILES_PREFIX.rstrip("/")
    files.mkdir(exist_ok=True)
    bases: dict[str, str | None] = changes["changed"]
    merged = merge_output(files, local, job_id, overwrite, bases=bases)
    done = DirChanges(
        written=len(bases) - len(merged.beside),
        beside=merged.beside,
        kept=[],
        size=merged.size,
        left_out=sorted(changes[DIR_LEFT_OUT_KEY]),
    )
    root_fd = os.open(local, _DIRECTORY_FLAGS)
    try:
        for path, base in sorted(changes["deleted"].items()):
            removed = _remove_if_unchanged(root_fd, path, base)
            if removed:
                done.deleted += 1
            elif removed is not None:
                assert done.kept is not None
                done.kept.append(path)
        for path in changes["deleted_dirs"]:
            _remove_if_empty(root_fd, path)
    finally:
        os.close(root_fd)
    return done


def _open_parent(root_fd: int, path: str) -> tuple[int, str] | None:
    """A descriptor of `path`'s directory under root_fd (never through a link) and its
    last name; None when a directory on the way is missing or not a real directory."""
    *parents, name = path.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parents:
            child = os.open(part, _DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError:
        os.close(fd)
        return None
    return fd, name


def _remove_if_unchanged(root_fd: int, path: str, base: str) -> bool | None:
    """Delete the regular file `path` if it still holds what was staged (sha256 `base`):
    True; False when it differs (kept); None when it is not there."""
    found = _open_parent(root_fd, path)
    if found is None:
        return None
    parent_fd, name = found
    try:
        try:
            fd = os.open(
                name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=parent_fd
            )
        except FileNotFoundError:
            return None
        except OSError:
            return False  # a link or something else now: not what was staged
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            digest = hashlib.sha256()
            while chunk := os.read(fd, 1 << 20):
                digest.update(chunk)
        finally:
            os.close(fd)
        if digest.hexdigest() != base:
            return False
        os.unlink(name, dir_fd=parent_fd)
        return True
    finally:
        os.close(parent_fd)


def _remove_if_empty(root_fd: int, path: str) -> None:
    """Remove the directory `path` if it is empty (what is still in it stays)."""
    found = _open_parent(root_fd, path)
    if found is None:
        return
    parent_fd, name = found
    try:
        if stat.S_ISDIR(os.lstat(name, dir_fd=parent_fd).st_mode):
            os.rmdir(name, dir_fd=parent_fd)
    except OSError:
        pass  # gone already, or not empty: nothing is deleted that holds something
    finally:
        os.close(parent_fd)
