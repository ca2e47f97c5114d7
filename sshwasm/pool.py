"""A Dask distributed pool on the cluster's hosts (`engine: dask`): `pool up`, `status`, `down`.

Processes are started over the existing SSH transport (`Transport.run_shell`, argv only: no
word reaches a shell unquoted) by a small stdlib helper run as `python -c HELPER ...` on the
host. It starts each process in a session of its own (so it outlives the SSH channel and
gets no SIGHUP), with its output in a log and its PID in a pid file under
`<workdir>/dask/`, and it stops a process by signalling its whole process group (the
scheduler, or a worker's nanny with its worker and their `serve` children), so `pool down`
leaves nothing behind.

Dask does the rest: the queue, placement by worker resources, heartbeats, failure detection
and retries. Nothing here re-implements them.

`distributed` is imported only by the functions that talk to the scheduler, never at import.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shlex
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .cluster import Cluster, DaskSettings, Host
from .errors import HostUnreachable, SshwasmError, SshwasmWarning
from .tls import PoolCertificates, ensure_certificates, ensure_host_pair, pool_dir
from .transport import Completed, Transport, TransportPool, last_line

# A process that does not come up in this time is reported as failed (with its log's end).
START_CHECK_S = 1.0
# How long `pool up` waits for every worker to join the scheduler.
JOIN_TIMEOUT_S = 60.0
# How long a client waits for the scheduler to answer.
CONNECT_TIMEOUT_S = 10.0
# How long `pool down` gives a process group to exit on SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0
# The host's files, under `<workdir>/dask/`.
POOL_SUBDIR = "dask"
PRELOAD_NAME = "sshwasm_preload.py"
# Arrays' --max-running/--halt-after-failures (engines/dask_limits_plugin.py), preloaded by
# the scheduler and the workers.
LIMITS_NAME = "sshwasm_limits.py"
# The pool's processes' environment variable of the sshwasm that started them (the
# scheduler's plugin tells it; `pool up` keeps it in `<role>.version` beside the pid file).
VERSION_VARIABLE = "SSHWASM_POOL_VERSION"
CA_FILE = "ca.pem"
CERT_FILE = "host.pem"
KEY_FILE = "host.key"
SCHEDULER = "scheduler"
WORKER = "worker"
# A label becomes the worker resource `label-<label>` (Dask's --resources syntax splits on
# ',', '=' and blanks, so a label holding one of those cannot be a resource).
LABEL_RESOURCE_PREFIX = "label-"
_RESOURCE_FORBIDDEN = frozenset(",= \t")

# Runs on the host as `python -c HELPER WORKDIR COMMAND ARGS...`; stdlib only (Python 3.9).
#   put                  files from a JSON object on stdin into <workdir>/dask (mode 0600)
#   start ROLE ENV ARGV  start ARGV detached unless ROLE's pid file names a live process
#                        of the same version (ENV's SSHWASM_POOL_VERSION; <role>.version):
#                        one of another version is stopped first ("restarted", "was")
#   stop ROLE            SIGTERM ROLE's process group, SIGKILL after a grace; remove pid file
#   state ROLE           whether ROLE runs, and the sha256 of the CA certificate it started
#                        with ("ca"; <role>.ca, None before that was recorded)
#   runs                 the runs of the job keys (a JSON list on stdin) in <workdir>/jobs
# Each prints one JSON line: {"state": "started"|"restarted"|"running"|"stopped"|"absent",
# "pid": N, "was": the version a restarted process ran}
# (runs: {"runs": {BASE: [{"key", "state", "error", "alive", "mtime"}, ...]}}).
HELPER = f"""\
import hashlib, json, os, signal, subprocess, sys, time
workdir = os.path.abspath(os.path.expanduser(sys.argv[1]))
pool = os.path.join(workdir, {POOL_SUBDIR!r})
command = sys.argv[2]
# Paths under a `~/` workdir arrive as written: expanded here, where the home is known.
args = [os.path.expanduser(a) if a.startswith("~/") else a for a in sys.argv[3:]]
os.umask(0o077)
os.makedirs(pool, 0o700, exist_ok=True)
def pid_of(role):
    try:
        with open(os.path.join(pool, role + ".pid")) as f:
            pid = int(f.read().strip())
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    # A recycled PID is some other program: only a distributed process of this pool counts.
    return pid if b"distributed" in cmdline and pool.encode() in cmdline else None
def group_alive(pid):
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
def answer(state, pid=None, was=None, **more):
    print(json.dumps(dict({{"state": state, "pid": pid, "was": was}}, **more)))
def stop_group(pid):
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + {STOP_GRACE_S}
    while group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(pid):
        os.killpg(pid, signal.SIGKILL)
        while group_alive(pid):
            time.sleep(0.05)
def recorded_version(role):
    try:
        with open(os.path.join(pool, role + ".version")) as f:
            return f.read().strip()
    except OSError:
        return ""
if command == "put":
    for name, text in json.loads(sys.stdin.read()).items():
        if "/" in name or name.startswith("."):
            sys.exit("bad file name " + repr(name))
        path = os.path.join(pool, name)
        temp = path + ".tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    answer("written")
elif command == "start":
    role, env, argv = args[0], json.loads(args[1]), args[2:]
    env = {{k: os.path.expanduser(v) if v.startswith("~/") else v for k, v in env.items()}}
    version = env.get({VERSION_VARIABLE!r}, "")
    pid = pid_of(role)
    was = None
    if pid is not None:
        if recorded_version(role) == version:
            answer("running", pid)
            sys.exit(0)
        was = recorded_version(role) or "unknown"
        stop_group(pid)
    log_path = os.path.join(pool, role + ".log")
    log = open(log_path, "ab")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               cwd=pool, env=dict(os.environ, **env), start_new_session=True)
    with open(os.path.join(pool, role + ".pid"), "w") as f:
        f.write(str(process.pid) + "\\n")
    with open(os.path.join(pool, role + ".version"), "w") as f:
        f.write(version + "\\n")
    # The CA it trusts from now on: another machine's (or file's) `pool up` is told apart.
    try:
        with open(os.path.join(pool, {CA_FILE!r}), "rb") as f:
            ca = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        ca = ""
    with open(os.path.join(pool, role + ".ca"), "w") as f:
        f.write(ca + "\\n")
    time.sleep({START_CHECK_S})
    if process.poll() is not None:
        with open(log_path, "rb") as f:
            lines = [l for l in f.read()[-4096:].decode(errors="replace").splitlines() if l.strip()]
        sys.exit(role + " exited at once: " + (lines[-1] if lines else "no output"))
    answer("started" if was is None else "restarted", process.pid, was)
elif command == "stop":
    role = args[0]
    pid = pid_of(role)
    if pid is None:
        try:
            os.unlink(os.path.join(pool, role + ".pid"))
        except FileNotFoundError:
            pass
        answer("absent")
        sys.exit(0)
    stop_group(pid)
    os.unlink(os.path.join(pool, role + ".pid"))
    answer("stopped", pid)
elif command == "state":
    pid = pid_of(args[0])
    try:
        with open(os.path.join(pool, args[0] + ".ca")) as f:
            ca = f.read().strip() or None
    except OSError:
        ca = None
    answer("running" if pid is not None else "absent", pid, ca=ca)
elif command == "runs":
    bases = set(json.loads(sys.stdin.read()))
    jobs = os.path.join(workdir, "jobs")
    found = {{}}
    try:
        names = os.listdir(jobs)
    except FileNotFoundError:
        names = []
    for name in names:
        base = name.split(".", 1)[0]
        if "." not in name or base not in bases:
            continue
        job_dir = os.path.join(jobs, name)
        run = {{"key": name, "state": None, "error": None, "alive": False}}
        try:
            run["mtime"] = os.stat(job_dir).st_mtime
            with open(os.path.join(job_dir, "result.json")) as f:
                result = json.load(f)
            run["state"], run["error"] = result.get("state"), result.get("error")
        except (OSError, ValueError):
            try:
                with open(os.path.join(job_dir, "pid")) as f:
                    run["alive"] = os.path.exists("/proc/%d" % int(f.read().split()[0]))
            except (OSError, ValueError, IndexError):
                run["alive"] = False
        found.setdefault(base, []).append(run)
    print(json.dumps({{"runs": found}}))
else:
    sys.exit("unknown command " + command)
"""


@dataclass(frozen=True)
class PoolPlan:
    """Where the pool's pieces run, and how to reach its scheduler."""

    cluster: Cluster
    settings: DaskSettings
    scheduler_host: Host

    @property
    def protocol(self) -> str:
        return "tls" if self.settings.tls else "tcp"

    @property
    def scheduler_address(self) -> str:
        return f"{self.protocol}://{self.scheduler_host.address}:{self.settings.port}"

    @property
    def dashboard_url(self) -> str:
        # Bound to the scheduler host's loopback: reach it through `ssh -L`.
        return f"http://127.0.0.1:{self.settings.dashboard_port}/status"


def plan_for(cluster: Cluster) -> PoolPlan:
    """The pool of `cluster`; an error unless its engine is dask."""
    if cluster.engine != "dask" or cluster.dask is None:
        raise SshwasmError(
            f"the cluster file {cluster.source} does not use a Dask pool "
            "(add 'engine: dask' and a 'dask:' block)"
        )
    host = cluster.host(cluster.dask.scheduler)
    assert host is not None  # checked when the cluster file was read
    return PoolPlan(cluster, cluster.dask, host)


def worker_resources(host: Host) -> dict[str, int]:
    """A host's Dask worker resources: its capacities, and 1 of `label-<label>` per label."""
    found: dict[str, int] = {"cpus": host.cpus, "memory_mb": host.memory_mb}
    for label in host.labels:
        if _RESOURCE_FORBIDDEN.intersection(label):
            raise SshwasmError(
                f"host '{host.name}': label {label!r} cannot be a Dask resource "
                "(no ',', '=' or blanks in labels of a Dask pool)"
            )
        found[LABEL_RESOURCE_PREFIX + label] = 1
    return found


def _preload_text() -> str:
    return (resources.files("sshwasm.engines") / "dask_preload.py").read_text(encoding="utf-8")


def _limits_text() -> str:
    engines = resources.files("sshwasm.engines")
    return (engines / "dask_limits_plugin.py").read_text(encoding="utf-8")


def pool_version() -> str:
    """This sshwasm's version as a pool records it: the release, and a hash of what the
    pool's processes load from it (a pool of another build may lack what this one sends)."""
    from . import __version__

    digest = hashlib.sha256((_preload_text() + "\0" + _limits_text()).encode()).hexdigest()
    return f"{__version__}+{digest[:10]}"


def _remote_pool_path(host: Host, name: str) -> str:
    """`<workdir>/dask/<name>` as the host's processes see it (`~` is theirs to expand)."""
    return f"{host.workdir.rstrip('/')}/{POOL_SUBDIR}/{name}"


class _HostControl:
    """The helper's commands on one host."""

    def __init__(self, host: Host, transport: Transport) -> None:
        self.host = host
        self.transport = transport

    async def call(self, command: str, *args: str, stdin: bytes = b"") -> dict[str, Any]:
        argv = [self.host.python, "-c", HELPER, self.host.workdir, command, *args]
        done: Completed = await self.transport.run_shell(argv, stdin)
        if done.exit_status is None:
            raise HostUnreachable(self.host.name, "connection lost")
        if done.exit_status != 0:
            reason = last_line(done.stderr)
            if "No module named 'distributed'" in reason:
                reason += f" (`sshwasm hosts install` installs it for {self.host.python})"
            raise SshwasmError(f"host '{self.host.name}': pool {command}: {reason}")
        try:
            answer: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise SshwasmError(
                f"host '{self.host.name}': pool {command}: unreadable answer {done.stdout[:200]!r}"
            ) from exc
        return answer

    async def put(self, files: dict[str, str]) -> None:
        await self.call("put", stdin=json.dumps(files).encode())

    async def start(self, role: str, env: dict[str, str], argv: Sequence[str]) -> dict[str, Any]:
        return await self.call("start", role, json.dumps(env), *argv)

    async def stop(self, role: str) -> dict[str, Any]:
        return await self.call("stop", role)

    async def state(self, role: str) -> dict[str, Any]:
        return await self.call("state", role)

    async def runs(self, bases: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        answer = await self.call("runs", stdin=json.dumps(list(bases)).encode())
        runs: dict[str, list[dict[str, Any]]] = answer.get("runs") or {}
        return runs


def _tls_args(host: Host, plan: PoolPlan) -> list[str]:
    if not plan.settings.tls:
        return []
    return [
        "--tls-ca-file",
        _remote_pool_path(host, CA_FILE),
        "--tls-cert",
        _remote_pool_path(host, CERT_FILE),
        "--tls-key",
        _remote_pool_path(host, KEY_FILE),
    ]


def _environment(host: Host, plan: PoolPlan) -> dict[str, str]:
    env = {
        # Dask's own config and scratch stay in the pool's directory, not the login's home.
        "DASK_CONFIG": _remote_pool_path(host, "config"),
        "DASK_TEMPORARY_DIRECTORY": _remote_pool_path(host, "tmp"),
        "SSHWASM_WORKDIR": host.workdir,
        VERSION_VARIABLE: pool_version(),
        # The Active Memory Manager would drop the copies of each module that `scatter(...,
        # broadcast=True)` put on every worker, down to one: a worker that dies would then
        # take the only copy with it, and its tasks could not run again elsewhere.
        "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False",
        # Per-task costs that buy nothing here (benchmarks/dask_array.py): a task is placed
        # only where its cpus are free, so there is no queue to steal from; and a worker's
        # statistical profile (a stack sample every 10 ms) shows threads that wait on serve.
        "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "False",
        "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
        # Each of the pool's processes (scheduler, nannies, workers) wakes 50 times a second
        # to time its event loop and twice a second to sample its host (psutil): an idle
        # pool of 3 hosts took 11% of a core, CPU that guests on the same hosts lose. A
        # blocked loop is still reported (after 3 s); the dashboard's plots are coarser.
        "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
        "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "2s",
    }
    if plan.settings.tls:
        env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] = "True"
    return env


def scheduler_argv(plan: PoolPlan) -> list[str]:
    host = plan.scheduler_host
    return [
        host.python,
        "-m",
        "distributed.cli.dask_scheduler",
        "--host",
        host.address,
        "--port",
        str(plan.settings.port),
        "--protocol",
        plan.protocol,
        "--dashboard-address",
        f"127.0.0.1:{plan.settings.dashboard_port}",
        "--preload",
        _remote_pool_path(host, LIMITS_NAME),
        *_tls_args(host, plan),
    ]


def worker_argv(plan: PoolPlan, host: Host) -> list[str]:
    resources_text = ",".join(f"{k}={v}" for k, v in worker_resources(host).items())
    return [
        host.python,
        "-m",
        "distributed.cli.dask_worker",
        plan.scheduler_address,
        "--name",
        host.name,
        "--host",
        host.address,
        "--protocol",
        plan.protocol,
        "--nthreads",
        str(host.cpus),
        "--resources",
        resources_text,
        # Guests run in the runner's serve child, under its own limits: Dask must not pause
        # or kill a worker for memory that is the guests'.
        "--memory-limit",
        "0",
        # Its HTTP server (health, metrics) only on the host's loopback.
        "--dashboard-address",
        "127.0.0.1:0",
        "--local-directory",
        _remote_pool_path(host, "worker-space"),
        "--preload",
        _remote_pool_path(host, PRELOAD_NAME),
        "--preload",
        _remote_pool_path(host, LIMITS_NAME),
        *_tls_args(host, plan),
    ]


def _describe(role: str, answer: dict[str, Any], where: str = "") -> str:
    state = answer.get("state")
    pid = answer.get("pid")
    if state == "started":
        return f"{role} started (pid {pid}){where}"
    if state == "running":
        return f"{role} already running (pid {pid}){where}"
    if state == "restarted":
        was = answer.get("was")
        ran = "an older sshwasm" if was in (None, "unknown") else f"sshwasm {was}"
        return f"{role} restarted (pid {pid}){where}: it ran {ran}, this is {pool_version()}"
    if state == "stopped":
        return f"{role} stopped (pid {pid})"
    return f"{role} was not running"


Report = Callable[[str, str], None]


async def _prepare_host(
    host: Host, control: _HostControl, plan: PoolPlan, certs: PoolCertificates | None
) -> None:
    """Runner, preload plugin and (with TLS) the CA and the host's own pair, on the host."""
    await control.transport.install_runner()
    files = {PRELOAD_NAME: _preload_text(), LIMITS_NAME: _limits_text()}
    if certs is not None:
        pair = ensure_host_pair(certs, host.name, host.address)
        files[CA_FILE] = certs.ca_cert.read_text()
        files[CERT_FILE] = pair.cert.read_text()
        files[KEY_FILE] = pair.key.read_text()
    await control.put(files)


async def _refuse_another_authority(
    control: _HostControl, certs: PoolCertificates, plan: PoolPlan
) -> None:
    """A one-line error, before any host is touched, when the scheduler running there was
    started with another CA than this machine's for this cluster file (from a copy of the
    file, or before this machine's certificates were made anew): its processes would refuse
    this machine, and putting this CA there would strand the workers it restarts."""
    answer = await control.state(SCHEDULER)
    theirs = answer.get("ca")
    if answer.get("state") != "running" or theirs is None:
        return
    if theirs != hashlib.sha256(certs.ca_cert.read_bytes()).hexdigest():
        raise SshwasmError(another_authority(plan, f"host '{control.host.name}': the scheduler"))


def another_authority(plan: PoolPlan, who: str) -> str:
    """What to say when the pool's processes trust another CA than this machine's."""
    return (
        f"{who} runs with another certificate authority than this machine's for "
        f"{plan.cluster.source} (kept in {pool_dir(plan.cluster.source)}): the pool was started "
        f"from another cluster file, or before those certificates were made anew; use that "
        f"file, or run 'sshwasm pool down' then 'sshwasm pool up' (tasks the pool holds are lost)"
    )


async def pool_up(plan: PoolPlan, report: Report) -> list[SshwasmError]:
    """Start what is not running: the scheduler, then a worker per host. Idempotent.

    `report(host, line)` says what was done on each host; failures are returned, one per
    host that failed, after every other host was tried.
    """
    certs = ensure_certificates(plan.cluster.source) if plan.settings.tls else None
    failures: list[SshwasmError] = []
    async with TransportPool() as pool:

        async def control(host: Host) -> _HostControl:
            return _HostControl(host, await pool.get(host))

        async def prepare(host: Host) -> None:
            await _prepare_host(host, await control(host), plan, certs)

        scheduler = plan.scheduler_host
        if certs is not None:
            try:
                await _refuse_another_authority(await control(scheduler), certs, plan)
            except SshwasmError as exc:
                return [exc]
        hosts = list(plan.cluster.hosts)
        prepared = await _each(hosts, prepare)
        ready = []
        for host, outcome in zip(hosts, prepared, strict=True):
            if isinstance(outcome, SshwasmError):
                failures.append(outcome)
            else:
                ready.append(host)
        if scheduler not in ready:
            return failures
        try:
            sched_control = await control(scheduler)
            answer = await sched_control.start(
                SCHEDULER, _environment(scheduler, plan), scheduler_argv(plan)
            )
            report(scheduler.name, _describe(SCHEDULER, answer, f" at {plan.scheduler_address}"))
            await asyncio.to_thread(_wait_listening, plan, JOIN_TIMEOUT_S)
        except SshwasmError as exc:
            failures.append(exc)
            return failures

        async def start_worker(host: Host) -> str:
            answer = await (await control(host)).start(
                WORKER, _environment(host, plan), worker_argv(plan, host)
            )
            return _describe(WORKER, answer)

        started = await _each(ready, start_worker)
        for host, outcome in zip(ready, started, strict=True):
            if isinstance(outcome, SshwasmError):
                failures.append(outcome)
            else:
                report(host.name, outcome)
    return failures


async def pool_down(plan: PoolPlan, report: Report) -> list[SshwasmError]:
    """Stop every worker and the scheduler, all at once; each process group ends whole."""
    failures: list[SshwasmError] = []
    async with TransportPool() as pool:

        async def stop(host: Host) -> list[str]:
            control = _HostControl(host, await pool.get(host))
            roles = [WORKER, SCHEDULER] if host == plan.scheduler_host else [WORKER]
            answers = await asyncio.gather(*(control.stop(role) for role in roles))
            return [_describe(role, answer) for role, answer in zip(roles, answers, strict=True)]

        hosts = list(plan.cluster.hosts)
        for host, outcome in zip(hosts, await _each(hosts, stop), strict=True):
            if isinstance(outcome, SshwasmError):
                failures.append(outcome)
            else:
                for line in outcome:
                    report(host.name, line)
    return failures


async def process_states(plan: PoolPlan) -> dict[str, dict[str, Any]]:
    """Per host, whether its worker (and on the scheduler host, the scheduler) runs."""
    states: dict[str, dict[str, Any]] = {}
    async with TransportPool() as pool:

        async def look(host: Host) -> dict[str, Any]:
            control = _HostControl(host, await pool.get(host))
            found = {WORKER: await control.state(WORKER)}
            if host == plan.scheduler_host:
                found[SCHEDULER] = await control.state(SCHEDULER)
            return found

        hosts = list(plan.cluster.hosts)
        for host, outcome in zip(hosts, await _each(hosts, look), strict=True):
            states[host.name] = (
                {"error": str(outcome)} if isinstance(outcome, SshwasmError) else outcome
            )
    return states


@dataclass(frozen=True)
class Run:
    """A run of a job's task found in a host's job directories (`find_runs`)."""

    host: str
    key: str
    state: str | None  # of its result.json; None: it has none
    error: str | None
    alive: bool  # no result yet, and its executor runs
    mtime: float


async def find_runs(
    plan: PoolPlan, bases: Sequence[str]
) -> tuple[dict[str, list[Run]], list[SshwasmError]]:
    """Every run of the job keys `bases` on the pool's hosts (a task runs under
    `<base>.<worker>-<pid>-<n>`), newest first; and the hosts that could not be asked."""
    found: dict[str, list[Run]] = {}
    failures: list[SshwasmError] = []
    async with TransportPool() as pool:

        async def look(host: Host) -> dict[str, list[dict[str, Any]]]:
            return await _HostControl(host, await pool.get(host)).runs(bases)

        hosts = list(plan.cluster.hosts)
        for host, outcome in zip(hosts, await _each(hosts, look), strict=True):
            if isinstance(outcome, SshwasmError):
                failures.append(outcome)
                continue
            for base, runs in outcome.items():
                for run in runs:
                    found.setdefault(base, []).append(
                        Run(
                            host=host.name,
                            key=str(run["key"]),
                            state=run.get("state"),
                            error=run.get("error"),
                            alive=bool(run.get("alive")),
                            mtime=float(run.get("mtime") or 0.0),
                        )
                    )
    for runs in found.values():
        runs.sort(key=lambda run: run.mtime, reverse=True)
    return found, failures


async def _each(hosts: Sequence[Host], action: Callable[[Host], Any]) -> list[Any | SshwasmError]:
    """`action` on every host at once; a host's failure is returned in its place."""

    async def guarded(host: Host) -> Any:
        try:
            return await action(host)
        except SshwasmError as exc:
            return exc
        except (TimeoutError, asyncio.TimeoutError):
            return SshwasmError(f"host '{host.name}': timed out")

    return list(await asyncio.gather(*(guarded(host) for host in hosts)))


# -- talking to the scheduler (imports distributed) -----------------------------------------


def security_for(plan: PoolPlan, certs: PoolCertificates | None = None) -> Any:
    """The client's `distributed.Security`: mutual TLS with this machine's certificate."""
    from distributed import security

    # distributed's constructors are untyped: called through Any.
    Security: Any = security.Security
    if not plan.settings.tls:
        return Security()
    certs = certs or ensure_certificates(plan.cluster.source)
    return Security(
        tls_ca_file=str(certs.ca_cert),
        tls_client_cert=str(certs.client.cert),
        tls_client_key=str(certs.client.key),
        require_encryption=True,
    )


def connect(
    plan: PoolPlan,
    timeout: float = CONNECT_TIMEOUT_S,
    security: Any = None,
    check_version: bool = True,
) -> Any:
    """A `distributed.Client` of the pool's scheduler; a one-line error when unreachable,
    or (`check_version`) when the pool runs another sshwasm than this one."""
    _check_reachable(plan)
    import distributed

    Client: Any = distributed.Client
    try:
        # Dask warns of any package whose version differs across the pool, numpy included,
        # as a table on stderr: only those that matter to sshwasm are said, in one line.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", distributed.versions.VersionMismatchWarning)
            client = Client(
                plan.scheduler_address,
                security=security if security is not None else security_for(plan),
                timeout=timeout,
                set_as_default=False,
            )
    except (OSError, TimeoutError) as exc:
        if _refused_certificate(exc):
            who = f"the pool's scheduler at {plan.scheduler_address}"
            raise SshwasmError(another_authority(plan, who)) from exc
        raise SshwasmError(
            f"the pool's scheduler at {plan.scheduler_address} does not answer "
            f"({_reason(exc)}); is the pool up (`sshwasm pool up`)?"
        ) from exc
    _say_version_mismatch(caught, distributed.versions.VersionMismatchWarning)
    if check_version:
        try:
            _check_version(client)
        except TimeoutError as exc:  # connected, and then not a word (dask_waits)
            client.close()
            raise SshwasmError(f"{exc}; is the pool up (`sshwasm pool status`)?") from None
        except BaseException:
            client.close()
            raise
    return client


class PoolVersionWarning(SshwasmWarning):
    """The pool runs other versions of the packages a task's messages depend on."""


# Packages whose versions must agree for the client's messages to be read in the pool
# (Dask's own "required" list); Python only by its minor version, as pickled code is.
_MUST_AGREE = ("dask", "distributed", "msgpack", "cloudpickle", "tornado", "toolz")


def version_mismatch_line(table: str) -> str | None:
    """One line naming the packages of Dask's version-mismatch table that matter here
    (None when only others differ, such as numpy, which no task of sshwasm uses)."""
    differences: list[str] = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 4 or cells[0] == "Package":
            continue
        package, here, scheduler, workers = cells
        if package == "python":
            minors = {_minor(version) for version in re.findall(r"\d+\.\d+[.\w]*", line)}
            if len(minors) <= 1:
                continue
        elif package not in _MUST_AGREE:
            continue
        differences.append(
            f"{package} {here} here, {scheduler} on the scheduler, {workers} on the workers"
        )
    if not differences:
        return None
    hints = []
    if any(not difference.startswith("python ") for difference in differences):
        hints.append("`sshwasm hosts install` installs this machine's on the hosts")
    if any(difference.startswith("python ") for difference in differences):
        hints.append("a host's `python:` in the cluster file picks its interpreter")
    return (
        f"the pool runs other versions than this machine: {'; '.join(differences)} "
        f"({'; '.join(hints)})"
    )


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _say_version_mismatch(caught: Sequence[warnings.WarningMessage], category: type) -> None:
    """Warnings caught while connecting, passed on; Dask's version table as one line, if
    it names a package that matters."""
    for caught_warning in caught:
        if isinstance(caught_warning.message, category):
            line = version_mismatch_line(str(caught_warning.message))
            if line is not None:
                warnings.warn(line, PoolVersionWarning, stacklevel=3)
        else:
            warnings.warn_explicit(
                caught_warning.message,
                caught_warning.category,
                caught_warning.filename,
                caught_warning.lineno,
            )


# Runs inside the scheduler: the sshwasm version its limits plugin was started with (None:
# no such plugin, a pool of an sshwasm older than the version check).
_VERSION_SOURCE = """
def sshwasm_pool_version(dask_scheduler=None):
    plugin = dask_scheduler.plugins.get("sshwasm-limits")
    return None if plugin is None else str(plugin.version)
"""


def running_version(client: Any) -> str | None:
    """The sshwasm version the pool's scheduler runs (None: older than this question)."""
    namespace: dict[str, Any] = {"__name__": "sshwasm_pool_probe"}
    exec(compile(_VERSION_SOURCE, "<sshwasm pool version>", "exec"), namespace)
    from .engines.dask_waits import asked  # bounded: a scheduler that never answers

    probe = namespace["sshwasm_pool_version"]
    found: str | None = asked(client, client.run_on_scheduler, probe, what="its version")
    return found


def _check_version(client: Any) -> None:
    """A one-line error when the pool's processes were started by another sshwasm: what
    they load (the worker plugin, the limits) may lack what this one sends, and a run
    would fail obscurely or hang."""
    found, mine = running_version(client), pool_version()
    if found != mine:
        raise SshwasmError(
            f"the pool runs sshwasm {found or 'older than ' + mine.split('+')[0]}, this is "
            f"{mine}: run 'sshwasm pool down' then 'sshwasm pool up'"
        )


def _wait_listening(plan: PoolPlan, timeout: float) -> None:
    """Wait until the scheduler accepts connections (a loaded host takes seconds to start
    it), so that what comes next does not take it for down."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _check_reachable(plan)
            return
        except SshwasmError:
            if time.monotonic() > deadline:
                raise SshwasmError(
                    f"host '{plan.scheduler_host.name}': the scheduler does not listen at "
                    f"{plan.scheduler_address} after {timeout:.0f} s; see "
                    "<workdir>/dask/scheduler.log"
                ) from None
            time.sleep(0.1)


def _check_reachable(plan: PoolPlan) -> None:
    """Fail at once when nothing listens on the scheduler's port (Dask would retry until its
    timeout): the usual case of a pool that is not up."""
    host, port = plan.scheduler_host.address, plan.settings.port
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise SshwasmError(
            f"the pool's scheduler at {plan.scheduler_address} does not answer "
            f"({_reason(exc)}); is the pool up (`sshwasm pool up`)?"
        ) from exc


def _refused_certificate(exc: BaseException) -> bool:
    """Whether connecting failed on a certificate the other side does not trust."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "certificate does not match" in str(
            seen
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def wait_for_workers(client: Any, count: int, timeout: float = JOIN_TIMEOUT_S) -> None:
    """Wait until `count` workers joined; an error naming who is missing otherwise."""
    try:
        client.wait_for_workers(count, timeout=timeout)
    except (TimeoutError, OSError) as exc:
        joined = sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())
        raise SshwasmError(
            f"only {len(joined)} of {count} workers joined the pool within {timeout:.0f} s "
            f"({', '.join(joined) or 'none'}); see <workdir>/dask/worker.log on the others"
        ) from exc


# Runs inside the scheduler (sent by value: it must not need sshwasm installed there).
_USED_RESOURCES_SOURCE = """
def used_resources(dask_scheduler=None):
    return {
        ws.name: {"used": dict(ws.used_resources), "processing": len(ws.processing)}
        for ws in dask_scheduler.workers.values()
    }
"""


def _used_resources_function() -> Callable[..., Any]:
    namespace: dict[str, Any] = {"__name__": "sshwasm_pool_probe"}
    exec(compile(_USED_RESOURCES_SOURCE, "<sshwasm pool status>", "exec"), namespace)
    function: Callable[..., Any] = namespace["used_resources"]
    return function


def pool_status(plan: PoolPlan) -> dict[str, Any]:
    """The scheduler's address, its workers with their resources and use, the dashboard."""
    client = connect(plan, check_version=False)  # status shows the version instead
    try:
        version = running_version(client)  # first: bounded (it answers, or an error)
        info = client.scheduler_info(n_workers=-1)
        used = client.run_on_scheduler(_used_resources_function())
    except TimeoutError as exc:
        raise SshwasmError(str(exc)) from None
    finally:
        client.close()
    workers = []
    for address, worker in sorted(info["workers"].items(), key=lambda kv: str(kv[1]["name"])):
        name = str(worker["name"])
        mine = used.get(worker["name"], {})
        workers.append(
            {
                "name": name,
                "address": address,
                "nthreads": worker["nthreads"],
                "resources": dict(worker.get("resources") or {}),
                "resources_used": {k: v for k, v in mine.get("used", {}).items() if v},
                "processing": mine.get("processing", 0),
            }
        )
    missing = sorted({h.name for h in plan.cluster.hosts} - {w["name"] for w in workers})
    return {
        "scheduler": plan.scheduler_address,
        "scheduler_host": plan.scheduler_host.name,
        "tls": plan.settings.tls,
        "version": version,
        "client_version": pool_version(),
        "dashboard": plan.dashboard_url,
        "workers": workers,
        "workers_missing": missing,
        "tasks_processing": sum(w["processing"] for w in workers),
    }


def dashboard_hint(plan: PoolPlan) -> str:
    """How to open the dashboard from here (it listens on the scheduler host's loopback)."""
    host = plan.scheduler_host
    port = plan.settings.dashboard_port
    target = f"{host.user}@{host.address}" if host.user else host.address
    ssh = ["ssh", "-L", f"{port}:127.0.0.1:{port}", target]
    if host.port:
        ssh[1:1] = ["-p", str(host.port)]
    return f"{plan.dashboard_url} on {host.name} (`{shlex.join(ssh)}`)"
