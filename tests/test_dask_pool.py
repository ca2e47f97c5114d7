"""engine: dask (issue 12) on a real pool: `sshwasm pool up | status | down` on the loopback
sshd hosts with mutual TLS, and `run` (arrays of 1,000 tasks, --dir, --host-dir, --verify,
--reuse), `rerun`, `resume`, the API, `--detach`, a killed worker and `cancel` through it.

The module starts the pool once (its xdist group keeps every test on that worker) and runs
the command line in this process (`_run`) where a separate one proves nothing more: each
such process would import `distributed` again, seconds under load. What needs no pool is in
tests/test_dask.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dask_cli import DASK_TEST_CONFIG, run_in_process
from helpers import PROGRAMS, detached_coordinators, start_sshwasm, wait_for

from sshwasm.cluster import load_cluster
from sshwasm.errors import SshwasmError
from sshwasm.store import Job, JobStore

# The command line in this process (a separate one would import `distributed` again).
_run = run_in_process
# examples/hello.rs waits 5 s unless told otherwise: nothing here needs its wait.
QUICK_ENV = {"HELLO_SLEEP_S": "0"}
QUICK = ("--env", "HELLO_SLEEP_S=0")


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _pool_processes(root: Path) -> list[int]:
    """PIDs of live processes whose command line names a path under `root` (the workdirs)."""
    found = []
    marker = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _kill_worker_process(workdir: Path) -> None:
    """SIGKILL the Dask worker process under the host's nanny (the nanny starts a new one)."""
    nanny = int((workdir / "dask" / "worker.pid").read_text())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == nanny and b"spawn_main" in cmdline:
            os.kill(int(entry.name), 9)
            return
    raise AssertionError(f"no worker process under nanny {nanny}")


# Every test of this module that uses the pool runs on the one xdist worker that started it.
pytestmark = pytest.mark.xdist_group("dask-pool")


@dataclass
class Pool:
    """The module's pool: its cluster file, its root (hosts' workdirs under `workers/`, the
    certificates under `data/pools/`) and what its `pool up` printed."""

    cluster: Path
    root: Path
    up: subprocess.CompletedProcess[str]

    @property
    def workers(self) -> Path:
        return self.root / "workers"

    def job_dirs(self) -> set[Path]:
        """The job directories on every host (one per run of a task)."""
        return set(self.workers.glob("*/jobs/*"))


def _isolate(patch: pytest.MonkeyPatch, root: Path, cache: Path) -> None:
    """What `isolated_home` does for a test, for the module's pool commands."""
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    patch.setenv("HOME", str(home))
    for variable in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        patch.setenv(variable, str(home / variable.lower()))
    patch.setenv("XDG_RUNTIME_DIR", str(home / ".run"))
    patch.setenv("SSHWASM_DATA_DIR", str(root / "data"))
    patch.setenv("SSHWASM_CONFIG_DIR", str(root / "config"))
    patch.setenv("SSHWASM_CACHE_DIR", str(cache))
    patch.setenv("SSHWASM_CONNECTION_PERSIST_S", "0")
    patch.chdir(root)


@pytest.fixture(scope="module")
def dask_pool(
    tmp_path_factory: pytest.TempPathFactory,
    ssh_kit: Any,
    ssh_hosts: dict[str, Any],
    shared_cache_dir: Path,
) -> Iterator[Pool]:
    """A two-host `engine: dask` pool on the session hosts, started once for the module
    (`pool up` costs seconds of imports and handshakes per process). At the end `pool down`
    must stop it and leave no process under its workdirs, and say so per host."""
    from sshd import loopback, write_cluster

    root = tmp_path_factory.mktemp("dask-pool")
    path = write_cluster(
        root / "cluster.yaml",
        ssh_hosts,
        ssh_kit,
        {"alpha": {"cpus": 2, "memory_mb": 1024, "labels": ["fast"]}, "beta": (1, 512)},
        root / "workers",
    )
    port = _free_port(loopback(2))
    dashboard = _free_port("127.0.0.1")
    path.write_text(
        f"engine: dask\ndask:\n  scheduler: alpha\n  port: {port}\n"
        f"  dashboard_port: {dashboard}\n" + path.read_text()
    )
    for name in ("alpha", "beta"):  # read by the pool's processes there (DASK_CONFIG)
        config = root / "workers" / name / "dask" / "config"
        config.mkdir(mode=0o700, parents=True)
        (config / "sshwasm-test.yaml").write_text(DASK_TEST_CONFIG)
    with pytest.MonkeyPatch.context() as patch:
        _isolate(patch, root, shared_cache_dir)
        up = _run("--cluster", str(path), "pool", "up", timeout=180)
    pool = Pool(path, root, up)
    try:
        yield pool
    finally:
        with pytest.MonkeyPatch.context() as patch:
            _isolate(patch, root / "down", shared_cache_dir)
            (root / "down" / "data").mkdir(parents=True)
            (root / "down" / "data" / "pools").symlink_to(root / "data" / "pools")
            down = _run("--cluster", str(path), "pool", "down", timeout=120)
            leftovers = _pool_processes(pool.workers)
            for pid in leftovers:
                os.kill(pid, 9)
            gone = _run("--cluster", str(path), "pool", "status")
            again = _run("--cluster", str(path), "pool", "down", timeout=120)
        assert down.returncode == 0, down.stderr
        assert "alpha: worker stopped" in down.stdout and "alpha: scheduler stopped" in down.stdout
        assert "beta: worker stopped" in down.stdout
        assert not leftovers, f"processes left behind after pool down: {leftovers}"
        assert gone.returncode == 1 and gone.stderr.startswith("sshwasm: error: ")
        assert "is the pool up" in gone.stderr and "Traceback" not in gone.stderr
        assert again.returncode == 0 and "worker was not running" in again.stdout


@pytest.fixture(autouse=True)
def _api_collects_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API collects its detached pool jobs every REFRESH_EVERY_S (2 s, a connection to
    the scheduler each): more often here, where each test waits for a few of them."""
    import sshwasm.api

    monkeypatch.setattr(sshwasm.api, "REFRESH_EVERY_S", 0.5)


@pytest.fixture
def pool_cluster(dask_pool: Pool, tmp_path: Path) -> Path:
    """The module pool's cluster file, for a test with its own jobs file: the test's data
    directory shares the pool's certificates (the client's pair, signed by its CA)."""
    up = dask_pool.up
    assert up.returncode == 0, up.stderr  # else every test says why, not only the first
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "pools").symlink_to(dask_pool.root / "data" / "pools")
    return dask_pool.cluster


def test_pool_up_status_and_tls_refusal(
    dask_pool: Pool, pool_cluster: Path, built: dict[str, Any], tmp_path: Path
) -> None:
    up = dask_pool.up
    assert "alpha: scheduler started" in up.stdout
    assert "alpha: worker started" in up.stdout and "beta: worker started" in up.stdout
    assert "pool: 2 workers connected to tls://" in up.stdout
    assert "Traceback" not in up.stderr
    cluster = ["--cluster", str(pool_cluster)]

    # Idempotent: a second `up` starts nothing and says so per host.
    again = _run(*cluster, "pool", "up", timeout=180)
    assert again.returncode == 0, again.stderr
    assert "alpha: scheduler already running" in again.stdout
    assert "beta: worker already running" in again.stdout
    assert "started" not in again.stdout

    # The hosts' keys and certificates are private to the SSH user.
    for name in ("alpha", "beta"):
        for file in ("host.key", "host.pem", "ca.pem"):
            mode = (dask_pool.workers / name / "dask" / file).stat().st_mode
            assert stat.S_IMODE(mode) == 0o600, (name, file, oct(mode))

    status = _run(*cluster, "pool", "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["scheduler"].startswith("tls://") and report["tls"] is True
    workers = {w["name"]: w for w in report["workers"]}
    assert set(workers) == {"alpha", "beta"} and report["workers_missing"] == []
    assert workers["alpha"]["nthreads"] == 2
    assert workers["alpha"]["resources"] == {"cpus": 2, "memory_mb": 1024, "label-fast": 1}
    assert workers["beta"]["resources"] == {"cpus": 1, "memory_mb": 512}
    table = _run(*cluster, "pool", "status")
    assert table.returncode == 0 and "dashboard: http://127.0.0.1:" in table.stdout

    # Mutual TLS: a client whose certificate is from another CA is refused, and so is one
    # that speaks plain TCP to the TLS port.
    from sshwasm.pool import connect, plan_for, security_for
    from sshwasm.tls import ensure_certificates

    plan = plan_for(load_cluster(pool_cluster))
    foreign = ensure_certificates(str(tmp_path / "someone-elses-cluster.yaml"))
    with pytest.raises(SshwasmError, match="runs with another certificate authority"):
        connect(plan, timeout=1, security=security_for(plan, foreign)).close()
    # A copy of the cluster file has its own CA on this machine: its `pool up` stops at
    # once, before it puts that CA on any host (the running pool's workers would not
    # rejoin with it), and its `run` says the same in one line.
    copy = tmp_path / "copy.yaml"
    copy.write_text(pool_cluster.read_text())
    ca_files = {p: p.read_bytes() for p in dask_pool.workers.glob("*/dask/ca.pem")}
    refused = _run("--cluster", str(copy), "pool", "up", timeout=60)
    assert refused.returncode == 1 and refused.stdout == "", refused
    assert refused.stderr.startswith(
        "sshwasm: error: host 'alpha': the scheduler runs with another certificate authority "
        f"than this machine's for {copy} (kept in "
    ), refused.stderr
    assert "'sshwasm pool down' then 'sshwasm pool up'" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    assert {p: p.read_bytes() for p in ca_files} == ca_files
    ran = _run("--cluster", str(copy), "run", str(built["hello"].path), timeout=60)
    assert ran.returncode != 0 and ran.stderr.startswith(
        f"sshwasm: error: the pool's scheduler at {plan.scheduler_address} runs with another "
        "certificate authority"
    ), ran.stderr
    from distributed import Client

    with pytest.raises((OSError, TimeoutError)):
        Client(plan.scheduler_address.replace("tls://", "tcp://"), timeout=1).close()
    connect(plan, timeout=10).close()  # while ours is accepted


def test_run_array_rerun_resume_api_detach_on_the_pool(
    dask_pool: Pool, pool_cluster: Path, built: dict[str, Any], tmp_path: Path
) -> None:
    """`run`, `--array`, `rerun`, `resume`, the Python API and `--detach` all go through the
    pool: each run is a job directory (with result.json) on a host, recorded `engine: dask`."""
    cluster = ["--cluster", str(pool_cluster)]
    before = dask_pool.job_dirs()
    hello = _run(*cluster, "run", "--json", *QUICK, str(built["hello"].path))
    assert hello.returncode == 0, hello.stderr
    record = json.loads(hello.stdout)
    assert record["state"] == "succeeded" and record["exit_code"] == 0, record
    assert record["engine"] == "dask" and record["host"] in ("alpha", "beta")
    assert record["stdout"].endswith("job done, hello!\n")
    (ran,) = dask_pool.job_dirs() - before
    assert (ran / "result.json").exists()  # on the host's disk, as with the SSH engine

    # rerun: a new job, run by the pool on --host beta.
    before = dask_pool.job_dirs()
    rerun = _run(*cluster, "rerun", "--json", "--host", "beta", str(record["id"]))
    assert rerun.returncode == 0, rerun.stderr
    again = json.loads(rerun.stdout)
    assert (again["engine"], again["host"], again["rerun_of"]) == ("dask", "beta", record["id"])
    assert again["state"] == "succeeded" and again["stdout"] == record["stdout"]
    assert [d.parent.parent.name for d in dask_pool.job_dirs() - before] == ["beta"]

    # An array on the label only alpha has; task 1 fails (exit 5), the run says so.
    tasks = 12
    array = _run(
        *cluster,
        "run",
        "--array",
        str(tasks),
        "--label",
        "fast",
        "--json",
        str(built["task"].path),
        "--",
        "1",
        timeout=300,
    )
    assert array.returncode == 5, array.stderr
    records = json.loads(array.stdout)
    assert [r["state"] for r in records] == ["succeeded"] + ["failed"] + ["succeeded"] * 10
    assert {r["host"] for r in records} == {"alpha"}  # --label fast: only alpha has it
    for index, task in enumerate(records):
        assert task["stdout"].splitlines() == [
            f"task {index} of {tasks} line {line}" for line in range(3)
        ], task
        assert task["engine"] == "dask" and task["attempts"] == 1

    # resume: the failed task, again through the pool (a second attempt, a new directory).
    before = dask_pool.job_dirs()
    resumed = _run(*cluster, "resume", "--json", str(records[1]["id"]), timeout=120)
    assert resumed.returncode == 5, resumed.stderr
    (task,) = json.loads(resumed.stdout)
    assert (task["id"], task["engine"], task["attempts"]) == (records[1]["id"], "dask", 2)
    assert task["state"] == "failed" and task["exit_code"] == 5 and task["host"] == "alpha"
    assert task["stdout"].startswith(f"task 1 of {tasks} line 0"), task
    assert len(dask_pool.job_dirs() - before) == 1

    # The Python API submits to the pool too; its futures complete from it.
    import sshwasm as api

    before = dask_pool.job_dirs()
    with api.Client(cluster=pool_cluster) as client:
        single = client.submit(built["hello"].path, env=QUICK_ENV)
        mapped = client.map(built["task"].path, [[], [], []], labels=["fast"])
        done = single.result(timeout=120)
        assert done.state == "succeeded" and done.engine == "dask", done
        assert done.stdout is not None and done.stdout.endswith("job done, hello!\n")
        for index, job in enumerate(mapped):
            task_record = job.result(timeout=120)
            assert (task_record.state, task_record.engine, task_record.host) == (
                "succeeded",
                "dask",
                "alpha",
            )
            assert task_record.stdout == "".join(
                f"task {index} of 3 line {line}\n" for line in range(3)
            )
    assert len(dask_pool.job_dirs() - before) == 4

    # --detach: no local process follows the jobs; the scheduler holds them, and a later
    # `jobs` collects every result (once: a second `jobs` finds them recorded).
    detached = _run(*cluster, "run", "--detach", "--array", "4", str(built["task"].path))
    assert detached.returncode == 0, detached.stderr
    ids = [int(line) for line in detached.stdout.split()]
    assert len(ids) == 4 and not detached_coordinators(tmp_path / "data" / "jobs.sqlite")

    def collected() -> bool:
        listed = _run(*cluster, "jobs", "--json", "--limit", "4")
        return all(r["state"] == "succeeded" for r in json.loads(listed.stdout))

    wait_for(collected, 60)
    listed = json.loads(_run(*cluster, "jobs", "--json").stdout)
    assert len(listed) == 2 + tasks + 4 + 4  # no task recorded twice
    shown = {r["id"]: r for r in listed}
    for index, job_id in enumerate(ids):
        assert shown[job_id]["engine"] == "dask", shown[job_id]
        assert shown[job_id]["stdout"].startswith(f"task {index} of 4"), shown[job_id]


def test_worker_killed_mid_array_and_cancel_on_the_pool(
    dask_pool: Pool, pool_cluster: Path, built: dict[str, Any]
) -> None:
    cluster = ["--cluster", str(pool_cluster)]
    # A worker killed mid-array: Dask runs its tasks again, on a worker that is alive; every
    # task succeeds, with its output once, and the rerun is counted in `attempts`.
    alpha_jobs = dask_pool.workers / "alpha" / "jobs"
    before = set(alpha_jobs.glob("*"))
    sleep = str(built["sleep"].path)
    # The run in a thread of this process (the test only kills a worker meanwhile).
    with ThreadPoolExecutor(1) as thread:
        array_run = thread.submit(
            _run, *cluster, "run", "--array", "5", "--json", "--quiet", sleep, "--", "2"
        )
        wait_for(lambda: any((d / "stdout").exists() for d in set(alpha_jobs.glob("*")) - before))
        _kill_worker_process(dask_pool.workers / "alpha")
        done = array_run.result(timeout=180)
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [r["state"] for r in records] == ["succeeded"] * 5, records
    assert all(r["stdout"] == "start\nend\n" for r in records), records
    assert max(r["attempts"] for r in records) == 2, [r["attempts"] for r in records]
    listed = json.loads(_run(*cluster, "jobs", "--json").stdout)
    assert len(listed) == 5  # no task recorded twice

    # `sshwasm cancel` stops a guest the pool runs, within a second or so.
    before = dask_pool.job_dirs()
    sleeper = start_sshwasm(*cluster, "run", "--json", str(built["sleep"].path), "--", "60")
    try:
        wait_for(lambda: bool(dask_pool.job_dirs() - before), 60)
        (job_dir,) = dask_pool.job_dirs() - before
        wait_for(lambda: (job_dir / "stdout").exists(), 30)
        asked = time.monotonic()
        cancel = _run(*cluster, "cancel", "6")
        assert cancel.returncode == 0, cancel.stderr
        wait_for(lambda: (job_dir / "result.json").exists(), 10)
        assert time.monotonic() - asked < 5  # a second under no load; this machine is shared
        out, err = sleeper.communicate(timeout=60)
    finally:
        sleeper.kill()
    assert json.loads((job_dir / "result.json").read_text())["state"] == "cancelled"
    record = json.loads(out)
    assert record["state"] == "cancelled" and record["engine"] == "dask", (out, err)


DIRWORK = str(PROGRAMS / "dirwork.rs")


def _cli(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`_run` as a tuple: status, stdout, stderr."""
    done = _run(*args)
    return done.returncode, done.stdout, done.stderr


def _dir_data(root: Path) -> Path:
    data = root / "work" / "data"
    (data / "empty").mkdir(parents=True)
    (data / "keep.txt").write_text("kept\n")
    (data / "edit.txt").write_text("the user\n")
    (data / "old.txt").write_text("old name\n")
    (data / "gone.txt").write_text("to delete\n")
    return data


def test_dir_host_dir_verify_and_reuse_on_the_pool(
    dask_pool: Pool,
    pool_cluster: Path,
    built: dict[str, Any],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """--dir, --host-dir, --verify and --reuse run on the pool with the SSH engine's
    semantics: a --dir is staged to whichever worker runs the task and what the job
    changed comes back; a --host-dir no host has fails the job naming each host; --verify
    runs on two distinct hosts; --reuse takes a succeeded result and runs nothing."""
    cluster = ["--cluster", str(pool_cluster)]
    data = _dir_data(tmp_path)
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "ref.txt").write_text("reference\n")
    status, out, err = _cli(
        capfd, *cluster, "run", "--json", DIRWORK, "--dir", str(data),
        "--host-dir", f"{ref}::/ref:ro",
    )  # fmt: skip
    assert status == 0, err
    record = json.loads(out)
    assert record["engine"] == "dask" and record["state"] == "succeeded", record
    assert record["dirs"] == f"{data}::/data, {ref}::/ref:ro (host)"
    for step in ("create", "mkdir", "create deep", "append", "rename", "delete", "delete dir"):
        assert f"{step}: ok" in record["stdout"], record["stdout"]
    assert "keep: kept" in record["stdout"] and "ref: reference" in record["stdout"]
    assert "write ref: denied" in record["stdout"] and "read host: denied" in record["stdout"]
    assert (data / "new.txt").read_text() == "made by the job\n"
    assert (data / "sub" / "deep.txt").read_text() == "deep\n"
    assert (data / "edit.txt").read_text() == "the user\nand the job\n"
    assert (data / "renamed.txt").read_text() == "old name\n"
    assert not (data / "old.txt").exists() and not (data / "gone.txt").exists()
    assert not (data / "empty").exists() and (data / "keep.txt").read_text() == "kept\n"
    assert (ref / "ref.txt").read_text() == "reference\n"
    assert record["stage_out_s"] is not None

    # An array sharing one --dir: each task gets its own copy, every task's file comes back
    # (the other tasks' appends to edit.txt land beside it); a failed task's too. `resume`
    # of that task goes through the pool with its directory again.
    (tmp_path / "args.txt").write_text("a\nb\nfail\n")
    status, out, err = _cli(
        capfd, *cluster, "run", "--json", "--args-from", str(tmp_path / "args.txt"),
        DIRWORK, "--dir", str(data),
    )  # fmt: skip
    assert status == 3, err
    tasks = json.loads(out)
    assert [task["state"] for task in tasks] == ["succeeded", "succeeded", "failed"], tasks
    assert {task["engine"] for task in tasks} == {"dask"}
    for name in ("a", "b", "fail"):
        assert (data / f"task-{name}.txt").read_text() == name
    (data / "task-fail.txt").unlink()
    status, out, err = _cli(capfd, *cluster, "resume", "--json", str(tasks[2]["id"]))
    assert status == 3, err
    (again,) = json.loads(out)
    assert (again["attempts"], again["engine"], again["exit_code"]) == (2, "dask", 3), again
    assert (data / "task-fail.txt").read_text() == "fail"

    # A --host-dir no host has: the job fails at once, naming each host, nothing runs.
    before = dask_pool.job_dirs()
    nowhere = f"{tmp_path}/nowhere"
    status, out, err = _cli(capfd, *cluster, "run", DIRWORK, "--host-dir", f"{nowhere}::/ref")
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith("sshwasm: error: ") and "no host could run the job (" in err, err
    for host in ("alpha", "beta"):
        assert f"{host}: --host-dir {nowhere}: no such directory on this host" in err, err
    assert dask_pool.job_dirs() == before

    # --verify: the job and its twin on the two hosts, judged equal.
    status, out, err = _cli(
        capfd, *cluster, "run", "--json", "--verify", *QUICK, str(built["hello"].path)
    )
    assert status == 0, err
    verified = json.loads(out)
    assert verified["state"] == "succeeded" and verified["engine"] == "dask", verified
    from sshwasm.store import JobStore

    with JobStore(tmp_path / "data" / "jobs.sqlite") as store:
        twin = store.verify_twin(verified["id"])
        assert twin is not None and twin.state.value == "succeeded" and twin.engine == "dask"
        assert {verified["host"], twin.host} == {"alpha", "beta"}
    # ... and detached: a later `jobs` collects the job with its (unlisted) twin, judged.
    status, out, err = _cli(
        capfd, *cluster, "run", "--detach", "--verify", *QUICK, str(built["hello"].path)
    )
    assert status == 0, err
    detached = int(out)

    def judged(job_id: int, *listing: str) -> bool:
        _cli(capfd, *cluster, "jobs", *listing)
        with JobStore(tmp_path / "data" / "jobs.sqlite") as store:
            twin = store.verify_twin(job_id)
            return twin is not None and twin.is_final and store.get(job_id).is_final

    # Generous: each `jobs` collects what ended (a pair together: recorded alone, the
    # job left the listing before its unlisted twin ended, which no `jobs` collected
    # then), so this waits only for the two runs (seconds; more on a loaded machine).
    wait_for(lambda: judged(detached), 120)
    with JobStore(tmp_path / "data" / "jobs.sqlite") as store:
        assert store.get(detached).state.value == "succeeded"
    # A job recorded before its twin ended (here by collecting it alone): `jobs` still
    # collects the twin and judges the pair.
    status, out, err = _cli(
        capfd, *cluster, "run", "--detach", "--verify", *QUICK, str(built["hello"].path)
    )
    assert status == 0, err
    alone = int(out)
    from sshwasm.cli.coordinate import coordinator_handlers
    from sshwasm.engines.dask_engine import DaskRun

    def recorded_alone() -> bool:
        handlers = coordinator_handlers(False, False)
        with JobStore(tmp_path / "data" / "jobs.sqlite") as store:
            DaskRun(store, load_cluster(pool_cluster), handlers).collect([store.get(alone)])
            return store.get(alone).is_final

    wait_for(recorded_alone, 120)
    wait_for(lambda: judged(alone, "--json"), 120)

    # --reuse: the first run runs, the second takes its result and nothing runs.
    reuse = [*cluster, "run", "--json", "--reuse", str(built["task"].path), "--", "x"]
    status, out, err = _cli(capfd, *reuse)
    assert status == 0, err
    first = json.loads(out)
    before = dask_pool.job_dirs()
    status, out, err = _cli(capfd, *reuse)
    assert status == 0, err
    second = json.loads(out)
    assert second["id"] != first["id"] and second["reused_from"] == first["id"], second
    assert second["stdout"] == first["stdout"] and second["state"] == "succeeded"
    assert dask_pool.job_dirs() == before  # nothing ran

    # The Python API takes directories on the pool too.
    import sshwasm as api

    with api.Client(cluster=pool_cluster) as client:
        job = client.submit(DIRWORK, "api", dirs=[str(data)]).result(timeout=120)
    assert job.state == "succeeded" and job.engine == "dask", job
    assert (data / "task-api.txt").read_text() == "api"


# Fields of a record that say where and when a job ran, or how it got there: they differ
# between two runs of the same job; every other field must be the same on both engines.
_RUN_FIELDS = {
    "id", "host", "submitted_at", "started_at", "finished_at", "queue_s", "upload_s",
    "upload_bytes", "run_s", "cpu_s", "peak_memory_bytes", "array_id", "engine",
    "attempt_hosts", "stage_in_s", "stage_out_s", "fuel_used",
}  # fmt: skip


def test_a_thousand_task_array_on_the_pool(
    dask_pool: Pool, pool_cluster: Path, built: dict[str, Any]
) -> None:
    """The issue's evidence: a 1,000-task `--array` through the pool, each task run once
    on a host (its job directory with result.json there), recorded as the SSH engine
    records the same array: every field but where and when it ran is the same."""
    tiny = str(built["tiny"].path)
    before = dask_pool.job_dirs()
    done = _run("--cluster", str(pool_cluster), "run", "--array", "1000", "--json", tiny)
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [record["array_task"] for record in records] == list(range(1000))
    ran = dask_pool.job_dirs() - before
    assert len(ran) == 1000 and all((path / "result.json").exists() for path in ran)

    # The same module as an array on the SSH engine, on the same hosts and workdirs.
    ssh_cluster = pool_cluster.parent / "ssh-cluster.yaml"
    import yaml

    settings = yaml.safe_load(pool_cluster.read_text())
    del settings["engine"], settings["dask"]
    ssh_cluster.write_text(yaml.safe_dump(settings))
    on_ssh = _run("--cluster", str(ssh_cluster), "run", "--array", "20", "--json", tiny)
    assert on_ssh.returncode == 0, on_ssh.stderr
    expected = json.loads(on_ssh.stdout)
    for task, ours in enumerate(records):
        theirs = expected[task % len(expected)]
        assert (ours["engine"], theirs["engine"]) == ("dask", "ssh")
        assert ours["host"] in ("alpha", "beta") and ours["stdout"] == f"tiny {task}\n", ours
        if task >= len(expected):  # the same but for the task's own index
            theirs = {**theirs, "array_task": task, "stdout": ours["stdout"]}
        same = {key: value for key, value in theirs.items() if key not in _RUN_FIELDS}
        assert {key: ours[key] for key in same} == same, task


# -- --after, --after-any and --retry-failed on the pool (engines/dask_dependencies) -------


def _detached_submitter(cluster: Path) -> Callable[..., int]:
    """`submit(*run_args)`: the id `run --detach` gives a job on the pool (hello's sleep off)."""

    def submit(*args: str) -> int:
        done = _run("--cluster", str(cluster), "run", "--detach", *QUICK, *args)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    return submit


def _host_result(pool: Pool, job: Job) -> dict[str, Any]:
    """The result.json of a job's run on its host (its own times, whenever `jobs` took it)."""
    run = pool.workers / str(job.host) / "jobs" / job.remote_key
    result: dict[str, Any] = json.loads((run / "result.json").read_text())
    return result


def test_after_after_any_retry_failed_and_api_after_on_the_pool(
    dask_pool: Pool, pool_cluster: Path, built: dict[str, Any], tmp_path: Path
) -> None:
    """Dependencies held by the scheduler (detached: no local process), followed, through
    the API, and a guest's own failure retried on the worker, all with the SSH engine's
    records (states, errors, `attempts`)."""
    cluster = ["--cluster", str(pool_cluster)]
    sleep, hello = str(built["sleep"].path), str(built["hello"].path)
    store = JobStore(tmp_path / "data" / "jobs.sqlite")

    submit = _detached_submitter(pool_cluster)

    # A detached chain: A ends `timeout`; B --after A never runs; C --after-any A runs; D
    # --after B follows B's end on the workers (cancelled in turn), E --after C runs.
    # (2 s: its dependants are submitted and listed held before it ends, also under load.)
    a = submit("--time-limit", "2", sleep, "--", "30")
    b = submit("--after", str(a), hello)
    c = submit("--after-any", str(a), hello)
    d = submit("--after", str(b), hello)
    e = submit("--after", str(c), hello)
    held = {r["id"]: r for r in json.loads(_run(*cluster, "jobs", "--json").stdout)}
    assert held[b]["state"] == "queued" and held[b]["host"] is None, held[b]
    assert not detached_coordinators(tmp_path / "data" / "jobs.sqlite")
    # A held job can be cancelled; its dependants follow the SSH engine's rule (--after:
    # cancelled; --after-any: runs), the others wait on.
    f = submit("--after", str(a), hello)
    f_after, f_any = submit("--after", str(f), hello), submit("--after-any", str(f), hello)
    cancel = _run(*cluster, "cancel", str(f))
    assert cancel.returncode == 0, cancel.stderr

    def records() -> dict[int, dict[str, Any]]:
        listed = json.loads(_run(*cluster, "jobs", "--json").stdout)
        return {r["id"]: r for r in listed}

    ids = (b, d, e, f_after, f_any)
    wait_for(lambda: all(records()[i]["state"] not in ("queued", "running") for i in ids), 60)
    shown = records()
    assert shown[a]["state"] == "timeout", shown[a]
    assert (shown[b]["state"], shown[b]["exit_code"]) == ("cancelled", 143), shown[b]
    assert shown[b]["error"] == f"dependency job {a} ended timeout", shown[b]
    assert shown[b]["host"] is None and shown[b]["engine"] == "dask"
    assert shown[d]["state"] == "cancelled", shown[d]
    assert shown[d]["error"] == f"dependency job {b} ended cancelled", shown[d]
    for ran in (c, e):
        assert shown[ran]["state"] == "succeeded", shown[ran]
        assert shown[ran]["stdout"].endswith("job done, hello!\n")
        # Its start as the host saw it, not when `jobs` collected it.
        assert shown[ran]["started_at"] <= shown[ran]["finished_at"], shown[ran]
    assert _host_result(dask_pool, store.get(c))["started_at"] >= shown[a]["finished_at"]
    assert (shown[f]["state"], shown[f]["error"]) == ("cancelled", "cancelled"), shown[f]
    assert shown[f_after]["error"] == f"dependency job {f} ended cancelled", shown[f_after]
    assert shown[f_any]["state"] == "succeeded", shown[f_any]

    # Decided at submit: a dependency that ended otherwise than succeeded cancels at once.
    late = _run(*cluster, "run", "--json", *QUICK, "--after", str(a), hello)
    assert late.returncode == 130, late.stderr
    assert json.loads(late.stdout)["error"] == f"dependency job {a} ended timeout"

    # Followed: the run waits in the scheduler for a detached job, then runs.
    first = submit(sleep, "--", "1")
    followed = _run(*cluster, "run", "--json", *QUICK, "--after", str(first), hello)
    assert followed.returncode == 0, followed.stderr
    record = json.loads(followed.stdout)
    assert record["state"] == "succeeded" and record["engine"] == "dask", record
    assert record["started_at"] >= records()[first]["finished_at"]
    # ... and for a job another `run` follows (its task is that client's, not published).
    # Read from the jobs file, not `jobs`: the other `run` is this test's process, no
    # sshwasm command, so `jobs` would take it for dead and settle its job.
    with ThreadPoolExecutor(1) as thread:
        other = thread.submit(_run, *cluster, "run", "--json", sleep, "--", "2")
        wait_for(lambda: store.get_many([record["id"] + 1])[-1:] != [], 30)
        running = record["id"] + 1
        wait_for(lambda: store.get(running).state.value == "running", 30)
        # (Its output is not read: both runs share this process's stdout.)
        assert _run(*cluster, "run", *QUICK, "--after", str(running), hello).returncode == 0
        assert other.result(timeout=60).returncode == 0
    held_job = store.get(running + 1)
    assert held_job.state.value == "succeeded" and held_job.dependencies == [running]
    assert _host_result(dask_pool, held_job)["started_at"] >= str(store.get(running).finished_at)

    # --retry-failed --retries 2: the guest's own failure runs twice more on the workers,
    # each attempt counted and kept (its output as stderr.N), as the SSH engine does.
    retried = _run(
        *cluster, "run", "--json", "--retries", "2", "--retry-failed",
        str(built["exitcode"].path), "--", "3",
    )  # fmt: skip
    assert retried.returncode == 3, retried.stderr
    record = json.loads(retried.stdout)
    assert (record["state"], record["exit_code"], record["attempts"]) == ("failed", 3, 3)
    hosts = record["attempt_hosts"].split(",")
    assert len(hosts) == 3 and all(hosts) and set(hosts) <= {"alpha", "beta"}, record
    assert retried.stderr.count("ended: exit code 3") == 2, retried.stderr
    output = tmp_path / "data" / "jobs-output" / str(record["id"])
    assert (output / "stderr.1").exists() and (output / "stderr.2").exists()
    status = _run(*cluster, "status", str(record["id"]))
    assert "attempt 2:" in status.stdout, status.stdout

    # The API's after=: held by the scheduler behind a job of the same client.
    import sshwasm as api

    with api.Client(cluster=pool_cluster) as client:
        slow = client.submit(sleep, "1")
        then = client.submit(hello, after=[slow], env=QUICK_ENV)
        failing = client.submit(str(built["exitcode"].path), "4")
        doomed = client.submit(hello, after=[failing], env=QUICK_ENV)
        done = then.result(timeout=120)
        assert done.state == "succeeded" and done.engine == "dask", done
        assert done.started_at is not None and done.started_at >= str(slow.result().finished_at)
        failed = doomed.result(timeout=120)
        assert failed.state == "cancelled" and failed.error is not None, failed
        assert failed.error.startswith("dependency job ") and failed.error.endswith("ended failed")


def test_a_dependency_whose_task_erred_on_the_pool(
    dask_pool: Pool, pool_cluster: Path, built: dict[str, Any], tmp_path: Path
) -> None:
    """A dependency whose Dask task erred (an exception in the task, here the plugin's
    refusal of a job cancelled on the workers before it started; no guest ran) ends
    `failed`; Dask takes its dependants' tasks with it, but they end as the SSH engine
    ends them: an --after-any one runs, an --after one is `cancelled` (`dependency job N
    ended failed`), followed or detached (collected by a later `jobs`); so does a followed
    one whose dependency `cancel` took out of the scheduler."""
    from sshwasm.cli.coordinate import coordinator_handlers
    from sshwasm.engines.dask_dependencies import _KNOWN_SOURCE, _by_value
    from sshwasm.engines.dask_engine import DaskRun, job_base, task_key
    from sshwasm.pool import connect

    cluster = ["--cluster", str(pool_cluster)]
    sleep, hello = str(built["sleep"].path), str(built["hello"].path)
    store = JobStore(tmp_path / "data" / "jobs.sqlite")

    submit = _detached_submitter(pool_cluster)

    first = submit(sleep, "--", "3")
    doomed = submit("--after", str(first), hello)
    run = DaskRun(store, load_cluster(pool_cluster), coordinator_handlers(False, False))
    client = connect(run.plan)
    try:  # its task raises when it starts (the plugin's `Cancelled`): no guest runs
        run._cancel_on_workers(client, {job_base(store.get(doomed))})
    finally:
        client.close()
    any_detached = submit("--after-any", str(doomed), hello)
    after_detached = submit("--after", str(doomed), hello)
    # Followed: two runs in this process at once (their output is not read: they share
    # this process's stdout, put back after them).
    streams = sys.stdout, sys.stderr
    try:
        with ThreadPoolExecutor(1) as thread:
            any_run = thread.submit(
                _run, *cluster, "run", *QUICK, "--after-any", str(doomed), hello
            )
            after_run = _run(*cluster, "run", *QUICK, "--after", str(doomed), hello)
            assert any_run.result(timeout=120).returncode == 0
    finally:
        sys.stdout, sys.stderr = streams
    assert after_run.returncode == 130, after_run.stderr
    followed = [job for job in store.get_many(range(after_detached + 1, after_detached + 3))]
    assert {job.dependencies[0] for job in followed} == {doomed}, followed

    # Cancelled through the scheduler (`sshwasm cancel` of a detached job: a forced cancel,
    # which takes the tasks held behind it along): a followed --after-any dependant runs.
    blocker = submit(sleep, "--", "30")
    behind_id = blocker + 1

    def held_in_scheduler() -> bool:
        jobs = store.get_many([behind_id])
        if not jobs or jobs[0].engine != "dask":
            return False
        probe = _by_value(_KNOWN_SOURCE, "sshwasm_known")
        with contextlib.closing(connect(run.plan)) as client:
            return bool(client.run_on_scheduler(probe, [task_key(jobs[0])]))

    try:
        with ThreadPoolExecutor(1) as thread:
            behind = thread.submit(
                _run, *cluster, "run", *QUICK, "--after-any", str(blocker), hello
            )
            wait_for(held_in_scheduler, 60)
            assert _run(*cluster, "cancel", str(blocker)).returncode == 0
            assert behind.result(timeout=120).returncode == 0
    finally:
        sys.stdout, sys.stderr = streams
    assert store.get(blocker).state.value == "cancelled"
    ran_behind = store.get(behind_id)
    assert ran_behind.dependencies == [blocker] and ran_behind.after_any, ran_behind
    assert (ran_behind.state.value, ran_behind.host is not None) == ("succeeded", True)

    def records() -> dict[int, dict[str, Any]]:
        return {r["id"]: r for r in json.loads(_run(*cluster, "jobs", "--json").stdout)}

    ids = (doomed, any_detached, after_detached)
    wait_for(lambda: all(records()[i]["state"] not in ("queued", "running") for i in ids), 60)
    shown = records()
    assert shown[first]["state"] == "succeeded", shown[first]
    assert shown[doomed]["state"] == "failed", shown[doomed]
    assert "dask: task error" in shown[doomed]["error"], shown[doomed]
    assert "cancelled before it started" in shown[doomed]["error"], shown[doomed]
    for job in followed:
        ran = shown[job.id] if job.after_any else shown[after_detached]
        assert ran["state"] != "failed", ran
    for job_id in (any_detached, *(job.id for job in followed if job.after_any)):
        assert shown[job_id]["state"] == "succeeded", shown[job_id]
        assert shown[job_id]["stdout"].endswith("job done, hello!\n"), shown[job_id]
        assert shown[job_id]["host"] is not None and shown[job_id]["engine"] == "dask"
    for job_id in (after_detached, *(job.id for job in followed if not job.after_any)):
        assert (shown[job_id]["state"], shown[job_id]["exit_code"]) == ("cancelled", 143)
        assert shown[job_id]["error"] == f"dependency job {doomed} ended failed", shown[job_id]
        assert shown[job_id]["host"] is None, shown[job_id]


def _most_at_once(job_dirs: set[Path]) -> int:
    """The most runs whose guests ran at the same time (their result.json's clocks)."""
    from datetime import datetime

    edges = []
    for job_dir in job_dirs:
        result = json.loads((job_dir / "result.json").read_text())
        edges.append((datetime.fromisoformat(result["started_at"]), 1))
        edges.append((datetime.fromisoformat(result["finished_at"]), -1))
    most = running = 0
    for _when, step in sorted(edges):  # an end before a start at the same instant
        running += step
        most = max(most, running)
    return most


def test_array_limits_stale_pool_and_missing_host_dir_on_the_pool(
    dask_pool: Pool, pool_cluster: Path, built: dict[str, Any], tmp_path: Path
) -> None:
    """--array N%K and --halt-after-failures on the pool, followed, detached (the scheduler
    holds them) and through the API, with the SSH engine's records; a --host-dir no worker
    has never reaches the pool; a pool started by another sshwasm is named in one line,
    shown by `pool status` and restarted by `pool up`. (Last: it restarts the pool.)"""
    from sshwasm.engines.dask_engine import _STATES_SOURCE, _by_value
    from sshwasm.pool import connect, plan_for, pool_version

    cluster = ["--cluster", str(pool_cluster)]
    # At most 2 at once of 6 one-second tasks, on 3 cpus (alpha 2, beta 1).
    before = dask_pool.job_dirs()
    sleep = str(built["sleep"].path)
    done = _run(*cluster, "run", "--array", "6%2", "--json", "--quiet", sleep, "--", "1")
    assert done.returncode == 0, done.stderr
    assert [r["state"] for r in json.loads(done.stdout)] == ["succeeded"] * 6
    ran = dask_pool.job_dirs() - before
    assert len(ran) == 6 and _most_at_once(ran) <= 2, _most_at_once(ran)

    # Followed: one at a time; tasks 1 and 2 fail, so the 3 not started end cancelled.
    tiny_fail = str(built["task"].path)
    (tmp_path / "fails.txt").write_text("-\n1\n2\n-\n-\n-\n")
    halted = _run(
        *cluster, "run", "--json", "--args-from", str(tmp_path / "fails.txt"),
        "--max-running", "1", "--halt-after-failures", "2", tiny_fail,
    )  # fmt: skip
    assert halted.returncode == 5, halted.stderr
    records = json.loads(halted.stdout)
    states = [r["state"] for r in records]
    assert states == ["succeeded", "failed", "failed"] + ["cancelled"] * 3, records
    for record in records[3:]:
        assert record["error"] == "halted after 2 failures" and record["exit_code"] == 143
        assert record["engine"] == "dask" and record["stdout"] in ("", None), record
        assert record["host"] is None and record["started_at"] is None, record
    assert "halted after 2 failures" in halted.stderr and "Traceback" not in halted.stderr

    # Detached: no process of ours follows; the scheduler holds and halts the array.
    detached = _run(
        *cluster, "run", "--detach", "--array", "5%1", "--halt-after-failures", "1",
        tiny_fail, "--", "1",
    )  # fmt: skip
    assert detached.returncode == 0, detached.stderr
    ids = [int(line) for line in detached.stdout.split()]
    assert not detached_coordinators(tmp_path / "data" / "jobs.sqlite")

    def collected() -> bool:
        listed = json.loads(_run(*cluster, "jobs", "--json", "--limit", "5").stdout)
        return all(r["state"] not in ("queued", "running") for r in listed)

    wait_for(collected, 120)
    shown = {r["id"]: r for r in json.loads(_run(*cluster, "jobs", "--json").stdout)}
    states = [shown[job_id]["state"] for job_id in ids]
    assert states == ["succeeded", "failed"] + ["cancelled"] * 3, [shown[i] for i in ids]
    assert {shown[i]["error"] for i in ids[2:]} == {"halted after 1 failures"}
    assert {shown[i]["host"] for i in ids[2:]} == {None}

    # The API's map takes both limits too.
    import sshwasm as api

    with api.Client(cluster=pool_cluster) as client:
        mapped = client.map(tiny_fail, [["1"], ["1"], ["1"]], max_running=1, halt_after_failures=1)
        ends = [job.result(timeout=120) for job in mapped]
    assert [end.state for end in ends] == ["succeeded", "failed", "cancelled"], ends
    assert ends[2].error == "halted after 1 failures"

    # A --host-dir no worker has: failed at once, even detached, and no task of it is in
    # the pool (neither published nor known to the scheduler).
    nowhere = f"{tmp_path}/nowhere::/ref"
    refused = _run(*cluster, "run", "--detach", DIRWORK, "--host-dir", nowhere)
    assert refused.returncode == 0, refused.stderr
    (refused_id,) = [int(line) for line in refused.stdout.split()]
    record = json.loads(_run(*cluster, "status", "--json", str(refused_id)).stdout)
    assert record["state"] == "failed" and "no host could run the job (" in record["error"]
    from sshwasm.store import JobStore

    with JobStore(tmp_path / "data" / "jobs.sqlite") as store:
        key = f"sshwasm-{store.get(refused_id).remote_key.split('.', 1)[0]}"
    plan = plan_for(load_cluster(pool_cluster))
    client = connect(plan)
    try:
        assert key not in client.list_datasets()
        states_probe = _by_value(_STATES_SOURCE, "sshwasm_states")
        assert client.run_on_scheduler(states_probe, [key]) == {}

        # A pool of another sshwasm (as after an upgrade): its recorded version altered.
        older = "0.0.1+0123456789"
        alter = (
            "def sshwasm_alter(version, dask_scheduler=None):\n"
            "    dask_scheduler.plugins['sshwasm-limits'].version = version\n"
        )
        client.run_on_scheduler(_by_value(alter, "sshwasm_alter"), older)
    finally:
        client.close()
    for name, roles in (("alpha", ("scheduler", "worker")), ("beta", ("worker",))):
        for role in roles:
            (dask_pool.workers / name / "dask" / f"{role}.version").write_text(older + "\n")
    mine = pool_version()
    stale = _run(*cluster, "run", *QUICK, str(built["hello"].path))
    assert stale.returncode == 1 and stale.stdout == ""
    assert stale.stderr == (
        f"sshwasm: error: the pool runs sshwasm {older}, this is {mine}: "
        "run 'sshwasm pool down' then 'sshwasm pool up'\n"
    )
    status = _run(*cluster, "pool", "status")
    assert status.returncode == 0 and f"sshwasm: {older}" in status.stdout, status
    assert f"the pool runs sshwasm {older}, this is {mine}" in status.stderr
    up = _run(*cluster, "pool", "up", timeout=180)
    assert up.returncode == 0, up.stderr
    assert "alpha: scheduler restarted" in up.stdout, up.stdout
    for name in ("alpha", "beta"):  # a worker may have left with the old scheduler first
        assert f"{name}: worker restarted" in up.stdout or f"{name}: worker started" in up.stdout
    assert f"it ran sshwasm {older}, this is {mine}" in up.stdout
    assert "pool: 2 workers connected" in up.stdout
    report = json.loads(_run(*cluster, "pool", "status", "--json").stdout)
    assert report["version"] == mine
    hello = _run(*cluster, "run", *QUICK, str(built["hello"].path))
    assert hello.returncode == 0 and hello.stdout.endswith("job done, hello!\n"), hello
