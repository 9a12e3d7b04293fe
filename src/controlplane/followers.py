"""Fan-out of a task's output and status to its followers (FollowTask streams).

Each subscription has a bounded buffer. A follower that falls behind is marked `lagged` and its
buffer dropped: it then re-reads from the store, so a slow reader costs memory for at most
`limit` items and never slows the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from taskrun.core.errors import Unavailable
from taskrun.core.ids import TaskId
from taskrun.core.models import OutputChunk, Task

# What a follower's stream ends with when the control plane stops (UNAVAILABLE): the client
# follows again, on this control plane once it is back or on the one that leads now.
STOPPING = "the control plane is stopping: follow again to go on"


@dataclass(eq=False, slots=True)
class Subscription:
    task_id: TaskId
    limit: int
    items: deque[OutputChunk | Task] = field(default_factory=deque)
    lagged: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False  # the hub closed: what is buffered is still taken, then Unavailable
    since: int = 0  # change sets made before it came: those kept no copy for it
    # Only the task's end is wanted: output and the states on the way are never kept, and
    # never wake the follower.
    outcome_only: bool = False

    def reread(self) -> None:
        """What it would be given is not known to be committed: it reads the store again."""
        self.items.clear()
        self.lagged = True
        self.wakeup.set()

    def push(self, item: OutputChunk | Task) -> None:
        if self.lagged:
            return
        if self.outcome_only and not (isinstance(item, Task) and item.status.terminal):
            return
        if len(self.items) >= self.limit:
            self.items.clear()
            self.lagged = True
        else:
            self.items.append(item)
        self.wakeup.set()

    async def wait(self) -> tuple[list[OutputChunk | Task], bool]:
        """Wait for news; returns (items, lagged) and resets both. Raises Unavailable once the
        hub is closed and nothing is left to take."""
        await self.wakeup.wait()
        if self.closed and not self.items and not self.lagged:
            raise Unavailable(STOPPING)
        if not self.closed:
            self.wakeup.clear()
        items, lagged = list(self.items), self.lagged
        self.items.clear()
        self.lagged = False
        return items, lagged


# Followed tasks as a change set holds them, by id: what its commit makes durable.
Snapshots = dict[TaskId, Task]
# What `FollowHub.snapshot` kept of a change set: its number, and the copies (None: none followed)
Followed = tuple[int, Snapshots | None]


class FollowHub:
    """Followers by task. The engine publishes live objects it keeps mutating, so a task is
    snapshotted when its change set is made (`snapshot`) and that copy is what followers get
    when the commit's effect publishes it (`publishing`): never a later, uncommitted state.
    A follower that came after the change set was made has no copy: it reads the store again."""

    def __init__(self, limit: int = 10_000) -> None:
        self._subs: dict[TaskId, set[Subscription]] = {}
        self._limit = limit
        self._made = 0  # change sets made (snapshot calls) so far
        self._committed: Followed | None = None
        self._closed = False
        self._on_close: set[Callable[[], None]] = set()

    def snapshot(self, tasks: Iterable[Task]) -> Followed:
        """Copies of the followed ones among `tasks`, with the change set's number."""
        self._made += 1
        subs = self._subs
        if not subs:
            return self._made, None
        out: Snapshots = {}
        for task in tasks:
            if task.id in subs:
                out[task.id] = task.snapshot()
        return self._made, out or None

    @contextlib.contextmanager
    def publishing(self, committed: Followed | None) -> Iterator[None]:
        """While a commit's effect runs: a task it publishes goes out as that commit held it."""
        self._committed = committed
        try:
            yield
        finally:
            self._committed = None

    def subscribe(self, task_id: TaskId, *, outcome_only: bool = False) -> Subscription:
        sub = Subscription(task_id, self._limit, since=self._made, outcome_only=outcome_only)
        self._subs.setdefault(task_id, set()).add(sub)
        if self._closed:
            sub.closed = True
            sub.wakeup.set()
        return sub

    def following(self, task_id: TaskId) -> int:
        """How many streams follow `task_id` now."""
        return len(self._subs.get(task_id, ()))

    def close(self) -> None:
        """The control plane stops: every follower's wait ends (after what is buffered), so
        its stream ends at once instead of holding the server's shutdown for its grace."""
        self._closed = True
        for subs in self._subs.values():
            for sub in subs:
                sub.closed = True
                sub.wakeup.set()
        for callback in list(self._on_close):
            callback()

    def when_closed(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` when the control plane stops (at once if it has): for a stream
        that may be waiting for its next request, not on a follower. Returns the undo."""
        if self._closed:
            callback()
        self._on_close.add(callback)
        return lambda: self._on_close.discard(callback)

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.task_id]

    def publish(self, task_id: TaskId, item: OutputChunk | Task) -> None:
        """Deliver to the task's followers. Call only after the item is committed: a follower
        that subscribes before the commit then either reads it from the store or gets it here."""
        subs = self._subs.get(task_id)
        if not subs:
            return
        if self._committed is None or not isinstance(item, Task):
            for sub in subs:
                sub.push(item)
            return
        made, copies = self._committed
        kept = copies.get(task_id) if copies else None
        for sub in subs:
            if kept is not None:
                sub.push(kept)
            elif sub.since >= made:  # came after the change set was made: the live task may
                sub.reread()  # already hold a later change that is not durable
            else:
                sub.push(item)
