"""A reader slower than a job's output (`sshwasm run big.rs | less`) grows no buffer of
sshwasm's: asyncssh holds at most about two SSH windows of a channel read slowly
(transport.pace_reading), and a warm job's client that falls behind is followed with
`attach` from the bytes it has, instead of its frames piling up in the connection process
or holding up the warm serve's channel (mux/warm.py Route, mux/server.py relay_route).
`python -m benchmarks.stream_rss` measures the same end to end (100 MB at 4 MiB/s)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

from sshwasm.cluster import Host, load_cluster
from sshwasm.mux import warm as warm_module
from sshwasm.mux import wire
from sshwasm.mux.server import MuxServer
from sshwasm.mux.warm import ROUTE_QUEUE_BYTES, Route, WarmServe
from sshwasm.runner.protocol import FrameDecoder, encode_frame
from sshwasm.transport import Completed, RunnerProcess, SshTransport

MIB = 1 << 20
STARTED = json.dumps({"pid": 1}).encode()


def buffered(process: RunnerProcess) -> int:
    """Bytes asyncssh holds of a channel's output: its stream's buffer and the channel's."""
    ssh_process = process._process  # type: ignore[attr-defined]
    channel = ssh_process._chan
    return int(ssh_process._recv_buf_len) + sum(len(data) for data, _ in channel._recv_buf)


def test_a_channel_read_slowly_holds_two_windows_at_most(
    make_cluster: Callable[..., Path],
) -> None:
    host = load_cluster(make_cluster({"alpha": (1, 512)})).hosts[0]

    async def read_slowly() -> tuple[int, int]:
        transport = SshTransport(host)
        await transport.connect()
        try:
            # 64 MiB the host would send as fast as the connection takes it.
            process = await transport.open_command("head -c 67108864 /dev/zero")
            taken, most = 0, 0
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                chunk = await process.read(65536)
                assert chunk, "the command ended early"
                taken += len(chunk)
                await asyncio.sleep(0.02)  # about 3 MiB/s
                most = max(most, buffered(process))
            process.abort()
            return taken, most
        finally:
            await transport.close()

    taken, most = asyncio.run(read_slowly())
    assert taken >= MIB
    # Two 2 MiB windows and a few packets; asyncssh alone let it grow to all 64 MiB.
    assert most <= 4 * MIB + 256 * 1024, f"{most / MIB:.1f} MiB buffered ({taken} bytes read)"


class _Attach(RunnerProcess):
    """An attach command's stdout, given."""

    def __init__(self, output: bytes) -> None:
        self.output = output
        self.aborted = False

    async def send(self, data: bytes, *, close: bool = True) -> None:
        return None

    async def read(self, size: int = 65536) -> bytes:
        chunk, self.output = self.output[:size], self.output[size:]
        return chunk

    async def finish(self) -> Completed:
        return Completed(0, b"", b"")

    def abort(self) -> None:
        self.aborted = True


class _Transport(SshTransport):
    """Starts no command: records the runner commands asked for, answered by `attach`."""

    def __init__(self, attach: _Attach) -> None:
        super().__init__(Host(name="alpha", address="127.0.0.2", cpus=1, memory_mb=64))
        self.attach = attach
        self.started: list[list[str]] = []

    async def start_runner(self, args: list[str]) -> RunnerProcess:  # type: ignore[override]
        self.started.append(list(args))
        return self.attach


def test_a_warm_client_that_falls_behind_is_followed_with_attach() -> None:
    body = b"x" * (256 * 1024)
    rest = b"the rest, from the host's file\n"
    result = json.dumps({"state": "succeeded"}).encode()
    attach = _Attach(encode_frame(b"O", rest) + encode_frame(b"R", result))
    transport = _Transport(attach)

    async def relay() -> tuple[list[tuple[bytes, bytes]], int | None, int]:
        warm = WarmServe(transport, "v1")
        route = warm.routes["7-a"] = Route()
        # serve's frames about the job, all at once (it ended): S, 6 x 256 KiB of stdout,
        # a little stderr, R. The route takes them without waiting for the client.
        warm._dispatch(b"S", b"7-a\n" + STARTED)
        for _ in range(6):
            warm._dispatch(b"O", b"7-a\n" + body)
        warm._dispatch(b"E", b"7-a\nlate")
        warm._dispatch(b"R", b"7-a\n" + result)
        assert route.overflowed and "7-a" not in warm.routes
        assert route.queued_bytes <= ROUTE_QUEUE_BYTES
        server_end, client_end = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=server_end)
        client_reader, client_writer = await asyncio.open_unix_connection(sock=client_end)
        relaying = asyncio.ensure_future(
            MuxServer(60).relay_route(warm, "7-a", route, reader, writer)
        )
        stdout = bytearray()
        status: int | None = -2
        while True:
            frame = await wire.read_frame(client_reader)
            assert frame is not None
            if frame[0] == wire.STDOUT:
                stdout += frame[1]
            elif frame[0] == wire.EXIT:
                status = json.loads(frame[1])["status"]
                break
        await relaying
        client_writer.close()
        writer.close()
        return FrameDecoder().feed(bytes(stdout)), status, route.queued_bytes

    frames, status, left = asyncio.run(relay())
    kept = (ROUTE_QUEUE_BYTES - len(STARTED)) // len(body)
    # What the route held, in order, then the rest from attach at the offsets it ends at.
    assert [kind for kind, _ in frames] == [b"S", *[b"O"] * kept, b"O", b"R"]
    assert all(payload == body for _, payload in frames[1 : 1 + kept])
    assert frames[-2:] == [(b"O", rest), (b"R", result)]
    assert transport.started == [["attach", "~/.sshwasm", "7-a", str(kept * len(body)), "0"]]
    assert status == 0 and left == 0 and not attach.aborted
    assert warm_module.OVERFLOW == (b"", b"")
