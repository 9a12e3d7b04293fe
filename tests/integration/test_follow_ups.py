"""ContinueTask: a follow-up resumes the agent session on the worker that holds it.

Runs the real claude_code agent, i.e. the SDK's bundled Claude Code CLI, against the fake
Messages API on loopback (see tests/fakes/anthropic_server.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from taskrun.core.status import RunStatus, TaskStatus
from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, Text
from tests.integration.test_agents_claude_code import api, workdir  # noqa: F401  (fixtures)

pytest.importorskip("claude_agent_sdk", reason="needs the taskrun-agents[claude] extra")


async def test_follow_up_resumes_the_session_on_the_same_worker(
    api: FakeAnthropic,  # noqa: F811
    workdir: Path,  # noqa: F811
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    busy = await cluster.start_worker(
        "worker-1", agents=["claude_code", "echo"], allow_cwd=[workdir], capacity=2
    )
    client = cluster.client()
    api.enqueue(Text("I will remember 7."))
    task = await client.create_task(
        "claude_code", {"prompt": "Remember the number 7.", "cwd": str(workdir)}
    )
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
    # worker-2 is idle and worker-1 busy: only the session pins the follow-up to worker-1
    await cluster.start_worker(
        "worker-2", agents=["claude_code", "echo"], allow_cwd=[workdir], capacity=2
    )
    slow = await client.create_task("echo", {"text": "zz", "chunks": 2, "delay": 2})
    async with asyncio.timeout(10):
        while not busy.runs:
            await asyncio.sleep(0.01)
    assert (await client.get_task(slow.id))[0].worker_id == "worker-1"

    api.enqueue(Text("The number was 7."))
    continued = await client.continue_task(task.id, "Which number?")
    # assigned in the same commit: worker-1 has a free slot
    assert continued.status is TaskStatus.RUNNING and continued.worker_id == "worker-1"
    assert continued.attempts == 2
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED, final.error
    task_after, runs = await client.get_task(task.id)
    assert [r.worker_id for r in runs] == ["worker-1", "worker-1"]
    assert runs[1].prompt == "Which number?"
    assert runs[1].session_id == runs[0].session_id
    assert json.loads(task_after.result)["text"] == "The number was 7."
    conversation = json.dumps(api.message_requests[-1].messages)
    assert "Remember the number 7." in conversation and "I will remember 7." in conversation
    assert api.message_requests[-1].last_user_text() == "Which number?"
    assert task_after.usage.input_tokens == runs[0].usage.input_tokens + runs[1].usage.input_tokens


async def test_follow_up_fails_clearly_when_the_sessions_worker_is_gone(
    api: FakeAnthropic,  # noqa: F811
    workdir: Path,  # noqa: F811
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    api.enqueue(Text("ok"))
    task = await client.create_task("claude_code", {"prompt": "hi", "cwd": str(workdir)})
    await client.wait(task.id)
    await cluster.start_worker("worker-2", agents=["claude_code"], allow_cwd=[workdir])
    await cluster.stop_worker("worker-1")
    async with asyncio.timeout(10):
        while "worker-1" in cluster.server.engine.sessions:  # type: ignore[union-attr,operator]
            await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.continue_task(task.id, "again")
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "worker-1" in (err.value.details() or "")
    task_after, runs = await client.get_task(task.id)
    assert task_after.status is TaskStatus.COMPLETED and len(runs) == 1  # nothing changed


async def test_follow_up_refusals(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    done = await client.create_task("echo", {"text": "x"})
    await client.wait(done.id)
    running = await client.create_task("echo", {"text": "ab", "chunks": 2, "delay": 1})

    async def refused(task_id: str, prompt: str, code: grpc.StatusCode, needle: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.continue_task(task_id, prompt)
        assert err.value.code() is code
        assert needle in (err.value.details() or ""), err.value.details()

    await refused(done.id, "more", grpc.StatusCode.FAILED_PRECONDITION, "keeps no session")
    await refused(running.id, "more", grpc.StatusCode.FAILED_PRECONDITION, "only a completed")
    await refused(done.id, "  ", grpc.StatusCode.INVALID_ARGUMENT, "prompt")
    await refused("tsk_00000000000000000000000000", "x", grpc.StatusCode.NOT_FOUND, "task_id")
    _, runs = await client.get_task(done.id)
    assert [r.status for r in runs] == [RunStatus.COMPLETED]


async def test_a_follow_up_waiting_for_a_revoked_worker_fails(
    api: FakeAnthropic,  # noqa: F811
    workdir: Path,  # noqa: F811
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    busy = await cluster.start_worker(
        "worker-1", agents=["claude_code", "echo"], allow_cwd=[workdir], capacity=1
    )
    client = cluster.client()
    api.enqueue(Text("Noted."))
    task = await client.create_task("claude_code", {"prompt": "Note it.", "cwd": str(workdir)})
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
    await client.create_task("echo", {"text": "zz", "chunks": 2, "delay": 2})
    async with asyncio.timeout(10):
        while not busy.runs:
            await asyncio.sleep(0.01)
    continued = await client.continue_task(task.id, "Still there?")
    assert continued.status is TaskStatus.PENDING  # worker-1's only slot is taken
    await client.revoke_worker("worker-1", "decommissioned")
    final, runs = await client.get_task(task.id)
    assert final.status is TaskStatus.FAILED
    assert "worker revoked: decommissioned" in final.error
    assert runs[-1].status is RunStatus.FAILED
