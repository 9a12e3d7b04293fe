"""The TUI's widgets. The main screen's render a FleetState (the app calls `refresh_from` on
news); the run view's Transcript is fed output as it streams."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from rich.text import Text
from textual.markup import escape
from textual.widgets import DataTable, RichLog, Static

from taskrun.cli import output
from taskrun.cli.tui.state import FleetState
from taskrun.core.ids import RunId, TaskId, WorkerId
from taskrun.core.models import Run, Worker
from taskrun.core.status import RunStatus, TaskStatus, WorkerStatus


def _now() -> datetime:
    return datetime.now(UTC)


class FleetHeader(Static):
    """Server address, how long we have been watching, counts of workers and tasks by status."""

    DEFAULT_CSS = "FleetHeader { height: 2; background: $primary-background; padding: 0 1; }"

    def refresh_from(self, state: FleetState) -> None:
        workers = state.worker_counts()
        tasks = state.task_counts()
        up = output.format_span((_now() - state.started).total_seconds())
        sync = f"  [b $warning]{escape(state.link)}[/]" if state.link else ""
        waiting = len(state.inbox)
        inbox = f"  [b $warning]inbox {waiting}[/]" if waiting else "  inbox 0"
        self.update(
            f"[b]TaskRun[/b] {state.server}  up {up}{sync}\n"
            f"workers {_counts(workers, WorkerStatus)}  tasks {_counts(tasks, TaskStatus)}{inbox}"
        )


def _quarantined(worker: Worker, now: datetime) -> str:
    """ ", quarantined" while the worker's circuit breaker holds it back (runs failing fast)."""
    until = worker.quarantined_until
    return ", quarantined" if until is not None and until > now else ""


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

    AGE_COLUMNS: tuple[str, ...] = ("heartbeat", "cert expires")  # change with the clock

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.column_keys = dict(zip(self.COLUMNS, self.add_columns(*self.COLUMNS), strict=True))

    def ages(self, state: FleetState, row: str, now: datetime) -> tuple[str, ...]:
        """The AGE_COLUMNS cells of one row, as of `now`."""
        worker = state.workers.get(WorkerId(row))
        if worker is None:
            return ()
        expiry = worker.certificate_expires_at
        return (
            output.format_age(worker.last_heartbeat_at, now),
            output.format_span((expiry - now).total_seconds()) if expiry else output.NONE,
        )

    def refresh_ages(self, state: FleetState) -> None:
        """Update only the cells that change with the clock (called every second)."""
        now = _now()
        for row_key in list(self.rows):
            row = str(row_key.value)
            for column, value in zip(self.AGE_COLUMNS, self.ages(state, row, now), strict=False):
                self.update_cell(row, self.column_keys[column], value)

    def refresh_from(self, state: FleetState) -> None:
        now = _now()
        selected = self.selected_key()
        self.clear()
        for worker in sorted(state.workers.values(), key=lambda w: w.id):
            expiry = worker.certificate_expires_at
            self.add_row(
                worker.id,
                worker.hostname or output.NONE,
                output.agent_names(worker.agents),  # "name!": it cannot run there now
                output.status_name(worker.status) + _quarantined(worker, now),
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
    AGE_COLUMNS = ("age",)

    status_filter: TaskStatus | None = None
    agent_filter: str = ""
    search: str = ""

    def ages(self, state: FleetState, row: str, now: datetime) -> tuple[str, ...]:
        task = state.tasks.get(TaskId(row))
        return (output.format_age(task.created_at, now),) if task is not None else ()

    def filter_text(self) -> str:
        """What the table is filtered by, for the line above it."""
        parts = [
            f"status={self.status_filter.name.lower()}" if self.status_filter else "",
            f"agent={self.agent_filter}" if self.agent_filter else "",
            f"id~{self.search}" if self.search else "",
        ]
        shown = " ".join(p for p in parts if p)
        return f"filter: {shown}" if shown else "filter: none (s status, a agent, / id)"

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


class InboxTable(DataTable[str]):
    """inbox items (approvals waiting for a person), oldest first. Answer them with
    `taskrun approve ID` / `taskrun reject ID`."""

    COLUMNS: tuple[str, ...] = ("id", "waiting in", "question", "choices", "due")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(*self.COLUMNS)

    def refresh_from(self, state: FleetState) -> None:
        items = sorted(state.inbox.values(), key=lambda i: (i.created_at, i.id))
        if [str(k.value) for k in self.rows] == [i.id for i in items]:
            return
        self.clear()
        for item in items:
            self.add_row(
                item.id,
                f"{item.workflow}/{item.step}",
                output.printable(item.question)[:60],
                ",".join(item.choices) or "-",
                output.format_time(item.due_at) if item.due_at else "-",
                key=item.id,
            )


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


class Transcript(RichLog):
    """A task's text output as it streams. In chat mode, the conversation: each message (the
    first run of each turn carries it as its prompt), then what the agent answered (its output,
    or its result when it wrote none), both sides with the time (local, HH:MM:SS)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(wrap=True, markup=False, **kwargs)
        self.partial: Static | None = None  # shows the line still being streamed, if given
        self.chat = False
        self.text = ""  # all text output so far
        self._runs: list[Run] = []  # the task's runs, oldest first
        self._first_prompt = ""  # the task input's prompt: the first run's message
        self._turn = -1  # index in _runs of the turn being written
        self._spoke: set[RunId] = set()  # runs whose text output was written
        self._answered: set[RunId] = set()  # runs whose result or error was written
        self._pending = ""  # the last line, until it ends
        self.agent = "agent"  # who answers, in chat mode

    def set_runs(self, runs: list[Run], first_prompt: str) -> None:
        self._runs, self._first_prompt = list(runs), first_prompt

    def knows(self, run_id: RunId | None) -> bool:
        return any(r.id == run_id for r in self._runs)

    def add_text(self, run_id: RunId, data: str) -> None:
        self.text += data
        if self.chat:
            self._reach(run_id)
            if run_id not in self._spoke:
                self._pending += f"{_clock(None)} {self.agent}: "
            self._spoke.add(run_id)
        self._pending += data
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self.write(line)
        self._show_partial()

    def _show_partial(self) -> None:
        if self.partial is not None:
            self.partial.update(Text(self._pending))
            self.partial.display = bool(self._pending)

    def flush(self) -> None:
        """Write the unfinished last line (the output or a turn ended: it will not go on)."""
        if self._pending:
            self.write(self._pending)
            self._pending = ""
            self._show_partial()

    def catch_up(self, *, ended: bool) -> None:
        """Show every known run's prompt; when the task `ended`, also the last run's answer.

        A line still being streamed stays in the partial view: a task update between two
        chunks of one line must not split it.
        """
        if ended:
            self.flush()
        if not self.chat or not self._runs:
            return
        self._reach(self._runs[-1].id)
        if ended:
            self._close(self._runs[-1])

    def _reach(self, run_id: RunId) -> None:
        index = next((i for i, r in enumerate(self._runs) if r.id == run_id), -1)
        while self._turn < index:
            if self._turn >= 0:
                self._close(self._runs[self._turn])
            self._turn += 1
            self._open(self._turn)

    def _open(self, index: int) -> None:
        self.flush()
        run = self._runs[index]
        if index:
            self.write("")
        if run.prompt or not index:
            self.write(
                Text.assemble(
                    (f"{_clock(run.created_at)} ", "dim"),
                    ("you: ", "bold cyan"),
                    run.prompt or self._first_prompt,
                )
            )
        else:
            self.write(Text(f"(attempt {run.attempt}: the previous message, again)", "dim"))

    def _close(self, run: Run) -> None:
        self.flush()
        if run.id in self._answered or not run.status.terminal:
            return
        self._answered.add(run.id)
        if run.result and run.id not in self._spoke:
            self.write(f"{_clock(run.finished_at)} {self.agent}: {_answer(run.result)}")
        if run.status is not RunStatus.COMPLETED:
            reason = f": {run.error}" if run.error else ""
            self.write(Text(f"run {output.status_name(run.status)}{reason}", "red"))


def _clock(at: datetime | None) -> str:
    """A time of the chat, local, to the second (now when unknown)."""
    return (at or datetime.now(UTC)).astimezone().strftime("%H:%M:%S")


def _answer(result: str) -> str:
    """What a run's result says: its `text` field when it has one, else the result itself."""
    try:
        value = json.loads(result)
    except json.JSONDecodeError:
        return result
    text = value.get("text") if isinstance(value, dict) else None
    return text if isinstance(text, str) else result
