"""The client's side of an array's `--max-running` and `--halt-after-failures` on the Dask
pool: the scheduler holds them (engines/dask_limits_plugin.py, `sshwasm_limits` on the
hosts), so they hold for a followed run and a detached one alike.

Each task of a limited array is submitted with the annotation `ANNOTATION`: a token naming
the array's tasks this run submits, its limits, and how many of its tasks had failed
already (a `resume` counts those as the SSH engine's placer does). A task that did not run
because its array halted answers `halted`; it is recorded `cancelled` with the SSH
engine's error (`store.HALT_ERROR`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from ..states import FINAL_STATES, JobState
from ..store import CANCELLED_EXIT_CODE, HALT_ERROR, Job, JobStore

# An array task's failures (every final state but succeeded and cancelled), as the store
# counts them for --halt-after-failures.
_FAILURES = FINAL_STATES - {JobState.SUCCEEDED, JobState.CANCELLED}


class ArrayLimits:
    """The annotation of each limited array's tasks, made once per array per run (in the
    jobs file's thread: it reads the array's failures so far)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._arrays: dict[int, dict[str, Any]] = {}
        self._told: set[int] = set()  # arrays whose halt a followed run said

    def of(self, job: Job) -> dict[str, Any] | None:
        """The job's limits annotation; None when it is not a task of a limited array."""
        if job.array_id is None or (job.max_running is None and job.halt_after_failures is None):
            return None
        found = self._arrays.get(job.array_id)
        if found is None:
            counts = self.store.array_counts(job.array_id)
            found = self._arrays[job.array_id] = {
                # Unique in the scheduler: one run's submission of this array.
                "array": f"{uuid.uuid4().hex[:16]}-{job.array_id}",
                "max_running": job.max_running,
                "halt": job.halt_after_failures,
                "failed": sum(counts.get(state, 0) for state in _FAILURES),
            }
        return found

    def halted(
        self, job: Job, halt: int, warning: Callable[[str], None]
    ) -> tuple[int, JobState, dict[str, Any]]:
        """`halted_end`, and (once per array) the SSH engine's warning that it halted."""
        if job.array_id is not None and job.array_id not in self._told:
            self._told.add(job.array_id)
            warning(
                f"array {job.array_id}: halted after {halt} failures; "
                "its tasks not started are cancelled"
            )
        return halted_end(job, halt)


@contextlib.contextmanager
def annotated(limits: dict[str, Any] | None) -> Iterator[None]:
    """Tasks submitted inside carry `limits` (nothing when None)."""
    if limits is None:
        yield
        return
    import dask  # only when submitting to the pool, as distributed

    from .dask_limits_plugin import ANNOTATION

    annotate: Any = getattr(dask, "annotate")  # noqa: B009 (untyped re-export)
    with annotate(**{ANNOTATION: limits}):
        yield


def halted_end(job: Job, halted: int) -> tuple[int, JobState, dict[str, Any]]:
    """The end of a task that did not run: its array halted after `halted` failures."""
    return (
        job.id,
        JobState.CANCELLED,
        {"exit_code": CANCELLED_EXIT_CODE, "error": HALT_ERROR.format(halted)},
    )
