"""Building modules: toolchain discovery, compilation, the artifact cache and wasm inspection."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pkgutil
import shlex
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from ci_skips import beyond_our_control
from helpers import forbid_subprocesses, run_wasm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshwasm.build import (
    RUST_HINT,
    Artifact,
    Toolchain,
    build,
    default_cache_dir,
    detect_language,
    find_rust_toolchain,
)
from sshwasm.build import rust as rust_build
from sshwasm.build.probe import Probe, ProbeCache, Verdict
from sshwasm.errors import CompileError, InvalidModule, ToolchainMissing, UsageError
from sshwasm.wasmfile import WASM_PAGE_BYTES, ModuleInfo, inspect_module

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PROGRAMS = Path(__file__).resolve().parent / "programs"
DEBIAN_WASI_STD = Path("/usr/lib/rustlib/wasm32-wasi")


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME and module cache, and no rustc or rustup override from the developer.

    conftest's `isolated_home` already does most of this; the cache here is per test because
    these tests count compilations and inspect the cache directory.
    """
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SSHWASM_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("SSHWASM_RUSTC", "RUSTUP_TOOLCHAIN", "RUSTUP_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


@dataclass
class FakeRustc:
    """A shell script that answers like rustc and logs every call it gets."""

    path: Path
    sysroot: Path
    log: Path

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def make_fake_rustc(
    bin_dir: Path,
    sysroot: Path,
    targets: Sequence[str] = (),
    version: str = "rustc 9.9.9-fake",
    name: str = "rustc",
) -> FakeRustc:
    """Create `bin_dir/name`, whose sysroot has std for exactly `targets`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (sysroot / "lib" / "rustlib" / "x86_64-unknown-linux-gnu").mkdir(parents=True, exist_ok=True)
    for target in targets:
        (sysroot / "lib" / "rustlib" / target).mkdir(parents=True, exist_ok=True)
    log = bin_dir / f"{name}.log"
    script = bin_dir / name
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {shlex.quote(str(log))}\n'
        'case "$1" in\n'
        f"  --print) echo {shlex.quote(str(sysroot))} ;;\n"
        f"  -vV) printf '%s\\nrelease: fake\\n' {shlex.quote(version)} ;;\n"
        "  *) echo 'fake rustc cannot compile' >&2; exit 1 ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return FakeRustc(script, sysroot, log)


def only_path(monkeypatch: pytest.MonkeyPatch, *directories: Path) -> None:
    """PATH made of exactly these directories, and no fallback locations."""
    monkeypatch.setenv("PATH", os.pathsep.join(str(d) for d in directories))
    monkeypatch.setattr(rust_build, "RUST_FALLBACKS", ())


# Hand-built modules: small enough to reason about byte by byte.


def uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wasm_name(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return uleb(len(raw)) + raw


def section(section_id: int, payload: bytes) -> bytes:
    return bytes([section_id]) + uleb(len(payload)) + payload


def vector(*items: bytes) -> bytes:
    return uleb(len(items)) + b"".join(items)


def wasm(*sections: bytes) -> bytes:
    return b"\0asm\x01\0\0\0" + b"".join(sections)


def command_module(memory_pages: int = 1, entry: str = "_start") -> bytes:
    """A valid module whose `entry` does nothing, with one defined memory."""
    return wasm(
        section(1, vector(b"\x60\x00\x00")),  # type 0: () -> ()
        section(3, vector(uleb(0))),  # function 0 has type 0
        section(5, vector(b"\x00" + uleb(memory_pages))),
        section(7, vector(wasm_name(entry) + b"\x00\x00", wasm_name("memory") + b"\x02\x00")),
        section(0, wasm_name("a custom section") + b"ignored \xff bytes"),
        section(10, vector(uleb(2) + b"\x00\x0b")),  # body: no locals, end
    )


def importing_module() -> bytes:
    """Imports of every kind, an imported memory of 17 pages and a defined one of 3."""
    imports = vector(
        wasm_name("wasi_snapshot_preview1") + wasm_name("fd_write") + b"\x00" + uleb(0),
        wasm_name("env") + wasm_name("table") + b"\x01\x70\x01\x01\x10",
        wasm_name("env") + wasm_name("memory") + b"\x02\x01" + uleb(17) + uleb(100),
        wasm_name("env") + wasm_name("g") + b"\x03\x7f\x01",
        wasm_name("env") + wasm_name("ref") + b"\x03\x64\x70\x00",
    )
    return wasm(
        section(1, vector(b"\x60\x04\x7f\x7f\x7f\x7f\x01\x7f")),
        section(2, imports),
        section(5, vector(b"\x00" + uleb(3))),
        section(7, vector(wasm_name("main") + b"\x00\x00")),
    )


# --- detect_language ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "language"),
    [
        ("hello.rs", "rust"),
        ("HELLO.RS", "rust"),
        ("a.b.wasm", "wasm"),
        ("x.WASM", "wasm"),
        ("main.c", "c"),
        ("main.cc", "c++"),
        ("main.cpp", "c++"),
        ("main.CXX", "c++"),
        ("main.go", "go"),
    ],
)
def test_detect_language_by_extension(name: str, language: str) -> None:
    assert detect_language(Path(name)) == language


@pytest.mark.parametrize("name", ["hello.py", "hello", "hello.rs.txt", "main.h", "main.c++"])
def test_detect_language_rejects_others_naming_the_supported_ones(name: str) -> None:
    with pytest.raises(UsageError) as caught:
        detect_language(Path(name))
    assert name in str(caught.value)
    for supported in (".rs", ".c", ".cpp", ".go", ".wasm", "Cargo.toml", "go.mod"):
        assert supported in str(caught.value)


# --- toolchain discovery -----------------------------------------------------------------


@pytest.mark.skipif(not DEBIAN_WASI_STD.is_dir(), reason="Debian's rustc wasm32-wasi std absent")
def test_discovery_looks_past_a_rustc_without_wasm_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_target = make_fake_rustc(tmp_path / "rustup-bin", tmp_path / "host-only-sysroot")
    monkeypatch.setenv(
        "PATH", os.pathsep.join([str(no_target.path.parent), os.environ.get("PATH", "")])
    )

    toolchain = find_rust_toolchain(tmp_path / "cache")

    assert "--print sysroot" in no_target.calls()
    assert toolchain.language == "rust"
    assert toolchain.compiler.resolve() == Path("/usr/bin/rustc").resolve()
    assert toolchain.target == "wasm32-wasi"
    assert toolchain.version.startswith("rustc 1.")
    assert "release:" in toolchain.version


def test_discovery_tries_every_path_directory_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_fake_rustc(tmp_path / "bin1", tmp_path / "root1")
    second = make_fake_rustc(
        tmp_path / "bin2", tmp_path / "root2", ["wasm32-wasi", "wasm32-wasip1"], "rustc 2.0.0"
    )
    third = make_fake_rustc(tmp_path / "bin3", tmp_path / "root3", ["wasm32-wasi"])
    not_executable = tmp_path / "bin0" / "rustc"
    not_executable.parent.mkdir()
    not_executable.write_text("#!/bin/sh\nexit 1\n")
    only_path(monkeypatch, not_executable.parent, first.path.parent, second.path.parent)
    monkeypatch.setattr(rust_build, "RUST_FALLBACKS", (str(third.path),))

    toolchain = find_rust_toolchain(tmp_path / "cache")

    assert toolchain.compiler == second.path
    assert toolchain.target == "wasm32-wasip1", "wasip1 is preferred when both exist"
    assert toolchain.version == "rustc 2.0.0\nrelease: fake\n"
    assert first.calls() == ["--print sysroot"]
    assert third.calls() == [], "discovery stops at the first rustc that qualifies"


def test_discovery_uses_the_fallbacks_after_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fallback = make_fake_rustc(tmp_path / "opt", tmp_path / "root", ["wasm32-wasi"])
    only_path(monkeypatch, tmp_path / "empty")
    monkeypatch.setattr(rust_build, "RUST_FALLBACKS", (str(fallback.path),))

    toolchain = find_rust_toolchain(tmp_path / "cache")

    assert toolchain.compiler == fallback.path
    assert toolchain.target == "wasm32-wasi"


def test_discovery_compiles_with_the_rustc_a_proxy_resolves_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Like rustup: ~/.cargo/bin/rustc reports a sysroot whose bin/rustc is the real compiler.
    sysroot = tmp_path / "toolchains" / "stable"
    real = make_fake_rustc(sysroot / "bin", sysroot, ["wasm32-wasip1"], "rustc 1.95.0")
    proxy = make_fake_rustc(tmp_path / "cargo-bin", sysroot, version="rustc from the proxy")
    only_path(monkeypatch, proxy.path.parent)

    toolchain = find_rust_toolchain(tmp_path / "cache")

    assert toolchain.compiler == real.path
    assert toolchain.version == "rustc 1.95.0\nrelease: fake\n"
    assert proxy.calls() == ["--print sysroot"]


def test_discovery_is_remembered_and_runs_no_subprocess_when_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_fake_rustc(tmp_path / "bin1", tmp_path / "root1")
    second = make_fake_rustc(tmp_path / "bin2", tmp_path / "root2", ["wasm32-wasi"])
    only_path(monkeypatch, first.path.parent, second.path.parent)
    cold = find_rust_toolchain(tmp_path / "cache")
    assert (tmp_path / "cache" / "toolchains.json").is_file()

    with monkeypatch.context() as patch:
        attempts = forbid_subprocesses(patch)
        warm = find_rust_toolchain(tmp_path / "cache")
    assert warm == cold
    assert attempts == []

    # `rustup target add` adds a directory to the sysroot: the rejected rustc now qualifies.
    rustlib = first.sysroot / "lib" / "rustlib"
    before = rustlib.stat().st_mtime_ns
    (rustlib / "wasm32-wasip1").mkdir()
    os.utime(rustlib, ns=(before + 10**9, before + 10**9))
    assert find_rust_toolchain(tmp_path / "cache").compiler == first.path


def test_discovery_notices_a_replaced_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = make_fake_rustc(tmp_path / "bin", tmp_path / "root", ["wasm32-wasi"], "rustc 1.0.0")
    only_path(monkeypatch, fake.path.parent)
    assert find_rust_toolchain(tmp_path / "cache").version.startswith("rustc 1.0.0")

    make_fake_rustc(tmp_path / "bin", tmp_path / "root", ["wasm32-wasi"], "rustc 1.1.0-upgraded")

    assert find_rust_toolchain(tmp_path / "cache").version.startswith("rustc 1.1.0-upgraded")


def test_a_damaged_toolchain_cache_is_probed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = make_fake_rustc(tmp_path / "bin", tmp_path / "root", ["wasm32-wasi"])
    only_path(monkeypatch, fake.path.parent)
    cache_file = tmp_path / "cache" / "toolchains.json"
    cache_file.parent.mkdir()
    key = f"rust:{fake.path}"
    cache_file.write_text('{"format": 2, "candidates": {"' + key + '": [1, 2')

    assert find_rust_toolchain(tmp_path / "cache").compiler == fake.path
    assert key in json.loads(cache_file.read_text())["candidates"]

    entries = {key: {"stamps": "garbage", "env": {}, "toolchain": 3}}
    cache_file.write_text(json.dumps({"format": 2, "candidates": entries}))
    assert find_rust_toolchain(tmp_path / "cache").compiler == fake.path


def test_a_rustup_variable_makes_rustc_be_probed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = make_fake_rustc(tmp_path / "bin", tmp_path / "root", ["wasm32-wasi"])
    only_path(monkeypatch, fake.path.parent)
    find_rust_toolchain(tmp_path / "cache")
    find_rust_toolchain(tmp_path / "cache")
    assert fake.calls() == ["--print sysroot", "-vV"]

    # A rustup proxy would now run another toolchain, with the same files on disk.
    monkeypatch.setenv("RUSTUP_TOOLCHAIN", "nightly")
    find_rust_toolchain(tmp_path / "cache")
    assert fake.calls() == ["--print sysroot", "-vV"] * 2


def test_the_probe_cache_knows_only_the_variables_each_probe_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiler = tmp_path / "cc"
    compiler.write_text("")
    probed: list[str] = []

    def run(kind: str, candidate: Path) -> tuple[Verdict, list[Path]]:
        probed.append(kind)
        return Verdict(Toolchain(kind, candidate, "v1", "wasm32-wasi"), "ok"), [candidate]

    steered = Probe("steered", partial(run, "steered"), env=("SSHWASM_TEST_STEER",))
    plain = Probe("plain", partial(run, "plain"))
    cache_file = tmp_path / "toolchains.json"
    # A file of the first format (plain paths as keys) is not read, only replaced.
    cache_file.write_text(json.dumps({"format": 1, "candidates": {str(compiler): {}}}))

    def verdicts() -> list[Verdict]:
        cache = ProbeCache(cache_file)
        found = [cache.verdict(compiler, steered), cache.verdict(compiler, plain)]
        cache.save()
        return found

    first = verdicts()
    assert probed == ["steered", "plain"]
    assert [v.toolchain.language for v in first if v.toolchain] == ["steered", "plain"]
    assert verdicts() == first
    assert probed == ["steered", "plain"], "remembered while nothing changed"

    monkeypatch.setenv("SSHWASM_TEST_STEER", "other")
    assert verdicts() == first
    assert probed == ["steered", "plain", "steered"], "only the probe naming it runs again"


def test_every_language_module_is_registered_once() -> None:
    import sshwasm.build
    from sshwasm.build import registry

    declared = [
        language
        for info in pkgutil.iter_modules(sshwasm.build.__path__, "sshwasm.build.")
        if info.name != registry.__name__
        for language in getattr(importlib.import_module(info.name), "LANGUAGES", ())
    ]
    assert sorted(map(id, declared)) == sorted(map(id, registry.LANGUAGES))
    suffixes = [suffix for language in registry.LANGUAGES for suffix in language.suffixes]
    assert len(suffixes) == len(set(suffixes)), "one language per file extension"
    assert all(suffix == suffix.lower() and suffix.startswith(".") for suffix in suffixes)
    for language in registry.LANGUAGES:
        assert (language.manifest is None) == (language.fingerprint is None), language.name


def test_sshwasm_rustc_overrides_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = make_fake_rustc(tmp_path / "bin", tmp_path / "root", ["wasm32-wasip1"])
    chosen = make_fake_rustc(tmp_path / "mine", tmp_path / "mine-root", ["wasm32-wasi"])
    only_path(monkeypatch, on_path.path.parent)
    monkeypatch.setenv("SSHWASM_RUSTC", str(chosen.path))

    toolchain = find_rust_toolchain(tmp_path / "cache")

    assert toolchain.compiler == chosen.path
    assert toolchain.target == "wasm32-wasi"
    assert on_path.calls() == []


def test_sshwasm_rustc_may_be_a_command_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    named = make_fake_rustc(tmp_path / "bin", tmp_path / "root", ["wasm32-wasi"], name="rustc-w")
    only_path(monkeypatch, named.path.parent)
    monkeypatch.setenv("SSHWASM_RUSTC", "rustc-w")

    assert find_rust_toolchain(tmp_path / "cache").compiler == named.path


def test_sshwasm_rustc_without_wasm_std_is_an_error_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usable = make_fake_rustc(tmp_path / "bin", tmp_path / "root", ["wasm32-wasip1"])
    unusable = make_fake_rustc(tmp_path / "mine", tmp_path / "mine-root")
    only_path(monkeypatch, usable.path.parent)
    monkeypatch.setenv("SSHWASM_RUSTC", str(unusable.path))

    with pytest.raises(ToolchainMissing) as caught:
        find_rust_toolchain(tmp_path / "cache")

    assert f"$SSHWASM_RUSTC={unusable.path}" in str(caught.value)
    assert str(unusable.sysroot) in str(caught.value)


def test_sshwasm_rustc_that_does_not_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere" / "rustc"
    monkeypatch.setenv("SSHWASM_RUSTC", str(missing))

    with pytest.raises(ToolchainMissing) as caught:
        find_rust_toolchain(tmp_path / "cache")

    assert caught.value.language == "rust"
    assert str(missing) in str(caught.value)


def test_no_toolchain_says_how_to_install_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_path(monkeypatch, tmp_path / "empty")

    with pytest.raises(ToolchainMissing) as caught:
        find_rust_toolchain(tmp_path / "cache")

    assert caught.value.language == "rust"
    assert caught.value.hint == RUST_HINT
    assert "rustup target add wasm32-wasip1" in str(caught.value)
    assert "apt-get install rustc libstd-rust-dev-wasm32" in str(caught.value)


def test_no_toolchain_names_the_rustc_it_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "bin" / "rustc"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\necho 'error: no default toolchain' >&2\nexit 1\n")
    broken.chmod(0o755)
    host_only = make_fake_rustc(tmp_path / "bin2", tmp_path / "root")
    only_path(monkeypatch, broken.parent, host_only.path.parent)

    with pytest.raises(ToolchainMissing) as caught:
        find_rust_toolchain(tmp_path / "cache")

    message = str(caught.value)
    assert message.startswith(f"no rust toolchain for wasm32-wasi found: {RUST_HINT}")
    assert f"{broken} (`--print sysroot` failed: error: no default toolchain)" in message
    assert f"{host_only.path} (no wasm32-wasip1 or wasm32-wasi std in {host_only.sysroot})" in (
        message
    )


def test_build_without_toolchain_raises_toolchain_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_path(monkeypatch, tmp_path / "empty")
    source = tmp_path / "hello.rs"
    shutil.copy(EXAMPLES / "hello.rs", source)

    with pytest.raises(ToolchainMissing):
        build(source, tmp_path / "cache")


# --- compiling ---------------------------------------------------------------------------


def test_hello_compiles_to_a_small_wasi_command(built: dict[str, Artifact]) -> None:
    hello = built["hello"]
    module = hello.path.read_bytes()

    assert hello.language == "rust"
    assert hello.path.suffix == ".wasm"
    assert hello.info.is_wasi_command
    assert hello.info == inspect_module(module)
    assert hello.size == len(module) < 1_000_000, "symbols must be stripped"
    assert hello.sha256 == hashlib.sha256(module).hexdigest()
    assert hello.path.parent != EXAMPLES
    assert ("wasi_snapshot_preview1", "poll_oneoff") in hello.info.imports


def test_inspect_module_agrees_with_wasmtime(built: dict[str, Artifact]) -> None:
    from wasmtime import Engine, MemoryType, Module

    for artifact in built.values():
        module = Module(Engine(), artifact.path.read_bytes())
        assert artifact.info.exports == tuple(export.name for export in module.exports)
        assert artifact.info.imports == tuple((i.module, i.name) for i in module.imports)
        memory = next(e.type for e in module.exports if e.name == "memory")
        assert isinstance(memory, MemoryType)
        assert artifact.info.initial_memory_bytes == memory.limits.min * WASM_PAGE_BYTES


def test_second_build_is_a_cache_hit_without_subprocess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "src" / "fail.rs"
    source.parent.mkdir()
    shutil.copy(EXAMPLES / "fail.rs", source)
    cold = build(source)  # default cache dir, which the fixture moved into tmp_path
    assert cold.path.parent == default_cache_dir() == tmp_path / "cache" / "wasm"
    assert not cold.cached
    assert cold.compile_s > 0.0

    attempts = forbid_subprocesses(monkeypatch)
    warm = build(source)

    assert attempts == []
    assert warm.cached
    assert warm.compile_s == 0.0
    assert (warm.path, warm.sha256, warm.size, warm.info) == (
        cold.path,
        cold.sha256,
        cold.size,
        cold.info,
    )


def test_a_changed_source_is_compiled_again(tmp_path: Path) -> None:
    source = tmp_path / "exitcode.rs"
    shutil.copy(PROGRAMS / "exitcode.rs", source)
    first = build(source, tmp_path / "cache")
    source.write_text(source.read_text() + "\n// changed\n")

    second = build(source, tmp_path / "cache")

    assert not second.cached
    assert second.path != first.path
    assert first.path.is_file()


def test_a_damaged_cached_module_is_rebuilt(tmp_path: Path) -> None:
    source = tmp_path / "fail.rs"
    shutil.copy(EXAMPLES / "fail.rs", source)
    first = build(source, tmp_path / "cache")
    first.path.write_bytes(first.path.read_bytes()[:1000])

    again = build(source, tmp_path / "cache")

    assert not again.cached
    assert again.path == first.path
    assert again.sha256 == first.sha256
    assert hashlib.sha256(again.path.read_bytes()).hexdigest() == first.sha256


def test_concurrent_builds_of_one_source_share_one_artifact(tmp_path: Path) -> None:
    source = tmp_path / "fail.rs"
    shutil.copy(EXAMPLES / "fail.rs", source)
    cache = tmp_path / "cache"
    find_rust_toolchain(cache)  # so both builds compile, rather than one waiting on probes

    barrier = threading.Barrier(3)

    def build_after_barrier(_: int) -> Artifact:
        barrier.wait()
        return build(source, cache)

    with ThreadPoolExecutor(max_workers=3) as pool:
        artifacts = list(pool.map(build_after_barrier, range(3)))

    assert len({(a.path, a.sha256) for a in artifacts}) == 1
    assert inspect_module(artifacts[0].path.read_bytes()).is_wasi_command
    leftovers = sorted(p.name for p in cache.iterdir() if p.name != "toolchains.json")
    assert leftovers == [artifacts[0].path.name], "no temporary files are left behind"


def test_a_file_name_rustc_would_reject_as_crate_name(tmp_path: Path) -> None:
    source = tmp_path / "my prog-2.rs"
    shutil.copy(EXAMPLES / "fail.rs", source)

    assert build(source, tmp_path / "cache").info.is_wasi_command


def test_compile_error_carries_rustc_diagnostics(tmp_path: Path) -> None:
    source = tmp_path / "compile_error.rs"
    shutil.copy(PROGRAMS / "compile_error.rs", source)
    cache = tmp_path / "cache"

    with pytest.raises(CompileError) as caught:
        build(source, cache)

    assert caught.value.source == str(source)
    assert "error[E0308]: mismatched types" in caught.value.diagnostics
    assert "compile_error.rs:4:" in caught.value.diagnostics
    assert list(cache.glob("*.wasm")) == []
    assert list(cache.glob(".build-*")) == []


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^no such file: .*nothere\.rs$"):
        build(tmp_path / "nothere.rs", tmp_path / "cache")


def test_directory_source(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"is a directory without Cargo\.toml or go\.mod"):
        build(tmp_path, tmp_path / "cache")


def test_unsupported_extension(tmp_path: Path) -> None:
    source = tmp_path / "job.py"
    source.write_text("print('hi')\n")

    with pytest.raises(UsageError, match=r"job\.py.*\.rs, \.c, .*\.go, \.wasm"):
        build(source, tmp_path / "cache")


def test_source_that_is_not_utf8_is_rejected_before_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "latin1.rs"
    source.write_bytes('fn main() { println!("caf\xe9"); }\n'.encode("latin-1"))
    attempts = forbid_subprocesses(monkeypatch)

    with pytest.raises(UsageError, match=r"latin1\.rs is not valid UTF-8"):
        build(source, tmp_path / "cache")
    assert attempts == []


@pytest.mark.skipif(
    os.geteuid() == 0, reason=beyond_our_control("as root, files are readable whatever their mode")
)
def test_unreadable_source(tmp_path: Path) -> None:
    source = tmp_path / "secret.rs"
    source.write_text("fn main() {}\n")
    source.chmod(0)

    with pytest.raises(UsageError, match=r"cannot read .*secret\.rs"):
        build(source, tmp_path / "cache")


# --- ready .wasm input -------------------------------------------------------------------


def test_ready_wasm_is_validated_and_copied_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "ready.wasm"
    source.write_bytes(command_module(memory_pages=2))
    attempts = forbid_subprocesses(monkeypatch)
    cache = tmp_path / "cache"

    first = build(source, cache)
    second = build(source, cache)

    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert first.path == cache / f"{digest}.wasm"
    assert first.path.read_bytes() == source.read_bytes()
    assert (first.sha256, first.size, first.language) == (digest, source.stat().st_size, "wasm")
    assert first.info.initial_memory_bytes == 2 * WASM_PAGE_BYTES
    assert (first.compile_s, first.cached) == (0.0, False)
    assert (second.path, second.compile_s, second.cached) == (first.path, 0.0, True)
    assert attempts == []


def test_ready_wasm_from_the_compiler_runs(built: dict[str, Artifact], tmp_path: Path) -> None:
    source = tmp_path / "hello.wasm"
    shutil.copy(built["hello"].path, source)

    artifact = build(source, tmp_path / "cache")

    assert artifact.sha256 == built["hello"].sha256
    outcome = run_wasm(artifact.path, tmp_path, env=[("HELLO_SLEEP_S", "0")])
    assert outcome == (0, "job done, hello!\n", "")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "bad magic"),
        (b"hello world, not wasm at all", "bad magic"),
        (b"\0asm\x0d\0\x01\0" + b"\x01\x00", "components are not supported"),
        (b"\0asm\x02\0\0\0", "unsupported WebAssembly version 2"),
        (command_module()[:-3], "truncated"),
        (command_module(entry="main"), "no `_start`"),
    ],
    ids=["empty", "garbage", "component", "version", "truncated", "no-start"],
)
def test_invalid_ready_wasm(tmp_path: Path, content: bytes, reason: str) -> None:
    source = tmp_path / "bad.wasm"
    source.write_bytes(content)

    with pytest.raises(InvalidModule) as caught:
        build(source, tmp_path / "cache")

    message = str(caught.value)
    assert message.startswith(f"{source}: ")
    assert reason in message
    assert "\n" not in message
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_truncated_compiled_module_is_invalid(built: dict[str, Artifact], tmp_path: Path) -> None:
    source = tmp_path / "half.wasm"
    source.write_bytes(built["hello"].path.read_bytes()[: built["hello"].size // 2])

    with pytest.raises(InvalidModule, match="truncated"):
        build(source, tmp_path / "cache")


# --- the example and test programs behave as documented ---------------------------------


PROGRAM_CASES: list[tuple[str, dict[str, Any], int | str, str, str]] = [
    ("hello", {"env": [("HELLO_SLEEP_S", "0.01")]}, 0, "job done, hello!\n", ""),
    ("hello", {"env": [("HELLO_SLEEP_S", "soon")]}, 2, "", "HELLO_SLEEP_S must be"),
    (
        "echo",
        {"args": ["a b", ""], "env": [("GREETING", "hi there")], "stdin": "1 2\nx -10\n\n"},
        0,
        "arg[1]=a b\narg[2]=\nGREETING=hi there\nstdin lines: 3\nsum: -7\n",
        "",
    ),
    ("echo", {}, 0, "stdin lines: 0\nsum: 0\n", ""),
    ("fail", {}, 3, "", "about to fail\n"),
    ("panic", {}, "UNREACHABLE", "", "panicked at 'boom'"),
    ("alloc", {"args": ["20"]}, 0, "allocated 20 MiB\n", ""),
    ("alloc", {"args": ["100"], "memory_bytes": 64 << 20}, "UNREACHABLE", "", "memory allocation"),
    ("sleep", {"args": ["0.01"]}, 0, "start\nend\n", ""),
    ("bigout", {"args": ["3"]}, 0, "line 1\nline 2\nline 3\n", ""),
    ("bigout", {"args": ["0"]}, 0, "", ""),
    ("exitcode", {"args": ["7"]}, 7, "", ""),
    ("exitcode", {"args": ["0"]}, 0, "", ""),
    ("spin", {"interrupt_after_s": 0.2}, "INTERRUPT", "spinning\n", ""),
]


@pytest.mark.parametrize(
    ("program", "options", "outcome", "stdout", "stderr"),
    PROGRAM_CASES,
    ids=[f"{case[0]}-{index}" for index, case in enumerate(PROGRAM_CASES)],
)
def test_program_behaviour(
    built: dict[str, Artifact],
    tmp_path: Path,
    program: str,
    options: dict[str, Any],
    outcome: int | str,
    stdout: str,
    stderr: str,
) -> None:
    result = run_wasm(built[program].path, tmp_path, **options)

    assert result[0] == outcome
    assert result[1] == stdout
    assert stderr in result[2] if stderr else result[2] == ""


def test_big_output_has_every_line(built: dict[str, Artifact], tmp_path: Path) -> None:
    _, stdout, _ = run_wasm(built["bigout"].path, tmp_path, args=["20000"])

    lines = stdout.splitlines()
    assert len(lines) == 20000
    assert (lines[0], lines[-1]) == ("line 1", "line 20000")


# --- wasmfile ----------------------------------------------------------------------------


def test_inspect_reports_exports_imports_and_memory() -> None:
    info = inspect_module(command_module(memory_pages=3))

    assert info == ModuleInfo(
        exports=("_start", "memory"), imports=(), initial_memory_bytes=3 * WASM_PAGE_BYTES
    )
    assert info.is_wasi_command


def test_an_imported_memory_is_memory_zero() -> None:
    info = inspect_module(importing_module())

    assert info.imports == (
        ("wasi_snapshot_preview1", "fd_write"),
        ("env", "table"),
        ("env", "memory"),
        ("env", "g"),
        ("env", "ref"),
    )
    assert info.exports == ("main",)
    assert not info.is_wasi_command
    assert info.initial_memory_bytes == 17 * WASM_PAGE_BYTES


def test_a_module_without_memory_or_sections() -> None:
    assert inspect_module(wasm()) == ModuleInfo(exports=(), imports=(), initial_memory_bytes=0)


def test_memory64_and_custom_page_sizes() -> None:
    memory64 = wasm(section(5, vector(b"\x05" + uleb(2**33) + uleb(2**34))))
    small_pages = wasm(section(5, vector(b"\x08" + uleb(10) + uleb(0))))

    assert inspect_module(memory64).initial_memory_bytes == 2**33 * WASM_PAGE_BYTES
    assert inspect_module(small_pages).initial_memory_bytes == 10


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\0as", "bad magic"),
        (b"\0ASM\x01\0\0\0", "bad magic"),
        (wasm(b"\x07\x80\x80\x80\x80\x80\x01"), "LEB128"),
        (wasm(b"\x07\x80\x80\x80\x80\x10"), "LEB128"),
        (wasm(b"\x07\x10\x00"), "truncated"),
        (wasm(section(7, vector(wasm_name(b"\xff\xfe") + b"\x00\x00"))), "UTF-8"),
        (wasm(section(7, vector(wasm_name("f") + b"\x09\x00"))), "export kind"),
        (wasm(section(2, vector(wasm_name("m") + wasm_name("f") + b"\x07"))), "import kind"),
        (wasm(section(5, vector(b"\x00\x01") + b"\x00")), "trailing bytes"),
        (wasm(section(5, vector(b"\x40\x01"))), "flags"),
        (wasm(section(7, uleb(3) + wasm_name("a") + b"\x00\x00")), "truncated"),
    ],
    ids=[
        "short",
        "wrong-magic",
        "leb-too-long",
        "leb-too-big",
        "section-past-end",
        "bad-utf8",
        "export-kind",
        "import-kind",
        "trailing",
        "limits-flags",
        "too-few-entries",
    ],
)
def test_inspect_rejects_malformed_modules(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidModule, match=reason):
        inspect_module(data)


def test_hand_built_modules_are_valid_for_wasmtime() -> None:
    from wasmtime import Engine, Module

    # Keeps the byte-level fixtures above honest: wasmtime accepts them too.
    Module.validate(Engine(), command_module())
    Module.validate(Engine(), command_module(entry="main"))


def check_only_info_or_invalid(data: bytes) -> None:
    try:
        info = inspect_module(data)
    except InvalidModule as exc:
        assert str(exc)
    else:
        assert isinstance(info, ModuleInfo)
        assert info.initial_memory_bytes >= 0


@given(st.binary(max_size=300))
def test_random_bytes_give_info_or_invalid_module(data: bytes) -> None:
    check_only_info_or_invalid(data)


@given(st.binary(max_size=300))
def test_random_bodies_after_a_valid_header(data: bytes) -> None:
    check_only_info_or_invalid(b"\0asm\x01\0\0\0" + data)


@given(
    sections=st.lists(
        st.tuples(st.sampled_from([0, 1, 2, 3, 5, 7, 10, 11, 12, 13, 42]), st.binary(max_size=40)),
        max_size=6,
    )
)
def test_random_sections_give_info_or_invalid_module(sections: list[tuple[int, bytes]]) -> None:
    check_only_info_or_invalid(wasm(*(section(i, payload) for i, payload in sections)))


VALID_MODULES = [command_module(), importing_module(), command_module(memory_pages=300)]


@st.composite
def mutated_modules(draw: Callable[..., Any]) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_MODULES)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "truncate":
            del data[position:]
        elif not data:
            break
        elif action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[position : position + draw(st.integers(1, 8))]
    return bytes(data)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_modules())
def test_mutated_modules_give_info_or_invalid_module(data: bytes) -> None:
    check_only_info_or_invalid(data)


def test_mutating_every_byte_of_a_real_module(built: dict[str, Artifact]) -> None:
    # Exhaustive over the header and the sections read (imports, exports, memory).
    module = built["echo"].path.read_bytes()
    reader_end = _end_of_export_section(module)
    for position in range(reader_end):
        for replacement in (0x00, 0x7F, 0x80, 0xFF, module[position] ^ 0x01):
            mutated = module[:position] + bytes([replacement]) + module[position + 1 :]
            check_only_info_or_invalid(mutated)
        check_only_info_or_invalid(module[:position])


def _end_of_export_section(module: bytes) -> int:
    """Offset just past the export section (id 7) of a valid module."""
    position = 8
    while position < len(module):
        section_id = module[position]
        size, shift, position = 0, 0, position + 1
        while True:
            byte = module[position]
            position += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        position += size
        if section_id == 7:
            return position
    raise AssertionError("module has no export section")
