"""The MCP SDK asks for a tool's input schema on every call: the direct lookup gives what the
listed tool carries, for every tool, whichever order the workers come in."""

from __future__ import annotations

import json
import random

from taskrun.controlplane.http.mcp_catalog import (
    announced_agents,
    listed_tools,
    tool_input_schema,
)
from taskrun.core.ids import WorkerId
from taskrun.core.models import AgentSpec, Worker
from taskrun.core.status import WorkerStatus

CHAT = json.dumps({"type": "object", "properties": {"prompt": {"type": "string"}}})
CLOSED = json.dumps(
    {"type": "object", "properties": {"text": {"type": "string"}}, "additionalProperties": False}
)


def worker(worker_id: str, status: WorkerStatus, *agents: AgentSpec) -> Worker:
    return Worker(id=WorkerId(worker_id), agents=agents, status=status)


WORKERS = [
    # Two workers announce "echo" with different schemas: the first in id order is listed.
    worker("w-b", WorkerStatus.ONLINE, AgentSpec("echo", "b's", input_schema=CHAT)),
    worker("w-a", WorkerStatus.DRAINING, AgentSpec("echo", "a's", input_schema=CLOSED)),
    worker("w-c", WorkerStatus.ONLINE, AgentSpec("claude", input_schema=CHAT), AgentSpec("free")),
    worker("w-0", WorkerStatus.OFFLINE, AgentSpec("echo", "offline"), AgentSpec("gone")),
    worker("w-d", WorkerStatus.ONLINE, AgentSpec("bad", input_schema="{not json")),
]


def test_every_listed_tool_has_its_schema_looked_up_in_any_worker_order() -> None:
    tools = listed_tools(announced_agents(WORKERS))
    names = {tool.name for tool in tools}
    assert {"create_task", "run_echo", "run_claude", "run_free", "run_bad", "chat_claude"} <= names
    assert "run_gone" not in names  # only an offline worker offers it
    rng = random.Random(3)
    for _ in range(5):
        shuffled = rng.sample(WORKERS, len(WORKERS))
        for tool in tools:
            assert tool_input_schema(tool.name, shuffled) == tool.input_schema, tool.name
    echo = tool_input_schema("run_echo", WORKERS)
    assert echo is not None and echo["properties"]["input"]["additionalProperties"] is False


def test_a_tool_nobody_offers_has_no_schema() -> None:
    for name in ("run_gone", "run_nope", "chat_nope", "chat_echo_x", "nope", ""):
        assert tool_input_schema(name, WORKERS) is None, name
    assert tool_input_schema("run_echo", []) is None
    assert tool_input_schema("create_task", []) is not None
