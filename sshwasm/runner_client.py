"""The local client of the runner protocol: launch, stream (attach, poll), cancel, put-module.

The runner (`sshwasm-exec`, the sshwasm.runner package, whose protocol module is the
specification) answers on stdout in frames; this module turns them into callbacks and
outcomes. It installs the runner or uploads the module only when the runner says it needs
them, so a warm job costs one remote command.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HostUnreachable, RemoteError, RunnerUnavailable
from .runner.protocol import (
    FETCH_STOPPED_AT_LIMIT,
    KIND_ALIVE,
    KIND_ERROR,
    KIND_HELLO,
    KIND_LAUNCH,
    KIND_NEED,
    KIND_RESULT,
    KIND_STARTED,
    KIND_STDERR,
    KIND_STDOUT,
    MAX_MESSAGE_BYTES,
    UNSAFE_WORKDIR_EXIT,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    encode_hello,
    encode_launch_spec,
    parse_cancel_answer,
    parse_frame_json,
    parse_info,
    parse_result,
)
from .runner.safetar import ArchiveTooLarge, UnsafeArchive
from .staging import TarExtractor
from .transport import (
    Completed,
    RunnerProcess,
    Transport,
    cannot_start,
    last_line,
    runner_refusal,
)

OutputCallback = Callable[[bytes], object]
# A job launched on a warm serve and running this long has its output streamed (by attach).
WARM_STREAM_AFTER_S = 0.5
# What the connection process's relay exits with when the job never reached serve
# (mux/wire.NOT_LAUNCHED; not imported from there, which would load the mux for every user).
NOT_LAUNCHED = -1
# What fetch-output may send after its archive's end (tar pads to 10 KiB records).
TRAILING_BYTES_MAX = 1 << 20


@dataclass(frozen=True)
class LaunchSpec:
    """What the runner needs to start a job (user words travel here, never in argv)."""

    wasm_sha256: str
    argv: Sequence[str]
    env: Sequence[tuple[str, str]]
    memory_mb: int
    time_limit_s: float | None
    wall_limit_s: float | None = None
    output: bool = False
    max_output_bytes: int | None = None
    # The spec's directories (runner/protocol.py, "dirs", without tar_bytes), and the tar of
    # each staged one in their order (directories.stage_dirs fills both in).
    dirs: tuple[dict[str, Any], ...] = ()
    dir_tars: tuple[bytes, ...] = ()

    @property
    def dir_bytes(self) -> int:
        """What the staged directories add to the launch."""
        return sum(len(tar) for tar in self.dir_tars)

    fuel: int | None = None  # a fuel budget; None: fuel is not counted

    def encode(self, stdin: bytes | None, input_tar: bytes = b"", key: str | None = None) -> bytes:
        """The launch command's stdin: one JSON line, the job's stdin, the input tar, then
        the staged directories' tars."""
        return encode_launch_spec(
            wasm_sha256=self.wasm_sha256,
            argv=list(self.argv),
            env=[(name, value) for name, value in self.env],
            memory_mb=self.memory_mb,
            time_limit_s=self.time_limit_s,
            wall_limit_s=self.wall_limit_s,
            output=self.output,
            max_output_bytes=self.max_output_bytes,
            stdin=stdin,
            input_tar=input_tar,
            key=key,
            dirs=self.dirs,
            dir_tars=self.dir_tars,
            fuel=self.fuel,
        )


@dataclass
class StreamOutcome:
    """What one runner command reported before its stream ended."""

    result: dict[str, Any] | None = None
    need: str | None = None
    error: dict[str, Any] | None = None
    pid: int | None = None
    frames: int = 0
    completed: Completed | None = None

    @property
    def connection_lost(self) -> bool:
        """The stream ended without a final frame because the connection dropped."""
        done = self.completed
        return self.result is None and done is not None and done.exit_status is None


@dataclass
class UploadStats:
    """What launching had to send besides the launch itself."""

    upload_bytes: int = 0
    upload_s: float = 0.0
    runner_installed: bool = False


async def read_frames(
    host: str, process: RunnerProcess, on_stdout: OutputCallback, on_stderr: OutputCallback
) -> StreamOutcome:
    """Consume a runner's frames until its stdout ends."""
    outcome = StreamOutcome()
    decoder = FrameDecoder()
    while chunk := await process.read():
        try:
            for kind, payload in decoder.feed(chunk):
                apply_frame(outcome, kind, payload, on_stdout, on_stderr)
        except ProtocolError as exc:
            process.abort()
            raise broken_answer(host, exc) from exc
    outcome.completed = await process.finish()
    return outcome


def broken_answer(host: str, problem: ProtocolError) -> RemoteError:
    """The error for a host whose runner answered outside the protocol."""
    return RemoteError(host, f"broken answer from the runner: {problem}")


# After these the runner says nothing more about a job.
FINAL_KINDS = (KIND_RESULT, KIND_NEED, KIND_ERROR)


def apply_frame(
    outcome: StreamOutcome,
    kind: bytes,
    payload: bytes,
    on_stdout: OutputCallback,
    on_stderr: OutputCallback,
) -> None:
    """Take one frame about a job into its outcome (output goes to the callbacks).

    Raises ProtocolError for a frame no runner sends: nothing of it is believed.
    """
    if kind == KIND_STDOUT:
        on_stdout(payload)
    elif kind == KIND_STDERR:
        on_stderr(payload)
    elif kind == KIND_RESULT:
        outcome.result = parse_result(payload)
    elif kind in (KIND_STARTED, KIND_NEED, KIND_ERROR, KIND_ALIVE):
        message = parse_frame_json(kind, payload)
        if kind == KIND_STARTED:
            outcome.pid = message["pid"]
        elif kind == KIND_NEED:
            outcome.need = message["need"]
        elif kind == KIND_ERROR:
            outcome.error = message
        # A (still running, from poll) needs nothing: no result means the same.
    else:
        raise ProtocolError(f"unexpected frame kind {kind!r}")
    outcome.frames += 1


def raise_if_refused(host: str, outcome: StreamOutcome) -> None:
    """Raise RemoteError if the runner (or its bootstrap) refused an unsafe workdir: nothing
    ran, and neither installing the runner nor retrying can help."""
    if outcome.error is not None and outcome.error.get("kind") == "workdir":
        raise RemoteError(host, str(outcome.error.get("error")))
    done = outcome.completed
    if outcome.frames == 0 and done is not None and done.exit_status == UNSAFE_WORKDIR_EXIT:
        raise RemoteError(host, runner_refusal(done.stderr))


def raise_if_lacking_dir(host: str, outcome: StreamOutcome) -> None:
    """Raise HostUnreachable if the host lacks a --host-dir: placement then tries another."""
    if outcome.error is not None and outcome.error.get("kind") == "host_dir":
        raise HostUnreachable(host, str(outcome.error.get("error")))


# What a fetch-dir archive may hold beyond the files asked for: its list of changes.
DIR_CHANGES_ALLOWANCE = 64 << 20


class RunnerClient:
    """Runner commands on one host."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.host = transport.host

    async def launch(
        self,
        job_id: str,
        spec: LaunchSpec,
        stdin: bytes | None,
        module: Path,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        notice: Callable[[str], None] | None = None,
        input_tar: bytes = b"",
        session: ServeSession | None = None,
    ) -> tuple[StreamOutcome, UploadStats]:
        """Start the job and stream it until it ends or the connection drops.

        With a serve `session` (array tasks) the job goes through it instead, and its
        output arrives whole when it ends.
        """
        if session is not None:
            served = await self._launch_served(
                session, job_id, spec, stdin, module, on_stdout, on_stderr, notice, input_tar
            )
            raise_if_lacking_dir(self.host.name, served[0])
            return served
        warm = await self._launch_warm(
            job_id, spec, stdin, module, on_stdout, on_stderr, notice, input_tar
        )
        if warm is not None:
            raise_if_lacking_dir(self.host.name, warm[0])
            return warm
        stats = UploadStats()
        payload = spec.encode(stdin, input_tar)
        for _attempt in range(4):
            process = await self.transport.start_runner(["launch", self.host.workdir, job_id])
            await process.send(payload)
            outcome = await read_frames(self.host.name, process, on_stdout, on_stderr)
            raise_if_refused(self.host.name, outcome)
            raise_if_lacking_dir(self.host.name, outcome)
            if outcome.error is not None and outcome.error["kind"] == "no_wasmtime":
                raise RunnerUnavailable(self.host.name, outcome.error["error"])
            if outcome.need == "runner" or (
                outcome.frames == 0 and outcome.completed and outcome.completed.exit_status
            ):
                if stats.runner_installed:
                    stderr = outcome.completed.stderr if outcome.completed else b""
                    raise cannot_start(self.host, stderr)
                await self.transport.install_runner_once(notice)
                stats.runner_installed = True
                continue
            if outcome.need == "module":
                await self._upload_once(spec.wasm_sha256, module, stats, notice)
                continue
            return outcome, stats
        raise RemoteError(self.host.name, "the runner kept asking for setup; giving up")

    async def _launch_warm(
        self,
        job_id: str,
        spec: LaunchSpec,
        stdin: bytes | None,
        module: Path,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        notice: Callable[[str], None] | None,
        input_tar: bytes,
    ) -> tuple[StreamOutcome, UploadStats] | None:
        """The job launched through the host's warm serve (the connection process's, see
        mux/warm.py); None when there is none, and it is to be launched as a command."""
        payload = spec.encode(stdin, input_tar, key=job_id)
        if len(payload) > SERVE_MAX_PAYLOAD_BYTES:
            return None
        stats = UploadStats()
        for _attempt in range(3):
            process = await self.transport.launch_warm(job_id)
            if process is None:
                return None
            await process.send(payload)
            outcome = await self._follow_warm(job_id, process, on_stdout, on_stderr)
            if outcome is None:
                return None
            if outcome.need == "module":
                await self._upload_once(spec.wasm_sha256, module, stats, notice)
                continue
            return outcome, stats
        raise RemoteError(self.host.name, "the runner kept asking for the module; giving up")

    async def _follow_warm(
        self,
        job_id: str,
        process: RunnerProcess,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
    ) -> StreamOutcome | None:
        """A warm job's frames until its end; None if it never reached serve.

        serve sends a job's output when it ends. A job still running WARM_STREAM_AFTER_S
        after it started is followed by `attach` instead, which streams its output as it
        comes (from its start: nothing of it was shown yet), as a launched job's is.
        """
        outcome = StreamOutcome()
        decoder = FrameDecoder()
        stream_at: float | None = None
        reading: asyncio.Future[bytes] | None = None
        try:
            while True:
                reading = asyncio.ensure_future(process.read())
                timeout = None if stream_at is None else max(0.0, stream_at - time.monotonic())
                await asyncio.wait({reading}, timeout=timeout)
                if not reading.done():
                    break  # still running: follow it with attach
                chunk = reading.result()
                reading = None
                if not chunk:
                    outcome.completed = await process.finish()
                    if outcome.frames == 0 and outcome.completed.exit_status == NOT_LAUNCHED:
                        return None
                    return outcome
                try:
                    for kind, payload in decoder.feed(chunk):
                        apply_frame(outcome, kind, payload, on_stdout, on_stderr)
                except ProtocolError as exc:
                    process.abort()
                    raise broken_answer(self.host.name, exc) from exc
                if outcome.pid is not None and outcome.frames == 1:
                    stream_at = time.monotonic() + WARM_STREAM_AFTER_S
                else:
                    stream_at = None  # its end is on its way
        finally:
            if reading is not None:
                reading.cancel()
        process.abort()  # the job runs on; serve's frames about it are dropped
        attached = await self.stream(job_id, 0, 0, on_stdout, on_stderr, follow=True)
        if attached.pid is None:
            attached.pid = outcome.pid
        attached.frames += outcome.frames
        return attached

    async def _launch_served(
        self,
        session: ServeSession,
        job_id: str,
        spec: LaunchSpec,
        stdin: bytes | None,
        module: Path,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        notice: Callable[[str], None] | None,
        input_tar: bytes,
    ) -> tuple[StreamOutcome, UploadStats]:
        stats = UploadStats()
        payload = spec.encode(stdin, input_tar, key=job_id)
        for _attempt in range(3):
            outcome = await session.run_task(job_id, payload, on_stdout, on_stderr)
            if outcome.need == "module":
                await self._upload_once(spec.wasm_sha256, module, stats, notice)
                continue
            return outcome, stats
        raise RemoteError(self.host.name, "the runner kept asking for the module; giving up")

    async def _upload_once(
        self,
        sha256: str,
        module: Path,
        stats: UploadStats,
        notice: Callable[[str], None] | None,
    ) -> None:
        """Upload a module unless a sibling job already did (one upload per host)."""
        async with self.transport.setup_lock:
            if sha256 in self.transport.modules_sent:
                return
            if notice is not None:
                notice(f"uploading the module to {self.host.name} ({module.stat().st_size} bytes)")
            started_at = time.monotonic()
            stats.upload_bytes += await self.put_module(sha256, module)
            stats.upload_s += time.monotonic() - started_at
            self.transport.modules_sent.add(sha256)

    async def put_module(self, sha256: str, module: Path) -> int:
        """Upload a module to the host's cache; the runner checks its hash. Returns bytes sent."""
        data = module.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RemoteError(self.host.name, f"local module {module} does not match its hash")
        done = await self.transport.run_runner(["put-module", self.host.workdir, sha256], data)
        if done.exit_status is None:
            raise HostUnreachable(self.host.name, "connection lost while uploading the module")
        if done.exit_status != 0:
            raise RemoteError(self.host.name, f"cannot store the module: {last_line(done.stderr)}")
        return len(data)

    async def stream(
        self,
        job_id: str,
        stdout_offset: int,
        stderr_offset: int,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        *,
        follow: bool,
    ) -> StreamOutcome:
        """A launched job's output from the given offsets, and its result: with `follow`
        until it ends (attach), else what it has produced so far, and its result if it has
        ended (poll)."""
        process = await self.transport.start_runner(
            [
                "attach" if follow else "poll",
                self.host.workdir,
                str(job_id),
                str(stdout_offset),
                str(stderr_offset),
            ]
        )
        await process.send(b"")
        return await read_frames(self.host.name, process, on_stdout, on_stderr)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Kill a job on its host; returns the runner's answer."""
        done = await self.transport.run_runner(
            ["cancel", self.host.workdir, str(job_id)], max_stdout=MAX_MESSAGE_BYTES
        )
        if done.exit_status is None:
            raise HostUnreachable(self.host.name, "connection lost while cancelling")
        if done.exit_status != 0:
            raise RemoteError(
                self.host.name, f"cannot cancel job {job_id}: {last_line(done.stderr)}"
            )
        try:
            return parse_cancel_answer(done.stdout)
        except ProtocolError as exc:
            raise broken_answer(self.host.name, exc) from exc

    async def fetch_output(self, job_id: str, scratch: Path, max_bytes: int | None) -> bool:
        """Extract the job's /output into the empty directory `scratch` as it arrives.

        Memory stays bounded whatever the size: the tar stream goes from the channel to
        the files chunk by chunk. With `max_bytes`, the host stops before the file that
        would pass it, and so does this side (whatever a host sends). Returns whether the
        output was cut at `max_bytes`; what fit is in `scratch` either way.
        """
        args = ["fetch-output", self.host.workdir, job_id]
        if max_bytes is not None:
            args.append(str(max_bytes))
        return await self._fetch_tar(args, scratch, max_bytes, "output")

    async def fetch_dir(
        self, job_id: str, index: int, scratch: Path, max_bytes: int | None = None
    ) -> bool:
        """Extract what the job changed in its staged directory `index` (fetch-dir's tar:
        the changed files under files/, then changes.json) into the empty `scratch`, its
        files held to `max_bytes`; whether the host sent more (the tar was cut). Here the
        cap is that plus DIR_CHANGES_ALLOWANCE, for changes.json, itself a member."""
        args = ["fetch-dir", self.host.workdir, job_id, str(index)]
        args += [] if max_bytes is None else [str(max_bytes)]
        cap = None if max_bytes is None else max_bytes + DIR_CHANGES_ALLOWANCE
        return await self._fetch_tar(args, scratch, cap, "directory")

    async def _fetch_tar(
        self, args: list[str], scratch: Path, max_bytes: int | None, what: str
    ) -> bool:
        """Run a runner command whose stdout is a tar and extract it into `scratch` as it
        arrives; returns whether it was cut at `max_bytes`."""
        process = await self.transport.start_runner(args)
        await process.send(b"")
        cut = False
        extractor = TarExtractor(str(scratch), max_bytes)
        try:
            # Each chunk is written out before the next is read, in this thread: asyncssh
            # then never buffers more than a read's worth (its flow control lets a slow
            # reader's backlog grow without bound), and neither does this side.
            after_end = 0
            while chunk := await process.read():
                extractor.feed(chunk)
                if extractor.ended:
                    # Past the archive's end only padding may follow: never read forever.
                    after_end += len(chunk)
                    if after_end > TRAILING_BYTES_MAX:
                        process.abort()
                        break
            extractor.close()
        except ArchiveTooLarge:
            cut = True
            process.abort()
        except UnsafeArchive as exc:
            process.abort()
            await process.finish()
            raise RemoteError(self.host.name, f"refused the job's {what}: {exc}") from exc
        except BaseException:
            process.abort()
            raise
        finally:
            extractor.abandon()
        done = await process.finish()
        if cut or done.exit_status == FETCH_STOPPED_AT_LIMIT:
            return True
        if done.exit_status is None:
            raise HostUnreachable(self.host.name, f"connection lost while fetching the {what}")
        if done.exit_status != 0:
            raise RemoteError(self.host.name, f"cannot fetch the {what}: {last_line(done.stderr)}")
        return False

    async def info(self) -> dict[str, Any]:
        """The runner's view of the host (versions, cores, memory)."""
        done = await self.transport.run_runner(["info"], max_stdout=MAX_MESSAGE_BYTES)
        if done.exit_status is None:
            raise HostUnreachable(self.host.name, "connection lost")
        if done.exit_status != 0:
            raise RemoteError(self.host.name, f"runner does not start: {last_line(done.stderr)}")
        try:
            return parse_info(done.stdout)
        except ProtocolError as exc:
            raise broken_answer(self.host.name, exc) from exc


# Requests above this go through `launch` instead (serve refuses very large requests).
SERVE_MAX_PAYLOAD_BYTES = 32 << 20
SERVE_START_TIMEOUT_S = 60.0


@dataclass
class _ServeTask:
    on_stdout: OutputCallback
    on_stderr: OutputCallback
    done: asyncio.Future[StreamOutcome]
    outcome: StreamOutcome = field(default_factory=StreamOutcome)


class ServeSession:
    """One `sshwasm-exec serve` on a host: array tasks launched over a single channel.

    A task costs the host a fork of a process that already has wasmtime and the module
    loaded, instead of a login shell and two interpreters. Each task still runs detached and
    writes its result to disk before it is reported, so a dropped session falls back to
    `attach` per task, as for `launch`.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.host = transport.host
        self._process: RunnerProcess | None = None
        self._tasks: dict[str, _ServeTask] = {}
        self._reader: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self.broken = False
        self._broken_answer: RemoteError | None = None
        # L frames not sent yet, each with the future its task waits on: the tasks placed
        # in one pass go out in one write (_flush), not a channel write each.
        self._outbox: list[tuple[bytes, asyncio.Future[None]]] = []
        self._send_lock = asyncio.Lock()
        self._flushers: set[asyncio.Future[None]] = set()

    async def _ensure_started(self) -> RunnerProcess:
        if self._process is not None and not self.broken:
            return self._process  # the usual case: no lock to pass from task to task
        async with self._start_lock:
            if self._process is not None and not self.broken:
                return self._process
            # The connection process's warm serve first: it outlives this run, so a later
            # array finds wasmtime imported, the module loaded and the executors forked.
            warm = await self.transport.serve_session()
            if warm is not None:
                self._process, self.broken = warm, False
                self._reader = asyncio.create_task(self._read(warm, FrameDecoder(), []))
                return warm
            for _attempt in range(2):
                process = await self.transport.start_runner(["serve", self.host.workdir])
                await process.send(encode_frame(KIND_HELLO, encode_hello()), close=False)
                decoder = FrameDecoder()
                reply: tuple[bytes, bytes] | None = None
                frames: list[tuple[bytes, bytes]] = []
                while reply is None:
                    chunk = await asyncio.wait_for(process.read(), SERVE_START_TIMEOUT_S)
                    if not chunk:
                        break
                    try:
                        frames.extend(decoder.feed(chunk))
                        if frames:
                            reply = frames.pop(0)
                            if reply[0] == KIND_ERROR:
                                # Before its hello, serve refuses only an unsafe workdir.
                                body = reply[1].partition(b"\n")[2]
                                refusal = StreamOutcome(error=parse_frame_json(KIND_ERROR, body))
                                process.abort()
                                raise_if_refused(self.host.name, refusal)
                            if reply[0] not in (KIND_HELLO, KIND_NEED):
                                raise ProtocolError(f"serve answered {reply[0]!r} to its hello")
                            answer = parse_frame_json(*reply)
                    except ProtocolError as exc:
                        process.abort()
                        raise broken_answer(self.host.name, exc) from exc
                if reply is None:
                    done = await process.finish()
                    raise_if_refused(self.host.name, StreamOutcome(completed=done))
                    if not self.transport.runner_sent:
                        await self.transport.install_runner_once()
                        continue
                    raise cannot_start(self.host, done.stderr)
                if reply[0] == KIND_NEED:
                    process.abort()
                    await self.transport.install_runner_once()
                    continue
                if answer["error"]:
                    process.abort()
                    raise RunnerUnavailable(self.host.name, answer["error"])
                self._process, self.broken = process, False
                self._reader = asyncio.create_task(self._read(process, decoder, frames))
                return process
            raise RemoteError(self.host.name, "the runner kept asking to be installed")

    async def _read(
        self, process: RunnerProcess, decoder: FrameDecoder, early: list[tuple[bytes, bytes]]
    ) -> None:
        try:
            for kind, payload in early:
                self._dispatch(kind, payload)
            while chunk := await process.read():
                for kind, payload in decoder.feed(chunk):
                    self._dispatch(kind, payload)
        except ProtocolError as exc:
            process.abort()
            self._broken_answer = broken_answer(self.host.name, exc)
        finally:
            self.broken = True
            if self._process is None and not self._tasks:
                process.abort()  # closed with nothing left to hear (close)
            else:
                await self._lose_tasks(process)

    async def _lose_tasks(self, process: RunnerProcess) -> None:
        """serve is gone: answer every task still waiting on it."""
        completed = await process.finish()
        lost = Completed(None, b"", completed.stderr)
        for key, task in list(self._tasks.items()):
            # Unanswered tasks are treated as a dropped connection: the caller re-attaches,
            # unless serve broke the protocol: then nothing more of it is believed.
            task.outcome.completed = lost
            if not task.done.done():
                if self._broken_answer is not None:
                    task.done.set_exception(self._broken_answer)
                else:
                    task.done.set_result(task.outcome)
            self._tasks.pop(key, None)

    def _dispatch(self, kind: bytes, payload: bytes) -> None:
        key_bytes, _, body = payload.partition(b"\n")
        task = self._tasks.get(key_bytes.decode(errors="replace"))
        if task is None:
            return  # a frame about no task of ours (an empty-key protocol note)
        apply_frame(task.outcome, kind, body, task.on_stdout, task.on_stderr)
        if kind in FINAL_KINDS:
            self._tasks.pop(key_bytes.decode(errors="replace"), None)
            if not task.done.done():
                task.done.set_result(task.outcome)

    async def run_task(
        self, key: str, payload: bytes, on_stdout: OutputCallback, on_stderr: OutputCallback
    ) -> StreamOutcome:
        """Launch one task and wait for its end (or for serve to be lost)."""
        process = await self._ensure_started()
        done: asyncio.Future[StreamOutcome] = asyncio.get_running_loop().create_future()
        self._tasks[key] = _ServeTask(on_stdout, on_stderr, done)
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.append((encode_frame(KIND_LAUNCH, payload), sent))
        if len(self._outbox) == 1:
            flusher = asyncio.ensure_future(self._flush(process))
            self._flushers.add(flusher)  # held until done (the loop keeps weak references)
            flusher.add_done_callback(self._flushers.discard)
        try:
            await sent  # raises what the write raised, as a write of its own would
        except BaseException:
            self._tasks.pop(key, None)
            raise
        if self.broken and not done.done():
            self._tasks.pop(key, None)
            outcome = StreamOutcome(completed=Completed(None, b"", b""))
            return outcome
        return await done

    async def _flush(self, process: RunnerProcess) -> None:
        """Send every L frame waiting in the outbox in one write (after the tasks started
        in this turn of the loop queued theirs), and tell each task how it went."""
        batch: list[tuple[bytes, asyncio.Future[None]]] = []
        try:
            await asyncio.sleep(0)
            async with self._send_lock:
                batch, self._outbox = self._outbox, []
                if batch:
                    await process.send(b"".join(frame for frame, _ in batch), close=False)
        except BaseException as exc:
            if not batch:  # stopped before taking them: they are ours to answer still
                batch, self._outbox = self._outbox, []
            for _, sent in batch:
                if sent.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    sent.cancel()
                else:
                    sent.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for _, sent in batch:
            if not sent.done():
                sent.set_result(None)

    async def close(self) -> None:
        """Let serve finish what runs and exit (EOF on its stdin).

        With no task of ours left on it, serve is not waited for: every result is on the
        host's disk and was answered, and its exit (its interpreter's teardown, the
        channel's close: 60-100 ms a host) is no part of the run; EOF ends it and its idle
        executors on their own."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(Exception):
            await process.send(b"", close=True)
        if self._reader is None:
            return
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
            self._reader.cancel()
            return
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader  # it only closes the channel now: no wait on serve
