"""The workflow executor when a commit fails: it refuses like the engine, reloads its runs from
the store once the engine recovered, and its view holds nothing the store does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.store.memory import MemoryStore
from taskrun.controlplane.workflows.executor import WorkflowExecutor
from taskrun.core.errors import Unavailable
from taskrun.core.workflow import StepStatus, WorkflowRunStatus

ASK = """
name: ask
steps:
  ok: {type: approval, question: 'go?'}
  then: {type: task, agent: echo, needs: [ok], input: {text: go}}
"""


@pytest.fixture
async def running() -> AsyncIterator[tuple[Engine, MemoryStore, WorkflowExecutor]]:
    store = MemoryStore()
    await store.open()
    engine = Engine(store, ServerConfig(store="memory"))
    await engine.start()
    executor = WorkflowExecutor(engine)
    await executor.load()
    executor.start()
    yield engine, store, executor
    await executor.stop()
    await engine.stop()


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_failed_answer_leaves_the_item_waiting_and_it_can_be_answered_after_recovery(
    running: tuple[Engine, MemoryStore, WorkflowExecutor],
) -> None:
    engine, store, executor = running
    await executor.put_workflow(ASK)
    run, _ = await executor.start_run("ask", {})
    await until(lambda: len(executor.inbox()) == 1)
    [item] = executor.inbox()
    store.fail_writes("disk full")
    with pytest.raises(Unavailable, match="disk full"):
        await executor.answer(item.id, approve=True)
    with pytest.raises(Unavailable):  # the engine refuses while it recovers
        await executor.start_run("ask", {})
    assert executor.recovering
    with pytest.raises(Unavailable):  # the executor too, until it reloaded its runs
        await executor.answer(item.id, approve=True)
    assert [i.id for i in executor.inbox()] == [item.id]  # readers see what was committed
    store.fail_writes(None)
    await until(lambda: not engine.store_error and engine.recoveries == 1)
    await until(lambda: not executor.recovering)
    # the executor reloaded: the answer that failed left no trace
    stored = await store.get_workflow_run(run.id)
    assert stored is not None and stored.steps["ok"].status is StepStatus.WAITING
    after = await executor.answer(item.id, approve=True)
    assert after.steps["ok"].status is StepStatus.COMPLETED
    assert after.steps["then"].status is StepStatus.RUNNING  # its task waits for a worker
    task = engine.tasks[after.steps["then"].task_id]  # type: ignore[index]
    assert task.labels == {"workflow": "ask", "workflow_run": run.id, "step": "then"}
    assert task.policy.idempotency_key == f"wf:{run.id}:then:1"
    assert (await store.list_workflow_runs(unfinished=True))[0].status is WorkflowRunStatus.RUNNING
