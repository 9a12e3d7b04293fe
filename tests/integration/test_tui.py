"""The TUI against a real control plane on loopback, driven with Textual's Pilot at 80x24."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.app import App
from textual.notifications import Notification
from textual.widgets import Footer, Input, Label, RichLog, Select, Static
from textual.widgets._footer import FooterKey

from taskrun.cli.client import EventKind
from taskrun.cli.tui.app import TOAST_MARGIN, TaskRunApp
from taskrun.cli.tui.screens import (
    AnswerScreen,
    ConfirmScreen,
    HelpScreen,
    NewTaskScreen,
    RunScreen,
)
from taskrun.cli.tui.widgets import FleetHeader, TasksTable, Transcript, WorkersTable
from taskrun.controlplane.app import RunningServer
from taskrun.core.agent import AgentError, AgentResult, Readiness, RunContext
from taskrun.core.ids import RunId, TaskId
from taskrun.core.models import AgentSpec
from taskrun.core.status import Fault, TaskStatus
from taskrun.worker.agents import load_agents
from taskrun.worker.config import WorkerConfig
from taskrun.worker.daemon import WorkerDaemon
from tests.conftest import Cluster
from tests.integration.test_metrics import scrape, value

# Screenshots go to a temporary folder; `TASKRUN_SCREENSHOTS=docs scripts/test
# tests/integration/test_tui.py` refreshes the ones the README shows.
DOCS = Path(os.environ.get("TASKRUN_SCREENSHOTS") or tempfile.mkdtemp(prefix="taskrun-tui-"))
SIZE = (80, 24)


@pytest.fixture(autouse=True)
def patient_leases(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TUI runs in the test's own event loop, beside the server and the worker: on a busy
    machine a slow render stalled that loop past the suite's 2 s lease, and a run was retried
    (a second run where the test expects one). These tests are about the TUI, not leases."""
    start = cluster.start_server

    async def patient(**overrides: object) -> RunningServer:
        return await start(**{"lease_duration": 10.0, "heartbeat_interval": 1.0, **overrides})

    monkeypatch.setattr(cluster, "start_server", patient)


async def until(pilot_pause: Callable[[], object], predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not predicate():
            await pilot_pause()  # type: ignore[misc]


def lines(log: RichLog, *, times: bool = False) -> list[str]:
    """The log's lines; without the chat's HH:MM:SS times unless `times`."""
    text = [strip.text.rstrip() for strip in log.lines]
    return text if times else [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in text]


def toasts(app: App[None]) -> str:
    """The notifications raised so far (and not expired), one per line."""
    return "\n".join(n.message for n in app._notifications)


def header(app: App[None]) -> str:
    return str(app.query_one(FleetHeader).render())


class Parrot:
    """A test agent with sessions: repeats each message; a follow-up resumes its session."""

    spec = AgentSpec(name="parrot", description="repeats what it is told", supports_sessions=True)

    async def run(self, ctx: RunContext) -> AgentResult:
        said = ctx.prompt if ctx.resume_session_id else str(ctx.input["prompt"])
        if said == "fail":
            raise AgentError("told to fail")
        if said == "hold on":
            await asyncio.sleep(30)
        await ctx.emit(f"you said: {said}")
        session = ctx.resume_session_id or f"session-{ctx.task_id}"
        return AgentResult(result={"text": f"you said: {said}"}, session_id=session)


class PlainParrot(Parrot):
    """A parrot that keeps no session: its conversations live in the control plane only."""

    spec = AgentSpec(name="plainparrot", description="repeats what it is told")


async def start_parrot_worker(cluster: Cluster, worker_id: str = "worker-1") -> None:
    config = WorkerConfig(
        server=cluster.address,
        worker_id=worker_id,
        ca_cert=cluster.pki.ca_cert,
        cert=cluster.pki.worker_cert(worker_id),
        key=cluster.pki.worker_key(worker_id),
        reconnect_max_wait=0.5,
    )
    agents = {"parrot": Parrot(), "plainparrot": PlainParrot(), **load_agents(["echo"])}
    daemon = WorkerDaemon(config, agents)
    cluster.workers[worker_id] = (daemon, asyncio.create_task(daemon.run()))  # torn down there
    await cluster.wait_registered(worker_id)


async def test_screens_render_live_workers_tasks_and_events(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=2)
    client = cluster.client()
    done = await client.create_task("echo", {"text": "hello"})
    await client.wait(done.id)
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.synced)
        waiting = await client.create_task("nobody-offers-this", {}, allow_unknown_agent=True)
        await until(pilot.pause, lambda: waiting.id in app.query_one(TasksTable).rows)
        tasks = app.query_one(TasksTable)
        assert done.id in tasks.rows
        app.save_screenshot("tui-tasks.svg", path=str(DOCS))
        await pilot.press("1")
        workers = app.query_one(WorkersTable)
        await until(pilot.pause, lambda: "worker-1" in workers.rows)
        assert workers.get_row("worker-1")[3] == "online"
        app.save_screenshot("tui-workers.svg", path=str(DOCS))
        await pilot.press("3")
        await pilot.pause()
        app.save_screenshot("tui-events.svg", path=str(DOCS))
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        app.save_screenshot("tui-help.svg", path=str(DOCS))
        await pilot.press("escape")
        # filters: status cycles pending first
        await pilot.press("2", "s")
        await pilot.pause()
        assert list(tasks.rows) == [waiting.id]
        await client.cancel_task(waiting.id)


async def test_a_task_from_the_form_runs_and_its_output_shows(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.agents() == ["echo"])
        await pilot.press("n")
        await until(pilot.pause, lambda: isinstance(app.screen, NewTaskScreen))
        form = app.screen
        assert form.query_one("#agent", Select).value == "echo"
        field = form.query_one("#input", Input)
        field.value = "[1, 2"
        await pilot.pause()
        assert "not valid JSON" in str(form.query_one("#error").render())
        field.value = '{"text": "hello from the form", "chunks": 2}'
        await pilot.pause()
        app.save_screenshot("tui-new-task.svg", path=str(DOCS))
        await pilot.click("#create")
        await until(pilot.pause, lambda: isinstance(app.screen, RunScreen))
        run = app.screen
        assert isinstance(run, RunScreen)
        await until(
            pilot.pause,
            lambda: run.task_state is not None and run.task_state.status is TaskStatus.COMPLETED,
        )
        assert run.text == "hello from the form"
        assert not run.query_one("#follow-up").display  # echo keeps no session: no chat
        app.save_screenshot("tui-run.svg", path=str(DOCS))
        task, _ = await client.get_task(run.task_id)
        assert task.status is TaskStatus.COMPLETED


async def test_cancel_from_the_tui_cancels_the_task(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "x" * 100, "chunks": 100, "delay": 0.1})
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        tasks = app.query_one(TasksTable)
        await until(pilot.pause, lambda: task.id in tasks.rows)
        tasks.focus()
        tasks.move_cursor(row=tasks.get_row_index(task.id))
        await pilot.press("c")
        await pilot.pause()
        await pilot.press("y")
        await until(
            pilot.pause,
            lambda: app.state.tasks[task.id].status is TaskStatus.CANCELLED,
        )
    final, _ = await client.get_task(task.id)
    assert final.status is TaskStatus.CANCELLED


async def test_revoke_from_the_tui_cuts_the_worker_off(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("1")
        workers = app.query_one(WorkersTable)
        await until(pilot.pause, lambda: "worker-1" in workers.rows)
        workers.focus()
        workers.move_cursor(row=workers.get_row_index("worker-1"))
        await pilot.press("R")
        await pilot.pause()
        await pilot.press("y")
        await until(pilot.pause, lambda: workers.get_row("worker-1")[3] == "revoked")
    worker, _ = await client.get_worker("worker-1")
    assert worker.revoked_reason == "revoked from the TUI"


class Broken:
    """Fails every run at once; a second agent it offers lacks its credentials."""

    spec = AgentSpec(name="broken")

    async def run(self, ctx: RunContext) -> AgentResult:
        raise AgentError("nothing works here", fault=Fault.WORKER)  # the worker's, not the task's


class Keyless(Broken):
    spec = AgentSpec(name="keyless")

    def readiness(self) -> Readiness:
        return Readiness("no KEYLESS_KEY on the worker")


async def test_the_workers_view_shows_a_quarantine_and_unavailable_agents(
    cluster: Cluster,
) -> None:
    server = await cluster.start_server(
        quarantine_after=2, quarantine_base=60, metrics_listen="127.0.0.1:0"
    )
    config = WorkerConfig(
        server=cluster.address,
        worker_id="worker-1",
        ca_cert=cluster.pki.ca_cert,
        cert=cluster.pki.worker_cert("worker-1"),
        key=cluster.pki.worker_key("worker-1"),
        reconnect_max_wait=0.5,
    )
    daemon = WorkerDaemon(config, {"broken": Broken(), "keyless": Keyless()})
    cluster.workers["worker-1"] = (daemon, asyncio.create_task(daemon.run()))
    await cluster.wait_registered("worker-1")
    client = cluster.client()
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("1")
        workers = app.query_one(WorkersTable)
        await until(pilot.pause, lambda: "worker-1" in workers.rows)
        assert workers.get_row("worker-1")[2] == "broken,keyless!"
        assert workers.get_row("worker-1")[3] == "online"
        for _ in range(2):
            failed = await client.create_task("broken", {})
            await client.wait(failed.id)
        await until(pilot.pause, lambda: workers.get_row("worker-1")[3] == "online, quarantined")
    assert server.metrics_server is not None
    _, body = await scrape(server.metrics_server.port)
    assert value(body, 'taskrun_worker_quarantined{worker="worker-1"}') == 1
    assert value(body, "taskrun_worker_quarantines_total") == 1


async def test_the_footer_shows_every_main_key_within_80_columns(cluster: Cluster) -> None:
    await cluster.start_server()
    app = TaskRunApp(cluster.client())
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.synced)
        keys = list(app.query_one(Footer).query(FooterKey))
        shown = {k.key for k in keys}
        assert {"n", "c", "r", "d", "R", "s", "a", "question_mark", "q"} <= shown
        assert all(k.region.right <= SIZE[0] for k in keys), [(k.key, k.region.right) for k in keys]
        await pilot.press("question_mark")
        await pilot.pause()
        help_text = str(app.screen.query_one("Static").render())
        for key in ("1 / 2 / 3 / 4", "enter", "\n  c ", "\n  r ", "\n  d ", "\n  R ", "s / a", "/"):
            assert key in help_text, key


async def test_retry_from_the_tui_creates_a_new_task_like_the_cancelled_one(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    old = await client.create_task(
        "echo",
        {"text": "again", "chunks": 2, "delay": 0.3},
        labels={"team": "ops"},
        idempotency_key="first-try",
        priority=3,
    )
    await client.cancel_task(old.id, "changed my mind")
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        tasks = app.query_one(TasksTable)
        await until(
            pilot.pause,
            lambda: old.id in tasks.rows and tasks.get_row(old.id)[2] == "cancelled",
        )
        tasks.focus()
        tasks.move_cursor(row=tasks.get_row_index(old.id))
        await pilot.press("r")
        await until(pilot.pause, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(
            pilot.pause, lambda: isinstance(app.screen, RunScreen) and app.screen.task_id != old.id
        )
        run = app.screen
        assert isinstance(run, RunScreen)
        await until(
            pilot.pause,
            lambda: run.task_state is not None and run.task_state.status is TaskStatus.COMPLETED,
        )
        assert run.text == "again"
    new, _ = await client.get_task(run.task_id)
    original, _ = await client.get_task(old.id)
    assert new.id != old.id and new.status is TaskStatus.COMPLETED
    assert (new.agent, new.input) == (original.agent, original.input)
    assert new.labels == {"team": "ops", "retry_of": old.id}
    assert new.policy.priority == 3 and new.policy.idempotency_key == ""
    assert original.status is TaskStatus.CANCELLED  # the old task is left as it was


async def test_run_again_from_a_run_view_switches_to_the_new_tasks_run(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    old = await client.create_task("echo", {"text": "once more"})
    await client.wait(old.id)
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.synced)
        app.push_screen(app.run_screen(old.id))
        await until(pilot.pause, lambda: isinstance(app.screen, RunScreen))
        await pilot.press("r")
        await until(pilot.pause, lambda: isinstance(app.screen, ConfirmScreen))
        assert "again" in str(app.screen.query_one("Label").render())
        await pilot.press("y")
        await until(
            pilot.pause, lambda: isinstance(app.screen, RunScreen) and app.screen.task_id != old.id
        )
        run = app.screen
        assert isinstance(run, RunScreen)
        await until(pilot.pause, lambda: run.text == "once more")
        assert len(app.screen_stack) == 2  # replaced the old run view, not stacked on it
    new, _ = await client.get_task(run.task_id)
    assert new.labels == {"retry_of": old.id}


async def test_retry_of_a_running_task_is_refused(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "x" * 100, "chunks": 100, "delay": 0.1})
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        tasks = app.query_one(TasksTable)
        await until(
            pilot.pause,
            lambda: task.id in tasks.rows and tasks.get_row(task.id)[2] == "running",
        )
        tasks.focus()
        tasks.move_cursor(row=tasks.get_row_index(task.id))
        await pilot.press("r")
        await until(pilot.pause, lambda: "only a finished task can be retried" in toasts(app))
        assert not isinstance(app.screen, ConfirmScreen)
        assert list(tasks.rows) == [task.id]
    listed, _ = await client.list_tasks()
    assert [t.id for t in listed] == [task.id]
    await client.cancel_task(task.id)


async def test_the_chat_view_shows_the_conversation_and_sends_a_follow_up(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await start_parrot_worker(cluster)
    client = cluster.client()
    task = await client.create_task("parrot", {"prompt": "remember 7"})
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        tasks = app.query_one(TasksTable)
        await until(pilot.pause, lambda: app.state.supports_sessions("parrot"))
        await until(pilot.pause, lambda: task.id in tasks.rows)
        tasks.focus()
        tasks.move_cursor(row=tasks.get_row_index(task.id))
        await pilot.press("enter")
        await until(pilot.pause, lambda: isinstance(app.screen, RunScreen))
        run = app.screen
        assert isinstance(run, RunScreen)
        chat = run.query_one(Transcript)
        await until(pilot.pause, lambda: "parrot: you said: remember 7" in lines(chat))
        assert lines(chat) == ["you: remember 7", "parrot: you said: remember 7"]
        assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines(chat, times=True))
        field = run.query_one("#follow-up", Input)
        assert field.display
        await pilot.press("i")
        assert field.has_focus
        field.value = "which number?"
        await pilot.press("enter")
        await until(pilot.pause, lambda: "parrot: you said: which number?" in lines(chat))
        await until(
            pilot.pause,
            lambda: run.task_state is not None and run.task_state.status is TaskStatus.COMPLETED,
        )
        assert lines(chat) == [
            "you: remember 7",
            "parrot: you said: remember 7",
            "",
            "you: which number?",
            "parrot: you said: which number?",
        ]
        assert field.value == ""
        chat.focus()  # the footer shows the run view's keys again
        await pilot.pause()
        app.save_screenshot("tui-chat.svg", path=str(DOCS))
    final, runs = await client.get_task(task.id)  # the first turn's task never changed
    assert final.status is TaskStatus.COMPLETED and final.attempts == 1 and len(runs) == 1
    assert final.conversation_id is not None
    _, turns = await client.get_conversation(final.conversation_id)
    assert [t.message for t in turns] == ["remember 7", "which number?"]
    assert turns[1].answer == "you said: which number?"


async def test_a_refused_follow_up_shows_the_servers_reason(cluster: Cluster) -> None:
    await cluster.start_server()
    await start_parrot_worker(cluster)
    client = cluster.client()
    task = await client.create_task("parrot", {"prompt": "hold on"})
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.supports_sessions("parrot"))
        app.push_screen(app.run_screen(task.id))
        await until(pilot.pause, lambda: isinstance(app.screen, RunScreen) and app.screen.chat)
        run = app.screen
        assert isinstance(run, RunScreen)
        chat = run.query_one(Transcript)
        await until(pilot.pause, lambda: "you: hold on" in lines(chat))
        field = run.query_one("#follow-up", Input)
        field.focus()
        field.value = "try again"
        await pilot.press("enter")
        await until(pilot.pause, lambda: "send the next message once it ended" in toasts(app))
        assert "FAILED_PRECONDITION" in toasts(app)
        assert field.value == "try again"  # kept, to send once the problem is fixed
    _, runs = await client.get_task(task.id)
    assert len(runs) == 1
    await client.cancel_task(task.id)


async def test_the_chat_goes_on_after_a_failed_turn(cluster: Cluster) -> None:
    await cluster.start_server()
    await start_parrot_worker(cluster)
    client = cluster.client()
    task = await client.create_task("parrot", {"prompt": "fail"})
    assert (await client.wait(task.id)).status is TaskStatus.FAILED
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.supports_sessions("parrot"))
        app.push_screen(app.run_screen(task.id))
        await until(pilot.pause, lambda: isinstance(app.screen, RunScreen) and app.screen.chat)
        run = app.screen
        assert isinstance(run, RunScreen)
        chat = run.query_one(Transcript)
        await until(pilot.pause, lambda: "run failed: told to fail" in lines(chat))
        field = run.query_one("#follow-up", Input)
        field.focus()
        field.value = "try again"
        await pilot.press("enter")
        await until(pilot.pause, lambda: "parrot: you said: try again" in lines(chat))
        assert lines(chat)[-2:] == ["you: try again", "parrot: you said: try again"]
    final, _ = await client.get_task(task.id)
    assert final.status is TaskStatus.FAILED  # the failed turn stays failed


async def test_the_tui_reconnects_after_a_server_restart(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    before = await client.create_task("echo", {"text": "before"})
    await client.wait(before.id)
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        tasks = app.query_one(TasksTable)
        await until(pilot.pause, lambda: before.id in tasks.rows)
        assert "disconnected" not in header(app)
        await cluster.stop_server()
        await until(pilot.pause, lambda: "disconnected, retrying" in header(app))
        await cluster.start_server()  # the same port and database
        await cluster.wait_registered("worker-1")
        after = await client.create_task("echo", {"text": "after"})
        await until(
            pilot.pause,
            lambda: after.id in tasks.rows and tasks.get_row(after.id)[2] == "completed",
        )
        assert "disconnected" not in header(app)
        assert sorted(tasks.rows) == sorted([before.id, after.id])
        assert sorted(app.state.tasks) == sorted([before.id, after.id])
        workers = app.query_one(WorkersTable)
        assert list(workers.rows) == ["worker-1"]


async def test_a_denied_event_stream_is_shown_and_not_retried(cluster: Cluster) -> None:
    await cluster.start_server()
    app = TaskRunApp(cluster.client("worker-1"))  # a worker identity: not an operator
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: "PERMISSION_DENIED" in header(app))
        assert "retrying" not in header(app)
        assert "PERMISSION_DENIED" in toasts(app)
        assert not app.state.synced


class _Partial(App[None]):
    """A transcript and its partial-line view, fed by hand."""

    def compose(self):  # type: ignore[no-untyped-def]
        yield Transcript(id="output")
        yield Static("", id="partial")

    def on_mount(self) -> None:
        self.query_one(Transcript).partial = self.query_one("#partial", Static)


async def test_a_line_streamed_in_pieces_shows_as_it_comes_and_stays_one_line() -> None:
    app = _Partial()
    async with app.run_test(size=SIZE) as pilot:
        transcript = app.query_one(Transcript)
        partial = app.query_one("#partial", Static)
        run = RunId("run_1")
        transcript.add_text(run, "from")
        transcript.catch_up(ended=False)  # a task update between two chunks of one line
        await pilot.pause()
        assert (partial.display, str(partial.render())) == (True, "from")  # shown before \n
        transcript.add_text(run, " tui\nnext")
        await pilot.pause()
        assert lines(transcript) == ["from tui"]
        assert str(partial.render()) == "next"
        transcript.catch_up(ended=True)
        await pilot.pause()
        assert lines(transcript) == ["from tui", "next"]
        assert not partial.display


async def test_ages_in_the_tasks_table_move_with_the_clock_without_events(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    done = await client.create_task("echo", {"text": "old"})
    await client.wait(done.id)
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        tasks = app.query_one(TasksTable)
        await until(pilot.pause, lambda: done.id in tasks.rows)
        first = tasks.get_cell(done.id, tasks.column_keys["age"])
        await until(pilot.pause, lambda: tasks.get_cell(done.id, tasks.column_keys["age"]) != first)


async def test_the_task_filter_is_shown_above_the_table_for_as_long_as_it_applies(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    app = TaskRunApp(cluster.client())
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.synced)
        shown = app.query_one("#filter", Static)
        assert str(shown.render()) == "filter: none (s status, a agent, / id)"
        await pilot.press("2", "s", "s")
        await pilot.pause()
        assert str(shown.render()) == "filter: status=running"
        assert "task filter" not in toasts(app)  # not a popup that goes away
        assert shown.region.height == 1 and shown.display


async def test_an_event_that_arrives_as_the_app_closes_is_kept_not_an_error(
    cluster: Cluster,
) -> None:
    """The event stream's worker can hand over a change after the app's widgets are gone (a
    loaded machine, the user quitting): the app neither fails nor loses the change."""
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.synced)
    task_id = ""
    async with contextlib.aclosing(client.watch_events(snapshot=True)) as events:
        async for event in events:
            app.apply(event)  # what follow_events does with each change
            if event.kind is EventKind.SNAPSHOT_END:
                task_id = (await client.create_task("echo", {"text": "late"})).id
            elif event.task and event.task.id == task_id and event.task.status.terminal:
                break
    assert app.state.tasks[TaskId(task_id)].status is TaskStatus.COMPLETED


async def test_a_long_error_in_the_new_task_form_wraps_instead_of_being_cut(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    app = TaskRunApp(cluster.client())
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.agents() == ["echo"])
        await pilot.press("n")
        await until(pilot.pause, lambda: isinstance(app.screen, NewTaskScreen))
        form = app.screen
        form.query_one("#input", Input).value = '{"bogus": 1, "other": 2, "chunks": "many"}'
        await pilot.click("#create")
        error = form.query_one("#error", Label)
        await until(pilot.pause, lambda: "INVALID_ARGUMENT" in str(error.render()))
        message = str(error.render())
        assert len(message) > error.region.width  # longer than one line of the form
        assert error.region.height >= 2  # so it wraps onto more lines
        assert error.region.height >= len(message) // error.region.width


@pytest.mark.timeout(20)
async def test_a_notification_about_to_expire_is_dropped_not_shown_again_on_a_screen_change(
    cluster: Cluster,
) -> None:
    """Textual 8.2 gives a re-shown toast a timer of the notification's time left; when that is
    negative by the time the toast is made, the timer spins the event loop (the TUI froze at
    100 % CPU). The app drops notifications within TOAST_MARGIN of expiring before it re-shows
    them, so the toast is never made."""
    await cluster.start_server()
    app = TaskRunApp(cluster.client())
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.synced)
        nearly = Notification(
            "nearly gone", timeout=5, raised_at=time.time() - 5 + TOAST_MARGIN / 2
        )
        lasting = Notification("still here", timeout=30)
        app._notifications.add(nearly)
        app._notifications.add(lasting)
        await pilot.press("question_mark")  # a screen change shows the notifications again
        await pilot.pause()
        assert nearly not in app._notifications
        assert lasting in app._notifications
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)  # still answering keys


async def test_the_run_view_of_a_pending_task_says_why_it_waits(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")  # offers echo, not the agent asked for
    client = cluster.client()
    waiting = await client.create_task("nobody-offers-this", {}, allow_unknown_agent=True)
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(app.run_screen(waiting.id))
        await until(pilot.pause, lambda: isinstance(app.screen, RunScreen))
        run = app.screen
        assert isinstance(run, RunScreen)
        await until(pilot.pause, lambda: run.task_state is not None)
        summary = str(run.query_one("#summary", Static).render())
        assert "waiting: no online worker offers agent 'nobody-offers-this'" in summary
    await client.cancel_task(waiting.id)


async def test_a_conversation_of_an_agent_without_sessions_is_a_chat_too(cluster: Cluster) -> None:
    await cluster.start_server()
    await start_parrot_worker(cluster)
    client = cluster.client()
    _, turn = await client.create_conversation("plainparrot", "hello")
    assert (await client.wait(turn.task_id)).status is TaskStatus.COMPLETED
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(app.run_screen(turn.task_id))
        await until(pilot.pause, lambda: isinstance(app.screen, RunScreen) and app.screen.chat)
        run = app.screen
        assert isinstance(run, RunScreen)
        chat = run.query_one(Transcript)
        await until(pilot.pause, lambda: "plainparrot: you said: hello" in lines(chat))
        field = run.query_one("#follow-up", Input)
        field.focus()
        field.value = "again"
        await pilot.press("enter")
        await until(pilot.pause, lambda: "plainparrot: you said: again" in lines(chat))
        assert lines(chat) == [
            "you: hello",
            "plainparrot: you said: hello",
            "",
            "you: again",
            "plainparrot: you said: again",
        ]


async def test_the_inbox_tab_lists_waiting_approvals_with_a_count_in_the_header(
    cluster: Cluster,
) -> None:
    from taskrun.cli.tui.widgets import InboxTable

    await cluster.start_server()
    client = cluster.client()
    await client.put_workflow(
        "name: ask\nsteps:\n  ok: {type: approval, question: 'Ship ${input.v}?', "
        "choices: [yes_ship, no_wait]}\n"
    )
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.synced)
        assert "inbox 0" in header(app)
        run, _ = await client.start_workflow_run("ask", {"v": "2.1"})
        table = app.query_one(InboxTable)
        await until(pilot.pause, lambda: len(table.rows) == 1)
        assert "inbox 1" in header(app)
        await pilot.press("4")
        await pilot.pause()
        [key] = list(table.rows)
        row = table.get_row(key)
        assert row[1] == "ask/ok" and row[2] == "Ship 2.1?" and row[3] == "yes_ship,no_wait"
        app.save_screenshot("tui-inbox.svg", path=str(DOCS))
        table.focus()
        await pilot.press("enter")
        await until(pilot.pause, lambda: isinstance(app.screen, AnswerScreen))
        await pilot.click("#approve")  # no choice picked yet: refused in the form
        await pilot.pause()
        assert "pick a choice: yes_ship, no_wait" in str(app.screen.query_one("#error").render())
        app.screen.query_one("#choice", Select).value = "yes_ship"
        app.screen.query_one("#comment", Input).value = "looks good"
        await pilot.pause(0.3)  # a button ignores presses during its 0.2 s "active" effect
        await pilot.click("#approve")
        await until(pilot.pause, lambda: len(table.rows) == 0)
        assert "inbox 0" in header(app)
    done = await client.get_workflow_run(run.id)
    assert done.steps["ok"].result == {
        "decision": "approved",
        "choice": "yes_ship",
        "comment": "looks good",
    }
