"""What the MCP server offers: its tools and their input schemas.

The fixed tools (tasks, workers, agents, schedules), the conversation tools (mcp_conversations.py)
and a `run_<agent>` tool per agent an online worker announces, whose description and `input`
schema are the agent's announced ones. The list follows the workers connected at the moment it
is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import mcp.types as mt

from taskrun.controlplane.http.mcp_conversations import conversation_tools
from taskrun.core.ids import WorkerId
from taskrun.core.models import AgentSpec, Worker
from taskrun.core.status import WorkerStatus

AGENT_TOOL_PREFIX = "run_"
DEFAULT_WAIT = 300.0
MAX_WAIT = 3600.0

_LABELS = {
    "type": "object",
    "additionalProperties": {"type": "string"},
    "description": "labels of the task (key: value)",
}
_WAIT = {
    "type": "boolean",
    "default": False,
    "description": "wait until the task ends and return its result and cost",
}
_WAIT_SECONDS = {
    "type": "number",
    "minimum": 0,
    "maximum": MAX_WAIT,
    "default": DEFAULT_WAIT,
    "description": "how long to wait at most (seconds); the task goes on after that",
}
_TASK_ID = {"type": "string", "description": "the task id (from create_task)"}
_ALLOW_SUBTASKS = {
    "type": "boolean",
    "default": False,
    "description": "let the task's agent create sub-tasks of its own (through this server)",
}

STATIC_TOOLS: tuple[mt.Tool, ...] = (
    mt.Tool(
        name="create_task",
        description="Create a task: run an agent on a worker with a JSON input. With wait, "
        "return when it ends, with its result and cost. Agents and their input schemas: "
        "list_agents (or call run_<agent> directly).",
        input_schema={
            "type": "object",
            "properties": {
                "agent": {"type": "string", "description": "the agent's name"},
                "input": {"type": "object", "description": "the agent's input"},
                "labels": _LABELS,
                "output_schema": {
                    "type": "object",
                    "description": "a JSON Schema the result must match (the model is asked "
                    "for it, and asked again with what did not validate)",
                },
                "model_settings": {
                    "type": "object",
                    "description": "system_prompt, max_tokens, temperature, stop_sequences; "
                    "for claude_code also append_system_prompt, env, mcp_servers_json, "
                    "allowed_tools, disallowed_tools",
                },
                "max_cost_usd": {
                    "type": "number",
                    "minimum": 0,
                    "description": "the worker stops the run once it has cost more (USD)",
                },
                "wait": _WAIT,
                "wait_seconds": _WAIT_SECONDS,
                "allow_subtasks": _ALLOW_SUBTASKS,
            },
            "required": ["agent"],
        },
    ),
    mt.Tool(
        name="get_task",
        description="A task: status, result, error, cost (USD) and token usage, and its runs.",
        input_schema={
            "type": "object",
            "properties": {"task_id": _TASK_ID},
            "required": ["task_id"],
        },
    ),
    mt.Tool(
        name="wait_for_task",
        description="Wait until a task ends (or wait_seconds pass); return it with its result "
        "and cost.",
        input_schema={
            "type": "object",
            "properties": {"task_id": _TASK_ID, "wait_seconds": _WAIT_SECONDS},
            "required": ["task_id"],
        },
    ),
    mt.Tool(
        name="cancel_task",
        description="Cancel a pending or running task; its agent is stopped.",
        input_schema={
            "type": "object",
            "properties": {"task_id": _TASK_ID, "reason": {"type": "string"}},
            "required": ["task_id"],
        },
    ),
    mt.Tool(
        name="list_workers",
        description="Workers: status, labels, load and the agents each offers.",
        input_schema={"type": "object", "properties": {}},
    ),
    mt.Tool(
        name="list_agents",
        description="Agents announced by online workers, with their descriptions and JSON "
        "input schemas.",
        input_schema={"type": "object", "properties": {}},
    ),
    mt.Tool(
        name="create_schedule",
        description="Create a schedule that creates a task at each occurrence of a cron "
        "expression or an RFC 5545 RRULE, read in an IANA time zone.",
        input_schema={
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "lower case, digits, _ or -"},
                "agent": {"type": "string"},
                "input": {"type": "object"},
                "cron": {"type": "string", "description": 'e.g. "30 8 * * MON-FRI"'},
                "rrule": {"type": "string", "description": 'e.g. "FREQ=WEEKLY;BYDAY=FR"'},
                "timezone": {"type": "string", "description": 'e.g. "Europe/Chisinau"'},
                "labels": _LABELS,
            },
            "required": ["name", "agent", "timezone"],
        },
    ),
)
_STATIC_SCHEMAS: dict[str, dict[str, Any]] = {t.name: t.input_schema for t in STATIC_TOOLS}
# The workers whose agents the tools offer: online ones, and draining ones (still connected).
_OFFERING = (WorkerStatus.ONLINE, WorkerStatus.DRAINING)


def announced_agents(workers: Iterable[Worker]) -> dict[str, AgentSpec]:
    """Agents announced by online (or draining) workers, by name: the announcement of the
    worker first in id order."""
    out: dict[str, AgentSpec] = {}
    for worker in sorted(workers, key=lambda w: w.id):
        if worker.status in _OFFERING:
            for agent in worker.agents:
                out.setdefault(agent.name, agent)
    return out


def listed_tools(agents: dict[str, AgentSpec]) -> list[mt.Tool]:
    """Every tool, for the agents announced now: the fixed ones, the conversation tools, and a
    run_<agent> tool per agent."""
    tools = list(STATIC_TOOLS)
    tools.extend(conversation_tools(agents, _LABELS, _WAIT, _WAIT_SECONDS))
    tools.extend(_agent_tool(name, agent) for name, agent in sorted(agents.items()))
    return tools


def tool_input_schema(name: str, workers: Iterable[Worker]) -> dict[str, Any] | None:
    """What `listed_tools` gives as the tool's schema, without building every tool: the MCP SDK
    asks for it on every call, and the list sorts every worker and reads every agent's schema.
    A fixed tool's is kept, a run_<agent> tool's is built for that agent alone; only the
    conversation tools, whose schemas name the conversational agents, take the whole list."""
    schema = _STATIC_SCHEMAS.get(name)
    if schema is not None:
        return schema
    if name.startswith(AGENT_TOOL_PREFIX):
        agent_name = name.removeprefix(AGENT_TOOL_PREFIX)
        first: tuple[WorkerId, AgentSpec] | None = None
        for worker in workers:
            if worker.status in _OFFERING and (first is None or worker.id < first[0]):
                for agent in worker.agents:
                    if agent.name == agent_name:
                        first = (worker.id, agent)
                        break
        return None if first is None else _agent_tool(agent_name, first[1]).input_schema
    for tool in conversation_tools(announced_agents(workers), _LABELS, _WAIT, _WAIT_SECONDS):
        if tool.name == name:
            return tool.input_schema
    return None


def _agent_tool(name: str, agent: AgentSpec) -> mt.Tool:
    return mt.Tool(
        name=f"{AGENT_TOOL_PREFIX}{name}",
        description=f"Run the agent {name!r} as a task: "
        f"{agent.description or 'no description announced'}",
        input_schema={
            "type": "object",
            "properties": {
                "input": agent_schema(agent),
                "labels": _LABELS,
                "wait": _WAIT,
                "wait_seconds": _WAIT_SECONDS,
                "allow_subtasks": _ALLOW_SUBTASKS,
            },
            "required": ["input"],
        },
    )


def agent_schema(agent: AgentSpec) -> dict[str, Any]:
    if not agent.input_schema:
        return {"type": "object"}
    try:
        schema = json.loads(agent.input_schema)
    except ValueError:
        return {"type": "object"}
    return schema if isinstance(schema, dict) else {"type": "object"}
