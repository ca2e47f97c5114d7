"""Hardening of the runner (issue 8, items 7, 13 and 16), through `sshwasm run` on real sshd
hosts, real wasmtime and real SQLite: what a guest can allocate and for how long, and which
workdirs a runner accepts."""

from __future__ import annotations

import ast
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from helpers import (
    EXAMPLES,
    RUNNER_VERSION,
    Guest,
    no_traceback,
    run_frames,
    run_runner,
    sshwasm,
)

from sshwasm.runner.protocol import files_version, runner_files


def write_wat(path: Path, wat: str) -> Path:
    """A `.wasm` file (a valid SOURCE for `sshwasm run`) made from WebAssembly text."""
    path.write_bytes(wasmtime.wat2wasm(wat))
    return path


def run_json(cluster: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """`sshwasm --cluster CLUSTER run ARGS... --json`: exit status, job record, stderr."""
    result = sshwasm("--cluster", str(cluster), "run", *args, "--json")
    no_traceback(result)
    assert result.stdout.strip(), result.stderr
    record: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, record, result.stderr


# -- item 7: memory limits hold for everything a guest can allocate -------------------------

# Four memories grown to 40 MiB each (160 MiB under a 64 MiB limit), touching the last page
# of every one; prints "escaped" only if all of that worked.
MULTI_MEMORY = """(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory $a 1) (memory $b 1) (memory $c 1) (memory $d 1)
  (export "memory" (memory $a))
  (data $a (i32.const 16) "escaped\\n")
  (func $grow_and_touch (param $grown i32)
    (if (i32.eq (local.get $grown) (i32.const -1)) (then unreachable)))
  (func (export "_start")
    (call $grow_and_touch (memory.grow $a (i32.const 639)))
    (call $grow_and_touch (memory.grow $b (i32.const 639)))
    (call $grow_and_touch (memory.grow $c (i32.const 639)))
    (call $grow_and_touch (memory.grow $d (i32.const 639)))
    (i32.store $a (i32.const 41943036) (i32.const 1))
    (i32.store $b (i32.const 41943036) (i32.const 1))
    (i32.store $c (i32.const 41943036) (i32.const 1))
    (i32.store $d (i32.const 41943036) (i32.const 1))
    (i32.store $a (i32.const 0) (i32.const 16))
    (i32.store $a (i32.const 4) (i32.const 8))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""

# One funcref table grown to 2^25 elements: 256 MiB of table under a 64 MiB limit.
BIG_TABLE = """(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (table $t 1 funcref)
  (data (i32.const 16) "escaped\\n")
  (func (export "_start")
    (if (i32.eq (table.grow $t (ref.null func) (i32.const 33554432)) (i32.const -1))
      (then unreachable))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 8))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""

# Eight tables of 4 million elements each: 256 MiB again, each table under a per-table cap.
MANY_TABLES = (
    "(module"
    ' (import "wasi_snapshot_preview1" "fd_write"'
    " (func $fd_write (param i32 i32 i32 i32) (result i32)))"
    ' (memory (export "memory") 1)'
    + "".join(f" (table $t{i} 1 funcref)" for i in range(8))
    + ' (data (i32.const 16) "escaped\\n")'
    ' (func (export "_start")'
    + "".join(
        f" (if (i32.eq (table.grow $t{i} (ref.null func) (i32.const 4000000)) (i32.const -1))"
        " (then unreachable))"
        for i in range(8)
    )
    + " (i32.store (i32.const 0) (i32.const 16))"
    " (i32.store (i32.const 4) (i32.const 8))"
    " (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"
)


@pytest.mark.parametrize(
    ("wat", "reason"),
    [
        (MULTI_MEMORY, "memory count"),
        (BIG_TABLE, "UNREACHABLE"),
        (MANY_TABLES, "table count"),
    ],
    ids=["four-memories", "table-of-2^25", "eight-tables"],
)
def test_memory_limit_holds_for_every_memory_and_table(
    make_cluster: Callable[..., Path], tmp_path: Path, wat: str, reason: str
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    module = write_wat(tmp_path / "hostile.wasm", wat)
    code, record, _ = run_json(cluster, str(module), "--memory-mb", "64")
    assert record["state"] in ("out_of_memory", "failed"), record
    assert code != 0 and record["stdout"] == ""
    assert reason in record["error"], record["error"]


def test_the_limits_name_what_a_job_may_have(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    module = write_wat(tmp_path / "hostile.wasm", MULTI_MEMORY)
    _, record, _ = run_json(cluster, str(module), "--memory-mb", "64")
    assert record["state"] == "out_of_memory"
    assert "one linear memory of up to 64 MiB" in record["error"]


# -- item 7: compile time counts against the time limit -------------------------------------


def compile_bomb(depth: int = 40000) -> str:
    """One function of `depth` nested blocks and a br_table to each: a few hundred KiB of
    wasm that takes Cranelift seconds to compile (3.5-6 s measured at this depth on the
    2-core test machine; the time grows with the square of the depth)."""
    # Block i wraps blocks 0..i-1 and the br_table, block 0 innermost: built in one join
    # (wrapping a growing string once per level copied gigabytes, about 10 s).
    table = f"(br_table {' '.join(str(i) for i in range(depth))} (local.get 0))"
    ends = "".join(f" (local.set 0 (i32.add (local.get 0) (i32.const {i}))))" for i in range(depth))
    body = "(block " * depth + table + ends
    return (
        f'(module (memory (export "memory") 1) (func (param i32) {body}) (func (export "_start")))'
    )


@pytest.fixture(scope="module")
def bomb_wasm(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return bytes(wasmtime.wat2wasm(compile_bomb()))


@pytest.mark.slow
def test_compiling_counts_against_the_time_limit(
    make_cluster: Callable[..., Path], tmp_path: Path, bomb_wasm: bytes
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    module = tmp_path / "bomb.wasm"
    module.write_bytes(bomb_wasm)
    code, record, _ = run_json(cluster, str(module), "--time-limit", "0.5")
    assert (code, record["state"], record["exit_code"]) == (124, "timeout", 124), record
    assert "time limit of 0.5 s exceeded" in record["error"]


def test_a_compile_bomb_cannot_hold_serve(
    make_cluster: Callable[..., Path], tmp_path: Path, bomb_wasm: bytes
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    module = tmp_path / "bomb.wasm"
    module.write_bytes(bomb_wasm)
    result = sshwasm(
        "--cluster", str(cluster), "run", str(module), "--array", "2", "--time-limit", "0.5",
        "--json",
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 124, result.stderr
    tasks = json.loads(result.stdout)
    assert [(task["state"], task["exit_code"]) for task in tasks] == [("timeout", 124)] * 2
    assert all("while compiling the module" in task["error"] for task in tasks), tasks


# -- item 13: time limits are bounded ---------------------------------------------------------


@pytest.mark.parametrize("limit", ["1e10", "31536001", "inf"])
def test_a_time_limit_beyond_365_days_is_a_usage_error(limit: str) -> None:
    result = sshwasm("run", "nothing.rs", "--time-limit", limit)
    no_traceback(result)
    assert result.returncode == 2
    assert result.stderr.startswith("sshwasm: error: argument --time-limit:")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("field", ["time_limit_s", "wall_limit_s"])
def test_the_runner_refuses_a_limit_its_watchdog_cannot_keep(
    tmp_path: Path, guest: Guest, field: str
) -> None:
    workdir = tmp_path / "wd"
    put = run_runner("put-module", str(workdir), guest.sha256, stdin=guest.data)
    assert put.returncode == 0, put.stderr
    spec = {
        "runner_version": RUNNER_VERSION,
        "wasm_sha256": guest.sha256,
        "argv": ["probe", "hello"],
        "env": [],
        "memory_mb": 64,
        "time_limit_s": None,
        field: 1e10,
    }
    outcome = run_frames("launch", str(workdir), "1", stdin=json.dumps(spec).encode() + b"\n")
    assert [kind for kind, _ in outcome.frames] == [b"X"], outcome.frames
    refusal = outcome.json_of(b"X")
    assert refusal["kind"] == "spec" and field in str(refusal["error"])
    assert not (workdir / "jobs" / "1").exists()


# -- item 16: the runner trusts only a workdir that is the SSH user's own ---------------------

HELLO = EXAMPLES / "hello.rs"
NOBODY = pwd.getpwnam("nobody").pw_uid


def hello(cluster: Path) -> subprocess.CompletedProcess[str]:
    return sshwasm("--cluster", str(cluster), "run", str(HELLO), "--env", "HELLO_SLEEP_S=0")


def job_dirs(workdir: Path) -> list[str]:
    jobs = workdir / "jobs"
    return sorted(os.listdir(jobs)) if jobs.is_dir() else []


def make_world_writable(path: Path) -> Path:
    path.chmod(0o777)
    return path


def make_group_writable(path: Path) -> Path:
    path.chmod(0o770)
    return path


def give_to_nobody(path: Path) -> Path:
    os.chown(path, NOBODY, -1)
    return path


def make_symlink(path: Path) -> Path:
    real = path.with_name(path.name + "-real")
    path.rename(real)
    path.symlink_to(real)
    return path


TAMPERINGS: list[tuple[str, Callable[[Path], Path], str]] = [
    (".", make_world_writable, "is writable by others (mode 0777)"),
    (".", make_group_writable, "is writable by others (mode 0770)"),
    (".", give_to_nobody, f"is owned by uid {NOBODY}"),
    (".", make_symlink, "is a symbolic link"),
    ("bin", make_world_writable, "is writable by others"),
    ("bin", give_to_nobody, f"is owned by uid {NOBODY}"),
    ("bin/current", make_world_writable, "is writable by others"),
    (f"bin/{RUNNER_VERSION}", make_group_writable, "is writable by others"),
    (f"bin/{RUNNER_VERSION}/sshwasm_exec", give_to_nobody, f"is owned by uid {NOBODY}"),
    (f"bin/{RUNNER_VERSION}/sshwasm_exec/__pycache__", make_world_writable, "is writable by"),
    (f"bin/{RUNNER_VERSION}/sshwasm_exec/commands.py", give_to_nobody, f"is owned by uid {NOBODY}"),
    (f"bin/{RUNNER_VERSION}/sshwasm_exec/protocol.py", make_symlink, "is a symbolic link"),
    ("cache", make_world_writable, "is writable by others"),
    ("cache", make_symlink, "is a symbolic link"),
    ("wasm", give_to_nobody, f"is owned by uid {NOBODY}"),
    ("jobs", make_group_writable, "is writable by others"),
]


@pytest.mark.parametrize(
    ("where", "tamper", "problem"),
    TAMPERINGS,
    ids=[f"{where}-{tamper.__name__}" for where, tamper, _ in TAMPERINGS],
)
@pytest.mark.slow
def test_an_unsafe_workdir_is_refused_and_nothing_runs(
    make_cluster: Callable[..., Path],
    where: str,
    tamper: Callable[[Path], Path],
    problem: str,
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    workdir = cluster.parent / "workers" / "alpha"
    first = hello(cluster)  # installs the runner, uploads and precompiles the module
    assert first.returncode == 0, first.stderr
    (workdir / "jobs").mkdir(exist_ok=True)
    before = job_dirs(workdir)
    target = tamper(workdir / where if where != "." else workdir)
    result = hello(cluster)
    no_traceback(result)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"sshwasm: error: host 'alpha': unsafe workdir: {target} {problem}")
    assert job_dirs(workdir) == before  # nothing was launched
    (failed,) = [job for job in json.loads(sshwasm("jobs", "--json").stdout) if job["id"] == 2]
    assert failed["state"] == "failed" and "unsafe workdir" in failed["error"]


def test_install_refuses_an_unsafe_workdir_and_writes_nothing(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    workdir = cluster.parent / "workers" / "alpha"
    workdir.mkdir(parents=True)
    workdir.chmod(0o777)
    for command in (["hosts", "install", "alpha"], ["run", str(HELLO)]):
        result = sshwasm("--cluster", str(cluster), *command)
        no_traceback(result)
        assert result.returncode == 1
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"sshwasm: error: host 'alpha': unsafe workdir: {workdir} ")
        assert os.listdir(workdir) == []


def test_the_local_host_checks_its_workdir_too(tmp_path: Path) -> None:
    workdir = tmp_path / "local-workdir"
    workdir.mkdir()
    (workdir / "cache").mkdir(mode=0o777)
    (workdir / "cache").chmod(0o777)
    cluster = tmp_path / "local.yaml"
    cluster.write_text(
        "hosts:\n"
        f"  - {{name: here, address: local, cpus: 2, memory_mb: 1024, workdir: '{workdir}'}}\n"
    )
    result = hello(cluster)
    no_traceback(result)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"sshwasm: error: host 'here': unsafe workdir: {workdir}/cache ")
    (workdir / "cache").chmod(0o700)
    assert hello(cluster).returncode == 0


def installed_package(workdir: Path, version: str = RUNNER_VERSION) -> Path:
    return workdir / "bin" / version / "sshwasm_exec"


def assert_ours_is_current(workdir: Path) -> None:
    """The coordinator's runner is installed whole and is the one commands run."""
    assert (workdir / "bin" / "current").read_text() == RUNNER_VERSION + "\n"
    package = installed_package(workdir)
    assert {path.name: path.read_bytes() for path in package.glob("*.py")} == runner_files()


@pytest.mark.slow
def test_a_stale_runner_is_still_replaced(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    workdir = cluster.parent / "workers" / "alpha"
    assert hello(cluster).returncode == 0
    package = installed_package(workdir)
    assert list((package / "__pycache__").glob("commands.*.pyc"))
    with (package / "commands.py").open("ab") as runner_file:
        runner_file.write(b"# edited\n")  # another version: the launch asks for ours
    result = hello(cluster)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "job done, hello!\n"
    assert_ours_is_current(workdir)


def install_older_runner(workdir: Path, layout: str) -> Path:
    """Put another runner on a host the way an older sshwasm did; returns what it wrote."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir(parents=True, mode=0o700)
    if layout == "single-file":
        # Before the runner was a package: one module, run by a bootstrap that imported it.
        old = bin_dir / "sshwasm_exec.py"
        old.write_text("import sys\ndef main(argv=None):\n    sys.exit('an old runner')\n")
        old.chmod(0o600)
        return old
    # A working runner of another version: this one with a change to its protocol.
    files = runner_files()
    files["protocol.py"] += b"\n# an older protocol\n"
    version = files_version(files)
    package = installed_package(workdir, version)
    package.mkdir(parents=True, mode=0o700)
    package.parent.chmod(0o700)
    for name, data in files.items():
        (package / name).write_bytes(data)
        (package / name).chmod(0o600)
    (bin_dir / "current").write_text(version + "\n")
    (bin_dir / "current").chmod(0o600)
    info = subprocess.run([sys.executable, str(package), "info"], capture_output=True, check=True)
    assert json.loads(info.stdout)["runner_version"] == version != RUNNER_VERSION
    return package


@pytest.mark.parametrize("layout", ["older-version", "single-file"])
@pytest.mark.parametrize("array", [False, True], ids=["launch", "serve"])
@pytest.mark.slow
def test_a_host_with_another_runner_gets_ours_on_the_next_run(
    make_cluster: Callable[..., Path], layout: str, array: bool
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    workdir = cluster.parent / "workers" / "alpha"
    old = install_older_runner(workdir, layout)
    before = sshwasm("--cluster", str(cluster), "hosts", "--check", "--json")
    (checked,) = json.loads(before.stdout)
    assert checked["runner_version"] != RUNNER_VERSION
    args = ["--array", "2"] if array else []
    result = sshwasm(
        "--cluster", str(cluster), "run", str(HELLO), "--env", "HELLO_SLEEP_S=0", *args
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("job done, hello!\n") == (2 if array else 1)
    assert_ours_is_current(workdir)
    assert old.exists()  # left in place: a runner still running may need its files
    after = sshwasm("--cluster", str(cluster), "hosts", "--check", "--json")
    assert json.loads(after.stdout)[0]["runner_version"] == RUNNER_VERSION


def test_the_bootstrap_parses_as_python_3_9() -> None:
    from sshwasm.transport import RUNNER_BOOTSTRAP

    # It runs on the host's python, which may be older than the coordinator's.
    ast.parse(RUNNER_BOOTSTRAP, feature_version=(3, 9))
    assert "import sshwasm" not in RUNNER_BOOTSTRAP


@pytest.mark.parametrize("where", ["bin", "cache"])
@pytest.mark.slow
def test_an_array_on_an_unsafe_workdir_runs_nothing(
    make_cluster: Callable[..., Path], where: str
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    workdir = cluster.parent / "workers" / "alpha"
    assert hello(cluster).returncode == 0
    (workdir / "jobs").mkdir(exist_ok=True)
    before = job_dirs(workdir)
    make_world_writable(workdir / where)
    result = sshwasm("--cluster", str(cluster), "run", str(HELLO), "--array", "2")
    no_traceback(result)
    # What `run --array` prints about failed tasks is issue 8's item 1; here: nothing ran.
    assert result.returncode == 1 and result.stdout == ""
    assert job_dirs(workdir) == before
    tasks = [job for job in json.loads(sshwasm("jobs", "--json").stdout) if job["id"] > 1]
    assert [task["state"] for task in tasks] == ["failed", "failed"]
    assert all(f"unsafe workdir: {workdir / where} " in task["error"] for task in tasks)
