"""Followers get each task as the commit that publishes it held it, never a later state."""

from __future__ import annotations

import asyncio
from typing import Any

from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.followers import Subscription
from taskrun.controlplane.store.memory import MemoryStore
from taskrun.core.models import Task, TaskSpec
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
