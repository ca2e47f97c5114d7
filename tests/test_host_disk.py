"""A host whose workdir is unusable or whose disk fills: a clear error, nothing else harmed."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ci_skips import beyond_our_control
from helpers import EXAMPLES, PROGRAMS, no_traceback, record_of, sshwasm


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: room for the runner and a module, not for much output."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(beyond_our_control(f"mounting a tmpfs needs root: {mounted.stderr.strip()}"))
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_workdir_that_is_a_file_fails_the_job_clearly(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the workdir should be\n")
    cluster = make_cluster({"alpha": {"cpus": 2, "memory_mb": 1024, "workdir": str(blocker)}})
    result = sshwasm("--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"))
    no_traceback(result)
    assert result.returncode == 1
    assert "alpha" in result.stderr and "not-a-dir" in result.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed" and record["error"]
    assert blocker.read_text() == "a file where the workdir should be\n"


def test_disk_filling_up_fails_the_job_and_keeps_the_host_usable(
    make_cluster: Callable[..., Path], tiny_disk: Path
) -> None:
    cluster = make_cluster({"alpha": {"cpus": 2, "memory_mb": 1024, "workdir": str(tiny_disk)}})
    result = sshwasm("--cluster", str(cluster), "run", str(PROGRAMS / "bigout.rs"), "--", "1000000")
    no_traceback(result)
    assert result.returncode != 0
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed", record
    assert record["error"]
    # Clearing the disk makes the host usable again; nothing else was harmed.
    for job_dir in (tiny_disk / "jobs").iterdir():
        for item in job_dir.iterdir():
            if item.is_file():
                item.unlink()
    again = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"), "--env", "HELLO_SLEEP_S=0"
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout == "job done, hello!\n"
