"""Files in and out of a job: `--input PATH` as a tar for the runner, `--output DIR` back.

The runner checks what it unpacks (regular files and directories only, nothing outside its
directory); output comes back the same way, checked again as it is extracted (the guest chose
its names), and is then merged into the user's directory without losing anything there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .runner.safetar import (
    ArchiveTooLarge,
    UnsafeArchive,
    make_extraction_directory,
    member_parts,
    write_tree_as_tar,
)


def check_input(path: Path) -> None:
    """Refuse an `--input` that is neither a readable file nor a directory."""
    if not (path.is_file() or path.is_dir()):
        raise UsageError(f"--input {path}: no such file or directory")


def pack_input(path: Path) -> bytes:
    """The tar the runner unpacks as the job's /input: a file by its name, a directory's
    contents at the top (symbolic links and special files inside are left out)."""
    buffer = io.BytesIO()
    try:
        if path.is_dir():
            write_tree_as_tar(str(path), buffer)
        else:
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
                info = archive.gettarinfo(str(path), arcname=path.name)
                info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "", ""
                with open(path, "rb") as handle:
                    archive.addfile(info, handle)
    except OSError as exc:
        raise UsageError(f"--input {path}: {exc.strerror or exc}") from exc
    return buffer.getvalue()


_BLOCK = 512
# A pax extended header holds a few key=value records (a long name, a big size): far less.
_PAX_HEADER_MAX = 1 << 20
_REGULAR_TYPES = (b"0", b"\0", b"7")
_REFUSED_TYPES = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "device",
    b"4": "device",
    b"6": "fifo",
    b"S": "sparse file",
}


class TarExtractor:
    """Extracts an uncompressed tar stream pushed to it in chunks of any size.

    The coordinator's side of fetch-output: each chunk is written to its file before the
    next is taken, so memory stays at one chunk whatever the archive holds. Checks as the
    runner's extract_tar_safely does (regular files and directories only, names inside
    `destination`, files 0600, directories 0700); with `max_bytes`, raises
    ArchiveTooLarge before a file whose header claims more than what is left, which is
    then never written. Reads ustar headers and pax extended headers (long names, sizes).
    """

    def __init__(self, destination: str, max_bytes: int | None = None) -> None:
        self.destination = destination
        self.left = max_bytes
        self.max_bytes = max_bytes
        self.ended = False
        self._buffer = bytearray()
        self._pax: dict[str, str] = {}
        self._file_fd: int | None = None
        self._file_name = ""
        self._data_left = 0  # bytes of the current member (file or pax header) to come
        self._padding = 0  # then this many bytes up to the next block
        self._pax_wanted = -1  # >= 0: collecting a pax header of this size
        self._zero_blocks = 0

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream."""
        if self.ended:
            return
        view = memoryview(data)
        while view and not self.ended:
            if self._file_fd is not None:
                view = self._write_data(view)
            elif self._padding:
                skip = min(self._padding, len(view))
                self._padding -= skip
                view = view[skip:]
            else:
                take = min(len(view), self._wanted() - len(self._buffer))
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) == self._wanted():
                    self._take_buffer()

    def close(self) -> None:
        """The stream ended: refuse an archive cut inside a member."""
        if self._file_fd is not None or self._padding or self._buffer:
            raise UnsafeArchive(f"the archive ends inside {self._file_name or 'a header'!r}")
        self.ended = True

    def abandon(self) -> None:
        """Close what is open (after an error, or at the end)."""
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None

    def _wanted(self) -> int:
        return self._pax_wanted if self._pax_wanted >= 0 else _BLOCK

    def _take_buffer(self) -> None:
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._pax_wanted >= 0:
            self._pax_wanted = -1
            self._pax = _parse_pax(data)
            self._padding = -len(data) % _BLOCK
        else:
            self._header(data)

    def _write_data(self, view: memoryview) -> memoryview:
        assert self._file_fd is not None
        take = min(self._data_left, len(view))
        part = view[:take]
        while part:
            part = part[os.write(self._file_fd, part) :]
        self._data_left -= take
        if self._data_left == 0:
            os.close(self._file_fd)
            self._file_fd = None
        return view[take:]

    def _header(self, block: bytes) -> None:
        if block == bytes(_BLOCK):
            self._zero_blocks += 1
            self.ended = self._zero_blocks == 2
            return
        if self._zero_blocks:
            raise UnsafeArchive("data after an end-of-archive block")
        stored = _octal(block[148:156], "checksum")
        if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise UnsafeArchive("not a readable tar stream: bad header checksum")
        kind = block[156:157]
        size = _octal(block[124:136], "size")
        if kind == b"x":
            if size > _PAX_HEADER_MAX:
                raise UnsafeArchive(f"a pax header of {size} bytes")
            # Its records are collected first (_take_buffer), then its padding skipped.
            self._pax_wanted = size if size else -1
            return
        if kind == b"g":
            self._padding = size + -size % _BLOCK  # global pax header: nothing we use
            return
        pax, self._pax = self._pax, {}
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0" and block[345:500].strip(b"\0"):
            name = _text(block[345:500]) + "/" + name
        name = pax.get("path", name)
        if "size" in pax:
            if not pax["size"].isdigit():
                raise UnsafeArchive(f"{name!r} has a bad size")
            size = int(pax["size"])
        if kind not in (*_REGULAR_TYPES, b"5"):
            what = _REFUSED_TYPES.get(kind, f"member of type {kind!r}")
            raise UnsafeArchive(
                f"{name!r} is a {what}: only regular files and directories can be staged"
            )
        parts = member_parts(name)
        if not parts:
            if kind != b"5":
                raise UnsafeArchive(f"file member {name!r} has no name")
            return
        path = self.destination
        for part in parts[:-1]:
            path = os.path.join(path, part)
            make_extraction_directory(path)
        path = os.path.join(path, parts[-1])
        if kind == b"5":
            make_extraction_directory(path)
            return
        if self.left is not None:
            if size > self.left:
                raise ArchiveTooLarge(
                    f"{name!r} ({size} bytes) would pass the limit of {self.max_bytes} bytes"
                )
            self.left -= size
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise UnsafeArchive(f"{name!r} appears twice in the archive") from None
        self._file_name, self._padding = name, -size % _BLOCK
        if size:
            self._file_fd, self._data_left = fd, size
        else:
            os.close(fd)


def _octal(field: bytes, what: str) -> int:
    text = field.replace(b"\0", b" ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise UnsafeArchive(f"not a readable tar stream: bad {what} field") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header ("LENGTH KEY=VALUE\\n" each)."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data) and data[position : position + 1] != b"\0":
        space = data.find(b" ", position)
        length_text = data[position:space] if space > position else b""
        if not length_text.isdigit() or int(length_text) <= space - position:
            raise UnsafeArchive("not a readable tar stream: bad pax header")
        end = position + int(length_text)
        record = data[space + 1 : end]
        if end > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise UnsafeArchive("not a readable tar stream: bad pax header")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        position = end
    return records


@dataclass
class MergedOutput:
    """What merging a job's fetched output into its --output directory did."""

    size: int = 0  # bytes of the job's files
    beside: list[str] = field(default_factory=list)  # paths written as NAME.sshwasm-ID


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW


@contextmanager
def output_scratch(destination: Path) -> Iterator[Path]:
    """A fresh directory inside `destination` (created if missing) to fetch output into;
    removed afterwards with whatever of the job's files were not moved out."""
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination, prefix=".sshwasm-output-") as scratch:
        yield Path(scratch)


def merge_output(
    scratch: Path,
    destination: Path,
    job_id: int,
    overwrite: bool,
    bases: Mapping[str, str | None] | None = None,
) -> MergedOutput:
    """Move the job's files from `scratch` into `destination` without losing anything there.

    Nothing that exists in `destination` is deleted. A job's file is added where nothing
    is, left out where the same content already is, and otherwise written beside what is
    there as NAME.sshwasm-JOBID; with `overwrite`, a job's regular file replaces a
    regular file. Links in `destination` are never followed: each directory is opened
    relative to its parent with O_NOFOLLOW, and a link is an entry like any other.

    `bases` (a --dir's bring-back; `scratch` is then outside `destination`) gives the
    sha256 each file had when it was staged: a file still holding exactly that is replaced
    by the job's (keeping its mode), since nothing but the job changed it.
    """
    merged = MergedOutput()
    source_fd = os.open(scratch, _DIRECTORY_FLAGS)
    try:
        target_fd = os.open(destination, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except BaseException:
        os.close(source_fd)
        raise
    try:
        # Inside `destination` (--output) the scratch directory is no place for a job's file.
        scratch_name = scratch.name if bases is None else ""
        _Merge(merged, f".sshwasm-{job_id}", overwrite, scratch_name, bases).directory(
            source_fd, target_fd, ""
        )
    finally:
        os.close(source_fd)
        os.close(target_fd)
    return merged


class _Merge:
    def __init__(
        self,
        merged: MergedOutput,
        suffix: str,
        overwrite: bool,
        scratch: str,
        bases: Mapping[str, str | None] | None = None,
    ) -> None:
        self.merged = merged
        self.suffix = suffix
        self.overwrite = overwrite
        self.scratch = scratch
        self.bases = bases or {}

    def directory(self, source_fd: int, target_fd: int, prefix: str) -> None:
        for name in sorted(os.listdir(source_fd)):
            info = os.lstat(name, dir_fd=source_fd)
            # The scratch directory itself is no place for the job's files.
            clash_only = bool(self.scratch) and not prefix and name == self.scratch
            if stat.S_ISDIR(info.st_mode):
                self._subdirectory(source_fd, target_fd, prefix, name, clash_only)
            elif stat.S_ISREG(info.st_mode):
                self.merged.size += info.st_size
                self._file(source_fd, target_fd, prefix, name, clash_only)

    def _subdirectory(
        self, source_fd: int, target_fd: int, prefix: str, name: str, clash_only: bool
    ) -> None:
        child_fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=source_fd)
        try:
            into = None if clash_only else _open_or_make_directory(name, target_fd)
            if into is None:
                beside = self._beside(
                    target_fd, name, lambda candidate: _make_directory(candidate, target_fd)
                )
                self.merged.beside.append(prefix + beside)
                into = os.open(beside, _DIRECTORY_FLAGS, dir_fd=target_fd)
            try:
                self.directory(child_fd, into, f"{prefix}{name}/")
            finally:
                os.close(into)
        finally:
            os.close(child_fd)

    def _file(
        self, source_fd: int, target_fd: int, prefix: str, name: str, clash_only: bool
    ) -> None:
        if not clash_only:
            try:
                existing = os.lstat(name, dir_fd=target_fd)
            except FileNotFoundError:
                existing = None
            if existing is None:
                with contextlib.suppress(FileExistsError):
                    _place_new(source_fd, name, target_fd, name)
                    return
            elif stat.S_ISREG(existing.st_mode):
                if _same_content(source_fd, target_fd, name):
                    return
                base = self.bases.get(prefix + name)
                if base is not None and _file_sha256(target_fd, name) == base:
                    # Unchanged since it was staged: the job's version is its next one.
                    os.chmod(name, stat.S_IMODE(existing.st_mode), dir_fd=source_fd)
                    if _replace_file(source_fd, name, target_fd):
                        return
                if self.overwrite and _replace_file(source_fd, name, target_fd):
                    return
        beside = self._beside(
            target_fd, name, lambda candidate: _place_new(source_fd, name, target_fd, candidate)
        )
        self.merged.beside.append(prefix + beside)

    def _beside(self, target_fd: int, name: str, make: Callable[[str], None]) -> str:
        """Make the job's entry under the first free NAME.sshwasm-ID[.N]; returns that name."""
        attempt = 1
        while True:
            candidate = name + self.suffix + (f".{attempt}" if attempt > 1 else "")
            try:
                make(candidate)
                return candidate
            except FileExistsError:
                attempt += 1


def _open_or_make_directory(name: str, parent_fd: int) -> int | None:
    """A descriptor of the real directory `name` (made if missing); None if something else
    (a file, a link, a special file) is there."""
    with contextlib.suppress(FileExistsError):
        _make_directory(name, parent_fd)
    try:
        return os.open(name, _DIRECTORY_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return None
        raise


def _make_directory(name: str, parent_fd: int) -> None:
    os.mkdir(name, 0o700, dir_fd=parent_fd)


def _place_new(source_fd: int, name: str, target_fd: int, target: str) -> None:
    """Put the job's file `name` at `target`, which must not exist (FileExistsError)."""
    try:
        # A hard link never replaces what is there, unlike rename.
        os.link(name, target, src_dir_fd=source_fd, dst_dir_fd=target_fd, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        # Another filesystem mounted inside the directory, or one without hard links.
        _copy_file(source_fd, name, target_fd, target)


def _copy_file(source_fd: int, name: str, target_fd: int, target: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
    reader = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=source_fd)
    try:
        writer = os.open(target, flags, 0o600, dir_fd=target_fd)
        try:
            while chunk := os.read(reader, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(writer, view) :]
        finally:
            os.close(writer)
    finally:
        os.close(reader)


def _replace_file(source_fd: int, name: str, target_fd: int) -> bool:
    """Replace the regular file `name` in the target by the job's; False if it cannot be
    done without following a link or replacing a directory."""
    try:
        # rename replaces the entry itself: a link swapped in meanwhile is not followed.
        os.rename(name, name, src_dir_fd=source_fd, dst_dir_fd=target_fd)
        return True
    except (IsADirectoryError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    temporary = f".{name}.sshwasm-tmp-{os.getpid()}"
    _copy_file(source_fd, name, target_fd, temporary)
    try:
        os.rename(temporary, name, src_dir_fd=target_fd, dst_dir_fd=target_fd)
    except OSError:
        os.unlink(temporary, dir_fd=target_fd)
        return False
    return True


def _same_content(source_fd: int, target_fd: int, name: str) -> bool:
    """Whether the target's regular file `name` holds exactly the job's bytes."""
    flags = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
    try:
        theirs = os.open(name, flags, dir_fd=target_fd)
    except OSError:
        return False
    try:
        ours = os.open(name, os.O_RDONLY, dir_fd=source_fd)
        try:
            if not stat.S_ISREG(os.fstat(theirs).st_mode):
                return False
            if os.fstat(theirs).st_size != os.fstat(ours).st_size:
                return False
            while True:
                chunk = os.read(ours, 1 << 20)
                if chunk != _read_exactly(theirs, len(chunk)):
                    return False
                if not chunk:
                    return True
        finally:
            os.close(ours)
    finally:
        os.close(theirs)


def _file_sha256(dir_fd: int, name: str) -> str | None:
    """The sha256 of the regular file `name` (never through a link); None if it is none."""
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _read_exactly(fd: int, size: int) -> bytes:
    parts = []
    while size > 0:
        chunk = os.read(fd, size)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)
