"""What every Dask worker of an sshwasm pool loads (`dask worker --preload FILE`).

This file is copied to each host by `sshwasm pool up` (as `<workdir>/dask/sshwasm_preload.py`)
and runs in the host's Python beside `distributed`, so it imports nothing from sshwasm: only
the standard library and distributed.

It registers the `sshwasm-runner` worker plugin. The plugin does not run guests in the
worker's own process: it keeps one `serve` child of the host's unmodified runner (the runner
that `sshwasm hosts install` and `pool up` put in `<workdir>/bin`), the same program the SSH
engine's arrays use, so memory and time limits, cancel and `result.json` on the host's disk
work as they do there, and a guest that crashes cannot take the worker down.

Unlike under the SSH engine, a guest never outlives its worker: serve runs with
`SSHWASM_SERVE_END_WITH_PARENT=1` (runner/parent_death.py), so when the worker stops, is
killed, or `pool down` signals its process group, serve kills every guest. Dask then runs
the task again elsewhere (`Reschedule` if this worker is still there to say so); the
killed run's answer is never returned. Each task started is told to the scheduler as an
event (`STARTED_TOPIC`), so that `jobs` shows where it runs; a job cancelled here is
remembered, so that its task never starts after the cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from distributed import Reschedule
from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN_NAME = "sshwasm-runner"
# Set by `pool up`'s launcher for the worker: the host's sshwasm workdir (absolute).
WORKDIR_VARIABLE = "SSHWASM_WORKDIR"
RUNNER_PACKAGE = "sshwasm_exec"
# The limits of arrays (engines/dask_limits_plugin.py), preloaded beside this file.
LIMITS_MODULE = "sshwasm_limits"
# The scheduler's event topic of tasks handed to serve: {"started": [{"base", "key", "host",
# "at"}, ...]}, the tasks started here since the last event.
STARTED_TOPIC = "sshwasm-started"
# How long a start waits to be told, with those that follow it, in one event: an event per
# task cost the worker, the scheduler and every client that follows a message per task.
STARTED_EVERY_S = 0.1
# serve's environment under a worker (runner/parent_death.py, which this must not import).
END_WITH_PARENT_VARIABLE = "SSHWASM_SERVE_END_WITH_PARENT"
# The error of serve's result for a task it killed because this worker stops (the same text
# as runner/parent_death.py's WORKER_STOPPED, which a test holds them to).
WORKER_STOPPED = "killed with its Dask worker, which stopped before the task ended"
# How long a cancel is remembered: a task already handed to this worker when its job was
# cancelled (Dask stops it only before it runs) comes within moments; a job resumed later
# must run.
CANCEL_MEMORY_S = 60.0
# How long `cancel` waits for a task just handed to serve to have its job directory.
CANCEL_SETTLE_S = 5.0
# How often at most the worker writes to the scheduler's stream (Dask's own: 2 ms): under a
# stream of tiny tasks each write carried one task's end, a TLS write here and a read in the
# scheduler per task (benchmarks/dask_array.py). A message after a quiet spell still goes
# at once (Dask's batching waits only between writes), so a lone job is not slowed.
SCHEDULER_SEND_EVERY_S = 0.05


def runner_home(workdir: str) -> str:
    """The directory of the current runner version (`<workdir>/bin/<version>`)."""
    with open(os.path.join(workdir, "bin", "current")) as pointer:
        version = pointer.read().strip()
    return os.path.join(workdir, "bin", version)


class ServeLost(RuntimeError):
    """The serve child ended before answering a task: the task's fate is unknown here."""


class Cancelled(RuntimeError):
    """The task's job was cancelled (`sshwasm cancel`) before it started here."""


class _Waiting:
    """One task's frames, collected by the reader (in the worker's event loop) until a
    final one arrives; a task of the event loop (`run_async`) awaits `future`, one of a
    thread (`run`) waits on `done`."""

    def __init__(self, future: asyncio.Future[None] | None = None) -> None:
        self.frames: list[tuple[bytes, bytes]] = []
        self.done = threading.Event()
        self.lost = False
        self.future = future

    def finish(self, lost: bool = False) -> None:
        """The task's answer is complete (or, `lost`, will never come). Called in the event
        loop, or from another thread only when serve is stopped (`_serve_ended`)."""
        if self.done.is_set():
            return
        self.lost = lost
        self.done.set()
        future = self.future
        if future is not None:
            loop = future.get_loop()
            if _in_loop(loop):
                _resolve(future)
            else:
                loop.call_soon_threadsafe(_resolve, future)


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# How much of serve's stdout one read takes (more is read on the next turn of the loop): a
# pipe's buffer, not a 1 MiB buffer made (and shrunk) per wake-up for a tiny task's frames.
READ_BYTES = 1 << 16
# A launch frame larger than this is written to serve from a thread, not from the worker's
# event loop, which must not wait while serve reads a task's stdin and input.
LOOP_WRITE_MAX = 1 << 16


class RunnerPlugin(WorkerPlugin):
    """The worker's link to the host's runner: a `serve` child started on first use.

    Tasks share the child: each sends an L frame with a key of its own, and the reader,
    a callback of the worker's event loop on serve's stdout, hands each answer frame to
    the task it names. A plain job's task runs in the event loop itself (`run_async`:
    no thread of the worker's pool is woken for it, and no reader thread hands it its
    answer); a task of a limited array or with dependencies runs in the pool (`run`).
    """

    name = PLUGIN_NAME

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.worker: Any = None
        self.lock = threading.Lock()
        # Held while a frame is written to serve's stdin (never with `lock`: the reader
        # takes `lock`, and serve reads its stdin only while its stdout is read).
        self.write_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.serve: subprocess.Popen[bytes] | None = None
        self.waiting: dict[str, _Waiting] = {}
        self.protocol: Any = None
        self.counter = 0
        # Job keys (the part before the first '.') cancelled here lately: not to start.
        self.cancelled: dict[str, float] = {}
        self.closing = False
        # What runs here (by run key, its started event), and the starts not told yet.
        self.runs: dict[str, dict[str, str]] = {}
        self.untold: list[dict[str, str]] = []

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self.loop = worker.loop.asyncio_loop
        stream = getattr(worker, "batched_stream", None)
        if stream is not None and hasattr(stream, "interval"):
            stream.interval = max(stream.interval, SCHEDULER_SEND_EVERY_S)
        # The serve child (a Python with the runner and wasmtime imported) is started now,
        # beside the worker's start, not by the first task, which would wait for it.
        threading.Thread(target=self._warm, daemon=True, name="sshwasm-warm").start()

    def _warm(self) -> None:
        with contextlib.suppress(Exception), self.lock:  # the first task starts it instead
            self.serve_process()

    def _runner(self) -> tuple[str, Any]:
        """The runner's home and its protocol module (imported from the host's runner)."""
        home = runner_home(self.workdir)
        if self.protocol is None:
            if home not in sys.path:
                sys.path.insert(0, home)
            import importlib

            self.protocol = importlib.import_module(RUNNER_PACKAGE + ".protocol")
        return home, self.protocol

    def _runner_argv(self, home: str, *args: str) -> list[str]:
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); "
            f"from {RUNNER_PACKAGE}.commands import main; sys.exit(main(sys.argv[2:]))"
        )
        return [sys.executable, "-c", code, home, *args]

    def serve_process(self) -> subprocess.Popen[bytes]:
        """The running `serve` child, started and greeted when needed (call with the lock).

        It stays in the worker's process group, so stopping the worker's group stops it,
        and it kills its guests when the worker goes (END_WITH_PARENT_VARIABLE).
        """
        if self.serve is not None and self.serve.poll() is None:
            return self.serve
        home, protocol = self._runner()
        serve = subprocess.Popen(
            self._runner_argv(home, "serve", self.workdir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, **{END_WITH_PARENT_VARIABLE: "1"}),
        )
        assert serve.stdin is not None and serve.stdout is not None
        serve.stdin.write(protocol.encode_frame(protocol.KIND_HELLO, protocol.encode_hello()))
        serve.stdin.flush()
        decoder = protocol.FrameDecoder()
        frames: list[tuple[bytes, bytes]] = []
        while not frames:
            chunk = os.read(serve.stdout.fileno(), 65536)
            if not chunk:
                raise ServeLost("the runner's serve ended before its hello")
            frames = decoder.feed(chunk)
        kind, payload = frames.pop(0)
        if kind != protocol.KIND_HELLO:
            serve.kill()
            raise ServeLost(f"the runner's serve answered {kind!r}: {payload[:200]!r}")
        self.serve = serve
        loop = self.loop
        assert loop is not None  # set by setup(), before any task
        loop.call_soon_threadsafe(self._watch, serve, decoder, frames)
        return serve

    def _watch(
        self, serve: subprocess.Popen[bytes], decoder: Any, early: list[tuple[bytes, bytes]]
    ) -> None:
        """In the event loop: read serve's stdout whenever it has bytes (`_readable`)."""
        assert serve.stdout is not None and self.loop is not None
        self._dispatch(early)
        try:
            self.loop.add_reader(serve.stdout.fileno(), self._readable, serve, decoder)
        except (OSError, ValueError):  # it ended (and its pipe was closed) meanwhile
            self._serve_ended(serve)

    def _readable(self, serve: subprocess.Popen[bytes], decoder: Any) -> None:
        assert serve.stdout is not None
        try:
            chunk = os.read(serve.stdout.fileno(), READ_BYTES)
            if chunk:
                self._dispatch(decoder.feed(chunk))
                return
        except Exception:  # a broken pipe, or frames the runner never sends: it is lost
            pass
        self._serve_ended(serve)

    def _dispatch(self, frames: list[tuple[bytes, bytes]]) -> None:
        """Each frame to the task its key names; a final frame completes the task."""
        final = (self.protocol.KIND_RESULT, self.protocol.KIND_NEED, self.protocol.KIND_ERROR)
        for kind, payload in frames:
            key, _, body = payload.partition(b"\n")
            with self.lock:
                waiting = self.waiting.get(key.decode(errors="replace"))
            if waiting is None:
                continue
            waiting.frames.append((kind, body))
            if kind in final:
                waiting.finish()

    def _serve_ended(self, serve: subprocess.Popen[bytes]) -> None:
        """Serve's stdout ended: the tasks waiting for it never get their answers."""
        assert serve.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            if self.loop is not None:
                self.loop.remove_reader(serve.stdout.fileno())
        with self.lock:
            if self.serve is serve:
                self.serve = None
            lost = list(self.waiting.values())
        for waiting in lost:
            waiting.finish(lost=True)

    def _write(self, serve: subprocess.Popen[bytes], frame: bytes) -> None:
        """One frame to serve's stdin, whole (frames of concurrent tasks never interleave)."""
        assert serve.stdin is not None
        with self.write_lock:
            serve.stdin.write(frame)
            serve.stdin.flush()

    def _check_cancelled(self, key: str) -> None:
        """Raise Cancelled if the job was cancelled here lately (call with the lock)."""
        cancelled_at = self.cancelled.get(key.split(".", 1)[0])
        if cancelled_at is not None and time.monotonic() - cancelled_at < CANCEL_MEMORY_S:
            raise Cancelled(f"job {key.split('.', 1)[0]} was cancelled before it started")

    def _launch(self, key: str, payload: bytes) -> list[tuple[bytes, bytes]]:
        """From a thread of the worker's pool: the task's frames, once it ended."""
        waiting = _Waiting()
        with self.lock:
            self._check_cancelled(key)
            serve = self.serve_process()
            self.waiting[key] = waiting
        try:
            self._write(serve, self.protocol.encode_frame(self.protocol.KIND_LAUNCH, payload))
            waiting.done.wait()
        except OSError as exc:
            raise ServeLost(f"cannot reach the runner's serve: {exc}") from exc
        finally:
            with self.lock:
                self.waiting.pop(key, None)
        if waiting.lost:
            raise ServeLost("the runner's serve ended while the task ran")
        return waiting.frames

    def _serve_ready(self) -> subprocess.Popen[bytes] | None:
        with self.lock:
            return self.serve_process()

    async def _launch_async(self, key: str, payload: bytes) -> list[tuple[bytes, bytes]]:
        """In the worker's event loop: the task's frames, once it ended."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(loop.create_future())
        with self.lock:
            self._check_cancelled(key)
            serve = self.serve
            running = serve is not None and serve.poll() is None
        if not running:  # (re)started from a thread: the loop must not wait for its hello
            serve = await asyncio.to_thread(self._serve_ready)
        assert serve is not None
        with self.lock:
            self._check_cancelled(key)
            self.waiting[key] = waiting
        frame = self.protocol.encode_frame(self.protocol.KIND_LAUNCH, payload)
        try:
            if len(frame) <= LOOP_WRITE_MAX and self.write_lock.acquire(blocking=False):
                try:  # a pipe's buffer takes it at once
                    assert serve.stdin is not None
                    serve.stdin.write(frame)
                    serve.stdin.flush()
                finally:
                    self.write_lock.release()
            else:
                await asyncio.to_thread(self._write, serve, frame)
            assert waiting.future is not None
            await waiting.future
        except OSError as exc:
            raise ServeLost(f"cannot reach the runner's serve: {exc}") from exc
        finally:
            with self.lock:
                self.waiting.pop(key, None)
        if waiting.lost:
            raise ServeLost("the runner's serve ended while the task ran")
        return waiting.frames

    def _put_module(self, sha256: str, module: bytes) -> None:
        home, _ = self._runner()
        done = subprocess.run(
            self._runner_argv(home, "put-module", self.workdir, sha256),
            input=module,
            capture_output=True,
        )
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"cannot store the module: {lines[-1] if lines else 'failed'}")

    def _begin(self, payload: bytes) -> tuple[str, dict[str, Any], bytes]:
        """A run's own key (`<job key>.<host>-<pid>-<n>`: a task that Dask runs again after
        its worker died must not meet the first run's job directory), its spec's header and
        the payload under that key; told to the scheduler as started (`_started`)."""
        line, _, rest = payload.partition(b"\n")
        header = json.loads(line)
        with self.lock:
            self.counter += 1
            count = self.counter
        base = str(header["key"]).split(".", 1)[0]
        key = f"{base}.{self.worker.name}-{os.getpid()}-{count}"[:128]
        header["key"] = key
        payload = json.dumps(header).encode() + b"\n" + rest
        if self.protocol is None:
            self._runner()
        started = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self._started(key, {"base": base, "key": key, "host": str(self.worker.name), "at": started})
        return key, header, payload

    def _next_step(self, frames: list[tuple[bytes, bytes]]) -> bool:
        """Whether serve asked for the module (put it, then launch again); raises
        Reschedule for a run killed with this worker (not the guest's answer: Dask runs
        it again elsewhere)."""
        kind, body = frames[-1]
        if kind == self.protocol.KIND_NEED and json.loads(body).get("need") == "module":
            return True
        if kind == self.protocol.KIND_RESULT and json.loads(body).get("error") == WORKER_STOPPED:
            raise Reschedule()
        return False

    def _answer(self, key: str, frames: list[tuple[bytes, bytes]]) -> bytes:
        """One bytes object (a JSON line, then the frames as the runner encodes them): Dask
        sizes, pickles and sends it whole; a structure cost it a step per item. The head
        says how the run ended, read by the tasks that depend on it (sshwasm_state)."""
        protocol = self.protocol
        state = _final_state(protocol, *frames[-1]) if frames else "lost"
        head = json.dumps({"host": str(self.worker.name), "key": key, "state": state}).encode()
        return b"\n".join([head, b"".join(protocol.encode_frame(*frame) for frame in frames)])

    def run(self, payload: bytes, module: bytes) -> bytes:
        """Run one job through serve, from a thread of the worker's pool: the host, the key
        it ran under, and its frames (`_answer`)."""
        key, header, payload = self._begin(payload)
        try:
            for _attempt in range(2):
                try:
                    frames = self._launch(key, payload)
                except ServeLost:
                    if self.closing:  # serve killed the guest because this worker stops
                        raise Reschedule() from None
                    raise
                if not self._next_step(frames):
                    break
                self._put_module(header["wasm_sha256"], module)
        finally:
            with self.lock:
                self.runs.pop(key, None)
        return self._answer(key, frames)

    async def run_async(self, payload: bytes, module: bytes) -> bytes:
        """`run` in the worker's event loop (a task that is a coroutine function)."""
        key, header, payload = self._begin(payload)
        try:
            for _attempt in range(2):
                try:
                    frames = await self._launch_async(key, payload)
                except ServeLost:
                    if self.closing:
                        raise Reschedule() from None
                    raise
                if not self._next_step(frames):
                    break
                await asyncio.to_thread(self._put_module, header["wasm_sha256"], module)
        finally:
            with self.lock:
                self.runs.pop(key, None)
        return self._answer(key, frames)

    def _started(self, key: str, event: dict[str, str]) -> None:
        """Note a task handed to serve: in `runs` until it ends, and told to the scheduler
        (STARTED_TOPIC) with the others that start within STARTED_EVERY_S."""
        with self.lock:
            self.runs[key] = event
            self.untold.append(event)
            if len(self.untold) > 1:
                return  # a flush is on its way
        self.worker.loop.add_callback(self._tell_later)  # thread-safe, unlike call_later

    def _tell_later(self) -> None:
        self.worker.loop.call_later(STARTED_EVERY_S, self._tell_started)

    def _tell_started(self) -> None:
        """In the worker's event loop: one event for the starts not told yet."""
        with self.lock:
            untold, self.untold = self.untold, []
        if untold:
            self.worker.log_event(STARTED_TOPIC, {"started": untold})

    def running(self) -> list[dict[str, str]]:
        """The started events of the tasks running here now (whenever they started)."""
        with self.lock:
            return list(self.runs.values())

    def cancel(self, base: str) -> list[str]:
        """Cancel (through the runner's `cancel`) whatever runs here for job key `base`, and
        remember it: a task of that job that comes later never starts (`Cancelled`)."""
        with self.lock:
            now = time.monotonic()
            self.cancelled = {
                old: at for old, at in self.cancelled.items() if now - at < CANCEL_MEMORY_S
            }
            self.cancelled[base] = now
            keys = [key for key in self.waiting if key.split(".", 1)[0] == base]
        if not keys:
            return []
        home, _ = self._runner()
        for key in keys:
            # A task handed to serve a moment ago may not have its job directory yet.
            deadline = time.monotonic() + CANCEL_SETTLE_S
            while True:
                done = subprocess.run(
                    self._runner_argv(home, "cancel", self.workdir, key), capture_output=True
                )
                with self.lock:
                    waiting = self.waiting.get(key)
                if done.returncode == 0 or waiting is None or waiting.done.is_set():
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        return keys

    def teardown(self, worker: Any) -> None:
        with self.lock:
            serve, self.serve = self.serve, None
            self.closing = True
        if serve is None or serve.poll() is not None:
            return
        # EOF on its stdin: serve kills what runs (END_WITH_PARENT_VARIABLE) and exits; the
        # tasks it ran are rescheduled (`run`).
        with contextlib.suppress(OSError):
            assert serve.stdin is not None
            serve.stdin.close()
        try:
            serve.wait(5)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()


def sshwasm_job(payload: bytes, module: bytes | tuple[bytes, ...]) -> bytes:
    """The task each job is: hands it to this worker's plugin. The client names it by
    reference (module and name), so the scheduler and the workers, which import this file
    from the pool's directory, pickle and unpickle a name per task, not code.

    `module` is the module, or for a job with --dir copies a tuple of it and their tars,
    which end the launch spec as the runner reads it (dask_staging)."""
    answer, tell_end = _run_limited(payload, module)
    tell_end(answer)
    return answer


async def sshwasm_run(payload: bytes, module: bytes | tuple[bytes, ...]) -> bytes:
    """The task of a job of no limited array and without dependencies: `sshwasm_job` run
    in the worker's event loop (Dask awaits a task that is a coroutine function there),
    not in a thread of its pool: per task, no thread woken to run it and none to hand it
    serve's answer (benchmarks/dask_array.py). Its cpus and memory_mb resources still
    bound how many run at once."""
    from distributed import get_worker

    if isinstance(module, tuple):
        module, *tars = module
        payload = b"".join([payload, *tars])
    plugin: Any = get_worker().plugins[PLUGIN_NAME]
    answer: bytes = await plugin.run_async(payload, module)
    return answer


def _told_nothing(answer: bytes) -> None:
    """A job of no array with --halt-after-failures has nothing to tell its scheduler."""


def _run_limited(
    payload: bytes, module: bytes | tuple[bytes, ...]
) -> tuple[bytes, Callable[[bytes], None]]:
    """One run of the job's guest under its array's limits, and what tells the scheduler
    how the job ended: called with the job's last answer only, as a retried failure is no
    failure of the array until its last attempt (the SSH engine counts final states)."""
    import distributed.worker
    from distributed import get_worker

    if isinstance(module, tuple):
        module, *tars = module
        payload = b"".join([payload, *tars])
    worker = get_worker()
    plugin: Any = worker.plugins[PLUGIN_NAME]
    # --max-running/--halt-after-failures (sshwasm_limits, preloaded beside this file).
    limiter: Any = sys.modules.get(LIMITS_MODULE)
    running: Any = getattr(distributed.worker, "thread_state")  # noqa: B009 (untyped)
    limits = limiter.limits_of(worker, running.key) if limiter is not None else None
    halted = limiter.halted_here(worker, limits) if limits is not None else None
    if halted is not None:  # its array halted: the guest never runs
        return bytes(limiter.halted_answer(str(worker.name), halted)), _told_nothing
    answer: bytes = plugin.run(payload, module)
    if limits is None:
        return answer, _told_nothing

    def tell_end(last: bytes) -> None:
        limiter.tell_failure(worker, limits, plugin.protocol, last)

    return answer, tell_end


# --after, --after-any and --retry-failed (engines/dask_dependencies.py submits these).
# A guest's own failures, retried on the worker with --retry-failed (attempts.GUEST_FAILURES).
GUEST_FAILURES = ("failed", "timeout", "out_of_memory")


def _final_state(protocol: Any, kind: bytes, body: bytes) -> str:
    """How a run ended, from its last frame: the result's state; `failed` for the
    runner's error; `lost` for anything else (the client records it so)."""
    if kind == protocol.KIND_RESULT:
        with contextlib.suppress(ValueError, AttributeError):
            return str(json.loads(body).get("state") or "failed")
        return "failed"
    return "failed" if kind == protocol.KIND_ERROR else "lost"


def _head(answer: bytes) -> dict[str, Any]:
    head: dict[str, Any] = json.loads(bytes(answer).partition(b"\n")[0])
    return head


def sshwasm_state(answer: bytes) -> str:
    """The tiny task a dependant waits for: a dependency's answer reduced to its state,
    run where the answer is, so the answer itself never travels to the dependant."""
    return str(_head(answer).get("state") or "lost")


def sshwasm_flow_job(
    payload: bytes,
    module: bytes | tuple[bytes, ...],
    flow: dict[str, Any],
    states: list[str],
) -> bytes:
    """A job with --after/--after-any (`flow["after"]`: the dependencies' ids, `states`:
    how each ended, the sshwasm_state tasks Dask held this task behind) or --retry-failed
    (`flow["retries"]`: more attempts for the guest's own failure).

    --after with a dependency that did not succeed: the guest never runs; the answer says
    why (`skipped`). Each attempt runs under a key of its own (a job directory of its own);
    the answer is the last attempt's, with each earlier one's head in `earlier` (its
    `length` bytes of frames come first in the body, oldest first)."""
    from distributed import get_worker

    name = str(get_worker().name)
    if not flow.get("after_any"):
        after = list(flow.get("after", []))
        for index, state in enumerate(states):  # (no zip(strict=): hosts' Pythons are 3.9)
            job_id = after[index] if index < len(after) else "?"
            if state != "succeeded":
                reason = f"dependency job {job_id} ended {state}"
                head: dict[str, Any] = {
                    "host": name,
                    "key": "",
                    "state": "cancelled",
                    "skipped": reason,
                }
                return json.dumps(head).encode() + b"\n"
    answer, tell_end = _run_limited(payload, module)
    answers = [answer]
    for _retry in range(int(flow.get("retries", 0))):
        if _head(answers[-1]).get("state") not in GUEST_FAILURES:
            break
        answer, tell_end = _run_limited(payload, module)
        answers.append(answer)
    tell_end(answers[-1])  # an array's failure counts once, at the job's last attempt
    *earlier, last = answers
    if not earlier:
        return last
    heads: list[dict[str, Any]] = []
    bodies: list[bytes] = []
    for answer in earlier:
        head_line, _, body = bytes(answer).partition(b"\n")
        heads.append({**json.loads(head_line), "length": len(body)})
        bodies.append(body)
    head_line, _, body = bytes(last).partition(b"\n")
    head = {**json.loads(head_line), "earlier": heads}
    return b"\n".join([json.dumps(head).encode(), b"".join([*bodies, body])])


async def dask_setup(worker: Any) -> None:
    """Called by distributed once the worker has started."""
    workdir = os.environ.get(WORKDIR_VARIABLE) or os.path.expanduser("~/.sshwasm")
    await worker.plugin_add(RunnerPlugin(workdir), name=PLUGIN_NAME)
