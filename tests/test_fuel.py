"""`--fuel N`: a budget of wasmtime fuel that means the same on every host (issue 11)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PROGRAMS, no_traceback, record_of, sshwasm

from sshwasm.cli import main
from sshwasm.runner.protocol import MAX_FUEL, encode_launch_spec, validate_spec

NBODY = str(PROGRAMS / "nbody.rs")
TASK = str(PROGRAMS / "task.rs")
PLENTY = str(10**12)


def _spec(**fields: object) -> dict[str, object]:
    line = encode_launch_spec(
        wasm_sha256="0" * 64, argv=["x"], env=[], memory_mb=16, time_limit_s=None
    ).split(b"\n", 1)[0]
    return {**json.loads(line), **fields}


def test_the_spec_carries_a_fuel_budget_within_wasmtimes_range() -> None:
    assert validate_spec(_spec())["fuel"] is None
    assert validate_spec(_spec(fuel=5))["fuel"] == 5
    assert validate_spec(_spec(fuel=MAX_FUEL))["fuel"] == MAX_FUEL
    for bad in (0, -1, MAX_FUEL + 1, 1.5, True, "9"):
        with pytest.raises(ValueError, match="fuel"):
            validate_spec(_spec(fuel=bad))


def test_fuel_flag_refuses_what_is_no_budget(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "-3", "lots", str(MAX_FUEL + 1)):
        assert main(["run", NBODY, "--fuel", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sshwasm: error: argument --fuel"), err


@pytest.mark.slow
def test_fuel_used_is_the_same_on_every_host_and_run_and_out_of_fuel_is_a_timeout(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = str(make_cluster({"alpha": (1, 2048), "beta": (1, 2048)}))

    def run(*args: str) -> dict[str, object]:
        result = sshwasm("--cluster", cluster, "run", "--json", *args)
        no_traceback(result)
        return record_of(result)

    first = run(NBODY, "--host", "alpha", "--fuel", PLENTY, "--", "3000")
    other_host = run(NBODY, "--host", "beta", "--fuel", PLENTY, "--", "3000")
    again = run(NBODY, "--host", "alpha", "--fuel", PLENTY, "--", "3000")
    assert [first["host"], other_host["host"], again["host"]] == ["alpha", "beta", "alpha"]
    for record in (first, other_host, again):
        assert record["state"] == "succeeded" and record["fuel"] == 10**12
        assert record["stdout"] == first["stdout"]
    used = first["fuel_used"]
    assert isinstance(used, int) and used > 100_000
    assert other_host["fuel_used"] == used and again["fuel_used"] == used
    # A budget too small ends the job as a timeout that says it was fuel (not the clock).
    budget = used // 2
    result = sshwasm("--cluster", cluster, "run", NBODY, "--fuel", str(budget), "--", "3000")
    no_traceback(result)
    assert result.returncode == 124
    assert f"fuel ran out (budget {budget} units)" in result.stderr
    starved = record_of(sshwasm("status", "4", "--json"))
    assert starved["state"] == "timeout" and starved["exit_code"] == 124
    assert starved["fuel_used"] == budget

    # An array (one serve session per host) sums its tasks' fuel in report and status.
    result = sshwasm(
        "--cluster", cluster, "run", TASK, "--array", "2", "--fuel", PLENTY, "--json"
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    tasks = json.loads(result.stdout)
    assert {task["host"] for task in tasks} == {"alpha", "beta"}
    fuels = [task["fuel_used"] for task in tasks]
    assert all(isinstance(fuel, int) and fuel > 0 for fuel in fuels)
    total = sum(fuels)
    report = json.loads(sshwasm("report", str(tasks[0]["id"]), "--json").stdout)
    assert report["fuel_used"] == total
    assert f"fuel used: {total:,}" in sshwasm("report", str(tasks[0]["id"])).stdout
    status = sshwasm("status", str(tasks[1]["id"])).stdout
    assert f"array_fuel_used: {total} (2 tasks)" in status
