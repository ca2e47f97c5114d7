"""Dask's version-mismatch table, said in one line when it matters to sshwasm."""

from __future__ import annotations

import warnings

import pytest

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
