"""A claude_code run orchestrates agents: the Claude Code CLI bundled with claude-agent-sdk,
against the fake Messages API scripted to call the MCP tool `create_task`, reaches the control
plane's MCP server (HTTPS, trusting the control plane's CA) with its run's credential, creates
sub-tasks that run on another worker, and the tree's budget refuses the third."""

from __future__ import annotations

import json
from typing import Any

import pytest

from taskrun.core.status import TaskStatus
from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, Text, ToolUse
from tests.integration.test_agents_claude_code import api  # noqa: F401  (the fixture)

pytest.importorskip("claude_agent_sdk", reason="needs the taskrun-agents[claude] extra")


def create(text: str, n: int) -> ToolUse:
    return ToolUse(
        "mcp__taskrun__create_task",
        {"agent": "echo", "input": {"text": text}, "wait": True},
        id=f"toolu_sub_{n}",
    )


def tool_results(messages: list[Any]) -> list[str]:
    """The text of every tool_result block the CLI sent back, in order."""
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                inner = block.get("content")
                if isinstance(inner, list):
                    inner = "".join(b.get("text", "") for b in inner if isinstance(b, dict))
                out.append(str(inner))
    return out


async def test_a_claude_code_run_creates_sub_tasks_on_another_worker_until_its_budget_stops_it(
    api: FakeAnthropic,  # noqa: F811
    cluster: Cluster,
) -> None:
    api.enqueue(
        Text("First helper.", tool_uses=(create("one", 1),)),
        Text("Second helper.", tool_uses=(create("two", 2),)),
        Text("Third helper.", tool_uses=(create("three", 3),)),
        Text("Two helpers ran; the third was refused."),
    )
    await cluster.start_server(http_listen="127.0.0.1:0")
    await cluster.start_worker("worker-1", agents=["claude_code"])
    await cluster.start_worker("worker-2", agents=["echo"])
    admin = cluster.client()
    parent = await admin.create_task(
        "claude_code",
        {"prompt": "Split the work into sub-tasks."},
        allow_subtasks=True,
        max_subtasks=2,
    )
    final = await admin.wait(parent.id)
    assert final.status is TaskStatus.COMPLETED, final.error
    children, _ = await admin.list_tasks(parent_task_id=parent.id)
    assert sorted(json.loads(c.input)["text"] for c in children) == ["one", "two"]
    for child in children:
        assert child.status is TaskStatus.COMPLETED and child.worker_id == "worker-2"
        assert (child.root_task_id, child.depth) == (parent.id, 1)
    results = tool_results(api.message_requests[-1].messages)
    assert len(results) == 3, results
    first = json.loads(results[0])
    assert first["status"] == "completed" and first["result"] == {"chars": 3, "chunks": 1}
    assert "RESOURCE_EXHAUSTED" in results[2] and "at most 2 sub-tasks" in results[2]
    # the tree as `task get` shows it
    _, _, below = await admin.get_task_tree(parent.id)
    assert {t.id for t in below} == {c.id for c in children}
