"""Worker revocation: an operator cuts a worker's identity off at once, durably and for good."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from structlog.testing import capture_logs

from taskrun.core.ids import WorkerId
from taskrun.core.status import RunStatus, TaskStatus, WorkerStatus
from tests.conftest import Cluster


async def wait_for(predicate, within: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_revoking_a_worker_mid_run_closes_its_stream_and_retries_elsewhere(
    cluster: Cluster,
) -> None:
    # a long lease: the run must be lost at once, not after the lease runs out
    server = await cluster.start_server(lease_duration=60)
    doomed = await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "abc", "chunks": 3, "delay": 0.3})
    await wait_for(lambda: bool(doomed.runs))
    _, runner = cluster.workers["worker-1"]

    with capture_logs() as logs:
        revoked = await client.revoke_worker("worker-1", "stolen laptop")
        assert await asyncio.wait_for(runner, 10) == 2  # the live stream ended: fatal

    assert revoked.status is WorkerStatus.REVOKED
    assert revoked.revoked_reason == "stolen laptop"
    assert revoked.revoked_at is not None
    assert "worker-1" not in server.engine.sessions
    refused = [e for e in logs if e["event"] == "server refused this worker"]
    assert refused and "PERMISSION_DENIED" in refused[0]["reason"]
    assert "worker worker-1 was revoked: stolen laptop" in refused[0]["reason"]
    await cluster.start_worker("worker-2")
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED
    _, runs = await client.get_task(task.id)
    assert [(r.status, r.worker_id) for r in runs] == [
        (RunStatus.LOST, "worker-1"),
        (RunStatus.COMPLETED, "worker-2"),
    ]
    assert "worker revoked: stolen laptop" in runs[0].error


async def test_a_revoked_worker_reconnecting_is_refused_and_exits_2(cluster: Cluster) -> None:
    server = await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    await client.revoke_worker("worker-1", "compromised")
    _, first = cluster.workers.pop("worker-1")
    assert await asyncio.wait_for(first, 10) == 2

    with capture_logs() as logs:
        await cluster.start_worker("worker-1", wait=False)
        _, again = cluster.workers.pop("worker-1")
        assert await asyncio.wait_for(again, 10) == 2
    (refused,) = [e for e in logs if e["event"] == "server refused this worker"]
    assert refused["reason"] == "PERMISSION_DENIED: worker worker-1 was revoked: compromised"
    assert "worker-1" not in server.engine.sessions
    stored = await server.engine.store.get_worker(WorkerId("worker-1"))
    assert stored is not None and stored.status is WorkerStatus.REVOKED


async def test_revocation_survives_a_control_plane_restart(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    revoked = await client.revoke_worker("worker-1", "left the company")
    _, runner = cluster.workers.pop("worker-1")
    assert await asyncio.wait_for(runner, 10) == 2
    await cluster.stop_server()

    await cluster.start_server()
    worker, _ = await client.get_worker("worker-1")
    assert worker.status is WorkerStatus.REVOKED
    assert worker.revoked_reason == "left the company"
    assert worker.revoked_at == revoked.revoked_at
    await cluster.start_worker("worker-1", wait=False)
    _, again = cluster.workers.pop("worker-1")
    assert await asyncio.wait_for(again, 10) == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.revoke_worker("worker-1")
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "already revoked" in (err.value.details() or "")


async def test_revoking_an_offline_worker_loses_its_runs_without_waiting(
    cluster: Cluster,
) -> None:
    await cluster.start_server(lease_duration=60)
    doomed = await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "a", "chunks": 2, "delay": 1}, max_attempts=1)
    await wait_for(lambda: bool(doomed.runs))
    _, runner = cluster.workers.pop("worker-1")
    runner.cancel()  # vanishes; its run waits for it until the lease runs out
    with pytest.raises(asyncio.CancelledError):
        await runner
    await client.revoke_worker("worker-1")
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert "revoked by an operator" in final.error


async def test_revoke_refuses_unknown_repeated_and_non_operator_calls(cluster: Cluster) -> None:
    server = await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.revoke_worker("no-such-worker")
    assert err.value.code() is grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.client("worker-2").revoke_worker("worker-1")
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "worker-1" in server.engine.sessions  # nothing changed
    stored = await server.engine.store.get_worker(WorkerId("worker-1"))
    assert stored is not None and stored.status is WorkerStatus.ONLINE

    await client.revoke_worker("worker-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.revoke_worker("worker-1")
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
