"""The HTTP API as a Starlette application: unary endpoints from the table in `endpoints`,
server-sent event streams for a task and for the event hub, health and the OpenAPI document."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from taskrun import convert
from taskrun.controlplane.conversation_service import ConversationService
from taskrun.controlplane.event_service import EventService, watch_filter
from taskrun.controlplane.http.context import Aborted, HttpCallContext
from taskrun.controlplane.http.endpoints import ENDPOINTS, Endpoint, Query
from taskrun.controlplane.http.middleware import StatusTap
from taskrun.controlplane.http.problems import from_aborted, problem, sse_error
from taskrun.controlplane.schedule_service import ScheduleService
from taskrun.controlplane.services import TaskService
from taskrun.controlplane.webhook_service import WebhookService
from taskrun.controlplane.worker_service import WorkerService
from taskrun.controlplane.workflows.service import WorkflowService
from taskrun.core import errors
from taskrun.core.access import Scope
from taskrun.v1 import conversations_pb2 as cpb
from taskrun.v1 import events_pb2 as epb
from taskrun.v1 import tasks_pb2 as tpb

log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BODY = 8 * 1024 * 1024
MAX_CURSOR = 16 * 1024
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


to_json = convert.to_json_dict


def _dumps(message: Message) -> str:
    return json.dumps(to_json(message), separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Servicers:
    """The gRPC servicers whose methods the HTTP API calls."""

    tasks: TaskService
    conversations: ConversationService
    workers: WorkerService
    schedules: ScheduleService
    events: EventService
    webhooks: WebhookService
    workflows: WorkflowService


class BadRequest(Exception):
    def __init__(self, detail: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(detail)
        self.detail, self.field, self.status = detail, field, status


def _peer(request: Request) -> str:
    client = request.client
    return f"ipv4:{client.host}:{client.port}" if client else "http"


def context_of(request: Request) -> HttpCallContext:
    return HttpCallContext(request.headers, _peer(request))


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object in the body (an empty body is `{}`); 413 past `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the body is {declared} bytes, at most {limit}", status=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the body is over the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}", field="body") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object", field="body")
    return value


def _parse_error_field(text: str) -> str | None:
    """The field json_format names in its message ("policy.priority"), if it does."""
    nested = re.findall(r"Failed to parse (\w+) field", text)
    unknown = re.search(r'has no field named "(\w+)"', text)
    path = [*nested, unknown.group(1)] if unknown else nested
    return ".".join(path) or None


def parse_message(value: dict[str, Any], message: Message) -> None:
    try:
        convert.parse_json_dict(value, message)
    except json_format.ParseError as exc:
        text = str(exc)
        raise BadRequest(text, field=_parse_error_field(text)) from None


def _query_value(param: Query, raw: str) -> object:
    if param.enum_prefix and not raw.upper().startswith(param.enum_prefix):
        return param.enum_prefix + raw.upper()
    return raw


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _boolean(value: str, name: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BadRequest(f"{value!r} is not true or false", field=name)


def query_dict(
    request: Request, params: Sequence[Query], message: Message | None = None
) -> dict[str, Any]:
    """The query string as the JSON mapping of `message` (booleans read from true/false)."""
    fields = message.DESCRIPTOR.fields_by_name if message is not None else {}
    known = {p.name for p in params}
    for name in request.query_params:
        if name not in known:
            raise BadRequest(
                f"unknown query parameter {name!r} (known: {', '.join(sorted(known)) or 'none'})",
                field=name,
            )
    out: dict[str, Any] = {}
    for param in params:
        values = request.query_params.getlist(param.name)
        if not values:
            continue
        if param.pairs:
            pairs: dict[str, str] = {}
            for item in values:
                key, sep, val = item.partition("=")
                if not sep or not key:
                    raise BadRequest(f"{item!r} is not key=value", field=param.name)
                pairs[key] = val
            out[param.field] = pairs
        elif param.repeated:
            out[param.field] = [_query_value(param, v) for v in values]
        else:
            if len(values) > 1:
                raise BadRequest("may be given once", field=param.name)
            field = fields.get(param.field)
            if field is not None and field.type == field.TYPE_BOOL:
                out[param.field] = _boolean(values[0], param.name)
            else:
                out[param.field] = _query_value(param, values[0])
    return out


def _set_path(message: Message, path: str, value: str) -> None:
    *parents, last = path.split(".")
    target = message
    for name in parents:
        target = getattr(target, name)
    setattr(target, last, value)


# the task calls a run's credential may make (the servicers limit them to its sub-tasks)
RUN_RPCS = frozenset({"CreateTask", "CreateTasks", "GetTask", "CancelTask", "FollowTask"})


class HttpApi:
    """Builds the Starlette application around the servicers and the authenticator."""

    def __init__(
        self,
        servicers: Servicers,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        openapi: dict[str, Any] | None = None,
        answered: Callable[[int], None] | None = None,
    ) -> None:
        self.servicers = servicers
        self.answered = answered  # told each answer's HTTP status before it is sent
        self.auth = servicers.tasks.auth
        self.max_body_bytes = max_body_bytes
        self.openapi = openapi
        self.closing = asyncio.Event()  # set when the server stops: open streams end

    async def _authorize(self, request: Request, scope: Scope, rpc: str = "") -> None:
        """Refuse a missing, bad or too weak token before the body is even read (401/403). A
        run's credential passes only to the calls that scope it to its task's sub-tasks."""
        await self.auth.operator(context_of(request), scope, runs=rpc in RUN_RPCS)

    def _rpc(self, endpoint: Endpoint) -> Callable[[Message, HttpCallContext], Awaitable[Message]]:
        servicer = getattr(self.servicers, endpoint.service)
        method: Callable[[Message, HttpCallContext], Awaitable[Message]] = getattr(
            servicer, endpoint.rpc
        )
        return method

    def _unary(self, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        call = self._rpc(endpoint)

        async def handle(request: Request) -> Response:
            async def run() -> Response:
                await self._authorize(request, endpoint.scope, endpoint.rpc)
                message = endpoint.request()
                values = query_dict(request, endpoint.query, message)
                if endpoint.body:
                    values.update(await read_json(request, self.max_body_bytes))
                parse_message(values, message)
                for param, path in endpoint.path_fields:
                    _set_path(message, path, request.path_params[param])
                reply = await call(message, context_of(request))
                status = 200
                if endpoint.created_status and getattr(reply, "created", False):
                    status = 201
                return JSONResponse(to_json(reply), status_code=status)

            return await guarded(run, endpoint.rpc)

        return handle

    # --- server-sent events ------------------------------------------------------------------

    async def follow_task(self, request: Request) -> Response:
        """Stored output, then live output and status changes until the task ends. Each event's
        id is a cursor (the last sequence number seen per run); a client that reconnects with
        `Last-Event-ID` gets only what came after it."""

        async def run() -> Response:
            await self._authorize(request, Scope.READ, "FollowTask")
            follow = tpb.FollowTaskRequest(task_id=request.path_params["task_id"], follow=True)
            values = query_dict(
                request,
                (
                    Query("include_events", "include_events", "also structured events"),
                    Query("last_event_id", "last_event_id", "resume after this event id"),
                ),
                follow,
            )
            in_query = values.pop("last_event_id", "")
            raw_cursor = request.headers.get("last-event-id") or in_query
            cursor = decode_cursor(str(raw_cursor))
            parse_message(values, follow)
            context = context_of(request)
            # the first update (the task and its stored output) arrives at once: an unknown
            # task or a refusal is an HTTP error, not an event
            updates = self.servicers.tasks.FollowTask(follow, context)
            first = await anext(updates)
            return StreamingResponse(
                _task_events(first, updates, cursor, self.closing),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )

        return await guarded(run, "FollowTask")

    async def task_output(self, request: Request) -> Response:
        """The stored output of every run of a task, as one TaskUpdate (the task and chunks)."""

        async def run() -> Response:
            await self._authorize(request, Scope.READ)
            follow = tpb.FollowTaskRequest(task_id=request.path_params["task_id"], follow=False)
            values = query_dict(
                request,
                (Query("include_events", "include_events", "also structured events"),),
                follow,
            )
            parse_message(values, follow)
            merged = tpb.TaskUpdate()
            async for update in self.servicers.tasks.FollowTask(follow, context_of(request)):
                if update.HasField("task"):
                    merged.task.CopyFrom(update.task)
                merged.chunks.extend(update.chunks)
            return JSONResponse(to_json(merged))

        return await guarded(run, "TaskOutput")

    async def events(self, request: Request) -> Response:
        """Every committed change as a server-sent event (`taskrun events` over HTTP)."""

        async def run() -> Response:
            await self._authorize(request, Scope.READ)
            watch = epb.WatchEventsRequest()
            values = query_dict(
                request,
                (
                    Query("task_id", "task_id", ""),
                    Query("worker_id", "worker_id", ""),
                    Query("kind", "kinds", "", repeated=True, enum_prefix="EVENT_KIND_"),
                    Query("include_output", "include_output", ""),
                    Query("snapshot", "snapshot", ""),
                    Query("after_position", "after_position", "resume after this position"),
                ),
                watch,
            )
            parse_message(values, watch)
            resume = request.headers.get("last-event-id", "")  # an EventSource reconnecting
            if resume:
                if not resume.isdigit():
                    raise BadRequest(
                        "is not a position of the event log (a whole number)",
                        field="Last-Event-ID",
                    )
                watch.after_position = int(resume)
            try:
                watch_filter(watch)
            except errors.InvalidArgument as exc:
                raise BadRequest(exc.message, field=exc.field) from None
            stream = self.servicers.events.WatchEvents(watch, context_of(request))
            return StreamingResponse(
                _hub_events(stream, self.closing),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )

        return await guarded(run, "WatchEvents")

    async def send_message(self, request: Request) -> Response:
        """The next message of a conversation, answered as server-sent events: `turn` (the new
        turn), `update`s of its task (TaskUpdate: output and status), `turn` again as it ended."""

        async def run() -> Response:
            await self._authorize(request, Scope.SUBMIT)
            send = cpb.SendMessageRequest()
            parse_message(await read_json(request, self.max_body_bytes), send)
            send.conversation_id = request.path_params["conversation_id"]
            events = self.servicers.conversations.SendMessage(send, context_of(request))
            # the new turn arrives at once: a refusal is an HTTP problem, not an event
            first = await anext(events)
            return StreamingResponse(
                _conversation_events(first, events, self.closing),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )

        return await guarded(run, "SendMessage")

    # --- the application ---------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/v1/healthz", _health, methods=["GET"]),
            Route("/v1/openapi.json", self._openapi, methods=["GET"]),
            Route("/v1/tasks/{task_id}/follow", self.follow_task, methods=["GET"]),
            Route("/v1/tasks/{task_id}/output", self.task_output, methods=["GET"]),
            Route("/v1/events", self.events, methods=["GET"]),
            Route(
                "/v1/conversations/{conversation_id}/messages",
                self.send_message,
                methods=["POST"],
            ),
        ]
        by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
        for endpoint in ENDPOINTS:
            by_path.setdefault(endpoint.path, {})[endpoint.method] = self._unary(endpoint)
        for path, handlers in by_path.items():
            routes.append(Route(path, _dispatch(handlers), methods=list(handlers)))
        return routes

    async def _openapi(self, request: Request) -> Response:
        return JSONResponse(self.openapi or {})

    def app(
        self,
        apps: Sequence[tuple[str, ASGIApp]] = (),
        lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
    ) -> Starlette:
        """The application; `apps` are ASGI apps served at exact paths (all methods)."""
        routes = self.routes() + [Route(path, endpoint=app) for path, app in apps]
        app = Starlette(
            routes=routes,
            lifespan=lifespan,
            exception_handlers={404: _not_found, 405: _not_allowed, Exception: _internal},
        )
        if self.answered is not None:
            app.add_middleware(StatusTap, answered=self.answered)
        return app


def _dispatch(
    handlers: dict[str, Callable[[Request], Awaitable[Response]]],
) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        return await handlers[request.method](request)

    return handle


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "SERVING"})


async def _not_found(request: Request, exc: Exception) -> Response:
    return problem(404, f"no endpoint {request.method} {request.url.path}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return problem(405, f"{request.method} is not allowed on {request.url.path}")


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("http request failed", path=request.url.path, error=str(exc) or type(exc).__name__)
    return problem(500, "the control plane failed to answer this request; it has been logged")


async def guarded(run: Callable[[], Awaitable[Response]], what: str) -> Response:
    """Run a handler; every failure becomes problem details, never a traceback."""
    try:
        return await run()
    except Aborted as exc:
        return from_aborted(exc)
    except BadRequest as exc:
        return problem(exc.status, exc.detail, field=exc.field, code="INVALID_ARGUMENT")
    except (sqlite3.Error, OSError, ConnectionError) as exc:
        log.error("http request failed: store or network unavailable", rpc=what, error=str(exc))
        return problem(503, "the control plane could not complete the request; try again")
    except StopAsyncIteration:
        return problem(503, "the stream ended before its first message; try again")


# --- event streams ---------------------------------------------------------------------------


def encode_cursor(seen: dict[str, int]) -> str:
    text = ",".join(f"{run}:{seq}" for run, seq in sorted(seen.items()))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(value: str) -> dict[str, int]:
    """The cursor of a Last-Event-ID (400 naming `Last-Event-ID` when it is not one)."""
    if not value:
        return {}
    if len(value) > MAX_CURSOR:
        raise BadRequest("is too long to be an event id", field="Last-Event-ID")
    try:
        padded = value + "=" * (-len(value) % 4)
        text = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
        if not text:
            raise ValueError(value)
        out: dict[str, int] = {}
        for item in filter(None, text.split(",")):
            run, _, seq = item.rpartition(":")
            if not run or not seq.isdigit():
                raise ValueError(item)
            out[run] = int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("is not an event id sent by this stream", field="Last-Event-ID") from None
    return out


class Closing(Exception):
    """The server is shutting down: the stream ends with a 503 error event."""


KEEPALIVE = 15.0  # seconds without an event before a comment line keeps the stream open


async def _relay(source: AsyncIterator[T], closing: asyncio.Event) -> AsyncIterator[T | None]:
    """The items of `source`, None after KEEPALIVE seconds without one (a tick to send a
    comment: proxies keep the connection, dead clients are noticed), until `closing` is set."""
    stop = asyncio.ensure_future(closing.wait())
    step: asyncio.Future[T] | None = None
    try:
        while True:
            if step is None:
                step = asyncio.ensure_future(anext(source))
            waiting: set[asyncio.Future[Any]] = {step, stop}
            done, _ = await asyncio.wait(
                waiting, timeout=KEEPALIVE, return_when=asyncio.FIRST_COMPLETED
            )
            if step in done:
                finished, step = step, None
                try:
                    item = finished.result()
                except StopAsyncIteration:
                    return
                yield item
            elif stop in done:
                raise Closing
            else:
                yield None
    finally:
        stop.cancel()
        if step is not None:
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Aborted):
                await step


_CLOSING = Aborted(grpc.StatusCode.UNAVAILABLE, "the control plane is shutting down; reconnect")


async def _task_events(
    first: tpb.TaskUpdate,
    updates: AsyncIterator[tpb.TaskUpdate],
    cursor: dict[str, int],
    closing: asyncio.Event,
) -> AsyncIterator[str]:
    seen = dict(cursor)

    def event(update: tpb.TaskUpdate) -> str | None:
        fresh = [c for c in update.chunks if c.seq > seen.get(c.run_id, 0)]
        for chunk in fresh:
            seen[chunk.run_id] = chunk.seq
        if not fresh and not update.HasField("task"):
            return None
        out = tpb.TaskUpdate(chunks=fresh)
        if update.HasField("task"):
            out.task.CopyFrom(update.task)
        return f"id: {encode_cursor(seen)}\nevent: update\ndata: {_dumps(out)}\n\n"

    try:
        text = event(first)
        if text:
            yield text
        async for update in _relay(updates, closing):
            text = event(update) if update is not None else ": keepalive\n\n"
            if text:
                yield text
        yield "event: end\ndata: {}\n\n"
    except Aborted as exc:
        yield sse_error(exc)
    except Closing:
        yield sse_error(_CLOSING)
    finally:
        await updates.aclose()  # type: ignore[attr-defined]


async def _hub_events(
    stream: AsyncIterator[epb.Event], closing: asyncio.Event
) -> AsyncIterator[str]:
    try:
        yield ": connected\n\n"
        async for item in _relay(stream, closing):
            if item is None:
                yield ": keepalive\n\n"
            else:
                # the id is the event log's position: a reconnecting EventSource sends it back
                # as Last-Event-ID and the stream resumes after it
                ident = f"id: {item.position}\n" if item.position else ""
                yield f"{ident}event: {epb.EventKind.Name(item.kind)}\ndata: {_dumps(item)}\n\n"
    except Aborted as exc:
        yield sse_error(exc)
    except Closing:
        yield sse_error(_CLOSING)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def _conversation_event(item: cpb.ConversationEvent) -> str:
    kind = "turn" if item.HasField("turn") else "update"
    body = item.turn if item.HasField("turn") else item.update
    return f"event: {kind}\ndata: {_dumps(body)}\n\n"


async def _conversation_events(
    first: cpb.ConversationEvent,
    stream: AsyncIterator[cpb.ConversationEvent],
    closing: asyncio.Event,
) -> AsyncIterator[str]:
    try:
        yield _conversation_event(first)
        async for item in _relay(stream, closing):
            yield ": keepalive\n\n" if item is None else _conversation_event(item)
        yield "event: end\ndata: {}\n\n"
    except Aborted as exc:
        yield sse_error(exc)
    except Closing:
        yield sse_error(_CLOSING)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
