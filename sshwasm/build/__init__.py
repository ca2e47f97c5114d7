"""Turn a source file or project directory into a validated wasm32-wasi module, cached by hash.

One module per language (`rust`, `c`, `go`) says, as a `Language`, which files or project
manifests it takes, how to find its toolchain, its flags and how to run its compiler;
`registry` lists them. A ready `.wasm` is validated and copied into the cache as is. A warm
build (same source, same toolchain) runs no subprocess at all: toolchain discovery
(`probe`) is remembered in `toolchains.json` and re-checked with `stat` calls only, and the
module is found in the artifact cache (`cache`) by the hash of the source (for a project
directory, of every file in it), the compiler version and the flags.

The knobs tests point elsewhere (`RUST_FALLBACKS`, `ZIG_PACKAGES`, `WASI_SYSROOTS`,
`GO_PACKAGES`, `GO_FALLBACKS`) live in the language modules and are read there.
"""

from __future__ import annotations

from pathlib import Path

from sshwasm.errors import UsageError

from .c import C_HINT, C_TARGET, CXX_HINT, find_c_toolchain, find_cxx_toolchain
from .cache import Artifact, compile_cached, default_cache_dir, take_ready_module
from .go import GO_HINT, GO_MINIMUM, GO_TARGET, find_go_toolchain
from .language import WASM_SUFFIX, Toolchain
from .probe import TOOLCHAIN_CACHE_NAME
from .registry import detect_language, file_language, project_language
from .rust import CARGO_HINT, RUST_HINT, RUST_TARGETS, find_cargo_toolchain, find_rust_toolchain

__all__ = [
    "CARGO_HINT",
    "CXX_HINT",
    "C_HINT",
    "C_TARGET",
    "GO_HINT",
    "GO_MINIMUM",
    "GO_TARGET",
    "RUST_HINT",
    "RUST_TARGETS",
    "TOOLCHAIN_CACHE_NAME",
    "WASM_SUFFIX",
    "Artifact",
    "Toolchain",
    "build",
    "default_cache_dir",
    "detect_language",
    "find_c_toolchain",
    "find_cargo_toolchain",
    "find_cxx_toolchain",
    "find_go_toolchain",
    "find_rust_toolchain",
]


def build(source: Path, cache_dir: Path | None = None) -> Artifact:
    """Compile (or take) `source` as a wasm32-wasi command module in the cache and return it.

    `source` is a source file, a ready `.wasm`, or a project directory (Cargo.toml, go.mod).
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    if source.is_dir():
        language = project_language(source)
        toolchain = language.find_toolchain(cache_dir)
        assert language.fingerprint is not None, "every project language has a fingerprint"
        content = language.fingerprint(toolchain, source)
        return compile_cached(source, content, language, toolchain, cache_dir)
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"no such file: {source}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from exc
    if detect_language(source) == "wasm":
        return take_ready_module(source, data, cache_dir)
    language = file_language(source)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source} is not valid UTF-8 text (byte {exc.start})") from None
    toolchain = language.find_toolchain(cache_dir)
    return compile_cached(source, data, language, toolchain, cache_dir)
