"""README promise of placement through the jobs file: "older waiting jobs get room first,
and a job too big for the room left does not hold back smaller ones behind it" (backfill),
with each job followed by its own `sshwasm` process sharing one jobs file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from helpers import PROGRAMS, moment, record_of, sshwasm, wait_for_state

SLEEP = str(PROGRAMS / "sleep.rs")
TINY = str(PROGRAMS / "tiny.rs")


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
