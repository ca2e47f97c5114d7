"""`--dir` and `--host-dir` over real SSH: a job that creates, renames and deletes files in
a staged directory, whose changes come back; a read-only host directory that refuses writes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PROGRAMS, no_traceback, record_of, sshwasm

from sshwasm import Client
from sshwasm.cli import main
from sshwasm.errors import UsageError

DIRWORK = str(PROGRAMS / "dirwork.rs")


def _data(root: Path) -> Path:
    data = root / "work" / "data"
    (data / "empty").mkdir(parents=True)
    (data / "keep.txt").write_text("kept\n")
    (data / "edit.txt").write_text("the user\n")
    (data / "old.txt").write_text("old name\n")
    (data / "gone.txt").write_text("to delete\n")
    (data / "edit.txt").chmod(0o640)
    return data


def test_a_dir_job_creates_renames_and_deletes_and_a_read_only_host_dir_refuses_writes(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    data = _data(tmp_path)
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "ref.txt").write_text("reference\n")
    result = sshwasm(
        "--cluster", str(cluster), "run", DIRWORK, "--dir", str(data),
        "--host-dir", f"{ref}::/ref:ro", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = record_of(result)
    assert record["dirs"] == f"{data}::/data, {ref}::/ref:ro (host)"
    out = record["stdout"]
    for step in ("create", "mkdir", "create deep", "append", "rename", "delete", "delete dir"):
        assert f"{step}: ok" in out, out
    assert "keep: kept" in out and "ref: reference" in out
    for step in ("write ref", "write ref existing", "delete ref", "read host"):
        assert f"{step}: denied" in out, out
    # What the job changed came back; what it did not touch is as it was.
    assert (data / "new.txt").read_text() == "made by the job\n"
    assert (data / "sub" / "deep.txt").read_text() == "deep\n"
    assert (data / "edit.txt").read_text() == "the user\nand the job\n"
    assert (data / "edit.txt").stat().st_mode & 0o777 == 0o640  # replaced, mode kept
    assert (data / "renamed.txt").read_text() == "old name\n"
    assert not (data / "old.txt").exists() and not (data / "gone.txt").exists()
    assert not (data / "empty").exists()
    assert (data / "keep.txt").read_text() == "kept\n"
    assert sorted(p.name for p in data.iterdir()) == [
        "edit.txt", "keep.txt", "new.txt", "renamed.txt", "sub",
    ]  # fmt: skip
    assert sorted(p.name for p in ref.iterdir()) == ["ref.txt"]
    assert (ref / "ref.txt").read_text() == "reference\n"


def test_array_tasks_each_get_a_copy_and_lose_nothing_coming_back(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    # Through the Python API's map, which takes `dirs` as run takes --dir.
    data = _data(tmp_path)
    with Client(cluster=make_cluster({"alpha": (2, 1024)})) as client:
        jobs = client.map(DIRWORK, ["a", "b", "fail"], dirs=[f"{data}::/data"])
        records = [job.result(timeout=120) for job in jobs]
    assert [record.exit_code for record in records] == [0, 0, 3], records
    assert {record.dirs for record in records} == {f"{data}::/data"}
    for task in ("a", "b", "fail"):  # a failed job's changes come back too
        assert (data / f"task-{task}.txt").read_text() == task
    # Each task appended its line to its own copy of edit.txt. A version that comes back
    # replaces the file only if it is still as that task saw it staged; otherwise it is
    # kept beside. However the tasks interleave, every line survives somewhere.
    versions = [data / "edit.txt", *data.glob("edit.txt.sshwasm-*")]
    assert len(versions) >= 2, sorted(p.name for p in data.iterdir())
    lines = {line for path in versions for line in path.read_text().splitlines()}
    assert lines == {"the user", "a", "b", "fail"}
    assert sum(record.output_conflicts or 0 for record in records) == len(versions) - 1


def test_dir_flags_are_checked_before_anything_runs(
    make_cluster: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    data = _data(tmp_path)
    cases = {
        ("--dir", str(tmp_path / "missing")): "no such directory",
        ("--dir", "/"): "whole filesystem",
        ("--dir", f"{data}::data"): "must be an absolute path",
        ("--dir", f"{data}::/a/../b"): "'..'",
        ("--dir", str(data), "--dir", f"{tmp_path}::/data"): "two directories at /data",
        ("--host-dir", "relative::/x"): "absolute on the host",
        ("--host-dir", str(data)): "PATH::GUEST",
    }
    for flags, message in cases.items():
        # In this process: refused before anything is built or placed.
        status = main(["--cluster", str(cluster), "run", DIRWORK, *flags])
        stderr = capsys.readouterr().err
        assert status == 1, (flags, stderr)
        assert stderr.startswith("sshwasm: error: ") and message in stderr, (flags, stderr)
        assert stderr.count("\n") == 1, stderr
    with Client(cluster=cluster) as client, pytest.raises(UsageError, match="whole filesystem"):
        client.submit(DIRWORK, dirs=["/"])
    # A host without the --host-dir is skipped; with none left the job fails naming it.
    result = sshwasm(
        "--cluster", str(cluster), "run", DIRWORK, "--host-dir", f"{tmp_path}/nowhere::/ref",
    )  # fmt: skip
    no_traceback(result)
    missing = f"--host-dir {tmp_path}/nowhere: no such directory on this host"
    assert result.returncode == 1 and missing in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith("sshwasm: error: no host could run")
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed" and missing in record["error"]


def test_the_dir_bring_back_is_held_to_the_output_cap(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    """What a job changed in its --dir counts against --max-output-mb with its stdout: the
    files that fit come back whole, the rest stay on the host, named in one warning line
    and in the record's error, and the job ends failed as over its cap."""
    cluster = make_cluster({"alpha": (2, 1024)})
    data = tmp_path / "work" / "out"
    data.mkdir(parents=True)
    (data / "b.bin").write_text("staged\n")
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "writeout.rs"), "--dir",
        f"{data}::/output", "--max-output-mb", "1", "--json", "--", "print:100",
        "fill:a.bin:600000", "fill:b.bin:600000", "write:c.txt:small",
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode != 0
    record = record_of(result)
    assert (record["state"], record["exit_code"]) == ("failed", None), record
    error = str(record["error"])
    assert error.startswith("output limit of 1 MB exceeded"), error
    assert f"1 files it changed in {data} were not brought back" in error and "b.bin" in error
    warnings = [line for line in result.stderr.splitlines() if "not brought back" in line]
    assert len(warnings) == 1 and "b.bin" in warnings[0], result.stderr
    # In path order while they fit: a.bin and c.txt; b.bin is as it was staged.
    assert (data / "a.bin").read_bytes() == b"o" * 600000
    assert (data / "c.txt").read_text() == "small"
    assert (data / "b.bin").read_text() == "staged\n"
    assert sorted(path.name for path in data.iterdir()) == ["a.bin", "b.bin", "c.txt"]
