"""What a pool of hosts with other packages says: Dask's version-mismatch table in one
line when it matters to sshwasm; a host without distributed, with what to do."""

from __future__ import annotations

import shlex
import socket
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sshwasm.cli import main
from sshwasm.cli.show import show_sshwasm_warnings
from sshwasm.errors import SshwasmWarning
from sshwasm.pool import version_mismatch_line

versions = pytest.importorskip("distributed.versions")


def _table(here: dict[str, str | None], scheduler: dict[str, str], *workers: dict[str, str]) -> str:
    """The warning text distributed itself makes for these package versions."""
    message: str = versions.error_message(
        {"packages": scheduler},
        {f"w{index}": {"packages": worker} for index, worker in enumerate(workers)},
        {"packages": here},
    )["warning"]
    return message


def test_only_packages_that_matter_are_said() -> None:
    numpy_only = _table({"numpy": None}, {"numpy": "2.4.6"}, {"numpy": "2.4.6"})
    assert "numpy" in numpy_only  # distributed does warn of it
    assert version_mismatch_line(numpy_only) is None
    patch_only = _table({"python": "3.11.2"}, {"python": "3.11.7"}, {"python": "3.11.7"})
    assert version_mismatch_line(patch_only) is None

    line = version_mismatch_line(
        _table(
            {"distributed": "2026.8.0", "numpy": None, "python": "3.11.2"},
            {"distributed": "2026.7.0", "numpy": "2.4", "python": "3.12.1"},
            {"distributed": "2026.7.0", "numpy": "2.4", "python": "3.11.7"},
        )
    )
    assert line is not None and "\n" not in line
    assert "distributed 2026.8.0 here, 2026.7.0 on the scheduler, 2026.7.0 on the workers" in line
    assert "python 3.11.2 here, 3.12.1 on the scheduler" in line
    assert "numpy" not in line
    assert "sshwasm hosts install" in line and "`python:`" in line


def test_the_cli_says_an_sshwasm_warning_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        show_sshwasm_warnings()
        show_sshwasm_warnings()  # a second command in the same process: still one line
        warnings.warn("the pool runs other versions", SshwasmWarning, stacklevel=1)
    assert capsys.readouterr().err == "sshwasm: warning: the pool runs other versions\n"


def test_a_host_without_distributed_says_how_to_install_it(
    make_cluster: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Python without any site-packages: the stdlib helper runs, distributed is missing.
    bare_python = tmp_path / "bare-python"
    bare_python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S "$@"\n')
    bare_python.chmod(0o755)
    path = make_cluster({"alpha": {"cpus": 1, "memory_mb": 512, "python": str(bare_python)}})
    document = yaml.safe_load(path.read_text())
    document.update(engine="dask", dask={"scheduler": "alpha", "port": _free_port()})
    path.write_text(yaml.safe_dump(document, sort_keys=False))

    assert main(["--cluster", str(path), "pool", "up"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "sshwasm: error: host 'alpha': pool start: scheduler exited at once: "
    ), err
    assert err[0].endswith(
        "Error while finding module specification for 'distributed.cli.dask_scheduler' "
        "(ModuleNotFoundError: No module named 'distributed') "
        f"(`sshwasm hosts install` installs it for {bare_python})"
    ), err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port: int = probe.getsockname()[1]
        return port
