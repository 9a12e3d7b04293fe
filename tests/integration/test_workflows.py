"""Workflows end to end: a real control plane on loopback (mTLS, SQLite), real workers running
the echo agent, control-plane restarts while steps wait."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from taskrun.controlplane.workflows.executor import WorkflowExecutor
from taskrun.core.errors import InvalidArgument
from taskrun.core.workflow import StepStatus, WorkflowRun, WorkflowRunStatus
from tests.conftest import Cluster

TWO_STEPS = """
name: two-steps
steps:
  first:
    type: task
    agent: echo
    input: {text: "${input.topic}"}
  second:
    type: task
    agent: echo
    needs: [first]
    input: {text: "the first saw ${steps.first.result.chars} chars of ${input.topic}"}
"""


def executor(cluster: Cluster) -> WorkflowExecutor:
    assert cluster.server is not None and cluster.server.workflows is not None
    return cluster.server.workflows


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def finished(cluster: Cluster, run_id: str, timeout: float = 15.0) -> WorkflowRun:
    async def done() -> bool:
        return (await executor(cluster).get_run(run_id)).status.finished

    await eventually(done, timeout)
    return await executor(cluster).get_run(run_id)


async def step_is(cluster: Cluster, run_id: str, step: str, status: StepStatus) -> None:
    async def check() -> bool:
        return (await executor(cluster).get_run(run_id)).steps[step].status is status

    await eventually(check)


async def test_two_task_steps_pass_data(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    workflow, created = await executor(cluster).put_workflow(TWO_STEPS)
    assert created and workflow.version == 1
    run, _ = await executor(cluster).start_run("two-steps", {"topic": "tides"})
    done = await finished(cluster, run.id)
    assert done.status is WorkflowRunStatus.COMPLETED, done.error
    assert done.steps["first"].result == {"chars": 5, "chunks": 1}
    client = cluster.client()
    second, _ = await client.get_task(done.steps["second"].task_id)
    assert '"the first saw 5 chars of tides"' in second.input
    first = done.steps["first"]
    assert first.finished_at is not None and done.steps["second"].started_at is not None
    assert first.finished_at <= done.steps["second"].started_at


async def test_invalid_definitions_name_the_path(cluster: Cluster) -> None:
    await cluster.start_server()
    bad = {
        "name: x\nsteps:\n  a: {type: task}\n": ("steps.a", "'agent' is a required property"),
        "name: x\nsteps:\n  a: {type: task, agent: echo, needs: [b]}\n": (
            "steps.a.needs[0]",
            "names no step 'b'",
        ),
        "name: x\nsteps:\n  a: {type: bogus}\n": ("steps.a.type", "is not one of"),
        (
            "name: x\nsteps:\n  a: {type: condition, expression: 'a ==', then: [b]}\n"
            "  b: {type: wait, duration: 1}\n"
        ): (
            "steps.a.expression",
            "JMESPath",
        ),
        "name: x\nsteps:\n  a: {type: wait, until: '07:00', timezone: Mars/Base}\n": (
            "steps.a.timezone",
            "IANA",
        ),
        (
            "name: x\nsteps:\n  a: {type: task, agent: e, needs: [b]}\n"
            "  b: {type: task, agent: e, needs: [a]}\n"
        ): (
            "steps.a.needs",
            "cycle",
        ),
    }
    for text, (field, message) in bad.items():
        with pytest.raises(InvalidArgument) as info:
            await executor(cluster).put_workflow(text)
        assert info.value.field == field, text
        assert message in info.value.message, (text, info.value.message)
