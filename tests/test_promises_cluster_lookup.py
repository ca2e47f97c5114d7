"""README promises about where sshwasm finds its files: the cluster file's lookup order
(`--cluster`, `$SSHWASM_CLUSTER`, `./cluster.yaml`, the config dir's, else the embedded
`local` host) and the jobs file's (`--db`, else `$SSHWASM_DB`, else the data dir).

Each step runs a real job through the real runner on a real sshd host, so "found" means
"the job went to that file's host", not only that a path was computed.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import PROGRAMS, record_of, sshwasm

TINY = str(PROGRAMS / "tiny.rs")


def _host_of_a_run(*global_options: str) -> str:
    """Run tiny.rs with these global options; the host the job ran on."""
    result = sshwasm(*global_options, "run", TINY, "--json")
    assert result.returncode == 0, result.stderr
    record = record_of(result)
    assert record["state"] == "succeeded" and record["stdout"] == "tiny -\n", record
    host: str = record["host"]
    return host


def _private(path: Path) -> Path:
    """Mode 0600: an implicitly found cluster file is used only when others cannot write it."""
    path.chmod(0o600)
    return path


@pytest.mark.slow
def test_cluster_file_is_looked_up_in_the_promised_order(
    make_cluster: Callable[..., Path],
    ssh_hosts: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--cluster, else $SSHWASM_CLUSTER, else ./cluster.yaml, else the config dir's, else
    the embedded one-host cluster `local`; each candidate names another host."""
    named = _private(make_cluster({"alpha": (2, 1024)}, path=tmp_path / "named.yaml"))
    from_env = _private(make_cluster({"beta": (2, 1024)}, path=tmp_path / "env.yaml"))
    here = _private(make_cluster({"gamma": (2, 1024)}, path=tmp_path / "cluster.yaml"))
    config_dir = tmp_path / "config"  # $SSHWASM_CONFIG_DIR (see conftest.isolated_home)
    config_dir.mkdir()
    in_config = config_dir / "cluster.yaml"
    in_config.write_text(
        "hosts:\n  - {name: configured, address: local, cpus: 2, memory_mb: 1024}\n"
    )
    _private(in_config)
    monkeypatch.setenv("SSHWASM_CLUSTER", str(from_env))

    # Every candidate present: the command line wins, over the environment too.
    assert _host_of_a_run("--cluster", str(named)) == "alpha"
    assert _host_of_a_run() == "beta"
    monkeypatch.delenv("SSHWASM_CLUSTER")
    assert _host_of_a_run() == "gamma"  # ./cluster.yaml, from the working directory
    here.unlink()
    assert _host_of_a_run() == "configured"
    in_config.unlink()
    assert _host_of_a_run() == "local"  # the embedded default: this machine, no SSH


def test_jobs_file_is_taken_from_sshwasm_db_unless_db_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$SSHWASM_DB moves the jobs file (and the job output beside it); --db overrides it."""
    chosen = tmp_path / "elsewhere" / "mine.sqlite"
    monkeypatch.setenv("SSHWASM_DB", str(chosen))
    default = tmp_path / "data" / "jobs.sqlite"  # $SSHWASM_DATA_DIR/jobs.sqlite

    run = sshwasm("run", TINY, "--json")
    assert run.returncode == 0, run.stderr
    assert record_of(run)["id"] == 1
    assert chosen.is_file() and stat.S_IMODE(chosen.stat().st_mode) == 0o600
    assert (tmp_path / "elsewhere" / "mine-output" / "1" / "stdout").read_text() == "tiny -\n"
    assert not default.exists()
    # Every command reads the same file: `jobs` and `logs` see the job.
    listed = json.loads(sshwasm("jobs", "--json").stdout)
    assert [job["id"] for job in listed] == [1]
    assert sshwasm("logs", "1").stdout == "tiny -\n"

    # --db wins over the environment.
    other = tmp_path / "other.sqlite"
    assert json.loads(sshwasm("--db", str(other), "jobs", "--json").stdout) == []
    assert other.is_file()

    # Without the variable, the data dir's jobs file is used, and it has no job 1.
    monkeypatch.delenv("SSHWASM_DB")
    missing = sshwasm("status", "1")
    assert missing.returncode == 1, missing.stdout
    assert default.is_file()
