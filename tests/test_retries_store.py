"""The jobs file side of retries, dependencies and resume: the migration keeps old rows
working, a requeue happens once per attempt, a held job takes no place in line."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

from helpers import job_spec as spec

from sshwasm.attempts import Failure, requeue
from sshwasm.cluster import Host
from sshwasm.states import JobState
from sshwasm.store import _MIGRATIONS, JobStore

SOLO = Host(name="solo", address="127.0.0.1", cpus=1, memory_mb=1024)


def test_rows_from_before_the_migration_read_as_one_attempt(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    for version in (1, 2):  # the jobs file as the version before this one left it
        db.executescript(_MIGRATIONS[version])
    db.execute(
        """INSERT INTO jobs (name, state, host, cpus, memory_mb, submitted_at, submitted_ts,
               wasm_path) VALUES ('old', 'succeeded', 'alpha', 1, 64, '2026-01-01', 0, 'x')"""
    )
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    with JobStore(path) as store:
        job = store.get(1)
        assert job.state is JobState.SUCCEEDED
        assert job.attempts == 1 and job.attempt_hosts == "alpha"
        assert job.retries == 0 and job.dependencies == [] and not job.held
        assert job.record()["attempts"] == 1


def test_requeue_once_per_attempt_under_a_new_remote_key(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store:
        job_id = store.submit(dataclasses.replace(spec(), retries=2))
        placed, _ = store.place_waiting([job_id], [SOLO])
        assert placed == {job_id: SOLO}
        job = store.get(job_id)
        assert job.attempt_hosts == "solo"  # recorded by the placing transaction
        failure = Failure(True, JobState.LOST, "host 'solo' has no trace of the job")
        assert requeue(store, job, failure)
        assert not requeue(store, job, failure)  # the same attempt is never put back twice
        again = store.get(job_id)
        assert again.state is JobState.QUEUED and again.host is None
        assert again.attempts == 2
        assert again.remote_key == f"{job.remote_key}.a2"
        assert again.history[0]["host"] == "solo" and again.history[0]["state"] == "lost"
        # The capacity is free again: the job (or another) can be placed.
        assert store.place_waiting([job_id], [SOLO])[0] == {job_id: SOLO}
        assert store.get(job_id).attempt_hosts == "solo,solo"
        # A reservation given back (its host was out of reach) is replaced, not appended.
        store.release(job_id)
        assert store.place_waiting([job_id], [SOLO])[0] == {job_id: SOLO}
        assert store.get(job_id).attempt_hosts == "solo,solo"


def test_a_held_job_takes_no_place_in_line(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store:
        first = store.submit(spec())
        held = store.submit(dataclasses.replace(spec(), after=(first,)))
        later = store.submit(spec())
        assert store.get(held).held and store.get(held).dependencies == [first]
        assert store.place_waiting([first], [SOLO])[0] == {first: SOLO}
        store.finish(first, JobState.SUCCEEDED, exit_code=0)
        # The held job is older, but it waits for its dependencies, not for room.
        assert store.place_waiting([later], [SOLO])[0] == {later: SOLO}
