"""PostgresStore beyond the shared contract (test_store_contract.py): migrations, group commit,
the indexes behind its queries, and a database restarted under it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from taskrun.controlplane.store import SchemaVersionError
from taskrun.controlplane.store.postgres import (
    _UNFINISHED_RUNS,
    _UNFINISHED_TASKS,
    APPLICATION_NAME,
    CONNECTION_DEFAULTS,
    PostgresStore,
)
from taskrun.controlplane.store.postgres_schema import MIGRATIONS, SCHEMA_VERSION
from taskrun.core.access import AuditQuery
from taskrun.core.errors import StoreUnavailable
from taskrun.core.ids import WorkerId
from taskrun.core.status import TaskStatus, WorkerStatus
from taskrun.core.store import ChangeSet, TaskQuery
from tests.postgres import new_schema, postgres_or_skip, running_server, schema_url
from tests.unit.test_store_contract import (
    T0,
    audit,
    chunk,
    full_run,
    full_schedule,
    full_task,
    full_worker,
    make_bootstrap,
    make_run,
    make_task,
    rid,
    tid,
)


@pytest.fixture
async def pg(postgres_url: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(postgres_url)
    await s.open()
    yield s
    await s.close()


async def test_data_survives_close_and_reopen(postgres_url: str) -> None:
    first = PostgresStore(postgres_url)
    await first.open()
    assert first.migrations_applied == SCHEMA_VERSION
    await first.apply(
        ChangeSet(
            tasks=[full_task()],
            runs=[full_run()],
            workers=[full_worker()],
            chunks=[chunk(70, 1, attempt=2)],
            schedules=[full_schedule()],
            audit_events=[audit(1)],
        )
    )
    await first.close()
    second = PostgresStore(postgres_url)
    await second.open()
    try:
        assert second.migrations_applied == 0
        assert await second.get_task(tid(7)) == full_task()
        assert await second.get_run(rid(70)) == full_run()
        assert await second.get_worker(WorkerId("w-1")) == full_worker()
        assert [c.data for c in await second.read_output([rid(70)])] == ["r70s1"]
        assert await second.list_schedules() == [full_schedule()]
        assert [e.id for e in await second.list_audit_events(AuditQuery())] == [1]
        await second.apply(ChangeSet(audit_events=[audit(2)]))  # numbering goes on
        assert [e.id for e in await second.list_audit_events(AuditQuery())] == [2, 1]
    finally:
        await second.close()


async def test_migrations_are_recorded_and_a_newer_schema_is_refused(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    await store.open()
    await store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM taskrun_schema ORDER BY 1")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        conn.execute("INSERT INTO taskrun_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    newer = PostgresStore(postgres_url)
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}"):
        await newer.open()
    await newer.close()


async def test_processes_opening_one_new_database_at_once_migrate_it_once(
    postgres_url: str,
) -> None:
    stores = [PostgresStore(postgres_url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        assert sorted(s.migrations_applied for s in stores) == [0, 0, 0, SCHEMA_VERSION]
        await stores[0].apply(ChangeSet(tasks=[make_task(1)]))
        assert await stores[3].get_task(tid(1)) == make_task(1)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_schema_of_its_own_is_isolated(postgres_server_url: str) -> None:
    a = PostgresStore(schema_url(postgres_server_url, new_schema(postgres_server_url)))
    b = PostgresStore(schema_url(postgres_server_url, new_schema(postgres_server_url)))
    await a.open()
    await b.open()
    try:
        await a.apply(ChangeSet(tasks=[make_task(1)]))
        assert await b.get_task(tid(1)) is None
    finally:
        await a.close()
        await b.close()


async def test_concurrent_applies_are_group_committed(pg: PostgresStore) -> None:
    before = pg.commits
    changes = [
        ChangeSet(tasks=[make_task(n)], runs=[make_run(n, n)], chunks=[chunk(n, 1)])
        for n in range(1, 2001)
    ]
    await asyncio.gather(*(pg.apply(c) for c in changes))
    transactions = pg.commits - before
    assert 1 <= transactions <= 200
    assert len(await pg.list_unfinished_tasks()) == 2000
    assert len(await pg.list_unfinished_runs()) == 2000


async def test_a_value_postgresql_cannot_hold_is_a_value_error(pg: PostgresStore) -> None:
    with pytest.raises(ValueError, match="NUL"):
        await pg.apply(ChangeSet(tasks=[make_task(1, error="a\x00b")]))
    assert await pg.get_task(tid(1)) is None
    await pg.resume()
    await pg.apply(ChangeSet(tasks=[make_task(1)]))


def test_the_unfinished_queries_match_the_partial_indexes() -> None:
    statements = "\n".join(MIGRATIONS[0])
    assert f"tasks_unfinished ON tasks (id) WHERE status IN ({_UNFINISHED_TASKS})" in statements
    assert f"runs_unfinished ON runs (id) WHERE status IN ({_UNFINISHED_RUNS})" in statements


class _Recorder:
    """Records every read query the store runs (a spy on its one read path)."""

    def __init__(self, store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.queries: list[tuple[str, Any]] = []
        real = store._fetchall

        async def spy(sql: str, params: Any = ()) -> Any:
            self.queries.append((sql, params))
            return await real(sql, params)

        monkeypatch.setattr(store, "_fetchall", spy)


def _seq_scans(plan: dict[str, Any]) -> list[str]:
    found = [plan["Relation Name"]] if plan.get("Node Type") == "Seq Scan" else []
    for child in plan.get("Plans", []):
        found.extend(_seq_scans(child))
    return found


async def test_every_read_query_is_served_by_an_index(
    pg: PostgresStore, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With sequential scans priced out, the planner still finds an index for each query the
    store reads with (a query without one would still show a Seq Scan)."""
    await pg.apply(
        ChangeSet(
            tasks=[full_task(), make_task(1, labels={"env": "prod"}, schedule="daily")],
            runs=[full_run(), make_run(1, 1)],
            workers=[full_worker()],
            chunks=[chunk(1, 1)],
            schedules=[full_schedule()],
            bootstrap_tokens=[make_bootstrap(1)],
            audit_events=[audit(1)],
        )
    )
    recorder = _Recorder(pg, monkeypatch)
    await pg.get_task(tid(7))
    await pg.get_task_by_idempotency_key("key-7")
    await pg.list_tasks(TaskQuery())
    await pg.list_tasks(TaskQuery(statuses=frozenset({TaskStatus.RUNNING}), before=tid(9)))
    await pg.list_tasks(TaskQuery(agent="echo"))
    await pg.list_tasks(TaskQuery(worker_id="w-1"))
    await pg.list_tasks(TaskQuery(schedule="daily"))
    await pg.list_tasks(TaskQuery(labels=(("env", "prod"),)))
    await pg.list_unfinished_tasks()
    await pg.get_run(rid(70))
    await pg.list_runs(tid(7))
    await pg.list_unfinished_runs()
    await pg.get_worker(WorkerId("w-1"))
    await pg.list_workers()
    await pg.list_workers(frozenset({WorkerStatus.ONLINE}))
    await pg.read_output([rid(1), rid(70)], after={rid(1): 0})
    await pg.get_schedule("monthly")
    await pg.list_schedules()
    await pg.get_bootstrap_token(make_bootstrap(1).id)
    await pg.list_bootstrap_tokens()
    await pg.get_api_token("0" * 16)
    await pg.list_api_tokens()
    await pg.list_audit_events(AuditQuery())
    await pg.list_audit_events(AuditQuery(before_id=5, kinds=frozenset({audit(1).kind})))
    await pg.list_spending(T0)
    assert len(recorder.queries) == 25
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        for sql, params in recorder.queries:
            row = conn.execute(f"EXPLAIN (FORMAT JSON) {sql}", params).fetchone()
            assert row is not None
            plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
            assert _seq_scans(plan[0]["Plan"]) == [], sql


async def test_a_database_restarted_under_the_store_fails_writes_cleanly_then_resumes() -> None:
    with running_server() as server:
        store = PostgresStore(server.url)
        await store.open()
        try:
            await store.apply(ChangeSet(tasks=[make_task(1)], runs=[make_run(1, 1)]))
            server.stop()
            with pytest.raises(StoreUnavailable, match="the store cannot write: ") as failed:
                await store.apply(ChangeSet(tasks=[make_task(2)]))
            assert "refuses writes after a failed one" not in str(failed.value)
            with pytest.raises(StoreUnavailable):
                await store.resume()  # still down
            with pytest.raises(StoreUnavailable, match="refuses writes after a failed one"):
                await store.apply(ChangeSet(tasks=[make_task(3)]))
            with pytest.raises(StoreUnavailable, match="the store cannot read: "):
                await store.get_task(tid(1))
            server.start()
            await store.resume()
            await store.apply(ChangeSet(tasks=[make_task(4)], chunks=[chunk(1, 1)]))
            assert await store.get_task(tid(1)) == make_task(1)
            assert await store.get_task(tid(2)) is None
            assert await store.get_task(tid(3)) is None
            assert await store.get_task(tid(4)) == make_task(4)
            assert [c.seq for c in await store.read_output([rid(1)])] == [1]
            assert await store.consume_bootstrap_token("0" * 16, T0) is None
        finally:
            await store.close()


async def test_reads_work_again_at_once_after_a_restart() -> None:
    """Pooled read connections die with the server; the next read replaces them by itself."""
    with running_server() as server:
        store = PostgresStore(server.url)
        await store.open()
        try:
            await store.apply(ChangeSet(tasks=[make_task(1)]))
            await asyncio.gather(*(store.get_task(tid(1)) for _ in range(4)))  # pooled now
            server.stop()
            server.start()
            started = asyncio.get_running_loop().time()
            assert await store.get_task(tid(1)) == make_task(1)
            assert await store.list_unfinished_tasks() == [make_task(1)]
            assert asyncio.get_running_loop().time() - started < 1.0
        finally:
            await store.close()


async def test_a_restart_while_the_store_is_idle_costs_no_write() -> None:
    """The writer's connection died with the server while nothing was being written: the next
    write finds it dead before committing anything and writes on a new one, without fencing."""
    with running_server() as server:
        store = PostgresStore(server.url)
        await store.open()
        try:
            await store.apply(ChangeSet(tasks=[make_task(1)]))
            server.stop()
            server.start()
            await store.apply(ChangeSet(tasks=[make_task(2)], runs=[make_run(2, 2)]))
            token = make_bootstrap(1)
            await store.apply(ChangeSet(bootstrap_tokens=[token]))
            server.stop()
            server.start()
            assert await store.consume_bootstrap_token(token.id, T0, "h") is not None
            assert [t.id for t in (await store.list_tasks(TaskQuery())).tasks] == [tid(2), tid(1)]
        finally:
            await store.close()


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_server_binaries_fail_on_ci_and_skip_elsewhere(
    ci: str, outcome: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tests.postgres._SEARCH", ())
    monkeypatch.setenv("PG_BIN", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="need the server binaries"):
        postgres_or_skip()


async def test_close_leaves_no_connection_behind(postgres_url: str) -> None:
    """The writer's and the pooled readers' connections, with reads in flight at close: none is
    left open on the server. (A connection that would be dropped unclosed is also closed by the
    garbage collector, so this catches connections the store keeps referring to.)"""

    def connections() -> int:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (APPLICATION_NAME,),
            ).fetchone()
            return int(row[0]) if row else 0

    store = PostgresStore(postgres_url)
    await store.open()
    await store.apply(ChangeSet(tasks=[make_task(n) for n in range(1, 50)]))
    await asyncio.gather(*(store.list_tasks(TaskQuery()) for _ in range(8)))  # 8 pooled
    assert connections() == 9  # the writer's and the readers'
    reads = [asyncio.create_task(store.list_tasks(TaskQuery())) for _ in range(8)]
    await asyncio.sleep(0.001)  # some of them in flight
    await store.close()
    await asyncio.gather(*reads, return_exceptions=True)
    async with asyncio.timeout(5):
        while connections():
            await asyncio.sleep(0.02)


async def test_connections_get_the_defaults_the_url_does_not_override(postgres_url: str) -> None:
    store = PostgresStore(f"{postgres_url}&keepalives_idle=42&application_name=cp-1")
    await store.open()
    try:
        await store.get_task(tid(1))  # opens a read connection too
        assert store._conn is not None
        assert store._pool is not None
        for conn in [store._conn, *store._pool._idle]:
            params = conn.info.get_parameters()
            assert params["application_name"] == "cp-1"
            dsn = conn.info.dsn
            assert "keepalives_idle=42" in dsn
            assert f"tcp_user_timeout={CONNECTION_DEFAULTS['tcp_user_timeout']}" in dsn
            assert "keepalives_count=3" in dsn
    finally:
        await store.close()
