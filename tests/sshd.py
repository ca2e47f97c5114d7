"""Real OpenSSH servers on loopback for tests: one key kit, many `sshd -D` processes.

Every server is a child of the test process, listens on one 127.x.y.z address only, trusts
only the kit's client key, and is stopped by its PID: by `stop()`, by the fixtures' teardown,
and by an `atexit` hook as a last resort. Linux only (it reads /proc to find session
processes), which is where the tests run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = Path("/usr/bin/ssh-keygen")
# sshd exits at startup when its privilege separation directory is missing.
PRIVSEP_DIR = Path("/run/sshd")
SETUP_HINT = "run scripts/setup (it installs openssh-server and openssh-client)"

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# Another process may take the port between our probe and sshd's bind; then pick again.
PORT_ATTEMPTS = 5

_SSHD_CONFIG = """\
# Written by tests/sshd.py for one test server; loopback only.
ListenAddress {address}:{port}
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# Keys live in pytest's tmp dirs, whose modes sshd's strict checks would reject.
StrictModes no
PermitRootLogin prohibit-password
PidFile none
Subsystem sftp internal-sftp
# Tests open many connections and channels at once; the defaults (10:30:100, 10) are too low.
MaxStartups 100:30:200
MaxSessions 64
PrintMotd no
PrintLastLog no
X11Forwarding no
LogLevel VERBOSE
"""


def loopback(host: int) -> str:
    """Loopback address number `host` (2..254) of this test process.

    Alone, 127.0.0.<host>. Under pytest-xdist, worker gwN uses 127.<N+1>.0.<host>, so no
    two workers share an address: a stopped host's port cannot be taken by another worker's
    sshd, and a test that expects "connection refused" cannot reach a stranger's server.
    """
    if not 2 <= host <= 254:
        raise ValueError(f"loopback host number out of range: {host}")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        index = int(worker[2:]) + 1
        if index > 254:
            raise ValueError(f"too many xdist workers for per-worker addresses: {worker}")
        return f"127.{index}.0.{host}"
    return f"127.0.0.{host}"


class SshHarnessError(RuntimeError):
    """The test SSH servers could not be set up; the message says what to look at."""


def check_prerequisites() -> None:
    """Raise SshHarnessError naming what is missing to run real sshd servers."""
    missing = [str(path) for path in (SSHD, SSH_KEYGEN) if not os.access(path, os.X_OK)]
    if missing:
        raise SshHarnessError(f"{' and '.join(missing)} not found: {SETUP_HINT}")


def current_user() -> str:
    """The login name sshd will see for us (from the passwd database, not $USER)."""
    return pwd.getpwuid(os.getuid()).pw_name


@dataclass
class SshServer:
    """One `sshd -D` listening on `address:port`, with its own host key, config and log."""

    name: str
    address: str
    port: int
    pid: int
    host_key_pub: str
    config_path: Path
    log_path: Path
    last_start_s: float = 0.0
    """Seconds the last `start()` took until the SSH banner arrived."""
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _paused_pids: list[int] = field(default_factory=list, repr=False)

    @property
    def known_hosts_line(self) -> str:
        """This server's line for an OpenSSH known_hosts file."""
        return f"[{self.address}]:{self.port} {self.host_key_pub}"

    @property
    def running(self) -> bool:
        """True while the listening sshd process is alive (paused or not)."""
        return self._process is not None and self._process.poll() is None

    @property
    def paused(self) -> bool:
        """True between `pause()` and `resume()`."""
        return bool(self._paused_pids)

    def start(self) -> None:
        """Start sshd (again) with the same key, port and config; no-op when running."""
        if self.running:
            return
        began = time.monotonic()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            # -e keeps sshd in the foreground's logging mode; -E sends that log to our file.
            # Anything sshd writes before it opens the log also lands there via stdout/stderr.
            self._process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-E", str(self.log_path), "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,
                # Its own session keeps a terminal's Ctrl-C away; teardown stops it instead.
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),
            )
        self.pid = self._process.pid
        _LIVE_SERVERS[id(self)] = self
        try:
            self._wait_until_ready(log_offset)
        except BaseException:
            self.stop()
            raise
        self.last_start_s = time.monotonic() - began

    def stop(self) -> None:
        """End sshd and every process under it (open sessions drop), by PID; idempotent.

        Like a machine's sshd dying with its sessions. Processes that detached from their
        session (reparented away from sshd, as a daemonised job runner does) survive.
        """
        process = self._process
        if process is None:
            return
        # Collect the tree first: once the listener is gone its children are reparented.
        pids = [process.pid, *_descendants(process.pid)]
        for pid in pids:
            _send(pid, signal.SIGTERM)
            # A stopped process only acts on SIGTERM once continued.
            _send(pid, signal.SIGCONT)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _send(process.pid, signal.SIGKILL)
            process.wait()
        _wait_gone(pids[1:], STOP_TIMEOUT_S)
        for pid in pids[1:]:
            if pid_alive(pid):
                _send(pid, signal.SIGKILL)
        _wait_gone(pids[1:], STOP_TIMEOUT_S)
        self._process = None
        self._paused_pids = []
        _LIVE_SERVERS.pop(id(self), None)

    def pause(self) -> None:
        """Freeze sshd and its sessions (SIGSTOP): a hung host that still accepts TCP."""
        if not self.running or self.paused:
            return
        assert self._process is not None
        pids = [self._process.pid, *_descendants(self._process.pid)]
        for pid in pids:
            _send(pid, signal.SIGSTOP)
        self._paused_pids = pids

    def resume(self) -> None:
        """Undo `pause()` (SIGCONT to every process it stopped)."""
        for pid in self._paused_pids:
            _send(pid, signal.SIGCONT)
        self._paused_pids = []

    def process_ids(self) -> list[int]:
        """The listener's PID and those of all processes under it, while running."""
        if not self.running:
            return []
        assert self._process is not None
        return [self._process.pid, *_descendants(self._process.pid)]

    def log_text(self) -> str:
        """Everything this server logged so far (all its starts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_until_ready(self, log_offset: int) -> None:
        """Return once this sshd bound the port and sends its SSH banner."""
        assert self._process is not None
        listening = f"Server listening on {self.address} port {self.port}.".encode()
        deadline = time.monotonic() + START_TIMEOUT_S
        bound = False
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise self._start_failure(log_offset, f"exited with {self._process.returncode}")
            # The log line proves that *our* sshd holds the port, not some other listener.
            bound = bound or listening in self._log_bytes(log_offset)
            if bound and _banner(self.address, self.port).startswith(b"SSH-2.0-"):
                return
            time.sleep(0.005)
        raise self._start_failure(log_offset, f"not ready after {START_TIMEOUT_S:.0f} s")

    def _log_bytes(self, offset: int) -> bytes:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read()

    def _start_failure(self, log_offset: int, what: str) -> SshHarnessError:
        log = self._log_bytes(log_offset).decode(errors="replace").strip()
        error_class = _PortTaken if "Address already in use" in log else SshHarnessError
        return error_class(
            f"sshd {self.name!r} on {self.address}:{self.port} {what}; "
            f"config {self.config_path}; log:\n{log or '(empty)'}"
        )


class _PortTaken(SshHarnessError):
    """sshd lost the race for its port; a fresh port may work."""


@dataclass
class SshKit:
    """A client key, an authorized_keys and a known_hosts shared by a set of test servers."""

    root: Path
    client_key: Path
    known_hosts: Path
    authorized_keys: Path
    servers: list[SshServer] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, root: Path) -> SshKit:
        """Make a kit in `root` (created): a client ed25519 key that every server trusts."""
        check_prerequisites()
        root.mkdir(parents=True, exist_ok=True)
        client_key = root / "client_ed25519"
        _keygen(client_key, comment="sshwasm-test-client")
        authorized_keys = root / "authorized_keys"
        authorized_keys.write_text(client_key.with_suffix(".pub").read_text())
        known_hosts = root / "known_hosts"
        known_hosts.write_text("")
        return cls(root, client_key, known_hosts, authorized_keys)

    @property
    def user(self) -> str:
        """The login user on every server: whoever runs the tests."""
        return current_user()

    def server(self, name: str, address: str = "", extra_config: str = "") -> SshServer:
        """Start a new sshd on a free port of loopback `address` and trust its host key.

        `extra_config` lines replace the default lines of the same keywords (for example
        "MaxStartups 2"): sshd is not consistent about which of two values wins.
        """
        address = address or loopback(2)
        if not ipaddress.ip_address(address).is_loopback:
            raise ValueError(f"test servers listen on loopback only, not {address}")
        _ensure_privsep_dir()
        # One directory per server, so two servers may share a name (e.g. a replaced host).
        with self._lock:
            directory = self.root / "servers" / f"{len(self.servers):02d}-{name}"
            directory.mkdir(parents=True)
            host_key = directory / "host_ed25519"
            server = SshServer(
                name=name,
                address=address,
                port=0,
                pid=0,
                host_key_pub="",
                config_path=directory / "sshd_config",
                log_path=directory / "sshd.log",
            )
            # Listed before it starts, so stop_all covers it whatever happens next.
            self.servers.append(server)
        _keygen(host_key, comment=f"sshwasm-test-{name}")
        server.host_key_pub = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
        for attempt in range(PORT_ATTEMPTS):
            server.port = _free_port(address)
            server.config_path.write_text(
                _with_overrides(
                    _SSHD_CONFIG.format(
                        address=address,
                        port=server.port,
                        host_key=host_key,
                        authorized_keys=self.authorized_keys.resolve(),
                    ),
                    extra_config,
                )
            )
            try:
                server.start()
                break
            except _PortTaken:
                if attempt == PORT_ATTEMPTS - 1:
                    raise
        with self._lock, self.known_hosts.open("a") as known_hosts:
            known_hosts.write(server.known_hosts_line + "\n")
        return server

    def stop_all(self) -> None:
        """Stop every server of this kit (each by its PID), even if one stop fails."""
        errors: list[BaseException] = []
        for server in self.servers:
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others; report at the end
                errors.append(exc)
        if errors:
            raise SshHarnessError(f"could not stop every sshd: {errors}")

    def leftover_pids(self) -> list[int]:
        """PIDs of this kit's sshd listeners that are still alive (should be none)."""
        return [server.pid for server in self.servers if server.pid and pid_alive(server.pid)]

    def connect_kwargs(self, server: SshServer, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for `asyncssh.connect` to `server`, host key checked."""
        kwargs: dict[str, Any] = {
            "host": server.address,
            "port": server.port,
            "username": self.user,
            "client_keys": [str(self.client_key)],
            "known_hosts": str(self.known_hosts),
            # No agent and no ~/.ssh/config: only this kit's key may be offered.
            "agent_path": None,
            "config": [],
            "connect_timeout": 10,
        }
        kwargs.update(overrides)
        return kwargs

    def ssh_command(self, server: SshServer, *remote: str) -> list[str]:
        """An OpenSSH `ssh` argv that logs in to `server` with this kit only (for debugging)."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-p",
            str(server.port),
            f"{self.user}@{server.address}",
            *remote,
        ]


HostSpec = tuple[int, int] | Mapping[str, Any]


def write_cluster(
    path: Path,
    servers: Mapping[str, SshServer] | Iterable[SshServer],
    kit: SshKit,
    hosts_spec: Mapping[str, HostSpec] | None = None,
    workdir_root: Path | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
    extra_hosts: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write a cluster YAML for sshwasm listing `servers` and return its path.

    `hosts_spec` maps a server name to `(cpus, memory_mb)` or to a mapping of host keys
    (`cpus`, `memory_mb`, `labels`, any override); it also picks and orders the hosts. Without
    it every server gets 2 CPUs and 2048 MiB. Each host's workdir is `workdir_root/<name>`
    (absolute, default: `<path's folder>/workers`), so nothing is written to the remote home.
    `defaults` and `extra_hosts` (e.g. an unreachable or a `local` host) are added verbatim.
    """
    by_name = dict(servers) if isinstance(servers, Mapping) else {s.name: s for s in servers}
    spec: Mapping[str, HostSpec] = (
        hosts_spec if hosts_spec is not None else {name: (2, 2048) for name in by_name}
    )
    root = Path(workdir_root if workdir_root is not None else Path(path).parent / "workers")
    hosts: list[dict[str, Any]] = []
    for name, host_spec in spec.items():
        if name not in by_name:
            raise KeyError(f"no server named {name!r}; have {sorted(by_name)}")
        server = by_name[name]
        if isinstance(host_spec, Mapping):
            details = dict(host_spec)
        else:
            cpus, memory_mb = host_spec
            details = {"cpus": cpus, "memory_mb": memory_mb}
        hosts.append(
            {
                "name": name,
                "address": server.address,
                "port": server.port,
                "workdir": str((root / name).absolute()),
                **details,
            }
        )
    hosts.extend(dict(extra) for extra in extra_hosts)
    document = {
        "defaults": {
            "user": kit.user,
            "identity_file": str(kit.client_key.absolute()),
            "known_hosts": str(kit.known_hosts.absolute()),
            "python": sys.executable,
            **(defaults or {}),
        },
        "hosts": hosts,
    }
    path = Path(path)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _with_overrides(config: str, overrides: str) -> str:
    """`config` with each keyword of `overrides` set to the override's value instead."""
    replaced = {line.split()[0].lower() for line in overrides.splitlines() if line.strip()}
    kept = [
        line
        for line in config.splitlines()
        if not line.strip() or line.split()[0].lower() not in replaced
    ]
    return overrides + "\n".join(kept) + "\n"


def pid_alive(pid: int) -> bool:
    """True if `pid` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_live_servers() -> None:
    """Stop every server still running in this process (the atexit safety net)."""
    for server in list(_LIVE_SERVERS.values()):
        try:
            server.stop()
        except Exception as exc:  # an exit hook must try them all
            print(f"tests/sshd.py: could not stop sshd pid {server.pid}: {exc}", file=sys.stderr)


# Servers started and not yet stopped, keyed by id(); the exit hook stops them.
_LIVE_SERVERS: dict[int, SshServer] = {}
atexit.register(stop_live_servers)


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        [str(SSH_KEYGEN), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def _ensure_privsep_dir() -> None:
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    except PermissionError:
        # Only root needs it (sshd chroots its unprivileged child there); a non-root sshd
        # runs without privilege separation.
        if os.geteuid() == 0:
            raise


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _banner(address: str, port: int) -> bytes:
    """The first line a server sends, or b"" if it does not answer yet."""
    try:
        with socket.create_connection((address, port), timeout=1.0) as conn:
            received = b""
            while b"\n" not in received and len(received) < 256:
                chunk = conn.recv(256)
                if not chunk:
                    break
                received += chunk
            return received
    except OSError:
        return b""


def _die_with_parent_hook() -> Any:
    """A preexec_fn asking the kernel to SIGTERM sshd if the test process dies (Linux).

    That covers a SIGKILLed pytest, where neither teardown nor atexit run. The kernel ties
    this to the creating *thread*, so only the main thread (which lives as long as the
    process) uses it.
    """
    if threading.current_thread() is not threading.main_thread() or sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def hook() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    return hook


def _descendants(root_pid: int) -> list[int]:
    """PIDs of all processes below `root_pid`, from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    frontier = [root_pid]
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            found.append(child)
            frontier.append(child)
    return found


def _send(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_gone(pids: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
