"""Arrays at scale without hosts: `jobs` and `jobs --fold` from light rows and aggregate
queries show exactly what the job-by-job layout shows; the coordinator follows an array
through a bounded window, oldest first, and keeps the tasks it does not follow yet alive."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from pathlib import Path

import pytest
from helpers import job_spec

from sshwasm.cli import jobs as jobs_command
from sshwasm.cli import main
from sshwasm.cli.show import JOB_HEADERS, folded_rows, job_row, table
from sshwasm.cluster import Host
from sshwasm.coordinator import Coordinator
from sshwasm.job_output import Handlers
from sshwasm.states import JobState
from sshwasm.store import Job, JobSpec, JobStore

# No process has this pid (above the kernel's pid_max): a coordinator that is gone.
GONE_PID = 2**30


def _array(size: int, name: str) -> JobSpec:
    return JobSpec(**{**job_spec(name=name).__dict__, "array_size": size})


def _jobs_file(path: Path) -> list[int]:
    """Plain jobs and arrays in mixed states; one queued job whose coordinator is gone."""
    with JobStore(path) as store:
        first = store.submit(job_spec(name=" spaced\x1bname "))
        tasks = store.submit_tasks(_array(30, "big"))
        few = store.submit_tasks(_array(3, None))  # type: ignore[arg-type]
        orphan = store.submit(job_spec(name="orphan"))
        for index, job_id in enumerate(tasks):
            host = "beta" if index % 7 == 3 else "alpha"
            state = JobState.FAILED if host == "beta" else JobState.SUCCEEDED
            store.update(job_id, host=host, started_at="2026-01-02T03:04:05.000+00:00")
            store.finish(
                job_id,
                state,
                exit_code=3 if state is JobState.FAILED else 0,
                run_s=None if index % 5 == 0 else 0.25 + index,
            )
        for job_id in few:
            store.cancel_unstarted(job_id)
        store.finish(first, JobState.SUCCEEDED, exit_code=0, run_s=75.5)
        store.update(orphan, coordinator_pid=GONE_PID, heartbeat_ts=0.0)
        return [first, *tasks, *few, orphan]


def _job_by_job(store: JobStore, fold: bool, **query: object) -> str:
    """The table as the layout before this change made it: every Job read, tabulate."""
    jobs = store.list_jobs(**query)  # type: ignore[arg-type]
    rows = folded_rows(jobs) if fold else [job_row(job) for job in jobs]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        table(rows, headers=JOB_HEADERS)
    return out.getvalue()


@pytest.mark.parametrize(
    "words",
    [
        [],
        ["--fold"],
        ["--fold", "--state", "failed"],
        ["--state", "succeeded", "--limit", "7"],
        ["--fold", "--limit", "12"],
    ],
)
def test_jobs_table_from_light_rows_matches_the_job_by_job_table(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    words: list[str],
) -> None:
    db = tmp_path / "jobs.sqlite"
    ids = _jobs_file(db)
    # Laid out here even when short, so the layout is checked against tabulate's.
    monkeypatch.setattr(jobs_command, "TABULATE_MOST_ROWS", 0)
    assert main(["--db", str(db), "jobs", *words]) == 0
    shown = capsys.readouterr().out
    with JobStore(db) as store:
        # The orphan, when listed, was brought up to date first (its coordinator is gone).
        listed = "--state" not in words
        assert (store.get(ids[-1]).state is JobState.LOST) is listed
        fold = "--fold" in words
        query: dict[str, object] = {}
        if "--state" in words:
            query["state"] = JobState(words[words.index("--state") + 1])
        if "--limit" in words:
            query["limit"] = int(words[words.index("--limit") + 1])
        assert shown == _job_by_job(store, fold, **query)
    if words == ["--fold"]:
        assert "big[30 tasks]" in shown and "4 failed, 26 succeeded" in shown
        assert "2 hosts" in shown and "[3 tasks]" in shown and "\\x1b" in shown


def test_plain_table_lays_out_as_tabulate_does() -> None:
    rows = [
        [1, "  lead and trail  ", "a\tb", None, ""],
        [22, "日本", "x\x7fy", 3.5, "succeeded"],
        [333, "", "", 0, "e"],
    ]
    headers = ["ID", "NAME", "WHAT", "NUM", "LAST"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        table(rows, headers=headers)
    assert jobs_command.plain_table(rows, headers) + "\n" == out.getvalue()


def test_heartbeat_queued_renews_runs_of_queued_jobs_only(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite") as store:
        ids = store.submit_tasks(_array(10, "t"))
        store.update_many(ids, heartbeat_ts=1.0, coordinator_pid=GONE_PID)
        store.finish(ids[4], JobState.CANCELLED)
        pending = [job_id for job_id in ids if job_id not in (ids[2], ids[7])]
        before = time.time()
        store.heartbeat_queued(pending)
        for job in store.get_many(ids):
            renewed = job.heartbeat_ts is not None and job.heartbeat_ts >= before
            expected = job.id in pending and job.id != ids[4]
            assert renewed is expected, job.id


def test_coordinator_follows_an_array_through_a_window_oldest_first(tmp_path: Path) -> None:
    """drive_tasks' window: never more tasks followed at once than window_size, started in
    id order, and the tasks behind the window kept alive in the queue meanwhile."""
    hosts = [Host(name="solo", address="127.0.0.1", cpus=2, memory_mb=1024)]
    with JobStore(tmp_path / "jobs.sqlite") as store:
        ids = store.submit_tasks(_array(40, "w"))
        coordinator = Coordinator(store, hosts, None, Handlers())  # type: ignore[arg-type]
        coordinator.window_size = lambda: 4  # type: ignore[method-assign]
        started: list[int] = []
        running: set[int] = set()
        most = 0
        problems: list[str] = []

        async def one(job_id: int) -> Job:
            nonlocal most
            started.append(job_id)
            running.add(job_id)
            most = max(most, len(running))
            order, start = coordinator._pending
            behind = order[start:]
            # The tasks not followed yet: younger ones, none of them started, in order.
            tail = ids[len(ids) - len(behind) :] if behind else []
            if behind != tail or set(behind) & set(started) or len(behind) > len(ids) - 4:
                problems.append(f"task {job_id}: pending {behind[:3]}...")
            await asyncio.sleep(0.001 * (job_id % 3))
            running.discard(job_id)
            return store.get(job_id)

        ended: dict[int, Job] = {}
        asyncio.run(coordinator._windowed(list(reversed(ids)), one, ended))
    assert started == ids
    assert most == 4
    assert sorted(ended) == ids
    assert not problems
    assert coordinator._pending[1] >= len(coordinator._pending[0])  # none left behind


def _window_file(path: Path, tasks: int) -> list[int]:
    """A jobs file of one plain job and an array of `tasks` finished tasks (newest last)."""
    with JobStore(path) as store:
        first = store.submit(job_spec(name="plain"))
        ids = store.submit_tasks(_array(tasks, "win"))
        store.finish_many([(job_id, JobState.SUCCEEDED, {"exit_code": 0}) for job_id in ids])
        store.finish(first, JobState.FAILED, exit_code=1)
        return [first, *ids]


def test_jobs_at_a_terminal_shows_the_newest_and_says_how_many_are_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A terminal gets the newest TERMINAL_WINDOW rows and one line on stderr naming the
    rest and --all; a pipe, --all, --limit, --fold and --json get what they always got."""
    from sshwasm.cli.parser import TERMINAL_WINDOW

    db = tmp_path / "jobs.sqlite"
    ids = _window_file(db, TERMINAL_WINDOW + 49)
    total = len(ids)

    def listed(*words: str, terminal: bool) -> tuple[list[str], str]:
        monkeypatch.setattr(jobs_command, "_stdout_is_terminal", lambda: terminal)
        assert main(["--db", str(db), "jobs", *words]) == 0
        captured = capsys.readouterr()
        return captured.out.splitlines(), captured.err

    lines, err = listed(terminal=True)
    assert len(lines) == 1 + TERMINAL_WINDOW
    assert [int(line.split()[0]) for line in lines[1:]] == ids[::-1][:TERMINAL_WINDOW]
    hidden = total - TERMINAL_WINDOW
    assert err == (
        f"sshwasm: {hidden} older jobs not shown (the newest {TERMINAL_WINDOW} of {total}): "
        "`jobs --all` lists every one, `--limit N` the newest N, `--fold` one row per array\n"
    )
    # The same rows, laid out alike, as the first lines of the whole listing.
    everything, quiet = listed(terminal=False)
    assert everything[: 1 + TERMINAL_WINDOW] == lines and len(everything) == 1 + total
    assert quiet == ""
    assert listed("--all", terminal=True) == (everything, "")
    assert listed("--limit", "3", terminal=True) == (everything[:4], "")
    # Filtered by state: counted within the state; nothing said when all fit.
    lines, err = listed("--state", "succeeded", terminal=True)
    assert len(lines) == 1 + TERMINAL_WINDOW and f"of {total - 1}):" in err
    assert "older succeeded jobs" in err
    assert listed("--state", "failed", terminal=True)[1] == ""
    folded, err = listed("--fold", terminal=True)
    assert err == "" and len(folded) == 3 and f"win[{total - 1} tasks]" in folded[1]
    records, err = listed("--json", terminal=True)
    assert err == "" and sum(line.startswith("  {") for line in records) == total
    # The flags exclude each other: one line, the usage exit code.
    assert main(["--db", str(db), "jobs", "--all", "--limit", "5"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_jobs_on_a_real_terminal_is_cut_to_the_newest(tmp_path: Path) -> None:
    """`sshwasm jobs` whose stdout is a pseudo-terminal tells it is one (no stand-in)."""
    import os
    import pty
    import subprocess
    import sys

    from sshwasm.cli.parser import TERMINAL_WINDOW

    db = tmp_path / "jobs.sqlite"
    ids = _window_file(db, TERMINAL_WINDOW + 1)
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "sshwasm", "--db", str(db), "jobs"],
        stdout=follower,
        stderr=subprocess.PIPE,
    ) as process:
        os.close(follower)
        shown = b""
        while True:  # read as it comes: a terminal holds only a few KiB
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the last writer closed it
                break
            if not chunk:
                break
            shown += chunk
        err = process.stderr.read() if process.stderr else b""
    os.close(leader)
    assert process.returncode == 0
    lines = shown.decode().splitlines()
    assert len(lines) == 1 + TERMINAL_WINDOW and lines[1].split()[0] == str(ids[-1])
    assert err.decode().startswith(f"sshwasm: {len(ids) - TERMINAL_WINDOW} older jobs not shown")
