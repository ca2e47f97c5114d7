"""The session's guard: no test creates or changes anything in the real HOME's sshwasm
directories. Loaded by conftest (its hooks are names there), like `ci_skips`.

Every test gets a private HOME, XDG dirs and SSHWASM_*_DIR (conftest's `isolated_home`), but
a process can still reach the real ones: a session or module fixture (they run before that
fixture), a subprocess given an env of its own without them (platformdirs then falls back
to $HOME, or to the passwd entry's home when HOME is gone too), a detached process that
outlives its test, or a command run on a test sshd (sshd gives its sessions the passwd
home, where a host without `workdir:` keeps `~/.sshwasm`). Once an empty
`~/.local/share/sshwasm/jobs.sqlite` appeared that way.

The directories are resolved when this module is imported, with the process's environment
as pytest got it (before any fixture changes it); what they hold is noted then and compared
when the session ends, and any difference fails the session, naming each file. Under
pytest-xdist only the controller compares (its session spans every worker's); the workers
share its HOME, so what they write is seen there. Nothing is walked per test: the cost is
two walks of directories that normally do not exist.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path

import platformdirs
import pytest

from sshwasm import paths

APP = paths.APP_NAME
# What a host without `workdir:` uses (cluster.DEFAULT_WORKDIR), relative to the home.
HOST_WORKDIR = ".sshwasm"
# At most this many files are named in the failure (the count says how many more).
MOST_NAMED = 20

# path -> (kind, size, mtime in ns); a directory's size is left out (it varies by fs).
Snapshot = dict[str, tuple[str, int, int]]


def guarded_dirs() -> list[Path]:
    """The real HOME's sshwasm directories, for this process's environment as it is now:
    where `sshwasm.paths` puts data, config, cache and runtime files (and `$SSHWASM_DB`),
    platformdirs' state dir, and the same under both the $HOME and the passwd home with no
    XDG variable (a subprocess that lost its env), with the default host workdir beside."""
    found = [
        paths.data_dir(),
        paths.config_dir(),
        paths.cache_dir(),
        paths.runtime_dir(),
        Path(platformdirs.user_state_dir(APP)),
    ]
    database = os.environ.get("SSHWASM_DB")
    if database:
        found.append(Path(database).expanduser())
    homes = {pwd.getpwuid(os.getuid()).pw_dir, os.environ.get("HOME") or "/"}
    for home in sorted(homes - {"/"}):
        base = Path(home)
        found += [
            base / ".local" / "share" / APP,
            base / ".config" / APP,
            base / ".cache" / APP,
            base / ".local" / "state" / APP,
            base / HOST_WORKDIR,
        ]
    unique = {os.path.abspath(path): Path(os.path.abspath(path)) for path in found}
    return list(unique.values())


def snapshot(roots: Iterable[Path]) -> Snapshot:
    """Every file and directory under `roots` (and each root itself), by path."""
    seen: Snapshot = {}
    for root in roots:
        _note(seen, str(root))
        if not os.path.isdir(root) or os.path.islink(root):
            continue
        for directory, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                _note(seen, os.path.join(directory, name))
    return seen


def _note(seen: Snapshot, path: str) -> None:
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode):
        seen[path] = ("directory", 0, info.st_mtime_ns)
    else:
        kind = "link" if stat.S_ISLNK(info.st_mode) else "file"
        seen[path] = (kind, info.st_size, info.st_mtime_ns)


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """One line per path created, changed or removed between the snapshots."""
    lines = []
    for path in sorted(before.keys() | after.keys()):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        if old is None:
            assert new is not None
            lines.append(f"created {new[0]} {path}" + (f" ({new[1]} bytes)" if new[1] else ""))
        elif new is None:
            lines.append(f"removed {old[0]} {path}")
        else:
            lines.append(f"changed {new[0]} {path}")
    return lines


# Resolved at import: conftest imports this before any fixture changes the environment.
GUARDED = guarded_dirs()
BEFORE = snapshot(GUARDED)
_found: list[str] = []


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Compare the real HOME's sshwasm directories with what they held at the start."""
    if _is_worker(session.config):
        return
    _found[:] = differences(BEFORE, snapshot(GUARDED))
    if _found and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly what the session did to the real HOME, if anything."""
    if not _found:
        return
    terminalreporter.section("the real HOME was touched", sep="!", red=True, bold=True)
    terminalreporter.write_line(
        "error: tests created or changed files in the real HOME's sshwasm "
        "directories (or another program used them meanwhile):",
        red=True,
    )
    for line in _found[:MOST_NAMED]:
        terminalreporter.write_line(f"  {line}", red=True)
    if len(_found) > MOST_NAMED:
        terminalreporter.write_line(f"  ... and {len(_found) - MOST_NAMED} more", red=True)
    terminalreporter.write_line(
        "Find the fixture or subprocess that resolved them with the real environment "
        f"(tests/home_guard.py says where to look); guarded: {', '.join(map(str, GUARDED))}"
    )
