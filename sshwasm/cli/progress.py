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
from ..store import JobStore
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


def progress_text(array_id: int, total: int, counts: dict[JobState, int], elapsed_s: float) -> str:
    """The progress line: done, running, queued and failed tasks and an ETA.

    The ETA assumes the tasks still to finish take as long, per task, as those done so far
    took from the start (so it accounts for how many run side by side).
    """
    done = sum(count for state, count in counts.items() if state.is_final)
    failed = done - counts.get(JobState.SUCCEEDED, 0)
    running = counts.get(JobState.RUNNING, 0)
    queued = counts.get(JobState.QUEUED, 0)
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
    """The progress line of one array, drawn on stderr (a terminal)."""

    def __init__(self, store: JobStore, array_id: int, total: int) -> None:
        self.store = store
        self.array_id = array_id
        self.total = total
        self._started = time.monotonic()
        self._line = b""
        self._shown = False

    def tick(self) -> None:
        """Read the array's counts and draw the line again."""
        counts = self.store.array_counts(self.array_id)
        text = progress_text(self.array_id, self.total, counts, time.monotonic() - self._started)
        self._line = text[: max(10, _columns() - 1)].encode()
        self._draw()

    def clear(self) -> None:
        """Take the line away (before other output, and when the array has ended)."""
        if self._shown:
            write_err(_CLEAR)
            self._shown = False

    def around(self, show: Callable[[_A], None]) -> Callable[[_A], None]:
        """`show`, with the progress line taken away before it and drawn again after (with
        the counts as they are now: a task may just have ended)."""

        def wrapped(value: _A) -> None:
            self.clear()
            try:
                show(value)
            finally:
                self.tick()

        return wrapped

    def _draw(self) -> None:
        if self._line:
            write_err(_CLEAR + self._line)
            self._shown = True


def _columns() -> int:
    """The terminal's width; 80 when it says none (a pseudo-terminal nobody sized)."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 80
    return columns if columns >= 20 else 80
