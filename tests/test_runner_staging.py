"""File staging in the runner: a tar of input in, a read-only /input, a writable /output,
and fetch-output's tar stream back, with real wasmtime and a real guest (programs/stage.rs)."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    OLD_PYTHONS,
    OLD_PYTHONS_MISSING,
    RUNNER,
    RUNNER_VERSION,
    Guest,
    LiveLauncher,
    frozen,
    run_frames,
    run_runner,
    wait_for,
)

from sshwasm.runner.safetar import (
    MAX_OUTPUT_DEPTH,
    UnsafeArchive,
    extract_tar_safely,
    write_tree_as_tar,
)


@pytest.fixture
def workdir(tmp_path: Path, stager: Guest, guest: Guest) -> Path:
    path = tmp_path / "wd"
    for module in (stager, guest):
        done = run_runner("put-module", str(path), module.sha256, stdin=module.data)
        assert done.returncode == 0, done.stderr
    return path


def staged_spec(
    module: Guest,
    argv: list[str],
    *,
    stdin: bytes | None = None,
    input_tar: bytes | None = None,
    output: bool = False,
    time_limit_s: float | None = None,
) -> bytes:
    """A launch stream in the sized form: spec line, stdin_bytes of stdin, then the tar."""
    spec: dict[str, object] = {
        "runner_version": RUNNER_VERSION,
        "wasm_sha256": module.sha256,
        "argv": argv,
        "env": [],
        "memory_mb": 64,
        "time_limit_s": time_limit_s,
        "output": output,
    }
    if stdin is not None:
        spec["stdin_bytes"] = len(stdin)
    if input_tar is not None:
        spec["input_tar_bytes"] = len(input_tar)
    return json.dumps(spec).encode() + b"\n" + (stdin or b"") + (input_tar or b"")


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member, data in members:
            if data is not None:
                member.size = len(data)
            archive.addfile(member, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file_member(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    member = tarfile.TarInfo(name)
    member.mode = mode
    return member, data


def special_member(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = link
    return member, None


def summary_lines(stdout: bytes) -> dict[str, str]:
    """The stage guest's report: 'path size' lines, then 'attempt: outcome' lines."""
    lines: dict[str, str] = {}
    for line in stdout.decode().splitlines():
        if ": " in line:
            name, outcome = line.split(": ", 1)
        else:
            name, outcome = line.rsplit(" ", 1)
        lines[name] = outcome
    return lines


def untar(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return {member.name: member for member in archive.getmembers()}


def fetch_output(workdir: Path, job_id: str) -> subprocess.CompletedProcess[bytes]:
    return run_runner("fetch-output", str(workdir), job_id)


def assert_escapes_refused(report: dict[str, str], *, with_output: bool = True) -> None:
    assert report["write /input/new"].startswith("denied"), report
    assert report["read /etc/hostname"].startswith("denied"), report
    if with_output:
        assert report["symlink absolute"].startswith("denied"), report
        # WASI lets a guest *create* a relative link pointing out of /output (measured with
        # wasmtime 50), but not follow it; fetch-output must never follow or send it either.
        assert report["read via upward link"].startswith("denied"), report


# ------------------------------------------------------------------------ staged input


def test_a_single_staged_file_is_seen_read_only_at_input(workdir: Path, stager: Guest) -> None:
    tar = tar_of(file_member("data.csv", b"a,b\n1,2\n", mode=0o4777))
    outcome = run_frames(
        "launch", str(workdir), "1", stdin=staged_spec(stager, ["stage"], input_tar=tar)
    )
    assert outcome.result()["state"] == "succeeded", outcome.stderr_stream()
    report = summary_lines(outcome.stdout())
    assert report["data.csv"] == "8"
    assert_escapes_refused(report, with_output=False)
    # Without an /output preopen the guest could not write its summary anywhere.
    assert report["open /output"].startswith("failed to find a pre-opened")
    staged = workdir / "jobs" / "1" / "input" / "data.csv"
    assert staged.read_bytes() == b"a,b\n1,2\n"
    # Tar modes are not trusted: setuid and world bits are gone.
    assert stat.S_IMODE(staged.stat().st_mode) == 0o600
    assert stat.S_IMODE(staged.parent.stat().st_mode) == 0o700


def test_a_staged_directory_tree_keeps_its_shape(
    tmp_path: Path, workdir: Path, stager: Guest
) -> None:
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "empty-dir").mkdir()
    (tree / "top.txt").write_bytes(b"x" * 5)
    (tree / "sub" / "mid.bin").write_bytes(bytes(range(256)) * 4)
    (tree / "sub" / "deeper" / "leaf").write_bytes(b"")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(tree, arcname=".")  # names like ./sub/mid.bin, as `tar -C tree .` makes
    spec = staged_spec(stager, ["stage"], input_tar=buffer.getvalue(), output=True)
    outcome = run_frames("launch", str(workdir), "1", stdin=spec)
    assert outcome.result()["state"] == "succeeded", outcome.stderr_stream()
    report = summary_lines(outcome.stdout())
    assert {name: report[name] for name in ("top.txt", "sub/mid.bin", "sub/deeper/leaf")} == {
        "top.txt": "5",
        "sub/mid.bin": "1024",
        "sub/deeper/leaf": "0",
    }
    assert (workdir / "jobs" / "1" / "input" / "empty-dir").is_dir()
    assert_escapes_refused(report)
    job_dir = workdir / "jobs" / "1"
    for path in [job_dir / "input", *(job_dir / "input").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_sized_stdin_and_input_arrive_together(workdir: Path, guest: Guest) -> None:
    stdin = b"exactly these bytes\n\x00\xff"
    tar = tar_of(file_member("in.txt", b"staged"))
    spec = staged_spec(guest, ["probe", "echo"], stdin=stdin, input_tar=tar)
    outcome = run_frames("launch", str(workdir), "1", stdin=spec)
    assert outcome.result()["state"] == "succeeded"
    assert outcome.stdout().split(b"\x01", 2)[2] == stdin
    assert (workdir / "jobs" / "1" / "input" / "in.txt").read_bytes() == b"staged"
    read = run_frames(
        "launch",
        str(workdir),
        "2",
        stdin=staged_spec(guest, ["probe", "read", "/input/in.txt"], input_tar=tar),
    )
    assert read.stdout() == b"staged"


def test_a_stream_shorter_than_announced_is_refused(workdir: Path, stager: Guest) -> None:
    tar = tar_of(file_member("data", b"12345"))
    spec = staged_spec(stager, ["stage"], stdin=b"abc", input_tar=tar)
    outcome = run_frames("launch", str(workdir), "1", stdin=spec[:-700])
    assert outcome.json_of(b"X")["kind"] in ("spec", "input")
    assert not (workdir / "jobs" / "1").exists()
    short_stdin = staged_spec(stager, ["stage"], stdin=b"abcdef")[:-3]
    outcome = run_frames("launch", str(workdir), "2", stdin=short_stdin)
    assert outcome.json_of(b"X")["kind"] == "spec"
    assert not (workdir / "jobs" / "2").exists()


def test_input_with_has_stdin_needs_stdin_bytes(workdir: Path, stager: Guest) -> None:
    spec = json.loads(staged_spec(stager, ["stage"], input_tar=tar_of()).split(b"\n")[0])
    spec["has_stdin"] = True
    outcome = run_frames("launch", str(workdir), "1", stdin=json.dumps(spec).encode() + b"\n")
    error = outcome.json_of(b"X")
    assert error["kind"] == "spec" and "stdin_bytes" in str(error["error"])


MALICIOUS = {
    "absolute": tar_of(file_member("/tmp/sshwasm-escape", b"owned")),
    "dotdot": tar_of(file_member("../x", b"owned")),
    "nested-dotdot": tar_of(file_member("ok/../../x", b"owned")),
    "symlink": tar_of(special_member("link", tarfile.SYMTYPE, "/etc/hostname")),
    "hardlink": tar_of(special_member("link", tarfile.LNKTYPE, "/etc/hostname")),
    "char-device": tar_of(special_member("null", tarfile.CHRTYPE)),
    "block-device": tar_of(special_member("disk", tarfile.BLKTYPE)),
    "fifo": tar_of(special_member("pipe", tarfile.FIFOTYPE)),
    "link-then-file-through-it": tar_of(
        special_member("dir", tarfile.SYMTYPE, "/tmp"), file_member("dir/x", b"owned")
    ),
    "file-then-dir-of-same-name": tar_of(file_member("a", b"1"), file_member("a/b", b"2")),
    "duplicate": tar_of(file_member("a", b"1"), file_member("a", b"2")),
    "not-a-tar": b"this is not a tar stream at all, just text" * 20,
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_an_unsafe_input_tar_is_refused(
    tmp_path: Path, workdir: Path, stager: Guest, case: str
) -> None:
    spec = staged_spec(stager, ["stage"], input_tar=MALICIOUS[case])
    outcome = run_frames("launch", str(workdir), "1", stdin=spec)
    assert [kind for kind, _ in outcome.frames] == [b"X"]
    error = outcome.json_of(b"X")
    assert error["kind"] == "input"
    assert "\n" not in str(error["error"])
    assert not (workdir / "jobs" / "1").exists()
    assert not (workdir / "jobs" / "x").exists() and not (workdir / "x").exists()
    assert not Path("/tmp/sshwasm-escape").exists()


def test_the_extractor_refuses_without_writing_outside(tmp_path: Path) -> None:
    for case, data in MALICIOUS.items():
        destination = tmp_path / case / "input"
        destination.mkdir(parents=True)
        with pytest.raises(UnsafeArchive):
            extract_tar_safely(io.BytesIO(data), str(destination))
        # Whatever came before the bad member may be there; nothing is beside or above.
        assert os.listdir(tmp_path / case) == ["input"]
        assert not any(path.is_symlink() for path in destination.rglob("*"))


# ----------------------------------------------------------------------- fetch-output


def test_fetch_output_round_trips_what_the_job_wrote(
    tmp_path: Path, workdir: Path, stager: Guest
) -> None:
    tar = tar_of(file_member("a.txt", b"abc"))
    outcome = run_frames(
        "launch",
        str(workdir),
        "1",
        stdin=staged_spec(stager, ["stage"], input_tar=tar, output=True),
    )
    assert outcome.result()["state"] == "succeeded"
    job_output = workdir / "jobs" / "1" / "output"
    assert stat.S_IMODE(job_output.stat().st_mode) == 0o700
    # Files made beside the job's, as a job writing nested results would have.
    (job_output / "nested" / "deeper").mkdir(parents=True)
    (job_output / "nested" / "deeper" / "big.bin").write_bytes(os.urandom(300_000))
    (job_output / "nested" / "empty").write_bytes(b"")
    done = fetch_output(workdir, "1")
    assert done.returncode == 0, done.stderr
    members = untar(done.stdout)
    assert "summary.txt" in members and "nested/deeper/big.bin" in members
    assert all(member.isfile() or member.isdir() for member in members.values())
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    extract_tar_safely(io.BytesIO(done.stdout), str(fetched))
    assert (fetched / "summary.txt").read_bytes() == outcome.stdout()
    for relative in ("nested/deeper/big.bin", "nested/empty"):
        assert (fetched / relative).read_bytes() == (job_output / relative).read_bytes()


def test_fetch_output_never_follows_or_sends_links_or_specials(
    workdir: Path, stager: Guest
) -> None:
    spec = staged_spec(stager, ["stage"], output=True)
    outcome = run_frames("launch", str(workdir), "1", stdin=spec)
    report = summary_lines(outcome.stdout())
    job_output = workdir / "jobs" / "1" / "output"
    guest_made_link = report["symlink upward"] == "ALLOWED"
    assert (job_output / "up-link").is_symlink() == guest_made_link
    # What a job (or anything else) could leave there, made by hand after the run.
    secret = workdir.parent / "host-secret.txt"
    secret.write_text("host secret")
    (job_output / "to-file").symlink_to(secret)
    (job_output / "to-dir").symlink_to(workdir.parent)
    os.mkfifo(job_output / "fifo")
    (job_output / "real").mkdir()
    (job_output / "real" / "link-inside").symlink_to("../summary.txt")
    done = fetch_output(workdir, "1")
    assert done.returncode == 0
    assert b"host secret" not in done.stdout
    assert sorted(untar(done.stdout)) == ["real", "summary.txt"]
    skipped = 4 + guest_made_link
    assert done.stderr.decode().count("\n") == 1
    assert f"skipped {skipped} entries" in done.stderr.decode()


def test_output_stays_fetchable_while_running_and_after_a_timeout(
    workdir: Path,
    stager: Guest,
    live_launchers: Callable[[Path, str, bytes], LiveLauncher],
) -> None:
    spec = staged_spec(stager, ["stage", "30"], output=True, time_limit_s=2)
    launcher = live_launchers(workdir, "1", spec)
    pid = launcher.read_until(b"S")["pid"]
    assert isinstance(pid, int)
    summary = launcher.job_dir / "output" / "summary.txt"
    wait_for(lambda: summary.exists() and summary.stat().st_size > 0)
    # Frozen, the job can neither finish nor reach its time limit while output is fetched;
    # once thawed, the limit (long past on a slow machine) ends it.
    with frozen(pid):
        while_running = fetch_output(workdir, "1")
        assert not (launcher.job_dir / "result.json").exists()
    assert while_running.returncode == 0
    assert "summary.txt" in untar(while_running.stdout)
    result = launcher.read_until(b"R")
    assert result["state"] == "timeout"
    after = fetch_output(workdir, "1")
    assert after.returncode == 0
    assert untar(after.stdout)["summary.txt"].size == summary.stat().st_size


def test_a_file_shrinking_while_fetched_keeps_the_stream_whole(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    (root / "a").write_bytes(b"a" * 100_000)
    (root / "b").write_bytes(b"b" * 10)

    class Sink(io.BytesIO):
        truncated = False

        def write(self, data: bytes) -> int:  # type: ignore[override]
            # Once the archive has started, the job truncates its file under us.
            if not self.truncated and self.tell() > 0:
                (root / "a").write_bytes(b"a" * 10)
                self.truncated = True
            return super().write(data)

    sink = Sink()
    assert write_tree_as_tar(str(root), sink) == 0
    members = untar(sink.getvalue())
    assert (members["a"].size, members["b"].size) == (100_000, 10)


def test_output_deeper_than_the_limit_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "out"
    deep = root.joinpath(*["d"] * (MAX_OUTPUT_DEPTH + 3))
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"x")
    sink = io.BytesIO()
    assert write_tree_as_tar(str(root), sink) == 1
    names = untar(sink.getvalue())
    assert max(name.count("/") for name in names) == MAX_OUTPUT_DEPTH - 1


@pytest.mark.parametrize("case", ["no-job", "no-output"])
def test_fetch_output_without_an_output_fails(workdir: Path, stager: Guest, case: str) -> None:
    if case == "no-output":
        run_frames("launch", str(workdir), "1", stdin=staged_spec(stager, ["stage"]))
    done = fetch_output(workdir, "1")
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.decode().count("\n") == 1


OLDER_STAGING_CHECK = r"""
import importlib, importlib.util, io, json, os, sys
# The runner package from its directory, as its __main__ loads it.
init = os.path.join(sys.argv[1], "__init__.py")
spec = importlib.util.spec_from_file_location(
    "sshwasm_exec", init, submodule_search_locations=[sys.argv[1]]
)
sys.modules["sshwasm_exec"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["sshwasm_exec"])
runner = importlib.import_module("sshwasm_exec.safetar")
cases = json.loads(open(sys.argv[2]).read())
outcome = {}
for name, hex_data in cases.items():
    destination = os.path.join(sys.argv[3], name)
    os.makedirs(destination)
    try:
        runner.extract_tar_safely(io.BytesIO(bytes.fromhex(hex_data)), destination)
        outcome[name] = sorted(os.listdir(destination))
    except runner.UnsafeArchive:
        outcome[name] = "refused"
print(json.dumps(outcome))
"""


@pytest.mark.skipif(not OLD_PYTHONS, reason=OLD_PYTHONS_MISSING)
@pytest.mark.parametrize("python", OLD_PYTHONS, ids=lambda path: path.parent.parent.name)
def test_staging_works_on_older_pythons(tmp_path: Path, python: Path) -> None:
    cases = {name: data.hex() for name, data in MALICIOUS.items()}
    cases["good"] = tar_of(file_member("a", b"1"), file_member("d/b", b"2")).hex()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "out").mkdir()
    done = subprocess.run(
        [
            str(python),
            "-c",
            OLDER_STAGING_CHECK,
            str(RUNNER),
            str(tmp_path / "cases.json"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        check=True,
    )
    outcome = json.loads(done.stdout)
    assert outcome.pop("good") == ["a", "d"]
    assert set(outcome.values()) == {"refused"}
    # fetch-output, a light command, runs there too and skips the link.
    job_output = tmp_path / "wd" / "jobs" / "1" / "output"
    job_output.mkdir(parents=True)
    (job_output / "f").write_bytes(b"data")
    (job_output / "link").symlink_to("/etc/hostname")
    fetched = run_runner("fetch-output", str(tmp_path / "wd"), "1", python=[str(python)])
    assert fetched.returncode == 0, fetched.stderr
    assert sorted(untar(fetched.stdout)) == ["f"]
