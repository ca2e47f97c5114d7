"""--retries and --retry-failed against real loopback hosts: a host killed mid-job, the
guest's own failures, the attempt record and output that is never doubled."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PROGRAMS, no_traceback, record_of, sshwasm, start_streaming, wait_for
from sshd import SshServer, loopback


def kill_host(server: SshServer, workdir: Path) -> None:
    """Kill a host for good: its sshd (and its sessions) and every runner process of its
    jobs, as a machine that lost power would."""
    server.stop()
    for job_dir in (workdir / "jobs").iterdir():
        pid_file = job_dir / "pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.slow
def test_host_killed_mid_job_is_retried_elsewhere(
    fresh_host: Callable[..., SshServer],
    make_cluster: Callable[..., Path],
    ssh_hosts: dict[str, SshServer],
) -> None:
    doomed = fresh_host("delta", loopback(5))
    # delta is the best fit (the smallest host that fits), so the first attempt goes there.
    # Its keepalive_s of 1 s makes the retry window 3 s, not the default 15 s.
    cluster = make_cluster(
        {"delta": {"cpus": 1, "memory_mb": 512, "keepalive_s": 1}, "alpha": (8, 8192)},
        servers={"alpha": ssh_hosts["alpha"], "delta": doomed},
    )
    process = start_streaming(
        "--cluster", str(cluster), "run", "--retries", "1",
        str(PROGRAMS / "sleep.rs"), "--", "3",
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stdout.readline() == b"start\n"  # running on delta
    workdir = cluster.parent / "workers" / "delta"
    wait_for(lambda: any((workdir / "jobs").glob("*/pid")))
    kill_host(doomed, workdir)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert b"Traceback" not in err
    # On the terminal, the first attempt's partial output came before the notice.
    assert out == b"start\nend\n", out
    assert b"attempt 1 on 'delta' ended" in err and b"placing attempt 2 of 2" in err, err
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "succeeded", record
    assert record["attempts"] == 2
    assert record["attempt_hosts"] == "delta,alpha"
    assert record["host"] == "alpha"
    # The record and the job's files hold the final attempt's output once, never the first's.
    assert record["stdout"] == "start\nend\n"
    assert sshwasm("logs", "1").stdout == "start\nend\n"
    text = sshwasm("status", "1").stdout
    assert "attempts: 2" in text and "attempt_hosts: delta,alpha" in text


@pytest.mark.slow
def test_host_killed_without_retries_is_not_placed_again(
    fresh_host: Callable[..., SshServer],
    make_cluster: Callable[..., Path],
    ssh_hosts: dict[str, SshServer],
) -> None:
    doomed = fresh_host("delta", loopback(5))
    cluster = make_cluster(
        {"delta": (1, 512), "alpha": (8, 8192)},
        servers={"alpha": ssh_hosts["alpha"], "delta": doomed},
    )
    process = start_streaming(
        "--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--", "3"
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"start\n"
    workdir = cluster.parent / "workers" / "delta"
    wait_for(lambda: any((workdir / "jobs").glob("*/pid")))
    kill_host(doomed, workdir)
    # Without --retries the old bound holds; the run gives the job up to `status`.
    process.kill()
    process.wait()
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["attempts"] == 1
    assert record["attempt_hosts"] == "delta"


def test_guest_failure_is_not_retried_without_retry_failed(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    result = sshwasm(
        "--cluster", str(cluster), "run", "--retries", "2", "--json",
        str(PROGRAMS / "exitcode.rs"), "--", "3",
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 3
    record = record_of(result)
    assert record["state"] == "failed" and record["exit_code"] == 3
    assert record["attempts"] == 1
    assert record["attempt_hosts"] == "alpha"


def test_retry_failed_retries_the_guest_up_to_n_more_times(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    result = sshwasm(
        "--cluster", str(cluster), "run", "--retries", "2", "--retry-failed", "--json",
        str(PROGRAMS / "exitcode.rs"), "--", "3",
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 3
    record = record_of(result)
    assert record["state"] == "failed" and record["exit_code"] == 3
    # The only host fits, so each attempt goes there again.
    assert record["attempts"] == 3
    assert record["attempt_hosts"] == "alpha,alpha,alpha"
    assert result.stderr.count("ended: ") == 2, result.stderr


def test_retry_failed_needs_retries(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    result = sshwasm(
        "--cluster", str(cluster), "run", "--retry-failed", str(PROGRAMS / "exitcode.rs")
    )
    no_traceback(result)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "sshwasm: error: --retry-failed needs --retries N (how many more attempts)"
    )
    assert sshwasm("jobs", "--json").stdout.strip() == "[]"


@pytest.mark.parametrize("value", ["-1", "x", "101"])
def test_retries_must_be_a_small_whole_number(value: str) -> None:
    result = sshwasm("run", "--retries", value, str(PROGRAMS / "exitcode.rs"))
    assert result.returncode == 2
    assert result.stderr.startswith("sshwasm: error: argument --retries:"), result.stderr


@pytest.mark.slow
def test_late_answer_from_a_host_that_came_back_is_history_only(
    fresh_host: Callable[..., SshServer],
    make_cluster: Callable[..., Path],
    ssh_hosts: dict[str, SshServer],
) -> None:
    hung = fresh_host("delta", loopback(5))
    # delta's keepalive_s of 1 s: it is given up after 3 s of silence, not the default 15 s.
    cluster = make_cluster(
        {"delta": {"cpus": 1, "memory_mb": 512, "keepalive_s": 1}, "alpha": (8, 8192)},
        servers={"alpha": ssh_hosts["alpha"], "delta": hung},
    )
    process = start_streaming(
        "--cluster", str(cluster), "run", "--retries", "1",
        str(PROGRAMS / "sleep.rs"), "--", "4",
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline() == b"start\n"
    hung.pause()  # silent: the keepalives notice, then re-attaching fails for 3 s
    warned = b""
    while b"placing attempt 2" not in warned:
        line = process.stderr.readline()
        assert line, warned
        warned += line
    hung.resume()  # back while attempt 2 runs on alpha: attempt 1 ends there too
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, warned + err
    assert out == b"start\nend\n"  # attempt 2's whole output, after attempt 1's "start"
    record = record_of(sshwasm("status", "1", "--json"))
    # One result, from the attempt followed to its end; the output once.
    assert record["state"] == "succeeded" and record["host"] == "alpha", record
    assert record["attempts"] == 2 and record["attempt_hosts"] == "delta,alpha"
    assert record["stdout"] == "start\nend\n"
    assert sshwasm("logs", "1").stdout == "start\nend\n"
    text = sshwasm("status", "1").stdout
    assert "attempt 1: delta: failed: " in text, text
    assert "(its host later said: succeeded)" in text, text
