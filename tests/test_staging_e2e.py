"""`--input` and `--output` over real SSH: files in, results back, nothing else visible."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from helpers import PROGRAMS, record_of, sshwasm

STAGE = str(PROGRAMS / "stage.rs")


def test_a_directory_in_and_results_out(make_cluster: Callable[..., Path], tmp_path: Path) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("hello")
    (data / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
    results = tmp_path / "results"
    result = sshwasm(
        "--cluster", str(cluster), "run", STAGE, "--input", str(data), "--output", str(results),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = (results / "summary.txt").read_text()
    assert "a.txt 5\n" in summary and "sub/b.bin 1024\n" in summary
    # Every way out is shut; a guest may make a relative link in /output, never follow it,
    # and it never comes back here.
    for attempt in ("write /input/new", "read /etc/hostname", "symlink absolute",
                    "read via upward link"):  # fmt: skip
        assert f"{attempt}: denied" in summary, summary
    assert summary == result.stdout
    assert not any(path.is_symlink() for path in results.rglob("*"))
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["input_bytes"] > 1024 and record["output_bytes"] == len(summary)
    assert record["stage_in_s"] >= 0 and record["stage_out_s"] >= 0
    assert (data / "a.txt").read_text() == "hello"  # the input is untouched


def test_a_single_file_in(make_cluster: Callable[..., Path], tmp_path: Path) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    single = tmp_path / "numbers.csv"
    single.write_text("1,2,3\n")
    result = sshwasm("--cluster", str(cluster), "run", STAGE, "--input", str(single))
    assert result.returncode == 0, result.stderr
    assert "numbers.csv 6\n" in result.stdout


def test_without_staging_the_job_sees_no_filesystem(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    result = sshwasm("--cluster", str(cluster), "run", STAGE)
    assert result.stdout.startswith("write /input/new: denied"), result.stdout
    assert "read /etc/hostname: denied" in result.stdout
    assert "open /output: " in result.stdout  # no /output without --output


def test_partial_output_comes_back_after_a_timeout(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    results = tmp_path / "partial"
    # 3 s: loading the module counts against the limit, and under load it can take a second
    # before the guest writes its summary.
    result = sshwasm(
        "--cluster", str(cluster), "run", STAGE, "--output", str(results), "--time-limit", "3",
        "--", "30",
    )  # fmt: skip
    assert result.returncode == 124
    assert (results / "summary.txt").exists()


def test_array_tasks_get_their_own_output_dirs(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    results = tmp_path / "sweep"
    result = sshwasm(
        "--cluster", str(cluster), "run", STAGE, "--array", "3", "--output", str(results),
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in results.iterdir()) == ["0", "1", "2"]
    assert all((results / str(i) / "summary.txt").exists() for i in range(3))
    assert all(r["output_bytes"] > 0 for r in json.loads(result.stdout))


def test_bad_staging_arguments(make_cluster: Callable[..., Path], tmp_path: Path) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    missing = sshwasm("--cluster", str(cluster), "run", STAGE, "--input", str(tmp_path / "no"))
    assert missing.returncode == 1 and "--input" in missing.stderr
    a_file = tmp_path / "file"
    a_file.write_text("x")
    clash = sshwasm("--cluster", str(cluster), "run", STAGE, "--output", str(a_file))
    assert clash.returncode == 1 and "not a directory" in clash.stderr
