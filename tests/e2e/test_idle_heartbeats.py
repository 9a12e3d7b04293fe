"""Idle heartbeats with real processes: a worker holding no runs heartbeats only every idle
interval and lets its lease lapse, renews it before starting a run given to it then, and a run
given to an idle worker that just went silent or froze is retried within one lease of its
assignment (plus the margin), as for a worker that went silent just after a renewal, and never
starts there. Times come from the store's run timestamps; what a worker started comes from its
own log (debug level logs every run it starts).
"""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from taskrun.cli.client import Client
from taskrun.core.models import Run, Worker
from taskrun.core.status import RunStatus, TaskStatus, WorkerStatus
from tests.e2e.test_faults import Processes, online, procs, until
from tests.faults import SilentProxy

pytestmark = pytest.mark.e2e

__all__ = ["procs"]  # the fixture, imported for these tests

LEASE, MARGIN = 2.0, 0.3
# idle heartbeats far apart: only the lease decides when a session with a run is ended
LONG_IDLE = ("--heartbeat-interval", "0.5", "--lease", str(LEASE), "--lease-margin", str(MARGIN),
             "--idle-heartbeat-interval", "30")  # fmt: skip
# idle heartbeats twice the lease apart: the lease lapses between them
SHORT = ("--heartbeat-interval", "0.25", "--lease", "1", "--lease-margin", "0.2",
         "--idle-heartbeat-interval", "2")  # fmt: skip
DEBUG = {"TASKRUN_LOG_LEVEL": "debug"}


async def worker_named(client: Client, worker_id: str) -> Worker:
    return next(w for w, _ in await client.list_workers() if w.id == worker_id)


async def first_run_assigned(client: Client, task_id: str, worker_id: str) -> Run:
    found: list[Run] = []

    async def check() -> bool:
        _, runs = await client.get_task(task_id)
        found[:] = runs[:1]
        return bool(runs) and runs[0].status is not RunStatus.PENDING

    await until(check, within=20)
    assert found[0].worker_id == worker_id and found[0].status is RunStatus.ASSIGNED
    return found[0]


def started_runs(log: Path) -> str:
    """The lines of a worker's log that say it started a run."""
    return "\n".join(line for line in log.read_text().splitlines() if "run started" in line)


async def test_a_worker_switching_between_idle_and_busy_keeps_its_session_and_its_runs(
    procs: Processes,
) -> None:
    procs.start_server(*SHORT)
    procs.start_worker("worker-1")
    async with procs.client() as client:
        await online(client, "worker-1")
        connected_at = (await worker_named(client, "worker-1")).connected_at
        finals = []
        # the first runs through three leases on busy heartbeats; each comes after the lease
        # lapsed while idle
        for spec in ({"text": "abcd", "chunks": 4, "delay": 0.8}, {"text": "x"}):
            await asyncio.sleep(2.5)  # idle past the lease (and past an idle heartbeat)
            task = await client.create_task("echo", spec, max_attempts=1)
            finals.append(await asyncio.wait_for(client.wait(task.id), 20))
            _, runs = await client.get_task(task.id)
            assert [(r.status, r.worker_id) for r in runs] == [(RunStatus.COMPLETED, "worker-1")]
        after = await worker_named(client, "worker-1")
    assert [t.status for t in finals] == [TaskStatus.COMPLETED] * 2
    assert after.status is WorkerStatus.ONLINE
    assert after.connected_at == connected_at  # one session throughout: never lost its lease


async def test_an_idle_worker_going_silent_is_shown_offline_and_comes_back(
    procs: Processes,
) -> None:
    procs.start_server(*SHORT)
    proxy = await SilentProxy(procs.port).start()
    try:
        procs.start_worker("worker-1", server=proxy.address)
        async with procs.client() as client:
            await online(client, "worker-1")
            proxy.cut()

            async def offline() -> bool:
                return (await worker_named(client, "worker-1")).status is WorkerStatus.OFFLINE

            await until(offline, within=20)
            assert procs.workers["worker-1"].poll() is None  # alive, only cut off
            proxy.restore()
            await online(client, "worker-1")  # the server's end of that session reaches it
    finally:
        await proxy.close()


async def test_a_run_given_to_an_idle_worker_whose_path_just_went_silent_is_retried_within_a_lease_and_never_starts_there(  # noqa: E501
    procs: Processes,
) -> None:
    procs.start_server(*LONG_IDLE)
    proxy = await SilentProxy(procs.port).start()
    try:
        procs.start_worker("worker-1", server=proxy.address, env=DEBUG)
        async with procs.client() as client:
            await online(client, "worker-1")
            await asyncio.sleep(LEASE + 0.5)  # idle: its lease lapsed
            proxy.cut_upstream()  # the assignment reaches it; its heartbeat does not come back
            task = await client.create_task("echo", {"text": "abc"}, max_attempts=2)
            await first_run_assigned(client, task.id, "worker-1")
            procs.start_worker("worker-2", env=DEBUG)
            final = await asyncio.wait_for(client.wait(task.id), 40)
            _, runs = await client.get_task(task.id)
    finally:
        await proxy.close()
    first, second = runs
    assert final.status is TaskStatus.COMPLETED
    assert (first.worker_id, first.status, first.started_at) == ("worker-1", RunStatus.LOST, None)
    assert (second.worker_id, second.status) == ("worker-2", RunStatus.COMPLETED)
    assert first.assigned_at is not None and first.finished_at is not None
    assert second.assigned_at is not None and first.finished_at <= second.assigned_at
    # one lease from the assignment plus the margin, with room for a sweep tick and a commit
    assert (first.finished_at - first.assigned_at).total_seconds() < LEASE + MARGIN + 1.0
    assert first.id not in started_runs(procs.tmp / "worker-1.log")
    assert second.id in started_runs(procs.tmp / "worker-2.log")  # the log does say it


async def test_a_run_given_to_an_idle_worker_that_just_froze_is_retried_within_a_lease_and_never_starts_when_it_wakes(  # noqa: E501
    procs: Processes,
) -> None:
    procs.start_server(*LONG_IDLE)
    procs.start_worker("worker-1", env=DEBUG)
    async with procs.client() as client:
        await online(client, "worker-1")
        await asyncio.sleep(LEASE + 0.5)  # idle: its lease lapsed
        frozen = procs.workers["worker-1"]
        frozen.send_signal(signal.SIGSTOP)
        try:
            task = await client.create_task("echo", {"text": "abc"}, max_attempts=2)
            await first_run_assigned(client, task.id, "worker-1")
            procs.start_worker("worker-2", env=DEBUG)
            final = await asyncio.wait_for(client.wait(task.id), 40)
        finally:
            frozen.send_signal(signal.SIGCONT)
        # woken, it reads the assignment it was sent, then the end of that session
        await online(client, "worker-1")
        _, runs = await client.get_task(task.id)
    first, second = runs
    assert final.status is TaskStatus.COMPLETED and final.attempts == 2
    assert (first.worker_id, first.status, first.started_at) == ("worker-1", RunStatus.LOST, None)
    assert first.assigned_at is not None and first.finished_at is not None
    assert second.assigned_at is not None and first.finished_at <= second.assigned_at
    assert (first.finished_at - first.assigned_at).total_seconds() < LEASE + MARGIN + 1.0
    assert first.id not in started_runs(procs.tmp / "worker-1.log")
    assert second.id in started_runs(procs.tmp / "worker-2.log")


async def test_an_idle_worker_whose_heartbeats_ask_no_answer_still_notices_a_silent_path(
    procs: Processes,
) -> None:
    """SHORT: idle heartbeats ask for no renewal (the lease would lapse before the next anyway),
    so nothing the server writes tells the idle worker its path went silent: gRPC's keepalive
    pings do (every 10 s, 5 s to answer), and it connects again once the path is back."""
    procs.start_server(*SHORT)
    proxy = await SilentProxy(procs.port).start()
    log = procs.tmp / "worker-1.log"
    try:
        procs.start_worker("worker-1", server=proxy.address)
        async with procs.client() as client:
            await online(client, "worker-1")
            proxy.cut()
            cut_at = datetime.now(UTC)

            async def noticed() -> bool:
                return "lost the control plane" in log.read_text()

            await until(noticed, within=30, every=0.2)
            lost = next(
                json.loads(line)
                for line in log.read_text().splitlines()
                if "lost the control plane" in line
            )
            proxy.restore()
            await online(client, "worker-1")
    finally:
        await proxy.close()
    silent_for = (datetime.fromisoformat(lost["timestamp"]) - cut_at).total_seconds()
    assert 0 < silent_for < 10 + 5 + 3, lost  # one keepalive interval and its timeout, slack
