"""PostgreSQL store: psycopg 3 (asyncio), one writer task with group commit, pooled reads.

Writes: `submit` encodes the change set into parameter tuples at once (so later mutation of the
caller's objects cannot leak in; a naive datetime is refused there with ValueError and fences
nothing) and queues it. One writer task owns the only write connection: it takes everything
queued, writes it in one transaction with ``executemany`` upserts (psycopg pipelines them),
commits, then resolves every caller's future. If that group transaction fails, the change sets
are retried one by one, each in its own transaction, up to the one that fails: it fences the
store, and it and every change set after it fail with StoreUnavailable until `resume` (see
core.store). A write whose outcome the caller needs (consuming a bootstrap token) is queued the
same way and runs alone in its own transaction, in queue order.

Errors: constraint violations (and values PostgreSQL cannot hold, such as NUL characters in
text) surface as ValueError, as from MemoryStore and SqliteStore; a database that cannot be
reached or cannot write as StoreUnavailable ("the store cannot write: <reason>"; reads: "the
store cannot read: <reason>"). A connection lost to a restart is replaced by the next write or
by `resume`; a write or read whose connection turns out dead before anything was committed is
retried once on a new connection, so a restart while the store was idle costs nothing, reads
fail at once while the server is down, and everything works again as soon as it is back.

Durability: a change set is committed (PostgreSQL's own durability, ``synchronous_commit``) when
its future resolves. A connection lost during COMMIT leaves the outcome unknown. A change set
written alone then fails and fences the store. A group is retried change set by change set, as
after any failed group commit: if the server is back at once, each is written again on a new
connection; their upserts and output appends are idempotent, their audit events are not (they
may then be stored twice).

Schema: versioned migrations (postgres_schema.py), applied by `open()` under an advisory lock
(several processes may open one database at once) and recorded in the table ``taskrun_schema``.
Tables are created in the connection's current schema (set ``options=-csearch_path=NAME`` in
the URL to use another one). Datetimes are bigint microseconds since the epoch (UTC), exact both
ways; JSON values are jsonb. Row mapping and encodings are shared with SQLite (rows.py).

Why one module: it is one implementation of the Store protocol (the writer, the reads,
applying migrations); its schema is in postgres_schema.py, what both SQL stores share in rows.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Generic, TypeVar

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row
from psycopg.types.string import TextLoader

from taskrun.controlplane.store.eventlog import stored_events
from taskrun.controlplane.store.postgres_schema import MIGRATIONS, SCHEMA_VERSION
from taskrun.controlplane.store.rows import (
    API_TOKEN_COLUMNS,
    AUDIT_COLUMNS,
    BOOTSTRAP_COLUMNS,
    CHUNK_COLUMNS,
    CONVERSATION_COLUMNS,
    DELIVERY_COLUMNS,
    RUN_COLUMNS,
    RUN_SET_ONCE,
    SCHEDULE_COLUMNS,
    TASK_COLUMNS,
    TASK_SET_ONCE,
    UNFINISHED_RUN_STATUSES,
    UNFINISHED_TASK_STATUSES,
    WEBHOOK_COLUMNS,
    WORKER_COLUMNS,
    WORKFLOW_COLUMNS,
    WORKFLOW_RUN_COLUMNS,
    Params,
    api_token_from,
    api_token_row,
    audit_from,
    audit_row,
    bootstrap_from,
    bootstrap_row,
    chunk_from,
    chunk_row,
    column_list,
    conversation_row,
    delivery_row,
    delivery_update,
    dumps,
    late_usage_targets,
    once_each,
    plus_usage,
    run_from,
    run_row,
    schedule_from,
    schedule_row,
    task_from,
    task_row,
    turn_row,
    upsert_sql,
    upsert_turn_sql,
    us,
    webhook_row,
    worker_from,
    worker_row,
    workflow_row,
    workflow_run_row,
)
from taskrun.controlplane.store.sqlite import SchemaVersionError
from taskrun.controlplane.store.sqlreads import SqlReads
from taskrun.core.access import ApiToken, AuditEvent, AuditQuery, BootstrapToken
from taskrun.core.errors import StoreUnavailable
from taskrun.core.ids import RunId, TaskId, WorkerId
from taskrun.core.models import OutputChunk, Run, Task, Worker
from taskrun.core.schedule import Schedule
from taskrun.core.status import WorkerStatus
from taskrun.core.store import (
    EVENT_RETENTION,
    FENCED,
    ChangeSet,
    TaskPage,
    TaskQuery,
    trim_due,
)
from taskrun.core.webhooks import Webhook, WebhookDelivery

__all__ = ["APPLICATION_NAME", "CONNECTION_DEFAULTS", "SCHEMA_VERSION", "PostgresStore"]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
Connection = psycopg.AsyncConnection[DictRow]

APPLICATION_NAME: Final = "taskrun"
# libpq settings the store uses unless the URL sets them: how pg_stat_activity names its
# connections, and bounds on how long a dead server or network path goes unnoticed (TCP
# keepalives after 10 s idle, and a cap on unacknowledged data): the writes in flight then fail
# with StoreUnavailable instead of waiting for the kernel's defaults (minutes to hours).
CONNECTION_DEFAULTS: Final[dict[str, str | int]] = {
    "application_name": APPLICATION_NAME,
    "connect_timeout": 10,  # seconds
    "keepalives": 1,
    "keepalives_idle": 10,  # seconds
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}
_READ_CONNECTIONS: Final = 8  # at most this many reads at once, each on its own connection
_NO_FLOOR: Final = -(2**63)  # smallest bigint: "no `after` for this run"
_LOCK_CLASS: Final = 0x7461736B  # "task": advisory lock namespace for migrations

# as in the partial indexes of the migrations (checked by a test)
_UNFINISHED_TASKS: Final = ", ".join(str(s) for s in UNFINISHED_TASK_STATUSES)
_UNFINISHED_RUNS: Final = ", ".join(str(s) for s in UNFINISHED_RUN_STATUSES)


_UPSERT_TASK: Final = upsert_sql("tasks", TASK_COLUMNS, "%s", TASK_SET_ONCE)
_UPSERT_RUN: Final = upsert_sql("runs", RUN_COLUMNS, "%s", RUN_SET_ONCE)
_UPSERT_WORKER: Final = upsert_sql("workers", WORKER_COLUMNS, "%s")
_INSERT_CHUNK: Final = (
    f"INSERT INTO output ({column_list(CHUNK_COLUMNS)})"
    f" VALUES ({', '.join(['%s'] * len(CHUNK_COLUMNS))}) ON CONFLICT DO NOTHING"
)
_UPSERT_SCHEDULE: Final = upsert_sql("schedules", SCHEDULE_COLUMNS, "%s")
_DELETE_SCHEDULE: Final = "DELETE FROM schedules WHERE name = %s"
_UPSERT_BOOTSTRAP: Final = upsert_sql("bootstrap_tokens", BOOTSTRAP_COLUMNS, "%s")
_UPSERT_API_TOKEN: Final = upsert_sql("api_tokens", API_TOKEN_COLUMNS, "%s")
_INSERT_AUDIT: Final = (
    f"INSERT INTO audit_events ({column_list(AUDIT_COLUMNS)})"
    f" VALUES ({', '.join(['%s'] * len(AUDIT_COLUMNS))})"
)
_LAST_AUDIT_ID: Final = "SELECT coalesce(max(id), 0) AS last FROM audit_events"
_TRIM_AUDIT: Final = "DELETE FROM audit_events WHERE id <= %s"
_CONSUME_BOOTSTRAP: Final = (
    "UPDATE bootstrap_tokens SET used_at = %s, used_by_host = %s"
    " WHERE id = %s AND used_at IS NULL AND revoked_at IS NULL"
    f" RETURNING {column_list(BOOTSTRAP_COLUMNS)}"
)
_PROBE: Final = (
    "INSERT INTO store_probe (id, written_at) VALUES (1, %s)"
    " ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at"
)

_INSERT_EVENT: Final = (
    "INSERT INTO events (position, kind, task_id, worker_id, data) VALUES (%s, %s, %s, %s, %s)"
)
_TRIM_EVENTS: Final = "DELETE FROM events WHERE position <= %s"
_SELECT_TASK: Final = f"SELECT {column_list(TASK_COLUMNS)} FROM tasks"
_SELECT_RUN: Final = f"SELECT {column_list(RUN_COLUMNS)} FROM runs"
_SELECT_WORKER: Final = f"SELECT {column_list(WORKER_COLUMNS)} FROM workers"
_SELECT_SCHEDULE: Final = f"SELECT {column_list(SCHEDULE_COLUMNS)} FROM schedules"
_SELECT_BOOTSTRAP: Final = f"SELECT {column_list(BOOTSTRAP_COLUMNS)} FROM bootstrap_tokens"
_SELECT_API_TOKEN: Final = f"SELECT {column_list(API_TOKEN_COLUMNS)} FROM api_tokens"
_SELECT_AUDIT: Final = f"SELECT {column_list(AUDIT_COLUMNS)} FROM audit_events"
# One statement, one snapshot: the runs in the order given, each one's chunks after its floor in
# (attempt, seq) order from the primary key, at most `limit` in all.
_SELECT_OUTPUT: Final = (
    f"SELECT {column_list(CHUNK_COLUMNS, 'o.')}, r.task_id"
    " FROM unnest(%(runs)s::text[], %(floors)s::bigint[]) WITH ORDINALITY AS w (run_id, floor, n)"
    " JOIN runs r ON r.id = w.run_id"
    " CROSS JOIN LATERAL ("
    f"  SELECT {column_list(CHUNK_COLUMNS)} FROM output"
    "   WHERE output.run_id = w.run_id AND output.seq > w.floor"
    "   ORDER BY output.attempt, output.seq LIMIT %(limit)s"
    " ) o"
    " ORDER BY w.n, o.attempt, o.seq LIMIT %(limit)s"
)


# --- connections and errors ------------------------------------------------------------------


def describe(url: str) -> str:
    """Where `url` points, without its password: "host:port/dbname"."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an invalid PostgreSQL URL"
    host = str(parts.get("host") or "localhost")
    port = str(parts.get("port") or "5432")
    return f"{host}:{port}/{parts.get('dbname') or parts.get('user') or ''}"


def _reason(exc: BaseException) -> str:
    """A one-line reason from a psycopg error (whose messages span lines)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _public_error(exc: BaseException | None) -> BaseException | None:
    """Constraint violations and values PostgreSQL refuses as ValueError, the same as the other
    stores; a database that cannot be reached or cannot write as StoreUnavailable."""
    error: BaseException
    if isinstance(exc, psycopg.IntegrityError | psycopg.DataError):
        error = ValueError(f"change set rejected by the store: {_reason(exc)}")
    elif isinstance(exc, psycopg.Error):
        error = StoreUnavailable(f"the store cannot write: {_reason(exc)}")
    else:
        return exc
    error.__cause__ = exc
    return error


async def _configure(conn: Connection) -> None:
    """jsonb comes back as its text: the row mapping (rows.py) decodes JSON text itself."""
    conn.adapters.register_loader("jsonb", TextLoader)


class _ReadPool:
    """Connections for reads: at most `size` in use, idle ones kept for the next read.

    Made for failing fast and recovering at once: a read while the server is down fails after
    one connection attempt (psycopg_pool's would wait for its timeout, and retry connecting
    with a backoff that grows to seconds, delaying reads after the server is back); a
    connection that broke is closed, never returned.
    """

    def __init__(self, connect: Callable[[], Awaitable[Connection]], size: int) -> None:
        self._connect = connect
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self, *, fresh: bool = False) -> AsyncIterator[Connection]:
        """A connection for one read; `fresh`: a new one (after an idle one turned out dead)."""
        async with self._slots:
            if fresh:
                await self.discard_idle()
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                yield conn
            finally:
                if (
                    self._closed
                    or conn.closed
                    or conn.info.transaction_status != TransactionStatus.IDLE
                ):
                    await _close_quietly(conn)
                else:
                    self._idle.append(conn)

    async def discard_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close_quietly(conn)

    async def close(self) -> None:
        """Close the idle connections now, and the ones in use when their read ends."""
        self._closed = True
        await self.discard_idle()


async def _close_quietly(conn: Connection) -> None:
    try:
        await conn.close()
    except psycopg.Error as exc:
        log.warning("closing a store connection failed", error=_reason(exc))


class _Pending:
    """One encoded change set waiting for the writer, and the future its caller awaits."""

    __slots__ = (
        "api_tokens",
        "audit_events",
        "bootstrap_tokens",
        "chunks",
        "conversations",
        "deleted_conversations",
        "deleted_schedules",
        "events",
        "future",
        "late_usage",
        "runs",
        "schedules",
        "tasks",
        "turns",
        "workers",
        "workflow_runs",
        "workflows",
    )

    def __init__(self, changes: ChangeSet, future: asyncio.Future[None]) -> None:
        tasks, runs = once_each(changes.tasks), once_each(changes.runs)
        self.tasks = [task_row(t) for t in tasks]
        self.runs = [run_row(r) for r in runs]
        self.workers = [worker_row(w) for w in changes.workers]
        self.chunks = [chunk_row(c) for c in changes.chunks]
        self.schedules = [schedule_row(s) for s in changes.schedules]
        self.deleted_schedules = [(n,) for n in changes.deleted_schedules]
        self.bootstrap_tokens = [bootstrap_row(t) for t in changes.bootstrap_tokens]
        self.api_tokens = [api_token_row(t) for t in changes.api_tokens]
        self.audit_events = [audit_row(e) for e in changes.audit_events]
        self.conversations = [conversation_row(c) for c in changes.conversations]
        self.turns = [turn_row(t) for t in changes.turns]
        self.deleted_conversations = [(c,) for c in changes.deleted_conversations]
        self.workflows = [workflow_row(w) for w in changes.workflows]
        self.workflow_runs = [workflow_run_row(w) for w in changes.workflow_runs]
        self.late_usage = changes.late_usage
        self.events = stored_events(
            changes, zip(tasks, self.tasks, strict=True), zip(runs, self.runs, strict=True)
        )
        self.future = future


class _Call(Generic[_T]):
    """A function to run on the writer connection in its own transaction, between change sets
    (a compare-and-set whose outcome the caller needs); committed before its future resolves."""

    __slots__ = ("fn", "future", "runs_fenced")

    def __init__(
        self,
        fn: Callable[[Connection], Awaitable[_T]],
        future: asyncio.Future[_T],
        *,
        runs_fenced: bool = False,  # runs even while the store is fenced (the resume probe)
    ) -> None:
        self.fn = fn
        self.future = future
        self.runs_fenced = runs_fenced


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting; the outcome stands
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class PostgresStore(SqlReads):
    """`Store` on a PostgreSQL database. Call `open()` before use and `close()` when done.

    `url` is a libpq connection URL or string (``postgresql://user:pass@host:port/dbname``).
    """

    MARK = "%s"
    LABEL_MATCHES = "(labels::jsonb ->> %s) = %s"
    JSON_FIELD = "({column}::jsonb ->> '{key}')"

    def __init__(
        self,
        url: str,
        *,
        audit_retention: int = 100_000,
        event_retention: int = EVENT_RETENTION,
    ) -> None:
        """`audit_retention`: how many audit events to keep; beyond it the oldest are deleted;
        `event_retention`: the same for the event log (deleted a thousand at a time)."""
        if audit_retention < 1:
            raise ValueError(f"audit_retention must be positive, got {audit_retention}")
        if event_retention < 1:
            raise ValueError(f"event_retention must be positive, got {event_retention}")
        self.event_retention = event_retention
        self.url = url
        self.where = describe(url)
        self.audit_retention = audit_retention
        self.commits = 0  # transactions committed by the writer (group commits count once)
        self.migrations_applied = 0  # schema migrations run by the last `open()`
        self._connect_options: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
        given = conninfo_to_dict(url)
        for name, value in CONNECTION_DEFAULTS.items():
            if name not in given:
                self._connect_options[name] = value
        self._queue: asyncio.Queue[_Pending | _Call[Any] | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._conn: Connection | None = None  # the writer's connection
        self._pool: _ReadPool | None = None
        self._closed = False
        # Set by the writer when a write fails; while set, every write fails (see core.store).
        self._fence: BaseException | None = None
        # Run first in every write transaction (the leadership's epoch check, which raises
        # StoreUnavailable when this process no longer leads): see postgres_lease.py.
        self.write_guard: Callable[[Connection], Awaitable[None]] | None = None
        self.session_settings: dict[str, str] = {}  # SET on every new connection

    # --- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create or migrate the schema, start the writer task and the read pool."""
        if self._closed:
            raise RuntimeError("store is closed")
        if self._writer is not None:
            return
        try:
            self._conn = await self._connect()
            self.migrations_applied = await self._migrate(self._conn)
        except psycopg.OperationalError as exc:
            await self._close_connection()
            raise StoreUnavailable(
                f"cannot open the PostgreSQL store at {self.where}: {_reason(exc)}"
            ) from exc
        except BaseException:
            await self._close_connection()
            raise
        self._pool = _ReadPool(self._connect, _READ_CONNECTIONS)
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name="taskrun-store-writer")
        log.info("store opened", store="postgresql", database=self.where, schema=SCHEMA_VERSION)

    async def close(self) -> None:
        """Finish queued writes, stop the writer and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None and self._queue is not None:
            self._queue.put_nowait(None)
            await writer
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        await self._close_connection()
        log.info("store closed", store="postgresql", database=self.where, commits=self.commits)

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close_quietly(conn)

    async def _connect(self) -> Connection:
        conn: Connection = await psycopg.AsyncConnection.connect(self.url, **self._connect_options)
        await _configure(conn)
        for name, value in self.session_settings.items():
            await conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        return conn

    async def _connection(self) -> Connection:
        """The writer's connection, replaced if it was lost (a restart, a network failure)."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                log.warning("store connection lost; reconnecting", database=self.where)
                await self._close_connection()
            conn = self._conn = await self._connect()
        return conn

    async def _migrate(self, conn: Connection) -> int:
        """Apply the missing migrations under an advisory lock, each in its own transaction;
        return how many ran. SchemaVersionError if the database is newer than this TaskRun."""
        lock = "SELECT pg_advisory_lock(%s, hashtext(coalesce(current_schema(), '')))"
        unlock = "SELECT pg_advisory_unlock(%s, hashtext(coalesce(current_schema(), '')))"
        await conn.execute(lock, (_LOCK_CLASS,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS taskrun_schema ("
                " version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute(
                "SELECT coalesce(max(version), 0) AS version FROM taskrun_schema"
            )
            row = await cur.fetchone()
            version = int(row["version"]) if row else 0
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"the PostgreSQL store at {self.where} has schema version {version}, but this"
                    f" TaskRun only knows versions up to {SCHEMA_VERSION}; it was written by a"
                    " newer TaskRun, upgrade to open it"
                )
            applied = 0
            for target in range(version + 1, SCHEMA_VERSION + 1):
                async with conn.transaction():
                    for statement in MIGRATIONS[target - 1]:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO taskrun_schema (version) VALUES (%s)", (target,)
                    )
                applied += 1
                log.info("store schema migrated", database=self.where, version=target)
            return applied
        finally:
            if not conn.broken:
                await conn.execute(unlock, (_LOCK_CLASS,))

    # --- writes --------------------------------------------------------------------------------

    async def apply(self, changes: ChangeSet) -> None:
        """Commit `changes` atomically; returns once they are durable (see the module doc)."""
        await self.submit(changes)

    def submit(self, changes: ChangeSet) -> asyncio.Future[None]:
        """Encode `changes` now and queue them; the future resolves once they are durable.

        Cancelling the future does not withdraw a change set that is already queued.
        """
        if self._queue is None or self._writer is None or self._closed:
            raise RuntimeError("store is not open")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not changes:
            future.set_result(None)
            return future
        self._queue.put_nowait(_Pending(changes, future))
        return future

    async def resume(self) -> None:
        """Lift the fence after a failed write once a test write commits (see core.store)."""
        written_at = us(datetime.now(UTC))

        async def probe(conn: Connection) -> None:
            await conn.execute(_PROBE, (written_at,))

        await self._write_call(probe, fenced=True)

    async def _write_call(
        self, fn: Callable[[Connection], Awaitable[_T]], *, fenced: bool = False
    ) -> _T:
        """Run `fn` on the writer connection in its own transaction, in order with the change
        sets queued before it; return its result once committed."""
        if self._queue is None or self._writer is None or self._closed:
            raise RuntimeError("store is not open")
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Call(fn, future, runs_fenced=fenced))
        return await future

    async def _write_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        stopping = False
        while not stopping:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            items = [item for item in batch if item is not None]
            stopping = len(items) != len(batch)
            # Consecutive change sets are group-committed; a call runs alone, in queue order.
            group: list[_Pending] = []
            for item in items:
                if isinstance(item, _Pending):
                    group.append(item)
                    continue
                if group:
                    await self._write_group(group)
                    group = []
                await self._run_call(item)
            if group:
                await self._write_group(group)

    async def _write_group(self, pending: list[_Pending]) -> None:
        try:
            await self._write(pending)
        except Exception as exc:  # a bug here must not strand the callers
            log.exception("store writer failed")
            self._fence = self._fence or exc
            for p in pending:
                _settle(p.future, None, exc)

    async def _run_call(self, call: _Call[Any]) -> None:
        """Run one call in its own transaction and hand its outcome to its caller."""
        if self._fence is not None and not call.runs_fenced:
            _settle(call.future, None, self._fenced_error())
            return
        result: Any = None
        try:
            result = await self._in_transaction(call.fn)
        except Exception as exc:  # the caller gets every failure, bugs included
            error = _public_error(exc)
            # A call decides on its own (a compare-and-set, an insert of a new id): its refusal
            # fences nothing. A store that cannot write fences every later write.
            if isinstance(error, StoreUnavailable) and self._fence is None:
                self._fence = error
                log.error("store write failed; refusing writes until resumed", error=str(error))
            _settle(call.future, None, error)
            return
        self.commits += 1
        if call.runs_fenced and self._fence is not None:
            log.info("store writes again", database=self.where)
            self._fence = None
        _settle(call.future, result, None)

    def _fenced_error(self) -> StoreUnavailable:
        return StoreUnavailable(f"{FENCED}: {self._fence}")

    async def _write(self, pending: list[_Pending]) -> None:
        """Commit the whole group at once; on failure, commit the change sets one by one up to
        the one that fails, which fences the store: it and all after it fail (core.store)."""
        if self._fence is None and len(pending) > 1:
            error = await self._transaction(pending)
            if error is None:
                for p in pending:
                    _settle(p.future, None, None)
                return
            log.warning(
                "group commit failed; retrying change sets one by one",
                size=len(pending),
                error=_reason(error),
            )
        for p in pending:
            if self._fence is not None:
                _settle(p.future, None, self._fenced_error())
                continue
            error = await self._transaction([p])
            if error is not None:
                public = _public_error(error)
                self._fence = public
                log.error(
                    "store write failed; refusing writes until resumed",
                    database=self.where,
                    error=str(public),
                )
                _settle(p.future, None, public)
            else:
                _settle(p.future, None, None)

    async def _transaction(self, pending: list[_Pending]) -> Exception | None:
        """Write `pending` in one transaction; return the error instead of raising it.

        Rows are written table by table (tasks, runs, workers, output), each table's rows in
        call order, so the last upsert of an id wins (as in SQLite). Then, change set by change
        set: schedules, tokens and audit events (numbered in call order); the audit events
        beyond retention are deleted, oldest first.
        """
        tasks = [row for p in pending for row in p.tasks]
        runs = [row for p in pending for row in p.runs]
        workers = [row for p in pending for row in p.workers]
        chunks = [row for p in pending for row in p.chunks]
        events = [row for p in pending for row in p.events]

        async def write(conn: Connection) -> None:
            async with conn.cursor() as cur:
                if tasks:
                    await cur.executemany(_UPSERT_TASK, tasks)
                if runs:
                    await cur.executemany(_UPSERT_RUN, runs)
                if workers:
                    await cur.executemany(_UPSERT_WORKER, workers)
                if chunks:
                    await cur.executemany(_INSERT_CHUNK, chunks)
                if events:
                    await cur.executemany(_INSERT_EVENT, events)
                    if trim_due(events[0][0], events[-1][0], self.event_retention):
                        await cur.execute(_TRIM_EVENTS, (events[-1][0] - self.event_retention,))
                last_audit_id: int | None = None
                for p in pending:  # in call order
                    if p.schedules:  # upserts then deletions
                        await cur.executemany(_UPSERT_SCHEDULE, p.schedules)
                    if p.deleted_schedules:
                        await cur.executemany(_DELETE_SCHEDULE, p.deleted_schedules)
                    if p.bootstrap_tokens:
                        await cur.executemany(_UPSERT_BOOTSTRAP, p.bootstrap_tokens)
                    if p.api_tokens:
                        await cur.executemany(_UPSERT_API_TOKEN, p.api_tokens)
                    if p.audit_events:
                        if last_audit_id is None:
                            await cur.execute(_LAST_AUDIT_ID)
                            row = await cur.fetchone()
                            last_audit_id = int(row["last"]) if row else 0
                        numbered: list[Params] = []
                        for event in p.audit_events:
                            last_audit_id += 1
                            numbered.append((last_audit_id, *event))
                        await cur.executemany(_INSERT_AUDIT, numbered)
                    if p.conversations:  # upserts, turns, then deletions
                        await cur.executemany(_UPSERT_CONVERSATION, p.conversations)
                    if p.turns:
                        await cur.executemany(_UPSERT_TURN, p.turns)
                    if p.deleted_conversations:
                        await cur.executemany(_DELETE_CONVERSATION, p.deleted_conversations)
                    if p.workflows:
                        await cur.executemany(_INSERT_WORKFLOW, p.workflows)
                    if p.workflow_runs:
                        await cur.executemany(_UPSERT_WORKFLOW_RUN, p.workflow_runs)
                    for late in p.late_usage:  # read-modify-write under the rows' locks
                        for table, where, params in late_usage_targets(late, "%s"):
                            await cur.execute(
                                f"SELECT usage FROM {table} WHERE {where} FOR UPDATE", params
                            )
                            row = await cur.fetchone()
                            if row is not None:
                                await cur.execute(
                                    f"UPDATE {table} SET usage = %s WHERE {where}",
                                    (plus_usage(row["usage"], late.usage), *params),
                                )
                if last_audit_id is not None and last_audit_id > self.audit_retention:
                    await cur.execute(_TRIM_AUDIT, (last_audit_id - self.audit_retention,))

        try:
            await self._in_transaction(write)
        except Exception as exc:
            return exc
        self.commits += 1
        return None

    async def _in_transaction(self, body: Callable[[Connection], Awaitable[_T]]) -> _T:
        """Run `body` in one transaction on the writer's connection and commit it.

        A connection found dead before COMMIT was sent (the server restarted, or dropped it
        while it was idle) has committed nothing: the transaction runs once more on a new
        connection. A connection lost during COMMIT leaves the outcome unknown: that fails.
        """
        for retry in (False, True):
            conn = await self._connection()
            committing = False
            try:
                async with conn.transaction():
                    if self.write_guard is not None:
                        await self.write_guard(conn)
                    result = await body(conn)
                    committing = True  # leaving the block sends COMMIT
                return result
            except psycopg.OperationalError as exc:
                if retry or committing or not conn.broken:
                    raise
                log.warning(
                    "store connection lost before the commit; writing on a new one",
                    database=self.where,
                    error=_reason(exc),
                )
        raise AssertionError("unreachable")

    # --- reads ---------------------------------------------------------------------------------

    async def _fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[DictRow]:
        """Run one read. A pooled connection found dead (the server restarted since it was
        last used) is replaced and the read retried once on a new connection."""
        pool = self._pool
        if pool is None or self._closed:
            raise RuntimeError("store is not open")
        for fresh in (False, True):
            conn: Connection | None = None
            try:
                async with pool.connection(fresh=fresh) as conn:
                    cur = await conn.execute(sql, params)
                    return await cur.fetchall()
            except psycopg.OperationalError as exc:
                if fresh or conn is None or not conn.broken:
                    raise StoreUnavailable(f"the store cannot read: {_reason(exc)}") from exc
        raise AssertionError("unreachable")

    async def _fetchone(self, sql: str, params: Sequence[Any]) -> DictRow | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def get_task(self, task_id: TaskId) -> Task | None:
        row = await self._fetchone(f"{_SELECT_TASK} WHERE id = %s", (task_id,))
        return None if row is None else task_from(row)

    async def get_task_by_idempotency_key(self, key: str) -> Task | None:
        if not key:
            return None
        row = await self._fetchone(
            f"{_SELECT_TASK} WHERE idempotency_key = %s AND idempotency_key <> ''", (key,)
        )
        return None if row is None else task_from(row)

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        if query.limit < 1:
            raise ValueError(f"limit must be positive, got {query.limit}")
        where: list[str] = []
        params: list[Any] = []
        if query.statuses:
            where.append("status = ANY(%s::smallint[])")
            params.append(sorted(int(s) for s in query.statuses))
        if query.agent:
            where.append("agent = %s")
            params.append(query.agent)
        if query.worker_id:
            where.append("worker_id = %s")
            params.append(query.worker_id)
        if query.schedule:
            where.append("schedule = %s AND schedule <> ''")  # lets the partial index serve it
            params.append(query.schedule)
        if query.parent_task_id:
            where.append("parent_task_id = %s")
            params.append(query.parent_task_id)
        if query.before:
            where.append("id < %s")
            params.append(query.before)
        for key, value in query.labels:
            where.append("labels @> %s::jsonb")  # served by the GIN index
            params.append(dumps({key: value}))
        sql = _SELECT_TASK
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT %s"
        params.append(query.limit + 1)
        rows = await self._fetchall(sql, params)
        tasks = [task_from(r) for r in rows[: query.limit]]
        return TaskPage(tasks, tasks[-1].id if len(rows) > query.limit else None)

    async def list_unfinished_tasks(self) -> list[Task]:
        rows = await self._fetchall(
            f"{_SELECT_TASK} WHERE status IN ({_UNFINISHED_TASKS}) ORDER BY id"
        )
        return [task_from(r) for r in rows]

    async def get_run(self, run_id: RunId) -> Run | None:
        row = await self._fetchone(f"{_SELECT_RUN} WHERE id = %s", (run_id,))
        return None if row is None else run_from(row)

    async def list_runs(self, task_id: TaskId) -> list[Run]:
        rows = await self._fetchall(
            f"{_SELECT_RUN} WHERE task_id = %s ORDER BY attempt, id", (task_id,)
        )
        return [run_from(r) for r in rows]

    async def list_unfinished_runs(self) -> list[Run]:
        rows = await self._fetchall(
            f"{_SELECT_RUN} WHERE status IN ({_UNFINISHED_RUNS}) ORDER BY id"
        )
        return [run_from(r) for r in rows]

    async def get_worker(self, worker_id: WorkerId) -> Worker | None:
        row = await self._fetchone(f"{_SELECT_WORKER} WHERE id = %s", (worker_id,))
        return None if row is None else worker_from(row)

    async def list_workers(self, statuses: frozenset[WorkerStatus] = frozenset()) -> list[Worker]:
        if statuses:
            rows = await self._fetchall(
                f"{_SELECT_WORKER} WHERE status = ANY(%s::smallint[]) ORDER BY id",
                (sorted(int(s) for s in statuses),),
            )
        else:
            rows = await self._fetchall(f"{_SELECT_WORKER} ORDER BY id")
        return [worker_from(r) for r in rows]

    async def read_output(
        self, run_ids: Sequence[RunId], after: dict[RunId, int] | None = None, limit: int = 10_000
    ) -> list[OutputChunk]:
        """Chunks of these runs in (run order given, attempt, seq) order, after the given seq."""
        if limit < 1 or not run_ids:
            if self._pool is None or self._closed:
                raise RuntimeError("store is not open")
            return []
        floors = after or {}
        wanted = list(dict.fromkeys(run_ids))
        rows = await self._fetchall(
            _SELECT_OUTPUT,
            {
                "runs": wanted,
                "floors": [floors.get(r, _NO_FLOOR) for r in wanted],
                "limit": limit,
            },
        )
        return [chunk_from(r) for r in rows]

    # --- schedules -----------------------------------------------------------------------------

    async def get_schedule(self, name: str) -> Schedule | None:
        row = await self._fetchone(f"{_SELECT_SCHEDULE} WHERE name = %s", (name,))
        return None if row is None else schedule_from(row)

    async def list_schedules(self) -> list[Schedule]:
        rows = await self._fetchall(f"{_SELECT_SCHEDULE} ORDER BY name")
        return [schedule_from(r) for r in rows]

    # --- access control ------------------------------------------------------------------------

    async def get_bootstrap_token(self, token_id: str) -> BootstrapToken | None:
        row = await self._fetchone(f"{_SELECT_BOOTSTRAP} WHERE id = %s", (token_id,))
        return None if row is None else bootstrap_from(row)

    async def list_bootstrap_tokens(self) -> list[BootstrapToken]:
        """Oldest first: by (created_at, id)."""
        rows = await self._fetchall(f"{_SELECT_BOOTSTRAP} ORDER BY created_at, id")
        return [bootstrap_from(r) for r in rows]

    async def consume_bootstrap_token(
        self, token_id: str, now: datetime, host: str = ""
    ) -> BootstrapToken | None:
        """Mark the token used if it is neither used nor revoked (expiry is not checked).

        One conditional UPDATE ... RETURNING on the writer connection, serialized with every
        other write and committed before this returns; the row comes back only to the winner.
        """
        params = (us(now), host, token_id)

        async def consume(conn: Connection) -> DictRow | None:
            cur = await conn.execute(_CONSUME_BOOTSTRAP, params)
            return await cur.fetchone()

        row = await self._write_call(consume)
        return None if row is None else bootstrap_from(row)

    async def get_api_token(self, token_id: str) -> ApiToken | None:
        row = await self._fetchone(f"{_SELECT_API_TOKEN} WHERE id = %s", (token_id,))
        return None if row is None else api_token_from(row)

    async def list_api_tokens(self) -> list[ApiToken]:
        """Oldest first: by (created_at, id)."""
        rows = await self._fetchall(f"{_SELECT_API_TOKEN} ORDER BY created_at, id")
        return [api_token_from(r) for r in rows]

    async def list_audit_events(self, query: AuditQuery) -> list[AuditEvent]:
        """Newest first; at most query.limit; only ids below query.before_id when it is set."""
        if query.limit < 1:
            raise ValueError(f"limit must be positive, got {query.limit}")
        where: list[str] = []
        params: list[Any] = []
        if query.before_id:
            where.append("id < %s")
            params.append(query.before_id)
        if query.kinds:
            where.append("kind = ANY(%s::text[])")
            params.append(sorted(str(k) for k in query.kinds))
        sql = _SELECT_AUDIT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT %s"
        params.append(query.limit)
        return [audit_from(r) for r in await self._fetchall(sql, params)]

    # --- conversations -------------------------------------------------------------------------

    # --- workflows -----------------------------------------------------------------------------

    # --- webhooks ------------------------------------------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> None:
        row = webhook_row(webhook)

        async def insert(conn: Connection) -> None:
            try:
                async with conn.transaction():  # a savepoint: the refusal is the caller's
                    await conn.execute(_INSERT_WEBHOOK, row)
            except psycopg.errors.UniqueViolation:
                raise ValueError(f"webhook {webhook.id!r} already exists") from None

        await self._write_call(insert)

    async def delete_webhook(self, webhook_id: str) -> bool:
        async def delete(conn: Connection) -> bool:
            await conn.execute(
                "DELETE FROM webhook_deliveries WHERE webhook_id = %s", (webhook_id,)
            )
            cur = await conn.execute("DELETE FROM webhooks WHERE id = %s", (webhook_id,))
            return cur.rowcount > 0

        return await self._write_call(delete)

    async def add_webhook_deliveries(
        self, deliveries: Sequence[WebhookDelivery]
    ) -> list[WebhookDelivery]:
        rows = [((*delivery_row(d), d.webhook_id), d) for d in deliveries]

        async def insert(conn: Connection) -> list[WebhookDelivery]:
            stored = []
            for row, delivery in rows:
                cur = await conn.execute(_INSERT_DELIVERY, row)
                if cur.rowcount > 0:
                    stored.append(delivery)
            return stored

        return await self._write_call(insert) if rows else []

    async def update_webhook_delivery(self, delivery: WebhookDelivery) -> None:
        sql, params = delivery_update(delivery, "%s")

        async def update(conn: Connection) -> None:
            await conn.execute(sql, params)

        await self._write_call(update)


_UPSERT_CONVERSATION: Final = upsert_sql("conversations", CONVERSATION_COLUMNS, "%s")
_UPSERT_TURN: Final = upsert_turn_sql("%s")
_DELETE_CONVERSATION: Final = "DELETE FROM conversations WHERE id = %s"
_INSERT_WORKFLOW: Final = (
    f"INSERT INTO workflows ({column_list(WORKFLOW_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(WORKFLOW_COLUMNS))})"
)
_UPSERT_WORKFLOW_RUN: Final = upsert_sql("workflow_runs", WORKFLOW_RUN_COLUMNS, "%s")
_INSERT_WEBHOOK: Final = (
    f"INSERT INTO webhooks ({column_list(WEBHOOK_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(WEBHOOK_COLUMNS))})"
)
# the delivery's columns, then its webhook id again: stored only while the webhook exists
_INSERT_DELIVERY: Final = (
    f"INSERT INTO webhook_deliveries ({column_list(DELIVERY_COLUMNS)}) "
    f"SELECT {', '.join(['%s'] * len(DELIVERY_COLUMNS))} "
    "WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = %s) ON CONFLICT DO NOTHING"
)
