"""The jobs file: SQLite schema, migrations, atomic capacity reservation and queries.

Several `sshwasm` processes share one jobs file, so every write is a short transaction and
placement reads free capacity and reserves it inside one `BEGIN IMMEDIATE` transaction:
two coordinators can never both see the same free slot.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from . import paths
from .cluster import Host
from .errors import JobNotFound, StoreError
from .schedule import Request, Usage, plan
from .states import FINAL_STATES, JobState

SCHEMA_VERSION = 6

STATES = tuple(state.value for state in JobState)
_FINAL_WORDS = sorted(state.value for state in FINAL_STATES)

# The job record contract (README.md, "The job record"), in order.
RECORD_FIELDS = (
    "id",
    "name",
    "state",
    "exit_code",
    "host",
    "cpus",
    "memory_mb",
    "time_limit_s",
    "source",
    "language",
    "wasm_sha256",
    "wasm_bytes",
    "upload_bytes",
    "submitted_at",
    "started_at",
    "finished_at",
    "queue_s",
    "compile_s",
    "upload_s",
    "run_s",
    "cpu_s",
    "peak_memory_bytes",
    "stdout",
    "stderr",
    "error",
    # extensions of the contract
    "array_id",
    "array_task",
    "input_bytes",
    "output_bytes",
    "stage_in_s",
    "stage_out_s",
    "max_output_mb",
    "output_conflicts",
    "attempts",
    "attempt_hosts",
    # --dir and --host-dir
    "dirs",
    # fuel, reruns, --verify and --reuse (issue 11)
    "fuel",
    "fuel_used",
    "rerun_of",
    "verify",
    "reused_from",
    # engine: dask (issue 12)
    "engine",
)

# What the `jobs` table reads of a row (JobStore.table_rows), in this order.
TABLE_COLUMNS = (
    "id",
    "name",
    "array_task",
    "state",
    "host",
    "cpus",
    "memory_mb",
    "submitted_at",
    "run_s",
    "started_at",
    "exit_code",
)
# TABLE_COLUMNS as selected: started_at only where the table uses it (a running job's time
# so far), so a long listing does not build a string per finished row for nothing.
TABLE_SELECT = ", ".join(
    "CASE WHEN state = 'running' THEN started_at END" if name == "started_at" else name
    for name in TABLE_COLUMNS
)

# What keyed_table_rows gives of a row besides id, array_task and run_s: name, state, host,
# cpus, memory_mb, submitted_at, exit_code and (running only) started_at as a JSON array.
TABLE_KEY = (
    "json_array(name, state, host, cpus, memory_mb, submitted_at, exit_code, "
    "CASE WHEN state = 'running' THEN started_at END)"
)

# A queued job whose coordinator has not been heard from for this long no longer holds its
# place in line (its coordinator was killed); it cannot take capacity without one anyway.
QUEUE_STALE_S = 30.0
# place_waiting renews a waiting job's heartbeat only when it is older than this.
PLACE_HEARTBEAT_S = 5.0
# One wait for another process's lock on the jobs file; longer waits are retried without
# bound, with a warning every LOCK_WARN_EVERY_S.
# A cancelled job's exit code, as for a process ended by SIGTERM (the runner says the same).
CANCELLED_EXIT_CODE = 143
LOCK_ATTEMPT_S = 2.0
LOCK_WARN_EVERY_S = 15.0

_T = TypeVar("_T")

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT,
        state TEXT NOT NULL,
        exit_code INTEGER,
        host TEXT,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        time_limit_s REAL,
        source TEXT,
        language TEXT,
        wasm_sha256 TEXT,
        wasm_bytes INTEGER,
        upload_bytes INTEGER,
        submitted_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        queue_s REAL,
        compile_s REAL,
        upload_s REAL,
        run_s REAL,
        cpu_s REAL,
        peak_memory_bytes INTEGER,
        stdout TEXT,
        stderr TEXT,
        error TEXT,
        -- internal columns, not part of the record contract
        wasm_path TEXT,
        argv TEXT NOT NULL DEFAULT '[]',
        env TEXT NOT NULL DEFAULT '[]',
        stdin_path TEXT,
        pinned_host TEXT,
        host_config TEXT,
        submitted_ts REAL NOT NULL,
        placed_ts REAL,
        heartbeat_ts REAL,
        coordinator_pid INTEGER,
        stdout_bytes INTEGER NOT NULL DEFAULT 0,
        stderr_bytes INTEGER NOT NULL DEFAULT 0,
        remote_key TEXT,
        unreachable_since REAL,
        array_id INTEGER,
        array_task INTEGER,
        labels TEXT NOT NULL DEFAULT '[]',
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        input_path TEXT,
        output_dir TEXT,
        input_bytes INTEGER,
        output_bytes INTEGER,
        stage_in_s REAL,
        stage_out_s REAL
    );
    CREATE INDEX jobs_array ON jobs(array_id);
    CREATE INDEX jobs_state ON jobs(state);
    CREATE INDEX jobs_host_state ON jobs(host, state);
    """,
    # --max-output-mb and --overwrite; jobs from before had neither (no cap, no overwrite).
    2: """
    ALTER TABLE jobs ADD COLUMN max_output_mb INTEGER;
    ALTER TABLE jobs ADD COLUMN output_overwrite INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN output_conflicts INTEGER;
    """,
    # Array throttling and halting (--max-running, --halt-after-failures), stored on every
    # task so that any coordinator of the array, detached or not, enforces them; older
    # rows have neither (no throttle, no halt). The index counts an array's tasks by state
    # without reading its rows (100,000 tasks: milliseconds).
    3: """
    ALTER TABLE jobs ADD COLUMN max_running INTEGER;
    ALTER TABLE jobs ADD COLUMN halt_after_failures INTEGER;
    CREATE INDEX jobs_array_state ON jobs(array_id, state);
    """,
    # --retries, --retry-failed, --after, --after-any and `resume` (one step of its own).
    # Jobs from before ran once, on their host, and waited for nothing.
    4: """
    ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN attempt_hosts TEXT;
    ALTER TABLE jobs ADD COLUMN attempt_history TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN retry_failed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN after_ids TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN after_any INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET attempt_hosts = host WHERE host IS NOT NULL;
    """,
    # Directories (--dir, --host-dir), fuel (--fuel), reruns (`rerun`, --verify), result
    # reuse (--reuse) and the engine a job ran on, in one step. Jobs from before staged no
    # directory, counted no fuel, reran and reused nothing, and ran on the SSH engine.
    5: """
    ALTER TABLE jobs ADD COLUMN dirs TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN fuel INTEGER;
    ALTER TABLE jobs ADD COLUMN fuel_used INTEGER;
    ALTER TABLE jobs ADD COLUMN rerun_of INTEGER;
    ALTER TABLE jobs ADD COLUMN verify INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN reuse_key TEXT;
    ALTER TABLE jobs ADD COLUMN reused_from INTEGER;
    ALTER TABLE jobs ADD COLUMN engine TEXT NOT NULL DEFAULT 'ssh';
    CREATE INDEX jobs_reuse_key ON jobs(reuse_key, state);
    """,
    # The `jobs` table's columns in one covering index, in id order (issue 13): a listing
    # reads this index, newest first, instead of every row's pages (a real task's row is
    # about 1.5 KB: its record, host snapshot, inline output; an index entry about 110
    # bytes). 100,000 rows: SQLite's part of `jobs` 0.25 -> 0.15 s, the file 11 MB bigger.
    6: """
    CREATE INDEX jobs_listing ON jobs(id, name, array_task, state, host, cpus, memory_mb,
        submitted_at, run_s, exit_code, started_at, verify, rerun_of);
    """,
}

# The final states that count as an array task's failure for --halt-after-failures (a
# cancelled task was stopped, it did not fail).
_FAILURE_WORDS = sorted(
    state.value for state in FINAL_STATES - {JobState.SUCCEEDED, JobState.CANCELLED}
)
# A task cancelled because its array reached --halt-after-failures: its error says so.
HALT_ERROR = "halted after {} failures"


_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)


def request_of(row: Mapping[str, Any] | sqlite3.Row) -> Request:
    """The placement request stored in a job row."""
    labels = tuple(json.loads(row["labels"])) if row["labels"] else ()
    return Request(row["cpus"], row["memory_mb"], row["pinned_host"], labels)


@dataclass(frozen=True)
class QueuedRequest:
    """What the placer needs of a job that waits (not its whole row): its placement
    request and the array settings that decide how its wait is announced."""

    id: int
    request: Request
    array_id: int | None
    max_running: int | None


def utc_now() -> str:
    """Now as ISO 8601 UTC, millisecond precision."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class JobSpec:
    """Everything a job is submitted with."""

    name: str | None
    cpus: int
    memory_mb: int
    time_limit_s: float | None
    source: str
    language: str
    wasm_sha256: str
    wasm_bytes: int
    wasm_path: str
    compile_s: float
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    stdin_path: str | None = None
    pinned_host: str | None = None
    array_size: int | None = None  # set: submit this many tasks sharing one array id
    labels: tuple[str, ...] = ()
    input_path: str | None = None
    output_dir: str | None = None
    max_output_mb: int | None = None  # stdout + stderr + /output together; None: no cap
    output_overwrite: bool = False
    # Per array task (one entry each, array_size of them): arguments added after `argv`
    # (--args-from) and the path staged as /input (--input-each, instead of input_path).
    task_args: tuple[tuple[str, ...], ...] | None = None
    task_inputs: tuple[str, ...] | None = None
    max_running: int | None = None  # at most this many tasks of the array run at once
    halt_after_failures: int | None = None  # cancel unstarted tasks after this many fail
    retries: int = 0  # placed again up to this many times after its host failed it
    retry_failed: bool = False  # a guest's own failure is retried too
    after: tuple[int, ...] = ()  # placed only once these jobs ended (see after_any)
    after_any: bool = False  # any final state of `after` will do, not only succeeded
    dirs: str = "[]"  # --dir and --host-dir: JSON list (directories.mounts_json), every task
    # Fuel, reruns, --verify and --reuse (issue 11).
    fuel: int | None = None  # a fuel budget; None: fuel is not counted
    rerun_of: int | None = None  # the job this one runs again (`sshwasm rerun`)
    verify: bool = False  # runs on two hosts at once, succeeded only if both agree


# The second run of a --verify job: verify set, and rerun_of naming the job it checks (a
# `rerun` never sets verify). An internal row: `jobs` does not list it.
VERIFY_TWIN_SQL = "verify = 1 AND rerun_of IS NOT NULL"


# A value of the public job record (README.md, "The job record"): JSON scalars only.
RecordValue = str | int | float | None


@dataclass(frozen=True)
class Job:
    """One row of the jobs file, one field per column (built by `from_row` alone)."""

    id: int
    name: str | None
    state: JobState
    exit_code: int | None
    host: str | None
    cpus: int
    memory_mb: int
    time_limit_s: float | None
    source: str
    language: str
    wasm_sha256: str
    wasm_bytes: int
    upload_bytes: int | None
    submitted_at: str
    started_at: str | None
    finished_at: str | None
    queue_s: float | None
    compile_s: float
    upload_s: float | None
    run_s: float | None
    cpu_s: float | None
    peak_memory_bytes: int | None
    stdout: str | None
    stderr: str | None
    error: str | None
    # internal columns, not part of the record contract
    wasm_path: str
    argv: str  # JSON list; see argv_list
    env: str  # JSON list of pairs; see env_pairs
    stdin_path: str | None
    pinned_host: str | None
    host_config: str | None  # JSON; see host_snapshot
    submitted_ts: float
    placed_ts: float | None
    heartbeat_ts: float | None
    coordinator_pid: int | None
    stdout_bytes: int
    stderr_bytes: int
    remote_key: str  # names the job's directory on hosts; set when it is submitted
    unreachable_since: float | None
    array_id: int | None
    array_task: int | None
    labels: str  # JSON list
    cancel_requested: bool
    input_path: str | None
    output_dir: str | None
    input_bytes: int | None
    output_bytes: int | None
    stage_in_s: float | None
    stage_out_s: float | None
    max_output_mb: int | None
    output_overwrite: bool
    output_conflicts: int | None
    max_running: int | None
    halt_after_failures: int | None
    attempts: int  # 1 for a first run; each retry or resume adds one
    attempt_hosts: str | None  # comma-separated, in order; the current attempt's last
    attempt_history: str  # JSON list: how each earlier attempt ended
    retries: int
    retry_failed: bool
    after_ids: str  # JSON list of job ids; see dependencies
    after_any: bool
    held: bool  # waiting for its dependencies: no place in line yet
    dirs: str  # JSON list of directories (--dir, --host-dir)
    fuel: int | None  # --fuel budget; None: fuel not counted
    fuel_used: int | None
    rerun_of: int | None  # the job this one reran (`sshwasm rerun`)
    verify: bool  # --verify: ran on two hosts, succeeded only if both agreed
    reuse_key: str | None  # content hash for --reuse; None: not reusable
    reused_from: int | None  # --reuse: the job whose result this one took
    engine: str  # "ssh" or "dask"

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        """The job in a `SELECT *` row: the one place a row's untyped values become a Job."""
        # A Row looks names up one by one (a scan of its columns each): 5x slower than this
        # for 70 columns, and a coordinator reads a row or two per array task.
        columns = dict(zip(row.keys(), row, strict=True))
        values = {name: columns[name] for name in _JOB_COLUMNS}
        values["state"] = JobState(row["state"])
        values["cancel_requested"] = bool(row["cancel_requested"])
        values["output_overwrite"] = bool(row["output_overwrite"])
        values["retry_failed"] = bool(row["retry_failed"])
        values["after_any"] = bool(row["after_any"])
        values["held"] = bool(row["held"])
        values["verify"] = bool(row["verify"])
        # Filled as __init__ fills it (every field, nothing more: a field per column) but
        # without its seventy frozen-attribute sets, checked one by one: 2.5x faster, and
        # `jobs --json` reads a Job per row (100,000 of them).
        job = object.__new__(cls)
        job.__dict__.update(values)
        return job

    @property
    def is_final(self) -> bool:
        """Whether the job reached a final state."""
        return self.state.is_final

    @property
    def argv_list(self) -> list[str]:
        """The guest's argv (argv[0] included)."""
        return [str(arg) for arg in json.loads(self.argv)]

    @property
    def env_pairs(self) -> list[tuple[str, str]]:
        """The guest's environment."""
        return [(str(k), str(v)) for k, v in json.loads(self.env)]

    @property
    def host_snapshot(self) -> Host | None:
        """The host's settings as they were when the job was placed."""
        raw = self.host_config
        return Host.from_dict(json.loads(raw)) if raw else None

    @property
    def dependencies(self) -> list[int]:
        """The jobs this one waits for (`--after`, `--after-any`)."""
        return [int(job_id) for job_id in json.loads(self.after_ids)]

    @property
    def history(self) -> list[dict[str, Any]]:
        """How each earlier attempt ended (oldest first)."""
        return list(json.loads(self.attempt_history))

    @property
    def is_verify_twin(self) -> bool:
        """Whether this row is the second run of a --verify job (see VERIFY_TWIN_SQL)."""
        return self.verify and self.rerun_of is not None

    @property
    def request(self) -> Request:
        """The placement request of this job."""
        labels = tuple(json.loads(self.labels)) if self.labels else ()
        return Request(self.cpus, self.memory_mb, self.pinned_host, labels)

    def record(self) -> dict[str, RecordValue]:
        """The public job record (the contract in README.md); the state as its word."""
        record: dict[str, RecordValue] = {field: getattr(self, field) for field in RECORD_FIELDS}
        record["state"] = self.state.value
        record["dirs"] = _describe_dirs(self.dirs)
        return record


_JOB_COLUMNS = tuple(field.name for field in dataclasses.fields(Job))


def _prepare_private(path: Path) -> None:
    """Make the jobs file and what sits beside it private to the user before SQLite opens it.

    The file holds --env values. SQLite creates its -wal and -shm files with the jobs
    file's own mode, so creating that one 0600 covers them; files an older version made
    0644 are tightened. The data dir and the output dir are sshwasm's own (0700); a
    directory the user chose for --db is left as it is.
    """
    if not path.parent.exists():
        paths.make_private_dir(path.parent)
    elif path.parent == paths.data_dir().absolute():
        paths.tighten(path.parent, paths.PRIVATE_DIR_MODE)
    outputs = paths.job_outputs_root(path)
    if outputs.is_dir():
        paths.tighten(outputs, paths.PRIVATE_DIR_MODE)
    try:
        flags = os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        os.close(os.open(path, flags, paths.PRIVATE_FILE_MODE))
    except FileExistsError:
        # Not opened then: closing any descriptor of the file drops every POSIX lock this
        # process holds on it, those of its other open JobStores too (the Python API's).
        pass
    for companion in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        paths.tighten(companion, paths.PRIVATE_FILE_MODE)


def _is_lock_wait(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite gave up waiting for a lock another connection holds (BUSY, LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (5, 6)
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _ignore_wait(_: str) -> None:
    return None


def _set_attempt_settings(db: sqlite3.Connection, spec: JobSpec, first: int, last: int) -> None:
    """Store --retries, --retry-failed and --after with just-submitted rows (same transaction)."""
    if not (spec.retries or spec.retry_failed or spec.after):
        return
    db.execute(
        """UPDATE jobs SET retries = ?, retry_failed = ?, after_ids = ?, after_any = ?,
               held = ? WHERE id BETWEEN ? AND ?""",
        (
            spec.retries,
            int(spec.retry_failed),
            json.dumps(list(spec.after)),
            int(spec.after_any),
            int(bool(spec.after)),
            first,
            last,
        ),
    )


@functools.lru_cache(maxsize=256)  # rows share a few: an array's tasks share one
def _describe_dirs(dirs: str) -> str | None:
    """The record's `dirs`: readable text (directories.describe_dirs), None for none."""
    from .directories import describe_dirs

    return describe_dirs(dirs)


def _set_fuel_settings(db: sqlite3.Connection, spec: JobSpec, first: int, last: int) -> None:
    """Store --fuel, --verify and `rerun`'s origin with just-submitted rows (same transaction)."""
    if spec.fuel is None and spec.rerun_of is None and not spec.verify:
        return
    db.execute(
        "UPDATE jobs SET fuel = ?, rerun_of = ?, verify = ? WHERE id BETWEEN ? AND ?",
        (spec.fuel, spec.rerun_of, int(spec.verify), first, last),
    )


def _with_attempt_host(attempts: int, attempt_hosts: str | None, host: str) -> str:
    """`attempt_hosts` with the current attempt's host set to `host` (one per attempt)."""
    hosts = attempt_hosts.split(",") if attempt_hosts else []
    hosts = hosts[: attempts - 1]
    hosts += [""] * (attempts - 1 - len(hosts))
    return ",".join([*hosts, host])


def _runs(ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """The runs of consecutive values in ascending `ids`, as (first, last) pairs."""
    if not ids:
        return
    first = previous = ids[0]
    for value in ids[1:]:
        if value != previous + 1:
            yield first, previous
            first = value
        previous = value
    yield first, previous


def _listing(
    columns: str,
    *,
    limit: int | None = None,
    state: JobState | None = None,
    twins: bool = False,
    plain_only: bool = False,
) -> tuple[str, list[Any]]:
    """The query listing jobs newest first, and its parameters: `columns` of the jobs in
    `state` (all without), at most `limit`; never the second runs of --verify jobs (an
    internal row) unless `twins`; with `plain_only`, no array task."""
    conditions: list[str] = []
    params: list[Any] = []
    if not twins:
        conditions.append(f"NOT ({VERIFY_TWIN_SQL})")
    if plain_only:
        conditions.append("array_id IS NULL")
    if state is not None:
        conditions.append("state = ?")
        params.append(JobState(state).value)
    sql = f"SELECT {columns} FROM jobs"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    sql += " ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return sql, params


class JobStore:
    """A jobs file opened for reading and writing.

    A lock held by another process is waited for without bound: each attempt waits
    `LOCK_ATTEMPT_S`, and `on_wait` hears about it now and then (another process may hold
    the lock for minutes; giving up would leave this one's jobs without a coordinator).
    """

    def __init__(self, path: Path, on_wait: Callable[[str], None] = _ignore_wait) -> None:
        self.path = path
        self._on_wait = on_wait
        # What place_waiting reads once: each array's --halt-after-failures (fixed at
        # submission), each host's record snapshot.
        self._halt_thresholds: dict[int, int | None] = {}
        self._host_snapshots: dict[str, tuple[Host, str]] = {}
        # The row the last finish() wrote, as it wrote it (see finished_job).
        self._last_finished: sqlite3.Row | None = None
        try:
            _prepare_private(path)
            self._db = sqlite3.connect(path, timeout=LOCK_ATTEMPT_S, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(LOCK_ATTEMPT_S * 1000)}")
            self._read("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
            self._column_names = {row[1] for row in self._read("PRAGMA table_info(jobs)")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"jobs file {path} cannot be used: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"jobs file {path} cannot be opened: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retrying(self, attempt: Callable[[], _T]) -> _T:
        """Run `attempt` until no other process's lock stands in its way."""
        waited_since: float | None = None
        next_warning = 0.0
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if not _is_lock_wait(exc):
                    raise
            now = time.monotonic()
            if waited_since is None:
                waited_since = now - LOCK_ATTEMPT_S
            waited = now - waited_since
            if waited >= next_warning:
                self._on_wait(
                    f"jobs file {self.path} is locked by another process; "
                    f"still waiting ({waited:.0f}s so far)"
                )
                next_warning = waited + LOCK_WARN_EVERY_S

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """All rows of a query (waiting out a lock like a write)."""
        return self._retrying(lambda: self._db.execute(sql, params).fetchall())

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a read-then-write sequence inside
        # cannot be interleaved with another process's.
        self._last_finished = None  # any write may change the row finish() kept
        self._retrying(lambda: self._db.execute("BEGIN IMMEDIATE"))
        try:
            yield self._db
            # A busy COMMIT leaves the transaction open: trying again is safe.
            self._retrying(lambda: self._db.execute("COMMIT"))
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _migrate(self) -> None:
        version = int(self._read("PRAGMA user_version")[0][0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"jobs file {self.path} comes from a newer sshwasm "
                f"(schema {version}, this one knows up to {SCHEMA_VERSION}); upgrade sshwasm"
            )
        if version == SCHEMA_VERSION:
            return
        with self._transaction() as db:
            # Read again under the lock: another process may have migrated meanwhile.
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")

    # -- writing -------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> int:
        """Insert a new queued job; returns its id. Written before any network I/O."""
        return self.submit_tasks(spec)[0]

    def submit_tasks(self, spec: JobSpec) -> list[int]:
        """Insert a job, or every task of an array, in one transaction; returns the ids.

        Task i of an array gets `SSHWASM_ARRAY_TASK_ID=i` and `SSHWASM_ARRAY_TASK_COUNT=N`
        added to its environment; the array's id is the id of its task 0.
        With `task_args` task i's arguments are argv plus its entry; with `task_inputs` its
        /input is its entry.
        """
        import secrets  # not at the module's top: `jobs` and `status` never submit

        now = time.time()
        submitted_at = utc_now()
        tasks: Sequence[int | None] = range(spec.array_size) if spec.array_size else [None]
        argv = json.dumps(list(spec.argv))
        labels = json.dumps(list(spec.labels))
        pid = os.getpid()
        # Built once and pieced together per task: 100,000 json.dumps and token_hex calls
        # would cost more than the inserts themselves.
        env_items = [json.dumps(list(pair)) for pair in spec.env]
        count_item = json.dumps(["SSHWASM_ARRAY_TASK_COUNT", str(spec.array_size)])
        random_hex = secrets.token_hex(4 * len(tasks))

        def env_json(task: int | None) -> str:
            if task is None:
                return "[" + ", ".join(env_items) + "]"
            task_item = json.dumps(["SSHWASM_ARRAY_TASK_ID", str(task)])
            return "[" + ", ".join([*env_items, task_item, count_item]) + "]"

        def task_argv(task: int | None) -> str:
            if task is None or spec.task_args is None:
                return argv
            return json.dumps([*spec.argv, *spec.task_args[task]])

        def task_input(task: int | None) -> str | None:
            if task is None or spec.task_inputs is None:
                return spec.input_path
            return spec.task_inputs[task]

        def row(index: int, job_id: int, task: int | None, array_id: int | None) -> tuple[Any, ...]:
            return (
                job_id,
                spec.name,
                JobState.QUEUED.value,
                spec.cpus,
                spec.memory_mb,
                spec.time_limit_s,
                spec.source,
                spec.language,
                spec.wasm_sha256,
                spec.wasm_bytes,
                spec.compile_s,
                submitted_at,
                now,
                spec.wasm_path,
                task_argv(task),
                env_json(task),
                spec.stdin_path,
                spec.pinned_host,
                now,
                pid,
                task,
                labels,
                task_input(task),
                # Each task of an array gets its own subdirectory of the output.
                spec.output_dir
                if spec.output_dir is None or task is None
                else os.path.join(spec.output_dir, str(task)),
                spec.max_output_mb,
                int(spec.output_overwrite),
                # Names the job's directory on hosts. The random part keeps two jobs files
                # that share a host workdir (two users, two --db) from colliding on an id.
                f"{job_id}-{random_hex[8 * index : 8 * index + 8]}",
                array_id,
                spec.max_running,
                spec.halt_after_failures,
            )

        with self._transaction() as db:
            # The ids are taken here, under the write lock, so no other process can take
            # one in between: the rows go in with one executemany (100,000 in about a
            # second), not a statement and a round trip each.
            last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
            top = db.execute("SELECT MAX(id) FROM jobs").fetchone()[0]
            first = max(last[0] if last else 0, top or 0) + 1
            ids = [first + index for index in range(len(tasks))]
            array_id = first if spec.array_size else None
            db.executemany(
                """INSERT INTO jobs (id, name, state, cpus, memory_mb, time_limit_s, source,
                       language, wasm_sha256, wasm_bytes, compile_s, submitted_at,
                       submitted_ts, wasm_path, argv, env, stdin_path, pinned_host,
                       heartbeat_ts, coordinator_pid, array_task, labels, input_path,
                       output_dir, max_output_mb, output_overwrite, remote_key, array_id,
                       max_running, halt_after_failures)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
                           ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (row(index, first + index, task, array_id) for index, task in enumerate(tasks)),
            )
            _set_attempt_settings(db, spec, ids[0], ids[-1])
            if spec.dirs != "[]":
                db.execute(
                    "UPDATE jobs SET dirs = ? WHERE id BETWEEN ? AND ?",
                    (spec.dirs, ids[0], ids[-1]),
                )
            _set_fuel_settings(db, spec, ids[0], ids[-1])
        return ids

    def place_waiting(
        self,
        job_ids: Sequence[int],
        hosts: Sequence[Host],
        excluded: Mapping[int, Sequence[str]] | None = None,
    ) -> tuple[dict[int, Host], set[int]]:
        """Reserve capacity for those of `job_ids` whose turn has come and that fit now.

        Reads what running jobs hold and which older jobs still wait, plans, and marks the
        placed jobs running on their hosts, all in one transaction; also a heartbeat for all
        of `job_ids`. Returns the placed jobs' hosts, and the ids no longer queued at all
        (cancelled or finished by another process).
        """
        if not job_ids:
            return {}, set()
        now = time.time()
        marks = ", ".join("?" for _ in job_ids)
        by_name = {host.name: host for host in hosts}
        with self._transaction() as db:
            rows = db.execute(
                f"""SELECT id, state, submitted_ts, array_id, attempts, attempt_hosts
                    FROM jobs WHERE id IN ({marks})""",
                tuple(job_ids),
            ).fetchall()
            submitted = {row["id"]: row["submitted_ts"] for row in rows}
            by_id = {row["id"]: row for row in rows}
            gone = {row["id"] for row in rows if row["state"] != JobState.QUEUED}
            gone |= set(job_ids) - set(submitted)
            # Only where it went stale: the coordinator's heartbeat keeps the rest fresh,
            # and a write per job per pass made an array's placing cost grow with it.
            db.execute(
                f"""UPDATE jobs SET heartbeat_ts = ?, coordinator_pid = ? WHERE id IN ({marks})
                    AND (heartbeat_ts IS NULL OR heartbeat_ts < ? OR coordinator_pid IS NOT ?)""",
                (now, os.getpid(), *job_ids, now - PLACE_HEARTBEAT_S, os.getpid()),
            )
            arrays = {row["array_id"] for row in rows if row["array_id"] is not None}
            gone |= self._halt_arrays(db, arrays) & set(job_ids)
            usage = self._usage(db)
            # Jobs placed in submission order: none younger than ours changes where ours go,
            # so they are not read (an array's 100,000 queued tasks would be, every pass).
            waiting = db.execute(
                """SELECT id, cpus, memory_mb, pinned_host, labels, array_id, max_running
                   FROM jobs WHERE state = ? AND heartbeat_ts >= ? AND held = 0 AND id <= ?
                   ORDER BY id""",
                (JobState.QUEUED.value, now - QUEUE_STALE_S, max(job_ids)),
            )
            try:
                # Read as planned, row by row: plan stops once every host is full, so a
                # pass reads the few rows it places and one more, not the window's queued
                # rows each time (they were most of a pass's cost).
                queue = ((row["id"], request_of(row)) for row in self._throttled(db, waiting))
                placement = plan(hosts, usage, queue, excluded)
            finally:
                waiting.close()
            placed: dict[int, Host] = {}
            started_at = utc_now()
            # A host's snapshot once per pass, not once per job placed on it.
            snapshots: dict[str, str] = {}
            updates = []
            for job_id in job_ids:
                name = placement.get(job_id)
                if name is None or job_id in gone:
                    continue
                host = by_name[name]
                if name not in snapshots:
                    snapshots[name] = self._host_snapshot(host)
                row = by_id[job_id]
                updates.append(
                    (
                        JobState.RUNNING.value,
                        host.name,
                        snapshots[name],
                        started_at,
                        now,
                        round(now - submitted[job_id], 6),
                        # The attempt's host, one per attempt: a launch that never started
                        # (its host was out of reach) is replaced by the next placing.
                        _with_attempt_host(row["attempts"], row["attempt_hosts"], host.name),
                        job_id,
                    )
                )
                placed[job_id] = host
            db.executemany(
                """UPDATE jobs SET state = ?, host = ?, host_config = ?, started_at = ?,
                       placed_ts = ?, queue_s = ?, attempt_hosts = ? WHERE id = ?""",
                updates,
            )
            return placed, gone

    def _host_snapshot(self, host: Host) -> str:
        """The host's settings as the record keeps them (host_config), made once per host."""
        known = self._host_snapshots.get(host.name)
        if known is None or known[0] != host:
            known = self._host_snapshots[host.name] = (host, json.dumps(host.to_dict()))
        return known[1]

    @staticmethod
    def _throttled(db: sqlite3.Connection, waiting: Iterable[Any]) -> Iterator[Any]:
        """The waiting rows that may be placed now, as they are read: an array with
        --max-running K keeps its oldest waiting tasks up to K minus its running ones, and
        the rest wait unplanned (so they hold no place that would keep other jobs from
        backfilling). The running counts are read at the first such row, once."""
        running: dict[int, int] | None = None
        for row in waiting:
            if row["max_running"] is not None:
                if running is None:
                    running = dict(
                        db.execute(
                            """SELECT array_id, COUNT(*) FROM jobs
                               WHERE state = ? AND max_running IS NOT NULL GROUP BY array_id""",
                            (JobState.RUNNING.value,),
                        ).fetchall()
                    )
                started = running.get(row["array_id"], 0)
                if started >= row["max_running"]:
                    continue
                running[row["array_id"]] = started + 1
            yield row

    def _halt_arrays(self, db: sqlite3.Connection, array_ids: Iterable[int]) -> set[int]:
        """Cancel the queued tasks of those arrays that reached their --halt-after-failures;
        returns their ids. Inside the placing transaction, so no task of a halted array
        starts after the failure that halted it is recorded. Only the arrays named are
        looked at: one query per array over the (array_id, state) index, where a query
        over every queued row would cost a pass over 100,000 of them; an array's setting
        is read once (it is fixed at submission), and one without it costs nothing more."""
        arrays = []
        for array_id in sorted(array_ids):
            if array_id not in self._halt_thresholds:
                row = db.execute(
                    "SELECT halt_after_failures FROM jobs WHERE array_id = ? LIMIT 1",
                    (array_id,),
                ).fetchone()
                self._halt_thresholds[array_id] = None if row is None else row[0]
            threshold = self._halt_thresholds[array_id]
            if threshold is not None:
                arrays.append((array_id, threshold))
        halted: set[int] = set()
        marks = ", ".join("?" for _ in _FAILURE_WORDS)
        for array_id, threshold in arrays:
            failures = db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE array_id = ? AND state IN ({marks})",
                (array_id, *_FAILURE_WORDS),
            ).fetchone()[0]
            if failures < threshold:
                continue
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM jobs WHERE array_id = ? AND state = ?",
                    (array_id, JobState.QUEUED.value),
                )
            ]
            db.executemany(
                """UPDATE jobs SET state = ?, exit_code = ?, error = ?, finished_at = ?
                   WHERE id = ? AND state = ?""",
                (
                    (
                        JobState.CANCELLED.value,
                        CANCELLED_EXIT_CODE,
                        HALT_ERROR.format(threshold),
                        utc_now(),
                        job_id,
                        JobState.QUEUED.value,
                    )
                    for job_id in ids
                ),
            )
            halted.update(ids)
        return halted

    def halt_arrays(self, array_ids: Iterable[int]) -> set[int]:
        """Cancel the queued tasks of these arrays if they reached --halt-after-failures
        (their ids)."""
        with self._transaction() as db:
            return self._halt_arrays(db, array_ids)

    def array_counts(self, array_id: int) -> dict[JobState, int]:
        """How many tasks of the array are in each state."""
        rows = self._read(
            "SELECT state, COUNT(*) FROM jobs WHERE array_id = ? GROUP BY state", (array_id,)
        )
        return {JobState(state): count for state, count in rows}

    def release(self, job_id: int) -> None:
        """Give back a reservation whose host failed before the job started; queue it again."""
        with self._transaction() as db:
            db.execute(
                """UPDATE jobs SET state = ?, host = NULL, host_config = NULL,
                       started_at = NULL, placed_ts = NULL, queue_s = NULL, heartbeat_ts = ?
                   WHERE id = ? AND state = ?""",
                (JobState.QUEUED.value, time.time(), job_id, JobState.RUNNING.value),
            )

    def claim(self, job: Job) -> bool:
        """Become the coordinator of a job whose coordinator is gone; False if another was first.

        Compare-and-set on the coordinator fields as `job` saw them, so two `status` calls
        cannot both take over and write the same output twice.
        """
        with self._transaction() as db:
            cursor = db.execute(
                """UPDATE jobs SET coordinator_pid = ?, heartbeat_ts = ?
                   WHERE id = ? AND coordinator_pid IS ? AND heartbeat_ts IS ?""",
                (os.getpid(), time.time(), job.id, job.coordinator_pid, job.heartbeat_ts),
            )
            return cursor.rowcount == 1

    def lose_unplaced(self, jobs: Sequence[Job], error: str) -> None:
        """`claim` and `finish` as LOST, in one transaction, these queued jobs whose
        coordinator is gone (each only if still queued and unclaimed, as `job` saw it):
        after an interrupted 100,000-task array, `jobs` would otherwise spend minutes on a
        transaction pair per task."""
        now, stamp, pid = time.time(), utc_now(), os.getpid()
        with self._transaction() as db:
            db.executemany(
                """UPDATE jobs SET state = ?, error = ?, finished_at = ?,
                          coordinator_pid = ?, heartbeat_ts = ?
                   WHERE id = ? AND state = ? AND coordinator_pid IS ? AND heartbeat_ts IS ?""",
                [
                    (JobState.LOST.value, error, stamp, pid, now, job.id,
                     JobState.QUEUED.value, job.coordinator_pid, job.heartbeat_ts)
                    for job in jobs
                ],
            )  # fmt: skip

    def disown(self, job_id: int) -> None:
        """Stop being the job's coordinator (this process no longer follows it), so that
        `status` may take it over while this process lives on."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET coordinator_pid = NULL WHERE id = ? AND coordinator_pid = ?",
                (job_id, os.getpid()),
            )

    def cancel_unstarted(self, job_id: int, placed: bool = False) -> bool:
        """Cancel a job that never started (exit 143, as for SIGTERM); True if this call did.

        Only a `queued` job: one that started meanwhile is stopped on its host instead and
        must not be recorded cancelled while its guest runs. `placed`: the caller placed the
        job (recorded `running`) and knows nothing was launched."""
        return self._finish(
            job_id,
            JobState.CANCELLED,
            JobState.RUNNING if placed else JobState.QUEUED,
            {"exit_code": CANCELLED_EXIT_CODE, "error": "cancelled before it started"},
        )

    def request_cancel(self, job_id: int) -> None:
        """Ask the job's live coordinator to cancel it."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    def without_dependencies(self, job_ids: Sequence[int]) -> set[int]:
        """Which of these jobs wait for no other (no `--after`): one query for them all."""
        if not job_ids:
            return set()
        marks = ", ".join("?" for _ in job_ids)
        rows = self._read(
            f"SELECT id FROM jobs WHERE after_ids = '[]' AND id IN ({marks})", tuple(job_ids)
        )
        return {row[0] for row in rows}

    def cancel_requested(self, job_ids: Sequence[int]) -> list[int]:
        """Which of these unfinished jobs someone asked to cancel."""
        marks = ", ".join("?" for _ in job_ids)
        rows = self._read(
            f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({marks})", tuple(job_ids)
        )
        return [row[0] for row in rows]

    def heartbeat_many(self, job_ids: Sequence[int]) -> None:
        """Say that this process is alive and coordinating all these jobs."""
        marks = ", ".join("?" for _ in job_ids)
        with self._transaction() as db:
            db.execute(
                f"UPDATE jobs SET heartbeat_ts = ?, coordinator_pid = ? WHERE id IN ({marks})",
                (time.time(), os.getpid(), *job_ids),
            )

    def heartbeat_queued(self, job_ids: Sequence[int]) -> None:
        """Say that this process is alive and coordinating these queued jobs (ascending
        ids): one UPDATE per run of consecutive ids, so 100,000 tasks cost a statement."""
        now, pid = time.time(), os.getpid()
        with self._transaction() as db:
            db.executemany(
                """UPDATE jobs SET heartbeat_ts = ?, coordinator_pid = ?
                   WHERE id BETWEEN ? AND ? AND state = ?""",
                ((now, pid, first, last, JobState.QUEUED.value) for first, last in _runs(job_ids)),
            )

    def heartbeat_as(self, job_ids: Sequence[int], pid: int) -> None:
        """Record `pid` as the live coordinator of these jobs (one transaction)."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "UPDATE jobs SET heartbeat_ts = ?, coordinator_pid = ? WHERE id = ?",
                ((now, pid, job_id) for job_id in job_ids),
            )

    def update(self, job_id: int, **fields: Any) -> None:
        """Set columns of a job (names are checked against the schema)."""
        if not fields:
            return
        assignments = self._assignments(fields)
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def update_many(self, job_ids: Sequence[int], **fields: Any) -> None:
        """Set the same columns of many jobs in one transaction."""
        if not fields:
            return
        assignments = self._assignments(fields)
        values = tuple(fields.values())
        with self._transaction() as db:
            db.executemany(
                f"UPDATE jobs SET {assignments} WHERE id = ?",
                ((*values, job_id) for job_id in job_ids),
            )

    def finish(self, job_id: int, state: JobState, **fields: Any) -> bool:
        """Move a job to a final state unless it already has one; True if this call did."""
        return self._finish(job_id, state, None, fields)

    def _finish(
        self, job_id: int, state: JobState, only_if: JobState | None, fields: dict[str, Any]
    ) -> bool:
        """finish(); with `only_if`, only a job in that state is moved."""
        if not JobState(state).is_final:
            raise ValueError(f"not a final state: {state}")
        fields.setdefault("finished_at", utc_now())
        assignments = self._assignments(fields)
        if only_if is None:
            condition = f"state NOT IN ({', '.join('?' for _ in FINAL_STATES)})"
            condition_values: tuple[str, ...] = tuple(_FINAL_WORDS)
        else:
            condition, condition_values = "state = ?", (JobState(only_if).value,)
        # RETURNING (SQLite 3.35) hands back the row written; older ones are read again.
        returning = " RETURNING *" if _HAS_RETURNING else ""
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE jobs SET state = ?, {assignments} WHERE id = ? AND {condition}{returning}",
                (JobState(state).value, *fields.values(), job_id, *condition_values),
            )
            if not returning:
                return cursor.rowcount == 1
            rows = cursor.fetchall()
        self._last_finished = rows[0] if rows else None
        return bool(rows)

    def finished_job(self, job_id: int) -> Job | None:
        """The job as the last finish() of this store wrote it, if that was job `job_id`'s
        and nothing of this store wrote to the jobs file since; None otherwise (read it).
        Saves an array task's coordinator reading back the row it just wrote."""
        row = self._last_finished
        return Job.from_row(row) if row is not None and row["id"] == job_id else None

    def requeue(self, job: Job, ended: Mapping[str, Any]) -> bool:
        """Put a job back in the queue for another attempt, under a new remote key.

        `ended` says how the attempt that `job` shows ended; it joins the attempt history,
        and the row loses everything of that attempt (host, times, result, output counts).
        Compare-and-set on `attempts`, so one attempt is never put back twice. True if done.
        """
        history = [*job.history, {"attempt": job.attempts, "host": job.host, **ended}]
        base = job.remote_key.split(".", 1)[0]
        with self._transaction() as db:
            cursor = db.execute(
                """UPDATE jobs SET state = ?, host = NULL, host_config = NULL, exit_code = NULL,
                       started_at = NULL, finished_at = NULL, placed_ts = NULL, queue_s = NULL,
                       run_s = NULL, cpu_s = NULL, peak_memory_bytes = NULL, error = NULL,
                       upload_bytes = NULL, upload_s = NULL, output_bytes = NULL,
                       stage_out_s = NULL, output_conflicts = NULL, stdout = NULL,
                       stderr = NULL, stdout_bytes = 0, stderr_bytes = 0,
                       unreachable_since = NULL, cancel_requested = 0, heartbeat_ts = ?,
                       coordinator_pid = ?, remote_key = ?, attempts = attempts + 1,
                       attempt_history = ?
                   WHERE id = ? AND attempts = ?""",
                (
                    JobState.QUEUED.value,
                    time.time(),
                    os.getpid(),
                    # A new job directory on hosts: the old one may still be there.
                    f"{base}.a{job.attempts + 1}",
                    json.dumps(history),
                    job.id,
                    job.attempts,
                ),
            )
            return cursor.rowcount == 1

    def note_late_result(self, job_id: int, attempt: int, late: Mapping[str, Any]) -> None:
        """Add what an earlier attempt's host said after the job was placed again: kept in
        the attempt history only, never as the job's result."""
        with self._transaction() as db:
            row = db.execute("SELECT attempt_history FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            history = json.loads(row["attempt_history"])
            for entry in history:
                if entry.get("attempt") == attempt:
                    entry["late"] = dict(late)
            db.execute(
                "UPDATE jobs SET attempt_history = ? WHERE id = ?", (json.dumps(history), job_id)
            )

    # -- reading -------------------------------------------------------------------------

    def array_tasks(self, array_id: int) -> list[Job]:
        """Every task of an array, by task index."""
        rows = self._read("SELECT * FROM jobs WHERE array_id = ? ORDER BY array_task", (array_id,))
        return [Job.from_row(row) for row in rows]

    def succeeded_with_reuse_key(self, key: str) -> list[Job]:
        """Succeeded jobs with this --reuse key, those that really ran first, newest first."""
        rows = self._read(
            f"""SELECT * FROM jobs WHERE reuse_key = ? AND state = ?
                AND NOT ({VERIFY_TWIN_SQL})
                ORDER BY reused_from IS NOT NULL, id DESC""",
            (key, JobState.SUCCEEDED.value),
        )
        return [Job.from_row(row) for row in rows]

    def verify_twin(self, job_id: int) -> Job | None:
        """The second run of --verify job `job_id` (None for any other job)."""
        rows = self._read(
            f"SELECT * FROM jobs WHERE rerun_of = ? AND {VERIFY_TWIN_SQL} ORDER BY id LIMIT 1",
            (job_id,),
        )
        return Job.from_row(rows[0]) if rows else None

    def get(self, job_id: int) -> Job:
        """One job; raises JobNotFound."""
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return Job.from_row(rows[0])

    def get_many(self, job_ids: Sequence[int]) -> list[Job]:
        """The jobs with these ids that exist, in id order (one query per 500 ids)."""
        jobs: list[Job] = []
        ids = sorted(set(job_ids))
        for start in range(0, len(ids), 500):
            chunk = tuple(ids[start : start + 500])
            marks = ", ".join("?" for _ in chunk)
            sql = f"SELECT * FROM jobs WHERE id IN ({marks}) ORDER BY id"
            jobs.extend(Job.from_row(row) for row in self._read(sql, chunk))
        return jobs

    def queued_requests(self, job_ids: Sequence[int]) -> list[QueuedRequest]:
        """The placement requests of the jobs with these ids that exist, in id order: six
        columns a row, where get_many reads all seventy (the placer reads each task of an
        array once, when it first does not fit)."""
        found: list[QueuedRequest] = []
        ids = sorted(set(job_ids))
        for start in range(0, len(ids), 500):
            chunk = tuple(ids[start : start + 500])
            marks = ", ".join("?" for _ in chunk)
            sql = f"""SELECT id, cpus, memory_mb, pinned_host, labels, array_id, max_running
                      FROM jobs WHERE id IN ({marks}) ORDER BY id"""
            found.extend(
                QueuedRequest(row["id"], request_of(row), row["array_id"], row["max_running"])
                for row in self._read(sql, chunk)
            )
        return found

    def list_jobs(
        self, limit: int | None = None, state: JobState | None = None, twins: bool = False
    ) -> list[Job]:
        """Jobs, newest first; without `twins`, not the second runs of --verify jobs."""
        sql, params = _listing("*", limit=limit, state=state, twins=twins)
        return [Job.from_row(row) for row in self._read(sql, params)]

    def records(
        self, limit: int | None = None, state: JobState | None = None
    ) -> list[dict[str, RecordValue]]:
        """`job.record()` of each job `list_jobs` lists, newest first, read as the record's
        columns alone (not a Job per row: the row's seventy columns, a Job and a record
        each, were most of `jobs --json` over 100,000 jobs)."""
        sql, params = _listing(", ".join(RECORD_FIELDS), limit=limit, state=state)
        rows = self._tuples(sql, params)
        # As from_row and record() make them: a state word that is no JobState fails here
        # as it does there; `verify` a bool; `dirs` described (once per distinct value).
        state_at, verify_at, dirs_at = (RECORD_FIELDS.index(n) for n in ("state", "verify", "dirs"))
        for word in {row[state_at] for row in rows}:
            JobState(word)
        described = {dirs: _describe_dirs(dirs) for dirs in {row[dirs_at] for row in rows}}
        records = [dict(zip(RECORD_FIELDS, row, strict=True)) for row in rows]
        for record, row in zip(records, rows, strict=True):
            record["verify"] = bool(row[verify_at])
            record["dirs"] = described[row[dirs_at]]
        return records

    def listed_ids(self, limit: int | None = None, state: JobState | None = None) -> list[int]:
        """The ids of the jobs `table_rows` lists, newest first."""
        return [row[0] for row in self._tuples(*_listing("id", limit=limit, state=state))]

    def unfinished(self, state: JobState | None = None) -> list[tuple[int, int | None]]:
        """(id, coordinator_pid) of every queued or running job (only those in `state` if
        given), by the state index: not a pass over the finished ones."""
        words = [JobState.QUEUED.value, JobState.RUNNING.value]
        if state is not None:
            words = [word for word in words if word == JobState(state).value]
        if not words:
            return []
        marks = ", ".join("?" for _ in words)
        return self._tuples(
            f"SELECT id, coordinator_pid FROM jobs WHERE state IN ({marks}) ORDER BY id", words
        )

    def unfinished_twins(self) -> list[Job]:
        """The --verify twins not ended (listings hide them), by the state index."""
        words = (JobState.QUEUED.value, JobState.RUNNING.value)
        sql = f"SELECT * FROM jobs WHERE state IN (?, ?) AND {VERIFY_TWIN_SQL} ORDER BY id"
        return [Job.from_row(row) for row in self._read(sql, words)]

    def table_rows(self, limit: int | None = None, state: JobState | None = None) -> list[Any]:
        """What the `jobs` table shows of each job (TABLE_COLUMNS), newest first: plain
        tuples, not Jobs (100,000 rows in a fraction of a second). Not --verify twins."""
        return self._tuples(*_listing(TABLE_SELECT, limit=limit, state=state))

    def count_listed(self, state: JobState | None = None) -> int:
        """How many jobs `table_rows` would list (all, or those in `state`): what a table
        cut to the newest few says it left out."""
        sql, params = _listing("COUNT(*)", state=state)
        return int(self._tuples(sql, params)[0][0])

    def keyed_table_rows(
        self, limit: int | None = None, state: JobState | None = None
    ) -> list[Any] | None:
        """`table_rows` as (id, array_task, run_s, key): `key` is the rest of the row
        (TABLE_KEY) as one JSON array, or None if a value cannot be in JSON (a BLOB: then
        `table_rows`).

        Python's sqlite3 gives the GIL up and takes it back for every column of every row
        it reads: four columns instead of eleven make a long listing a quarter faster,
        and the rows of an array share a few keys, each decoded once.
        """
        sql, params = _listing(f"id, array_task, run_s, {TABLE_KEY}", limit=limit, state=state)
        try:
            return self._tuples(sql, params)
        except sqlite3.OperationalError as exc:
            if "JSON cannot hold BLOB" in str(exc):
                return None
            raise

    def plain_table_rows(self, state: JobState | None = None) -> list[Any]:
        """`table_rows` of the jobs that are no array task (what `jobs --fold` lists as
        they are), newest first."""
        return self._tuples(*_listing(TABLE_SELECT, state=state, plain_only=True))

    def _tuples(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """A query's rows as plain tuples (several times faster to read than Rows)."""

        def read() -> list[Any]:
            cursor = self._db.cursor()
            cursor.row_factory = None
            return cursor.execute(sql, params).fetchall()

        return self._retrying(read)

    def array_summaries(self, state: JobState | None = None) -> list[Any]:
        """One aggregate row per array (ARRAY_SUMMARY_COLUMNS), over its tasks in `state`
        (all without): what `jobs --fold` shows, without reading a Job per task."""
        where = "array_id IS NOT NULL" + ("" if state is None else " AND state = ?")
        params: tuple[Any, ...] = () if state is None else (JobState(state).value,)
        sql = f"""SELECT array_id, MAX(id), COUNT(*), COUNT(DISTINCT host), MIN(host),
                      MAX(exit_code), SUM(run_s) FROM jobs WHERE {where} GROUP BY array_id"""
        return self._read(sql, params)

    def array_state_counts(self, state: JobState | None = None) -> list[Any]:
        """(array_id, state, count) for every array, by the (array_id, state) index."""
        where = "array_id IS NOT NULL" + ("" if state is None else " AND state = ?")
        params: tuple[Any, ...] = () if state is None else (JobState(state).value,)
        return self._read(
            f"SELECT array_id, state, COUNT(*) FROM jobs WHERE {where} GROUP BY array_id, state",
            params,
        )

    def usage(self) -> dict[str, Usage]:
        """Capacity held per host by jobs placed there and not finished."""
        return self._retrying(lambda: self._usage(self._db))

    def running_counts(self) -> dict[str, int]:
        """Number of unfinished placed jobs per host."""
        rows = self._read(
            "SELECT host, COUNT(*) FROM jobs WHERE state = ? GROUP BY host",
            (JobState.RUNNING.value,),
        )
        return {host: count for host, count in rows}

    @staticmethod
    def _usage(db: sqlite3.Connection) -> dict[str, Usage]:
        rows = db.execute(
            """SELECT host, SUM(cpus), SUM(memory_mb) FROM jobs
               WHERE state = ? AND host IS NOT NULL GROUP BY host""",
            (JobState.RUNNING.value,),
        )
        return {host: Usage(int(cpus), int(memory)) for host, cpus, memory in rows}

    # -- engine: dask: a wake-up's worth of records in one transaction -------------------

    def finish_many(self, ends: Sequence[tuple[int, JobState, Mapping[str, Any]]]) -> set[int]:
        """`finish` of many jobs, each with its own state and columns, in one transaction
        (a transaction costs far more than a statement); the ids this call finished."""
        placeholders = ", ".join("?" for _ in FINAL_STATES)
        statements = []
        for job_id, state, fields in ends:
            if not JobState(state).is_final:
                raise ValueError(f"not a final state: {state}")
            fields = {"finished_at": utc_now(), **fields}
            sql = (
                f"UPDATE jobs SET state = ?, {self._assignments(fields)} WHERE id = ? "
                f"AND state NOT IN ({placeholders})"
            )
            statements.append((job_id, sql, (JobState(state).value, *fields.values(), job_id)))
        finished: set[int] = set()
        if not statements:
            return finished
        with self._transaction() as db:
            for job_id, sql, params in statements:
                if db.execute(sql, (*params, *_FINAL_WORDS)).rowcount == 1:
                    finished.add(job_id)
        return finished

    def mark_running_many(self, starts: Sequence[tuple[int, Mapping[str, Any]]]) -> None:
        """Show many jobs `running` with these columns (where and under which key they
        started), in one transaction; a job that has ended meanwhile keeps its record."""
        placeholders = ", ".join("?" for _ in FINAL_STATES)
        with self._transaction() as db:
            for job_id, fields in starts:
                db.execute(
                    f"UPDATE jobs SET state = ?, {self._assignments(fields)} WHERE id = ? "
                    f"AND state NOT IN ({placeholders})",
                    (JobState.RUNNING.value, *fields.values(), job_id, *_FINAL_WORDS),
                )

    def _assignments(self, fields: Mapping[str, Any]) -> str:
        """`a = ?, b = ?` for an UPDATE; names are checked, since they become SQL text."""
        unknown = set(fields) - self._column_names
        if unknown:
            raise ValueError(f"unknown job columns: {sorted(unknown)}")
        return ", ".join(f"{name} = ?" for name in fields)

    def keep_stdin(self, job_ids: Sequence[int], data: bytes) -> Path:
        """Keep `data` as these jobs' stdin: a private copy beside the first job's output, so
        each job reads what was there at submission even if it starts later."""
        copy = paths.make_job_output_dir(self.path, job_ids[0]) / "stdin"
        with paths.open_private(copy, "wb") as handle:
            handle.write(data)
        self.update_many(job_ids, stdin_path=str(copy))
        return copy
