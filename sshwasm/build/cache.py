"""The artifact cache: modules kept under the hash of their source, toolchain and flags.

A warm build finds its module here by that hash without running any compiler; a damaged
file is rebuilt, never trusted. Files are written atomically, so a concurrent build or a
crash never leaves a partial module under a valid name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sshwasm import paths
from sshwasm.errors import BuildError, InvalidModule
from sshwasm.wasmfile import ModuleInfo, inspect_module

from .language import WASM_SUFFIX, Language, Toolchain, run_tool

# Bumped whenever the way a source becomes a module changes without the flags changing.
ARTIFACT_KEY_FORMAT = "sshwasm-build-1"


@dataclass(frozen=True)
class Artifact:
    """A validated module in the local cache, ready to be shipped to a host."""

    path: Path
    sha256: str
    size: int
    language: str
    compile_s: float
    cached: bool
    info: ModuleInfo


def default_cache_dir() -> Path:
    """Where built modules and toolchain facts live: `<sshwasm cache dir>/wasm`."""
    return paths.cache_dir() / "wasm"


def compile_cached(
    source: Path, content: bytes, language: Language, toolchain: Toolchain, cache_dir: Path
) -> Artifact:
    """The module `language` makes of `source` (`content` stands for it in the key), cached.

    Found by key without running anything, or compiled in a private directory and moved in.
    """
    flags = language.flags(toolchain, source)
    key = _artifact_key(language.name, _source_name(source), content, toolchain, flags)
    cached_path = cache_dir / f"{key}{WASM_SUFFIX}"
    hit = _load_cached(cached_path, language.name)
    if hit is not None:
        return hit

    _make_dir(cache_dir)
    # rustc puts intermediate files beside its output: give each build a private directory
    # in the cache so concurrent builds never collide and os.replace stays on one filesystem.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as work:
        started = time.perf_counter()
        invocation = language.command(toolchain, flags, source, Path(work))
        run_tool(invocation.argv, invocation.cwd, invocation.env, source)
        compile_s = time.perf_counter() - started
        try:
            module = invocation.output.read_bytes()
        except OSError as exc:
            raise BuildError(f"{toolchain.compiler} wrote no module for {source}") from exc
        info = _check_command_module(module, f"the module compiled from {source}")
        digest = hashlib.sha256(module).hexdigest()
        if not invocation.reusable():
            cached_path = cache_dir / f"{digest}{WASM_SUFFIX}"
        if invocation.output.parent == Path(work):
            os.replace(invocation.output, cached_path)
        else:  # cargo's own target directory keeps its copy
            write_atomic(cached_path, module)
    return Artifact(
        path=cached_path,
        sha256=digest,
        size=len(module),
        language=language.name,
        compile_s=compile_s,
        cached=False,
        info=info,
    )


def _source_name(source: Path) -> str:
    # A directory given as `.` has no name of its own.
    return source.name if source.name else source.resolve().name


def _load_cached(path: Path, language: str) -> Artifact | None:
    """The artifact at `path` if present and valid; a damaged one is rebuilt, not trusted."""
    try:
        module = path.read_bytes()
        info = _check_command_module(module, str(path))
    except (OSError, InvalidModule):
        return None
    return Artifact(
        path=path,
        sha256=hashlib.sha256(module).hexdigest(),
        size=len(module),
        language=language,
        compile_s=0.0,
        cached=True,
        info=info,
    )


def take_ready_module(source: Path, module: bytes, cache_dir: Path) -> Artifact:
    """A ready `.wasm`, validated and kept in the cache under its own hash."""
    info = _check_command_module(module, str(source))
    digest = hashlib.sha256(module).hexdigest()
    destination = cache_dir / f"{digest}{WASM_SUFFIX}"
    # The name is the content hash, so an existing file of the right size is this module.
    try:
        cached = destination.stat().st_size == len(module)
    except OSError:
        cached = False
    if not cached:
        _make_dir(cache_dir)
        write_atomic(destination, module)
    return Artifact(
        path=destination,
        sha256=digest,
        size=len(module),
        language="wasm",
        compile_s=0.0,
        cached=cached,
        info=info,
    )


def _check_command_module(module: bytes, name: str) -> ModuleInfo:
    try:
        info = inspect_module(module)
    except InvalidModule as exc:
        raise InvalidModule(f"{name}: {exc}") from exc
    if not info.is_wasi_command:
        raise InvalidModule(f"{name}: not a WASI command (it exports no `_start`)")
    return info


def _artifact_key(
    language: str, name: str, content: bytes, toolchain: Toolchain, flags: tuple[str, ...]
) -> str:
    digest = hashlib.sha256()
    # The file name is part of the key because rustc embeds it in panic locations.
    parts = (ARTIFACT_KEY_FORMAT, language, toolchain.version, toolchain.target, name)
    for part in (*parts, *flags):
        encoded = part.encode("utf-8", errors="surrogateescape")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    digest.update(content)
    return digest.hexdigest()


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create cache directory {directory}: {exc.strerror}") from exc


def write_atomic(destination: Path, data: bytes) -> None:
    """Write via a private temporary file and os.replace, so readers never see a partial file."""
    try:
        descriptor, temporary = tempfile.mkstemp(
            dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            os.replace(temporary, destination)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise BuildError(f"cannot write {destination}: {exc.strerror or exc}") from exc
