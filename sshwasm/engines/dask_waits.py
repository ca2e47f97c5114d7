"""How long a client of `engine: dask` waits for the pool: never forever.

Each question to the scheduler (and, through it, to every worker: `Client.run`) is asked with
a bound (`asked`, ANSWER_TIMEOUT_S); a pool that does not answer in that time is stopped,
wedged or cut off, and the command ends with one line (`PoolSilent`, a TimeoutError: `run`
says "lost the pool's scheduler ...", `jobs` warns and leaves the records for a later one).
A task's own time is not bounded here (a guest may run for days, and `--time-limit` is the
runner's): while a followed run waits for tasks to end (`next_ended`), it asks the
scheduler every ALIVE_EVERY_S whether it is still there, so a slow pool is followed as long
as it takes, and a silent one is noticed within ALIVE_EVERY_S + ANSWER_TIMEOUT_S.

(A scheduler that goes away is noticed by distributed itself: it cancels the client's
futures, reason "scheduler-connection-lost".)
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

# How long one question may go unanswered. A pool answers in milliseconds, seconds when
# loaded; SSHWASM_DASK_ANSWER_S sets it otherwise (tests).
ANSWER_TIMEOUT_S = float(os.environ.get("SSHWASM_DASK_ANSWER_S", "120"))
# How often a run that waits for its tasks asks whether the scheduler is still there.
ALIVE_EVERY_S = 30.0
# How long forgetting a published dataset may take (`unpublish_dataset`): the scheduler
# answers once this client's earlier messages reached it, which a scheduler that dropped
# the client's stream meanwhile never sees (it waited forever, once, in a test of cancel).
# It is the last step of a cancel or a collection, done already: not worth more.
FORGET_TIMEOUT_S = 30.0


class PoolSilent(TimeoutError):
    """The pool did not answer a question in time (one line: what, and for how long)."""


def asked(
    client: Any,
    method: Callable[..., Any],
    *args: Any,
    what: str,
    timeout: float | None = None,
    **kwargs: Any,
) -> Any:
    """`method(*args, **kwargs)`, a public method of `client` that takes `asynchronous`,
    run in the client's loop and given up after `timeout` (ANSWER_TIMEOUT_S by default; the
    call is cancelled there, so no thread of this process is left waiting for it)."""
    limit = ANSWER_TIMEOUT_S if timeout is None else timeout
    call = functools.partial(method, *args, asynchronous=True, **kwargs)
    try:
        return client.sync(call, callback_timeout=limit)
    except TimeoutError:  # asyncio's is the builtin's on 3.11
        address = getattr(client.scheduler, "address", "?")
        raise PoolSilent(
            f"the pool's scheduler at {address} did not answer {what} in {limit:g} s"
        ) from None


def answer_of(client: Any, future: Any, what: str) -> Any:
    """The answer of a task that ended (raising its error). Its answer may have to be made
    again first (the worker holding it died): waited for as long as the scheduler answers
    `asked` whether it is still there."""
    while True:
        try:
            return asked(client, client.gather, future, what=what)
        except PoolSilent:
            asked(client, client.list_datasets, what="whether it is still there")


def next_ended(client: Any, pending: Any) -> list[Any]:
    """The futures of `as_completed` that ended: at least one (waiting for it as long as
    the scheduler answers `asked` every ALIVE_EVERY_S), or none when every one was handed
    out. Raises PoolSilent when the scheduler stops answering meanwhile."""
    while True:
        batch = ready_within(pending, ALIVE_EVERY_S)
        if batch is not None:
            return batch
        asked(client, client.list_datasets, what="whether it is still there")


def ready_within(pending: Any, timeout: float) -> list[Any] | None:
    """The futures of `as_completed` that ended, waiting at most `timeout` for one; [] when
    every one was handed out; None when none ended in that time."""
    deadline = time.monotonic() + timeout
    # as_completed notifies this condition as each future ends (distributed's own wait).
    condition = getattr(pending, "thread_condition", None)
    while not pending.has_ready():
        if pending.is_empty():
            return []
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if condition is None:
            time.sleep(min(0.05, left))
            continue
        with condition:
            condition.wait(timeout=min(0.1, left))
    return list(pending.next_batch(block=False))
