"""The states a job passes through (README.md, "States")."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    """A job's state; its value is the word stored in the jobs file and shown to users."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    CANCELLED = "cancelled"
    LOST = "lost"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        """Whether a job in this state will never change again."""
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.TIMEOUT,
        JobState.OUT_OF_MEMORY,
        JobState.CANCELLED,
        JobState.LOST,
    }
)
