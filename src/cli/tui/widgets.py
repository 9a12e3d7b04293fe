"""The main screen's widgets. Each renders a FleetState; the app calls `refresh_from` on news."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from textual.widgets import DataTable, RichLog, Static

from taskrun.cli import output
from taskrun.cli.tui.state import FleetState
from taskrun.core.status import TaskStatus, WorkerStatus


def _now() -> datetime:
    return datetime.now(UTC)


class FleetHeader(Static):
    """Server address, how long we have been watching, counts of workers and tasks by status."""

    DEFAULT_CSS = "FleetHeader { height: 2; background: $primary-background; padding: 0 1; }"

    def refresh_from(self, state: FleetState) -> None:
        workers = state.worker_counts()
        tasks = state.task_counts()
        up = output.format_span((_now() - state.started).total_seconds())
        sync = "" if state.synced else "  (connecting…)"
        self.update(
            f"[b]TaskRun[/b] {state.server}  up {up}{sync}\n"
            f"workers {_counts(workers, WorkerStatus)}  tasks {_counts(tasks, TaskStatus)}"
        )


def _counts(counts: Counter[Any], kinds: Iterable[Any]) -> str:
    """`online:2 draining:1` (statuses with none are left out)."""
    return " ".join(f"{output.status_name(k)}:{counts[k]}" for k in kinds if counts[k]) or "0"


class WorkersTable(DataTable[str]):
    """Workers: id, host, agents, status, runs/capacity, heartbeat age, certificate expiry."""

    COLUMNS: tuple[str, ...] = (
        "id",
        "host",
        "agents",
        "status",
        "runs",
        "heartbeat",
        "cert expires",
    )

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(*self.COLUMNS)

    def refresh_from(self, state: FleetState) -> None:
        now = _now()
        selected = self.selected_key()
        self.clear()
        for worker in sorted(state.workers.values(), key=lambda w: w.id):
            expiry = worker.certificate_expires_at
            self.add_row(
                worker.id,
                worker.hostname or output.NONE,
                ",".join(a.name for a in worker.agents) or output.NONE,
                output.status_name(worker.status),
                f"{state.active_runs(worker.id)}/{worker.max_concurrent_runs}",
                output.format_age(worker.last_heartbeat_at, now),
                output.format_span((expiry - now).total_seconds()) if expiry else output.NONE,
                key=worker.id,
            )
        self._restore(selected)

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        return key

    def _restore(self, key: str | None) -> None:
        if key is not None and key in self.rows:
            self.move_cursor(row=self.get_row_index(key))


class TasksTable(WorkersTable):
    """Tasks: id, agent, status, age, attempts, worker; filtered by status, agent and id."""

    COLUMNS = ("id", "agent", "status", "age", "tries", "worker")

    status_filter: TaskStatus | None = None
    agent_filter: str = ""
    search: str = ""

    def refresh_from(self, state: FleetState) -> None:
        now = _now()
        selected = self.selected_key()
        self.clear()
        tasks = sorted(state.tasks.values(), key=lambda t: t.id, reverse=True)
        for task in tasks:
            if self.status_filter is not None and task.status is not self.status_filter:
                continue
            if self.agent_filter and task.agent != self.agent_filter:
                continue
            if self.search and self.search not in task.id:
                continue
            self.add_row(
                task.id,
                task.agent,
                output.status_name(task.status),
                output.format_age(task.created_at, now),
                str(task.attempts),
                task.worker_id or output.NONE,
                key=task.id,
            )
        self._restore(selected)


class EventsPane(RichLog):
    """The latest events, one line each, newest at the bottom."""

    def __init__(self) -> None:
        super().__init__(max_lines=500, wrap=False, markup=False, id="events")
        self._shown = 0

    def refresh_from(self, state: FleetState) -> None:
        new = min(state.applied - self._shown, len(state.events))
        if new > 0:
            for event in list(state.events)[-new:]:
                self.write(output.event_line(event).rstrip("\n"))
        self._shown = state.applied
