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
    columns: list[Sequence[Any]] = list(zip(*rows)) if rows else [()] * 11
    states = columns[_STATE]
    cells: list[tuple[dict[Any, str] | None, list[Any]]] = [
        (None, list(map(str, columns[_ID]))),  # INTEGER PRIMARY KEY: always an int
        (None, _name_cells(columns[_NAME], columns[_TASK])),
        _by_value(states, lambda state: "" if state is None else str(state)),
        _by_value(columns[_HOST], lambda host: printable(host or "")),
        _by_value(columns[_CPUS], str),
        _by_value(columns[_MEMORY], str),
        _by_value(columns[_SUBMITTED], local_time),
        (None, _runtime_cells(columns[_RUN_S], states, columns[_STARTED])),
        _by_value(columns[_EXIT], lambda code: "" if code is None else str(code)),
    ]
    padded: list[list[str]] = []
    widths: list[int] = []
    last = len(cells) - 1
    for index, ((shown, values), header) in enumerate(zip(cells, headers)):
        texts = shown.values() if shown is not None else values
        width = max(len(header) + 2, max(map(len, texts), default=0))
        widths.append(width)
        if index == last:  # the line's trailing spaces are cut: no need to pad it
            padded.append(values if shown is None else list(map(shown.__getitem__, values)))
        elif shown is not None:
            wide = {value: text.ljust(width) for value, text in shown.items()}
            padded.append(list(map(wide.__getitem__, values)))
        else:
            padded.append([text.ljust(width) for text in values])
    head = "  ".join(header.ljust(width) for header, width in zip(headers, widths)).rstrip()
    lines = map(str.rstrip, map("  ".join, zip(*padded)))
    return "\n".join([head, *lines, ""])


def _by_value(
    column: Sequence[Any], show: Callable[[Any], str]
) -> tuple[dict[Any, str] | None, list[Any]]:
    """A column whose values repeat: (each distinct value's cell, the values), so it is
    shown and padded once per value. A column mixing ints and floats (1 == 1.0, yet they
    show apart) is shown value by value instead."""
    kinds = set(map(type, column))
    if int in kinds and float in kinds:
        return None, [cell(show(value)) for value in column]
    return {value: cell(show(value)) for value in set(column)}, list(column)


def _name_cells(names: Sequence[Any], tasks: Sequence[Any]) -> list[str]:
    """NAME cells: `name[task]` for a task, the name for a job (as `_row_cells`)."""
    kinds = set(map(type, names))
    if int in kinds and float in kinds:  # not a name sshwasm writes: row by row
        return [
            name_cell("" if name is None else printable(name), task)
            for name, task in zip(names, tasks)
        ]
    shown = {name: "" if name is None else printable(name) for name in set(names)}
    # A name already printable and stripped needs neither again once `[task]` is added.
    plain = {
        name: text for name, text in shown.items() if text.isprintable() and text == text.strip()
    }
    return [
        f"{plain[name]}[{task}]"
        if type(task) is int and name in plain
        else name_cell(shown[name], task)
        for name, task in zip(names, tasks)
    ]


def _runtime_cells(
    run_s: Sequence[Any], states: Sequence[Any], started: Sequence[Any]
) -> list[str]:
    """RUNTIME cells: under a minute `%.2fs` (the same digits as runtime_of's format),
    anything else (a minute or more, a running job's time so far, an odd value) by
    `runtime_of` itself."""
    return [
        "%.2fs" % seconds  # noqa: UP031 (the fastest form, and the same digits)
        if type(seconds) is float and 0.0 <= seconds < 60.0
        else cell(runtime_of(seconds, state, started_at))
        for seconds, state, started_at in zip(run_s, states, started)
    ]
