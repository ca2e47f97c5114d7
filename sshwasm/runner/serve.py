"""The serve command: launch requests over one channel, each task run by one of a pool of
executor processes forked from serve (wasmtime and the module already loaded), a fresh
Store per task; results answered in frames keyed by job id.

An executor runs tasks in turn: a fork per task cost the host about 7.5 ms, more than a tiny
task itself. It is replaced only when a task must be killed (its time limit,
a cancel, a kill from outside) or leaves process state behind (an output cap's rlimit);
serve starts one when a task comes and none is idle, so there are as many as tasks run at
once (the host's reserved cpus)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from .execute import (
    _Execution,
    _ignore_signal,
    _load_module,
    _LoadedModule,
    _run_module,
    _Runtime,
    _Watchdog,
    job_limit,
    run_to_a_result,
    uses_fuel,
)
from .jobdir import (
    DEAD_GRACE_S,
    JOB_ID_RE,
    _create_atomically,
    _describe_wait_status,
    _error_json,
    _make_result,
    _one_line,
    _wasmtime_version,
    _workdir,
    _write_died_result,
    _write_pid_file,
)
from .launch import _LaunchRefused, _set_up_job
from .parent_death import WORKER_STOPPED, die_with_parent, ends_with_parent, kill_group
from .protocol import (
    CHUNK_BYTES,
    KIND_ERROR,
    KIND_HELLO,
    KIND_LAUNCH,
    KIND_NEED,
    KIND_RESULT,
    KIND_STARTED,
    KIND_STDERR,
    KIND_STDOUT,
    SERVE_MAX_REQUEST_BYTES,
    FrameDecoder,
    FrameError,
    encode_frame,
    runner_version,
)
from .stream import (
    POLL_MAX_S,
    POLL_MIN_S,
    _CoordinatorGone,
    _detach_stdout,
    _FrameWriter,
    _read_result,
)

# ----------------------------------------------------------------------------- serve

# A job directory's pid files, in the order _write_pid_file writes them.
PID_FILE_NAMES = ("pid-start", "pid")
# Ended tasks' frames are gathered into one write up to about this much (then written, so a
# task that printed a lot is never held whole in memory).
SETTLE_WRITE_BYTES = 4 * CHUNK_BYTES
# Under a Dask worker (parent_death.py), how long a task's S frame waits for the task's
# outcome, to go out in the same write: the worker's plugin reads a task's frames only with
# its answer, and an S frame of its own cost serve a write and the worker a wake-up per
# task. A task that runs longer has its S frame sent then (a test follows its pid by it).
HELD_STARTED_S = 0.05


def _log_appender(path: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        with contextlib.suppress(OSError), open(path, "a") as log_file:
            log_file.write(line + "\n")

    return log


class _ServeRuntime(_Runtime):
    """serve's runtime: wasmtime imported once, engines and modules kept across tasks.

    serve forks a child per task, and a child inherits none of its parent's threads, only
    their bookkeeping: it hangs at the first use of a thread pool whose threads existed in
    the parent. Measured with wasmtime-py 50: running a guest starts a tokio pool (forked
    children then hang in WASI calls), compiling starts a compile pool, while importing,
    creating engines and deserializing start no thread. So this process only deserializes;
    a module missing from the precompiled cache is compiled by a short-lived forked helper
    (in parallel, as execute does) that writes the cache; guests run only in the children.
    """

    def __init__(self, wasmtime: Any, workdir: str) -> None:
        super().__init__(wasmtime, workdir)
        self._modules: dict[tuple[str, bool], _LoadedModule] = {}

    def config(self, fuel: bool = False) -> Any:
        config = super().config(fuel)
        # Compiling here happens only if the helper could not fill the cache: then serially,
        # so that no thread pool is left behind.
        config.parallel_compilation = False
        return config

    def load_for_task(
        self, sha: str, log_path: str, deadline: float | None, fuel: bool = False
    ) -> _LoadedModule:
        """The module for a task, loaded once per serve; what loading cost goes to the first.

        A compile that runs past `deadline` (time.monotonic) is killed: _CompileTimeout.
        """
        known = self._modules.get((sha, fuel))
        if known is not None:
            return _LoadedModule(known.engine, known.module, 0.0, True)
        module_path, cache_path = self.module_paths(sha, fuel)
        helper_s = 0.0
        if not os.path.isfile(cache_path):
            helper_s = self._compile_in_helper(module_path, cache_path, log_path, deadline, fuel)
        loaded = self.load(sha, _log_appender(log_path), fuel)
        if helper_s and loaded.cached:
            loaded = _LoadedModule(loaded.engine, loaded.module, helper_s, False)
        self._modules[(sha, fuel)] = loaded
        return loaded

    def _compile_in_helper(
        self,
        module_path: str,
        cache_path: str,
        log_path: str,
        deadline: float | None,
        fuel: bool = False,
    ) -> float:
        started = time.monotonic()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    os.dup2(log_fd, 2)
                    engine = self.wasmtime.Engine(_Runtime.config(self, fuel))
                    _load_module(self.wasmtime, engine, module_path, cache_path)
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(0)
        finally:
            os.close(log_fd)
        if not _wait_for_child(pid, deadline):
            # A compile bomb must not hold serve (and every task behind it) past the limit.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise _CompileTimeout
        return time.monotonic() - started


class _CompileTimeout(Exception):
    """serve's compile helper ran past the task's time limit and was killed."""


def _wait_for_child(pid: int, deadline: float | None) -> bool:
    """Reap child `pid`; False if `deadline` (time.monotonic) came first (it still runs)."""
    if deadline is None:
        os.waitpid(pid, 0)
        return True
    delay = POLL_MIN_S
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, POLL_MAX_S)
    return True


class _NotLoaded:
    """How a serve task ends whose module could not be loaded (it still gets S, then R)."""

    def __init__(self, state: str, exit_code: int, error: str) -> None:
        self.state = state
        self.exit_code = exit_code
        self.error = error


class _ServeTask:
    """A task serve forked, until its result has been sent."""

    def __init__(self, key: str, job_dir: str) -> None:
        self.key = key
        self.job_dir = job_dir
        self.status = 0
        self.ended_at = 0.0


class _Executor:
    """A pooled executor process, as serve sees it: its pid and its two pipes."""

    def __init__(self, pid: int, requests: int, done: int) -> None:
        self.pid = pid
        self.requests = requests  # serve writes one JSON line per task
        self.done = done  # the executor writes a byte per task ended: b"d" idle, b"x" exiting
        self.reusable = True
        # The job directory whose pid files name this executor (its first task's): later
        # tasks get them as hard links (_pid_files), not two new files written each.
        self.pid_files_in: str | None = None


class _Server:
    """The serve command: launch requests in, tasks to pooled executors, results out."""

    def __init__(self, writer: _FrameWriter, workdir: str, stdin_fd: int) -> None:
        self.writer = writer
        self.workdir = workdir
        self.stdin_fd = stdin_fd
        self.runtime: _ServeRuntime | None = None
        self.accepting = True
        self.coordinator_gone = False
        self.running: dict[int, _ServeTask] = {}  # by the pid of the executor running it
        self.executors: dict[int, _Executor] = {}
        self.idle: list[_Executor] = []
        self.ended: list[_ServeTask] = []
        self.killed = 0  # executors that died with their task, to replace (_replace_killed)
        # S frames of the tasks started in this turn of the loop: sent with the turn's O/E/R
        # frames (_settle) in one write, not a write each (and a wake-up of the relay and
        # the coordinator each).
        self.started_frames: list[bytes] = []
        # Under a Dask worker: each running task's S frame, by key, with when it is sent
        # anyway (HELD_STARTED_S); sent with the task's outcome if that comes first.
        self.held_started: dict[str, tuple[float, bytes]] = {}
        self.jobs_dir_made = False  # WORKDIR/jobs, made (if missing) by the first task
        self.decoder = FrameDecoder(SERVE_MAX_REQUEST_BYTES)
        self._wake_r, self._wake_w = os.pipe()
        # Under a Dask worker, its guests end with it (parent_death.py).
        self.end_with_parent = ends_with_parent()
        self.parent_gone = False
        self.pid = os.getpid()

    def serve(self) -> int:
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        # SIGCHLD writes a byte to the pipe, so select() wakes when a task ends.
        previous = signal.signal(signal.SIGCHLD, _ignore_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        previous_term = signal.getsignal(signal.SIGTERM)
        if self.end_with_parent:
            signal.signal(signal.SIGTERM, self._on_term)
        try:
            while self.accepting or self.running or self.ended:
                readable = [self._wake_r] + ([self.stdin_fd] if self.accepting else [])
                readable += [self.executors[pid].done for pid in self.running]
                ready, _, _ = select.select(readable, [], [], self._settle_timeout())
                if self._wake_r in ready:
                    with contextlib.suppress(OSError):
                        while os.read(self._wake_r, 4096):
                            pass
                try:
                    self._collect_done(ready)
                    self._reap()
                    if self.stdin_fd in ready:
                        self._read_requests()
                    if self.parent_gone:
                        self._end_with_parent()
                    self._settle()
                    self._replace_killed()
                except _CoordinatorGone:
                    self._lose_coordinator()
        finally:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, previous)
            signal.signal(signal.SIGTERM, previous_term)
            os.close(self._wake_r)
            os.close(self._wake_w)
            # Idle executors read EOF and exit; a busy one (serve lost) finishes first.
            for executor in self.executors.values():
                for fd in (executor.requests, executor.done):
                    with contextlib.suppress(OSError):
                        os.close(fd)
        return 0

    # -- requests

    def _read_requests(self) -> None:
        try:
            data = os.read(self.stdin_fd, 1 << 16)
        except OSError:
            data = b""
        if not data:
            self.accepting = False  # EOF: finish what runs, then exit
            self.parent_gone = self.end_with_parent  # ... unless the worker is gone
            return
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self._refuse_session("protocol", exc)
            return
        for kind, payload in frames:
            if not self.accepting:
                return
            if kind == KIND_HELLO:
                self._hello(payload)
            elif kind == KIND_LAUNCH and self.runtime is not None:
                self._launch(payload)
            elif kind == KIND_LAUNCH:
                self._refuse_session("protocol", "an L request came before the H handshake")
            else:
                self._refuse_session("protocol", f"unknown request kind {kind!r}")

    def _refuse_session(self, kind: str, message: object) -> None:
        """An X frame about no task (empty key); after a protocol error, accept nothing more."""
        self.writer.send_keyed(KIND_ERROR, "", _error_json(kind, message))
        if kind == "protocol":
            self.accepting = False

    def _hello(self, payload: bytes) -> None:
        if self.runtime is not None:
            self._refuse_session("protocol", "a second H handshake")
            return
        try:
            value = json.loads(payload)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            self._refuse_session("protocol", f"unreadable H handshake: {exc}")
            return
        if value.get("runner_version") != runner_version():
            self.writer.send_json(KIND_NEED, {"need": "runner"})
            self.accepting = False
            return
        try:
            import wasmtime
        except Exception as exc:
            error = _one_line(f"cannot import wasmtime with {sys.executable}: {exc}")
            self._send_hello(_wasmtime_version(), error)
            self.accepting = False
            return
        self.runtime = _ServeRuntime(wasmtime, self.workdir)
        self._send_hello(self.runtime.version, None)

    def _send_hello(self, version: str | None, error: str | None) -> None:
        hello = {"pid": os.getpid(), "wasmtime_version": version, "error": error}
        self.writer.send_json(KIND_HELLO, hello)

    def _launch(self, payload: bytes) -> None:
        started = time.monotonic()
        runtime = self.runtime
        assert runtime is not None
        line, _, rest = payload.partition(b"\n")
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError("the spec is not a JSON object")
        except ValueError as exc:
            self._refuse_session("spec", f"unreadable launch spec: {exc}")
            return
        key = raw.get("key")
        if not isinstance(key, str) or not JOB_ID_RE.fullmatch(key):
            self._refuse_session("spec", f"invalid key {key!r}: the job id of the task")
            return
        job_dir = os.path.join(self.workdir, "jobs", key)
        try:
            spec = _set_up_job(
                self.workdir,
                job_dir,
                raw,
                io.BytesIO(rest),
                check_wasmtime=False,
                jobs_dir_made=self.jobs_dir_made,
            )
            self.jobs_dir_made = True
        except _LaunchRefused as refused:
            self.writer.send_keyed(refused.frame_kind, key, json.dumps(refused.answer).encode())
            return
        log_path = os.path.join(job_dir, "runner.log")
        # As under execute, loading the module counts against the task's time limit.
        limit = job_limit(spec)
        deadline = None if limit is None else started + limit
        loaded: _LoadedModule | _NotLoaded
        try:
            loaded = runtime.load_for_task(
                spec["wasm_sha256"],
                log_path,
                deadline,
                uses_fuel(spec),
            )
        except _CompileTimeout:
            error = f"time limit of {limit:g} s exceeded while compiling the module"
            loaded = _NotLoaded("timeout", 124, error)
        except (runtime.wasmtime.WasmtimeError, OSError) as exc:
            # As under execute: the task runs and fails with this as its result.
            loaded = _NotLoaded("failed", 1, f"cannot load the module: {_one_line(str(exc))}")
        try:
            pid = self._dispatch(job_dir, spec, loaded, log_path, started)
        except OSError as exc:
            shutil.rmtree(job_dir, ignore_errors=True)
            self.writer.send_keyed(KIND_ERROR, key, _error_json("io", exc))
            return
        self.running[pid] = _ServeTask(key, job_dir)
        answer = {"pid": pid, "job_dir": job_dir}
        frame = encode_frame(KIND_STARTED, key.encode() + b"\n" + json.dumps(answer).encode())
        if self.end_with_parent:  # sent with its outcome, or once HELD_STARTED_S passed
            self.held_started[key] = (time.monotonic() + HELD_STARTED_S, frame)
        else:  # sent at the end of this turn (_settle), before any other frame about it
            self.started_frames.append(frame)

    def _on_term(self, signum: int, frame: object) -> None:
        self.parent_gone = True  # the wakeup fd wakes the loop, which ends the tasks

    def _end_with_parent(self) -> None:
        """The Dask worker is gone: kill every task, each with a result saying so (a
        guest that ended just before keeps its own), and accept nothing more."""
        self.accepting = False
        for pid, task in self.running.items():
            with contextlib.suppress(OSError):
                result = _make_result("failed", None, WORKER_STOPPED)
                _create_atomically(os.path.join(task.job_dir, "result.json"), result)
            kill_group(pid)

    # -- tasks

    def _dispatch(
        self,
        job_dir: str,
        spec: dict[str, Any],
        loaded: _LoadedModule | _NotLoaded,
        log_path: str,
        started: float,
    ) -> int:
        """Hand the task to an idle executor (started if none is); its pid."""
        request: dict[str, Any] = {
            "job_dir": job_dir,
            "spec": spec,
            "log_path": log_path,
            "started": started,  # time.monotonic: one clock for every process of the host
        }
        if isinstance(loaded, _NotLoaded):
            request["not_loaded"] = [loaded.state, loaded.exit_code, loaded.error]
        else:
            request["module"] = [spec["wasm_sha256"], uses_fuel(spec)]
            request["compile_s"], request["cached"] = loaded.compile_s, loaded.cached
        line = json.dumps(request).encode() + b"\n"
        for attempt in range(3):
            executor = self.idle.pop() if self.idle else self._start_executor()
            try:
                _write_all(executor.requests, line)
                break
            except OSError:
                # It died while idle (killed from outside): the reaper collects it.
                executor.reusable = False
                if attempt == 2:
                    raise
        with contextlib.suppress(OSError):
            # Here, not in the executor: it then exists once S is sent (cancel reads it).
            self._pid_files(job_dir, executor)
        return executor.pid

    @staticmethod
    def _pid_files(job_dir: str, executor: _Executor) -> None:
        """The job's pid files, naming its executor: hard links to those of the executor's
        first job (a link appears whole, as a rename does; their content is the same for
        the executor's life, and nothing rewrites a pid file in place), else written."""
        source = executor.pid_files_in
        if source is not None:
            try:
                for name in PID_FILE_NAMES:  # pid-start first, as _write_pid_file
                    os.link(os.path.join(source, name), os.path.join(job_dir, name))
                return
            except OSError:
                pass  # the first job's directory was removed (or no pid-start): written
        _write_pid_file(job_dir, executor.pid)
        executor.pid_files_in = job_dir

    def _start_executor(self) -> _Executor:
        requests_r, requests_w = os.pipe()
        done_r, done_w = os.pipe()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(requests_w)
            os.close(done_r)
            self._become_executor(requests_r, done_w)
        os.close(requests_r)
        os.close(done_w)
        os.set_blocking(done_r, False)
        executor = self.executors[pid] = _Executor(pid, requests_w, done_r)
        return executor

    def _collect_done(self, ready: list[int]) -> None:
        """Tasks whose executor said they ended; the executor is idle again (or exiting)."""
        now = time.monotonic()
        for pid in list(self.running):
            executor = self.executors[pid]
            if executor.done not in ready:
                continue
            try:
                said = os.read(executor.done, 64)
            except BlockingIOError:
                continue
            except OSError:
                said = b""
            if not said:
                executor.reusable = False  # it died: the reaper ends its task
                continue
            task = self.running.pop(pid)
            task.ended_at = now
            self.ended.append(task)
            if said.endswith(b"d") and executor.reusable:
                self.idle.append(executor)
            else:
                executor.reusable = False

    def _become_executor(self, requests_fd: int, done_fd: int) -> NoReturn:
        """In a forked executor: detach from serve's session and streams, then run the
        tasks serve sends, one at a time, until EOF or a task that leaves state behind.
        Never returns into serve's loop."""
        try:
            # A new session: cancel kills its group, and serve's end does not reach it.
            os.setsid()
            if self.end_with_parent:
                die_with_parent(self.pid)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for other in self.executors.values():  # siblings' pipes: not ours to hold
                os.close(other.requests)
                os.close(other.done)
            # Serve's frames are not ours to read or write: stdin, stdout and (between
            # tasks) stderr are /dev/null; during a task stderr is its runner.log.
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.chdir("/")
            requests = os.fdopen(requests_fd, "rb")
            while True:
                line = requests.readline()
                if not line:
                    break
                reusable = self._run_pooled(json.loads(line), devnull)
                _write_all(done_fd, b"d" if reusable else b"x")
                if not reusable:
                    break
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            # Skips interpreter teardown, where wasmtime's tokio threads can panic.
            os._exit(0)

    def _run_pooled(self, request: dict[str, Any], devnull: int) -> bool:
        """Run one task in this executor exactly as execute would, a fresh Store and
        Execution; whether this process may run another (no state left behind)."""
        import resource

        runtime = self.runtime
        assert runtime is not None
        job_dir = request["job_dir"]
        log_fd = os.open(request["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        file_size_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        try:
            # No pid file of its own: serve wrote this process's pid into the job's before
            # its S frame (_dispatch), and a pooled executor's pid is the same every task.
            run_to_a_result(
                _Execution(job_dir), lambda execution: self._run_task(execution, runtime, request)
            )
        finally:
            with contextlib.suppress(BaseException):
                sys.stderr.flush()
            os.dup2(devnull, 2)
        # An output cap puts back its rlimit, signal handler and wakeup fd when the task
        # ends (execute._OutputLimit.stop); a task that did not (it raised) is not trusted.
        return resource.getrlimit(resource.RLIMIT_FSIZE) == file_size_limit

    @staticmethod
    def _run_task(execution: _Execution, runtime: _ServeRuntime, request: dict[str, Any]) -> None:
        spec = request["spec"]
        execution.facts["wasmtime_version"] = runtime.version
        not_loaded = request.get("not_loaded")
        if not_loaded is not None:
            execution.finish(*not_loaded)
            return
        sha, fuel = request["module"]
        # Loaded once per executor: by serve before the fork, or here from the cache that
        # serve's compile helper filled (deserializing starts no thread pool). A module
        # counting fuel is compiled by its own engine: a key of its own.
        known = runtime._modules.get((sha, fuel))
        if known is None:
            known = runtime._modules[(sha, fuel)] = runtime.load(
                sha, _log_appender(request["log_path"]), fuel
            )
        loaded = _LoadedModule(known.engine, known.module, request["compile_s"], request["cached"])
        # Counted from when serve got the task, so the time its module took to load is
        # not given again.
        watchdog = _Watchdog.for_spec(execution, spec, request["started"])
        if watchdog is not None:
            watchdog.start()
        _run_module(execution, runtime, loaded, spec)

    def _reap(self) -> None:
        while self.executors:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            executor = self.executors.pop(pid, None)
            if executor is None:
                continue
            if executor in self.idle:
                self.idle.remove(executor)
            for fd in (executor.requests, executor.done):
                with contextlib.suppress(OSError):
                    os.close(fd)
            # Killed (a cancel, its time limit's watchdog, from outside) mid-task.
            task = self.running.pop(pid, None)
            if task is not None:
                task.status, task.ended_at = status, time.monotonic()
                self.ended.append(task)
                self.killed += 1

    def _replace_killed(self) -> None:
        """Start an idle executor for each one that died with its task (its time limit, a
        cancel), once that task's frames are out: the fork is made while the coordinator
        answers, and the next task finds the pool as it was (benchmarks/timeouts.py)."""
        killed, self.killed = self.killed, 0
        for _ in range(killed if self.accepting else 0):
            try:
                self.idle.append(self._start_executor())
            except OSError:
                return  # the next task starts one when it comes (_dispatch)

    def _settle_timeout(self) -> float | None:
        timeout = None
        if self.ended:
            first = min(task.ended_at for task in self.ended)
            timeout = max(0.01, first + DEAD_GRACE_S - time.monotonic())
        if self.held_started:
            held = min(due for due, _ in self.held_started.values()) - time.monotonic()
            timeout = max(0.0, held if timeout is None else min(timeout, held))
        return timeout

    def _settle(self) -> None:
        """Send the outcome of every ended task whose result is on disk: the frames of all
        of them in one write (each task's stdout, stderr and R frames, in that order), so
        a burst of tasks ending costs the channel and the coordinator one wake-up; the S
        frames of the tasks started in this turn go first in the same write."""
        now = time.monotonic()
        frames = [] if self.coordinator_gone else self.started_frames
        self.started_frames = []
        for key, (due, frame) in list(self.held_started.items()):
            if due <= now or self.coordinator_gone:
                del self.held_started[key]
                if not self.coordinator_gone:
                    frames.append(frame)
        for task in list(self.ended):
            result_path = os.path.join(task.job_dir, "result.json")
            if not os.path.exists(result_path):
                # A cancel kills first and writes its result next: give it that moment.
                if now - task.ended_at < DEAD_GRACE_S:
                    continue
                reason = "runner process died without a result"
                with contextlib.suppress(OSError):
                    _write_died_result(
                        task.job_dir, f"{reason} ({_describe_wait_status(task.status)})"
                    )
            self.ended.remove(task)
            held = self.held_started.pop(task.key, None)
            if not self.coordinator_gone:
                if held is not None:
                    frames.append(held[1])
                self._outcome_frames(task, result_path, frames)
                if sum(map(len, frames)) >= SETTLE_WRITE_BYTES:
                    self.writer.send_raw(b"".join(frames))  # big outputs: not all held
                    frames.clear()
        if frames:
            self.writer.send_raw(b"".join(frames))

    def _outcome_frames(self, task: _ServeTask, result_path: str, frames: list[bytes]) -> None:
        """Append a task's output and result frames (encoded) to `frames`."""
        key = task.key.encode() + b"\n"
        for name, kind in (("stdout", KIND_STDOUT), ("stderr", KIND_STDERR)):
            self._file_frames(kind, key, os.path.join(task.job_dir, name), frames)
        try:
            result = _read_result(result_path)
        except OSError as exc:
            result = _make_result("failed", None, f"cannot read the result: {exc}")
        frames.append(encode_frame(KIND_RESULT, key + result))

    def _file_frames(self, kind: bytes, key: bytes, path: str, frames: list[bytes]) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # the task ended before its output files were made
        try:
            offset = 0
            while True:
                chunk = os.pread(fd, CHUNK_BYTES, offset)
                if not chunk:
                    return
                frames.append(encode_frame(kind, key + chunk))
                offset += len(chunk)
                if sum(map(len, frames)) >= SETTLE_WRITE_BYTES:
                    self.writer.send_raw(b"".join(frames))
                    frames.clear()
        finally:
            os.close(fd)

    def _lose_coordinator(self) -> None:
        # The tasks keep running and write their results to disk; serve stays only to reap.
        self.coordinator_gone = True
        self.accepting = False
        _detach_stdout()


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to a blocking pipe."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _cmd_serve(writer: _FrameWriter, workdir_argument: str) -> int:
    try:
        return _Server(writer, _workdir(workdir_argument), sys.stdin.fileno()).serve()
    except OSError as exc:
        # Tasks already forked run on and write their results; attach collects them.
        writer.send_keyed(KIND_ERROR, "", _error_json("io", exc))
        return 0
