"""`TransportPool.get(host, within=...)`: one job's short wait for a host's connection
neither cancels nor repeats the attempt other jobs of that host wait on (coordinator's
re-attach window, tests/test_promises_connections.py, holds it against a real sshd)."""

from __future__ import annotations

import asyncio

import pytest

from sshwasm import transport as transport_module
from sshwasm.cluster import Host
from sshwasm.errors import HostUnreachable
from sshwasm.transport import TransportPool

HANDSHAKE_S = 0.3


class SlowTransport:
    """Stands for a transport whose handshake takes HANDSHAKE_S; counts the handshakes."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.handshakes = 0
        self.connected = False
        self.closed = False

    async def connect(self) -> None:
        if self.connected:
            return
        self.handshakes += 1
        await asyncio.sleep(HANDSHAKE_S)
        self.connected = True

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def slow_transports(monkeypatch: pytest.MonkeyPatch) -> list[SlowTransport]:
    made: list[SlowTransport] = []

    def make(host: Host) -> SlowTransport:
        made.append(SlowTransport(host))
        return made[-1]

    monkeypatch.setattr(transport_module, "transport_for", make)
    return made


HOST = Host(name="delta", address="127.0.0.1", cpus=1, memory_mb=64)


def test_a_short_wait_leaves_the_attempt_to_the_others(
    slow_transports: list[SlowTransport],
) -> None:
    async def scenario() -> None:
        pool = TransportPool()
        hurried = asyncio.create_task(pool.get(HOST, within=0.05))
        await asyncio.sleep(0.01)  # its attempt holds the host's lock and is connecting
        patient = asyncio.create_task(pool.get(HOST))  # waits behind that lock
        with pytest.raises(HostUnreachable, match=r"no connection within 0\.05s"):
            await hurried
        got = await patient  # the same handshake's end
        assert got is slow_transports[0] and slow_transports[0].connected
        # One handshake, not cut short and started again; the next get reuses it.
        assert await pool.get(HOST, within=0.05) is got
        assert [made.handshakes for made in slow_transports] == [1]
        # An attempt nobody waits for any more is stopped by close.
        await pool.drop(HOST)
        with pytest.raises(HostUnreachable):
            await pool.get(HOST, within=0.01)
        await pool.close()
        assert not slow_transports[1].connected

    asyncio.run(scenario())
