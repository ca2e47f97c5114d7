"""Hardening, trust: no silent `run`, nothing a host sends believed unchecked, no raw escapes.

Hosts are real sshd servers; a broken host is a fake runner module written into the host's
workdir (`<workdir>/bin/<version>/sshwasm_exec/`, the package the coordinator's command runs),
answering garbage where the real runner answers frames.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    PROGRAMS,
    no_traceback,
    record_of,
    sshwasm,
    start_streaming,
    wait_for_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sshwasm.cli import printable
from sshwasm.runner.jobdir import _make_result
from sshwasm.runner.protocol import (
    RESULT_KEYS,
    FrameDecoder,
    FrameError,
    ProtocolError,
    encode_frame,
    parse_cancel_answer,
    parse_frame_json,
    parse_info,
    parse_result,
)
from sshwasm.runner_client import StreamOutcome, apply_frame
from sshwasm.store import FINAL_STATES

TINY = str(PROGRAMS / "tiny.rs")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sshwasm: error:")]


# The version a fake runner is installed as: any other than ours.
FAKE_VERSION = "fa4e0000fa4e0000"


def install_fake_runner(cluster: Path, host: str, body: str) -> None:
    """Put a fake runner on a host: `body` runs with `frame(kind, payload)`, `command`,
    `spec` (launch's JSON line) and `read_frame()` (for serve) defined.

    It is installed as the current runner package, `<workdir>/bin/<version>/sshwasm_exec/`
    (whose `commands.main` the bootstrap imports and calls), so the coordinator finds a
    runner there and installs nothing.
    """
    bin_dir = cluster.parent / "workers" / host / "bin"
    package = bin_dir / FAKE_VERSION / "sshwasm_exec"
    package.mkdir(parents=True, exist_ok=True, mode=0o700)
    bin_dir.chmod(0o700)
    package.parent.chmod(0o700)
    module = textwrap.dedent(
        """\
        import json, os, struct, sys
        out = sys.stdout.buffer
        def frame(kind, payload):
            out.write(struct.pack(">cI", kind, len(payload)) + payload)
            out.flush()
        def read_frame():
            header = sys.stdin.buffer.read(5)
            kind, length = struct.unpack(">cI", header)
            return kind, sys.stdin.buffer.read(length)
        def main(argv=None):
            global command, spec
            command = (sys.argv[1:] if argv is None else list(argv))[0]
            spec = json.loads(sys.stdin.buffer.readline()) if command == "launch" else None
            exec(compile(BODY, "fake-runner", "exec"), globals())
            return 0
        """
    )
    (package / "__init__.py").write_text("")
    (package / "commands.py").write_text(module + f"BODY = {textwrap.dedent(body)!r}\n")
    for source in package.iterdir():
        source.chmod(0o600)
    shutil.rmtree(package / "__pycache__", ignore_errors=True)
    (bin_dir / "current").write_text(FAKE_VERSION + "\n")
    (bin_dir / "current").chmod(0o600)


def result_json(**changes: Any) -> bytes:
    """A valid result.json as the runner writes it, with `changes` applied."""
    result = json.loads(_make_result("succeeded", 0, None, run_s=0.01))
    result.update(changes)
    return json.dumps(result).encode()


# -- item 1: a host whose runner cannot start is skipped; `run` never fails silently ------


def test_run_skips_a_host_whose_python_lacks_wasmtime(make_cluster: Callable[..., Path]) -> None:
    # beta is the best fit for 2 cpus, but Debian's python there has no wasmtime.
    cluster = make_cluster(
        {"alpha": (8, 16384), "beta": {"cpus": 2, "memory_mb": 2048, "python": "/usr/bin/python3"}}
    )
    result = sshwasm("--cluster", str(cluster), "run", TINY, "--cpus", "2")
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tiny -\n"
    assert "skipping host 'beta'" in result.stderr
    assert "cannot import wasmtime" in result.stderr
    assert "`sshwasm hosts install beta`" in result.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["host"] == "alpha" and record["state"] == "succeeded"


def test_run_with_no_host_able_to_start_names_each_host_and_why(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster(
        {
            "alpha": {"cpus": 2, "memory_mb": 2048, "python": "/usr/bin/python3"},
            "beta": {"cpus": 2, "memory_mb": 2048, "python": "/nonexistent/python3"},
        }
    )
    for extra in ([], ["--json"]):
        result = sshwasm("--cluster", str(cluster), "run", TINY, *extra)
        no_traceback(result)
        assert result.returncode == 1
        (line,) = error_lines(result.stderr)
        assert "alpha: cannot import wasmtime" in line, line
        assert "beta: the runner cannot start with '/nonexistent/python3'" in line, line
        assert "sshwasm hosts install" in line
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed" and "no host could run the job" in record["error"]


def test_array_skips_a_host_whose_serve_cannot_start(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster(
        {"alpha": (8, 16384), "beta": {"cpus": 4, "memory_mb": 4096, "python": "/usr/bin/python3"}}
    )
    result = sshwasm("--cluster", str(cluster), "run", TINY, "--array", "3")
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["tiny 0", "tiny 1", "tiny 2"]
    warnings = [line for line in result.stderr.splitlines() if "skipping host 'beta'" in line]
    assert len(warnings) == 1, result.stderr  # once, not once per task
    assert "cannot import wasmtime" in warnings[0]
    jobs = json.loads(sshwasm("jobs", "--json").stdout)
    assert {job["host"] for job in jobs} == {"alpha"}


def test_array_tasks_that_no_host_can_start_each_say_so(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": {"cpus": 2, "memory_mb": 2048, "python": "/usr/bin/python3"}})
    for extra in ([], ["--json"]):
        result = sshwasm("--cluster", str(cluster), "run", TINY, "--array", "2", *extra)
        no_traceback(result)
        assert result.returncode == 1
        lines = error_lines(result.stderr)
        assert len(lines) == 2, result.stderr
        assert all("failed: no host could run the job" in line for line in lines)


def test_a_trap_is_said_on_stderr(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 2048)})
    result = sshwasm("--cluster", str(cluster), "run", str(PROGRAMS / "panic.rs"))
    no_traceback(result)
    assert result.returncode == 134
    assert "sshwasm: job 1 failed: UNREACHABLE" in result.stderr, result.stderr


def test_a_job_ending_without_its_own_exit_code_is_an_error_line(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 2048)})
    # The runner refuses the launch (as for a full disk): the job never had an exit code.
    install_fake_runner(
        cluster,
        "alpha",
        """
        frame(b"X", json.dumps({"error": "no space left on device", "kind": "io"}).encode())
        """,
    )
    for extra in ([], ["--json"]):
        result = sshwasm("--cluster", str(cluster), "run", TINY, *extra)
        no_traceback(result)
        assert result.returncode == 1
        (line,) = error_lines(result.stderr)
        assert "failed: host 'alpha': no space left on device" in line


def test_detached_run_failure_is_in_the_coordinator_log(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": {"cpus": 2, "memory_mb": 2048, "python": "/usr/bin/python3"}})
    result = sshwasm("--cluster", str(cluster), "run", TINY, "--detach")
    assert result.returncode == 0, result.stderr
    assert wait_for_state(1, FINAL_STATES)["state"] == "failed"
    log = Path(os.environ["SSHWASM_DATA_DIR"]) / "jobs-output" / "1" / "coordinator.log"
    deadline = time.monotonic() + 30
    while "sshwasm: error:" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # the coordinator writes its last line after the record
    text = log.read_text()
    assert "sshwasm: error: job 1 failed: no host could run the job" in text, text
    assert "Traceback" not in text


# -- item 11: what a host sends is checked before it is believed or stored -----------------


BROKEN_ANSWERS = {
    "unknown state": 'frame(b"R", RESULT.replace(b\'"succeeded"\', b\'"exploded"\'))',
    "run_s not a number": 'frame(b"R", RESULT.replace(b\'"run_s": 0.01\', b\'"run_s": "x"\'))',
    "result not JSON": 'frame(b"R", b"{not json")',
    "negative time": 'frame(b"R", RESULT.replace(b\'"run_s": 0.01\', b\'"run_s": -1\'))',
    "bad timestamp": 'frame(b"R", RESULT.replace(b\'"finished_at": "\', b\'"finished_at": "x\'))',
    "pid not a number": 'frame(b"S", b\'{"pid": "x", "job_dir": "/"}\')',
    "unknown frame kind": 'frame(b"Z", b"")',
}


@pytest.mark.parametrize("case", sorted(BROKEN_ANSWERS))
def test_broken_answer_fails_the_job_and_never_crashes_later_commands(
    make_cluster: Callable[..., Path], case: str
) -> None:
    cluster = make_cluster({"alpha": (2, 2048)})
    install_fake_runner(
        cluster,
        "alpha",
        f"RESULT = {result_json()!r}\n"
        'frame(b"S", json.dumps({"pid": os.getpid(), "job_dir": "/tmp/x"}).encode())\n'
        f"{BROKEN_ANSWERS[case]}\n",
    )
    result = sshwasm("--cluster", str(cluster), "run", TINY)
    no_traceback(result)
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert "host 'alpha': broken answer from the runner" in line, line
    for command in (["jobs"], ["jobs", "--json"], ["jobs", "--fold"], ["status", "1"]):
        later = sshwasm(*command)
        no_traceback(later)
        assert later.returncode == 0, later.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed", record
    assert "broken answer from the runner" in record["error"]
    assert record["run_s"] is None and record["exit_code"] is None


def test_broken_answers_to_cancel_and_refresh_are_one_line_and_fail_the_job(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 2048)})
    process = start_streaming(
        "--cluster", str(cluster), "run", str(PROGRAMS / "sleep.rs"), "--", "30"
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"start\n"  # running on alpha
    process.kill()
    process.wait()
    (job_dir,) = (cluster.parent / "workers" / "alpha" / "jobs").iterdir()
    os.kill(int((job_dir / "pid").read_text()), signal.SIGKILL)  # no guest left behind
    # The host's runner is now something else, which answers garbage to everything.
    install_fake_runner(
        cluster,
        "alpha",
        """
        if command == "cancel":
            out.write(b"{not json\\n")
        else:
            frame(b"R", b'{"state": "exploded"}')
        """,
    )
    cancel = sshwasm("cancel", "1")
    no_traceback(cancel)
    assert cancel.returncode == 1
    (line,) = error_lines(cancel.stderr)
    assert "job 1: host 'alpha': broken answer from the runner: cancel answer" in line, line
    for command in (["status", "1"], ["jobs"]):
        later = sshwasm(*command)
        no_traceback(later)
        assert later.returncode == 0, later.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed", record
    assert "broken answer from the runner: result has an invalid 'state'" in record["error"]


def test_broken_serve_hello_fails_array_tasks_with_one_line_each(
    make_cluster: Callable[..., Path],
) -> None:
    cluster = make_cluster({"alpha": (2, 2048)})
    install_fake_runner(
        cluster,
        "alpha",
        """
        read_frame()
        frame(b"H", b'{"pid": "x", "wasmtime_version": null, "error": null}')
        """,
    )
    result = sshwasm("--cluster", str(cluster), "run", TINY, "--array", "2")
    no_traceback(result)
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 2, result.stderr
    assert all("broken answer from the runner" in line for line in lines)
    assert sshwasm("jobs").returncode == 0


def test_runner_stderr_is_not_kept_whole(make_cluster: Callable[..., Path], tmp_path: Path) -> None:
    cluster = make_cluster({"alpha": (2, 2048)})
    install_fake_runner(
        cluster,
        "alpha",
        f"""
        block = b"e" * (1 << 20)
        for _ in range(256):
            sys.stderr.buffer.write(block)
        sys.stderr.buffer.flush()
        frame(b"S", json.dumps({{"pid": os.getpid(), "job_dir": "/tmp/x"}}).encode())
        frame(b"R", {result_json()!r})
        """,
    )
    # Linux counts the parent's memory at exec in a child's peak RSS (exec keeps the
    # high-water mark of the mm it replaces), so a pytest process grown big over a session
    # would show as the coordinator's peak. A small Python in between starts it instead.
    peak = tmp_path / "peak_kib"
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", PEAK_RSS_OF_CHILD, str(peak),
             sys.executable, "-m", "sshwasm", "--cluster", str(cluster), "run", TINY],
            stdout=out,
            stderr=err,
        )  # fmt: skip
        try:
            # Killed if it hangs: a runner's stderr left unread can stall its channel.
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0, (tmp_path / "err").read_text()
    # 256 MiB of the runner's stderr went by; the coordinator kept its tail only.
    assert int(peak.read_text()) < 200 * 1024, peak.read_text()


PEAK_RSS_OF_CHILD = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as peak:
    peak.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


# -- the decoder and the parsers raise their own errors only -------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_frame_decoder_raises_only_frame_errors(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_payload=1 << 10)
    try:
        for chunk in chunks:
            for kind, payload in decoder.feed(chunk):
                assert len(kind) == 1 and len(payload) <= 1 << 10
    except FrameError:
        pass


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=8,
)
RESULT_LIKE = st.dictionaries(st.sampled_from(RESULT_KEYS), JSON_VALUES)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), RESULT_LIKE.map(lambda d: json.dumps(d).encode())))
def test_result_parser_raises_only_protocol_errors(payload: bytes) -> None:
    try:
        result = parse_result(payload)
    except ProtocolError:
        return
    assert set(result) == set(RESULT_KEYS)
    assert result["state"] in ("succeeded", "failed", "timeout", "out_of_memory", "cancelled")
    for key in ("run_s", "cpu_s", "module_compile_s"):
        assert result[key] is None or (isinstance(result[key], (int, float)) and result[key] >= 0)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([b"S", b"N", b"X", b"A", b"H", b"R", b"O", b"E", b"Z", b"\x00"]),
    st.one_of(
        st.binary(max_size=100),
        st.dictionaries(
            st.sampled_from(["pid", "job_dir", "need", "error", "kind", "alive", "state"]),
            JSON_VALUES,
        ).map(lambda d: json.dumps(d).encode()),
    ),
)
def test_frames_and_answers_raise_only_protocol_errors(kind: bytes, payload: bytes) -> None:
    for parse in (
        lambda: apply_frame(StreamOutcome(), kind, payload, lambda _: None, lambda _: None),
        lambda: parse_frame_json(kind, payload),
        lambda: parse_cancel_answer(payload),
        lambda: parse_info(payload),
    ):
        with contextlib.suppress(ProtocolError):
            parse()


def test_the_runner_own_answers_pass_its_parsers() -> None:
    for state, code in (("succeeded", 0), ("failed", 134), ("timeout", 124), ("cancelled", 143)):
        assert parse_result(_make_result(state, code, "why", run_s=1.5))["exit_code"] == code
    assert parse_result(_make_result("failed", None, "runner died"))["exit_code"] is None
    outcome = StreamOutcome()
    apply_frame(outcome, b"S", b'{"pid": 7, "job_dir": "/w"}', print, print)
    assert outcome.pid == 7
    assert parse_cancel_answer(b'{"state": "cancelled"}\n')["state"] == "cancelled"
    with pytest.raises(ProtocolError):
        parse_result(_make_result("lost", None, None))
    with pytest.raises(ProtocolError):
        apply_frame(outcome, b"R", b"[" * 100_000, print, print)
    with pytest.raises(FrameError):
        FrameDecoder(max_payload=4).feed(encode_frame(b"O", b"12345"))


# -- item 12: control characters in names and host texts are shown escaped ----------------


def test_printable_escapes_control_characters() -> None:
    assert printable("\x1b[31mred\x9b2J\x7f\n\tok é") == "\\x1b[31mred\\x9b2J\\x7f\\n\\tok é"


def test_job_name_with_escapes_is_shown_escaped(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 2048)})
    name = "\x1b[31mred\x1b]0;title\x07"
    assert sshwasm("--cluster", str(cluster), "run", TINY, "--job-name", name).returncode == 0
    for command in (["jobs"], ["jobs", "--fold"], ["status", "1"]):
        shown = sshwasm(*command)
        assert "\\x1b[31mred\\x1b]0;title\\x07" in shown.stdout, shown.stdout
        assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert record_of(sshwasm("status", "1", "--json"))["name"] == name  # JSON stays exact


def test_host_error_with_escapes_is_shown_escaped(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 2048)})
    install_fake_runner(
        cluster,
        "alpha",
        r"""
        error = "\x1b[2J\x1b]0;pwned\x07 gone\x9b"
        frame(b"X", json.dumps({"error": error, "kind": "io"}).encode())
        """,
    )
    result = sshwasm("--cluster", str(cluster), "run", TINY)
    assert result.returncode == 1
    assert "\\x1b[2J\\x1b]0;pwned\\x07 gone\\x9b" in result.stderr, result.stderr
    for text in (result.stderr, sshwasm("status", "1").stdout, sshwasm("jobs").stdout):
        assert not any(c in text for c in "\x1b\x07\x9b"), text


def test_host_probe_printing_too_much_is_one_error(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    chatty = tmp_path / "chatty-python"
    chatty.write_text("#!/bin/sh\nhead -c 3000000 /dev/zero\n")
    chatty.chmod(0o755)
    cluster = make_cluster({"alpha": {"cpus": 2, "memory_mb": 2048, "python": str(chatty)}})
    result = sshwasm("--cluster", str(cluster), "hosts", "--check", "--json")
    no_traceback(result)
    assert result.returncode == 1
    (report,) = json.loads(result.stdout)
    assert "printed more than 1048576 bytes" in report["error"], report


def test_hosts_table_shows_a_host_message_escaped(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    facts = {
        "python": "3.11.2",
        "wasmtime_version": None,
        "wasmtime_error": "\x1b]0;owned\x07\x1b[2J gone",
        "cpus": 2,
        "memory_mb": 2048,
    }
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' '{json.dumps(facts)}'\n")
    fake.chmod(0o755)
    cluster = make_cluster({"alpha": {"cpus": 2, "memory_mb": 2048, "python": str(fake)}})
    result = sshwasm("--cluster", str(cluster), "hosts", "--check")
    no_traceback(result)
    assert result.returncode == 1
    assert "\\x1b]0;owned\\x07\\x1b[2J gone" in result.stdout, result.stdout
    assert "\x1b" not in result.stdout + result.stderr and "\x07" not in result.stdout
