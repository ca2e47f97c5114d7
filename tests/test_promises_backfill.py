"""README promise of placement through the jobs file: "older waiting jobs get room first,
and a job too big for the room left does not hold back smaller ones behind it" (backfill),
with each job followed by its own `sshwasm` process sharing one jobs file."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    PROGRAMS,
    detached_coordinators,
    frozen,
    moment,
    record_of,
    sshwasm,
    wait_for,
    wait_for_state,
)

SLEEP = str(PROGRAMS / "sleep.rs")
TINY = str(PROGRAMS / "tiny.rs")
# A waiting job's coordinator makes a placement pass at least this often (its POLL_MAX_S).
PLACEMENT_POLL_MAX_S = 1.0


@pytest.mark.slow
def test_a_small_job_backfills_past_an_older_big_one_that_cannot_fit_yet(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    run = ("--cluster", str(cluster), "run")
    # Job 1 holds one of alpha's two cpus until it is cancelled.
    holder = sshwasm(*run, SLEEP, "--cpus", "1", "--memory-mb", "64", "--detach", "--", "120")
    assert holder.stdout.strip() == "1", holder.stderr
    wait_for_state(1, {"running"})
    # Job 2 needs the whole host: it waits, in its own detached coordinator.
    big = sshwasm(*run, TINY, "--cpus", "2", "--memory-mb", "64", "--detach")
    assert big.stdout.strip() == "2", big.stderr
    wait_for_state(2, {"queued"})

    # Job 3, younger and small, fits in the cpu left: it runs now, past job 2. Without
    # backfill it would wait the 120 s of job 1 (the timeout here says so sooner).
    small = sshwasm(*run, TINY, "--cpus", "1", "--memory-mb", "64", "--json", timeout=60)
    assert small.returncode == 0, small.stderr
    backfilled = record_of(small)
    assert backfilled["id"] == 3 and backfilled["host"] == "alpha", backfilled
    assert backfilled["stdout"] == "tiny -\n"
    assert record_of(sshwasm("status", "2", "--json"))["state"] == "queued"

    # Once job 1 gives its cpu back, the big job gets the whole host.
    cancelled = sshwasm("cancel", "1")
    assert cancelled.returncode == 0, cancelled.stderr
    done = wait_for_state(2, {"succeeded", "failed", "lost", "cancelled"})
    assert done["state"] == "succeeded" and done["host"] == "alpha", done
    assert moment(done["started_at"]) >= moment(backfilled["finished_at"])


@pytest.mark.slow
def test_older_waiting_jobs_get_room_first_across_processes(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    """A younger job's coordinator leaves freed room to an older waiting job of another
    process, even while that process is stopped and so cannot take the room itself."""
    cluster = make_cluster({"alpha": (1, 1024)})
    run = ("--cluster", str(cluster), "run")
    holder = sshwasm(*run, SLEEP, "--memory-mb", "64", "--detach", "--", "120")
    assert holder.stdout.strip() == "1", holder.stderr
    wait_for_state(1, {"running"})
    for job_id in (2, 3):  # the older and the younger waiting job, each its own process
        queued = sshwasm(*run, TINY, "--memory-mb", "64", "--detach")
        assert queued.stdout.strip() == str(job_id), queued.stderr
        wait_for_state(job_id, {"queued"})
    db = tmp_path / "data" / "jobs.sqlite"
    (older,) = detached_coordinators(db, 2)

    with frozen(older):
        cancelled = sshwasm("cancel", "1")
        assert cancelled.returncode == 0, cancelled.stderr
        room_freed = time.time()
        # Job 3's coordinator plans at least once a second on the loop that also writes its
        # heartbeat: a heartbeat this much later means it has looked at the free room.
        wait_for(lambda: _heartbeat_of(db, 3) > room_freed + 2 * PLACEMENT_POLL_MAX_S, timeout=60)
        assert record_of(sshwasm("status", "3", "--json"))["state"] == "queued"

    first = wait_for_state(2, {"succeeded", "failed", "lost", "cancelled"})
    second = wait_for_state(3, {"succeeded", "failed", "lost", "cancelled"})
    assert first["state"] == second["state"] == "succeeded", (first, second)
    assert moment(second["started_at"]) >= moment(first["finished_at"])


def _heartbeat_of(db: Path, job_id: int) -> float:
    """When the job's coordinator last wrote to its row (every placement pass does)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        (value,) = conn.execute("SELECT heartbeat_ts FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return float(value or 0)
