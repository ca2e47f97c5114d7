"""Shared fixtures: a private home for every test, and real sshd servers on loopback.

Helpers live in `tests/sshd.py` (`SshKit`, `SshServer`, `write_cluster`); they are
re-exported here so a test may import them from either module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from ci_skips import pytest_runtest_makereport
from helpers import REPO, built, guest, live_launchers, stager, stop_mux_processes
from home_guard import pytest_sessionfinish, pytest_terminal_summary
from sshd import (
    HostSpec,
    SshHarnessError,
    SshKit,
    SshServer,
    check_prerequisites,
    loopback,
    pid_alive,
    write_cluster,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the longest tests first, so no worker is left running one alone at the end.

    pytest-xdist hands tests out in collection order: the wheel's group (one worker builds
    it once, about a minute) and the `slow` tests, collected late by their file names, made
    the run's tail. Stable: the order within each kind stays as collected.
    """

    def weight(item: pytest.Item) -> int:
        if item.get_closest_marker("xdist_group") is not None:
            return 0
        return 1 if item.get_closest_marker("slow") is not None else 2

    items.sort(key=weight)
    _keep_xdist_groups(config, items)


def _keep_xdist_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """What `--dist loadgroup` needs: each xdist_group's name at the end of its tests' ids,
    so the group goes to one worker (and its module fixtures start once: the dask pool).
    pytest-xdist 3.8 sets the old `item._nodeid`, which pytest 9 no longer reads (the id
    is `item._id`), so the groups were spread over the workers."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted(
            {
                str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                for mark in item.iter_markers("xdist_group")
            }
        )
        suffix = "@" + "_".join(names)
        if not names or item.nodeid.endswith(suffix):
            continue
        if hasattr(item, "_id"):  # pytest 9: a structured id, parsed from its text
            from _pytest.nodeid import coerce_node_id

            item._id = coerce_node_id(item.nodeid + suffix)
        else:
            item._nodeid = item.nodeid + suffix


# The session fixtures of `helpers` are registered by being names of this module.
# The CI skip rule (ci_skips) is a hook, registered the same way, and so is the guard of the
# real HOME (home_guard: it notes that HOME's sshwasm dirs as conftest imports it, before
# any fixture changes the environment).
__all__ = [
    "SshKit",
    "SshServer",
    "built",
    "guest",
    "live_launchers",
    "pytest_runtest_makereport",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
    "stager",
    "write_cluster",
]

# 127.0.0.2-4 alone; per xdist worker another 127.x.0.y (see `loopback`).
SESSION_HOSTS = {"alpha": loopback(2), "beta": loopback(3), "gamma": loopback(4)}

# The session hosts once started, so each test can find them healthy without starting them.
_session_hosts: dict[str, SshServer] = {}


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compiled-module cache for the whole run: rustc costs about 1 s per program, and
    the cache is content-addressed, so sharing it cannot leak one test's state into another.

    Under pytest-xdist the workers share it too (it lives in the run's base temp dir, above
    each worker's): sshwasm's cache, zig's, Go's and cargo's are all safe for concurrent
    builds, and zig's wasi-libc alone takes a minute to build.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "sshwasm-cache"
    path.mkdir(exist_ok=True)
    # The caches of zig (wasi-libc and libc++, about a minute to build) and Go (its standard
    # library for wasip1) outlive the run, in the checkout's .pytest_cache: both key every
    # entry by all its inputs, flags included, and lock it against concurrent builds.
    for tool in ("zig", "go"):
        kept = REPO / ".pytest_cache" / f"sshwasm-{tool}"
        kept.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another worker linked it first
            (path / tool).symlink_to(kept, target_is_directory=True)
    return path


@pytest.fixture(autouse=True)
def isolated_home(
    tmp_path: Path, shared_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Keep every test away from the developer's home, agent, config and working directory."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    # platformdirs honours XDG_* before HOME; a developer's own values would leak through.
    for variable, relative in (
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_DATA_HOME", ".local/share"),
        ("XDG_CACHE_HOME", ".cache"),
        ("XDG_STATE_HOME", ".local/state"),
    ):
        monkeypatch.setenv(variable, str(home / relative))
    # An agent would offer the developer's keys to the test servers.
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("SSH_AGENT_PID", raising=False)
    # Any SSHWASM_* setting of the developer's shell would change what the tests see;
    # SSHWASM_TEST_* is left for switches meant for the tests themselves.
    for variable in list(os.environ):
        if variable.startswith("SSHWASM_") and not variable.startswith("SSHWASM_TEST_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("SSHWASM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SSHWASM_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("SSHWASM_CACHE_DIR", str(shared_cache_dir))
    # A stray ./cluster.yaml in the directory pytest was started from must not be found.
    monkeypatch.chdir(tmp_path)
    # The connection process (sshwasm.mux): its socket in the test's home, and off unless a
    # test turns it on (tests/test_mux*.py), since each test's home would start its own;
    # SSHWASM_TEST_MUX=1 leaves it on everywhere, to run the whole suite through it.
    runtime = home / ".run"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    if not os.environ.get("SSHWASM_TEST_MUX"):
        monkeypatch.setenv("SSHWASM_CONNECTION_PERSIST_S", "0")
    yield home
    left = stop_mux_processes(runtime / "sshwasm")
    if not os.environ.get("SSHWASM_TEST_MUX"):  # else each test's own idles until stopped
        assert not left, f"connection processes left running by the test: {left}"


@pytest.fixture(scope="session")
def ssh_kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshKit]:
    """Client key, authorized_keys and known_hosts for every test server of the session."""
    try:
        check_prerequisites()
        kit = SshKit.create(tmp_path_factory.mktemp("ssh"))
    except SshHarnessError as exc:
        # Never skip: CI must not go green by running none of the SSH tests.
        pytest.fail(str(exc), pytrace=False)
    try:
        yield kit
    finally:
        _stop_and_verify(kit.servers)


@pytest.fixture(scope="session")
def ssh_hosts(ssh_kit: SshKit) -> Iterator[dict[str, SshServer]]:
    """Three running sshd servers: alpha on loopback(2), beta (3), gamma (4).

    Shared by the whole session: to kill, pause or restart a host use `fresh_host`. Should a
    test do it anyway, the next test finds the three running again.
    """
    try:
        for name, address in SESSION_HOSTS.items():
            _session_hosts[name] = ssh_kit.server(name, address)
    except SshHarnessError as exc:
        _stop_and_verify(_session_hosts.values())
        pytest.fail(str(exc), pytrace=False)
    try:
        yield dict(_session_hosts)
    finally:
        try:
            _stop_and_verify(_session_hosts.values())
        finally:
            _session_hosts.clear()


@pytest.fixture(autouse=True)
def _heal_session_hosts() -> None:
    """Bring back a session host an earlier test stopped or paused, so order does not matter."""
    for server in _session_hosts.values():
        server.resume()
        server.start()


@pytest.fixture
def fresh_host(ssh_kit: SshKit) -> Iterator[Callable[..., SshServer]]:
    """Factory for servers a test owns, to stop, restart or pause: `fresh_host("delta")`.

    They share the session kit (same client key and known_hosts as `ssh_hosts`) and are
    stopped, by PID, when the test ends.
    """
    started: list[SshServer] = []

    def start(name: str = "delta", address: str = "", extra_config: str = "") -> SshServer:
        server = ssh_kit.server(name, address or loopback(5), extra_config)
        started.append(server)
        return server

    try:
        yield start
    finally:
        _stop_and_verify(started)


@pytest.fixture
def make_cluster(
    request: pytest.FixtureRequest, ssh_kit: SshKit, tmp_path: Path
) -> Callable[..., Path]:
    """Factory writing `tmp_path/cluster.yaml` (see `write_cluster`) and returning its path.

    `make_cluster({"alpha": (2, 1024)})` uses the session hosts; pass `servers=` to list
    others (e.g. from `fresh_host`). Workdirs go to `tmp_path/workers/<name>`.
    """

    def make(
        hosts_spec: Mapping[str, HostSpec] | None = None,
        *,
        servers: Mapping[str, SshServer] | list[SshServer] | None = None,
        path: Path | None = None,
        **options: Any,
    ) -> Path:
        if servers is None:
            servers = request.getfixturevalue("ssh_hosts")
        return write_cluster(
            path or tmp_path / "cluster.yaml",
            servers,
            ssh_kit,
            hosts_spec,
            tmp_path / "workers",
            **options,
        )

    return make


def _stop_and_verify(servers: Iterable[SshServer]) -> None:
    """Stop each server by PID, then fail loudly if any sshd process outlived it."""
    servers = list(servers)  # walked twice: to stop, then to check
    errors: list[str] = []
    for server in servers:
        try:
            server.stop()
        except Exception as exc:  # stop the rest before reporting
            errors.append(f"{server.name}: {exc}")
    survivors = [server.pid for server in servers if server.pid and pid_alive(server.pid)]
    if survivors:
        errors.append(f"sshd pids still alive after stop: {survivors}")
    if errors:
        raise SshHarnessError("; ".join(errors))
