"""Placement is pure: hit it with many generated clusters and request sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshwasm.cluster import Host
from sshwasm.errors import NoHostFits
from sshwasm.schedule import (
    Request,
    Usage,
    check_feasible,
    choose_host,
    fits_now,
    plan,
)


def host(name: str, cpus: int, memory_mb: int) -> Host:
    return Host(name=name, address="127.0.0.1", cpus=cpus, memory_mb=memory_mb)


THREE = [host("small", 2, 2048), host("medium", 4, 8192), host("large", 16, 65536)]


def test_best_fit_prefers_the_tightest_host() -> None:
    assert choose_host(THREE, {}, Request(1, 1000)).name == "small"  # type: ignore[union-attr]
    assert choose_host(THREE, {}, Request(3, 1000)).name == "medium"  # type: ignore[union-attr]
    assert choose_host(THREE, {}, Request(1, 30000)).name == "large"  # type: ignore[union-attr]


def test_busy_small_host_is_skipped_for_the_next_fitting_one() -> None:
    usage = {"small": Usage(2, 0)}
    chosen = choose_host(THREE, usage, Request(1, 100))
    assert chosen is not None and chosen.name == "medium"


def test_ties_go_to_the_name_that_sorts_first() -> None:
    twins = [host("b", 4, 4096), host("a", 4, 4096), host("c", 4, 4096)]
    chosen = choose_host(twins, {}, Request(1, 1))
    assert chosen is not None and chosen.name == "a"


def test_no_room_now_returns_none_but_is_feasible() -> None:
    usage = {h.name: Usage(h.cpus, h.memory_mb) for h in THREE}
    assert choose_host(THREE, usage, Request(1, 1)) is None
    check_feasible(THREE, Request(1, 1))  # must not raise: it fits once room frees


def test_never_fits_says_what_the_largest_host_offers() -> None:
    with pytest.raises(NoHostFits) as caught:
        check_feasible(THREE, Request(32, 1000))
    assert "large has 16 cpus and 65536 MB" in str(caught.value)


def test_pinned_host_is_checked_for_fit() -> None:
    with pytest.raises(NoHostFits, match="pinned to host 'small'"):
        check_feasible(THREE, Request(3, 100, host="small"))
    with pytest.raises(NoHostFits, match="no host named 'nope'"):
        check_feasible(THREE, Request(1, 100, host="nope"))
    chosen = choose_host(THREE, {}, Request(1, 100, host="large"))
    assert chosen is not None and chosen.name == "large"


def test_excluded_hosts_are_not_chosen() -> None:
    chosen = choose_host(THREE, {}, Request(1, 100), excluded=["small", "medium"])
    assert chosen is not None and chosen.name == "large"
    assert choose_host(THREE, {}, Request(1, 100), excluded=[h.name for h in THREE]) is None


def test_plan_serves_older_jobs_first_and_backfills() -> None:
    one = [host("solo", 4, 4096)]
    usage = {"solo": Usage(2, 0)}
    queue = [(1, Request(4, 100)), (2, Request(1, 100)), (3, Request(1, 100)), (4, Request(1, 1))]
    # Job 1 needs the whole host and must wait; 2 and 3 backfill the two free cpus; 4 waits.
    assert plan(one, usage, queue) == {2: "solo", 3: "solo"}


hosts_strategy = st.lists(
    st.tuples(st.integers(1, 64), st.integers(1, 1 << 17)), min_size=1, max_size=8
).map(lambda specs: [host(f"h{i}", c, m) for i, (c, m) in enumerate(specs)])
requests_strategy = st.lists(
    st.tuples(st.integers(1, 70), st.integers(1, 1 << 17), st.booleans()), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(hosts=hosts_strategy, operations=requests_strategy)
def test_no_sequence_of_placements_and_releases_overcommits(
    hosts: list[Host], operations: list[tuple[int, int, bool]]
) -> None:
    """Place and finish jobs in any order: every host's holdings stay within its size."""
    usage: dict[str, Usage] = {}
    placed: list[tuple[str, Request]] = []
    for cpus, memory_mb, finish_one in operations:
        if finish_one and placed:
            name, done = placed.pop(0)
            held = usage[name]
            usage[name] = Usage(held.cpus - done.cpus, held.memory_mb - done.memory_mb)
        request = Request(cpus, memory_mb)
        chosen = choose_host(hosts, usage, request)
        if chosen is None:
            # Nothing fits now: then truly no host has room for it.
            assert not any(fits_now(h, usage.get(h.name, Usage()), request) for h in hosts)
            continue
        usage[chosen.name] = usage.get(chosen.name, Usage()).plus(request)
        placed.append((chosen.name, request))
        for h in hosts:
            held = usage.get(h.name, Usage())
            assert held.cpus <= h.cpus and held.memory_mb <= h.memory_mb


@settings(max_examples=200, deadline=None)
@given(hosts=hosts_strategy, queue=requests_strategy)
def test_plan_never_overcommits_and_keeps_best_fit(
    hosts: list[Host], queue: list[tuple[int, int, bool]]
) -> None:
    requests = [(i, Request(c, m)) for i, (c, m, _) in enumerate(queue)]
    placement = plan(hosts, {}, requests)
    held: dict[str, Usage] = {}
    by_id = dict(requests)
    for job_id, name in placement.items():
        held[name] = held.get(name, Usage()).plus(by_id[job_id])
    for h in hosts:
        usage = held.get(h.name, Usage())
        assert usage.cpus <= h.cpus and usage.memory_mb <= h.memory_mb


labelled_hosts_strategy = st.lists(
    st.tuples(st.integers(1, 16), st.integers(1, 4096), st.sampled_from([(), ("a",), ("a", "b")])),
    min_size=1,
    max_size=10,
).map(
    lambda specs: [
        Host(name=f"h{i % 4}{i}", address="x", cpus=c, memory_mb=m, labels=labels)
        for i, (c, m, labels) in enumerate(specs)
    ]
)
queue_strategy = st.lists(
    st.tuples(
        st.integers(1, 16),
        st.integers(1, 4096),
        st.sampled_from([(), ("a",), ("b",)]),
        st.sampled_from([None, "h00", "h11"]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(hosts=labelled_hosts_strategy, queue=queue_strategy, used=st.integers(0, 3))
def test_plan_gives_each_job_what_choose_host_would(
    hosts: list[Host], queue: list[tuple[int, int, tuple[str, ...], str | None]], used: int
) -> None:
    """The fast batch planner and the one-job chooser agree job by job."""
    usage = {h.name: Usage(min(used, h.cpus), min(used * 100, h.memory_mb)) for h in hosts}
    requests = [(i, Request(c, m, pin, labels)) for i, (c, m, labels, pin) in enumerate(queue)]
    excluded = {i: ["h00"] for i in range(0, len(requests), 3)}
    expected: dict[int, str] = {}
    held = dict(usage)
    for job_id, request in requests:
        chosen = choose_host(hosts, held, request, excluded.get(job_id, ()))
        if chosen is not None:
            expected[job_id] = chosen.name
            held[chosen.name] = held.get(chosen.name, Usage()).plus(request)
    assert plan(hosts, usage, requests, excluded) == expected
