"""`taskrun.Client`: the typed async client of the control plane, shared by the CLI and the TUI.

Protobuf stays inside this module: every method takes and returns core models. Errors from the
server are raised as `grpc.aio.AioRpcError` (its `code()` is the gRPC status, `details()` names
the offending field).

    async with Client.from_env() as client:
        task = await client.create_task("echo", {"text": "hello"})
        final = await client.wait(task.id)

Why one module: one class with one method per RPC, so that protobuf stays in one place on
the client side; it is long because the API is wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import grpc

from taskrun import convert
from taskrun.cli.credentials import OperatorSettings, load_credentials, resolve_settings
from taskrun.cli.failover import FAILOVER_FOR, Channels, FailoverStub
from taskrun.cli.submits import Broken, Submits, request_error
from taskrun.core.access import AuditEvent, AuditKind, TokenState
from taskrun.core.ids import ConversationId, RunId, TaskId, WorkerId
from taskrun.core.models import (
    DEFAULT_OUTPUT_RETRIES,
    Conversation,
    ModelSettings,
    OutputChunk,
    Run,
    Task,
    TaskPolicy,
    TaskSpec,
    Turn,
    Worker,
)
from taskrun.core.schedule import Schedule
from taskrun.core.status import TaskStatus, WorkerStatus
from taskrun.core.webhooks import Webhook, WebhookDelivery
from taskrun.core.workflow import InboxItem, Workflow, WorkflowRun
from taskrun.servers import ServerList
from taskrun.v1 import (
    common_pb2,
    conversations_pb2,
    conversations_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    schedules_pb2,
    schedules_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
    workers_pb2,
    workers_pb2_grpc,
    workflows_pb2,
    workflows_pb2_grpc,
)

# Keepalive only while a call is open (a follow stream): the server accepts pings every 5 s.
# A frozen control plane (SIGSTOP, a hung machine) is noticed within 15 s, and a client with
# several addresses moves on to the leader.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    # A follow update may batch up to 1000 output chunks.
    ("grpc.max_receive_message_length", 128 * 1024 * 1024),
    # A channel that found no server tries again within a second, not after grpc's own backoff
    # (1 s growing 1.6 x to 2 minutes): a follower resumes about a second after a restarted
    # server answers, not several. One connection attempt a second per client while none does.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)
DEFAULT_TIMEOUT = 30.0
# How long `follow` keeps trying to re-open a stream that broke (see `_broke`).
RECONNECT_FOR = 30.0
# ... trying again at most this many seconds apart, so that it resumes within about a second of
# the server answering again (the channel's own reconnect backoff is capped alike).
RECONNECT_MAX_DELAY = 1.0


def _broke(exc: grpc.aio.AioRpcError) -> bool:
    """The stream broke under a reader, who may open it again: UNAVAILABLE (a restart, a
    failover), or CANCELLED, which this client never causes as an error (its own cancel ends a
    read with CancelledError): a stopping server cancels a call that came in as it stopped, and
    what is still open when its grace ends."""
    return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@dataclass(frozen=True, slots=True)
class OutputReceived:
    """A piece of the followed task's output (text, or an event when events were asked for)."""

    chunk: OutputChunk


@dataclass(frozen=True, slots=True)
class TaskChanged:
    """The followed task's state: first its state when following began, then each change."""

    task: Task


TaskEvent = OutputReceived | TaskChanged


@dataclass(frozen=True, slots=True)
class TurnStarted:
    """`Client.chat`: the message became this turn (its task is `turn.task_id`). `conversation`
    is set when the chat created the conversation."""

    turn: Turn
    conversation: Conversation | None = None


@dataclass(frozen=True, slots=True)
class TurnEnded:
    """`Client.chat`: the turn ended (completed, failed or cancelled), with what it spent."""

    turn: Turn


ChatEvent = TurnStarted | OutputReceived | TaskChanged | TurnEnded


# --- fleet events (WatchEvents) ------------------------------------------------------------------


class EventKind(IntEnum):
    """What a FleetEvent is about (taskrun.v1.EventKind)."""

    WORKER_CONNECTED = 1
    WORKER_DISCONNECTED = 2
    WORKER_DRAINING = 3
    TASK_CHANGED = 4
    RUN_CHANGED = 5
    OUTPUT = 6
    SNAPSHOT_END = 7
    INBOX_ITEM_CREATED = 8  # something waits for a person


@dataclass(frozen=True, slots=True)
class FleetEvent:
    """One event of `Client.watch_events`: the new state of a worker, task or run, or output."""

    kind: EventKind
    time: datetime | None
    snapshot: bool = False  # part of the initial snapshot
    task: Task | None = None
    run: Run | None = None
    worker: Worker | None = None
    worker_runs: tuple[RunId, ...] = field(default=())  # runs the worker holds
    chunk: OutputChunk | None = None
    inbox_item: InboxItem | None = None
    # its place in the durable event log: `watch_events(after_position=…)` resumes after it
    # (0 for inbox and snapshot events; SNAPSHOT_END carries the snapshot's)
    position: int = 0


def _fleet_event(m: events_pb2.Event) -> FleetEvent:
    worker, worker_runs = convert.worker_from_pb(m.worker) if m.HasField("worker") else (None, [])
    return FleetEvent(
        kind=EventKind(m.kind),
        time=convert.ts_from_pb(m, "time"),
        snapshot=m.snapshot,
        task=convert.task_from_pb(m.task)[0] if m.HasField("task") else None,
        run=convert.run_from_pb(m.run) if m.HasField("run") else None,
        worker=worker,
        worker_runs=tuple(worker_runs),
        chunk=convert.chunk_from_pb(m.chunk) if m.HasField("chunk") else None,
        inbox_item=convert.inbox_item_from_pb(m.inbox_item) if m.HasField("inbox_item") else None,
        position=m.position,
    )


@dataclass(frozen=True, slots=True)
class BootstrapTokenInfo:
    """A bootstrap token as the control plane lists it (never its secret)."""

    token_id: str
    worker_id: str
    labels: dict[str, str]
    state: TokenState
    created_at: datetime | None
    expires_at: datetime | None
    used_at: datetime | None
    revoked_at: datetime | None
    created_by: str
    used_by_host: str


@dataclass(frozen=True, slots=True)
class NewBootstrapToken:
    """A token just created: `token` is shown this once."""

    token: str
    info: BootstrapTokenInfo
    ca_fingerprint: str
    public_port: int
    session_port: int


@dataclass(frozen=True, slots=True)
class ApiTokenInfo:
    token_id: str
    name: str
    scopes: tuple[str, ...]
    state: TokenState
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_by: str


def _events(
    update: tasks_pb2.TaskUpdate, task_id: TaskId, seen: dict[RunId, int]
) -> list[TaskEvent]:
    """A followed task's update as events: its new output (in order), then its state."""
    events: list[TaskEvent] = []
    for message in update.chunks:
        chunk = convert.chunk_from_pb(message, task_id)
        if chunk.seq <= seen.get(chunk.run_id, 0):
            continue
        seen[chunk.run_id] = chunk.seq
        events.append(OutputReceived(chunk))
    if update.HasField("task"):
        task, _ = convert.task_from_pb(update.task)
        events.append(TaskChanged(task))
    return events


def _bootstrap_info(m: security_pb2.BootstrapToken) -> BootstrapTokenInfo:
    return BootstrapTokenInfo(
        token_id=m.token_id,
        worker_id=m.worker_id,
        labels=dict(m.labels),
        state=TokenState(m.state),
        created_at=convert.ts_from_pb(m, "created_at"),
        expires_at=convert.ts_from_pb(m, "expires_at"),
        used_at=convert.ts_from_pb(m, "used_at"),
        revoked_at=convert.ts_from_pb(m, "revoked_at"),
        created_by=m.created_by,
        used_by_host=m.used_by_host,
    )


@dataclass(frozen=True, slots=True)
class OperatorCertificate:
    """What `taskrun login` receives: a certificate bound to the API token it was traded for."""

    certificate_pem: bytes
    ca_pem: bytes
    identity: str
    expires_at: datetime
    session_port: int


def _api_info(m: security_pb2.ApiToken) -> ApiTokenInfo:
    return ApiTokenInfo(
        token_id=m.token_id,
        name=m.name,
        scopes=tuple(m.scopes),
        state=TokenState(m.state),
        created_at=convert.ts_from_pb(m, "created_at"),
        expires_at=convert.ts_from_pb(m, "expires_at"),
        revoked_at=convert.ts_from_pb(m, "revoked_at"),
        created_by=m.created_by,
    )


class Client:
    """A TLS connection to the control plane, as an operator (client certificate) or as a
    program (API token, `authorization: Bearer tra_…`, usually on the public listener).

    The channel is opened on first use, inside the running event loop; close it with
    `await client.close()` or by using the client as an async context manager.
    """

    def __init__(
        self,
        target: str,
        *,
        ca: bytes,
        cert: bytes | None = None,
        key: bytes | None = None,
        api_token: str | None = None,
        server_name: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        if api_token is None and (cert is None or key is None):
            raise ValueError("a client needs a certificate and key, or an API token")
        self.target = target
        self.server_name = server_name
        self.timeout = timeout  # per unary call; follow streams have none
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        if api_token is not None:
            self._credentials = grpc.composite_channel_credentials(
                self._credentials, grpc.access_token_call_credentials(api_token)
            )
        merged = dict(CHANNEL_OPTIONS)
        if server_name:
            merged["grpc.ssl_target_name_override"] = server_name
        merged.update(options)
        self._options = list(merged.items())
        # `target` may name several control planes: calls follow the leader (cli/failover.py)
        self.servers = ServerList(target, server_name)
        self._channels = Channels(self.servers, self._credentials, self._options)
        self._tasks = FailoverStub(self._channels, tasks_pb2_grpc.TaskServiceStub)
        self._workers = FailoverStub(self._channels, workers_pb2_grpc.WorkerServiceStub)
        self._create_and_follow = True  # False once the server said it lacks the call
        self._submits = Submits(lambda: self._task_stub().SubmitTasks(), self._channels.failed)

    @classmethod
    def from_env(
        cls,
        *,
        server: str | None = None,
        certs_dir: str | Path | None = None,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
        api_token: str | None = None,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Client:
        """Resolve the target and certificates like the CLI: arguments, then TASKRUN_*, defaults.

        Raises MissingCredentials when a certificate or key file does not exist.
        """
        settings = resolve_settings(
            server=server,
            certs_dir=str(certs_dir) if certs_dir else None,
            ca=str(ca) if ca else None,
            cert=str(cert) if cert else None,
            key=str(key) if key else None,
            server_name=server_name,
            api_token=api_token,
            env=env,
        )
        return cls.from_settings(settings, **kwargs)

    @classmethod
    def from_settings(cls, settings: OperatorSettings, **kwargs: Any) -> Self:
        """A client for resolved settings (reads the certificate files)."""
        creds = load_credentials(settings)
        return cls(
            settings.server,
            ca=creds.ca,
            cert=creds.cert,
            key=creds.key,
            api_token=creds.api_token,
            server_name=settings.server_name,
            **kwargs,
        )

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def channel(self) -> grpc.aio.Channel:
        """The gRPC channel to the control plane in use, opened on first use."""
        return self._channels.channel

    async def wait_ready(self) -> None:
        """Wait until the channel is connected (TLS handshake done); bound it with a timeout."""
        await self.channel.channel_ready()

    async def close(self) -> None:
        await self._submits.close()
        await self._channels.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _task_stub(self) -> Any:
        return self._tasks

    def _worker_stub(self) -> Any:
        return self._workers

    # --- tasks -------------------------------------------------------------------------------

    async def create_task(
        self,
        agent: str,
        input: Mapping[str, Any] | str = "{}",
        *,
        labels: Mapping[str, str] | None = None,
        priority: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 - the task's run timeout, not this call's
        max_attempts: int = 0,
        idempotency_key: str = "",
        required_labels: Mapping[str, str] | None = None,
        queue_timeout: float | None = None,
        retry_on_failure: bool = False,
        required_provider: str = "",
        required_model: str = "",
        allow_unknown_agent: bool = False,
        allow_subtasks: bool = False,
        max_subtasks: int = 0,
        subtask_budget_usd: float = 0.0,
        output_schema: Mapping[str, Any] | str = "",
        output_retries: int = DEFAULT_OUTPUT_RETRIES,
        model_settings: ModelSettings | None = None,
        max_cost_usd: float = 0.0,
    ) -> Task:
        """Submit one task. `input` is a JSON object (as a mapping or as text).

        `output_schema` (a JSON Schema, as a mapping or text): the run's result must match it;
        agents backed by a model ask for it and re-ask up to `output_retries` times.
        `model_settings`: system prompt, max tokens, temperature, stop sequences (and for
        claude_code its appended system prompt, env, MCP servers, tools). `max_cost_usd`: the
        worker stops a run that spends more (0: no limit).

        An agent that no worker has announced is refused (INVALID_ARGUMENT naming `agent` and
        the known agents) unless `allow_unknown_agent` (for workers that are not up yet).
        `timeout` and `queue_timeout` are the task's policy (seconds per run, and how long it may
        wait for a worker), not deadlines of this call.
        max_attempts=0 means the server's default. With an idempotency key that was used before
        for the same request, the existing task is returned. `allow_subtasks` gives its runs the
        MCP server to create sub-tasks with, within `max_subtasks` and `subtask_budget_usd` for
        the whole tree (0: no limit).
        """
        spec = TaskSpec(
            agent=agent,
            input=input if isinstance(input, str) else json.dumps(input),
            labels=dict(labels or {}),
            policy=TaskPolicy(
                priority=priority,
                timeout=timeout,
                max_attempts=max_attempts,
                idempotency_key=idempotency_key,
                required_labels=dict(required_labels or {}),
                queue_timeout=queue_timeout,
                retry_on_failure=retry_on_failure,
                required_provider=required_provider,
                required_model=required_model,
                allow_subtasks=allow_subtasks,
                max_subtasks=max_subtasks,
                subtask_budget_usd=subtask_budget_usd,
                output_schema=(
                    output_schema if isinstance(output_schema, str) else json.dumps(output_schema)
                ),
                output_retries=output_retries,
                model_settings=model_settings or ModelSettings(),
                max_cost_usd=max_cost_usd,
            ),
        )
        return await self.submit(spec, allow_unknown_agent=allow_unknown_agent)

    async def submit(self, spec: TaskSpec, *, allow_unknown_agent: bool = False) -> Task:
        """Submit one task described by a TaskSpec (see create_task)."""
        request = convert.spec_to_pb(spec)
        request.allow_unknown_agent = allow_unknown_agent
        response = await self._task_stub().CreateTask(request, timeout=self.timeout)
        task, _ = convert.task_from_pb(response.task)
        return task

    async def submit_and_follow(
        self,
        spec: TaskSpec,
        *,
        include_events: bool = False,
        allow_unknown_agent: bool = False,
        on_reconnect: Callable[[grpc.aio.AioRpcError | None], None] | None = None,
        outcome_only: bool = False,
    ) -> AsyncGenerator[TaskEvent, None]:
        """Submit one task and follow it: the first event is a TaskChanged with the task as
        created, then as `follow` until it ends; with `outcome_only`, the ended task's
        TaskChanged alone (see `follow`). All of a client's submissions share one
        SubmitTasks stream (cli/submits.py); a server without it gets CreateAndFollowTask,
        and one without that CreateTask then FollowTask. If the stream breaks once the task
        exists, `follow` takes over (it reconnects). Use `contextlib.aclosing`."""
        request = tasks_pb2.CreateAndFollowTaskRequest(
            task=convert.spec_to_pb(spec),
            include_events=include_events,
            outcome_only=outcome_only,
        )
        request.task.allow_unknown_agent = allow_unknown_agent
        task_id = ""
        seen: dict[RunId, int] = {}
        broken: grpc.aio.AioRpcError | None = None
        failover_until = time.monotonic() + FAILOVER_FOR
        while self._submits.supported and not task_id and not broken:
            request_id, queue = await self._submits.start(request)
            ended = False
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, Broken):
                        ended, error = True, item.error
                        if error.code() == grpc.StatusCode.UNIMPLEMENTED and not task_id:
                            self._submits.supported = False  # an older server
                            break
                        if task_id and _broke(error):
                            broken = error  # e.g. a server restart: follow, reconnecting
                            break
                        if item.may_repeat and time.monotonic() < failover_until:
                            # nothing of it was done: again (to the leader a standby named)
                            await asyncio.sleep(0.1)
                            break
                        raise error
                    if item.HasField("error"):
                        ended = True
                        raise request_error(item.error)
                    update = item.update
                    task_id = task_id or update.task.id
                    for event in _events(update, TaskId(task_id), seen):
                        yield event
                    if update.last:
                        ended = True
                        return
            finally:
                if not ended:  # the caller stopped early: stop following, not the task
                    await self._submits.stop(request_id)
        if self._create_and_follow and not task_id:
            call = self._task_stub().CreateAndFollowTask(request)
            try:
                async for update in call:
                    task_id = task_id or update.task.id
                    for event in _events(update, TaskId(task_id), seen):
                        yield event
                    if update.last:
                        break  # the rest is the stream's status: no need to wait for it
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED and not task_id:
                    self._create_and_follow = False  # an older server
                elif task_id and _broke(exc):
                    broken = exc  # e.g. a server restart: follow the task, reconnecting
                else:
                    raise
            finally:
                call.cancel()
        if not task_id:
            task_id = (await self.submit(spec, allow_unknown_agent=allow_unknown_agent)).id
        events = self.follow(
            task_id,
            include_events=include_events,
            on_reconnect=on_reconnect,
            seen=seen,
            broken=broken,
            outcome_only=outcome_only,
        )
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def run(self, spec: TaskSpec, *, allow_unknown_agent: bool = False) -> Task:
        """Submit one task and wait until it is COMPLETED, FAILED or CANCELLED (one stream);
        returns its final state. Its output is not sent (`outcome_only`); `follow(task.id,
        follow=False)` reads it afterwards when it is wanted."""
        last: Task | None = None
        events = self.submit_and_follow(
            spec, allow_unknown_agent=allow_unknown_agent, outcome_only=True
        )
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, TaskChanged):
                    last = event.task
        if last is None:
            raise RuntimeError("the server ended the stream before the task was created")
        if not last.status.terminal:
            last, _ = await self.get_task(last.id)
        return last

    async def create_tasks(
        self, specs: Sequence[TaskSpec], *, allow_unknown_agent: bool = False
    ) -> list[Task]:
        """Submit several tasks in one call: all are created, or none when one is invalid."""
        request = tasks_pb2.CreateTasksRequest(tasks=[convert.spec_to_pb(s) for s in specs])
        for message in request.tasks:
            message.allow_unknown_agent = allow_unknown_agent
        response = await self._task_stub().CreateTasks(request, timeout=self.timeout)
        return [convert.task_from_pb(r.task)[0] for r in response.results]

    async def get_task(self, task_id: str) -> tuple[Task, list[Run]]:
        """The task and all its runs, oldest first."""
        return convert.task_from_pb(await self._get_task(task_id))

    async def get_task_tree(self, task_id: str) -> tuple[Task, list[Run], list[Task]]:
        """The task, its runs, and the tasks below it (sub-tasks, theirs...), oldest first: at
        most 1,000, and as many as fit one message (`list_tasks(parent_task_id=...)` pages a
        task's own sub-tasks)."""
        message = await self._get_task(task_id)
        task, runs = convert.task_from_pb(message)
        return task, runs, convert.subtasks_from_pb(message)

    async def _pages(self, call: Callable[..., Any], request: Any) -> AsyncIterator[Any]:
        """Every reply of a listing that pages with `page_token` / `next_page_token`."""
        while True:
            reply = await call(request, timeout=self.timeout)
            yield reply
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token

    async def _get_task(self, task_id: str) -> common_pb2.Task:
        """GetTask's reply with every run: a task whose runs do not fit one reply comes in
        several, the latest runs first."""
        request = tasks_pb2.GetTaskRequest(task_id=task_id)
        message: common_pb2.Task = await self._task_stub().GetTask(request, timeout=self.timeout)
        earlier, runs = message.earlier_runs, list(message.runs)
        while earlier and runs:
            request.before_attempt = runs[0].attempt
            reply = await self._task_stub().GetTask(request, timeout=self.timeout)
            if not reply.runs:
                break
            earlier, runs = reply.earlier_runs, [*reply.runs, *runs]
        del message.runs[:]
        message.runs.extend(runs)
        message.earlier_runs = earlier
        return message

    async def list_tasks(
        self,
        *,
        statuses: Sequence[TaskStatus] = (),
        agent: str = "",
        labels: Mapping[str, str] | None = None,
        worker_id: str = "",
        limit: int = 50,
        page_token: str = "",
        schedule: str = "",
        parent_task_id: str = "",
    ) -> tuple[list[Task], str]:
        """One page of tasks, newest first, and the token of the next page ("" on the last);
        `parent_task_id`: only the direct sub-tasks of that task."""
        request = tasks_pb2.ListTasksRequest(
            statuses=cast(Any, [int(s) for s in statuses]),
            agent=agent,
            labels=dict(labels or {}),
            worker_id=worker_id,
            page_size=limit,
            page_token=page_token,
            schedule=schedule,
            parent_task_id=parent_task_id,
        )
        response = await self._task_stub().ListTasks(request, timeout=self.timeout)
        return [convert.task_from_pb(t)[0] for t in response.tasks], str(response.next_page_token)

    async def iter_tasks(
        self,
        *,
        statuses: Sequence[TaskStatus] = (),
        agent: str = "",
        labels: Mapping[str, str] | None = None,
        worker_id: str = "",
        page_size: int = 200,
        schedule: str = "",
        parent_task_id: str = "",
    ) -> AsyncIterator[Task]:
        """Every matching task, newest first, fetching pages as needed."""
        token = ""
        while True:
            tasks, token = await self.list_tasks(
                statuses=statuses,
                agent=agent,
                labels=labels,
                worker_id=worker_id,
                limit=page_size,
                page_token=token,
                schedule=schedule,
                parent_task_id=parent_task_id,
            )
            for task in tasks:
                yield task
            if not token:
                return

    async def cancel_task(self, task_id: str, reason: str = "") -> Task:
        """Cancel a task that has not finished; FAILED_PRECONDITION if it has."""
        message = await self._task_stub().CancelTask(
            tasks_pb2.CancelTaskRequest(task_id=task_id, reason=reason), timeout=self.timeout
        )
        task, _ = convert.task_from_pb(message)
        return task

    async def continue_task(self, task_id: str, prompt: str) -> Task:
        """Send the next message of the conversation `task_id` belongs to (one is created around
        a task that had none); returns the new turn's task. The given task never changes."""
        message = await self._task_stub().ContinueTask(
            tasks_pb2.ContinueTaskRequest(task_id=task_id, prompt=prompt), timeout=self.timeout
        )
        task, _ = convert.task_from_pb(message)
        return task

    # --- conversations -----------------------------------------------------------------------

    def _conversation_stub(self) -> Any:
        return FailoverStub(self._channels, conversations_pb2_grpc.ConversationServiceStub)

    async def create_conversation(
        self,
        agent: str,
        message: str,
        *,
        title: str = "",
        labels: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
        policy: TaskPolicy | None = None,
        allow_unknown_agent: bool = False,
    ) -> tuple[Conversation, Turn]:
        """A new conversation with `agent`, its first turn carrying `message`. `options` are the
        agent's input fields every turn shares (not "prompt": each turn's prompt is its message).
        Refused (INVALID_ARGUMENT) when no worker has announced the agent, or no online worker
        offers the provider or model asked for, unless `allow_unknown_agent` (its turns wait).
        """
        request = conversations_pb2.CreateConversationRequest(
            agent=agent,
            message=message,
            title=title,
            labels=dict(labels or {}),
            input_json=json.dumps(dict(options or {})),
            allow_unknown_agent=allow_unknown_agent,
        )
        if policy is not None:
            convert.policy_to_pb(policy, request.policy)
        reply = await self._conversation_stub().CreateConversation(request, timeout=self.timeout)
        conversation, turns = convert.conversation_from_pb(reply)
        return conversation, turns[0]

    async def get_conversation(self, conversation_id: str) -> tuple[Conversation, list[Turn]]:
        """The conversation and its turns in order (all of them: a long conversation comes in
        several replies, the latest turns first)."""
        request = conversations_pb2.GetConversationRequest(conversation_id=conversation_id)
        conversation: Conversation | None = None
        turns: list[Turn] = []
        while True:
            reply = await self._conversation_stub().GetConversation(request, timeout=self.timeout)
            latest, earlier = convert.conversation_from_pb(reply)
            conversation = conversation or latest
            turns[:0] = earlier
            if not (reply.earlier_turns and earlier):
                return conversation, turns
            request.before_turn = earlier[0].index

    async def list_conversations(
        self, *, agent: str = "", labels: Mapping[str, str] | None = None, limit: int = 50
    ) -> list[Conversation]:
        """Newest first, at most `limit` (all pages up to it)."""
        out: list[Conversation] = []
        token = ""
        while len(out) < limit:
            reply = await self._conversation_stub().ListConversations(
                conversations_pb2.ListConversationsRequest(
                    agent=agent,
                    labels=dict(labels or {}),
                    page_size=min(limit - len(out), 1000),
                    page_token=token,
                ),
                timeout=self.timeout,
            )
            out.extend(convert.conversation_from_pb(c)[0] for c in reply.conversations)
            token = reply.next_page_token
            if not token:
                break
        return out

    async def delete_conversation(self, conversation_id: str) -> None:
        await self._conversation_stub().DeleteConversation(
            conversations_pb2.DeleteConversationRequest(conversation_id=conversation_id),
            timeout=self.timeout,
        )

    async def send_message(
        self, conversation_id: str, message: str
    ) -> AsyncGenerator[ChatEvent, None]:
        """The next turn: TurnStarted, its output (text and events) and task changes, then
        TurnEnded. FAILED_PRECONDITION while the previous turn is unfinished."""
        call = self._conversation_stub().SendMessage(
            conversations_pb2.SendMessageRequest(conversation_id=conversation_id, message=message)
        )
        cid = ConversationId(conversation_id)
        task_id = TaskId("")
        started = False
        try:
            async for event in call:
                if event.HasField("turn"):
                    turn = convert.turn_from_pb(event.turn, cid)
                    task_id = turn.task_id
                    if not started:
                        started = True
                        yield TurnStarted(turn)
                    else:
                        yield TurnEnded(turn)
                    continue
                for chunk in event.update.chunks:
                    yield OutputReceived(convert.chunk_from_pb(chunk, task_id))
                if event.update.HasField("task"):
                    yield TaskChanged(convert.task_from_pb(event.update.task)[0])
        finally:
            call.cancel()

    async def chat(
        self,
        message: str,
        *,
        agent: str = "",
        conversation_id: str = "",
        options: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        title: str = "",
        allow_unknown_agent: bool = False,
    ) -> AsyncGenerator[ChatEvent, None]:
        """Send `message` and follow the answer: to `conversation_id`, or to a new conversation
        with `agent` (TurnStarted then carries it). Events: TurnStarted, OutputReceived (text
        and events), TaskChanged, and TurnEnded last. Stop iterating (aclosing) to stop
        following; cancel the turn with `cancel_task(turn.task_id)`.

            async with Client.from_env() as client:
                async for event in client.chat("Hello", agent="anthropic"):
                    ...
        """
        if conversation_id:
            async with contextlib.aclosing(self.send_message(conversation_id, message)) as events:
                async for event in events:
                    yield event
            return
        if not agent:
            raise ValueError("chat needs an agent (a new conversation) or a conversation_id")
        conversation, turn = await self.create_conversation(
            agent,
            message,
            options=options,
            labels=labels,
            title=title,
            allow_unknown_agent=allow_unknown_agent,
        )
        yield TurnStarted(turn, conversation)
        async with contextlib.aclosing(self.follow(turn.task_id, include_events=True)) as events:
            async for event in events:
                yield event
        _, turns = await self.get_conversation(conversation.id)
        yield TurnEnded(next(t for t in turns if t.index == turn.index))

    async def follow(
        self,
        task_id: str,
        *,
        follow: bool = True,
        include_events: bool = False,
        reconnect: bool = True,
        on_reconnect: Callable[[grpc.aio.AioRpcError | None], None] | None = None,
        seen: dict[RunId, int] | None = None,
        broken: grpc.aio.AioRpcError | None = None,
        outcome_only: bool = False,
    ) -> AsyncGenerator[TaskEvent, None]:
        """The task's stored output, then (with follow) live output and changes until it ends.
        With `outcome_only`, no output and a single TaskChanged: with `follow`, the task once
        it has ended (for a caller that waits for the result), without, its state now.

        Output is yielded before the task state that came with it: the stored output first,
        then a TaskChanged with the task's current state, and the terminal TaskChanged is last
        (the iteration ends there, without waiting for the stream's own end).
        When an open stream breaks (UNAVAILABLE or CANCELLED: a server restart), it is re-opened
        for up to RECONNECT_FOR seconds (backing off from 0.25 s to 1 s) and output already
        yielded is skipped; `on_reconnect` is called with the error when that starts, and with
        None once the stream works again.
        Use `contextlib.aclosing` when you may stop iterating early. `seen` (last output seq
        per run, updated as output is yielded) skips output yielded before; `broken` says an
        earlier stream of this task just broke with that error, so this one starts reconnecting.
        """
        seen = {} if seen is None else seen
        request = tasks_pb2.FollowTaskRequest(
            task_id=task_id,
            follow=follow,
            include_events=include_events,
            outcome_only=outcome_only,
        )
        connected_once, delay, give_up_at = False, 0.25, 0.0
        failover_until = time.monotonic() + FAILOVER_FOR
        reconnecting = False
        if broken is not None:  # another stream of this task broke: reconnect from here
            connected_once = reconnecting = True
            give_up_at = time.monotonic() + RECONNECT_FOR
            if on_reconnect is not None:
                on_reconnect(broken)
        while True:
            call = self._task_stub().FollowTask(request)
            received = False
            try:
                async for update in call:
                    received = connected_once = True
                    failover_until = time.monotonic() + FAILOVER_FOR
                    if reconnecting:
                        reconnecting = False
                        if on_reconnect is not None:
                            on_reconnect(None)
                    for event in _events(update, TaskId(task_id), seen):
                        yield event
                    if update.last:
                        break  # the rest is the stream's status: no need to wait for it
                return
            except grpc.aio.AioRpcError as exc:
                before = self.servers.current.target
                # following only reads: it may be repeated wherever the leader is now
                moved = self._channels.failed(exc) or self.servers.current.target != before
                if moved and not received and time.monotonic() < failover_until:
                    await asyncio.sleep(0.1)  # a standby refused it, or an address was down
                    continue
                if not (reconnect and follow and _broke(exc) and connected_once):
                    raise
                if received:  # this stream had been working: a new reconnect window starts
                    delay, give_up_at = 0.25, time.monotonic() + RECONNECT_FOR
                elif time.monotonic() >= give_up_at:
                    raise
                if not reconnecting:
                    reconnecting = True
                    if on_reconnect is not None:
                        on_reconnect(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
            finally:
                call.cancel()

    async def wait(self, task_id: str) -> Task:
        """Follow the task until it is COMPLETED, FAILED or CANCELLED; return its final state
        (its output is not sent: `outcome_only`)."""
        last: Task | None = None
        async with contextlib.aclosing(self.follow(task_id, outcome_only=True)) as events:
            async for event in events:
                if isinstance(event, TaskChanged):
                    last = event.task
        if last is None or not last.status.terminal:
            last, _ = await self.get_task(task_id)
        return last

    # --- workers -----------------------------------------------------------------------------

    async def list_workers(
        self, statuses: Sequence[WorkerStatus] = ()
    ) -> list[tuple[Worker, list[RunId]]]:
        """Known workers (sorted by id) with the runs each currently holds (all pages)."""
        request = workers_pb2.ListWorkersRequest(statuses=cast(Any, [int(s) for s in statuses]))
        pages = self._pages(self._worker_stub().ListWorkers, request)
        return [convert.worker_from_pb(w) async for page in pages for w in page.workers]

    async def get_worker(self, worker_id: str) -> tuple[Worker, list[RunId]]:
        message = await self._worker_stub().GetWorker(
            workers_pb2.GetWorkerRequest(worker_id=WorkerId(worker_id)), timeout=self.timeout
        )
        return convert.worker_from_pb(message)

    async def drain_worker(self, worker_id: str) -> Worker:
        """Stop assigning runs to the worker; it finishes what it has and exits."""
        message = await self._worker_stub().DrainWorker(
            workers_pb2.DrainWorkerRequest(worker_id=WorkerId(worker_id)), timeout=self.timeout
        )
        return convert.worker_from_pb(message)[0]

    async def revoke_worker(self, worker_id: str, reason: str = "") -> Worker:
        """Cut the worker off at once and for good; its runs are retried elsewhere."""
        message = await self._worker_stub().RevokeWorker(
            workers_pb2.RevokeWorkerRequest(worker_id=WorkerId(worker_id), reason=reason),
            timeout=self.timeout,
        )
        return convert.worker_from_pb(message)[0]

    # --- access control ------------------------------------------------------------

    def _access_stub(self) -> Any:
        return FailoverStub(self._channels, security_pb2_grpc.AccessServiceStub)

    async def create_bootstrap_token(
        self,
        *,
        ttl: float = 0,
        worker_id: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> NewBootstrapToken:
        """A single-use enrollment token (ttl 0 = the server's default, 1 h)."""
        m = await self._access_stub().CreateBootstrapToken(
            security_pb2.CreateBootstrapTokenRequest(
                ttl_seconds=round(ttl), worker_id=worker_id, labels=dict(labels or {})
            ),
            timeout=self.timeout,
        )
        return NewBootstrapToken(
            token=m.token,
            info=_bootstrap_info(m.info),
            ca_fingerprint=m.ca_fingerprint,
            public_port=m.public_port,
            session_port=m.session_port,
        )

    async def list_bootstrap_tokens(
        self, *, include_inactive: bool = False
    ) -> list[BootstrapTokenInfo]:
        """Oldest first (all pages)."""
        request = security_pb2.ListBootstrapTokensRequest(include_inactive=include_inactive)
        pages = self._pages(self._access_stub().ListBootstrapTokens, request)
        return [_bootstrap_info(t) async for page in pages for t in page.tokens]

    async def revoke_bootstrap_token(self, token_id: str) -> BootstrapTokenInfo:
        m = await self._access_stub().RevokeBootstrapToken(
            security_pb2.RevokeBootstrapTokenRequest(token_id=token_id), timeout=self.timeout
        )
        return _bootstrap_info(m)

    async def create_api_token(
        self, name: str, scopes: Sequence[str], *, ttl: float = 0
    ) -> tuple[str, ApiTokenInfo]:
        """A bearer token for programs; the string is shown this once (ttl 0 = no expiry)."""
        m = await self._access_stub().CreateApiToken(
            security_pb2.CreateApiTokenRequest(
                name=name, scopes=list(scopes), ttl_seconds=round(ttl)
            ),
            timeout=self.timeout,
        )
        return m.token, _api_info(m.info)

    async def list_api_tokens(self, *, include_inactive: bool = False) -> list[ApiTokenInfo]:
        """Oldest first (all pages)."""
        request = security_pb2.ListApiTokensRequest(include_inactive=include_inactive)
        pages = self._pages(self._access_stub().ListApiTokens, request)
        return [_api_info(t) async for page in pages for t in page.tokens]

    async def revoke_api_token(self, token_id: str) -> ApiTokenInfo:
        m = await self._access_stub().RevokeApiToken(
            security_pb2.RevokeApiTokenRequest(token_id=token_id), timeout=self.timeout
        )
        return _api_info(m)

    async def issue_operator_certificate(
        self, csr_pem: bytes, *, ttl: float = 0
    ) -> OperatorCertificate:
        """`taskrun login`: a short-lived operator certificate for the key in `csr_pem`, bound
        to this client's (admin) API token."""
        m = await self._access_stub().IssueOperatorCertificate(
            security_pb2.IssueOperatorCertificateRequest(csr_pem=csr_pem, ttl_seconds=round(ttl)),
            timeout=self.timeout,
        )
        expires_at = convert.ts_from_pb(m, "expires_at")
        assert expires_at is not None
        return OperatorCertificate(
            certificate_pem=m.certificate_pem,
            ca_pem=m.ca_pem,
            identity=m.identity,
            expires_at=expires_at,
            session_port=m.session_port,
        )

    async def list_audit_events(
        self, *, limit: int = 100, before_id: int = 0, kinds: Sequence[AuditKind | str] = ()
    ) -> list[AuditEvent]:
        """Security events, newest first, at most `limit` (a page that did not fit one message
        comes shorter: the next goes on before its last event)."""
        request = security_pb2.ListAuditEventsRequest(
            before_id=before_id, kinds=[str(k) for k in kinds]
        )
        out: list[AuditEvent] = []
        while len(out) < limit:
            request.limit = limit - len(out)
            m = await self._access_stub().ListAuditEvents(request, timeout=self.timeout)
            out += [convert.audit_event_from_pb(e) for e in m.events]
            if len(m.events) in (0, request.limit) or m.events[-1].id <= 1:
                break
            request.before_id = m.events[-1].id
        return out

    # --- events ---------------------------------------------------------------------

    async def watch_events(
        self,
        *,
        task_id: str = "",
        worker_id: str = "",
        kinds: Sequence[EventKind] = (),
        include_output: bool = False,
        snapshot: bool = True,
        after_position: int = 0,
        reconnect: bool = True,
    ) -> AsyncGenerator[FleetEvent, None]:
        """Live events: with `snapshot`, first the current workers and unfinished tasks (ending
        with a SNAPSHOT_END event), then every change in commit order, until cancelled. With
        `after_position`, first every logged change after it instead of a snapshot.

        When the stream breaks (UNAVAILABLE or CANCELLED: a restart, a failover to another
        control plane), it is re-opened after the last position received for up to RECONNECT_FOR
        seconds: changes (and output) are neither missed nor repeated. A watcher that reads
        too slowly is ended by the server with RESOURCE_EXHAUSTED. Use `contextlib.aclosing`
        when you may stop iterating early.
        """
        last, give_up_at, delay = after_position, time.monotonic() + RECONNECT_FOR, 0.1
        while True:
            request = events_pb2.WatchEventsRequest(
                task_id=task_id,
                worker_id=worker_id,
                kinds=cast(Any, [int(k) for k in kinds]),
                include_output=include_output,
                snapshot=snapshot and not last,
                after_position=last,
            )
            stub = FailoverStub(self._channels, events_pb2_grpc.EventServiceStub)
            call = stub.WatchEvents(request)
            try:
                async for message in call:
                    give_up_at, delay = time.monotonic() + RECONNECT_FOR, 0.1
                    if message.position:
                        last = message.position
                    yield _fleet_event(message)
                return
            except grpc.aio.AioRpcError as exc:
                self._channels.failed(exc)  # a standby named the leader, or the next address
                if not (reconnect and _broke(exc) and last) or time.monotonic() > give_up_at:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
            finally:
                call.cancel()

    # --- schedules ---------------------------------------------------------------------------

    # --- webhooks ------------------------------------------------------------------

    def _webhook_stub(self) -> Any:
        return FailoverStub(self._channels, webhooks_pb2_grpc.WebhookServiceStub)

    async def create_webhook(
        self,
        url: str,
        events: Sequence[str],
        *,
        labels: Mapping[str, str] | None = None,
        agent: str = "",
        schedule: str = "",
        description: str = "",
        secret: str = "",
    ) -> tuple[Webhook, str]:
        """Register a webhook; returns it and its signing secret (shown only this once)."""
        m = await self._webhook_stub().CreateWebhook(
            webhooks_pb2.CreateWebhookRequest(
                url=url,
                events=list(events),
                labels=dict(labels or {}),
                agent=agent,
                schedule=schedule,
                description=description,
                secret=secret,
            ),
            timeout=self.timeout,
        )
        return convert.webhook_from_pb(m.webhook), m.secret

    async def list_webhooks(self) -> list[Webhook]:
        m = await self._webhook_stub().ListWebhooks(
            webhooks_pb2.ListWebhooksRequest(), timeout=self.timeout
        )
        return [convert.webhook_from_pb(w) for w in m.webhooks]

    async def delete_webhook(self, webhook_id: str) -> None:
        await self._webhook_stub().DeleteWebhook(
            webhooks_pb2.DeleteWebhookRequest(webhook_id=webhook_id), timeout=self.timeout
        )

    async def test_webhook(self, webhook_id: str) -> WebhookDelivery:
        """Queue a `webhook.test` delivery (signed and recorded like any other)."""
        m = await self._webhook_stub().TestWebhook(
            webhooks_pb2.TestWebhookRequest(webhook_id=webhook_id), timeout=self.timeout
        )
        return convert.delivery_from_pb(m)

    async def list_webhook_deliveries(
        self, webhook_id: str, *, limit: int = 50
    ) -> list[WebhookDelivery]:
        """Newest first: status, attempts, last response code and error."""
        m = await self._webhook_stub().ListWebhookDeliveries(
            webhooks_pb2.ListWebhookDeliveriesRequest(webhook_id=webhook_id, limit=limit),
            timeout=self.timeout,
        )
        return [convert.delivery_from_pb(d) for d in m.deliveries]

    def _schedule_stub(self) -> Any:
        return FailoverStub(self._channels, schedules_pb2_grpc.ScheduleServiceStub)

    async def create_schedule(self, schedule: Schedule) -> Schedule:
        """Create a schedule: name, agent, timezone, cron or rrule, and the task template.

        INVALID_ARGUMENT names the offending field (`schedule.cron`, `schedule.agent`, ...).
        """
        message = await self._schedule_stub().CreateSchedule(
            schedules_pb2.CreateScheduleRequest(schedule=convert.schedule_to_pb(schedule)),
            timeout=self.timeout,
        )
        return _schedule(message)

    async def get_schedule(self, name: str) -> Schedule:
        message = await self._schedule_stub().GetSchedule(
            schedules_pb2.GetScheduleRequest(name=name), timeout=self.timeout
        )
        return _schedule(message)

    async def list_schedules(self, *, page_size: int = 1000) -> list[Schedule]:
        """Every schedule, ordered by name (all pages)."""
        out: list[Schedule] = []
        token = ""
        while True:
            response = await self._schedule_stub().ListSchedules(
                schedules_pb2.ListSchedulesRequest(page_size=page_size, page_token=token),
                timeout=self.timeout,
            )
            out.extend(_schedule(m) for m in response.schedules)
            token = response.next_page_token
            if not token:
                return out

    async def update_schedule(self, schedule: Schedule, fields: Sequence[str] = ()) -> Schedule:
        """Change the named fields (Schedule attribute names: agent, input, labels, policy, cron,
        rrule, timezone, misfire, overlap) of the schedule called `schedule.name`; all of them
        when `fields` is empty."""
        paths = {attr: path for path, attr in convert.SCHEDULE_UPDATE_PATHS.items()}
        request = schedules_pb2.UpdateScheduleRequest(schedule=convert.schedule_to_pb(schedule))
        request.update_mask.paths.extend(paths.get(f, f) for f in fields)
        message = await self._schedule_stub().UpdateSchedule(request, timeout=self.timeout)
        return _schedule(message)

    async def pause_schedule(self, name: str) -> Schedule:
        message = await self._schedule_stub().PauseSchedule(
            schedules_pb2.PauseScheduleRequest(name=name), timeout=self.timeout
        )
        return _schedule(message)

    async def resume_schedule(self, name: str) -> Schedule:
        message = await self._schedule_stub().ResumeSchedule(
            schedules_pb2.ResumeScheduleRequest(name=name), timeout=self.timeout
        )
        return _schedule(message)

    async def delete_schedule(self, name: str) -> None:
        await self._schedule_stub().DeleteSchedule(
            schedules_pb2.DeleteScheduleRequest(name=name), timeout=self.timeout
        )

    async def trigger_schedule(self, name: str) -> tuple[Schedule, Task]:
        """Create one task of the schedule now, outside its rhythm."""
        response = await self._schedule_stub().TriggerSchedule(
            schedules_pb2.TriggerScheduleRequest(name=name), timeout=self.timeout
        )
        return _schedule(response.schedule), convert.task_from_pb(response.task)[0]

    async def preview_schedule(
        self,
        name: str = "",
        *,
        schedule: Schedule | None = None,
        count: int = 5,
        after: datetime | None = None,
    ) -> tuple[str, list[tuple[datetime, str]]]:
        """The zone and the next `count` fire times (UTC instant, ISO local time) of the stored
        schedule `name`, or of `schedule`'s rule (cron or rrule, and timezone) before creating
        it."""
        request = schedules_pb2.PreviewScheduleRequest(name=name, count=count)
        if schedule is not None:
            request.schedule.CopyFrom(convert.schedule_to_pb(schedule))
        if after is not None:
            request.after.FromDatetime(after)
        response = await self._schedule_stub().PreviewSchedule(request, timeout=self.timeout)
        return response.timezone, [convert.fire_time_from_pb(f) for f in response.fire_times]

    # --- workflows ----------------------------------------------------------------

    def _workflow_stub(self) -> Any:
        return FailoverStub(self._channels, workflows_pb2_grpc.WorkflowServiceStub)

    async def put_workflow(self, definition: str) -> tuple[Workflow, bool]:
        """Store a definition (YAML or JSON text) as the next version; (workflow, created).
        INVALID_ARGUMENT names the path of a bad field (`steps.draft.agent`)."""
        m = await self._workflow_stub().PutWorkflow(
            workflows_pb2.PutWorkflowRequest(definition=definition), timeout=self.timeout
        )
        return convert.workflow_from_pb(m.workflow), m.created

    async def list_workflows(self) -> list[Workflow]:
        """The newest version of every workflow, by name (all pages)."""
        pages = self._pages(
            self._workflow_stub().ListWorkflows, workflows_pb2.ListWorkflowsRequest()
        )
        return [convert.workflow_from_pb(w) async for page in pages for w in page.workflows]

    async def get_workflow(self, name: str, version: int = 0) -> Workflow:
        m = await self._workflow_stub().GetWorkflow(
            workflows_pb2.GetWorkflowRequest(name=name, version=version), timeout=self.timeout
        )
        return convert.workflow_from_pb(m)

    async def start_workflow_run(
        self,
        name: str,
        input: Mapping[str, Any] | None = None,
        *,
        version: int = 0,
        idempotency_key: str = "",
    ) -> tuple[WorkflowRun, bool]:
        """Start a run of the workflow (its newest version unless `version`); (run, created)."""
        m = await self._workflow_stub().StartWorkflowRun(
            workflows_pb2.StartWorkflowRunRequest(
                name=name,
                version=version,
                input_json=json.dumps(dict(input or {})),
                idempotency_key=idempotency_key,
            ),
            timeout=self.timeout,
        )
        return await self._whole_run(m.run), m.created

    async def get_workflow_run(self, run_id: str) -> WorkflowRun:
        """The run with every step's result (those that did not fit its reply asked for one by
        one)."""
        m = await self._workflow_stub().GetWorkflowRun(
            workflows_pb2.GetWorkflowRunRequest(id=run_id), timeout=self.timeout
        )
        return await self._whole_run(m)

    async def list_workflow_runs(self, workflow: str = "", limit: int = 100) -> list[WorkflowRun]:
        """Newest first, at most `limit` (all pages up to it), each with every step's result."""
        out: list[WorkflowRun] = []
        request = workflows_pb2.ListWorkflowRunsRequest(workflow=workflow)
        while len(out) < limit:
            request.limit = min(limit - len(out), 1000)
            m = await self._workflow_stub().ListWorkflowRuns(request, timeout=self.timeout)
            out += [await self._whole_run(r) for r in m.runs]
            if not m.next_page_token:
                break
            request.page_token = m.next_page_token
        return out

    async def _whole_run(self, m: workflows_pb2.WorkflowRun) -> WorkflowRun:
        for step in m.steps:
            if step.result_left_out:
                one = await self._workflow_stub().GetWorkflowRun(
                    workflows_pb2.GetWorkflowRunRequest(id=m.id, step=step.name),
                    timeout=self.timeout,
                )
                step.CopyFrom(one.steps[0])
        return convert.workflow_run_from_pb(m)

    async def cancel_workflow_run(self, run_id: str, reason: str = "") -> WorkflowRun:
        m = await self._workflow_stub().CancelWorkflowRun(
            workflows_pb2.CancelWorkflowRunRequest(id=run_id, reason=reason), timeout=self.timeout
        )
        return await self._whole_run(m)

    async def list_inbox(self) -> list[InboxItem]:
        """Every approval waiting for a person, oldest first (all pages)."""
        request = workflows_pb2.ListInboxItemsRequest()
        pages = self._pages(self._workflow_stub().ListInboxItems, request)
        return [convert.inbox_item_from_pb(i) async for page in pages for i in page.items]

    async def answer_inbox_item(
        self, item_id: str, *, approve: bool, choice: str = "", comment: str = ""
    ) -> WorkflowRun:
        """Approve (with one of the item's choices, when it has some) or reject."""
        m = await self._workflow_stub().AnswerInboxItem(
            workflows_pb2.AnswerInboxItemRequest(
                id=item_id, approve=approve, choice=choice, comment=comment
            ),
            timeout=self.timeout,
        )
        return await self._whole_run(m)


def _schedule(message: schedules_pb2.Schedule) -> Schedule:
    return convert.schedule_from_pb(message, message.policy.max_attempts)
