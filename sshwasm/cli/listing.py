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
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter
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
    cells left-aligned, trailing spaces cut. Each line is the concatenation of its cells
    already padded (and followed by the two spaces), made once per distinct value where
    values repeat.
    """
    if not rows:
        return _head(headers, [len(header) + 2 for header in headers]) + "\n"
    ids: list[int] = list(map(_IDS, rows))
    name_cells = _name_cells(list(map(_NAMES, rows)), list(map(_TASKS, rows)))
    runtimes = _runtimes(rows)
    exit_shown = _shown(list(map(_EXITS, rows)), _exit)
    # STATE to SUBMITTED: each value shown once, and each distinct combination of them (an
    # array's tasks share one or a few) padded and joined once.
    keys = list(map(_MIDDLE_COLUMNS, rows))
    distinct = set(keys)
    shown = [_shown({key[index] for key in distinct}, show) for index, show in enumerate(_MIDDLE)]
    widths = [
        max(len(str(max(ids))), len(str(min(ids)))),
        max(map(len, name_cells)),
        *(max(map(len, texts.values())) for texts in shown),
        max(map(len, runtimes.values() if isinstance(runtimes, dict) else runtimes)),
        max(map(len, exit_shown.values())),
    ]
    widths = [max(width, len(header) + 2) for width, header in zip(widths, headers, strict=True)]
    # Each cell but the last padded to its width plus the two spaces that follow it.
    padded = [
        {value: text.ljust(width + 2) for value, text in texts.items()}
        for texts, width in zip(shown, widths[2:7], strict=True)
    ]
    combined = {
        key: "".join([pad[value] for pad, value in zip(padded, key, strict=True)])
        for key in distinct
    }
    id_width, name_width, runtime_width = widths[0] + 2, widths[1] + 2, widths[7] + 2
    if isinstance(runtimes, dict):  # one cell per distinct run_s
        runtime_pads = {value: text.ljust(runtime_width) for value, text in runtimes.items()}
        runtime_cells = list(map(runtime_pads.__getitem__, map(_RUN_S, rows)))
    else:
        runtime_cells = [text.ljust(runtime_width) for text in runtimes]
    lines = map(
        "".join,
        zip(
            [str(job_id).ljust(id_width) for job_id in ids],
            [text.ljust(name_width) for text in name_cells],
            map(combined.__getitem__, keys),
            runtime_cells,
            map(exit_shown.__getitem__, map(_EXITS, rows)),
            strict=True,
        ),
    )
    return "\n".join([_head(headers, widths), *map(str.rstrip, lines), ""])


def _head(headers: Sequence[str], widths: Sequence[int]) -> str:
    """The header line."""
    return "  ".join(
        header.ljust(width) for header, width in zip(headers, widths, strict=True)
    ).rstrip()


# The light row's columns (store.TABLE_COLUMNS), by position.
_IDS, _NAMES, _TASKS = itemgetter(0), itemgetter(1), itemgetter(2)
_STATES, _RUN_S, _STARTED, _EXITS = itemgetter(3), itemgetter(8), itemgetter(9), itemgetter(10)
_MIDDLE_COLUMNS = itemgetter(3, 4, 5, 6, 7)  # state, host, cpus, memory_mb, submitted_at
# How STATE, HOST, CPUS, MEM_MB and SUBMITTED show a stored value (as `_row_cells`).
_MIDDLE: tuple[Callable[[Any], str], ...] = (_state, _host, str, str, local_time)


def _shown(column: Iterable[Any], show: Callable[[Any], str]) -> dict[Any, str]:
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


def _runtimes(rows: Sequence[Sequence[Any]]) -> dict[Any, str] | list[str]:
    """RUNTIME: under a minute `%.2fs` (the same digits as runtime_of's format), made once
    per distinct run_s (returned as that dict); else cells row by row, anything but a
    plain time under a minute (a minute or more, a running job's time so far, an odd
    value) by `runtime_of` itself."""
    run_s = list(map(_RUN_S, rows))
    values = set(run_s)
    # Not at zero: 0.0 == -0.0, yet they show apart ("-0.00s").
    if all(type(s) is float and 0.0 < s < 60.0 for s in values):
        return {seconds: "%.2fs" % seconds for seconds in values}  # noqa: UP031 (same digits)
    return [
        "%.2fs" % seconds  # noqa: UP031
        if type(seconds) is float and 0.0 <= seconds < 60.0
        else cell(runtime_of(seconds, state, started_at))
        for seconds, state, started_at in zip(
            run_s, map(_STATES, rows), map(_STARTED, rows), strict=True
        )
    ]
