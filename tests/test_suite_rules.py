"""Rules the suite holds itself to: in CI a skip must name a cause outside our control."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SKIPPING = """
import pytest
from ci_skips import beyond_our_control

def test_skipped_for_a_missing_toolchain():
    pytest.skip("no rustc here")

@pytest.mark.skipif(True, reason=beyond_our_control("as root, every file is readable"))
def test_root_only():
    pass

@pytest.mark.xfail(reason="known")
def test_expected_to_fail():
    assert False

def test_passes():
    pass
"""


def run_with_ci_rule(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """pytest on SKIPPING with the ci_skips plugin, CI set to `ci` (None: unset)."""
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the rootdir
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PYTHONPATH"] = str(TESTS)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "ci_skips", "-p", "no:cacheprovider",
         "-p", "no:xdist", "-rA", "test_skipping.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("ci", ["true", "1"])
def test_in_ci_a_skip_fails_unless_outside_our_control(tmp_path: Path, ci: str) -> None:
    result = run_with_ci_rule(tmp_path, ci)
    assert result.returncode == 1, result.stdout
    assert "FAILED test_skipping.py::test_skipped_for_a_missing_toolchain" in result.stdout
    assert "skipped under CI=true: Skipped: no rustc here" in result.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in result.stdout, result.stdout


def test_outside_ci_a_skip_is_a_skip(tmp_path: Path) -> None:
    result = run_with_ci_rule(tmp_path, None)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in result.stdout, result.stdout
