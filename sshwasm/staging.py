"""Files in and out of a job: `--input PATH` as a tar for the runner, `--output DIR` back.

The runner checks what it unpacks (regular files and directories only, nothing outside its
directory); output comes back the same way and is checked again here, since the guest chose
its names.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from .errors import UsageError
from .runner import UnsafeArchive, extract_tar_safely, write_tree_as_tar


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


def unpack_output(data: bytes, destination: Path) -> int:
    """Put a job's fetched /output into `destination` (created if missing); returns bytes.

    Unpacked into a fresh directory beside it first, then moved in entry by entry, so a
    refused archive leaves `destination` as it was.
    """
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination, prefix=".sshwasm-output-") as scratch:
        try:
            extract_tar_safely(io.BytesIO(data), scratch)
        except UnsafeArchive as exc:
            raise UsageError(f"refused the job's output: {exc}") from exc
        total = 0
        for root, _, files in os.walk(scratch):
            total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
        for entry in os.listdir(scratch):
            target = destination / entry
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(os.path.join(scratch, entry), target)
    return total
