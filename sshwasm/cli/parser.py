"""The command line's grammar: every command, option and argument type, with its help."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from .. import __version__
from ..states import JobState
from .exits import ExitStatus
from .show import PROG, printable

DEFAULT_CPUS = 1
DEFAULT_MEMORY_MB = 256
DEFAULT_MAX_OUTPUT_MB = 1024
# 1 PiB: far past any disk, and its byte count still fits every rlimit and file offset.
MAX_OUTPUT_MB_LIMIT = 1 << 30
# Tasks one `run --array` may submit: their rows are written in one transaction (about a
# second for the cap), and a coordinator follows them all.
MAX_ARRAY_TASKS = 100_000
# Attempts one job may be given past its first (--retries).
MAX_RETRIES = 100
# The hidden command `run --detach` starts its background coordinator with.
COORDINATE_COMMAND = "_coordinate"
# The hidden command the shell completion scripts call for job ids, host names and labels.
COMPLETE_COMMAND = "_complete"
COMPLETION_SHELLS = ("bash", "zsh")
COMPLETE_KINDS = ("jobs", "hosts", "labels")
# The newest jobs `jobs` shows at a terminal without --all or --limit (issue 13).
TERMINAL_WINDOW = 100


class ArgumentParser(argparse.ArgumentParser):
    """argparse with sshwasm's one-line error format."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(ExitStatus.USAGE, f"{PROG}: error: {printable(message)}{hint}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_int_up_to(maximum: int, unit: str) -> Callable[[str], int]:
    """An argument type for a whole number from 1 to `maximum` (`unit` names what it counts)."""

    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"at most {maximum} {unit}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _time_limit(text: str) -> float:
    # The runner defines the bound (it refuses more in a spec); imported only when needed.
    from ..runner.protocol import MAX_TIME_LIMIT_S

    value = _positive_float(text)
    if value > MAX_TIME_LIMIT_S:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_TIME_LIMIT_S} seconds (365 days), got {text}"
        )
    return value


def _retry_count(text: str) -> int:
    """`--retries N`: a whole number from 0 to MAX_RETRIES."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if not 0 <= value <= MAX_RETRIES:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_RETRIES}, got {value}")
    return value


def _job_id_list(text: str) -> list[int]:
    """`ID[,ID...]`: job ids, each at least 1."""
    ids = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{part}' is not a job id") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"'{part}' is not a job id")
        ids.append(value)
    return ids


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"'{text}' is not of the form NAME=VALUE")
    return name, value


_array_tasks = _positive_int_up_to(MAX_ARRAY_TASKS, "tasks")


class _ArrayAction(argparse.Action):
    """`--array N` or `--array N%K`: N tasks, and with K also `--max-running K`."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        count, sep, most = str(values).partition("%")
        try:
            namespace.array = _array_tasks(count)
            if sep:
                namespace.array_max_running = _positive_int(most)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, f"{values}: {exc}") from None


def _add_array_shaping(run: argparse.ArgumentParser) -> None:
    """The flags that make or shape an array besides --array (README: "Arrays")."""
    run.set_defaults(array_max_running=None)
    run.add_argument(
        "--args-from",
        metavar="FILE",
        help="one task per non-empty line of FILE (- reads standard input): the line, split "
        "as a shell would, is added to the task's arguments (after any -- ARG...)",
    )
    run.add_argument(
        "--input-each",
        nargs="+",
        metavar="PATH",
        help="one task per PATH (after SOURCE): that file or directory is the task's /input",
    )
    run.add_argument(
        "--max-running",
        type=_positive_int,
        metavar="K",
        help="at most K tasks of the array run at once (also with --detach)",
    )
    run.add_argument(
        "--halt-after-failures",
        type=_positive_int,
        metavar="K",
        help="once K tasks have failed, cancel the tasks not started yet (running ones finish)",
    )


def _add_attempt_arguments(run: argparse.ArgumentParser) -> None:
    """`run`'s flags for retries and dependencies (README.md, "Retries and dependencies")."""
    run.add_argument(
        "--retries",
        type=_retry_count,
        default=0,
        metavar="N",
        help="place the job again, on another host when one fits, up to N more times when "
        "its host fails it (unreachable, runner gone, job lost); default 0",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --retries: retry the guest's own failures too (exit code, trap, timeout, "
        "out_of_memory)",
    )
    run.add_argument(
        "--after",
        type=_job_id_list,
        metavar="ID[,ID...]",
        help="queue now, start only after all these jobs succeeded (else end cancelled)",
    )
    run.add_argument(
        "--after-any",
        type=_job_id_list,
        metavar="ID[,ID...]",
        help="queue now, start once all these jobs ended, however they ended",
    )


def _fuel_budget(text: str) -> int:
    # The runner defines the bound (wasmtime's fuel is a signed 64-bit count).
    from ..runner.protocol import MAX_FUEL

    return _positive_int_up_to(MAX_FUEL, "units of fuel")(text)


def _add_fuel_arguments(run: argparse.ArgumentParser) -> None:
    """`run`'s flags for fuel, --verify and --reuse (README.md, "Fuel, reruns and reuse")."""
    run.add_argument(
        "--fuel",
        type=_fuel_budget,
        metavar="N",
        help="let the guest execute at most N units of wasmtime fuel (about one per wasm "
        "instruction), the same on every host; past it the job ends `timeout` (exit 124); "
        "the record gains fuel_used",
    )
    run.add_argument(
        "--verify",
        action="store_true",
        help="run on two different hosts at once; succeeded only when both agree on exit "
        "code, stdout, stderr and /output",
    )
    run.add_argument(
        "--reuse",
        action="store_true",
        help="if a job with the same module, arguments, environment, stdin, inputs and "
        "limits already succeeded, record its result and output at once and run nothing",
    )


def build_parser() -> ArgumentParser:
    """The full argument parser (every command has help)."""
    parser = ArgumentParser(
        prog=PROG,
        description="Run WebAssembly jobs on the machines you can reach over SSH.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--cluster", metavar="FILE", help="cluster YAML (default: see README)")
    parser.add_argument("--db", metavar="FILE", help="jobs file (default: $SSHWASM_DB or data dir)")
    parser.add_argument(
        "--traceback", action="store_true", help="show the Python traceback of an error"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True

    run = commands.add_parser(
        "run",
        help="compile a source file and run it on the best-fitting host",
        description="Compile SOURCE to wasm32-wasi, place it on the host that fits best, run "
        "it there and stream its output. Exits with the job's exit code.",
    )
    run.add_argument(
        "source",
        metavar="SOURCE",
        help="a .rs, .c, .cc/.cpp/.cxx or .go file, a Cargo or Go module directory, "
        "or a ready .wasm module",
    )
    run.add_argument("args", nargs="*", metavar="ARG", help="arguments for the job (after --)")
    run.add_argument(
        "--cpus", type=_positive_int, default=DEFAULT_CPUS, help="cpus to reserve (default 1)"
    )
    run.add_argument(
        "--memory-mb",
        type=_positive_int,
        default=DEFAULT_MEMORY_MB,
        help=f"memory limit and reservation in MB (default {DEFAULT_MEMORY_MB})",
    )
    run.add_argument("--job-name", metavar="NAME", help="a name to show in `sshwasm jobs`")
    run.add_argument(
        "--time-limit",
        type=_time_limit,
        metavar="SECONDS",
        help="end the job as `timeout` (exit 124) after this long (at most 365 days)",
    )
    run.add_argument("--host", metavar="NAME", help="run on this host only")
    run.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME",
        help="only on hosts carrying this label (repeatable: all of them)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="show which host would be chosen and why not the others, then exit",
    )
    run.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    run.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="K=V",
        help="set an environment variable for the job (repeatable); nothing else is passed",
    )
    run.add_argument(
        "--stdin", metavar="FILE", help="feed this file (- for this one's stdin) to the job's stdin"
    )
    run.add_argument(
        "--input",
        metavar="PATH",
        help="stage a file or directory in; the job sees it read-only at /input",
    )
    run.add_argument(
        "--output",
        metavar="DIR",
        help="give the job an empty writable /output, copied back into DIR when it ends "
        "(DIR/<task> for array tasks); nothing in DIR is deleted or overwritten: a file "
        "that differs is written beside it as NAME.sshwasm-ID",
    )
    # --dir and --host-dir (sshwasm/directories.py)
    run.add_argument(
        "--dir",
        dest="dirs",
        action="append",
        default=[],
        metavar="LOCAL[::GUEST][:ro]",
        help="stage directory LOCAL (repeatable) and let the job work in it at GUEST "
        "(default /NAME; ::/ makes it the root); what the job changed comes back into "
        "LOCAL when it ends; :ro stages it read-only and brings nothing back",
    )
    run.add_argument(
        "--host-dir",
        dest="host_dirs",
        action="append",
        default=[],
        metavar="PATH::GUEST[:ro]",
        help="let the job use the host's own directory PATH at GUEST (repeatable), not "
        "copied; :ro makes it read-only; hosts without PATH are skipped",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="with --output (or --dir): the job's files replace different files of the same name "
        "(never a directory, never deleting anything)",
    )
    run.add_argument(
        "--max-output-mb",
        type=_positive_int_up_to(MAX_OUTPUT_MB_LIMIT, "MB"),
        default=DEFAULT_MAX_OUTPUT_MB,
        metavar="N",
        help=f"end the job as failed once its stdout, stderr and /output together pass N MB "
        f"(default {DEFAULT_MAX_OUTPUT_MB})",
    )
    run.add_argument(
        "--array",
        action=_ArrayAction,
        metavar="N[%K]",
        help=f"run N tasks of the module (N <= {MAX_ARRAY_TASKS}); task i sees "
        "SSHWASM_ARRAY_TASK_ID=i and SSHWASM_ARRAY_TASK_COUNT=N; N%%K: --max-running K",
    )
    _add_array_shaping(run)
    run.add_argument(
        "--tag", action="store_true", help="with --array: prefix each output line with its task"
    )
    run.add_argument("--detach", action="store_true", help="print the job id(s) and return at once")
    run.add_argument(
        "--json", action="store_true", help="print the job record as JSON instead of its output"
    )
    _add_attempt_arguments(run)
    _add_fuel_arguments(run)

    resume = commands.add_parser(
        "resume",
        help="rerun the tasks of an array that did not succeed",
        description="Rerun, under the same array id and task index, every task of the array "
        "that ID belongs to (any task's id, or the array id) which ended failed, timeout, "
        "out_of_memory, cancelled or lost, with the same module, arguments, environment, stdin "
        "and inputs. Output and exit code as `run --array`.",
    )
    resume.add_argument("job_id", type=_positive_int, metavar="ID")
    resume.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    resume.add_argument("--tag", action="store_true", help="prefix each output line with its task")
    resume.add_argument(
        "--detach", action="store_true", help="print the rerun tasks' ids and return at once"
    )
    resume.add_argument(
        "--json", action="store_true", help="print the task records as JSON instead of output"
    )

    rerun = commands.add_parser(
        "rerun",
        help="run a job again exactly: same module, arguments, environment, stdin, inputs",
        description="Run job ID again as a new job: the same module (by sha256), argv, env, "
        "stdin and staged input, with the same limits, placed normally or on --host. "
        "--compare then compares stdout, stderr, exit code and the /output tree with the "
        "original's and prints `identical` (exit 0) or one line per difference (exit 1).",
    )
    rerun.add_argument("job_id", type=_positive_int, metavar="ID")
    rerun.add_argument("--host", metavar="NAME", help="run on this host only")
    rerun.add_argument(
        "--compare", action="store_true", help="compare the result with the original's"
    )
    rerun.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    rerun.add_argument(
        "--json", action="store_true", help="print the new job's record as JSON instead of output"
    )

    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--json", action="store_true", help="print a JSON array of job records")
    jobs_window = jobs.add_mutually_exclusive_group()
    jobs_window.add_argument("--limit", type=_positive_int, metavar="N", help="show at most N jobs")
    jobs.add_argument(
        "--state", choices=tuple(state.value for state in JobState), help="only jobs in this state"
    )
    jobs.add_argument("--fold", action="store_true", help="one row per array instead of per task")
    # At a terminal the table shows the newest jobs only (issue 13: a jobs file of 100,000).
    jobs_window.add_argument(
        "--all",
        action="store_true",
        help="at a terminal too, list every job (without it a terminal gets the newest "
        f"{TERMINAL_WINDOW} and a line saying how many more there are)",
    )

    status = commands.add_parser("status", help="show one job (refreshed from its host)")
    status.add_argument("job_id", type=_positive_int, metavar="ID")
    status.add_argument("--json", action="store_true", help="print the job record as JSON")

    logs = commands.add_parser("logs", help="print a job's output")
    logs.add_argument("job_id", type=_positive_int, metavar="ID")
    logs.add_argument("--stderr", action="store_true", help="print its stderr instead of stdout")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")

    cancel = commands.add_parser("cancel", help="stop queued or running jobs")
    cancel.add_argument("job_ids", type=_positive_int, nargs="+", metavar="ID")

    wasm = commands.add_parser("wasm", help="save the exact module a job ran")
    wasm.add_argument("job_id", type=_positive_int, metavar="ID")
    wasm.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it")

    hosts = commands.add_parser("hosts", help="list the cluster's hosts and their free capacity")
    hosts.add_argument("--json", action="store_true", help="print a JSON array")
    hosts.add_argument("--check", action="store_true", help="connect to each host and report")
    hosts_commands = hosts.add_subparsers(
        dest="hosts_command", metavar="install", parser_class=ArgumentParser
    )
    install = hosts_commands.add_parser(
        "install", help="install the runner, and wasmtime if missing, on hosts (default: all)"
    )
    install.add_argument("names", nargs="*", metavar="NAME")

    # engine: dask (issue 12): the Dask pool on the cluster's hosts.
    pool = commands.add_parser(
        "pool",
        help="start, inspect or stop the Dask pool of an `engine: dask` cluster",
        description="The Dask distributed pool on the hosts of a cluster file with "
        "`engine: dask`: `up` starts the scheduler and one worker per host over SSH (detached, "
        "mutual TLS), `status` shows the workers and their load, `down` stops all of it.",
    )
    pool_commands = pool.add_subparsers(
        dest="pool_command", metavar="{up,status,down}", parser_class=ArgumentParser, required=True
    )
    pool_commands.add_parser("up", help="start what is not running (idempotent)")
    pool_status = pool_commands.add_parser("status", help="the scheduler, workers and tasks")
    pool_status.add_argument("--json", action="store_true", help="print a JSON object")
    pool_commands.add_parser("down", help="stop the workers and the scheduler")
    # -- end engine: dask

    report = commands.add_parser(
        "report",
        help="how well jobs used their cpus and memory; --html: a timeline page",
        description="Requested cpus and memory against use (run_s, cpu_s, peak memory), per "
        "job and summed over an array (any task id of it), with advice when a request was far "
        "above use. Without ID: the newest jobs (--last, default 20, or --since).",
    )
    report.add_argument("job_id", type=_positive_int, nargs="?", metavar="ID")
    report.add_argument("--json", action="store_true", help="print the figures as JSON")
    report.add_argument(
        "--html", metavar="FILE", help="write a self-contained timeline page of the jobs to FILE"
    )
    report.add_argument("--last", type=_positive_int, metavar="N", help="without ID: N newest jobs")
    report.add_argument(
        "--since", metavar="WHEN", help="without ID: jobs submitted since WHEN (2h, 1d, ISO date)"
    )

    completion = commands.add_parser(
        "completion",
        help="print the bash or zsh completion script",
        description="Print a completion script for bash or zsh: commands, flags, job ids, "
        'host names and labels. Enable it with `eval "$(sshwasm completion bash)"` in '
        "~/.bashrc (zsh: ~/.zshrc, after compinit).",
    )
    completion.add_argument(
        "shell", choices=COMPLETION_SHELLS, metavar="SHELL", help=" or ".join(COMPLETION_SHELLS)
    )

    # No help=: argparse would list a suppressed choice as "_coordinate ==SUPPRESS==".
    coordinate = commands.add_parser(COORDINATE_COMMAND)
    coordinate.add_argument("job_ids", type=int, nargs="+")
    complete = commands.add_parser(COMPLETE_COMMAND)
    complete.add_argument("kind", choices=COMPLETE_KINDS)
    return parser
