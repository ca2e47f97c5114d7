"""The Python API (`sshwasm.Client`, `Job` futures, `wait`, `as_completed`, `AsyncClient`)
against real loopback sshd hosts, real rustc and wasmtime, as a program would use it."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import EXAMPLES, PROGRAMS, record_of, sshwasm

import sshwasm as api
from sshwasm import (
    FIRST_COMPLETED,
    Client,
    CompileError,
    JobNotFound,
    JobRecord,
    JobState,
    NoHostFits,
    SshwasmError,
    UsageError,
)
from sshwasm.store import RECORD_FIELDS, JobStore

SLEEP = PROGRAMS / "sleep.rs"
ECHO = EXAMPLES / "echo.rs"
EXITCODE = PROGRAMS / "exitcode.rs"


@pytest.fixture
def cluster(make_cluster: Callable[..., Path]) -> Path:
    return make_cluster({"alpha": (2, 1024), "beta": (2, 1024)})


@pytest.fixture
def client(cluster: Path) -> Iterator[Client]:
    with Client(cluster=cluster) as opened:
        yield opened


def wait_until(what: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# -- submit, the record, failures -----------------------------------------------------------


def test_submit_returns_a_future_whose_result_is_the_record(client: Client) -> None:
    job = client.submit(
        ECHO, "one", 2, Path("three"), env={"GREETING": "hi"}, stdin=b"1 2\n3\n", name="echo"
    )
    assert isinstance(job, api.Job) and isinstance(job.id, int)
    record = job.result(timeout=120)
    assert isinstance(record, JobRecord)
    assert record.state is JobState.SUCCEEDED and record.succeeded and record.exit_code == 0
    assert record.stdout == (
        "arg[1]=one\narg[2]=2\narg[3]=three\nGREETING=hi\nstdin lines: 2\nsum: 6\n"
    )
    assert record.host in ("alpha", "beta") and record.name == "echo"
    assert record.run_s is not None and record.started_at and record.finished_at
    assert job.done() and not job.running() and not job.cancelled()
    assert job.output() == record.stdout.encode() and job.output("stderr") == b""
    # The same record as the command line's, field for field.
    assert record.to_dict() == record_of(sshwasm("status", str(job.id), "--json"))


def test_a_failed_job_is_a_result_not_an_exception(client: Client) -> None:
    job = client.submit(EXITCODE, "3")
    record = job.result(timeout=120)
    assert record.state is JobState.FAILED and record.exit_code == 3 and not record.succeeded
    assert job.exception() is None and job.state is JobState.FAILED


def test_stdin_from_a_file_and_a_time_limit(client: Client, tmp_path: Path) -> None:
    (tmp_path / "numbers").write_text("5 5\n")
    assert client.submit(ECHO, stdin=tmp_path / "numbers").result(120).stdout == (
        "stdin lines: 1\nsum: 10\n"
    )
    timed = client.submit(SLEEP, "30", time_limit=1).result(timeout=120)
    assert timed.state is JobState.TIMEOUT and timed.time_limit_s == 1.0


def test_sshwasm_own_errors_raise_the_cli_errors(
    client: Client, cluster: Path, tmp_path: Path
) -> None:
    with pytest.raises(CompileError):
        client.submit(PROGRAMS / "compile_error.rs")
    with pytest.raises(NoHostFits):
        client.submit(ECHO, cpus=64)
    with pytest.raises(NoHostFits):
        client.submit(ECHO, host="nowhere")
    for bad in (
        {"cpus": 0},
        {"memory_mb": "lots"},
        {"time_limit": -1},
        {"env": {"A=B": "c"}},
        {"labels": "gpu"},
        {"stdin": tmp_path / "missing"},
        {"max_output_mb": 0},
        {"retries": -1},
        {"retries": 2.5},
        {"retry_failed": True},
        {"after": 1},
        {"after": ["1"]},
        {"after": [9999]},
        {"after": [1], "after_any": [2]},
    ):
        with pytest.raises(UsageError):
            client.submit(ECHO, **bad)  # type: ignore[arg-type]
    for bad in ({"max_running": 0}, {"halt_after_failures": True}):
        with pytest.raises(UsageError):
            client.map(ECHO, [["a"]], **bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        client.submit(ECHO, object())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"needs at least 2 MB .* memory_mb=1 is too small"):
        client.submit(ECHO, memory_mb=1)
    with pytest.raises(JobNotFound):
        client.job(9999)
    with pytest.raises(UsageError):
        client.jobs(state="sleeping")
    (tmp_path / "bad.yaml").write_text("hosts: [\n")
    with pytest.raises(api.ClusterError):
        Client(cluster=tmp_path / "bad.yaml")
    assert issubclass(UsageError, SshwasmError)
    # Nothing was recorded by the calls that failed.
    assert client.jobs() == []


# -- map, wait, as_completed ----------------------------------------------------------------


def test_map_submits_one_array_with_each_tasks_arguments(client: Client) -> None:
    jobs = client.map(ECHO, [["a"], ["b", "c"], "d", [], 5])
    records = [job.result(timeout=120) for job in jobs]
    assert [r.stdout for r in records] == [
        "arg[1]=a\nstdin lines: 0\nsum: 0\n",
        "arg[1]=b\narg[2]=c\nstdin lines: 0\nsum: 0\n",
        "arg[1]=d\nstdin lines: 0\nsum: 0\n",
        "stdin lines: 0\nsum: 0\n",
        "arg[1]=5\nstdin lines: 0\nsum: 0\n",
    ]
    assert [r.array_task for r in records] == [0, 1, 2, 3, 4]
    assert {r.array_id for r in records} == {jobs[0].id}
    assert client.map(ECHO, []) == []


def test_retries_dependencies_and_array_limits_as_run_takes_them(client: Client) -> None:
    """`after`/`after_any` hold a job as `--after`/`--after-any` do; `max_running` and
    `halt_after_failures` limit an array, `retries`/`retry_failed` are kept with the job."""
    failing = client.submit(EXITCODE, "3", retries=2, retry_failed=True)
    held = client.submit(ECHO, "held", after=[failing])
    anyway = client.submit(ECHO, "anyway", after_any=[failing.id])
    assert held.result(timeout=120).state is JobState.CANCELLED
    assert held.result().error == f"dependency job {failing.id} ended failed"
    assert anyway.result(timeout=120).stdout.startswith("arg[1]=anyway\n")
    assert failing.result().attempts == 3  # retry_failed: the guest's own failure, twice more
    with JobStore(client.db_path) as store:
        assert (store.get(failing.id).retries, store.get(held.id).dependencies) == (2, [failing.id])

    one_at_a_time = client.map(SLEEP, [["0.3"]] * 3, max_running=1, after=[anyway])
    spans = sorted(
        (r.started_at, r.finished_at) for r in (j.result(timeout=120) for j in one_at_a_time)
    )
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), spans
    halted = client.map(EXITCODE, ["3", "0", "0"], max_running=1, halt_after_failures=1)
    states = [job.result(timeout=120).state for job in halted]
    assert states == [JobState.FAILED, JobState.CANCELLED, JobState.CANCELLED]
    assert halted[2].result().error == "halted after 1 failures"


def test_as_completed_and_wait_follow_the_order_jobs_end_in(client: Client) -> None:
    jobs = client.map(SLEEP, [["4"], ["0"], ["2"]])
    done, not_done = api.wait(jobs, return_when=FIRST_COMPLETED, timeout=120)
    assert done == {jobs[1]} and not_done == {jobs[0], jobs[2]}
    order = [job.id for job in api.as_completed(jobs, timeout=120)]
    assert order == [jobs[1].id, jobs[2].id, jobs[0].id]
    done, not_done = api.wait(jobs, timeout=10)
    assert done == set(jobs) and not not_done


def test_result_timeout_raises_and_the_job_goes_on(client: Client) -> None:
    job = client.submit(SLEEP, "3")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        job.result(timeout=0.5)
    assert 0.4 < time.monotonic() - started < 5 and not job.done()
    with pytest.raises(TimeoutError):
        list(api.as_completed([job], timeout=0.2))
    assert job.result(timeout=120).succeeded


def test_done_callbacks_fire_once_each(client: Client) -> None:
    calls: list[tuple[int, JobState]] = []
    fired = threading.Event()

    def note(job: api.Job) -> None:
        calls.append((job.id, job.result().state))
        fired.set()

    job = client.submit(SLEEP, "1")
    job.add_done_callback(note)
    assert not job.done()
    assert fired.wait(120)
    time.sleep(1.5)  # the watcher reads the jobs file again meanwhile: no second call
    assert calls == [(job.id, JobState.SUCCEEDED)]
    job.add_done_callback(note)  # added once done: called at once, once
    assert calls == [(job.id, JobState.SUCCEEDED)] * 2


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_a_running_job_and_a_queued_one(make_cluster: Callable[..., Path]) -> None:
    with Client(cluster=make_cluster({"alpha": (1, 1024)})) as client:
        running = client.submit(SLEEP, "60")
        queued = client.submit(SLEEP, "60")
        wait_until(lambda: running.running())
        assert queued.status().state is JobState.QUEUED
        assert queued.cancel() is True
        record = queued.result(timeout=10)
        assert record.state is JobState.CANCELLED and queued.cancelled()
        assert record.error == "cancelled before it started"
        started = time.monotonic()
        assert running.cancel() is True
        record = running.result(timeout=60)
        assert record.state is JobState.CANCELLED and record.host == "alpha"
        assert time.monotonic() - started < 30
        assert running.cancel() is False and queued.cancel() is False


# -- looking at jobs and hosts --------------------------------------------------------------


def test_jobs_job_and_hosts(client: Client, cluster: Path) -> None:
    first = client.submit(EXITCODE, "0")
    second = client.submit(EXITCODE, "4")
    api.wait([first, second], timeout=120)
    listed = client.jobs()
    assert [r.id for r in listed] == [second.id, first.id]  # newest first
    assert [r.id for r in client.jobs(state="failed")] == [second.id]
    assert [r.id for r in client.jobs(limit=1)] == [second.id]
    assert client.job(first.id) is first  # one future per job per client
    # A job submitted by the command line is followed too.
    detached = sshwasm("--cluster", str(cluster), "run", "--detach", str(SLEEP), "--", "1")
    assert detached.returncode == 0, detached.stderr
    other = client.job(int(detached.stdout))
    assert other.result(timeout=120).state is JobState.SUCCEEDED
    hosts = {host.name: host for host in client.hosts()}
    assert set(hosts) == {"alpha", "beta"}
    assert hosts["alpha"].cpus == 2 and hosts["alpha"].cpus_free == 2
    assert hosts["alpha"].reachable is None and hosts["alpha"].report is None
    checked = client.hosts(check=True)
    assert all(host.reachable and host.error is None for host in checked)
    assert all(host.report is not None and "host_cpus" in host.report for host in checked)


def test_hosts_shows_capacity_held_by_running_jobs(client: Client) -> None:
    job = client.submit(SLEEP, "30", cpus=2, host="beta")
    wait_until(job.running)
    beta = next(host for host in client.hosts() if host.name == "beta")
    assert beta.cpus_free == 0 and beta.running == 1
    job.cancel()
    job.result(timeout=60)


# -- closing, the program exiting -----------------------------------------------------------


def test_closing_the_client_keeps_jobs_and_futures(cluster: Path) -> None:
    with Client(cluster=cluster) as client:
        job = client.submit(SLEEP, "1")
    with pytest.raises(UsageError):
        client.submit(SLEEP, "1")
    assert job.result(timeout=120).succeeded


def test_a_job_whose_coordinator_was_killed_is_collected_from_its_host(client: Client) -> None:
    job = client.submit(SLEEP, "3")
    wait_until(lambda: job.output() == b"start\n")  # the guest runs on its host
    with JobStore(client.db_path) as store:
        coordinator = store.get(job.id).coordinator_pid
    assert coordinator is not None and coordinator != os.getpid()
    os.kill(coordinator, signal.SIGKILL)
    record = job.result(timeout=120)
    assert record.state is JobState.SUCCEEDED and record.stdout == "start\nend\n"


def test_jobs_outlive_the_program_that_submitted_them(cluster: Path) -> None:
    program = (
        "import sys, sshwasm\n"
        f"client = sshwasm.Client(cluster={str(cluster)!r})\n"
        f"job = client.submit({str(SLEEP)!r}, '2')\n"
        "print(job.id)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # exiting with the watcher thread running says nothing
    job_id = int(done.stdout)
    with Client(cluster=cluster) as client:
        record = client.job(job_id).result(timeout=120)
    assert record.state is JobState.SUCCEEDED and record.stdout == "start\nend\n"


def test_import_sshwasm_stays_light() -> None:
    program = (
        "import sys, sshwasm\n"
        "heavy = ('asyncio', 'asyncssh', 'wasmtime', 'sqlite3')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout == "[]\n", done.stderr
    with pytest.raises(AttributeError):
        api.NoSuchName  # noqa: B018
    assert set(api.__all__) <= set(dir(api))


# -- asyncio ----------------------------------------------------------------------------------


def test_async_client(cluster: Path) -> None:
    async def main() -> tuple[JobRecord, list[JobRecord], list[str]]:
        async with api.AsyncClient(cluster=cluster) as client:
            job = await client.submit(ECHO, "x")
            tasks = await client.map(SLEEP, [["1"], ["0"]])
            # The event loop keeps running while jobs do.
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.05)

            ticker = asyncio.create_task(tick())
            record = await job
            records = list(await asyncio.gather(*tasks))
            ticker.cancel()
            assert ticks > 5
            hosts = [host.name for host in await client.hosts()]
            assert [r.id for r in await client.jobs()] == [t.id for t in reversed(tasks)] + [job.id]
            assert (await client.job(job.id)) is job
            assert await client.output(job.id) == b"arg[1]=x\nstdin lines: 0\nsum: 0\n"
            return record, records, hosts

    record, records, hosts = asyncio.run(main())
    assert record.succeeded and record.stdout == "arg[1]=x\nstdin lines: 0\nsum: 0\n"
    assert [r.stdout for r in records] == ["start\nend\n", "start\nend\n"]
    assert sorted(hosts) == ["alpha", "beta"]


# -- the example --------------------------------------------------------------------------------


def test_sweep_example_runs_through_map(cluster: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "sweep.py"), "--cluster", str(cluster), "--seeds", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("submitted array ") and lines[0].endswith(": 6 tasks")
    assert len([line for line in lines if line.startswith("task ")]) == 6
    assert [line.split()[0] for line in lines[-3:]] == ["10000", "100000", "1000000"]
    errors = [float(line.rsplit(" ", 1)[1]) for line in lines[-3:]]
    assert errors[-1] < 0.01
    listing = json.loads(sshwasm("jobs", "--json").stdout)
    assert {job["name"] for job in listing} == {"pi-sweep"}


def test_the_readme_example_runs_as_printed(cluster: Path, tmp_path: Path) -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(example.strip().splitlines()) <= 10
    done = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=EXAMPLES.parent,  # the example names examples/... as a user in the checkout would
        env={**os.environ, "SSHWASM_CLUSTER": str(cluster)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:4] == ["arg[1]=one", "GREETING=hi", "stdin lines: 1", "sum: 3"]
    tasks = [line.split(maxsplit=4) for line in lines[4:]]
    assert sorted(int(task[0]) for task in tasks) == list(range(8))
    assert all(task[1] == "succeeded" and task[2] in ("alpha", "beta") for task in tasks)
    assert all(task[4].startswith("points=1000000 seed=") for task in tasks)


def test_an_await_that_times_out_leaves_the_job_running(client: Client) -> None:
    job = client.submit(SLEEP, "2")

    async def impatient() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(job, 0.3)

    asyncio.run(impatient())
    assert not job.cancelled()
    record = job.result(timeout=120)
    assert record.state is JobState.SUCCEEDED and record.stdout == "start\nend\n"


def test_the_record_type_has_every_field_of_the_record_contract() -> None:
    # store.RECORD_FIELDS is the contract (README, "The job record"): a field added there
    # must reach the API's typed record too.
    assert [field.name for field in dataclasses.fields(api.JobRecord)] == list(RECORD_FIELDS)
