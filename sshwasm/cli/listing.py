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

Measured and left (100,000 rows of a real array): SQLite laying out each line itself
(`printf` over the columns, what it would show otherwise looked for in an aggregate pass
that also gave the widths, a tie such as 0.125 rounded by Python) took longer than
reading the rows and laying them out here, 0.3 s against 0.15 s and 0.11 s of CPU: SQLite's
functions cost about as much per row as Python's `%`, and the checks come on top.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    cells left-aligned, trailing spaces cut.
    """
    keys = list(map(_KEY_COLUMNS, rows))
    return _render(
        list(map(_IDS, rows)),
        list(map(_TASKS, rows)),
        list(map(_RUN_S, rows)),
        keys,
        {key: key for key in set(keys)},
        headers,
    )


def render_keyed(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str | None:
    """`render` of store.keyed_table_rows (id, array_task, run_s, TABLE_KEY), each key
    decoded once; None if a key holds a number JSON does not give back exactly (a REAL
    where an INTEGER belongs: then `render` of `table_rows`)."""
    import json

    keys = list(map(_KEY, rows))
    values: dict[Any, tuple[Any, ...]] = {}
    for key in set(keys):
        value = tuple(json.loads(key))
        if float in set(map(type, _NUMBERS(value))):
            return None
        values[key] = value
    return _render(
        list(map(_IDS, rows)),
        list(map(_KEYED_TASKS, rows)),
        list(map(_KEYED_RUN_S, rows)),
        keys,
        values,
        headers,
    )


def _render(
    ids: list[int],
    tasks: list[Any],
    run_s: list[Any],
    keys: list[Any],
    values: Mapping[Any, tuple[Any, ...]],
    headers: Sequence[str],
) -> str:
    """The table: each row's id, array_task and run_s, and a key standing for the rest of
    its values (`values[key]`: name, state, host, cpus, memory_mb, submitted_at,
    exit_code, started_at), shared by rows that have the same. Each line is the
    concatenation of its cells already padded (and followed by the two spaces), made once
    per distinct value or key where values repeat."""
    if not ids:
        return _head(headers, [len(header) + 2 for header in headers]) + "\n"
    name_cells = _name_cells(keys, tasks, values)
    # Run times all under 10 s (a real array's tiny tasks: 100,000 apart) are formatted
    # by each line's own `%` ("%.2fs": five characters each), not as 100,000 cells.
    inline = _all_short(run_s)
    runtimes: dict[Any, str] | list[str] = ["0.00s"] if inline else _runtimes(run_s, keys, values)
    exit_shown = {key: cell(_exit(value[6])) for key, value in values.items()}
    # STATE to SUBMITTED: each value shown once, and each distinct combination of them (an
    # array's tasks share one or a few) padded and joined once.
    middles = {key: value[1:6] for key, value in values.items()}
    distinct = set(middles.values())
    shown = [
        _shown({middle[index] for middle in distinct}, show) for index, show in enumerate(_MIDDLE)
    ]
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
    joined = {
        middle: "".join([pad[value] for pad, value in zip(padded, middle, strict=True)])
        for middle in distinct
    }
    runtime_cells: Iterable[Any] = (
        run_s
        if inline
        else runtimes
        if isinstance(runtimes, list)
        else map(runtimes.__getitem__, run_s)
    )
    # One `%` per line, mapped in C, with one format per key: the id, NAME and RUNTIME
    # padded by the format itself (`%-Nd` and `%-Ns` pad as str.ljust does), the key's
    # STATE..SUBMITTED and EXIT cells already in it (their `%` doubled).
    id_name = "%%-%dd%%-%ds" % (widths[0] + 2, widths[1] + 2)  # noqa: UP031
    runtime = "%.2fs" + " " * (widths[7] - 3) if inline else "%%-%ds" % (widths[7] + 2)  # noqa: UP031
    formats = {
        key: id_name
        + joined[middle].replace("%", "%%")
        + runtime
        + exit_shown[key].replace("%", "%%")
        for key, middle in middles.items()
    }
    lines = map(
        operator.mod,
        map(formats.__getitem__, keys),
        zip(ids, name_cells, runtime_cells, strict=True),
    )
    # Only a line whose EXIT is empty can end in spaces (a cell is stripped, and every
    # other one is followed by a cell): cut them only if there is such a line.
    if all(exit_shown.values()):
        return "\n".join([_head(headers, widths), *lines, ""])
    return "\n".join([_head(headers, widths), *map(str.rstrip, lines), ""])


def _head(headers: Sequence[str], widths: Sequence[int]) -> str:
    """The header line."""
    return "  ".join(
        header.ljust(width) for header, width in zip(headers, widths, strict=True)
    ).rstrip()


# The light row's columns (store.TABLE_COLUMNS), by position; the key of the others, in
# the order of store.TABLE_KEY: name, state, host, cpus, memory_mb, submitted_at,
# exit_code, started_at.
_IDS, _TASKS, _RUN_S = itemgetter(0), itemgetter(2), itemgetter(8)
_KEY_COLUMNS = itemgetter(1, 3, 4, 5, 6, 7, 10, 9)
# store.keyed_table_rows: id, array_task, run_s, key.
_KEYED_TASKS, _KEYED_RUN_S, _KEY = itemgetter(1), itemgetter(2), itemgetter(3)
# cpus, memory_mb and exit_code in a key: INTEGER columns.
_NUMBERS = itemgetter(3, 4, 6)
# How STATE, HOST, CPUS, MEM_MB and SUBMITTED show a stored value (as `_row_cells`).
_MIDDLE: tuple[Callable[[Any], str], ...] = (_state, _host, str, str, local_time)


def _shown(column: Iterable[Any], show: Callable[[Any], str]) -> dict[Any, str]:
    """Each distinct value's cell."""
    return {value: cell(show(value)) for value in set(column)}


def _name_cells(
    keys: Sequence[Any], tasks: Sequence[Any], values: Mapping[Any, tuple[Any, ...]]
) -> list[str]:
    """NAME cells: `name[task]` for a task, the name for a job (as `_row_cells`)."""
    shown = {key: "" if value[0] is None else printable(value[0]) for key, value in values.items()}
    # A name already printable and stripped needs neither again once `[task]` is added.
    plain = {
        key: text for key, text in shown.items() if text.isprintable() and text == text.strip()
    }
    if len(plain) == len(shown) and set(map(type, tasks)) == {int}:  # tasks of arrays
        formats = {key: text.replace("%", "%%") + "[%d]" for key, text in plain.items()}
        return list(map(operator.mod, map(formats.__getitem__, keys), tasks))
    return [
        f"{plain[key]}[{task}]"
        if type(task) is int and key in plain
        else name_cell(shown[key], task)
        for key, task in zip(keys, tasks, strict=True)
    ]


def _all_short(run_s: Sequence[Any]) -> bool:
    """Whether every run time is a float above zero and below 9.99 s, so that `%.2fs`
    shows each in five characters, as `_runtimes` does (never "-0.00s" nor "10.00s")."""
    distinct = set(run_s)
    return (
        bool(distinct)
        and set(map(type, distinct)) == {float}
        and min(distinct) > 0.0
        and max(distinct) < 9.99
        and not any(map(math.isnan, distinct))
    )


def _runtimes(
    run_s: Sequence[Any], keys: Sequence[Any], values: Mapping[Any, tuple[Any, ...]]
) -> dict[Any, str] | list[str]:
    """RUNTIME: under a minute `%.2fs` (the same digits as runtime_of's format), made once
    per distinct run_s (returned as that dict) where values repeat, else in turn; other
    cells row by row, anything but a plain time under a minute (a minute or more, a
    running job's time so far, an odd value) by `runtime_of` itself."""
    distinct = set(run_s)
    # Not at zero: 0.0 == -0.0, yet they show apart ("-0.00s"). Checked in C over the
    # distinct values (a real array's run times hardly repeat: 100,000 of them).
    if (
        distinct
        and set(map(type, distinct)) == {float}
        and min(distinct) > 0.0
        and max(distinct) < 60.0
        and not any(map(math.isnan, distinct))
    ):
        if len(distinct) * 4 > len(run_s):  # mostly apart: each formatted in turn, in C
            return list(map("%.2fs".__mod__, run_s))
        return {seconds: "%.2fs" % seconds for seconds in distinct}  # noqa: UP031 (same digits)
    return [
        "%.2fs" % seconds  # noqa: UP031
        if type(seconds) is float and 0.0 <= seconds < 60.0
        else cell(runtime_of(seconds, values[key][1], values[key][7]))
        for seconds, key in zip(run_s, keys, strict=True)
    ]
