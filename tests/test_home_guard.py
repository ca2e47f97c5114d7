"""The session guard of the real HOME (tests/home_guard.py) fails a run that wrote into
that HOME's sshwasm directories, naming each file, also when pytest-xdist's workers wrote
them; what they held already is no difference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import home_guard

TESTS = Path(__file__).resolve().parent

PROBE = """
import os
from pathlib import Path

HOME = Path(os.environ["HOME"])

def test_creates_the_jobs_file():
    data = HOME / ".local" / "share" / "sshwasm"
    data.mkdir(parents=True)
    (data / "jobs.sqlite").write_bytes(b"")

def test_makes_a_host_workdir():
    (HOME / ".sshwasm" / "jobs").mkdir(parents=True)

def test_changes_the_cluster_file():
    with open(HOME / ".config" / "sshwasm" / "cluster.yaml", "a") as cluster:
        cluster.write("# changed\\n")

def test_writes_only_its_own_files(tmp_path):
    (tmp_path / "mine").write_text("fine")
"""


def run_probe(tmp_path: Path, *args: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """pytest on PROBE with the guard, HOME a directory of the test's whose sshwasm config
    dir already holds a cluster file."""
    home = tmp_path / "home"
    (home / ".config" / "sshwasm").mkdir(parents=True)
    (home / ".config" / "sshwasm" / "cluster.yaml").write_text("hosts: []\n")
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the rootdir
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("XDG_", "SSHWASM_", "PYTEST_"))
    }
    env.update(HOME=str(home), PYTHONPATH=str(TESTS))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "home_guard", "-p", "no:cacheprovider",
         "-q", "test_probe.py", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return home, done


def test_writes_to_the_real_home_fail_the_session_under_xdist(tmp_path: Path) -> None:
    home, done = run_probe(tmp_path, "-n", "1")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "4 passed" in out, out  # every test passed: the guard alone failed the run
    assert "tests created or changed files in the real HOME's sshwasm directories" in out
    assert f"created file {home}/.local/share/sshwasm/jobs.sqlite\n" in out, out
    assert f"created directory {home}/.sshwasm/jobs\n" in out, out
    assert f"changed file {home}/.config/sshwasm/cluster.yaml\n" in out, out


def test_what_was_there_already_is_no_difference(tmp_path: Path) -> None:
    """Only changes count: a snapshot taken twice of untouched directories (and of one that
    does not exist) differs in nothing; a file's new size or time does."""
    kept = tmp_path / "kept"
    (kept / "jobs-output" / "1").mkdir(parents=True)
    (kept / "jobs.sqlite").write_bytes(b"rows")
    roots = [kept, tmp_path / "missing"]
    before = home_guard.snapshot(roots)
    assert home_guard.differences(before, home_guard.snapshot(roots)) == []
    (kept / "jobs.sqlite").write_bytes(b"more rows")
    (kept / "jobs-output" / "1").rmdir()
    assert home_guard.differences(before, home_guard.snapshot(roots)) == [
        f"changed directory {kept}/jobs-output",
        f"removed directory {kept}/jobs-output/1",
        f"changed file {kept}/jobs.sqlite",
    ]
