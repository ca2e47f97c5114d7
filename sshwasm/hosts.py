"""Operator commands on hosts: check what each one has, install the runner and wasmtime."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .cluster import Host
from .errors import HostUnreachable, SshwasmError
from .runner.protocol import ProtocolError, parse_info, runner_version
from .runner_client import RunnerClient, broken_answer
from .transport import Completed, Transport, TransportPool, last_line

HOST_CHECK_TIMEOUT_S = 15.0
INSTALL_TIMEOUT_S = 300.0

T = TypeVar("T")


# Facts about a host from its `python`, whether or not the runner is installed there.
# Kept to what any Python 3 has; the output has the keys of the runner's `info`.
_PROBE = """
import json, os, platform, sys
try:
    from importlib.metadata import version
    wasmtime, error = version("wasmtime"), None
    __import__("wasmtime")
except Exception as exc:
    wasmtime, error = None, f"{type(exc).__name__}: {exc}"
pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
print(json.dumps({"python": sys.version.split()[0], "wasmtime_version": wasmtime,
                  "wasmtime_error": error, "cpus": os.cpu_count(), "memory_mb": pages >> 20,
                  "os": platform.system(), "arch": platform.machine()}))
"""


async def _current_runner_info(transport: Transport) -> dict[str, Any]:
    """What the host's python can do: its version, wasmtime, cores and memory."""
    done = await transport.run_shell([transport.host.python, "-c", _PROBE])
    _require_success(transport.host, done, "cannot run Python")
    try:
        return parse_info(done.stdout, "the host's python facts")
    except ProtocolError as exc:
        raise broken_answer(transport.host.name, exc) from exc


def _require_success(host: Host, done: Completed, what: str) -> None:
    if done.exit_status is None:
        raise HostUnreachable(host.name, "connection lost")
    if done.exit_status != 0:
        raise SshwasmError(
            f"host '{host.name}': {what} ('{host.python}'): {last_line(done.stderr)}"
        )


async def _installed_runner_version(transport: Transport) -> str | None:
    if transport.host.is_local:
        return runner_version()
    try:
        version = (await RunnerClient(transport).info()).get("runner_version")
    except (SshwasmError, ValueError):  # not installed, or not answering as a runner
        return None
    return str(version) if version else None


def _warnings(host: Host, info: dict[str, Any]) -> list[str]:
    found = []
    cpus, memory_mb = info.get("cpus"), info.get("memory_mb")
    if isinstance(cpus, int) and host.cpus > cpus:
        found.append(f"the cluster file promises {host.cpus} cpus, the host has {cpus}")
    if isinstance(memory_mb, int) and host.memory_mb > memory_mb:
        found.append(f"the cluster file promises {host.memory_mb} MB, the host has {memory_mb} MB")
    return found


async def _bounded(step: Awaitable[T], seconds: float) -> T:
    try:
        return await asyncio.wait_for(step, seconds)
    except (TimeoutError, asyncio.TimeoutError):
        raise SshwasmError(f"no answer within {seconds:g}s") from None


def _empty_report() -> dict[str, Any]:
    """A host's report before anything is known: every key `hosts --check --json` has."""
    return {
        "reachable": False,
        "runner_version": None,
        "wasmtime_version": None,
        "python_version": None,
        "host_cpus": None,
        "host_memory_mb": None,
        "os": None,
        "arch": None,
        "warnings": [],
        "error": None,
    }


async def check_host(host: Host, pool: TransportPool) -> dict[str, Any]:
    """One host's report: reachable, versions, platform, real size, warnings, error."""
    report = _empty_report()
    try:
        transport = await _bounded(pool.get(host), HOST_CHECK_TIMEOUT_S)
        report["reachable"] = True
        report["runner_version"] = await _bounded(
            _installed_runner_version(transport), HOST_CHECK_TIMEOUT_S
        )
        info = await _bounded(_current_runner_info(transport), HOST_CHECK_TIMEOUT_S)
    except SshwasmError as exc:
        report["error"] = str(exc)
        return report
    report["wasmtime_version"] = info.get("wasmtime_version")
    report["python_version"] = info.get("python")
    report["host_cpus"] = info.get("cpus")
    report["host_memory_mb"] = info.get("memory_mb")
    # "" (Python could not tell) is shown as unknown, like a probe that did not say.
    report["os"] = info.get("os") or None
    report["arch"] = info.get("arch") or None
    report["warnings"] = _warnings(host, info)
    if info.get("wasmtime_error"):
        report["error"] = (
            f"'{host.python}' cannot import wasmtime ({info['wasmtime_error']}); "
            f"`sshwasm hosts install {host.name}` installs it"
        )
    elif report["runner_version"] != runner_version():
        report["warnings"].append("the runner is missing or of another version (installed on use)")
    return report


def _pruned_lines(host: Host, pruned: dict[str, list[str]]) -> list[str]:
    """What the install said of older runner versions: removed, or kept while in use."""
    lines = []
    if pruned.get("removed"):
        removed = ", ".join(pruned["removed"])
        lines.append(f"removed old runner versions from {host.workdir}/bin: {removed}")
    if pruned.get("in_use"):
        kept = ", ".join(pruned["in_use"])
        lines.append(f"kept old runner versions still in use by running jobs: {kept}")
    return lines


async def install_host(host: Host, pool: TransportPool) -> list[str]:
    """Install this runner on a host and make sure its python can import wasmtime.

    Returns what was done, one line each; raises SshwasmError when it cannot be done.
    """
    done: list[str] = []
    transport = await pool.get(host)
    if not host.is_local:
        pruned = await transport.install_runner()
        done.append(f"installed the runner {runner_version()} in {host.workdir}/bin")
        done.extend(_pruned_lines(host, pruned))
    info = await _current_runner_info(transport)
    if info.get("wasmtime_error"):
        command = [host.python, "-m", "pip", "install", "--user", "--quiet", "wasmtime"]
        result = await asyncio.wait_for(transport.run_shell(command), INSTALL_TIMEOUT_S)
        if result.exit_status != 0:
            raise SshwasmError(
                f"host '{host.name}': `{shlex.join(command)}` failed: {last_line(result.stderr)}"
            )
        info = await _current_runner_info(transport)
        if info.get("wasmtime_error"):
            raise SshwasmError(
                f"host '{host.name}': wasmtime still not importable after pip: "
                f"{info['wasmtime_error']}"
            )
        done.append(f"installed wasmtime {info.get('wasmtime_version')} for {host.python}")
    else:
        done.append(f"wasmtime {info.get('wasmtime_version')} is importable by {host.python}")
    return done


# -- engine: dask (issue 12) ---------------------------------------------------------------

_DISTRIBUTED_PROBE = """
try:
    from importlib.metadata import version
    print(version("distributed"))
except Exception:
    print("")
"""


async def install_distributed(host: Host, pool: TransportPool) -> str:
    """Make the host's python have `distributed` at the pinned version; says what was done."""
    from .engines import DISTRIBUTED_VERSION

    transport = await pool.get(host)
    done = await transport.run_shell([host.python, "-c", _DISTRIBUTED_PROBE])
    _require_success(host, done, "cannot run Python")
    found = done.stdout.decode(errors="replace").strip()
    if found == DISTRIBUTED_VERSION:
        return f"distributed {found} is importable by {host.python}"
    wanted = f"distributed=={DISTRIBUTED_VERSION}"
    command = [host.python, "-m", "pip", "install", "--user", "--quiet", wanted]
    result = await asyncio.wait_for(transport.run_shell(command), INSTALL_TIMEOUT_S)
    if result.exit_status != 0:
        raise SshwasmError(
            f"host '{host.name}': `{shlex.join(command)}` failed: {last_line(result.stderr)}"
        )
    return f"installed {wanted} for {host.python}" + (f" (had {found})" if found else "")


# -- end engine: dask -----------------------------------------------------------------------


async def for_each_host(
    hosts: Sequence[Host], action: Callable[[Host, TransportPool], Awaitable[T]]
) -> list[T | SshwasmError]:
    """Run `action` on every host at once; a host's failure is returned in its place."""

    async def guarded(host: Host, pool: TransportPool) -> T | SshwasmError:
        try:
            return await action(host, pool)
        except SshwasmError as exc:
            return exc
        except (TimeoutError, asyncio.TimeoutError):
            return SshwasmError(f"host '{host.name}': timed out")

    async with TransportPool() as pool:
        return list(await asyncio.gather(*(guarded(host, pool) for host in hosts)))


async def check_hosts(hosts: Sequence[Host]) -> list[dict[str, Any]]:
    """Reports for every host, checked in parallel with a bounded time each."""
    results = await for_each_host(hosts, check_host)
    reports = []
    for result in results:
        if isinstance(result, SshwasmError):
            reports.append({**_empty_report(), "error": str(result)})
        else:
            reports.append(result)
    return reports
