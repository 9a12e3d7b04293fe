"""Fan-out of committed changes to WatchEvents subscribers and to in-process observers (metrics).

The engine calls `capture(changes)` when it hands a ChangeSet to the store (copying what it
needs, since the engine keeps mutating its objects) and `emit(captured)` once that ChangeSet is
durable, so subscribers see changes in commit order and never before they are committed.

Each subscriber has a bounded buffer. One that falls behind it is marked `overflowed` and ends
(RESOURCE_EXHAUSTED at the edge): a slow reader costs at most `limit` events of memory and never
slows the server.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from taskrun import convert
from taskrun.controlplane.followers import STOPPING
from taskrun.controlplane.store import eventlog
from taskrun.controlplane.store.rows import us
from taskrun.core.errors import Unavailable
from taskrun.core.ids import RunId, WorkerId
from taskrun.core.models import Run, Task, Worker, utcnow
from taskrun.core.status import WorkerStatus
from taskrun.core.store import ChangeSet, LoggedEvent
from taskrun.core.workflow import InboxItem
from taskrun.v1 import events_pb2 as epb

DEFAULT_LIMIT = 10_000

WORKER_KIND: dict[WorkerStatus, epb.EventKind] = {
    WorkerStatus.ONLINE: epb.EVENT_KIND_WORKER_CONNECTED,
    WorkerStatus.DRAINING: epb.EVENT_KIND_WORKER_DRAINING,
    WorkerStatus.OFFLINE: epb.EVENT_KIND_WORKER_DISCONNECTED,
    WorkerStatus.REVOKED: epb.EVENT_KIND_WORKER_DISCONNECTED,
}


@dataclass(frozen=True, slots=True)
class Captured:
    """The events of one ChangeSet, built when it was handed to the store (with the state it
    commits), and the ones of them that go into the durable event log with it."""

    events: list[tuple[int, str, str, epb.Event]]  # (kind, task_id, worker_id, event)
    logged: list[LoggedEvent]


@dataclass(frozen=True, slots=True)
class Filter:
    """What a subscriber asked for; empty fields match everything."""

    task_id: str = ""
    worker_id: str = ""
    kinds: frozenset[int] = frozenset()
    include_output: bool = False

    def wants(self, kind: int, task_id: str, worker_id: str) -> bool:
        if kind == epb.EVENT_KIND_OUTPUT and not self.include_output:
            return False
        if self.kinds and kind not in self.kinds:
            return False
        if self.task_id and task_id != self.task_id:
            return False
        return not (self.worker_id and worker_id != self.worker_id)


@dataclass(eq=False, slots=True)
class EventSubscription:
    filter: Filter
    limit: int
    items: deque[epb.Event] = field(default_factory=deque)
    overflowed: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False  # the hub closed: what is buffered is still taken, then Unavailable

    def push(self, event: epb.Event) -> None:
        if self.overflowed:
            return
        if len(self.items) >= self.limit:
            self.items.clear()
            self.overflowed = True
        else:
            self.items.append(event)
        self.wakeup.set()

    async def wait(self) -> list[epb.Event]:
        """Wait for events and take them all; raises Overflowed if the buffer overflowed, and
        Unavailable once the hub is closed and nothing is left to take."""
        await self.wakeup.wait()
        if self.closed and not self.items and not self.overflowed:
            raise Unavailable(STOPPING)
        if not self.closed:
            self.wakeup.clear()
        if self.overflowed:
            raise Overflowed(self.limit)
        items = list(self.items)
        self.items.clear()
        return items


class Overflowed(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this event stream fell more than {limit} events behind and was ended so that it "
            "does not slow the control plane; reconnect (with a snapshot) to resume"
        )


# Observers (metrics) see each change set as it is handed to the store, with the engine's live
# objects: they must read them at once and keep no reference.
Observer = Callable[[ChangeSet], None]


class EventHub:
    def __init__(
        self,
        runs_of: Callable[[WorkerId], list[RunId]] = lambda _w: [],
        limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.limit = limit
        self._runs_of = runs_of
        self._subs: set[EventSubscription] = set()
        self._closed = False
        self._observers: list[Observer] = []
        self.position = 0  # the last position given to a logged event
        self.committed = 0  # the last position of a committed one
        self._commits: list[asyncio.Future[None]] = []  # logged_through() waiting for news

    # --- producers (the engine) --------------------------------------------------------------

    def capture(self, changes: ChangeSet, runs: dict[RunId, Run]) -> Captured:
        """Feed observers, log the changes of `changes` and, when someone watches, build their
        events as they are now.

        Each change gets the next position of the event log and is added to `changes` (logged
        in the same transaction). A task or run change is logged as its object, which the store
        encodes from the row it writes anyway (`store/eventlog.py`); worker changes and output
        are logged as serialized events, output without its text, which the output table holds
        (a replay reads it there). `runs` (the engine's current runs) names the worker of each
        chunk's run. Events for subscribers are built only when there are any: one that
        subscribes later starts from a snapshot of the engine's view, which holds these changes.
        """
        for observer in self._observers:
            observer(changes)
        now = utcnow()
        watched = bool(self._subs)
        events: list[tuple[int, str, str, epb.Event]] = []
        logged: list[LoggedEvent] = []
        position = self.position
        # workers, output, runs, tasks: the order subscribers always saw
        workers = [(w, self._runs_of(w.id)) for w in {w.id: w for w in changes.workers}.values()]
        for kind, task_id, worker_id, event in self._events(workers, (), (), now):
            position += 1
            event.position = position
            logged.append(
                LoggedEvent(position, kind, task_id, worker_id, event.SerializeToString())
            )
            events.append((kind, task_id, worker_id, event))
        stamp = us(now)
        for chunk in changes.chunks:
            run = runs.get(chunk.run_id)
            owner = (run.worker_id if run is not None else None) or ""
            position += 1
            output = epb.EVENT_KIND_OUTPUT
            data = eventlog.encode_output(stamp, chunk)
            logged.append(LoggedEvent(position, output, chunk.task_id or "", owner, data))
            if watched:
                event = epb.Event(kind=output, position=position)
                convert.chunk_to_pb(chunk, event.chunk)
                events.append((output, chunk.task_id or "", owner, _stamped(event, now)))
        changed: list[Run | Task] = [*{r.id: r for r in changes.runs}.values()]
        changed.extend({t.id: t for t in changes.tasks}.values())
        for subject in changed:
            position += 1
            if isinstance(subject, Run):
                kind, task_id = epb.EVENT_KIND_RUN_CHANGED, subject.task_id
            else:
                kind, task_id = epb.EVENT_KIND_TASK_CHANGED, subject.id
            worker_id = subject.worker_id or ""
            logged.append(
                LoggedEvent(position, kind, task_id, worker_id, subject=subject, time=stamp)
            )
        if watched and changed:
            runs_changed = [s for s in changed if isinstance(s, Run)]
            tasks_changed = [s for s in changed if isinstance(s, Task)]
            at = position - len(changed)
            for kind, task_id, worker_id, event in self._events(
                (), runs_changed, tasks_changed, now
            ):
                at += 1
                event.position = at
                events.append((kind, task_id, worker_id, event))
        self.position = position
        changes.events.extend(logged)
        return Captured(events if watched else [], logged)

    def emit(self, captured: Captured | None) -> None:
        """Deliver a committed change to subscribers (call after the commit)."""
        if captured is None:
            return
        if captured.logged:
            self.committed = captured.logged[-1].position
            self._wake()
        for sub in self._subs:
            for kind, task_id, worker_id, event in captured.events:
                if sub.filter.wants(kind, task_id, worker_id):
                    sub.push(event)

    def restart(self, newest: int) -> None:
        """The log's newest position, as the store holds it (at start and after recovery)."""
        self.position = self.committed = newest
        self._wake()

    async def logged_through(self, position: int) -> None:
        """Return once the events up to `position` are committed, or never will be (their commit
        failed and the log restarted below them), or the log is closed.

        A subscription gets live only the changes captured after it was made: those captured
        before, whose commit was still under way, it must read from the log, after this."""
        while self.committed < position <= self.position and not self._closed:
            news: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._commits.append(news)
            await news

    def _wake(self) -> None:
        if not self._commits:  # every commit calls this; a watcher rarely waits
            return
        waiting, self._commits = self._commits, []
        for news in waiting:
            if not news.done():
                news.set_result(None)

    def announce_inbox_item(self, item: InboxItem) -> None:
        """a new inbox item, announced by the workflow executor once it is durable."""
        if not self._subs:
            return
        event = epb.Event(kind=epb.EVENT_KIND_INBOX_ITEM_CREATED)
        event.inbox_item.CopyFrom(convert.inbox_item_to_pb(item))
        _stamped(event, utcnow())
        for sub in self._subs:
            if sub.filter.wants(event.kind, "", ""):
                sub.push(event)

    def observe(self, observer: Observer) -> None:
        self._observers.append(observer)

    # --- consumers (WatchEvents) -------------------------------------------------------------

    def subscribe(self, filter: Filter, limit: int | None = None) -> EventSubscription:
        sub = EventSubscription(filter, limit or self.limit)
        self._subs.add(sub)
        if self._closed:
            sub.closed = True
            sub.wakeup.set()
        return sub

    def close(self) -> None:
        """The control plane stops: every watcher's wait ends (after what is buffered)."""
        self._closed = True
        self._wake()
        for sub in self._subs:
            sub.closed = True
            sub.wakeup.set()

    def unsubscribe(self, sub: EventSubscription) -> None:
        self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def snapshot(
        self,
        workers: Iterable[Worker],
        tasks: Iterable[Task],
        runs: dict[RunId, Run],
        filter: Filter,
    ) -> list[epb.Event]:
        """Events describing the current state (workers, unfinished tasks and their runs),
        ending with SNAPSHOT_END."""
        now = utcnow()
        task_list = sorted(tasks, key=lambda t: t.id)
        current = [runs[t.current_run_id] for t in task_list if t.current_run_id in runs]
        out = []
        for kind, task_id, worker_id, event in self._events(
            [(w, self._runs_of(w.id)) for w in sorted(workers, key=lambda w: w.id)],
            sorted(current, key=lambda r: r.task_id),
            task_list,
            now,
        ):
            if filter.wants(kind, task_id, worker_id):
                event.snapshot = True
                out.append(event)
        # the position the snapshot is current to: resume after it
        end = epb.Event(kind=epb.EVENT_KIND_SNAPSHOT_END, snapshot=True, position=self.committed)
        end.time.FromDatetime(now)
        out.append(end)
        return out

    # --- building events ---------------------------------------------------------------------

    def _events(
        self,
        workers: Sequence[tuple[Worker, list[RunId]]],
        runs: Sequence[Run],
        tasks: Sequence[Task],
        now: datetime,
    ) -> Iterable[tuple[int, str, str, epb.Event]]:
        """(kind, task_id, worker_id, event) for each state: workers, runs, tasks."""
        for worker, run_ids in workers:
            event = epb.Event(kind=WORKER_KIND.get(worker.status, epb.EVENT_KIND_UNSPECIFIED))
            event.worker.CopyFrom(convert.worker_to_pb(worker, run_ids))
            yield event.kind, "", worker.id, _stamped(event, now)
        for run in runs:
            event = epb.Event(kind=epb.EVENT_KIND_RUN_CHANGED)
            convert.run_to_pb(run, event.run)
            yield event.kind, run.task_id, run.worker_id or "", _stamped(event, now)
        for task in tasks:
            event = epb.Event(kind=epb.EVENT_KIND_TASK_CHANGED, task=convert.task_to_pb(task))
            yield event.kind, task.id, task.worker_id or "", _stamped(event, now)


def _stamped(event: epb.Event, now: datetime) -> epb.Event:
    event.time.FromDatetime(now)
    return event
