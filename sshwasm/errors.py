"""Errors sshwasm raises. Each carries its facts; only the CLI turns them into text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class SshwasmError(Exception):
    """Root of every error sshwasm reports to the user as one line."""


class SshwasmWarning(UserWarning):
    """Something worked around that the user should know of; the CLI says it in one line
    (`sshwasm: warning: ...`), the Python API leaves it to the `warnings` module."""


class UsageError(SshwasmError):
    """A command-line value is malformed (e.g. `--env` without '=')."""


class ClusterError(SshwasmError):
    """The cluster file is malformed or incomplete; names the file and line."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class BuildError(SshwasmError):
    """A source could not be turned into a wasm module."""


class ToolchainMissing(BuildError):
    """No compiler for the language is installed; says how to get one."""

    def __init__(self, language: str, hint: str) -> None:
        self.language = language
        self.hint = hint
        super().__init__(f"no {language} toolchain for wasm32-wasi found: {hint}")


class CompileError(BuildError):
    """The compiler rejected the source; its diagnostics are in `diagnostics`."""

    def __init__(self, source: str, diagnostics: str) -> None:
        self.source = source
        self.diagnostics = diagnostics
        super().__init__(f"compilation of {source} failed")


class InvalidModule(BuildError):
    """A `.wasm` file is not a runnable WASI command module."""


@dataclass(frozen=True)
class Capacity:
    """What a host offers (or a job asks for)."""

    cpus: int
    memory_mb: int


class NoHostFits(SshwasmError):
    """No host in the cluster could ever hold the request, even when idle."""

    def __init__(self, request: Capacity, largest: Mapping[str, Capacity], why: str = "") -> None:
        self.request = request
        self.largest = dict(largest)
        offers = ", ".join(
            f"{name} has {cap.cpus} cpus and {cap.memory_mb} MB" for name, cap in largest.items()
        )
        text = f"no host can fit {request.cpus} cpus and {request.memory_mb} MB"
        if why:
            text += f" ({why})"
        if offers:
            text += f"; the largest: {offers}"
        super().__init__(text)


class HostUnreachable(SshwasmError):
    """A host could not be reached or refused us; `reason` says why."""

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(f"host '{host}': {reason}")


class RunnerUnavailable(HostUnreachable):
    """The host is reachable but its runner cannot start there (no wasmtime, no python).

    A HostUnreachable, so placement skips the host and tries the next best fit.
    """

    def __init__(self, host: str, problem: str, hint: str | None = None) -> None:
        self.problem = problem
        if hint is None:
            hint = f"`sshwasm hosts install {host}` installs it"
        super().__init__(host, f"{problem}; {hint}")


class NoHostReachable(SshwasmError):
    """Every host that could take the job failed; lists each with its reason."""

    def __init__(self, failures: Mapping[str, str]) -> None:
        self.failures = dict(failures)
        detail = "; ".join(f"{host}: {reason}" for host, reason in self.failures.items())
        super().__init__(f"no host could run the job ({detail})")


class ContactLost(SshwasmError):
    """The connection to a running job's host could not be restored; the job goes on there."""

    def __init__(self, host: str, job_id: int, seconds: float) -> None:
        self.host = host
        self.job_id = job_id
        super().__init__(
            f"lost the connection to host '{host}' for {seconds:g}s; job {job_id} keeps "
            f"running there: `sshwasm status {job_id}` collects it later"
        )


class RemoteError(SshwasmError):
    """The runner on a host reported a problem it cannot recover from."""

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        self.message = message
        super().__init__(f"host '{host}': {message}")


class StoreError(SshwasmError):
    """The jobs file cannot be used (not SQLite, newer schema, unwritable)."""


class CoordinatorFailed(SshwasmError):
    """A background task of the coordinator (placer, heartbeat, cancel watcher) failed."""

    def __init__(self, task: str, reason: str, job_ids: Sequence[int]) -> None:
        self.task = task
        self.reason = reason
        self.job_ids = list(job_ids)
        ids = ", ".join(map(str, self.job_ids[:5])) + (" ..." if len(self.job_ids) > 5 else "")
        after = (
            f"; jobs already placed keep running on their hosts: "
            f"`sshwasm status ID` collects them (jobs {ids})"
            if self.job_ids
            else ""
        )
        super().__init__(f"the coordinator's {task} failed: {reason}{after}")


class JobNotFound(SshwasmError):
    """No job with that id in the jobs file."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id}")


class HostKeyUntrusted(HostUnreachable):
    """The host's key is not in known_hosts (or differs): we never trust it silently."""

    def __init__(
        self, host: str, address: str, port: int | None, known_hosts: str, jump: bool = False
    ) -> None:
        port_flag = f"-p {port} " if port and port != 22 else ""
        what = f"jump host {address}" if jump else address
        super().__init__(
            host,
            f"host key of {what} is not trusted (not in {known_hosts}, or changed); "
            f"if this is the right machine, add it with: "
            f"ssh-keyscan {port_flag}{address} >> {known_hosts}",
        )
