"""The one backoff rule of the local side: the delays each retry or poll loop had by hand."""

from __future__ import annotations

import itertools

from sshwasm.backoff import Backoff
from sshwasm.coordinator import REATTACH_BACKOFF
from sshwasm.placement_queue import PLACEMENT_POLL
from sshwasm.transport import RETRY_BACKOFF


def by_hand(first: float, factor: float, most: float, count: int) -> list[float]:
    """The loops as they were written: `delay = min(delay * factor, most)` after each wait."""
    delays, delay = [], first
    for _ in range(count):
        delays.append(delay)
        delay = min(delay * factor, most)
    return delays


def test_delays_grow_to_their_cap_as_the_hand_written_loops_did() -> None:
    assert list(itertools.islice(REATTACH_BACKOFF.delays(), 8)) == by_hand(0.5, 2, 8.0, 8)
    placement = list(itertools.islice(PLACEMENT_POLL.delays(), 12))
    for got, want in zip(placement, by_hand(0.05, 1.5, 1.0, 12), strict=True):
        assert abs(got - want) < 1e-12


def test_jitter_stays_within_its_band_around_the_capped_delay() -> None:
    for attempt in range(1, 12):
        base = min(0.2 * 2.0 ** (attempt - 1), 3.0)
        for _ in range(50):
            assert 0.5 * base <= RETRY_BACKOFF.delay(attempt) <= 1.5 * base


def test_a_steady_poll_and_a_very_long_run_of_tries() -> None:
    steady = Backoff(first=0.2, factor=1.0)
    assert list(itertools.islice(steady.delays(), 3)) == [0.2, 0.2, 0.2]
    assert Backoff(first=1.0, factor=10.0, most=5.0).delay(10_000) == 5.0
    # A new iterator starts over: how a loop resets its backoff.
    assert next(REATTACH_BACKOFF.delays()) == 0.5
