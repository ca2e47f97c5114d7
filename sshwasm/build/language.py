"""What a language module provides (`Language`), and the pieces the language modules share.

A language module (`rust`, `c`, `go`) describes each language it builds as a `Language`: which
files or project manifests it takes, how to find its toolchain, the flags, and the compiler
run. `registry` lists the language modules; `cache` runs a `Language` and keeps its module.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sshwasm.errors import BuildError, CompileError, UsageError

WASM_SUFFIX = ".wasm"


@dataclass(frozen=True)
class Toolchain:
    """A compiler able to produce wasm32-wasi modules, as found on this machine."""

    language: str
    compiler: Path
    version: str
    target: str
    # Arguments that come first on every call, e.g. zig's `cc` or clang's `--sysroot=...`.
    base_args: tuple[str, ...] = ()
    # Variables the compiler needs, e.g. RUSTC for cargo (its own rustc) or GOROOT for go.
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Invocation:
    """One compiler run: the command, where and with which extra variables, and its output."""

    argv: tuple[str, ...]
    cwd: Path
    output: Path
    env: Mapping[str, str] = field(default_factory=dict)
    # Asked after a successful run: may the module be found again by the source's hash?
    reusable: Callable[[], bool] = lambda: True


@dataclass(frozen=True)
class Language:
    """How to build one source language: find its toolchain, the flags, the compiler run.

    `suffixes` are the file extensions it builds, `manifest` the file that makes a directory
    one of its projects. `flags` must depend on the toolchain and source name only (it is
    part of the cache key); `command` may do slow work such as asking cargo for the project's
    binaries, since it runs only when the module is not cached. `fingerprint` is for project
    directories: the bytes that stand for the source in the cache key.
    """

    name: str
    find_toolchain: Callable[[Path], Toolchain]
    flags: Callable[[Toolchain, Path], tuple[str, ...]]
    command: Callable[[Toolchain, tuple[str, ...], Path, Path], Invocation]
    suffixes: tuple[str, ...] = ()
    manifest: str | None = None
    fingerprint: Callable[[Toolchain, Path], bytes] | None = None


def compiler_command(
    toolchain: Toolchain, flags: tuple[str, ...], source: Path, work: Path
) -> Invocation:
    """`compiler FLAGS -o OUT file` beside the source, so diagnostics name the file as given."""
    output = work / f"out{WASM_SUFFIX}"
    argv = (str(toolchain.compiler), *flags, "-o", str(output), source.name)
    return Invocation(argv=argv, cwd=source.parent, output=output, env=dict(toolchain.env))


def run_tool(
    argv: tuple[str, ...], cwd: Path, env: Mapping[str, str], source: Path
) -> subprocess.CompletedProcess[bytes]:
    """Run a compiler step; its diagnostics become a CompileError when it fails."""
    try:
        completed = subprocess.run(
            argv,
            cwd=cwd,
            env={**os.environ, **env} if env else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
    except OSError as exc:
        raise BuildError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    if completed.returncode != 0:
        raise CompileError(
            str(source), diagnostics=completed.stderr.decode("utf-8", errors="replace")
        )
    return completed


def tree_digest(root: Path, skip: Callable[[Path, str], bool]) -> bytes:
    """A hash of every file under `root` (names and contents), but directories `skip` names."""
    digest = hashlib.sha256()

    def walk_error(exc: OSError) -> None:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror or exc}") from exc

    for directory, subdirectories, files in os.walk(root, onerror=walk_error):
        here = Path(directory)
        subdirectories[:] = sorted(name for name in subdirectories if not skip(here, name))
        for name in sorted(files):
            path = here / name
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                if not path.is_symlink():
                    raise UsageError(f"{path} vanished while it was read") from None
                data = b"dangling symlink to " + os.fsencode(os.readlink(path))
            except OSError as exc:
                raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
            for part in (os.fsencode(path.relative_to(root).as_posix()), data):
                digest.update(len(part).to_bytes(8, "little"))
                digest.update(part)
    return digest.digest()
