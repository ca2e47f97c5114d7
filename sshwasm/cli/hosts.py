"""`sshwasm hosts`: the cluster's hosts, checked or installed on request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import SshwasmError, UsageError
from .context import Context
from .exits import ExitStatus
from .show import error, notice, print_json, say, table

if TYPE_CHECKING:
    from ..cluster import Host
    from ..transport import TransportPool


def cmd_hosts(ctx: Context) -> int:
    """`sshwasm hosts`: each host with its capacity and what this jobs file holds there."""

    if ctx.args.hosts_command == "install":
        return cmd_hosts_install(ctx)
    cluster = ctx.cluster()
    usage = ctx.store.usage()
    running = ctx.store.running_counts()
    rows: list[dict[str, Any]] = []
    for host in cluster.hosts:
        used = usage.get(host.name)
        rows.append(
            {
                "name": host.name,
                "address": host.address,
                "cpus": host.cpus,
                "memory_mb": host.memory_mb,
                "cpus_free": host.cpus - (used.cpus if used else 0),
                "memory_free_mb": host.memory_mb - (used.memory_mb if used else 0),
                "running": running.get(host.name, 0),
                "labels": list(host.labels),
            }
        )
    status = ExitStatus.OK
    if ctx.args.check:
        import asyncio

        from ..hosts import check_hosts

        for row, report in zip(rows, asyncio.run(check_hosts(cluster.hosts)), strict=True):
            row.update(report)
            if report.get("error"):
                status = ExitStatus.ERROR
    if ctx.args.json:
        print_json(rows)
        return status
    shown = ("warnings", "host_cpus", "host_memory_mb", "python_version")
    rows_shown = [
        {**{k: v for k, v in row.items() if k not in shown}, "labels": ",".join(row["labels"])}
        for row in rows
    ]
    table(rows_shown, headers="keys")
    for row in rows:
        for warning in row.get("warnings", []):
            notice(f"warning: {row['name']}: {warning}")
    return status


def cmd_hosts_install(ctx: Context) -> int:
    """`sshwasm hosts install [NAME...]`: runner and wasmtime on each host."""
    import asyncio

    from ..hosts import for_each_host, install_host

    cluster = ctx.cluster()
    names = ctx.args.names
    unknown = [name for name in names if cluster.host(name) is None]
    if unknown:
        raise UsageError(f"no host named {', '.join(unknown)} in {cluster.source}")
    hosts = [h for h in cluster.hosts if not names or h.name in names]
    action = install_host
    if cluster.engine == "dask":  # engine: dask (issue 12): distributed too
        from ..hosts import install_distributed

        async def action(host: Host, pool: TransportPool) -> list[str]:
            return [*await install_host(host, pool), await install_distributed(host, pool)]

    status = ExitStatus.OK
    for host, result in zip(hosts, asyncio.run(for_each_host(hosts, action)), strict=True):
        if isinstance(result, SshwasmError):
            status = ExitStatus.ERROR
            error(result)
        else:
            for line in result:
                say(f"{host.name}: {line}")
    return status
