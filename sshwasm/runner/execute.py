"""Running a job's module: wasmtime (imported only here and by serve), the memory, time and
output limits, and the job's result, written exactly once."""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from .jobdir import (
    _create_atomically,
    _make_result,
    _now_iso,
    _one_line,
    _replace_atomically,
    _wasmtime_version,
    _write_pid_file,
)

# Every time limit is held by the watchdog alone: the guest runs without epoch checks (they
# cost a compute-bound guest 7-11% on every run, benchmarks/compute.py), and at the deadline
# the watchdog records the timeout and ends the process, whether the guest computes or is
# blocked in a host call. A pooled executor whose task timed out is replaced (a fork of
# serve, under a millisecond: benchmarks/timeouts.py); timeouts are rare, the cost of epoch
# checks was paid by every task.

# A watchdog waits in slices no longer than this, so no wait can overflow a platform timeout.
_WATCHDOG_SLICE_S = 3600.0
# What a guest may allocate besides its one linear memory of memory_mb (wasmtime store
# limits; a multi-memory module or extra tables would multiply the budget): one memory, one
# table, one instance, and a table of at most an eighth of memory_mb (elements are 8 bytes).
# Every Rust, C and Go guest has exactly one memory and one table of a few thousand entries.
GUEST_MEMORIES = 1
GUEST_TABLES = 1
GUEST_INSTANCES = 1
TABLE_ELEMENT_BYTES = 8
TABLE_SHARE_OF_MEMORY = 8

# How often the output monitor sums a capped job's output sizes.
OUTPUT_CHECK_S = 0.05

_OOM_STDERR_RE = re.compile(rb"memory allocation of .{0,64}failed|out of memory", re.DOTALL)
_MIN_MEMORY_RE = re.compile(r"memory minimum size of (\d+) pages")
# How instantiation reports a module over the store's count or table limits.
_STORE_LIMIT_RE = re.compile(r"resource limit exceeded|table minimum size of \d+ elements")
_WASM_PAGE_BYTES = 64 * 1024

# ------------------------------------------------------------------------- execution


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Execution:
    """One run of a job's module in this process; its result is written exactly once."""

    def __init__(self, job_dir: str) -> None:
        self.job_dir = job_dir
        self.result_path = os.path.join(job_dir, "result.json")
        self.done = threading.Event()
        self.facts: dict[str, Any] = {
            "module_compile_s": None,
            "module_cached": None,
            "wasmtime_version": None,
        }
        self._lock = threading.Lock()
        self._written = False
        self._wall_start: float | None = None
        self._cpu_start: float | None = None
        # Where the guest's linear memory starts, and its limit: what `at_kill` needs.
        self._memory: tuple[int, int] | None = None

    def begin_run(self) -> None:
        """Start the clocks: run_s and cpu_s cover instantiation and _start."""
        self.facts["started_at"] = _now_iso()
        self._wall_start = time.monotonic()
        self._cpu_start = _cpu_seconds()

    def measures(self) -> dict[str, Any]:
        """run_s and cpu_s so far; empty before the run began."""
        if self._wall_start is None or self._cpu_start is None:
            return {}
        return {
            "run_s": round(time.monotonic() - self._wall_start, 6),
            "cpu_s": round(_cpu_seconds() - self._cpu_start, 6),
        }

    def watch_memory(self, base: int | None, limit_bytes: int) -> None:
        """Note where the guest's linear memory starts (before the guest runs)."""
        self._memory = None if base is None else (base, limit_bytes)

    def at_kill(self) -> dict[str, Any]:
        """`measures` and what else is known when the process is ended from outside the
        guest (its watchdog, its output cap): the linear memory's size, which is its peak
        (wasm memory never shrinks), read from the kernel's map of this process, never from
        the store. The guest's thread owns the store while it runs (wasmtime's Store is not
        thread-safe), so `fuel_used` stays unknown: the fuel counter lives in the store,
        and in a register of the running code between calls."""
        peak = None if self._memory is None else mapped_memory_bytes(*self._memory)
        return {**self.measures(), "peak_memory_bytes": peak}

    def finish(self, state: str, exit_code: int | None, error: str | None, **more: Any) -> bool:
        """Write result.json unless this process or anyone else (a cancel) already did."""
        with self._lock:
            if self._written:
                return False
            self._written = True
            result = _make_result(state, exit_code, error, **{**self.facts, **more})
            try:
                return _create_atomically(self.result_path, result)
            except OSError:
                traceback.print_exc()
                return False


def job_limit(spec: dict[str, Any]) -> float | None:
    """The seconds a job may run, loading its module included: its time_limit_s, else its
    wall_limit_s (the default wall-clock cap), else none."""
    limit: float | None = spec["time_limit_s"]
    return spec.get("wall_limit_s") if limit is None else limit


class _Watchdog:
    """Ends a job at its limit, counted from `started` (time.monotonic), so that loading and
    compiling the module count too: at the deadline it records the timeout and ends the
    whole process, a guest that computes as one blocked in a host call (sleep, read). The
    guest pays nothing for it while it runs. It never dies silently: a job whose watchdog
    failed is ended.
    """

    def __init__(self, execution: _Execution, limit: float, started: float) -> None:
        self.execution = execution
        self.limit = limit
        self.started = started

    @classmethod
    def for_spec(
        cls, execution: _Execution, spec: dict[str, Any], started: float
    ) -> _Watchdog | None:
        """The watchdog a spec asks for (time_limit_s, else wall_limit_s), not yet started."""
        limit = job_limit(spec)
        return None if limit is None else cls(execution, limit, started)

    def start(self) -> None:
        threading.Thread(target=self._guard, daemon=True).start()

    def _wait_until(self, deadline: float) -> bool:
        """Wait until `deadline`; True if the job ended first."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.execution.done.wait(min(left, _WATCHDOG_SLICE_S)):
                return True

    def _guard(self) -> None:
        execution = self.execution
        try:
            if self._wait_until(self.started + self.limit):
                return
            message = f"time limit of {self.limit:g} s exceeded (ended by the watchdog)"
            if execution.finish("timeout", 124, message, **execution.at_kill()):
                sys.stderr.flush()
                os._exit(124)
        except BaseException as exc:
            # Without its watchdog the job would have no limit at all: end it instead.
            traceback.print_exc()
            error = _one_line(f"runner error: the time-limit watchdog failed: {exc}")
            if execution.finish("failed", 1, error, **execution.measures()):
                sys.stderr.flush()
                os._exit(1)


class _OutputLimit:
    """Holds a job to its max_output_bytes: stdout + stderr + /output, apparent sizes.

    Each file is held to the cap by RLIMIT_FSIZE, with SIGXFSZ caught (not fatal: the
    write fails with EFBIG) and reported through a wakeup pipe, so a write refused in any
    thread is seen at once. A monitor thread also sums the sizes, for a total spread over
    several files. Past the cap the job's result is written, then the process ends, as
    the watchdog does; the disk holds at most about the cap.
    """

    def __init__(self, execution: _Execution, max_bytes: int, output_dir: str | None) -> None:
        self.execution = execution
        self.max_bytes = max_bytes
        self.output_dir = output_dir
        self.hit = False
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        # What start() replaced, for stop() to put back (a pooled executor runs on).
        self._previous: tuple[Any, int, tuple[int, int]] | None = None
        self._monitor_thread: threading.Thread | None = None

    @property
    def message(self) -> str:
        """The job's error once over the cap."""
        return (
            f"output limit of {_format_mb(self.max_bytes)} MB exceeded "
            f"(stdout, stderr and /output together)"
        )

    def start(self) -> None:
        """Apply the file size limit and start the monitor; call in the main thread."""
        import resource

        handler = signal.signal(signal.SIGXFSZ, _ignore_signal)
        wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        file_size_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        self._previous = (handler, wakeup_fd, file_size_limit)
        _, hard = file_size_limit
        if self.max_bytes < (hard if hard != resource.RLIM_INFINITY else 1 << 62):
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_bytes, hard))
        self._monitor_thread = threading.Thread(target=self._monitor, daemon=True)
        self._monitor_thread.start()

    def stop(self) -> None:
        """Put back what start() changed, once the guest stopped (`execution.done` set):
        the file size limit (only its soft value was lowered, so it can be raised again),
        SIGXFSZ's handler, the wakeup fd; ends the monitor and closes the pipe. A pooled
        executor then runs its next task as a fresh one would (serve checks the limit)."""
        import resource

        if self._previous is None:
            return
        handler, wakeup_fd, file_size_limit = self._previous
        self._previous = None
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_FSIZE, file_size_limit)
        signal.set_wakeup_fd(wakeup_fd)
        signal.signal(signal.SIGXFSZ, handler)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")  # wakes the monitor, which sees `done` and returns
        if self._monitor_thread is not None:
            self._monitor_thread.join()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def used(self) -> int:
        """Apparent bytes of the job's stdout, stderr and /output so far."""
        job_dir = self.execution.job_dir
        total = 0
        for name in ("stdout", "stderr"):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(job_dir, name)).st_size
        if self.output_dir is not None:
            total += _tree_bytes(self.output_dir, self.max_bytes - total)
        return total

    def exceeded(self) -> bool:
        """Whether the job went past the cap (a refused write or a total over it)."""
        if not self.hit:
            self.hit = self._write_refused() or self.used() > self.max_bytes
        return self.hit

    def _write_refused(self) -> bool:
        """Whether SIGXFSZ came (the wakeup pipe carries the numbers of caught signals)."""
        try:
            if signal.SIGXFSZ in os.read(self._wake_r, 4096):
                self.hit = True
        except BlockingIOError:
            pass
        return self.hit

    def _monitor(self) -> None:
        pause = OUTPUT_CHECK_S
        while not self.execution.done.is_set():
            select.select([self._wake_r], [], [], pause)
            if self.execution.done.is_set():
                return
            started = time.monotonic()
            over = self._write_refused() or self.used() > self.max_bytes
            # A job with many files makes the sum slow: look less often rather than
            # spend the host's cpu on it.
            pause = max(OUTPUT_CHECK_S, 4 * (time.monotonic() - started))
            if over:
                self.hit = True
                if self.execution.finish("failed", None, self.message, **self.execution.at_kill()):
                    sys.stderr.flush()
                    os._exit(1)
                return


def _format_mb(size: int) -> str:
    return f"{size / (1 << 20):g}"


def _tree_bytes(root: str, stop_above: int) -> int:
    """Apparent size of the regular files under `root` (links not followed); stops early
    once past `stop_above`, since the caller only needs to know that."""
    total = 0
    pending = [root]
    while pending and total <= stop_above:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _load_module(
    wasmtime: Any,
    engine: Any,
    module_path: str,
    cache_path: str,
    log: Callable[[str], None] = _log_to_stderr,
) -> tuple[Any, float, bool]:
    """The compiled module, from the precompiled cache when it can; (module, compile_s, hit)."""
    if os.path.isfile(cache_path):
        try:
            return wasmtime.Module.deserialize_file(engine, cache_path), 0.0, True
        except wasmtime.WasmtimeError as exc:
            log(f"precompiled cache unusable, recompiling: {_one_line(str(exc))}")
    with open(module_path, "rb") as module_file:
        wasm = module_file.read()
    started = time.monotonic()
    module = wasmtime.Module(engine, wasm)
    compile_s = time.monotonic() - started
    try:
        os.makedirs(os.path.dirname(cache_path), mode=0o700, exist_ok=True)
        # Durable: a torn artifact after a crash would be loaded as machine code.
        _replace_atomically(cache_path, bytes(module.serialize()), durable=True)
    except OSError as exc:
        # The cache only saves time: a full disk must not fail the job.
        log(f"cannot write precompiled cache: {exc}")
    return module, compile_s, False


class _LoadedModule:
    """A compiled module, the engine it belongs to, and what loading it cost this job."""

    def __init__(self, engine: Any, module: Any, compile_s: float, cached: bool) -> None:
        self.engine = engine
        self.module = module
        self.compile_s = compile_s
        self.cached = cached


class _Runtime:
    """wasmtime, imported: one Engine per fuel setting, and the host's module caches (a
    module compiled for one setting cannot run under the other)."""

    def __init__(self, wasmtime: Any, workdir: str) -> None:
        self.wasmtime = wasmtime
        self.workdir = workdir
        self.version = _wasmtime_version() or "unknown"
        self._engines: dict[bool, Any] = {}

    def config(self, fuel: bool = False) -> Any:
        config = self.wasmtime.Config()
        # No epoch interruption: time limits are the watchdog's (_Watchdog).
        config.epoch_interruption = False
        # Fuel costs compute speed (up to 57%): counted only for a job with a fuel budget.
        config.consume_fuel = fuel
        return config

    def engine(self, fuel: bool = False) -> Any:
        engine = self._engines.get(fuel)
        if engine is None:
            engine = self._engines[fuel] = self.wasmtime.Engine(self.config(fuel))
        return engine

    def module_paths(self, sha: str, fuel: bool = False) -> tuple[str, str]:
        """(uploaded .wasm, precompiled .cwasm keyed by wasmtime version and engine flags).
        `noepoch` is in the name because earlier runners also made `epoch` ones: a host's
        modules precompiled by them are used as they are."""
        flags = "noepoch" + ("-fuel" if fuel else "")
        safe_version = re.sub(r"[^A-Za-z0-9.+_-]", "_", self.version)
        cache = os.path.join(self.workdir, "cache", f"{sha}-{safe_version}-{flags}.cwasm")
        return os.path.join(self.workdir, "wasm", f"{sha}.wasm"), cache

    def load(
        self, sha: str, log: Callable[[str], None] = _log_to_stderr, fuel: bool = False
    ) -> _LoadedModule:
        """The module of hash `sha` for an engine with or without fuel counting."""
        module_path, cache_path = self.module_paths(sha, fuel)
        engine = self.engine(fuel)
        module, compile_s, cached = _load_module(
            self.wasmtime, engine, module_path, cache_path, log
        )
        return _LoadedModule(engine, module, compile_s, cached)


def _linear_memory_bytes(wasmtime: Any, instance: Any, store: Any) -> int | None:
    if instance is None:
        return None
    try:
        memory = instance.exports(store).get("memory")
        if isinstance(memory, wasmtime.Memory):
            return int(memory.data_len(store))
    except Exception:
        traceback.print_exc()
    return None


def _linear_memory_base(wasmtime: Any, instance: Any, store: Any) -> int | None:
    """The address of the guest's exported linear memory (None: none, or not known)."""
    try:
        memory = instance.exports(store).get("memory")
        if isinstance(memory, wasmtime.Memory):
            address = ctypes.cast(memory.data_ptr(store), ctypes.c_void_p).value
            return int(address) if address else None
    except Exception:
        traceback.print_exc()
    return None


def mapped_memory_bytes(base: int, limit_bytes: int, maps: str = "/proc/self/maps") -> int | None:
    """The size of the linear memory at `base`, from the kernel's map of this process: the
    read-write mappings that follow each other from `base` (wasmtime makes a memory's pages
    accessible as it grows, within a reservation it never moves). None where the map cannot
    be read (no /proc) or does not look like a linear memory: not whole wasm pages, or
    larger than the guest may have."""
    try:
        with open(maps) as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    spans = []
    for line in lines:
        fields = line.split(maxsplit=2)
        if len(fields) < 2:
            continue
        first, _, past = fields[0].partition("-")
        try:
            spans.append((int(first, 16), int(past, 16), fields[1]))
        except ValueError:
            return None
    end, total = base, 0
    for low, high, permissions in sorted(spans):
        if high <= end:
            continue
        if low != end or not permissions.startswith("rw"):
            break
        total += high - low
        end = high
    if total == 0 or total % _WASM_PAGE_BYTES or total > limit_bytes:
        return None
    return total


def _stderr_tail(job_dir: str) -> bytes:
    try:
        with open(os.path.join(job_dir, "stderr"), "rb") as stderr:
            stderr.seek(0, os.SEEK_END)
            stderr.seek(max(0, stderr.tell() - 4096))
            return stderr.read()
    except OSError:
        return b""


def looks_out_of_memory(peak_bytes: int | None, limit_bytes: int, stderr_tail: bytes) -> bool:
    """Whether a failed run failed for want of memory: at the limit, or said so on stderr."""
    if peak_bytes is not None and limit_bytes - peak_bytes <= 1 << 20:
        return True
    return _OOM_STDERR_RE.search(stderr_tail.lower()) is not None


def guest_limits(memory_mb: int) -> dict[str, int]:
    """wasmtime Store.set_limits arguments holding everything a guest can allocate to
    `memory_mb`: its one linear memory, plus one table of at most an eighth of that."""
    limit_bytes = memory_mb << 20
    return {
        "memory_size": limit_bytes,
        "memories": GUEST_MEMORIES,
        "tables": GUEST_TABLES,
        "table_elements": limit_bytes // TABLE_SHARE_OF_MEMORY // TABLE_ELEMENT_BYTES,
        "instances": GUEST_INSTANCES,
    }


def uses_fuel(spec: dict[str, Any]) -> bool:
    """Whether a job counts fuel: only with a budget, since counting costs compute speed."""
    return spec.get("fuel") is not None


def _fuel_used(store: Any, budget: int | None) -> int | None:
    """The fuel the guest used of `budget` (None without one): exact, since the guest
    returned, exited, trapped or ran out of fuel (a timeout never gets here: see
    `_Execution.at_kill`)."""
    if budget is None:
        return None
    try:
        return int(budget - store.get_fuel())
    except Exception:
        traceback.print_exc()
        return None


def _run_module(
    execution: _Execution,
    runtime: _Runtime,
    loaded: _LoadedModule,
    spec: dict[str, Any],
) -> None:
    """Run the job's module once in this process and write its result: the part of a job
    that execute and serve share. Its time limit is its watchdog's, started by the caller
    (it ends this process at the deadline and needs nothing from the run)."""
    job_dir = execution.job_dir
    wasmtime = runtime.wasmtime
    engine = loaded.engine
    memory_mb: int = spec["memory_mb"]
    execution.facts.update(module_compile_s=round(loaded.compile_s, 6), module_cached=loaded.cached)

    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    limit_bytes = memory_mb << 20
    store.set_limits(**guest_limits(memory_mb))
    wasi = wasmtime.WasiConfig()
    # Exactly the argv and env of the spec: nothing of this process's environment.
    wasi.argv = spec["argv"]
    wasi.env = [(name, value) for name, value in spec["env"]]
    stdin_path = os.path.join(job_dir, "stdin")
    if os.path.isfile(stdin_path):
        wasi.stdin_file = stdin_path
    wasi.stdout_file = os.path.join(job_dir, "stdout")
    wasi.stderr_file = os.path.join(job_dir, "stderr")
    # Only what was staged: without these the guest sees no filesystem at all.
    if spec.get("input"):
        wasi.preopen_dir(os.path.join(job_dir, "input"), "/input", False)
    if spec.get("output"):
        wasi.preopen_dir(os.path.join(job_dir, "output"), "/output", True)
    for index, entry in enumerate(spec.get("dirs", [])):
        # A read-only preopen refuses every write (wasmtime's own permissions).
        path = entry.get("host_path")
        path = os.path.join(job_dir, "dirs", str(index)) if path is None else path
        wasi.preopen_dir(os.path.expanduser(path), entry["guest"], not entry["read_only"])
    store.set_wasi(wasi)
    fuel: int | None = spec.get("fuel")
    if fuel is not None:
        store.set_fuel(fuel)

    output_limit: _OutputLimit | None = None
    if spec.get("max_output_bytes"):
        output_dir = os.path.join(job_dir, "output") if spec.get("output") else None
        output_limit = _OutputLimit(execution, spec["max_output_bytes"], output_dir)
        output_limit.start()
    execution.begin_run()

    instance = None
    exit_code: int | None
    state, exit_code, error = "succeeded", 0, None
    try:
        instance = linker.instantiate(store, loaded.module)
        # Before the guest runs: what its watchdog may read of its memory if it ends it.
        execution.watch_memory(_linear_memory_base(wasmtime, instance, store), limit_bytes)
        start = instance.exports(store).get("_start")
        if not isinstance(start, wasmtime.Func):
            state, exit_code, error = "failed", 1, "the module has no _start: not a WASI command"
        else:
            start(store)
    except wasmtime.ExitTrap as exc:
        if exc.code != 0:
            state, exit_code = "failed", exc.code
    except wasmtime.Trap as exc:
        if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            state, exit_code, error = "timeout", 124, f"fuel ran out (budget {fuel} units)"
        else:
            name = exc.trap_code.name if exc.trap_code is not None else "TRAP"
            detail = _one_line(str(exc))
            if detail.startswith("wasm trap: "):
                detail = detail[len("wasm trap: ") :]
            # 134 (SIGABRT's status) is what the wasmtime CLI reports for a trap.
            state, exit_code, error = "failed", 134, f"{name}: {detail}"
    except wasmtime.WasmtimeError as exc:
        message = _one_line(str(exc))
        too_small = _MIN_MEMORY_RE.search(message)
        if instance is None and too_small:
            need_mb = math.ceil(int(too_small.group(1)) * _WASM_PAGE_BYTES / (1 << 20))
            state, exit_code = "out_of_memory", 1
            error = (
                f"the module needs at least {need_mb} MiB of memory to start; "
                f"the limit is {memory_mb} MiB"
            )
        elif instance is None and _STORE_LIMIT_RE.search(message):
            state, exit_code = "out_of_memory", 1
            error = (
                f"the module asks for more than a job may have ({message}): one linear "
                f"memory of up to {memory_mb} MiB and one table of up to "
                f"{guest_limits(memory_mb)['table_elements']} elements"
            )
        else:
            state, exit_code, error = "failed", 1, message
    finally:
        execution.done.set()
    measures = execution.measures()
    peak = _linear_memory_bytes(wasmtime, instance, store)
    if output_limit is not None and output_limit.exceeded():
        state, exit_code, error = "failed", None, output_limit.message
    elif state == "failed" and looks_out_of_memory(peak, limit_bytes, _stderr_tail(job_dir)):
        state = "out_of_memory"
        cause = error or f"exit code {exit_code}"
        error = f"out of memory (limit {memory_mb} MiB): {cause}"
    execution.finish(
        state,
        exit_code,
        error,
        peak_memory_bytes=peak,
        fuel_used=_fuel_used(store, fuel),
        **measures,
    )
    if output_limit is not None:
        output_limit.stop()


def _run_job(execution: _Execution) -> None:
    """execute's job: import wasmtime, load the module, run it."""
    started = time.monotonic()
    job_dir = execution.job_dir
    with open(os.path.join(job_dir, "spec.json"), "rb") as spec_file:
        spec = json.loads(spec_file.read())
    # Before the module is loaded: a module that takes long to compile counts against the
    # time limit (and the wall-clock cap) like a guest that runs long.
    watchdog = _Watchdog.for_spec(execution, spec, started)
    if watchdog is not None:
        watchdog.start()
    try:
        import wasmtime
    except ImportError as exc:
        execution.finish("failed", 1, f"cannot import wasmtime with {sys.executable}: {exc}")
        return
    runtime = _Runtime(wasmtime, os.path.dirname(os.path.dirname(job_dir)))
    execution.facts["wasmtime_version"] = runtime.version
    try:
        loaded = runtime.load(spec["wasm_sha256"], fuel=uses_fuel(spec))
    except (wasmtime.WasmtimeError, OSError) as exc:
        execution.finish("failed", 1, f"cannot load the module: {_one_line(str(exc))}")
        return
    _run_module(execution, runtime, loaded, spec)


def _execute(job_dir: str, run: Callable[[_Execution], None]) -> NoReturn:
    """Be the job's process: record the pid, run, make sure of a result, and exit at once."""
    try:
        _write_pid_file(job_dir, os.getpid())
    except OSError:
        traceback.print_exc()
    try:
        run_to_a_result(_Execution(job_dir), run)
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        # Skips interpreter teardown, where wasmtime's tokio threads can panic (pitfall 5).
        os._exit(0)


def run_to_a_result(execution: _Execution, run: Callable[[_Execution], None]) -> None:
    """Run a job (unless a cancel already wrote its result); whatever `run` raises becomes
    a failed result naming it, so the job always has an end on disk."""
    try:
        # A cancel that came before we started has written the result already.
        if not os.path.exists(execution.result_path):
            run(execution)
    except BaseException as exc:
        traceback.print_exc()
        error = _one_line(f"runner error: {type(exc).__name__}: {exc}")
        execution.finish("failed", 1, error, **execution.measures())


def _cmd_execute(job_dir_argument: str) -> NoReturn:
    _execute(os.path.abspath(job_dir_argument), _run_job)


def _ignore_signal(signum: int, frame: Any) -> None:
    """A Python-level handler, so that the signal reaches the wakeup fd."""
