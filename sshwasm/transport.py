"""How commands reach a host: asyncssh for remote hosts, a subprocess for `address: local`.

Commands are argv lists. For SSH they are joined with `shlex.join`, so no word a user typed is
ever interpreted by the remote shell; the only unquoted text is a leading `"$HOME"/` that
stands for a `~/` workdir (the remote home is not known here).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shlex
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backoff import Backoff
from .cluster import MAX_CONNECTION_PERSIST_S, Host
from .errors import HostKeyUntrusted, HostUnreachable, RemoteError, RunnerUnavailable
from .runner import jobdir, protocol

if TYPE_CHECKING:
    import asyncssh

CONNECT_TIMEOUT_S = 10.0
# A silent host is declared gone after 15 s (README) instead of TCP's minutes: asyncssh
# gives up at the check after `count` unanswered keepalives, interval * (count + 1) seconds,
# the interval being the host's `keepalive_s` (5 s by default).
KEEPALIVE_COUNT_MAX = 2


def silence_limit_s(host: Host) -> float:
    """How long a connection to `host` may go unanswered before it counts as lost."""
    return host.keepalive_s * (KEEPALIVE_COUNT_MAX + 1)


# Handshakes dropped by sshd's MaxStartups and refused channels are retried this often.
CONNECT_ATTEMPTS = 5
CHANNEL_ATTEMPTS = 6
# Channels one connection keeps open at most (below OpenSSH's default MaxSessions of 10).
MAX_CHANNELS = 8
# What is kept of a runner command's stderr: its end, which says why it failed. A host
# could send gigabytes; the rest is read and dropped.
STDERR_KEEP_BYTES = 64 * 1024
# What a plain command on a host (the facts probe, pip) may print on stdout at most.
SHELL_STDOUT_MAX_BYTES = 1 << 20
# What the remote shell exits with when the command (the host's `python`) cannot be run.
SHELL_CANNOT_EXECUTE = 126
SHELL_NOT_FOUND = 127
# Overrides every host's `connection_persist_s` (e.g. 0 for one command without the mux).
PERSIST_ENV = "SSHWASM_CONNECTION_PERSIST_S"
# ProxyJump hosts that are themselves reached through ProxyJump, at most this deep.
MAX_JUMP_DEPTH = 8

# The runner package (sshwasm.runner), run in place on the local host.
RUNNER_DIR = Path(protocol.PACKAGE_DIR).resolve()
# On a host the runner is `<workdir>/bin/<version>/sshwasm_exec/`, a package, so that Python
# caches its bytecode (in its __pycache__); `<workdir>/bin/current` names the version to run.
RUNNER_PACKAGE = "sshwasm_exec"
RUNNER_POINTER = "current"

# What the SSH command runs, as `python -c RUNNER_BOOTSTRAP WORKDIR COMMAND ARGS...`: no file
# of the workdir is executed before the workdir, bin/, the pointer, the version's directory,
# the package and every file in it and in its __pycache__ are found to be the SSH user's own
# and writable by no one else (jobdir.path_problem, whose source is included). Then it
# imports the package from the version's directory and runs its main.
#
# `install` instead reads the package from stdin (protocol.encode_install: JSON, names held
# to protocol.SOURCE_NAME_RE, so none holds '/' or '..'), after the same checks of the
# workdir, bin/ and the pointer. It writes the files into a temporary directory, renames
# that to `bin/<version>` (whole or not at all; a version already there intact is kept, a
# damaged one replaced), and switches the pointer last, atomically: a command never runs
# half a runner, and one already running keeps its files. Then the new runner's
# `prune-runners` removes the versions older than the one it replaced that no process uses
# (runner/prune.py), and prints what it removed: every command holds a shared flock on its
# version's directory for its life (and its forked children with it), which prune tests.
# It is made on first use (runner_bootstrap(), or the module attribute RUNNER_BOOTSTRAP):
# reading jobdir's source costs every command's import, and a job on a warm serve
# (mux/warm.py) starts no runner command.
_BOOTSTRAP: list[str] = []


def runner_bootstrap() -> str:
    """RUNNER_BOOTSTRAP: the program every runner command is run by (see above)."""
    if not _BOOTSTRAP:
        _BOOTSTRAP.append(_bootstrap_source())
    return _BOOTSTRAP[0]


def __getattr__(name: str) -> str:
    if name == "RUNNER_BOOTSTRAP":
        return runner_bootstrap()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bootstrap_source() -> str:
    return f"""\
from __future__ import annotations
import os, stat, sys
{inspect.getsource(jobdir.path_problem)}
{inspect.getsource(jobdir.unsafe_workdir_message)}
def refuse(problem):
    sys.stderr.write("sshwasm-exec: error: " + unsafe_workdir_message(problem) + "\\n")
    return {protocol.UNSAFE_WORKDIR_EXIT}
def same_files(package, files):
    try:
        names = sorted(name for name in os.listdir(package) if name.endswith(".py"))
        if names != sorted(files):
            return False
        for name, text in files.items():
            with open(os.path.join(package, name), "rb") as source:
                if source.read() != text.encode("utf-8"):
                    return False
    except OSError:
        return False
    return True
def install(bin_dir, pointer):
    import json, re, shutil, tempfile
    payload = json.loads(sys.stdin.buffer.read())
    version, files = payload["version"], payload["files"]
    if not re.fullmatch({protocol.VERSION_RE.pattern!r}, version) or not files or not all(
        re.fullmatch({protocol.SOURCE_NAME_RE.pattern!r}, name) for name in files
    ):
        sys.stderr.write("sshwasm-exec: error: malformed runner install payload\\n")
        return 1
    os.umask(0o077)
    os.makedirs(bin_dir, 0o700, exist_ok=True)
    target = os.path.join(bin_dir, version)
    if not same_files(os.path.join(target, "{RUNNER_PACKAGE}"), files):
        temp = tempfile.mkdtemp(prefix=".install-", dir=bin_dir)
        trash = None
        try:
            package = os.path.join(temp, "{RUNNER_PACKAGE}")
            os.mkdir(package, 0o700)
            for name, text in files.items():
                with open(os.path.join(package, name), "xb") as out:
                    out.write(text.encode("utf-8"))
            if os.path.lexists(target):
                # Damaged (edited by hand, say): moved aside whole, then replaced.
                trash = tempfile.mkdtemp(prefix=".old-", dir=bin_dir)
                os.rename(target, os.path.join(trash, version))
            os.rename(temp, target)
        except OSError:
            if not same_files(os.path.join(target, "{RUNNER_PACKAGE}"), files):
                raise  # else another install of it won the race
        finally:
            shutil.rmtree(temp, ignore_errors=True)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
    temp = pointer + ".tmp." + str(os.getpid())
    with open(temp, "x") as out:
        out.write(version + "\\n")
    os.replace(temp, pointer)
    return 0
def read_pointer(pointer):
    try:
        with open(pointer) as current:
            return current.read().strip()
    except FileNotFoundError:
        return ""
def bootstrap():
    workdir = os.path.abspath(sys.argv[1])
    command = sys.argv[2]
    bin_dir = os.path.join(workdir, "bin")
    pointer = os.path.join(bin_dir, "{RUNNER_POINTER}")
    for path in (workdir, bin_dir, pointer):
        problem = path_problem(path)
        if problem is not None:
            return refuse(problem)
    if command == "install":
        previous = read_pointer(pointer)
        status = install(bin_dir, pointer)
        if status:
            return status
        sys.argv[2:] = ["prune-runners", workdir] + ([previous] if previous else [])
    version = read_pointer(pointer)
    home = os.path.join(bin_dir, version)
    package = os.path.join(home, "{RUNNER_PACKAGE}")
    if len(version) != 16 or version.strip("0123456789abcdef") or not os.path.isdir(package):
        sys.stderr.write("sshwasm-exec: error: no runner installed in " + bin_dir + "\\n")
        return 1
    paths = [home, package]
    for directory in (package, os.path.join(package, "__pycache__")):
        if os.path.isdir(directory) or os.path.islink(directory):
            paths.append(directory)
            paths.extend(os.path.join(directory, name) for name in os.listdir(directory))
    for path in paths:
        problem = path_problem(path)
        if problem is not None:
            return refuse(problem)
    try:
        import fcntl
        held = os.open(home, os.O_RDONLY)
        fcntl.flock(held, fcntl.LOCK_SH)  # held for life, forked children too: prune-runners
    except (ImportError, OSError):
        pass  # no locks on this file system: prune-runners keeps what it cannot lock
    if sys.path and sys.path[0] == "":
        sys.path[0] = home  # not the login's working directory (-c puts it first)
    else:
        sys.path.insert(0, home)
    from {RUNNER_PACKAGE}.commands import main
    return main(sys.argv[2:])
sys.exit(bootstrap())
"""


async def keep_tail(read: Callable[[int], Awaitable[bytes]], keep: int) -> bytes:
    """Read a stream to its end and return at most its last `keep` bytes."""
    kept = bytearray()
    while True:
        try:
            chunk = await read(65536)
        except (OSError, EOFError, asyncio.IncompleteReadError):
            break
        except Exception as exc:  # asyncssh's errors, imported lazily elsewhere
            if type(exc).__module__.startswith("asyncssh"):
                break
            raise
        if not chunk:
            break
        kept += chunk
        if len(kept) > 2 * keep:
            del kept[:-keep]
    return bytes(kept[-keep:])


@dataclass(frozen=True)
class Completed:
    """A finished command. `exit_status` None means the connection was lost."""

    exit_status: int | None
    stdout: bytes
    stderr: bytes


def pruned_versions(out: bytes) -> dict[str, list[str]]:
    """What `install`'s prune-runners printed (its last line, JSON), checked; else empty."""
    try:
        value = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {
        key: [str(version) for version in value[key] if protocol.VERSION_RE.fullmatch(str(version))]
        for key in ("removed", "in_use")
        if isinstance(value.get(key), list)
    }


def last_line(data: bytes) -> str:
    """The last non-empty line of a command's output: what a one-line error should quote."""
    lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def cannot_start(host: Host, stderr: bytes) -> RunnerUnavailable:
    """The error for a host whose `python` cannot run the runner (or its installer)."""
    return RunnerUnavailable(
        host.name,
        f"the runner cannot start with '{host.python}': {last_line(stderr)}",
        f"check `python:` of host '{host.name}' in the cluster file; "
        f"`sshwasm hosts install {host.name}` installs wasmtime for it",
    )


def runner_refusal(stderr: bytes) -> str:
    """What a runner (or its bootstrap) said when it refused to run: its last stderr line,
    without the `sshwasm-exec: error: ` prefix."""
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    line = lines[-1].strip() if lines else "the runner refused to run"
    return line.removeprefix("sshwasm-exec: error: ")


def remote_path(workdir: str, *parts: str) -> str:
    """A shell word for a path under a host's workdir: quoted, with `~/` as `"$HOME"/`."""
    tail = "/".join((workdir.rstrip("/"), *parts)) if parts else workdir
    if tail == "~":
        return '"$HOME"'
    if tail.startswith("~/"):
        return '"$HOME"/' + shlex.quote(tail[2:])
    return shlex.quote(tail)


class _TransientFailure(Exception):
    """A connection attempt failed in a way that may pass (sshd busy)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RunnerProcess(ABC):
    """A running runner command: write its stdin, read its stdout, wait for its exit."""

    @abstractmethod
    async def send(self, data: bytes, *, close: bool = True) -> None:
        """Write to its stdin (and close it)."""

    @abstractmethod
    async def read(self, size: int = 65536) -> bytes:
        """Next stdout bytes; b'' at end of stream."""

    @abstractmethod
    async def finish(self) -> Completed:
        """Wait for the exit status and collect stderr (stdout must have been read)."""

    @abstractmethod
    def abort(self) -> None:
        """Stop reading (the job on the host is unaffected)."""

    @property
    def is_open(self) -> bool:
        """Whether the command may still be running (a spare channel must be, to be used)."""
        return True


class Transport(ABC):
    """A way to start runner commands on one host."""

    def __init__(self, host: Host) -> None:
        self.host = host
        # Concurrent jobs on one host (array tasks) install the runner and upload a module
        # once between them, not once each.
        self.setup_lock = asyncio.Lock()
        self.modules_sent: set[str] = set()
        self.runner_sent = False

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection; raises HostUnreachable."""

    @abstractmethod
    async def start_runner(self, args: Sequence[str]) -> RunnerProcess:
        """Start `sshwasm-exec ARGS...` on the host."""

    @abstractmethod
    async def run_shell(self, argv: Sequence[str], stdin: bytes = b"") -> Completed:
        """Run a plain command (argv, quoted for the shell) on the host."""

    @abstractmethod
    async def install_runner(self) -> dict[str, list[str]]:
        """Install this coordinator's runner package as `<workdir>/bin/<version>/` and make
        it the current one; the older versions it removed ("removed") and those it had to
        keep because a process runs them ("in_use")."""

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """Whether the connection is open."""

    async def close(self) -> None:  # noqa: B027 - only connections need closing
        """Close the connection."""

    async def launch_warm(self, job_id: str) -> RunnerProcess | None:
        """A channel to a warm serve that takes the job `job_id` as its launch spec, or None
        to launch it as a command (only the connection process keeps warm serves)."""
        return None

    async def serve_session(self) -> RunnerProcess | None:
        """A channel to a warm serve for an array's tasks, its hello done, or None to start
        a serve of the array's own (only the connection process keeps warm serves)."""
        return None

    async def install_runner_once(self, notice: Callable[[str], None] | None = None) -> None:
        """Install the runner unless a job on this connection already did."""
        async with self.setup_lock:
            if self.runner_sent:
                return
            if notice is not None:
                notice(f"installing the runner on {self.host.name}")
            await self.install_runner()
            self.runner_sent = True

    async def run_runner(
        self, args: Sequence[str], stdin: bytes = b"", max_stdout: int | None = None
    ) -> Completed:
        """Run a runner command to completion; more than `max_stdout` bytes is a RemoteError."""
        process = await self.start_runner(args)
        await process.send(stdin)
        chunks = []
        size = 0
        while chunk := await process.read():
            chunks.append(chunk)
            size += len(chunk)
            if max_stdout is not None and size > max_stdout:
                process.abort()
                raise RemoteError(
                    self.host.name, f"the runner's answer to {args[0]} exceeds {max_stdout} bytes"
                )
        done = await process.finish()
        return Completed(done.exit_status, b"".join(chunks), done.stderr)


# -- local ---------------------------------------------------------------------------------


class _LocalProcess(RunnerProcess):
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        assert process.stderr is not None
        # Read all along, so a chatty stderr neither blocks the runner nor fills our memory.
        self._stderr = asyncio.ensure_future(keep_tail(process.stderr.read, STDERR_KEEP_BYTES))

    async def send(self, data: bytes, *, close: bool = True) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(data)
            await stdin.drain()
            if close:
                stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the runner exited early; its frames say why

    async def read(self, size: int = 65536) -> bytes:
        assert self._process.stdout is not None
        return await self._process.stdout.read(size)

    async def finish(self) -> Completed:
        stderr = await self._stderr
        status = await self._process.wait()
        return Completed(status, b"", stderr)

    def abort(self) -> None:
        if self._process.returncode is None:
            self._process.kill()
        self._stderr.cancel()


class LocalTransport(Transport):
    """Runs the runner as a subprocess of this machine: the same protocol, no SSH."""

    async def connect(self) -> None:
        return None

    @property
    def is_connected(self) -> bool:
        return True

    async def start_runner(self, args: Sequence[str]) -> RunnerProcess:
        # Our own interpreter runs the runner package as `-m sshwasm.runner`; another one
        # runs the same package's directory, whose files need only the stdlib (and wasmtime).
        runner_argv = (
            ["-m", "sshwasm.runner"]
            if os.path.realpath(shutil.which(self.host.python) or self.host.python)
            == os.path.realpath(sys.executable)
            else [str(RUNNER_DIR)]
        )
        process = await asyncio.create_subprocess_exec(
            self.host.python,
            *runner_argv,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return _LocalProcess(process)

    async def run_shell(self, argv: Sequence[str], stdin: bytes = b"") -> Completed:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate(stdin)
        return Completed(process.returncode, out, err)

    async def install_runner(self) -> dict[str, list[str]]:
        return {}  # the local host runs the installed sshwasm's runner package in place


# -- SSH -----------------------------------------------------------------------------------


def pace_reading(process: asyncssh.SSHClientProcess[bytes]) -> bool:
    """Hold what asyncssh keeps of a channel that is read slower than it arrives to about
    two SSH windows (4 MiB); returns whether it could (else asyncssh reads as it does).

    asyncssh stops reading a channel once a window's worth (2 MiB) waits in its buffer,
    and reads on as soon as the reader takes a chunk. Reading on delivers one packet and
    sends the window adjust then, which credits every byte received since the last one,
    the ones still waiting in the channel's own buffer included: each 64 KiB read let the
    host send another 2 MiB, and with a slow reader (`sshwasm run ... | less`) the
    connection process held the job's whole output (32 MiB of 40 at a 4 MiB/s reader).
    Reading on only once the buffer is empty moves a whole window to the reader per
    adjust, so the host sends no faster than the reader takes: what a slow reader has not
    taken waits on the host's disk, in the job's output file.
    """
    resume = getattr(process, "_maybe_resume_reading", None)
    if not callable(resume) or not all(
        hasattr(process, name) for name in ("_recv_buf_len", "_limit", "_read_paused")
    ):
        return False  # another asyncssh: left as it is

    def resume_when_empty() -> bool:
        # `_limit` is 0 once wait() or communicate() collects the rest: read on then.
        if process._limit and process._recv_buf_len > 0:
            return False
        return bool(resume())

    process._maybe_resume_reading = resume_when_empty  # type: ignore[method-assign]
    return True


class _SshProcess(RunnerProcess):
    def __init__(
        self, process: asyncssh.SSHClientProcess[bytes], release: Callable[[], None]
    ) -> None:
        pace_reading(process)
        self._process = process
        self._release: Callable[[], None] | None = release
        # Read all along: asyncssh would otherwise collect the whole of it in memory.
        self._stderr = asyncio.ensure_future(keep_tail(process.stderr.read, STDERR_KEEP_BYTES))

    @property
    def is_open(self) -> bool:
        """Whether the channel is still open and its command has not exited."""
        return not self._process.is_closing() and self._process.exit_status is None

    def _give_back_channel(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    async def send(self, data: bytes, *, close: bool = True) -> None:
        import asyncssh

        try:
            self._process.stdin.write(data)
            await self._process.stdin.drain()
            if close:
                self._process.stdin.write_eof()
        except (asyncssh.Error, BrokenPipeError, ConnectionResetError):
            pass  # the channel ended early: finish() reports how

    async def read(self, size: int = 65536) -> bytes:
        import asyncssh

        try:
            return await self._process.stdout.read(size)
        except (asyncssh.Error, ConnectionError):
            return b""

    async def finish(self) -> Completed:
        import asyncssh

        try:
            result = await self._process.wait()
            kept = await self._stderr
        except (asyncssh.Error, ConnectionError):
            self._stderr.cancel()
            return Completed(None, b"", b"")
        finally:
            self._give_back_channel()
        # What the reader had not taken yet, wait() collected: it comes last.
        rest = result.stderr if isinstance(result.stderr, bytes) else b""
        stderr = (kept + rest)[-STDERR_KEEP_BYTES:]
        # asyncssh reports a dropped session as exit_status None without raising.
        return Completed(result.exit_status, b"", stderr)

    def abort(self) -> None:
        self._process.close()
        self._stderr.cancel()
        self._give_back_channel()


# Before retry `attempt` (1, 2, ...): doubling, with jitter so that many coordinators
# refused at once do not come back at once.
RETRY_BACKOFF = Backoff(first=0.2, factor=2.0, most=3.0, jitter=0.5)


class SshTransport(Transport):
    """One asyncssh connection to a host, reused for every command."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._connection: asyncssh.SSHClientConnection | None = None
        # OpenSSH refuses channels past MaxSessions (10 by default): queue here instead.
        self._channels = asyncio.Semaphore(MAX_CHANNELS)

    @property
    def is_connected(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed()

    def _connect_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "keepalive_interval": self.host.keepalive_s,
            "keepalive_count_max": KEEPALIVE_COUNT_MAX,
        }
        host = self.host
        if host.identity_file is not None:
            options["client_keys"] = [host.identity_file]
        return options

    def _ssh_config(
        self, address: str, port: int | None, user: str | None
    ) -> asyncssh.SSHClientConnectionOptions:
        """What ~/.ssh/config says for `address` (HostName, Port, ProxyJump, known hosts)."""
        import asyncssh

        try:
            # config=(): ~/.ssh/config, as connect() reads it (the default here is none).
            return asyncssh.SSHClientConnectionOptions(
                config=(), host=address, port=port if port is not None else (), username=user or ()
            )
        except (OSError, ValueError, asyncssh.Error) as exc:
            raise HostUnreachable(self.host.name, f"ssh config for {address}: {exc}") from exc

    def _known_hosts(self, config: asyncssh.SSHClientConnectionOptions) -> list[str]:
        """The known_hosts files every hop's key is checked against; refused when none exist.

        The cluster's `known_hosts`, else the files `UserKnownHostsFile` of ~/.ssh/config
        names, else ~/.ssh/known_hosts. Always passed to asyncssh explicitly: left to it,
        `UserKnownHostsFile none` in the config turns checking off.
        """
        if self.host.known_hosts is not None:
            candidates = [self.host.known_hosts]
        elif isinstance(config.known_hosts, list) and config.known_hosts:
            candidates = [str(path) for path in config.known_hosts]
        else:
            candidates = ["~/.ssh/known_hosts"]
        files = [os.path.expanduser(path) for path in candidates]
        present = [path for path in files if os.path.isfile(path)]
        if not present:
            raise HostUnreachable(
                self.host.name,
                f"cannot verify host keys: known_hosts file {' or '.join(files)} does not "
                f"exist (add the host's key with ssh-keyscan after checking it, or set "
                f"known_hosts: in the cluster file)",
            )
        return present

    async def connect(self) -> None:
        if self.is_connected:
            return
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                await self._connect_once()
                return
            except _TransientFailure as failure:
                if attempt == CONNECT_ATTEMPTS:
                    raise HostUnreachable(self.host.name, failure.reason) from failure
                await asyncio.sleep(RETRY_BACKOFF.delay(attempt))

    async def _connect_once(self) -> None:
        host = self.host
        config = self._ssh_config(host.address, host.port, host.user)
        known_hosts = self._known_hosts(config)
        jump = await self._open_jump_hosts(config.tunnel, known_hosts)
        try:
            connection = await self._connect_hop(
                host.address,
                host.port,
                host.user,
                known_hosts,
                jump,
                **self._connect_options(),
            )
        except BaseException:
            if jump is not None:
                jump.close()
            raise
        # Closing the connection then closes the jump hosts' too.
        connection.set_tunnel(jump)
        self._connection = connection

    async def _open_jump_hosts(
        self, chain: object, known_hosts: list[str], depth: int = 0
    ) -> asyncssh.SSHClientConnection | None:
        """Open a `ProxyJump` chain of ~/.ssh/config (`a,user@b:port`), or None if none.

        Opened here rather than by asyncssh, which connects to jump hosts with only what the
        config says: `UserKnownHostsFile none` there would leave their keys unchecked. Each
        hop is checked against the same known_hosts as the host itself.
        """
        if not chain or not isinstance(chain, str):
            return None
        if depth >= MAX_JUMP_DEPTH:
            raise HostUnreachable(
                self.host.name, f"ProxyJump chain longer than {MAX_JUMP_DEPTH} hosts"
            )
        connection: asyncssh.SSHClientConnection | None = None
        for hop in chain.split(","):
            hop_user, _, hop_host = hop.strip().rpartition("@")
            hop_port: int | None = None
            if ":" in hop_host:
                hop_host, _, port_text = hop_host.rpartition(":")
                try:
                    hop_port = int(port_text)
                except ValueError:
                    raise HostUnreachable(self.host.name, f"ProxyJump {hop!r}: bad port") from None
            try:
                tunnel = connection or await self._open_jump_hosts(
                    self._ssh_config(hop_host, hop_port, hop_user or None).tunnel,
                    known_hosts,
                    depth + 1,
                )
                hop_connection = await self._connect_hop(
                    hop_host,
                    hop_port,
                    hop_user or None,
                    known_hosts,
                    tunnel,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    jump=True,
                )
            except BaseException:
                if connection is not None:
                    connection.close()
                raise
            hop_connection.set_tunnel(connection)
            connection = hop_connection
        return connection

    async def _connect_hop(
        self,
        address: str,
        port: int | None,
        user: str | None,
        known_hosts: list[str],
        tunnel: asyncssh.SSHClientConnection | None,
        jump: bool = False,
        **options: Any,
    ) -> asyncssh.SSHClientConnection:
        """One SSH connection (the host, or one of its jump hosts), errors made ours."""
        import asyncssh

        host = self.host
        if port is not None:
            options["port"] = port
        if user is not None:
            options["username"] = user
        what = f"jump host {address}" if jump else address
        try:
            # tunnel=None rather than left out: asyncssh would otherwise open the config's
            # ProxyJump itself, its keys unchecked.
            return await asyncssh.connect(
                address, known_hosts=known_hosts, tunnel=tunnel, **options
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            # ssh-keyscan reads no ssh config: name the real address and port in its hint.
            with contextlib.suppress(OSError, ValueError, asyncssh.Error):
                resolved = asyncssh.SSHClientConnectionOptions(
                    config=(), host=address, port=port if port is not None else ()
                )
                address, port = resolved.host, resolved.port
            raise HostKeyUntrusted(host.name, address, port, known_hosts[0], jump) from exc
        except asyncssh.PermissionDenied as exc:
            raise HostUnreachable(
                host.name,
                f"permission denied by {what} for user {user or 'default'}: {exc.reason}",
            ) from exc
        except (asyncssh.ConnectionLost, ConnectionResetError, BrokenPipeError) as exc:
            # What sshd does to handshakes past MaxStartups: worth another try shortly.
            raise _TransientFailure(f"connection dropped during the handshake: {exc}") from exc
        except asyncssh.DisconnectError as exc:
            raise HostUnreachable(host.name, f"ssh ({what}): {exc.reason}") from exc
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise HostUnreachable(
                host.name, f"no answer from {what} within {CONNECT_TIMEOUT_S:g}s"
            ) from exc
        except ConnectionRefusedError as exc:
            raise HostUnreachable(host.name, f"connection refused by {what}") from exc
        except OSError as exc:
            raise HostUnreachable(host.name, f"cannot connect to {what}: {exc}") from exc
        except asyncssh.Error as exc:
            raise HostUnreachable(host.name, f"ssh ({what}): {exc.reason}") from exc

    def _runner_command(self, args: Sequence[str]) -> str:
        python, workdir = shlex.quote(self.host.python), remote_path(self.host.workdir)
        return f"{python} -c {shlex.quote(runner_bootstrap())} {workdir} {shlex.join(args)}"

    async def _open(self, command: str) -> RunnerProcess:
        import asyncssh

        await self._channels.acquire()
        try:
            for attempt in range(1, CHANNEL_ATTEMPTS + 1):
                await self.connect()
                assert self._connection is not None
                try:
                    process = await self._connection.create_process(command, encoding=None)
                    return _SshProcess(process, self._channels.release)
                except asyncssh.ChannelOpenError as exc:
                    # Refused (MaxSessions) on a live connection: wait and retry.
                    if attempt == CHANNEL_ATTEMPTS or not self.is_connected:
                        self._connection = None
                        raise HostUnreachable(
                            self.host.name, f"cannot open a channel: {exc.reason}"
                        ) from exc
                    await asyncio.sleep(RETRY_BACKOFF.delay(attempt))
                except (asyncssh.Error, ConnectionError) as exc:
                    self._connection = None
                    raise HostUnreachable(self.host.name, f"cannot open a channel: {exc}") from exc
            raise AssertionError("unreachable")
        except BaseException:
            self._channels.release()
            raise

    async def open_command(self, command: str) -> RunnerProcess:
        """Start a shell command line on the host (the connection process relays these)."""
        return await self._open(command)

    async def start_runner(self, args: Sequence[str]) -> RunnerProcess:
        return await self._open(self._runner_command(args))

    async def run_shell(self, argv: Sequence[str], stdin: bytes = b"") -> Completed:
        process = await self._open(shlex.join(argv))
        await process.send(stdin)
        out = bytearray()
        while chunk := await process.read():
            out += chunk
            if len(out) > SHELL_STDOUT_MAX_BYTES:  # our commands print a line or two
                process.abort()
                raise RemoteError(
                    self.host.name,
                    f"`{argv[0]} ...` printed more than {SHELL_STDOUT_MAX_BYTES} bytes",
                )
        done = await process.finish()
        return Completed(done.exit_status, bytes(out), done.stderr)

    async def install_runner(self) -> dict[str, list[str]]:
        workdir = self.host.workdir
        # The bootstrap refuses an unsafe existing workdir rather than write into it.
        process = await self._open(self._runner_command(["install"]))
        await process.send(protocol.encode_install(protocol.runner_files()))
        out = await keep_tail(process.read, 64 * 1024)
        done = await process.finish()
        if done.exit_status is None:
            raise HostUnreachable(self.host.name, "connection lost while installing the runner")
        if done.exit_status == protocol.UNSAFE_WORKDIR_EXIT:
            raise RemoteError(self.host.name, runner_refusal(done.stderr))
        if done.exit_status in (SHELL_CANNOT_EXECUTE, SHELL_NOT_FOUND):
            raise cannot_start(self.host, done.stderr)  # the host's `python` is not there
        if done.exit_status != 0:
            reason = done.stderr.decode(errors="replace").strip().splitlines()
            raise HostUnreachable(
                self.host.name,
                f"cannot install the runner in {workdir}: {reason[-1] if reason else 'failed'}",
            )
        return pruned_versions(out)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
            await connection.wait_closed()


def persist_seconds(host: Host) -> float:
    """How long the connection process keeps `host`'s connection: `connection_persist_s`
    of the cluster file, unless `$SSHWASM_CONNECTION_PERSIST_S` says otherwise (0: off)."""
    override = os.environ.get(PERSIST_ENV, "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            value = -1.0
        if value >= 0 and value == value:  # not NaN
            return min(value, MAX_CONNECTION_PERSIST_S)
    return host.connection_persist_s


def transport_for(host: Host) -> Transport:
    """The transport a host needs: through the connection process unless it is turned off."""
    if host.is_local:
        return LocalTransport(host)
    persist = persist_seconds(host)
    if persist > 0:
        from .mux.client import MuxTransport

        return MuxTransport(host, persist)
    return SshTransport(host)


class TransportPool:
    """One transport (connection) per host, opened on first use and closed together."""

    def __init__(self) -> None:
        self._transports: dict[str, Transport] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Connection attempts a caller stopped waiting for (get's `within`), left to end.
        self._abandoned: set[asyncio.Task[Transport]] = set()

    async def get(self, host: Host, within: float | None = None) -> Transport:
        """The connected transport for `host`; raises HostUnreachable.

        With `within`, this caller waits that many seconds at most (then HostUnreachable),
        but the attempt itself is not cut short: other jobs of the host may be waiting for
        it behind the host's lock. It goes on alone (its connection kept for the next
        get, its failure dropped); `close` cancels it.
        """
        if within is None:
            return await self._get(host)
        attempt = asyncio.ensure_future(self._get(host))
        try:
            return await asyncio.wait_for(asyncio.shield(attempt), max(within, 0.0))
        except (asyncio.TimeoutError, TimeoutError):
            waited = round(within, 2)
            raise HostUnreachable(host.name, f"no connection within {waited:g}s") from None
        finally:
            if not attempt.done():
                self._abandoned.add(attempt)
                attempt.add_done_callback(self._forget)

    def _forget(self, attempt: asyncio.Task[Transport]) -> None:
        self._abandoned.discard(attempt)
        if not attempt.cancelled():
            attempt.exception()  # retrieved: nobody waits for it any more

    async def _get(self, host: Host) -> Transport:
        lock = self._locks.setdefault(host.name, asyncio.Lock())
        async with lock:  # one handshake per host even when many jobs ask at once
            transport = self._transports.get(host.name)
            if transport is None or transport.host != host:
                transport = transport_for(host)
                self._transports[host.name] = transport
            await transport.connect()
            return transport

    async def drop(self, host: Host) -> None:
        """Forget a host's connection (it failed); the next get() reconnects."""
        transport = self._transports.pop(host.name, None)
        if transport is not None:
            # Closing a connection that already broke may fail too; it is gone either way.
            with contextlib.suppress(Exception):
                await transport.close()

    async def close(self) -> None:
        """Close every connection (and stop the attempts nobody waits for)."""
        abandoned = list(self._abandoned)
        for attempt in abandoned:
            attempt.cancel()
        await asyncio.gather(*abandoned, return_exceptions=True)
        for transport in list(self._transports.values()):
            await transport.close()
        self._transports.clear()

    async def __aenter__(self) -> TransportPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
