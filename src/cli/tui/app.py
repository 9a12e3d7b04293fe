"""The TaskRun TUI: one WatchEvents stream feeds a FleetState; widgets re-render on news."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import Callable

import grpc
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.widgets import DataTable, Footer, Input, Static, TabbedContent, TabPane

from taskrun.cli.client import Client, EventKind, FleetEvent
from taskrun.cli.output import status_name
from taskrun.cli.tui.screens import (
    Answer,
    AnswerScreen,
    ConfirmScreen,
    HelpScreen,
    NewTaskScreen,
    RunScreen,
)
from taskrun.cli.tui.state import FleetState
from taskrun.cli.tui.widgets import (
    EventsPane,
    FleetHeader,
    InboxTable,
    TasksTable,
    WorkersTable,
)
from taskrun.core.ids import TaskId
from taskrun.core.models import Task, TaskSpec
from taskrun.core.status import TaskStatus

RECENT_TASKS = 200
INBOX_POLL = 2.0  # seconds between reads of the inbox
# A notification with less time left than this is not shown again on another screen (seconds).
TOAST_MARGIN = 0.5
# Reconnecting the event stream: first wait, doubled after each failure up to the cap (seconds).
RETRY_FIRST, RETRY_CAP = 0.25, 3.0
# Errors that reconnecting cannot fix: shown, not retried.
FATAL = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
# Actions on the main screen's tables: off (and out of the footer) while another screen is up.
MAIN_SCREEN_ACTIONS = frozenset(
    {"tab", "new_task", "open_run", "cancel", "retry", "drain", "revoke", "cycle_status"}
    | {"cycle_agent", "search"}
)


def retry_spec(task: Task) -> TaskSpec:
    """A new task like `task` (agent, input, labels, policy), labelled `retry_of`; no idempotency
    key, so the server creates it rather than returning an earlier one."""
    policy = dataclasses.replace(task.policy.copy(), idempotency_key="")
    labels = {**task.labels, "retry_of": task.id}
    return TaskSpec(agent=task.agent, input=task.input, labels=labels, policy=policy)


class TaskRunApp(App[None]):
    """Workers, tasks and events of one control plane, live."""

    TITLE = "TaskRun"
    CSS = """
    #search { display: none; height: 3; }
    #search.visible { display: block; }
    #filter { height: 1; padding: 0 1; color: $text-muted; }
    """
    BINDINGS = [
        Binding("1", "tab('workers')", "workers", show=False),
        Binding("2", "tab('tasks')", "tasks", show=False),
        Binding("3", "tab('events')", "events", show=False),
        Binding("4", "tab('inbox')", "inbox", show=False),
        Binding("n", "new_task", "new"),
        Binding("enter", "open_run", "run", show=False),
        Binding("c", "cancel", "cancel"),
        Binding("r", "retry", "retry"),
        Binding("d", "drain", "drain"),
        Binding("R", "revoke", "revoke"),
        Binding("s", "cycle_status", "status"),
        Binding("a", "cycle_agent", "agent"),
        Binding("slash", "search", "find"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.state = FleetState(server=client.target)
        self.error = ""

    def compose(self) -> ComposeResult:
        yield FleetHeader(id="header")
        with TabbedContent(initial="tasks"):
            with TabPane("Workers [1]", id="workers"):
                yield WorkersTable(id="workers-table")
            with TabPane("Tasks [2]", id="tasks"):
                yield Input(placeholder="search task id (enter to apply)", id="search")
                yield Static("", id="filter")  # what the table is filtered by, always shown
                yield TasksTable(id="tasks-table")
            with TabPane("Events [3]", id="events"):
                yield EventsPane()
            with TabPane("Inbox [4]", id="inbox"):
                yield InboxTable(id="inbox-table")
        yield Footer(compact=True, show_command_palette=False)  # every key fits in 80 columns

    def on_mount(self) -> None:
        self.query_one("#filter", Static).update(self.query_one(TasksTable).filter_text())
        self.render_state()
        self.watch_fleet()
        self.set_interval(1.0, self.tick)  # ages and uptime only; data comes from events
        self.poll_inbox()
        self.set_interval(INBOX_POLL, self.poll_inbox)  # answered items leave the inbox

    # --- data --------------------------------------------------------------------------------

    @work(exclusive=True, group="watch")
    async def watch_fleet(self) -> None:
        """Follow WatchEvents until the app ends. When the stream breaks, say so in the header
        and reconnect with backoff; each new snapshot rebuilds the state."""
        delay = RETRY_FIRST
        while True:
            try:
                await self.follow_events()
                problem = "stream ended"
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL:
                    self.error = f"event stream ended: {exc.code().name}: {exc.details()}"
                    self.state.link = f"event stream ended: {exc.code().name}"  # header: short
                    self.render_state()
                    self.notify(self.error, severity="error", timeout=30)
                    return
                problem = exc.code().name
            if not self.state.link:  # it had been live: start the backoff again
                delay = RETRY_FIRST
            self.state.link = f"disconnected, retrying… ({problem})"
            self.render_state()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_CAP)

    async def follow_events(self) -> None:
        """One WatchEvents stream: collect its snapshot, rebuild the state from it (and recent
        history), then apply each change until the stream ends."""
        snapshot: list[FleetEvent] = []
        live = False
        async with contextlib.aclosing(
            self.client.watch_events(snapshot=True, reconnect=False)  # it takes a new snapshot
        ) as events:
            async for event in events:
                if live:
                    self.apply(event)
                    continue
                snapshot.append(event)
                if event.kind is EventKind.SNAPSHOT_END:
                    recent: list[Task] = []
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        recent, _ = await self.client.list_tasks(limit=RECENT_TASKS)
                    self.state.rebuild(snapshot, recent, log=not self.state.synced)
                    self.render_state()
                    live = True

    @work(exclusive=True, group="inbox")
    async def poll_inbox(self) -> None:
        """Read the inbox (new items also arrive as events; answered ones only leave here)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            self.state.set_inbox(await self.client.list_inbox())
            self.render_state()

    def apply(self, event: FleetEvent) -> None:
        self.state.apply(event)
        self.render_state()

    def render_state(self) -> None:
        # an event can arrive while the app closes and its widgets are already gone: the state
        # is kept, and nothing is left to show it
        with contextlib.suppress(NoMatches):
            self.query_one(FleetHeader).refresh_from(self.state)
            self.query_one(WorkersTable).refresh_from(self.state)
            self.query_one(TasksTable).refresh_from(self.state)
            self.query_one(EventsPane).refresh_from(self.state)
            self.query_one(InboxTable).refresh_from(self.state)

    def tick(self) -> None:
        """Every second: the header's uptime and the tables' ages (data comes from events)."""
        with contextlib.suppress(NoMatches):  # nothing to update while the screens change or close
            self.query_one(FleetHeader).refresh_from(self.state)
            self.query_one(TasksTable).refresh_ages(self.state)
            self.query_one(WorkersTable).refresh_ages(self.state)

    def _refresh_notifications(self) -> None:
        """Guard against a Textual 8.2 hang: a toast's timer is set to its notification's
        `time_left`, which is negative when the notification expires between ToastRack's
        expiry check and the toast's creation, and a Timer with a negative delay loops without
        yielding (100 % CPU, frozen app). Notifications about to expire are dropped first, so
        no toast is made for them when the screens change."""
        # a comprehension, not list(): list() asks len(), which drops expired notifications
        # from the dict that the iterator is walking (RuntimeError)
        for notification in [n for n in self._notifications]:
            if notification.time_left < TOAST_MARGIN:
                self._unnotify(notification, refresh=False)
        super()._refresh_notifications()

    # --- actions -----------------------------------------------------------------------------

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        table: DataTable[str] | None = None
        if tab == "workers":
            table = self.query_one(WorkersTable)
        elif tab == "tasks":
            table = self.query_one(TasksTable)
        if table is not None:
            table.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return action not in MAIN_SCREEN_ACTIONS or len(self.screen_stack) == 1

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def run_screen(self, task_id: str) -> RunScreen:
        return RunScreen(self.client, task_id, supports_sessions=self.state.supports_sessions)

    def _selected_task(self) -> str | None:
        if self.query_one(TabbedContent).active != "tasks":
            return None
        return self.query_one(TasksTable).selected_key()

    def action_new_task(self) -> None:
        def created(task: Task | None) -> None:
            if task is not None:
                self.notify(f"task {task.id} created")
                self.push_screen(self.run_screen(task.id))

        self.push_screen(NewTaskScreen(self.client, self.state.agents()), created)

    def action_open_run(self) -> None:
        task_id = self._selected_task()
        if task_id:
            self.push_screen(self.run_screen(task_id))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if isinstance(event.data_table, TasksTable) and event.row_key.value:
            self.push_screen(self.run_screen(event.row_key.value))
        elif isinstance(event.data_table, InboxTable) and event.row_key.value:
            item = self.state.inbox.get(event.row_key.value)
            if item is not None:
                self.push_screen(AnswerScreen(item), functools.partial(self.answered, item.id))

    def answered(self, item_id: str, answer: Answer | None) -> None:
        if answer is not None:
            self.answer_item(item_id, *answer)

    @work(group="actions")
    async def answer_item(self, item_id: str, approve: bool, choice: str, comment: str) -> None:
        try:
            run = await self.client.answer_inbox_item(
                item_id, approve=approve, choice=choice, comment=comment
            )
            verb = "approved" if approve else "rejected"
            self.notify(f"{item_id} {verb}; workflow run {run.id} is {run.status.name.lower()}")
        except grpc.aio.AioRpcError as exc:
            self.notify(f"{exc.code().name}: {exc.details()}", severity="error")
        self.poll_inbox()

    def action_cancel(self) -> None:
        task_id = self._selected_task()
        if task_id:
            self.confirm_cancel(task_id)

    def confirm_cancel(self, task_id: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.cancel_task(task_id)

        self.push_screen(ConfirmScreen(f"Cancel task {task_id}?"), answered)

    @work(group="actions")
    async def cancel_task(self, task_id: str) -> None:
        try:
            task = await self.client.cancel_task(task_id, "cancelled from the TUI")
            self.notify(f"task {task.id} {task.status.name.lower()}")
        except grpc.aio.AioRpcError as exc:
            self.notify(f"{exc.code().name}: {exc.details()}", severity="error")

    def action_retry(self) -> None:
        task_id = self._selected_task()
        if task_id:
            self.confirm_retry(task_id)

    def confirm_retry(self, task_id: str) -> None:
        """Ask, then submit a new task like this finished one; refuse while it is unfinished."""
        task = self.state.tasks.get(TaskId(task_id))
        if task is not None and not self._retryable(task):
            return
        again = task is not None and task.status is TaskStatus.COMPLETED
        question = (
            f"{'Run task' if again else 'Retry task'} {task_id}{' again' if again else ''}? "
            "A new task gets the same agent, input, labels and policy."
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self.retry_task(task_id)

        self.push_screen(ConfirmScreen(question), answered)

    def _retryable(self, task: Task) -> bool:
        if task.status.terminal:
            return True
        self.notify(
            f"task {task.id} is {status_name(task.status)}: only a finished task can be "
            "retried (cancel it first)",
            severity="warning",
        )
        return False

    @work(group="actions")
    async def retry_task(self, task_id: str) -> None:
        try:
            old, _ = await self.client.get_task(task_id)  # the full spec: rows carry no input
            if not self._retryable(old):
                return
            task = await self.client.submit(retry_spec(old))
        except grpc.aio.AioRpcError as exc:
            self.notify(f"{exc.code().name}: {exc.details()}", severity="error")
            return
        self.notify(f"task {task.id} created (retry of {old.id})")
        if isinstance(self.screen, RunScreen):  # retried from its run view: show the new one
            self.switch_screen(self.run_screen(task.id))
        else:
            self.push_screen(self.run_screen(task.id))

    def _confirm_for_selected_worker(
        self, verb: str, question: Callable[[str], str], act: Callable[[str], object]
    ) -> None:
        """Ask about the worker selected on the Workers tab; `act` on it if confirmed."""
        if self.query_one(TabbedContent).active != "workers":
            self.notify(f"select a worker on the Workers tab (1) to {verb} it")
            return
        worker_id = self.query_one(WorkersTable).selected_key()
        if not worker_id:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                act(worker_id)

        self.push_screen(ConfirmScreen(question(worker_id)), answered)

    def action_drain(self) -> None:
        self._confirm_for_selected_worker(
            "drain",
            lambda w: f"Drain worker {w}? It takes no new runs, finishes its runs and exits.",
            self.drain_worker,
        )

    @work(group="actions")
    async def drain_worker(self, worker_id: str) -> None:
        try:
            await self.client.drain_worker(worker_id)
            self.notify(f"worker {worker_id} draining")
        except grpc.aio.AioRpcError as exc:
            self.notify(f"{exc.code().name}: {exc.details()}", severity="error")

    def action_revoke(self) -> None:
        self._confirm_for_selected_worker(
            "revoke",
            lambda w: (
                f"Revoke worker {w}? It is cut off at once and for good; "
                "its runs are retried elsewhere."
            ),
            self.revoke_worker,
        )

    @work(group="actions")
    async def revoke_worker(self, worker_id: str) -> None:
        try:
            await self.client.revoke_worker(worker_id, "revoked from the TUI")
            self.notify(f"worker {worker_id} revoked")
        except grpc.aio.AioRpcError as exc:
            self.notify(f"{exc.code().name}: {exc.details()}", severity="error")

    def action_cycle_status(self) -> None:
        table = self.query_one(TasksTable)
        order: list[TaskStatus | None] = [None, *TaskStatus]
        table.status_filter = order[(order.index(table.status_filter) + 1) % len(order)]
        self._filtered(table)

    def action_cycle_agent(self) -> None:
        table = self.query_one(TasksTable)
        order = ["", *sorted({t.agent for t in self.state.tasks.values()})]
        current = order.index(table.agent_filter) if table.agent_filter in order else 0
        table.agent_filter = order[(current + 1) % len(order)]
        self._filtered(table)

    def action_search(self) -> None:
        self.action_tab("tasks")
        search = self.query_one("#search", Input)
        search.add_class("visible")
        search.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "search":
            table = self.query_one(TasksTable)
            table.search = event.value.strip()
            if not table.search:
                event.input.remove_class("visible")
            self._filtered(table)
            table.focus()

    def _filtered(self, table: TasksTable) -> None:
        table.refresh_from(self.state)
        self.query_one("#filter", Static).update(table.filter_text())
