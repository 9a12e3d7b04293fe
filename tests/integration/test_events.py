"""WatchEvents: a snapshot first, then committed changes in order, filtered; slow watchers end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

import grpc
import pytest

from taskrun.cli.client import EventKind, FleetEvent
from taskrun.core.models import TaskSpec
from taskrun.core.status import RunStatus, TaskStatus
from tests.conftest import Cluster


class Watch:
    """A WatchEvents stream read in the background into a list."""

    def __init__(self, events: AsyncGenerator[FleetEvent, None]) -> None:
        self.events: list[FleetEvent] = []
        self.error: BaseException | None = None
        self._stream = events
        self._task = asyncio.create_task(self._read())
        self._news = asyncio.Event()

    async def _read(self) -> None:
        try:
            async for event in self._stream:
                self.events.append(event)
                self._news.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
            self._news.set()

    async def until(
        self, predicate: Callable[[list[FleetEvent]], bool], timeout: float = 10
    ) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.events):
                if self.error is not None:
                    raise self.error
                self._news.clear()
                await self._news.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        await self._stream.aclose()


def task_statuses(events: list[FleetEvent], task_id: str) -> list[TaskStatus]:
    return [e.task.status for e in events if e.task is not None and e.task.id == task_id]


def done(task_id: str) -> Callable[[list[FleetEvent]], bool]:
    return lambda events: TaskStatus.COMPLETED in task_statuses(events, task_id)


async def test_snapshot_comes_first_then_changes_in_commit_order(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    task = await client.create_task("echo", {"text": "hi"}, allow_unknown_agent=True)
    watch = Watch(client.watch_events())
    try:
        await watch.until(lambda ev: any(e.kind is EventKind.SNAPSHOT_END for e in ev))
        snapshot = watch.events
        assert [e.kind for e in snapshot] == [
            EventKind.RUN_CHANGED,
            EventKind.TASK_CHANGED,
            EventKind.SNAPSHOT_END,
        ]
        assert all(e.snapshot for e in snapshot)
        assert snapshot[1].task is not None and snapshot[1].task.id == task.id
        await cluster.start_worker("worker-1")
        await watch.until(done(task.id))
        changes = watch.events[3:]
        assert not any(e.snapshot for e in changes)
        assert changes[0].kind is EventKind.WORKER_CONNECTED
        assert changes[0].worker is not None and changes[0].worker.id == "worker-1"
        assert task_statuses(watch.events, task.id) == [
            TaskStatus.PENDING,
            TaskStatus.RUNNING,
            TaskStatus.COMPLETED,
        ]
        # Each event is a state after a commit; RUNNING may share a commit with the end.
        runs = [e.run.status for e in watch.events if e.run is not None]
        assert runs[:2] == [RunStatus.PENDING, RunStatus.ASSIGNED]
        assert runs[-1] is RunStatus.COMPLETED
        assert runs == sorted(runs)
    finally:
        await watch.close()


async def test_task_filter_shows_only_that_task(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    first = await client.create_task("echo", {"text": "a"}, allow_unknown_agent=True)
    other = await client.create_task("echo", {"text": "b"}, allow_unknown_agent=True)
    watch = Watch(client.watch_events(task_id=first.id))
    try:
        await watch.until(lambda ev: any(e.kind is EventKind.SNAPSHOT_END for e in ev))
        await cluster.start_worker("worker-1")
        await client.wait(other.id)
        await watch.until(done(first.id))
        ids = {e.task.id if e.task else e.run.task_id if e.run else "" for e in watch.events}
        assert ids == {first.id, ""}  # "" = SNAPSHOT_END
        assert not any(e.worker for e in watch.events)
    finally:
        await watch.close()


async def test_worker_filter_shows_that_worker_and_its_runs(cluster: Cluster) -> None:
    server = await cluster.start_server()
    await cluster.start_worker("worker-1", labels={"pool": "a"})
    client = cluster.client()
    watch = Watch(client.watch_events(worker_id="worker-2", snapshot=False))
    try:
        async with asyncio.timeout(5):
            while server.engine.events.subscribers == 0:
                await asyncio.sleep(0.01)
        await cluster.start_worker("worker-2", labels={"pool": "b"})
        tasks = [
            await client.create_task("echo", {"text": "x"}, required_labels={"pool": pool})
            for pool in ("a", "b")
        ]
        for t in tasks:
            await client.wait(t.id)
        await watch.until(done(tasks[1].id))
        assert watch.events[0].kind is EventKind.WORKER_CONNECTED
        workers = {e.worker.id for e in watch.events if e.worker}
        assert workers == {"worker-2"}
        assert {e.run.task_id for e in watch.events if e.run} == {tasks[1].id}
        assert all(e.run.worker_id == "worker-2" for e in watch.events if e.run)
        assert all(e.task.worker_id == "worker-2" for e in watch.events if e.task)
    finally:
        await watch.close()


async def test_kind_filter_and_output(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    watch = Watch(
        client.watch_events(kinds=[EventKind.OUTPUT, EventKind.TASK_CHANGED], include_output=True)
    )
    try:
        await watch.until(lambda ev: bool(ev))
        task = await client.create_task("echo", {"text": "hello, world", "chunks": 3})
        await watch.until(done(task.id))
        kinds = {e.kind for e in watch.events}
        assert kinds == {EventKind.OUTPUT, EventKind.TASK_CHANGED, EventKind.SNAPSHOT_END}
        text = "".join(e.chunk.data for e in watch.events if e.chunk)
        assert text == "hello, world"
        # output comes before the task's terminal state
        last_chunk = max(i for i, e in enumerate(watch.events) if e.chunk)
        assert watch.events[-1].task is not None and last_chunk < len(watch.events) - 1
    finally:
        await watch.close()


async def test_a_watcher_that_falls_behind_is_ended_with_resource_exhausted(
    cluster: Cluster,
) -> None:
    server = await cluster.start_server()
    await cluster.start_worker("worker-1")
    server.engine.events.limit = 5
    client = cluster.client()
    slow = Watch(client.watch_events())
    try:
        await slow.until(lambda ev: bool(ev))
        # One commit makes 40 events at once: more than the watcher's buffer holds.
        created = await client.create_tasks([TaskSpec(agent="echo", input="{}")] * 20)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await slow.until(lambda ev: False)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fell more than 5 events behind" in (info.value.details() or "")
        # the server did not wait for it
        for task in created:
            assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
        assert server.engine.events.subscribers == 0
    finally:
        await slow.close()


async def test_watching_needs_an_operator_identity(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client("worker-1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in client.watch_events():
            pass
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
