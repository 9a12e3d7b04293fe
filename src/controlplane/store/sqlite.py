"""SQLite store: one file in WAL mode, a writer thread with group commit, pooled read connections.

Durability: WAL with ``synchronous=NORMAL``. Once `SqliteStore.apply` returns, the change set is
committed to the WAL and survives the process crashing (including ``kill -9``). A power loss or
an operating-system crash may lose the last few commits; the file itself stays consistent.

Writes: `apply` encodes the change set into row tuples on the caller's thread (so later mutation
of the caller's objects cannot leak in) and queues them. One writer thread owns the only write
connection: it takes everything queued, writes it in one transaction, commits, then resolves
every caller's future on its event loop. Tasks, runs, workers, output and events are written
with statements of many rows each (`_write_rows`), the rest with ``executemany``. If that group
transaction fails, each change set is retried in its own transaction so only the offending one
gets the error. A small change set submitted while nothing is queued and the writer is idle is
committed at once on the submitting thread instead, with the same connection under the same
lock: a lone round trip then pays for no thread switches, and a busy store still commits in
groups.
A write whose outcome the caller needs (consuming a bootstrap token: a conditional UPDATE) is
queued the same way as a `_Call` and runs alone in its own transaction, in queue order.

Reads run in a small thread pool; each thread has its own read-only connection, so reads see
committed data and never wait behind the writer (WAL readers do not block on the writer). A
read of one row by its key, or of a task's runs, runs at once on the caller's thread instead,
with a read-only connection of its own: it takes tens of microseconds, against about 0.2 ms for
the two thread switches of the pool, and it never queues behind long reads. If SQLite answers
that connection busy (another process holding the file exclusively, a recovery after a crash),
the read goes to the pool, which waits as long as any read would, so the event loop never does.

Rows are read by column name and mapped to models by rows.py, shared with the PostgreSQL store:
datetimes are integer microseconds since the Unix epoch (UTC) and come back as
timezone-aware UTC datetimes equal to what was written. Naive datetimes are rejected.

Why one module: it is one implementation of the Store protocol (the writer thread, the reads,
applying migrations); its schema is in sqlite_schema.py, what both SQL stores share in rows.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import structlog

from taskrun.controlplane.store.eventlog import stored_events
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
from taskrun.controlplane.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
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
    LateUsage,
    TaskPage,
    TaskQuery,
    trim_due,
)
from taskrun.core.webhooks import Webhook, WebhookDelivery

__all__ = ["SCHEMA_VERSION", "SchemaVersionError", "SqliteStore"]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
Row = sqlite3.Row  # read by column name (see rows.py)

_BUSY_TIMEOUT_MS: Final = 10_000
# The one-row table a write that changes nothing else touches (resume's test write, the first
# write after a checkpoint).
_TOUCH_PROBE: Final = (
    "INSERT INTO store_probe (id, written_at) VALUES (1, ?) "
    "ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at"
)
_CHECKPOINT_INTERVAL: Final = 1.0  # seconds
_READ_THREADS: Final = 4
_INLINE_ROWS: Final = 16  # task, run and output rows of a change set committed inline
_NO_FLOOR: Final = -(2**63)  # smallest SQLite integer: "no `after` for this run"


_UPSERT_TASK: Final = upsert_sql("tasks", TASK_COLUMNS, "?", TASK_SET_ONCE)
_UPSERT_RUN: Final = upsert_sql("runs", RUN_COLUMNS, "?", RUN_SET_ONCE)
_UPSERT_WORKER: Final = upsert_sql("workers", WORKER_COLUMNS, "?")
_INSERT_CHUNK: Final = (
    f"INSERT OR IGNORE INTO output ({column_list(CHUNK_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(CHUNK_COLUMNS))})"
)

_INSERT_EVENT: Final = (
    "INSERT INTO events (position, kind, task_id, worker_id, data) VALUES (?, ?, ?, ?, ?)"
)
_TRIM_EVENTS: Final = "DELETE FROM events WHERE position <= ?"
_ROWS_PER_STATEMENT: Final = 64  # rows one statement writes at most (23 task columns: 1,472 ?s)
_SELECT_TASK: Final = f"SELECT {column_list(TASK_COLUMNS)} FROM tasks"
_SELECT_RUN: Final = f"SELECT {column_list(RUN_COLUMNS)} FROM runs"
_SELECT_WORKER: Final = f"SELECT {column_list(WORKER_COLUMNS)} FROM workers"
_SELECT_OUTPUT: Final = (
    f"SELECT {column_list(CHUNK_COLUMNS, 'o.')}, r.task_id"
    " FROM output o JOIN runs r ON r.id = o.run_id"
    " WHERE o.run_id = ? AND o.seq > ? ORDER BY o.attempt, o.seq LIMIT ?"
)
_LABEL_MATCH: Final = (
    "EXISTS (SELECT 1 FROM json_each(tasks.labels) AS l WHERE l.key = ? AND l.value = ?)"
)
_UPSERT_SCHEDULE: Final = upsert_sql("schedules", SCHEDULE_COLUMNS, "?")
_DELETE_SCHEDULE: Final = "DELETE FROM schedules WHERE name = ?"
_SELECT_SCHEDULE: Final = f"SELECT {column_list(SCHEDULE_COLUMNS)} FROM schedules"
_UPSERT_BOOTSTRAP: Final = upsert_sql("bootstrap_tokens", BOOTSTRAP_COLUMNS, "?")
_UPSERT_API_TOKEN: Final = upsert_sql("api_tokens", API_TOKEN_COLUMNS, "?")
_INSERT_AUDIT: Final = (
    f"INSERT INTO audit_events ({column_list(AUDIT_COLUMNS[1:])})"
    f" VALUES ({', '.join('?' * (len(AUDIT_COLUMNS) - 1))})"
)
# Keep the newest `retention` events. Ids have no gaps (AUTOINCREMENT, rolled back with the
# transaction), and both lookups are on the primary key, so this costs a few page reads.
_TRIM_AUDIT: Final = "DELETE FROM audit_events WHERE id <= (SELECT max(id) FROM audit_events) - ?"
_SELECT_BOOTSTRAP: Final = f"SELECT {column_list(BOOTSTRAP_COLUMNS)} FROM bootstrap_tokens"
_SELECT_API_TOKEN: Final = f"SELECT {column_list(API_TOKEN_COLUMNS)} FROM api_tokens"
_SELECT_AUDIT: Final = f"SELECT {column_list(AUDIT_COLUMNS)} FROM audit_events"
_CONSUME_BOOTSTRAP: Final = (
    "UPDATE bootstrap_tokens SET used_at = ?, used_by_host = ?"
    " WHERE id = ? AND used_at IS NULL AND revoked_at IS NULL"
    f" RETURNING {column_list(BOOTSTRAP_COLUMNS)}"
)


class SchemaVersionError(RuntimeError):
    """The database file was written by a newer TaskRun than this one."""


# --- the writer's queue ------------------------------------------------------------------------


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
        "loop",
        "runs",
        "schedules",
        "tasks",
        "turns",
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
        tasks, runs = once_each(changes.tasks), once_each(changes.runs)
        self.tasks = [task_row(t) for t in tasks]
        self.runs = [run_row(r) for r in runs]
        self.workers = [worker_row(w) for w in changes.workers]
        self.chunks = [chunk_row(c) for c in changes.chunks]
        self.schedules = [schedule_row(s) for s in changes.schedules] if changes.schedules else []
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


@functools.lru_cache(maxsize=64)
def _rows_sql(sql: str, rows: int) -> str:
    """`sql`, an INSERT of one row (`VALUES (?, ...)`), made to insert `rows` rows."""
    head, _, rest = sql.partition(" VALUES (")
    marks, _, tail = rest.partition(")")
    return f"{head} VALUES {', '.join([f'({marks})'] * rows)}{tail}"


@functools.lru_cache(maxsize=16)
def _most_rows(sql: str, variables: int) -> int:
    """How many rows one statement of `sql` may write: at most _ROWS_PER_STATEMENT, within
    SQLite's limit on a statement's variables (999 in builds before 3.32), a power of two."""
    marks = _rows_sql(sql, 1).count("?")
    fit = max(1, min(_ROWS_PER_STATEMENT, variables // marks))
    return 1 << (fit.bit_length() - 1)


def _write_rows(conn: sqlite3.Connection, sql: str, rows: list[Params]) -> None:
    """Write `rows` with `sql` (an INSERT of one row, an upsert included), as few statements of
    many rows as fit, each a power of two rows (few distinct statements to prepare and cache).

    Not ``executemany``: that steps once per row, and the writer thread gives up the GIL for
    each step and must take it back from the event loop's thread, which holds it while busy.
    Under load a group of a few hundred rows took 41 ms at the median against 7 ms alone,
    measured. A multi-row statement is one step; rows are taken in order, so the last upsert
    of an id still wins, also within one statement."""
    if not rows:
        return
    most = _most_rows(sql, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    done, count = 0, len(rows)
    while done < count:
        size = min(most, 1 << ((count - done).bit_length() - 1))
        chunk = rows[done : done + size]
        conn.execute(_rows_sql(sql, size), list(itertools.chain.from_iterable(chunk)))
        done += size


def _add_late_usage(conn: sqlite3.Connection, late: LateUsage) -> None:
    """Read-modify-write inside the writer's transaction: no other write comes between."""
    read = conn.cursor()
    read.row_factory = sqlite3.Row
    for table, where, params in late_usage_targets(late, "?"):
        row = read.execute(f"SELECT usage FROM {table} WHERE {where}", params).fetchone()
        if row is not None:
            update = f"UPDATE {table} SET usage = ? WHERE {where}"
            conn.execute(update, (plus_usage(row["usage"], late.usage), *params))


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back after a failed statement or COMMIT. A full disk can fail the COMMIT itself and
    leave the transaction open; a ROLLBACK that fails too leaves nothing to undo."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("rollback failed", error=str(exc))


class SqliteStore(SqlReads):
    """`Store` on one SQLite file. Call `open()` before use and `close()` when done."""

    MARK = "?"
    LABEL_MATCHES = (
        "EXISTS (SELECT 1 FROM json_each(conversations.labels) AS l"
        " WHERE l.key = ? AND l.value = ?)"
    )
    JSON_FIELD = "json_extract({column}, '$.{key}')"

    def __init__(
        self,
        path: str | Path,
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
        # Point reads on the caller's thread (`_read_point`); the lock only keeps two threads
        # from sharing the connection, and a caller that finds it taken uses the pool.
        self._point: sqlite3.Connection | None = None
        self._point_lock = threading.Lock()
        self._closed = False
        # Set by the writer when a write fails; while set, every write fails (see core.store).
        # Only the holder of _write_lock reads or changes it.
        self._fence: BaseException | None = None
        # The write connection: the writer thread's, also used by a small change set submitted
        # while nothing is queued, which commits at once on the caller's thread (`submit`).
        self._conn: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()  # held by whoever writes with _conn
        self._queued = 0  # items put on the queue (only the submitting thread counts)
        self._written = 0  # of those, items the writer has finished (only the writer counts)
        self._inline_loop: asyncio.AbstractEventLoop | None = None  # committed inline this turn

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
        self._read_uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            self._point = self._connect_reader(busy_timeout_ms=0)
        except BaseException:
            self._queue.put(None)  # the writer stops; `open()` may be tried again
            await asyncio.to_thread(writer.join)
            raise
        self._writer = writer
        self._checkpointer = threading.Thread(
            target=self._checkpoint_main, name="taskrun-store-checkpoint", daemon=True
        )
        self._checkpointer.start()
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
        with self._point_lock:
            if self._point is not None:
                connections.append(self._point)
                self._point = None
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
        pending = _Pending(changes, loop, future)
        # Nothing queued and nothing in the writer's hands: commit here and now, saving two
        # thread switches on the round trip (an echo task's rows take ~0.2 ms to commit).
        # Larger change sets, or any while others wait, go through the writer's group commit.
        # Once per turn of the event loop: what else is submitted in the same turn (a burst)
        # is left to the writer, which commits it in one group.
        small = len(pending.tasks) + len(pending.runs) + len(pending.chunks) <= _INLINE_ROWS
        if (
            small
            and self._inline_loop is not loop
            and self._queued == self._written
            and self._write_lock.acquire(blocking=False)
        ):
            try:
                if self._queued == self._written and self._conn is not None:
                    self._inline_loop = loop
                    loop.call_soon(self._end_inline_turn)
                    self._write_group(self._conn, [pending], inline=True)
                    return future
            finally:
                self._write_lock.release()
        self._queued += 1
        self._queue.put(pending)
        return future

    def _end_inline_turn(self) -> None:
        self._inline_loop = None

    async def resume(self) -> None:
        """Lift the fence after a failed write once a test write commits (see core.store)."""
        await self._write_call(self._probe, fenced=True)

    def _probe(self, conn: sqlite3.Connection) -> None:
        conn.execute(_TOUCH_PROBE, (us(datetime.now(UTC)),))
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
        self._queued += 1
        self._queue.put(_Call(fn, loop, future, runs_fenced=fenced))
        return await future

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._connect_writer()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        self._conn = conn
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
            with self._write_lock:
                # Consecutive change sets are group-committed; a call runs alone, in order.
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
                self._written += len(items)

    def _write_group(
        self, conn: sqlite3.Connection, pending: list[_Pending], *, inline: bool = False
    ) -> None:
        """`inline`: on the submitting event loop's thread (results are set by call_soon)."""
        try:
            self._notify(self._write(conn, pending), inline=inline)
        except BaseException as exc:  # a bug here must not strand the callers
            log.exception("store writer failed")
            self._fence = self._fence or exc
            self._notify([(p, exc) for p in pending], inline=inline)

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

    def _write(
        self, conn: sqlite3.Connection, pending: list[_Pending]
    ) -> list[tuple[_Pending, BaseException | None]]:
        """Commit the whole group at once; on failure, commit the change sets one by one up to
        the one that fails, which fences the store: it and all after it fail (core.store).
        Returns each change set's outcome."""
        if self._fence is None and len(pending) > 1:
            error = self._transaction(conn, pending)
            if error is None:
                return [(p, None) for p in pending]
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
        return outcomes

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
                _write_rows(conn, _UPSERT_TASK, tasks)
                _write_rows(conn, _UPSERT_RUN, runs)
                _write_rows(conn, _UPSERT_WORKER, workers)
                _write_rows(conn, _INSERT_CHUNK, chunks)
                events = [row for p in pending for row in p.events]
                if events:
                    _write_rows(conn, _INSERT_EVENT, events)
                    if trim_due(events[0][0], events[-1][0], self.event_retention):
                        conn.execute(_TRIM_EVENTS, (events[-1][0] - self.event_retention,))
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
                    if p.conversations:  # upserts, turns, then deletions
                        conn.executemany(_UPSERT_CONVERSATION, p.conversations)
                    if p.turns:
                        conn.executemany(_UPSERT_TURN, p.turns)
                    if p.deleted_conversations:
                        conn.executemany(_DELETE_CONVERSATION, p.deleted_conversations)
                    if p.workflows:
                        conn.executemany(_INSERT_WORKFLOW, p.workflows)
                    if p.workflow_runs:
                        conn.executemany(_UPSERT_WORKFLOW_RUN, p.workflow_runs)
                    for late in p.late_usage:
                        _add_late_usage(conn, late)
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
    def _notify(
        outcomes: list[tuple[_Pending, BaseException | None]], *, inline: bool = False
    ) -> None:
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], BaseException | None]]
        ] = {}
        for p, error in outcomes:
            by_loop.setdefault(p.loop, []).append((p.future, _public_error(error)))
        for loop, results in by_loop.items():
            try:
                if inline:
                    loop.call_soon(_settle, results)
                else:
                    loop.call_soon_threadsafe(_settle, results)
            except RuntimeError:  # that event loop is closed; nobody is waiting any more
                pass

    def _connect_writer(self) -> sqlite3.Connection:
        _create_private(self.path)  # task inputs, results and the audit log: 0600
        # Used by the writer thread, and by `submit` on the event loop's thread while it holds
        # _write_lock (so never by two threads at once).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
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

        Once a checkpoint has copied the whole WAL back, the next write starts the WAL over and
        syncs its new header; made by a commit, that sync waited behind the checkpoint's own
        sync of the database file (5-8 ms on the commit path, measured). So this thread makes
        that first write itself, a probe row under the writer's lock, right after the
        checkpoint. That sync also writes out every frame committed while the checkpoint ran
        (tens of milliseconds of commits under load): 10-18 ms with the writer's lock held,
        measured, which every commit meanwhile waited for. So the WAL is synced first, outside
        the lock, and the probe's sync has less left to write (the lock then held 5.7 ms at the
        median instead of 10.8, measured under the same load).
        """
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous = NORMAL")
            seen = 0  # not self.commits: this thread may start after the first commits
            while not self._stop_checkpoints.wait(_CHECKPOINT_INTERVAL):
                if self.commits != seen:
                    seen = self.commits
                    try:
                        busy, logged, copied = conn.execute(
                            "PRAGMA wal_checkpoint(PASSIVE)"
                        ).fetchone()
                        if not busy and logged == copied:
                            self._flush_wal()
                            self._restart_wal(conn)
                    except sqlite3.Error as exc:
                        log.warning("wal checkpoint failed", error=str(exc))
        finally:
            conn.close()

    def _flush_wal(self) -> None:
        """Write the WAL's frames to disk, without any of the store's locks (SQLite keeps its
        WAL-mode locks in the -shm file, so this descriptor of the -wal file holds none that
        closing it could drop). A failure only costs the time it was to save: the probe's
        commit syncs the WAL itself, and fails the SQLite way if the disk does."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("wal flush failed", error=str(exc))
            return
        try:
            # macOS has no fdatasync: fsync there (also the metadata, a little more to write)
            getattr(os, "fdatasync", os.fsync)(fd)
        except OSError as exc:
            log.warning("wal flush failed", error=str(exc))
        finally:
            os.close(fd)

    def _restart_wal(self, conn: sqlite3.Connection) -> None:
        """The first write after a complete checkpoint (see _checkpoint_main)."""
        with self._write_lock:
            if self._fence is not None or self._closed:
                return  # a failed store writes nothing until resumed
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(_TOUCH_PROBE, (us(datetime.now(UTC)),))
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

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

    def _connect_reader(self, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._read_uri, uri=True, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row  # rows are read by column name (rows.py)
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect_reader(_BUSY_TIMEOUT_MS)
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

    async def _read_point(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """`fn`, a read of a few rows by key, at once on this thread; in the pool if SQLite
        answers busy or another thread holds the connection (see the module doc)."""
        if self._closed:
            raise RuntimeError("store is not open")
        if self._point_lock.acquire(blocking=False):
            try:
                if self._point is not None:
                    return fn(self._point)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
            finally:
                self._point_lock.release()
        return await self._read(fn)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._read(lambda conn: conn.execute(sql, params).fetchall())

    async def _fetchone(self, sql: str, params: Sequence[Any]) -> Row | None:
        """The row of a read by key (every caller reads by a key: a point read)."""
        row: Row | None = await self._read_point(lambda conn: conn.execute(sql, params).fetchone())
        return row

    async def get_task(self, task_id: TaskId) -> Task | None:
        row = await self._fetchone(f"{_SELECT_TASK} WHERE id = ?", (task_id,))
        return None if row is None else task_from(row)

    async def get_task_by_idempotency_key(self, key: str) -> Task | None:
        if not key:
            return None
        row = await self._fetchone(
            f"{_SELECT_TASK} WHERE idempotency_key = ? AND idempotency_key <> ''", (key,)
        )
        return None if row is None else task_from(row)

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
        if query.parent_task_id:
            where.append("parent_task_id = ?")
            params.append(query.parent_task_id)
        if query.before:
            where.append("id < ?")
            params.append(query.before)
        for key, value in query.labels:
            where.append(_LABEL_MATCH)
            params.extend((key, value))
        sql = _SELECT_TASK
        if query.agent and query.statuses:
            # Without statistics SQLite walks the agent's tasks newest first and checks each
            # status (every finished one, to find the few unfinished); this index finds them
            # directly and sorts only those.
            sql += " INDEXED BY tasks_agent_status"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(query.limit + 1)
        rows = await self._fetchall(sql, params)
        tasks = [task_from(r) for r in rows[: query.limit]]
        return TaskPage(tasks, tasks[-1].id if len(rows) > query.limit else None)

    async def list_unfinished_tasks(self) -> list[Task]:
        rows = await self._fetchall(f"{_SELECT_TASK} WHERE status IN (1, 2) ORDER BY id")
        return [task_from(r) for r in rows]

    async def get_run(self, run_id: RunId) -> Run | None:
        row = await self._fetchone(f"{_SELECT_RUN} WHERE id = ?", (run_id,))
        return None if row is None else run_from(row)

    async def list_runs(self, task_id: TaskId) -> list[Run]:
        sql = f"{_SELECT_RUN} WHERE task_id = ? ORDER BY attempt, id"  # a task's few attempts
        rows = await self._read_point(lambda conn: conn.execute(sql, (task_id,)).fetchall())
        return [run_from(r) for r in rows]

    async def list_unfinished_runs(self) -> list[Run]:
        rows = await self._fetchall(f"{_SELECT_RUN} WHERE status IN (1, 2, 3) ORDER BY id")
        return [run_from(r) for r in rows]

    async def get_worker(self, worker_id: WorkerId) -> Worker | None:
        row = await self._fetchone(f"{_SELECT_WORKER} WHERE id = ?", (worker_id,))
        return None if row is None else worker_from(row)

    async def list_workers(self, statuses: frozenset[WorkerStatus] = frozenset()) -> list[Worker]:
        if statuses:
            marks = ", ".join("?" * len(statuses))
            rows = await self._fetchall(
                f"{_SELECT_WORKER} WHERE status IN ({marks}) ORDER BY id",
                sorted(int(s) for s in statuses),
            )
        else:
            rows = await self._fetchall(f"{_SELECT_WORKER} ORDER BY id")
        return [worker_from(r) for r in rows]

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

        return [chunk_from(r) for r in await self._read(read)]

    # --- schedules -----------------------------------------------------------------------------

    async def get_schedule(self, name: str) -> Schedule | None:
        row = await self._fetchone(f"{_SELECT_SCHEDULE} WHERE name = ?", (name,))
        return None if row is None else schedule_from(row)

    async def list_schedules(self) -> list[Schedule]:
        rows = await self._fetchall(f"{_SELECT_SCHEDULE} ORDER BY name")
        return [schedule_from(r) for r in rows]

    # --- access control ------------------------------------------------------------------------

    async def get_bootstrap_token(self, token_id: str) -> BootstrapToken | None:
        row = await self._fetchone(f"{_SELECT_BOOTSTRAP} WHERE id = ?", (token_id,))
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

        def consume(conn: sqlite3.Connection) -> Row | None:
            cursor = conn.cursor()
            cursor.row_factory = sqlite3.Row  # read by column name (rows.py)
            rows: list[Row] = cursor.execute(_CONSUME_BOOTSTRAP, params).fetchall()
            return rows[0] if rows else None

        row = await self._write_call(consume)
        return None if row is None else bootstrap_from(row)

    async def get_api_token(self, token_id: str) -> ApiToken | None:
        row = await self._fetchone(f"{_SELECT_API_TOKEN} WHERE id = ?", (token_id,))
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
        return [audit_from(r) for r in await self._fetchall(sql, params)]

    # --- workflows -----------------------------------------------------------------------------

    # --- webhooks -------------------------------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> None:
        row = webhook_row(webhook)

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(_INSERT_WEBHOOK, row)
            except sqlite3.IntegrityError:
                raise ValueError(f"webhook {webhook.id!r} already exists") from None

        await self._write_call(insert)

    async def delete_webhook(self, webhook_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ?", (webhook_id,))
            return conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,)).rowcount > 0

        return await self._write_call(delete)

    async def add_webhook_deliveries(
        self, deliveries: Sequence[WebhookDelivery]
    ) -> list[WebhookDelivery]:
        rows = [((*delivery_row(d), d.webhook_id), d) for d in deliveries]

        def insert(conn: sqlite3.Connection) -> list[WebhookDelivery]:
            stored = []
            for row, delivery in rows:
                cursor = conn.execute(_INSERT_DELIVERY, row)
                if cursor.rowcount > 0:
                    stored.append(delivery)
            return stored

        return await self._write_call(insert) if rows else []

    async def update_webhook_delivery(self, delivery: WebhookDelivery) -> None:
        sql, params = delivery_update(delivery, "?")

        def update(conn: sqlite3.Connection) -> None:
            conn.execute(sql, params)

        await self._write_call(update)


_UPSERT_CONVERSATION: Final = upsert_sql("conversations", CONVERSATION_COLUMNS, "?")
_UPSERT_TURN: Final = upsert_turn_sql("?")
_DELETE_CONVERSATION: Final = "DELETE FROM conversations WHERE id = ?"
_INSERT_WORKFLOW: Final = (
    f"INSERT INTO workflows ({column_list(WORKFLOW_COLUMNS)}) "
    f"VALUES ({', '.join(['?'] * len(WORKFLOW_COLUMNS))})"
)
_UPSERT_WORKFLOW_RUN: Final = upsert_sql("workflow_runs", WORKFLOW_RUN_COLUMNS, "?")
_INSERT_WEBHOOK: Final = (
    f"INSERT INTO webhooks ({column_list(WEBHOOK_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(WEBHOOK_COLUMNS))})"
)
# the delivery's columns, then its webhook id again: stored only while the webhook exists
_INSERT_DELIVERY: Final = (
    f"INSERT OR IGNORE INTO webhook_deliveries ({column_list(DELIVERY_COLUMNS)}) "
    f"SELECT {', '.join('?' * len(DELIVERY_COLUMNS))} "
    "WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = ?)"
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
