"""The placement queue over a real jobs file (no hosts are contacted): an array's tasks are
placed oldest first as room frees, its wait is announced once for the whole array, and a
job no host could ever take fails instead of waiting."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from helpers import job_spec

from sshwasm.cluster import Host
from sshwasm.errors import NoHostReachable
from sshwasm.placement_queue import PlacementQueue
from sshwasm.states import JobState
from sshwasm.store import JobStore

SOLO = Host(name="solo", address="127.0.0.1", cpus=1, memory_mb=1024)


def test_an_array_waits_its_turn_with_one_notice_and_a_hopeless_job_fails(
    tmp_path: Path,
) -> None:
    notices: list[str] = []

    async def scenario(store: JobStore) -> tuple[list[int], list[int]]:
        queue = PlacementQueue(store, [SOLO], notices.append)
        placer = asyncio.create_task(queue.run())
        try:
            ids = store.submit_tasks(dataclasses.replace(job_spec(), array_size=4))
            waiters = {job_id: asyncio.create_task(queue.placement(job_id, {})) for job_id in ids}
            started: list[int] = []
            while len(started) < len(ids):
                done, _ = await asyncio.wait(
                    waiters.values(), timeout=5, return_when=asyncio.FIRST_COMPLETED
                )
                assert done, "no task was placed although the host had room"
                (job_id,) = [key for key, task in waiters.items() if task in done]
                assert waiters.pop(job_id).result() == SOLO
                started.append(job_id)
                # One cpu: nobody else runs until it ends.
                assert store.get(job_id).attempt_hosts == "solo"
                assert all(not task.done() for task in waiters.values())
                store.finish(job_id, JobState.SUCCEEDED, exit_code=0)
                queue.signal_room()
            lone = store.submit(job_spec())
            with pytest.raises(NoHostReachable):
                await asyncio.wait_for(queue.placement(lone, {"solo": "it went away"}), 5)
            return ids, started
        finally:
            placer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await placer

    with JobStore(tmp_path / "jobs.sqlite") as store:
        ids, started = asyncio.run(scenario(store))
        assert started == ids  # oldest first
        assert store.get(ids[-1] + 1).state is JobState.FAILED
    queued = [text for text in notices if "queued" in text]
    # Said once for the array, not once for each of its tasks.
    assert len(queued) == 1, queued
    assert queued[0].startswith(f"array {ids[0]}: tasks queued from job {ids[1]} on: ")
