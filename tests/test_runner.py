"""The worker-side runner (sshwasm-exec), driven as a real subprocess with a real wasmtime."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from helpers import (
    LEAK_MARKER,
    OLD_PYTHONS,
    OLD_PYTHONS_MISSING,
    RUNNER,
    RUNNER_VERSION,
    Guest,
    LiveLauncher,
    Outcome,
    decode,
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
from hypothesis import given
from hypothesis import strategies as st

from sshwasm.runner.execute import looks_out_of_memory, mapped_memory_bytes
from sshwasm.runner.protocol import (
    CHUNK_BYTES,
    RESULT_KEYS,
    FrameDecoder,
    FrameError,
    encode_frame,
    files_version,
    runner_files,
    runner_version,
)


@pytest.fixture(autouse=True)
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private HOME: the runner expands `~` in WORKDIR and must never touch the real one."""
    path = tmp_path / "home"
    path.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return path


@pytest.fixture
def workdir(tmp_path: Path, guest: Guest) -> Path:
    path = tmp_path / "wd"
    done = run_runner("put-module", str(path), guest.sha256, stdin=guest.data)
    assert done.returncode == 0, done.stderr
    return path


def make_spec(
    guest: Guest,
    argv: list[str],
    *,
    env: list[list[str]] | None = None,
    memory_mb: int = 64,
    time_limit_s: float | None = None,
    stdin: bytes | None = None,
    version: str = RUNNER_VERSION,
) -> bytes:
    spec = {
        "runner_version": version,
        "wasm_sha256": guest.sha256,
        "argv": argv,
        "env": env or [],
        "memory_mb": memory_mb,
        "time_limit_s": time_limit_s,
        "has_stdin": stdin is not None,
    }
    return json.dumps(spec).encode() + b"\n" + (stdin or b"")


def launch(
    workdir: Path,
    job_id: str,
    guest: Guest,
    argv: list[str],
    *,
    env: list[list[str]] | None = None,
    memory_mb: int = 64,
    time_limit_s: float | None = None,
    stdin: bytes | None = None,
    version: str = RUNNER_VERSION,
) -> Outcome:
    spec = make_spec(
        guest,
        argv,
        env=env,
        memory_mb=memory_mb,
        time_limit_s=time_limit_s,
        stdin=stdin,
        version=version,
    )
    outcome = run_frames("launch", str(workdir), job_id, stdin=spec)
    assert outcome.returncode == 0, outcome.stderr
    return outcome


# ----------------------------------------------------------------------------- frames


@given(
    frames=st.lists(
        st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=300)), max_size=20
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=40),
)
def test_any_chunking_of_a_frame_stream_decodes_to_the_same_frames(
    frames: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(kind, payload) for kind, payload in frames)
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    decoder = FrameDecoder()
    decoded: list[tuple[bytes, bytes]] = []
    fed = 0
    for piece in pieces:
        decoded += decoder.feed(piece)
        fed += len(piece)
        consumed = sum(5 + len(payload) for _, payload in decoded)
        assert decoder.pending == fed - consumed
    assert decoded == frames
    assert decoder.pending == 0


def test_frame_layout_is_kind_then_big_endian_length() -> None:
    assert encode_frame(b"O", b"abc") == b"O\x00\x00\x00\x03abc"
    with pytest.raises(ValueError):
        encode_frame(b"OK", b"")


def test_decoder_rejects_text_that_is_not_frames() -> None:
    with pytest.raises(FrameError, match="login script"):
        FrameDecoder().feed(b"Welcome to the cluster!\n")


# ------------------------------------------------------------------- version, modules


def test_runner_version_is_a_hash_of_the_package_files(tmp_path: Path) -> None:
    files = {path.name: path.read_bytes() for path in RUNNER.glob("*.py")}
    assert runner_files() == files and len(files) > 5
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{len(files[name])}\0".encode() + files[name])
    assert RUNNER_VERSION == runner_version() == files_version(files) == digest.hexdigest()[:16]
    # Any edit, and any file added, is another version.
    assert files_version({**files, "extra.py": b""}) != RUNNER_VERSION
    edited = tmp_path / "sshwasm-exec"
    shutil.copytree(RUNNER, edited, ignore=shutil.ignore_patterns("__pycache__"))
    with (edited / "protocol.py").open("ab") as source:
        source.write(b"# edited\n")
    same = json.loads(run_runner("info").stdout)
    other = json.loads(
        subprocess.run(
            [sys.executable, str(edited), "info"], capture_output=True, check=True
        ).stdout
    )
    assert same["runner_version"] == RUNNER_VERSION
    assert other["runner_version"] != RUNNER_VERSION


def test_launch_with_another_runner_version_needs_the_runner(workdir: Path, guest: Guest) -> None:
    outcome = launch(workdir, "1", guest, ["probe"], version="0000000000000000")
    assert outcome.frames == [(b"N", b'{"need": "runner"}')]
    assert not (workdir / "jobs" / "1").exists()


def test_launch_of_an_unknown_module_needs_the_module(tmp_path: Path, guest: Guest) -> None:
    outcome = launch(tmp_path / "empty", "1", guest, ["probe"])
    assert outcome.frames == [(b"N", b'{"need": "module"}')]
    assert not (tmp_path / "empty" / "jobs" / "1").exists()


def test_put_module_keeps_verified_bytes_under_their_hash(tmp_path: Path, guest: Guest) -> None:
    done = run_runner("put-module", str(tmp_path / "wd"), guest.sha256, stdin=guest.data)
    assert done.returncode == 0, done.stderr
    stored = tmp_path / "wd" / "wasm" / f"{guest.sha256}.wasm"
    assert stored.read_bytes() == guest.data
    assert os.listdir(stored.parent) == [stored.name]


def test_put_module_refuses_bytes_of_another_hash(tmp_path: Path, guest: Guest) -> None:
    done = run_runner(
        "put-module", str(tmp_path / "wd"), guest.sha256, stdin=guest.data + b"tampered"
    )
    assert done.returncode == 1
    assert done.stderr.decode().count("\n") == 1
    assert guest.sha256 in done.stderr.decode()
    assert os.listdir(tmp_path / "wd" / "wasm") == []


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "ABCDEF" + "0" * 58, "0" * 63, ""])
def test_put_module_refuses_a_malformed_hash(tmp_path: Path, bad: str) -> None:
    done = run_runner("put-module", str(tmp_path / "wd"), bad, stdin=b"\0asm")
    assert done.returncode != 0
    assert b"sha256" in done.stderr
    assert not (tmp_path / "wd").exists()


# --------------------------------------------------------------------------- running


def test_hello_streams_its_output_then_the_result(workdir: Path, guest: Guest) -> None:
    outcome = launch(workdir, "7", guest, ["probe", "hello"])
    kinds = [kind for kind, _ in outcome.frames]
    assert kinds[0] == b"S" and kinds[-1] == b"R" and b"O" in kinds
    started = outcome.json_of(b"S")
    assert started["job_dir"] == str(workdir / "jobs" / "7")
    assert isinstance(started["pid"], int)
    assert outcome.stdout() == b"hello from wasm\n"
    result = outcome.result()
    assert tuple(result) == RESULT_KEYS
    assert result["state"] == "succeeded"
    assert result["exit_code"] == 0
    assert result["error"] is None
    assert result["wasmtime_version"] == importlib.metadata.version("wasmtime")
    assert isinstance(result["peak_memory_bytes"], int) and result["peak_memory_bytes"] > 0
    assert isinstance(result["run_s"], float) and isinstance(result["cpu_s"], float)
    started_at = datetime.fromisoformat(str(result["started_at"]))
    finished_at = datetime.fromisoformat(str(result["finished_at"]))
    assert started_at.utcoffset() is not None and started_at <= finished_at
    assert (workdir / "jobs" / "7" / "result.json").read_bytes() == outcome.frames[-1][1]


def test_guest_sees_exactly_its_argv_env_and_stdin(workdir: Path, guest: Guest) -> None:
    argv = ["probe", "echo", "two words", "ünïcode", "--flag=x", ""]
    env = [["GREETING", "a=b=c"], ["EMPTY", ""], ["SPACES", " x y "]]
    stdin = b"first line\nsecond\n\xff\x00binary\n"
    outcome = launch(workdir, "1", guest, argv, env=env, stdin=stdin)
    assert outcome.result()["state"] == "succeeded"
    seen_argv, seen_env, seen_stdin = outcome.stdout().split(b"\x01", 2)
    assert seen_argv.decode().split("\0")[:-1] == argv
    words = seen_env.decode().split("\0")[:-1]
    assert [list(pair) for pair in zip(words[::2], words[1::2], strict=True)] == env
    assert seen_stdin == stdin
    # Nothing of the worker's own environment leaks in.
    assert "HOME" not in words and "PATH" not in words and LEAK_MARKER[0] not in words


def test_without_stdin_the_guest_reads_end_of_file(workdir: Path, guest: Guest) -> None:
    outcome = launch(workdir, "1", guest, ["probe", "echo"])
    assert outcome.stdout().split(b"\x01", 2)[2] == b""
    assert not (workdir / "jobs" / "1" / "stdin").exists()


def test_a_nonzero_exit_is_failed_with_that_code(workdir: Path, guest: Guest) -> None:
    result = launch(workdir, "1", guest, ["probe", "exit", "3"]).result()
    assert (result["state"], result["exit_code"], result["error"]) == ("failed", 3, None)


def test_an_exit_status_wasi_cannot_carry_fails_with_1(workdir: Path, guest: Guest) -> None:
    result = launch(workdir, "1", guest, ["probe", "exit", "200"]).result()
    assert (result["state"], result["exit_code"]) == ("failed", 1)
    assert "exit status" in str(result["error"])


def test_a_panic_fails_with_134_and_keeps_the_panic_text(workdir: Path, guest: Guest) -> None:
    outcome = launch(workdir, "1", guest, ["probe", "panic"])
    result = outcome.result()
    assert (result["state"], result["exit_code"]) == ("failed", 134)
    error = str(result["error"])
    assert "unreachable" in error.lower()
    assert "\n" not in error and "backtrace" not in error
    assert b"boom from the guest" in outcome.stderr_stream()


def test_allocating_past_the_memory_limit_is_out_of_memory(workdir: Path, guest: Guest) -> None:
    outcome = launch(workdir, "1", guest, ["probe", "alloc"], memory_mb=16)
    result = outcome.result()
    assert result["state"] == "out_of_memory"
    assert result["exit_code"] == 134
    assert "16 MiB" in str(result["error"])
    peak = result["peak_memory_bytes"]
    assert isinstance(peak, int) and 8 << 20 < peak <= 16 << 20
    assert b"memory allocation of" in outcome.stderr_stream()


def test_a_limit_below_the_module_minimum_is_out_of_memory(workdir: Path, guest: Guest) -> None:
    result = launch(workdir, "1", guest, ["probe", "hello"], memory_mb=1).result()
    assert result["state"] == "out_of_memory"
    assert "needs at least 2 MiB" in str(result["error"])


def test_out_of_memory_classification() -> None:
    limit = 64 << 20
    assert looks_out_of_memory(limit - (512 << 10), limit, b"")
    assert looks_out_of_memory(1 << 20, limit, b"memory allocation of 4096 bytes failed\n")
    assert looks_out_of_memory(None, limit, b"fatal error: Out Of Memory")
    assert not looks_out_of_memory(1 << 20, limit, b"thread 'main' panicked at 'boom'")
    assert not looks_out_of_memory(None, limit, b"")


def test_a_busy_loop_is_stopped_at_the_time_limit(workdir: Path, guest: Guest) -> None:
    started = time.monotonic()
    # 3 s, as for the sleeping guest below: loading the module counts against the limit, and
    # with a worker more than the cores (scripts/test) at load 12 it took over 1 s, so the
    # guest never started (run_s None).
    result = launch(workdir, "1", guest, ["probe", "spin"], time_limit_s=3).result()
    assert time.monotonic() - started < 12
    assert (result["state"], result["exit_code"]) == ("timeout", 124)
    # The limit counts from the launch: run_s is what loading the module left of it.
    assert isinstance(result["run_s"], float) and result["run_s"] > 0
    # Its memory when it was ended, from the kernel's map (whole wasm pages); its fuel is
    # not known (it lives in the store the guest's thread owns).
    peak = result["peak_memory_bytes"]
    assert isinstance(peak, int) and 0 < peak <= 64 << 20 and peak % 65536 == 0, peak
    assert result["fuel_used"] is None


GROWN_PAGES = 40
# Grows its memory from 1 to GROWN_PAGES pages, then loops until its watchdog ends it.
GROW_THEN_SPIN = f"""(module (memory (export "memory") 1)
  (func (export "_start")
    (drop (memory.grow (i32.const {GROWN_PAGES - 1})))
    (loop $forever (br $forever))))"""


def test_a_timed_out_guest_records_its_peak_memory(tmp_path: Path) -> None:
    """The watchdog records the memory the guest had grown to: exactly its pages."""
    import wasmtime

    data = bytes(wasmtime.wat2wasm(GROW_THEN_SPIN))
    module = Guest(data, hashlib.sha256(data).hexdigest())
    workdir = tmp_path / "wd"
    done = run_runner("put-module", str(workdir), module.sha256, stdin=module.data)
    assert done.returncode == 0, done.stderr
    result = launch(workdir, "1", module, ["grow"], time_limit_s=3).result()
    assert (result["state"], result["exit_code"]) == ("timeout", 124), result
    assert result["peak_memory_bytes"] == GROWN_PAGES * 65536, result


def test_the_mapped_memory_is_the_rw_run_from_its_base(tmp_path: Path) -> None:
    """The read-write mappings that follow each other from the base (an image of the
    module's data, then anonymous pages), up to the reservation's inaccessible rest."""
    maps = tmp_path / "maps"
    maps.write_text(
        "10000-20000 rw-p 00000000 00:00 0\n"
        "7f0000000000-7f0000010000 rw-p 00000000 00:01 5 /memfd:wasm-memory-image (deleted)\n"
        "7f0000010000-7f0000050000 rw-p 00000000 00:00 0\n"
        "7f0000050000-7f0100000000 ---p 00000000 00:00 0\n"
        "7f0100000000-7f0100010000 rw-p 00000000 00:00 0\n"
    )
    base = 0x7F0000000000
    assert mapped_memory_bytes(base, 64 << 20, str(maps)) == 5 * 65536
    assert mapped_memory_bytes(base, 4 * 65536, str(maps)) is None  # over its limit
    assert mapped_memory_bytes(base + 0x1000, 64 << 20, str(maps)) is None  # not whole pages
    assert mapped_memory_bytes(0x7F0000050000, 64 << 20, str(maps)) is None  # not rw
    assert mapped_memory_bytes(base, 64 << 20, str(tmp_path / "no-proc")) is None


def test_a_sleeping_guest_is_ended_by_the_watchdog(workdir: Path, guest: Guest) -> None:
    started = time.monotonic()
    # 3 s: loading the module counts against the limit, and under load it can take a second
    # before the guest prints "start".
    outcome = launch(workdir, "1", guest, ["probe", "sleep", "30"], time_limit_s=3)
    assert time.monotonic() - started < 12
    result = outcome.result()
    assert (result["state"], result["exit_code"]) == ("timeout", 124)
    assert outcome.stdout() == b"start\n"
    pid = outcome.json_of(b"S")["pid"]
    assert isinstance(pid, int)
    wait_for(lambda: process_gone(pid), timeout=5)


def test_the_guest_cannot_read_host_files(tmp_path: Path, workdir: Path, guest: Guest) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the host's secret")
    for job_id, path in (("1", str(secret)), ("2", "/etc/hostname"), ("3", "spec.json")):
        outcome = launch(workdir, job_id, guest, ["probe", "read", path])
        assert (outcome.result()["state"], outcome.result()["exit_code"]) == ("failed", 5)
        assert outcome.stdout() == b""
        assert b"pre-opened" in outcome.stderr_stream()


# ------------------------------------------------------------- detachment, attach, poll


def test_the_job_outlives_a_launcher_whose_reader_left(
    workdir: Path, guest: Guest, live_launchers: Callable[[Path, str, bytes], LiveLauncher]
) -> None:
    launcher = live_launchers(workdir, "1", held_spec(guest))
    launcher.read_until(b"S")
    launcher.close_stdout()
    # The launcher notices its reader is gone even though the job prints nothing meanwhile.
    assert launcher.process.wait(timeout=30) == 0
    assert not (launcher.job_dir / "result.json").exists()
    release(launcher.job_dir)
    wait_for(lambda: (launcher.job_dir / "result.json").exists())
    assert read_result(launcher.job_dir)["state"] == "succeeded"
    assert (launcher.job_dir / "stdout").read_bytes() == b"start\nend\n"
    assert launcher.process.stderr is not None and launcher.process.stderr.read() == b""


def test_attach_sends_exactly_the_bytes_after_the_offsets(workdir: Path, guest: Guest) -> None:
    first = launch(workdir, "1", guest, ["probe", "output", "200000", "70000"])
    full_out, full_err = first.stdout(), first.stderr_stream()
    assert (len(full_out), len(full_err)) == (200000, 70000)
    assert all(len(chunk) <= CHUNK_BYTES for chunk in first.payloads(b"O") + first.payloads(b"E"))
    again = run_frames("attach", str(workdir), "1", "100001", "5")
    assert again.stdout() == full_out[100001:]
    assert again.stderr_stream() == full_err[5:]
    assert again.result() == first.result()
    beyond = run_frames("attach", str(workdir), "1", "200000", "999999")
    assert [kind for kind, _ in beyond.frames] == [b"R"]


def test_attach_follows_a_running_job_to_its_end(
    workdir: Path, guest: Guest, live_launchers: Callable[[Path, str, bytes], LiveLauncher]
) -> None:
    launcher = live_launchers(workdir, "1", held_spec(guest))
    launcher.read_until(b"S")
    launcher.close_stdout()
    attach = subprocess.Popen(
        [sys.executable, str(RUNNER), "attach", str(workdir), "1", "0", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=runner_env(),
    )
    try:
        assert attach.stdout is not None
        decoder, frames = FrameDecoder(), []
        # attach is following: it has sent what the job printed so far, and no result.
        while b"start\n" not in b"".join(data for kind, data in frames if kind == b"O"):
            chunk = os.read(attach.stdout.fileno(), 65536)
            assert chunk, f"attach ended early: {frames}"
            frames += decoder.feed(chunk)
        assert b"R" not in [kind for kind, _ in frames]
        release(launcher.job_dir)
        rest, stderr = attach.communicate(timeout=30)
    finally:
        if attach.poll() is None:
            attach.kill()
            attach.wait()
    outcome = Outcome(attach.returncode, frames + decoder.feed(rest), stderr)
    assert outcome.stdout() == b"start\nend\n"
    assert outcome.result()["state"] == "succeeded"


@pytest.mark.parametrize("command", ["attach", "poll"])
def test_attach_and_poll_report_a_missing_job(tmp_path: Path, command: str) -> None:
    outcome = run_frames(command, str(tmp_path / "wd"), "404", "0", "0")
    assert outcome.returncode == 0
    error = outcome.json_of(b"X")
    assert error["kind"] == "missing"


def test_poll_reports_progress_then_the_result(
    workdir: Path, guest: Guest, live_launchers: Callable[[Path, str, bytes], LiveLauncher]
) -> None:
    launcher = live_launchers(workdir, "1", held_spec(guest))
    launcher.read_until(b"S")
    launcher.close_stdout()
    wait_for(lambda: holds(launcher.job_dir / "stdout", b"start\n"))
    running = run_frames("poll", str(workdir), "1", "0", "0")
    assert running.stdout() == b"start\n"
    assert running.frames[-1][0] == b"A"
    assert running.json_of(b"A") == {"alive": True}
    release(launcher.job_dir)
    wait_for(lambda: (launcher.job_dir / "result.json").exists())
    finished = run_frames("poll", str(workdir), "1", "6", "0")
    assert finished.stdout() == b"end\n"
    assert finished.result()["state"] == "succeeded"


@pytest.mark.parametrize("command", ["attach", "poll"])
def test_an_executor_that_died_gets_a_failed_result(
    workdir: Path,
    guest: Guest,
    live_launchers: Callable[[Path, str, bytes], LiveLauncher],
    command: str,
) -> None:
    launcher = live_launchers(workdir, "1", make_spec(guest, ["probe", "sleep", "30"]))
    pid = launcher.read_until(b"S")["pid"]
    assert isinstance(pid, int)
    launcher.close_stdout()
    assert launcher.process.wait(timeout=30) == 0
    wait_for(lambda: holds(launcher.job_dir / "stdout", b"start\n"))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_gone(pid))
    outcome = run_frames(command, str(workdir), "1", "0", "0")
    assert outcome.stdout() == b"start\n"
    result = outcome.result()
    assert result["state"] == "failed"
    assert str(result["error"]).startswith("runner process died without a result")
    assert read_result(launcher.job_dir) == result


def test_the_pid_file_names_the_process_and_its_start_time(workdir: Path, guest: Guest) -> None:
    outcome = launch(workdir, "1", guest, ["probe", "hello"])
    pid = outcome.json_of(b"S")["pid"]
    assert (workdir / "jobs" / "1" / "pid").read_text() == f"{pid}\n"
    named, started = (workdir / "jobs" / "1" / "pid-start").read_text().split()
    assert int(named) == pid and started.isdigit()


def test_a_reused_pid_is_not_taken_for_the_executor(workdir: Path, guest: Guest) -> None:
    job_dir = workdir / "jobs" / "1"
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_bytes(make_spec(guest, ["probe"]).split(b"\n")[0])
    # A live process, but not the one that was started for the job.
    (job_dir / "pid-start").write_text(f"{os.getpid()} 1\n")
    (job_dir / "pid").write_text(f"{os.getpid()}\n")
    outcome = run_frames("poll", str(workdir), "1", "0", "0")
    result = outcome.result()
    assert str(result["error"]).startswith("runner process died without a result")


# --------------------------------------------------------------------------- cancel


def test_cancel_kills_a_running_job(
    workdir: Path, guest: Guest, live_launchers: Callable[[Path, str, bytes], LiveLauncher]
) -> None:
    launcher = live_launchers(workdir, "1", make_spec(guest, ["probe", "sleep", "30"]))
    pid = launcher.read_until(b"S")["pid"]
    assert isinstance(pid, int)
    wait_for(lambda: holds(launcher.job_dir / "stdout", b"start\n"))
    started = time.monotonic()
    done = run_runner("cancel", str(workdir), "1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"state": "cancelled"}
    assert process_gone(pid)
    # The launcher still streaming sees the cancellation as the job's result.
    result = launcher.read_until(b"R")
    assert time.monotonic() - started < 10
    assert (result["state"], result["exit_code"]) == ("cancelled", 143)
    assert read_result(launcher.job_dir) == result
    again = run_runner("cancel", str(workdir), "1")
    assert json.loads(again.stdout) == {"state": "cancelled", "already_finished": True}


def test_cancel_of_a_finished_job_changes_nothing(workdir: Path, guest: Guest) -> None:
    launch(workdir, "1", guest, ["probe", "hello"])
    before = (workdir / "jobs" / "1" / "result.json").read_bytes()
    done = run_runner("cancel", str(workdir), "1")
    assert json.loads(done.stdout) == {"state": "succeeded", "already_finished": True}
    assert (workdir / "jobs" / "1" / "result.json").read_bytes() == before


def test_cancel_of_a_missing_job_fails(tmp_path: Path) -> None:
    done = run_runner("cancel", str(tmp_path / "wd"), "404")
    assert done.returncode == 1
    assert done.stderr.decode().count("\n") == 1


# ----------------------------------------------------------------- files and caching


def test_everything_written_is_private_and_tilde_is_expanded(home: Path, guest: Guest) -> None:
    done = run_runner("put-module", "~/private", guest.sha256, stdin=guest.data)
    assert done.returncode == 0, done.stderr
    spec = make_spec(guest, ["probe", "output", "10", "10"], stdin=b"in")
    outcome = run_frames("launch", "~/private", "1", stdin=spec)
    assert outcome.result()["state"] == "succeeded"
    root = home / "private"
    assert outcome.json_of(b"S")["job_dir"] == str(root / "jobs" / "1")
    seen = {path.relative_to(root).as_posix() for path in root.rglob("*")}
    assert {"wasm", "cache", "jobs/1/stdin", "jobs/1/stdout", "jobs/1/result.json"} <= seen
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path}: {oct(mode)}"


def test_the_second_run_uses_the_precompiled_module(workdir: Path, guest: Guest) -> None:
    first = launch(workdir, "1", guest, ["probe", "hello"]).result()
    second = launch(workdir, "2", guest, ["probe", "hello"]).result()
    assert first["module_cached"] is False
    assert isinstance(first["module_compile_s"], float) and first["module_compile_s"] > 0
    assert second["module_cached"] is True and second["module_compile_s"] == 0
    version = importlib.metadata.version("wasmtime")
    assert (workdir / "cache" / f"{guest.sha256}-{version}-noepoch.cwasm").is_file()
    # A time limit is the watchdog's: the same machine code (no epoch checks) runs it.
    timed = launch(workdir, "3", guest, ["probe", "hello"], time_limit_s=5).result()
    assert timed["module_cached"] is True and timed["state"] == "succeeded"
    assert [path.name for path in (workdir / "cache").iterdir()] == [
        f"{guest.sha256}-{version}-noepoch.cwasm"
    ]


def test_an_unusable_precompiled_module_is_rebuilt(workdir: Path, guest: Guest) -> None:
    launch(workdir, "1", guest, ["probe", "hello"])
    (cached,) = (workdir / "cache").iterdir()
    cached.write_bytes(b"not an ELF file")
    outcome = launch(workdir, "2", guest, ["probe", "hello"])
    assert outcome.stdout() == b"hello from wasm\n"
    assert outcome.result()["module_cached"] is False
    assert launch(workdir, "3", guest, ["probe", "hello"]).result()["module_cached"] is True


# ------------------------------------------------------------------- setup failures


def test_launching_an_existing_job_id_is_refused(workdir: Path, guest: Guest) -> None:
    launch(workdir, "1", guest, ["probe", "hello"])
    before = (workdir / "jobs" / "1" / "result.json").read_bytes()
    outcome = launch(workdir, "1", guest, ["probe", "exit", "3"])
    assert outcome.json_of(b"X")["kind"] == "exists"
    assert [kind for kind, _ in outcome.frames] == [b"X"]
    assert (workdir / "jobs" / "1" / "result.json").read_bytes() == before


def test_an_unwritable_workdir_is_an_io_error(workdir: Path, guest: Guest) -> None:
    (workdir / "jobs").write_text("a file where the jobs directory should be")
    outcome = launch(workdir, "1", guest, ["probe", "hello"])
    error = outcome.json_of(b"X")
    assert error["kind"] == "io"
    assert "\n" not in str(error["error"])


def test_a_malformed_spec_is_reported(workdir: Path, guest: Guest) -> None:
    spec = json.loads(make_spec(guest, ["probe"]))
    spec["memory_mb"] = "lots"
    outcome = run_frames("launch", str(workdir), "1", stdin=json.dumps(spec).encode() + b"\n")
    error = outcome.json_of(b"X")
    assert error["kind"] == "spec" and "memory_mb" in str(error["error"])
    assert not (workdir / "jobs" / "1").exists()


@pytest.mark.parametrize("args", [[], ["explode"], ["launch", "wd"], ["launch", "wd", "../escape"]])
def test_bad_arguments_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run(
        [sys.executable, str(RUNNER), *args], capture_output=True, cwd=cwd, input=b""
    )
    assert done.returncode == 2
    assert done.stdout == b""
    assert done.stderr.startswith(b"usage:") or done.stderr.startswith(b"sshwasm-exec: error:")
    assert list(cwd.iterdir()) == []


def test_a_host_without_wasmtime_says_so(workdir: Path, guest: Guest) -> None:
    # -S leaves site-packages off the path: this interpreter cannot import wasmtime.
    python = [sys.executable, "-S", "-I"]
    info = json.loads(run_runner("info", python=python).stdout)
    assert info["wasmtime_version"] is None
    assert "wasmtime" in str(info["wasmtime_error"])
    spec = make_spec(guest, ["probe", "hello"])
    outcome = run_frames("launch", str(workdir), "1", stdin=spec, python=python)
    error = outcome.json_of(b"X")
    assert error["kind"] == "no_wasmtime" and "wasmtime" in str(error["error"])
    assert not (workdir / "jobs" / "1").exists()


# ----------------------------------------------------------------- info, packaging


def test_info_describes_the_host() -> None:
    done = run_runner("info")
    assert done.returncode == 0
    assert done.stdout.count(b"\n") == 1
    info = json.loads(done.stdout)
    assert info == {
        "runner_version": RUNNER_VERSION,
        "python": sys.version.split()[0],
        "wasmtime_version": importlib.metadata.version("wasmtime"),
        "wasmtime_error": None,
        "cpus": os.cpu_count(),
        "memory_mb": info["memory_mb"],
        "os": os.uname().sysname,
        "arch": os.uname().machine,
    }
    assert isinstance(info["memory_mb"], int) and info["memory_mb"] > 0


@pytest.mark.parametrize(
    "command",
    [["info"], ["cancel", "wd", "1"], ["poll", "wd", "1", "0", "0"], ["fetch-output", "wd", "1"]],
)
def test_commands_other_than_execute_do_not_import_wasmtime(
    tmp_path: Path, command: list[str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(RUNNER), *command],
        capture_output=True,
        cwd=tmp_path,
    )
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.decode().splitlines()]
    assert "sys" in imported or "json" in imported  # importtime did report
    assert not [name for name in imported if name.split(".")[0] == "wasmtime"]


def test_each_runner_file_needs_only_the_stdlib_and_wasmtime() -> None:
    files = sorted(RUNNER.glob("*.py"))
    assert {path.name for path in files} >= {"__init__.py", "__main__.py", "protocol.py"}
    imported_anywhere: set[str] = set()
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: another file of the package
                    assert (RUNNER / f"{node.module}.py").is_file(), (path.name, node.module)
                    continue
                names = [node.module or ""]
            else:
                continue
            imported_anywhere.update(names)
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "wasmtime", (path.name, name)
                if top == "wasmtime":
                    assert path.name in ("execute.py", "serve.py"), path.name
    assert "wasmtime" in imported_anywhere


def test_the_protocol_imports_none_of_the_runner_machinery() -> None:
    # The coordinator imports the protocol; it must not pay for (or need) the rest.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, sshwasm.runner.protocol, sshwasm.runner.safetar\n"
            "loaded = [name for name in sys.modules if name.split('.')[0] in ('sshwasm', "
            "'wasmtime')]\n"
            "print(sorted(loaded))",
        ],
        capture_output=True,
        check=True,
        text=True,
    )
    assert json.loads(done.stdout.replace("'", '"')) == [
        "sshwasm",
        "sshwasm.runner",
        "sshwasm.runner.protocol",
        "sshwasm.runner.safetar",
    ]


def test_the_runner_runs_from_any_copy(tmp_path: Path, guest: Guest) -> None:
    installed = tmp_path / "wd" / "bin" / "sshwasm-exec"
    installed.parent.mkdir(parents=True)
    shutil.copytree(RUNNER, installed, ignore=shutil.ignore_patterns("__pycache__"))
    workdir = tmp_path / "wd"
    put = subprocess.run(
        [sys.executable, str(installed), "put-module", str(workdir), guest.sha256],
        input=guest.data,
        capture_output=True,
    )
    assert put.returncode == 0, put.stderr
    done = subprocess.run(
        [sys.executable, str(installed), "launch", str(workdir), "1"],
        input=make_spec(guest, ["probe", "hello"]),
        capture_output=True,
        cwd=tmp_path,
    )
    frames = decode(done.stdout)
    assert frames[-1][0] == b"R"
    assert json.loads(frames[-1][1])["state"] == "succeeded"


# The oldest Python the runner promises its hosts: the oldest wasmtime-py 50 supports
# (its Requires-Python), since a host without wasmtime runs no job anyway.
OLDEST_HOST_PYTHON = "3.9"


# vermin (the `test` extra) has no __main__: its script sits beside this interpreter.
VERMIN = str(Path(sys.executable).with_name("vermin"))
_TYPE_NAMES = {"int", "str", "bytes", "float", "bool", "list", "dict", "tuple", "set", "type"}


def _runtime_union_types(path: Path) -> list[str]:
    """Where `path` uses `X | Y` of types at run time (3.10), outside annotations.

    vermin's own check (--feature union-types) cannot tell them from `flag | flag` and
    from annotations, which the __future__ import keeps from being evaluated.
    """

    def is_type(node: ast.expr) -> bool:
        return (
            (isinstance(node, ast.Constant) and node.value is None)
            or (isinstance(node, ast.Name) and node.id in _TYPE_NAMES)
            or isinstance(node, ast.Subscript)
            or (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.BitOr)
                and (is_type(node.left) or is_type(node.right))
            )
        )

    annotations: set[int] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        found: list[ast.expr | None] = []
        if isinstance(node, ast.arg):
            found = [node.annotation]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found = [node.returns]
        elif isinstance(node, ast.AnnAssign):
            found = [node.annotation]
        for annotation in found:
            if annotation is not None:
                annotations.update(id(inner) for inner in ast.walk(annotation))
    return [
        f"{path.name}:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.BitOr)
        and id(node) not in annotations
        and (is_type(node.left) or is_type(node.right))
    ]


def too_new_for(target: str, *paths: Path) -> list[str]:
    """What in `paths` needs a Python newer than `target`: vermin's verdict (annotations not
    evaluated: every runner file imports annotations from __future__), and union types."""
    done = subprocess.run(
        [VERMIN, "--no-tips", "--violations", f"-t={target}-", *paths],
        capture_output=True,
        text=True,
    )
    problems = [done.stdout + done.stderr] if done.returncode else []
    for path in paths:
        for source in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            problems += _runtime_union_types(source)
    return problems


def test_the_runner_needs_no_newer_python_than_its_hosts_may_have() -> None:
    assert too_new_for(OLDEST_HOST_PYTHON, RUNNER) == []


@pytest.mark.parametrize(
    ("source", "runs_on_3_9"),
    [
        ("import zoneinfo\nprint(zoneinfo, ' x'.removeprefix(' '))\n", True),
        ("print(list(zip([1], [2], strict=True)))\n", False),
        ("match 1:\n    case 1:\n        pass\n", False),
        ("def f(value: object) -> None:\n    print(isinstance(value, int | None))\n", False),
        ("X = dict[str, int] | None\n", False),
        ("def f(flags: int | None) -> int:\n    return (flags or 0) | 4\n", True),
        ("print((5).bit_count())\n", False),
        ("import tomllib\n", False),
    ],
)
def test_vermin_finds_what_needs_a_newer_python(
    tmp_path: Path, source: str, runs_on_3_9: bool
) -> None:
    # What the check above relies on: no false negatives for features past the promise.
    probe = tmp_path / "probe.py"
    probe.write_text("from __future__ import annotations\n" + source)
    assert (too_new_for(OLDEST_HOST_PYTHON, probe) == []) == runs_on_3_9


@pytest.mark.skipif(not OLD_PYTHONS, reason=OLD_PYTHONS_MISSING)
@pytest.mark.parametrize("python", OLD_PYTHONS, ids=lambda path: path.parent.parent.name)
def test_the_light_commands_work_on_older_pythons(
    tmp_path: Path, guest: Guest, python: Path
) -> None:
    info = json.loads(run_runner("info", python=[str(python)]).stdout)
    assert info["runner_version"] == RUNNER_VERSION
    assert info["python"].startswith(python.parent.parent.name[:3])
    workdir = tmp_path / "wd"
    put = run_runner(
        "put-module", str(workdir), guest.sha256, stdin=guest.data, python=[str(python)]
    )
    assert put.returncode == 0, put.stderr
    outcome = run_frames(
        "launch", str(workdir), "1", stdin=make_spec(guest, ["probe"]), python=[str(python)]
    )
    if info["wasmtime_error"]:
        # Without wasmtime there, the launch must say so rather than crash.
        assert [kind for kind, _ in outcome.frames] == [b"X"]
        assert outcome.json_of(b"X")["kind"] == "no_wasmtime"
    else:
        assert outcome.result()["state"] == "succeeded"
