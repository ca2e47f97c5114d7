"""The runner's serve command: many tasks through one process, each a fork, with real wasmtime."""

from __future__ import annotations

import hashlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    OLD_PYTHONS,
    OLD_PYTHONS_MISSING,
    RUNNER,
    RUNNER_VERSION,
    Guest,
    held_spec,
    holds,
    process_gone,
    read_result,
    release,
    run_frames,
    run_runner,
    runner_env,
    wait_for,
)

from sshwasm.runner.protocol import FrameDecoder, encode_frame


@pytest.fixture
def workdir(tmp_path: Path, guest: Guest) -> Path:
    path = tmp_path / "wd"
    done = run_runner("put-module", str(path), guest.sha256, stdin=guest.data)
    assert done.returncode == 0, done.stderr
    return path


def task_spec(
    guest: Guest,
    key: str,
    argv: list[str],
    *,
    env: list[list[str]] | None = None,
    memory_mb: int = 64,
    time_limit_s: float | None = None,
    stdin: bytes | None = None,
    input_tar: bytes | None = None,
    output: bool = False,
    max_output_bytes: int | None = None,
) -> bytes:
    """An L payload: launch's stdin bytes, with the task's key in the spec."""
    spec: dict[str, object] = {
        "runner_version": RUNNER_VERSION,
        "key": key,
        "wasm_sha256": guest.sha256,
        "argv": argv,
        "env": env or [],
        "memory_mb": memory_mb,
        "time_limit_s": time_limit_s,
        "output": output,
    }
    if stdin is not None:
        spec["stdin_bytes"] = len(stdin)
    if input_tar is not None:
        spec["input_tar_bytes"] = len(input_tar)
    if max_output_bytes is not None:
        spec["max_output_bytes"] = max_output_bytes
    return json.dumps(spec).encode() + b"\n" + (stdin or b"") + (input_tar or b"")


class Task:
    """Everything serve said about one key."""

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bytes]] = []

    def kinds(self) -> list[bytes]:
        return [kind for kind, _ in self.frames]

    def json_of(self, kind: bytes) -> dict[str, object]:
        (payload,) = [body for frame_kind, body in self.frames if frame_kind == kind]
        value = json.loads(payload)
        assert isinstance(value, dict)
        return value

    def stdout(self) -> bytes:
        return b"".join(body for kind, body in self.frames if kind == b"O")

    def stderr(self) -> bytes:
        return b"".join(body for kind, body in self.frames if kind == b"E")

    @property
    def done(self) -> bool:
        return bool(self.frames) and self.frames[-1][0] in (b"R", b"X", b"N")

    def result(self) -> dict[str, object]:
        assert self.kinds()[-1] == b"R", self.frames
        return self.json_of(b"R")


class Session:
    """A serve process driven frame by frame, its replies routed by key."""

    def __init__(self, workdir: Path, python: list[str] | None = None) -> None:
        self.process = subprocess.Popen(
            [*(python or [sys.executable]), str(RUNNER), "serve", str(workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=runner_env(),
        )
        self.decoder = FrameDecoder()
        self.session: list[tuple[bytes, bytes]] = []  # frames about no task
        self.tasks: dict[str, Task] = {}
        self.eof = False
        self.handshaken = False

    def send(self, kind: bytes, payload: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(encode_frame(kind, payload))
        self.process.stdin.flush()

    def hello(self, version: str = RUNNER_VERSION) -> dict[str, object]:
        self.send(b"H", json.dumps({"runner_version": version}).encode())
        self.read_until(lambda: bool(self.session))
        kind, payload = self.session[0]
        assert kind == b"H", self.session
        value = json.loads(payload)
        assert isinstance(value, dict)
        return value

    def launch(self, payload: bytes) -> None:
        self.send(b"L", payload)

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def task(self, key: str) -> Task:
        return self.tasks.setdefault(key, Task())

    def pump(self, timeout: float) -> None:
        """Read whatever frames arrive within `timeout` (or until EOF)."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return
        data = os.read(fd, 1 << 16)
        if not data:
            self.eof = True
            return
        for kind, payload in self.decoder.feed(data):
            # The handshake's answers carry no key; every later frame does.
            if kind == b"H" or (kind == b"N" and not self.handshaken):
                self.handshaken = True
                self.session.append((kind, payload))
                continue
            key, _, body = payload.partition(b"\n")
            if not key:
                self.session.append((kind, body))
            else:
                self.task(key.decode()).frames.append((kind, body))

    def read_until(self, predicate: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"not reached; session {self.session}, tasks {self.tasks}")
            self.pump(0.1)

    def wait_done(self, *keys: str, timeout: float = 60) -> None:
        self.read_until(lambda: all(self.task(key).done for key in keys), timeout)

    def read_to_end(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while not self.eof:
            assert time.monotonic() < deadline, "serve did not end"
            self.pump(0.1)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def sessions() -> Iterator[Callable[..., Session]]:
    started: list[Session] = []

    def start(workdir: Path, python: list[str] | None = None) -> Session:
        session = Session(workdir, python)
        started.append(session)
        return session

    yield start
    for session in started:
        session.stop()


# ------------------------------------------------------------------------- handshake


def test_the_handshake_names_the_process_and_wasmtime(
    workdir: Path, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    hello = session.hello()
    assert hello["pid"] == session.process.pid
    assert isinstance(hello["wasmtime_version"], str) and hello["error"] is None
    session.close_stdin()
    assert session.read_to_end() == 0


def test_another_runner_version_needs_the_runner(
    workdir: Path, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.send(b"H", json.dumps({"runner_version": "0" * 16}).encode())
    assert session.read_to_end() == 0
    assert session.session == [(b"N", b'{"need": "runner"}')]


def test_a_host_without_wasmtime_says_so_in_the_handshake(
    workdir: Path, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir, python=[sys.executable, "-S", "-I"])
    hello = session.hello()
    assert hello["wasmtime_version"] is None
    assert "wasmtime" in str(hello["error"])
    assert session.read_to_end() == 0


def test_a_stream_of_garbage_is_a_protocol_error(
    workdir: Path, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    assert session.process.stdin is not None
    session.process.stdin.write(b"Welcome to the cluster! " * 10)
    session.process.stdin.flush()
    assert session.read_to_end() == 0
    ((kind, payload),) = session.session
    assert kind == b"X" and json.loads(payload)["kind"] == "protocol"


def test_a_launch_before_the_handshake_is_a_protocol_error(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.launch(task_spec(guest, "t1", ["probe", "hello"]))
    assert session.read_to_end() == 0
    assert json.loads(session.session[0][1])["kind"] == "protocol"
    assert not (workdir / "jobs" / "t1").exists()


# --------------------------------------------------------------------------- tasks


def test_fifty_tasks_each_get_their_own_output_and_result(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    keys = [f"t{index}" for index in range(50)]
    for index, key in enumerate(keys):
        env = [["SSHWASM_ARRAY_TASK_ID", str(index)], ["WORD", "x" * index]]
        session.launch(task_spec(guest, key, ["probe", "echo", f"arg {index}"], env=env))
    session.close_stdin()
    assert session.read_to_end() == 0
    assert session.session[1:] == []
    assert sorted(session.tasks) == sorted(keys)
    for index, key in enumerate(keys):
        task = session.task(key)
        assert task.kinds()[0] == b"S" and task.kinds()[-1] == b"R"
        argv, env, stdin = task.stdout().split(b"\x01", 2)
        assert argv == f"probe\0echo\0arg {index}\0".encode()
        assert env == f"SSHWASM_ARRAY_TASK_ID\0{index}\0WORD\0{'x' * index}\0".encode()
        assert stdin == b""
        result = task.result()
        assert result["state"] == "succeeded"
        job_dir = workdir / "jobs" / key
        assert read_result(job_dir) == result
        assert (job_dir / "stdout").read_bytes() == task.stdout()
        assert task.json_of(b"S")["job_dir"] == str(job_dir)
    # The module was loaded once: the first task to start paid for it, no other did.
    cached = [session.task(key).result()["module_cached"] for key in keys]
    assert cached.count(False) == 1


def test_output_and_results_of_a_task_arrive_whole_and_keyed(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    session.launch(task_spec(guest, "big", ["probe", "output", "200000", "70000"]))
    session.launch(task_spec(guest, "exit", ["probe", "exit", "3"]))
    session.launch(task_spec(guest, "panic", ["probe", "panic"]))
    session.launch(task_spec(guest, "stdin", ["probe", "echo"], stdin=b"in\x00put"))
    session.wait_done("big", "exit", "panic", "stdin")
    big = session.task("big")
    assert len(big.stdout()) == 200000 and len(big.stderr()) == 70000
    assert all(len(body) <= 64 * 1024 for kind, body in big.frames if kind in (b"O", b"E"))
    # A task's output frames come after it ended, all together, just before its R.
    kinds = big.kinds()
    assert kinds[0] == b"S" and kinds[-1] == b"R"
    assert set(kinds[1:-1]) == {b"O", b"E"}
    assert kinds.index(b"E") > max(i for i, kind in enumerate(kinds) if kind == b"O")
    assert (session.task("exit").result()["state"], session.task("exit").result()["exit_code"]) == (
        "failed",
        3,
    )
    assert session.task("panic").result()["exit_code"] == 134
    assert b"boom from the guest" in session.task("panic").stderr()
    assert session.task("stdin").stdout().split(b"\x01", 2)[2] == b"in\x00put"


def test_an_unknown_module_is_needed_then_runs_after_put_module(
    tmp_path: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    workdir = tmp_path / "empty"
    session = sessions(workdir)
    session.hello()
    payload = task_spec(guest, "t1", ["probe", "hello"])
    session.launch(payload)
    session.wait_done("t1")
    assert session.task("t1").frames == [(b"N", b'{"need": "module"}')]
    assert not (workdir / "jobs" / "t1").exists()
    put = run_runner("put-module", str(workdir), guest.sha256, stdin=guest.data)
    assert put.returncode == 0, put.stderr
    session.tasks.clear()
    session.launch(payload)
    session.wait_done("t1")
    task = session.task("t1")
    assert task.stdout() == b"hello from wasm\n"
    assert task.result()["state"] == "succeeded"
    assert task.result()["module_cached"] is False
    assert isinstance(task.result()["module_compile_s"], float)


def test_refused_launches_are_answered_by_key(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    session.launch(task_spec(guest, "t1", ["probe", "hello"]))
    session.wait_done("t1")
    session.launch(task_spec(guest, "t1", ["probe", "hello"]))
    bad = json.loads(task_spec(guest, "t2", ["probe"]).split(b"\n")[0])
    bad["memory_mb"] = "lots"
    session.launch(json.dumps(bad).encode() + b"\n")
    bad_key = json.loads(task_spec(guest, "x", ["probe"]).split(b"\n")[0])
    bad_key["key"] = "../escape"
    session.launch(json.dumps(bad_key).encode() + b"\n")
    session.close_stdin()
    assert session.read_to_end() == 0
    assert session.task("t1").kinds()[-1] == b"X"
    assert session.task("t1").json_of(b"X")["kind"] == "exists"
    assert session.task("t2").json_of(b"X")["kind"] == "spec"
    assert not (workdir / "jobs" / "t2").exists()
    ((kind, payload),) = session.session[1:]
    assert kind == b"X" and json.loads(payload)["kind"] == "spec"
    assert not (workdir / "escape").exists()


def test_a_module_that_cannot_load_fails_its_task_as_under_execute(
    workdir: Path, sessions: Callable[..., Session]
) -> None:
    junk = b"\0asm\x01\0\0\0 this is no module"
    bad = Guest(junk, hashlib.sha256(junk).hexdigest())
    assert run_runner("put-module", str(workdir), bad.sha256, stdin=junk).returncode == 0
    session = sessions(workdir)
    session.hello()
    session.launch(task_spec(bad, "t1", ["bad"]))
    session.wait_done("t1")
    served = session.task("t1").result()
    launched = run_frames(
        "launch",
        str(workdir),
        "t2",
        stdin=task_spec(bad, "t2", ["bad"]),
    ).result()
    assert served["state"] == launched["state"] == "failed"
    assert str(served["error"]).startswith("cannot load the module")
    assert served["error"] == launched["error"]


def test_staged_input_and_output_work_under_serve(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        member = tarfile.TarInfo("in.txt")
        member.size = 6
        archive.addfile(member, io.BytesIO(b"staged"))
    session = sessions(workdir)
    session.hello()
    session.launch(
        task_spec(guest, "t1", ["probe", "read", "/input/in.txt"], input_tar=buffer.getvalue())
    )
    symlink = tarfile.TarInfo("link")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, "/etc/hostname"
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as archive:
        archive.addfile(symlink)
    session.launch(task_spec(guest, "t2", ["probe", "hello"], input_tar=evil.getvalue()))
    session.launch(task_spec(guest, "t3", ["probe", "hello"], output=True))
    session.wait_done("t1", "t2", "t3")
    assert session.task("t1").stdout() == b"staged"
    assert session.task("t2").json_of(b"X")["kind"] == "input"
    assert not (workdir / "jobs" / "t2").exists()
    assert (workdir / "jobs" / "t3" / "output").is_dir()


# -------------------------------------------------------------------------- limits


def test_time_and_memory_limits_hold_under_serve(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    started = time.monotonic()
    session.launch(task_spec(guest, "spin", ["probe", "spin"], time_limit_s=1))
    session.launch(task_spec(guest, "sleep", ["probe", "sleep", "30"], time_limit_s=1))
    session.launch(task_spec(guest, "alloc", ["probe", "alloc"], memory_mb=16))
    session.launch(task_spec(guest, "small", ["probe", "hello"], memory_mb=1))
    session.wait_done("spin", "sleep", "alloc", "small")
    assert time.monotonic() - started < 20
    spin, sleep = session.task("spin").result(), session.task("sleep").result()
    assert (spin["state"], spin["exit_code"]) == ("timeout", 124)
    assert (sleep["state"], sleep["exit_code"]) == ("timeout", 124)
    for result in (spin, sleep):
        assert result["error"] == "time limit of 1 s exceeded (ended by the watchdog)"
    assert session.task("sleep").stdout() == b"start\n"
    alloc = session.task("alloc").result()
    assert alloc["state"] == "out_of_memory" and "16 MiB" in str(alloc["error"])
    peak = alloc["peak_memory_bytes"]
    assert isinstance(peak, int) and 8 << 20 < peak <= 16 << 20
    assert "needs at least 2 MiB" in str(session.task("small").result()["error"])
    # The serve process itself is alive, idle, and never ran a guest.
    assert session.process.poll() is None


def test_the_serve_process_holds_no_threads_when_it_forks(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    # Both engines, a compile of each flavour (in the helper) and runs of each.
    session.launch(task_spec(guest, "t1", ["probe", "hello"]))
    session.launch(task_spec(guest, "t2", ["probe", "hello"], time_limit_s=30))
    session.wait_done("t1", "t2")
    assert os.listdir(f"/proc/{session.process.pid}/task") == [str(session.process.pid)]
    session.launch(task_spec(guest, "t3", ["probe", "hello"], time_limit_s=30))
    session.wait_done("t3")
    assert session.task("t3").result()["module_cached"] is True


# ---------------------------------------------------- detachment, attach, poll, cancel


def test_tasks_outlive_a_killed_serve_and_attach_collects_them(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    keys = ["a", "b", "c"]
    for key in keys:
        session.launch(task_spec(guest, key, ["probe", "sleep", "2"]))
    session.read_until(lambda: all(b"S" in session.task(key).kinds() for key in keys))
    pids = [session.task(key).json_of(b"S")["pid"] for key in keys]
    os.kill(session.process.pid, signal.SIGKILL)
    session.process.wait()
    for key in keys:
        polled = run_frames("poll", str(workdir), key, "0", "0")
        assert polled.frames[-1][0] in (b"A", b"R")
        attached = run_frames("attach", str(workdir), key, "0", "0")
        assert attached.stdout() == b"start\nend\n"
        assert attached.result()["state"] == "succeeded"
    for pid in pids:
        assert isinstance(pid, int)
        wait_for(lambda pid=pid: process_gone(pid))


def test_poll_sees_a_serve_task_alive_then_finished(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    session.launch(held_spec(guest, key="t1"))
    session.read_until(lambda: b"S" in session.task("t1").kinds())
    job_dir = workdir / "jobs" / "t1"
    wait_for(lambda: holds(job_dir / "stdout", b"start\n"))
    running = run_frames("poll", str(workdir), "t1", "0", "0")
    assert running.frames[-1] == (b"A", b'{"alive": true}')
    release(job_dir)
    session.wait_done("t1")
    finished = run_frames("poll", str(workdir), "t1", "6", "0")
    assert finished.stdout() == b"end\n"
    assert finished.result() == session.task("t1").result()


def test_cancel_kills_a_serve_task_and_serve_reports_it(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    session.launch(task_spec(guest, "t1", ["probe", "sleep", "30"]))
    session.launch(task_spec(guest, "t2", ["probe", "sleep", "1"]))
    session.read_until(lambda: b"S" in session.task("t1").kinds())
    pid = session.task("t1").json_of(b"S")["pid"]
    assert isinstance(pid, int)
    wait_for(lambda: holds(workdir / "jobs" / "t1" / "stdout", b"start\n"))
    started = time.monotonic()
    done = run_runner("cancel", str(workdir), "t1")
    assert json.loads(done.stdout) == {"state": "cancelled"}
    assert process_gone(pid)
    session.wait_done("t1", "t2")
    assert time.monotonic() - started < 10
    result = session.task("t1").result()
    assert (result["state"], result["exit_code"]) == ("cancelled", 143)
    assert session.task("t1").stdout() == b"start\n"
    assert session.task("t2").result()["state"] == "succeeded"


def test_a_task_killed_from_outside_gets_a_failed_result(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    session.launch(task_spec(guest, "t1", ["probe", "sleep", "30"]))
    session.read_until(lambda: b"S" in session.task("t1").kinds())
    pid = session.task("t1").json_of(b"S")["pid"]
    assert isinstance(pid, int)
    wait_for(lambda: holds(workdir / "jobs" / "t1" / "stdout", b"start\n"))
    os.kill(pid, signal.SIGKILL)
    session.wait_done("t1")
    result = session.task("t1").result()
    assert result["state"] == "failed"
    assert str(result["error"]).startswith("runner process died without a result")
    assert "signal 9" in str(result["error"])
    assert read_result(workdir / "jobs" / "t1") == result


def test_at_eof_serve_finishes_running_tasks_then_exits(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    session.launch(task_spec(guest, "t1", ["probe", "sleep", "1"]))
    session.close_stdin()
    assert session.read_to_end() == 0
    assert session.task("t1").stdout() == b"start\nend\n"
    assert session.task("t1").result()["state"] == "succeeded"


def test_with_its_reader_gone_serve_waits_for_its_tasks_then_exits(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    session = sessions(workdir)
    session.hello()
    session.launch(task_spec(guest, "t1", ["probe", "sleep", "2"]))
    session.launch(task_spec(guest, "t2", ["probe", "hello"]))
    session.read_until(lambda: b"S" in session.task("t1").kinds())
    assert session.process.stdout is not None
    session.process.stdout.close()
    session.close_stdin()
    assert session.process.wait(timeout=30) == 0
    assert session.process.stderr is not None and session.process.stderr.read() == b""
    for key in ("t1", "t2"):
        assert read_result(workdir / "jobs" / key)["state"] == "succeeded"


@pytest.mark.skipif(not OLD_PYTHONS, reason=OLD_PYTHONS_MISSING)
@pytest.mark.parametrize("python", OLD_PYTHONS, ids=lambda path: path.parent.parent.name)
def test_serve_starts_on_older_pythons(
    workdir: Path, sessions: Callable[..., Session], python: Path
) -> None:
    session = sessions(workdir, python=[str(python)])
    hello = session.hello()
    assert hello["pid"] == session.process.pid
    if hello["error"] is not None:
        assert "wasmtime" in str(hello["error"])
        assert session.read_to_end() == 0
    else:
        session.close_stdin()
        assert session.read_to_end() == 0


# ------------------------------------------------------------ the pool of executors


def _children(pid: int) -> list[int]:
    """The live (not zombie) child processes of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def test_pooled_executors_run_tasks_in_turn_fresh_and_are_replaced_when_killed(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    """One executor runs tasks one after another, each in a fresh Store and WASI context
    (no memory, environment or arguments of the one before); a task ended at its time
    limit (busy or blocked in a host call) or cancelled takes its executor with it, and
    the next task gets a new one."""
    session = sessions(workdir)
    session.hello()

    def run(key: str, payload: bytes) -> tuple[int, dict[str, object]]:
        session.launch(payload)
        session.wait_done(key)
        pid = session.task(key).json_of(b"S")["pid"]
        assert isinstance(pid, int)
        return pid, session.task(key).result()

    first, alloc = run("p1", task_spec(guest, "p1", ["probe", "alloc"], memory_mb=16,
                                       env=[["SECRET", "one"]]))  # fmt: skip
    assert alloc["state"] == "out_of_memory"
    # The pid files of an executor's later tasks are links to its first task's; with that
    # directory gone, they are written again (and WORKDIR/jobs, gone too, is made again).
    shutil.rmtree(workdir / "jobs")
    again, echo = run("p2", task_spec(guest, "p2", ["probe", "echo", "two"], stdin=b"in-2"))
    assert again == first, "the idle executor was not reused"
    assert (workdir / "jobs" / "p2" / "pid").read_text() == f"{first}\n"
    assert echo["state"] == "succeeded"
    peak = echo["peak_memory_bytes"]
    assert isinstance(peak, int) and peak < 8 << 20  # not the 16 MiB the last task filled
    argv, env, stdin = session.task("p2").stdout().split(b"\x01")
    assert argv.split(b"\0")[:-1] == [b"probe", b"echo", b"two"]
    assert b"SECRET" not in env and stdin == b"in-2"
    # Spinning past its limit: the watchdog ends the executor; the next task gets a new one.
    spun, spin = run("p3", task_spec(guest, "p3", ["probe", "spin"], time_limit_s=1))
    assert (spin["state"], spin["exit_code"]) == ("timeout", 124) and spun == first
    assert process_gone(first)
    # Its replacement is started at once, idle, before a task comes for it.
    wait_for(lambda: bool(_children(session.process.pid)), timeout=10)
    (spare,) = _children(session.process.pid)
    # Blocked in a host call past its limit: the same.
    slept, sleep = run("p4", task_spec(guest, "p4", ["probe", "sleep", "30"], time_limit_s=1))
    assert (sleep["state"], sleep["exit_code"]) == ("timeout", 124)
    assert slept == spare and process_gone(slept)
    fresh, hello = run("p5", task_spec(guest, "p5", ["probe", "hello"]))
    assert fresh not in (first, slept) and hello["state"] == "succeeded"
    assert session.task("p5").stdout() == b"hello from wasm\n"
    # A cancel kills its task's executor; the task after it runs on a new one.
    session.launch(task_spec(guest, "p6", ["probe", "sleep", "30"]))
    session.read_until(lambda: b"S" in session.task("p6").kinds())
    assert session.task("p6").json_of(b"S")["pid"] == fresh
    for name in ("pid-start", "pid"):
        linked, source = workdir / "jobs" / "p6" / name, workdir / "jobs" / "p5" / name
        assert linked.stat().st_ino == source.stat().st_ino
        assert linked.read_text().split()[0] == str(fresh)
    wait_for(lambda: holds(workdir / "jobs" / "p6" / "stdout", b"start\n"))
    assert json.loads(run_runner("cancel", str(workdir), "p6").stdout) == {"state": "cancelled"}
    session.wait_done("p6")
    assert session.task("p6").result()["state"] == "cancelled"
    assert process_gone(fresh)
    last, final = run("p7", task_spec(guest, "p7", ["probe", "exit", "7"]))
    assert last not in (first, fresh)
    assert (final["state"], final["exit_code"]) == ("failed", 7)


def test_pooled_executors_run_capped_tasks_and_the_cap_leaves_with_its_task(
    workdir: Path, guest: Guest, sessions: Callable[..., Session]
) -> None:
    """Every job has an output cap (--max-output-mb's default): its executor is reused all
    the same, and the cap of one task (a file size rlimit, SIGXFSZ caught) is gone for the
    next, which may write more than it; a task over its cap still fails as over it."""
    session = sessions(workdir)
    session.hello()

    def run(key: str, argv: list[str], cap: int | None) -> tuple[int, dict[str, object]]:
        session.launch(task_spec(guest, key, argv, max_output_bytes=cap))
        session.wait_done(key)
        pid = session.task(key).json_of(b"S")["pid"]
        assert isinstance(pid, int)
        return pid, session.task(key).result()

    first, small = run("c1", ["probe", "output", "100", "0"], 4096)
    assert small["state"] == "succeeded"
    again, bigger = run("c2", ["probe", "output", "20000", "0"], None)
    assert again == first, "an executor that ran a capped task was not reused"
    assert bigger["state"] == "succeeded", bigger
    assert len(session.task("c2").stdout()) == 20000
    _, over = run("c3", ["probe", "output", "20000", "0"], 4096)
    assert over["state"] == "failed" and "output limit" in str(over["error"]), over
    _, after = run("c4", ["probe", "output", "20000", "0"], None)
    assert after["state"] == "succeeded" and len(session.task("c4").stdout()) == 20000
