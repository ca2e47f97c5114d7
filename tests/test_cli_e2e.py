"""`sshwasm` as a user runs it: real processes, real sshd hosts, real rustc, wasmtime and SQLite."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    EXAMPLES,
    PROGRAMS,
    moment,
    no_traceback,
    record_of,
    sshwasm,
    start_sshwasm,
    wait_for_state,
)


@pytest.fixture
def cluster(make_cluster: Callable[..., Path]) -> Path:
    """alpha (8 cpus, 16 GB), beta (2, 2 GB), gamma (4, 8 GB): three unequal hosts."""
    return make_cluster({"alpha": (8, 16384), "beta": (2, 2048), "gamma": (4, 8192)})


# -- the embedded default ------------------------------------------------------------------


def test_hello_on_the_embedded_default_without_any_cluster_file() -> None:
    result = sshwasm("run", str(EXAMPLES / "hello.rs"), "--env", "HELLO_SLEEP_S=0")
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "job done, hello!\n"
    listing = sshwasm("jobs", "--json")
    (job,) = json.loads(listing.stdout)
    assert job["host"] == "local" and job["state"] == "succeeded" and job["exit_code"] == 0


# -- over SSH ------------------------------------------------------------------------------


def test_seed_hello_streams_and_is_recorded(cluster: Path) -> None:
    started = time.monotonic()
    process = start_sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"),
        "--cpus", "1", "--memory-mb", "1000", "--job-name", "sleep", "--env", "HELLO_SLEEP_S=2",
    )  # fmt: skip
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert out == "job done, hello!\n"
    assert time.monotonic() - started >= 2  # it really slept on the host
    table = sshwasm("jobs").stdout.splitlines()
    assert table[0].split() == [
        "ID", "NAME", "STATE", "HOST", "CPUS", "MEM_MB", "SUBMITTED", "RUNTIME", "EXIT"
    ]  # fmt: skip
    row = table[1].split()
    assert row[:6] == ["1", "sleep", "succeeded", "beta", "1", "1000"]
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["stdout"] == "job done, hello!\n"
    assert record["run_s"] >= 2 and record["wasm_bytes"] < 1_000_000
    assert record["upload_bytes"] == record["wasm_bytes"]  # first time on this host
    for key in ("submitted_at", "started_at", "finished_at"):
        assert record[key].endswith("+00:00")


def test_json_record_and_warm_run_uploads_nothing(cluster: Path) -> None:
    hello = str(EXAMPLES / "hello.rs")
    first = record_of(
        sshwasm("--cluster", str(cluster), "run", hello, "--json", "--env", "HELLO_SLEEP_S=0")
    )
    second_run = sshwasm(
        "--cluster", str(cluster), "run", hello, "--json", "--env", "HELLO_SLEEP_S=0"
    )
    assert second_run.returncode == 0
    second = record_of(second_run)
    assert set(second) == {
        "id", "name", "state", "exit_code", "host", "cpus", "memory_mb", "time_limit_s",
        "source", "language", "wasm_sha256", "wasm_bytes", "upload_bytes", "submitted_at",
        "started_at", "finished_at", "queue_s", "compile_s", "upload_s", "run_s", "cpu_s",
        "peak_memory_bytes", "stdout", "stderr", "error", "array_id", "array_task",
        "input_bytes", "output_bytes", "stage_in_s", "stage_out_s", "max_output_mb",
        "output_conflicts", "attempts", "attempt_hosts",
        "dirs",
        "fuel", "fuel_used", "rerun_of", "verify", "reused_from",
        "engine",
    }  # fmt: skip
    assert first["state"] == second["state"] == "succeeded"
    assert second["stdout"] == "job done, hello!\n"
    assert second["wasm_sha256"] == first["wasm_sha256"]
    assert second["compile_s"] == 0  # compiled once, then cached
    assert second["upload_bytes"] == 0  # module already on the host
    assert second["language"] == "rust" and second["peak_memory_bytes"] > 0
    assert first["engine"] == second["engine"] == "ssh"  # issue 12: the default engine


def test_args_env_and_stdin_reach_the_job_exactly(cluster: Path, tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.txt"
    numbers.write_text("1\n2\n39\n")
    marker = tmp_path / "pwned"
    nasty = [f"$(touch {marker})", f"`touch {marker}`", f"; touch {marker}", "it's \"quoted\"",
             "two\nlines", "b c"]  # fmt: skip
    result = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "echo.rs"),
        "--env", "GREETING=hola", "--env", f"EVIL=$(touch {marker})",
        "--job-name", f"name; touch {marker}", "--stdin", str(numbers), "--", "a", *nasty,
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    expected_args = ["a", *nasty]
    lines = result.stdout.split("arg[")
    assert len(lines) - 1 == len(expected_args)
    for index, value in enumerate(expected_args, start=1):
        assert f"arg[{index}]={value}\n" in result.stdout
    assert "GREETING=hola\n" in result.stdout
    assert "stdin lines: 3\n" in result.stdout and "sum: 42\n" in result.stdout
    assert not marker.exists()


def test_job_sees_no_worker_environment(cluster: Path) -> None:
    # Over real sshd, the runner itself has HOME, PATH, USER, SSH_CONNECTION...: none of
    # them, and nothing else, may reach the guest; and exactly what was given must.
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "environ.rs"),
        "--env", "GREETING=x", "--env", "EMPTY=", "--env", "SPACED=a b=c",
        "--", "one", "two words",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("argv ")][1:] == [
        "argv one",
        "argv two words",
    ], result.stdout
    seen = [line.removeprefix("env ") for line in lines if not line.startswith("argv ")]
    assert sorted(seen) == ["EMPTY=", "GREETING=x", "SPACED=a b=c"], result.stdout


def test_exit_code_three(cluster: Path) -> None:
    result = sshwasm("--cluster", str(cluster), "run", str(EXAMPLES / "fail.rs"))
    assert result.returncode == 3
    assert "about to fail" in result.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed" and record["exit_code"] == 3


def test_panic_is_a_failed_trap(cluster: Path) -> None:
    result = sshwasm("--cluster", str(cluster), "run", str(PROGRAMS / "panic.rs"))
    no_traceback(result)
    assert result.returncode == 134
    assert "boom" in result.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed"
    assert "unreachable" in record["error"].lower()


def test_compile_error_shows_rustc_and_records_nothing(cluster: Path) -> None:
    result = sshwasm("--cluster", str(cluster), "run", str(PROGRAMS / "compile_error.rs"))
    no_traceback(result)
    assert result.returncode == 1
    assert "error[E0308]" in result.stderr  # rustc's own diagnostic, verbatim
    assert result.stderr.rstrip().splitlines()[-1].startswith("sshwasm: error: compilation")
    assert json.loads(sshwasm("jobs", "--json").stdout) == []


def test_memory_limit_ends_out_of_memory(cluster: Path) -> None:
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "alloc.rs"), "--memory-mb", "64",
        "--", "200",
    )  # fmt: skip
    assert result.returncode != 0
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "out_of_memory", record
    assert record["peak_memory_bytes"] <= 64 << 20


def test_memory_within_limit_succeeds(cluster: Path) -> None:
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "alloc.rs"), "--memory-mb", "64",
        "--", "16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "allocated 16 MiB" in result.stdout


def test_time_limit_on_a_busy_loop(cluster: Path) -> None:
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "spin.rs"), "--time-limit", "1"
    )
    assert result.returncode == 124
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "timeout" and record["exit_code"] == 124


def test_time_limit_on_a_sleeping_guest_keeps_partial_output(cluster: Path) -> None:
    started = time.monotonic()
    # 3 s, not 1: loading (and on a fresh host compiling) the module counts against the
    # limit, and under a loaded CI the guest must still get to print before it runs out.
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--time-limit", "3",
        "--", "30",
    )  # fmt: skip
    assert result.returncode == 124
    assert time.monotonic() - started < 20  # the 30 s sleep did not run out
    assert result.stdout.startswith("start")
    assert record_of(sshwasm("status", "1", "--json"))["state"] == "timeout"


@pytest.mark.slow
def test_best_fit_among_three_unequal_hosts(cluster: Path) -> None:
    hello = str(EXAMPLES / "hello.rs")
    chosen = {}
    for cpus, memory in (("1", "1000"), ("3", "1000"), ("6", "1000"), ("1", "4000")):
        result = sshwasm(
            "--cluster", str(cluster), "run", hello, "--cpus", cpus, "--memory-mb", memory,
            "--json", "--env", "HELLO_SLEEP_S=0",
        )  # fmt: skip
        chosen[(cpus, memory)] = record_of(result)["host"]
    assert chosen == {
        ("1", "1000"): "beta",  # the smallest host that fits
        ("3", "1000"): "gamma",
        ("6", "1000"): "alpha",
        ("1", "4000"): "gamma",  # beta has too little memory
    }


def test_pinned_host(cluster: Path) -> None:
    result = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"), "--host", "alpha",
        "--json", "--env", "HELLO_SLEEP_S=0",
    )  # fmt: skip
    assert record_of(result)["host"] == "alpha"


def test_no_host_can_ever_fit(cluster: Path) -> None:
    result = sshwasm("--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"), "--cpus", "64")
    no_traceback(result)
    assert result.returncode == 1
    assert result.stderr.startswith("sshwasm: error: no host can fit 64 cpus")
    assert "alpha has 8 cpus and 16384 MB" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_queued_then_started_on_a_one_slot_host(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (1, 1024)})
    sleep = str(PROGRAMS / "sleep.rs")
    first = sshwasm("--cluster", str(cluster), "run", sleep, "--detach", "--", "60")
    assert first.returncode == 0 and first.stdout.strip() == "1"
    wait_for_state(1, {"running"})
    second = start_sshwasm("--cluster", str(cluster), "run", sleep, "--json", "--", "0")
    try:
        # Job 1 holds the only slot for as long as the test wants: job 2 must wait for it.
        wait_for_state(2, {"queued"})
        assert sshwasm("cancel", "1").returncode == 0
        out, err = second.communicate(timeout=120)
    finally:
        if second.poll() is None:
            second.kill()
            second.communicate()
    assert second.returncode == 0, err
    later = json.loads(out)
    earlier = record_of(sshwasm("status", "1", "--json"))
    assert earlier["state"] == "cancelled" and later["state"] == "succeeded"
    assert later["queue_s"] > 0
    assert moment(later["started_at"]) >= moment(earlier["finished_at"])


@pytest.mark.slow
def test_two_concurrent_runs_on_a_one_slot_host_never_overlap(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (1, 1024)})
    sleep = str(PROGRAMS / "sleep.rs")
    sshwasm("--cluster", str(cluster), "run", sleep, "--", "0")  # build and install once
    runs = [
        start_sshwasm("--cluster", str(cluster), "run", sleep, "--json", "--", "1")
        for _ in range(2)
    ]
    records = []
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        records.append(json.loads(out))
    first, second = sorted(records, key=lambda r: moment(r["started_at"]))
    assert moment(second["started_at"]) >= moment(first["finished_at"])


@pytest.mark.slow
def test_detach_then_status_and_logs(cluster: Path) -> None:
    result = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "echo.rs"), "--detach", "--", "x"
    )
    assert result.returncode == 0 and result.stdout.strip() == "1"
    deadline = time.monotonic() + 60
    while (record := record_of(sshwasm("status", "1", "--json")))["state"] != "succeeded":
        assert record["state"] in ("queued", "running"), record
        assert time.monotonic() < deadline
        time.sleep(0.2)
    logs = sshwasm("logs", "1")
    assert logs.stdout.startswith("arg[1]=x\n")
    human = sshwasm("status", "1").stdout
    assert "state: succeeded" in human


def test_unknown_host_key_is_refused(make_cluster: Callable[..., Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    cluster = make_cluster({"alpha": (2, 1024)}, defaults={"known_hosts": str(empty)})
    result = sshwasm("--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"))
    no_traceback(result)
    assert result.returncode == 1
    assert "not trusted" in result.stderr and "ssh-keyscan -p" in result.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed" and "alpha" in record["error"]


def test_malformed_and_incomplete_cluster_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  - name: a\n    address: [unclosed\n")
    result = sshwasm("--cluster", str(bad), "run", str(EXAMPLES / "hello.rs"))
    no_traceback(result)
    assert result.returncode == 1
    assert result.stderr.startswith(f"sshwasm: error: {bad}:")
    incomplete = tmp_path / "incomplete.yaml"
    incomplete.write_text("hosts:\n  - name: beta\n    address: 127.0.0.3\n    memory_mb: 10\n")
    result = sshwasm("--cluster", str(incomplete), "run", str(EXAMPLES / "hello.rs"))
    assert result.returncode == 1
    assert result.stderr == f"sshwasm: error: {incomplete}:2: host 'beta' has no 'cpus'\n"


def test_bad_arguments_are_one_line(cluster: Path) -> None:
    for args in (["--cpus", "0"], ["--env", "NOEQUALS"], ["--time-limit", "-1"]):
        result = sshwasm("--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"), *args)
        assert result.returncode == 2
        assert result.stderr.startswith("sshwasm: error: ")
        assert len(result.stderr.strip().splitlines()) == 1
    missing = sshwasm("--cluster", str(cluster), "run", "nope.rs")
    assert missing.returncode == 1 and "nope.rs" in missing.stderr
    no_traceback(missing)


def test_every_command_has_help() -> None:
    for command in ("run", "jobs", "status", "logs", "cancel", "hosts", "wasm"):
        result = sshwasm(command, "--help")
        assert result.returncode == 0 and "usage: sshwasm" in result.stdout


@pytest.mark.slow
def test_jobs_filters(cluster: Path) -> None:
    for program in ("hello.rs", "fail.rs"):
        sshwasm(
            "--cluster", str(cluster), "run", str(EXAMPLES / program), "--env", "HELLO_SLEEP_S=0"
        )
    assert [j["id"] for j in json.loads(sshwasm("jobs", "--json").stdout)] == [2, 1]
    failed = json.loads(sshwasm("jobs", "--json", "--state", "failed").stdout)
    assert [j["id"] for j in failed] == [2]
    assert len(json.loads(sshwasm("jobs", "--json", "--limit", "1").stdout)) == 1


def test_array_tasks_spread_over_hosts_with_whole_outputs(cluster: Path) -> None:
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "task.rs"), "--array", "12",
        "--cpus", "2", "--tag",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 36
    for index in range(0, 36, 3):  # each task's three lines together, never interleaved
        task = lines[index].split("\t")[0]
        assert lines[index : index + 3] == [f"{task}\ttask {task} of 12 line {n}" for n in range(3)]
    assert sorted(int(lines[i].split("\t")[0]) for i in range(0, 36, 3)) == list(range(12))
    records = json.loads(sshwasm("jobs", "--json").stdout)
    assert len(records) == 12 and {r["array_id"] for r in records} == {1}
    assert sorted(r["array_task"] for r in records) == list(range(12))
    assert len({r["host"] for r in records}) >= 2  # 2-cpu tasks spread over the hosts
    folded = sshwasm("jobs", "--fold").stdout.splitlines()
    assert len(folded) == 2 and "12 succeeded" in folded[1]


def test_array_exit_code_is_zero_only_if_every_task_succeeded(cluster: Path) -> None:
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "task.rs"), "--array", "4",
        "--json", "--", "2",
    )  # fmt: skip
    assert result.returncode == 5
    records = json.loads(result.stdout)
    states = {r["array_task"]: r["state"] for r in records}
    assert states == {0: "succeeded", 1: "succeeded", 2: "failed", 3: "succeeded"}
