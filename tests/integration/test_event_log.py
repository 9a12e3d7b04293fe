"""The durable event log: every state change gets a position, stored with the change; a watcher
resumes after a position (gRPC `after_position`, HTTP `Last-Event-ID`) and gets exactly what it
did not see, also what was committed while it was away or by a restarted control plane."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from taskrun.cli.client import EventKind, FleetEvent
from taskrun.controlplane.store import eventlog
from taskrun.core.status import TaskStatus
from taskrun.v1 import common_pb2, workers_pb2
from taskrun.v1 import events_pb2 as epb
from tests.conftest import Cluster
from tests.integration.test_http_api import api, sse_events
from tests.integration.test_security import RawWorker, raw_worker


async def collect(client, after: int, until_terminal: set[str]) -> list[FleetEvent]:  # type: ignore[no-untyped-def]
    """Events after `after` until every task named has a terminal TASK_CHANGED."""
    seen: list[FleetEvent] = []
    left = set(until_terminal)
    watching = client.watch_events(after_position=after, include_output=True)
    async with contextlib.aclosing(watching) as events:
        async for event in events:
            seen.append(event)
            if event.kind is EventKind.TASK_CHANGED and event.task.status.terminal:
                left.discard(event.task.id)
                if not left:
                    break
    return seen


def contiguous(positions: list[int]) -> bool:
    return positions == list(range(positions[0], positions[0] + len(positions)))


async def test_a_watcher_resumes_after_a_restart_with_nothing_missed_or_repeated(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    first = await client.create_task("echo", {"text": "one"})
    await client.wait(first.id)
    snapshot_end: list[FleetEvent] = []
    async with contextlib.aclosing(client.watch_events(snapshot=True)) as events:
        async for event in events:
            if event.kind is EventKind.SNAPSHOT_END:
                snapshot_end.append(event)
                break
    mark = snapshot_end[0].position
    assert mark > 0  # the snapshot says which position it is current to

    # the control plane restarts while nobody watches; tasks are created before and after
    second = await client.create_task("echo", {"text": "two"})
    await client.wait(second.id)
    await cluster.stop_server()
    await cluster.start_server()
    await cluster.wait_registered("worker-1")
    third = await client.create_task("echo", {"text": "three"})

    seen = await collect(client, mark, {second.id, third.id})
    positions = [e.position for e in seen]
    assert positions[0] == mark + 1 and contiguous(positions)  # none missed, none twice
    assert not any(e.snapshot for e in seen)
    assert all(e.task is None or e.task.id != first.id for e in seen)
    statuses = [e.task.status for e in seen if e.task is not None and e.task.id == second.id]
    assert statuses[-1] is TaskStatus.COMPLETED and len(statuses) >= 2  # created, then ended

    texts = [e.chunk.data for e in seen if e.chunk is not None and e.chunk.task_id == second.id]
    assert "".join(texts) == "two"  # output replayed with its text, from the output table

    # asking again from the same position gives the same events
    again = await collect(client, mark, {second.id})
    assert [e.position for e in again] == positions[: len(again)]


async def test_a_position_the_log_does_not_hold_is_refused(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async with contextlib.aclosing(client.watch_events(after_position=10**9)) as events:
            async for _ in events:
                break
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "after_position" in (refused.value.details() or "")


@pytest.mark.parametrize("resume", [True, False], ids=["after_position", "snapshot"])
async def test_a_change_whose_commit_is_under_way_when_a_watcher_comes_reaches_it(
    cluster: Cluster, postgres_url: str, resume: bool
) -> None:
    """A watcher that comes while a commit is under way gets that commit's changes too, from
    the log: its positions go on one after another, whether it resumed after a position or
    started from a snapshot. The commit is held by a real lock on the event table."""
    import psycopg

    server = await cluster.start_server(store=postgres_url)
    engine = server.engine
    client = cluster.client()
    await client.create_task("echo", {"text": "before"}, allow_unknown_agent=True)
    _, mark = await engine.store.event_positions()
    seen: list[FleetEvent] = []
    ended = asyncio.Event()

    async def watch() -> None:
        events = client.watch_events(after_position=mark if resume else 0, snapshot=not resume)
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                seen.append(event)
                if event.kind is EventKind.SNAPSHOT_END:
                    ended.set()

    async with await psycopg.AsyncConnection.connect(postgres_url) as holder:
        await holder.execute("LOCK TABLE events IN EXCLUSIVE MODE")  # inserts wait, reads go on
        stalled = asyncio.create_task(
            client.create_task("echo", {"text": "stalled"}, allow_unknown_agent=True)
        )
        async with asyncio.timeout(10):
            while engine.events.position == mark:  # captured; its commit waits on the lock
                await asyncio.sleep(0.01)
        watching = asyncio.create_task(watch())
        async with asyncio.timeout(10):
            while not engine.events.subscribers:
                await asyncio.sleep(0.01)
        if resume:
            await asyncio.sleep(0.3)  # the replay reads what is committed (it waits, fixed)
        else:
            await asyncio.wait_for(ended.wait(), 10)
        await holder.rollback()  # the lock goes: the commit goes through
    held = await asyncio.wait_for(stalled, 10)
    after = await client.create_task("echo", {"text": "after"}, allow_unknown_agent=True)
    async with asyncio.timeout(10):
        while not any(e.task is not None and e.task.id == after.id for e in seen):
            await asyncio.sleep(0.01)
    watching.cancel()

    changes = [e for e in seen if not e.snapshot]
    positions = [e.position for e in changes]
    start = mark if resume else next(e.position for e in seen if e.kind is EventKind.SNAPSHOT_END)
    assert start == mark
    assert positions == list(range(mark + 1, mark + 1 + len(positions))), positions
    changed = [e.task.id for e in changes if e.kind is EventKind.TASK_CHANGED and e.task]
    assert changed == [held.id, after.id]


async def test_a_watcher_that_waits_too_long_on_a_commit_is_told_to_come_back(
    cluster: Cluster, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit a resuming watcher waits for hangs (a lock on the event table): past
    CATCH_UP_WAIT the watch ends UNAVAILABLE, saying why, and a client that resumes from the
    same position once the database moves gets the change."""
    import psycopg

    from taskrun.controlplane import event_service

    monkeypatch.setattr(event_service, "CATCH_UP_WAIT", 0.5)
    server = await cluster.start_server(store=postgres_url)
    client = cluster.client()
    await client.create_task("echo", {"text": "before"}, allow_unknown_agent=True)
    _, mark = await server.engine.store.event_positions()
    async with await psycopg.AsyncConnection.connect(postgres_url) as holder:
        await holder.execute("LOCK TABLE events IN EXCLUSIVE MODE")
        stalled = asyncio.create_task(
            client.create_task("echo", {"text": "stalled"}, allow_unknown_agent=True)
        )
        async with asyncio.timeout(10):
            while server.engine.events.position == mark:
                await asyncio.sleep(0.01)
        watching = client.watch_events(after_position=mark, reconnect=False)
        with pytest.raises(grpc.aio.AioRpcError) as behind:
            async with contextlib.aclosing(watching) as events:
                async for _ in events:
                    pass
        await holder.rollback()
    assert behind.value.code() is grpc.StatusCode.UNAVAILABLE
    assert behind.value.details() == event_service.LOG_BEHIND
    held = await asyncio.wait_for(stalled, 10)
    seen: list[FleetEvent] = []
    async with contextlib.aclosing(client.watch_events(after_position=mark)) as events:
        async for event in events:
            seen.append(event)
            if event.kind is EventKind.TASK_CHANGED and event.task and event.task.id == held.id:
                break
    assert [e.position for e in seen] == list(range(mark + 1, mark + 1 + len(seen)))


async def test_server_sent_events_resume_with_last_event_id(cluster: Cluster) -> None:
    async with api(cluster, "admin") as http:
        await cluster.start_worker("worker-1")
        client = cluster.client()
        ids: list[int] = []
        everything = {"snapshot": "false", "include_output": "true"}
        async with http.stream("GET", "/v1/events", params=everything) as response:
            task = await client.create_task("echo", {"text": "first"})
            async for event in sse_events(response):
                assert event.id is not None
                ids.append(int(event.id))
                body = event.json()
                if event.event == "EVENT_KIND_TASK_CHANGED" and body["task"]["id"] == task.id:
                    break  # disconnect at the first change of the task
        later = await client.create_task("echo", {"text": "second"})
        await client.wait(later.id)
        await client.wait(task.id)
        resumed: list[int] = []
        kinds: list[tuple[str, str]] = []
        headers = {"Last-Event-ID": str(ids[-1])}
        resume = {"include_output": "true"}
        async with http.stream("GET", "/v1/events", params=resume, headers=headers) as response:
            async for event in sse_events(response):
                assert event.id is not None
                resumed.append(int(event.id))
                body = event.json()
                if "task" in body:
                    kinds.append((body["task"]["id"], body["task"]["status"]))
                if ("tsk_" + later.id.removeprefix("tsk_"), "TASK_STATUS_COMPLETED") in kinds:
                    break
        assert resumed[0] == ids[-1] + 1 and contiguous(ids + resumed)
        assert (task.id, "TASK_STATUS_COMPLETED") in kinds
        bad = await http.get("/v1/events", headers={"Last-Event-ID": "x1"})
        assert bad.status_code == 400 and "Last-Event-ID" in bad.text


async def test_positions_continue_after_a_failed_commit_without_gaps(cluster: Cluster) -> None:
    """A commit that fails never shows its events; the positions it took are given again."""
    server = await cluster.start_server(store="memory")
    client = cluster.client()
    a = await client.create_task("echo", {"text": "a"}, allow_unknown_agent=True)
    store = server.engine.store
    store.fail_writes("disk full")  # type: ignore[attr-defined]
    with pytest.raises(grpc.aio.AioRpcError):
        await client.create_task("echo", {"text": "lost"}, allow_unknown_agent=True)
    store.fail_writes(None)  # type: ignore[attr-defined]

    async def recovered() -> bool:
        return not server.engine.store_error

    async with asyncio.timeout(10):
        while not await recovered():
            await asyncio.sleep(0.02)
    b = await client.create_task("echo", {"text": "b"}, allow_unknown_agent=True)
    logged = await store.read_events(0)
    positions = [e.position for e in logged]
    assert contiguous(positions) and positions[0] == 1
    named = [e.task_id for e in logged if e.kind == int(EventKind.TASK_CHANGED)]
    assert a.id in named and b.id in named


async def _acked(worker: RawWorker, seq: int) -> None:
    async with asyncio.timeout(10):
        while True:
            message = await worker.call.read()
            assert message is not grpc.aio.EOF
            if message.ack_seq >= seq:
                return


def _chunks(run: workers_pb2.RunAssignment, *seqs: int) -> list[common_pb2.OutputChunk]:
    return [
        common_pb2.OutputChunk(run_id=run.run_id, attempt=run.attempt, seq=s, data="abcd"[s - 1])
        for s in seqs
    ]


async def test_output_sent_again_is_logged_and_followed_once_also_by_a_restarted_server(
    cluster: Cluster,
) -> None:
    """A worker sends again what was not acknowledged (a reconnect, a new leader): what is
    already stored reaches neither the event log nor followers a second time."""
    server = await cluster.start_server()
    client = cluster.client()
    async with raw_worker(cluster, "worker-1") as worker:
        task = await client.create_task("echo", {"text": "abcd"})
        run = await worker.assignment()
        running = workers_pb2.RunStatusUpdate(
            run_id=run.run_id, attempt=run.attempt, status=common_pb2.RUN_STATUS_RUNNING
        )
        beat = workers_pb2.Heartbeat(seq=1)  # the lease: these reports come within it
        await worker.report(running, chunks=_chunks(run, 1, 2), message_seq=1, heartbeat=beat)
        await _acked(worker, 1)
        # the ack was lost on the way: the worker sends 1 and 2 again, with 3
        await worker.report(chunks=_chunks(run, 1, 2, 3), message_seq=2)
        await _acked(worker, 2)
    await cluster.stop_server()
    server = await cluster.start_server()
    async with raw_worker(cluster, "worker-1", held=[run]) as worker:
        # the new control plane knows what is stored: 1-3 again are dropped, 4 is new
        beat = workers_pb2.Heartbeat(seq=1)
        await worker.report(chunks=_chunks(run, 2, 3, 4), message_seq=3, heartbeat=beat)
        completed = workers_pb2.RunStatusUpdate(
            run_id=run.run_id, attempt=run.attempt, status=common_pb2.RUN_STATUS_COMPLETED
        )
        await worker.report(completed, chunks=_chunks(run, 1, 4), message_seq=4)
        final = await asyncio.wait_for(client.wait(task.id), 10)
    assert final.status is TaskStatus.COMPLETED
    logged = [eventlog.decode(e) for e in await server.engine.store.read_events(0, 1000)]
    output = [e.chunk.seq for e in logged if e.kind == epb.EVENT_KIND_OUTPUT]
    assert output == [1, 2, 3, 4]
    text = ""
    async for event in client.follow(task.id, follow=False):
        text += getattr(getattr(event, "chunk", None), "data", "")
    assert text == "abcd"
