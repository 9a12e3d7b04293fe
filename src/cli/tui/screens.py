"""Screens on top of the main one: run detail, new task form, confirmation, help."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import grpc
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Input, Label, RichLog, Select, Static

from taskrun.cli import output
from taskrun.cli.client import Client, OutputReceived, TaskChanged
from taskrun.core.models import OutputKind, Task

HELP = """\
[b]Keys[/b]
  1 / 2 / 3     workers, tasks, events
  n             new task (agent from those announced; input checked as JSON)
  enter         open the selected task's run: live output, events, usage
  c             cancel the selected task (asks first)
  d             drain the selected worker (asks first)
  R             revoke the selected worker: cut off for good (asks first)
  s / a         filter tasks by status / by agent (cycles)
  /             search tasks by id
  escape        back;  ?  this help;  q  quit

Everything on screen is pushed by the control plane (WatchEvents): nothing is polled.
"""


class ConfirmScreen(ModalScreen[bool]):
    """Ask yes or no before an action that changes the fleet."""

    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 60; height: auto; border: thick $warning; padding: 1 2; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", variant="warning", id="yes")
                yield Button("No (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class HelpScreen(ModalScreen[None]):
    """The key bindings."""

    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: 76; height: auto; border: thick $primary; padding: 1 2; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP)


class NewTaskScreen(ModalScreen[Task | None]):
    """A form: agent (from those announced) and input JSON, checked before it is sent."""

    BINDINGS = [Binding("escape", "dismiss(None)", "cancel")]
    DEFAULT_CSS = """
    NewTaskScreen { align: center middle; }
    NewTaskScreen > Vertical { width: 70; height: auto; border: thick $primary; padding: 0 1; }
    NewTaskScreen #error { color: $error; height: auto; }
    """

    def __init__(self, client: Client, agents: list[str]) -> None:
        super().__init__()
        self.client = client
        self.agents = agents

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("[b]New task[/b]")
            yield Select(
                [(a, a) for a in self.agents],
                prompt="agent",
                id="agent",
                value=self.agents[0] if self.agents else Select.BLANK,
            )
            yield Input(
                value="{}", placeholder='input JSON object, e.g. {"text": "hi"}', id="input"
            )
            yield Label("", id="error")
            with Horizontal():
                yield Button("Create", variant="primary", id="create")
                yield Button("Cancel", id="cancel")

    def validate(self) -> tuple[str, dict[str, Any]] | str:
        """(agent, input) or what is wrong with the form."""
        agent = self.query_one("#agent", Select).value
        if not isinstance(agent, str):
            return (
                "pick an agent (none is announced by a connected worker)"
                if not self.agents
                else "pick an agent"
            )
        text = self.query_one("#input", Input).value.strip() or "{}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"input is not valid JSON: {exc.msg} (column {exc.colno})"
        if not isinstance(value, dict):
            return 'input must be a JSON object, like {"text": "hi"}'
        return agent, value

    def on_input_changed(self, _event: Input.Changed) -> None:
        result = self.validate()
        self.query_one("#error", Label).update(result if isinstance(result, str) else "")

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
        else:
            self.submit()

    @work(exclusive=True)
    async def submit(self) -> None:
        result = self.validate()
        error = self.query_one("#error", Label)
        if isinstance(result, str):
            error.update(result)
            return
        agent, value = result
        try:
            task = await self.client.create_task(agent, value)
        except grpc.aio.AioRpcError as exc:
            error.update(f"{exc.code().name}: {exc.details()}")
            return
        self.dismiss(task)


class RunScreen(Screen[None]):
    """One task's run: status, usage, live output and events (FollowTask)."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("c", "cancel", "cancel task"),
        Binding("question_mark", "app.help", "help"),
    ]
    DEFAULT_CSS = """
    RunScreen #summary { height: auto; max-height: 6; background: $primary-background; }
    RunScreen #output { height: 1fr; border: round $primary; }
    RunScreen #run-events { height: 6; border: round $secondary; }
    """

    def __init__(self, client: Client, task_id: str) -> None:
        super().__init__()
        self.client = client
        self.task_id = task_id
        self.task_state: Task | None = None
        self.text = ""  # all text output so far

    def compose(self) -> ComposeResult:
        yield Static(f"task {self.task_id}", id="summary")
        yield RichLog(id="output", wrap=True, markup=False)
        yield RichLog(id="run-events", wrap=False, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#output", RichLog).border_title = "output"
        self.query_one("#run-events", RichLog).border_title = "events"
        self.follow()

    @work(exclusive=True)
    async def follow(self) -> None:
        out = self.query_one("#output", RichLog)
        events = self.query_one("#run-events", RichLog)
        pending = ""
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for event in self.client.follow(self.task_id, include_events=True):
                if isinstance(event, OutputReceived):
                    chunk = event.chunk
                    if chunk.kind is OutputKind.EVENT:
                        events.write(f"#{chunk.seq} {output.format_event(chunk.data)}")
                    else:
                        self.text += chunk.data
                        pending += chunk.data
                        *lines, pending = pending.split("\n")
                        for line in lines:
                            out.write(line)
                elif isinstance(event, TaskChanged):
                    if pending:
                        out.write(pending)
                        pending = ""
                    self.show(event.task)
                    events.write(f"task {output.status_name(event.task.status)}")
        if pending:
            out.write(pending)

    def show(self, task: Task) -> None:
        self.task_state = task
        lines = [
            f"[b]{task.id}[/b]  {task.agent}  {output.status_name(task.status)}  "
            f"attempt {task.attempts}  worker {task.worker_id or output.NONE}",
            f"usage: {output.format_usage(task.usage)}",
        ]
        if task.error:
            lines.append(f"error: {task.error}")
        if task.result:
            lines.append(f"result: {task.result[:200]}")
        self.query_one("#summary", Static).update("\n".join(lines))

    def action_cancel(self) -> None:
        if self.task_state is not None and self.task_state.status.terminal:
            self.notify(
                f"task {self.task_id} is already {output.status_name(self.task_state.status)}"
            )
            return
        confirm_cancel = getattr(self.app, "confirm_cancel", None)
        if confirm_cancel is not None:
            confirm_cancel(self.task_id)
