"""`sshwasm resume` against real loopback hosts: only the tasks that did not succeed run
again, in the same rows, with the same arguments, environment and stdin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import PROGRAMS, no_traceback, record_of, sshwasm, wait_for_state

FINAL = {"succeeded", "failed", "timeout", "out_of_memory", "cancelled", "lost"}


def records() -> dict[int, dict[str, Any]]:
    listed = sshwasm("jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    return {record["id"]: record for record in record_of(listed)}  # type: ignore[index, union-attr]


@pytest.mark.slow
def test_resume_reruns_exactly_the_two_cancelled_tasks(make_cluster: Callable[..., Path]) -> None:
    # Two cpus: tasks run two at a time, so tasks 4 and 8 are still queued when cancelled.
    cluster = make_cluster({"alpha": (2, 1024)})
    submitted = sshwasm(
        "--cluster", str(cluster), "run", "--array", "10", "--detach",
        str(PROGRAMS / "sleep.rs"), "--", "1",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.split() == [str(i) for i in range(1, 11)]
    cancelled = sshwasm("cancel", "5", "9")
    assert cancelled.returncode == 0, cancelled.stderr
    for job_id in range(1, 11):
        wait_for_state(job_id, FINAL, timeout=120)
    before = records()
    assert sorted(j for j, r in before.items() if r["state"] == "cancelled") == [5, 9]
    result = sshwasm("--cluster", str(cluster), "resume", "7", "--json")
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    rerun = record_of(result)
    assert isinstance(rerun, list)
    assert [(r["id"], r["array_id"], r["array_task"]) for r in rerun] == [(5, 1, 4), (9, 1, 8)]
    assert all(r["state"] == "succeeded" and r["attempts"] == 2 for r in rerun), rerun
    assert all(r["stdout"] == "start\nend\n" for r in rerun)
    after = records()
    assert len(after) == 10  # no new rows: a resumed task is the same job, one attempt more
    for job_id in set(range(1, 11)) - {5, 9}:
        assert after[job_id] == before[job_id]  # the others were left alone
    # Same environment: the task keeps its index.
    env = sshwasm("status", "5").stdout
    assert "array_task: 4" in env
    # Nothing left to resume, and the array's exit code is 0 from now on.
    again = sshwasm("--cluster", str(cluster), "resume", "1")
    assert again.returncode == 0
    assert "nothing to resume in array 1: every task succeeded" in again.stdout


def test_resume_reruns_failures_with_their_arguments_and_prints_as_run_array(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (4, 4096)})
    first = sshwasm(
        "--cluster", str(cluster), "run", "--array", "3", "--tag",
        str(PROGRAMS / "task.rs"), "--", "1",
    )  # fmt: skip
    assert first.returncode == 5  # task 1 fails (its argument names it)
    result = sshwasm("--cluster", str(cluster), "resume", "1", "--tag")
    no_traceback(result)
    # The same argument: task 1 fails again, with the same exit code, printed as run --array.
    assert result.returncode == 5
    assert result.stdout == "".join(f"1\ttask 1 of 3 line {i}\n" for i in range(3))
    record = record_of(sshwasm("status", "2", "--json"))
    assert record["attempts"] == 2 and record["state"] == "failed"


def test_resume_of_a_single_job_is_refused(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    assert (
        sshwasm(
            "--cluster", str(cluster), "run", str(PROGRAMS / "exitcode.rs"), "--", "3"
        ).returncode
        == 3
    )
    result = sshwasm("--cluster", str(cluster), "resume", "1")
    no_traceback(result)
    assert result.returncode == 1
    assert result.stderr.startswith("sshwasm: error: job 1 is not a task of an array")
    unknown = sshwasm("--cluster", str(cluster), "resume", "99")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "sshwasm: error: no job with id 99"
