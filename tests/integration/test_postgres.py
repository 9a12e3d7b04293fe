"""The control plane on PostgreSQL: a real server started by the test run, a real control plane on
loopback with mTLS, real workers."""

from __future__ import annotations

import asyncio
import json

from taskrun.cli.client import OutputReceived
from taskrun.controlplane.store.postgres import PostgresStore
from taskrun.core.status import RunStatus, TaskStatus
from tests.conftest import Cluster
from tests.integration.test_consistency import not_serving, serving, until
from tests.postgres import running_server


async def output_of(client, task_id: str) -> str:  # type: ignore[no-untyped-def]
    return "".join(
        [
            e.chunk.data
            async for e in client.follow(task_id, follow=False)
            if isinstance(e, OutputReceived)
        ]
    )


async def test_tasks_run_end_to_end_and_survive_a_control_plane_restart(
    cluster: Cluster, postgres_url: str
) -> None:
    server = await cluster.start_server(store=postgres_url)
    assert isinstance(server.engine.store, PostgresStore)
    await cluster.start_worker("worker-1")
    await cluster.start_worker("worker-2")
    client = cluster.client()
    texts = [f"task {n}: " + "abcdefghij" * 5 for n in range(20)]
    tasks = [await client.create_task("echo", {"text": t, "chunks": 5}) for t in texts]
    keyed = await client.create_task("echo", {"text": "once"}, idempotency_key="nightly-1")
    finals = [await asyncio.wait_for(client.wait(t.id), 20) for t in [*tasks, keyed]]
    assert [f.status for f in finals] == [TaskStatus.COMPLETED] * 21
    for task, text in zip(tasks, texts, strict=True):
        assert await output_of(client, task.id) == text
    _, runs = await client.get_task(tasks[0].id)
    assert [r.status for r in runs] == [RunStatus.COMPLETED]
    assert json.loads(finals[0].result) == {"chars": len(texts[0]), "chunks": 5}

    await cluster.stop_server()
    await cluster.start_server(store=postgres_url)
    await cluster.wait_registered("worker-1")
    client = cluster.client()
    listed, _ = await client.list_tasks(limit=100)
    assert {t.id for t in listed} == {t.id for t in [*tasks, keyed]}
    assert await output_of(client, tasks[7].id) == texts[7]
    same = await client.create_task("echo", {"text": "once"}, idempotency_key="nightly-1")
    assert same.id == keyed.id  # the key is durable
    after = await client.create_task("echo", {"text": "after the restart"})
    final = await asyncio.wait_for(client.wait(after.id), 20)
    assert final.status is TaskStatus.COMPLETED
    assert await output_of(client, after.id) == "after the restart"


async def test_a_database_restart_under_the_control_plane_loses_and_repeats_nothing(
    cluster: Cluster,
) -> None:
    """Runs in progress report while PostgreSQL restarts: the control plane stops serving,
    recovers by itself once the database is back, and every task ends once with whole output."""
    with running_server() as database:
        # a long lease: the worker keeps its runs through the outage
        server = await cluster.start_server(store=database.url, lease_duration=30)
        daemon = await cluster.start_worker("worker-1")
        client = cluster.client()
        texts = [f"<{n}:" + "abcdefghij" * 3 + ">" for n in range(4)]
        tasks = [
            await client.create_task("echo", {"text": t, "chunks": 6, "delay": 0.15}) for t in texts
        ]

        async def all_running() -> bool:
            return len(daemon.runs) == 4

        await until(all_running)
        database.stop()

        async def store_failed() -> bool:
            return bool(server.engine.store_error)

        await until(store_failed)
        assert "the store cannot write" in server.engine.store_error
        assert await not_serving(cluster)
        await asyncio.sleep(1.0)  # the runs go on reporting into the outage
        database.start()
        await until(lambda: serving(cluster))
        finals = [await asyncio.wait_for(client.wait(t.id), 20) for t in tasks]
        assert [f.status for f in finals] == [TaskStatus.COMPLETED] * 4
        assert [f.attempts for f in finals] == [1] * 4
        for task, text in zip(tasks, texts, strict=True):
            assert await output_of(client, task.id) == text  # whole, each chunk once
        assert server.engine.recoveries >= 1
        await cluster.close()
