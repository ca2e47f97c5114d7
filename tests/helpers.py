"""What the test modules share: running sshwasm and the runner, compiled guests, waiting.

Test modules import from here, `conftest` and `sshd` only, never from one another. The
session fixtures below (`built`, `guest`, `stager`, `live_launchers`) are registered by
`conftest`. Guests are built through `sshwasm.build` (the toolchain the user would get), and a
missing toolchain fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from ci_skips import beyond_our_control

from sshwasm.build import Artifact, build, find_rust_toolchain
from sshwasm.cli.parser import COORDINATE_COMMAND
from sshwasm.errors import ToolchainMissing
from sshwasm.runner.protocol import FrameDecoder, runner_version
from sshwasm.store import JobSpec

RUNNER_VERSION = runner_version()

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
PROGRAMS = REPO / "tests" / "programs"


def sshwasm(
    *args: str, stdin: bytes | None = None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real command line as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "sshwasm", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=os.environ.copy(),
    )


def start_sshwasm(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sshwasm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_streaming(*args: str) -> subprocess.Popen[bytes]:
    """Start sshwasm with unbuffered binary pipes: a test may readline() what has arrived so
    far and then communicate() without losing what was read ahead."""
    return subprocess.Popen(
        [sys.executable, "-m", "sshwasm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )


def record_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.stdout.strip(), result.stderr
    record: dict[str, Any] = json.loads(result.stdout)
    return record


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def moment(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def wait_for_state(job_id: int, states: Collection[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        result = sshwasm("status", str(job_id), "--json")
        if result.returncode == 0:  # else not submitted yet (still compiling)
            record = record_of(result)
            if record["state"] in states:
                return record
        assert time.monotonic() < deadline, result.stdout + result.stderr
        time.sleep(0.2)


def forbid_subprocesses(monkeypatch: pytest.MonkeyPatch) -> list[Sequence[Any]]:
    """Make any attempt to start a process fail loudly; returns the attempts made."""
    attempts: list[Sequence[Any]] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise AssertionError(f"unexpected subprocess: {args!r}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    return attempts


def run_wasm(
    module: Path,
    tmp_path: Path,
    args: Sequence[str] = (),
    env: Sequence[tuple[str, str]] = (),
    stdin: str | None = None,
    memory_bytes: int | None = None,
    interrupt_after_s: float | None = None,
) -> tuple[int | str, str, str]:
    """Run a module under wasmtime; return (exit code or trap name, stdout, stderr)."""
    from wasmtime import (
        Config,
        Engine,
        ExitTrap,
        Func,
        Linker,
        Module,
        Store,
        Trap,
        WasiConfig,
    )

    config = Config()
    config.epoch_interruption = True
    engine = Engine(config)
    linker = Linker(engine)
    linker.define_wasi()
    store = Store(engine)
    store.set_epoch_deadline(1)
    if memory_bytes is not None:
        store.set_limits(memory_size=memory_bytes)
    wasi = WasiConfig()
    wasi.argv = ["prog", *args]
    wasi.env = [list(pair) for pair in env]
    if stdin is not None:
        (tmp_path / "stdin").write_text(stdin)
        wasi.stdin_file = str(tmp_path / "stdin")
    wasi.stdout_file = str(tmp_path / "stdout")
    wasi.stderr_file = str(tmp_path / "stderr")
    store.set_wasi(wasi)
    instance = linker.instantiate(store, Module.from_file(engine, str(module)))
    timer = None
    if interrupt_after_s is not None:
        timer = threading.Timer(interrupt_after_s, engine.increment_epoch)
        timer.start()
    outcome: int | str
    start = instance.exports(store)["_start"]
    assert isinstance(start, Func)
    try:
        start(store)
        outcome = 0
    except ExitTrap as exc:
        outcome = exc.code
    except Trap as exc:
        outcome = exc.trap_code.name if exc.trap_code is not None else str(exc)
    finally:
        if timer is not None:
            timer.cancel()
    return outcome, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


# The runner package; `python RUNNER COMMAND ...` runs it as a directory.
RUNNER = Path(__file__).resolve().parents[1] / "sshwasm" / "runner"
# Put into the runner's own environment; a guest must never see it.
LEAK_MARKER = ("SSHWASM_TEST_WORKER_SECRET", "worker-only")

# One guest with a mode per behaviour, so the session compiles a single module.
GUEST_SOURCE = r"""
use std::io::{Read, Write};

fn spin() -> u64 {
    let mut x: u64 = 1;
    loop {
        let y = unsafe { std::ptr::read_volatile(&x) };
        let z = y.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        unsafe { std::ptr::write_volatile(&mut x, z) };
        if z == 0 {
            return z;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(|s| s.as_str()).unwrap_or("hello");
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match mode {
        "hello" => {
            out.write_all(b"hello from wasm\n").unwrap();
        }
        "echo" => {
            for a in &args {
                out.write_all(a.as_bytes()).unwrap();
                out.write_all(b"\0").unwrap();
            }
            out.write_all(b"\x01").unwrap();
            for (k, v) in std::env::vars() {
                out.write_all(k.as_bytes()).unwrap();
                out.write_all(b"\0").unwrap();
                out.write_all(v.as_bytes()).unwrap();
                out.write_all(b"\0").unwrap();
            }
            out.write_all(b"\x01").unwrap();
            let mut data = Vec::new();
            std::io::stdin().read_to_end(&mut data).unwrap();
            out.write_all(&data).unwrap();
        }
        "exit" => {
            std::process::exit(args[2].parse().unwrap());
        }
        "panic" => {
            panic!("boom from the guest");
        }
        "alloc" => {
            let mut blocks: Vec<Vec<u8>> = Vec::new();
            loop {
                let block = vec![7u8; 1 << 20];
                let first = unsafe { std::ptr::read_volatile(&block[0]) };
                if first != 7 {
                    break;
                }
                blocks.push(block);
            }
            println!("{}", blocks.len());
        }
        "spin" => {
            println!("{}", spin());
        }
        "held" => {
            // Runs until the test releases it (see `release`): a job that is surely still
            // running whenever the test looks, however slow the machine. Gives up after
            // about a minute so a failed test leaves no guest behind.
            out.write_all(b"start\n").unwrap();
            out.flush().unwrap();
            let mut waited = 0;
            while std::fs::metadata("/input/release").is_err() {
                if waited == 6000 {
                    std::process::exit(3);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
                waited += 1;
            }
            out.write_all(b"end\n").unwrap();
        }
        "sleep" => {
            out.write_all(b"start\n").unwrap();
            out.flush().unwrap();
            let secs: u64 = args[2].parse().unwrap();
            std::thread::sleep(std::time::Duration::from_secs(secs));
            out.write_all(b"end\n").unwrap();
        }
        "read" => match std::fs::read(&args[2]) {
            Ok(data) => {
                out.write_all(&data).unwrap();
            }
            Err(e) => {
                eprintln!("cannot read {}: {}", args[2], e);
                std::process::exit(5);
            }
        },
        "output" => {
            let n: usize = args[2].parse().unwrap();
            let m: usize = args[3].parse().unwrap();
            let text: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            out.write_all(&text).unwrap();
            out.flush().unwrap();
            let err: Vec<u8> = (0..m).map(|i| b'0' + (i % 10) as u8).collect();
            std::io::stderr().write_all(&err).unwrap();
        }
        _ => std::process::exit(99),
    }
}
"""


@dataclass(frozen=True)
class Guest:
    """The compiled probe module."""

    data: bytes
    sha256: str


@dataclass
class Outcome:
    """What one frame-speaking runner command sent back."""

    returncode: int
    frames: list[tuple[bytes, bytes]]
    stderr: bytes

    def payloads(self, kind: bytes) -> list[bytes]:
        return [payload for frame_kind, payload in self.frames if frame_kind == kind]

    def stdout(self) -> bytes:
        return b"".join(self.payloads(b"O"))

    def stderr_stream(self) -> bytes:
        return b"".join(self.payloads(b"E"))

    def json_of(self, kind: bytes) -> dict[str, object]:
        (payload,) = self.payloads(kind)
        value = json.loads(payload)
        assert isinstance(value, dict)
        return value

    def result(self) -> dict[str, object]:
        assert self.frames, f"no frames; stderr: {self.stderr!r}"
        kind, payload = self.frames[-1]
        assert kind == b"R", self.frames
        value = json.loads(payload)
        assert isinstance(value, dict)
        return value


def build_in_session(sources: Sequence[Path], cache: Path, home: Path) -> list[Artifact]:
    """Build `sources` in parallel with the toolchain a user would get; fail without one.

    Session fixtures run outside `isolated_home`, so HOME and SSHWASM_RUSTC are pinned here.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        patch.delenv("SSHWASM_RUSTC", raising=False)
        try:
            find_rust_toolchain(cache)
        except ToolchainMissing as exc:
            # Never skip: a green run must mean the guests were really built and run.
            pytest.fail(f"no Rust toolchain for wasm32-wasi: {exc}", pytrace=False)
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(lambda source: build(source, cache), sources))


def compile_guest(source_text: str, build_dir: Path, cache: Path) -> Guest:
    """Compile Rust source text to a wasm32-wasi guest through `sshwasm.build`."""
    source = build_dir / "guest.rs"
    source.write_text(source_text)
    (artifact,) = build_in_session([source], cache, build_dir / "home")
    return Guest(artifact.path.read_bytes(), artifact.sha256)


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory, shared_cache_dir: Path) -> Guest:
    """The probe guest (GUEST_SOURCE), compiled once per session."""
    return compile_guest(GUEST_SOURCE, tmp_path_factory.mktemp("guest"), shared_cache_dir / "wasm")


def runner_env() -> dict[str, str]:
    env = dict(os.environ)
    env[LEAK_MARKER[0]] = LEAK_MARKER[1]
    return env


def run_runner(
    *args: str, stdin: bytes = b"", python: list[str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    command = [*(python or [sys.executable]), str(RUNNER), *args]
    return subprocess.run(
        command, input=stdin, capture_output=True, timeout=timeout, env=runner_env()
    )


def decode(stream: bytes) -> list[tuple[bytes, bytes]]:
    decoder = FrameDecoder()
    frames = decoder.feed(stream)
    assert decoder.pending == 0, "the stream ended inside a frame"
    return frames


def run_frames(*args: str, stdin: bytes = b"", python: list[str] | None = None) -> Outcome:
    done = run_runner(*args, stdin=stdin, python=python)
    return Outcome(done.returncode, decode(done.stdout), done.stderr)


class LiveLauncher:
    """A launch whose frames are read as they come, so the test can act mid-job."""

    def __init__(self, workdir: Path, job_id: str, spec: bytes) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(RUNNER), "launch", str(workdir), job_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=runner_env(),
        )
        assert self.process.stdin is not None
        self.process.stdin.write(spec)
        self.process.stdin.close()
        self.decoder = FrameDecoder()
        self.frames: list[tuple[bytes, bytes]] = []
        self.job_dir = workdir / "jobs" / job_id

    def read_until(self, kind: bytes, timeout: float = 30) -> dict[str, object]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for frame_kind, payload in self.frames:
                if frame_kind == kind:
                    value = json.loads(payload)
                    assert isinstance(value, dict)
                    return value
            data = os.read(self.process.stdout.fileno(), 65536)
            if not data:
                break
            self.frames += self.decoder.feed(data)
        raise AssertionError(f"no {kind!r} frame; got {self.frames}")

    def close_stdout(self) -> None:
        assert self.process.stdout is not None
        self.process.stdout.close()

    def finish(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def live_launchers() -> Iterator[Callable[[Path, str, bytes], LiveLauncher]]:
    started: list[LiveLauncher] = []

    def start(workdir: Path, job_id: str, spec: bytes) -> LiveLauncher:
        launcher = LiveLauncher(workdir, job_id, spec)
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.finish()


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    """True when pid no longer runs; a zombie waiting for its reaper counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] in ("Z", "X")


def held_spec(guest: Guest, key: str | None = None) -> bytes:
    """A launch stream (or, with `key`, a serve L payload) of `probe held`: it prints
    "start", then runs until `release(job_dir)`, then prints "end" and succeeds."""
    spec: dict[str, object] = {
        "runner_version": RUNNER_VERSION,
        "wasm_sha256": guest.sha256,
        "argv": ["probe", "held"],
        "env": [],
        "memory_mb": 64,
        "time_limit_s": None,
        "output": False,
        "input_tar_bytes": len(HELD_INPUT),
    }
    if key is not None:
        spec["key"] = key
    return json.dumps(spec).encode() + b"\n" + HELD_INPUT


def _held_input() -> bytes:
    """A tar of one placeholder file: staging it gives the held guest its /input."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        member = tarfile.TarInfo("held")
        member.size = 0
        archive.addfile(member, io.BytesIO(b""))
    return buffer.getvalue()


HELD_INPUT = _held_input()


def release(job_dir: Path) -> None:
    """Let a `held_spec` job finish: the file it waits for appears in its /input."""
    inputs = job_dir / "input"
    inputs.chmod(0o700)  # the runner may have made the staged input read-only
    (inputs / "release").write_bytes(b"")


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Hold process `pid` stopped (SIGSTOP) inside the block: it cannot finish meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def holds(path: Path, expected: bytes) -> bool:
    """True once `path` exists with exactly `expected` in it."""
    try:
        return path.read_bytes() == expected
    except FileNotFoundError:
        return False


def read_result(job_dir: Path) -> dict[str, object]:
    value = json.loads((job_dir / "result.json").read_text())
    assert isinstance(value, dict)
    return value


# Pythons as old as the runner promises its hosts (3.9, see sshwasm/runner/__init__.py),
# installed beside this one (a pyenv layout). Where there are none, vermin still checks the
# promise (tests/test_runner.py); these run the runner there for real.
OLD_PYTHONS = sorted(Path(sys.base_prefix).parent.glob("3.9.*/bin/python3"))
OLD_PYTHONS_MISSING = beyond_our_control("no Python 3.9 installed beside this one")

STAGE_SOURCE = PROGRAMS / "stage.rs"


@pytest.fixture(scope="session")
def stager(tmp_path_factory: pytest.TempPathFactory, shared_cache_dir: Path) -> Guest:
    """tests/programs/stage.rs, the staging probe, compiled once per session."""
    build_dir = tmp_path_factory.mktemp("stage")
    return compile_guest(STAGE_SOURCE.read_text(), build_dir, shared_cache_dir / "wasm")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, shared_cache_dir: Path) -> dict[str, Artifact]:
    """Every example and test program compiled once, in parallel, into the session cache."""
    sources = sorted(EXAMPLES.glob("*.rs")) + sorted(
        path for path in PROGRAMS.glob("*.rs") if path.stem != "compile_error"
    )
    home = tmp_path_factory.mktemp("session-home")
    artifacts = build_in_session(sources, shared_cache_dir / "wasm", home)
    return {source.stem: artifact for source, artifact in zip(sources, artifacts, strict=True)}


def job_spec(cpus: int = 1, memory_mb: int = 100, name: str | None = "job") -> JobSpec:
    """A submittable job for store-level tests (no real module behind it)."""
    return JobSpec(
        name=name,
        cpus=cpus,
        memory_mb=memory_mb,
        time_limit_s=None,
        source="/src/hello.rs",
        language="rust",
        wasm_sha256="0" * 64,
        wasm_bytes=10,
        wasm_path="/cache/x.wasm",
        compile_s=0.5,
        argv=("hello", "a b"),
        env=(("K", "v"),),
    )


def mux_processes(runtime_dir: Path) -> list[int]:
    """PIDs of connection processes (`python -m sshwasm.mux --dir DIR`) serving `runtime_dir`,
    found by command line like detached coordinators."""
    return processes_whose_argv(
        lambda argv: b"sshwasm.mux" in argv and str(runtime_dir).encode() in argv
    )


def processes_whose_argv(matches: Callable[[list[bytes]], bool]) -> list[int]:
    """PIDs of the processes whose command line (argv, as bytes) `matches`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if matches(argv):
            found.append(int(entry.name))
    return found


def stop_mux_processes(runtime_dir: Path) -> list[int]:
    """SIGTERM every connection process of `runtime_dir`, SIGKILL what outlives 5 s; their PIDs."""
    pids = mux_processes(runtime_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(not process_gone(pid) for pid in pids):
        time.sleep(0.02)
    for pid in pids:
        if not process_gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


def detached_coordinators(db: Path, job_id: int | None = None) -> list[int]:
    """PIDs of the detached coordinators (`sshwasm --db DB ... _coordinate ID...`) of jobs
    file `db`, or only the one following `job_id`; found by command line, as no record holds
    it."""
    command = COORDINATE_COMMAND.encode()

    def follows(argv: list[bytes]) -> bool:
        if command not in argv or str(db).encode() not in argv:
            return False
        return job_id is None or str(job_id).encode() in argv[argv.index(command) + 1 :]

    return processes_whose_argv(follows)
