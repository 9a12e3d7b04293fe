"""What the TUI knows about the fleet, kept up to date by applying WatchEvents in order."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from taskrun.cli.client import EventKind, FleetEvent
from taskrun.core.ids import RunId, TaskId, WorkerId
from taskrun.core.models import Run, Task, Worker
from taskrun.core.status import TaskStatus, WorkerStatus
from taskrun.core.workflow import InboxItem

MAX_EVENTS = 500


@dataclass
class FleetState:
    """Workers, tasks and their current runs, plus the latest events (newest last)."""

    server: str
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    workers: dict[WorkerId, Worker] = field(default_factory=dict)
    tasks: dict[TaskId, Task] = field(default_factory=dict)
    runs: dict[RunId, Run] = field(default_factory=dict)
    events: deque[FleetEvent] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    synced: bool = False  # the snapshot has been received
    applied: int = 0  # events kept so far (the events pane shows the new ones)
    link: str = "connecting…"  # what is wrong with the event stream; "" while it is live
    # what waits for a person; new items come as events, answered ones leave when the
    # inbox is read again (every few seconds)
    inbox: dict[str, InboxItem] = field(default_factory=dict)

    def apply(self, event: FleetEvent) -> None:
        if event.kind is EventKind.SNAPSHOT_END:
            self.synced = True
        self._absorb(event)
        if event.kind is not EventKind.SNAPSHOT_END:
            self.events.append(event)
            self.applied += 1

    def _absorb(self, event: FleetEvent) -> None:
        """Take the event's new worker, task or run state (without logging the event)."""
        if event.worker is not None:
            self.workers[event.worker.id] = event.worker
        if event.task is not None:
            self.tasks[event.task.id] = event.task
        if event.run is not None:
            self.runs[event.run.id] = event.run
        if event.inbox_item is not None:
            self.inbox[event.inbox_item.id] = event.inbox_item

    def set_inbox(self, items: list[InboxItem]) -> None:
        """The inbox as just read from the control plane."""
        self.inbox = {item.id: item for item in items}

    def add_tasks(self, tasks: list[Task]) -> None:
        """Recent history (read after each snapshot): states from events win over it."""
        for task in tasks:
            self.tasks.setdefault(task.id, task)

    def rebuild(self, snapshot: list[FleetEvent], recent: list[Task], *, log: bool) -> None:
        """Replace workers, tasks and runs with a new snapshot (ending with SNAPSHOT_END) and
        recent history; with `log` its events also go to the events pane."""
        self.workers, self.tasks, self.runs = {}, {}, {}
        for event in snapshot:
            if log or event.kind is EventKind.SNAPSHOT_END:
                self.apply(event)
            else:
                self._absorb(event)
        self.add_tasks(recent)
        self.link = ""

    # --- derived -----------------------------------------------------------------------------

    def active_runs(self, worker_id: WorkerId) -> int:
        return sum(1 for r in self.runs.values() if r.worker_id == worker_id and r.status.active)

    def agents(self) -> list[str]:
        """Agents announced by connected workers."""
        names = {
            a.name
            for w in self.workers.values()
            if w.status in (WorkerStatus.ONLINE, WorkerStatus.DRAINING)
            for a in w.agents
        }
        return sorted(names)

    def supports_sessions(self, agent: str) -> bool:
        """Whether a known worker announces `agent` as keeping sessions (the run view chats)."""
        return any(
            a.name == agent and a.supports_sessions for w in self.workers.values() for a in w.agents
        )

    def task_counts(self) -> Counter[TaskStatus]:
        return Counter(t.status for t in self.tasks.values())

    def worker_counts(self) -> Counter[WorkerStatus]:
        return Counter(w.status for w in self.workers.values())

    def current_run(self, task_id: TaskId) -> Run | None:
        task = self.tasks.get(task_id)
        if task is None or task.current_run_id is None:
            return None
        return self.runs.get(task.current_run_id)
