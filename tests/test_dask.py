"""engine: dask (issue 12) without a pool: the cluster file's `dask:` block, what the SSH
engine's users pay for it (nothing), `hosts install` of a dask cluster, what the engine
refuses, and how a job's directories are staged to the pool (`engines/dask_staging`).

These run anywhere (not on the xdist worker that holds tests/test_dask_pool.py's pool)."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import PROGRAMS, job_spec

from sshwasm.cli import main
from sshwasm.cluster import load_cluster
from sshwasm.errors import ClusterError

DIRWORK = str(PROGRAMS / "dirwork.rs")

HOSTS = """\
hosts:
  - {name: alpha, address: 127.0.0.2, cpus: 2, memory_mb: 1024, labels: [gpu]}
  - {name: beta, address: 127.0.0.3, cpus: 1, memory_mb: 512}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _cli(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command line in this process (`main`)."""
    status = main(list(args))
    out, err = capfd.readouterr()
    return status, out, err


def test_dask_block_is_read_and_checked(tmp_path: Path) -> None:
    plain = load_cluster(_write(tmp_path, HOSTS))
    assert (plain.engine, plain.dask) == ("ssh", None)

    cluster = load_cluster(_write(tmp_path, "engine: dask\ndask: {scheduler: beta}\n" + HOSTS))
    assert cluster.engine == "dask" and cluster.dask is not None
    assert (cluster.dask.scheduler, cluster.dask.port, cluster.dask.dashboard_port) == (
        "beta",
        8786,
        8787,
    )
    assert cluster.dask.tls is True
    cluster = load_cluster(
        _write(
            tmp_path,
            "engine: dask\ndask: {scheduler: alpha, port: 9100, dashboard_port: 9101, "
            "tls: false}\n" + HOSTS,
        )
    )
    assert cluster.dask is not None
    assert (cluster.dask.port, cluster.dask.dashboard_port, cluster.dask.tls) == (9100, 9101, False)

    bad = {
        "engine: ray\n": "'engine' must be one of ssh, dask, got 'ray'",
        "engine: dask\n": "'engine: dask' needs a 'dask:' block",
        "dask: {scheduler: alpha}\n": "a 'dask:' block needs 'engine: dask'",
        "engine: dask\ndask: {port: 1}\n": "dask: no 'scheduler'",
        "engine: dask\ndask: {scheduler: alpah}\n": "did you mean 'alpha'?",
        "engine: dask\ndask: {scheduler: alpha, port: 0}\n": "'port' must be a port",
        "engine: dask\ndask: {scheduler: alpha, tls: maybe}\n": "'tls' must be true or false",
        "engine: dask\ndask: {scheduler: alpha, workers: 3}\n": "dask: unknown key 'workers'",
        "engine: dask\ndask: {scheduler: alpha, port: 9000, dashboard_port: 9000}\n": "both 9000",
        "engine: dask\ndask: [alpha]\n": "'dask' must be a mapping",
    }
    for top, message in bad.items():
        with pytest.raises(ClusterError) as caught:
            load_cluster(_write(tmp_path, top + HOSTS))
        assert message in str(caught.value), (top, str(caught.value))
        assert "\n" not in str(caught.value)


def test_import_and_ssh_engine_do_not_import_distributed(built: dict[str, Any]) -> None:
    """The SSH engine's users pay nothing for the dask engine: neither `import sshwasm` nor
    a warm `sshwasm run` (engine: ssh, on the default local host) imports `distributed`."""
    check = textwrap.dedent(
        """
        import sys
        import sshwasm
        from sshwasm.cli import main
        def heavy():
            return sorted(m for m in sys.modules if m.split(".")[0] in ("distributed", "dask"))
        print("IMPORT", heavy())
        for _ in range(2):  # the second run is warm: runner installed, module uploaded
            status = main(["run", "--quiet", "--env", "HELLO_SLEEP_S=0", sys.argv[1]])
            assert status == 0, status
        print("RUN", heavy())
        """
    )
    hello = str(built["hello"].path)
    done = subprocess.run([sys.executable, "-c", check, hello], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "IMPORT []" in done.stdout and "RUN []" in done.stdout, done.stdout + done.stderr


def test_pin_hosts_install_and_tls_off_warning(
    make_cluster: Callable[..., Path], capfd: pytest.CaptureFixture[str]
) -> None:
    """`hosts install` brings the pinned distributed to the hosts of a dask cluster (the pin
    is pyproject's), and `tls: false` warns on every pool command."""
    import tomllib

    from sshwasm.engines import DISTRIBUTED_VERSION

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    pin = f"distributed=={DISTRIBUTED_VERSION}"
    assert extras["dask"] == [pin] and pin in extras["all"] and pin in extras["test"]

    path = make_cluster({"alpha": (1, 512)})
    path.write_text(
        f"engine: dask\ndask: {{scheduler: alpha, port: {_free_port('127.0.0.1')}, "
        "tls: false}\n" + path.read_text()
    )
    status, out, err = _cli(capfd, "--cluster", str(path), "hosts", "install")
    assert status == 0, err
    assert f"alpha: distributed {DISTRIBUTED_VERSION} is importable" in out
    status, out, err = _cli(capfd, "--cluster", str(path), "pool", "status")
    assert status == 1 and "Traceback" not in err
    lines = err.splitlines()
    assert lines[0].startswith("sshwasm: warning: this pool runs without TLS"), lines
    assert lines[1].startswith("sshwasm: error: the pool's scheduler at tcp://"), lines


def test_what_the_dask_engine_refuses(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """What a task cannot carry is refused in one line before anything is submitted, and a
    --verify job is not resumed on the pool (nothing is queued again)."""
    from sshwasm.engines.dask_staging import MAX_TASK_BYTES
    from sshwasm.states import JobState
    from sshwasm.store import JobStore

    cluster = _write(tmp_path, "engine: dask\ndask: {scheduler: alpha}\n" + HOSTS)
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "blob", "wb") as blob:
        blob.truncate(MAX_TASK_BYTES)  # sparse: nothing written
    status, _, err = _cli(capfd, "--cluster", str(cluster), "run", DIRWORK, "--dir", f"{big}:ro")
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith("sshwasm: error: ") and "more than one task on engine: dask" in err

    with JobStore(tmp_path / "data" / "jobs.sqlite") as store:
        spec = dataclasses.replace(job_spec(), array_size=2, verify=True)
        first, second = store.submit_tasks(spec)
        assert first == 1  # the refused run submitted nothing
        store.finish(first, JobState.SUCCEEDED, exit_code=0)
        store.finish(second, JobState.FAILED, exit_code=1)
    status, _, err = _cli(capfd, "--cluster", str(cluster), "resume", str(second))
    assert status == 1
    assert err == f"sshwasm: error: job {second} is a --verify run: not resumed on engine: dask\n"
    with JobStore(tmp_path / "data" / "jobs.sqlite") as store:
        assert store.get(second).attempts == 1 and store.get(second).state is JobState.FAILED


class _FakeClient:
    """What DaskStaging asks of a distributed Client: scatter (counted) and run."""

    def __init__(self, has_dir: dict[str, bool]) -> None:
        self.scattered: list[bytes] = []
        self.has_dir = has_dir
        self.runs = 0

    def scatter(self, data: bytes, hash: bool, broadcast: bool) -> str:
        assert hash and broadcast
        self.scattered.append(data)
        return f"future-{len(self.scattered)}"

    def run(self, function: Callable[..., Any], paths: list[str]) -> dict[str, Any]:
        self.runs += 1
        answers = {}
        for name, has in self.has_dir.items():

            class Worker:
                pass

            worker = Worker()
            worker.name = name  # type: ignore[attr-defined]
            found = function(paths, dask_worker=worker)
            # The probe is the workers' own check; a host "without" the dir is simulated.
            answers[f"tls://{name}:1"] = (
                found if has else [name, {path: "no such directory on this host" for path in paths}]
            )
        return answers


def test_dask_staging_scatters_each_tree_once_and_places_host_dirs(tmp_path: Path) -> None:
    """A --dir's tar is Dask data keyed by content, scattered once however many tasks use
    it, and appended by the worker after the spec (the payload holds the rest); --host-dir
    narrows a job to the hosts whose worker has the directory, and fails it (nothing runs)
    when none has it, naming each host."""
    from sshwasm.cluster import load_cluster
    from sshwasm.engines.dask_engine import eligible_workers
    from sshwasm.engines.dask_staging import DaskStaging
    from sshwasm.runner.protocol import validate_spec
    from sshwasm.states import JobState
    from sshwasm.store import JobStore

    cluster = load_cluster(_write(tmp_path, "engine: dask\ndask: {scheduler: alpha}\n" + HOSTS))
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    warnings: list[str] = []
    with JobStore(tmp_path / "jobs.sqlite") as store:
        dirs = json.dumps([{"guest": "/data", "read_only": False, "local": str(data)}])
        spec = dataclasses.replace(job_spec(), array_size=3, dirs=dirs)
        ids = store.submit_tasks(spec)
        client = _FakeClient({"alpha": True, "beta": True})
        staging = DaskStaging(store, cluster, client, warnings.append)
        for job in store.get_many(ids):
            payload = staging.payload(job)
            module, *tars = staging.data(job, "module-future")
            assert module == "module-future" and tars == ["future-1"]
            header = json.loads(payload.split(b"\n", 1)[0])
            (entry,) = validate_spec(header)["dirs"]
            assert entry["tar_bytes"] == len(client.scattered[0]) > 0
            assert payload.endswith(b"\n")  # the tar is not in it: the worker appends it
        assert len(client.scattered) == 1  # one tree, one scatter, whatever the tasks

        host_dirs = [
            {"guest": "/ref", "read_only": True, "host_path": str(ref)},
            {"guest": "/more", "read_only": True, "host_path": f"{tmp_path}/nowhere"},
        ]
        only_one = dataclasses.replace(job_spec(), dirs=json.dumps(host_dirs[:1]))
        nowhere = dataclasses.replace(job_spec(), dirs=json.dumps(host_dirs))
        first, second = store.submit(only_one), store.submit(nowhere)
        client = _FakeClient({"alpha": False, "beta": True})
        staging = DaskStaging(store, cluster, client, warnings.append)
        job = store.get(first)
        assert staging.workers(job, eligible_workers(cluster, job)) == ["127.0.0.3"]
        assert warnings == [
            f"job {first}: skipping alpha: --host-dir {ref}: no such directory on this host"
        ]
        assert staging.workers(job, ["127.0.0.2"]) == ["127.0.0.2"]  # pinned where it lacks
        assert store.get(first).state is JobState.FAILED
        assert client.runs == 1  # the workers are asked once per set of paths
        job = store.get(second)
        staging.workers(job, None)
        failed = store.get(second)
        assert failed.state is JobState.FAILED and failed.error is not None
        assert failed.error.startswith("no host could run the job (alpha: --host-dir "), failed
        assert f"beta: --host-dir {tmp_path}/nowhere: no such directory" in failed.error


def test_the_limits_plugin_goes_to_hosts_as_it_is_named(tmp_path: Path) -> None:
    """The limits plugin is copied to the hosts and preloaded there beside the runner
    plugin: it imports only the standard library and distributed, and the names both
    sides use agree (the module name, the version variable, the failures counted)."""
    import ast

    from sshwasm import pool
    from sshwasm.engines import dask_limits, dask_limits_plugin, dask_preload
    from sshwasm.states import JobState

    source = Path(dask_limits_plugin.__file__).read_text()
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert {name.split(".")[0] for name in imported} <= {
        "__future__", "heapq", "json", "os", "time", "typing", "distributed",
    }, imported  # fmt: skip
    assert dask_preload.LIMITS_MODULE + ".py" == pool.LIMITS_NAME
    assert dask_limits_plugin.VERSION_VARIABLE == pool.VERSION_VARIABLE
    assert f'plugins.get("{dask_limits_plugin.PLUGIN_NAME}")' in pool._VERSION_SOURCE
    assert {state.value for state in dask_limits._FAILURES} == dask_limits_plugin.FAILURE_STATES
    assert JobState.SUCCEEDED.value not in dask_limits_plugin.FAILURE_STATES
    cluster = load_cluster(_write(tmp_path, "engine: dask\ndask: {scheduler: alpha}\n" + HOSTS))
    argv = pool.scheduler_argv(pool.plan_for(cluster))
    assert argv[argv.index("--preload") + 1].endswith("/dask/" + pool.LIMITS_NAME)


def test_an_unfinished_ssh_engine_dependency_is_refused_on_dask(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The pool holds a job only behind its own tasks: --after an unfinished job of the SSH
    engine is refused in one line before anything is recorded (CLI and API alike)."""
    import sshwasm
    from sshwasm.store import JobStore

    cluster = _write(tmp_path, "engine: dask\ndask: {scheduler: alpha}\n" + HOSTS)
    with sshwasm.Client(cluster=cluster) as client:
        (ssh_job,) = JobStore(client.db_path).submit_tasks(job_spec())
        with pytest.raises(sshwasm.UsageError, match=f"job {ssh_job} runs on the SSH engine"):
            client.submit(DIRWORK, after=[ssh_job])
    for flag in ("--after", "--after-any"):
        status, out, err = _cli(
            capfd, "--cluster", str(cluster), "run", flag, str(ssh_job), DIRWORK
        )
        assert (status, out) == (1, ""), err
        assert err == (
            f"sshwasm: error: --after: job {ssh_job} runs on the SSH engine and has not ended; "
            "the Dask pool cannot wait for it (submit this job once it ended)\n"
        )
    status, out, _ = _cli(capfd, "--cluster", str(cluster), "jobs", "--json")
    assert [job["id"] for job in json.loads(out)] == [ssh_job]  # nothing else was recorded


def test_a_job_collected_later_keeps_its_hosts_start(tmp_path: Path) -> None:
    """A detached job whose start event is gone (the scheduler keeps 1,000) is recorded as
    started when its host started it, not when `jobs` collected it; a start the record has
    already (from the event) is kept."""
    from sshwasm.engines.dask_engine import _host_start
    from sshwasm.runner_client import StreamOutcome
    from sshwasm.store import JobStore

    on_host = "2026-11-30T10:00:00.000+00:00"
    outcome = StreamOutcome(result={"state": "succeeded", "started_at": on_host})
    with JobStore(tmp_path / "jobs.sqlite") as store:
        job = store.get(store.submit(job_spec()))
        assert job.started_at is None
        assert _host_start(job, outcome) == {"started_at": on_host}
        assert _host_start(job, StreamOutcome(result={"state": "lost"})) == {}
        seen = dataclasses.replace(job, started_at="2026-11-30T09:59:59.990+00:00")
        assert _host_start(seen, outcome) == {}


def test_a_pool_that_does_not_answer_fails_the_jobs_it_was_given(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """`run` with no pool up says so in one line, and the jobs it recorded end `failed` with
    that line (not left queued, for `jobs` to call lost later), followed or detached."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    cluster = _write(
        tmp_path, f"engine: dask\ndask: {{scheduler: alpha, port: {port}, tls: false}}\n" + HOSTS
    )
    for flags in (["--array", "2"], ["--detach"]):
        status, out, err = _cli(capfd, "--cluster", str(cluster), "run", *flags, DIRWORK)
        assert (status, out) == (1, ""), err
        last = err.splitlines()[-1]
        assert (
            last.startswith("sshwasm: error: the pool's scheduler at ")
            and "does not answer" in last
        )
    status, out, _ = _cli(capfd, "--cluster", str(cluster), "jobs", "--json")
    records = json.loads(out)
    assert len(records) == 3, records
    for record in records:
        assert record["state"] == "failed", record
        assert "does not answer" in record["error"], record


def test_every_listing_collects_the_twin_of_a_job_recorded_alone(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A detached --verify job on the pool recorded before its (unlisted) twin ended, as an
    older version did: the plain `jobs` table, `--fold`, `--json` and `status` each collect
    the twin from the pool (one shared rule, `pool_twins`); nothing is collected for a job
    without one."""
    from sshwasm.cli import dask_run
    from sshwasm.store import JobState, JobStore

    cluster = _write(tmp_path, "engine: dask\ndask: {scheduler: alpha}\n" + HOSTS)
    asked: list[list[int]] = []

    def collect(ctx: Any, jobs: list[Any]) -> dict[int, Any]:
        asked.append(sorted(job.id for job in jobs))
        return {}

    monkeypatch.setattr(dask_run, "collect_detached", collect)
    monkeypatch.setenv("SSHWASM_DATA_DIR", str(tmp_path / "data"))
    with JobStore(tmp_path / "data" / "jobs.sqlite") as store:
        main_id, twin_id, other_id = (store.submit(job_spec()) for _ in range(3))
        store.update_many([main_id, twin_id, other_id], engine="dask", coordinator_pid=None)
        store.update_many([main_id, twin_id], verify=1)
        store.update(twin_id, rerun_of=main_id)
        store.finish(main_id, JobState.SUCCEEDED, exit_code=0)
        store.finish(other_id, JobState.SUCCEEDED, exit_code=0)
    for listing in (["jobs"], ["jobs", "--fold"], ["jobs", "--json"], ["status", str(main_id)]):
        asked.clear()
        status, _, err = _cli(capfd, "--cluster", str(cluster), *listing)
        assert status == 0, err
        assert asked and all(ids == [twin_id] for ids in asked), (listing, asked)
    asked.clear()
    status, out, err = _cli(capfd, "--cluster", str(cluster), "status", str(other_id))
    assert status == 0 and asked == [], (out, err, asked)
