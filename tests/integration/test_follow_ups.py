"""ContinueTask: the next message of the conversation a task belongs to, as a new turn (a new
task); a task outside any conversation becomes its first turn. The given task never changes.

Runs the real claude_code agent, i.e. the SDK's bundled Claude Code CLI, against the fake
Messages API on loopback (see tests/fakes/anthropic_server.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import grpc
import pytest

from taskrun.core.status import RunStatus, TaskStatus
from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, Text
from tests.integration.test_agents_claude_code import api, workdir  # noqa: F401  (fixtures)

pytest.importorskip("claude_agent_sdk", reason="needs the taskrun[claude] extra")


async def test_continuing_a_task_resumes_the_session_the_worker_kept(
    api: FakeAnthropic,  # noqa: F811
    workdir: Path,  # noqa: F811
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    api.enqueue(Text("I will remember 7."))
    task = await client.create_task(
        "claude_code", {"prompt": "Remember the number 7.", "cwd": str(workdir)}
    )
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED

    api.enqueue(Text("The number was 7."))
    continued = await client.continue_task(task.id, "Which number?")
    assert continued.id != task.id and continued.turn == 2
    final = await client.wait(continued.id)
    assert final.status is TaskStatus.COMPLETED, final.error
    _, [first_run] = await client.get_task(task.id)
    _, [run] = await client.get_task(continued.id)
    assert run.session_id == first_run.session_id  # the worker's own copy of the session
    assert json.loads(final.result)["text"] == "The number was 7."
    conversation = json.dumps(api.message_requests[-1].messages)
    assert "Remember the number 7." in conversation and "I will remember 7." in conversation
    assert "conversation so far" not in conversation
    assert api.message_requests[-1].last_user_text() == "Which number?"
    task_after, runs = await client.get_task(task.id)
    assert task_after.status is TaskStatus.COMPLETED and len(runs) == 1


async def test_continuing_when_the_sessions_worker_is_gone_uses_the_transcript(
    api: FakeAnthropic,  # noqa: F811
    workdir: Path,  # noqa: F811
    cluster: Cluster,
) -> None:
    server = await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    api.enqueue(Text("ok, noted: blue"))
    task = await client.create_task(
        "claude_code", {"prompt": "My colour is blue.", "cwd": str(workdir)}
    )
    await client.wait(task.id)
    await cluster.start_worker("worker-2", agents=["claude_code"], allow_cwd=[workdir])
    await cluster.stop_worker("worker-1")
    # the task ran before it was a conversation: no snapshot of its session was kept, and
    # worker-1's disk is gone
    shutil.rmtree(Path(os.environ["HOME"]) / ".claude" / "projects")
    async with asyncio.timeout(10):
        while "worker-1" in server.engine.sessions:
            await asyncio.sleep(0.01)
    api.enqueue(Text("Blue."))
    continued = await client.continue_task(task.id, "What is my colour?")
    final = await client.wait(continued.id)
    assert final.status is TaskStatus.COMPLETED, final.error
    _, [run] = await client.get_task(continued.id)
    assert run.worker_id == "worker-2"
    prompt = api.message_requests[-1].last_user_text()
    assert "conversation so far" in prompt
    assert "My colour is blue." in prompt and "ok, noted: blue" in prompt
    assert prompt.endswith("What is my colour?")


async def test_continue_refusals(cluster: Cluster) -> None:
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

    await refused(done.id, "more", grpc.StatusCode.FAILED_PRECONDITION, '"prompt"')
    await refused(running.id, "more", grpc.StatusCode.FAILED_PRECONDITION, "once it ended")
    await refused(done.id, "  ", grpc.StatusCode.INVALID_ARGUMENT, "prompt")
    await refused("tsk_00000000000000000000000000", "x", grpc.StatusCode.NOT_FOUND, "task_id")
    task, runs = await client.get_task(done.id)
    assert [r.status for r in runs] == [RunStatus.COMPLETED]
    assert task.conversation_id is None  # a refused message creates no conversation
