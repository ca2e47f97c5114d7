"""`jobs` over a long listing (cli/listing.py): the table built a column at a time is, byte
for byte, the row-by-row one (`_row_cells` laid out by `plain_table`, which test_scale holds
to tabulate's layout), for plain rows and for every odd value a jobs file can hold."""

from __future__ import annotations

import random
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import job_spec

from sshwasm.cli import jobs as jobs_command
from sshwasm.cli import main
from sshwasm.cli.listing import render, render_keyed
from sshwasm.cli.show import JOB_HEADERS
from sshwasm.store import TABLE_COLUMNS, TABLE_KEY, TABLE_SELECT, JobSpec, JobStore

STAMP = "2026-01-02T03:04:05.678+00:00"
NOW = 1_767_323_000.25  # a day and a bit after STAMP


def _row_by_row(rows: list[tuple[Any, ...]]) -> str:
    return jobs_command.plain_table([jobs_command._row_cells(row) for row in rows], JOB_HEADERS)


def _task_rows(count: int, name: str = "tiny", run_s: float = 0.004) -> list[tuple[Any, ...]]:
    """An array's finished tasks, as `table_rows` reads them (newest first)."""
    return [
        (count - index, name, count - index - 1, "succeeded", "alpha", 1, 64, STAMP,
         run_s * (1 + index % 7), None, 0)
        for index in range(count)
    ]  # fmt: skip


def _real_task_rows(count: int) -> list[tuple[Any, ...]]:
    """An array's finished tasks as a real run leaves them: on three hosts in turn, each
    with its own run time to the microsecond (hardly two alike), a few of a second or more
    and one that rounds up to a minute."""
    chance = random.Random(count)
    hosts = ("alpha", "beta", "gamma")
    rows = [
        (count - index, "tiny", count - index - 1, "succeeded", hosts[index % 3], 1, 64, STAMP,
         round(chance.uniform(0.002, 0.03 if index % 50 else 12.0), 6), None, 0)
        for index in range(count)
    ]  # fmt: skip
    rows[count // 2] = (*rows[count // 2][:8], 59.996, *rows[count // 2][9:])
    return rows


def _tiny_task_rows(count: int, slowest: float = 9.989999) -> list[tuple[Any, ...]]:
    """Tiny tasks as a real 100,000-task run leaves them: a fraction of a millisecond
    each, all apart, no name; a few near the edges of five-character run times (ties,
    just under 10 s, and `slowest`)."""
    chance = random.Random(count)
    hosts = ("alpha", "beta", "gamma")
    rows = [
        (count - index, None, count - index - 1, "succeeded", hosts[index % 3], 1, 256, STAMP,
         round(chance.uniform(0.0002, 0.0009), 6), None, 0)
        for index in range(count)
    ]  # fmt: skip
    for index, seconds in enumerate((0.125, 0.005, 0.015, 9.985, slowest, 0.000001)):
        rows[index * 7] = (*rows[index * 7][:8], seconds, *rows[index * 7][9:])
    return rows


# Values each column can hold, the odd ones included: control characters, spaces around,
# wide and non-printable Unicode, `%`, NULLs, a float or text where an int belongs, a
# running job's time so far, a minute and more, rounding ties, -0.0, stamps that do not
# parse. Not an int and a float that are equal (1 and 1.0) in one column, nor a number in a
# TEXT column: the jobs file's column types convert those.
NAMES = ["tiny", " spaced ", "esc\x1bape", "tab\tname", "日本", "line\u2028sep", "100%", "", None]
TASKS = [None, 0, 5, 12345, -1, 2.5, "7x"]
STATES = ["succeeded", "failed", "running", "queued", "lost", None, " odd\x07"]
HOSTS = ["alpha", None, "", " beta ", "ga\x9bmma", "\u00a0nbsp"]
NUMBERS = [1, 2, 64, 4096, 1.5, "3x", None]
STAMPS = [STAMP, "2026-07-01T00:00:00.000+00:00", "not a time", "", None, 5]
RUN_S = [None, 0.0, -0.0, 0.004, 0.125, 0.015, 59.995, 59.999, 60.0, 75.5, 3725.25, -1.0, 3, "x"]
STARTED = [None, STAMP, ""]
EXITS = [None, 0, 1, -9, 255, 1.5, "e"]


def _odd_rows(seed: int, count: int) -> list[tuple[Any, ...]]:
    pick = random.Random(seed).choice
    return [
        (count - index, pick(NAMES), pick(TASKS), pick(STATES), pick(HOSTS), pick(NUMBERS),
         pick(NUMBERS), pick(STAMPS), pick(RUN_S), pick(STARTED), pick(EXITS))
        for index in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param([], id="empty"),
        pytest.param(_task_rows(3000), id="one-array"),
        pytest.param(_real_task_rows(3000), id="real-array"),
        pytest.param(_tiny_task_rows(3000), id="tiny-array"),
        pytest.param(_tiny_task_rows(3000, 10.015), id="tiny-array-10s"),
        pytest.param(_task_rows(40, "a%d[x]") + _task_rows(30, "b", 61.0), id="minutes"),
        pytest.param(
            [*_task_rows(50), (1, "plain", None, "succeeded", "beta", 2, 128, STAMP, 1.5, None, 0)],
            id="array-and-plain-job",
        ),
        pytest.param(
            [
                (*row[:8], zero, *row[9:])
                for row, zero in zip(_task_rows(2), (0.0, -0.0), strict=True)
            ],
            id="both-zeros",
        ),
        *(pytest.param(_odd_rows(seed, 400), id=f"odd-{seed}") for seed in range(6)),
    ],
)
def test_column_layout_is_the_row_by_row_layout(
    rows: list[tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW)  # a running job's time so far
    assert len(TABLE_COLUMNS) == 11  # the rows above are laid out in this order
    assert render(rows, JOB_HEADERS) == _row_by_row(rows) + "\n"


def _through_sqlite(rows: list[tuple[Any, ...]]) -> tuple[list[Any], list[Any]]:
    """These rows stored in a table with the jobs file's column types, read back as
    `table_rows` and as `keyed_table_rows` read them."""
    db = sqlite3.connect(":memory:")
    db.execute(
        """CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT, array_task INTEGER,
           state TEXT, host TEXT, cpus INTEGER, memory_mb INTEGER, submitted_at TEXT,
           run_s REAL, started_at TEXT, exit_code INTEGER)"""
    )
    db.executemany(f"INSERT INTO jobs VALUES ({', '.join('?' * 11)})", rows)
    plain = db.execute(f"SELECT {TABLE_SELECT} FROM jobs ORDER BY id DESC").fetchall()
    keyed = db.execute(
        f"SELECT id, array_task, run_s, {TABLE_KEY} FROM jobs ORDER BY id DESC"
    ).fetchall()
    return plain, keyed


@pytest.mark.parametrize(
    ("rows", "keyed"),
    [
        pytest.param(_task_rows(3000), True, id="one-array"),
        pytest.param(_real_task_rows(3000), True, id="real-array"),
        pytest.param(_tiny_task_rows(3000), True, id="tiny-array"),
        pytest.param(_tiny_task_rows(3000, 9.995), True, id="tiny-array-10s"),
        pytest.param(
            [
                *_task_rows(50),
                (99, "plain", None, "running", None, 2, 128, STAMP, None, STAMP, None),
            ],
            True,
            id="array-and-running-job",
        ),
        pytest.param(_task_rows(30, "m%", 75.0), True, id="minutes"),
        pytest.param([(*row[:5], 1.5, *row[6:]) for row in _task_rows(5)], False, id="real-cpus"),
        *(pytest.param(_odd_rows(seed, 300), False, id=f"odd-{seed}") for seed in range(4)),
    ],
)
def test_keyed_layout_is_the_row_by_row_layout(
    rows: list[tuple[Any, ...]], keyed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One JSON key per row for all but id, array_task and run_s (four columns read, not
    eleven): the same table, or None where JSON would not give a value back exactly."""
    monkeypatch.setattr(time, "time", lambda: NOW)
    plain, keyed_rows = _through_sqlite(rows)
    text = render_keyed(keyed_rows, JOB_HEADERS)
    assert (text is not None) is keyed or not keyed
    if text is not None:
        assert text == _row_by_row(plain) + "\n"


def test_column_layout_of_each_odd_value_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each odd value in a column of otherwise plain rows (the fast forms must notice it)."""
    monkeypatch.setattr(time, "time", lambda: NOW)
    base = _task_rows(5)
    pools: list[list[Any]] = [
        NAMES,
        TASKS,
        STATES,
        HOSTS,
        NUMBERS,
        NUMBERS,
        STAMPS,
        RUN_S,
        STARTED,
        EXITS,
    ]
    for column, pool in enumerate(pools, start=1):
        for value in pool:
            rows = [*base[:2], (*base[2][:column], value, *base[2][column + 1 :]), *base[3:]]
            assert render(rows, JOB_HEADERS) == _row_by_row(rows) + "\n", (column, value)


def test_jobs_lists_a_long_jobs_file_without_tabulate(tmp_path: Path) -> None:
    """`sshwasm jobs` past TABULATE_MOST_ROWS: the layout of the real command, from the jobs
    file; tabulate (whose imports cost more than the layout) is not imported, and the
    garbage collector paused for the listing is on again after it."""
    db = tmp_path / "jobs.sqlite"
    count = jobs_command.TABULATE_MOST_ROWS + 500
    with JobStore(db) as store:
        plain = store.submit(job_spec(name="first"))
        store.finish(plain, "succeeded", exit_code=0, run_s=75.5)  # type: ignore[arg-type]
        spec = JobSpec(**{**job_spec(name="sweep").__dict__, "array_size": count})
        ids = store.submit_tasks(spec)
        store.update_many(ids[::2], host="alpha", state="failed", exit_code=3, run_s=0.125)
        store.update_many(ids[1::2], host="beta", state="succeeded", exit_code=0, run_s=0.5)
        store.update(ids[-1], state="running", started_at=STAMP, run_s=None, exit_code=None)
        rows = store.table_rows()
    code = (
        "import sys\n"
        "from sshwasm.cli import main\n"
        f"status = main(['--db', {str(db)!r}, 'jobs'])\n"
        "sys.stdout.flush()\n"
        "import gc\n"
        "assert gc.isenabled(), 'the garbage collector was left off'\n"
        "sys.exit(status if 'tabulate' not in sys.modules else 99)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == count + 2  # the header, the tasks, the plain job
    assert lines[-1].split()[:3] == [str(plain), "first", "succeeded"]
    # The running task's time so far (from started_at) is shown; it moves, so compare apart.
    assert lines[1].split()[:3] == [str(ids[-1]), f"sweep[{count - 1}]", "running"]
    assert re.fullmatch(r"\d+m\d\d\.\ds", lines[1].split()[-1]), lines[1]
    expected = _row_by_row(rows).splitlines()
    assert lines[0] == expected[0] and lines[2:] == expected[2:]


def test_jobs_loses_the_queued_tasks_of_a_gone_coordinator_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An array interrupted before most tasks were placed: `jobs` marks its queued tasks
    lost in one transaction (a pair of transactions per task took minutes at 100,000),
    and leaves alone the ones another process took over meanwhile."""
    from sshwasm.recorded_jobs import UNPLACED_ERROR
    from sshwasm.states import JobState

    db = tmp_path / "jobs.sqlite"
    gone = 2**30  # above the kernel's pid_max: no such process
    with JobStore(db) as store:
        spec = JobSpec(**{**job_spec(name="cut").__dict__, "array_size": 300})
        ids = store.submit_tasks(spec)
        store.update_many(ids, coordinator_pid=gone, heartbeat_ts=0.0)
        store.finish(ids[0], JobState.SUCCEEDED, exit_code=0, run_s=0.5)
        stale = store.get(ids[1])
        store.update(ids[1], heartbeat_ts=1.0)  # taken over since `stale` was read
        store.lose_unplaced([stale], UNPLACED_ERROR)
        assert store.get(ids[1]).state is JobState.QUEUED
    assert main(["--db", str(db), "jobs", "--fold"]) == 0
    assert "299 lost, 1 succeeded" in capsys.readouterr().out
    with JobStore(db) as store:
        tasks = store.get_many(ids)
    assert tasks[0].state is JobState.SUCCEEDED
    for task in tasks[1:]:
        assert task.state is JobState.LOST and task.error == UNPLACED_ERROR, task.id
        assert task.finished_at is not None


def test_records_json_is_print_jsons_indented_json() -> None:
    """`jobs --json` made by the C encoder: the bytes of json.dumps(indent=2), for records
    whose strings hold what the indenting encoder's output holds (`},\n    {`, newlines,
    braces, quotes, non-ASCII), odd floats, and for no records or a nested value."""
    import json

    chance = random.Random(7)
    texts = ["},\n    {", '"}, {"', "a\nb", "日本", "\\", "}", "{", ",\n  ", "", "\x1b", "\u2028"]
    scalars: list[Any] = [*texts, None, True, False, 0, -5, 2**70, 0.1, 1e300, -0.0]
    scalars += [float("nan"), float("inf")]
    records = [{f"k{field}": chance.choice(scalars) for field in range(12)} for _ in range(300)]
    for case in ([], records[:1], records, [{"a": [1, {"b": 2}]}, {"a": 1}], [{}]):
        assert jobs_command.records_json(case) == json.dumps(case, indent=2)
