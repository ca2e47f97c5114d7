"""`jobs` over a real, varied jobs file (issue 13): the fast paths (`jobs --json` from the
record's columns, store.records; the table from the covering index, keyed rows laid out a
column at a time) give, byte for byte, what the row-by-row paths give (a Job per row and
its record; `_row_cells` laid out by `plain_table`), for every state, arrays, labels,
NULLs, odd and non-ASCII names, directories, fuel and --verify twins (never listed)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from helpers import job_spec

from sshwasm.cli import jobs as jobs_command
from sshwasm.cli import main
from sshwasm.cli.listing import render_keyed
from sshwasm.cli.show import JOB_HEADERS
from sshwasm.states import JobState
from sshwasm.store import SCHEMA_VERSION, JobSpec, JobStore

# Mounts as directories.mounts_json writes them: `dirs` is described in the record.
DIRS = json.dumps(
    [
        {"guest": "/data", "read_only": True, "local": "/home/u/data"},
        {"guest": "/scratch", "read_only": False, "host_path": "/srv/scratch"},
    ]
)


def _varied_jobs_file(path: Path) -> dict[str, int]:
    """A jobs file holding one job in every state, arrays (one finished on three hosts,
    one cut short), labels, pinned hosts, NULLs where a column may hold them, names with
    control characters, spaces and non-ASCII, `%`, directories, fuel, and a --verify job
    with its twin; returns some ids by role."""
    base = job_spec()
    ids: dict[str, int] = {}
    with JobStore(path) as store:

        def submit(name: str | None, **changes: object) -> int:
            return store.submit(JobSpec(**{**base.__dict__, "name": name, **changes}))

        ids["none"] = submit(None)  # queued, never placed: no host, no times
        ids["unicode"] = submit("日本語 ジョブ", labels=("gpu", "big"))
        store.finish(ids["unicode"], JobState.SUCCEEDED, exit_code=0, run_s=1.25, host="beta")
        ids["control"] = submit("esc\x1b[31mred\ttab\n", pinned_host="alpha")
        store.finish(ids["control"], JobState.FAILED, exit_code=3, run_s=0.125, host="alpha")
        ids["spaced"] = submit("  spaced  ", dirs=DIRS, fuel=10_000)
        store.finish(ids["spaced"], JobState.TIMEOUT, exit_code=124, run_s=75.5, fuel_used=9_999)
        ids["percent"] = submit("100% [x]")
        store.finish(ids["percent"], JobState.OUT_OF_MEMORY, exit_code=None, run_s=None)
        ids["cancelled"] = submit("gone")
        store.finish(ids["cancelled"], JobState.CANCELLED, exit_code=143, run_s=0.0)
        ids["lost"] = submit("")
        store.finish(ids["lost"], JobState.LOST, error="host 'alpha' vanished")
        array = store.submit_tasks(JobSpec(**{**base.__dict__, "name": "sweep", "array_size": 12}))
        for index, task in enumerate(array):
            state = JobState.SUCCEEDED if index % 4 else JobState.FAILED
            host = ("alpha", "beta", "gamma")[index % 3]
            run_s = (0.0004 + index * 0.0013, 0.005, 59.996, 3725.25)[index % 4]
            store.finish(task, state, exit_code=0 if index % 4 else 1, run_s=run_s, host=host)
        cut = store.submit_tasks(JobSpec(**{**base.__dict__, "name": None, "array_size": 4}))
        store.finish(cut[0], JobState.SUCCEEDED, exit_code=0, run_s=0.5, host="beta")
        ids["cut_queued"], ids["cut_last"] = cut[1], cut[-1]
        ids["verify"] = submit("checked", verify=True)
        store.finish(ids["verify"], JobState.SUCCEEDED, exit_code=0, run_s=0.2, host="alpha")
        ids["twin"] = submit("checked", verify=True, rerun_of=ids["verify"])
        store.finish(ids["twin"], JobState.SUCCEEDED, exit_code=0, run_s=0.3, host="beta")
        ids["rerun"] = submit("checked", rerun_of=ids["verify"])
        store.finish(ids["rerun"], JobState.SUCCEEDED, exit_code=0, run_s=0.2, host="gamma")
        # Queued work whose coordinator is gone (no such pid): `jobs` marks it lost.
        store.update_many([ids["none"], *cut[1:]], coordinator_pid=2**30, heartbeat_ts=0.0)
    return ids


@pytest.fixture
def varied(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    path = tmp_path / "jobs.sqlite"
    return path, _varied_jobs_file(path)


def test_records_are_the_records_of_whole_jobs(varied: tuple[Path, dict[str, int]]) -> None:
    """store.records, read as columns, against Job.record() of each listed Job: equal,
    value types included (a bool stays a bool, a whole float a float), for every listing
    `jobs` makes (all, newest N, by state); never a --verify twin."""
    path, ids = varied
    with JobStore(path) as store:
        for limit in (None, 1, 5, 1000):
            for state in (None, *JobState):
                fast = store.records(limit=limit, state=state)
                slow = [job.record() for job in store.list_jobs(limit=limit, state=state)]
                assert fast == slow, (limit, state)
                assert [list(map(type, r.values())) for r in fast] == [
                    list(map(type, r.values())) for r in slow
                ]
                assert json.dumps(fast, indent=2) == json.dumps(slow, indent=2)
        listed = {record["id"] for record in store.records()}
        assert ids["twin"] not in listed and ids["verify"] in listed
        spaced = next(r for r in store.records() if r["id"] == ids["spaced"])
        assert spaced["dirs"] == "/home/u/data::/data:ro, /srv/scratch::/scratch (host)"
        assert spaced["verify"] is False


def test_records_fail_on_a_state_no_job_can_have(varied: tuple[Path, dict[str, int]]) -> None:
    """A state word that is no JobState fails store.records as it fails Job.from_row."""
    path, ids = varied
    db = sqlite3.connect(path)
    db.execute("UPDATE jobs SET state = 'exploded' WHERE id = ?", (ids["lost"],))
    db.commit()
    db.close()
    with JobStore(path) as store:
        with pytest.raises(ValueError, match="exploded"):
            store.records()
        with pytest.raises(ValueError, match="exploded"):
            store.list_jobs()


def test_jobs_json_and_table_are_the_row_by_row_ones(
    varied: tuple[Path, dict[str, int]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real `jobs --json` and `jobs`, after they marked the gone coordinator's queued
    jobs lost: the bytes of print_json over each Job's record, and of the row-by-row table
    (and, laid out a column at a time from the covering index's keyed rows, the same)."""
    path, ids = varied
    # The newest three: only the unfinished jobs shown are refreshed (the gone
    # coordinator's queued task among them is lost), the others are left alone.
    assert main(["--db", str(path), "jobs", "--limit", "3"]) == 0
    shown = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in shown] == [str(ids[key]) for key in ("rerun", "verify", "cut_last")]
    assert shown[2][2] == "lost"
    with JobStore(path) as store:
        assert store.get(ids["cut_queued"]).state is JobState.QUEUED
        assert store.get(ids["none"]).state is JobState.QUEUED
    assert main(["--db", str(path), "jobs", "--json"]) == 0
    out = capsys.readouterr().out
    with JobStore(path) as store:
        for key in ("none", "cut_queued"):  # refreshed before listing
            assert store.get(ids[key]).state is JobState.LOST
        jobs = store.list_jobs()
        assert out == json.dumps([job.record() for job in jobs], indent=2) + "\n"
        for state in ("lost", "succeeded"):
            assert main(["--db", str(path), "jobs", "--json", "--state", state]) == 0
            listed = json.loads(capsys.readouterr().out)
            assert listed == [job.record() for job in jobs if job.state == state]
        rows = store.table_rows()
        keyed = store.keyed_table_rows()
        version = store._read("PRAGMA user_version")[0][0]
        plan = store._read(
            "EXPLAIN QUERY PLAN SELECT id, array_task, run_s, name FROM jobs "
            "WHERE NOT (verify = 1 AND rerun_of IS NOT NULL) ORDER BY id DESC"
        )
    expected = jobs_command.plain_table([jobs_command._row_cells(row) for row in rows], JOB_HEADERS)
    assert main(["--db", str(path), "jobs"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert keyed is not None and render_keyed(keyed, JOB_HEADERS) == expected + "\n"
    assert str(ids["twin"]) not in {line.split()[0] for line in expected.splitlines()}
    # The listing reads the covering index (migration 6), not the table's rows.
    assert version == SCHEMA_VERSION >= 6
    assert "COVERING INDEX jobs_listing" in " ".join(str(step[3]) for step in plan)
    # Past TABULATE_MOST_ROWS the same rows go the column-at-a-time way: the same bytes.
    monkeypatch.setattr(jobs_command, "TABULATE_MOST_ROWS", 3)
    assert main(["--db", str(path), "jobs"]) == 0
    assert capsys.readouterr().out == expected + "\n"
