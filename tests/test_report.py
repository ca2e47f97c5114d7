"""`sshwasm report`: the efficiency figures, the advice, and the command's text and JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import PROGRAMS, no_traceback, sshwasm

from sshwasm.cli.report import parse_since
from sshwasm.report import MIB, group_efficiency, job_efficiency, suggested_memory_mb
from sshwasm.states import JobState
from sshwasm.store import Job, JobSpec, JobStore


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite")


def make_job(store: JobStore, **fields: Any) -> Job:
    """A job submitted to a real jobs file, then given `fields` (state, measures...)."""
    spec = JobSpec(
        name="j", cpus=fields.pop("cpus", 1), memory_mb=fields.pop("memory_mb", 256),
        time_limit_s=None, source="x.rs", language="rust", wasm_sha256="0" * 64,
        wasm_bytes=1, wasm_path="/nonexistent.wasm", compile_s=0.0, argv=("x",), env=(),
    )  # fmt: skip
    (job_id,) = store.submit_tasks(spec)
    return dataclasses.replace(store.get(job_id), **fields)


def finished(store: JobStore, run_s: float, cpu_s: float, peak: int, **fields: Any) -> Job:
    return make_job(
        store, state=JobState.SUCCEEDED, run_s=run_s, cpu_s=cpu_s, peak_memory_bytes=peak,
        host="alpha", exit_code=0, **fields,
    )  # fmt: skip


def test_one_job_figures_are_use_over_request(store: JobStore) -> None:
    job = finished(store, run_s=10.0, cpu_s=15.0, peak=64 * MIB, cpus=2, memory_mb=512)
    figures = job_efficiency(job)
    assert figures.cpu_efficiency == pytest.approx(15.0 / (10.0 * 2))
    assert figures.memory_efficiency == pytest.approx(64 / 512)
    assert (figures.run_s, figures.cpu_s, figures.peak_memory_bytes) == (10.0, 15.0, 64 * MIB)
    assert figures.note is None


def test_advice_names_the_request_far_above_use(store: JobStore) -> None:
    idle = finished(store, run_s=10.0, cpu_s=9.8, peak=10 * MIB, cpus=8, memory_mb=4096)
    advice = job_efficiency(idle).advice
    assert advice is not None
    assert "--cpus 1" in advice and "of 8 cpus" in advice
    assert f"--memory-mb {suggested_memory_mb(10 * MIB)}" in advice
    busy = finished(store, run_s=10.0, cpu_s=9.8, peak=200 * MIB, cpus=1, memory_mb=256)
    assert job_efficiency(busy).advice is None
    # Two of four cpus busy: asking for 2 would do.
    half = finished(store, run_s=10.0, cpu_s=15.0, peak=200 * MIB, cpus=8, memory_mb=256)
    assert "--cpus 2 " in (job_efficiency(half).advice or "")


def test_suggested_memory_keeps_a_margin_over_the_peak() -> None:
    assert suggested_memory_mb(1) == 16
    assert suggested_memory_mb(100 * MIB) == 160
    assert suggested_memory_mb(101 * MIB) * MIB >= 101 * MIB * 1.5


def test_unmeasured_jobs_never_divide_by_zero(store: JobStore) -> None:
    running = make_job(store, state=JobState.RUNNING, host="alpha", started_at="2026-01-01")
    figures = job_efficiency(running)
    assert figures.cpu_efficiency is None and figures.memory_efficiency is None
    assert figures.note == f"job {running.id} is still running: no measures yet"
    cancelled = make_job(store, state=JobState.CANCELLED)
    assert "without measures" in (job_efficiency(cancelled).note or "")
    instant = finished(store, run_s=0.0, cpu_s=0.0, peak=0)
    zero = job_efficiency(instant)
    assert zero.cpu_efficiency is None and zero.memory_efficiency == 0.0


def test_a_group_sums_its_measured_jobs(store: JobStore) -> None:
    jobs = [
        finished(store, run_s=4.0, cpu_s=4.0, peak=10 * MIB, cpus=1, memory_mb=100),
        finished(store, run_s=2.0, cpu_s=1.0, peak=50 * MIB, cpus=2, memory_mb=100),
        make_job(store, state=JobState.QUEUED),
        make_job(store, state=JobState.LOST),
    ]
    figures = group_efficiency(jobs)
    assert figures.run_s == 6.0 and figures.cpu_s == 5.0
    assert figures.cpu_efficiency == pytest.approx(5.0 / (4.0 * 1 + 2.0 * 2))
    assert figures.peak_memory_bytes == 50 * MIB
    assert figures.memory_efficiency == pytest.approx(0.5)
    assert (figures.jobs, figures.measured, figures.unfinished) == (4, 2, 1)
    assert figures.note == (
        "2 of 4 jobs measured; 1 still queued or running; 1 ended without measures"
    )
    empty = group_efficiency([])
    assert empty.jobs == 0 and empty.cpu_efficiency is None


def test_since_takes_durations_and_dates() -> None:
    assert parse_since("90m", now=10_000.0) == 10_000.0 - 5400
    assert parse_since("1d", now=100_000.0) == 100_000.0 - 86400
    assert parse_since("2026-11-30T08:00:00+00:00") == 1_796_025_600.0
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("yesterday")


# -- the command, on real jobs run on this machine ------------------------------------------


def test_report_of_an_array_in_text_and_json() -> None:
    run = sshwasm(
        "run", str(PROGRAMS / "report_task.rs"), "--array", "5", "--cpus", "2",
        "--memory-mb", "512", "--env", "REPORT_SLEEP_MS=20", "--quiet", "--json", "--", "3",
    )  # fmt: skip
    assert run.returncode == 3, run.stderr
    records = {r["id"]: r for r in json.loads(run.stdout)}
    # Any task id names the whole array.
    report = sshwasm("report", "3", "--json")
    no_traceback(report)
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["array_id"] == 1 and data["states"] == {"succeeded": 3, "failed": 2}
    assert [row["id"] for row in data["per_job"]] == sorted(records)
    assert data["run_s"] == pytest.approx(sum(r["run_s"] for r in records.values()))
    reserved = sum(r["run_s"] * 2 for r in records.values())
    assert data["cpu_efficiency"] == pytest.approx(
        sum(r["cpu_s"] for r in records.values()) / reserved
    )
    peak = max(r["peak_memory_bytes"] for r in records.values())
    assert data["memory_efficiency"] == pytest.approx(peak / (512 * MIB))
    # Sleeping single-threaded guests on 2 cpus and 512 MB: both requests are far too big.
    assert "--cpus 1" in data["advice"] and "--memory-mb" in data["advice"]
    for row in data["per_job"]:
        record = records[row["id"]]
        assert row["state"] == record["state"] and row["host"] == record["host"]
        assert row["cpu_efficiency"] == pytest.approx(record["cpu_s"] / (record["run_s"] * 2))

    text = sshwasm("report", "1")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "TASK", "STATE", "HOST"]
    assert sum(1 for line in lines if " failed " in line) == 2
    assert "cpu efficiency: " in text.stdout and "advice: asked for far more" in text.stdout

    one = sshwasm("run", str(PROGRAMS / "tiny.rs"), "--quiet", "--json")
    job_id = json.loads(one.stdout)["id"]
    single = json.loads(sshwasm("report", str(job_id), "--json").stdout)
    assert single["id"] == job_id and single["state"] == "succeeded"
    assert single["cpu_efficiency"] is not None and "per_job" not in single
    last = json.loads(sshwasm("report", "--last", "2", "--json").stdout)
    assert [row["id"] for row in last["per_job"]] == [5, job_id]


@pytest.mark.parametrize(
    ("argv", "message", "code"),
    [
        (["report", "42"], "sshwasm: error: no job with id 42", 1),
        (["report", "1", "--last", "3"], "give a job ID or --last/--since, not both", 2),
        (["report", "--since", "soon"], "--since 'soon' is neither a duration", 2),
        (["report", "--html", "/nonexistent/dir/page.html"], "cannot write /nonexistent", 1),
        (["report", "--html", "."], "cannot write .", 1),
    ],
)
def test_report_failures_are_one_line(argv: list[str], message: str, code: int) -> None:
    result = sshwasm(*argv)
    no_traceback(result)
    assert result.returncode == code
    assert message in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert list(Path.cwd().glob(".*.html.*")) == []  # no temporary page left behind
