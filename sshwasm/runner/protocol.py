"""The wire protocol between the coordinator and sshwasm-exec (the runner): what both ends import.

Stdlib only, and Python 3.9 like the rest of the runner package: the coordinator imports this
module as `sshwasm.runner.protocol`, the host as part of the installed package. It holds the
frame kinds, the framing, the launch spec (encode_launch_spec, validate_spec) and what every
answer may hold (parse_result, parse_frame_json, parse_cancel_answer, parse_info). No frame
kind is written as a literal anywhere else.

Commands (argv never carries user-controlled words; those come as JSON on stdin):

    launch WORKDIR JOB_ID            stdin: a spec JSON line, then the job's stdin and input
    serve WORKDIR                    stdin: request frames; runs many jobs as forks of itself
    attach WORKDIR JOB_ID OUT ERR    stream output from byte offsets until the result
    poll WORKDIR JOB_ID OUT ERR      send the output there is now, then the result or liveness
                                     (attach and poll are one stream, with and without follow)
    fetch-output WORKDIR JOB_ID [MAX_BYTES]
                                     stdout: the job's /output directory as a tar stream;
                                     with MAX_BYTES, stops before a file that would take the
                                     files' total past it, and exits 3
    fetch-dir WORKDIR JOB_ID INDEX [MAX_BYTES]
                                     stdout: what the job changed in its staged read-write
                                     directory INDEX, as a tar stream: files/PATH for each
                                     file it made or changed, then DIR_CHANGES_MEMBER (JSON:
                                     see DIR_CHANGES_KEYS); with MAX_BYTES, the files whole
                                     in path order while they fit, the rest named in
                                     DIR_LEFT_OUT_KEY
    put-module WORKDIR SHA256        stdin: module bytes, kept as WORKDIR/wasm/SHA256.wasm
    cancel WORKDIR JOB_ID            kill a running job and record it as cancelled
    info                             one JSON line describing this host
    execute JOB_DIR                  internal: the detached process that runs the module
    install                          the SSH bootstrap's own (transport.RUNNER_BOOTSTRAP):
                                     stdin: the package as encode_install writes it

launch, serve, attach and poll answer in frames (1 byte kind, 4 bytes big-endian length,
payload); fetch-output answers with a raw tar stream; put-module, cancel and info in plain
text. Usage errors exit 2. Only execute and serve import wasmtime (see the package's
__init__ for how the runner is installed and run on a host).

Every command with a WORKDIR first checks it (workdir_problem): the workdir and its bin,
wasm, cache and jobs directories must be no symbolic links, owned by this user and not
group- or world-writable. If not, nothing is done: frame commands answer one X frame of
kind "workdir" (serve's with an empty key), the others a line on stderr, and the exit
status is UNSAFE_WORKDIR_EXIT. Over SSH the coordinator runs the runner through a bootstrap
(transport.RUNNER_BOOTSTRAP) that checks bin/ and the installed package the same way before
importing it, and refuses with a stderr line and the same exit status.

Launch spec (launch's first stdin line, one JSON object): runner_version, wasm_sha256,
argv, env ([name, value] pairs), memory_mb (caps the guest's one memory, its one table
takes at most an eighth more: see guest_limits), time_limit_s (number or null: enforced by
the runner's watchdog, at no cost to the running guest), and optionally wall_limit_s (a
cap enforced the same way, used when time_limit_s is null), and
optionally the fields below. Both limits are at most MAX_TIME_LIMIT_S and count from when
the runner got the launch, so loading and compiling the module count too.

    stdin_bytes: int        exactly this many bytes of job stdin follow the spec line
    has_stdin: bool         older form: job stdin is everything up to EOF (or the L frame's end)
    input_tar_bytes: int    after the stdin bytes, this many bytes of an uncompressed tar
                            (regular files and directories only), extracted to the job's
                            input/ and seen read-only by the job at /input
    output: bool            the job gets an empty writable /output (fetch it with fetch-output)
    max_output_bytes: int   a cap on stdout + stderr + /output (apparent sizes) together:
                            each file the job writes is held to it (RLIMIT_FSIZE), and a
                            monitor thread ends the job when the sum passes it; either way
                            the result is "failed" with exit_code null and an error naming
                            the limit (null or absent: no cap)
    dirs: list              directories preopened for the job (--dir, --host-dir), each
                            {"guest": absolute path, "read_only": bool} and either
                            "tar_bytes": int (staged: this many bytes of an uncompressed
                            tar follow the input tar, in the list's order, extracted to the
                            job's dirs/INDEX; a read-write one gets a manifest of its
                            files' sha256, dirs/INDEX.manifest.json, for fetch-dir) or
                            "host_path": str (the host's own directory, not copied; one
                            that is missing there is an X frame of kind "host_dir")
    fuel: int               the guest may execute this many units of wasmtime fuel
                            (1..MAX_FUEL; null or absent: fuel is not counted, which
                            costs nothing). Past it the result is "timeout", exit code
                            124, an error saying fuel ran out; result.json's fuel_used
                            says how much the guest used (null without a budget)

Absent fields mean false or 0, so a spec without them runs as before: no stdin (EOF), and
no filesystem at all. input_tar_bytes with has_stdin needs stdin_bytes. A refused input
tar (absolute or '..' names, links, devices, fifos, sparse files) is an X frame of kind
"input" and leaves no job directory.

serve protocol. The coordinator writes frames on serve's stdin; serve answers in frames.

    -> H {"runner_version": str}          first; answered by exactly one of:
    <- N {"need": "runner"}               another version: serve exits
    <- H {"pid": int, "wasmtime_version": str|null, "error": str|null}
                                          error set: wasmtime is unusable and serve exits
    -> L SPEC_LINE \\n STDIN INPUT_TAR     launch's stdin bytes; the spec has "key": JOB_ID

Replies about a task carry payload JOB_ID + b"\\n" + body, in this order:

    N {"need": "module"}     nothing launched: put-module over another channel, resend L
    N {"need": "runner"}     the spec's runner_version differs: nothing launched
    X {"error", "kind"}      not launched (kinds as launch: spec, exists, io, input)
    S {"pid", "job_dir"}     launched; later, once it ended and result.json is on disk:
    O <chunk>...             its whole stdout, chunks of at most 64 KiB
    E <chunk>...             its whole stderr
    R <result.json bytes>    the last frame about the task

Frames of different tasks may interleave; a task's own O and E frames are sent only after
it ended. A task whose module cannot be loaded still gets S, then an R "failed", as under
execute. An X frame whose key is empty (payload starting with b"\\n") concerns no task:
kind "spec" for an L whose spec or key is unreadable, "protocol" for a stream that is not
frames or a request out of order (serve then accepts nothing more), "io" if serve itself
fails. On EOF serve accepts nothing more, sends the results of the tasks still running,
and exits 0. If its stdout breaks, it leaves the tasks running (each writes its result to
its job directory; use attach, poll or cancel per task) and exits once all have ended.
Requests larger than SERVE_MAX_REQUEST_BYTES are a protocol error: launch such tasks with
launch instead.

The coordinator believes none of these answers unchecked: parse_result (R, result.json),
parse_frame_json (S, N, X, A, H), parse_cancel_answer and parse_info below define what each
may hold and raise ProtocolError for anything else.

runner_version is a hash over the runner package's files: a launch spec or serve hello
naming another version is answered N {"need": "runner"}, and the coordinator installs its own.

Every job dir holds "pid" (the job process's pid) and, where there is procfs, "pid-start"
("PID START_TIME", field 22 of /proc/PID/stat): a serve task's cmdline is serve's, so
attach, poll and cancel tell the job's process from a reused pid by its start time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

# Frame kinds. From the runner:
KIND_NEED = b"N"  # nothing launched: install the runner, or put the module, and retry
KIND_STARTED = b"S"  # the job runs: its pid and job directory
KIND_STDOUT = b"O"  # a chunk of the job's stdout
KIND_STDERR = b"E"  # a chunk of the job's stderr
KIND_RESULT = b"R"  # the job's result.json: the last frame about it
KIND_ERROR = b"X"  # nothing launched, or no such job: why
KIND_ALIVE = b"A"  # poll: the job still runs
# Both ways (serve's handshake), and to serve:
KIND_HELLO = b"H"
KIND_LAUNCH = b"L"  # a launch's stdin, keyed by its job id

CHUNK_BYTES = 64 * 1024
# fetch-dir's archive: changed files under DIR_FILES_PREFIX, then this member, a JSON object
# with "changed" ({path: sha256 at staging, or null for a new file}), "deleted" ({path:
# sha256 at staging}), "deleted_dirs" (paths, deepest first) and DIR_LEFT_OUT_KEY.
DIR_FILES_PREFIX = "files/"
DIR_CHANGES_MEMBER = "changes.json"
DIR_CHANGES_KEYS = ("changed", "deleted", "deleted_dirs")
# fetch-dir's changes.json also names the changed files it left out, past MAX_BYTES.
DIR_LEFT_OUT_KEY = "left_out"
# At most this many directories per job (each is a preopen and, if staged, a tar).
MAX_DIRS = 64

# Far above any real frame (output chunks are 64 KiB): a bigger length means the stream is
# not ours, e.g. a login shell printed a banner before the runner started.
MAX_FRAME_BYTES = 16 << 20
# An L frame holds a task's stdin and input tar in memory; bigger tasks go through launch.
SERVE_MAX_REQUEST_BYTES = 64 << 20

# Exit status of a command refused for an unsafe workdir, by the runner or its bootstrap
# (sysexits' EX_NOPERM): the coordinator then says why instead of reinstalling the runner.
UNSAFE_WORKDIR_EXIT = 77

# The longest time_limit_s or wall_limit_s a spec may ask for (365 days); the CLI refuses
# more at once. Far below threading.TIMEOUT_MAX, so a watchdog can always wait for it.
MAX_TIME_LIMIT_S = 365 * 24 * 3600

# fetch-output's exit status when it stopped at its MAX_BYTES argument.
FETCH_STOPPED_AT_LIMIT = 3

RESULT_KEYS = (
    "state",
    "exit_code",
    "error",
    "run_s",
    "cpu_s",
    "peak_memory_bytes",
    "started_at",
    "finished_at",
    "module_compile_s",
    "module_cached",
    "wasmtime_version",
    "fuel_used",
)

# The largest fuel budget a spec may give: wasmtime's fuel is a signed 64-bit count.
MAX_FUEL = (1 << 63) - 1

_HEADER = struct.Struct(">cI")
# A module's sha256, its name in the workdir's wasm/ directory.
SHA256_RE = re.compile(r"[0-9a-f]{64}")

# The package's directory, resolved at import, before anything could change the working
# directory. The runner is its .py files (no subdirectories): what the coordinator installs.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# A name the package's files may have; the install payload's names are held to it too.
SOURCE_NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,63}\.py")
# A runner version: what runner_version returns, and the name of its directory on a host.
VERSION_RE = re.compile(r"[0-9a-f]{16}")


def runner_files() -> dict[str, bytes]:
    """The runner package's source files (name: bytes), as installed on every host."""
    files: dict[str, bytes] = {}
    for name in sorted(os.listdir(PACKAGE_DIR)):
        if SOURCE_NAME_RE.fullmatch(name):
            with open(os.path.join(PACKAGE_DIR, name), "rb") as source:
                files[name] = source.read()
    return files


def files_version(files: dict[str, bytes]) -> str:
    """First 16 hex chars of a sha256 over the sorted (name, bytes) of `files`: any edit,
    and any file added or removed, changes the version."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()[:16]


_version: list[str] = []


def runner_version() -> str:
    """This runner's version: files_version of its package, computed once per process."""
    if not _version:
        _version.append(files_version(runner_files()))
    return _version[0]


def encode_install(files: dict[str, bytes]) -> bytes:
    """What `install` reads on stdin: one JSON object {"version": ..., "files": {name: text}}.

    JSON because the bootstrap unpacks it with the stdlib in a few lines; the sources are
    UTF-8 text, so their bytes (and the version) survive the trip.
    """
    payload = {
        "version": files_version(files),
        "files": {name: data.decode("utf-8") for name, data in sorted(files.items())},
    }
    return json.dumps(payload).encode()


# ---------------------------------------------------------------------------- frames


def encode_frame(kind: bytes, payload: bytes) -> bytes:
    """One frame: 1 byte kind, 4 bytes big-endian payload length, then the payload."""
    if len(kind) != 1:
        raise ValueError(f"a frame kind is one byte, not {kind!r}")
    if len(payload) > 0xFFFFFFFF:
        raise ValueError("frame payload too large")
    return _HEADER.pack(kind, len(payload)) + payload


class ProtocolError(ValueError):
    """A message from the other side does not follow the protocol (bad JSON, key or value)."""


class FrameError(ProtocolError):
    """The byte stream does not consist of sshwasm-exec frames."""


class FrameDecoder:
    """Incremental frame decoder: feed bytes as they arrive, get whole frames back."""

    def __init__(self, max_payload: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add received bytes; return the (kind, payload) frames completed by them."""
        buffer = self._buffer
        buffer += data
        frames: list[tuple[bytes, bytes]] = []
        start = 0
        while len(buffer) - start >= _HEADER.size:
            kind, length = _HEADER.unpack_from(buffer, start)
            if length > self._max_payload:
                preview = bytes(buffer[start : start + 40])
                raise FrameError(
                    f"frame of {length} bytes is larger than {self._max_payload}: the stream "
                    f"does not come from sshwasm-exec (does a login script print text?) "
                    f"starting {preview!r}"
                )
            end = start + _HEADER.size + length
            if end > len(buffer):
                break
            frames.append((kind, bytes(buffer[start + _HEADER.size : end])))
            start = end
        del buffer[:start]
        return frames


# -------------------------------------------------------------------------- messages
#
# What the coordinator believes of a host is checked here first: the JSON of R, S, N, X and
# H frames and of `cancel` and `info`. A host that sends something else is broken (or not
# ours), and every parser below says so with a ProtocolError instead of letting a bad value
# reach the jobs file.

# States a job's result.json may hold (a job the runner cannot vouch for is `failed`).
RESULT_STATES = ("succeeded", "failed", "timeout", "out_of_memory", "cancelled")
# X frame kinds in use: spec, exists, io, input, no_wasmtime, missing, protocol, host_dir. The
# coordinator acts on some and reports the rest as they are, so a kind is only checked to
# be a short identifier: a newer runner may add one.
_ERROR_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
NEEDS = ("runner", "module")
# Far above anything this runner writes (its messages are cut to 500 characters).
MAX_MESSAGE_CHARS = 16 * 1024
MAX_SHORT_CHARS = 256
MAX_MESSAGE_BYTES = 1 << 20
# Exit codes as WASI and wasmtime can report them (a u32, or a signed i32).
_EXIT_CODE_RANGE = (-(1 << 31), (1 << 32) - 1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _is_iso_time(value: object) -> bool:
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _text(limit: int) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        return isinstance(value, str) and len(value) <= limit

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        return isinstance(value, str) and value in choices

    return check


def _in_range(low: int, high: int) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        return _is_int(value) and low <= value <= high  # type: ignore[operator]

    return check


def _optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    def either(value: object) -> bool:
        return value is None or check(value)

    return either


if TYPE_CHECKING:  # for annotations only, which are never evaluated
    _Schema = dict[str, Callable[[object], bool]]

RESULT_SCHEMA: _Schema = {
    "state": _one_of(RESULT_STATES),
    "exit_code": _optional(_in_range(*_EXIT_CODE_RANGE)),
    "error": _optional(_text(MAX_MESSAGE_CHARS)),
    "run_s": _optional(_is_seconds),
    "cpu_s": _optional(_is_seconds),
    "peak_memory_bytes": _optional(_in_range(0, 1 << 62)),
    "started_at": _optional(_is_iso_time),
    "finished_at": _optional(_is_iso_time),
    "module_compile_s": _optional(_is_seconds),
    "module_cached": _optional(lambda value: isinstance(value, bool)),
    "wasmtime_version": _optional(_text(MAX_SHORT_CHARS)),
    "fuel_used": _optional(_in_range(0, MAX_FUEL)),
}
_PID = _in_range(1, (1 << 31) - 1)
_MESSAGE_SCHEMAS: dict[bytes, _Schema] = {
    KIND_STARTED: {"pid": _PID, "job_dir": _text(4096)},
    KIND_NEED: {"need": _one_of(NEEDS)},
    KIND_ERROR: {
        "error": _text(MAX_MESSAGE_CHARS),
        "kind": lambda value: isinstance(value, str) and bool(_ERROR_KIND_RE.fullmatch(value)),
    },
    KIND_ALIVE: {"alive": lambda value: value is True},
    KIND_HELLO: {
        "pid": _PID,
        "wasmtime_version": _optional(_text(MAX_SHORT_CHARS)),
        "error": _optional(_text(MAX_MESSAGE_CHARS)),
    },
}
CANCEL_SCHEMA: _Schema = {
    "state": _one_of((*RESULT_STATES, "unknown")),
    "already_finished": _optional(lambda value: isinstance(value, bool)),
}
INFO_SCHEMA: _Schema = {
    "runner_version": _text(MAX_SHORT_CHARS),
    "python": _text(MAX_SHORT_CHARS),
    "wasmtime_version": _optional(_text(MAX_SHORT_CHARS)),
    "wasmtime_error": _optional(_text(MAX_MESSAGE_CHARS)),
    "cpus": _optional(_in_range(1, 1 << 24)),
    "memory_mb": _optional(_in_range(0, 1 << 40)),
    # platform.system() and platform.machine(): "Linux", "x86_64" or "aarch64". Absent from
    # an older runner's answer, and "" where Python cannot tell.
    "os": _optional(_text(MAX_SHORT_CHARS)),
    "arch": _optional(_text(MAX_SHORT_CHARS)),
}


def parse_message(
    payload: bytes, schema: _Schema, what: str, optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Decode one JSON object and check it against `schema`; unknown keys are dropped.

    Every key of the schema is required, but those in `optional`, which mean None if absent.
    """
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{what} of {len(payload)} bytes is too large")
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not JSON: {_preview(payload)}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object: {_preview(payload)}")
    checked: dict[str, Any] = {}
    for key, check in schema.items():
        if key not in value:
            if key in optional:
                checked[key] = None
                continue
            raise ProtocolError(f"{what} lacks {key!r}")
        if not check(value[key]):
            raise ProtocolError(f"{what} has an invalid {key!r}: {_preview(value[key])}")
        checked[key] = value[key]
    return checked


def parse_result(payload: bytes) -> dict[str, Any]:
    """A job's result.json (R frame) as the coordinator may believe it; raises ProtocolError."""
    return parse_message(payload, RESULT_SCHEMA, "result")


def parse_cancel_answer(payload: bytes) -> dict[str, Any]:
    """What `cancel` printed, checked; raises ProtocolError."""
    return parse_message(payload, CANCEL_SCHEMA, "cancel answer", frozenset({"already_finished"}))


def parse_info(payload: bytes, what: str = "info answer") -> dict[str, Any]:
    """What `info` (or a probe of the host's python) printed, checked; raises ProtocolError.

    Only what is there is checked: an older runner's `info` has fewer keys.
    """
    return parse_message(payload, INFO_SCHEMA, what, frozenset(INFO_SCHEMA))


def parse_frame_json(kind: bytes, payload: bytes) -> dict[str, Any]:
    """The JSON body of an S, N, X, A or H frame, checked; raises ProtocolError."""
    schema = _MESSAGE_SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError(f"unexpected frame kind {kind!r}")
    return parse_message(payload, schema, f"{kind.decode('latin-1')} frame")


def _preview(value: object, limit: int = 60) -> str:
    """A short, printable rendering of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_launch_spec(
    *,
    wasm_sha256: str,
    argv: list[str],
    env: list[tuple[str, str]],
    memory_mb: int,
    time_limit_s: float | None,
    wall_limit_s: float | None = None,
    output: bool = False,
    max_output_bytes: int | None = None,
    stdin: bytes | None = None,
    input_tar: bytes = b"",
    key: str | None = None,
    dirs: Sequence[dict[str, Any]] = (),
    dir_tars: Sequence[bytes] = (),
    fuel: int | None = None,
) -> bytes:
    """A launch's stdin (an L frame's payload with `key`): the spec line, the job's stdin,
    the input tar, then the staged directories' tars. `dirs` are the spec's entries without
    tar_bytes: each one without host_path takes the next of `dir_tars`.
    validate_spec is what the runner holds it to."""
    header: dict[str, Any] = {
        "runner_version": runner_version(),
        "wasm_sha256": wasm_sha256,
        "argv": list(argv),
        "env": [list(pair) for pair in env],
        "memory_mb": memory_mb,
        "time_limit_s": time_limit_s,
        "wall_limit_s": wall_limit_s,
        "input_tar_bytes": len(input_tar),
        "output": output,
    }
    if max_output_bytes is not None:
        header["max_output_bytes"] = max_output_bytes
    if stdin is not None:
        header["stdin_bytes"] = len(stdin)
    if key is not None:
        header["key"] = key
    if dirs:
        tars = iter(dir_tars)
        header["dirs"] = [
            entry if "host_path" in entry else {**entry, "tar_bytes": len(next(tars))}
            for entry in dirs
        ]
    if fuel is not None:
        header["fuel"] = fuel
    return json.dumps(header).encode() + b"\n" + (stdin or b"") + input_tar + b"".join(dir_tars)


def encode_hello() -> bytes:
    """The H frame that opens a serve session: the coordinator's runner version."""
    return json.dumps({"runner_version": runner_version()}).encode()


def validate_spec(raw: dict[str, Any]) -> dict[str, Any]:
    """The launch spec with every field checked; raises ValueError naming the bad field."""

    def is_text(value: object) -> bool:
        return isinstance(value, str) and "\0" not in value

    def is_count(value: object) -> bool:
        return type(value) is int and value >= 0

    def is_time_limit(value: object) -> bool:
        # A bool is an int but no number of seconds; NaN fails both comparisons.
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and 0 < value <= MAX_TIME_LIMIT_S
        )

    sha = raw.get("wasm_sha256")
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
        raise ValueError("wasm_sha256 must be 64 lowercase hex digits")
    argv = raw.get("argv")
    if not isinstance(argv, list) or not argv or not all(is_text(word) for word in argv):
        raise ValueError("argv must be a non-empty list of strings without NUL")
    env = raw.get("env")
    if not isinstance(env, list) or not all(
        isinstance(pair, list)
        and len(pair) == 2
        and is_text(pair[0])
        and pair[0]
        and "=" not in pair[0]
        and is_text(pair[1])
        for pair in env
    ):
        raise ValueError("env must be a list of [name, value] string pairs")
    memory_mb = raw.get("memory_mb")
    if type(memory_mb) is not int or not 1 <= memory_mb <= 1 << 20:
        raise ValueError("memory_mb must be a positive integer")
    limit = raw.get("time_limit_s")
    if limit is not None and not is_time_limit(limit):
        raise ValueError(
            f"time_limit_s must be a positive number of seconds up to {MAX_TIME_LIMIT_S} "
            f"(365 days), or null"
        )
    wall_limit = raw.get("wall_limit_s")
    if wall_limit is not None and not is_time_limit(wall_limit):
        raise ValueError(
            f"wall_limit_s must be a positive number of seconds up to {MAX_TIME_LIMIT_S} "
            f"(365 days), or null"
        )
    has_stdin = raw.get("has_stdin", False)
    if not isinstance(has_stdin, bool):
        raise ValueError("has_stdin must be true or false")
    stdin_bytes = raw.get("stdin_bytes")
    if stdin_bytes is not None and not is_count(stdin_bytes):
        raise ValueError("stdin_bytes must be a non-negative integer")
    input_tar_bytes = raw.get("input_tar_bytes", 0)
    if not is_count(input_tar_bytes):
        raise ValueError("input_tar_bytes must be a non-negative integer")
    if input_tar_bytes and has_stdin and stdin_bytes is None:
        raise ValueError("input_tar_bytes with has_stdin needs stdin_bytes")
    output = raw.get("output", False)
    if not isinstance(output, bool):
        raise ValueError("output must be true or false")
    max_output_bytes = raw.get("max_output_bytes")
    if max_output_bytes is not None and not (is_count(max_output_bytes) and max_output_bytes):
        raise ValueError("max_output_bytes must be a positive integer or null")
    dirs = _validate_dirs(raw.get("dirs", []), is_text, is_count)
    if dirs and has_stdin and stdin_bytes is None:
        raise ValueError("dirs with has_stdin needs stdin_bytes")
    fuel = raw.get("fuel")
    if fuel is not None and not (is_count(fuel) and 1 <= fuel <= MAX_FUEL):
        raise ValueError(f"fuel must be an integer from 1 to {MAX_FUEL}, or null")
    return {
        "runner_version": raw["runner_version"],
        "wasm_sha256": sha,
        "argv": argv,
        "env": env,
        "memory_mb": memory_mb,
        "time_limit_s": None if limit is None else float(limit),
        "wall_limit_s": None if wall_limit is None else float(wall_limit),
        "has_stdin": has_stdin or stdin_bytes is not None,
        "stdin_bytes": stdin_bytes,
        "input": input_tar_bytes > 0,
        "input_tar_bytes": input_tar_bytes,
        "output": output,
        "max_output_bytes": max_output_bytes,
        "dirs": dirs,
        "fuel": fuel,
    }


def guest_path_problem(guest: str) -> str | None:
    """Why `guest` cannot be where a directory is preopened, or None: it must be absolute
    and normal (no '.', '..' or empty components except the root itself), without NUL."""
    if "\0" in guest or not guest.startswith("/"):
        return "must be an absolute path (like /data)"
    parts = guest.split("/")[1:]
    if guest != "/" and any(part in ("", ".", "..") for part in parts):
        return "must not hold '.', '..' or empty components"
    return None


def _validate_dirs(
    raw: object, is_text: Callable[[object], bool], is_count: Callable[[object], bool]
) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or len(raw) > MAX_DIRS:
        raise ValueError(f"dirs must be a list of at most {MAX_DIRS} directories")
    dirs: list[dict[str, Any]] = []
    guests: set[str] = set()
    for entry in raw:
        if not isinstance(entry, dict):
            raise ValueError("each of dirs must be an object")
        guest, read_only = entry.get("guest"), entry.get("read_only")
        if not is_text(guest) or guest_path_problem(guest) is not None:  # type: ignore[arg-type]
            raise ValueError(f"dirs: guest {_preview(guest)} {guest_path_problem(str(guest))}")
        if guest in guests:
            raise ValueError(f"dirs: guest {guest} appears twice")
        guests.add(guest)  # type: ignore[arg-type]
        if not isinstance(read_only, bool):
            raise ValueError("dirs: read_only must be true or false")
        if "host_path" in entry:
            host_path = entry["host_path"]
            if not is_text(host_path) or not host_path:
                raise ValueError("dirs: host_path must be a non-empty string")
            dirs.append({"guest": guest, "read_only": read_only, "host_path": host_path})
        else:
            tar_bytes = entry.get("tar_bytes")
            if not is_count(tar_bytes):
                raise ValueError("dirs: tar_bytes must be a non-negative integer")
            dirs.append({"guest": guest, "read_only": read_only, "tar_bytes": tar_bytes})
    return dirs
