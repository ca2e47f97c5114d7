"""Tar streams the runner reads (a job's input) and writes (its /output): regular files and
directories only, never a name or link that could leave the root; stdlib only."""

from __future__ import annotations

import io
import os
import select
import stat
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, BinaryIO

# fetch-output walks directories down to this many levels below the output directory (one
# open descriptor per level) and skips what lies deeper.
MAX_OUTPUT_DEPTH = 64

# --------------------------------------------------------------------------- staging


class UnsafeArchive(ValueError):
    """A tar stream holds something other than plain files and directories under its root."""


class ArchiveTooLarge(UnsafeArchive):
    """A tar stream's files add up to more than the bytes allowed; what fit is extracted."""


class OutputLimitReached(Exception):
    """write_tree_as_tar stopped before a file that would pass its max_bytes."""

    def __init__(self, skipped: int) -> None:
        super().__init__(skipped)
        self.skipped = skipped


class BoundedReader(io.RawIOBase):
    """Reads at most `size` bytes through `read` (a stream's read, or os.read on a file
    descriptor), so a reader cannot run past its part: a tar reader past a launch stream's
    input tar, or a tar writer past the size a file had when its header was written (a
    file that grew is cut). With `pad`, a source that ends early is zero-padded to `size`,
    so a file a running job shrinks cannot corrupt the tar stream around it."""

    def __init__(self, read: Callable[[int], bytes], size: int, *, pad: bool = False) -> None:
        super().__init__()
        self._read = read
        self._pad = pad
        self.remaining = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self.remaining)
        filled = 0
        while filled < wanted:
            data = self._read(wanted - filled)
            if not data:
                if self._pad:
                    view[filled:wanted] = bytes(wanted - filled)
                    filled = wanted
                break
            view[filled : filled + len(data)] = data
            filled += len(data)
        self.remaining -= filled
        return filled

    def drain(self) -> None:
        """Read and drop what is left of the part (a tar's trailing padding)."""
        while self.remaining > 0:
            chunk = self._read(min(self.remaining, 1 << 20))
            if not chunk:
                break
            self.remaining -= len(chunk)


def member_parts(name: str) -> list[str]:
    """The path components of a tar member name, refusing any that could leave the root."""
    if "\0" in name:
        raise UnsafeArchive(f"member name {name!r} holds a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchive(f"member {name!r} has an absolute name")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"member {name!r} has a '..' component")
    return parts


def _member_kind(member: Any) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    if member.issparse():
        return "sparse file"
    return f"member of type {member.type!r}"


def make_extraction_directory(path: str) -> None:
    """Make a directory of an archive being extracted (0700); fine if it is one already."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        # Only this extraction writes here and it never makes links: lstat is the truth.
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise UnsafeArchive(f"{path!r} is both a file and a directory") from None


def extract_tar_safely(source: BinaryIO, destination: str, max_bytes: int | None = None) -> int:
    """Extract an uncompressed tar stream into the existing directory `destination`.

    Accepts only regular files and directories whose names stay inside; refuses the whole
    archive (UnsafeArchive) at the first absolute name, '..' component, link, device, fifo
    or sparse file. Tar modes and owners are ignored: files are 0600, directories 0700.
    Checks each member itself, so it is safe on every Python without tarfile's filters.
    With `max_bytes`, stops (ArchiveTooLarge) before a file that would take the files'
    total past it, judged by the size its header claims, so it is never written.
    Returns the number of members extracted.
    """
    import tarfile

    count = 0
    left = max_bytes
    try:
        with tarfile.open(fileobj=source, mode="r|") as archive:
            for member in archive:
                parts = member_parts(member.name)
                is_file = member.isreg() and not member.issparse()
                if not (is_file or member.isdir()):
                    raise UnsafeArchive(
                        f"{member.name!r} is a {_member_kind(member)}: only regular files "
                        f"and directories can be staged"
                    )
                if not parts:
                    if is_file:
                        raise UnsafeArchive(f"file member {member.name!r} has no name")
                    continue  # the root itself, as in `tar -C dir -cf - .`
                path = destination
                for part in parts[:-1]:
                    path = os.path.join(path, part)
                    make_extraction_directory(path)
                path = os.path.join(path, parts[-1])
                if member.isdir():
                    make_extraction_directory(path)
                else:
                    if left is not None:
                        if member.size > left:
                            raise ArchiveTooLarge(
                                f"{member.name!r} ({member.size} bytes) would pass the limit "
                                f"of {max_bytes} bytes"
                            )
                        left -= member.size
                    _extract_file(archive, member, path)
                count += 1
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"not a readable tar stream: {exc}") from exc
    return count


def _extract_file(archive: Any, member: Any, path: str) -> None:
    data = archive.extractfile(member)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise UnsafeArchive(f"{member.name!r} appears twice in the archive") from None
    try:
        left = member.size
        while left > 0:
            chunk = data.read(min(left, 1 << 20))
            if not chunk:
                raise UnsafeArchive(f"the archive ends inside {member.name!r}")
            left -= len(chunk)
            write_all(fd, chunk)
    finally:
        os.close(fd)


def write_tree_as_tar(root: str, sink: BinaryIO, max_bytes: int | None = None) -> int:
    """Write the regular files and directories under `root` to `sink` as an uncompressed tar.

    Symbolic links are never followed nor included, nor is anything but regular files and
    directories, nor what lies deeper than MAX_OUTPUT_DEPTH: a job may have made any of
    them. Each directory is opened relative to its parent with O_NOFOLLOW, so a running job
    swapping a directory for a link cannot redirect the walk. Member modes are 0600/0700.
    With `max_bytes`, the archive ends (well-formed) before the first file that would take
    the files' total past it, and OutputLimitReached is raised after it is written: a
    sparse file counts by its apparent size, so it never travels. Returns the number of
    entries skipped.
    """
    import tarfile

    left = max_bytes
    stopped = False
    skipped = 0

    def skip() -> None:
        nonlocal skipped
        skipped += 1

    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for path, fd, info in _walk_tree(root, skip):
            member = tarfile.TarInfo(path)
            member.mtime = int(info.st_mtime)
            if fd is None:
                member.type, member.mode = tarfile.DIRTYPE, 0o700
                archive.addfile(member)
                continue
            if left is not None and info.st_size > left:
                stopped = True
                break
            if left is not None:
                left -= info.st_size
            member.mode, member.size = 0o600, info.st_size
            archive.addfile(member, BoundedReader(partial(os.read, fd), info.st_size, pad=True))
    if stopped:
        raise OutputLimitReached(skipped)
    return skipped


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, however often a signal cuts a write short.

    A write interrupted by a signal after moving some bytes returns early, and serve's
    SIGCHLD handler interrupts writes all the time (see stream._FrameWriter).
    """
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # Someone sharing the descriptor made it non-blocking: wait for room.
            select.select([], [fd], [])
            continue
        view = view[written:]


# ------------------------------------------------------------------- staged directories

# A directory's entry in a tree manifest (a regular file's is its sha256 in hex).
DIRECTORY_MARK = "dir"


def _walk_tree(
    root: str, on_skip: Callable[[], None] | None = None
) -> Iterator[tuple[str, int | None, os.stat_result]]:
    """Yield (relative path, descriptor, its fstat) for each directory and regular file
    under `root`, parents first (depth-first, names sorted). A directory's descriptor is
    None; a file's is open for reading and closed at the next step.

    Symbolic links are never followed nor listed, nor special files, nor what lies deeper
    than MAX_OUTPUT_DEPTH: each directory is opened relative to its parent with O_NOFOLLOW,
    so a running job swapping a directory for a link cannot redirect the walk. `on_skip`
    is called for each entry left out that way.
    """
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    file_flags = os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0)
    root_fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow)
    # An explicit stack of (directory fd, path prefix, names left).
    stack: list[tuple[int, str, list[str]]] = [(root_fd, "", sorted(os.listdir(root_fd)))]
    try:
        while stack:
            dir_fd, prefix, names = stack[-1]
            if not names:
                os.close(dir_fd)
                stack.pop()
                continue
            name = names.pop(0)
            try:
                fd = os.open(name, file_flags, dir_fd=dir_fd)
            except OSError:
                if on_skip is not None:
                    on_skip()  # a symlink (ELOOP), vanished, or unreadable
                continue
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode) and len(stack) <= MAX_OUTPUT_DEPTH:
                try:
                    children = sorted(os.listdir(fd))
                except OSError:
                    children = []
                yield prefix + name, None, info
                stack.append((fd, prefix + name + "/", children))
                continue
            try:
                if stat.S_ISREG(info.st_mode):
                    yield prefix + name, fd, info
                elif on_skip is not None:
                    on_skip()
            finally:
                os.close(fd)
    finally:
        for dir_fd, _, _ in stack:
            os.close(dir_fd)


def tree_manifest(root: str) -> dict[str, str]:
    """Each directory and regular file under `root` by relative path: DIRECTORY_MARK, or
    the file's sha256 in hex (what fetch-dir compares with to find what a job changed)."""
    import hashlib

    manifest: dict[str, str] = {}
    for path, fd, _ in _walk_tree(root):
        if fd is None:
            manifest[path] = DIRECTORY_MARK
            continue
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        manifest[path] = digest.hexdigest()
    return manifest


def tree_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, Any]:
    """What changed from the manifest `before` to `after`: "changed" (each file made or
    changed, with its sha256 before or None), "deleted" (each file gone, or now a
    directory, with its sha256 before), "deleted_dirs" (deepest first) and "new_dirs"."""
    changed = {
        path: (None if before.get(path, DIRECTORY_MARK) == DIRECTORY_MARK else before[path])
        for path, mark in after.items()
        if mark != DIRECTORY_MARK and before.get(path) != mark
    }
    deleted = {
        path: mark
        for path, mark in before.items()
        if mark != DIRECTORY_MARK and after.get(path, DIRECTORY_MARK) == DIRECTORY_MARK
    }
    deleted_dirs = sorted(
        (path for path, mark in before.items() if mark == DIRECTORY_MARK and path not in after),
        key=lambda path: (-path.count("/"), path),
    )
    new_dirs = [
        path for path, mark in after.items() if mark == DIRECTORY_MARK and path not in before
    ]
    return {
        "changed": changed,
        "deleted": deleted,
        "deleted_dirs": deleted_dirs,
        "new_dirs": new_dirs,
    }


def write_changes_as_tar(
    root: str, changes: dict[str, Any], sink: BinaryIO, prefix: str, trailer: tuple[str, bytes]
) -> None:
    """Write the new directories and the changed files of `changes` (tree_changes) under
    `root` to `sink` as a tar, each named `prefix` + its path, then the member `trailer`
    (name, bytes). Files are read as the walk finds them (never through a link)."""
    import tarfile

    wanted_dirs = set(changes["new_dirs"])
    wanted_files = set(changes["changed"])
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for path, fd, _ in _walk_tree(root):
            member = tarfile.TarInfo(prefix + path)
            if fd is None:
                if path in wanted_dirs:
                    member.type, member.mode = tarfile.DIRTYPE, 0o700
                    archive.addfile(member)
                continue
            if path not in wanted_files:
                continue
            size = os.fstat(fd).st_size
            member.mode, member.size = 0o600, size
            archive.addfile(member, BoundedReader(partial(os.read, fd), size, pad=True))
        name, data = trailer
        member = tarfile.TarInfo(name)
        member.mode, member.size = 0o600, len(data)
        archive.addfile(member, io.BytesIO(data))
