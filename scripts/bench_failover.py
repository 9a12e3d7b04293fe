"""Failover figures for scripts/bench: how long the run of a dead or cut-off worker waits.

A control plane of its own with the default lease, and workers running the echo agent, as
processes. Each round starts a long task on a victim worker, starts a standby worker, then either
`kill -9`s the victim or silences its network path (a loopback proxy that stops forwarding
without closing anything), and measures the time from the fault to the next attempt being
RUNNING on the standby, read from the store's `started_at`. The standby is the next round's
victim.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchprocs import (
    BenchError,
    Child,
    clients,
    free_port,
    spawn,
    stop,
    taskrun_argv,
    until,
)

from taskrun.cli.client import Client
from taskrun.controlplane.pki import PkiPaths
from taskrun.core.status import RunStatus, WorkerStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.proxy import SilentProxy

MAX_ROUNDS = 5
FAILOVER_WORKERS = tuple(f"failover-{n}" for n in range(1, 3 * MAX_ROUNDS + 2))
LONG_TASK = {"text": "x" * 600, "chunks": 600, "delay": 0.1}  # 60 s: outlives every fault


@dataclass
class Failover:
    kill_9_to_running_s: list[float]
    silent_cut_to_running_s: list[float]

    def summary(self, values: list[float]) -> str:
        if not values:
            return "n/a"
        spread = f"{min(values):.2f}-{max(values):.2f} s" if len(values) > 1 else ""
        return f"median {statistics.median(values):.2f} s" + (f" ({spread})" if spread else "")


async def measure_failover(pki: PkiPaths, tmp: Path, rounds: int, started: list[Child]) -> Failover:
    address = f"127.0.0.1:{free_port()}"
    common = ["--certs-dir", str(pki.directory), "--log-level", "warning"]
    server = await spawn(
        "failover-server",
        taskrun_argv(
            "server", "--listen", address, "--store", f"sqlite:{tmp / 'failover.db'}", *common
        ),
        tmp / "failover-server.log",
    )
    started.append(server)
    names = iter(FAILOVER_WORKERS)
    proxies: list[SilentProxy] = []

    async def worker(via: str = address) -> tuple[str, Child]:
        worker_id = next(names)
        argv = taskrun_argv(
            "worker", "run", "--id", worker_id, "--agents", "echo", "--server", via, *common
        )
        child = await spawn(worker_id, argv, tmp / f"{worker_id}.log")
        started.append(child)
        return worker_id, child

    result = Failover([], [])
    try:
        async with clients(address, pki, 1) as (client,):
            await until(lambda: _answers(client), server.check, "the failover server to answer")
            victim = await worker()
            for _ in range(rounds):
                seconds, standby = await _round(client, victim, worker, server, kill=True)
                result.kill_9_to_running_s.append(seconds)
                victim = standby
            await stop(victim[1])
            port = int(address.rsplit(":", 1)[1])
            for _ in range(rounds):
                proxy = await SilentProxy(port).start()
                proxies.append(proxy)
                victim = await worker(proxy.address)
                seconds, standby = await _round(client, victim, worker, server, cut=proxy)
                result.silent_cut_to_running_s.append(seconds)
                await stop(standby[1])
                await stop(victim[1])
    finally:
        for proxy in proxies:
            await proxy.close()
    return result


async def _round(
    client: Client,
    victim: tuple[str, Child],
    start_worker: Callable[[], Awaitable[tuple[str, Child]]],
    server: Child,
    *,
    kill: bool = False,
    cut: SilentProxy | None = None,
) -> tuple[float, tuple[str, Child]]:
    """Seconds from the fault to the next attempt RUNNING, and the standby that runs it."""
    victim_id, victim_child = victim
    await _online(client, victim_id, server)
    task = await client.create_task("echo", LONG_TASK, max_attempts=2)
    await until(lambda: _running(client, task.id, 1), server.check, "the run on the victim")
    standby = await start_worker()  # only now, so that the first attempt is the victim's
    await _online(client, standby[0], server)
    at = datetime.now(UTC)
    if kill:
        victim_child.proc.kill()
    elif cut is not None:
        cut.cut()
    await until(lambda: _running(client, task.id, 2), server.check, "the next attempt", within=60)
    _, runs = await client.get_task(task.id)
    await client.cancel_task(task.id, "measured")
    started_at = runs[1].started_at
    if started_at is None:
        raise BenchError("the next attempt has no start time")
    return (started_at - at).total_seconds(), standby


async def _answers(client: Client) -> bool:
    with contextlib.suppress(Exception):
        await client.list_workers()
        return True
    return False


async def _online(client: Client, worker_id: str, server: Child) -> None:
    async def check() -> bool:
        listed = await client.list_workers([WorkerStatus.ONLINE])
        return worker_id in {w.id for w, _ in listed}

    await until(check, server.check, f"{worker_id} to be ONLINE")


async def _running(client: Client, task_id: str, attempt: int) -> bool:
    _, runs = await client.get_task(task_id)
    return len(runs) >= attempt and runs[attempt - 1].status is RunStatus.RUNNING
