"""`sshwasm pool up | status | down`: the Dask pool of an `engine: dask` cluster."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..errors import SshwasmError
from .context import Context
from .exits import ExitStatus
from .show import error, print_json, say, table, warn

# How often `pool up` knocks on the port of a scheduler it just started.
SCHEDULER_POLL_S = 0.2


def cmd_pool(ctx: Context) -> int:
    """Dispatch `pool up`, `pool status` and `pool down`."""
    from ..pool import plan_for

    plan = plan_for(ctx.cluster())
    if not plan.settings.tls:
        warn(
            "this pool runs without TLS ('tls: false'): anyone who can reach its "
            "ports can run code on its hosts; use it on loopback only"
        )
    command = ctx.args.pool_command
    if command == "up":
        return _up(plan)
    if command == "down":
        return _down(plan)
    return _status(plan, ctx.args.json)


def _report(host: str, line: str) -> None:
    say(f"{host}: {line}")


def _failed(failures: list[SshwasmError]) -> int:
    for failure in failures:
        error(failure)
    return ExitStatus.ERROR if failures else ExitStatus.OK


def _up(plan: Any) -> int:
    from ..pool import JOIN_TIMEOUT_S, connect, pool_up, wait_for_workers

    failures = asyncio.run(pool_up(plan, _report))
    if failures:
        return _failed(failures)
    # A scheduler just started needs seconds (more on a loaded machine) to import
    # distributed and listen: asked again until it answers, not failed at the first try.
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        try:
            client = connect(plan)
            break
        except SshwasmError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(SCHEDULER_POLL_S)
    try:
        wait_for_workers(client, len(plan.cluster.hosts))
    finally:
        client.close()
    say(f"pool: {len(plan.cluster.hosts)} workers connected to {plan.scheduler_address}")
    return ExitStatus.OK


def _down(plan: Any) -> int:
    from ..pool import pool_down

    return _failed(asyncio.run(pool_down(plan, _report)))


def _status(plan: Any, as_json: bool) -> int:
    from ..pool import dashboard_hint, pool_status

    status = pool_status(plan)
    if as_json:
        print_json(status)
        return ExitStatus.OK
    say(f"scheduler: {status['scheduler']} on {status['scheduler_host']}")
    say(f"sshwasm: {status['version'] or 'unknown (older)'}")
    if status["version"] != status["client_version"]:
        warn(
            f"the pool runs sshwasm {status['version'] or 'unknown (older)'}, this is "
            f"{status['client_version']}: `sshwasm pool up` restarts it"
        )
    say(f"dashboard: {dashboard_hint(plan)}")
    say(
        f"workers: {len(status['workers'])} connected, tasks processing: "
        f"{status['tasks_processing']}"
    )
    rows: list[dict[str, Any]] = []
    for worker in status["workers"]:
        used = worker["resources_used"]
        rows.append(
            {
                "name": worker["name"],
                "address": worker["address"],
                "nthreads": worker["nthreads"],
                "cpus_used": f"{_number(used.get('cpus', 0))}/"
                f"{_number(worker['resources'].get('cpus', 0))}",
                "memory_mb_used": f"{_number(used.get('memory_mb', 0))}/"
                f"{_number(worker['resources'].get('memory_mb', 0))}",
                "processing": worker["processing"],
            }
        )
    if rows:
        table(rows, headers="keys")
    for name in status["workers_missing"]:
        warn(f"no worker of host '{name}' is connected (`sshwasm pool up` starts it)")
    return ExitStatus.OK


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
