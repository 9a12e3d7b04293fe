"""What the SQL stores (SQLite, PostgreSQL) share: each table's columns, and the mapping between
rows and core models.

Writes: `task_row(task)` and friends encode a model into a tuple of parameters in the order of
the table's column list (`TASK_COLUMNS`, ...), which the dialects' INSERT statements are built
from. Reads: `task_from(row)` and friends read a row by column name (an `sqlite3.Row`, a
psycopg dict row), so a SELECT may name its columns in any order.

Encodings, the same in both dialects:
- datetimes: integer microseconds since the Unix epoch (UTC); they come back as timezone-aware
  UTC datetimes equal to what was written. Naive datetimes are refused with ValueError.
- labels, policies, usage, agents, a run's backend, API token scopes: JSON text (SQLite TEXT,
  PostgreSQL jsonb read back as text).
- statuses and other enums: their integer (or, for audit kinds, string) values.

Why one module: one job, for every table: its columns and the mapping between its rows and
the core models; it is long because there are many tables, not many jobs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Protocol, TypeVar

from taskrun.core.access import ApiToken, AuditEvent, AuditKind, BootstrapToken, Scope
from taskrun.core.ids import WorkerId
from taskrun.core.models import (
    AgentSpec,
    Conversation,
    ModelBackend,
    ModelSettings,
    OutputChunk,
    OutputKind,
    Run,
    Task,
    TaskPolicy,
    Turn,
    Usage,
    Worker,
)
from taskrun.core.schedule import MisfirePolicy, OverlapPolicy, Schedule
from taskrun.core.status import Fault, RunStatus, TaskStatus, WorkerStatus
from taskrun.core.store import LateUsage, UsageSum
from taskrun.core.webhooks import DeliveryStatus, Webhook, WebhookDelivery, WebhookEvent
from taskrun.core.workflow import (
    Workflow,
    WorkflowRun,
    WorkflowRunStatus,
    decode_run_state,
    encode_run_state,
)

Params = tuple[Any, ...]


class RowLike(Protocol):
    """A row whose values are found by column name (sqlite3.Row, a dict)."""

    def __getitem__(self, key: str, /) -> Any: ...


# --- columns, in the order of the parameters the encoders produce ------------------------------

TASK_COLUMNS: Final = (
    "id",
    "agent",
    "input",
    "labels",
    "policy",
    "status",
    "attempts",
    "current_run_id",
    "worker_id",
    "created_at",
    "updated_at",
    "finished_at",
    "error",
    "result",
    "usage",
    "schedule",
    "cancel_requested",
    "conversation_id",
    "turn",
    "idempotency_key",  # a copy of policy.idempotency_key, for its unique index
    "parent_task_id",
    "root_task_id",
    "depth",
)
# What a task or run is created with and never changes afterwards (core.store: its later upserts
# carry the same values). An upsert of an existing row leaves them, and the indexes over them
# (agent, schedule, tree), untouched: a status change rewrites the indexes over status and
# worker instead of all of them.
TASK_SET_ONCE: Final = (
    "agent",
    "input",
    "labels",
    "created_at",
    "schedule",
    "parent_task_id",
    "root_task_id",
    "depth",
)
RUN_SET_ONCE: Final = ("task_id", "attempt", "created_at")
RUN_COLUMNS: Final = (
    "id",
    "task_id",
    "attempt",
    "status",
    "worker_id",
    "created_at",
    "assigned_at",
    "started_at",
    "finished_at",
    "error",
    "result",
    "usage",
    "backend_used",
    "session_id",
    "prompt",
    "credential_hash",
    "fault",
)
WORKER_COLUMNS: Final = (
    "id",
    "hostname",
    "version",
    "agents",
    "labels",
    "max_concurrent_runs",
    "status",
    "first_seen_at",
    "connected_at",
    "last_heartbeat_at",
    "certificate_expires_at",
    "revoked_at",
    "revoked_reason",
    "enrolled_labels",
    "enrolled_at",
)
CHUNK_COLUMNS: Final = ("run_id", "attempt", "seq", "kind", "data", "time")
SCHEDULE_COLUMNS: Final = (
    "name",
    "agent",
    "input",
    "labels",
    "policy",
    "cron",
    "rrule",
    "timezone",
    "misfire",
    "overlap",
    "paused",
    "created_at",
    "updated_at",
    "last_fire_time",
    "next_fire_time",
    "last_task_id",
    "last_outcome",
    "workflow",
)
BOOTSTRAP_COLUMNS: Final = (
    "id",
    "secret_hash",
    "worker_id",
    "created_at",
    "expires_at",
    "labels",
    "created_by",
    "used_at",
    "used_by_host",
    "revoked_at",
)
API_TOKEN_COLUMNS: Final = (
    "id",
    "secret_hash",
    "name",
    "scopes",
    "created_at",
    "expires_at",
    "created_by",
    "revoked_at",
)
AUDIT_COLUMNS: Final = ("id", "time", "kind", "principal", "subject", "peer", "detail")

# Unfinished statuses, as the integers stored (the partial indexes use the same lists).
UNFINISHED_TASK_STATUSES: Final = (int(TaskStatus.PENDING), int(TaskStatus.RUNNING))
UNFINISHED_RUN_STATUSES: Final = (
    int(RunStatus.PENDING),
    int(RunStatus.ASSIGNED),
    int(RunStatus.RUNNING),
)


def column_list(columns: Sequence[str], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{c}" for c in columns)


def upsert_sql(table: str, columns: Sequence[str], mark: str, set_once: Sequence[str] = ()) -> str:
    """INSERT ... ON CONFLICT (first column) DO UPDATE, with `mark` as the placeholder ("?" for
    SQLite, "%s" for psycopg); the same statement in both dialects. The `set_once` columns are
    written by the insert and left alone by the update, and so are the indexes over them."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns[1:] if c not in set_once)
    return (
        f"INSERT INTO {table} ({column_list(columns)})"
        f" VALUES ({', '.join([mark] * len(columns))})"
        f" ON CONFLICT ({columns[0]}) DO UPDATE SET {updates}"
    )


# --- values ------------------------------------------------------------------------------------

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
dumps: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
loads: Final = json.loads


def us(value: datetime) -> int:
    """Microseconds since the epoch; ValueError for a naive datetime."""
    try:
        return (value - _EPOCH) // _MICROSECOND
    except TypeError:
        raise ValueError(f"datetimes must be timezone-aware, got {value!r}") from None


def us_or_none(value: datetime | None) -> int | None:
    return None if value is None else us(value)


def dt(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def dt_or_none(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


_NO_USAGE: Final = Usage()
_NO_USAGE_JSON: Final = dumps(dataclasses.asdict(_NO_USAGE))  # the common case, precomputed


def usage_json(u: Usage) -> str:
    if u == _NO_USAGE:
        return _NO_USAGE_JSON
    return dumps(
        {
            "input_tokens": u.input_tokens,
            "output_tokens": u.output_tokens,
            "cache_read_tokens": u.cache_read_tokens,
            "cache_creation_tokens": u.cache_creation_tokens,
            "cost_usd": u.cost_usd,
            "turns": u.turns,
            "duration_ms": u.duration_ms,
        }
    )


def usage_from(text: str) -> Usage:
    return Usage() if text == _NO_USAGE_JSON else Usage(**loads(text))


def policy_json(p: TaskPolicy) -> str:
    if p.required_labels or p.idempotency_key or not p.model_settings.empty:
        return _policy_json(p)
    # the rest are scalars: tasks submitted alike share one encoding
    return _plain_policy_json(
        p.priority,
        p.timeout,
        p.max_attempts,
        p.queue_timeout,
        p.retry_on_failure,
        p.required_provider,
        p.required_model,
        p.output_retries,
        p.allow_subtasks,
        p.max_subtasks,
        p.subtask_budget_usd,
        p.output_schema,
        p.max_cost_usd,
    )


@functools.lru_cache(maxsize=256, typed=True)  # typed: 0 and 0.0 encode apart
def _plain_policy_json(  # one argument per scalar field of TaskPolicy
    priority: int,
    timeout: float | None,
    max_attempts: int,
    queue_timeout: float | None,
    retry_on_failure: bool,
    required_provider: str,
    required_model: str,
    output_retries: int,
    allow_subtasks: bool,
    max_subtasks: int,
    subtask_budget_usd: float,
    output_schema: str,
    max_cost_usd: float,
) -> str:
    return _policy_json(
        TaskPolicy(
            priority=priority,
            timeout=timeout,
            max_attempts=max_attempts,
            queue_timeout=queue_timeout,
            retry_on_failure=retry_on_failure,
            required_provider=required_provider,
            required_model=required_model,
            output_retries=output_retries,
            allow_subtasks=allow_subtasks,
            max_subtasks=max_subtasks,
            subtask_budget_usd=subtask_budget_usd,
            output_schema=output_schema,
            max_cost_usd=max_cost_usd,
        )
    )


def _policy_json(p: TaskPolicy) -> str:
    fields: dict[str, Any] = {
        "priority": p.priority,
        "timeout": p.timeout,
        "max_attempts": p.max_attempts,
        "idempotency_key": p.idempotency_key,
        "required_labels": p.required_labels,
        "queue_timeout": p.queue_timeout,
        "retry_on_failure": p.retry_on_failure,
        "required_provider": p.required_provider,
        "required_model": p.required_model,
        "output_retries": p.output_retries,
        "allow_subtasks": p.allow_subtasks,
        "max_subtasks": p.max_subtasks,
        "subtask_budget_usd": p.subtask_budget_usd,
    }
    # written only when set: most tasks have none, and rows from before them stay alike
    if p.output_schema:
        fields["output_schema"] = p.output_schema
    if not p.model_settings.empty:
        fields["model_settings"] = dataclasses.asdict(p.model_settings)
    if p.max_cost_usd:
        fields["max_cost_usd"] = p.max_cost_usd
    return dumps(fields)


@functools.lru_cache(maxsize=1024)  # most tasks share a handful of policies
def _policy_fields(text: str) -> dict[str, Any]:
    fields: dict[str, Any] = loads(text)
    return fields


def policy_from(text: str) -> TaskPolicy:
    fields = dict(_policy_fields(text))
    settings: dict[str, Any] | None = fields.pop("model_settings", None)
    policy = TaskPolicy(**fields)
    policy.required_labels = dict(policy.required_labels)  # never share the cached dict
    if settings:  # a fresh object from the cached dict's values, copied likewise
        copied: dict[str, Any] = {
            k: v.copy() if isinstance(v, dict | list) else v for k, v in settings.items()
        }
        policy.model_settings = ModelSettings(**copied)
    return policy


def _backend_dict(b: ModelBackend) -> dict[str, Any]:
    return {
        "provider": b.provider,
        "model_name": b.model_name,
        "context_window": b.context_window,
        "modalities": list(b.modalities),
        "tools": list(b.tools),
    }


def _backend(d: dict[str, Any]) -> ModelBackend:
    return ModelBackend(
        provider=d["provider"],
        model_name=d["model_name"],
        context_window=d["context_window"],
        modalities=tuple(d["modalities"]),
        tools=tuple(d["tools"]),
    )


def agents_json(agents: Sequence[AgentSpec]) -> str:
    return dumps(
        [
            {
                "name": a.name,
                "description": a.description,
                "backends": [_backend_dict(b) for b in a.backends],
                "input_schema": a.input_schema,
                "supports_sessions": a.supports_sessions,
                "unavailable_reason": a.unavailable_reason,
            }
            for a in agents
        ]
    )


def agents_from(text: str) -> tuple[AgentSpec, ...]:
    return tuple(
        AgentSpec(
            name=a["name"],
            description=a["description"],
            backends=tuple(_backend(b) for b in a["backends"]),
            input_schema=a["input_schema"],
            supports_sessions=a["supports_sessions"],
            unavailable_reason=a.get("unavailable_reason", ""),  # rows from before it existed
        )
        for a in loads(text)
    )


# --- tasks, runs, workers, output --------------------------------------------------------------


_Identified = TypeVar("_Identified", Task, Run)


def once_each(items: list[_Identified]) -> list[_Identified]:
    """Each id once, as its last item has it (a change set may name a task twice: created, then
    assigned in the same commit): one upsert instead of two."""
    if len(items) < 2:
        return items
    latest = {item.id: item for item in items}
    return items if len(latest) == len(items) else list(latest.values())


def task_row(t: Task) -> Params:
    p = t.policy
    return (
        t.id,
        t.agent,
        t.input,
        dumps(t.labels) if t.labels else "{}",
        policy_json(p),
        int(t.status),
        t.attempts,
        t.current_run_id,
        t.worker_id,
        us(t.created_at),
        us(t.updated_at),
        us_or_none(t.finished_at),
        t.error,
        t.result,
        usage_json(t.usage),
        t.schedule,
        int(t.cancel_requested),
        t.conversation_id,
        t.turn,
        p.idempotency_key,
        t.parent_task_id,
        t.root_task_id,
        t.depth,
    )


def task_from(r: RowLike) -> Task:
    return Task(
        id=r["id"],
        agent=r["agent"],
        input=r["input"],
        labels=loads(r["labels"]),
        policy=policy_from(r["policy"]),
        status=TaskStatus(r["status"]),
        attempts=r["attempts"],
        current_run_id=r["current_run_id"],
        worker_id=r["worker_id"],
        created_at=dt(r["created_at"]),
        updated_at=dt(r["updated_at"]),
        finished_at=dt_or_none(r["finished_at"]),
        error=r["error"],
        result=r["result"],
        usage=usage_from(r["usage"]),
        schedule=r["schedule"],
        cancel_requested=bool(r["cancel_requested"]),
        conversation_id=r["conversation_id"],
        turn=r["turn"],
        parent_task_id=r["parent_task_id"],
        root_task_id=r["root_task_id"],
        depth=r["depth"],
    )


def run_row(r: Run) -> Params:
    b = r.backend_used
    return (
        r.id,
        r.task_id,
        r.attempt,
        int(r.status),
        r.worker_id,
        us(r.created_at),
        us_or_none(r.assigned_at),
        us_or_none(r.started_at),
        us_or_none(r.finished_at),
        r.error,
        r.result,
        usage_json(r.usage),
        None if b is None else dumps(_backend_dict(b)),
        r.session_id,
        r.prompt,
        r.credential_hash,
        int(r.fault),
    )


def run_from(r: RowLike) -> Run:
    backend = r["backend_used"]
    return Run(
        id=r["id"],
        task_id=r["task_id"],
        attempt=r["attempt"],
        status=RunStatus(r["status"]),
        worker_id=r["worker_id"],
        created_at=dt(r["created_at"]),
        assigned_at=dt_or_none(r["assigned_at"]),
        started_at=dt_or_none(r["started_at"]),
        finished_at=dt_or_none(r["finished_at"]),
        error=r["error"],
        result=r["result"],
        usage=usage_from(r["usage"]),
        backend_used=None if backend is None else _backend(loads(backend)),
        session_id=r["session_id"],
        prompt=r["prompt"],
        credential_hash=r["credential_hash"],
        fault=Fault(r["fault"]),
    )


def worker_row(w: Worker) -> Params:
    return (
        w.id,
        w.hostname,
        w.version,
        agents_json(w.agents),
        dumps(w.labels),
        w.max_concurrent_runs,
        int(w.status),
        us_or_none(w.first_seen_at),
        us_or_none(w.connected_at),
        us_or_none(w.last_heartbeat_at),
        us_or_none(w.certificate_expires_at),
        us_or_none(w.revoked_at),
        w.revoked_reason,
        dumps(w.enrolled_labels),
        us_or_none(w.enrolled_at),
    )


def worker_from(r: RowLike) -> Worker:
    return Worker(
        id=r["id"],
        hostname=r["hostname"],
        version=r["version"],
        agents=agents_from(r["agents"]),
        labels=loads(r["labels"]),
        max_concurrent_runs=r["max_concurrent_runs"],
        status=WorkerStatus(r["status"]),
        first_seen_at=dt_or_none(r["first_seen_at"]),
        connected_at=dt_or_none(r["connected_at"]),
        last_heartbeat_at=dt_or_none(r["last_heartbeat_at"]),
        certificate_expires_at=dt_or_none(r["certificate_expires_at"]),
        revoked_at=dt_or_none(r["revoked_at"]),
        revoked_reason=r["revoked_reason"],
        enrolled_labels=loads(r["enrolled_labels"]),
        enrolled_at=dt_or_none(r["enrolled_at"]),
    )


def chunk_row(c: OutputChunk) -> Params:
    return (c.run_id, c.attempt, c.seq, int(c.kind), c.data, us_or_none(c.time))


def chunk_from(r: RowLike) -> OutputChunk:
    """A chunk from an output row joined with its run's task_id."""
    return OutputChunk(
        run_id=r["run_id"],
        attempt=r["attempt"],
        seq=r["seq"],
        data=r["data"],
        kind=OutputKind(r["kind"]),
        time=dt_or_none(r["time"]),
        task_id=r["task_id"],
    )


# --- schedules ---------------------------------------------------------------------------------


def schedule_row(s: Schedule) -> Params:
    return (
        s.name,
        s.agent,
        s.input,
        dumps(s.labels),
        policy_json(s.policy),
        s.cron,
        s.rrule,
        s.timezone,
        int(s.misfire),
        int(s.overlap),
        int(s.paused),
        us(s.created_at),
        us(s.updated_at),
        us_or_none(s.last_fire_time),
        us_or_none(s.next_fire_time),
        s.last_task_id,
        s.last_outcome,
        s.workflow,
    )


def schedule_from(r: RowLike) -> Schedule:
    return Schedule(
        name=r["name"],
        agent=r["agent"],
        input=r["input"],
        labels=loads(r["labels"]),
        policy=policy_from(r["policy"]),
        cron=r["cron"],
        rrule=r["rrule"],
        timezone=r["timezone"],
        misfire=MisfirePolicy(r["misfire"]),
        overlap=OverlapPolicy(r["overlap"]),
        paused=bool(r["paused"]),
        created_at=dt(r["created_at"]),
        updated_at=dt(r["updated_at"]),
        last_fire_time=dt_or_none(r["last_fire_time"]),
        next_fire_time=dt_or_none(r["next_fire_time"]),
        last_task_id=r["last_task_id"],
        last_outcome=r["last_outcome"],
        workflow=r["workflow"],
    )


# --- access control ----------------------------------------------------------------------------


def bootstrap_row(t: BootstrapToken) -> Params:
    return (
        t.id,
        t.secret_hash,
        t.worker_id,
        us(t.created_at),
        us(t.expires_at),
        dumps(t.labels),
        t.created_by,
        us_or_none(t.used_at),
        t.used_by_host,
        us_or_none(t.revoked_at),
    )


def bootstrap_from(r: RowLike) -> BootstrapToken:
    return BootstrapToken(
        id=r["id"],
        secret_hash=r["secret_hash"],
        worker_id=WorkerId(r["worker_id"]),
        created_at=dt(r["created_at"]),
        expires_at=dt(r["expires_at"]),
        labels=loads(r["labels"]),
        created_by=r["created_by"],
        used_at=dt_or_none(r["used_at"]),
        used_by_host=r["used_by_host"],
        revoked_at=dt_or_none(r["revoked_at"]),
    )


def api_token_row(t: ApiToken) -> Params:
    return (
        t.id,
        t.secret_hash,
        t.name,
        dumps(sorted(str(s) for s in t.scopes)),
        us(t.created_at),
        us_or_none(t.expires_at),
        t.created_by,
        us_or_none(t.revoked_at),
    )


def api_token_from(r: RowLike) -> ApiToken:
    return ApiToken(
        id=r["id"],
        secret_hash=r["secret_hash"],
        name=r["name"],
        scopes=frozenset(Scope(s) for s in loads(r["scopes"])),
        created_at=dt(r["created_at"]),
        expires_at=dt_or_none(r["expires_at"]),
        created_by=r["created_by"],
        revoked_at=dt_or_none(r["revoked_at"]),
    )


def audit_row(e: AuditEvent) -> Params:
    """Without the id (AUDIT_COLUMNS[1:]): the store numbers events."""
    return (us(e.time), str(e.kind), e.principal, e.subject, e.peer, e.detail)


def audit_from(r: RowLike) -> AuditEvent:
    return AuditEvent(
        id=r["id"],
        time=dt(r["time"]),
        kind=AuditKind(r["kind"]),
        principal=r["principal"],
        subject=r["subject"],
        peer=r["peer"],
        detail=r["detail"],
    )


# --- webhooks ----------------------------------------------------------------------------------

WEBHOOK_COLUMNS: Final = (
    "id",
    "url",
    "events",
    "secret",
    "created_at",
    "labels",
    "agent",
    "schedule",
    "description",
    "created_by",
)
DELIVERY_COLUMNS: Final = (
    "id",
    "webhook_id",
    "event",
    "event_key",
    "payload",
    "created_at",
    "next_attempt_at",
    "status",
    "attempts",
    "last_status_code",
    "last_error",
    "delivered_at",
)


def webhook_row(w: Webhook) -> Params:
    return (
        w.id,
        w.url,
        dumps(sorted(str(e) for e in w.events)),
        w.secret,
        us(w.created_at),
        dumps(w.labels),
        w.agent,
        w.schedule,
        w.description,
        w.created_by,
    )


def webhook_from(r: RowLike) -> Webhook:
    return Webhook(
        id=r["id"],
        url=r["url"],
        events=frozenset(WebhookEvent(e) for e in loads(r["events"])),
        secret=r["secret"],
        created_at=dt(r["created_at"]),
        labels=loads(r["labels"]),
        agent=r["agent"],
        schedule=r["schedule"],
        description=r["description"],
        created_by=r["created_by"],
    )


def delivery_row(d: WebhookDelivery) -> Params:
    return (
        d.id,
        d.webhook_id,
        str(d.event),
        d.event_key,
        d.payload,
        us(d.created_at),
        us(d.next_attempt_at),
        str(d.status),
        d.attempts,
        d.last_status_code,
        d.last_error,
        us_or_none(d.delivered_at),
    )


def delivery_from(r: RowLike) -> WebhookDelivery:
    return WebhookDelivery(
        id=r["id"],
        webhook_id=r["webhook_id"],
        event=WebhookEvent(r["event"]),
        event_key=r["event_key"],
        payload=r["payload"],
        created_at=dt(r["created_at"]),
        next_attempt_at=dt(r["next_attempt_at"]),
        status=DeliveryStatus(r["status"]),
        attempts=r["attempts"],
        last_status_code=r["last_status_code"],
        last_error=r["last_error"],
        delivered_at=dt_or_none(r["delivered_at"]),
    )


# --- conversations -----------------------------------------------------------------------------

CONVERSATION_COLUMNS: Final = (
    "id",
    "agent",
    "title",
    "labels",
    "input",
    "policy",
    "created_at",
    "updated_at",
    "turns",
    "usage",
    "session_id",
    "session_snapshot",
    "session_cost_usd",
    "session_turn",
    "summarized_through",
    "summary",
)
TURN_COLUMNS: Final = (
    "conversation_id",
    "idx",
    "task_id",
    "message",
    "created_at",
    "status",
    "answer",
    "tools",
    "error",
    "usage",
    "finished_at",
)


def conversation_row(c: Conversation) -> Params:
    return (
        c.id,
        c.agent,
        c.title,
        dumps(c.labels),
        c.input,
        policy_json(c.policy),
        us(c.created_at),
        us(c.updated_at),
        c.turns,
        usage_json(c.usage),
        c.session_id,
        c.session_snapshot,
        c.session_cost_usd,
        c.session_turn,
        c.summarized_through,
        c.summary,
    )


def conversation_from(r: RowLike) -> Conversation:
    return Conversation(
        id=r["id"],
        agent=r["agent"],
        title=r["title"],
        labels=loads(r["labels"]),
        input=r["input"],
        policy=policy_from(r["policy"]),
        created_at=dt(r["created_at"]),
        updated_at=dt(r["updated_at"]),
        turns=r["turns"],
        usage=usage_from(r["usage"]),
        session_id=r["session_id"],
        session_snapshot=bytes(r["session_snapshot"]),
        session_cost_usd=r["session_cost_usd"],
        session_turn=r["session_turn"],
        summarized_through=r["summarized_through"],
        summary=r["summary"],
    )


def turn_row(t: Turn) -> Params:
    return (
        t.conversation_id,
        t.index,
        t.task_id,
        t.message,
        us(t.created_at),
        int(t.status),
        t.answer,
        t.tools,
        t.error,
        usage_json(t.usage),
        us_or_none(t.finished_at),
    )


def turn_from(r: RowLike) -> Turn:
    return Turn(
        conversation_id=r["conversation_id"],
        index=r["idx"],
        task_id=r["task_id"],
        message=r["message"],
        created_at=dt(r["created_at"]),
        status=TaskStatus(r["status"]),
        answer=r["answer"],
        tools=r["tools"],
        error=r["error"],
        usage=usage_from(r["usage"]),
        finished_at=dt_or_none(r["finished_at"]),
    )


def late_usage_targets(late: LateUsage, mark: str) -> list[tuple[str, str, Params]]:
    """(table, WHERE clause, its parameters) of each row a late usage report adds to."""
    targets: list[tuple[str, str, Params]] = [
        ("runs", f"id = {mark}", (late.run_id,)),
        ("tasks", f"id = {mark}", (late.task_id,)),
    ]
    if late.conversation_id is not None:
        where = f"conversation_id = {mark} AND idx = {mark}"
        targets.append(("turns", where, (late.conversation_id, late.turn)))
        targets.append(("conversations", f"id = {mark}", (late.conversation_id,)))
    return targets


def plus_usage(text: str, more: Usage) -> str:
    """A stored usage (JSON) with `more` added."""
    total = usage_from(text)
    total.add(more)
    return usage_json(total)


def upsert_turn_sql(mark: str) -> str:
    """Insert a turn, or update all but its key (conversation_id, idx)."""
    marks = ", ".join([mark] * len(TURN_COLUMNS))
    updates = ", ".join(f"{c} = excluded.{c}" for c in TURN_COLUMNS[2:])
    return (
        f"INSERT INTO turns ({column_list(TURN_COLUMNS)}) VALUES ({marks})"
        f" ON CONFLICT (conversation_id, idx) DO UPDATE SET {updates}"
    )


# --- queries both dialects build the same way (`mark`: "?" or "%s") ----------------------------


def delivery_update(d: WebhookDelivery, mark: str) -> tuple[str, Params]:
    """The UPDATE recording an attempt at a delivery, and its parameters."""
    sets = ("status", "attempts", "last_status_code", "last_error", "next_attempt_at")
    sql = (
        "UPDATE webhook_deliveries SET "
        + ", ".join(f"{c} = {mark}" for c in (*sets, "delivered_at"))
        + f" WHERE id = {mark}"
    )
    params = (
        str(d.status),
        d.attempts,
        d.last_status_code,
        d.last_error,
        us(d.next_attempt_at),
        us_or_none(d.delivered_at),
        d.id,
    )
    return sql, params


def deliveries_query(
    webhook_id: str, pending: bool, limit: int, mark: str
) -> tuple[str, list[Any]]:
    """SELECT deliveries: pending ones by next attempt, else every one newest first."""
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    where: list[str] = []
    params: list[Any] = []
    if webhook_id:
        where.append(f"webhook_id = {mark}")
        params.append(webhook_id)
    if pending:
        where.append(f"status = {mark}")
        params.append(str(DeliveryStatus.PENDING))
    sql = f"SELECT {column_list(DELIVERY_COLUMNS)} FROM webhook_deliveries"
    sql += " WHERE " + " AND ".join(where) if where else ""
    order = "next_attempt_at, id" if pending else "created_at DESC, id DESC"
    params.append(limit)
    return f"{sql} ORDER BY {order} LIMIT {mark}", params


def conversations_query(
    agent: str,
    labels: Sequence[tuple[str, str]],
    before: str | None,
    limit: int,
    mark: str,
    label_clause: str,
) -> tuple[str, list[Any]]:
    """SELECT conversations newest first; `label_clause` matches one label given as (key, value)
    parameters (the dialects read JSON differently)."""
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    where: list[str] = []
    params: list[Any] = []
    if agent:
        where.append(f"agent = {mark}")
        params.append(agent)
    if before:
        where.append(f"id < {mark}")
        params.append(before)
    for key, value in labels:
        where.append(label_clause)
        params.extend((key, value))
    sql = f"SELECT {column_list(CONVERSATION_COLUMNS)} FROM conversations"
    sql += f" WHERE {' AND '.join(where)}" if where else ""
    params.append(limit)
    return f"{sql} ORDER BY id DESC LIMIT {mark}", params


# --- workflows ---------------------------------------------------------------------------------

WORKFLOW_COLUMNS: Final = ("name", "version", "definition", "description", "created_at")
WORKFLOW_RUN_COLUMNS: Final = (
    "id",
    "workflow",
    "version",
    "input",
    "status",
    "created_at",
    "updated_at",
    "finished_at",
    "idempotency_key",
    "error",
    "schedule",
    "steps",
)


def workflow_row(w: Workflow) -> Params:
    return (w.name, w.version, dumps(w.definition), w.description, us(w.created_at))


def workflow_from(r: RowLike) -> Workflow:
    return Workflow(
        name=r["name"],
        version=r["version"],
        definition=loads(r["definition"]),
        description=r["description"],
        created_at=dt(r["created_at"]),
    )


def workflow_run_row(w: WorkflowRun) -> Params:
    return (
        w.id,
        w.workflow,
        w.version,
        dumps(w.input),
        int(w.status),
        us(w.created_at),
        us(w.updated_at),
        us_or_none(w.finished_at),
        w.idempotency_key or None,  # NULL when none: the unique index skips it
        w.error,
        w.schedule,
        encode_run_state(w),
    )


def workflow_run_from(r: RowLike) -> WorkflowRun:
    return WorkflowRun(
        id=r["id"],
        workflow=r["workflow"],
        version=r["version"],
        input=loads(r["input"]),
        status=WorkflowRunStatus(r["status"]),
        created_at=dt(r["created_at"]),
        updated_at=dt(r["updated_at"]),
        finished_at=dt_or_none(r["finished_at"]),
        idempotency_key=r["idempotency_key"] or "",
        error=r["error"],
        schedule=r["schedule"],
        steps=decode_run_state(r["steps"]),
    )


def workflow_runs_query(
    workflow: str,
    unfinished: bool,
    limit: int,
    mark: str,
    before: tuple[datetime, str] | None = None,
) -> tuple[str, list[Any]]:
    """SELECT workflow runs newest first (every unfinished one when `unfinished`), older than
    `before` (created_at, id) when it is given."""
    where: list[str] = []
    params: list[Any] = []
    if workflow:
        where.append(f"workflow = {mark}")
        params.append(workflow)
    if before is not None:
        where.append(f"(created_at < {mark} OR (created_at = {mark} AND id < {mark}))")
        params += [us(before[0]), us(before[0]), before[1]]
    if unfinished:
        where.append(f"status = {int(WorkflowRunStatus.RUNNING)}")
    sql = f"SELECT {column_list(WORKFLOW_RUN_COLUMNS)} FROM workflow_runs"
    sql += f" WHERE {' AND '.join(where)}" if where else ""
    sql += " ORDER BY created_at DESC, id DESC"
    if not unfinished:
        sql += f" LIMIT {mark}"
        params.append(limit)
    return sql, params


LATEST_WORKFLOWS: Final = (
    f"SELECT {column_list(WORKFLOW_COLUMNS, 'w.')} FROM workflows w WHERE version = "
    "(SELECT MAX(version) FROM workflows v WHERE v.name = w.name) ORDER BY name"
)


_DAY_US: Final = 86_400_000_000
_EPOCH_DAY: Final = date(1970, 1, 1)
_USAGE_COUNTS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_creation_tokens",
    "turns",
    "duration_ms",
)


def usage_sums_query(json_field: str, mark: str) -> str:
    """SELECT what the runs that ended since a time spent, summed per UTC day, agent, model and
    worker. `json_field`: the dialect's expression for one key of a JSON column, with
    `{column}` and `{key}` to fill."""

    def field(column: str, key: str) -> str:
        return json_field.format(column=column, key=key)

    counts = [f"SUM(CAST({field('r.usage', k)} AS BIGINT)) AS {k}" for k in _USAGE_COUNTS]
    cost = f"SUM(CAST({field('r.usage', 'cost_usd')} AS DOUBLE PRECISION)) AS cost_usd"
    return (
        f"SELECT r.finished_at / {_DAY_US} AS day, t.agent AS agent,"
        f" COALESCE({field('r.backend_used', 'model_name')}, '') AS model,"
        f" COALESCE(r.worker_id, '') AS worker_id, COUNT(*) AS runs, {', '.join(counts)}, {cost}"
        f" FROM runs r JOIN tasks t ON t.id = r.task_id WHERE r.finished_at >= {mark}"
        " GROUP BY 1, 2, 3, 4"
    )


def usage_sum_from(r: RowLike) -> UsageSum:
    """A row of `usage_sums_query` (PostgreSQL sums integers as numerics: read as ints)."""
    counts = {k: int(r[k] or 0) for k in _USAGE_COUNTS}
    return UsageSum(
        day=_EPOCH_DAY + timedelta(days=int(r["day"])),
        agent=r["agent"],
        model=r["model"],
        worker_id=r["worker_id"],
        runs=int(r["runs"]),
        usage=Usage(cost_usd=float(r["cost_usd"] or 0.0), **counts),
    )
