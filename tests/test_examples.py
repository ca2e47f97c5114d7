"""The examples and guarantees a user reads about in the README, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from helpers import EXAMPLES, PROGRAMS, record_of, sshwasm


def test_sweep_example_runs_as_an_array(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024), "beta": (2, 1024)})
    result = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "sweep.rs"), "--array", "6", "--tag"
    )
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines(), key=lambda line: int(line.split("\t")[0]))
    assert [line.split("\t")[1].split()[0] for line in lines] == [
        f"points={1000 << i}" for i in range(6)
    ]
    estimates = [float(line.rsplit("~", 1)[1]) for line in lines]
    assert abs(estimates[-1] - 3.14159) < 0.05


def test_wordcount_example_stages_in_and_out(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    texts = tmp_path / "texts"
    (texts / "more").mkdir(parents=True)
    (texts / "a.txt").write_text("one two\nthree\n")
    (texts / "more" / "b.txt").write_text("four five six\n")
    results = tmp_path / "results"
    result = sshwasm(
        "--cluster", str(cluster), "run", str(EXAMPLES / "wordcount.rs"),
        "--input", str(texts), "--output", str(results),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "counted 2 files\n"
    assert (results / "counts.txt").read_text() == (
        "a.txt lines=2 words=3\nmore/b.txt lines=1 words=3\n"
    )


def test_output_that_is_not_utf8_is_kept_byte_for_byte(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    expected = bytes(range(256)) * 4
    run = subprocess.run(
        [sys.executable, "-m", "sshwasm", "--cluster", str(cluster), "run",
         str(PROGRAMS / "binary.rs")],
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected and run.stderr == b"\xe9\n"
    logs = subprocess.run(
        [sys.executable, "-m", "sshwasm", "logs", "1"], capture_output=True, timeout=60
    )
    assert logs.stdout == expected
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["stderr"] == "\ufffd\n"  # the record holds text; the files hold the bytes
    assert json.loads(sshwasm("jobs", "--json").stdout)[0]["state"] == "succeeded"
