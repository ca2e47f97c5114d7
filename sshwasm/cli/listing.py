"""The `jobs` table of a long listing, built a column at a time.

`sshwasm jobs` lists every row of the jobs file (README, "Jobs"), and a file of 100,000
rows must list in well under a second. Building each row's cells one row at a time (a
Python call per cell: 900,000 of them) was most of that time. Here each column is made in
one pass: a column whose values repeat (state, host, cpus, memory, submitted time, exit
code: an array's tasks share them) is escaped, formatted and padded once per distinct
value and then mapped; the columns that differ per row (id, name[task], runtime) take one
expression each. The bytes are those of `jobs.plain_table` over `jobs._row_cells`, which a
test holds to tabulate's plain layout; a value the fast forms cannot show exactly (a
control character, a float where an int was, a job still running) takes the row-by-row
functions.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

from .show import local_time, printable, runtime_of

# The light row's columns (store.TABLE_COLUMNS) this table shows, by position.
_ID, _NAME, _TASK, _STATE, _HOST, _CPUS, _MEMORY, _SUBMITTED, _RUN_S, _STARTED, _EXIT = range(11)


def cell(text: str) -> str:
    """A cell as tabulate's plain format shows it: escaped and stripped."""
    if text.isprintable() and text == text.strip():
        return text
    return printable(text).strip()


def name_cell(shown: str, task: object) -> str:
    """The NAME cell of a task (`name[task]`) or of a job; `shown` is the escaped name."""
    return cell((f"{shown}[{task}]" if task is not None else shown).strip())


def render(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """The table of these light rows under `headers` (JOB_HEADERS): tabulate's "plain"
    layout, every line ending in a newline.

    Columns are as wide as their widest cell or their header plus 2, two spaces apart,
    cells left-aligned, trailing spaces cut.
    """
    columns: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [()] * 11
    ids, names, tasks, states, hosts, cpus, memory, submitted, run_s, started, exits = columns[:11]
    name_cells = _name_cells(names, tasks)
    runtime_cells = _runtime_cells(run_s, states, started)
    # STATE to SUBMITTED: shown once per distinct value, padded, then joined once per
    # distinct combination (an array's tasks share one or a few).
    middle = (states, hosts, cpus, memory, submitted)
    shows: tuple[Callable[[Any], str], ...] = (
        lambda state: "" if state is None else str(state),
        lambda host: printable(host or ""),
        str,
        str,
        local_time,
    )
    exit_shown = _shown(exits, lambda code: "" if code is None else str(code))
    shown = [_shown(column, show) for column, show in zip(middle, shows, strict=True)]
    if exit_shown is None or None in shown:  # ints mixed with floats: cell by cell
        return _render_cells(
            [
                list(map(str, ids)),
                name_cells,
                *(_cells(column, show) for column, show in zip(middle, shows, strict=True)),
                runtime_cells,
                _cells(exits, lambda code: "" if code is None else str(code)),
            ],
            headers,
        )
    widths = [
        max(len(str(max(ids, default=0))), len(str(min(ids, default=0)))),
        max(map(len, name_cells), default=0),
        *(max(map(len, texts.values()), default=0) for texts in shown if texts is not None),
        max(map(len, runtime_cells), default=0),
        max(map(len, exit_shown.values()), default=0),
    ]
    widths = [max(width, len(header) + 2) for width, header in zip(widths, headers, strict=True)]
    padded = [
        {value: text.ljust(width) for value, text in texts.items()}
        for texts, width in zip(shown, widths[2:7], strict=True)
        if texts is not None
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
    return "\n".join([_head(headers, widths), *map(str.rstrip, lines), ""])


def _head(headers: Sequence[str], widths: Sequence[int]) -> str:
    """The header line."""
    return "  ".join(
        header.ljust(width) for header, width in zip(headers, widths, strict=True)
    ).rstrip()


def _render_cells(columns: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """The table of these columns of cells (the general form of `render`)."""
    widths = [
        max(len(header) + 2, max(map(len, column), default=0))
        for column, header in zip(columns, headers, strict=True)
    ]
    padded = [
        [text.ljust(width) for text in column]
        for column, width in zip(columns, widths, strict=True)
    ]
    lines = map(str.rstrip, map("  ".join, zip(*padded, strict=True)))
    return "\n".join([_head(headers, widths), *lines, ""])


def _mixed(column: Sequence[Any]) -> bool:
    """Whether a column holds ints and floats: 1 == 1.0, yet they show apart, so its
    values cannot be shown once per distinct value."""
    kinds = set(map(type, column))
    return int in kinds and float in kinds


def _shown(column: Sequence[Any], show: Callable[[Any], str]) -> dict[Any, str] | None:
    """Each distinct value's cell, or None if the column must be shown value by value."""
    if _mixed(column):
        return None
    return {value: cell(show(value)) for value in set(column)}


def _cells(column: Sequence[Any], show: Callable[[Any], str]) -> list[str]:
    """A column's cells, value by value."""
    return [cell(show(value)) for value in column]


def _name_cells(names: Sequence[Any], tasks: Sequence[Any]) -> list[str]:
    """NAME cells: `name[task]` for a task, the name for a job (as `_row_cells`)."""
    if _mixed(names):  # not a name sshwasm writes: row by row
        return [
            name_cell("" if name is None else printable(name), task)
            for name, task in zip(names, tasks, strict=True)
        ]
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
    anything else (a minute or more, a running job's time so far, an odd value) by
    `runtime_of` itself."""
    if run_s and set(map(type, run_s)) == {float} and min(run_s) >= 0.0 and max(run_s) < 60.0:
        return list(map("%.2fs".__mod__, run_s))
    return [
        "%.2fs" % seconds  # noqa: UP031 (the fastest form, and the same digits)
        if type(seconds) is float and 0.0 <= seconds < 60.0
        else cell(runtime_of(seconds, state, started_at))
        for seconds, state, started_at in zip(run_s, states, started, strict=True)
    ]
