"""The test sshd harness itself: real servers, real host key checks, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest
from sshd import SSH_KEYGEN, SshKit, SshServer, loopback, pid_alive

from sshwasm.cluster import load_cluster


def test_every_session_host_runs_a_command(
    ssh_kit: SshKit, ssh_hosts: dict[str, SshServer]
) -> None:
    async def echo(server: SshServer) -> tuple[str, int | None]:
        async with asyncssh.connect(**ssh_kit.connect_kwargs(server)) as conn:
            result = await conn.run("echo ok", check=True)
            return str(result.stdout), result.exit_status

    async def all_hosts() -> list[tuple[str, int | None]]:
        return await asyncio.gather(*(echo(server) for server in ssh_hosts.values()))

    assert sorted(ssh_hosts) == ["alpha", "beta", "gamma"]
    assert [server.address for server in ssh_hosts.values()] == [
        loopback(2),
        loopback(3),
        loopback(4),
    ]
    assert asyncio.run(all_hosts()) == [("ok\n", 0)] * 3
    trusted = ssh_kit.known_hosts.read_text().splitlines()
    assert all(server.known_hosts_line in trusted for server in ssh_hosts.values())


def test_host_missing_from_known_hosts_is_refused(
    ssh_kit: SshKit, ssh_hosts: dict[str, SshServer], tmp_path: Path
) -> None:
    alpha, beta = ssh_hosts["alpha"], ssh_hosts["beta"]
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    # Beta's key listed under alpha's address: what a replaced or spoofed host looks like.
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[{alpha.address}]:{alpha.port} {beta.host_key_pub}\n")

    async def connect(known_hosts: Path) -> None:
        kwargs = ssh_kit.connect_kwargs(alpha, known_hosts=str(known_hosts))
        async with asyncssh.connect(**kwargs):
            pass

    for known_hosts in (empty, wrong):
        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            asyncio.run(connect(known_hosts))


def test_key_outside_authorized_keys_is_refused(
    ssh_kit: SshKit, ssh_hosts: dict[str, SshServer], tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger_ed25519"
    subprocess.run(
        [str(SSH_KEYGEN), "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
        check=True,
        stdin=subprocess.DEVNULL,
    )

    async def connect() -> None:
        kwargs = ssh_kit.connect_kwargs(ssh_hosts["beta"], client_keys=[str(stranger)])
        async with asyncssh.connect(**kwargs):
            pass

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(connect())


def test_stop_refuses_connections_and_start_restores_the_same_host(
    ssh_kit: SshKit, fresh_host: Callable[..., SshServer]
) -> None:
    server = fresh_host("delta")
    first_pid, port, host_key = server.pid, server.port, server.host_key_pub

    async def scenario() -> None:
        async with asyncssh.connect(**ssh_kit.connect_kwargs(server)) as conn:
            assert (await conn.run("echo before", check=True)).stdout == "before\n"
            session_pids = server.process_ids()[1:]
            assert session_pids, "an open connection has its own sshd process"
            server.stop()
            # The open connection drops with the host, as when a machine goes away.
            await asyncio.wait_for(conn.wait_closed(), timeout=5)
            assert not any(pid_alive(pid) for pid in session_pids)
        assert not pid_alive(first_pid)
        with pytest.raises(ConnectionRefusedError):
            await asyncssh.connect(**ssh_kit.connect_kwargs(server))

        server.start()
        assert (server.port, server.host_key_pub) == (port, host_key)
        assert server.pid != first_pid
        # known_hosts was written once, at creation: the restarted host must still match it.
        async with asyncssh.connect(**ssh_kit.connect_kwargs(server)) as conn:
            assert (await conn.run("echo after", check=True)).stdout == "after\n"

    asyncio.run(scenario())
    server.stop()
    server.stop()  # idempotent
    assert not server.running


def test_pause_hangs_the_host_and_resume_recovers_it(
    ssh_kit: SshKit, fresh_host: Callable[..., SshServer]
) -> None:
    server = fresh_host("hung")

    async def scenario() -> None:
        async with asyncssh.connect(**ssh_kit.connect_kwargs(server)) as conn:
            server.pause()
            # TCP still connects (the kernel accepts), but no SSH banner ever comes.
            # (On Python 3.10 asyncio's TimeoutError is not yet the builtin one.)
            with pytest.raises((asyncio.TimeoutError, TimeoutError)):
                await asyncssh.connect(**ssh_kit.connect_kwargs(server, connect_timeout=0.3))
            with pytest.raises((asyncio.TimeoutError, TimeoutError)):
                await asyncio.wait_for(conn.run("echo frozen"), timeout=0.3)
            server.resume()
            assert (await conn.run("echo thawed", check=True)).stdout == "thawed\n"

    asyncio.run(scenario())


def test_stop_all_leaves_no_sshd_process(tmp_path: Path) -> None:
    kit = SshKit.create(tmp_path / "kit")
    try:
        servers = [kit.server("one", loopback(2)), kit.server("two", loopback(6))]

        async def open_session() -> list[int]:
            async with asyncssh.connect(**kit.connect_kwargs(servers[0])) as conn:
                # A session that outlives our interest in it: stop_all must end it too.
                process = await conn.create_process("echo ready; exec sleep 30")
                # Once it speaks, the session's processes exist on the host.
                assert await process.stdout.readline() == "ready\n"
                pids = [pid for server in servers for pid in server.process_ids()]
                kit.stop_all()
                process.close()
                return pids

        pids = asyncio.run(open_session())
    finally:
        kit.stop_all()
    assert len(pids) > len(servers), "the sleeping session has processes of its own"
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert kit.leftover_pids() == []
    assert not any(server.running for server in servers)


def test_write_cluster_gives_a_valid_cluster(
    ssh_kit: SshKit, ssh_hosts: dict[str, SshServer], make_cluster: Callable[..., Path]
) -> None:
    path = make_cluster(
        {"alpha": (4, 4096), "gamma": {"cpus": 1, "memory_mb": 512, "labels": ["small"]}}
    )
    cluster = load_cluster(path)
    alpha, gamma = cluster.hosts
    assert (alpha.name, alpha.cpus, alpha.memory_mb) == ("alpha", 4, 4096)
    assert (gamma.name, gamma.labels) == ("gamma", ("small",))
    assert (alpha.address, alpha.port) == (ssh_hosts["alpha"].address, ssh_hosts["alpha"].port)
    assert alpha.known_hosts == str(ssh_kit.known_hosts)
    assert alpha.identity_file == str(ssh_kit.client_key)
    assert alpha.user == ssh_kit.user
    assert alpha.workdir == str(path.parent / "workers" / "alpha")
    assert alpha.workdir != gamma.workdir


def test_tests_run_in_a_private_home(tmp_path: Path) -> None:
    assert Path.home() == tmp_path / "home"
    assert (Path.home() / ".ssh").is_dir()
    assert Path.cwd() == tmp_path
    assert "SSH_AUTH_SOCK" not in os.environ
    assert "SSHWASM_CLUSTER" not in os.environ
    assert os.environ["SSHWASM_DATA_DIR"].startswith(str(tmp_path))
    # The compile cache is shared by the session, so it lies outside this test's tmp_path.
    assert not os.environ["SSHWASM_CACHE_DIR"].startswith(str(tmp_path))
