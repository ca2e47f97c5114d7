"""Shell completion: the scripts `sshwasm completion bash|zsh` print, run in real shells.

bash runs the script's completion function with COMP_WORDS/COMP_CWORD as bash's
programmable completion sets them; zsh completes a typed line in an interactive zsh in a
pseudo-terminal (tests/shell/zsh_complete.zsh). Both must offer the commands, every flag
the parser has (the script is generated from it), job ids from the jobs file and host names
and labels from the cluster file, including those named by --db and --cluster on the line.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import sshwasm

from sshwasm.cli.parser import COMPLETE_COMMAND, COORDINATE_COMMAND, build_parser
from sshwasm.store import JobSpec, JobStore

TESTS = Path(__file__).resolve().parent
ZSH_COMPLETE = TESTS / "shell" / "zsh_complete.zsh"


def public_commands() -> set[str]:
    """Every command the parser knows, but the hidden ones (named with a leading _)."""
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name for name in commands.choices if not name.startswith("_")}


COMMANDS = public_commands()

CLUSTER = """\
hosts:
  - name: alpha
    address: 127.0.0.1
    cpus: 2
    memory_mb: 512
    labels: [gpu, fast]
  - name: beta
    address: 127.0.0.1
    cpus: 2
    memory_mb: 512
"""

# Runs bash's completion the way bash does on TAB: the words of the line so far, the index
# of the word under the cursor, then the function the script registered with `complete`.
BASH_DRIVER = r"""
source "$1"; shift
function_name=$(complete -p sshwasm | sed -E 's/.* -F ([^ ]+) .*/\1/')
COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
"$function_name" sshwasm "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""

Completer = Callable[[str], set[str]]


def shell_env() -> dict[str, str]:
    """The test's environment, with this venv's `sshwasm` first on PATH (the scripts call it)."""
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def script_for(shell: str, tmp_path: Path) -> Path:
    result = sshwasm("completion", shell)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    path = tmp_path / f"sshwasm.{shell}"
    path.write_text(result.stdout)
    return path


def bash_completer(tmp_path: Path) -> Completer:
    script = script_for("bash", tmp_path)

    def complete(line: str) -> set[str]:
        # As bash splits a line: at spaces, and around '=' (it is in COMP_WORDBREAKS).
        words = re.split(r" +|(?<=[^ ])(?==)|(?<==)", line)
        result = subprocess.run(
            ["bash", "--norc", "--noprofile", "-c", BASH_DRIVER, "bash", str(script), *words],
            capture_output=True, text=True, timeout=60, env=shell_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", result.stderr
        return {word for word in result.stdout.splitlines() if word}

    return complete


def zsh_completer(tmp_path: Path) -> Completer:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (scripts/setup installs it)")
    script = script_for("zsh", tmp_path)

    def complete(line: str) -> set[str]:
        result = subprocess.run(
            ["zsh", "-f", str(ZSH_COMPLETE), str(script), line],
            capture_output=True, text=True, timeout=60, env=shell_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return {word for word in result.stdout.splitlines() if word.strip()}

    return complete


@pytest.fixture(params=["bash", "zsh"])
def shell(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def complete(shell: str, tmp_path: Path) -> Completer:
    """A function completing a typed line (cursor at its end) in bash or zsh."""
    make = bash_completer if shell == "bash" else zsh_completer
    return make(tmp_path)


def make_jobs(db: Path, count: int) -> list[int]:
    """`count` queued jobs in a new jobs file at `db`; their ids."""
    spec = JobSpec(
        name="t", cpus=1, memory_mb=64, time_limit_s=None, source="x.rs", language="rust",
        wasm_sha256="0" * 64, wasm_bytes=8, wasm_path="/nonexistent.wasm", compile_s=0.0,
        argv=("x",), env=(),
    )  # fmt: skip
    with JobStore(db) as store:
        return [store.submit(spec) for _ in range(count)]


def run_options() -> set[str]:
    """Every option string `run` has, from the parser itself."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    run = commands.choices["run"]  # type: ignore[index]
    return {option for action in run._actions for option in action.option_strings}


def test_commands_complete_and_hidden_ones_do_not(complete: Completer) -> None:
    offered = complete("sshwasm ")
    assert offered == COMMANDS
    assert {"run", "jobs", "status", "logs", "cancel", "wasm", "hosts", "completion"} <= offered
    assert COORDINATE_COMMAND not in offered and COMPLETE_COMMAND not in offered
    assert complete("sshwasm st") == {"status"}
    assert complete("sshwasm hosts ") >= {"install"}


def test_flags_complete_from_the_parser(complete: Completer) -> None:
    long_options = {option for option in run_options() if option.startswith("--")}
    assert {"--cpus", "--array", "--output"} <= long_options
    assert complete("sshwasm run x.rs --") >= long_options
    assert complete("sshwasm run --me") == {"--memory-mb"}
    assert {"--cluster", "--db", "--version"} <= complete("sshwasm --")
    assert complete("sshwasm jobs --state ") == {
        "queued", "running", "succeeded", "failed", "timeout", "out_of_memory", "cancelled",
        "lost",
    }  # fmt: skip
    assert complete("sshwasm completion ") == {"bash", "zsh"}


def test_job_ids_complete_from_the_jobs_file(complete: Completer, tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "jobs.sqlite"
    db.parent.mkdir()
    ids = {str(job_id) for job_id in make_jobs(db, 12)}
    assert len(ids) == 12
    for command in ("status", "logs", "wasm", "cancel"):
        assert complete(f"sshwasm --db {db} {command} ") == ids, command
    assert complete(f"sshwasm --db {db} status 1") == {"1", "10", "11", "12"}
    # cancel takes several ids: the second one completes too.
    assert complete(f"sshwasm --db {db} cancel 3 ") == ids
    # Without --db: the default jobs file, which is another one (empty here).
    assert complete("sshwasm status ") == set()


def test_job_ids_come_from_the_default_jobs_file(complete: Completer) -> None:
    default = Path(os.environ["SSHWASM_DATA_DIR"]) / "jobs.sqlite"
    make_jobs(default, 3)
    assert complete("sshwasm status ") == {"1", "2", "3"}


def test_host_names_and_labels_complete_from_the_cluster_file(
    complete: Completer, tmp_path: Path
) -> None:
    cluster = tmp_path / "mine.yaml"
    cluster.write_text(CLUSTER)
    assert complete(f"sshwasm --cluster {cluster} run x.rs --host ") == {"alpha", "beta"}
    assert complete(f"sshwasm --cluster {cluster} run x.rs --host b") == {"beta"}
    assert complete(f"sshwasm --cluster {cluster} hosts install ") == {"alpha", "beta"}
    assert complete(f"sshwasm --cluster {cluster} hosts install alpha ") == {"alpha", "beta"}
    assert complete(f"sshwasm --cluster {cluster} run x.rs --label ") == {"fast", "gpu"}
    # Without --cluster: the embedded default cluster, this machine alone.
    assert complete("sshwasm run x.rs --host ") == {"local"}


def test_options_take_their_value_after_an_equals_sign(complete: Completer, tmp_path: Path) -> None:
    cluster = tmp_path / "mine.yaml"
    cluster.write_text(CLUSTER)
    db = tmp_path / "other.sqlite"
    make_jobs(db, 2)
    assert complete(f"sshwasm --cluster={cluster} run x.rs --host ") == {"alpha", "beta"}
    assert complete(f"sshwasm --db={db} logs ") == {"1", "2"}
    if shell == "zsh":  # bash cannot: shtab's script takes `=` for the option's value
        assert complete(f"sshwasm --cluster {cluster} run x.rs --label=") == {"fast", "gpu"}


def test_the_helper_lists_words_and_never_fails_noisily(tmp_path: Path) -> None:
    cluster = tmp_path / "mine.yaml"
    cluster.write_text(CLUSTER)
    db = tmp_path / "jobs.sqlite"
    make_jobs(db, 2)
    listed = sshwasm("--db", str(db), COMPLETE_COMMAND, "jobs")
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "2\n1\n", "")
    hosts = sshwasm("--cluster", str(cluster), COMPLETE_COMMAND, "hosts")
    assert (hosts.returncode, hosts.stdout, hosts.stderr) == (0, "alpha\nbeta\n", "")

    broken_cluster = tmp_path / "broken.yaml"
    broken_cluster.write_text("hosts: [{name: alpha}\n")
    damaged_db = tmp_path / "damaged.sqlite"
    damaged_db.write_bytes(b"not a database" * 100)
    missing_db = tmp_path / "missing" / "jobs.sqlite"
    for args in (
        ("--cluster", str(broken_cluster), COMPLETE_COMMAND, "hosts"),
        ("--cluster", str(tmp_path / "nope.yaml"), COMPLETE_COMMAND, "labels"),
        ("--db", str(damaged_db), COMPLETE_COMMAND, "jobs"),
        ("--db", str(missing_db), COMPLETE_COMMAND, "jobs"),
    ):
        result = sshwasm(*args)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), args
    # Completing reads only: it neither creates a jobs file nor changes one.
    assert not missing_db.parent.exists()
    before = db.read_bytes()
    sshwasm("--db", str(db), COMPLETE_COMMAND, "jobs")
    assert db.read_bytes() == before


def test_the_helper_reads_a_jobs_file_another_process_is_writing(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite"
    make_jobs(db, 1)
    writer = sqlite3.connect(db)
    try:
        writer.execute("BEGIN IMMEDIATE")  # a coordinator in the middle of a transaction
        result = sshwasm("--db", str(db), COMPLETE_COMMAND, "jobs")
    finally:
        writer.rollback()
        writer.close()
    assert (result.returncode, result.stdout, result.stderr) == (0, "1\n", "")


def test_completion_of_an_unknown_shell_is_a_usage_error() -> None:
    result = sshwasm("completion", "fish")
    assert result.returncode == 2
    assert result.stderr.startswith("sshwasm: error: argument SHELL: invalid choice: 'fish'")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_the_scripts_are_valid_for_their_shells(tmp_path: Path) -> None:
    bash = script_for("bash", tmp_path)
    checked = subprocess.run(["bash", "-n", str(bash)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    registered = subprocess.run(
        ["bash", "--norc", "-c", f"source {bash} && complete -p sshwasm"],
        capture_output=True, text=True, env=shell_env(),
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout.startswith("complete ") and " -F " in registered.stdout
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (scripts/setup installs it)")
    zsh = script_for("zsh", tmp_path)
    checked = subprocess.run(["zsh", "-n", str(zsh)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
