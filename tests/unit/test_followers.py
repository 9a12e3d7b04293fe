"""Followers get each task as the commit that publishes it held it, never a later state."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.followers import FollowHub, Subscription
from taskrun.controlplane.store.memory import MemoryStore
from taskrun.core.ids import RunId, TaskId
from taskrun.core.models import OutputChunk, OutputKind, Task, TaskPolicy, TaskSpec
from taskrun.core.status import TaskStatus
from taskrun.core.store import ChangeSet


class OneAtATime(MemoryStore):
    """Takes each change set when submitted; its commit completes when the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.releases: list[asyncio.Event] = []

    def submit(self, changes: ChangeSet) -> Any:
        stored = super().submit(changes)
        release = asyncio.Event()
        self.releases.append(release)

        async def later() -> None:
            await release.wait()
            await stored

        return asyncio.ensure_future(later())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_follower_gets_the_task_as_committed_not_a_later_uncommitted_state() -> None:
    store = OneAtATime()
    engine = Engine(store, ServerConfig(store="memory"))
    await engine.start()
    subs: list[Subscription] = []
    create = asyncio.ensure_future(
        engine.create_tasks(
            [TaskSpec(agent="echo", input="{}")], lambda t: subs.append(engine.hub.subscribe(t.id))
        )
    )
    await settle()
    assert len(store.releases) == 1 and len(subs) == 1
    assert subs[0].items == type(subs[0].items)()  # nothing before the commit
    (task_id,) = engine.tasks
    cancel = asyncio.ensure_future(engine.cancel_task(task_id, "changed my mind"))
    await settle()
    assert len(store.releases) == 2  # the cancel is made (the view says CANCELLED), not durable
    store.releases[0].set()
    await create
    published = [i for i in subs[0].items if isinstance(i, Task)]
    assert published and all(t.status is TaskStatus.PENDING for t in published)
    store.releases[1].set()
    await cancel
    assert [i for i in subs[0].items if isinstance(i, Task)][-1].status is TaskStatus.CANCELLED
    await engine.stop()


async def test_a_follower_that_comes_while_the_commit_is_under_way_rereads_the_store() -> None:
    """Nobody followed the task when its change was made, so no copy of it was kept: the live
    task may already hold a later change that is not durable. A follower that came meanwhile
    is told to read the store again (which holds exactly what was committed) instead."""
    store = OneAtATime()
    engine = Engine(store, ServerConfig(store="memory"))
    await engine.start()
    create = asyncio.ensure_future(engine.create_tasks([TaskSpec(agent="echo", input="{}")]))
    await settle()
    (task_id,) = engine.tasks
    sub = engine.hub.subscribe(task_id)  # after the create was made, before it is durable
    cancel = asyncio.ensure_future(engine.cancel_task(task_id, "changed my mind"))
    await settle()
    assert len(store.releases) == 2  # the view says CANCELLED; the store has nothing yet
    store.releases[0].set()
    await create
    items, reread = await sub.wait()
    assert reread and items == []  # not the live task, which says CANCELLED already
    store.releases[1].set()
    await cancel
    items, reread = await sub.wait()
    assert [i.status for i in items if isinstance(i, Task)] == [TaskStatus.CANCELLED]
    await engine.stop()


async def test_an_outcome_only_follower_keeps_and_wakes_for_the_end_alone() -> None:
    hub = FollowHub(limit=3)
    now = datetime.now(UTC)
    task = Task(TaskId("tsk_1"), "echo", "{}", {}, TaskPolicy(), TaskStatus.PENDING, now, now)
    everything = hub.subscribe(task.id)
    outcome = hub.subscribe(task.id, outcome_only=True)
    for seq in range(1, 6):  # more output than the buffer holds: would lag a full follower
        hub.publish(task.id, OutputChunk(RunId("run_1"), 1, seq, "x", OutputKind.TEXT))
    task.status = TaskStatus.RUNNING
    hub.publish(task.id, task.snapshot())
    assert everything.lagged and everything.wakeup.is_set()
    assert not outcome.lagged and not outcome.items and not outcome.wakeup.is_set()
    task.status = TaskStatus.COMPLETED
    hub.publish(task.id, task.snapshot())
    items, lagged = await outcome.wait()
    assert not lagged
    assert [(type(i), getattr(i, "status", None)) for i in items] == [(Task, TaskStatus.COMPLETED)]
