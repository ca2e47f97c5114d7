"""Finding a compiler: candidates on PATH, in Python packages and fallbacks, and their probes.

Language-agnostic: a language module says which candidates to try and gives a `Probe` that
asks one candidate what it is. A probe's verdict is remembered in `toolchains.json` with
the `stat` of the files it depends on and the variables it names, and is believed while
they match, so a warm build finds its toolchain without running anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sshwasm.errors import BuildError, ToolchainMissing

from .cache import default_cache_dir, write_atomic
from .language import Toolchain

TOOLCHAIN_CACHE_NAME = "toolchains.json"
# 2: every entry is keyed `kind:path` and keeps only the variables its probe names.
_TOOLCHAIN_CACHE_FORMAT = 2
_PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Verdict:
    """What a probe found: the toolchain, or None and why the candidate does not qualify."""

    toolchain: Toolchain | None
    reason: str


@dataclass(frozen=True)
class Probe:
    """How to ask a candidate of one kind (`rust`, `zig`, ...) what it is.

    `run` returns the verdict and the files whose `stat` must not change for it to hold;
    `env` names the variables whose change invalidates it too (e.g. rustup's).
    """

    kind: str
    run: Callable[[Path], tuple[Verdict, list[Path]]]
    env: tuple[str, ...] = ()


def discover(
    cache_dir: Path | None,
    language: str,
    hint: str,
    override_variable: str,
    override_probe: Callable[[Path], Probe],
    candidates: Callable[[], Iterable[tuple[Probe, Path]]],
    adapt: Callable[[Toolchain, ProbeCache], Verdict] | None = None,
) -> Toolchain:
    """The first candidate (probe, path) whose probe, then `adapt`, accepts it.

    `$override_variable` names the one compiler to use instead, which then must qualify.
    """
    cache = ProbeCache(
        (default_cache_dir() if cache_dir is None else cache_dir) / TOOLCHAIN_CACHE_NAME
    )

    def qualify(probe: Probe, compiler: Path) -> Verdict:
        verdict = cache.verdict(compiler, probe)
        if verdict.toolchain is None or adapt is None:
            return verdict
        return adapt(verdict.toolchain, cache)

    try:
        override = os.environ.get(override_variable)
        if override:
            compiler = resolve_command(override)
            if compiler is None:
                raise ToolchainMissing(
                    language, f"${override_variable}={override} is not an executable file"
                )
            verdict = qualify(override_probe(compiler), compiler)
            if verdict.toolchain is None:
                raise ToolchainMissing(
                    language, f"${override_variable}={override}: {verdict.reason}"
                )
            return verdict.toolchain
        rejected: list[str] = []
        for probe, candidate in candidates():
            verdict = qualify(probe, candidate)
            if verdict.toolchain is not None:
                return verdict.toolchain
            rejected.append(f"{candidate} ({verdict.reason})")
        checked = f"; checked {', '.join(rejected)}" if rejected else ""
        raise ToolchainMissing(language, hint + checked)
    finally:
        cache.save()


def resolve_command(value: str) -> Path | None:
    """A path as given, or a bare command name looked up on PATH; None if not executable."""
    if os.sep in value:
        path = Path(value).expanduser()
        return path if is_executable(path) else None
    for directory in _path_dirs():
        path = directory / value
        if is_executable(path):
            return path
    return None


def is_executable(path: Path) -> bool:
    """Whether `path` is a file this process may execute."""
    return path.is_file() and os.access(path, os.X_OK)


def _path_dirs() -> Iterator[Path]:
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        # An empty entry means the current directory; never run a compiler found there.
        if entry:
            yield Path(entry).expanduser()


def command_candidates(
    name: str, fallbacks: Iterable[str] = (), search_path: bool = True
) -> Iterator[Path]:
    """Every executable `name` on PATH, then the fallbacks, each real file only once."""
    seen: set[str] = set()
    places = [directory / name for directory in _path_dirs()] if search_path else []
    places += [Path(fallback).expanduser() for fallback in fallbacks]
    for place in places:
        if not is_executable(place):
            continue
        real = os.path.realpath(place)
        if real in seen:
            continue
        seen.add(real)
        yield place


def package_binary(package: str, *relative: str) -> Path | None:
    """An executable shipped inside a Python package of this interpreter, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location, *relative)
        if is_executable(path):
            return path
    return None


def _stamp(path: Path) -> list[Any]:
    """What `stat` says about a file: enough to notice it was replaced, without running it."""
    try:
        status = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), status.st_mtime_ns, status.st_size]


def _env_of(probe: Probe) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in probe.env}


class ProbeCache:
    """Probe results per compiler, valid while the stamped files and the probe's variables match."""

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

    def verdict(self, candidate: Path, probe: Probe) -> Verdict:
        """The remembered verdict on `candidate` while still valid, else a fresh `probe` of it."""
        key = f"{probe.kind}:{candidate}"
        entry = self.entries.get(key)
        remembered = self._still_valid(entry, probe) if entry is not None else None
        if remembered is not None:
            return remembered
        verdict, stamped = probe.run(candidate)
        found = verdict.toolchain
        self.entries[key] = {
            "stamps": [_stamp(path) for path in stamped],
            "env": _env_of(probe),
            "toolchain": None
            if found is None
            else {
                "language": found.language,
                "compiler": str(found.compiler),
                "version": found.version,
                "target": found.target,
                "base_args": list(found.base_args),
                "env": [list(pair) for pair in found.env],
            },
            "reason": verdict.reason,
        }
        self.changed = True
        return verdict

    def _still_valid(self, entry: dict[str, Any], probe: Probe) -> Verdict | None:
        try:
            stamps = entry["stamps"]
            if entry["env"] != _env_of(probe) or not stamps:
                return None
            if any(_stamp(Path(stamp[0])) != stamp for stamp in stamps):
                return None
            found = entry["toolchain"]
            if found is None:
                return Verdict(None, str(entry["reason"]))
            toolchain = Toolchain(
                language=str(found["language"]),
                compiler=Path(found["compiler"]),
                version=str(found["version"]),
                target=str(found["target"]),
                base_args=tuple(str(arg) for arg in found.get("base_args", [])),
                env=tuple((str(name), str(value)) for name, value in found.get("env", [])),
            )
            return Verdict(toolchain, str(entry["reason"]))
        except (KeyError, TypeError, IndexError, ValueError, AttributeError):
            return None

    def save(self) -> None:
        """Write the cache atomically if a probe changed it; failure only costs speed later."""
        if not self.changed:
            return
        document = {"format": _TOOLCHAIN_CACHE_FORMAT, "candidates": self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(document, indent=1).encode("utf-8"))
        except (OSError, BuildError):
            pass
        self.changed = False


def run_probe(
    command: list[str], env: Mapping[str, str] | None = None, label: str | None = None
) -> tuple[str | None, str]:
    """Run a probe command; return (stdout, "") or (None, why it failed)."""
    label = label or f"`{' '.join(command[1:])}`"
    try:
        completed = subprocess.run(
            command,
            # A neutral directory: a compiler may follow files near its working directory
            # (a rustup proxy, a rust-toolchain file), which the cached verdict could not
            # notice.
            cwd=os.path.abspath(os.sep),
            env={**os.environ, **env} if env else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"{label} timed out"
    except OSError as exc:
        return None, f"cannot run it: {exc.strerror or exc}"
    if completed.returncode != 0:
        lines = completed.stderr.decode("utf-8", errors="replace").strip().splitlines()
        # The first line that says what is wrong, e.g. clang's "wasm-ld: error: ...".
        errors = [line for line in lines if "error" in line.lower()] or lines
        detail = f": {errors[0].strip()}" if errors else ""
        return None, f"{label} failed{detail}"
    return completed.stdout.decode("utf-8", errors="replace"), ""
