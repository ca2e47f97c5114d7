"""Long time limits are held by the watchdog alone, the guest compiled without epoch checks
(issue 13: they cost a compute-bound guest 10-20%); short ones keep the epoch interrupt."""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

from helpers import RUNNER_VERSION, Guest, process_gone, run_frames, run_runner, wait_for

from sshwasm.runner.execute import SIGNAL_ONLY_LIMIT_S, epoch_checks


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


def test_which_limits_get_epoch_checks() -> None:
    assert epoch_checks({"time_limit_s": 0.5}) and epoch_checks({"time_limit_s": 9.99})
    assert not epoch_checks({"time_limit_s": SIGNAL_ONLY_LIMIT_S})
    assert not epoch_checks({"time_limit_s": 3600}) and not epoch_checks({"time_limit_s": None})


def test_a_long_limit_holds_without_epoch_checks(tmp_path: Path, guest: Guest) -> None:
    workdir = tmp_path / "wd"
    done = run_runner("put-module", str(workdir), guest.sha256, stdin=guest.data)
    assert done.returncode == 0, done.stderr
    assert launch(workdir, "1", guest, ["probe", "hello"], None)["state"] == "succeeded"
    started = time.monotonic()
    result = launch(workdir, "2", guest, ["probe", "spin"], SIGNAL_ONLY_LIMIT_S)
    elapsed = time.monotonic() - started
    assert (result["state"], result["exit_code"]) == ("timeout", 124), result
    assert "exceeded (ended by the watchdog)" in str(result["error"])
    assert SIGNAL_ONLY_LIMIT_S <= elapsed < SIGNAL_ONLY_LIMIT_S + 10
    # The machine code without epoch checks, precompiled by the first job, ran it.
    assert result["module_cached"] is True
    version = importlib.metadata.version("wasmtime")
    assert not (workdir / "cache" / f"{guest.sha256}-{version}-epoch.cwasm").exists()
