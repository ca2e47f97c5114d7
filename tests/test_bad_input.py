"""Every malformed input: one line naming what and where, a non-zero exit, jobs file intact."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import EXAMPLES, no_traceback, record_of, sshwasm


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sshwasm: error: "), stderr
    return lines[0]


@pytest.fixture
def cluster(make_cluster: Callable[..., Path]) -> Path:
    return make_cluster({"alpha": (2, 1024)})


@pytest.fixture
def one_job_recorded(cluster: Path) -> dict[str, object]:
    result = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"), "--json",
        "--env", "HELLO_SLEEP_S=0",
    )  # fmt: skip
    return record_of(result)


def test_bad_sources(cluster: Path, tmp_path: Path, one_job_recorded: dict[str, object]) -> None:
    cases: dict[str, tuple[bytes, str | None]] = {
        "prog.py": (b"print('hi')\n", "unsupported"),
        "latin1.rs": ('fn main() { println!("caf\xe9"); }\n'.encode("latin-1"), "UTF-8"),
        "garbage.wasm": (b"\x00asm\x01\x00\x00\x00\x05\xff\xff", None),
        "notwasm.wasm": (b"#!/bin/sh\necho hi\n", "not a WebAssembly module"),
        "nostart.wasm": (b"\x00asm\x01\x00\x00\x00", "_start"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    for name, (_, expected) in cases.items():
        result = sshwasm("--cluster", str(cluster), "run", str(tmp_path / name))
        no_traceback(result)
        assert result.returncode != 0, name
        line = one_error_line(result.stderr)
        assert name in line, line
        if expected is not None:
            assert expected.lower() in line.lower(), line
    missing = sshwasm("--cluster", str(cluster), "run", str(tmp_path / "missing.rs"))
    assert "missing.rs" in one_error_line(missing.stderr)
    listed = record_of(sshwasm("status", "1", "--json"))
    assert listed == {**one_job_recorded, "stdout": listed["stdout"]}


def test_memory_below_the_modules_initial_memory(cluster: Path) -> None:
    result = sshwasm("--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"),
                     "--memory-mb", "1")  # fmt: skip
    line = one_error_line(result.stderr)
    assert "needs at least 2 MB" in line and "--memory-mb 1" in line


def test_a_jobs_file_that_is_not_sqlite_is_left_alone(tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("my thesis, not a database\n" * 50)
    for command in (["jobs"], ["status", "1"], ["run", str(EXAMPLES / "hello.rs")]):
        result = sshwasm("--db", str(precious), *command)
        no_traceback(result)
        assert result.returncode == 1
        assert "notes.txt" in one_error_line(result.stderr)
    assert precious.read_text() == "my thesis, not a database\n" * 50


def test_a_jobs_file_from_a_newer_sshwasm(tmp_path: Path, one_job_recorded: object) -> None:
    db_path = tmp_path / "data" / "jobs.sqlite"
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    result = sshwasm("jobs")
    assert "newer sshwasm" in one_error_line(result.stderr)
    db = sqlite3.connect(db_path)
    assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    db.close()


def test_unknown_cluster_key_and_zero_cpus(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("hosts:\n  - name: a\n    address: h\n    cpu: 2\n    memory_mb: 10\n")
    line = one_error_line(sshwasm("--cluster", str(typo), "hosts").stderr)
    assert "cpu" in line and "typo.yaml:4" in line
    zero = tmp_path / "zero.yaml"
    zero.write_text("hosts:\n  - name: a\n    address: h\n    cpus: 0\n    memory_mb: 10\n")
    line = one_error_line(sshwasm("--cluster", str(zero), "hosts").stderr)
    assert "zero.yaml:4" in line and "cpus" in line
    missing = sshwasm("--cluster", str(tmp_path / "nope.yaml"), "hosts")
    assert "nope.yaml" in one_error_line(missing.stderr)
