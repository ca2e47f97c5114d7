"""Shared pieces of the benchmarks: loopback sshd hosts, an isolated environment, timers.

The hosts come from the test harness (`tests/sshd.py`, imported by path and not changed):
real `sshd -D` processes on 127.0.0.2.. with their own keys and known_hosts in a temporary
directory. `Bench` starts them, writes a cluster file whose workdirs live in that directory,
and gives every `sshwasm` subprocess a private HOME, data, cache and config directory, so a
benchmark never reads or writes the real home. Its `close()` (also on `with` exit, on
Ctrl-C and at interpreter exit) stops every server by PID.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = REPO / "tests" / "programs"
SYSTEM_RUSTC = Path("/usr/bin/rustc")
HOST_NAMES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")

# Exit status of a benchmark that cannot measure what it is for (e.g. a missing feature).
EXIT_UNAVAILABLE = 2


def _load_harness() -> ModuleType:
    """tests/sshd.py as a module, without putting tests/ on sys.path."""
    name = "sshwasm_bench_sshd"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "sshd.py")
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {REPO / 'tests' / 'sshd.py'}")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sshd = _load_harness()


# -- statistics ------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` (0..1) percentile, linearly interpolated between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> str:
    """`median (p10..p90, n=N)` in seconds, for a report line."""
    return (
        f"{median(values):.3f} s (p10 {percentile(values, 0.1):.3f} .. "
        f"p90 {percentile(values, 0.9):.3f}, n={len(values)})"
    )


def ratio_line(label: str, value: float, baseline: float, target: str) -> str:
    """One line `label: value / baseline = ratio× (target ...)`."""
    return f"{label}: {value / baseline:.2f}x  (target {target})"


def verdict(ok: bool) -> str:
    """A word for whether a target was met."""
    return "MET" if ok else "NOT MET"


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds `action()` took, and what it returned."""
    started = time.perf_counter()
    value = action()
    return time.perf_counter() - started, value


def banner(title: str) -> None:
    """A heading for a benchmark's report."""
    print(f"== {title} ==", flush=True)


# -- the bench -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostShape:
    """What the cluster file declares for one benchmark host."""

    cpus: int = 2
    memory_mb: int = 2048


class Bench:
    """N loopback sshd hosts, a cluster file naming them, and an isolated environment.

    Use as a context manager; the servers are stopped by PID when it exits, whatever
    happened, and the temporary directory is removed unless `keep` is true.
    """

    def __init__(
        self,
        hosts: int = 1,
        shape: HostShape | Mapping[str, HostShape] = HostShape(),
        *,
        keep: bool = False,
    ) -> None:
        if not 1 <= hosts <= len(HOST_NAMES):
            raise ValueError(f"between 1 and {len(HOST_NAMES)} hosts, not {hosts}")
        self.root = Path(tempfile.mkdtemp(prefix="sshwasm-bench-"))
        self.keep = keep
        self.names = HOST_NAMES[:hosts]
        self.shapes = (
            {name: shape for name in self.names}
            if isinstance(shape, HostShape)
            else {name: shape[name] for name in self.names}
        )
        self.kit: Any = None
        self.servers: dict[str, Any] = {}
        self.cluster_path = self.root / "cluster.yaml"
        self.workers = self.root / "workers"
        self.home = self.root / "home"
        self.env = self._isolated_env()
        self._closed = False

    # -- lifecycle

    def __enter__(self) -> Bench:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Create the key kit, start one sshd per host and write the cluster file."""
        sshd.check_prerequisites()
        self.kit = sshd.SshKit.create(self.root / "ssh")
        for index, name in enumerate(self.names):
            self.servers[name] = self.kit.server(name, f"127.0.0.{index + 2}")
        spec = {name: (shape.cpus, shape.memory_mb) for name, shape in self.shapes.items()}
        sshd.write_cluster(self.cluster_path, self.servers, self.kit, spec, self.workers)

    def close(self) -> None:
        """Stop every server by PID (checked), then remove the temporary directory."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop_mux()
            if self.kit is not None:
                self.kit.stop_all()
                left = self.kit.leftover_pids()
                if left:
                    print(f"benchmarks: sshd pids still alive: {left}", file=sys.stderr)
        finally:
            if self.keep:
                print(f"benchmarks: kept {self.root}", file=sys.stderr)
            else:
                shutil.rmtree(self.root, ignore_errors=True)

    @property
    def runtime_dir(self) -> Path:
        """sshwasm's runtime dir in the bench's home: the connection process's socket."""
        return self.home / ".run" / "sshwasm"

    def stop_mux(self) -> None:
        """Stop the bench's connection process (sshwasm.mux), if one is running: its PID is
        in its lock file."""
        lock = self.runtime_dir / "mux-1.lock"
        try:
            pid = int(lock.read_text().split()[0])
            # The PID of an exited process may be another's by now: check it is the mux.
            if b"sshwasm.mux" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.02)

    # -- environment

    def _isolated_env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("SSHWASM_") and key not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID")
        }
        # Users' interpreters cache bytecode; a shell that turned that off would make every
        # run pay for compiling sshwasm's modules (~30 ms) and skew the figures.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["HOME"] = str(self.home)
        for variable, relative in (
            ("XDG_CONFIG_HOME", ".config"),
            ("XDG_DATA_HOME", ".local/share"),
            ("XDG_CACHE_HOME", ".cache"),
            ("XDG_STATE_HOME", ".local/state"),
        ):
            env[variable] = str(self.home / relative)
        env["XDG_RUNTIME_DIR"] = str(self.home / ".run")
        env["SSHWASM_DATA_DIR"] = str(self.root / "data")
        env["SSHWASM_CACHE_DIR"] = str(self.root / "cache")
        env["SSHWASM_CONFIG_DIR"] = str(self.root / "config")
        env["SSHWASM_CLUSTER"] = str(self.cluster_path)
        if SYSTEM_RUSTC.exists():
            # Debian's rustc has the wasm32-wasi std; rustup's proxy would find no toolchain
            # under the private HOME anyway, this just skips probing it.
            env["SSHWASM_RUSTC"] = str(SYSTEM_RUSTC)
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True)
        return env

    # -- commands

    def sshwasm_argv(self, *args: str, python_flags: Sequence[str] = ()) -> list[str]:
        """The argv of `python -m sshwasm ARGS...` (how the tests run the real CLI)."""
        return [sys.executable, *python_flags, "-m", "sshwasm", *args]

    def sshwasm(
        self,
        *args: str,
        check: bool = False,
        stdout: Any = subprocess.PIPE,
        stderr: Any = subprocess.PIPE,
        timeout: float = 600,
        python_flags: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the real command line in the isolated environment; output as bytes."""
        completed = subprocess.run(
            self.sshwasm_argv(*args, python_flags=python_flags),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=self.env,
            cwd=self.root,
            timeout=timeout,
            check=False,
        )
        if check and completed.returncode != 0:
            raise BenchError(f"sshwasm {' '.join(args)} exited {completed.returncode}", completed)
        return completed

    def sshwasm_popen(self, *args: str, **options: Any) -> subprocess.Popen[bytes]:
        """Start the real command line in the isolated environment (caller waits for it)."""
        return subprocess.Popen(
            self.sshwasm_argv(*args),
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.root,
            **options,
        )

    def ssh_argv(self, name: str, *remote: str) -> list[str]:
        """An OpenSSH client argv logging in to host `name` with the kit's key only."""
        argv: list[str] = self.kit.ssh_command(self.servers[name], *remote)
        return argv

    def ssh(
        self, name: str, *remote: str, input_bytes: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run one command on host `name` with the OpenSSH client."""
        completed = subprocess.run(
            self.ssh_argv(name, *remote),
            input=input_bytes,
            stdin=None if input_bytes is not None else subprocess.DEVNULL,
            capture_output=True,
            env=self.env,
            cwd=self.root,
            timeout=120,
            check=False,
        )
        if check and completed.returncode != 0:
            raise BenchError(
                f"ssh {name} {' '.join(remote)} exited {completed.returncode}", completed
            )
        return completed

    def workdir(self, name: str) -> Path:
        """Host `name`'s workdir (absolute; loopback hosts share this filesystem)."""
        return (self.workers / name).absolute()

    def connect_kwargs(self, name: str, **overrides: Any) -> dict[str, Any]:
        """`asyncssh.connect` keyword arguments for host `name`, host key checked."""
        kwargs: dict[str, Any] = self.kit.connect_kwargs(self.servers[name], **overrides)
        return kwargs


class BenchError(RuntimeError):
    """A step of a benchmark failed; carries the process that failed, if any."""

    def __init__(
        self, message: str, completed: subprocess.CompletedProcess[bytes] | None = None
    ) -> None:
        if completed is not None:
            stderr = (completed.stderr or b"").decode(errors="replace").strip()
            message = f"{message}\n{stderr[-2000:]}" if stderr else message
        super().__init__(message)
        self.completed = completed


def program(name: str) -> Path:
    """A program under tests/programs (e.g. `tiny.rs`)."""
    path = PROGRAMS / name
    if not path.exists():
        raise BenchError(f"missing program {path}")
    return path


def sshwasm_has_option(option: str, command: str = "run") -> bool:
    """Whether this checkout's `sshwasm COMMAND --help` lists `option`."""
    completed = subprocess.run(
        [sys.executable, "-m", "sshwasm", command, "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    return option in completed.stdout


def run_main(main: Callable[[], int]) -> None:
    """Run a benchmark's main and exit with its status; BenchError prints one line."""
    try:
        status = main()
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)


def print_table(rows: Iterable[tuple[str, str]]) -> None:
    """Aligned `label  value` lines."""
    rows = list(rows)
    width = max((len(label) for label, _ in rows), default=0)
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
