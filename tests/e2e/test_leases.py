"""Leases, self-fencing and orphans with real processes and the default settings.

What the README's Guarantees promise, measured here from the outside: the run of a worker killed
with kill -9 is running again on another worker within 5 s, and within 15 s behind a silent
network cut; the cut-off or frozen worker's agent (the real Claude Code CLI against a fake
Messages API) is gone before the next attempt starts; nothing the agent started outlives its
worker by more than a second. Times come from the store (run timestamps) and from this test's
own clock, which is the same machine's clock.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from taskrun.cli.client import Client
from taskrun.core.models import Run
from taskrun.core.status import RunStatus, TaskStatus
from tests.e2e.test_faults import Processes, online, procs, until
from tests.fakes.anthropic_server import FakeAnthropic, Text
from tests.faults import SilentProxy, fill, small_filesystem
from tests.processes import alive, descendants

pytestmark = pytest.mark.e2e
pytest.importorskip("claude_agent_sdk", reason="needs the taskrun[claude] extra")

__all__ = ["procs"]  # the fixture, imported for these tests

KEY = "sk-ant-test-key"
SLOW = Text(["tick "] * 600, delay=0.05)  # about 30 s of streaming: outlives every fault here


@pytest.fixture
def api(procs: Processes, tmp_path: Path) -> Iterator[FakeAnthropic]:
    home = tmp_path / "home"
    home.mkdir()
    with FakeAnthropic(api_key=KEY) as fake:
        for name in list(procs.env):
            if name.startswith(("ANTHROPIC_", "CLAUDE_")):
                del procs.env[name]
        procs.env.update(
            {
                "ANTHROPIC_BASE_URL": fake.base_url,
                "ANTHROPIC_API_KEY": KEY,
                "HOME": str(home),
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "CLAUDE_CODE_MAX_RETRIES": "0",
            }
        )
        yield fake


async def runs_of(client: Client, task_id: str) -> list[Run]:
    _, runs = await client.get_task(task_id)
    return runs


async def attempt_running(client: Client, task_id: str, attempt: int, worker_id: str) -> Run:
    found: list[Run] = []

    async def check() -> bool:
        runs = await runs_of(client, task_id)
        if len(runs) >= attempt and runs[attempt - 1].status is RunStatus.RUNNING:
            assert runs[attempt - 1].worker_id == worker_id
            found.append(runs[attempt - 1])
            return True
        return False

    await until(check, within=30)
    return found[0]


async def cli_of(worker_pid: int, api: FakeAnthropic) -> int:
    """The pid of the Claude Code CLI the worker process runs (below its supervisor), once it
    is streaming its answer (so that the next attempt gets the next reply, not this one)."""
    found: list[int] = []

    async def check() -> bool:
        found[:] = descendants(worker_pid, "claude")
        return bool(found) and api.streams_started >= 1

    await until(check, within=30)
    return found[0]


async def gone_at(pid: int, within: float) -> datetime:
    """When `pid` exited, measured by polling every 10 ms."""
    async with asyncio.timeout(within):
        while alive(pid):
            await asyncio.sleep(0.01)
    return datetime.now(UTC)


async def test_kill_9_worker_run_retried_within_5s_and_its_cli_dies_within_1s(
    procs: Processes, api: FakeAnthropic
) -> None:
    api.enqueue(SLOW, Text(["done"]))
    procs.start_server()
    procs.start_worker("worker-1", agents="claude_code")
    async with procs.client() as client:
        await online(client, "worker-1")
        task = await client.create_task("claude_code", {"prompt": "Count."}, max_attempts=2)
        await attempt_running(client, task.id, 1, "worker-1")
        cli = await cli_of(procs.workers["worker-1"].pid, api)
        procs.start_worker("worker-2", agents="claude_code")
        await online(client, "worker-2")

        killed_at = datetime.now(UTC)
        procs.workers["worker-1"].kill()
        cli_gone = await gone_at(cli, within=5)
        second = await attempt_running(client, task.id, 2, "worker-2")
        final = await asyncio.wait_for(client.wait(task.id), 30)
        first = (await runs_of(client, task.id))[0]

    assert (cli_gone - killed_at).total_seconds() < 1.0, "the CLI outlived its worker"
    assert second.started_at is not None and second.assigned_at is not None
    assert (second.started_at - killed_at).total_seconds() < 5.0
    assert final.status is TaskStatus.COMPLETED
    assert first.status is RunStatus.LOST and "lease" in first.error
    assert first.finished_at is not None and first.finished_at <= second.assigned_at


async def test_silent_cut_run_retried_within_15s_after_the_cut_worker_stopped_it(
    procs: Processes, api: FakeAnthropic
) -> None:
    api.enqueue(SLOW, Text(["done"]))
    procs.start_server()
    proxy = await SilentProxy(procs.port).start()
    try:
        procs.start_worker("worker-1", agents="claude_code", server=proxy.address)
        async with procs.client() as client:
            await online(client, "worker-1")
            task = await client.create_task("claude_code", {"prompt": "Count."}, max_attempts=2)
            await attempt_running(client, task.id, 1, "worker-1")
            cli = await cli_of(procs.workers["worker-1"].pid, api)
            procs.start_worker("worker-2", agents="claude_code")
            await online(client, "worker-2")

            cut_at = datetime.now(UTC)
            proxy.cut()
            cli_gone = await gone_at(cli, within=15)
            second = await attempt_running(client, task.id, 2, "worker-2")
            assert procs.workers["worker-1"].poll() is None  # alive, only cut off
            proxy.restore()
            final = await asyncio.wait_for(client.wait(task.id), 30)
            runs = await runs_of(client, task.id)
    finally:
        await proxy.close()
    assert second.started_at is not None
    assert (second.started_at - cut_at).total_seconds() < 15.0
    # the cut-off worker stopped its agent before the control plane started the next attempt
    assert second.assigned_at is not None and cli_gone < second.assigned_at
    assert final.status is TaskStatus.COMPLETED
    assert [(r.status, r.worker_id) for r in runs] == [
        (RunStatus.LOST, "worker-1"),
        (RunStatus.COMPLETED, "worker-2"),
    ]


async def test_sigstopped_worker_past_its_lease_never_overlaps_the_retry(
    procs: Processes, api: FakeAnthropic
) -> None:
    api.enqueue(SLOW, Text(["done"]))
    procs.start_server()
    procs.start_worker("worker-1", agents="claude_code")
    async with procs.client() as client:
        await online(client, "worker-1")
        task = await client.create_task("claude_code", {"prompt": "Count."}, max_attempts=2)
        await attempt_running(client, task.id, 1, "worker-1")
        frozen = procs.workers["worker-1"]
        cli = await cli_of(frozen.pid, api)
        procs.start_worker("worker-2", agents="claude_code")
        await online(client, "worker-2")

        frozen.send_signal(signal.SIGSTOP)
        try:
            # frozen, the worker cannot stop anything: its CLI's supervisor does, at lease end
            cli_gone = await gone_at(cli, within=15)
            second = await attempt_running(client, task.id, 2, "worker-2")
        finally:
            frozen.send_signal(signal.SIGCONT)
        final = await asyncio.wait_for(client.wait(task.id), 30)
        runs = await runs_of(client, task.id)
        await asyncio.sleep(1.0)  # the woken worker's late reports arrive and are refused
        assert await runs_of(client, task.id) == runs
    assert second.assigned_at is not None and cli_gone < second.assigned_at
    assert final.status is TaskStatus.COMPLETED and final.attempts == 2
    assert [r.status for r in runs] == [RunStatus.LOST, RunStatus.COMPLETED]


async def test_a_worker_back_within_its_lease_keeps_its_run(
    procs: Processes, api: FakeAnthropic
) -> None:
    api.enqueue(Text(["tick "] * 60, delay=0.05))
    procs.start_server()
    proxy = await SilentProxy(procs.port).start()
    try:
        procs.start_worker("worker-1", agents="claude_code", server=proxy.address)
        async with procs.client() as client:
            await online(client, "worker-1")
            task = await client.create_task("claude_code", {"prompt": "Count."})
            await attempt_running(client, task.id, 1, "worker-1")
            proxy.cut()
            await asyncio.sleep(1.5)  # well inside the 4 s lease
            proxy.restore()
            final = await asyncio.wait_for(client.wait(task.id), 30)
            runs = await runs_of(client, task.id)
    finally:
        await proxy.close()
    assert final.status is TaskStatus.COMPLETED
    assert [(r.status, r.worker_id) for r in runs] == [(RunStatus.COMPLETED, "worker-1")]


async def test_full_disk_under_a_server_process_is_refused_cleanly_and_recovered(
    procs: Processes, tmp_path: Path
) -> None:
    with small_filesystem(tmp_path / "small", "4m") as small:
        procs.start_server("--store", f"sqlite:{small / 'taskrun.db'}")
        procs.start_worker("worker-1")
        async with procs.client() as client:
            await online(client, "worker-1")
            filler = fill(small)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.create_task("echo", {"text": "x" * 300_000}, idempotency_key="k")
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert refused.value.details() == "the store cannot write: database or disk is full"
            filler.unlink()

            async def accepted() -> bool:
                try:
                    await client.create_task("echo", {"text": "back"}, idempotency_key="k")
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.UNAVAILABLE
                    return False
                return True

            await until(accepted, within=15)
            tasks, _ = await client.list_tasks()
            assert len(tasks) == 1
            final = await asyncio.wait_for(client.wait(tasks[0].id), 20)
            assert final.status is TaskStatus.COMPLETED
        assert procs.server is not None and procs.server.poll() is None  # never restarted
