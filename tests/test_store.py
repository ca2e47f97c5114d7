"""The jobs file: schema, refusal of foreign files, and atomic reservations across processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers import job_spec as spec

from sshwasm.cluster import Host
from sshwasm.errors import JobNotFound, StoreError
from sshwasm.states import JobState
from sshwasm.store import FINAL_STATES, RECORD_FIELDS, SCHEMA_VERSION, JobStore

SOLO = Host(name="solo", address="127.0.0.1", cpus=2, memory_mb=1024)


def place_one(
    store: JobStore, job_id: int, hosts: list[Host], excluded: Sequence[str] = ()
) -> Host | None:
    """Place one waiting job as a coordinator's placement pass would; its host, or None."""
    placed, _ = store.place_waiting([job_id], hosts, {job_id: excluded})
    return placed.get(job_id)


def test_submit_then_record_has_every_contract_field(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store:
        job_id = store.submit(spec())
        job = store.get(job_id)
        assert job.state == "queued"
        assert job.state is JobState.QUEUED
        assert list(job.record()) == list(RECORD_FIELDS)
        # The record holds plain JSON values: the state is its word, not the enum.
        assert type(job.record()["state"]) is str and job.record()["state"] == "queued"
        assert job.argv_list == ["hello", "a b"]
        assert job.env_pairs == [("K", "v")]
        assert job.remote_key.startswith(f"{job_id}-")


def test_placement_reserves_and_finish_frees(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store:
        first, second, third = (store.submit(spec()) for _ in range(3))
        assert place_one(store, first, [SOLO]) == SOLO
        assert place_one(store, second, [SOLO]) == SOLO
        assert place_one(store, third, [SOLO]) is None  # both cpus held
        assert store.get(third).state == "queued"
        assert store.finish(first, JobState.SUCCEEDED, exit_code=0)
        assert not store.finish(first, JobState.FAILED)  # a final state is final
        assert store.get(first).state == "succeeded"
        placed = place_one(store, third, [SOLO])
        assert placed == SOLO
        job = store.get(third)
        assert job.state == "running" and job.host == "solo" and job.queue_s is not None
        assert job.host_snapshot == SOLO


def test_release_puts_the_job_back_in_the_queue(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store:
        job_id = store.submit(spec(cpus=2))
        assert place_one(store, job_id, [SOLO]) == SOLO
        store.release(job_id)
        assert store.get(job_id).state == "queued"
        assert store.usage() == {}
        assert place_one(store, job_id, [SOLO], excluded=["solo"]) is None


def test_older_waiting_job_is_served_first(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store:
        running = store.submit(spec(cpus=2))
        place_one(store, running, [SOLO])
        older, younger = store.submit(spec(cpus=2)), store.submit(spec(cpus=2))
        store.finish(running, JobState.SUCCEEDED)
        assert place_one(store, younger, [SOLO]) is None  # the older one's turn
        assert place_one(store, older, [SOLO]) == SOLO


def test_unknown_job(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store, pytest.raises(JobNotFound):
        store.get(42)


def test_not_a_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    path.write_bytes(b"this is not sqlite, but the user's precious text\n" * 100)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="cannot be used"):
        JobStore(path)
    assert path.read_bytes() == before


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    JobStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer sshwasm"):
        JobStore(path)


def test_lists_newest_first_with_filters(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store:
        ids = [store.submit(spec(name=f"j{i}")) for i in range(5)]
        store.finish(ids[1], JobState.FAILED, exit_code=3)
        assert [j.id for j in store.list_jobs()] == ids[::-1]
        assert [j.id for j in store.list_jobs(limit=2)] == ids[:-3:-1]
        assert [j.id for j in store.list_jobs(state=JobState.FAILED)] == [ids[1]]
        assert "failed" in FINAL_STATES


def _reserve_worker(db_path: str, count: int, queue: multiprocessing.Queue[int]) -> None:
    host = Host(name="one-slot", address="127.0.0.1", cpus=1, memory_mb=100)
    with JobStore(Path(db_path)) as store:
        mine = [store.submit(spec(cpus=1, memory_mb=100)) for _ in range(count)]
        for job_id in mine:
            while place_one(store, job_id, [host]) is None:
                pass
            # Holding the slot: nobody else may hold it now.
            queue.put(len([j for j in store.list_jobs(state=JobState.RUNNING)]))
            store.finish(job_id, JobState.SUCCEEDED)


def test_concurrent_processes_never_overcommit_a_one_slot_host(tmp_path: Path) -> None:
    db_path = str(tmp_path / "jobs.sqlite")
    JobStore(Path(db_path)).close()
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[int] = context.Queue()
    workers = [context.Process(target=_reserve_worker, args=(db_path, 15, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    seen = [queue.get(timeout=5) for _ in range(60)]
    assert seen == [1] * 60  # while a job held the slot, it was the only running one
    with JobStore(Path(db_path)) as store:
        jobs = store.list_jobs()
        assert len(jobs) == 60 and all(job.state == "succeeded" for job in jobs)


def test_finished_job_is_the_row_finish_wrote_until_the_next_write(tmp_path: Path) -> None:
    """What lets an array task's coordinator skip reading back the row it just finished:
    the row as written, only for that job, and never after another write."""
    with JobStore(tmp_path / "jobs.sqlite") as store:
        first, second = store.submit(spec()), store.submit(spec())
        assert place_one(store, first, [SOLO]) == SOLO
        assert store.finish(first, JobState.SUCCEEDED, exit_code=0, stdout="out")
        if sqlite3.sqlite_version_info >= (3, 35, 0):
            assert store.finished_job(first) == store.get(first)
        assert store.finished_job(second) is None
        store.update(first, upload_bytes=7)
        assert store.finished_job(first) is None
        assert not store.finish(first, JobState.FAILED)  # already final: nothing written
        assert store.finished_job(first) is None
        assert store.get(first).state is JobState.SUCCEEDED


def test_cancel_unstarted_leaves_a_job_that_started_alone(tmp_path: Path) -> None:
    """A cancel that lost the race with placing must not record a running guest cancelled."""
    with JobStore(tmp_path / "jobs.sqlite") as store:
        started, waiting = store.submit(spec()), store.submit(spec())
        assert place_one(store, started, [SOLO]) == SOLO
        assert not store.cancel_unstarted(started)
        assert store.get(started).state is JobState.RUNNING
        assert store.cancel_unstarted(waiting)
        assert store.get(waiting).state is JobState.CANCELLED
        # Its own placer knows nothing was launched yet.
        assert store.cancel_unstarted(started, placed=True)
        assert store.get(started).error == "cancelled before it started"
