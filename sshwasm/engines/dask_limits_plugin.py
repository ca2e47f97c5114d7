"""An array's `--max-running` and `--halt-after-failures` on the Dask pool, held by the
scheduler (so a detached array keeps them with no process of sshwasm following it).

This file is copied to each host by `sshwasm pool up` (as `<workdir>/dask/sshwasm_limits.py`)
and preloaded by the scheduler and every worker, so it imports nothing from sshwasm: only the
standard library and distributed.

The client annotates each task of a limited array (`ANNOTATION`: the array's token, its
limits, and how many of its tasks had failed before these were submitted). In the
scheduler, `LimitsPlugin`:

- `--max-running K`: holds the array's tasks as they arrive, each with a resource no worker
  has (`HOLD_RESOURCE`), so Dask leaves them `no-worker`: no worker thread and none of their
  `cpus`/`memory_mb` are taken while they wait. As long as fewer than K of the array's
  released tasks have not ended (memory, erred or forgotten; a task Dask runs again after
  its worker died stays counted), it releases the oldest held one: the hold is dropped and
  Dask places the task as any other. Why not a chain of dependencies (task i after task
  i-K)? A dependency that erred or was cancelled takes its dependents with it: `sshwasm
  cancel` of one task would cancel the rest of its chain. Why not `distributed.Semaphore`?
  A task waiting on it holds its worker thread and resources. Why not the client's window
  alone? A detached array has no client.
- `--halt-after-failures N`: a worker whose task of such an array ended `failed`, `timeout`,
  `out_of_memory` or `lost` tells the scheduler (`FAILED_TOPIC`, an event sent before the
  task's own end on the same stream, so the scheduler counts the failure before any client
  hears of it). Before a task of the array hands its guest to the runner, its worker asks
  the scheduler (`HALTED_HANDLER`): once N failed, the task does not run its guest and
  answers `halted` (the client records it `cancelled`, `halted after N failures`), and
  every task still held is released at once to answer so.
"""

from __future__ import annotations

import heapq
import json
import os
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

PLUGIN_NAME = "sshwasm-limits"
# The task annotation of a limited array's tasks: {"array": token, "max_running": K or None,
# "halt": N or None, "failed": failures before}.
ANNOTATION = "sshwasm_limits"
# A worker resource no worker has: a held task waits `no-worker`, costing nothing.
HOLD_RESOURCE = "sshwasm-held"
# Workers tell the scheduler a failed task of a halting array: {"array": token}.
FAILED_TOPIC = "sshwasm-failed"
# The scheduler's handler a worker asks before a task of a halting array starts its guest.
HALTED_HANDLER = "sshwasm_halted"
# Set by `pool up` for the pool's processes: the sshwasm that started them (pool.py).
VERSION_VARIABLE = "SSHWASM_POOL_VERSION"
# The runner's result states that count as an array task's failure (the client's store
# counts the same: every final state but succeeded and cancelled).
FAILURE_STATES = frozenset({"failed", "timeout", "out_of_memory", "lost"})


class _Array:
    """The scheduler's view of one limited array."""

    def __init__(self, limits: dict[str, Any]) -> None:
        self.max_running: int | None = limits.get("max_running")
        self.halt: int | None = limits.get("halt")
        self.failures = int(limits.get("failed") or 0)
        self.halted = False
        self.keys: set[Any] = set()  # its tasks the scheduler knows
        self.held: list[tuple[Any, Any]] = []  # (priority, key): a heap, oldest first
        self.active: set[Any] = set()  # released and not ended

    def note_failure(self) -> bool:
        """Count one failure; True when it halts the array now."""
        self.failures += 1
        if self.halt is None or self.halted or self.failures < self.halt:
            return False
        self.halted = True
        return True


class LimitsPlugin(SchedulerPlugin):
    """Holds and releases the tasks of limited arrays; counts their failures."""

    name = PLUGIN_NAME

    def __init__(self, version: str) -> None:
        self.version = version
        self.scheduler: Any = None
        self.arrays: dict[str, _Array] = {}
        self.array_of: dict[Any, str] = {}

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers[HALTED_HANDLER] = self.halted

    def halted(self, array: str | None = None) -> int | None:
        """A worker's question: the array's halt threshold if it halted, else None."""
        found = self.arrays.get(str(array))
        return found.halt if found is not None and found.halted else None

    def update_graph(
        self,
        scheduler: Any,
        *,
        annotations: dict[str, dict[Any, Any]] | None = None,
        priority: dict[Any, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """New tasks: those of a limited array are held (before Dask places them)."""
        limited = (annotations or {}).get(ANNOTATION) or {}
        touched: set[str] = set()
        for key, limits in limited.items():
            if not isinstance(limits, dict) or key not in scheduler.tasks:
                continue
            token = str(limits.get("array"))
            array = self.arrays.get(token)
            if array is None:
                array = self.arrays[token] = _Array(limits)
            array.keys.add(key)
            self.array_of[key] = token
            task = scheduler.tasks[key]
            # Held only when new (a key submitted again while it runs or ended stays as it is).
            if array.max_running is not None and task.state == "released":
                # A new dict: Dask may share one between the tasks of a `map`.
                held = {**(task.resource_restrictions or {}), HOLD_RESOURCE: 1}
                task.resource_restrictions = held
                heapq.heappush(array.held, ((priority or {}).get(key, (0,)), key))
            touched.add(token)
        for token in touched:
            self._pump_soon(token)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """A task of a limited array that ended frees its place; a forgotten one is gone."""
        token = self.array_of.get(key)
        if token is None:
            return
        array = self.arrays.get(token)
        if array is None:
            return
        if finish in ("memory", "erred", "forgotten") and key in array.active:
            array.active.discard(key)
            self._pump_soon(token)
        if finish == "forgotten":
            array.keys.discard(key)
            self.array_of.pop(key, None)
            if not array.keys:
                del self.arrays[token]

    def log_event(self, topic: str, msg: Any) -> None:
        """A worker's FAILED_TOPIC event: count it; the array halts at its threshold."""
        if topic != FAILED_TOPIC or not isinstance(msg, dict):
            return
        array = self.arrays.get(str(msg.get("array")))
        if array is not None and array.note_failure():
            self._pump_soon(str(msg.get("array")))

    def _pump_soon(self, token: str) -> None:
        # Not inside Dask's own transitions or graph update: once they are done.
        self.scheduler.loop.add_callback(self._pump, token)

    def _pump(self, token: str) -> None:
        """Release the oldest held tasks while the array has room (all once it halted:
        each then answers `halted` without running its guest)."""
        array = self.arrays.get(token)
        if array is None or array.max_running is None:
            return
        scheduler = self.scheduler
        ready: list[Any] = []
        while array.held and (array.halted or len(array.active) < array.max_running):
            _priority, key = heapq.heappop(array.held)
            task = scheduler.tasks.get(key)
            if task is None or key not in array.keys:
                continue  # cancelled while held
            restrictions = dict(task.resource_restrictions or {})
            restrictions.pop(HOLD_RESOURCE, None)
            task.resource_restrictions = restrictions or None
            if task.state in ("memory", "erred"):
                continue  # ended already: it takes no place
            array.active.add(key)
            if task.state == "no-worker":
                ready.append(key)
            # (Else it is not ready yet: Dask places it, unheld, once it is.)
        if ready:
            # Recommendations are taken last first: the oldest goes last in the dict.
            scheduler.transitions(
                {key: "processing" for key in reversed(ready)},
                stimulus_id=f"sshwasm-limits-{time.time()}",
            )


# -- on a worker, around each task -------------------------------------------------------


def limits_of(worker: Any, key: Any) -> dict[str, Any] | None:
    """The limits annotated on the task `key` running on `worker` (None: not limited)."""
    task = worker.state.tasks.get(key)
    annotations = getattr(task, "annotations", None) or {}
    limits = annotations.get(ANNOTATION)
    return limits if isinstance(limits, dict) else None


def halted_here(worker: Any, limits: dict[str, Any] | None) -> int | None:
    """Whether the task's array halted (asked of the scheduler): its threshold, or None."""
    if limits is None or limits.get("halt") is None:
        return None
    from distributed.utils import sync

    ask = getattr(worker.scheduler, HALTED_HANDLER)
    answer = sync(worker.loop, ask, array=str(limits.get("array")))
    return None if answer is None else int(answer)


def halted_answer(host: str, halt: int) -> bytes:
    """A task's answer that it did not run: its array halted after `halt` failures."""
    return json.dumps({"host": host, "key": "", "halted": halt}).encode() + b"\n"


def tell_failure(worker: Any, limits: dict[str, Any] | None, protocol: Any, answer: bytes) -> None:
    """Tell the scheduler (FAILED_TOPIC) when a task of a halting array failed: the last
    frame of its answer (dask_preload's: a JSON line, then the runner's frames) is a result
    in one of FAILURE_STATES, or no result at all."""
    if limits is None or limits.get("halt") is None:
        return
    state = "failed"
    try:
        frames = protocol.FrameDecoder().feed(answer.partition(b"\n")[2])
        kind, body = frames[-1]
        if kind == protocol.KIND_RESULT:
            state = json.loads(body).get("state")
    except Exception:  # an answer the client cannot read either: it records a failure
        pass
    if state in FAILURE_STATES:
        worker.log_event(FAILED_TOPIC, {"array": str(limits.get("array"))})


# How often at most the scheduler writes to a client's stream (Dask's own: 2 ms). Under a
# stream of tiny tasks each write carried one task's end: a TLS write here and a wake-up of
# the client per task (benchmarks/dask_array.py). A message after a quiet spell still goes
# at once (Dask's batching waits only between writes), so a lone job is not slowed.
CLIENT_SEND_EVERY_S = 0.05
BATCHING_PLUGIN_NAME = "sshwasm-batching"


class BatchingPlugin(SchedulerPlugin):
    """Batches the scheduler's messages to each client every CLIENT_SEND_EVERY_S."""

    name = BATCHING_PLUGIN_NAME

    def __init__(self) -> None:
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def add_client(self, scheduler: Any, client: str) -> None:
        # Called before Dask makes the client's stream, in the same step of the loop.
        scheduler.loop.add_callback(self._batch, client)

    def _batch(self, client: str) -> None:
        stream = self.scheduler.client_comms.get(client)
        if stream is not None and hasattr(stream, "interval"):
            stream.interval = max(stream.interval, CLIENT_SEND_EVERY_S)


async def dask_setup(server: Any) -> None:
    """Preloaded by the scheduler (the plugins) and by each worker (nothing to set up: its
    tasks import this module's functions)."""
    if hasattr(server, "add_plugin") and hasattr(server, "unrunnable"):  # the scheduler
        server.add_plugin(LimitsPlugin(os.environ.get(VERSION_VARIABLE, "")), name=PLUGIN_NAME)
        server.add_plugin(BatchingPlugin(), name=BATCHING_PLUGIN_NAME)
