"""Whatever a user types, sshwasm answers with an exit code and at most a one-line error."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshwasm import cli
from sshwasm.cli import main

OPTIONS = [
    "--cpus", "--memory-mb", "--job-name", "--time-limit", "--host", "--env", "--stdin",
    "--array", "--label", "--json", "--detach", "--dry-run", "--limit", "--state", "--follow",
    "--stderr", "--check", "--fold", "--tag", "-o", "--", "--help", "--version",
]  # fmt: skip
COMMANDS = ["run", "jobs", "status", "logs", "cancel", "hosts", "wasm", "install", "bogus"]
WORDS = st.one_of(
    st.sampled_from(OPTIONS),
    st.sampled_from(COMMANDS),
    st.sampled_from(["0", "-1", "1", "3.5", "nan", "inf", "1e9", "A=1", "=", "x.rs", "x.wasm"]),
    st.text(max_size=12),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(words=st.lists(WORDS, max_size=8))
@pytest.mark.slow
def test_any_argv_gives_an_exit_code_never_a_traceback(
    words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--db", str(tmp_path / "jobs.sqlite"), "--cluster", "/nonexistent.yaml", *words])
    captured = capsys.readouterr()
    assert isinstance(code, int) and 0 <= code < 256
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("sshwasm: error")]
    assert len(errors) <= 1
    if code != 0 and "--help" not in words and "--version" not in words:
        assert errors, captured.err


def test_every_command_of_the_parser_has_a_function() -> None:
    """Commands are dispatched by name to lazily imported modules: none may be missing."""
    (commands,) = [
        action
        for action in cli.build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    assert set(commands.choices) == set(cli.COMMANDS)
    for name in commands.choices:
        assert callable(cli._command(name)), name
