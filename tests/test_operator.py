"""Operator commands against real loopback hosts: hosts, install, cancel, logs, wasm, dry-run."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import (
    EXAMPLES,
    PROGRAMS,
    RUNNER_VERSION,
    no_traceback,
    record_of,
    sshwasm,
    wait_for_state,
)
from sshd import SshKit, SshServer, loopback


def test_hosts_lists_capacity_and_what_is_held(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": {"cpus": 4, "memory_mb": 4096, "labels": ["fast"]}})
    started = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--cpus", "3",
        "--detach", "--", "30",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    wait_for_state(1, {"running"})
    rows = json.loads(sshwasm("--cluster", str(cluster), "hosts", "--json").stdout)
    assert rows == [
        {
            "name": "alpha", "address": loopback(2), "cpus": 4, "memory_mb": 4096,
            "cpus_free": 1, "memory_free_mb": 4096 - 256, "running": 1, "labels": ["fast"],
        }
    ]  # fmt: skip
    table = sshwasm("--cluster", str(cluster), "hosts").stdout
    assert "alpha" in table and "fast" in table
    assert sshwasm("cancel", "1").returncode == 0


def test_hosts_check_reports_each_host(
    make_cluster: Callable[..., Path], fresh_host: Callable[..., SshServer], ssh_hosts: Any
) -> None:
    down = fresh_host("delta", loopback(5))
    down.stop()
    cluster = make_cluster(
        {"alpha": (1024, 1 << 30), "delta": (1, 512)}, servers={**ssh_hosts, "delta": down}
    )
    result = sshwasm("--cluster", str(cluster), "hosts", "--check", "--json")
    assert result.returncode == 1  # one host is down
    alpha, delta = json.loads(result.stdout)
    assert alpha["reachable"] is True and alpha["error"] is None
    assert alpha["wasmtime_version"] and alpha["host_cpus"] >= 1
    assert any("promises 1024 cpus" in w for w in alpha["warnings"])
    assert delta["reachable"] is False and "connection refused" in delta["error"]
    human = sshwasm("--cluster", str(cluster), "hosts", "--check")
    assert "promises 1024 cpus" in human.stderr


def test_hosts_install_puts_the_runner_in_place(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    bin_dir = cluster.parent / "workers" / "alpha" / "bin"
    runner = bin_dir / RUNNER_VERSION / "sshwasm_exec" / "commands.py"
    assert not runner.exists()
    result = sshwasm("--cluster", str(cluster), "hosts", "install")
    assert result.returncode == 0, result.stderr
    assert "alpha: installed the runner" in result.stdout
    assert "wasmtime" in result.stdout and "importable" in result.stdout
    assert runner.exists() and (runner.stat().st_mode & 0o777) == 0o600
    assert (bin_dir / "current").read_text() == RUNNER_VERSION + "\n"
    check = json.loads(sshwasm("--cluster", str(cluster), "hosts", "--check", "--json").stdout)
    assert check[0]["warnings"] == []
    unknown = sshwasm("--cluster", str(cluster), "hosts", "install", "nope")
    assert unknown.returncode == 1 and "no host named nope" in unknown.stderr


def test_hosts_install_reports_a_python_that_cannot_work(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)}, defaults={"python": "/nonexistent/python3"})
    result = sshwasm("--cluster", str(cluster), "hosts", "install")
    no_traceback(result)
    assert result.returncode == 1
    assert result.stderr.startswith("sshwasm: error: host 'alpha'")


def test_cancel_a_running_and_a_queued_job(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (1, 1024)})
    sleep = str(PROGRAMS / "sleep.rs")
    running = subprocess.Popen(
        [sys.executable, "-m", "sshwasm", "--cluster", str(cluster), "run", sleep, "--", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert running.stdout is not None
    # `running` is recorded at placement, before the guest starts: wait for its first line.
    assert running.stdout.readline() == "start\n"
    queued = sshwasm("--cluster", str(cluster), "run", sleep, "--detach", "--", "60")
    assert queued.stdout.strip() == "2"
    wait_for_state(2, {"queued"})
    result = sshwasm("cancel", "1", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["job 1: cancelled", "job 2: cancelled"]
    out, _ = running.communicate(timeout=30)
    assert running.returncode == 130 and out == ""
    for job_id in (1, 2):
        assert record_of(sshwasm("status", str(job_id), "--json"))["state"] == "cancelled"
    rows = json.loads(sshwasm("--cluster", str(cluster), "hosts", "--json").stdout)
    assert rows[0]["cpus_free"] == 1  # capacity given back
    (job_dir,) = (cluster.parent / "workers" / "alpha" / "jobs").iterdir()
    assert not _pid_alive(int((job_dir / "pid").read_text()))


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_logs_follow_until_the_job_ends(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    started = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "trickle.rs"), "--detach", "--", "20",
        "50",
    )  # fmt: skip
    assert started.returncode == 0
    follow = sshwasm("logs", "1", "--follow", timeout=60)
    assert follow.stdout == "".join(f"line {i}\n" for i in range(1, 21))
    assert record_of(sshwasm("status", "1", "--json"))["state"] == "succeeded"
    assert sshwasm("logs", "1", "--stderr").stdout == ""


def test_wasm_returns_the_exact_module(make_cluster: Callable[..., Path], tmp_path: Path) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    sshwasm("--cluster", str(cluster), "run", str(EXAMPLES / "fail.rs"))
    target = tmp_path / "job1.wasm"
    result = sshwasm("wasm", "1", "-o", str(target))
    assert result.returncode == 0, result.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert hashlib.sha256(target.read_bytes()).hexdigest() == record["wasm_sha256"]
    again = sshwasm("--cluster", str(cluster), "run", str(target), "--json")
    assert record_of(again)["wasm_sha256"] == record["wasm_sha256"]
    assert again.returncode == 3


def test_dry_run_explains_every_host(
    make_cluster: Callable[..., Path], fresh_host: Callable[..., SshServer], ssh_hosts: Any
) -> None:
    down = fresh_host("delta", loopback(5))
    down.stop()
    cluster = make_cluster(
        {
            "alpha": {"cpus": 8, "memory_mb": 8192, "labels": ["fast"]},
            "beta": {"cpus": 2, "memory_mb": 2048, "labels": ["fast"]},
            "gamma": {"cpus": 1, "memory_mb": 1024},
            "delta": {"cpus": 2, "memory_mb": 2048, "labels": ["fast"]},
        },
        servers={**ssh_hosts, "delta": down},
    )
    result = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"), "--dry-run",
        "--cpus", "2", "--label", "fast",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert "chosen" in lines["beta"]
    assert "fits, but" in lines["alpha"]
    assert "lacks label(s) fast" in lines["gamma"]
    assert "unreachable" in lines["delta"]
    assert result.stdout.rstrip().endswith("would run on beta")
    assert json.loads(sshwasm("jobs", "--json").stdout) == []  # nothing was submitted
    none = sshwasm("--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"), "--label", "gpu")
    assert none.returncode == 1 and "carry the label(s) gpu" in none.stderr


def test_label_restricts_placement(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster(
        {"alpha": {"cpus": 8, "memory_mb": 8192, "labels": ["big"]}, "beta": (2, 2048)}
    )
    result = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"), "--label", "big",
        "--json", "--env", "HELLO_SLEEP_S=0",
    )  # fmt: skip
    assert record_of(result)["host"] == "alpha"


def test_ssh_config_alias_works_as_for_ssh(
    ssh_kit: SshKit, ssh_hosts: dict[str, SshServer], tmp_path: Path, isolated_home: Path
) -> None:
    alpha = ssh_hosts["alpha"]
    (isolated_home / ".ssh" / "config").write_text(
        f"Host worker-one\n  HostName {alpha.address}\n  Port {alpha.port}\n"
        f"  User {ssh_kit.user}\n  IdentityFile {ssh_kit.client_key}\n"
        f"  UserKnownHostsFile {ssh_kit.known_hosts}\n"
    )
    cluster = tmp_path / "alias.yaml"
    cluster.write_text(
        "hosts:\n  - name: one\n    address: worker-one\n    cpus: 2\n    memory_mb: 1024\n"
        f"    workdir: {tmp_path / 'workers' / 'one'}\n    python: {sys.executable}\n"
    )
    result = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "hello.rs"), "--env", "HELLO_SLEEP_S=0"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "job done, hello!\n"


def test_status_of_unknown_job() -> None:
    result = sshwasm("status", "99")
    assert result.returncode == 1 and result.stderr == "sshwasm: error: no job with id 99\n"


def _run_with_terminal_stderr(*args: str) -> tuple[int, str, str]:
    """Run sshwasm with stderr on a pseudo-terminal, as a person at a shell would."""
    import os
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "sshwasm", *args],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    out, _ = process.communicate(timeout=120)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.returncode, out, b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_and_quiet(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    hello = str(EXAMPLES / "hello.rs")
    code, out, err = _run_with_terminal_stderr(
        "--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0"
    )
    assert code == 0 and out == "job done, hello!\n"
    assert "installing the runner on alpha" in err
    assert "uploading the module to alpha" in err and "running on alpha" in err
    code, out, err = _run_with_terminal_stderr(
        "--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0", "--quiet"
    )
    assert code == 0 and out == "job done, hello!\n" and err == ""
    piped = sshwasm("--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0")
    assert piped.stderr == ""  # not a terminal: no progress
