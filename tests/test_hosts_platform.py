"""`hosts --check` shows each worker's OS and CPU architecture; older runners still parse."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import run_runner, sshwasm
from sshd import SshServer, loopback

from sshwasm.runner.protocol import ProtocolError, parse_info

MACHINE = os.uname()


def test_hosts_check_shows_os_and_architecture(
    make_cluster: Callable[..., Path], fresh_host: Callable[..., SshServer], ssh_hosts: Any
) -> None:
    down = fresh_host("delta", loopback(5))
    down.stop()
    cluster = make_cluster(
        {"alpha": (1, 512), "delta": (1, 512)}, servers={**ssh_hosts, "delta": down}
    )
    result = sshwasm("--cluster", str(cluster), "hosts", "--check", "--json")
    assert result.returncode == 1, result.stderr  # delta is down
    alpha, delta = json.loads(result.stdout)
    assert (alpha["os"], alpha["arch"]) == (MACHINE.sysname, MACHINE.machine)
    assert (delta["os"], delta["arch"]) == (None, None)  # unknown, not made up

    header, *rows = sshwasm("--cluster", str(cluster), "hosts", "--check").stdout.splitlines()
    alpha_row = next(row for row in rows if row.startswith("alpha"))

    def column(name: str) -> str:
        """alpha's value in column `name` (the table's columns are aligned, some empty)."""
        start = header.index(f" {name} ") + 1
        return alpha_row[start:].split()[0]

    assert column("os") == MACHINE.sysname
    assert column("arch") == MACHINE.machine


def test_the_runner_info_names_os_and_architecture() -> None:
    info = parse_info(run_runner("info").stdout)
    assert (info["os"], info["arch"]) == (MACHINE.sysname, MACHINE.machine)


def test_an_older_runners_info_without_them_still_parses() -> None:
    older = {
        "runner_version": "0123456789abcdef", "python": "3.9.2", "wasmtime_version": "20.0.0",
        "wasmtime_error": None, "cpus": 4, "memory_mb": 2048,
    }  # fmt: skip
    info = parse_info(json.dumps(older).encode())
    assert info["os"] is None and info["arch"] is None
    assert info["cpus"] == 4


@pytest.mark.parametrize("bad", [{"os": 7}, {"arch": ["x86_64"]}, {"arch": "x" * 300}])
def test_a_garbled_os_or_architecture_is_refused(bad: dict[str, Any]) -> None:
    answer = {"runner_version": "0123456789abcdef", "python": "3.9.2", **bad}
    with pytest.raises(ProtocolError, match="invalid"):
        parse_info(json.dumps(answer).encode())
