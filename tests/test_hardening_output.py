"""Hardening: what a job's output may do to the user's files, the coordinator and the host.

Items 2 (`--output DIR` never deletes nor overwrites what is there), 3 (output comes back
streamed, in bounded memory, whatever its size or holes) and 8 (`--max-output-mb` caps
stdout, stderr and /output together, on the host and here) of the hardening issue.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PROGRAMS, job_spec, no_traceback, record_of, sshwasm

from sshwasm.job_output import OutputBudget, OutputSink
from sshwasm.runner.safetar import ArchiveTooLarge, UnsafeArchive
from sshwasm.staging import TarExtractor

WRITEOUT = str(PROGRAMS / "writeout.rs")
MIB = 1 << 20
LIMIT_ERROR = "output limit of {} MB exceeded (stdout, stderr and /output together)"
# The coordinator's peak RSS while a job moves hundreds of MB must stay near an idle
# interpreter with asyncssh loaded (~45 MiB, see the stream_rss benchmark).
RSS_CEILING_MIB = 150


def run_measured(stdout_path: Path, *args: str) -> tuple[int, str, float]:
    """Run sshwasm in a fresh interpreter; (exit code, stderr, its peak RSS in MiB).

    The module must be compiled already: a compiler process would count in the peak.
    """
    script = (
        "import resource, subprocess, sys\n"
        "with open(sys.argv[1], 'wb') as out:\n"
        "    done = subprocess.run([sys.executable, '-m', 'sshwasm', *sys.argv[2:]],\n"
        "                          stdout=out, stderr=subprocess.PIPE)\n"
        "sys.stderr.buffer.write(done.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(done.returncode)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(stdout_path), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stderr, int(done.stdout.strip()) / 1024


def warm(cluster: Path) -> None:
    """Compile the guest once, so that measured runs start no compiler."""
    done = sshwasm("--cluster", str(cluster), "run", WRITEOUT, "--", "print:1")
    assert done.returncode == 0, done.stderr


def host_job_dirs(tmp_path: Path, host: str = "alpha") -> list[Path]:
    return sorted((tmp_path / "workers" / host / "jobs").iterdir())


def tree(root: Path) -> dict[str, str]:
    """Every entry under root: file contents, 'dir', or 'link -> target' (never followed)."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = path.read_text()
    return found


# -- item 2: nothing of the user's is lost ---------------------------------------------------


@pytest.fixture
def lived_in(tmp_path: Path) -> tuple[Path, Path]:
    """An --output directory with the user's files in it, and a directory outside it that
    one of its links points to."""
    outside = tmp_path / "outside"
    outside.mkdir()
    results = tmp_path / "results"
    (results / "keep").mkdir(parents=True)
    (results / "keep" / "a.txt").write_text("mine")
    (results / "same.txt").write_text("same")
    (results / "diff.txt").write_text("mine")
    (results / "clash").mkdir()
    (results / "clash" / "inside.txt").write_text("mine")
    (results / "file-here").write_text("mine")
    (results / "link").symlink_to(outside)
    (outside / "precious.txt").write_text("precious")
    (results / "file-link").symlink_to(outside / "precious.txt")
    (results / ".git").mkdir()
    (results / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return results, outside


JOB_WRITES = (
    "write:keep/b.txt:new",  # beside a file of the user's in a directory that exists
    "write:same.txt:same",  # same content: left as it is
    "write:diff.txt:theirs",  # other content
    "write:clash:a file",  # a file where the user has a directory
    "write:file-here/x.txt:deep",  # a directory where the user has a file
    "write:link/pwned:evil",  # through the user's link to a directory outside
    "write:file-link:evil",  # through the user's link to a file outside
    "write:.git/config:evil",  # into .git, whose files must all survive
    "write:fresh/n.txt:new",
)


def test_output_never_deletes_or_overwrites_the_users_files(
    make_cluster: Callable[..., Path], lived_in: tuple[Path, Path]
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    results, outside = lived_in
    before = tree(results)
    done = sshwasm(
        "--cluster", str(cluster), "run", WRITEOUT, "--output", str(results), "--", *JOB_WRITES
    )
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    after = tree(results)
    # Everything that was there is there, as it was.
    assert {name: after.get(name) for name in before} == before
    assert after["keep/b.txt"] == "new" and after["fresh/n.txt"] == "new"
    assert after[".git/config"] == "evil"  # added: nothing of the user's was replaced
    # Where the job's version differs, it is beside the user's, never through a link.
    assert after["diff.txt.sshwasm-1"] == "theirs"
    assert after["clash.sshwasm-1"] == "a file"
    assert after["file-here.sshwasm-1/x.txt"] == "deep"
    assert after["link.sshwasm-1/pwned"] == "evil"
    assert after["file-link.sshwasm-1"] == "evil"
    assert tree(outside) == {"precious.txt": "precious"}
    assert "same.txt.sshwasm-1" not in after
    assert not any(name.startswith(".sshwasm-output-") for name in after)
    # One warning line says how many and where; the record keeps the count.
    warnings = [line for line in done.stderr.splitlines() if "beside" in line]
    assert len(warnings) == 1, done.stderr
    assert "5 of its output files" in warnings[0] and str(results) in warnings[0]
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "succeeded" and record["output_conflicts"] == 5


def test_overwrite_replaces_files_only(
    make_cluster: Callable[..., Path], lived_in: tuple[Path, Path]
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    results, outside = lived_in
    done = sshwasm(
        "--cluster", str(cluster), "run", WRITEOUT, "--output", str(results), "--overwrite",
        "--", *JOB_WRITES,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    after = tree(results)
    assert after["diff.txt"] == "theirs" and "diff.txt.sshwasm-1" not in after
    # Never a directory replaced by a file or the reverse, never a link followed or replaced.
    assert after["clash"] == "dir" and after["clash/inside.txt"] == "mine"
    assert after["clash.sshwasm-1"] == "a file"
    assert after["file-here"] == "mine" and after["file-here.sshwasm-1/x.txt"] == "deep"
    assert after["link"] == f"link -> {outside}"
    assert after["file-link"] == f"link -> {outside / 'precious.txt'}"
    assert after["file-link.sshwasm-1"] == "evil"
    assert tree(outside) == {"precious.txt": "precious"}
    assert after["keep/a.txt"] == "mine" and after[".git/HEAD"] == "ref: refs/heads/main\n"
    assert record_of(sshwasm("status", "1", "--json"))["output_conflicts"] == 4


def test_array_tasks_merge_into_their_own_dirs(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    results = tmp_path / "sweep"
    (results / "1" / "keep").mkdir(parents=True)
    (results / "1" / "keep" / "old.txt").write_text("mine")
    done = sshwasm(
        "--cluster", str(cluster), "run", WRITEOUT, "--array", "2", "--output", str(results),
        "--", "write:keep/new.txt:task",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert tree(results) == {
        "0": "dir",
        "0/keep": "dir",
        "0/keep/new.txt": "task",
        "1": "dir",
        "1/keep": "dir",
        "1/keep/new.txt": "task",
        "1/keep/old.txt": "mine",
    }


# -- item 3: streamed, bounded memory ---------------------------------------------------------


def test_a_sparse_output_file_comes_back_in_bounded_memory(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    warm(cluster)
    results = tmp_path / "results"
    size = 256 * MIB
    status, stderr, peak_mib = run_measured(
        tmp_path / "stdout",
        "--cluster", str(cluster), "run", WRITEOUT, "--output", str(results),
        "--", f"sparse:big:{size}", "write:small.txt:hi",
    )  # fmt: skip
    assert status == 0, stderr
    assert (results / "big").stat().st_size == size
    assert (results / "small.txt").read_text() == "hi"
    assert peak_mib < RSS_CEILING_MIB, f"coordinator peaked at {peak_mib:.0f} MiB"


def test_a_terabyte_sparse_file_never_travels(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    warm(cluster)
    results = tmp_path / "results"
    status, stderr, peak_mib = run_measured(
        tmp_path / "stdout",
        "--cluster", str(cluster), "run", WRITEOUT, "--output", str(results),
        "--", "write:small.txt:hi", f"sparse:big:{1 << 40}",
    )  # fmt: skip
    assert status == 1, stderr
    record = record_of(sshwasm("status", "2", "--json"))
    assert record["state"] == "failed" and record["exit_code"] is None
    assert record["error"] == LIMIT_ERROR.format(1024)
    assert (results / "small.txt").read_text() == "hi"
    assert not (results / "big").exists() or (results / "big").stat().st_size <= 1024 * MIB
    # The host refused the size: its disk holds no terabyte, even an apparent one.
    (job_dir,) = [d for d in host_job_dirs(tmp_path) if d.name.startswith("2-")]
    assert (job_dir / "output" / "big").stat().st_size <= 1024 * MIB
    assert peak_mib < RSS_CEILING_MIB, f"coordinator peaked at {peak_mib:.0f} MiB"


# -- item 8: one cap on stdout, stderr and /output -------------------------------------------


def test_stdout_past_the_cap_fails_the_job_and_is_cut_on_both_sides(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    done = sshwasm(
        "--cluster", str(cluster), "run", WRITEOUT, "--max-output-mb", "1", "--",
        f"print:{3 * MIB}",
    )  # fmt: skip
    no_traceback(done)
    assert done.returncode == 1, done.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed" and record["exit_code"] is None
    assert record["error"] == LIMIT_ERROR.format(1)
    assert record["max_output_mb"] == 1
    (job_dir,) = host_job_dirs(tmp_path)
    # On the host each file is held to the cap; the total, to the cap and what the guest
    # wrote before the monitor's next look (here its error line on stderr).
    assert (job_dir / "stdout").stat().st_size == MIB
    assert (job_dir / "stderr").stat().st_size < 64 * 1024
    # What `run` printed and `logs` keeps is the same: at most the cap, and the marker
    # where a stream was cut.
    shown = {
        flag: subprocess.run(
            [sys.executable, "-m", "sshwasm", "logs", "1", *flag], capture_output=True, check=True
        )
        for flag in ((), ("--stderr",))
    }
    logs = {(): shown[()].stdout, ("--stderr",): shown[("--stderr",)].stderr}
    assert done.stdout.encode() == logs[()]
    marker = b"\n[sshwasm: output limit of 1 MB reached; the rest of this stream was dropped]\n"
    assert marker in logs[()] + logs[("--stderr",)]
    kept = [data.replace(marker, b"") for data in logs.values()]
    assert sum(map(len, kept)) <= MIB and kept[0] == b"x" * len(kept[0])


def test_streams_and_files_share_one_cap(make_cluster: Callable[..., Path], tmp_path: Path) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    results = tmp_path / "results"
    done = sshwasm(
        "--cluster", str(cluster), "run", WRITEOUT, "--max-output-mb", "1",
        "--output", str(results), "--", "print:600000", "fill:a:600000",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed" and record["exit_code"] is None
    assert record["error"] == LIMIT_ERROR.format(1)
    kept = sum(path.stat().st_size for path in results.rglob("*") if path.is_file())
    assert kept + len(done.stdout) <= MIB + 200  # the cap, plus the marker


def test_the_host_ends_a_job_over_the_cap_while_it_runs(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    # Three files, each under the cap and together over it, then a sleep that would last
    # past the test's timeout if nothing ended the job.
    done = sshwasm(
        "--cluster", str(cluster), "run", WRITEOUT, "--max-output-mb", "1", "--output",
        str(tmp_path / "results"), "--", "fill:a:500000", "fill:b:500000", "fill:c:500000",
        "sleep:3600",
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    record = record_of(sshwasm("status", "1", "--json"))
    assert record["state"] == "failed" and record["error"] == LIMIT_ERROR.format(1)


def test_serve_tasks_are_capped_too(make_cluster: Callable[..., Path]) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    done = sshwasm(
        "--cluster", str(cluster), "run", WRITEOUT, "--array", "2", "--max-output-mb", "1",
        "--json", "--", f"print:{2 * MIB}",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    for record in json.loads(done.stdout):
        assert record["state"] == "failed" and record["exit_code"] is None
        assert record["error"] == LIMIT_ERROR.format(1)


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "lots", str((1 << 30) + 1)])
def test_max_output_mb_must_be_a_positive_integer(value: str) -> None:
    done = sshwasm("run", WRITEOUT, "--max-output-mb", value)
    assert done.returncode == 2
    assert done.stderr.startswith("sshwasm: error: argument --max-output-mb")
    assert len(done.stderr.splitlines()) == 1


def test_tag_never_holds_a_newline_free_stream_whole(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (2, 1024)})
    warm(cluster)
    size = 96 * MIB
    stdout = tmp_path / "stdout"
    status, stderr, peak_mib = run_measured(
        stdout, "--cluster", str(cluster), "run", WRITEOUT, "--array", "2", "--tag",
        "--", f"print:{size}",
    )  # fmt: skip
    assert status == 0, stderr
    assert stdout.stat().st_size == 2 * (size + 2)
    with open(stdout, "rb") as handle:
        assert handle.read(2) in (b"0\t", b"1\t")
        handle.seek(size + 2)
        assert handle.read(2) in (b"0\t", b"1\t")
    assert peak_mib < RSS_CEILING_MIB, f"coordinator peaked at {peak_mib:.0f} MiB"


# -- the coordinator holds the cap whatever a host sends (faults on cue) ----------------------


def test_a_stream_sink_never_writes_past_the_budget(tmp_path: Path) -> None:
    budget = OutputBudget(1, 0)
    stdout = OutputSink(tmp_path / "stdout", budget)
    stderr = OutputSink(tmp_path / "stderr", budget)
    for _ in range(48):  # a host that ignores the cap sends 3 MiB
        stdout.write(b"o" * 65536)
    stderr.write(b"late")
    stdout.close()
    stderr.close()
    data = (tmp_path / "stdout").read_bytes()
    assert data.startswith(b"o" * MIB) and data[MIB:].startswith(b"\n[sshwasm: output limit")
    assert len(data) < MIB + 200
    # Nothing of stderr fits any more: it holds the marker alone.
    assert (tmp_path / "stderr").read_bytes().startswith(b"\n[sshwasm: output limit of 1 MB")
    assert budget.exceeded
    # A later coordinator of the same job (re-attach, refresh) keeps to it too.
    again = OutputSink(tmp_path / "stdout", OutputBudget(1, len(data)))
    assert again.write(b"more") == b"" and again.cut
    again.close()
    assert (tmp_path / "stdout").read_bytes() == data


def test_a_job_output_makes_its_files_on_its_first_byte_only(tmp_path: Path) -> None:
    from sshwasm import paths
    from sshwasm.job_output import JobOutput
    from sshwasm.store import JobStore

    with JobStore(tmp_path / "jobs.sqlite") as store:
        job = store.get(store.submit(job_spec()))
        directory = paths.job_output_dir(store.path, job.id)
        quiet = JobOutput.open(store, job)
        assert quiet.fields()["stdout_bytes"] == 0
        quiet.stdout.write(b"")
        quiet.close()
        # A task that printed nothing made nothing (an array of them: no journal waits).
        assert not directory.exists()
        output = JobOutput.open(store, job)
        assert output.stdout.write(b"hello\n") == b"hello\n"
        output.close()
        assert (directory / "stdout").read_bytes() == b"hello\n"
        assert not (directory / "stderr").exists()
        assert stat_mode(directory) == 0o700 and stat_mode(directory / "stdout") == 0o600
        # A re-attach resumes from what is on disk, and its cap counts it.
        again = JobOutput.open(store, job)
        assert again.stdout.size == 6 and again.stderr.size == 0
        again.stderr.write(b"oops")
        assert again.fields() == {
            "stdout": "hello\n",
            "stderr": "oops",
            "stdout_bytes": 6,
            "stderr_bytes": 4,
        }
        again.close()
        assert (directory / "stderr").read_bytes() == b"oops"


def stat_mode(path: Path) -> int:
    """A path's permission bits."""
    return path.stat().st_mode & 0o777


def small_pieces(data: bytes) -> list[bytes]:
    """`data` cut at uneven places, as a channel may deliver it."""
    pieces, position, step = [], 0, 1
    while position < len(data):
        pieces.append(data[position : position + step])
        position += step
        step = step * 7 % 70001 + 1
    return pieces


def tar_of(entries: list[tuple[str, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_output_is_extracted_as_it_arrives_in_any_pieces(tmp_path: Path) -> None:
    long_name = "d" * 120 + "/" + "é" * 80  # needs pax headers
    entries: list[tuple[str, bytes | None]] = [
        ("sub", None),
        ("sub/a.bin", bytes(range(256)) * 9),
        ("empty", b""),
        (long_name, b"long"),
    ]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    extractor = TarExtractor(str(scratch), None)
    for piece in small_pieces(tar_of(entries)):
        extractor.feed(piece)
    extractor.close()
    assert extractor.ended
    assert (scratch / "sub" / "a.bin").read_bytes() == bytes(range(256)) * 9
    assert (scratch / "empty").read_bytes() == b""
    assert (scratch / long_name).read_bytes() == b"long"


def test_fetched_output_stops_at_the_budget_whatever_the_host_sends(tmp_path: Path) -> None:
    # A host that ignores the cap sends a 3 MiB file where 1 MiB is left.
    data = tar_of([("a", b"z" * 1000), ("b", b"z" * (3 * MIB)), ("c", b"z" * 10)])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    extractor = TarExtractor(str(scratch), MIB)
    with pytest.raises(ArchiveTooLarge):
        for piece in small_pieces(data):
            extractor.feed(piece)
    extractor.abandon()
    assert sorted(p.name for p in scratch.iterdir()) == ["a"]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("x", tarfile.SYMTYPE),
        ("x", tarfile.LNKTYPE),
        ("x", tarfile.FIFOTYPE),
        ("../escape", tarfile.REGTYPE),
        ("/abs", tarfile.REGTYPE),
    ],
)
def test_fetched_output_refuses_what_is_not_a_plain_file(
    tmp_path: Path, name: str, kind: bytes
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, "/etc/passwd"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(b""))
    extractor = TarExtractor(str(tmp_path / "scratch"), None)
    (tmp_path / "scratch").mkdir()
    with pytest.raises(UnsafeArchive):
        extractor.feed(buffer.getvalue())
    assert list((tmp_path / "scratch").iterdir()) == []
