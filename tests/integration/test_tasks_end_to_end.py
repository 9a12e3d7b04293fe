"""Tasks run end to end: real server on loopback with mTLS and SQLite, real worker sessions."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from taskrun.cli.client import OutputReceived, TaskChanged
from taskrun.core.status import RunStatus, TaskStatus, WorkerStatus
from tests.conftest import Cluster
from tests.integration.test_metrics import scrape, value


async def output_of(client, task_id: str) -> str:  # type: ignore[no-untyped-def]
    """All stored text output of a task."""
    return "".join(
        [
            e.chunk.data
            async for e in client.follow(task_id, follow=False)
            if isinstance(e, OutputReceived)
        ]
    )


async def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_echo_task_completes_with_its_output(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "hello, world", "chunks": 3})
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED
    assert await output_of(client, task.id) == "hello, world"
    task, runs = await client.get_task(task.id)
    assert [r.status for r in runs] == [RunStatus.COMPLETED]
    assert runs[0].worker_id == "worker-1"
    assert json.loads(task.result) == {"chars": 12, "chunks": 3}


async def test_follow_streams_output_in_order_and_ends_with_the_outcome(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    text = "".join(f"{i:04d}" for i in range(200))
    task = await client.create_task("echo", {"text": text, "chunks": 200, "delay": 0.001})
    pieces: list[str] = []
    last: TaskChanged | None = None
    async for event in client.follow(task.id):
        if isinstance(event, OutputReceived):
            pieces.append(event.chunk.data)
        else:
            last = event
    assert "".join(pieces) == text
    assert last is not None and last.task.status is TaskStatus.COMPLETED


async def test_task_waits_for_a_worker_and_runs_when_one_appears(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    task = await client.create_task("echo", {"text": "late"}, allow_unknown_agent=True)
    await asyncio.sleep(0.2)
    assert (await client.get_task(task.id))[0].status is TaskStatus.PENDING
    await cluster.start_worker("worker-1")
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED


async def test_several_workers_share_the_work(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=2)
    await cluster.start_worker("worker-2", capacity=2)
    client = cluster.client()
    tasks = [
        await client.create_task("echo", {"text": "x", "delay": 0.2, "chunks": 2}) for _ in range(8)
    ]
    finals = [await client.wait(t.id) for t in tasks]
    assert all(t.status is TaskStatus.COMPLETED for t in finals)
    assert {t.worker_id for t in finals} == {"worker-1", "worker-2"}


async def test_worker_capacity_is_never_exceeded(cluster: Cluster) -> None:
    server = await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=2)
    client = cluster.client()
    tasks = [
        await client.create_task("echo", {"text": "ab", "chunks": 2, "delay": 0.1})
        for _ in range(6)
    ]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            session = server.engine.sessions.get("worker-1")  # type: ignore[call-overload]
            if session is not None:
                peak = max(peak, len(session.runs))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    for t in tasks:
        await client.wait(t.id)
    watcher.cancel()
    assert peak == 2


async def test_required_labels_are_respected(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", labels={"gpu": "none"})
    await cluster.start_worker("worker-2", labels={"gpu": "a100"})
    client = cluster.client()
    tasks = [
        await client.create_task("echo", {"text": "g"}, required_labels={"gpu": "a100"})
        for _ in range(4)
    ]
    finals = [await client.wait(t.id) for t in tasks]
    assert {t.worker_id for t in finals} == {"worker-2"}


async def test_cancel_pending_task(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    task = await client.create_task("echo", {"text": "never"}, allow_unknown_agent=True)
    cancelled = await client.cancel_task(task.id, "changed my mind")
    assert cancelled.status is TaskStatus.CANCELLED
    await cluster.start_worker("worker-1")
    await asyncio.sleep(0.2)
    task, runs = await client.get_task(task.id)
    assert task.status is TaskStatus.CANCELLED
    assert [r.status for r in runs] == [RunStatus.CANCELLED]
    assert runs[0].worker_id is None


async def test_cancel_running_task_stops_the_agent(cluster: Cluster) -> None:
    server = await cluster.start_server()
    daemon = await cluster.start_worker("worker-1", capacity=1)
    client = cluster.client()
    task = await client.create_task("echo", {"text": "x" * 100, "chunks": 100, "delay": 0.05})
    await wait_for(lambda: bool(daemon.runs))
    await client.cancel_task(task.id)
    # the agent really stops: the worker holds no run, and the server freed the slot
    await wait_for(lambda: not daemon.runs)
    await wait_for(lambda: not server.engine.sessions["worker-1"].runs)  # type: ignore[index]
    task, runs = await client.get_task(task.id)
    assert task.status is TaskStatus.CANCELLED
    assert runs[0].status is RunStatus.CANCELLED
    # and the slot is usable again
    nxt = await client.create_task("echo", {"text": "next"})
    assert (await client.wait(nxt.id)).status is TaskStatus.COMPLETED


async def test_cancel_of_finished_task_is_failed_precondition(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "done"})
    await client.wait(task.id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.cancel_task(task.id)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (await client.get_task(task.id))[0].status is TaskStatus.COMPLETED


async def test_failing_agent_fails_the_task_with_its_message(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "x", "fail": "boom"})
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert "boom" in final.error


async def test_execution_timeout_fails_the_run(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task(
        "echo", {"text": "slow", "chunks": 4, "delay": 1.0}, timeout=0.3
    )
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert "timed out" in final.error


async def test_worker_reconnects_after_server_restart_and_keeps_its_run(cluster: Cluster) -> None:
    await cluster.start_server()
    daemon = await cluster.start_worker("worker-1")
    client = cluster.client()
    text = "y" * 30
    task = await client.create_task("echo", {"text": text, "chunks": 30, "delay": 0.05})
    await wait_for(lambda: bool(daemon.runs))
    await cluster.stop_server()
    await cluster.start_server()  # same port, same SQLite file
    await cluster.wait_registered("worker-1")
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED
    assert final.attempts == 1  # the same run finished; nothing was retried
    # output produced while the server was down was kept by the worker and sent again:
    # complete, in order, no duplicates
    assert await output_of(client, task.id) == text


async def test_workers_list_shows_connected_workers(cluster: Cluster) -> None:
    server = await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=3, labels={"zone": "eu"})
    client = cluster.client()
    workers = await client.list_workers()
    assert [(w.id, w.status, w.max_concurrent_runs) for w, _ in workers] == [
        ("worker-1", WorkerStatus.ONLINE, 3)
    ]
    worker, runs = await client.get_worker("worker-1")
    assert worker.labels == {"zone": "eu"}
    assert [a.name for a in worker.agents] == ["echo"]
    assert runs == []
    await cluster.stop_worker("worker-1")
    await wait_for(lambda: "worker-1" not in server.engine.sessions)
    worker, _ = await client.get_worker("worker-1")
    assert worker.status is WorkerStatus.OFFLINE


async def test_drained_worker_finishes_its_run_then_exits(cluster: Cluster) -> None:
    await cluster.start_server()
    daemon = await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "abcd", "chunks": 4, "delay": 0.1})
    await wait_for(lambda: bool(daemon.runs))
    code = await cluster.stop_worker("worker-1")
    assert code == 0
    assert (await client.get_task(task.id))[0].status is TaskStatus.COMPLETED


async def test_tasks_survive_a_server_restart(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    task = await client.create_task(
        "echo", {"text": "durable"}, labels={"team": "a"}, allow_unknown_agent=True
    )
    await cluster.stop_server()
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED
    assert final.labels == {"team": "a"}


async def test_following_quick_tasks_never_misses_their_output(cluster: Cluster) -> None:
    """Regression: a follow that races the task's completion still sees all of its output."""
    await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=8)
    client = cluster.client()
    for n in range(60):
        task = await client.create_task("echo", {"text": f"hello-{n}"})
        pieces = [
            e.chunk.data async for e in client.follow(task.id) if isinstance(e, OutputReceived)
        ]
        assert "".join(pieces) == f"hello-{n}"


async def test_last_heartbeat_moves_while_a_worker_is_connected(cluster: Cluster) -> None:
    # idle (no runs), the worker heartbeats every idle interval
    await cluster.start_server(heartbeat_interval=0.1, idle_heartbeat_interval=0.2)
    await cluster.start_worker("worker-1")
    client = cluster.client()
    first, _ = await client.get_worker("worker-1")
    await asyncio.sleep(0.5)  # a few heartbeat intervals
    later, _ = await client.get_worker("worker-1")
    assert first.last_heartbeat_at is not None and later.last_heartbeat_at is not None
    assert later.last_heartbeat_at > first.last_heartbeat_at


async def test_an_idle_workers_heartbeats_are_not_answered_and_a_run_given_to_it_still_starts(
    cluster: Cluster,
) -> None:
    # idle heartbeats 1.2-1.5 s apart: a renewal (a 2 s lease, ready to start runs for the first
    # second of it) would lapse before the next, so an idle heartbeat asks for none
    server = await cluster.start_server(metrics_listen="127.0.0.1:0", idle_heartbeat_interval=1.5)
    assert server.metrics_server is not None
    port = server.metrics_server.port
    await cluster.start_worker("worker-1")
    client = cluster.client()
    await client.wait((await client.create_task("echo", {"text": "busy"})).id)
    await asyncio.sleep(1.0)  # the busy heartbeat after the run went out: idle from here
    first, _ = await client.get_worker("worker-1")
    before = (await scrape(port))[1]
    await asyncio.sleep(3.5)  # two idle heartbeats or more
    after = (await scrape(port))[1]
    later, _ = await client.get_worker("worker-1")
    assert first.last_heartbeat_at is not None and later.last_heartbeat_at is not None
    assert later.last_heartbeat_at > first.last_heartbeat_at
    received, sent = "taskrun_stream_messages_received_total", "taskrun_stream_messages_sent_total"
    assert value(after, received) - value(before, received) >= 2
    assert value(after, sent) == value(before, sent)  # not one answered
    # a run given to it starts once a heartbeat sent at once renewed the lease, same session
    task = await client.create_task("echo", {"text": "after a quiet spell"}, max_attempts=1)
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
    again, _ = await client.get_worker("worker-1")
    assert again.connected_at == first.connected_at


async def test_required_provider_and_model_pick_the_worker_that_offers_them(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")  # echo announces provider "none", model "echo"
    client = cluster.client()
    fits = await client.create_task(
        "echo", {"text": "ok"}, required_provider="none", required_model="echo"
    )
    assert (await client.wait(fits.id)).status is TaskStatus.COMPLETED
    # no online worker offers it for echo: refused, naming the field and what is offered
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.create_task("echo", {"text": "no"}, required_provider="anthropic")
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "policy.required_provider" in (refused.value.details() or "")
    assert "offered: none/echo" in (refused.value.details() or "")
    # a task that may wait does, until its queue timeout
    unfit = await client.create_task(
        "echo",
        {"text": "no"},
        required_provider="anthropic",
        queue_timeout=0.3,
        allow_unknown_agent=True,
    )
    final = await client.wait(unfit.id)
    assert final.status is TaskStatus.FAILED and "queue timeout" in final.error
