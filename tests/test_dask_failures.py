"""engine: dask (issue 12): what happens when things fail, on the real loopback sshd hosts.

One end-to-end test on one pool (starting a pool costs seconds): a detached job shows
`running` on its host; a worker SIGKILLed mid-task takes its guest with it (the guest's
answer is never recorded, Dask runs the task again); `sshwasm cancel` of a detached job
stops its guest within a second and a queued one never starts; a client SIGKILLed mid-array
leaves nothing unrecorded; after the scheduler is killed and `pool up` again, `jobs` settles
every unfinished job once; `pool down` with guests running leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dask_cli import DASK_TEST_CONFIG, run_in_process
from helpers import (
    RUNNER,
    Guest,
    held_spec,
    process_gone,
    processes_whose_argv,
    run_runner,
    runner_env,
    start_sshwasm,
    wait_for,
)

from sshwasm.engines import dask_engine, dask_preload
from sshwasm.runner import parent_death
from sshwasm.runner.protocol import FrameDecoder, encode_frame, encode_hello

# The command line in this process (`jobs` is polled: a process each time imported
# `distributed` again, most of this module's time), but for the client killed mid-array.
_run = run_in_process


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _processes_under(root: Path) -> list[int]:
    """Live processes whose command line names a path under `root` (the hosts' workdirs):
    the pool's scheduler, nannies, workers, serve children and their guests' executors."""
    marker = str(root).encode()
    found = processes_whose_argv(lambda argv: any(marker in word for word in argv))
    return [pid for pid in found if pid != os.getpid() and not process_gone(pid)]


def _worker_process(workdir: Path) -> int:
    """The Dask worker process under the host's nanny."""
    nanny = int((workdir / "dask" / "worker.pid").read_text())
    for pid in processes_whose_argv(lambda argv: any(b"spawn_main" in word for word in argv)):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == nanny:
            return pid
    raise AssertionError(f"no worker process under nanny {nanny}")


def test_worker_stopped_text_is_the_runners() -> None:
    """The plugin (which cannot import sshwasm) shares words with the runner (serve's result
    text for a guest killed because its worker stopped) and the engine (the event topic):
    the copies must not drift apart."""
    assert dask_preload.WORKER_STOPPED == parent_death.WORKER_STOPPED
    assert dask_preload.END_WITH_PARENT_VARIABLE == parent_death.END_WITH_PARENT_VARIABLE
    assert dask_preload.STARTED_TOPIC == dask_engine.STARTED_TOPIC


def _serve_as_a_worker_starts_it(workdir: Path, guest: Guest) -> subprocess.Popen[bytes]:
    """The runner's `serve` in `workdir` (holding `guest`'s module) as a Dask worker starts
    it: to end with its parent (SSHWASM_SERVE_END_WITH_PARENT=1); pipes on stdin, stdout."""
    done = run_runner("put-module", str(workdir), guest.sha256, stdin=guest.data)
    assert done.returncode == 0, done.stderr
    env = dict(runner_env(), **{parent_death.END_WITH_PARENT_VARIABLE: "1"})
    return subprocess.Popen(
        [sys.executable, str(RUNNER), "serve", str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )


@pytest.mark.parametrize("how", ["eof", "sigterm", "sigkill"])
def test_serve_under_a_worker_takes_its_guests_along(
    tmp_path: Path, guest: Guest, how: str
) -> None:
    """serve started by a Dask worker (SSHWASM_SERVE_END_WITH_PARENT=1) kills its guests when
    the worker goes: EOF on its stdin (the worker died), SIGTERM (`pool down` signals the
    worker's group), or serve itself SIGKILLed (each guest asked to die with serve). With a
    result saying so, where serve lives to write it."""
    workdir = tmp_path / "wd"
    serve = _serve_as_a_worker_starts_it(workdir, guest)
    assert serve.stdin is not None and serve.stdout is not None
    pid = 0
    try:
        serve.stdin.write(encode_frame(b"H", encode_hello()))
        serve.stdin.write(encode_frame(b"L", held_spec(guest, "job1.beta-1-1")))
        serve.stdin.flush()
        decoder = FrameDecoder()
        while not pid:
            chunk = os.read(serve.stdout.fileno(), 65536)
            assert chunk, "serve ended before it started the task"
            for kind, payload in decoder.feed(chunk):
                if kind == b"S":
                    pid = json.loads(payload.partition(b"\n")[2])["pid"]
        job_dir = workdir / "jobs" / "job1.beta-1-1"
        stdout = job_dir / "stdout"
        wait_for(lambda: stdout.exists() and b"start" in stdout.read_bytes(), 30)
        if how == "eof":
            serve.stdin.close()
        else:
            serve.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        wait_for(lambda: process_gone(pid), 5)
        assert serve.wait(10) is not None
        if how != "sigkill":
            result = json.loads((job_dir / "result.json").read_text())
            assert (result["state"], result["error"]) == ("failed", parent_death.WORKER_STOPPED)
    finally:
        serve.kill()
        serve.wait()
        if pid and not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_serve_under_a_worker_sends_a_quick_tasks_start_with_its_end(
    tmp_path: Path, guest: Guest
) -> None:
    """Under a Dask worker serve holds a task's S frame (up to HELD_STARTED_S) to send it
    in the write of the task's outcome: the worker wakes once per task, not twice. Tasks
    one at a time on a warm executor, as a worker hands them over; S still before R."""
    workdir = tmp_path / "wd"
    serve = _serve_as_a_worker_starts_it(workdir, guest)
    assert serve.stdin is not None and serve.stdout is not None
    decoder = FrameDecoder()
    together = 0
    try:
        serve.stdin.write(encode_frame(b"H", encode_hello()))
        for index in range(4):  # the first forks the executor and loads the module
            spec = json.loads(held_spec(guest, f"quick.{index}").partition(b"\n")[0])
            spec.update(argv=["probe", "hello"], input_tar_bytes=0)
            serve.stdin.write(encode_frame(b"L", json.dumps(spec).encode() + b"\n"))
            serve.stdin.flush()
            kinds: list[list[bytes]] = []
            while not kinds or b"R" not in kinds[-1]:
                chunk = os.read(serve.stdout.fileno(), 65536)  # what one write sent
                assert chunk, "serve ended before the task's result"
                kinds.append([kind for kind, _ in decoder.feed(chunk) if kind != b"H"])
            sent = [kind for chunk_kinds in kinds for kind in chunk_kinds]
            assert sent.count(b"S") == 1 and sent.index(b"S") < sent.index(b"R"), sent
            together += index > 0 and b"S" in kinds[-1]
        assert together >= 2, "S frames went in writes of their own"
    finally:
        serve.kill()
        serve.wait()


def test_dask_failures_end_to_end(
    make_cluster: Callable[..., Path], tmp_path: Path, built: dict[str, Any]
) -> None:
    from sshd import loopback

    path = make_cluster({"alpha": (2, 1024), "beta": (1, 512)})
    path.write_text(
        f"engine: dask\ndask:\n  scheduler: alpha\n  port: {_free_port(loopback(2))}\n"
        f"  dashboard_port: {_free_port('127.0.0.1')}\n" + path.read_text()
    )
    workers = tmp_path / "workers"
    for name in ("alpha", "beta"):  # read by the pool's processes there (DASK_CONFIG)
        config = workers / name / "dask" / "config"
        config.mkdir(mode=0o700, parents=True)
        (config / "sshwasm-test.yaml").write_text(DASK_TEST_CONFIG)
    cluster = ["--cluster", str(path)]
    sleep = str(built["sleep"].path)

    def jobs() -> dict[int, dict[str, Any]]:
        listed = _run(*cluster, "jobs", "--json")
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        return {record["id"]: record for record in json.loads(listed.stdout)}

    def detach(*args: str) -> list[int]:
        done = _run(*cluster, "run", "--detach", *args)
        assert done.returncode == 0, done.stderr
        return [int(line) for line in done.stdout.split()]

    def remote_key(job_id: int) -> str:
        """The job's directory name on its host (read from the jobs file, read-only)."""
        database = tmp_path / "data" / "jobs.sqlite"
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            (key,) = db.execute("SELECT remote_key FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return str(key)

    def running(job_id: int, key: str | None = None) -> str:
        """Wait until `jobs` shows the job running (under another run than `key`); its run."""
        wait_for(lambda: jobs()[job_id]["state"] == "running" and remote_key(job_id) != key, 60)
        return remote_key(job_id)

    def runs_of(job_id: int) -> list[Path]:
        return list(workers.glob(f"*/jobs/{remote_key(job_id).split('.', 1)[0]}.*"))

    try:
        up = _run(*cluster, "pool", "up", timeout=180)
        assert up.returncode == 0, up.stderr

        # -- A detached job shows `running` with its host and start; one queued behind it
        # (beta has one cpu) is cancelled and never starts.
        both = detach("--host", "beta", sleep, "--", "60") + detach(
            "--host", "beta", sleep, "--", "60"
        )
        wait_for(lambda: any(jobs()[job_id]["state"] == "running" for job_id in both), 60)
        records = jobs()
        (first_id,) = [job_id for job_id in both if records[job_id]["state"] == "running"]
        (queued_id,) = set(both) - {first_id}
        shown = records[first_id]
        assert shown["host"] == "beta" and shown["started_at"], shown
        assert records[queued_id]["state"] == "queued" and records[queued_id]["host"] is None
        status = json.loads(_run(*cluster, "status", "--json", str(first_id)).stdout)
        assert status["state"] == "running" and status["host"] == "beta", status
        cancel = _run(*cluster, "cancel", str(queued_id))
        assert cancel.returncode == 0 and "cancelled" in cancel.stdout, cancel.stderr

        # -- The worker SIGKILLed mid-task: its guest dies with it (not recorded), and Dask
        # runs the task again on the worker its nanny starts anew.
        shown_key = remote_key(first_id)
        job_dir = workers / "beta" / "jobs" / shown_key
        wait_for(lambda: (job_dir / "stdout").exists(), 30)
        guest = int((job_dir / "pid").read_text())
        os.kill(_worker_process(workers / "beta"), signal.SIGKILL)
        wait_for(lambda: process_gone(guest), 5)
        result = json.loads((job_dir / "result.json").read_text())
        assert result["error"] == parent_death.WORKER_STOPPED, result
        again = running(first_id, shown_key)
        assert jobs()[first_id]["host"] == "beta"

        # -- `sshwasm cancel` (not the process that submitted it) stops the guest before it
        # returns (it kills first, then cancels the task; importing distributed is what
        # takes time, seconds on a loaded machine); the record says cancelled.
        job_dir = workers / "beta" / "jobs" / again
        wait_for(lambda: (job_dir / "stdout").exists(), 30)
        guest = int((job_dir / "pid").read_text())
        cancel = _run(*cluster, "cancel", str(first_id))
        assert cancel.returncode == 0, cancel.stderr
        assert cancel.stdout == f"job {first_id}: cancelled\n", cancel.stdout
        wait_for(lambda: process_gone(guest), 1)
        assert json.loads((job_dir / "result.json").read_text())["state"] == "cancelled"
        records = jobs()
        assert records[first_id]["state"] == "cancelled", records[first_id]
        assert records[queued_id]["state"] == "cancelled", records[queued_id]
        time.sleep(1.0)  # beta is free now: the cancelled queued job must not start
        assert runs_of(queued_id) == []

        # -- A client SIGKILLed mid-array (not detached): a later `jobs` collects what ran
        # and submits again what never started; every task once, `succeeded`.
        client = start_sshwasm(*cluster, "run", "--array", "3", "--host", "beta", sleep, "--", "2")
        try:
            wait_for(lambda: len(jobs()) == 5, 30)
            array = sorted(jobs())[-3:]
            # A followed job shows running too, on its host.
            wait_for(
                lambda: any(
                    (record["state"], record["host"]) == ("running", "beta")
                    for job_id, record in jobs().items()
                    if job_id in array
                ),
                30,
            )
        finally:
            client.kill()
            client.wait()

        def settled(ids: list[int]) -> bool:
            records = jobs()
            return all(records[job_id]["state"] == "succeeded" for job_id in ids)

        wait_for(lambda: settled(array), 60)
        records = jobs()
        for index, job_id in enumerate(array):
            record = records[job_id]
            assert record["stdout"] == "start\nend\n" and record["array_task"] == index, record
            assert len(runs_of(job_id)) == 1, (record, runs_of(job_id))

        # -- The scheduler killed, then `pool up`: `jobs` settles each unfinished job once:
        # collected from result.json if it ran, submitted again if it never started or
        # its worker stopped under it (the workers leave with their scheduler). No `jobs`
        # before the kill: it would collect the ended job from the scheduler.
        before = set(workers.glob("*/jobs/*"))
        (ended,) = detach("--host", "alpha", str(built["task"].path))
        sleeper, behind = detach("--array", "2", "--host", "beta", sleep, "--", "3")

        def new_dirs(host: str) -> list[Path]:
            return [d for d in workers.glob(f"{host}/jobs/*") if d not in before]

        wait_for(lambda: any((d / "result.json").exists() for d in new_dirs("alpha")), 30)
        wait_for(lambda: any((d / "stdout").exists() for d in new_dirs("beta")), 30)
        os.kill(int((workers / "alpha" / "dask" / "scheduler.pid").read_text()), signal.SIGKILL)
        wait_for(lambda: not _worker_pids(workers), 60)
        up = _run(*cluster, "pool", "up", timeout=180)
        assert up.returncode == 0 and "scheduler started" in up.stdout, up.stderr
        first_look = jobs()
        second_look = jobs()
        assert first_look[ended]["state"] == "succeeded", first_look[ended]
        assert first_look[ended]["stdout"] == "".join(
            f"task  of  line {line}\n"
            for line in range(3)  # no array: no task id
        ), first_look[ended]
        assert second_look[ended] == first_look[ended]
        for job_id in (sleeper, behind):
            assert first_look[job_id]["state"] in ("queued", "running"), first_look[job_id]
            assert second_look[job_id]["attempts"] == first_look[job_id]["attempts"]
        wait_for(lambda: settled([sleeper, behind]), 60)
        records = jobs()
        # The one that ran when its worker stopped is on its second attempt.
        assert sorted(records[job_id]["attempts"] for job_id in (sleeper, behind)) == [1, 2]
        assert [records[job_id]["stdout"] for job_id in (sleeper, behind)] == ["start\nend\n"] * 2
        assert len(records) == 8  # nothing recorded twice

        # -- `pool down` with a guest running leaves no process behind.
        (last,) = detach(sleep, "--", "60")
        running(last)
        down = _run(*cluster, "pool", "down", timeout=120)
        assert down.returncode == 0, down.stderr
        assert _processes_under(workers) == []
    finally:
        _run(*cluster, "pool", "down", timeout=120)
        leftovers = _processes_under(workers)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left behind: {leftovers}"


def _worker_pids(workers: Path) -> list[int]:
    """The pool's live nannies and workers (the scheduler's restart takes them down)."""
    return [
        pid
        for pid in _processes_under(workers)
        if any(
            b"dask_worker" in word or b"spawn_main" in word
            for word in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        )
    ]


def test_a_scheduler_that_stops_answering_is_noticed_and_a_slow_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client's waits are bounded (engines/dask_waits.py): a run waits for a task as
    long as it takes while the scheduler answers (here one no worker can run), and a
    scheduler that stops answering (its event loop held: connected, silent) ends the wait
    and each question with one line naming it, in about ANSWER_TIMEOUT_S, not never."""
    import distributed

    from sshwasm.engines import dask_waits

    monkeypatch.setattr(dask_waits, "ANSWER_TIMEOUT_S", 1.0)
    monkeypatch.setattr(dask_waits, "ALIVE_EVERY_S", 0.5)
    with _scheduler_in_a_thread() as address:
        client = distributed.Client(address, timeout=30, set_as_default=False)
        try:
            # No worker: the task waits, and so does the run while the scheduler answers.
            pending = distributed.as_completed(
                [client.submit(sum, [1, 2], pure=False)], loop=client.loop
            )
            results: list[Any] = []
            waiter = threading.Thread(
                target=lambda: results.append(_waited(dask_waits.next_ended, client, pending)),
                daemon=True,
            )
            waiter.start()
            waiter.join(1.5)
            assert waiter.is_alive() and not results, results  # slow, alive: not failed
            # A function run in the scheduler's event loop holds it: not a word for 4.5 s.
            hold = threading.Thread(
                target=client.run_on_scheduler, args=(time.sleep, 4.5), daemon=True
            )
            hold.start()
            started = time.monotonic()
            waiter.join(30)
            assert not waiter.is_alive(), "the wait went on after the scheduler went silent"
            assert time.monotonic() - started < 5
            (silent,) = results
            assert isinstance(silent, dask_waits.PoolSilent), silent
            assert str(silent) == (
                f"the pool's scheduler at {address} did not answer whether it is still there in 1 s"
            )
            with pytest.raises(dask_waits.PoolSilent, match=r"did not answer its data in 1 s$"):
                dask_waits.asked(client, client.list_datasets, what="its data")
            hold.join(30)
            assert dask_waits.asked(client, client.list_datasets, what="its data") == ()
        finally:
            client.close(timeout=5)


@contextlib.contextmanager
def _scheduler_in_a_thread() -> Iterator[str]:
    """A Dask scheduler in this process (its own thread and event loop): its address."""
    import distributed

    ready = threading.Event()
    held: dict[str, Any] = {}

    async def serve() -> None:
        scheduler: Any = distributed.Scheduler(host="127.0.0.1", port=0, dashboard=False)
        async with scheduler:
            held["address"], held["loop"] = scheduler.address, asyncio.get_running_loop()
            held["stop"] = asyncio.Event()
            ready.set()
            await held["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(60), "the scheduler did not start"
    try:
        yield str(held["address"])
    finally:
        held["loop"].call_soon_threadsafe(held["stop"].set)
        thread.join(30)


def _waited(wait: Callable[..., Any], *args: Any) -> Any:
    """`wait(*args)`, or the exception it raised."""
    try:
        return wait(*args)
    except Exception as exc:
        return exc
