"""Array shaping against real loopback hosts: --args-from, --input-each, --max-running (and
--array N%K, with --detach too), --halt-after-failures, and the progress line on a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import EXAMPLES, PROGRAMS, moment, no_traceback, sshwasm, wait_for

from sshwasm.store import _MIGRATIONS, JobStore


@pytest.fixture
def cluster(make_cluster: Callable[..., Path]) -> Path:
    """alpha (8 cpus) and gamma (4): room for far more than two tasks at once."""
    return make_cluster({"alpha": (8, 16384), "gamma": (4, 8192)})


def records() -> list[dict[str, Any]]:
    result = sshwasm("jobs", "--json")
    assert result.returncode == 0, result.stderr
    return sorted(json.loads(result.stdout), key=lambda record: record["id"])


def most_overlapping(tasks: Sequence[dict[str, Any]]) -> int:
    """The largest number of tasks running at one moment (from started/finished times)."""
    spans = [(moment(t["started_at"]), moment(t["finished_at"])) for t in tasks]
    return max(sum(1 for s, f in spans if s <= start < f) for start, _ in spans)


def tagged_lines(stdout: str) -> dict[int, list[str]]:
    by_task: dict[int, list[str]] = {}
    for line in stdout.splitlines():
        task, _, text = line.partition("\t")
        by_task.setdefault(int(task), []).append(text)
    return by_task


# -- --args-from ---------------------------------------------------------------------------


def test_args_from_lines_reach_the_guests_exactly(cluster: Path, tmp_path: Path) -> None:
    lines = tmp_path / "params.txt"
    lines.write_text(
        "alpha beta\n"
        "\n"
        '\'two words\' "double \\"quoted\\"" back\\ slash\n'
        "   \t \n"
        "''\n"
        "  --flag=1   -x  \r\n"
        "ünïcode 'tab\there'\n"
    )
    expected = [
        ["alpha", "beta"],
        ["two words", 'double "quoted"', "back slash"],
        [""],
        ["--flag=1", "-x"],
        ["ünïcode", "tab\there"],
    ]
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "environ.rs"),
        "--args-from", str(lines), "--tag", "--", "fixed arg",
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    by_task = tagged_lines(result.stdout)
    assert sorted(by_task) == list(range(len(expected)))
    for task, arguments in enumerate(expected):
        argv = [line.removeprefix("argv ") for line in by_task[task] if line.startswith("argv ")]
        assert argv == ["environ", "fixed arg", *arguments]
        env = {line.removeprefix("env ") for line in by_task[task] if line.startswith("env ")}
        assert env == {f"SSHWASM_ARRAY_TASK_ID={task}", "SSHWASM_ARRAY_TASK_COUNT=5"}
    tasks = records()
    assert [t["array_task"] for t in tasks] == list(range(5))
    assert {t["array_id"] for t in tasks} == {tasks[0]["id"]}


def test_args_from_and_stdin_take_dash_for_standard_input(cluster: Path) -> None:
    """`... | sshwasm run SOURCE --args-from -` as with GNU parallel; `--stdin -` feeds this
    process's stdin to the job; only one of them may take it."""
    piped = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "environ.rs"),
        "--args-from", "-", "--tag", stdin=b"one\n\n'two words'\n",
    )  # fmt: skip
    no_traceback(piped)
    assert piped.returncode == 0, piped.stderr
    by_task = tagged_lines(piped.stdout)
    argv = {task: [x for x in lines if x.startswith("argv ")] for task, lines in by_task.items()}
    assert argv == {0: ["argv environ", "argv one"], 1: ["argv environ", "argv two words"]}

    fed = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "echo.rs"), "--stdin", "-",
        stdin=b"1\n2\n39\n",
    )  # fmt: skip
    assert fed.returncode == 0, fed.stderr
    assert "stdin lines: 3\n" in fed.stdout and "sum: 42\n" in fed.stdout

    both = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "environ.rs"),
        "--args-from", "-", "--stdin", "-", stdin=b"one\n",
    )  # fmt: skip
    no_traceback(both)
    assert both.returncode == 1, both.stderr
    assert both.stderr == (
        "sshwasm: error: --args-from - and --stdin - cannot both read standard input\n"
    )
    assert len(records()) == 3  # the refused run recorded nothing


def test_args_from_bad_line_is_one_error_naming_file_and_line(
    cluster: Path, tmp_path: Path
) -> None:
    lines = tmp_path / "params.txt"
    lines.write_text("fine\n\n'unbalanced quote\nfine too\n")
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "environ.rs"), "--args-from", str(lines)
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("sshwasm: error: ")
    assert f"{lines}:3" in result.stderr and "quotation" in result.stderr
    assert records() == []  # nothing was submitted


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--array", "3"], "different numbers of tasks"),
        (["--max-running", "2", "--array", "2%3"], "disagree"),
        (["--input", "."], "cannot be used together"),
    ],
)
def test_array_flags_that_disagree_are_refused(
    cluster: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    lines = tmp_path / "params.txt"
    lines.write_text("a\nb\n")
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "environ.rs"),
        "--args-from", str(lines), "--input-each", str(lines), str(lines), *extra,
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert records() == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-running", "2"], "--max-running needs an array"),
        (["--halt-after-failures", "1"], "--halt-after-failures needs an array"),
        (["--array", "3%0"], "must be at least 1"),
        (["--input-each", "/no/such/path"], "--input-each /no/such/path: no such file"),
        (["--args-from", "/no/such/file"], "--args-from /no/such/file: No such file"),
    ],
)
def test_bad_array_flags_are_one_clear_error(cluster: Path, flags: list[str], message: str) -> None:
    result = sshwasm("--cluster", str(cluster), "run", str(PROGRAMS / "environ.rs"), *flags)
    no_traceback(result)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert records() == []


# -- --input-each --------------------------------------------------------------------------


def test_input_each_stages_one_path_per_task(cluster: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.txt"
    single.write_bytes(b"12345")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.bin").write_bytes(b"x" * 10)
    (tree / "sub" / "b.bin").write_bytes(b"y" * 3)
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "stage.rs"),
        "--input-each", str(single), str(tree), "--tag",
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    by_task = tagged_lines(result.stdout)
    escapes = ("write ", "read ", "sym", "open ")
    files = {
        task: [line for line in lines if not line.startswith(escapes)]
        for task, lines in by_task.items()
    }
    assert files == {0: ["single.txt 5"], 1: ["a.bin 10", "sub/b.bin 3"]}
    assert [t["input_bytes"] > 0 for t in records()] == [True, True]


# -- --max-running -------------------------------------------------------------------------


def test_max_running_two_never_has_three_tasks_overlapping(cluster: Path) -> None:
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--array", "6%2",
        "--", "0.8",
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    tasks = records()
    assert len(tasks) == 6 and {t["state"] for t in tasks} == {"succeeded"}
    assert most_overlapping(tasks) == 2  # throttled, but still two at a time


def test_max_running_holds_with_a_detached_coordinator(cluster: Path) -> None:
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--array", "5",
        "--max-running", "2", "--detach", "--", "0.8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ids = [int(line) for line in result.stdout.split()]
    assert len(ids) == 5

    def all_final() -> bool:
        return all(t["state"] not in ("queued", "running") for t in records())

    wait_for(all_final, timeout=90)
    tasks = records()
    assert {t["state"] for t in tasks} == {"succeeded"}
    assert most_overlapping(tasks) <= 2


def test_a_detached_array_is_one_line_at_a_terminal(cluster: Path) -> None:
    """`run --array N --detach` prints one line at a terminal, however large N is (a pipe
    still gets one id per line: the tests above read them)."""
    master, slave = pty.openpty()
    try:
        started = subprocess.run(
            [sys.executable, "-m", "sshwasm", "--cluster", str(cluster), "run",
             str(PROGRAMS / "sleep.rs"), "--array", "3", "--detach", "--", "0"],
            stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, timeout=120,
        )  # fmt: skip
        os.close(slave)
        shown = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: nothing holds the terminal any more
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    assert started.returncode == 0, started.stderr
    assert shown == b"submitted array 1 of 3 jobs: ids 1-3\r\n", shown
    wait_for(lambda: all(t["state"] == "succeeded" for t in records()), timeout=90)


# -- --halt-after-failures -----------------------------------------------------------------


def test_halt_cancels_exactly_the_unstarted_tasks(cluster: Path) -> None:
    # One at a time: task 0 succeeds, task 1 fails (exit 5) and halts the rest.
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "task.rs"), "--array", "5%1",
        "--halt-after-failures", "1", "--json", "--", "1",
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 5, result.stderr
    states = {t["array_task"]: t["state"] for t in json.loads(result.stdout)}
    assert states == {0: "succeeded", 1: "failed", 2: "cancelled", 3: "cancelled", 4: "cancelled"}
    for task in records():
        if task["state"] == "cancelled":
            assert task["started_at"] is None and task["host"] is None
            assert task["error"] == "halted after 1 failures"
            assert task["exit_code"] == 143
        else:
            assert task["started_at"] is not None
    assert "halted after 1 failures" in result.stderr


def test_halt_lets_running_tasks_finish(cluster: Path) -> None:
    # Every task times out; three run at a time, so the second failure finds running and
    # queued tasks: the running ones finish, the queued ones are cancelled.
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--array", "8%3",
        "--halt-after-failures", "2", "--time-limit", "0.5", "--json", "--", "5",
    )  # fmt: skip
    no_traceback(result)
    tasks = json.loads(result.stdout)
    assert result.returncode != 0
    ended = [t for t in tasks if t["state"] != "cancelled"]
    cancelled = [t for t in tasks if t["state"] == "cancelled"]
    assert len(ended) >= 2 and cancelled, tasks
    assert all(t["started_at"] is not None and t["finished_at"] for t in ended)
    assert all(t["started_at"] is None for t in cancelled)
    assert all(t["error"] == "halted after 2 failures" for t in cancelled)
    second_failure = sorted(moment(t["finished_at"]) for t in ended)[1]
    # No task started after the failure that halted the array was recorded.
    assert all(moment(t["started_at"]) < second_failure for t in ended)


def test_halt_and_args_from_hold_with_a_detached_coordinator(cluster: Path, tmp_path: Path) -> None:
    # task.rs fails when its argument is its own task id: only task 0's line does that.
    lines = tmp_path / "params.txt"
    lines.write_text("0\n0\n0\n0\n")
    result = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "task.rs"), "--args-from", str(lines),
        "--max-running", "1", "--halt-after-failures", "1", "--detach",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 4

    def all_final() -> bool:
        return all(t["state"] not in ("queued", "running") for t in records())

    wait_for(all_final, timeout=90)
    states = [t["state"] for t in records()]
    assert states == ["failed", "cancelled", "cancelled", "cancelled"]


# -- progress ------------------------------------------------------------------------------


def run_on_terminal(args: Sequence[str], timeout: float = 120) -> tuple[int, bytes, str]:
    """Run sshwasm with stderr on a pseudo-terminal; returns (exit code, stderr, stdout)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "sshwasm", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=os.environ.copy(),
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the last holder of the terminal closed it
                    break
                if not chunk:
                    break
                seen += chunk
            elif process.poll() is not None:
                break
        assert process.stdout is not None
        stdout = process.stdout.read().decode()
        return process.wait(timeout=30), seen, stdout
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()


def test_progress_line_on_a_terminal(cluster: Path) -> None:
    code, stderr, stdout = run_on_terminal(
        ["--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--array", "4%2",
         "--", "0.7"]
    )  # fmt: skip
    assert code == 0, stderr
    assert stdout.count("end") == 4
    assert b"\r\x1b[K" in stderr
    assert b"array 1: 0/4 done" in stderr
    assert b"2 running" in stderr  # throttled to two
    assert b"4/4 done, 0 running, 0 queued, 0 failed, ETA 0s" in stderr
    assert b"ETA " in stderr
    # Taken away at the end: the terminal's last line is not a progress line.
    assert stderr.endswith(b"\r\x1b[K"), stderr[-200:]


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_no_progress_line_with_quiet_or_json(cluster: Path, flag: str) -> None:
    code, stderr, _ = run_on_terminal(
        ["--cluster", str(cluster), "run", str(PROGRAMS / "task.rs"), "--array", "3", flag]
    )
    assert code == 0, stderr
    assert b"done," not in stderr and b"\x1b[K" not in stderr


def test_no_progress_line_when_stderr_is_not_a_terminal(cluster: Path) -> None:
    result = sshwasm("--cluster", str(cluster), "run", str(PROGRAMS / "task.rs"), "--array", "3")
    assert result.returncode == 0, result.stderr
    assert "done," not in result.stderr and "\x1b" not in result.stderr


# -- the jobs file -------------------------------------------------------------------------


def test_older_jobs_file_gains_the_array_columns_and_its_rows_keep_working(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    # What schema 2 had: none of the array settings (step 3) or later columns.
    for version in (1, 2):
        db.executescript(_MIGRATIONS[version])
    db.execute("PRAGMA user_version = 2")
    db.execute(
        """INSERT INTO jobs (state, cpus, memory_mb, submitted_at, submitted_ts, remote_key)
           VALUES ('succeeded', 1, 64, '2026-01-01T00:00:00+00:00', 0, '1-abc')"""
    )
    db.commit()
    db.close()
    with JobStore(path) as store:
        (job,) = store.list_jobs()
        assert job.max_running is None and job.halt_after_failures is None
        assert job.record()["state"] == "succeeded"


def test_progress_text_counts_and_eta() -> None:
    from sshwasm.cli.progress import format_eta, progress_text

    assert progress_text(7, 10, 0, 0, 3, 5.0).endswith(
        "array 7: 0/10 done, 3 running, 7 queued, 0 failed, ETA ?"
    )
    # 4 done in 20 s: the other 6 at the same rate take 30 s.
    assert progress_text(7, 10, 4, 1, 2, 20.0).endswith(
        "4/10 done, 2 running, 4 queued, 1 failed, ETA 30s"
    )
    # A running count read before tasks ended never makes the counts add up past the total.
    assert "10/10 done, 0 running, 0 queued" in progress_text(7, 10, 10, 0, 3, 9.0)
    assert [format_eta(s) for s in (0, 59.4, 61, 3725)] == ["0s", "59s", "1m01s", "1h02m"]
