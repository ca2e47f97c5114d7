"""An array's progress on a terminal: one line on stderr, redrawn in place.

`run` shows it only when stderr is a terminal and neither --quiet nor --json is given; every
other line written to stderr or stdout meanwhile goes through `around`, which takes the
progress line away first and draws it again after, so it never lands inside output.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from ..states import JobState
from ..store import Job, JobStore
from .show import PROG, write_err

# Erase the line the cursor is on and go back to its start (VT100: every terminal today).
_CLEAR = b"\r\x1b[K"

_A = TypeVar("_A")


def format_eta(seconds: float) -> str:
    """A duration as `1h02m`, `3m05s` or `42s`."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_text(
    array_id: int, total: int, done: int, failed: int, running: int, elapsed_s: float
) -> str:
    """The progress line: done, running, queued and failed tasks and an ETA.

    The ETA assumes the tasks still to finish take as long, per task, as those done so far
    took from the start (so it accounts for how many run side by side).
    """
    running = max(0, min(running, total - done))
    queued = max(0, total - done - running)
    if done >= total:
        eta = "0s"
    elif done:
        eta = format_eta(elapsed_s / done * (total - done))
    else:
        eta = "?"
    return (
        f"{PROG}: array {array_id}: {done}/{total} done, {running} running, "
        f"{queued} queued, {failed} failed, ETA {eta}"
    )


class Progress:
    """The progress line of one array, drawn on stderr (a terminal).

    Ended tasks are counted as `run` hears of them (`ended`); how many run is read from the
    jobs file, at most every READ_EVERY_S, so that an array whose tasks end by the thousand
    per second does not spend its time counting them.
    """

    READ_EVERY_S = 0.25

    def __init__(self, store: JobStore, array_id: int, total: int) -> None:
        self.store = store
        self.array_id = array_id
        self.total = total
        self.done = 0
        self.failed = 0
        self.running = 0
        self._started = time.monotonic()
        self._read_at: float | None = None
        self._shown = False

    def ended(self, job: Job) -> None:
        """Count a task that `run` has finished following."""
        if job.is_final:
            self.done += 1
            if job.state is not JobState.SUCCEEDED:
                self.failed += 1

    def tick(self) -> None:
        """Draw the line again, with how many run read afresh when it is time."""
        now = time.monotonic()
        if self._read_at is None or now - self._read_at >= self.READ_EVERY_S:
            self._read_at = now
            counts = self.store.array_counts(self.array_id)
            self.running = counts.get(JobState.RUNNING, 0)
        text = progress_text(
            self.array_id, self.total, self.done, self.failed, self.running, now - self._started
        )
        write_err(_CLEAR + text[: _columns() - 1].encode())
        self._shown = True

    def clear(self) -> None:
        """Take the line away (before other output, and when the array has ended)."""
        if self._shown:
            write_err(_CLEAR)
            self._shown = False

    def around(self, show: Callable[[_A], None]) -> Callable[[_A], None]:
        """`show`, with the progress line taken away before it and drawn again after."""

        def wrapped(value: _A) -> None:
            self.clear()
            try:
                show(value)
            finally:
                self.tick()

        return wrapped

    def around_end(self, show: Callable[[Job], None]) -> Callable[[Job], None]:
        """`around(show)` for a task that ended: counted before the line is drawn again."""

        def wrapped(job: Job) -> None:
            self.ended(job)
            self.around(show)(job)

        return wrapped


def _columns() -> int:
    """The terminal's width; 80 when it says none (a pseudo-terminal nobody sized)."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 80
    return columns if columns >= 20 else 80
