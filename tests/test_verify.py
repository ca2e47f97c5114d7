"""`run --verify`: one job on two hosts at once, succeeded only when both agree (issue 11)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PROGRAMS, no_traceback, record_of, sshwasm

from sshwasm.cli import main

STAGE = str(PROGRAMS / "stage.rs")
RANDOM = str(PROGRAMS / "random.rs")


def test_verify_agrees_on_a_deterministic_job_and_fails_a_random_one(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = str(make_cluster({"alpha": (2, 2048), "beta": (2, 2048), "gamma": (1, 64)}))
    out = tmp_path / "out"
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "a.txt").write_text("alpha\n")

    result = sshwasm(
        "--cluster", cluster, "run", STAGE, "--verify", "--input", str(staged),
        "--output", str(out), "--memory-mb", "512",
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("a.txt 6\n")  # the job's output, shown once
    # Only the job's own /output reaches DIR: the twin's stays private.
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]
    listed = json.loads(sshwasm("jobs", "--json").stdout)
    assert [job["id"] for job in listed] == [1]  # the twin is an internal row
    for flags in ((), ("--fold",)):  # the table and --fold read rows, not records
        ids = [line.split()[0] for line in sshwasm("jobs", *flags).stdout.splitlines()[1:]]
        assert ids == ["1"], flags
    record = listed[0]
    assert record["state"] == "succeeded" and record["verify"] is True
    status = sshwasm("status", "1").stdout
    other = "beta" if record["host"] == "alpha" else "alpha"
    assert record["host"] in ("alpha", "beta")  # gamma is too small for 512 MB
    assert f"verify_twin: job 2 on {other} (succeeded)" in status
    twin = record_of(sshwasm("status", "2", "--json"))
    assert twin["rerun_of"] == 1 and twin["stdout"] == record["stdout"]

    # random_get differs between the two runs: failed, naming the difference.
    result = sshwasm("--cluster", cluster, "run", RANDOM, "--verify", "--memory-mb", "512",
                     "--", "random")  # fmt: skip
    no_traceback(result)
    assert result.returncode == 1
    noisy = record_of(sshwasm("status", "3", "--json"))
    assert noisy["state"] == "failed"
    assert noisy["error"].startswith("--verify: the runs on ")
    assert "disagree: stdout differs: 51 bytes (job 3) vs 51 bytes (job 4)" in noisy["error"]
    assert result.stderr.endswith(f"sshwasm: error: job 3 failed: {noisy['error']}\n")


def test_verify_needs_two_hosts_and_one_job(capsys: pytest.CaptureFixture[str]) -> None:
    # The embedded default cluster is this machine alone.
    assert main(["run", RANDOM, "--verify"]) == 1
    assert capsys.readouterr().err == (
        "sshwasm: error: --verify runs the job on two different hosts; only one could take "
        "it: local\n"
    )
    assert main(["run", RANDOM, "--verify", "--array", "2"]) == 1
    assert "not with --array or --host" in capsys.readouterr().err
