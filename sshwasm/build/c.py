"""C and C++: zig cc / zig c++ (from PyPI's ziglang or PATH), or a clang with a WASI sysroot.

The flags for both languages are here, in `_c_flags` and `_cxx_flags`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

from sshwasm import paths

from .language import Invocation, Language, Toolchain, compiler_command
from .probe import (
    Probe,
    ProbeCache,
    Verdict,
    command_candidates,
    discover,
    package_binary,
    run_probe,
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

# Python packages that ship a compiler, looked up in this interpreter's environment.
ZIG_PACKAGES: tuple[str, ...] = ("ziglang",)
# Where a clang may find wasi-libc when it does not by itself (Debian's clang does).
WASI_SYSROOTS: tuple[str, ...] = ("/usr/share/wasi-sysroot", "/opt/wasi-sdk/share/wasi-sysroot")

C_TARGET = "wasm32-wasi"


# --- finding zig or clang ----------------------------------------------------------------


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
    clang_probe = CLANGXX_PROBE if cxx else CLANG_PROBE

    def candidates() -> Iterator[tuple[Probe, Path]]:
        for package in ZIG_PACKAGES:
            packaged = package_binary(package, "zig")
            if packaged is not None:
                yield ZIG_PROBE, packaged
        for path in command_candidates("zig"):
            yield ZIG_PROBE, path
        for path in command_candidates(clang):
            yield clang_probe, path

    def as_language(found: Toolchain, _: ProbeCache) -> Verdict:
        if found.language == "zig":
            return Verdict(
                replace(found, language=language, base_args=("c++" if cxx else "cc",)), ""
            )
        return Verdict(replace(found, language=language), "")

    return discover(
        cache_dir,
        language,
        CXX_HINT if cxx else C_HINT,
        "SSHWASM_CXX" if cxx else "SSHWASM_CC",
        lambda path: ZIG_PROBE if path.name.startswith("zig") else clang_probe,
        candidates,
        as_language,
    )


def _probe_zig(candidate: Path) -> tuple[Verdict, list[Path]]:
    # Every zig since 0.12 (the oldest tried) builds wasm32-wasi with its own wasi-libc.
    output, why = run_probe([str(candidate), "version"])
    if output is None:
        return Verdict(None, why), [candidate]
    version = f"zig {output.strip()}"
    return Verdict(Toolchain("zig", candidate, version, C_TARGET), version), [candidate]


_C_PROBE_PROGRAM = "int main(void) { return 0; }\n"
_CXX_PROBE_PROGRAM = '#include <string>\nint main() { return std::string("ok").size() != 2; }\n'


def _probe_clang(candidate: Path, cxx: bool) -> tuple[Verdict, list[Path]]:
    """Whether `candidate` links a wasm32-wasi program, by itself or with a known sysroot.

    A clang lists wasm32 among its targets without wasi-libc or the wasm builtins, so only a
    real compile and link says whether it can build one.
    """
    stamped = [candidate, *(Path(sysroot) for sysroot in WASI_SYSROOTS)]
    output, why = run_probe([str(candidate), "--version"])
    if output is None:
        return Verdict(None, why), stamped
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
            result, why = run_probe(command, label=f"linking a {C_TARGET} program")
            if result is not None:
                toolchain = Toolchain("clang", candidate, version, C_TARGET, base_args)
                return Verdict(toolchain, version), stamped
            failure = failure or why
    return Verdict(None, failure), stamped


ZIG_PROBE = Probe("zig", _probe_zig)
CLANG_PROBE = Probe("clang", partial(_probe_clang, cxx=False))
CLANGXX_PROBE = Probe("clang++", partial(_probe_clang, cxx=True))


# --- flags and the compiler run ----------------------------------------------------------


def _c_flags(toolchain: Toolchain, source: Path) -> tuple[str, ...]:
    return (*toolchain.base_args, f"--target={C_TARGET}", "-O2", "-s")


def _cxx_flags(toolchain: Toolchain, source: Path) -> tuple[str, ...]:
    # wasm32-wasi has no C++ exception support: code that throws fails to link without this.
    return (*_c_flags(toolchain, source), "-fno-exceptions")


def _c_command(
    toolchain: Toolchain, flags: tuple[str, ...], source: Path, work: Path
) -> Invocation:
    invocation = compiler_command(toolchain, flags, source, work)
    # zig builds wasi-libc (and libc++) once per cache, a minute's work: keep that cache
    # with ours rather than under HOME, which may be a fresh directory each time. A clang
    # ignores the variable.
    zig_cache = os.environ.get("ZIG_GLOBAL_CACHE_DIR") or str(paths.cache_dir() / "zig")
    return replace(invocation, env={**invocation.env, "ZIG_GLOBAL_CACHE_DIR": zig_cache})


C = Language("c", find_c_toolchain, _c_flags, _c_command, suffixes=(".c",))
CXX = Language("c++", find_cxx_toolchain, _cxx_flags, _c_command, suffixes=(".cc", ".cpp", ".cxx"))
LANGUAGES = (C, CXX)
