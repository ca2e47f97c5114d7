"""Rust: single `.rs` files with rustc, and Cargo projects with that rustc's own cargo."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from sshwasm import paths
from sshwasm.errors import BuildError, UsageError

from .language import (
    WASM_SUFFIX,
    Invocation,
    Language,
    Toolchain,
    compiler_command,
    run_tool,
    tree_digest,
)
from .probe import (
    Probe,
    ProbeCache,
    Verdict,
    command_candidates,
    discover,
    is_executable,
    run_probe,
)

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

# Tried after every `rustc` on PATH; a module attribute so tests can point it elsewhere.
RUST_FALLBACKS: tuple[str, ...] = ("/usr/bin/rustc", "~/.cargo/bin/rustc")
# Variables that steer which toolchain a rustup proxy runs; a change invalidates the probe.
_RUSTUP_ENV = ("RUSTUP_TOOLCHAIN", "RUSTUP_HOME")


# --- finding rustc and cargo ---------------------------------------------------------------


def find_rust_toolchain(cache_dir: Path | None = None) -> Toolchain:
    """The first rustc with a wasm32-wasip1 or wasm32-wasi std; ToolchainMissing otherwise.

    Order: `$SSHWASM_RUSTC` (which then must qualify), every `rustc` on PATH in order, then
    `RUST_FALLBACKS`. Probe results are kept in `<cache_dir>/toolchains.json`.
    """
    return discover(
        cache_dir, "rust", RUST_HINT, "SSHWASM_RUSTC", lambda _: RUSTC_PROBE, _rustc_candidates
    )


def find_cargo_toolchain(cache_dir: Path | None = None) -> Toolchain:
    """Cargo paired with its own rustc: the first qualifying rustc with a `cargo` beside it.

    The rustcs are tried as by `find_rust_toolchain`. Each rustc needs its own cargo (a new
    cargo fails on an old rustc), so the cargo is run with RUSTC set to that rustc.
    """
    return discover(
        cache_dir,
        "rust",
        CARGO_HINT,
        "SSHWASM_RUSTC",
        lambda _: RUSTC_PROBE,
        _rustc_candidates,
        _with_cargo_beside,
    )


def _rustc_candidates() -> Iterator[tuple[Probe, Path]]:
    return ((RUSTC_PROBE, path) for path in command_candidates("rustc", RUST_FALLBACKS))


def _with_cargo_beside(rustc: Toolchain, cache: ProbeCache) -> Verdict:
    cargo = rustc.compiler.parent / "cargo"
    if not is_executable(cargo):
        return Verdict(None, f"has the {rustc.target} std, but no cargo beside it: {cargo}")
    verdict = cache.verdict(cargo, CARGO_PROBE)
    if verdict.toolchain is None:
        return Verdict(None, f"{cargo}: {verdict.reason}")
    toolchain = Toolchain(
        language="rust",
        compiler=cargo,
        version=verdict.toolchain.version + rustc.version,
        target=rustc.target,
        env=(("RUSTC", str(rustc.compiler)),),
    )
    return Verdict(toolchain, f"{verdict.reason} with {rustc.compiler}")


def _rustup_settings() -> Path:
    home = os.environ.get("RUSTUP_HOME")
    return (Path(home) if home else Path.home() / ".rustup") / "settings.toml"


def _probe_rustc(candidate: Path) -> tuple[Verdict, list[Path]]:
    """Ask `candidate` for its sysroot and version; return the verdict and files to stamp."""
    stamped = [candidate]
    output, why = run_probe([str(candidate), "--print", "sysroot"])
    if output is None:
        # A rustup proxy fails until a default toolchain is set, which changes this file.
        return Verdict(None, why), [candidate, _rustup_settings()]
    sysroot = Path(output.strip())
    rustlib = sysroot / "lib" / "rustlib"
    stamped.append(rustlib)
    target = next((t for t in RUST_TARGETS if (rustlib / t).is_dir()), None)
    # A rustup proxy picks its toolchain per call; compile with the real rustc it resolved
    # to, which is also faster and does not follow rust-toolchain files near the source.
    real = sysroot / "bin" / "rustc"
    compiler = real if is_executable(real) else candidate
    if compiler != candidate:
        stamped.append(compiler)
        if os.path.realpath(compiler) != os.path.realpath(candidate):
            stamped.append(_rustup_settings())
    if target is None:
        wanted = " or ".join(RUST_TARGETS)
        return Verdict(None, f"no {wanted} std in {sysroot}"), stamped
    version, why = run_probe([str(compiler), "-vV"])
    if version is None:
        return Verdict(None, why), stamped
    toolchain = Toolchain(language="rust", compiler=compiler, version=version, target=target)
    return Verdict(toolchain, f"{target} std in {sysroot}"), stamped


def _probe_cargo(candidate: Path) -> tuple[Verdict, list[Path]]:
    version, why = run_probe([str(candidate), "-V"])
    if version is None:
        return Verdict(None, why), [candidate]
    toolchain = Toolchain(language="cargo", compiler=candidate, version=version, target="")
    return Verdict(toolchain, version.strip()), [candidate]


RUSTC_PROBE = Probe("rust", _probe_rustc, env=_RUSTUP_ENV)
CARGO_PROBE = Probe("cargo", _probe_cargo, env=_RUSTUP_ENV)


# --- single files with rustc ---------------------------------------------------------------


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


# --- Cargo projects ----------------------------------------------------------------------


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
        run_tool(
            (str(toolchain.compiler), "generate-lockfile", "--offline"),
            project,
            _cargo_env(toolchain, project),
            project,
        )
    return tree_digest(project, _skip_cargo_entry)


def _skip_cargo_entry(directory: Path, name: str) -> bool:
    # `target/` beside a Cargo.toml is build output, whichever crate of the project it is in.
    return name == ".git" or (name == "target" and (directory / "Cargo.toml").is_file())


def _cargo_command(
    toolchain: Toolchain, flags: tuple[str, ...], project: Path, work: Path
) -> Invocation:
    env = _cargo_env(toolchain, project)
    # Absolute: cargo runs inside the project, where `proj/Cargo.toml` names nothing.
    manifest = project.absolute() / "Cargo.toml"
    completed = run_tool(
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
    return Invocation(
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


RUSTC = Language("rust", find_rust_toolchain, _rust_flags, compiler_command, suffixes=(".rs",))
CARGO = Language(
    "rust",
    find_cargo_toolchain,
    _cargo_flags,
    _cargo_command,
    manifest="Cargo.toml",
    fingerprint=_cargo_fingerprint,
)
LANGUAGES = (RUSTC, CARGO)
