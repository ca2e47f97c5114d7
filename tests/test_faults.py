"""Faults injected for real: killed coordinators, dropped connections, hosts down, load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    EXAMPLES,
    PROGRAMS,
    moment,
    no_traceback,
    record_of,
    sshwasm,
    start_sshwasm,
    start_streaming,
    wait_for,
    wait_for_state,
)
from sshd import SshServer, loopback

# Concurrent `sshwasm run` processes sharing one jobs file: four times the cluster's 6 slots.
RUNS = 24


def session_children(server: SshServer) -> list[int]:
    """The per-connection sshd processes under a server's listener."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == server.pid:
            children.append(int(entry.name))
    return children


@pytest.mark.slow
def test_killed_coordinator_then_status_collects_the_true_result(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    process = start_streaming(
        "--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--", "2"
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"start\n"  # the job is running on alpha
    process.kill()
    process.wait()
    record = wait_for_state(1, {"succeeded", "failed", "lost"})
    assert record["state"] == "succeeded", record
    assert record["stdout"] == "start\nend\n"
    assert sshwasm("logs", "1").stdout == "start\nend\n"


def test_status_says_lost_when_the_host_has_no_trace(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    process = start_streaming(
        "--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--", "30"
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"start\n"
    process.kill()
    process.wait()
    # The host forgets the job, as a reinstalled machine would.
    (job_dir,) = (cluster.parent / "workers" / "alpha" / "jobs").iterdir()
    os.kill(int((job_dir / "pid").read_text()), signal.SIGKILL)
    shutil.rmtree(job_dir)
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "lost", record
    assert "no trace" in record["error"]


def test_dropped_connection_reattaches_without_gaps_or_repeats(
    fresh_host: Callable[..., SshServer], make_cluster: Callable[..., Path]
) -> None:
    server = fresh_host("delta", loopback(5))
    cluster = make_cluster({"delta": (2, 1024)}, servers=[server])
    process = start_streaming(
        "--cluster", str(cluster), "run", str(PROGRAMS / "trickle.rs"), "--", "300", "5"
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    assert first == b"line 1\n"
    for pid in session_children(server):
        os.kill(pid, signal.SIGKILL)  # the connection drops; the job goes on on the host
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    expected = "".join(f"line {i}\n" for i in range(1, 301))
    assert (first + out).decode() == expected
    assert b"re-attaching" in err or b"lost" in err


def test_host_down_at_placement_goes_to_the_next_best_fit(
    fresh_host: Callable[..., SshServer], make_cluster: Callable[..., Path], ssh_hosts: Any
) -> None:
    down = fresh_host("delta", loopback(5))
    down.stop()
    cluster = make_cluster(
        {"delta": (1, 512), "alpha": (8, 8192)}, servers={**ssh_hosts, "delta": down}
    )
    result = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"), "--json",
        "--env", "HELLO_SLEEP_S=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert record_of(result)["host"] == "alpha"
    assert "skipping host 'delta'" in result.stderr


def test_no_host_reachable_names_each_host_and_why(
    fresh_host: Callable[..., SshServer], make_cluster: Callable[..., Path]
) -> None:
    first, second = fresh_host("delta", loopback(5)), fresh_host("epsilon", loopback(6))
    first.stop()
    second.stop()
    cluster = make_cluster({"delta": (1, 512), "epsilon": (2, 512)}, servers=[first, second])
    result = sshwasm("--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"))
    no_traceback(result)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sshwasm: error: no host could run the job")
    assert "delta: connection refused" in last and "epsilon: connection refused" in last
    assert record_of(sshwasm("status", "1", "--json"))["state"] == "failed"


def test_big_and_binary_output_arrives_whole(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    lines = 400_000
    result = subprocess.run(
        [sys.executable, "-m", "sshwasm", "--cluster", str(cluster), "run",
         str(PROGRAMS / "bigout.rs"), "--", str(lines)],
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = "".join(f"line {i}\n" for i in range(1, lines + 1)).encode()
    assert result.stdout == expected
    logs = subprocess.run(
        [sys.executable, "-m", "sshwasm", "logs", "1"], capture_output=True, timeout=60
    )
    assert logs.stdout == expected
    record = record_of(sshwasm("status", "1", "--json"))
    assert "bytes omitted here" in record["stdout"]
    assert len(record["stdout"]) < 200_000
    assert record["stdout"].startswith("line 1\n") and record["stdout"].endswith(f"{lines}\n")


@pytest.mark.slow
def test_many_concurrent_runs_never_overcommit(make_cluster: Callable[..., Path]) -> None:
    """RUNS processes at once for 6 slots: each wants 300 MB, so alpha holds 2 (cpus),
    beta 1 and gamma 3 at a time, and most runs wait for room others free."""
    cluster = make_cluster({"alpha": (2, 1024), "beta": (1, 1024), "gamma": (3, 1024)})
    sleep = str(PROGRAMS / "sleep.rs")
    warm = sshwasm("--cluster", str(cluster), "run", sleep, "--", "0")
    assert warm.returncode == 0, warm.stderr
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sshwasm",
                "--cluster",
                str(cluster),
                "run",
                sleep,
                "--memory-mb",
                "300",
                "--json",
                "--",
                "0.2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(RUNS)
    ]
    records = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert "database is locked" not in err
        records.append(json.loads(out))
    assert len({r["id"] for r in records}) == RUNS
    listed = json.loads(sshwasm("jobs", "--json").stdout)
    assert len(listed) == RUNS + 1 and all(r["state"] == "succeeded" for r in listed)
    capacity = {"alpha": (2, 1024), "beta": (1, 1024), "gamma": (3, 1024)}
    events: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for r in records:
        events[r["host"]].append((moment(r["started_at"]), r["cpus"], r["memory_mb"]))
        events[r["host"]].append((moment(r["finished_at"]), -r["cpus"], -r["memory_mb"]))
    for host, timeline in events.items():
        cpus = memory = 0
        for _, d_cpus, d_memory in sorted(timeline, key=lambda e: (e[0], e[1])):
            cpus += d_cpus
            memory += d_memory
            assert cpus <= capacity[host][0] and memory <= capacity[host][1], host


@pytest.mark.slow
def test_a_busy_sshd_dropping_handshakes_costs_retries_not_jobs(
    fresh_host: Callable[..., SshServer], make_cluster: Callable[..., Path]
) -> None:
    # MaxStartups 1: while one handshake is pending, sshd drops every other connection.
    server = fresh_host("delta", loopback(5), extra_config="MaxStartups 1\n")
    cluster = make_cluster({"delta": (2, 1024)}, servers=[server])
    hello = str(EXAMPLES / "hello.rs")
    warm = sshwasm("--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0")
    assert warm.returncode == 0, warm.stderr
    # A client that connects and never finishes its handshake holds the only startup slot,
    # as a crowd of coordinators would, until sshd has dropped the run at least once.
    squatter = socket.create_connection((server.address, server.port))
    try:
        run = start_sshwasm("--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0")
        try:
            wait_for(lambda: "MaxStartups" in server.log_text(), timeout=60)
        finally:
            squatter.close()
        out, err = run.communicate(timeout=120)
    finally:
        squatter.close()
        if run.poll() is None:
            run.kill()
            run.communicate()
    result = subprocess.CompletedProcess(run.args, run.returncode, out, err)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "job done, hello!\n"
    assert "MaxStartups" in server.log_text()  # sshd really dropped us before the retry


@pytest.mark.slow
def test_logs_follow_a_job_whose_coordinator_was_killed(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    process = start_streaming(
        "--cluster", str(cluster), "run", str(PROGRAMS / "trickle.rs"), "--", "30", "100"
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"line 1\n"
    process.kill()
    process.wait()
    follow = sshwasm("logs", "1", "--follow", timeout=120)
    assert follow.stdout == "".join(f"line {i}\n" for i in range(1, 31))
    assert record_of(sshwasm("status", "1", "--json"))["state"] == "succeeded"
