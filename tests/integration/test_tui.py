"""The TUI against a real control plane on loopback, driven with Textual's Pilot at 80x24."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from textual.widgets import Input, Select

from taskrun.cli.tui.app import TaskRunApp
from taskrun.cli.tui.screens import NewTaskScreen, RunScreen
from taskrun.cli.tui.widgets import TasksTable, WorkersTable
from taskrun.core.status import TaskStatus
from tests.conftest import Cluster

# Screenshots go to a temporary folder; `TASKRUN_SCREENSHOTS=docs scripts/test
# tests/integration/test_tui.py` refreshes the ones the README shows.
DOCS = Path(os.environ.get("TASKRUN_SCREENSHOTS") or tempfile.mkdtemp(prefix="taskrun-tui-"))
SIZE = (80, 24)


async def until(pilot_pause: Callable[[], object], predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not predicate():
            await pilot_pause()  # type: ignore[misc]


async def test_screens_render_live_workers_tasks_and_events(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=2)
    client = cluster.client()
    done = await client.create_task("echo", {"text": "hello"})
    await client.wait(done.id)
    app = TaskRunApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot.pause, lambda: app.state.synced)
        waiting = await client.create_task("nobody-offers-this", {})
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
        assert app.screen.__class__.__name__ == "HelpScreen"
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
