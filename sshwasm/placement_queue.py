"""One coordinator's placement queue: its jobs waiting for a host, placed by one pass over
all of them per wake-up, woken by its own jobs and polling for room other processes free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from .backoff import Backoff
from .cluster import Host
from .errors import NoHostReachable, SshwasmError
from .schedule import Request, candidate_hosts, explain
from .states import JobState
from .store import JobStore, QueuedRequest

POLL_INITIAL_S = 0.05
POLL_MAX_S = 1.0
# How often the placer looks for room that other processes' jobs free (only polling sees
# those): soon at first, then less often.
PLACEMENT_POLL = Backoff(first=POLL_INITIAL_S, factor=1.5, most=POLL_MAX_S)


class PlacementQueue:
    """The jobs of one coordinator that wait for a host, and the placer that serves them.

    `run` is the placer (a background task of the coordinator); `placement` is how a job
    waits for its turn; `signal_room` says that capacity was freed or a job joined or left.
    """

    def __init__(
        self, store: JobStore, hosts: Sequence[Host], notice: Callable[[str], None]
    ) -> None:
        self.store = store
        self.hosts = hosts
        self._notice = notice
        # Set (and replaced) whenever one of our jobs frees capacity, so our own queued
        # jobs start at once instead of at their next poll.
        self._room_freed = asyncio.Event()
        # Jobs waiting for a host: their waiter and the hosts excluded for them (with why).
        self._waiting: dict[int, tuple[asyncio.Future[Host | None], dict[str, str]]] = {}
        # Arrays whose --max-running throttle was announced.
        self._throttle_said: set[int] = set()
        # Arrays whose tasks' wait for room was announced.
        self._queued_said: set[int] = set()

    def signal_room(self) -> None:
        """Wake the placer now (capacity was freed, or a job joined or left the queue)."""
        freed, self._room_freed = self._room_freed, asyncio.Event()
        freed.set()

    async def placement(self, job_id: int, excluded: dict[str, str]) -> Host | None:
        """Wait until the placer reserves a host for the job (None: it left the queue).

        `excluded` names the hosts the job must not go to, with why; raises NoHostReachable
        when no other host could ever take it.
        """
        waiter: asyncio.Future[Host | None] = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = (waiter, excluded)
        self.signal_room()
        return await waiter

    async def run(self) -> None:
        """One placement pass for all our waiting jobs per wake-up (not one per job).

        Woken when one of our jobs frees room or joins the queue; polls with backoff for
        room that other processes' jobs free.
        """
        delays = PLACEMENT_POLL.delays()
        announced: set[int] = set()
        while True:
            if not self._waiting:
                await self._wait_for_room(None)
                delays = PLACEMENT_POLL.delays()
                continue
            # A pass costs what our waiting jobs number: an array's are a window of it
            # (Coordinator.drive_tasks), never all its 100,000 tasks.
            waiting = dict(self._waiting)
            placed, gone = self.store.place_waiting(
                sorted(waiting),
                self.hosts,
                {job_id: list(excluded) for job_id, (_, excluded) in waiting.items() if excluded},
            )
            # Read once, when they first did not fit (not once per pass), all in one query.
            unfit = [
                job_id
                for job_id in waiting
                if job_id not in placed and job_id not in gone and job_id not in announced
            ]
            first_unfit = (
                {job.id: job for job in self.store.queued_requests(unfit)} if unfit else {}
            )
            # An array's tasks ask alike: whether any host could ever take them, once.
            could: dict[tuple[Request, tuple[str, ...]], bool] = {}
            for job_id, (waiter, excluded) in waiting.items():
                outcome: Host | SshwasmError | None
                if job_id in placed:
                    outcome = placed[job_id]
                elif job_id in gone:
                    outcome = None
                elif job_id in announced:
                    continue  # still waits: its hosts and exclusions are as they were
                elif job_id not in first_unfit:
                    outcome = None  # its row went away meanwhile
                else:
                    job = first_unfit[job_id]
                    asked = (job.request, tuple(sorted(excluded)))
                    if asked not in could:
                        could[asked] = bool(candidate_hosts(self.hosts, job.request, excluded))
                    if could[asked]:
                        announced.add(job_id)
                        self._announce_queued(job)
                        continue
                    outcome = NoHostReachable(excluded)
                    self.store.finish(job_id, JobState.FAILED, error=str(outcome))
                del self._waiting[job_id]
                announced.discard(job_id)
                if waiter.done():
                    continue
                if isinstance(outcome, SshwasmError):
                    waiter.set_exception(outcome)
                else:
                    waiter.set_result(outcome)
            if placed:
                # The plan placed every waiting job that fits: another pass now would find
                # the same. Ours that end or join wake the placer; polling starts afresh.
                delays = PLACEMENT_POLL.delays()
            # Other processes' jobs free room too; only polling sees those.
            await self._wait_for_room(next(delays))

    async def _wait_for_room(self, seconds: float | None) -> None:
        # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that
        # arrives as the event is set, and the placer would then never stop.
        woken = asyncio.ensure_future(self._room_freed.wait())
        try:
            await asyncio.wait({woken}, timeout=seconds)
        finally:
            woken.cancel()

    def _announce_queued(self, job: QueuedRequest) -> None:
        """Say why a job waits; for an array, once per array (not once for each of its
        thousands of tasks)."""
        if job.array_id is not None and job.max_running is None:
            if job.array_id in self._queued_said:
                return
            self._queued_said.add(job.array_id)
            self._notice(
                f"array {job.array_id}: tasks queued from job {job.id} on: {self._why_waiting(job)}"
            )
            return
        if job.max_running is not None and job.array_id is not None:
            if job.array_id in self._throttle_said:
                return
            running = self.store.array_counts(job.array_id).get(JobState.RUNNING, 0)
            if running >= job.max_running:
                self._throttle_said.add(job.array_id)
                self._notice(
                    f"array {job.array_id}: at most {job.max_running} tasks run at once "
                    "(--max-running); the others wait their turn"
                )
                return
        self._notice(f"job {job.id} queued: {self._why_waiting(job)}")

    def _why_waiting(self, job: QueuedRequest) -> str:
        _, reasons = explain(self.hosts, self.store.usage(), job.request, {})
        busy = [f"{name} {why}" for name, why in reasons.items() if why.startswith("no room")]
        return "; ".join(busy) if busy else "waiting for a host with room"
