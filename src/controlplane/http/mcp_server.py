"""The MCP server (official `mcp` SDK, streamable HTTP, stateless, JSON answers) at /mcp.

Tools create, get, wait for and cancel tasks, list workers and agents, create schedules, and
start, continue and read conversations (mcp_conversations.py).
Besides the generic `create_task`, each agent an online worker announces is a tool of its own,
`run_<agent>`, whose description and `input` schema are the agent's announced ones.

Every tool calls the same gRPC servicer method as the HTTP API, with the caller's bearer token
from the HTTP request, so the token's scopes bind here exactly as there. A request without a
valid token never reaches the SDK (401/403 problem details).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import mcp.types as mt
import structlog
from google.protobuf import json_format
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from taskrun.controlplane.auth import RUN_CREDENTIAL_LIMIT
from taskrun.controlplane.http.api import Servicers, context_of, to_json
from taskrun.controlplane.http.context import Aborted, HttpCallContext
from taskrun.controlplane.http.mcp_conversations import (
    CHAT_TOOL_PREFIX,
    ConversationToolFailed,
    ConversationTools,
    conversation_tools,
)
from taskrun.controlplane.http.problems import from_aborted
from taskrun.core import errors
from taskrun.core.access import RUN_PREFIX
from taskrun.core.access import Scope as TokenScope
from taskrun.core.models import AgentSpec
from taskrun.core.status import WorkerStatus
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import schedules_pb2 as spb
from taskrun.v1 import tasks_pb2 as tpb
from taskrun.v1 import workers_pb2 as wpb

log = structlog.get_logger(__name__)

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


class ToolFailed(Exception):
    """A tool call that fails with a message for the caller (never a traceback)."""


def task_summary(task: pb.Task) -> dict[str, Any]:
    """What an agent needs to know of a task: status, result, error, cost and usage."""
    summary: dict[str, Any] = {
        "task_id": task.id,
        "agent": task.agent,
        "status": pb.TaskStatus.Name(task.status).removeprefix("TASK_STATUS_").lower(),
        "labels": dict(task.labels),
        "attempts": task.attempts,
        "worker_id": task.worker_id,
        "cost_usd": task.usage.cost_usd,
        "usage": to_json(task.usage),
    }
    if task.parent_task_id:
        summary["parent_task_id"] = task.parent_task_id
        summary["depth"] = task.depth
    if task.result_json:
        summary["result"] = json.loads(task.result_json)
    if task.error:
        summary["error"] = task.error
    if task.runs:
        summary["runs"] = [
            {
                "run_id": r.id,
                "attempt": r.attempt,
                "worker_id": r.worker_id,
                "status": pb.RunStatus.Name(r.status).removeprefix("RUN_STATUS_").lower(),
                "cost_usd": r.usage.cost_usd,
                **({"error": r.error} if r.error else {}),
            }
            for r in task.runs
        ]
    if task.earlier_runs:  # the runs did not all fit one reply: these are the latest
        summary["earlier_runs"] = task.earlier_runs
    return summary


def _agent_schema(agent: AgentSpec) -> dict[str, Any]:
    if not agent.input_schema:
        return {"type": "object"}
    try:
        schema = json.loads(agent.input_schema)
    except ValueError:
        return {"type": "object"}
    return schema if isinstance(schema, dict) else {"type": "object"}


def _text(arguments: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = arguments.get(name, "")
    if not isinstance(value, str) or (required and not value):
        raise ToolFailed(f"{name}: must be a non-empty string")
    return value


def _labels(arguments: dict[str, Any]) -> dict[str, str]:
    labels = arguments.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ToolFailed("labels: must be an object of string values")
    return labels


def _input(arguments: dict[str, Any]) -> str:
    value = arguments.get("input", {})
    if not isinstance(value, dict):
        raise ToolFailed("input: must be a JSON object")
    return json.dumps(value)


def _model_options(arguments: dict[str, Any], policy: pb.TaskPolicy) -> None:
    """output_schema, model_settings and max_cost_usd into the policy (the service validates
    them as for any submission)."""
    schema = arguments.get("output_schema")
    if schema is not None:
        if not isinstance(schema, dict):
            raise ToolFailed("output_schema: must be a JSON Schema object")
        policy.output_schema_json = json.dumps(schema)
    settings = arguments.get("model_settings")
    if settings is not None:
        if not isinstance(settings, dict):
            raise ToolFailed("model_settings: must be an object")
        try:
            json_format.ParseDict(settings, policy.model_settings)
        except json_format.ParseError as exc:
            raise ToolFailed(f"model_settings: {exc}") from None
    cost = arguments.get("max_cost_usd")
    if cost is not None:
        if isinstance(cost, bool) or not isinstance(cost, int | float):
            raise ToolFailed("max_cost_usd: must be a number of US dollars")
        policy.max_cost_usd = float(cost)


def _wait_seconds(arguments: dict[str, Any]) -> float:
    value = arguments.get("wait_seconds", DEFAULT_WAIT)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_WAIT:
        raise ToolFailed(f"wait_seconds: must be a number from 0 to {MAX_WAIT:.0f}")
    return float(value)


class McpTools:
    """The tools, bound to the servicers; one call context per HTTP request."""

    def __init__(self, servicers: Servicers) -> None:
        self.servicers = servicers
        self.engine = servicers.tasks.engine
        self.conversations = ConversationTools(servicers, self._wait)

    # --- listing -----------------------------------------------------------------------------

    def agents(self) -> dict[str, AgentSpec]:
        """Agents announced by online (or draining) workers, by name (first announcement)."""
        out: dict[str, AgentSpec] = {}
        for worker in sorted(self.engine.workers.values(), key=lambda w: w.id):
            if worker.status in (WorkerStatus.ONLINE, WorkerStatus.DRAINING):
                for agent in worker.agents:
                    out.setdefault(agent.name, agent)
        return out

    def tools(self) -> list[mt.Tool]:
        tools = list(STATIC_TOOLS)
        agents = self.agents()
        tools.extend(conversation_tools(agents, _LABELS, _WAIT, _WAIT_SECONDS))
        for name, agent in sorted(agents.items()):
            tools.append(
                mt.Tool(
                    name=f"{AGENT_TOOL_PREFIX}{name}",
                    description=f"Run the agent {name!r} as a task: "
                    f"{agent.description or 'no description announced'}",
                    input_schema={
                        "type": "object",
                        "properties": {
                            "input": _agent_schema(agent),
                            "labels": _LABELS,
                            "wait": _WAIT,
                            "wait_seconds": _WAIT_SECONDS,
                            "allow_subtasks": _ALLOW_SUBTASKS,
                        },
                        "required": ["input"],
                    },
                )
            )
        return tools

    def run_tools(self) -> list[mt.Tool]:
        """What a run's credential may use: create its sub-tasks, read, wait for, cancel them."""
        return [
            t for t in self.tools() if t.name in RUN_TOOLS or t.name.startswith(AGENT_TOOL_PREFIX)
        ]

    def input_schema(self, name: str) -> dict[str, Any] | None:
        for tool in self.tools():
            if tool.name == name:
                return tool.input_schema
        return None

    # --- calls -------------------------------------------------------------------------------

    async def call(
        self, name: str, arguments: dict[str, Any], context: HttpCallContext
    ) -> dict[str, Any]:
        if _is_run(context) and not (name in RUN_TOOLS or name.startswith(AGENT_TOOL_PREFIX)):
            raise ToolFailed(f"PERMISSION_DENIED: {RUN_CREDENTIAL_LIMIT} ({name} is not one)")
        handlers: dict[
            str, Callable[[dict[str, Any], HttpCallContext], Awaitable[dict[str, Any]]]
        ] = {
            "create_task": self._create_task,
            "get_task": self._get_task,
            "wait_for_task": self._wait_for_task,
            "cancel_task": self._cancel_task,
            "list_workers": self._list_workers,
            "list_agents": self._list_agents,
            "create_schedule": self._create_schedule,
            "start_conversation": self._start_conversation,
            "send_message": self._send_message,
            "get_conversation": self.conversations.get,
        }
        if name in handlers:
            result: dict[str, Any] = await handlers[name](arguments, context)
            return result
        if name.startswith(CHAT_TOOL_PREFIX):
            agent = name.removeprefix(CHAT_TOOL_PREFIX)
            return await self._start_conversation({**arguments, "agent": agent}, context)
        if name.startswith(AGENT_TOOL_PREFIX):
            agent = name.removeprefix(AGENT_TOOL_PREFIX)
            return await self._create_task({**arguments, "agent": agent}, context)
        raise ToolFailed(f"no tool {name!r}")

    async def _create_task(
        self, arguments: dict[str, Any], context: HttpCallContext
    ) -> dict[str, Any]:
        request = tpb.CreateTaskRequest(
            agent=_text(arguments, "agent"), input_json=_input(arguments), labels=_labels(arguments)
        )
        allow = arguments.get("allow_subtasks", False)
        if not isinstance(allow, bool):
            raise ToolFailed("allow_subtasks: must be true or false")
        request.policy.allow_subtasks = allow
        _model_options(arguments, request.policy)
        wait = arguments.get("wait", False)
        if not isinstance(wait, bool):
            raise ToolFailed("wait: must be true or false")
        seconds = _wait_seconds(arguments)
        created = await self.servicers.tasks.CreateTask(request, context)
        if not wait:
            return task_summary(created.task)
        return await self._wait(created.task.id, seconds, context)

    async def _start_conversation(
        self, arguments: dict[str, Any], context: HttpCallContext
    ) -> dict[str, Any]:
        seconds = _wait_seconds(arguments)
        return await self.conversations.start(arguments, context, _labels(arguments), seconds)

    async def _send_message(
        self, arguments: dict[str, Any], context: HttpCallContext
    ) -> dict[str, Any]:
        return await self.conversations.send(arguments, context, _wait_seconds(arguments))

    async def _get_task(
        self, arguments: dict[str, Any], context: HttpCallContext
    ) -> dict[str, Any]:
        request = tpb.GetTaskRequest(task_id=_text(arguments, "task_id"))
        return task_summary(await self.servicers.tasks.GetTask(request, context))

    async def _wait_for_task(
        self, arguments: dict[str, Any], context: HttpCallContext
    ) -> dict[str, Any]:
        return await self._wait(_text(arguments, "task_id"), _wait_seconds(arguments), context)

    async def _wait(self, task_id: str, seconds: float, context: HttpCallContext) -> dict[str, Any]:
        """Follow the task (the servicer's FollowTask) until it ends, then read it whole."""
        follow = tpb.FollowTaskRequest(task_id=task_id, follow=True)
        updates = self.servicers.tasks.FollowTask(follow, context)
        ended = False
        try:
            async with asyncio.timeout(seconds):
                async for update in updates:
                    if update.HasField("task") and update.task.status in _TERMINAL:
                        ended = True
        except TimeoutError:
            pass
        finally:
            await updates.aclose()  # type: ignore[attr-defined]
        summary = await self._get_task({"task_id": task_id}, context)
        if not ended:
            summary["waited"] = f"still {summary['status']} after {seconds:g}s"
        return summary

    async def _cancel_task(
        self, arguments: dict[str, Any], context: HttpCallContext
    ) -> dict[str, Any]:
        reason = _text(arguments, "reason", required=False) if "reason" in arguments else ""
        request = tpb.CancelTaskRequest(task_id=_text(arguments, "task_id"), reason=reason)
        return task_summary(await self.servicers.tasks.CancelTask(request, context))

    async def _list_workers(
        self, arguments: dict[str, Any], context: HttpCallContext
    ) -> dict[str, Any]:
        reply = await self.servicers.workers.ListWorkers(wpb.ListWorkersRequest(), context)
        return {
            "workers": [
                {
                    "worker_id": w.id,
                    "status": pb.WorkerStatus.Name(w.status).removeprefix("WORKER_STATUS_").lower(),
                    "labels": dict(w.labels),
                    "active_runs": w.active_runs,
                    "max_concurrent_runs": w.max_concurrent_runs,
                    "agents": [a.name for a in w.agents],
                }
                for w in reply.workers
            ]
        }

    async def _list_agents(
        self, arguments: dict[str, Any], context: HttpCallContext
    ) -> dict[str, Any]:
        await self.servicers.workers.ListWorkers(wpb.ListWorkersRequest(), context)  # auth
        return {
            "agents": [
                {
                    "name": name,
                    "description": agent.description,
                    "input_schema": _agent_schema(agent),
                    "tool": f"{AGENT_TOOL_PREFIX}{name}",
                }
                for name, agent in sorted(self.agents().items())
            ]
        }

    async def _create_schedule(
        self, arguments: dict[str, Any], context: HttpCallContext
    ) -> dict[str, Any]:
        schedule = spb.Schedule(
            name=_text(arguments, "name"),
            agent=_text(arguments, "agent"),
            input_json=_input(arguments),
            labels=_labels(arguments),
            cron=_text(arguments, "cron", required=False),
            rrule=_text(arguments, "rrule", required=False),
            timezone=_text(arguments, "timezone"),
        )
        request = spb.CreateScheduleRequest(schedule=schedule)
        created = await self.servicers.schedules.CreateSchedule(request, context)
        return to_json(created)


# the tools a run's credential sees (with run_<agent>): they act on its task's sub-tasks only
RUN_TOOLS = frozenset({"create_task", "get_task", "wait_for_task", "cancel_task"})


def _is_run(context: HttpCallContext) -> bool:
    for key, value in context.invocation_metadata():
        if key == "authorization":
            return value.partition(" ")[2].strip().startswith(RUN_PREFIX)
    return False


_TERMINAL = {pb.TASK_STATUS_COMPLETED, pb.TASK_STATUS_FAILED, pb.TASK_STATUS_CANCELLED}


def _result(value: dict[str, Any]) -> mt.CallToolResult:
    return mt.CallToolResult(
        content=[mt.TextContent(type="text", text=json.dumps(value))], structured_content=value
    )


def _failure(text: str) -> mt.CallToolResult:
    return mt.CallToolResult(content=[mt.TextContent(type="text", text=text)], is_error=True)


class McpEndpoint:
    """The MCP server and its streamable HTTP transport, behind the bearer-token gate."""

    def __init__(self, servicers: Servicers) -> None:
        self.tools = McpTools(servicers)
        self.auth = servicers.tasks.auth
        self.server: Server[Any] = Server(
            "taskrun",
            instructions="Run TaskRun agents on remote workers: create tasks, wait for their "
            "results and cost, cancel them, and schedule recurring ones.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            get_tool_input_schema=self.tools.input_schema,
        )
        # Bearer tokens, not cookies, authenticate every request, so DNS rebinding gains a
        # browser nothing: Host and Origin are not restricted (the control plane may be
        # reached by any name its certificate holds).
        self.sessions = StreamableHTTPSessionManager(
            self.server,
            json_response=True,
            stateless=True,
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.sessions.run():
            yield

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: mt.PaginatedRequestParams | None
    ) -> mt.ListToolsResult:
        request = ctx.request
        if isinstance(request, Request) and _is_run(context_of(request)):
            return mt.ListToolsResult(tools=self.tools.run_tools())
        return mt.ListToolsResult(tools=self.tools.tools())

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: mt.CallToolRequestParams
    ) -> mt.CallToolResult:
        request = ctx.request
        if not isinstance(request, Request):
            return _failure("this server answers tool calls over HTTP only")
        context = context_of(request)
        try:
            return _result(await self.tools.call(params.name, params.arguments or {}, context))
        except Aborted as exc:
            return _failure(f"{exc.code.name}: {exc.message}")
        except errors.TaskRunError as exc:
            return _failure(str(exc))
        except (ToolFailed, ConversationToolFailed) as exc:
            return _failure(str(exc))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app at /mcp: refuse a missing or bad token before the SDK sees anything."""
        if scope["type"] == "http":
            try:
                await self.auth.operator(context_of(Request(scope)), TokenScope.READ, runs=True)
            except Aborted as exc:
                await from_aborted(exc)(scope, receive, send)
                return
        await self.sessions.handle_request(scope, receive, send)
