"""engine: dask per-task costs (issue 12 throughput), without a pool: each piece that keeps a
task cheap, held on its own. benchmarks/dask_array.py measures them together.

- The jobs file: a wake-up's ended tasks are recorded in one transaction (`finish_many`), the
  tasks started since the last one shown `running` in one (`mark_running_many`).
- The task function travels by reference to the preload module on the hosts, not by value
  (the scheduler pickles it again for each task it hands a worker).
- The worker plugin tells the scheduler its starts several to an event, and answers what
  runs on it now, however long ago it started (the scheduler keeps 1,000 events only).
- A foreground run keeps a window of tasks submitted and lets go of those that ended.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import job_spec

from sshwasm.engines import dask_engine, dask_preload
from sshwasm.runner import protocol
from sshwasm.states import JobState
from sshwasm.store import JobStore


def test_finish_many_and_mark_running_many(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store:
        first, second, third = (store.submit(job_spec()) for _ in range(3))
        assert store.finish(third, JobState.CANCELLED, error="cancelled")
        where = {"host": "beta", "remote_key": "k.beta-1-1", "started_at": "2026-01-01T00:00:00Z"}
        store.mark_running_many([(first, where), (third, where)])
        assert store.get(first).state is JobState.RUNNING
        assert store.get(first).host == "beta" and store.get(first).remote_key == "k.beta-1-1"
        # A job that ended keeps its record.
        assert store.get(third).state is JobState.CANCELLED and store.get(third).host is None
        done = store.finish_many(
            [
                (first, JobState.SUCCEEDED, {"exit_code": 0, "stdout": "tiny 0\n"}),
                (second, JobState.FAILED, {"exit_code": 3, "error": "boom"}),
                (third, JobState.SUCCEEDED, {"exit_code": 0}),
            ]
        )
        assert done == {first, second}
        records = {job.id: job for job in store.get_many([first, second, third])}
        assert records[first].state is JobState.SUCCEEDED and records[first].stdout == "tiny 0\n"
        assert records[first].finished_at and records[first].host == "beta"
        assert (records[second].state, records[second].error) == (JobState.FAILED, "boom")
        assert records[third].state is JobState.CANCELLED  # final is final
        with pytest.raises(ValueError, match="not a final state"):
            store.finish_many([(first, JobState.RUNNING, {})])
        with pytest.raises(ValueError, match="unknown job columns"):
            store.finish_many([(second, JobState.FAILED, {"no_such_column": 1})])
        assert store.finish_many([]) == set()


def test_the_task_function_goes_by_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the client submits pickles (with the standard pickle, which distributed tries
    first) as a name in the preload module, and unpickles, where that module is imported,
    as the plugin's task function."""
    task = dask_engine._task_function()
    data = pickle.dumps(task, protocol=5)
    assert dask_engine.TASK_MODULE.encode() in data and b"sshwasm_job" in data
    assert b"get_worker" not in data and len(data) < 200  # a name, not code
    monkeypatch.setitem(__import__("sys").modules, dask_engine.TASK_MODULE, dask_preload)
    assert pickle.loads(data) is dask_preload.sshwasm_job
    # ... and as the scheduler pickles it again for a worker: by name too.
    assert len(pickle.dumps(dask_preload.sshwasm_job, protocol=5)) < 200
    with pytest.raises(RuntimeError, match="runs on the pool's workers only"):
        task(b"", b"")


class _FakeLoop:
    """The worker's event loop, run by hand: callbacks and timers wait for `run`."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def add_callback(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((delay, callback))

    def run(self) -> None:
        while self.callbacks or self.timers:
            while self.callbacks:
                self.callbacks.pop(0)()
            timers, self.timers = self.timers, []
            for _delay, callback in timers:
                callback()


class _FakeWorker:
    def __init__(self) -> None:
        self.name = "beta"
        self.loop = _FakeLoop()
        self.events: list[tuple[str, Any]] = []

    def log_event(self, topic: str, message: Any) -> None:
        self.events.append((topic, message))


def _plugin(tmp_path: Path, answer: Callable[[str], list[tuple[bytes, bytes]]]) -> Any:
    plugin = dask_preload.RunnerPlugin(str(tmp_path))
    plugin.worker = _FakeWorker()
    plugin.protocol = protocol
    plugin._launch = lambda key, payload: answer(key)
    return plugin


def _payload(base: str) -> bytes:
    return b'{"key": "' + base.encode() + b'", "wasm_sha256": "00"}\n'


def test_plugin_tells_starts_together_and_knows_what_runs(tmp_path: Path) -> None:
    result = (protocol.KIND_RESULT, b'{"state": "succeeded", "exit_code": 0}')
    seen_running: list[list[str]] = []

    def answer(key: str) -> list[tuple[bytes, bytes]]:
        seen_running.append(sorted(event["key"] for event in plugin.running()))
        return [(protocol.KIND_STDOUT, b"hi\n"), result]

    plugin = _plugin(tmp_path, answer)
    worker = plugin.worker
    answers = [dask_engine._Answer.of(plugin.run(_payload(f"{n}-job"), b"")) for n in range(3)]
    assert [a.key.split(".")[0] for a in answers] == ["0-job", "1-job", "2-job"]
    assert answers[0].frames == [(protocol.KIND_STDOUT, b"hi\n"), result]
    assert answers[0].host == "beta"
    # An older pool's answer reads the same; what is no answer says so.
    old_answer = {"host": "beta", "key": "k", "frames": [result]}
    assert dask_engine._Answer.of(old_answer).frames == [result]
    for broken in (b"{}\n", b'{"host": "beta", "key": "k"}\nR\x00\x00', b"not json", 42):
        with pytest.raises(ValueError):
            dask_engine._Answer.of(broken)
    # While a task ran, the plugin said so; once it ended, it does not.
    assert [keys[0].split(".")[0] for keys in seen_running] == ["0-job", "1-job", "2-job"]
    assert plugin.running() == []
    # One wake-up of the worker's loop, one timer, one event for the three starts.
    assert len(worker.loop.callbacks) == 1 and worker.events == []
    worker.loop.run()
    assert len(worker.events) == 1
    topic, message = worker.events[0]
    assert topic == dask_preload.STARTED_TOPIC
    assert [start["base"] for start in message["started"]] == ["0-job", "1-job", "2-job"]
    assert {start["host"] for start in message["started"]} == {"beta"}
    # The engine reads those (and an older pool's one-start events) alike.
    old = {"base": "9-job", "key": "9-job.beta-1-1", "host": "beta", "at": "x"}
    starts = dask_engine._starts_of([(1.0, message), (2.0, old), (3.0, "noise")])
    assert [start["base"] for start in starts] == ["0-job", "1-job", "2-job", "9-job"]


def test_a_long_task_is_running_after_thousands_of_starts(tmp_path: Path) -> None:
    """What runs is the plugin's own list, not the scheduler's last events: a task that
    started before thousands of others is still reported while it runs."""
    release = threading.Event()
    started = threading.Event()

    def answer(key: str) -> list[tuple[bytes, bytes]]:
        if key.startswith("long-job."):
            started.set()
            release.wait(30)
        return [(protocol.KIND_RESULT, b'{"state": "succeeded", "exit_code": 0}')]

    plugin = _plugin(tmp_path, answer)
    long = threading.Thread(target=plugin.run, args=(_payload("long-job"), b""))
    long.start()
    try:
        assert started.wait(30)
        for n in range(3000):
            plugin.run(_payload(f"{n}-job"), b"")
        assert [event["base"] for event in plugin.running()] == ["long-job"]
    finally:
        release.set()
        long.join(30)
    assert plugin.running() == []


class _FakeFuture:
    def __init__(self, key: str) -> None:
        self.key = key
        self.released = False

    def release(self) -> None:
        self.released = True


def test_the_window_holds_what_runs_and_lets_go_of_what_ended() -> None:
    from sshwasm.store import Job

    flight = dask_engine._Flight(list(range(1, 11)), window=4)
    taken = flight.take()
    assert taken == [1, 2, 3, 4] and flight.take() == []
    assert dask_engine.WINDOW_TOP_UP == 4  # topped up from one free (a quarter of 4)

    def job(job_id: int) -> Job:
        fields = {name: None for name in dask_engine.Job.__dataclass_fields__}
        fields.update(id=job_id, remote_key=f"{job_id}-abc", array_id=1)
        return Job(**fields)

    futures = {_FakeFuture(f"sshwasm-{job_id}"): job_id for job_id in taken}
    flight.add(futures, [job(job_id) for job_id in taken])
    assert flight.by_base == {f"{job_id}-abc": job_id for job_id in taken}
    ended = list(futures)[:3]
    flight.end(ended)
    # Out of the window, kept until the scheduler was asked about reruns, then let go.
    assert not any(future.released for future in ended) and len(flight.ended) == 3
    flight.release()
    assert all(future.released for future in ended) and flight.ended == {}
    assert list(flight.futures.values()) == [4] and list(flight.by_base) == ["4-abc"]
    assert flight.take() == [5, 6, 7]  # as many as ended
    flight.add({}, [])  # all three cancelled meanwhile: not submitted
    assert flight.take() == [8, 9, 10]
    big = dask_engine._Flight(list(range(100)), window=40)
    assert len(big.take()) == 40
    futures = {_FakeFuture(str(n)): n for n in range(40)}
    big.add(futures, [job(n) for n in range(40)])
    big.end(list(futures)[:9])
    assert big.take() == []  # 9 free: less than a quarter, no `map` for so few
    big.end(list(futures)[9:10])
    assert big.take() == list(range(40, 50))


def test_an_array_tasks_output_is_shown_from_its_record_when_that_is_all_of_it() -> None:
    """A foreground array shows each task's output from its record, just written, without
    opening its files again; from the file only when the record is not all of it, byte for
    byte (cut to head and tail, or bytes that are not UTF-8)."""
    from sshwasm.cli.dask_run import _recorded_output

    class Record:
        def __init__(self, text: str | None, size: int) -> None:
            self.stdout, self.stdout_bytes = text, size

    recorded: Any = Record("héllo\nwörld\n", len("héllo\nwörld\n".encode()))
    assert _recorded_output(recorded, "stdout") == "héllo\nwörld\n".encode()
    assert _recorded_output(Record("", 0), "stdout") == b""  # type: ignore[arg-type]
    assert _recorded_output(Record(None, 0), "stdout") == b""  # type: ignore[arg-type]
    cut: Any = Record("head\n[sshwasm: 9 bytes omitted here; ...]\ntail\n", 200_000)
    assert _recorded_output(cut, "stdout") is None
    # b"\xf0\x9f\x98" decodes to one U+FFFD, which encodes to 3 bytes again (not these).
    replaced: Any = Record(b"a\xf0\x9f\x98b".decode(errors="replace"), 5)
    assert _recorded_output(replaced, "stdout") is None
    assert _recorded_output(Record(None, 7), "stdout") is None  # type: ignore[arg-type]


def test_the_pool_batches_its_streams_to_the_scheduler_and_to_clients() -> None:
    """Under a stream of tiny tasks each message of a worker to the scheduler, and of the
    scheduler to a client, went in a write of its own (Dask's 2 ms): the worker plugin and
    the scheduler's plugin widen both."""
    from distributed.batched import BatchedSend

    from sshwasm.engines import dask_limits_plugin

    class Worker:
        name = "alpha"
        batched_stream = BatchedSend(interval="2ms")

        class loop:  # the shape of a worker's loop
            asyncio_loop = None

    plugin = dask_preload.RunnerPlugin("/nonexistent")
    plugin._warm = lambda: None  # type: ignore[method-assign]
    plugin.setup(Worker())
    assert Worker.batched_stream.interval == dask_preload.SCHEDULER_SEND_EVERY_S

    callbacks: list[Callable[[], None]] = []
    stream = BatchedSend(interval="2ms")

    comms: dict[str, Any] = {}

    class Scheduler:
        client_comms = comms

        class loop:
            @staticmethod
            def add_callback(function: Callable[..., None], *args: Any) -> None:
                callbacks.append(lambda: function(*args))

    batching = dask_limits_plugin.BatchingPlugin()
    batching.scheduler = Scheduler()
    batching.add_client(Scheduler(), "client-1")  # before Dask makes the client's stream
    comms["client-1"] = stream
    for callback in callbacks:
        callback()
    assert stream.interval == dask_limits_plugin.CLIENT_SEND_EVERY_S
