"""The exit codes sshwasm returns: its own, and the one a job's end maps to."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

from ..states import JobState

if TYPE_CHECKING:
    from ..store import Job


class ExitStatus(IntEnum):
    """Exit codes of sshwasm itself; a foreground job's own code passes through as it is."""

    OK = 0
    ERROR = 1
    USAGE = 2
    TIMEOUT = 124
    INTERRUPTED = 130


def job_exit_status(job: Job) -> int:
    """The exit code `run` returns for a finished job."""
    if job.state == JobState.SUCCEEDED:
        return 0
    if job.state == JobState.TIMEOUT:
        return ExitStatus.TIMEOUT
    if job.state == JobState.CANCELLED:
        return ExitStatus.INTERRUPTED
    code = job.exit_code
    return code if isinstance(code, int) and 0 < code < 256 else ExitStatus.ERROR
