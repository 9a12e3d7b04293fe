"""Nothing visible before it is durable: a store that cannot write (a real, full tmpfs), one bad
item in a worker's batch, and the control plane resuming by itself once writes succeed again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from taskrun.cli.client import OutputReceived
from taskrun.controlplane.store import eventlog
from taskrun.core.status import RunStatus, TaskStatus
from taskrun.v1 import common_pb2, workers_pb2, workers_pb2_grpc
from taskrun.v1 import events_pb2 as epb
from tests.conftest import Cluster
from tests.faults import fill, small_filesystem
from tests.integration.test_bad_input import channel


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "small", "4m") as path:
        yield path


async def health(cluster: Cluster) -> int:
    async with channel(cluster) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        return int(reply.status)


async def until(predicate, within: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within):
        while not await predicate():
            await asyncio.sleep(0.02)


# grpc_health has no type stubs; its statuses are protobuf enum values, ints
SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING


async def serving(cluster: Cluster) -> bool:
    return await health(cluster) == SERVING


async def not_serving(cluster: Cluster) -> bool:
    return await health(cluster) == NOT_SERVING


async def test_a_create_whose_commit_fails_is_unavailable_and_leaves_no_trace(
    cluster: Cluster, small: Path
) -> None:
    server = await cluster.start_server(store=f"sqlite:{small / 'taskrun.db'}")
    await cluster.start_worker("worker-1")
    client = cluster.client()
    filler = fill(small)
    big = {"text": "x" * 300_000}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.create_task("echo", big, idempotency_key="nightly-1")
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    details = refused.value.details() or ""
    assert details == "the store cannot write: database or disk is full"
    assert await not_serving(cluster)
    # the same key is not taken by a task that was never written
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await client.create_task("echo", big, idempotency_key="nightly-1")
    assert again.value.code() is grpc.StatusCode.UNAVAILABLE

    filler.unlink()
    await until(lambda: serving(cluster))
    task = await client.create_task("echo", {"text": "once"}, idempotency_key="nightly-1")
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED
    tasks, _ = await client.list_tasks()
    assert [t.id for t in tasks] == [task.id]  # nothing of the refused attempts
    assert server.engine.recoveries == 1
    # durable: after a restart the key still names the same task
    await cluster.stop_server()
    await cluster.start_server(store=f"sqlite:{small / 'taskrun.db'}")
    same = await cluster.client().create_task("echo", {"text": "once"}, idempotency_key="nightly-1")
    assert same.id == task.id


async def test_a_write_that_fails_while_the_control_plane_stops_is_refused_and_not_reloaded(
    cluster: Cluster, small: Path
) -> None:
    """The disk fills between the engine's stop and the listener closing. The create whose
    commit fails is UNAVAILABLE and says why; the stopping control plane reloads nothing (the
    next one reads the store) and stops; the next one has no trace of the refused task."""
    store = f"sqlite:{small / 'taskrun.db'}"
    server = await cluster.start_server(store=store)
    await cluster.start_worker("worker-1")
    client = cluster.client()
    before = await client.create_task("echo", {"text": "before"})
    await client.wait(before.id)
    filler = fill(small)
    with capture_logs() as logs:
        await server.engine.stop()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.create_task("echo", {"text": "x" * 300_000}, idempotency_key="k-1")
        await cluster.stop_server()
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert refused.value.details() == "the store cannot write: database or disk is full"
    assert server.engine.recoveries == 0
    events = [e["event"] for e in logs]
    assert "store write failed while stopping; nothing reloaded" in events
    assert "store write failed; refusing writes until the store recovers" not in events

    filler.unlink()
    await cluster.start_server(store=store)
    again = await client.create_task("echo", {"text": "after"}, idempotency_key="k-1")
    assert (await client.wait(again.id)).status is TaskStatus.COMPLETED
    listed, _ = await client.list_tasks()
    assert {t.id for t in listed} == {before.id, again.id}


async def test_reports_whose_commit_failed_are_resent_and_applied_once(
    cluster: Cluster, small: Path
) -> None:
    # a long lease: the worker keeps its runs through the outage
    server = await cluster.start_server(store=f"sqlite:{small / 'taskrun.db'}", lease_duration=30)
    daemon = await cluster.start_worker("worker-1")
    client = cluster.client()
    texts = [f"<{n}:" + "abcdefghij" * 3 + ">" for n in range(4)]
    tasks = [
        await client.create_task("echo", {"text": t, "chunks": 6, "delay": 0.15}) for t in texts
    ]

    async def all_running() -> bool:
        return len(daemon.runs) == 4

    await until(all_running)
    filler = fill(small)

    async def store_failed() -> bool:
        return bool(server.engine.store_error)

    await until(store_failed)
    assert await not_serving(cluster)

    async def runs_done_on_worker() -> bool:
        return not daemon.runs

    await until(runs_done_on_worker)  # finished while their reports could not be stored
    filler.unlink()
    finals = [await asyncio.wait_for(client.wait(t.id), 20) for t in tasks]
    assert [f.status for f in finals] == [TaskStatus.COMPLETED] * 4
    assert [f.attempts for f in finals] == [1] * 4
    for task, text in zip(tasks, texts, strict=True):
        pieces = [
            e.chunk.data
            async for e in client.follow(task.id, follow=False)
            if isinstance(e, OutputReceived)
        ]
        assert "".join(pieces) == text  # whole, each chunk once
    # the event log too: what was resent after the outage is logged once, nothing is missing
    logged = [eventlog.decode(e) for e in await server.engine.store.read_events(0, 10_000)]
    output = sorted(
        (e.chunk.task_id, e.chunk.seq) for e in logged if e.kind == epb.EVENT_KIND_OUTPUT
    )
    assert output == sorted((t.id, seq) for t in tasks for seq in range(1, 7))
    assert await serving(cluster)


async def test_a_write_failure_stops_dispatch_and_a_recovered_store_resumes_it(
    cluster: Cluster, small: Path
) -> None:
    server = await cluster.start_server(store=f"sqlite:{small / 'taskrun.db'}")
    await cluster.start_worker("worker-1")
    client = cluster.client()
    filler = fill(small)
    with pytest.raises(grpc.aio.AioRpcError):
        await client.create_task("echo", {"text": "x" * 300_000})
    # while it cannot write, no session is accepted: nothing can be promised to a worker
    await cluster.start_worker("worker-2", wait=False)
    await asyncio.sleep(0.5)
    assert server.engine.sessions == {}
    filler.unlink()
    await cluster.wait_registered("worker-2")
    tasks = [await client.create_task("echo", {"text": f"t{n}"}) for n in range(5)]
    finals = [await client.wait(t.id) for t in tasks]
    assert {f.status for f in finals} == {TaskStatus.COMPLETED}


async def _raw_session(
    stub: workers_pb2_grpc.RunServiceStub,
) -> tuple[grpc.aio.StreamStreamCall, workers_pb2.RunAssignment]:
    call = stub.StreamConnect()
    hello = workers_pb2.WorkerHello(
        worker_id="worker-1", max_concurrent_runs=1, agents=[common_pb2.AgentSpec(name="echo")]
    )
    await call.write(workers_pb2.WorkerMessage(hello=hello))
    first = await call.read()
    assert first.params.lease_duration_ms > 0
    async with asyncio.timeout(10):
        while True:
            message = await call.read()
            if message.assignments:
                return call, message.assignments[0]


async def _read_until(
    call: grpc.aio.StreamStreamCall, check: Callable[[workers_pb2.ServerMessage], bool]
) -> workers_pb2.ServerMessage:
    async with asyncio.timeout(10):
        while True:
            # grpc is untyped: the stream's deserializer makes ServerMessages (or EOF)
            message: workers_pb2.ServerMessage = await call.read()
            assert message is not grpc.aio.EOF
            if check(message):
                return message


async def test_one_bad_item_in_a_batch_is_refused_alone_and_the_session_goes_on(
    cluster: Cluster,
) -> None:
    server = await cluster.start_server()
    client = cluster.client()
    task = await client.create_task("echo", {"text": "hi"}, allow_unknown_agent=True)
    async with channel(cluster, "worker-1") as ch:
        call, a = await _raw_session(workers_pb2_grpc.RunServiceStub(ch))
        assert a.fencing_token == 1
        good = common_pb2.OutputChunk(run_id=a.run_id, attempt=1, seq=1, data="good ")
        unknown_kind = common_pb2.OutputChunk(run_id=a.run_id, attempt=1, seq=2, data="k")
        unknown_kind.kind = 77  # type: ignore[assignment]
        bad_time = common_pb2.OutputChunk(run_id=a.run_id, attempt=1, seq=3, data="t")
        bad_time.time.seconds = 2**62
        later = common_pb2.OutputChunk(run_id=a.run_id, attempt=1, seq=4, data="after")
        unknown_status = workers_pb2.RunStatusUpdate(run_id=a.run_id, attempt=1)
        unknown_status.status = 42  # type: ignore[assignment]
        batch = workers_pb2.WorkerMessage(
            message_seq=1,
            chunks=[good, unknown_kind, bad_time, later],
            statuses=[
                workers_pb2.RunStatusUpdate(
                    run_id=a.run_id, attempt=1, status=common_pb2.RUN_STATUS_RUNNING
                ),
                unknown_status,
                workers_pb2.RunStatusUpdate(
                    run_id=a.run_id, attempt=1, status=common_pb2.RUN_STATUS_COMPLETED
                ),
            ],
        )
        await call.write(batch)
        await _read_until(call, lambda m: m.ack_seq == 1)
        # the session is alive: a heartbeat still renews the lease
        await call.write(workers_pb2.WorkerMessage(heartbeat=workers_pb2.Heartbeat(seq=7)))
        await _read_until(call, lambda m: m.lease_seq == 7)
        call.cancel()
    final, runs = await client.get_task(task.id)
    assert final.status is TaskStatus.COMPLETED
    assert [r.status for r in runs] == [RunStatus.COMPLETED]
    chunks = [
        e.chunk async for e in client.follow(task.id, follow=False) if isinstance(e, OutputReceived)
    ]
    assert [(c.seq, c.data) for c in chunks] == [(1, "good "), (4, "after")]
    assert server.engine.rejected_reports == 3
