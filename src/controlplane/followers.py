"""Fan-out of a task's output and status to its followers (FollowTask streams).

Each subscription has a bounded buffer. A follower that falls behind is marked `lagged` and its
buffer dropped: it then re-reads from the store, so a slow reader costs memory for at most
`limit` items and never slows the server.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from taskrun.core.ids import TaskId
from taskrun.core.models import OutputChunk, Task


@dataclass(eq=False, slots=True)
class Subscription:
    task_id: TaskId
    limit: int
    items: deque[OutputChunk | Task] = field(default_factory=deque)
    lagged: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, item: OutputChunk | Task) -> None:
        if self.lagged:
            return
        if len(self.items) >= self.limit:
            self.items.clear()
            self.lagged = True
        else:
            self.items.append(item)
        self.wakeup.set()

    async def wait(self) -> tuple[list[OutputChunk | Task], bool]:
        """Wait for news; returns (items, lagged) and resets both."""
        await self.wakeup.wait()
        self.wakeup.clear()
        items, lagged = list(self.items), self.lagged
        self.items.clear()
        self.lagged = False
        return items, lagged


class FollowHub:
    def __init__(self, limit: int = 10_000) -> None:
        self._subs: dict[TaskId, set[Subscription]] = {}
        self._limit = limit

    def subscribe(self, task_id: TaskId) -> Subscription:
        sub = Subscription(task_id, self._limit)
        self._subs.setdefault(task_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.task_id]

    def publish(self, task_id: TaskId, item: OutputChunk | Task) -> None:
        """Deliver to the task's followers. Call only after the item is committed: a follower
        that subscribes before the commit then either reads it from the store or gets it here."""
        for sub in self._subs.get(task_id, ()):
            sub.push(item)
