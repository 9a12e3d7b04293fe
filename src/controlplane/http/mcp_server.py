"""The MCP server (official `mcp` SDK, streamable HTTP, stateless, JSON answers) at /mcp.

Tools create, get, wait for and cancel tasks, list workers and agents, create schedules, and
start, continue and read conversations (mcp_conversations.py). Besides the generic
`create_task`, each agent an online worker announces is a tool of its own, `run_<agent>`: the
list and the schemas are in mcp_catalog.py, the calls here.

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
from taskrun.controlplane.http.mcp_catalog import (
    AGENT_TOOL_PREFIX,
    DEFAULT_WAIT,
    MAX_WAIT,
    agent_schema,
    announced_agents,
    listed_tools,
    tool_input_schema,
)
from taskrun.controlplane.http.mcp_conversations import (
    CHAT_TOOL_PREFIX,
    ConversationToolFailed,
    ConversationTools,
)
from taskrun.controlplane.http.problems import from_aborted
from taskrun.core import errors
from taskrun.core.access import RUN_PREFIX
from taskrun.core.access import Scope as TokenScope
from taskrun.core.models import AgentSpec
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import schedules_pb2 as spb
from taskrun.v1 import tasks_pb2 as tpb
from taskrun.v1 import workers_pb2 as wpb

log = structlog.get_logger(__name__)


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
        return announced_agents(self.engine.workers.values())

    def tools(self) -> list[mt.Tool]:
        return listed_tools(self.agents())

    def run_tools(self) -> list[mt.Tool]:
        """What a run's credential may use: create its sub-tasks, read, wait for, cancel them."""
        return [
            t for t in self.tools() if t.name in RUN_TOOLS or t.name.startswith(AGENT_TOOL_PREFIX)
        ]

    def input_schema(self, name: str) -> dict[str, Any] | None:
        """The schema of the tool `name`, which the SDK asks for on every call."""
        return tool_input_schema(name, self.engine.workers.values())

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
        follow = tpb.FollowTaskRequest(task_id=task_id, follow=True, outcome_only=True)
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
                    "input_schema": agent_schema(agent),
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
