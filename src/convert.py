"""Conversion between taskrun.v1 protobuf messages and core models, in one place.

Shared by the control plane, the worker and the client; nothing else touches both worlds.

Why one module: ARCHITECTURE.md asks for one place where protobuf and core models meet, so
that the gRPC and HTTP APIs cannot drift; it is long because there are many messages.

A map field is given to a message's constructor as `mapping or None`, and updated only when
not empty: protobuf fills a map through `MutableMapping.update`, Python code with ABC checks,
about 2 µs even for an empty dict, and tasks mostly have no labels.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from taskrun import pbjson
from taskrun.core.access import ApiToken, AuditEvent, AuditKind, BootstrapToken, Scope
from taskrun.core.errors import InvalidArgument
from taskrun.core.ids import ConversationId, RunId, TaskId, WorkerId
from taskrun.core.models import (
    DEFAULT_OUTPUT_RETRIES,
    AgentSpec,
    Conversation,
    ModelBackend,
    ModelSettings,
    OutputChunk,
    OutputKind,
    Run,
    RunOptions,
    Task,
    TaskPolicy,
    TaskSpec,
    TranscriptMessage,
    Turn,
    TurnContext,
    Usage,
    Worker,
)
from taskrun.core.schedule import MisfirePolicy, OverlapPolicy, Schedule
from taskrun.core.status import Fault, RunStatus, TaskStatus, WorkerStatus
from taskrun.core.text import quoted
from taskrun.core.webhooks import (
    DeliveryStatus,
    Webhook,
    WebhookDelivery,
    WebhookEvent,
)
from taskrun.core.workflow import (
    InboxItem,
    Step,
    StepStatus,
    Workflow,
    WorkflowRun,
    WorkflowRunStatus,
)
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import (
    conversations_pb2,
    schedules_pb2,
    security_pb2,
    tasks_pb2,
    webhooks_pb2,
    workers_pb2,
    workflows_pb2,
)

# --- scalars -------------------------------------------------------------------------------------


# Timestamps are converted by arithmetic on microseconds: protobuf's FromDatetime/ToDatetime
# go through time tuples and cost several times more, on every task and chunk sent.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def ts_to_pb(value: datetime | None, out: Timestamp) -> None:
    if value is not None:
        if value.tzinfo is None:  # naive means UTC, as FromDatetime reads it
            value = value.replace(tzinfo=UTC)
        seconds, micros = divmod((value - _EPOCH) // _MICROSECOND, 1_000_000)
        out.seconds, out.nanos = seconds, micros * 1000


def now_to_pb(out: Timestamp) -> None:
    """The current time (what GetCurrentTime sets, without its datetime round trip)."""
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    out.seconds, out.nanos = seconds, nanos


def ts_to_datetime(ts: Timestamp) -> datetime:
    """`ts.ToDatetime(tzinfo=UTC)`, faster; OverflowError outside what a datetime holds."""
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def ts_from_pb(msg: object, name: str) -> datetime | None:
    if not msg.HasField(name):  # type: ignore[attr-defined]
        return None
    ts: Timestamp = getattr(msg, name)
    try:
        return ts_to_datetime(ts)
    except (ValueError, OverflowError):  # outside what a datetime holds
        raise InvalidArgument(
            "is not a timestamp between 0001-01-01 and 9999-12-31", field=name
        ) from None


def duration_to_pb(seconds: float | None, out: Duration) -> None:
    if seconds:
        out.FromNanoseconds(round(seconds * 1e9))


def duration_from_pb(msg: object, name: str) -> float | None:
    if not msg.HasField(name):  # type: ignore[attr-defined]
        return None
    d: Duration = getattr(msg, name)
    return d.ToNanoseconds() / 1e9


# --- agents and backends -------------------------------------------------------------------------


def backend_to_pb(b: ModelBackend) -> pb.ModelBackend:
    return pb.ModelBackend(
        provider=b.provider,
        model_name=b.model_name,
        context_window=b.context_window,
        modalities=list(b.modalities),
        tools=list(b.tools),
    )


def backend_from_pb(m: pb.ModelBackend) -> ModelBackend:
    return ModelBackend(
        provider=m.provider,
        model_name=m.model_name,
        context_window=m.context_window,
        modalities=tuple(m.modalities),
        tools=tuple(m.tools),
    )


def agent_to_pb(a: AgentSpec) -> pb.AgentSpec:
    return pb.AgentSpec(
        name=a.name,
        description=a.description,
        backends=[backend_to_pb(b) for b in a.backends],
        input_schema_json=a.input_schema,
        supports_sessions=a.supports_sessions,
        unavailable_reason=a.unavailable_reason,
    )


def agent_from_pb(m: pb.AgentSpec) -> AgentSpec:
    return AgentSpec(
        name=m.name,
        description=m.description,
        backends=tuple(backend_from_pb(b) for b in m.backends),
        input_schema=m.input_schema_json,
        supports_sessions=m.supports_sessions,
        unavailable_reason=m.unavailable_reason,
    )


def usage_to_pb(u: Usage, out: pb.Usage) -> None:
    out.input_tokens = u.input_tokens
    out.output_tokens = u.output_tokens
    out.cache_read_tokens = u.cache_read_tokens
    out.cache_creation_tokens = u.cache_creation_tokens
    out.cost_usd = u.cost_usd
    out.turns = u.turns
    out.duration_ms = u.duration_ms


def usage_from_pb(m: pb.Usage) -> Usage:
    return Usage(
        input_tokens=m.input_tokens,
        output_tokens=m.output_tokens,
        cache_read_tokens=m.cache_read_tokens,
        cache_creation_tokens=m.cache_creation_tokens,
        cost_usd=m.cost_usd,
        turns=m.turns,
        duration_ms=m.duration_ms,
    )


# --- tasks ---------------------------------------------------------------------------------------


def policy_to_pb(p: TaskPolicy, out: pb.TaskPolicy) -> None:
    out.priority = p.priority
    duration_to_pb(p.timeout, out.timeout)
    out.max_attempts = p.max_attempts
    out.idempotency_key = p.idempotency_key
    if p.required_labels:
        out.required_labels.update(p.required_labels)
    duration_to_pb(p.queue_timeout, out.queue_timeout)
    out.retry_on_failure = p.retry_on_failure
    out.required_provider = p.required_provider
    out.required_model = p.required_model
    out.allow_subtasks = p.allow_subtasks
    out.max_subtasks = p.max_subtasks
    out.subtask_budget_usd = p.subtask_budget_usd
    out.output_schema_json = p.output_schema
    out.output_retries = p.output_retries
    model_settings_to_pb(p.model_settings, out.model_settings)
    out.max_cost_usd = p.max_cost_usd


def model_settings_to_pb(s: ModelSettings, out: pb.ModelSettings) -> None:
    if s.empty:  # most tasks: nothing to write, and the message reads back as empty settings
        return
    out.system_prompt = s.system_prompt
    out.max_tokens = s.max_tokens
    if s.temperature is not None:
        out.temperature = s.temperature
    out.stop_sequences.extend(s.stop_sequences)
    out.append_system_prompt = s.append_system_prompt
    if s.env:
        out.env.update(s.env)
    out.mcp_servers_json = s.mcp_servers
    out.allowed_tools.extend(s.allowed_tools)
    out.disallowed_tools.extend(s.disallowed_tools)


def model_settings_from_pb(m: pb.ModelSettings) -> ModelSettings:
    if not m.ListFields():  # most tasks set none: a tenth of reading them field by field
        return ModelSettings()
    return ModelSettings(
        system_prompt=m.system_prompt,
        max_tokens=m.max_tokens,
        temperature=m.temperature if m.HasField("temperature") else None,
        stop_sequences=list(m.stop_sequences),
        append_system_prompt=m.append_system_prompt,
        env=dict(m.env),
        mcp_servers=m.mcp_servers_json,
        allowed_tools=list(m.allowed_tools),
        disallowed_tools=list(m.disallowed_tools),
    )


def run_options_to_pb(p: TaskPolicy, out: workers_pb2.RunAssignment) -> None:
    """The policy's part that the agent acts on, into the run's assignment."""
    out.output_schema_json = p.output_schema
    out.output_retries = p.output_retries
    model_settings_to_pb(p.model_settings, out.model_settings)
    out.max_cost_usd = p.max_cost_usd


def run_options_from_pb(m: workers_pb2.RunAssignment) -> RunOptions:
    """The assignment's options (the control plane checked them at submission; a schema that
    does not parse as an object here is ignored rather than failing every run)."""
    schema: dict[str, Any] | None = None
    if m.output_schema_json:
        try:
            parsed = json.loads(m.output_schema_json)
        except ValueError:
            parsed = None
        schema = parsed if isinstance(parsed, dict) else None
    return RunOptions(
        output_schema=schema,
        output_retries=m.output_retries,
        model_settings=model_settings_from_pb(m.model_settings),
        max_cost_usd=m.max_cost_usd,
    )


def policy_from_pb(m: pb.TaskPolicy, default_max_attempts: int) -> TaskPolicy:
    if not m.ListFields():  # most submissions keep every default: skip reading them one by one
        return TaskPolicy(max_attempts=default_max_attempts)
    return TaskPolicy(
        priority=m.priority,
        timeout=duration_from_pb(m, "timeout"),
        max_attempts=m.max_attempts or default_max_attempts,
        idempotency_key=m.idempotency_key,
        required_labels=dict(m.required_labels),
        queue_timeout=duration_from_pb(m, "queue_timeout"),
        retry_on_failure=m.retry_on_failure,
        required_provider=m.required_provider,
        required_model=m.required_model,
        allow_subtasks=m.allow_subtasks,
        max_subtasks=m.max_subtasks,
        subtask_budget_usd=m.subtask_budget_usd,
        output_schema=m.output_schema_json,
        output_retries=(
            m.output_retries if m.HasField("output_retries") else DEFAULT_OUTPUT_RETRIES
        ),
        model_settings=model_settings_from_pb(m.model_settings),
        max_cost_usd=m.max_cost_usd,
    )


def spec_to_pb(spec: TaskSpec) -> tasks_pb2.CreateTaskRequest:
    req = tasks_pb2.CreateTaskRequest(
        agent=spec.agent, input_json=spec.input, labels=spec.labels or None
    )
    policy_to_pb(spec.policy, req.policy)
    return req


def spec_from_pb(m: tasks_pb2.CreateTaskRequest, default_max_attempts: int) -> TaskSpec:
    """Unvalidated: the caller runs core.validation on the result."""
    return TaskSpec(
        agent=m.agent,
        input=m.input_json,
        labels=dict(m.labels),
        policy=policy_from_pb(m.policy, default_max_attempts),
    )


def run_to_pb(r: Run, out: pb.Run) -> None:
    out.id = r.id
    out.task_id = r.task_id
    out.attempt = r.attempt
    out.worker_id = r.worker_id or ""
    out.status = int(r.status)  # type: ignore[assignment]
    ts_to_pb(r.created_at, out.created_at)
    ts_to_pb(r.assigned_at, out.assigned_at)
    ts_to_pb(r.started_at, out.started_at)
    ts_to_pb(r.finished_at, out.finished_at)
    out.error = r.error
    out.result_json = r.result
    usage_to_pb(r.usage, out.usage)
    if r.backend_used is not None:
        out.backend_used.CopyFrom(backend_to_pb(r.backend_used))
    out.session_id = r.session_id
    out.prompt = r.prompt
    out.fault = int(r.fault)  # type: ignore[assignment]


def fault_from_pb(value: int) -> Fault:
    """A RunFault as a Fault; a value this side does not know is UNKNOWN."""
    try:
        return Fault(value)
    except ValueError:
        return Fault.UNKNOWN


def run_from_pb(m: pb.Run) -> Run:
    return Run(
        id=RunId(m.id),
        task_id=TaskId(m.task_id),
        attempt=m.attempt,
        status=RunStatus(m.status),
        created_at=ts_from_pb(m, "created_at") or datetime.fromtimestamp(0, UTC),
        worker_id=WorkerId(m.worker_id) if m.worker_id else None,
        assigned_at=ts_from_pb(m, "assigned_at"),
        started_at=ts_from_pb(m, "started_at"),
        finished_at=ts_from_pb(m, "finished_at"),
        error=m.error,
        result=m.result_json,
        usage=usage_from_pb(m.usage),
        backend_used=backend_from_pb(m.backend_used) if m.HasField("backend_used") else None,
        session_id=m.session_id,
        prompt=m.prompt,
        fault=fault_from_pb(m.fault),
    )


def task_to_pb(t: Task, runs: list[Run] | None = None) -> pb.Task:
    out = pb.Task(
        id=t.id,
        agent=t.agent,
        input_json=t.input,
        labels=t.labels or None,
        status=int(t.status),  # type: ignore[arg-type]
        attempts=t.attempts,
        current_run_id=t.current_run_id or "",
        worker_id=t.worker_id or "",
        error=t.error,
        result_json=t.result,
        schedule=t.schedule,
        cancel_requested=t.cancel_requested,
        conversation_id=t.conversation_id or "",
        turn=t.turn,
        parent_task_id=t.parent_task_id or "",
        root_task_id=t.root_task_id or "",
        depth=t.depth,
    )
    policy_to_pb(t.policy, out.policy)
    ts_to_pb(t.created_at, out.created_at)
    ts_to_pb(t.updated_at, out.updated_at)
    ts_to_pb(t.finished_at, out.finished_at)
    usage_to_pb(t.usage, out.usage)
    for r in runs or ():
        run_to_pb(r, out.runs.add())
    return out


def task_from_pb(m: pb.Task) -> tuple[Task, list[Run]]:
    epoch = datetime.fromtimestamp(0, UTC)
    task = Task(
        id=TaskId(m.id),
        agent=m.agent,
        input=m.input_json,
        labels=dict(m.labels),
        policy=policy_from_pb(m.policy, m.policy.max_attempts),
        status=TaskStatus(m.status),
        created_at=ts_from_pb(m, "created_at") or epoch,
        updated_at=ts_from_pb(m, "updated_at") or epoch,
        attempts=m.attempts,
        current_run_id=RunId(m.current_run_id) if m.current_run_id else None,
        worker_id=WorkerId(m.worker_id) if m.worker_id else None,
        finished_at=ts_from_pb(m, "finished_at"),
        error=m.error,
        result=m.result_json,
        usage=usage_from_pb(m.usage),
        schedule=m.schedule,
        cancel_requested=m.cancel_requested,
        waiting_reason=m.waiting_reason,
        conversation_id=ConversationId(m.conversation_id) if m.conversation_id else None,
        turn=m.turn,
        parent_task_id=TaskId(m.parent_task_id) if m.parent_task_id else None,
        root_task_id=TaskId(m.root_task_id) if m.root_task_id else None,
        depth=m.depth,
    )
    return task, [run_from_pb(r) for r in m.runs]


def subtasks_from_pb(m: pb.Task) -> list[Task]:
    """The tasks below `m` that GetTask filled in (oldest first, each naming its parent)."""
    return [task_from_pb(s)[0] for s in m.subtasks]


# --- conversations -------------------------------------------------------------------------------


def turn_to_pb(t: Turn, out: conversations_pb2.Turn) -> None:
    out.index, out.task_id, out.message = t.index, t.task_id, t.message
    out.status = int(t.status)  # type: ignore[assignment]
    out.answer, out.tools_json, out.error = t.answer, t.tools, t.error
    usage_to_pb(t.usage, out.usage)
    ts_to_pb(t.created_at, out.created_at)
    ts_to_pb(t.finished_at, out.finished_at)


def turn_from_pb(m: conversations_pb2.Turn, conversation_id: ConversationId) -> Turn:
    return Turn(
        conversation_id=conversation_id,
        index=m.index,
        task_id=TaskId(m.task_id),
        message=m.message,
        created_at=ts_from_pb(m, "created_at") or datetime.fromtimestamp(0, UTC),
        status=TaskStatus(m.status),
        answer=m.answer,
        tools=m.tools_json,
        error=m.error,
        usage=usage_from_pb(m.usage),
        finished_at=ts_from_pb(m, "finished_at"),
    )


def conversation_to_pb(
    c: Conversation, turns: list[Turn] | None = None
) -> conversations_pb2.Conversation:
    out = conversations_pb2.Conversation(
        id=c.id,
        agent=c.agent,
        title=c.title,
        labels=c.labels or None,
        input_json=c.input,
        turn_count=c.turns,
        session_id=c.session_id,
        session_snapshot_bytes=len(c.session_snapshot),
        summarized_through=c.summarized_through,
    )
    policy_to_pb(c.policy, out.policy)
    ts_to_pb(c.created_at, out.created_at)
    ts_to_pb(c.updated_at, out.updated_at)
    usage_to_pb(c.usage, out.usage)
    for turn in turns or ():
        turn_to_pb(turn, out.turns.add())
    return out


def conversation_from_pb(m: conversations_pb2.Conversation) -> tuple[Conversation, list[Turn]]:
    """The conversation as the client sees it (no session snapshot), with its turns."""
    epoch = datetime.fromtimestamp(0, UTC)
    conversation = Conversation(
        id=ConversationId(m.id),
        agent=m.agent,
        title=m.title,
        labels=dict(m.labels),
        input=m.input_json,
        policy=policy_from_pb(m.policy, m.policy.max_attempts),
        created_at=ts_from_pb(m, "created_at") or epoch,
        updated_at=ts_from_pb(m, "updated_at") or epoch,
        turns=m.turn_count,
        usage=usage_from_pb(m.usage),
        session_id=m.session_id,
        summarized_through=m.summarized_through,
    )
    return conversation, [turn_from_pb(t, conversation.id) for t in m.turns]


def turn_context_to_pb(c: TurnContext, out: workers_pb2.TurnContext) -> None:
    out.conversation_id, out.turn = c.conversation_id, c.turn
    for message in c.history:
        out.history.add(role=message.role, text=message.text, turn=message.turn)
    out.session_id, out.session_snapshot = c.session_id, c.session_snapshot
    out.session_cost_usd = c.session_cost_usd
    out.summarize_through = c.summarize_through
    out.session_turn = c.session_turn


def turn_context_from_pb(m: workers_pb2.TurnContext) -> TurnContext:
    return TurnContext(
        conversation_id=ConversationId(m.conversation_id),
        turn=m.turn,
        history=tuple(TranscriptMessage(h.role, h.text, h.turn) for h in m.history),
        session_id=m.session_id,
        session_snapshot=m.session_snapshot,
        session_cost_usd=m.session_cost_usd,
        summarize_through=m.summarize_through,
        session_turn=m.session_turn,
    )


# --- output --------------------------------------------------------------------------------------


def chunk_to_pb(c: OutputChunk, out: pb.OutputChunk) -> None:
    out.run_id = c.run_id
    out.attempt = c.attempt
    out.seq = c.seq
    out.kind = int(c.kind)  # type: ignore[assignment]
    out.data = c.data
    ts_to_pb(c.time, out.time)
    if c.task_id:
        out.task_id = c.task_id


def chunk_from_pb(m: pb.OutputChunk, task_id: TaskId | None = None) -> OutputChunk:
    return OutputChunk(
        run_id=RunId(m.run_id),
        attempt=m.attempt,
        seq=m.seq,
        data=m.data,
        kind=OutputKind(m.kind) if m.kind else OutputKind.TEXT,
        time=ts_from_pb(m, "time"),
        task_id=task_id or (TaskId(m.task_id) if m.task_id else None),
    )


# --- workers -------------------------------------------------------------------------------------


def worker_to_pb(w: Worker, active_runs: list[RunId] | None = None) -> pb.Worker:
    out = pb.Worker(
        id=w.id,
        hostname=w.hostname,
        version=w.version,
        agents=[agent_to_pb(a) for a in w.agents],
        labels=w.labels or None,
        max_concurrent_runs=w.max_concurrent_runs,
        active_runs=len(active_runs or ()),
        status=int(w.status),  # type: ignore[arg-type]
        run_ids=list(active_runs or ()),
        revoked_reason=w.revoked_reason,
        consecutive_failures=w.consecutive_failures,
        quarantine_reason=w.quarantine_reason,
    )
    ts_to_pb(w.quarantined_until, out.quarantined_until)
    ts_to_pb(w.connected_at, out.connected_at)
    ts_to_pb(w.last_heartbeat_at, out.last_heartbeat_at)
    ts_to_pb(w.certificate_expires_at, out.certificate_expires_at)
    ts_to_pb(w.first_seen_at, out.first_seen_at)
    ts_to_pb(w.revoked_at, out.revoked_at)
    return out


def worker_from_pb(m: pb.Worker) -> tuple[Worker, list[RunId]]:
    worker = Worker(
        id=WorkerId(m.id),
        hostname=m.hostname,
        version=m.version,
        agents=tuple(agent_from_pb(a) for a in m.agents),
        labels=dict(m.labels),
        max_concurrent_runs=m.max_concurrent_runs,
        status=WorkerStatus(m.status) if m.status else WorkerStatus.OFFLINE,
        first_seen_at=ts_from_pb(m, "first_seen_at"),
        connected_at=ts_from_pb(m, "connected_at"),
        last_heartbeat_at=ts_from_pb(m, "last_heartbeat_at"),
        certificate_expires_at=ts_from_pb(m, "certificate_expires_at"),
        revoked_at=ts_from_pb(m, "revoked_at"),
        revoked_reason=m.revoked_reason,
        consecutive_failures=m.consecutive_failures,
        quarantined_until=ts_from_pb(m, "quarantined_until"),
        quarantine_reason=m.quarantine_reason,
    )
    return worker, [RunId(r) for r in m.run_ids]


# --- access control ------------------------------------------------------------------------------


def bootstrap_token_to_pb(t: BootstrapToken, now: datetime) -> security_pb2.BootstrapToken:
    out = security_pb2.BootstrapToken(
        token_id=t.id,
        worker_id=t.worker_id,
        labels=t.labels or None,
        state=int(t.state(now)),  # type: ignore[arg-type]
        created_by=t.created_by,
        used_by_host=t.used_by_host,
    )
    ts_to_pb(t.created_at, out.created_at)
    ts_to_pb(t.expires_at, out.expires_at)
    ts_to_pb(t.used_at, out.used_at)
    ts_to_pb(t.revoked_at, out.revoked_at)
    return out


def api_token_to_pb(t: ApiToken, now: datetime) -> security_pb2.ApiToken:
    out = security_pb2.ApiToken(
        token_id=t.id,
        name=t.name,
        scopes=sorted(s.value for s in t.scopes),
        state=int(t.state(now)),  # type: ignore[arg-type]
        created_by=t.created_by,
    )
    ts_to_pb(t.created_at, out.created_at)
    ts_to_pb(t.expires_at, out.expires_at)
    ts_to_pb(t.revoked_at, out.revoked_at)
    return out


def scopes_from_pb(values: list[str], field: str = "scopes") -> frozenset[Scope]:
    """The scopes named; INVALID_ARGUMENT for an unknown or missing one."""
    if not values:
        raise InvalidArgument(
            f"must name at least one of {', '.join(s.value for s in Scope)}", field=field
        )
    try:
        return frozenset(Scope(v) for v in values)
    except ValueError:
        bad = next(v for v in values if v not in {s.value for s in Scope})
        raise InvalidArgument(
            f"unknown scope {quoted(bad)}; use {', '.join(s.value for s in Scope)}", field=field
        ) from None


def audit_event_to_pb(e: AuditEvent) -> security_pb2.AuditEvent:
    out = security_pb2.AuditEvent(
        id=e.id,
        kind=e.kind.value,
        principal=e.principal,
        subject=e.subject,
        peer=e.peer,
        detail=e.detail,
    )
    ts_to_pb(e.time, out.time)
    return out


def audit_event_from_pb(m: security_pb2.AuditEvent) -> AuditEvent:
    return AuditEvent(
        id=m.id,
        time=ts_from_pb(m, "time") or datetime.fromtimestamp(0, UTC),
        kind=AuditKind(m.kind),
        principal=m.principal,
        subject=m.subject,
        peer=m.peer,
        detail=m.detail,
    )


# --- schedules -----------------------------------------------------------------------------------

# UpdateSchedule's update_mask paths and the Schedule attributes they name.
SCHEDULE_UPDATE_PATHS: dict[str, str] = {
    "agent": "agent",
    "input_json": "input",
    "labels": "labels",
    "policy": "policy",
    "cron": "cron",
    "rrule": "rrule",
    "timezone": "timezone",
    "misfire_policy": "misfire",
    "overlap_policy": "overlap",
}


def schedule_to_pb(s: Schedule) -> schedules_pb2.Schedule:
    out = schedules_pb2.Schedule(
        name=s.name,
        agent=s.agent,
        input_json=s.input,
        labels=s.labels or None,
        cron=s.cron,
        rrule=s.rrule,
        timezone=s.timezone,
        misfire_policy=int(s.misfire),  # type: ignore[arg-type]
        overlap_policy=int(s.overlap),  # type: ignore[arg-type]
        paused=s.paused,
        last_task_id=s.last_task_id or "",
        last_outcome=s.last_outcome,
        workflow=s.workflow,
    )
    policy_to_pb(s.policy, out.policy)
    ts_to_pb(s.created_at, out.created_at)
    ts_to_pb(s.updated_at, out.updated_at)
    ts_to_pb(s.last_fire_time, out.last_fire_time)
    ts_to_pb(s.next_fire_time, out.next_fire_time)
    return out


def schedule_from_pb(
    m: schedules_pb2.Schedule, default_max_attempts: int, field_prefix: str = ""
) -> Schedule:
    """Unvalidated (the caller runs core.schedule validation), except for unknown enum values.

    Unspecified policies take their defaults: misfire RUN_ONCE, overlap SKIP.
    """
    try:
        misfire = MisfirePolicy(m.misfire_policy) if m.misfire_policy else MisfirePolicy.RUN_ONCE
    except ValueError:
        raise InvalidArgument(
            f"unknown misfire policy {m.misfire_policy}", field=f"{field_prefix}misfire_policy"
        ) from None
    try:
        overlap = OverlapPolicy(m.overlap_policy) if m.overlap_policy else OverlapPolicy.SKIP
    except ValueError:
        raise InvalidArgument(
            f"unknown overlap policy {m.overlap_policy}", field=f"{field_prefix}overlap_policy"
        ) from None
    epoch = datetime.fromtimestamp(0, UTC)
    return Schedule(
        name=m.name,
        agent=m.agent,
        timezone=m.timezone,
        cron=m.cron,
        rrule=m.rrule,
        input=m.input_json,
        labels=dict(m.labels),
        policy=policy_from_pb(m.policy, default_max_attempts),
        misfire=misfire,
        overlap=overlap,
        paused=m.paused,
        created_at=ts_from_pb(m, "created_at") or epoch,
        updated_at=ts_from_pb(m, "updated_at") or epoch,
        last_fire_time=ts_from_pb(m, "last_fire_time"),
        next_fire_time=ts_from_pb(m, "next_fire_time"),
        last_task_id=TaskId(m.last_task_id) if m.last_task_id else None,
        last_outcome=m.last_outcome,
        workflow=m.workflow,
    )


def fire_time_to_pb(instant: datetime, zone: ZoneInfo) -> schedules_pb2.FireTime:
    out = schedules_pb2.FireTime(local_time=instant.astimezone(zone).isoformat())
    out.time.FromDatetime(instant)
    return out


def fire_time_from_pb(m: schedules_pb2.FireTime) -> tuple[datetime, str]:
    """The instant (UTC) and its ISO 8601 local time in the schedule's zone."""
    return m.time.ToDatetime(tzinfo=UTC), m.local_time


# --- JSON (the HTTP API, MCP answers and webhook bodies) -----------------------------------------


def to_json_dict(message: Message) -> dict[str, Any]:
    """The protobuf JSON mapping of a message, with snake_case names and every field shown
    (json_format's answer, printed faster: see `taskrun.pbjson`)."""
    return pbjson.to_dict(message)


def parse_json_dict(value: dict[str, Any], message: Message) -> None:
    """Fill `message` from its JSON mapping; json_format.ParseError names the field."""
    json_format.ParseDict(value, message)


# --- webhooks ------------------------------------------------------------------------------------


def webhook_to_pb(w: Webhook) -> webhooks_pb2.Webhook:
    m = webhooks_pb2.Webhook(
        id=w.id,
        url=w.url,
        events=sorted(str(e) for e in w.events),
        labels=w.labels or None,
        agent=w.agent,
        schedule=w.schedule,
        description=w.description,
        created_by=w.created_by,
    )
    ts_to_pb(w.created_at, m.created_at)
    return m


def delivery_to_pb(d: WebhookDelivery) -> webhooks_pb2.WebhookDelivery:
    m = webhooks_pb2.WebhookDelivery(
        id=d.id,
        webhook_id=d.webhook_id,
        event=str(d.event),
        event_key=d.event_key,
        status=str(d.status),
        attempts=d.attempts,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
    )
    ts_to_pb(d.created_at, m.created_at)
    ts_to_pb(d.next_attempt_at, m.next_attempt_at)
    ts_to_pb(d.delivered_at, m.delivered_at)
    return m


def webhook_from_pb(m: webhooks_pb2.Webhook) -> Webhook:
    """A listed webhook (its secret is never sent back: empty here)."""
    return Webhook(
        id=m.id,
        url=m.url,
        events=frozenset(WebhookEvent(e) for e in m.events if e in set(WebhookEvent)),
        secret="",
        created_at=ts_from_pb(m, "created_at") or datetime.fromtimestamp(0, UTC),
        labels=dict(m.labels),
        agent=m.agent,
        schedule=m.schedule,
        description=m.description,
        created_by=m.created_by,
    )


def delivery_from_pb(m: webhooks_pb2.WebhookDelivery) -> WebhookDelivery:
    epoch = datetime.fromtimestamp(0, UTC)
    return WebhookDelivery(
        id=m.id,
        webhook_id=m.webhook_id,
        event=WebhookEvent(m.event),
        event_key=m.event_key,
        payload="",
        created_at=ts_from_pb(m, "created_at") or epoch,
        next_attempt_at=ts_from_pb(m, "next_attempt_at") or epoch,
        status=DeliveryStatus(m.status),
        attempts=m.attempts,
        last_status_code=m.last_status_code,
        last_error=m.last_error,
        delivered_at=ts_from_pb(m, "delivered_at"),
    )


# --- workflows ----------------------------------------------------------------------


def workflow_to_pb(w: Workflow) -> workflows_pb2.Workflow:
    out = workflows_pb2.Workflow(
        name=w.name,
        version=w.version,
        description=w.description,
        definition_json=json.dumps(w.definition),
    )
    ts_to_pb(w.created_at, out.created_at)
    return out


def workflow_from_pb(m: workflows_pb2.Workflow) -> Workflow:
    return Workflow(
        name=m.name,
        version=m.version,
        definition=json.loads(m.definition_json or "{}"),
        created_at=ts_from_pb(m, "created_at") or datetime.fromtimestamp(0, UTC),
        description=m.description,
    )


def _json_or_empty(value: Any) -> str:
    return "" if value is None else json.dumps(value)


def workflow_run_to_pb(r: WorkflowRun) -> workflows_pb2.WorkflowRun:
    out = workflows_pb2.WorkflowRun(
        id=r.id,
        workflow=r.workflow,
        version=r.version,
        status=f"WORKFLOW_RUN_STATUS_{r.status.name}",
        input_json=json.dumps(r.input),
        idempotency_key=r.idempotency_key,
        error=r.error,
    )
    ts_to_pb(r.created_at, out.created_at)
    ts_to_pb(r.updated_at, out.updated_at)
    ts_to_pb(r.finished_at, out.finished_at)
    for step in r.steps.values():
        s = out.steps.add(
            name=step.name,
            kind=step.kind,
            status=f"STEP_STATUS_{step.status.name}",
            task_id=step.task_id,
            result_json=_json_or_empty(step.result),
            error=step.error,
            inbox_item_id=step.inbox_item_id,
            branch=step.branch,
            question=step.question,
            choices=list(step.choices),
            comment=step.comment,
            answered_by=step.answered_by,
        )
        ts_to_pb(step.started_at, s.started_at)
        ts_to_pb(step.finished_at, s.finished_at)
        ts_to_pb(step.due_at, s.due_at)
    return out


def workflow_run_from_pb(m: workflows_pb2.WorkflowRun) -> WorkflowRun:
    steps = {
        s.name: Step(
            name=s.name,
            kind=s.kind,
            status=StepStatus[workflows_pb2.StepStatus.Name(s.status).removeprefix("STEP_STATUS_")],
            task_id=s.task_id,
            result=json.loads(s.result_json) if s.result_json else None,
            error=s.error,
            started_at=ts_from_pb(s, "started_at"),
            finished_at=ts_from_pb(s, "finished_at"),
            due_at=ts_from_pb(s, "due_at"),
            inbox_item_id=s.inbox_item_id,
            branch=s.branch,
            question=s.question,
            choices=list(s.choices),
            comment=s.comment,
            answered_by=s.answered_by,
        )
        for s in m.steps
    }
    epoch = datetime.fromtimestamp(0, UTC)
    return WorkflowRun(
        id=m.id,
        workflow=m.workflow,
        version=m.version,
        input=json.loads(m.input_json or "{}"),
        status=WorkflowRunStatus[
            workflows_pb2.WorkflowRunStatus.Name(m.status).removeprefix("WORKFLOW_RUN_STATUS_")
        ],
        created_at=ts_from_pb(m, "created_at") or epoch,
        updated_at=ts_from_pb(m, "updated_at") or epoch,
        steps=steps,
        idempotency_key=m.idempotency_key,
        finished_at=ts_from_pb(m, "finished_at"),
        error=m.error,
    )


def inbox_item_to_pb(i: InboxItem) -> workflows_pb2.InboxItem:
    out = workflows_pb2.InboxItem(
        id=i.id,
        workflow_run_id=i.run_id,
        workflow=i.workflow,
        step=i.step,
        question=i.question,
        choices=list(i.choices),
    )
    ts_to_pb(i.created_at, out.created_at)
    ts_to_pb(i.due_at, out.due_at)
    return out


def inbox_item_from_pb(m: workflows_pb2.InboxItem) -> InboxItem:
    return InboxItem(
        id=m.id,
        run_id=m.workflow_run_id,
        workflow=m.workflow,
        step=m.step,
        question=m.question,
        choices=tuple(m.choices),
        created_at=ts_from_pb(m, "created_at") or datetime.fromtimestamp(0, UTC),
        due_at=ts_from_pb(m, "due_at"),
    )
