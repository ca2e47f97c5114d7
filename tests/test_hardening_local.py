"""Hardening of what sshwasm does on this machine (issue 8, items 4, 5, 6, 9, 10, 14, 15):
help text, paths typed relative to the working directory, host keys of hosts and jump hosts,
background tasks of the coordinator and the jobs file lock, the --array cap, private local
files, and the trust given to a cluster file found in the working directory."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    EXAMPLES,
    PROGRAMS,
    Guest,
    holds,
    job_spec,
    no_traceback,
    record_of,
    release,
    sshwasm,
)
from sshd import SshKit, SshServer

from sshwasm import cli
from sshwasm.store import JobStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sshwasm: error:")]


@pytest.fixture
def alpha_cluster(make_cluster: Callable[..., Path]) -> Path:
    return make_cluster({"alpha": (2, 2048)})


def wait_until(check: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def job_row(db: Path, job_id: int) -> dict[str, Any] | None:
    """A job's row read with a plain sqlite3 connection of the test's own."""
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as connection:
        connection.row_factory = sqlite3.Row
        try:
            row = connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        except sqlite3.OperationalError:  # not created yet
            return None
    return dict(row) if row is not None else None


# -- item 4: the hidden command stays hidden ---------------------------------------------


def test_help_does_not_list_the_internal_coordinate_command() -> None:
    for args in (["--help"], ["run", "--help"]):
        result = sshwasm(*args)
        assert result.returncode == 0, result.stderr
        assert "_coordinate" not in result.stdout and "SUPPRESS" not in result.stdout, result.stdout


# -- item 5: every path is taken from the working directory --------------------------------


@pytest.mark.slow
def test_cargo_project_given_as_a_relative_path(alpha_cluster: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(EXAMPLES / "cargo-hello", source / "proj")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, given in ((source, "proj"), (source, "./proj"), (elsewhere, "../src/proj")):
        result = sshwasm("--cluster", str(alpha_cluster), "run", given, cwd=cwd)
        no_traceback(result)
        assert result.returncode == 0, f"{given} from {cwd}: {result.stderr}"
        assert "hello" in result.stdout.lower(), result.stdout


@pytest.mark.slow
def test_every_flag_takes_paths_from_the_working_directory(
    alpha_cluster: Path, tmp_path: Path
) -> None:
    """--cluster, --db, SOURCE, --stdin, --input, --output and `wasm -o`, all relative, from
    a working directory that holds none of them."""
    shutil.copy(alpha_cluster, tmp_path / "mine.yaml")
    alpha_cluster.unlink()  # nothing found implicitly: only the relative --cluster works
    (tmp_path / "src").mkdir()
    shutil.copy(PROGRAMS / "stage.rs", tmp_path / "src" / "stage.rs")
    shutil.copy(EXAMPLES / "echo.rs", tmp_path / "src" / "echo.rs")
    (tmp_path / "in" / "data").mkdir(parents=True)
    (tmp_path / "in" / "data" / "a.txt").write_text("abc")
    (tmp_path / "in" / "numbers.txt").write_text("1 2\n3\n")
    work = tmp_path / "work"
    work.mkdir()
    common = ("--cluster", "../mine.yaml", "--db", "state/jobs.sqlite")

    echoed = sshwasm(
        *common, "run", "../src/echo.rs", "--stdin", "../in/numbers.txt", "--json", cwd=work
    )
    assert echoed.returncode == 0, echoed.stderr
    assert "sum: 6" in record_of(echoed)["stdout"]

    staged = sshwasm(
        *common,
        "run",
        "../src/stage.rs",
        "--input",
        "../in/data",
        "--output",
        "out",
        "--json",
        cwd=work,
    )
    assert staged.returncode == 0, staged.stderr
    staged_id = record_of(staged)["id"]
    assert "a.txt 3" in (work / "out" / "summary.txt").read_text()

    saved = sshwasm(*common, "wasm", str(staged_id), "-o", "copy.wasm", cwd=work)
    assert saved.returncode == 0, saved.stderr
    assert (work / "copy.wasm").is_file()
    rerun = sshwasm(*common, "run", "copy.wasm", "--output", "out2", cwd=work)
    assert rerun.returncode == 0, rerun.stderr
    assert (work / "out2" / "summary.txt").is_file()

    # Everything went to the jobs file named relative to `work`, output files beside it.
    assert (work / "state" / "jobs.sqlite").is_file()
    assert (work / "state" / "jobs-output" / str(staged_id) / "stdout").is_file()
    detached = sshwasm(
        *common, "run", "../src/echo.rs", "--stdin", "../in/numbers.txt", "--detach", cwd=work
    )
    assert detached.returncode == 0, detached.stderr
    job_id = int(detached.stdout.split()[0])
    db = work / "state" / "jobs.sqlite"
    row = wait_until(
        lambda: (r := job_row(db, job_id)) and r["state"] == "succeeded" and r,
        what="the detached job",
    )
    # Paths stored in the record are absolute: any process may read them from anywhere.
    assert Path(row["stdin_path"]).is_absolute() and Path(row["source"]).is_absolute()
    logs = sshwasm("--db", str(db), "logs", str(job_id), cwd=tmp_path / "in")
    assert "sum: 6" in logs.stdout, logs.stderr


# -- item 6: host keys always verified, jump hosts too -------------------------------------


def _cluster_without_known_hosts(make_cluster: Callable[..., Path], **spec: Any) -> Path:
    path: Path = make_cluster(spec or {"alpha": (2, 2048)})
    document = yaml.safe_load(path.read_text())
    del document["defaults"]["known_hosts"]
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_user_known_hosts_none_in_ssh_config_does_not_turn_checking_off(
    make_cluster: Callable[..., Path], isolated_home: Path, ssh_kit: SshKit
) -> None:
    (isolated_home / ".ssh" / "config").write_text("Host *\n    UserKnownHostsFile none\n")
    cluster = _cluster_without_known_hosts(make_cluster)
    hello = str(EXAMPLES / "hello.rs")

    missing = sshwasm("--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0")
    no_traceback(missing)
    assert missing.returncode == 1 and missing.stdout == ""
    (line,) = error_lines(missing.stderr)
    assert "known_hosts" in line and "does not exist" in line, missing.stderr

    # A ~/.ssh/known_hosts without the host's key: refused, not waved through.
    known = isolated_home / ".ssh" / "known_hosts"
    some_key = ssh_kit.known_hosts.read_text().splitlines()[0].split(" ", 1)[1]
    known.write_text(f"[127.0.0.9]:22 {some_key}\n")
    unknown = sshwasm("--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0")
    no_traceback(unknown)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert "not trusted" in unknown.stderr and str(known) in unknown.stderr

    shutil.copy(ssh_kit.known_hosts, known)
    trusted = sshwasm("--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0")
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout == "job done, hello!\n"


def _jump_config(home: Path, kit: SshKit, jump: SshServer, target: SshServer) -> None:
    """~/.ssh/config: `far` is reached through `jumpbox`, which asks for no key checking."""
    (home / ".ssh" / "config").write_text(
        f"Host jumpbox\n"
        f"    HostName {jump.address}\n"
        f"    Port {jump.port}\n"
        f"    User {kit.user}\n"
        f"    IdentityFile {kit.client_key}\n"
        f"    UserKnownHostsFile none\n"
        f"Host far\n"
        f"    HostName {target.address}\n"
        f"    Port {target.port}\n"
        f"    ProxyJump jumpbox\n"
    )


def test_proxy_jump_hosts_are_verified_with_the_same_known_hosts(
    make_cluster: Callable[..., Path],
    ssh_hosts: dict[str, SshServer],
    ssh_kit: SshKit,
    isolated_home: Path,
    tmp_path: Path,
) -> None:
    jump, target = ssh_hosts["alpha"], ssh_hosts["beta"]
    _jump_config(isolated_home, ssh_kit, jump, target)
    only_target = tmp_path / "known_target"
    only_target.write_text(target.known_hosts_line + "\n")
    both = tmp_path / "known_both"
    both.write_text(target.known_hosts_line + "\n" + jump.known_hosts_line + "\n")
    far = {
        "name": "far",
        "address": "far",
        "cpus": 2,
        "memory_mb": 2048,
        "workdir": str(tmp_path / "workers" / "far"),
    }
    hello = str(EXAMPLES / "hello.rs")

    cluster = make_cluster({}, extra_hosts=[far], defaults={"known_hosts": str(only_target)})
    refused = sshwasm("--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0")
    no_traceback(refused)
    assert refused.returncode == 1 and refused.stdout == ""
    (line,) = error_lines(refused.stderr)
    assert f"host key of jump host {jump.address} is not trusted" in line, line
    assert f"ssh-keyscan -p {jump.port} {jump.address} >> {only_target}" in line, line

    jump_log = len(jump.log_text())
    cluster = make_cluster({}, extra_hosts=[far], defaults={"known_hosts": str(both)})
    through = sshwasm("--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0")
    assert through.returncode == 0, through.stderr
    assert through.stdout == "job done, hello!\n"
    # It really went through the jump host.
    assert "Accepted publickey" in jump.log_text()[jump_log:]


def test_every_hop_of_a_proxy_jump_chain_is_verified(
    make_cluster: Callable[..., Path],
    ssh_hosts: dict[str, SshServer],
    ssh_kit: SshKit,
    isolated_home: Path,
    tmp_path: Path,
) -> None:
    first, second, target = ssh_hosts["alpha"], ssh_hosts["gamma"], ssh_hosts["beta"]
    (isolated_home / ".ssh" / "config").write_text(
        f"Host far\n"
        f"    HostName {target.address}\n"
        f"    Port {target.port}\n"
        f"    ProxyJump {ssh_kit.user}@{first.address}:{first.port},"
        f"{ssh_kit.user}@{second.address}:{second.port}\n"
        f"Host *\n"
        f"    IdentityFile {ssh_kit.client_key}\n"
        f"    UserKnownHostsFile none\n"
    )
    far = {"name": "far", "address": "far", "cpus": 2, "memory_mb": 2048,
           "workdir": str(tmp_path / "workers" / "far")}  # fmt: skip
    hello = str(EXAMPLES / "hello.rs")
    without_second = tmp_path / "known_some"
    without_second.write_text(f"{target.known_hosts_line}\n{first.known_hosts_line}\n")
    cluster = make_cluster({}, extra_hosts=[far], defaults={"known_hosts": str(without_second)})
    refused = sshwasm("--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0")
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"host key of jump host {second.address} is not trusted" in refused.stderr

    every = tmp_path / "known_every"
    every.write_text(without_second.read_text() + second.known_hosts_line + "\n")
    logs = {server.name: len(server.log_text()) for server in (first, second)}
    cluster = make_cluster({}, extra_hosts=[far], defaults={"known_hosts": str(every)})
    through = sshwasm("--cluster", str(cluster), "run", hello, "--env", "HELLO_SLEEP_S=0")
    assert through.returncode == 0, through.stderr
    assert through.stdout == "job done, hello!\n"
    for server in (first, second):
        assert "Accepted publickey" in server.log_text()[logs[server.name] :], server.name


# -- item 9: background tasks, the jobs file lock, one follower per job ----------------------


@pytest.mark.slow
def test_a_lock_held_by_another_process_is_waited_out_with_a_warning(
    alpha_cluster: Path, tmp_path: Path, guest: Guest
) -> None:
    db = tmp_path / "data" / "jobs.sqlite"
    # Held guests (helpers.held_spec): both tasks run until the test releases them, so the
    # coordinator is surely still at work, and must write, while the lock is held.
    module = tmp_path / "probe.wasm"
    module.write_bytes(guest.data)
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "held").write_bytes(b"")
    run = subprocess.Popen(
        [
            sys.executable, "-m", "sshwasm", "--cluster", str(alpha_cluster), "run",
            str(module), "--array", "2", "--input", str(staged), "--", "held",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert run.stderr is not None and run.stdout is not None
    errors: list[str] = []

    def read_errors() -> None:
        assert run.stderr is not None
        for line in run.stderr:
            errors.append(line)

    reader = threading.Thread(target=read_errors, daemon=True)
    reader.start()
    warning = f"sshwasm: warning: jobs file {db} is locked by another process"
    try:
        wait_until(
            lambda: all((r := job_row(db, i)) and r["state"] == "running" for i in (1, 2)),
            what="both tasks running",
        )
        holder = sqlite3.connect(db, timeout=30, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            # Held until the coordinator has tried to write (a heartbeat) and said so.
            wait_until(lambda: warning in "".join(errors), what="the lock warning")
        finally:
            holder.execute("COMMIT")
            holder.close()
        # "running" is recorded before the launch: the tasks may reach the host only now.
        jobs = tmp_path / "workers" / "alpha" / "jobs"

        def both_started() -> list[Path]:
            started = [d for d in jobs.glob("*") if holds(d / "stdout", b"start\n")]
            return started if len(started) == 2 else []

        started = wait_until(both_started, what="both tasks started on the host")
        for job_dir in started:
            release(job_dir)
        out = run.stdout.read()
        run.wait(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    reader.join(timeout=30)
    err = "".join(errors)
    assert run.returncode == 0, err
    assert out == "start\nend\n" * 2
    assert warning in err, err
    assert "Traceback" not in err


def _fail_on_cue(*_: Any, **__: Any) -> Any:
    raise sqlite3.OperationalError("disk I/O error")


def test_a_failing_placer_fails_the_run_with_one_line_instead_of_hanging(
    alpha_cluster: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Compiled first, so that the fault hits only the coordinator.
    warm = sshwasm("--cluster", str(alpha_cluster), "run", str(PROGRAMS / "task.rs"))
    assert warm.returncode == 0, warm.stderr
    monkeypatch.setattr(JobStore, "place_waiting", _fail_on_cue)
    outcome: list[int] = []
    argv = ["--cluster", str(alpha_cluster), "run", str(PROGRAMS / "task.rs"), "--array", "2"]
    runner = threading.Thread(target=lambda: outcome.append(cli.main(argv)), daemon=True)
    runner.start()
    runner.join(60)
    assert outcome, "the run hung after its placer failed"
    err = capsys.readouterr().err
    assert outcome == [1]
    (line,) = error_lines(err)
    assert "placer failed" in line and "disk I/O error" in line and "jobs file" in line, line
    assert "Traceback" not in err


def test_a_failing_heartbeat_fails_the_run(
    alpha_cluster: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(JobStore, "heartbeat_many", _fail_on_cue)
    argv = ["--cluster", str(alpha_cluster), "run", str(PROGRAMS / "sleep.rs"), "--", "8"]
    outcome = cli.main(argv)  # the heartbeat comes 3 s in; the job would take 8
    err = capsys.readouterr().err
    assert outcome == 1, err
    (line,) = error_lines(err)
    assert "heartbeat failed" in line and "sshwasm status ID" in line, line


@pytest.mark.slow
def test_a_live_coordinator_with_a_stale_heartbeat_is_never_taken_over(
    alpha_cluster: Path, tmp_path: Path
) -> None:
    db = tmp_path / "data" / "jobs.sqlite"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sshwasm",
            "--cluster",
            str(alpha_cluster),
            "run",
            str(PROGRAMS / "trickle.rs"),
            "--",
            "40",
            "100",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        local_copy = tmp_path / "data" / "jobs-output" / "1" / "stdout"
        wait_until(
            lambda: local_copy.exists() and local_copy.stat().st_size > 0,
            what="output arriving",
        )
        for command in (("status", "1"), ("logs", "1"), ("jobs",)):
            # Stale as after a long stop, written into the real jobs file just before.
            with contextlib.closing(sqlite3.connect(db, timeout=30)) as connection, connection:
                connection.execute("UPDATE jobs SET heartbeat_ts = 1000 WHERE id = 1")
            other = sshwasm("--cluster", str(alpha_cluster), *command)
            assert other.returncode == 0, other.stderr
            row = job_row(db, 1)
            assert row is not None and row["coordinator_pid"] == run.pid, command
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    expected = b"".join(b"line %d\n" % i for i in range(1, 41))
    assert run.returncode == 0, err
    assert out == expected
    assert local_copy.read_bytes() == expected


# -- item 10: --array has a cap --------------------------------------------------------------


def test_array_over_the_cap_is_a_usage_error(tmp_path: Path) -> None:
    result = sshwasm("run", str(tmp_path / "missing.rs"), "--array", "100001")
    no_traceback(result)
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "--array" in line and "at most 100000" in line, line
    assert not (tmp_path / "data" / "jobs.sqlite").exists()


def test_the_largest_array_is_submitted_in_one_go(tmp_path: Path) -> None:
    spec = dataclasses.replace(job_spec(name="big"), array_size=cli.MAX_ARRAY_TASKS)
    single = dataclasses.replace(spec, array_size=None)
    with JobStore(tmp_path / "jobs.sqlite") as store:
        before = store.submit(single)
        ids = store.submit_tasks(spec)
        after = store.submit(single)
        assert ids == list(range(before + 1, before + 1 + cli.MAX_ARRAY_TASKS))
        assert after == ids[-1] + 1
        last = store.get(ids[-1])
        assert last.array_id == ids[0] and last.array_task == cli.MAX_ARRAY_TASKS - 1
        assert last.env_pairs == [
            ("K", "v"),
            ("SSHWASM_ARRAY_TASK_ID", str(cli.MAX_ARRAY_TASKS - 1)),
            ("SSHWASM_ARRAY_TASK_COUNT", str(cli.MAX_ARRAY_TASKS)),
        ]
        assert last.remote_key.startswith(f"{ids[-1]}-")
        assert store.get(before).array_id is None


# -- item 14: local files are private ----------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_jobs_file_outputs_and_logs_are_private(
    umask_022: None, tmp_path: Path, alpha_cluster: Path
) -> None:
    data = tmp_path / "data"
    stdin = tmp_path / "numbers.txt"
    stdin.write_text("1 2\n")
    result = sshwasm(
        "--cluster",
        str(alpha_cluster),
        "run",
        str(EXAMPLES / "echo.rs"),
        "--stdin",
        str(stdin),
        "--env",
        "TOKEN=secret",
        "--output",
        str(tmp_path / "mine"),
    )
    assert result.returncode == 0, result.stderr
    detached = sshwasm(
        "--cluster", str(alpha_cluster), "run", str(EXAMPLES / "echo.rs"), "--detach"
    )
    assert detached.returncode == 0, detached.stderr
    job_id = int(detached.stdout)
    wait_until(
        lambda: (r := job_row(data / "jobs.sqlite", job_id)) and r["state"] == "succeeded",
        what="the detached job",
    )
    saved = sshwasm("wasm", "1", "-o", str(tmp_path / "copy.wasm"))
    assert saved.returncode == 0, saved.stderr

    assert mode(data) == 0o700
    # SQLite removes -wal and -shm when the last connection closes: hold one open.
    with JobStore(data / "jobs.sqlite") as store:
        assert store.get(1).env_pairs == [("TOKEN", "secret")]
        for name in ("jobs.sqlite", "jobs.sqlite-wal", "jobs.sqlite-shm"):
            assert mode(data / name) == 0o600, name
    assert mode(data / "jobs-output") == 0o700
    for directory in (data / "jobs-output" / "1", data / "jobs-output" / str(job_id)):
        assert mode(directory) == 0o700
    for path in (data / "jobs-output" / "1").iterdir():
        assert mode(path) == 0o600, path.name
    assert {p.name for p in (data / "jobs-output" / "1").iterdir()} >= {"stdout", "stdin"}
    # A stream the job never wrote to gets no file (readers take none for empty).
    assert not (data / "jobs-output" / "1" / "stderr").exists()
    assert mode(data / "jobs-output" / str(job_id) / "coordinator.log") == 0o600
    # What the user asked for elsewhere keeps the modes the user's umask gives.
    assert mode(tmp_path / "copy.wasm") == 0o644
    assert mode(tmp_path / "mine") == 0o755


def test_a_jobs_file_elsewhere_is_private_and_old_files_are_tightened(
    umask_022: None, tmp_path: Path
) -> None:
    chosen = tmp_path / "chosen"
    chosen.mkdir(mode=0o755)
    db = chosen / "mine.sqlite"
    # As an older version left them: everything readable by others.
    JobStore(db).close()
    output = chosen / "mine-output" / "7"
    output.mkdir(parents=True)
    (output / "stdout").write_bytes(b"old")
    for path in (db, chosen / "mine-output", output, output / "stdout"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    data = tmp_path / "data"
    data.mkdir(mode=0o755)

    listed = sshwasm("--db", str(db), "jobs")
    assert listed.returncode == 0, listed.stderr
    assert mode(db) == 0o600
    assert mode(chosen / "mine-output") == 0o700
    assert mode(chosen) == 0o755  # the user's own directory is left as it is
    # The default data dir is sshwasm's own.
    default = sshwasm("jobs")
    assert default.returncode == 0, default.stderr
    assert mode(data) == 0o700 and mode(data / "jobs.sqlite") == 0o600


# -- item 15: an implicitly found cluster file must be trustworthy ---------------------------


def _evil_cluster(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "hosts:\n  - name: evil\n    address: local\n    cpus: 1\n    memory_mb: 64\n"
        "    python: /bin/false\n"
    )
    return path


def _host_names(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines()[1:]]


def test_a_cluster_file_others_could_write_is_ignored_with_a_warning(tmp_path: Path) -> None:
    here = _evil_cluster(tmp_path / "cluster.yaml")
    here.chmod(0o666)
    result = sshwasm("hosts")
    assert _host_names(result) == ["local"]
    assert (
        "sshwasm: warning: ignoring cluster file cluster.yaml: it is writable by group and others"
        in result.stderr
    ), result.stderr

    here.chmod(0o664)
    assert "it is writable by group (" in sshwasm("hosts").stderr

    # Owned by someone else (nobody) and not writable: still not ours.
    here.chmod(0o644)
    os.chown(here, 65534, 65534)
    owned = sshwasm("hosts")
    assert _host_names(owned) == ["local"]
    assert "owned by uid 65534, not by you or root" in owned.stderr

    # The next candidate is used instead, when it is trustworthy.
    config = tmp_path / "config" / "cluster.yaml"
    config.parent.mkdir()
    config.write_text(
        "hosts:\n  - name: mine\n    address: local\n    cpus: 1\n    memory_mb: 64\n"
    )
    fallback = sshwasm("hosts")
    assert _host_names(fallback) == ["mine"] and "ignoring cluster file" in fallback.stderr

    # Named explicitly, it is the user's choice: used, without a warning.
    for explicit in (("--cluster", "cluster.yaml"),):
        chosen = sshwasm(*explicit, "hosts")
        assert _host_names(chosen) == ["evil"] and "warning" not in chosen.stderr
    env = {**os.environ, "SSHWASM_CLUSTER": str(here)}
    from_env = subprocess.run(
        [sys.executable, "-m", "sshwasm", "hosts"], capture_output=True, text=True, env=env
    )
    assert _host_names(from_env) == ["evil"] and "warning" not in from_env.stderr


def test_a_config_dir_cluster_file_is_checked_too(tmp_path: Path) -> None:
    config = _evil_cluster(tmp_path / "config" / "cluster.yaml")
    config.chmod(0o646)
    result = sshwasm("hosts")
    assert _host_names(result) == ["local"]
    assert f"ignoring cluster file {config}: it is writable by others" in result.stderr
