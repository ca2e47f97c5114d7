"""The connection process (sshwasm.mux): used and reused across commands, exiting when idle,
off with `connection_persist_s: 0`, never used when its socket is not private to the user,
and never in the way: a killed or broken process leaves the job to a direct connection."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import PROGRAMS, mux_processes, no_traceback, process_gone, sshwasm, wait_for

from sshwasm.mux import client, spare, wire

TINY = str(PROGRAMS / "tiny.rs")


@pytest.fixture
def runtime(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's runtime dir for sshwasm (under its HOME), the process turned on."""
    # conftest sets it to 0 unless SSHWASM_TEST_MUX=1 left the process on everywhere.
    monkeypatch.delenv("SSHWASM_CONNECTION_PERSIST_S", raising=False)
    monkeypatch.setenv("SSHWASM_MUX_VERBOSE", "1")
    return isolated_home / ".run" / "sshwasm"


def run_tiny(cluster: Path) -> str:
    """Run tiny.rs; it must succeed. Returns its stderr."""
    result = sshwasm("--cluster", str(cluster), "run", TINY, "-q")
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tiny -\n"
    return result.stderr


def connections_opened(runtime: Path) -> list[str]:
    log = (runtime / wire.LOG_NAME).read_text()
    return [line.split(": ", 1)[1] for line in log.splitlines() if "connecting to" in line]


def test_used_reused_private_edited_and_idle(
    runtime: Path, make_cluster: Callable[..., Path], ssh_hosts: dict[str, object]
) -> None:
    defaults = {"connection_persist_s": 4}
    cluster = make_cluster({"alpha": (2, 2048)}, defaults=defaults)
    assert run_tiny(cluster) == ""  # through the process: no fallback said
    (pid,) = mux_processes(runtime)
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    sock = runtime / wire.SOCKET_NAME
    assert stat.S_ISSOCK(sock.lstat().st_mode) and stat.S_IMODE(sock.lstat().st_mode) == 0o600
    assert run_tiny(cluster) == ""
    assert mux_processes(runtime) == [pid]  # the same process ...
    assert len(connections_opened(runtime)) == 1  # ... and the same connection
    # The cluster file edited: alpha is now beta's server. A new connection, to it.
    make_cluster({"alpha": (2, 2048)}, servers={"alpha": ssh_hosts["beta"]}, defaults=defaults)
    assert run_tiny(cluster) == ""
    opened = connections_opened(runtime)
    assert len(opened) == 2 and opened[0] != opened[1], opened
    assert f"port {ssh_hosts['beta'].port}" in opened[1]  # type: ignore[attr-defined]
    # Idle for 4 s: every connection closed, the process gone with its socket.
    wait_for(lambda: process_gone(pid), timeout=20)
    assert not sock.exists()
    # Every command after the first of a connection found a session opened ahead for it.
    (stopped,) = [
        line for line in (runtime / wire.LOG_NAME).read_text().splitlines() if "stopped:" in line
    ]
    commands, on_spares, *_warm_and_sessions = (
        int(word) for word in re.findall(r"\d+", stopped.split("stopped:")[1])
    )
    assert commands >= 3 and on_spares >= 1, stopped


def test_a_spare_channel_runs_a_command_as_the_shell_would() -> None:
    """The spare's one-line form of a command (newlines inside single quotes sent as
    '"$NL"'), read and eval'ed by /bin/sh, runs exactly what `sh -c COMMAND` runs."""
    code = (
        'import sys; print(sys.argv[1:]); print(sys.stdin.buffer.read())\n# it\'s "x" $HOME `x` \\n'
    )
    stdin = b"in\x00put\nmore"
    for command in (
        shlex.join([sys.executable, "-c", code, "a b", "it's", "\n", "$HOME", "\\", "`id`"]),
        f'{sys.executable} -c {shlex.quote(code)} "$HOME"/{shlex.quote("x y")}; exit 3',
    ):
        direct = subprocess.run(["sh", "-c", command], input=stdin, capture_output=True)
        line = spare.one_line(command)
        assert line is not None and line.count("\n") == 1
        relayed = subprocess.run(
            ["sh", "-c", spare.SPARE_COMMAND], input=line.encode() + stdin, capture_output=True
        )
        assert (relayed.stdout, relayed.returncode) == (direct.stdout, direct.returncode)
        assert b"in\\x00put\\nmore" in relayed.stdout
    assert spare.one_line("true\nfalse") is None  # a newline outside quotes: own channel
    unused = subprocess.run(["sh", "-c", spare.SPARE_COMMAND], input=b"", capture_output=True)
    assert unused.returncode == spare.NO_COMMAND_EXIT


@pytest.mark.slow
def test_off_killed_and_broken_fall_back(runtime: Path, make_cluster: Callable[..., Path]) -> None:
    off = make_cluster({"alpha": (2, 2048)}, defaults={"connection_persist_s": 0})
    assert run_tiny(off) == ""
    assert mux_processes(runtime) == [] and not (runtime / wire.SOCKET_NAME).exists()

    cluster = make_cluster({"alpha": (2, 2048)}, defaults={"connection_persist_s": 30})
    run_tiny(cluster)
    (pid,) = mux_processes(runtime)
    os.kill(pid, signal.SIGKILL)  # its socket stays behind, refusing connections
    wait_for(lambda: process_gone(pid))
    assert run_tiny(cluster) == ""  # a new process takes over
    (second,) = mux_processes(runtime)
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: process_gone(second))

    # Something else on the socket that answers garbage: the job goes direct.
    with fake_mux(runtime, b"garbage\n") as calls:
        assert "directly" in run_tiny(cluster)
        assert calls == [1]
    # Open to others (0666): never connected to.
    with fake_mux(runtime, b"garbage\n", mode=0o666) as calls:
        stderr = run_tiny(cluster)
        assert "open to group or others" in stderr and calls == []
    # Owned by another user: never connected to.
    with fake_mux(runtime, b"garbage\n", owner=65534) as calls:
        stderr = run_tiny(cluster)
        assert "owned by uid 65534" in stderr and calls == []
    assert mux_processes(runtime) == []  # none started while a socket was there


@contextlib.contextmanager
def fake_mux(
    runtime: Path, answer: bytes, mode: int = 0o600, owner: int | None = None
) -> Iterator[list[int]]:
    """A listener on the process's socket that answers every request with `answer`;
    yields the list it appends 1 to per connection it accepted."""
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = runtime / wire.SOCKET_NAME
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, -1)
    listener.listen()
    listener.settimeout(0.1)
    calls: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            calls.append(1)
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield calls
    finally:
        stop.set()
        thread.join()
        listener.close()
        path.unlink(missing_ok=True)


def test_a_socket_served_by_another_uid_is_not_used(
    runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SO_PEERCRED is checked once connected (another user cannot be made here: the peer's
    uid is what the check reads, so it is what the test changes)."""
    with fake_mux(runtime, b'{"ok": true}\n') as calls:
        assert client.open_socket(runtime, 30).close() is None  # ours: used
        monkeypatch.setattr(wire, "peer_uid", lambda sock: os.geteuid() + 1)
        with pytest.raises(wire.MuxUnavailable, match=r"served by uid \d+, not by you"):
            client.open_socket(runtime, 30)
        wait_for(lambda: len(calls) == 2, timeout=5)
