"""The `jobs` table of a long listing, built a column at a time.

`sshwasm jobs` lists every row of the jobs file (README, "Jobs"), and a file of 100,000
rows must list in well under a second. Building each row's cells one row at a time (a
Python call per cell: 900,000 of them) was most of that time. Here each column is made in
one pass: a column whose values repeat (state, host, cpus, memory, submitted time, exit
code: an array's tasks share them; runtimes repeat too) is escaped, formatted and padded
once per distinct value and then mapped, and each line is one `%` over the row's pieces.
The bytes are those of `jobs.plain_table` over `jobs._row_cells`, which a test holds to
tabulate's plain layout; a value the fast forms cannot show exactly (a control character,
a task number that is no int, a job still running) takes the row-by-row functions.

Values are told apart by equality, which is exact here because of the jobs file's column
types: an INTEGER column gives back a whole REAL as an int and a TEXT column gives back
numbers as text, so no column holds both 1 and 1.0 (equal, yet shown apart).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

from .show import local_time, printable, runtime_of


def cell(text: str) -> str:
    """A cell as tabulate's plain format shows it: escaped and stripped."""
    if text.isprintable() and text == text.strip():
        return text
    return printable(text).strip()


def name_cell(shown: str, task: object) -> str:
    """The NAME cell of a task (`name[task]`) or of a job; `shown` is the escaped name."""
    return cell((f"{shown}[{task}]" if task is not None else shown).strip())


def _state(state: Any) -> str:
    return "" if state is None else str(state)


def _host(host: Any) -> str:
    return printable(host or "")


def _exit(code: Any) -> str:
    return "" if code is None else str(code)


def render(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """The table of these light rows (store.TABLE_COLUMNS) under `headers` (JOB_HEADERS):
    tabulate's "plain" layout, every line ending in a newline.

    Columns are as wide as their widest cell or their header plus 2, two spaces apart,
    cells left-aligned, trailing spaces cut.
    """
    columns: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [()] * 11
    ids, names, tasks, states, hosts, cpus, memory, submitted, run_s, started, exits = columns
    name_cells = _name_cells(names, tasks)
    runtime_cells = _runtime_cells(run_s, states, started)
    exit_shown = _shown(exits, _exit)
    # STATE to SUBMITTED: each shown once per distinct value, padded, then joined once per
    # distinct combination (an array's tasks share one or a few).
    middle = (states, hosts, cpus, memory, submitted)
    shown = [_shown(column, show) for column, show in zip(middle, _MIDDLE, strict=True)]
    widths = [
        max(len(str(max(ids, default=0))), len(str(min(ids, default=0)))),
        max(map(len, name_cells), default=0),
        *(max(map(len, texts.values()), default=0) for texts in shown),
        max(map(len, runtime_cells), default=0),
        max(map(len, exit_shown.values()), default=0),
    ]
    widths = [max(width, len(header) + 2) for width, header in zip(widths, headers, strict=True)]
    padded = [
        {value: text.ljust(width) for value, text in texts.items()}
        for texts, width in zip(shown, widths[2:7], strict=True)
    ]
    combined = {
        key: "  ".join([pad[value] for pad, value in zip(padded, key, strict=True)])
        for key in set(zip(*middle, strict=True))
    }
    # ids are ints (INTEGER PRIMARY KEY): %d is str(id).
    line = f"%-{widths[0]}d  %-{widths[1]}s  %s  %-{widths[7]}s  %s"
    lines = map(
        line.__mod__,
        zip(
            ids,
            name_cells,
            map(combined.__getitem__, zip(*middle, strict=True)),
            runtime_cells,
            map(exit_shown.__getitem__, exits),
            strict=True,
        ),
    )
    head = "  ".join(
        header.ljust(width) for header, width in zip(headers, widths, strict=True)
    ).rstrip()
    return "\n".join([head, *map(str.rstrip, lines), ""])


# How STATE, HOST, CPUS, MEM_MB and SUBMITTED show a stored value (as `_row_cells`).
_MIDDLE: tuple[Callable[[Any], str], ...] = (_state, _host, str, str, local_time)


def _shown(column: Sequence[Any], show: Callable[[Any], str]) -> dict[Any, str]:
    """Each distinct value's cell."""
    return {value: cell(show(value)) for value in set(column)}


def _name_cells(names: Sequence[Any], tasks: Sequence[Any]) -> list[str]:
    """NAME cells: `name[task]` for a task, the name for a job (as `_row_cells`)."""
    shown = {name: "" if name is None else printable(name) for name in set(names)}
    # A name already printable and stripped needs neither again once `[task]` is added.
    plain = {
        name: text for name, text in shown.items() if text.isprintable() and text == text.strip()
    }
    if len(plain) == len(shown) and set(map(type, tasks)) == {int}:  # tasks of arrays
        formats = {name: text.replace("%", "%%") + "[%d]" for name, text in plain.items()}
        return list(map(operator.mod, map(formats.__getitem__, names), tasks))
    return [
        f"{plain[name]}[{task}]"
        if type(task) is int and name in plain
        else name_cell(shown[name], task)
        for name, task in zip(names, tasks, strict=True)
    ]


def _runtime_cells(
    run_s: Sequence[Any], states: Sequence[Any], started: Sequence[Any]
) -> list[str]:
    """RUNTIME cells: under a minute `%.2fs` (the same digits as runtime_of's format),
    once per distinct value; anything else (a minute or more, a running job's time so far,
    an odd value) by `runtime_of` itself, row by row."""
    values = set(run_s)
    # 0.0 == -0.0, yet they show apart ("-0.00s"): a column holding zero goes row by row.
    if 0.0 not in values and all(type(s) is float and 0.0 < s < 60.0 for s in values):
        shown = {seconds: "%.2fs" % seconds for seconds in values}  # noqa: UP031 (the same digits)
        return list(map(shown.__getitem__, run_s))
    return [
        "%.2fs" % seconds  # noqa: UP031
        if type(seconds) is float and 0.0 <= seconds < 60.0
        else cell(runtime_of(seconds, state, started_at))
        for seconds, state, started_at in zip(run_s, states, started, strict=True)
    ]
