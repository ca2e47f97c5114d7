"""Single jobs on the connection process's warm serve (sshwasm/mux/warm.py): a job after
the first runs on a pooled executor that already imported wasmtime, with its staging, time
limit, live output, --detach and cancel as ever, re-attached when the connection process
dies under it; another runner version replaces the serve, and it goes with the connection
process when that idles out."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    PROGRAMS,
    mux_processes,
    no_traceback,
    process_gone,
    processes_whose_argv,
    record_of,
    sshwasm,
    start_streaming,
    wait_for,
    wait_for_state,
)
from test_mux import run_tiny, runtime  # noqa: F401 - the fixture, used by name

from sshwasm import runner_client as client_module
from sshwasm.cluster import load_cluster
from sshwasm.mux import wire


def warm_serves(workdir: Path) -> list[int]:
    """PIDs of the runner's serve (and its executors, forks of it) in `workdir`."""
    return processes_whose_argv(
        lambda argv: b"serve" in argv and str(workdir).encode() in argv and b"-c" in argv
    )


def executors_of_jobs(workdir: Path) -> collections.Counter[str]:
    """How many jobs each executor pid ran (the pid file of every job directory)."""
    return collections.Counter(
        path.read_text().strip() for path in (workdir / "jobs").glob("*/pid")
    )


def wire_request(directory: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One request to the connection process, and its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(directory / wire.SOCKET_NAME))
        sock.sendall(wire.encode_message(request))
        answer = sock.makefile("rb").readline()
    message: dict[str, Any] = json.loads(answer)
    return message


@pytest.mark.slow
def test_single_jobs_run_on_a_warm_serve(
    runtime: Path,  # noqa: F811 - the fixture
    make_cluster: Callable[..., Path],
    tmp_path: Path,
) -> None:
    cluster = make_cluster({"alpha": (2, 2048)}, defaults={"connection_persist_s": 60})
    workdir = tmp_path / "workers" / "alpha"
    assert run_tiny(cluster) == ""  # launched as a command; a warm serve starts behind it
    wait_for(lambda: bool(warm_serves(workdir)), timeout=60)
    first_serve = warm_serves(workdir)
    assert run_tiny(cluster) == "" and run_tiny(cluster) == ""
    # Both ran in one executor that serve had forked (a launched job forks its own).
    assert executors_of_jobs(workdir).most_common(1)[0][1] >= 2, executors_of_jobs(workdir)

    # --input and --output, through the warm serve as through a launch.
    data, results = tmp_path / "in", tmp_path / "results"
    data.mkdir()
    (data / "a.txt").write_text("hello")
    staged = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "stage.rs"),
        "--input", str(data), "--output", str(results),
    )  # fmt: skip
    no_traceback(staged)
    assert staged.returncode == 0, staged.stderr
    assert "a.txt 5\n" in (results / "summary.txt").read_text() == staged.stdout

    # A job that runs on has its output streamed while it runs, in order and whole.
    trickle = start_streaming(
        "--cluster", str(cluster), "run", str(PROGRAMS / "trickle.rs"), "-q", "--", "4", "600"
    )  # fmt: skip
    assert trickle.stdout is not None
    assert trickle.stdout.readline() == b"line 1\n"
    assert trickle.poll() is None  # shown before the job ended
    rest, stderr = trickle.communicate(timeout=120)
    assert trickle.returncode == 0, stderr
    assert rest == b"line 2\nline 3\nline 4\n"

    # Its time limit holds, and what it printed before is kept.
    spin = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "spin.rs"), "--time-limit", "3", "--json"
    )  # fmt: skip
    record = record_of(spin)
    assert record["state"] == "timeout" and spin.returncode != 0, spin.stderr
    assert "spinning" in sshwasm("logs", str(record["id"])).stdout, (record, spin.stderr)
    # --detach, then cancel: the job on the warm serve is killed and recorded so.
    detached = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "spin.rs"), "--detach"
    )  # fmt: skip
    assert detached.returncode == 0, detached.stderr
    job = detached.stdout.strip()
    wait_for_state(int(job), {"running"})
    assert sshwasm("cancel", job).returncode == 0
    assert wait_for_state(int(job), {"cancelled"})["state"] == "cancelled"
    assert first_serve[0] in warm_serves(workdir)  # the same serve all along

    # Another runner version (a new install): that serve is replaced, not reused. (This
    # one the host does not have: its new serve says so and goes; jobs launch as before.)
    stranger = {
        "version": wire.MUX_VERSION,
        "op": "launch",
        "host": load_cluster(cluster).hosts[0].to_dict(),
        "persist_s": 60,
        "job": "x1",
        "runner": "0123456789abcdef",
    }
    assert wire_request(runtime, stranger)["kind"] == "cold"
    wait_for(lambda: all(process_gone(pid) for pid in first_serve), timeout=30)
    assert run_tiny(cluster) == ""
    wait_for(lambda: bool(warm_serves(workdir)), timeout=60)  # one of this version again

    # The connection process killed under a running job: the job runs on, re-attached.
    trickle = start_streaming(
        "--cluster", str(cluster), "run", str(PROGRAMS / "trickle.rs"), "-q", "--", "6", "300"
    )  # fmt: skip
    assert trickle.stdout is not None
    assert trickle.stdout.readline() == b"line 1\n"
    for pid in mux_processes(runtime):
        os.kill(pid, signal.SIGKILL)
    rest, stderr = trickle.communicate(timeout=120)
    assert trickle.returncode == 0, stderr
    assert rest == b"".join(b"line %d\n" % line for line in range(2, 7)), stderr

    # Idle for 3 s (the latest command's setting): the connection process goes, and its
    # warm serve with it.
    make_cluster({"alpha": (2, 2048)}, defaults={"connection_persist_s": 3})
    assert run_tiny(cluster) == ""
    wait_for(lambda: not mux_processes(runtime), timeout=60)
    wait_for(lambda: not warm_serves(workdir), timeout=30)
    assert "jobs on warm serves" in (runtime / wire.LOG_NAME).read_text()
    assert client_module.NOT_LAUNCHED == wire.NOT_LAUNCHED  # the relay's "never sent"


def test_array_tasks_run_on_a_warm_serve_that_outlives_the_run(
    runtime: Path,  # noqa: F811 - the fixture
    make_cluster: Callable[..., Path],
    tmp_path: Path,
) -> None:
    cluster = make_cluster({"alpha": (2, 2048)}, defaults={"connection_persist_s": 60})
    workdir = tmp_path / "workers" / "alpha"
    jobs = workdir / "jobs"

    def array(program: str, count: int, *more: str) -> subprocess.CompletedProcess[str]:
        result = sshwasm(
            "--cluster", str(cluster), "run", str(PROGRAMS / program), "--array", str(count),
            "-q", *more,
        )  # fmt: skip
        no_traceback(result)
        return result

    def task_lines(count: int) -> list[str]:
        return sorted(
            f"task {task} of {count} line {line}" for task in range(count) for line in range(3)
        )

    def executors_since(before: set[str]) -> set[int]:
        return {
            int((path / "pid").read_text()) for path in jobs.iterdir() if path.name not in before
        }

    # The first array installs the runner with a serve of its own (the connection process's
    # found none); the second starts the connection's warm serve, which stays after it.
    for _run in range(2):
        first = array("task.rs", 6)
        assert first.returncode == 0, first.stderr
        assert sorted(first.stdout.splitlines()) == task_lines(6)
    kept = set(warm_serves(workdir))
    assert kept, "no warm serve outlived the array"
    # The next array runs on that serve's executors, each task whole, a failure its own.
    before = {path.name for path in jobs.iterdir()}
    third = array("task.rs", 6, "--", "3")
    assert third.returncode == 5, third.stderr
    assert sorted(third.stdout.splitlines()) == task_lines(6)
    assert "task 3 fails" in third.stderr
    assert executors_since(before) <= kept, (executors_since(before), kept)

    # The connection process killed under the array: its tasks run on and are re-attached.
    before = {path.name for path in jobs.iterdir()}
    trickle = start_streaming(
        "--cluster", str(cluster), "run", str(PROGRAMS / "trickle.rs"), "--array", "2", "-q",
        "--", "5", "300",
    )  # fmt: skip
    wait_for(lambda: len({path.name for path in jobs.iterdir()} - before) >= 2, timeout=60)
    for pid in mux_processes(runtime):
        os.kill(pid, signal.SIGKILL)
    out, stderr = trickle.communicate(timeout=120)
    assert trickle.returncode == 0, stderr
    assert out == b"".join(b"line %d\n" % line for line in range(1, 6)) * 2, stderr
    assert executors_since(before) <= kept  # they had started on the warm serve
    # Idle: the connection process goes, and the warm serve with it.
    make_cluster({"alpha": (2, 2048)}, defaults={"connection_persist_s": 1})
    assert run_tiny(cluster) == ""
    wait_for(lambda: not mux_processes(runtime), timeout=60)
    wait_for(lambda: not warm_serves(workdir), timeout=30)
    assert "array sessions" in (runtime / wire.LOG_NAME).read_text()
