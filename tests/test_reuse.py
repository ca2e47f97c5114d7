"""`run --reuse`: a job with the same content as one that succeeded takes its result at once
(issue 11). The key is content only: never paths or times."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PROGRAMS, job_spec, no_traceback, record_of, sshwasm
from sshd import SshServer

from sshwasm.cli import main
from sshwasm.fingerprint import reuse_key
from sshwasm.store import JobStore

STAGE = str(PROGRAMS / "stage.rs")


@pytest.mark.slow
def test_reuse_takes_a_succeeded_result_without_running_and_only_for_the_same_content(
    make_cluster: Callable[..., Path], ssh_hosts: dict[str, SshServer], tmp_path: Path
) -> None:
    cluster = str(make_cluster({"alpha": (2, 2048)}))
    data = tmp_path / "staged"
    data.mkdir()
    (data / "a.txt").write_text("alpha\n")
    (data / "sub").mkdir()
    (data / "sub" / "b.txt").write_text("beta beta\n")
    stdin = tmp_path / "stdin.txt"
    stdin.write_text("some stdin\n")

    def run(output: Path, *flags: str) -> tuple[dict[str, object], float]:
        started = time.monotonic()
        result = sshwasm(
            "--cluster", cluster, "run", STAGE, "--json", "--input", str(data),
            "--output", str(output), "--stdin", str(stdin), "--env", "K=V", *flags, "--", "1",
        )  # fmt: skip
        no_traceback(result)
        return record_of(result), time.monotonic() - started

    original, real_s = run(tmp_path / "out1")
    assert original["state"] == "succeeded" and original["reused_from"] is None
    assert original["fuel"] is None and original["fuel_used"] is None  # fuel not counted
    summary = (tmp_path / "out1" / "summary.txt").read_bytes()
    assert b"a.txt 6" in summary and b"sub/b.txt 10" in summary

    # The same content under another output directory, with the host down: nothing runs,
    # no host is contacted, and the result and /output are the original's.
    ssh_hosts["alpha"].stop()
    os.utime(data / "a.txt", (1, 1))  # a time alone is no change
    reused, reuse_s = run(tmp_path / "out2", "--reuse")
    assert reused["state"] == "succeeded" and reused["exit_code"] == 0
    assert reused["reused_from"] == original["id"] and reused["host"] is None
    assert reused["stdout"] == original["stdout"]
    assert (tmp_path / "out2" / "summary.txt").read_bytes() == summary
    assert reuse_s < real_s / 2, (reuse_s, real_s)
    logs = sshwasm("logs", str(reused["id"]))
    assert logs.stdout == original["stdout"]
    # Its report adds no fuel and no run time: nothing ran.
    report = json.loads(sshwasm("report", str(reused["id"]), "--json").stdout)
    assert report["run_s"] is None
    ssh_hosts["alpha"].start()

    # Without --reuse it runs; with other content (one byte of the input, the stdin, a
    # limit) it runs too, however alike the rest is.
    again, _ = run(tmp_path / "out3")
    assert again["reused_from"] is None and again["host"] == "alpha"
    (data / "sub" / "b.txt").write_text("beta betA\n")
    changed, _ = run(tmp_path / "out4", "--reuse")
    assert changed["reused_from"] is None and changed["host"] == "alpha"
    # The changed input's job is reused in turn, unless its output was changed since.
    (tmp_path / "out4" / "summary.txt").write_text("edited by the user\n")
    fresh, _ = run(tmp_path / "out5", "--reuse")
    assert fresh["reused_from"] is None and fresh["host"] == "alpha"
    (tmp_path / "out5" / "extra.txt").write_text("the user's own file\n")
    reused_again, _ = run(tmp_path / "out6", "--reuse")
    assert reused_again["reused_from"] == fresh["id"]
    assert sorted(os.listdir(tmp_path / "out6")) == ["summary.txt"]
    assert (tmp_path / "out6" / "summary.txt").read_text() != "edited by the user\n"


def test_the_reuse_key_covers_content_and_limits_only(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.db") as store:
        job = store.get(store.submit(job_spec()))
    job = dataclasses.replace(job, output_dir="/out", input_path="/in")
    staged = {"input": "1" * 64}
    key = reuse_key(job, None, staged)
    # Not the name, the cpus, the host, or where the files were.
    same = dataclasses.replace(
        job, name="other", cpus=8, pinned_host="alpha", input_path="/b", output_dir="/o"
    )
    assert reuse_key(same, None, staged) == key
    assert reuse_key(job, None, {"input": "2" * 64}) != key
    assert reuse_key(job, "3" * 64, staged) != key
    for change in (
        {"memory_mb": 300}, {"time_limit_s": 5.0}, {"fuel": 10}, {"argv": '["x", "y"]'},
        {"env": '[["K", "W"]]'}, {"wasm_sha256": "f" * 64}, {"verify": True},
        {"max_output_mb": 1}, {"output_dir": None},
    ):  # fmt: skip
        changed = dataclasses.replace(job, **change)  # type: ignore[arg-type]
        assert reuse_key(changed, None, staged) != key, change


def test_reuse_refuses_dependencies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", STAGE, "--reuse", "--after", "1"]) == 1
    assert capsys.readouterr().err == (
        "sshwasm: error: --reuse cannot be combined with --after or --after-any\n"
    )


def test_the_reuse_key_covers_read_only_dir_content_not_where_it_lives(tmp_path: Path) -> None:
    from sshwasm.directories import mounts_json, parse_dir
    from sshwasm.fingerprint import reusable_dirs

    first, second = tmp_path / "first" / "data", tmp_path / "second" / "data"
    for tree in (first, second):
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "a.txt").write_text("alpha\n")
    with JobStore(tmp_path / "jobs.db") as store:
        job = store.get(store.submit(job_spec()))

    def key_with(*dirs: str) -> str:
        with_dirs = dataclasses.replace(job, dirs=mounts_json([parse_dir(d) for d in dirs]))
        assert reusable_dirs(with_dirs.dirs)
        return reuse_key(with_dirs, None, {})

    key = key_with(f"{first}::/data:ro")
    assert key != reuse_key(job, None, {})  # the directory counts
    assert key_with(f"{second}::/data:ro") == key  # same content elsewhere: same key
    os.utime(second / "sub" / "a.txt", (0, 0))
    assert key_with(f"{second}::/data:ro") == key  # times never count
    assert key_with(f"{second}::/other:ro") != key  # seen at another place
    (second / "sub" / "a.txt").write_text("alphA\n")
    assert key_with(f"{second}::/data:ro") != key  # one byte changed
    # What comes back or is not seen from here cannot give or take a result.
    assert not reusable_dirs(mounts_json([parse_dir(f"{first}::/data")]))


@pytest.mark.parametrize(
    ("flag", "error"),
    [
        ("--reuse", "--reuse works with read-only --dir copies only (LOCAL::GUEST:ro)"),
        ("--verify", "--verify runs the job twice: its directories must be read-only (:ro)"),
    ],
)
def test_reuse_and_verify_refuse_a_directory_whose_changes_come_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, error: str
) -> None:
    (tmp_path / "tree").mkdir()
    assert main(["run", STAGE, flag, "--dir", f"{tmp_path / 'tree'}::/data"]) == 1
    assert capsys.readouterr().err == f"sshwasm: error: {error}\n"


def test_a_tree_is_read_again_only_when_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each succeeded task of an array computes its reuse key: a big read-only --dir must
    not be hashed once per task, yet any change to it must show."""
    from sshwasm import directories

    reads: list[str] = []
    real = directories.tree_manifest

    def counted(root: str) -> dict[str, str]:
        reads.append(root)
        return real(root)

    monkeypatch.setattr(directories, "tree_manifest", counted)
    tree = tmp_path / "data"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("alpha\n")
    first = directories.tree_digest(tree)
    assert directories.tree_digest(tree) == first and len(reads) == 1
    (tree / "sub" / "a.txt").write_text("alphA\n")  # same size, new bytes
    changed = directories.tree_digest(tree)
    assert changed != first and len(reads) == 2
    (tree / "sub" / "b.txt").write_text("")
    assert directories.tree_digest(tree) != changed and len(reads) == 3
