"""README promises of the command line's edges: Ctrl-C during `run` (a notice, exit 130,
the job goes on where it was placed) and `--traceback` (the Python traceback added to the
one-line error, for a bug report)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from helpers import PROGRAMS, no_traceback, sshwasm, start_streaming, wait_for_state


def test_ctrl_c_during_run_prints_a_notice_exits_130_and_the_job_goes_on(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    # A process started in the background by a shell without job control (`scripts/test &`)
    # ignores SIGINT, and so would sshwasm, inheriting it: Ctrl-C's default for the child.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        running = start_streaming(
            "--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--", "3"
        )
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert running.stdout is not None
    # The guest runs: its first line came back over SSH.
    assert running.stdout.readline() == b"start\n"
    running.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends
    rest, err = running.communicate(timeout=60)
    assert rest == b"", rest  # interrupted while the job ran, not after it ended
    assert running.returncode == 130, err
    assert (
        "sshwasm: interrupted; job 1 goes on where it was placed: "
        "`sshwasm cancel 1` stops it, `sshwasm status 1` collects it"
    ) in err.decode()
    assert b"Traceback" not in err
    # It went on: `status` collects the whole of it from the host.
    record = wait_for_state(1, {"succeeded", "failed", "lost", "cancelled"})
    assert record["state"] == "succeeded", record
    assert record["stdout"] == "start\nend\n"


def test_traceback_adds_the_python_traceback_to_the_one_line_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("hosts:\n  - name: beta\n    address: local\n    memory_mb: 64\n")
    expected = f"sshwasm: error: {broken}:2: host 'beta' has no 'cpus'"

    plain = sshwasm("--cluster", str(broken), "hosts")
    no_traceback(plain)
    assert plain.returncode == 1
    assert plain.stderr == expected + "\n"

    traced = sshwasm("--traceback", "--cluster", str(broken), "hosts")
    assert traced.returncode == 1
    assert traced.stderr.startswith("Traceback (most recent call last):\n"), traced.stderr
    # The traceback names the exception, and the same one-line error still ends the output.
    lines = traced.stderr.splitlines()
    assert lines[-1] == expected
    assert any(line.startswith("sshwasm.errors.") for line in lines[:-1]), traced.stderr
