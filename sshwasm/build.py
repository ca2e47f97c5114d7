"""Turn a source file into a validated wasm32-wasi module, cached by content hash.

Each compiled language is one toolchain finder plus one flags function, registered in
`_COMPILED_LANGUAGES`; a ready `.wasm` is validated and copied into the cache as is.
A warm build (same source, same toolchain) runs no subprocess at all: toolchain discovery
is remembered in `toolchains.json` and re-checked with `stat` calls only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sshwasm import paths
from sshwasm.errors import BuildError, CompileError, InvalidModule, ToolchainMissing, UsageError
from sshwasm.wasmfile import ModuleInfo, inspect_module

WASM_SUFFIX = ".wasm"

RUST_TARGETS = ("wasm32-wasip1", "wasm32-wasi")  # in order of preference
RUST_HINT = (
    "install one: `rustup target add wasm32-wasip1`, "
    "or on Debian `apt-get install rustc libstd-rust-dev-wasm32`"
)
# Tried after every `rustc` on PATH; a module attribute so tests can point it elsewhere.
RUST_FALLBACKS: tuple[str, ...] = ("/usr/bin/rustc", "~/.cargo/bin/rustc")

TOOLCHAIN_CACHE_NAME = "toolchains.json"
_TOOLCHAIN_CACHE_FORMAT = 1
# Bumped whenever the way a source becomes a module changes without the flags changing.
_ARTIFACT_KEY_FORMAT = "sshwasm-build-1"
_PROBE_TIMEOUT_S = 60.0
# Variables that steer which toolchain a rustup proxy runs; a change invalidates the probe.
_RUSTUP_ENV = ("RUSTUP_TOOLCHAIN", "RUSTUP_HOME")


@dataclass(frozen=True)
class Toolchain:
    """A compiler able to produce wasm32-wasi modules, as found on this machine."""

    language: str
    compiler: Path
    version: str
    target: str


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


@dataclass(frozen=True)
class _Language:
    """How to build one source language: find its toolchain, then the compiler flags."""

    name: str
    find_toolchain: Callable[[Path], Toolchain]
    flags: Callable[[Toolchain, Path], tuple[str, ...]]


def default_cache_dir() -> Path:
    """Where built modules and toolchain facts live: `<sshwasm cache dir>/wasm`."""
    return paths.cache_dir() / "wasm"


def detect_language(source: Path) -> str:
    """The language of `source` by its extension; UsageError for an unsupported one."""
    suffix = source.suffix.lower()
    if suffix == WASM_SUFFIX:
        return "wasm"
    language = _COMPILED_LANGUAGES.get(suffix)
    if language is None:
        supported = ", ".join([*_COMPILED_LANGUAGES, WASM_SUFFIX])
        raise UsageError(f"cannot build {source}: unsupported file type (supported: {supported})")
    return language.name


def build(source: Path, cache_dir: Path | None = None) -> Artifact:
    """Compile (or take) `source` as a wasm32-wasi command module in the cache and return it."""
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    if source.is_dir():
        raise UsageError(f"{source} is a directory, not a source file")
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"no such file: {source}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from exc
    language_name = detect_language(source)
    if language_name == "wasm":
        return _take_ready_module(source, data, cache_dir)
    language = _COMPILED_LANGUAGES[source.suffix.lower()]
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source} is not valid UTF-8 text (byte {exc.start})") from None
    return _compile_cached(source, data, language, cache_dir)


def find_rust_toolchain(cache_dir: Path | None = None) -> Toolchain:
    """The first rustc with a wasm32-wasip1 or wasm32-wasi std; ToolchainMissing otherwise.

    Order: `$SSHWASM_RUSTC` (which then must qualify), every `rustc` on PATH in order, then
    `RUST_FALLBACKS`. Probe results are kept in `<cache_dir>/toolchains.json`.
    """
    cache = _ProbeCache(
        (default_cache_dir() if cache_dir is None else cache_dir) / TOOLCHAIN_CACHE_NAME
    )
    try:
        override = os.environ.get("SSHWASM_RUSTC")
        if override:
            compiler = _resolve_command(override)
            if compiler is None:
                raise ToolchainMissing(
                    "rust", f"$SSHWASM_RUSTC={override} is not an executable file"
                )
            verdict = cache.verdict(compiler)
            if verdict.toolchain is None:
                raise ToolchainMissing("rust", f"$SSHWASM_RUSTC={override}: {verdict.reason}")
            return verdict.toolchain
        rejected: list[str] = []
        for candidate in _rustc_candidates():
            verdict = cache.verdict(candidate)
            if verdict.toolchain is not None:
                return verdict.toolchain
            rejected.append(f"{candidate} ({verdict.reason})")
        checked = f"; checked {', '.join(rejected)}" if rejected else ""
        raise ToolchainMissing("rust", RUST_HINT + checked)
    finally:
        cache.save()


def _rust_flags(toolchain: Toolchain, source: Path) -> tuple[str, ...]:
    return (
        "--edition",
        "2021",
        "--target",
        toolchain.target,
        "-O",
        # Without stripping, hello.wasm is 5.8 MB instead of under 100 KiB.
        "-C",
        "strip=symbols",
        "--crate-type",
        "bin",
        # rustc derives the crate name from the file name and rejects names like `my prog`.
        "--crate-name",
        _crate_name(source),
    )


def _crate_name(source: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", source.stem)
    return name if name and not name[0].isdigit() else f"_{name}"


_COMPILED_LANGUAGES: dict[str, _Language] = {
    ".rs": _Language("rust", find_rust_toolchain, _rust_flags),
}


def _compile_cached(source: Path, text: bytes, language: _Language, cache_dir: Path) -> Artifact:
    toolchain = language.find_toolchain(cache_dir)
    flags = language.flags(toolchain, source)
    key = _artifact_key(language.name, source, text, toolchain, flags)
    cached_path = cache_dir / f"{key}{WASM_SUFFIX}"
    hit = _load_cached(cached_path, language.name)
    if hit is not None:
        return hit

    _make_dir(cache_dir)
    # rustc puts intermediate files beside its output: give each build a private directory
    # in the cache so concurrent builds never collide and os.replace stays on one filesystem.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as work:
        output = Path(work) / f"out{WASM_SUFFIX}"
        command = [str(toolchain.compiler), *flags, "-o", str(output), source.name]
        started = time.perf_counter()
        try:
            completed = subprocess.run(
                command,
                cwd=source.parent,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
        except OSError as exc:
            raise BuildError(f"cannot run {toolchain.compiler}: {exc.strerror or exc}") from exc
        compile_s = time.perf_counter() - started
        if completed.returncode != 0:
            raise CompileError(
                str(source), diagnostics=completed.stderr.decode("utf-8", errors="replace")
            )
        try:
            module = output.read_bytes()
        except OSError as exc:
            raise BuildError(f"{toolchain.compiler} wrote no module for {source}") from exc
        info = _check_command_module(module, f"the module compiled from {source}")
        os.replace(output, cached_path)
    return Artifact(
        path=cached_path,
        sha256=hashlib.sha256(module).hexdigest(),
        size=len(module),
        language=language.name,
        compile_s=compile_s,
        cached=False,
        info=info,
    )


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


def _take_ready_module(source: Path, module: bytes, cache_dir: Path) -> Artifact:
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
        _write_atomic(destination, module)
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
    language: str, source: Path, text: bytes, toolchain: Toolchain, flags: tuple[str, ...]
) -> str:
    digest = hashlib.sha256()
    # The file name is part of the key because rustc embeds it in panic locations.
    parts = (_ARTIFACT_KEY_FORMAT, language, toolchain.version, toolchain.target, source.name)
    for part in (*parts, *flags):
        encoded = part.encode("utf-8", errors="surrogateescape")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    digest.update(text)
    return digest.hexdigest()


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create cache directory {directory}: {exc.strerror}") from exc


def _write_atomic(destination: Path, data: bytes) -> None:
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


# --- rustc discovery -------------------------------------------------------------------


def _resolve_command(value: str) -> Path | None:
    """A path as given, or a bare command name looked up on PATH; None if not executable."""
    if os.sep in value:
        path = Path(value).expanduser()
        return path if path.is_file() and os.access(path, os.X_OK) else None
    for directory in _path_dirs():
        path = directory / value
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def _path_dirs() -> Iterator[Path]:
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        # An empty entry means the current directory; never run a compiler found there.
        if entry:
            yield Path(entry).expanduser()


def _rustc_candidates() -> Iterator[Path]:
    """Every executable `rustc` on PATH, then the fallbacks, each real file only once."""
    seen: set[str] = set()
    places = [directory / "rustc" for directory in _path_dirs()]
    places += [Path(fallback).expanduser() for fallback in RUST_FALLBACKS]
    for place in places:
        if not (place.is_file() and os.access(place, os.X_OK)):
            continue
        real = os.path.realpath(place)
        if real in seen:
            continue
        seen.add(real)
        yield place


@dataclass(frozen=True)
class _Verdict:
    toolchain: Toolchain | None
    reason: str


def _stamp(path: Path) -> list[Any]:
    """What `stat` says about a file: enough to notice it was replaced, without running it."""
    try:
        status = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), status.st_mtime_ns, status.st_size]


def _rustup_settings() -> Path:
    home = os.environ.get("RUSTUP_HOME")
    return (Path(home) if home else Path.home() / ".rustup") / "settings.toml"


class _ProbeCache:
    """Probe results per rustc, valid while the stamped files and rustup variables match."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.changed = False
        self.entries: dict[str, dict[str, Any]] = {}
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(loaded, dict) and loaded.get("format") == _TOOLCHAIN_CACHE_FORMAT:
            entries = loaded.get("candidates")
            if isinstance(entries, dict):
                self.entries = entries

    def verdict(self, candidate: Path) -> _Verdict:
        """The cached verdict for `candidate` if still valid, else a fresh probe."""
        entry = self.entries.get(str(candidate))
        remembered = self._still_valid(entry) if entry is not None else None
        if remembered is not None:
            return remembered
        verdict, stamped = _probe_rustc(candidate)
        self.entries[str(candidate)] = {
            "stamps": [_stamp(path) for path in stamped],
            "env": _rustup_env(),
            "toolchain": None
            if verdict.toolchain is None
            else {
                "compiler": str(verdict.toolchain.compiler),
                "version": verdict.toolchain.version,
                "target": verdict.toolchain.target,
            },
            "reason": verdict.reason,
        }
        self.changed = True
        return verdict

    def _still_valid(self, entry: dict[str, Any]) -> _Verdict | None:
        try:
            stamps = entry["stamps"]
            if entry["env"] != _rustup_env() or not stamps:
                return None
            if any(_stamp(Path(stamp[0])) != stamp for stamp in stamps):
                return None
            found = entry["toolchain"]
            if found is None:
                return _Verdict(None, str(entry["reason"]))
            toolchain = Toolchain(
                language="rust",
                compiler=Path(found["compiler"]),
                version=str(found["version"]),
                target=str(found["target"]),
            )
            return _Verdict(toolchain, str(entry["reason"]))
        except (KeyError, TypeError, IndexError):
            return None

    def save(self) -> None:
        """Write the cache atomically if a probe changed it; failure only costs speed later."""
        if not self.changed:
            return
        document = {"format": _TOOLCHAIN_CACHE_FORMAT, "candidates": self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.path, json.dumps(document, indent=1).encode("utf-8"))
        except (OSError, BuildError):
            pass
        self.changed = False


def _rustup_env() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in _RUSTUP_ENV}


def _run_probe(command: list[str]) -> tuple[str | None, str]:
    """Run a probe command; return (stdout, "") or (None, why it failed)."""
    try:
        completed = subprocess.run(
            command,
            # A neutral directory: a rustup proxy would otherwise follow the caller's
            # rust-toolchain file, which the cached verdict could not notice.
            cwd=os.path.abspath(os.sep),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(command[1:])}` timed out"
    except OSError as exc:
        return None, f"cannot run it: {exc.strerror or exc}"
    if completed.returncode != 0:
        first_line = completed.stderr.decode("utf-8", errors="replace").strip().splitlines()
        detail = f": {first_line[0]}" if first_line else ""
        return None, f"`{' '.join(command[1:])}` failed{detail}"
    return completed.stdout.decode("utf-8", errors="replace"), ""


def _probe_rustc(candidate: Path) -> tuple[_Verdict, list[Path]]:
    """Ask `candidate` for its sysroot and version; return the verdict and files to stamp."""
    stamped = [candidate]
    output, why = _run_probe([str(candidate), "--print", "sysroot"])
    if output is None:
        # A rustup proxy fails until a default toolchain is set, which changes this file.
        return _Verdict(None, why), [candidate, _rustup_settings()]
    sysroot = Path(output.strip())
    rustlib = sysroot / "lib" / "rustlib"
    stamped.append(rustlib)
    target = next((t for t in RUST_TARGETS if (rustlib / t).is_dir()), None)
    # A rustup proxy picks its toolchain per call; compile with the real rustc it resolved
    # to, which is also faster and does not follow rust-toolchain files near the source.
    real = sysroot / "bin" / "rustc"
    compiler = real if real.is_file() and os.access(real, os.X_OK) else candidate
    if compiler != candidate:
        stamped.append(compiler)
        if os.path.realpath(compiler) != os.path.realpath(candidate):
            stamped.append(_rustup_settings())
    if target is None:
        wanted = " or ".join(RUST_TARGETS)
        return _Verdict(None, f"no {wanted} std in {sysroot}"), stamped
    version, why = _run_probe([str(compiler), "-vV"])
    if version is None:
        return _Verdict(None, why), stamped
    toolchain = Toolchain(language="rust", compiler=compiler, version=version, target=target)
    return _Verdict(toolchain, f"{target} std in {sysroot}"), stamped
