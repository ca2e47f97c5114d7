"""Every time limit, short or long, is held by the watchdog alone, the guest compiled without
epoch checks (issue 13: they cost a compute-bound guest 7-11% on every run): at the deadline
the watchdog writes the result and ends the job's process."""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

from helpers import RUNNER_VERSION, Guest, process_gone, run_frames, run_runner, wait_for

from sshwasm.runner.execute import job_limit


def launch(
    workdir: Path, job_id: str, guest: Guest, argv: list[str], limit: float | None
) -> dict[str, object]:
    spec = {
        "runner_version": RUNNER_VERSION,
        "wasm_sha256": guest.sha256,
        "argv": argv,
        "env": [],
        "memory_mb": 64,
        "time_limit_s": limit,
        "has_stdin": False,
    }
    outcome = run_frames("launch", str(workdir), job_id, stdin=json.dumps(spec).encode() + b"\n")
    assert outcome.returncode == 0, outcome.stderr
    result = outcome.result()
    pid = outcome.json_of(b"S")["pid"]
    assert isinstance(pid, int)
    wait_for(lambda: process_gone(pid), timeout=5)
    return result


def test_the_limit_a_job_is_held_to() -> None:
    assert job_limit({"time_limit_s": 0.5, "wall_limit_s": 86400}) == 0.5
    assert job_limit({"time_limit_s": None, "wall_limit_s": 86400}) == 86400
    assert job_limit({"time_limit_s": None}) is None


def test_a_short_limit_holds_without_epoch_checks(tmp_path: Path, guest: Guest) -> None:
    workdir = tmp_path / "wd"
    done = run_runner("put-module", str(workdir), guest.sha256, stdin=guest.data)
    assert done.returncode == 0, done.stderr
    assert launch(workdir, "1", guest, ["probe", "hello"], None)["state"] == "succeeded"
    for job_id, limit in (("2", 0.5), ("3", 1.5)):
        started = time.monotonic()
        result = launch(workdir, job_id, guest, ["probe", "spin"], limit)
        elapsed = time.monotonic() - started
        assert (result["state"], result["exit_code"]) == ("timeout", 124), result
        assert result["error"] == f"time limit of {limit:g} s exceeded (ended by the watchdog)"
        # In time: the limit counts from the launch, run_s from the guest's start.
        run_s = result["run_s"]
        assert isinstance(run_s, float) and 0 < run_s <= limit + 0.2, result
        assert limit <= elapsed < limit + 5
        # The machine code without epoch checks, precompiled by the first job, ran it.
        assert result["module_cached"] is True
    version = importlib.metadata.version("wasmtime")
    assert [path.name for path in (workdir / "cache").iterdir()] == [
        f"{guest.sha256}-{version}-noepoch.cwasm"
    ]
