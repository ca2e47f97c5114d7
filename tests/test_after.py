"""--after and --after-any against real loopback hosts: held in the queue, cancelled naming
a dependency that failed, run after any end, with --detach, and never held forever by a
dependency whose coordinator died."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from helpers import (
    EXAMPLES,
    PROGRAMS,
    detached_coordinators,
    moment,
    no_traceback,
    record_of,
    sshwasm,
    wait_for,
    wait_for_state,
)

FINAL = {"succeeded", "failed", "timeout", "out_of_memory", "cancelled", "lost"}


def test_after_a_failed_job_ends_cancelled_naming_it(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    failing = sshwasm("--cluster", str(cluster), "run", str(PROGRAMS / "exitcode.rs"), "--", "3")
    assert failing.returncode == 3
    result = sshwasm(
        "--cluster", str(cluster), "run", "--after", "1", "--json", str(EXAMPLES / "hello.rs"),
        "--env", "HELLO_SLEEP_S=0",
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode != 0
    record = record_of(result)
    assert record["state"] == "cancelled", record
    assert record["error"] == "dependency job 1 ended failed"
    assert record["started_at"] is None and record["host"] is None
    assert "dependency job 1 ended failed" in result.stderr


def test_after_any_runs_after_a_failure(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    assert (
        sshwasm(
            "--cluster", str(cluster), "run", str(PROGRAMS / "exitcode.rs"), "--", "3"
        ).returncode
        == 3
    )
    result = sshwasm(
        "--cluster", str(cluster), "run", "--after-any", "1", "--json",
        str(EXAMPLES / "hello.rs"), "--env", "HELLO_SLEEP_S=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert record_of(result)["state"] == "succeeded"


def test_after_with_detach_waits_for_every_dependency_to_succeed(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (4, 4096)})
    run = ["--cluster", str(cluster), "run", "--detach"]
    assert sshwasm(*run, str(PROGRAMS / "sleep.rs"), "--", "2").stdout.strip() == "1"
    assert sshwasm(*run, str(PROGRAMS / "sleep.rs"), "--", "1").stdout.strip() == "2"
    held = sshwasm(*run, "--after", "1,2", str(PROGRAMS / "sleep.rs"), "--", "0")
    assert held.returncode == 0, held.stderr
    assert held.stdout.strip() == "3"
    # Recorded at once, queued although the host has room for it.
    assert record_of(sshwasm("status", "3", "--json"))["state"] == "queued"
    final = wait_for_state(3, FINAL)
    assert final["state"] == "succeeded", final
    first, second = (record_of(sshwasm("status", job, "--json")) for job in ("1", "2"))
    assert moment(final["started_at"]) >= moment(first["finished_at"])
    assert moment(final["started_at"]) >= moment(second["finished_at"])


def test_after_unknown_id_is_refused_before_submitting(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    result = sshwasm("--cluster", str(cluster), "run", "--after", "7", str(EXAMPLES / "hello.rs"))
    no_traceback(result)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sshwasm: error: --after: no job 7 in "), last
    assert sshwasm("jobs", "--json").stdout.strip() == "[]"


def test_after_and_after_any_together_are_refused(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    result = sshwasm(
        "--cluster", str(cluster), "run", "--after", "1", "--after-any", "2",
        str(EXAMPLES / "hello.rs"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot be combined" in result.stderr


def test_bad_after_list_is_a_usage_error() -> None:
    result = sshwasm("run", "--after", "1,x", str(EXAMPLES / "hello.rs"))
    assert result.returncode == 2
    assert result.stderr.startswith("sshwasm: error: argument --after: 'x' is not a job id")


def test_dependency_whose_coordinator_died_does_not_hold_forever(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    # One cpu: job 2 waits in line behind job 1; job 3 waits for job 2.
    cluster = make_cluster({"alpha": (1, 1024)})
    run = ["--cluster", str(cluster), "run", "--detach"]
    assert sshwasm(*run, str(PROGRAMS / "sleep.rs"), "--", "30").returncode == 0
    wait_for_state(1, {"running"})
    assert sshwasm(*run, str(EXAMPLES / "hello.rs")).returncode == 0
    assert sshwasm(*run, "--after", "2", str(EXAMPLES / "hello.rs")).returncode == 0
    db = tmp_path / "data" / "jobs.sqlite"
    wait_for(lambda: bool(detached_coordinators(db, 2)))
    (coordinator,) = detached_coordinators(db, 2)
    os.kill(coordinator, signal.SIGKILL)  # job 2 is left queued with nobody to place it
    held = wait_for_state(3, FINAL, timeout=90)
    assert held["state"] == "cancelled", held
    assert held["error"] == "dependency job 2 ended lost"
    assert sshwasm("cancel", "1").returncode == 0
