"""SQLite store: one file in WAL mode, a writer thread with group commit, pooled read connections.

Durability: WAL with ``synchronous=NORMAL``. Once `SqliteStore.apply` returns, the change set is
committed to the WAL and survives the process crashing (including ``kill -9``). A power loss or
an operating-system crash may lose the last few commits; the file itself stays consistent.

Writes: `apply` encodes the change set into row tuples on the caller's thread (so later mutation
of the caller's objects cannot leak in) and queues them. One writer thread owns the only write
connection: it takes everything queued, writes it in one transaction with ``executemany`` upserts,
commits, then resolves every caller's future on its event loop. If that group transaction fails,
each change set is retried in its own transaction so only the offending one gets the error.
A write whose outcome the caller needs (consuming a bootstrap token: a conditional UPDATE) is
queued the same way as a `_Call` and runs alone in its own transaction, in queue order.

Reads run in a small thread pool; each thread has its own read-only connection, so reads see
committed data and never wait behind the writer (WAL readers do not block on the writer).

Datetimes are stored as integer microseconds since the Unix epoch (UTC) and come back as
timezone-aware UTC datetimes equal to what was written. Naive datetimes are rejected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import structlog

from taskrun.core.access import (
    ApiToken,
    AuditEvent,
    AuditKind,
    AuditQuery,
    BootstrapToken,
    Scope,
)
from taskrun.core.errors import StoreUnavailable
from taskrun.core.ids import RunId, TaskId, WorkerId
from taskrun.core.models import (
    AgentSpec,
    ModelBackend,
    OutputChunk,
    OutputKind,
    Run,
    Task,
    TaskPolicy,
    Usage,
    Worker,
)
from taskrun.core.schedule import MisfirePolicy, OverlapPolicy, Schedule
from taskrun.core.status import RunStatus, TaskStatus, WorkerStatus
from taskrun.core.store import FENCED, ChangeSet, TaskPage, TaskQuery
from taskrun.core.webhooks import DeliveryStatus, Webhook, WebhookDelivery, WebhookEvent
from taskrun.core.workflow import (
    Workflow,
    WorkflowRun,
    WorkflowRunStatus,
    decode_run_state,
    encode_run_state,
)

__all__ = ["SCHEMA_VERSION", "SchemaVersionError", "SqliteStore"]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
Row = tuple[Any, ...]

_BUSY_TIMEOUT_MS: Final = 10_000
_CHECKPOINT_INTERVAL: Final = 1.0  # seconds
_READ_THREADS: Final = 4
_NO_FLOOR: Final = -(2**63)  # smallest SQLite integer: "no `after` for this run"

# --- schema ------------------------------------------------------------------------------------

# Each migration is a tuple of statements applied in one transaction; PRAGMA user_version records
# how many have been applied. Never edit a released migration: append a new one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE tasks (
            id               TEXT PRIMARY KEY,
            agent            TEXT NOT NULL,
            input            TEXT NOT NULL,
            labels           TEXT NOT NULL,  -- JSON object
            policy           TEXT NOT NULL,  -- JSON object
            status           INTEGER NOT NULL,
            attempts         INTEGER NOT NULL,
            current_run_id   TEXT,
            worker_id        TEXT,
            created_at       INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            updated_at       INTEGER NOT NULL,
            finished_at      INTEGER,
            error            TEXT NOT NULL,
            result           TEXT NOT NULL,
            usage            TEXT NOT NULL,  -- JSON object
            schedule         TEXT NOT NULL,
            cancel_requested INTEGER NOT NULL,
            idempotency_key  TEXT NOT NULL   -- copy of policy.idempotency_key, for the index
        )""",
        "CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)"
        " WHERE idempotency_key <> ''",
        "CREATE INDEX tasks_status ON tasks (status, id)",
        "CREATE INDEX tasks_agent ON tasks (agent, id)",
        "CREATE INDEX tasks_worker ON tasks (worker_id, id) WHERE worker_id IS NOT NULL",
        "CREATE INDEX tasks_schedule ON tasks (schedule, id) WHERE schedule <> ''",
        """CREATE TABLE runs (
            id           TEXT PRIMARY KEY,
            task_id      TEXT NOT NULL REFERENCES tasks (id),
            attempt      INTEGER NOT NULL,
            status       INTEGER NOT NULL,
            worker_id    TEXT,
            created_at   INTEGER NOT NULL,
            assigned_at  INTEGER,
            started_at   INTEGER,
            finished_at  INTEGER,
            error        TEXT NOT NULL,
            result       TEXT NOT NULL,
            usage        TEXT NOT NULL,  -- JSON object
            backend_used TEXT,           -- JSON object or NULL
            session_id   TEXT NOT NULL,
            prompt       TEXT NOT NULL
        )""",
        "CREATE INDEX runs_task ON runs (task_id, attempt)",
        "CREATE INDEX runs_unfinished ON runs (status, id) WHERE status IN (1, 2, 3)",
        """CREATE TABLE workers (
            id                     TEXT PRIMARY KEY,
            hostname               TEXT NOT NULL,
            version                TEXT NOT NULL,
            agents                 TEXT NOT NULL,  -- JSON array of agent specs
            labels                 TEXT NOT NULL,  -- JSON object
            max_concurrent_runs    INTEGER NOT NULL,
            status                 INTEGER NOT NULL,
            first_seen_at          INTEGER,
            connected_at           INTEGER,
            last_heartbeat_at      INTEGER,
            certificate_expires_at INTEGER
        )""",
        """CREATE TABLE output (
            run_id  TEXT NOT NULL REFERENCES runs (id),
            attempt INTEGER NOT NULL,
            seq     INTEGER NOT NULL,
            kind    INTEGER NOT NULL,
            data    TEXT NOT NULL,
            time    INTEGER,
            PRIMARY KEY (run_id, attempt, seq)
        ) WITHOUT ROWID""",
    ),
    # 2: schedules (recurring rules that create tasks)
    (
        """CREATE TABLE schedules (
            name           TEXT PRIMARY KEY,
            agent          TEXT NOT NULL,
            input          TEXT NOT NULL,
            labels         TEXT NOT NULL,  -- JSON object
            policy         TEXT NOT NULL,  -- JSON object, the policy of the tasks it creates
            cron           TEXT NOT NULL,
            rrule          TEXT NOT NULL,
            timezone       TEXT NOT NULL,
            misfire        INTEGER NOT NULL,
            overlap        INTEGER NOT NULL,
            paused         INTEGER NOT NULL,
            created_at     INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            updated_at     INTEGER NOT NULL,
            last_fire_time INTEGER,
            next_fire_time INTEGER,
            last_task_id   TEXT,
            last_outcome   TEXT NOT NULL
        ) WITHOUT ROWID""",
    ),
    # 3: worker revocation (operators cut an identity off for good)
    (
        "ALTER TABLE workers ADD COLUMN revoked_at INTEGER",
        "ALTER TABLE workers ADD COLUMN revoked_reason TEXT NOT NULL DEFAULT ''",
    ),
    # 4: access control (bootstrap tokens, API tokens, audit events, labels bound at enrollment)
    (
        """CREATE TABLE bootstrap_tokens (
            id           TEXT PRIMARY KEY,
            secret_hash  TEXT NOT NULL,  -- SHA-256 of the secret, hex
            worker_id    TEXT NOT NULL,
            created_at   INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            expires_at   INTEGER NOT NULL,
            labels       TEXT NOT NULL,  -- JSON object
            created_by   TEXT NOT NULL,
            used_at      INTEGER,
            used_by_host TEXT NOT NULL,
            revoked_at   INTEGER
        ) WITHOUT ROWID""",
        """CREATE TABLE api_tokens (
            id          TEXT PRIMARY KEY,
            secret_hash TEXT NOT NULL,  -- SHA-256 of the secret, hex
            name        TEXT NOT NULL,
            scopes      TEXT NOT NULL,  -- JSON array of scope names, sorted
            created_at  INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            expires_at  INTEGER,           -- NULL: does not expire
            created_by  TEXT NOT NULL,
            revoked_at  INTEGER
        ) WITHOUT ROWID""",
        """CREATE TABLE audit_events (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,  -- increasing, never reused
            time      INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            kind      TEXT NOT NULL,
            principal TEXT NOT NULL,
            subject   TEXT NOT NULL,
            peer      TEXT NOT NULL,
            detail    TEXT NOT NULL
        )""",
        "CREATE INDEX audit_events_kind ON audit_events (kind, id)",
        "ALTER TABLE workers ADD COLUMN enrolled_labels TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE workers ADD COLUMN enrolled_at INTEGER",
    ),
    # 5: one row rewritten by `resume` to learn whether the store can write again
    (
        """CREATE TABLE store_probe (
            id         INTEGER PRIMARY KEY CHECK (id = 1),
            written_at INTEGER NOT NULL  -- microseconds since the epoch, UTC
        )""",
    ),
    # 6: webhooks: subscriptions and their durable deliveries
    (
        """CREATE TABLE webhooks (
            id          TEXT PRIMARY KEY,
            url         TEXT NOT NULL,
            events      TEXT NOT NULL,  -- JSON array of event names, sorted
            secret      TEXT NOT NULL,  -- whsec_…: needed to sign, so kept as given
            created_at  INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            labels      TEXT NOT NULL,  -- JSON object
            agent       TEXT NOT NULL,
            schedule    TEXT NOT NULL,
            description TEXT NOT NULL,
            created_by  TEXT NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE webhook_deliveries (
            id               TEXT PRIMARY KEY,
            webhook_id       TEXT NOT NULL,
            event            TEXT NOT NULL,
            event_key        TEXT NOT NULL,
            payload          TEXT NOT NULL,
            created_at       INTEGER NOT NULL,
            next_attempt_at  INTEGER NOT NULL,
            status           TEXT NOT NULL,
            attempts         INTEGER NOT NULL,
            last_status_code INTEGER NOT NULL,
            last_error       TEXT NOT NULL,
            delivered_at     INTEGER,
            UNIQUE (webhook_id, event_key)
        ) WITHOUT ROWID""",
        "CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at)",
        "CREATE INDEX webhook_deliveries_of ON webhook_deliveries (webhook_id, created_at)",
    ),
    # 7 (issue 17): workflow definitions (every version kept) and workflow runs
    (
        """CREATE TABLE workflows (
            name        TEXT NOT NULL,
            version     INTEGER NOT NULL,
            definition  TEXT NOT NULL,  -- the parsed document, as JSON
            description TEXT NOT NULL,
            created_at  INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            PRIMARY KEY (name, version)
        ) WITHOUT ROWID""",
        """CREATE TABLE workflow_runs (
            id              TEXT PRIMARY KEY,
            workflow        TEXT NOT NULL,
            version         INTEGER NOT NULL,
            input           TEXT NOT NULL,  -- JSON
            status          INTEGER NOT NULL,
            created_at      INTEGER NOT NULL,
            updated_at      INTEGER NOT NULL,
            finished_at     INTEGER,
            idempotency_key TEXT,  -- NULL when none; unique otherwise
            error           TEXT NOT NULL,
            schedule        TEXT NOT NULL,
            steps           TEXT NOT NULL,  -- JSON: each step's state
            UNIQUE (idempotency_key),
            FOREIGN KEY (workflow, version) REFERENCES workflows (name, version)
        ) WITHOUT ROWID""",
        "CREATE INDEX workflow_runs_of ON workflow_runs (workflow, created_at)",
        "CREATE INDEX workflow_runs_unfinished ON workflow_runs (status) WHERE status = 1",
        # a schedule may start a workflow instead of a task
        "ALTER TABLE schedules ADD COLUMN workflow TEXT NOT NULL DEFAULT ''",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_TASK_COLUMNS: Final = (
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
    "idempotency_key",
)
_RUN_COLUMNS: Final = (
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
)
_WORKER_COLUMNS: Final = (
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


def _upsert_sql(table: str, columns: Sequence[str]) -> str:
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns[1:])
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        f" ON CONFLICT (id) DO UPDATE SET {updates}"
    )


_UPSERT_TASK: Final = _upsert_sql("tasks", _TASK_COLUMNS)
_UPSERT_RUN: Final = _upsert_sql("runs", _RUN_COLUMNS)
_UPSERT_WORKER: Final = _upsert_sql("workers", _WORKER_COLUMNS)
_INSERT_CHUNK: Final = (
    "INSERT OR IGNORE INTO output (run_id, attempt, seq, kind, data, time)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)

_SELECT_TASK: Final = f"SELECT {', '.join(_TASK_COLUMNS[:-1])} FROM tasks"
_SELECT_RUN: Final = f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs"
_SELECT_WORKER: Final = f"SELECT {', '.join(_WORKER_COLUMNS)} FROM workers"
_SELECT_OUTPUT: Final = (
    "SELECT o.run_id, o.attempt, o.seq, o.data, o.kind, o.time, r.task_id"
    " FROM output o JOIN runs r ON r.id = o.run_id"
    " WHERE o.run_id = ? AND o.seq > ? ORDER BY o.attempt, o.seq LIMIT ?"
)
_LABEL_MATCH: Final = (
    "EXISTS (SELECT 1 FROM json_each(tasks.labels) AS l WHERE l.key = ? AND l.value = ?)"
)


class SchemaVersionError(RuntimeError):
    """The database file was written by a newer TaskRun than this one."""


# --- encoding ----------------------------------------------------------------------------------

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_dumps: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads: Final = json.loads


def _us(value: datetime) -> int:
    try:
        return (value - _EPOCH) // _MICROSECOND
    except TypeError:
        raise ValueError(f"datetimes must be timezone-aware, got {value!r}") from None


def _us_or_none(value: datetime | None) -> int | None:
    return None if value is None else _us(value)


def _dt(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _dt_or_none(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


_NO_USAGE: Final = Usage()
_NO_USAGE_JSON: Final = _dumps(dataclasses.asdict(_NO_USAGE))  # the common case, precomputed


def _usage_json(u: Usage) -> str:
    if u == _NO_USAGE:
        return _NO_USAGE_JSON
    return _dumps(
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


def _usage(text: str) -> Usage:
    return Usage() if text == _NO_USAGE_JSON else Usage(**_loads(text))


def _policy_json(p: TaskPolicy) -> str:
    return _dumps(
        {
            "priority": p.priority,
            "timeout": p.timeout,
            "max_attempts": p.max_attempts,
            "idempotency_key": p.idempotency_key,
            "required_labels": p.required_labels,
            "queue_timeout": p.queue_timeout,
            "retry_on_failure": p.retry_on_failure,
            "required_provider": p.required_provider,
            "required_model": p.required_model,
        }
    )


@functools.lru_cache(maxsize=1024)  # most tasks share a handful of policies
def _policy_fields(text: str) -> dict[str, Any]:
    fields: dict[str, Any] = _loads(text)
    return fields


def _policy(text: str) -> TaskPolicy:
    policy = TaskPolicy(**_policy_fields(text))
    policy.required_labels = dict(policy.required_labels)  # never share the cached dict
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


def _agents_json(agents: Sequence[AgentSpec]) -> str:
    return _dumps(
        [
            {
                "name": a.name,
                "description": a.description,
                "backends": [_backend_dict(b) for b in a.backends],
                "input_schema": a.input_schema,
                "supports_sessions": a.supports_sessions,
            }
            for a in agents
        ]
    )


def _agents(text: str) -> tuple[AgentSpec, ...]:
    return tuple(
        AgentSpec(
            name=a["name"],
            description=a["description"],
            backends=tuple(_backend(b) for b in a["backends"]),
            input_schema=a["input_schema"],
            supports_sessions=a["supports_sessions"],
        )
        for a in _loads(text)
    )


def _task_row(t: Task) -> Row:
    p = t.policy
    return (
        t.id,
        t.agent,
        t.input,
        _dumps(t.labels),
        _policy_json(p),
        int(t.status),
        t.attempts,
        t.current_run_id,
        t.worker_id,
        _us(t.created_at),
        _us(t.updated_at),
        _us_or_none(t.finished_at),
        t.error,
        t.result,
        _usage_json(t.usage),
        t.schedule,
        int(t.cancel_requested),
        p.idempotency_key,
    )


def _task(r: Row) -> Task:
    return Task(
        id=r[0],
        agent=r[1],
        input=r[2],
        labels=_loads(r[3]),
        policy=_policy(r[4]),
        status=TaskStatus(r[5]),
        attempts=r[6],
        current_run_id=r[7],
        worker_id=r[8],
        created_at=_dt(r[9]),
        updated_at=_dt(r[10]),
        finished_at=_dt_or_none(r[11]),
        error=r[12],
        result=r[13],
        usage=_usage(r[14]),
        schedule=r[15],
        cancel_requested=bool(r[16]),
    )


def _run_row(r: Run) -> Row:
    b = r.backend_used
    return (
        r.id,
        r.task_id,
        r.attempt,
        int(r.status),
        r.worker_id,
        _us(r.created_at),
        _us_or_none(r.assigned_at),
        _us_or_none(r.started_at),
        _us_or_none(r.finished_at),
        r.error,
        r.result,
        _usage_json(r.usage),
        None if b is None else _dumps(_backend_dict(b)),
        r.session_id,
        r.prompt,
    )


def _run(r: Row) -> Run:
    return Run(
        id=r[0],
        task_id=r[1],
        attempt=r[2],
        status=RunStatus(r[3]),
        worker_id=r[4],
        created_at=_dt(r[5]),
        assigned_at=_dt_or_none(r[6]),
        started_at=_dt_or_none(r[7]),
        finished_at=_dt_or_none(r[8]),
        error=r[9],
        result=r[10],
        usage=_usage(r[11]),
        backend_used=None if r[12] is None else _backend(_loads(r[12])),
        session_id=r[13],
        prompt=r[14],
    )


def _worker_row(w: Worker) -> Row:
    return (
        w.id,
        w.hostname,
        w.version,
        _agents_json(w.agents),
        _dumps(w.labels),
        w.max_concurrent_runs,
        int(w.status),
        _us_or_none(w.first_seen_at),
        _us_or_none(w.connected_at),
        _us_or_none(w.last_heartbeat_at),
        _us_or_none(w.certificate_expires_at),
        _us_or_none(w.revoked_at),
        w.revoked_reason,
        _dumps(w.enrolled_labels),
        _us_or_none(w.enrolled_at),
    )


def _worker(r: Row) -> Worker:
    return Worker(
        id=r[0],
        hostname=r[1],
        version=r[2],
        agents=_agents(r[3]),
        labels=_loads(r[4]),
        max_concurrent_runs=r[5],
        status=WorkerStatus(r[6]),
        first_seen_at=_dt_or_none(r[7]),
        connected_at=_dt_or_none(r[8]),
        last_heartbeat_at=_dt_or_none(r[9]),
        certificate_expires_at=_dt_or_none(r[10]),
        revoked_at=_dt_or_none(r[11]),
        revoked_reason=r[12],
        enrolled_labels=_loads(r[13]),
        enrolled_at=_dt_or_none(r[14]),
    )


def _chunk_row(c: OutputChunk) -> Row:
    return (c.run_id, c.attempt, c.seq, int(c.kind), c.data, _us_or_none(c.time))


def _chunk(r: Row) -> OutputChunk:
    return OutputChunk(
        run_id=r[0],
        attempt=r[1],
        seq=r[2],
        data=r[3],
        kind=OutputKind(r[4]),
        time=_dt_or_none(r[5]),
        task_id=r[6],
    )


# --- schedules ---------------------------------------------------------------------------------

_SCHEDULE_COLUMNS: Final = (
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
_UPSERT_SCHEDULE: Final = (
    f"INSERT INTO schedules ({', '.join(_SCHEDULE_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(_SCHEDULE_COLUMNS))})"
    " ON CONFLICT (name) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _SCHEDULE_COLUMNS[1:])
)
_DELETE_SCHEDULE: Final = "DELETE FROM schedules WHERE name = ?"
_SELECT_SCHEDULE: Final = f"SELECT {', '.join(_SCHEDULE_COLUMNS)} FROM schedules"


def _schedule_row(s: Schedule) -> Row:
    return (
        s.name,
        s.agent,
        s.input,
        _dumps(s.labels),
        _policy_json(s.policy),
        s.cron,
        s.rrule,
        s.timezone,
        int(s.misfire),
        int(s.overlap),
        int(s.paused),
        _us(s.created_at),
        _us(s.updated_at),
        _us_or_none(s.last_fire_time),
        _us_or_none(s.next_fire_time),
        s.last_task_id,
        s.last_outcome,
        s.workflow,
    )


def _schedule(r: Row) -> Schedule:
    return Schedule(
        name=r[0],
        agent=r[1],
        input=r[2],
        labels=_loads(r[3]),
        policy=_policy(r[4]),
        cron=r[5],
        rrule=r[6],
        timezone=r[7],
        misfire=MisfirePolicy(r[8]),
        overlap=OverlapPolicy(r[9]),
        paused=bool(r[10]),
        created_at=_dt(r[11]),
        updated_at=_dt(r[12]),
        last_fire_time=_dt_or_none(r[13]),
        next_fire_time=_dt_or_none(r[14]),
        last_task_id=r[15],
        last_outcome=r[16],
        workflow=r[17],
    )


# --- access control ----------------------------------------------------------------------------

_BOOTSTRAP_COLUMNS: Final = (
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
_API_TOKEN_COLUMNS: Final = (
    "id",
    "secret_hash",
    "name",
    "scopes",
    "created_at",
    "expires_at",
    "created_by",
    "revoked_at",
)
_AUDIT_COLUMNS: Final = ("id", "time", "kind", "principal", "subject", "peer", "detail")
_UPSERT_BOOTSTRAP: Final = _upsert_sql("bootstrap_tokens", _BOOTSTRAP_COLUMNS)
_UPSERT_API_TOKEN: Final = _upsert_sql("api_tokens", _API_TOKEN_COLUMNS)
_INSERT_AUDIT: Final = (
    f"INSERT INTO audit_events ({', '.join(_AUDIT_COLUMNS[1:])})"
    f" VALUES ({', '.join('?' * (len(_AUDIT_COLUMNS) - 1))})"
)
# Keep the newest `retention` events. Ids have no gaps (AUTOINCREMENT, rolled back with the
# transaction), and both lookups are on the primary key, so this costs a few page reads.
_TRIM_AUDIT: Final = "DELETE FROM audit_events WHERE id <= (SELECT max(id) FROM audit_events) - ?"
_SELECT_BOOTSTRAP: Final = f"SELECT {', '.join(_BOOTSTRAP_COLUMNS)} FROM bootstrap_tokens"
_SELECT_API_TOKEN: Final = f"SELECT {', '.join(_API_TOKEN_COLUMNS)} FROM api_tokens"
_SELECT_AUDIT: Final = f"SELECT {', '.join(_AUDIT_COLUMNS)} FROM audit_events"
_CONSUME_BOOTSTRAP: Final = (
    "UPDATE bootstrap_tokens SET used_at = ?, used_by_host = ?"
    " WHERE id = ? AND used_at IS NULL AND revoked_at IS NULL"
    f" RETURNING {', '.join(_BOOTSTRAP_COLUMNS)}"
)


def _bootstrap_row(t: BootstrapToken) -> Row:
    return (
        t.id,
        t.secret_hash,
        t.worker_id,
        _us(t.created_at),
        _us(t.expires_at),
        _dumps(t.labels),
        t.created_by,
        _us_or_none(t.used_at),
        t.used_by_host,
        _us_or_none(t.revoked_at),
    )


def _bootstrap(r: Row) -> BootstrapToken:
    return BootstrapToken(
        id=r[0],
        secret_hash=r[1],
        worker_id=WorkerId(r[2]),
        created_at=_dt(r[3]),
        expires_at=_dt(r[4]),
        labels=_loads(r[5]),
        created_by=r[6],
        used_at=_dt_or_none(r[7]),
        used_by_host=r[8],
        revoked_at=_dt_or_none(r[9]),
    )


def _api_token_row(t: ApiToken) -> Row:
    return (
        t.id,
        t.secret_hash,
        t.name,
        _dumps(sorted(str(s) for s in t.scopes)),
        _us(t.created_at),
        _us_or_none(t.expires_at),
        t.created_by,
        _us_or_none(t.revoked_at),
    )


def _api_token(r: Row) -> ApiToken:
    return ApiToken(
        id=r[0],
        secret_hash=r[1],
        name=r[2],
        scopes=frozenset(Scope(s) for s in _loads(r[3])),
        created_at=_dt(r[4]),
        expires_at=_dt_or_none(r[5]),
        created_by=r[6],
        revoked_at=_dt_or_none(r[7]),
    )


def _audit_row(e: AuditEvent) -> Row:
    """Without the id: the table assigns it."""
    return (_us(e.time), str(e.kind), e.principal, e.subject, e.peer, e.detail)


def _audit(r: Row) -> AuditEvent:
    return AuditEvent(
        id=r[0],
        time=_dt(r[1]),
        kind=AuditKind(r[2]),
        principal=r[3],
        subject=r[4],
        peer=r[5],
        detail=r[6],
    )


# --- workflows (issue 17) ---------------------------------------------------------------------

_WORKFLOW_COLUMNS: Final = ("name", "version", "definition", "description", "created_at")
_INSERT_WORKFLOW: Final = (
    f"INSERT INTO workflows ({', '.join(_WORKFLOW_COLUMNS)}) VALUES (?, ?, ?, ?, ?)"
)
_SELECT_WORKFLOW: Final = f"SELECT {', '.join(_WORKFLOW_COLUMNS)} FROM workflows"
_WORKFLOW_RUN_COLUMNS: Final = (
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
_UPSERT_WORKFLOW_RUN: Final = _upsert_sql("workflow_runs", _WORKFLOW_RUN_COLUMNS)
_SELECT_WORKFLOW_RUN: Final = f"SELECT {', '.join(_WORKFLOW_RUN_COLUMNS)} FROM workflow_runs"


def _workflow_row(w: Workflow) -> Row:
    return (w.name, w.version, _dumps(w.definition), w.description, _us(w.created_at))


def _workflow(r: Row) -> Workflow:
    return Workflow(
        name=r[0], version=r[1], definition=json.loads(r[2]), description=r[3], created_at=_dt(r[4])
    )


def _workflow_run_row(w: WorkflowRun) -> Row:
    return (
        w.id,
        w.workflow,
        w.version,
        _dumps(w.input),
        int(w.status),
        _us(w.created_at),
        _us(w.updated_at),
        _us_or_none(w.finished_at),
        w.idempotency_key or None,
        w.error,
        w.schedule,
        encode_run_state(w),
    )


def _workflow_run(r: Row) -> WorkflowRun:
    return WorkflowRun(
        id=r[0],
        workflow=r[1],
        version=r[2],
        input=json.loads(r[3]),
        status=WorkflowRunStatus(r[4]),
        created_at=_dt(r[5]),
        updated_at=_dt(r[6]),
        finished_at=_dt_or_none(r[7]),
        idempotency_key=r[8] or "",
        error=r[9],
        schedule=r[10],
        steps=decode_run_state(r[11]),
    )


# --- the writer's queue ------------------------------------------------------------------------


class _Pending:
    """One encoded change set waiting for the writer, and the future its caller awaits."""

    __slots__ = (
        "api_tokens",
        "audit_events",
        "bootstrap_tokens",
        "chunks",
        "deleted_schedules",
        "future",
        "loop",
        "runs",
        "schedules",
        "tasks",
        "workers",
        "workflow_runs",
        "workflows",
    )

    def __init__(
        self,
        changes: ChangeSet,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[None],
    ) -> None:
        self.tasks = [_task_row(t) for t in changes.tasks]
        self.runs = [_run_row(r) for r in changes.runs]
        self.workers = [_worker_row(w) for w in changes.workers]
        self.chunks = [_chunk_row(c) for c in changes.chunks]
        self.schedules = [_schedule_row(s) for s in changes.schedules] if changes.schedules else []
        self.deleted_schedules = [(n,) for n in changes.deleted_schedules]
        self.bootstrap_tokens = [_bootstrap_row(t) for t in changes.bootstrap_tokens]
        self.api_tokens = [_api_token_row(t) for t in changes.api_tokens]
        self.audit_events = [_audit_row(e) for e in changes.audit_events]
        self.workflows = [_workflow_row(w) for w in changes.workflows]
        self.workflow_runs = [_workflow_run_row(w) for w in changes.workflow_runs]
        self.loop = loop
        self.future = future


class _Call(Generic[_T]):
    """A function to run on the writer connection in its own transaction, between change sets.

    For writes whose outcome the caller needs (a compare-and-set): they are serialized with
    every other write and committed (durable) before the caller's future resolves.
    """

    __slots__ = ("fn", "future", "loop", "runs_fenced")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], _T],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[_T],
        *,
        runs_fenced: bool = False,  # runs even while the store is fenced (the resume probe)
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.future = future
        self.runs_fenced = runs_fenced


def _public_error(exc: BaseException | None) -> BaseException | None:
    """Constraint violations surface as ValueError, the same as from MemoryStore; a store that
    cannot write (full disk, I/O error, locked past the busy timeout) as StoreUnavailable."""
    error: BaseException
    if isinstance(exc, sqlite3.IntegrityError):
        error = ValueError(f"change set rejected by the store: {exc}")
    elif isinstance(exc, sqlite3.Error):
        error = StoreUnavailable(f"the store cannot write: {exc}")
    else:
        return exc
    error.__cause__ = exc
    return error


def _settle_call(future: asyncio.Future[_T], result: _T, error: BaseException | None) -> None:
    """Runs on the event loop: resolve a `_Call`'s future (unless it was cancelled)."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _settle(outcomes: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    """Runs on the event loop: resolve the callers' futures (skipping cancelled ones)."""
    for future, error in outcomes:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back after a failed statement or COMMIT. A full disk can fail the COMMIT itself and
    leave the transaction open; a ROLLBACK that fails too leaves nothing to undo."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("rollback failed", error=str(exc))


class SqliteStore:
    """`Store` on one SQLite file. Call `open()` before use and `close()` when done."""

    def __init__(self, path: str | Path, *, audit_retention: int = 100_000) -> None:
        """`audit_retention`: how many audit events to keep; beyond it the oldest are deleted."""
        if audit_retention < 1:
            raise ValueError(f"audit_retention must be positive, got {audit_retention}")
        self.path = Path(path)
        self.audit_retention = audit_retention
        self.commits = 0  # transactions committed by the writer (group commits count once)
        self.migrations_applied = 0  # schema migrations run by the last `open()`
        self._queue: queue.SimpleQueue[_Pending | _Call[Any] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._read_connections: list[sqlite3.Connection] = []
        self._read_lock = threading.Lock()
        self._read_uri = ""
        self._closed = False
        # Set by the writer thread when a write fails; while set, every write fails (see
        # core.store). Only the writer thread reads or changes it.
        self._fence: BaseException | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or migrate the schema and start the writer thread and the read pool."""
        if self._closed:
            raise RuntimeError("store is closed")
        if self._writer is not None:
            return
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        writer = threading.Thread(
            target=self._writer_main, args=(ready,), name="taskrun-store-writer", daemon=True
        )
        writer.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            await asyncio.to_thread(writer.join)
            raise
        self._writer = writer
        self._checkpointer = threading.Thread(
            target=self._checkpoint_main, name="taskrun-store-checkpoint", daemon=True
        )
        self._checkpointer.start()
        self._read_uri = self.path.resolve().as_uri() + "?mode=ro"
        self._readers = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="taskrun-store-read")
        log.info("store opened", path=str(self.path), schema_version=SCHEMA_VERSION)

    async def close(self) -> None:
        """Finish queued writes, stop the threads and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        readers, self._readers = self._readers, None
        if readers is not None:
            await asyncio.to_thread(readers.shutdown, True)
        with self._read_lock:
            connections, self._read_connections = self._read_connections, []
        for conn in connections:
            conn.close()
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
        writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(writer.join)
            log.info("store closed", path=str(self.path), commits=self.commits)

    # --- writes --------------------------------------------------------------------------------

    async def apply(self, changes: ChangeSet) -> None:
        """Commit `changes` atomically; returns once they are durable (see the module doc)."""
        await self.submit(changes)

    def submit(self, changes: ChangeSet) -> asyncio.Future[None]:
        """Encode `changes` now and queue them; the future resolves once they are durable.

        Encoding happens before this returns, so change sets commit in call order and later
        mutation of the caller's objects cannot leak in. Cancelling the future does not withdraw
        a change set that is already queued.
        """
        if self._writer is None or self._closed:
            raise RuntimeError("store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not changes:
            future.set_result(None)
            return future
        self._queue.put(_Pending(changes, loop, future))
        return future

    async def resume(self) -> None:
        """Lift the fence after a failed write once a test write commits (see core.store)."""
        await self._write_call(self._probe, fenced=True)

    def _probe(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO store_probe (id, written_at) VALUES (1, ?) "
            "ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at",
            (_us(datetime.now(UTC)),),
        )
        self._fence = None

    async def _write_call(
        self, fn: Callable[[sqlite3.Connection], _T], *, fenced: bool = False
    ) -> _T:
        """Run `fn` on the writer thread in its own transaction, in order with the change sets
        queued before it, and return its result once committed. Cancelling the caller does not
        withdraw it."""
        if self._writer is None or self._closed:
            raise RuntimeError("store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._queue.put(_Call(fn, loop, future, runs_fenced=fenced))
        return await future

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._connect_writer()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            self._write_loop(conn)
        finally:
            try:
                conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            conn.close()

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        stopping = False
        while not stopping:
            batch = [get()]
            while True:
                try:
                    batch.append(get_nowait())
                except queue.Empty:
                    break
            items = [p for p in batch if p is not None]
            stopping = len(items) != len(batch)
            # Consecutive change sets are group-committed; a call runs alone, in queue order.
            group: list[_Pending] = []
            for item in items:
                if isinstance(item, _Pending):
                    group.append(item)
                    continue
                if group:
                    self._write_group(conn, group)
                    group = []
                self._run_call(conn, item)
            if group:
                self._write_group(conn, group)

    def _write_group(self, conn: sqlite3.Connection, pending: list[_Pending]) -> None:
        try:
            self._write(conn, pending)
        except BaseException as exc:  # a bug here must not strand the callers
            log.exception("store writer failed")
            self._fence = self._fence or exc
            self._notify([(p, exc) for p in pending])

    def _run_call(self, conn: sqlite3.Connection, call: _Call[Any]) -> None:
        """Run one call in its own transaction and hand its outcome to its event loop."""
        result: Any = None
        error: BaseException | None = None
        if self._fence is not None and not call.runs_fenced:
            self._settle_one(call, None, self._fenced_error())
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = call.fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except BaseException as exc:  # the caller gets every failure, bugs included
            error = _public_error(exc)
            # A call decides on its own (a compare-and-set, an insert of a new id): its refusal
            # fences nothing. A store that cannot write fences every later write.
            if isinstance(error, StoreUnavailable) and self._fence is None:
                self._fence = error
        else:
            self.commits += 1
        self._settle_one(call, result, error)

    @staticmethod
    def _settle_one(call: _Call[Any], result: Any, error: BaseException | None) -> None:
        try:
            call.loop.call_soon_threadsafe(_settle_call, call.future, result, error)
        except RuntimeError:  # that event loop is closed; nobody is waiting any more
            pass

    def _fenced_error(self) -> StoreUnavailable:
        return StoreUnavailable(f"{FENCED}: {self._fence}")

    def _write(self, conn: sqlite3.Connection, pending: list[_Pending]) -> None:
        """Commit the whole group at once; on failure, commit the change sets one by one up to
        the one that fails, which fences the store: it and all after it fail (core.store)."""
        if self._fence is None and len(pending) > 1:
            error = self._transaction(conn, pending)
            if error is None:
                self._notify([(p, None) for p in pending])
                return
            log.warning(
                "group commit failed; retrying change sets one by one",
                size=len(pending),
                error=str(error),
            )
        outcomes: list[tuple[_Pending, BaseException | None]] = []
        for p in pending:
            if self._fence is not None:
                outcomes.append((p, self._fenced_error()))
                continue
            error = self._transaction(conn, [p])
            if error is not None:
                self._fence = _public_error(error)
                log.error("store write failed; refusing writes until resumed", error=str(error))
            outcomes.append((p, error))
        self._notify(outcomes)

    def _transaction(self, conn: sqlite3.Connection, pending: list[_Pending]) -> Exception | None:
        """Write `pending` in one transaction; return the error instead of raising it.

        Rows are written table by table (tasks, runs, workers, output), each table's rows in
        call order, so the last upsert of an id wins. Within one group a run may therefore find
        its task in a later change set of the same group; the engine never relies on that.
        Then, change set by change set: schedules, tokens and audit events (numbered in call
        order); the audit events beyond retention are deleted, oldest first.
        """
        if len(pending) == 1:
            one = pending[0]
            tasks, runs, workers, chunks = one.tasks, one.runs, one.workers, one.chunks
        else:
            tasks = [row for p in pending for row in p.tasks]
            runs = [row for p in pending for row in p.runs]
            workers = [row for p in pending for row in p.workers]
            chunks = [row for p in pending for row in p.chunks]
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if tasks:
                    conn.executemany(_UPSERT_TASK, tasks)
                if runs:
                    conn.executemany(_UPSERT_RUN, runs)
                if workers:
                    conn.executemany(_UPSERT_WORKER, workers)
                if chunks:
                    conn.executemany(_INSERT_CHUNK, chunks)
                audited = False
                for p in pending:  # in call order
                    if p.schedules:  # upserts then deletions
                        conn.executemany(_UPSERT_SCHEDULE, p.schedules)
                    if p.deleted_schedules:
                        conn.executemany(_DELETE_SCHEDULE, p.deleted_schedules)
                    if p.bootstrap_tokens:
                        conn.executemany(_UPSERT_BOOTSTRAP, p.bootstrap_tokens)
                    if p.api_tokens:
                        conn.executemany(_UPSERT_API_TOKEN, p.api_tokens)
                    if p.audit_events:
                        conn.executemany(_INSERT_AUDIT, p.audit_events)
                        audited = True
                    if p.workflows:
                        conn.executemany(_INSERT_WORKFLOW, p.workflows)
                    if p.workflow_runs:
                        conn.executemany(_UPSERT_WORKFLOW_RUN, p.workflow_runs)
                if audited:
                    conn.execute(_TRIM_AUDIT, (self.audit_retention,))
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except Exception as exc:
            return exc
        self.commits += 1
        return None

    @staticmethod
    def _notify(outcomes: list[tuple[_Pending, BaseException | None]]) -> None:
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], BaseException | None]]
        ] = {}
        for p, error in outcomes:
            by_loop.setdefault(p.loop, []).append((p.future, _public_error(error)))
        for loop, results in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, results)
            except RuntimeError:  # that event loop is closed; nobody is waiting any more
                pass

    def _connect_writer(self) -> sqlite3.Connection:
        _create_private(self.path)  # issue 12: task inputs, results and the audit log: 0600
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            self._check_version(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{self.path}: could not enable WAL (journal_mode={mode})")
            _tighten(self.path)  # SQLite gives -wal/-shm the database's mode; older ones: fix
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Checkpoints run in their own thread (see _checkpoint_main), never inside a commit.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            self.migrations_applied = self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _checkpoint_main(self) -> None:
        """Copy the WAL back into the database every second, off the commit path.

        PASSIVE checkpoints never block the writer; left to SQLite, a checkpoint runs inside
        the COMMIT that crosses 1,000 WAL pages and stalls it for several milliseconds.
        """
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            seen = self.commits
            while not self._stop_checkpoints.wait(_CHECKPOINT_INTERVAL):
                if self.commits != seen:
                    seen = self.commits
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error as exc:
                        log.warning("wal checkpoint failed", error=str(exc))
        finally:
            conn.close()

    def _check_version(self, conn: sqlite3.Connection) -> int:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} has schema version {version}, but this TaskRun only knows versions"
                f" up to {SCHEMA_VERSION}; it was written by a newer TaskRun, upgrade to open it"
            )
        return version

    def _migrate(self, conn: sqlite3.Connection) -> int:
        """Apply the missing migrations, each in its own transaction; return how many ran."""
        if self._check_version(conn) == SCHEMA_VERSION:
            return 0
        applied = 0
        for target, statements in enumerate(MIGRATIONS, start=1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                if self._check_version(conn) >= target:  # another process got there first
                    conn.execute("COMMIT")
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            applied += 1
            log.info("store schema migrated", path=str(self.path), version=target)
        return applied

    # --- reads ---------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._read_uri, uri=True, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            self._local.conn = conn
            with self._read_lock:
                self._read_connections.append(conn)
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return fn(self._reader())

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        readers = self._readers
        if readers is None or self._closed:
            raise RuntimeError("store is not open")
        return await asyncio.get_running_loop().run_in_executor(readers, self._call, fn)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._read(lambda conn: conn.execute(sql, params).fetchall())

    async def _fetchone(self, sql: str, params: Sequence[Any]) -> Row | None:
        row: Row | None = await self._read(lambda conn: conn.execute(sql, params).fetchone())
        return row

    async def get_task(self, task_id: TaskId) -> Task | None:
        row = await self._fetchone(f"{_SELECT_TASK} WHERE id = ?", (task_id,))
        return None if row is None else _task(row)

    async def get_task_by_idempotency_key(self, key: str) -> Task | None:
        if not key:
            return None
        row = await self._fetchone(
            f"{_SELECT_TASK} WHERE idempotency_key = ? AND idempotency_key <> ''", (key,)
        )
        return None if row is None else _task(row)

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        if query.limit < 1:
            raise ValueError(f"limit must be positive, got {query.limit}")
        where: list[str] = []
        params: list[Any] = []
        if query.statuses:
            where.append(f"status IN ({', '.join('?' * len(query.statuses))})")
            params.extend(sorted(int(s) for s in query.statuses))
        if query.agent:
            where.append("agent = ?")
            params.append(query.agent)
        if query.worker_id:
            where.append("worker_id = ?")
            params.append(query.worker_id)
        if query.schedule:
            where.append("schedule = ? AND schedule <> ''")  # lets the partial index serve it
            params.append(query.schedule)
        if query.before:
            where.append("id < ?")
            params.append(query.before)
        for key, value in query.labels:
            where.append(_LABEL_MATCH)
            params.extend((key, value))
        sql = _SELECT_TASK
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(query.limit + 1)
        rows = await self._fetchall(sql, params)
        tasks = [_task(r) for r in rows[: query.limit]]
        return TaskPage(tasks, tasks[-1].id if len(rows) > query.limit else None)

    async def list_unfinished_tasks(self) -> list[Task]:
        rows = await self._fetchall(f"{_SELECT_TASK} WHERE status IN (1, 2) ORDER BY id")
        return [_task(r) for r in rows]

    async def get_run(self, run_id: RunId) -> Run | None:
        row = await self._fetchone(f"{_SELECT_RUN} WHERE id = ?", (run_id,))
        return None if row is None else _run(row)

    async def list_runs(self, task_id: TaskId) -> list[Run]:
        rows = await self._fetchall(
            f"{_SELECT_RUN} WHERE task_id = ? ORDER BY attempt, id", (task_id,)
        )
        return [_run(r) for r in rows]

    async def list_unfinished_runs(self) -> list[Run]:
        rows = await self._fetchall(f"{_SELECT_RUN} WHERE status IN (1, 2, 3) ORDER BY id")
        return [_run(r) for r in rows]

    async def get_worker(self, worker_id: WorkerId) -> Worker | None:
        row = await self._fetchone(f"{_SELECT_WORKER} WHERE id = ?", (worker_id,))
        return None if row is None else _worker(row)

    async def list_workers(self, statuses: frozenset[WorkerStatus] = frozenset()) -> list[Worker]:
        if statuses:
            marks = ", ".join("?" * len(statuses))
            rows = await self._fetchall(
                f"{_SELECT_WORKER} WHERE status IN ({marks}) ORDER BY id",
                sorted(int(s) for s in statuses),
            )
        else:
            rows = await self._fetchall(f"{_SELECT_WORKER} ORDER BY id")
        return [_worker(r) for r in rows]

    async def read_output(
        self, run_ids: Sequence[RunId], after: dict[RunId, int] | None = None, limit: int = 10_000
    ) -> list[OutputChunk]:
        """Chunks of these runs in (run order given, attempt, seq) order, after the given seq."""
        if limit < 1 or not run_ids:
            return []
        floors = after or {}
        wanted = list(dict.fromkeys(run_ids))

        def read(conn: sqlite3.Connection) -> list[Row]:
            rows: list[Row] = []
            conn.execute("BEGIN")  # one snapshot across the per-run queries
            try:
                for run_id in wanted:
                    left = limit - len(rows)
                    if left <= 0:
                        break
                    floor = floors.get(run_id, _NO_FLOOR)
                    rows.extend(conn.execute(_SELECT_OUTPUT, (run_id, floor, left)).fetchall())
            finally:
                conn.execute("COMMIT")
            return rows

        return [_chunk(r) for r in await self._read(read)]

    # --- schedules -----------------------------------------------------------------------------

    async def get_schedule(self, name: str) -> Schedule | None:
        row = await self._fetchone(f"{_SELECT_SCHEDULE} WHERE name = ?", (name,))
        return None if row is None else _schedule(row)

    async def list_schedules(self) -> list[Schedule]:
        rows = await self._fetchall(f"{_SELECT_SCHEDULE} ORDER BY name")
        return [_schedule(r) for r in rows]

    # --- workflows (issue 17) -------------------------------------------------------------------

    async def get_workflow(self, name: str, version: int = 0) -> Workflow | None:
        if version:
            row = await self._fetchone(
                f"{_SELECT_WORKFLOW} WHERE name = ? AND version = ?", (name, version)
            )
        else:
            row = await self._fetchone(
                f"{_SELECT_WORKFLOW} WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            )
        return None if row is None else _workflow(row)

    async def list_workflows(self) -> list[Workflow]:
        rows = await self._fetchall(
            f"{_SELECT_WORKFLOW} w WHERE version = "
            "(SELECT MAX(version) FROM workflows v WHERE v.name = w.name) ORDER BY name"
        )
        return [_workflow(r) for r in rows]

    async def get_workflow_run(self, run_id: str) -> WorkflowRun | None:
        row = await self._fetchone(f"{_SELECT_WORKFLOW_RUN} WHERE id = ?", (run_id,))
        return None if row is None else _workflow_run(row)

    async def get_workflow_run_by_key(self, key: str) -> WorkflowRun | None:
        row = await self._fetchone(f"{_SELECT_WORKFLOW_RUN} WHERE idempotency_key = ?", (key,))
        return None if row is None else _workflow_run(row)

    async def list_workflow_runs(
        self, workflow: str = "", *, unfinished: bool = False, limit: int = 100
    ) -> list[WorkflowRun]:
        where, params = [], []
        if workflow:
            where.append("workflow = ?")
            params.append(workflow)
        if unfinished:
            where.append("status = 1")
        sql = _SELECT_WORKFLOW_RUN + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY created_at DESC, id DESC"
        if not unfinished:
            sql += f" LIMIT {int(limit)}"
        return [_workflow_run(r) for r in await self._fetchall(sql, params)]

    # --- access control ------------------------------------------------------------------------

    async def get_bootstrap_token(self, token_id: str) -> BootstrapToken | None:
        row = await self._fetchone(f"{_SELECT_BOOTSTRAP} WHERE id = ?", (token_id,))
        return None if row is None else _bootstrap(row)

    async def list_bootstrap_tokens(self) -> list[BootstrapToken]:
        """Oldest first: by (created_at, id)."""
        rows = await self._fetchall(f"{_SELECT_BOOTSTRAP} ORDER BY created_at, id")
        return [_bootstrap(r) for r in rows]

    async def consume_bootstrap_token(
        self, token_id: str, now: datetime, host: str = ""
    ) -> BootstrapToken | None:
        """Mark the token used if it is neither used nor revoked (expiry is not checked).

        One conditional UPDATE ... RETURNING on the writer connection, serialized with every
        other write and committed before this returns; the row comes back only to the winner.
        """
        params = (_us(now), host, token_id)

        def consume(conn: sqlite3.Connection) -> Row | None:
            rows = conn.execute(_CONSUME_BOOTSTRAP, params).fetchall()
            return rows[0] if rows else None

        row = await self._write_call(consume)
        return None if row is None else _bootstrap(row)

    async def get_api_token(self, token_id: str) -> ApiToken | None:
        row = await self._fetchone(f"{_SELECT_API_TOKEN} WHERE id = ?", (token_id,))
        return None if row is None else _api_token(row)

    async def list_api_tokens(self) -> list[ApiToken]:
        """Oldest first: by (created_at, id)."""
        rows = await self._fetchall(f"{_SELECT_API_TOKEN} ORDER BY created_at, id")
        return [_api_token(r) for r in rows]

    async def list_audit_events(self, query: AuditQuery) -> list[AuditEvent]:
        """Newest first; at most query.limit; only ids below query.before_id when it is set."""
        if query.limit < 1:
            raise ValueError(f"limit must be positive, got {query.limit}")
        where: list[str] = []
        params: list[Any] = []
        if query.before_id:
            where.append("id < ?")
            params.append(query.before_id)
        if query.kinds:
            where.append(f"kind IN ({', '.join('?' * len(query.kinds))})")
            params.extend(sorted(str(k) for k in query.kinds))
        sql = _SELECT_AUDIT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(query.limit)
        return [_audit(r) for r in await self._fetchall(sql, params)]

    # --- webhooks (issue 16) -------------------------------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> None:
        row = _webhook_row(webhook)

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(f"INSERT INTO webhooks VALUES ({', '.join('?' * len(row))})", row)
            except sqlite3.IntegrityError:
                raise ValueError(f"webhook {webhook.id!r} already exists") from None

        await self._write_call(insert)

    async def delete_webhook(self, webhook_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ?", (webhook_id,))
            return conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,)).rowcount > 0

        return await self._write_call(delete)

    async def list_webhooks(self) -> list[Webhook]:
        rows = await self._fetchall(f"{_SELECT_WEBHOOK} ORDER BY created_at, id")
        return [_webhook(r) for r in rows]

    async def add_webhook_deliveries(
        self, deliveries: Sequence[WebhookDelivery]
    ) -> list[WebhookDelivery]:
        rows = [(_delivery_row(d), d) for d in deliveries]

        def insert(conn: sqlite3.Connection) -> list[WebhookDelivery]:
            stored = []
            for row, delivery in rows:
                cursor = conn.execute(_INSERT_DELIVERY, row)
                if cursor.rowcount > 0:
                    stored.append(delivery)
            return stored

        return await self._write_call(insert) if rows else []

    async def update_webhook_delivery(self, delivery: WebhookDelivery) -> None:
        params = (
            str(delivery.status),
            delivery.attempts,
            delivery.last_status_code,
            delivery.last_error,
            _us(delivery.next_attempt_at),
            _us_or_none(delivery.delivered_at),
            delivery.id,
        )

        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE webhook_deliveries SET status = ?, attempts = ?, last_status_code = ?, "
                "last_error = ?, next_attempt_at = ?, delivered_at = ? WHERE id = ?",
                params,
            )

        await self._write_call(update)

    async def list_webhook_deliveries(
        self, webhook_id: str = "", *, pending: bool = False, limit: int = 100
    ) -> list[WebhookDelivery]:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        where: list[str] = []
        params: list[Any] = []
        if webhook_id:
            where.append("webhook_id = ?")
            params.append(webhook_id)
        if pending:
            where.append("status = ?")
            params.append(str(DeliveryStatus.PENDING))
        sql = _SELECT_DELIVERY + (" WHERE " + " AND ".join(where) if where else "")
        sql += (
            " ORDER BY next_attempt_at, id LIMIT ?"
            if pending
            else " ORDER BY created_at DESC, id DESC LIMIT ?"
        )
        params.append(limit)
        return [_delivery(r) for r in await self._fetchall(sql, params)]


_SELECT_WEBHOOK: Final = (
    "SELECT id, url, events, secret, created_at, labels, agent, schedule, description, "
    "created_by FROM webhooks"
)
_DELIVERY_COLUMNS: Final = (
    "id, webhook_id, event, event_key, payload, created_at, next_attempt_at, status, attempts, "
    "last_status_code, last_error, delivered_at"
)
_SELECT_DELIVERY: Final = f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries"
_INSERT_DELIVERY: Final = (
    f"INSERT OR IGNORE INTO webhook_deliveries ({_DELIVERY_COLUMNS}) "
    "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = ?)"
)


def _webhook_row(w: Webhook) -> Row:
    return (
        w.id,
        w.url,
        _dumps(sorted(str(e) for e in w.events)),
        w.secret,
        _us(w.created_at),
        _dumps(w.labels),
        w.agent,
        w.schedule,
        w.description,
        w.created_by,
    )


def _webhook(r: Row) -> Webhook:
    return Webhook(
        id=r[0],
        url=r[1],
        events=frozenset(WebhookEvent(e) for e in _loads(r[2])),
        secret=r[3],
        created_at=_dt(r[4]),
        labels=_loads(r[5]),
        agent=r[6],
        schedule=r[7],
        description=r[8],
        created_by=r[9],
    )


def _delivery_row(d: WebhookDelivery) -> Row:
    """The insert's parameters: the columns, then the webhook id again (it must exist)."""
    return (
        d.id,
        d.webhook_id,
        str(d.event),
        d.event_key,
        d.payload,
        _us(d.created_at),
        _us(d.next_attempt_at),
        str(d.status),
        d.attempts,
        d.last_status_code,
        d.last_error,
        _us_or_none(d.delivered_at),
        d.webhook_id,
    )


def _delivery(r: Row) -> WebhookDelivery:
    return WebhookDelivery(
        id=r[0],
        webhook_id=r[1],
        event=WebhookEvent(r[2]),
        event_key=r[3],
        payload=r[4],
        created_at=_dt(r[5]),
        next_attempt_at=_dt(r[6]),
        status=DeliveryStatus(r[7]),
        attempts=r[8],
        last_status_code=r[9],
        last_error=r[10],
        delivered_at=_dt_or_none(r[11]),
    )


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (0600), or make an existing one so:
    the process umask (0644 under 022) is not enough."""
    path.touch(mode=0o600, exist_ok=True)
    _tighten(path)


def _tighten(path: Path) -> None:
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            name.chmod(0o600)
        except FileNotFoundError:
            pass
