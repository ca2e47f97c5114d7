"""sshwasm: run WebAssembly jobs on the machines you can already reach over SSH.

The Python API (README.md, "Python API") is imported on first use, so `import sshwasm` stays
light (no asyncio, asyncssh, wasmtime or sqlite3 until a name below is used):

    with sshwasm.Client() as client:
        job = client.submit("hello.rs", "world")
        print(job.result().state)
"""

from __future__ import annotations

__version__ = "0.1.0"

# Not `from typing import TYPE_CHECKING`: importing typing would double `import sshwasm`'s
# time; type checkers treat a variable of this name the same way.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .api import (
        ALL_COMPLETED,
        FIRST_COMPLETED,
        AsyncClient,
        Client,
        HostStatus,
        Job,
        JobRecord,
        as_completed,
        wait,
    )
    from .errors import (
        BuildError,
        ClusterError,
        CompileError,
        JobNotFound,
        NoHostFits,
        SshwasmError,
        UsageError,
    )
    from .states import JobState

# Public name -> the module that defines it, imported when the name is first asked for.
_LAZY = {
    **dict.fromkeys(
        (
            "ALL_COMPLETED",
            "FIRST_COMPLETED",
            "AsyncClient",
            "Client",
            "HostStatus",
            "Job",
            "JobRecord",
            "as_completed",
            "wait",
        ),
        "api",
    ),
    **dict.fromkeys(
        (
            "BuildError",
            "ClusterError",
            "CompileError",
            "JobNotFound",
            "NoHostFits",
            "SshwasmError",
            "UsageError",
        ),
        "errors",
    ),
    "JobState": "states",
}

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "AsyncClient",
    "BuildError",
    "Client",
    "ClusterError",
    "CompileError",
    "HostStatus",
    "Job",
    "JobNotFound",
    "JobRecord",
    "JobState",
    "NoHostFits",
    "SshwasmError",
    "UsageError",
    "__version__",
    "as_completed",
    "wait",
]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (PEP 562)."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'sshwasm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
