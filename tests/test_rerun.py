"""`sshwasm rerun ID [--host NAME] [--compare]`: the exact job again, compared (issue 11)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PROGRAMS, job_spec, no_traceback, record_of, sshwasm

from sshwasm import paths
from sshwasm.states import JobState
from sshwasm.store import JobStore
from sshwasm.verify import differences

STAGE = str(PROGRAMS / "stage.rs")
RANDOM = str(PROGRAMS / "random.rs")


@pytest.mark.slow
def test_rerun_compare_says_identical_or_names_the_difference(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = str(make_cluster({"alpha": (2, 2048), "beta": (2, 2048)}))
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "a.txt").write_text("alpha\n")
    out = tmp_path / "out"

    first = sshwasm(
        "--cluster", cluster, "run", STAGE, "--host", "alpha", "--input", str(staged),
        "--output", str(out), "--env", "K=V", "--json",
    )  # fmt: skip
    original = record_of(first)
    assert original["state"] == "succeeded"

    # Deterministic: the same on another host, stdout, stderr, exit code and /output alike.
    result = sshwasm("--cluster", cluster, "rerun", str(original["id"]), "--host", "beta",
                     "--compare")  # fmt: skip
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "identical\n"
    again = record_of(sshwasm("status", "2", "--json"))
    assert again["rerun_of"] == original["id"] and again["host"] == "beta"
    assert again["stdout"] == original["stdout"]
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]  # nothing beside it

    # random_get: the rerun differs, and says where.
    noisy = record_of(sshwasm("--cluster", cluster, "run", RANDOM, "--json", "--", "random"))
    result = sshwasm("--cluster", cluster, "rerun", str(noisy["id"]), "--compare")
    no_traceback(result)
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    # Its first 18 bytes are fixed text; a random byte after them may by chance be the
    # same in both runs (1 in 16 for a hex digit), so the first difference is at 18 or later.
    differs = re.fullmatch(
        r"stdout differs: 51 bytes \(job 3\) vs 51 bytes \(job 4\), first at byte (\d+)(.*)", line
    )
    assert differs is not None and 18 <= int(differs.group(1)) < 51, line

    # The staged input changed since: no rerun of something different.
    (staged / "a.txt").write_text("alpha, edited\n")
    result = sshwasm("--cluster", cluster, "rerun", str(original["id"]))
    no_traceback(result)
    assert result.returncode == 1
    assert result.stderr == (
        f"sshwasm: error: job 1's --input {staged} no longer holds what the job was given; "
        f"not rerunning it with something different\n"
    )
    # The module must still be the one it ran.
    with JobStore(paths.jobs_db()) as store:
        store.update(3, wasm_path=str(tmp_path / "gone.wasm"))
    result = sshwasm("--cluster", cluster, "rerun", "3")
    assert result.returncode == 1
    assert result.stderr.startswith("sshwasm: error: job 3's module (sha256 ")
    assert "is no longer cached at" in result.stderr
    assert [job["id"] for job in json.loads(sshwasm("jobs", "--json").stdout)] == [4, 3, 2, 1]


def test_differences_name_each_stream_and_output_file(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.db") as store:
        first, second = (store.get(store.submit(job_spec())) for _ in range(2))
        for job, out, manifest in (
            (first, b"same\nA", {"x.txt": "1" * 64, "only-a": "2" * 64, "d/": ""}),
            (second, b"same\nBB", {"x.txt": "3" * 64, "d/": "", "only-b": "4" * 64}),
        ):
            directory = paths.make_job_output_dir(store.path, job.id)
            (directory / "stdout").write_bytes(out)
            (directory / "output.json").write_text(json.dumps(manifest))
            store.finish(job.id, JobState.SUCCEEDED, exit_code=0)
        first, second = store.get(first.id), store.get(second.id)
        assert differences(store.path, first, second) == [
            "stdout differs: 6 bytes (job 1) vs 7 bytes (job 2), first at byte 5",
            "/output/only-a: only in job 1",
            "/output/only-b: only in job 2",
            "/output/x.txt differs (sha256 111111111111 vs 333333333333)",
        ]
        assert differences(store.path, first, first) == []
