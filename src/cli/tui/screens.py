"""Screens on top of the main one: run detail, new task form, confirmation, help."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc
from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Input, Label, RichLog, Select, Static

from taskrun.cli import output
from taskrun.cli.client import Client, OutputReceived, TaskChanged
from taskrun.cli.task_tree import tree_text
from taskrun.cli.tui.widgets import Transcript
from taskrun.core.ids import RunId
from taskrun.core.models import OutputKind, Run, Task
from taskrun.core.workflow import InboxItem

HELP = """\
[b]Keys[/b]
  1 / 2 / 3 / 4  workers, tasks, events, inbox (enter: approve or reject)
  n           new task: agent from those announced, JSON input checked
  enter       the selected task's run: live output, events, usage
  c           cancel the selected task
  r           retry a finished task: a new one like it, retry_of=<id>
  d           drain the selected worker: no new runs, then it exits
  R           revoke the selected worker: cut off for good
  s / a       filter tasks by status / by agent (cycles)
  /           search tasks by id
  i           in the run view of an agent with sessions: next message
  escape      back;   ?  this help;   q  quit
c, r, d and R ask first.

Everything is pushed by the control plane (WatchEvents); only the
inbox is also read every 2 s (answered items leave it). When the
stream breaks, the header says so and the TUI reconnects by itself.
"""


class ConfirmScreen(ModalScreen[bool]):
    """Ask yes or no before an action that changes the fleet."""

    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 60; height: auto; border: thick $warning; padding: 1 2; }
    ConfirmScreen Label { width: 100%; margin-bottom: 1; }
    ConfirmScreen Horizontal { height: auto; }
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


Answer = tuple[bool, str, str]  # (approve, choice, comment)


class AnswerScreen(ModalScreen[Answer | None]):
    """answer an inbox item: approve (with one of its choices) or reject."""

    BINDINGS = [Binding("escape", "dismiss(None)", "cancel")]
    DEFAULT_CSS = """
    AnswerScreen { align: center middle; }
    AnswerScreen > Vertical { width: 70; height: auto; border: thick $primary; padding: 0 1; }
    AnswerScreen #error { color: $error; height: auto; width: 100%; }
    AnswerScreen Label { width: 100%; }
    AnswerScreen Horizontal { height: auto; }
    """

    def __init__(self, item: InboxItem) -> None:
        super().__init__()
        self.item = item

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"[b]{escape(self.item.workflow)}/{escape(self.item.step)}[/b]")
            yield Label(escape(self.item.question))
            if self.item.choices:
                yield Select([(c, c) for c in self.item.choices], prompt="choice", id="choice")
            yield Input(placeholder="comment (optional)", id="comment")
            yield Label("", id="error")
            with Horizontal():
                yield Button("Approve", variant="success", id="approve")
                yield Button("Reject", variant="error", id="reject")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        comment = self.query_one("#comment", Input).value.strip()
        if event.button.id == "reject":
            self.dismiss((False, "", comment))
            return
        choice = ""
        if self.item.choices:
            value = self.query_one("#choice", Select).value
            if not isinstance(value, str):
                self.query_one("#error", Label).update(
                    f"pick a choice: {', '.join(self.item.choices)}"
                )
                return
            choice = value
        self.dismiss((True, choice, comment))


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
    NewTaskScreen #error { color: $error; height: auto; width: 100%; }
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


TREE_REFRESH = 2.0  # seconds between reads of a task's sub-tasks while its screen shows


class RunScreen(Screen[None]):
    """One task's run: status, usage, live output and events (FollowTask). For an agent with
    sessions, a chat: every turn of its conversation, and an input box for the next message."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("c", "cancel", "cancel"),
        Binding("r", "retry", "retry"),
        Binding("i", "reply", "message"),
        Binding("question_mark", "app.help", "help"),
    ]
    DEFAULT_CSS = """
    RunScreen #summary { height: auto; max-height: 6; background: $primary-background; }
    RunScreen #subtasks { height: auto; max-height: 8; display: none; border: round $accent; }
    RunScreen.tree #subtasks { display: block; }
    RunScreen #output { height: 1fr; border: round $primary; }
    RunScreen #partial { height: auto; max-height: 3; padding: 0 1; display: none; }
    RunScreen #run-events { height: 6; border: round $secondary; }
    RunScreen.chat #run-events { height: 5; }
    RunScreen #follow-up { display: none; }
    RunScreen.chat #follow-up { display: block; }
    """

    def __init__(
        self,
        client: Client,
        task_id: str,
        *,
        supports_sessions: Callable[[str], bool] = lambda _agent: False,
    ) -> None:
        super().__init__()
        self.client = client
        self.task_id = task_id
        self.supports_sessions = supports_sessions
        self.task_state: Task | None = None
        self.seen: dict[RunId, int] = {}  # last output seq shown per run (follows restart)

    @property
    def text(self) -> str:
        """All text output so far."""
        return self.query_one(Transcript).text

    @property
    def chat(self) -> bool:
        return self.has_class("chat")

    def compose(self) -> ComposeResult:
        yield Static(f"task {self.task_id}", id="summary")
        yield Static("", id="subtasks", markup=False)
        yield Transcript(id="output")
        yield Static("", id="partial")  # the output line still being streamed
        yield RichLog(id="run-events", wrap=False, markup=False)
        yield Input(placeholder="next message (enter sends it)", id="follow-up")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one(Transcript).border_title = "output"
        self.query_one(Transcript).partial = self.query_one("#partial", Static)
        self.query_one("#run-events", RichLog).border_title = "events"
        self.query_one("#subtasks", Static).border_title = "sub-tasks"
        self.follow()
        self.set_interval(TREE_REFRESH, self.refresh_tree)  # sub-tasks change on their own

    @work(exclusive=True, group="tree")
    async def refresh_tree(self) -> None:
        """The tree below the task (sub-tasks its runs created), each with status and cost."""
        task = self.task_state
        if task is not None and not (task.policy.allow_subtasks or task.root_task_id):
            return
        try:
            task, _, below = await self.client.get_task_tree(self.task_id)
        except grpc.aio.AioRpcError:
            return
        if below:
            self.query_one("#subtasks", Static).update(
                tree_text(task, below, heading=False).rstrip()
            )
            self.add_class("tree")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self.chat if action == "reply" else True

    @work(exclusive=True, group="follow")
    async def follow(self) -> None:
        """Stream the task's output and changes until it ends (again for each new turn)."""
        out = self.query_one(Transcript)
        events = self.query_one("#run-events", RichLog)
        if self.task_state is None:  # the agent decides the view before any output shows
            task = await self.load_runs()
            if task is not None and (task.conversation_id or self.supports_sessions(task.agent)):
                self.start_chat(task.agent)
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for event in self.client.follow(self.task_id, include_events=True):
                if isinstance(event, OutputReceived):
                    chunk = event.chunk
                    if chunk.seq <= self.seen.get(chunk.run_id, 0):
                        continue  # shown by an earlier follow
                    self.seen[chunk.run_id] = chunk.seq
                    if chunk.kind is OutputKind.EVENT:
                        events.write(f"#{chunk.seq} {output.format_event(chunk.data)}")
                        continue
                    if out.chat and not out.knows(chunk.run_id):
                        await self.load_runs()
                    out.add_text(chunk.run_id, chunk.data)
                elif isinstance(event, TaskChanged):
                    task = event.task
                    self.show(task)
                    if out.chat and (task.status.terminal or not out.knows(task.current_run_id)):
                        await self.load_runs()
                    out.catch_up(ended=task.status.terminal)
                    events.write(f"task {output.status_name(task.status)}")
        out.flush()

    def start_chat(self, agent: str) -> None:
        self.add_class("chat")
        transcript = self.query_one(Transcript)
        transcript.chat = True
        transcript.agent = agent
        transcript.border_title = "chat"
        self.refresh_bindings()

    async def load_runs(self) -> Task | None:
        """Read the runs (their prompts, results and errors) for the chat: of every turn of the
        task's conversation when it is one, else of the task. A turn's message is its task's
        prompt; the chat shows it before the turn's first run."""
        try:
            task, runs = await self.client.get_task(self.task_id)
            if task.conversation_id is None:
                self.query_one(Transcript).set_runs(runs, _first_prompt(task.input))
                return task
            _, turns = await self.client.get_conversation(task.conversation_id)
            every: list[Run] = []
            for turn in turns:
                turn_runs = runs if turn.task_id == task.id else []
                if not turn_runs:
                    turn_runs = (await self.client.get_task(turn.task_id))[1]
                turn_runs = [replace(r, prompt="") for r in turn_runs]
                if turn_runs:
                    turn_runs[0].prompt = turn.message
                every.extend(turn_runs)
        except grpc.aio.AioRpcError:
            return None  # the follow stream reports what is wrong
        self.query_one(Transcript).set_runs(every, "")
        return task

    def action_reply(self) -> None:
        self.query_one("#follow-up", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "follow-up":
            event.stop()
            if event.value.strip():
                self.send_follow_up(event.value.strip())

    @work(group="chat")
    async def send_follow_up(self, prompt: str) -> None:
        """ContinueTask: the next turn of the task's conversation, a new task this screen then
        follows; the server says why when it refuses (the last turn is still running, ...)."""
        try:
            task = await self.client.continue_task(self.task_id, prompt)
        except grpc.aio.AioRpcError as exc:
            self.notify(f"{exc.code().name}: {exc.details()}", severity="error", timeout=10)
            return
        self.task_id = task.id
        self.query_one("#follow-up", Input).value = ""
        self.query_one("#run-events", RichLog).write(f"message sent (turn {task.turn}, {task.id})")
        self.show(task)
        await self.load_runs()
        self.query_one(Transcript).catch_up(ended=False)  # the new message shows at once
        self.follow()

    def show(self, task: Task) -> None:
        self.task_state = task
        lines = [
            f"[b]{task.id}[/b]  {task.agent}  {output.status_name(task.status)}  "
            f"attempt {task.attempts}  worker {task.worker_id or output.NONE}",
            f"usage: {output.format_usage(task.usage)}",
        ]
        if task.waiting_reason:
            lines.append(f"waiting: {task.waiting_reason}")
        if task.error:
            lines.append(f"error: {task.error}")
        if task.result:
            lines.append(f"result: {task.result[:200]}")
        self.query_one("#summary", Static).update("\n".join(lines))

    def action_retry(self) -> None:
        confirm_retry = getattr(self.app, "confirm_retry", None)
        if confirm_retry is not None:
            confirm_retry(self.task_id)

    def action_cancel(self) -> None:
        if self.task_state is not None and self.task_state.status.terminal:
            self.notify(
                f"task {self.task_id} is already {output.status_name(self.task_state.status)}"
            )
            return
        confirm_cancel = getattr(self.app, "confirm_cancel", None)
        if confirm_cancel is not None:
            confirm_cancel(self.task_id)


def _first_prompt(input_json: str) -> str:
    """The first run's message: the task input's `prompt`, else the input itself."""
    try:
        value = json.loads(input_json)
    except json.JSONDecodeError:
        return input_json
    prompt = value.get("prompt") if isinstance(value, dict) else None
    return prompt if isinstance(prompt, str) else input_json
