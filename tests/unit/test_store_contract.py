"""The storage contract: every test runs against MemoryStore, SqliteStore and PostgresStore
alike, except the SQLite-only ones at the end (files, schema versions, group commit); the
PostgreSQL-only ones are in test_store_postgres.py."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from taskrun.controlplane.store import (
    SCHEMA_VERSION,
    MemoryStore,
    SchemaVersionError,
    SqliteStore,
    eventlog,
    open_store,
)
from taskrun.controlplane.store.postgres import PostgresStore
from taskrun.controlplane.store.sqlite import _READ_THREADS
from taskrun.core.access import (
    ApiToken,
    AuditEvent,
    AuditKind,
    AuditQuery,
    BootstrapToken,
    Scope,
)
from taskrun.core.errors import StoreUnavailable
from taskrun.core.ids import ConversationId, RunId, TaskId, WorkerId
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
from taskrun.core.store import (
    ChangeSet,
    ConversationQuery,
    LateUsage,
    LoggedEvent,
    Store,
    TaskQuery,
)
from taskrun.core.webhooks import (
    DeliveryStatus,
    Webhook,
    WebhookDelivery,
    WebhookEvent,
    new_secret,
)
from taskrun.core.workflow import StepStatus, Workflow, WorkflowRun, WorkflowRunStatus, new_run
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import events_pb2 as epb
from tests.faults import fill, small_filesystem

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def tid(n: int) -> TaskId:
    return TaskId(f"tsk_{n:026d}")


def rid(n: int) -> RunId:
    return RunId(f"run_{n:026d}")


def make_task(n: int, **fields: object) -> Task:
    task = Task(
        id=tid(n),
        agent="echo",
        input=f'{{"n": {n}}}',
        labels={},
        policy=TaskPolicy(),
        status=TaskStatus.PENDING,
        created_at=T0 + timedelta(seconds=n),
        updated_at=T0 + timedelta(seconds=n),
    )
    for name, value in fields.items():
        setattr(task, name, value)
    return task


def make_run(n: int, task: int, attempt: int = 1, **fields: object) -> Run:
    run = Run(
        id=rid(n),
        task_id=tid(task),
        attempt=attempt,
        status=RunStatus.PENDING,
        created_at=T0 + timedelta(seconds=n),
    )
    for name, value in fields.items():
        setattr(run, name, value)
    return run


def chunk(run: int, seq: int, data: str = "", attempt: int = 1) -> OutputChunk:
    return OutputChunk(rid(run), attempt, seq, data or f"r{run}s{seq}", time=T0)


STORES = ["memory", "sqlite", "postgres"]


def new_store(request: pytest.FixtureRequest, tmp_path: Path, **options: int) -> Store:
    """A store of the kind `request.param` names; PostgreSQL in a fresh schema of its own."""
    if request.param == "memory":
        return MemoryStore(**options)
    if request.param == "sqlite":
        return SqliteStore(tmp_path / "t.db", **options)
    return PostgresStore(request.getfixturevalue("postgres_url"), **options)


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = new_store(request, tmp_path)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "t.db")
    await s.open()
    yield s
    await s.close()


def full_task() -> Task:
    return make_task(
        7,
        labels={"team": "ml", "gpu": "a100", "ünï": "çødé"},
        policy=TaskPolicy(
            priority=5,
            timeout=90.5,
            max_attempts=4,
            idempotency_key="key-7",
            required_labels={"gpu": "a100", "zone": "eu"},
            queue_timeout=30.25,
            retry_on_failure=True,
            required_provider="anthropic",
            required_model="claude",
            allow_subtasks=True,
            max_subtasks=4,
            subtask_budget_usd=0.75,
            output_schema='{"type":"object","required":["ok"]}',
            output_retries=4,
            model_settings=ModelSettings(
                system_prompt="Be brief.",
                max_tokens=300,
                temperature=0.0,
                stop_sequences=["END"],
                append_system_prompt="ünï",
                env={"MODE": "ci"},
                mcp_servers='{"db":{"command":"db-mcp"}}',
                allowed_tools=["Read"],
                disallowed_tools=["Bash"],
            ),
            max_cost_usd=0.75,
        ),
        status=TaskStatus.RUNNING,
        attempts=2,
        current_run_id=rid(70),
        worker_id=WorkerId("w-1"),
        updated_at=T0 + timedelta(minutes=5, microseconds=1),
        finished_at=T0 + timedelta(hours=1, microseconds=999_999),
        error="boom",
        result='{"ok": true}',
        usage=Usage(1, 2, 3, 4, 0.125, 6, 7000),
        schedule="nightly",
        cancel_requested=True,
        parent_task_id=tid(3),
        root_task_id=tid(1),
        depth=2,
    )


def full_run() -> Run:
    return make_run(
        70,
        7,
        attempt=2,
        status=RunStatus.RUNNING,
        worker_id=WorkerId("w-1"),
        assigned_at=T0 + timedelta(seconds=1),
        started_at=T0 + timedelta(seconds=2),
        finished_at=T0 + timedelta(seconds=3),
        error="e",
        result="r",
        usage=Usage(10, 20, 30, 40, 1.5, 2, 99),
        backend_used=ModelBackend("anthropic", "claude", 200_000, ("text", "image"), ("bash",)),
        session_id="sess-1",
        prompt="do it",
        credential_hash="ab" * 32,
        fault=Fault.TASK,
    )


# --- tasks and runs ----------------------------------------------------------------------------


async def test_task_with_every_field_round_trips(store: Store) -> None:
    task = full_task()
    await store.apply(ChangeSet(tasks=[task]))
    assert await store.get_task(task.id) == task


async def test_run_with_backend_usage_and_session_round_trips(store: Store) -> None:
    run = full_run()
    await store.apply(ChangeSet(tasks=[full_task()], runs=[run]))
    assert await store.get_run(run.id) == run


async def test_non_utc_datetimes_come_back_equal(store: Store) -> None:
    plus2 = T0.astimezone(timezone(timedelta(hours=2)))
    task = make_task(1, created_at=plus2, updated_at=plus2)
    await store.apply(ChangeSet(tasks=[task]))
    got = await store.get_task(task.id)
    assert got is not None
    assert got.created_at == T0
    assert got.created_at.utcoffset() is not None


async def test_naive_datetime_is_rejected(store: Store) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.apply(ChangeSet(tasks=[make_task(1, created_at=datetime(2026, 1, 1))]))
    assert await store.get_task(tid(1)) is None


async def test_upsert_replaces_task_and_run(store: Store) -> None:
    await store.apply(ChangeSet(tasks=[make_task(1)], runs=[make_run(1, 1)]))
    task = make_task(1, status=TaskStatus.COMPLETED, result="done", finished_at=T0, attempts=1)
    run = make_run(1, 1, status=RunStatus.COMPLETED, finished_at=T0, usage=Usage(turns=3))
    await store.apply(ChangeSet(tasks=[task], runs=[run]))
    assert await store.get_task(tid(1)) == task
    assert await store.get_run(rid(1)) == run


async def test_every_field_that_changes_after_creation_is_rewritten(store: Store) -> None:
    """A later upsert rewrites all but what a task or run is created with (core.store)."""
    created, full = make_task(7), full_task()
    run = make_run(1, 7)
    await store.apply(ChangeSet(tasks=[created], runs=[run]))
    changed = replace(
        created,
        policy=full.policy,
        status=TaskStatus.FAILED,
        attempts=3,
        current_run_id=rid(1),
        worker_id=WorkerId("w-1"),
        updated_at=T0 + timedelta(hours=1),
        finished_at=T0 + timedelta(hours=1),
        error="boom",
        result='{"ok": false}',
        usage=Usage(1, 2, 3, 4, 0.5, 6, 7),
        cancel_requested=True,
        conversation_id=cid(1),
        turn=1,
    )
    ended = replace(full_run(), id=run.id, task_id=run.task_id, attempt=run.attempt)
    ended.created_at = run.created_at
    await store.apply(ChangeSet(tasks=[changed], runs=[ended]))
    assert await store.get_task(created.id) == changed
    assert await store.get_run(run.id) == ended


async def test_later_change_in_same_change_set_wins(store: Store) -> None:
    first, second = make_task(1), make_task(1, status=TaskStatus.RUNNING)
    await store.apply(ChangeSet(tasks=[first, second]))
    assert await store.get_task(tid(1)) == second


async def test_get_missing_returns_none(store: Store) -> None:
    assert await store.get_task(tid(1)) is None
    assert await store.get_run(rid(1)) is None
    assert await store.get_worker(WorkerId("nope")) is None
    assert await store.get_task_by_idempotency_key("nope") is None
    assert await store.list_runs(tid(1)) == []


async def test_idempotency_key_lookup(store: Store) -> None:
    keyed = make_task(1, policy=TaskPolicy(idempotency_key="abc"))
    await store.apply(ChangeSet(tasks=[keyed, make_task(2)]))
    assert await store.get_task_by_idempotency_key("abc") == keyed
    assert await store.get_task_by_idempotency_key("") is None


async def test_idempotency_key_follows_updates(store: Store) -> None:
    await store.apply(ChangeSet(tasks=[make_task(1, policy=TaskPolicy(idempotency_key="a"))]))
    await store.apply(ChangeSet(tasks=[make_task(1, policy=TaskPolicy(idempotency_key="b"))]))
    assert await store.get_task_by_idempotency_key("a") is None
    found = await store.get_task_by_idempotency_key("b")
    assert found is not None and found.id == tid(1)
    # the released key may now be taken by another task
    await store.apply(ChangeSet(tasks=[make_task(2, policy=TaskPolicy(idempotency_key="a"))]))
    found = await store.get_task_by_idempotency_key("a")
    assert found is not None and found.id == tid(2)


async def test_duplicate_idempotency_key_is_rejected(store: Store) -> None:
    await store.apply(ChangeSet(tasks=[make_task(1, policy=TaskPolicy(idempotency_key="k"))]))
    dup = make_task(2, policy=TaskPolicy(idempotency_key="k"))
    with pytest.raises(ValueError):
        await store.apply(ChangeSet(tasks=[make_task(3), dup]))
    assert await store.get_task(tid(2)) is None
    assert await store.get_task(tid(3)) is None


async def test_list_runs_orders_by_attempt(store: Store) -> None:
    runs = [make_run(3, 1, attempt=2), make_run(9, 1, attempt=1), make_run(5, 1, attempt=3)]
    await store.apply(ChangeSet(tasks=[make_task(1), make_task(2)], runs=[*runs, make_run(4, 2)]))
    assert [r.attempt for r in await store.list_runs(tid(1))] == [1, 2, 3]


async def test_empty_change_set_is_a_no_op(store: Store) -> None:
    await store.apply(ChangeSet())
    assert (await store.list_tasks(TaskQuery())).tasks == []


async def test_returned_and_applied_objects_are_copies(store: Store) -> None:
    task, run = full_task(), full_run()
    await store.apply(ChangeSet(tasks=[task], runs=[run]))
    task.labels["team"] = "changed"
    task.policy.required_labels["zone"] = "us"
    task.policy.model_settings.env["MODE"] = "changed"
    task.policy.model_settings.stop_sequences.append("more")
    task.usage.turns = 99
    run.usage.turns = 99
    got = await store.get_task(tid(7))
    assert got == full_task()
    assert got is not None
    got.labels.clear()
    got.policy.required_labels.clear()
    got.policy.model_settings.env.clear()
    got.policy.model_settings.allowed_tools.clear()
    got.usage.add(Usage(turns=1))
    assert await store.get_task(tid(7)) == full_task()
    got_run = await store.get_run(rid(70))
    assert got_run == full_run()


# --- list_tasks ----------------------------------------------------------------------------------


async def seed_for_filters(store: Store) -> None:
    tasks = [
        make_task(1, labels={"env": "prod", "team": "a"}),
        make_task(2, agent="other", labels={"env": "prod"}),
        make_task(3, status=TaskStatus.RUNNING, worker_id=WorkerId("w1")),
        make_task(4, status=TaskStatus.COMPLETED, worker_id=WorkerId("w1"), schedule="daily"),
        make_task(5, status=TaskStatus.FAILED, labels={"env": "dev", "team": "a"}),
        make_task(6, agent="other", schedule="daily", labels={"team": "a"}),
    ]
    await store.apply(ChangeSet(tasks=tasks))


FILTERS = {
    "no_filter": (TaskQuery(), [6, 5, 4, 3, 2, 1]),
    "statuses": (
        TaskQuery(statuses=frozenset({TaskStatus.RUNNING, TaskStatus.FAILED})),
        [5, 3],
    ),
    "agent": (TaskQuery(agent="other"), [6, 2]),
    "one_label": (TaskQuery(labels=(("team", "a"),)), [6, 5, 1]),
    "two_labels": (TaskQuery(labels=(("team", "a"), ("env", "prod"))), [1]),
    "worker_id": (TaskQuery(worker_id="w1"), [4, 3]),
    "schedule": (TaskQuery(schedule="daily"), [6, 4]),
    "combined": (
        TaskQuery(statuses=frozenset({TaskStatus.PENDING}), agent="echo", labels=(("team", "a"),)),
        [1],
    ),
    "agent_and_statuses_newest_first": (
        TaskQuery(statuses=frozenset({TaskStatus.PENDING, TaskStatus.RUNNING}), agent="echo"),
        [3, 1],
    ),
    "agent_and_statuses_after_a_token": (
        TaskQuery(
            statuses=frozenset({TaskStatus.PENDING, TaskStatus.RUNNING}),
            agent="echo",
            before=tid(3),
        ),
        [1],
    ),
    "combined_schedule_and_worker": (TaskQuery(schedule="daily", worker_id="w1"), [4]),
    "no_match": (TaskQuery(agent="echo", labels=(("env", "staging"),)), []),
    "before": (TaskQuery(before=tid(4)), [3, 2, 1]),
}


@pytest.mark.parametrize("case", list(FILTERS))
async def test_list_tasks_filter(store: Store, case: str) -> None:
    await seed_for_filters(store)
    query, expected = FILTERS[case]
    page = await store.list_tasks(query)
    assert [t.id for t in page.tasks] == [tid(n) for n in expected]
    assert page.next_before is None


async def seed_tree(store: Store) -> None:
    """1 and 7 are roots; 2, 3 below 1; 4 below 3; 5 below 2; 6 below 7."""
    below = {2: 1, 3: 1, 4: 3, 5: 2, 6: 7}
    roots = {2: 1, 3: 1, 4: 1, 5: 1, 6: 7}
    tasks = [make_task(1), make_task(7)] + [
        make_task(
            n, parent_task_id=tid(below[n]), root_task_id=tid(roots[n]), depth=1 + (n in (4, 5))
        )
        for n in below
    ]
    await store.apply(ChangeSet(tasks=tasks))


async def test_list_tasks_filters_by_parent(store: Store) -> None:
    await seed_tree(store)
    children = await store.list_tasks(TaskQuery(parent_task_id=tid(1)))
    assert [t.id for t in children.tasks] == [tid(3), tid(2)]
    grandchildren = await store.list_tasks(TaskQuery(parent_task_id=tid(3)))
    assert [(t.id, t.root_task_id, t.depth) for t in grandchildren.tasks] == [(tid(4), tid(1), 2)]
    assert (await store.list_tasks(TaskQuery(parent_task_id=tid(4)))).tasks == []
    paged = await store.list_tasks(TaskQuery(parent_task_id=tid(1), limit=1))
    assert [t.id for t in paged.tasks] == [tid(3)] and paged.next_before == tid(3)


async def test_list_task_tree_returns_every_task_below_a_root_oldest_first(store: Store) -> None:
    await seed_tree(store)
    tree = await store.list_task_tree(tid(1))
    assert [(t.id, t.parent_task_id) for t in tree] == [
        (tid(2), tid(1)),
        (tid(3), tid(1)),
        (tid(4), tid(3)),
        (tid(5), tid(2)),
    ]
    assert [t.id for t in await store.list_task_tree(tid(7))] == [tid(6)]
    assert await store.list_task_tree(tid(6)) == []  # not a root
    assert await store.list_task_tree(tid(99)) == []


async def test_list_tasks_paginates_newest_first_without_gaps(store: Store) -> None:
    await store.apply(ChangeSet(tasks=[make_task(n) for n in range(1, 26)]))
    seen: list[TaskId] = []
    before: TaskId | None = None
    pages = 0
    while True:
        page = await store.list_tasks(TaskQuery(limit=10, before=before))
        pages += 1
        seen.extend(t.id for t in page.tasks)
        if page.next_before is None:
            break
        assert page.next_before == page.tasks[-1].id
        before = page.next_before
    assert pages == 3
    assert seen == [tid(n) for n in range(25, 0, -1)]


async def test_list_tasks_exact_fit_has_no_next_page(store: Store) -> None:
    await store.apply(ChangeSet(tasks=[make_task(n) for n in range(1, 11)]))
    page = await store.list_tasks(TaskQuery(limit=10))
    assert len(page.tasks) == 10
    assert page.next_before is None


async def test_list_tasks_paginates_filtered_results(store: Store) -> None:
    tasks = [make_task(n, agent="a" if n % 2 else "b") for n in range(1, 21)]
    await store.apply(ChangeSet(tasks=tasks))
    first = await store.list_tasks(TaskQuery(agent="a", limit=4))
    assert [t.id for t in first.tasks] == [tid(n) for n in (19, 17, 15, 13)]
    second = await store.list_tasks(TaskQuery(agent="a", limit=4, before=first.next_before))
    assert [t.id for t in second.tasks] == [tid(n) for n in (11, 9, 7, 5)]
    third = await store.list_tasks(TaskQuery(agent="a", limit=4, before=second.next_before))
    assert [t.id for t in third.tasks] == [tid(3), tid(1)]
    assert third.next_before is None


async def test_list_tasks_rejects_non_positive_limit(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.list_tasks(TaskQuery(limit=0))


async def test_list_unfinished_tasks(store: Store) -> None:
    await store.apply(
        ChangeSet(tasks=[make_task(n, status=s) for n, s in enumerate(TaskStatus, start=1)])
    )
    unfinished = await store.list_unfinished_tasks()
    assert [(t.id, t.status) for t in unfinished] == [
        (tid(1), TaskStatus.PENDING),
        (tid(2), TaskStatus.RUNNING),
    ]


async def test_list_unfinished_runs(store: Store) -> None:
    runs = [make_run(n, 1, attempt=n, status=s) for n, s in enumerate(RunStatus, start=1)]
    await store.apply(ChangeSet(tasks=[make_task(1)], runs=runs))
    unfinished = await store.list_unfinished_runs()
    assert [r.status for r in unfinished] == [
        RunStatus.PENDING,
        RunStatus.ASSIGNED,
        RunStatus.RUNNING,
    ]


async def test_list_spending_gives_runs_ended_since_with_their_tasks_labels_and_schedule(
    store: Store,
) -> None:
    task = full_task()  # labels team=ml..., schedule "nightly"
    ended = full_run()  # finished at T0 + 3 s
    older = make_run(71, 7, attempt=1, status=RunStatus.FAILED, finished_at=T0 - timedelta(days=1))
    running = make_run(72, 7, attempt=3, status=RunStatus.RUNNING)
    await store.apply(ChangeSet(tasks=[task], runs=[ended, older, running]))
    [spent] = await store.list_spending(T0)
    assert spent.run == ended
    assert (spent.agent, spent.labels, spent.schedule) == (task.agent, task.labels, "nightly")
    both = await store.list_spending(T0 - timedelta(days=2))
    assert [s.run.id for s in both] == [older.id, ended.id]  # in the order they ended
    assert await store.list_spending(T0 + timedelta(hours=1)) == []


async def test_usage_sums_group_ended_runs_per_utc_day_agent_model_and_worker(
    store: Store,
) -> None:
    echo, other = make_task(1), make_task(2, agent="other")
    late = T0.replace(hour=23, minute=59, second=59, microsecond=999_999)  # a day ends
    claude = ModelBackend("anthropic", "claude")
    runs = [
        make_run(
            1,
            1,
            status=RunStatus.COMPLETED,
            worker_id=WorkerId("w-1"),
            finished_at=late,
            usage=Usage(10, 20, 30, 40, 0.25, 1, 100),
            backend_used=claude,
        ),
        make_run(
            2,
            1,
            attempt=2,
            status=RunStatus.FAILED,
            worker_id=WorkerId("w-1"),
            finished_at=late,
            usage=Usage(1, 2, 3, 4, 0.5, 2, 200),
            backend_used=claude,
        ),
        make_run(
            3,
            1,
            attempt=3,
            status=RunStatus.COMPLETED,
            worker_id=WorkerId("w-1"),
            finished_at=late + timedelta(microseconds=1),
            usage=Usage(cost_usd=1.0),
            backend_used=claude,
        ),
        make_run(4, 2, status=RunStatus.LOST, finished_at=late),  # no worker, model or usage
        make_run(
            5,
            2,
            attempt=2,
            status=RunStatus.COMPLETED,
            worker_id=WorkerId("w-2"),
            finished_at=T0 - timedelta(days=3),
            usage=Usage(cost_usd=9.0),
        ),
        make_run(6, 2, attempt=3, status=RunStatus.RUNNING, worker_id=WorkerId("w-2")),
    ]
    await store.apply(ChangeSet(tasks=[echo, other], runs=runs))
    sums = sorted(await store.usage_sums(T0 - timedelta(days=1)), key=lambda s: (s.day, s.agent))
    day = late.date()
    assert [(s.day, s.agent, s.model, s.worker_id, s.runs) for s in sums] == [
        (day, "echo", "claude", "w-1", 2),
        (day, "other", "", "", 1),
        (day + timedelta(days=1), "echo", "claude", "w-1", 1),
    ]
    assert sums[0].usage == Usage(11, 22, 33, 44, 0.75, 3, 300)
    assert sums[1].usage == Usage() and sums[2].usage == Usage(cost_usd=1.0)
    assert len(await store.usage_sums(T0 - timedelta(days=5))) == 4
    assert await store.usage_sums(late + timedelta(days=1)) == []


@pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)
async def test_the_spending_read_is_served_by_an_index_on_when_runs_ended(
    store: Store, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read at every start for today's budgets: it must not scan every run ever stored. The
    planner is asked about the very query the store ran, with scans priced out where it can."""
    await store.apply(ChangeSet(tasks=[full_task()], runs=[full_run()]))
    ran: list[tuple[str, Any]] = []
    real = store._fetchall  # type: ignore[attr-defined]

    async def spy(sql: str, params: Any = ()) -> Any:
        ran.append((sql, params))
        return await real(sql, params)

    monkeypatch.setattr(store, "_fetchall", spy)
    assert len(await store.list_spending(T0)) == 1
    [(sql, params)] = ran
    if isinstance(store, SqliteStore):
        with sqlite3.connect(tmp_path / "t.db") as conn:
            plan = " | ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
        assert "USING INDEX runs_finished" in plan, plan
        assert "SCAN r" not in plan, plan
    else:
        import psycopg

        with psycopg.connect(request.getfixturevalue("postgres_url"), autocommit=True) as pg:
            pg.execute("SET enable_seqscan = off")
            row = pg.execute(f"EXPLAIN {sql}", params).fetchall()
        plan = " | ".join(r[0] for r in row)
        assert "runs_finished" in plan, plan


# --- output --------------------------------------------------------------------------------------


async def seed_runs(store: Store, *runs: int) -> None:
    await store.apply(ChangeSet(tasks=[make_task(1)], runs=[make_run(n, 1) for n in runs]))


async def test_output_append_is_deduplicated(store: Store) -> None:
    await seed_runs(store, 1)
    await store.apply(ChangeSet(chunks=[chunk(1, 1, "first"), chunk(1, 2)]))
    await store.apply(ChangeSet(chunks=[chunk(1, 1, "again"), chunk(1, 2), chunk(1, 3)]))
    await store.apply(ChangeSet(chunks=[chunk(1, 4), chunk(1, 4, "dup in same set")]))
    got = await store.read_output([rid(1)])
    assert [(c.seq, c.data) for c in got] == [(1, "first"), (2, "r1s2"), (3, "r1s3"), (4, "r1s4")]


async def test_output_heads_are_the_highest_seq_stored_per_run(store: Store) -> None:
    tasks = [make_task(n) for n in (1, 2, 3)]
    runs = [make_run(n, n) for n in (1, 2, 3)]
    await store.apply(ChangeSet(tasks=tasks, runs=runs))
    await store.apply(ChangeSet(chunks=[chunk(1, s) for s in (1, 2, 3)] + [chunk(2, 7)]))
    await store.apply(ChangeSet(chunks=[chunk(1, 2), chunk(1, 5)]))  # a resend, then more
    assert await store.output_heads([rid(1), rid(2), rid(3), rid(1)]) == {rid(1): 5, rid(2): 7}
    assert await store.output_heads([]) == {}


async def test_read_output_round_trips_chunk_fields(store: Store) -> None:
    await seed_runs(store, 1)
    sent = OutputChunk(rid(1), 1, 1, '{"e": 1}', OutputKind.EVENT, T0, task_id=None)
    untimed = OutputChunk(rid(1), 1, 2, "x")
    await store.apply(ChangeSet(chunks=[sent, untimed]))
    got = await store.read_output([rid(1)])
    assert got == [
        OutputChunk(rid(1), 1, 1, '{"e": 1}', OutputKind.EVENT, T0, task_id=tid(1)),
        OutputChunk(rid(1), 1, 2, "x", task_id=tid(1)),
    ]


async def test_read_output_in_run_order_then_seq_after_cursor(store: Store) -> None:
    await seed_runs(store, 1, 2, 3)
    await store.apply(ChangeSet(chunks=[chunk(2, s) for s in (3, 1, 2)]))
    await store.apply(ChangeSet(chunks=[chunk(1, s) for s in (2, 1, 3)]))
    got = await store.read_output([rid(2), rid(3), rid(1)])
    assert [(c.run_id, c.seq) for c in got] == [
        (rid(2), 1),
        (rid(2), 2),
        (rid(2), 3),
        (rid(1), 1),
        (rid(1), 2),
        (rid(1), 3),
    ]
    got = await store.read_output([rid(1), rid(2)], after={rid(1): 2, rid(2): 3})
    assert [(c.run_id, c.seq) for c in got] == [(rid(1), 3)]
    got = await store.read_output([rid(1), rid(2)], after={rid(2): 1})
    assert [(c.run_id, c.seq) for c in got] == [
        (rid(1), 1),
        (rid(1), 2),
        (rid(1), 3),
        (rid(2), 2),
        (rid(2), 3),
    ]


async def test_read_output_respects_limit(store: Store) -> None:
    await seed_runs(store, 1, 2)
    await store.apply(ChangeSet(chunks=[chunk(r, s) for r in (1, 2) for s in range(1, 6)]))
    got = await store.read_output([rid(1), rid(2)], limit=7)
    assert [(c.run_id, c.seq) for c in got] == [(rid(1), s) for s in range(1, 6)] + [
        (rid(2), 1),
        (rid(2), 2),
    ]
    assert await store.read_output([rid(1)], limit=0) == []
    assert await store.read_output([]) == []


async def test_chunk_for_unknown_run_is_rejected(store: Store) -> None:
    await seed_runs(store, 1)
    with pytest.raises(ValueError):
        await store.apply(ChangeSet(chunks=[chunk(1, 1), chunk(2, 1)]))
    assert await store.read_output([rid(1)]) == []


# --- workers -------------------------------------------------------------------------------------


def full_worker(name: str = "w-1", status: WorkerStatus = WorkerStatus.ONLINE) -> Worker:
    return Worker(
        id=WorkerId(name),
        hostname="host-1",
        version="1.2.3",
        agents=(
            AgentSpec(
                "echo",
                "echoes",
                (ModelBackend("anthropic", "claude", 200_000, ("text",), ("bash", "edit")),),
                '{"type": "object"}',
                True,
            ),
            AgentSpec("plain"),
        ),
        labels={"gpu": "a100"},
        max_concurrent_runs=4,
        status=status,
        first_seen_at=T0,
        connected_at=T0 + timedelta(seconds=1),
        last_heartbeat_at=T0 + timedelta(seconds=2),
        certificate_expires_at=T0 + timedelta(days=30),
        enrolled_labels={"zone": "eu", "ünï": "çødé"},
        enrolled_at=T0 - timedelta(days=1),
    )


async def test_worker_round_trips(store: Store) -> None:
    worker = full_worker()
    await store.apply(ChangeSet(workers=[worker]))
    assert await store.get_worker(worker.id) == worker
    bare = Worker(id=WorkerId("w-2"))
    await store.apply(ChangeSet(workers=[bare]))
    assert await store.get_worker(bare.id) == bare


async def test_revoked_worker_round_trips_with_when_and_why(store: Store) -> None:
    worker = full_worker("w-r", WorkerStatus.REVOKED)
    worker.revoked_at, worker.revoked_reason = T0 + timedelta(hours=1), "stolen laptop"
    await store.apply(ChangeSet(workers=[worker]))
    assert await store.get_worker(worker.id) == worker
    assert await store.list_workers(frozenset({WorkerStatus.REVOKED})) == [worker]


async def test_worker_enrolled_labels_and_time_round_trip(store: Store) -> None:
    worker = Worker(
        id=WorkerId("w-e"),
        labels={"gpu": "h100"},
        enrolled_labels={"gpu": "a100", "team": "ml"},
        enrolled_at=T0.astimezone(timezone(timedelta(hours=-5))),
    )
    await store.apply(ChangeSet(workers=[worker]))
    got = await store.get_worker(worker.id)
    assert got == worker
    assert got is not None and got.enrolled_at is not None
    assert got.enrolled_at.utcoffset() is not None
    got.enrolled_labels["team"] = "changed"  # a copy
    assert await store.list_workers() == [worker]
    worker.enrolled_labels, worker.enrolled_at = {}, None  # and back to none
    await store.apply(ChangeSet(workers=[worker]))
    assert await store.get_worker(worker.id) == Worker(id=WorkerId("w-e"), labels={"gpu": "h100"})


async def test_worker_with_naive_enrolled_at_is_rejected(store: Store) -> None:
    worker = Worker(id=WorkerId("w-n"), enrolled_at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.apply(ChangeSet(workers=[worker]))
    assert await store.get_worker(worker.id) is None


async def test_list_workers_filters_by_status_ordered_by_id(store: Store) -> None:
    workers = [
        full_worker("w-c", WorkerStatus.ONLINE),
        full_worker("w-a", WorkerStatus.OFFLINE),
        full_worker("w-b", WorkerStatus.DRAINING),
        full_worker("w-d", WorkerStatus.REVOKED),
    ]
    await store.apply(ChangeSet(workers=workers))
    assert [w.id for w in await store.list_workers()] == ["w-a", "w-b", "w-c", "w-d"]
    live = await store.list_workers(frozenset({WorkerStatus.ONLINE, WorkerStatus.DRAINING}))
    assert [w.id for w in live] == ["w-b", "w-c"]
    await store.apply(ChangeSet(workers=[full_worker("w-c", WorkerStatus.OFFLINE)]))
    assert [w.id for w in await store.list_workers(frozenset({WorkerStatus.ONLINE}))] == []


# --- atomicity -----------------------------------------------------------------------------------


async def test_change_set_with_dangling_run_fails_as_a_whole(store: Store) -> None:
    await store.apply(ChangeSet(tasks=[make_task(1)]))
    bad = ChangeSet(
        tasks=[make_task(2), make_task(1, status=TaskStatus.RUNNING)],
        runs=[make_run(1, 1), make_run(2, 99)],
        workers=[full_worker()],
    )
    with pytest.raises(ValueError):
        await store.apply(bad)
    assert await store.get_task(tid(2)) is None
    assert await store.get_run(rid(1)) is None
    assert await store.get_worker(WorkerId("w-1")) is None
    assert await store.get_task(tid(1)) == make_task(1)


async def test_a_failed_change_set_fences_the_ones_after_it_until_resumed(store: Store) -> None:
    good = [ChangeSet(tasks=[make_task(n)], runs=[make_run(n, n)]) for n in range(1, 101)]
    bad = ChangeSet(tasks=[make_task(500)], runs=[make_run(500, 999)])
    results = await asyncio.gather(
        *(store.apply(c) for c in [*good[:50], bad, *good[50:]]), return_exceptions=True
    )
    assert results[:50] == [None] * 50
    assert isinstance(results[50], ValueError)
    # built on a change set that failed: they must not land either
    assert all(isinstance(r, StoreUnavailable) for r in results[51:])
    assert "refuses writes after a failed one" in str(results[51])
    assert len(await store.list_unfinished_runs()) == 50
    assert await store.get_task(tid(500)) is None
    with pytest.raises(StoreUnavailable):
        await store.apply(good[60])
    await store.resume()
    await store.apply(good[60])
    assert await store.get_task(tid(61)) is not None


async def test_resume_without_a_failure_is_harmless(store: Store) -> None:
    await store.resume()
    await store.apply(ChangeSet(tasks=[make_task(1)]))
    assert await store.get_task(tid(1)) is not None


async def test_use_after_close_raises(store: Store) -> None:
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(RuntimeError):
        await store.apply(ChangeSet(tasks=[make_task(1)]))


# --- schedules -----------------------------------------------------------------------------------


def make_schedule(name: str = "nightly", **fields: object) -> Schedule:
    schedule = Schedule(
        name=name,
        agent="echo",
        timezone="Europe/Chisinau",
        cron="30 8 * * MON-FRI",
        created_at=T0,
        updated_at=T0,
    )
    for key, value in fields.items():
        setattr(schedule, key, value)
    return schedule


def full_schedule() -> Schedule:
    return make_schedule(
        "monthly",
        cron="",
        rrule="DTSTART:20260101T090000\nRRULE:FREQ=MONTHLY;BYDAY=-1FR;BYHOUR=17;BYMINUTE=0",
        timezone="America/New_York",
        input='{"prompt": "summarise the repo", "ünï": "çødé"}',
        labels={"team": "ml"},
        policy=TaskPolicy(
            priority=3,
            timeout=600.5,
            max_attempts=2,
            required_labels={"gpu": "a100"},
            queue_timeout=60.0,
            retry_on_failure=True,
            required_provider="anthropic",
            required_model="claude",
        ),
        misfire=MisfirePolicy.SKIP,
        overlap=OverlapPolicy.CANCEL_PREVIOUS,
        paused=True,
        updated_at=T0 + timedelta(minutes=1),
        last_fire_time=T0 + timedelta(hours=1, microseconds=1),
        next_fire_time=T0 + timedelta(days=30),
        last_task_id=tid(9),
        last_outcome="skipped: previous task still running",
    )


async def test_schedule_with_every_field_round_trips(store: Store) -> None:
    schedule = full_schedule()
    await store.apply(ChangeSet(schedules=[schedule]))
    assert await store.get_schedule("monthly") == schedule
    bare = make_schedule("bare")
    await store.apply(ChangeSet(schedules=[bare]))
    assert await store.get_schedule("bare") == bare


async def test_missing_schedule_is_none_and_none_are_listed(store: Store) -> None:
    assert await store.get_schedule("nope") is None
    assert await store.list_schedules() == []


async def test_schedules_are_listed_by_name(store: Store) -> None:
    await store.apply(ChangeSet(schedules=[make_schedule(n) for n in ("c", "a", "b")]))
    assert [s.name for s in await store.list_schedules()] == ["a", "b", "c"]


async def test_schedule_upsert_replaces_by_name(store: Store) -> None:
    await store.apply(ChangeSet(schedules=[make_schedule()]))
    fired = make_schedule(
        last_fire_time=T0, next_fire_time=T0 + timedelta(days=1), last_task_id=tid(1)
    )
    await store.apply(ChangeSet(schedules=[fired]))
    assert await store.list_schedules() == [fired]


async def test_schedule_delete_removes_it_and_missing_is_a_no_op(store: Store) -> None:
    await store.apply(ChangeSet(schedules=[make_schedule("a"), make_schedule("b")]))
    await store.apply(ChangeSet(deleted_schedules=["a", "never-there"]))
    assert [s.name for s in await store.list_schedules()] == ["b"]
    assert await store.get_schedule("a") is None


async def test_schedule_upserts_apply_before_deletions_in_one_change_set(store: Store) -> None:
    await store.apply(ChangeSet(schedules=[make_schedule("a")], deleted_schedules=["a"]))
    assert await store.get_schedule("a") is None


async def test_concurrent_schedule_changes_commit_in_call_order(store: Store) -> None:
    second = make_schedule("a", cron="0 9 * * *")
    await asyncio.gather(
        store.apply(ChangeSet(schedules=[make_schedule("a")])),
        store.apply(ChangeSet(deleted_schedules=["a"])),
        store.apply(ChangeSet(schedules=[second])),
        store.apply(ChangeSet(schedules=[make_schedule("b")])),
        store.apply(ChangeSet(deleted_schedules=["b"])),
    )
    assert await store.list_schedules() == [second]


async def test_schedule_with_naive_datetime_is_rejected(store: Store) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.apply(
            ChangeSet(
                tasks=[make_task(1)],
                schedules=[make_schedule(next_fire_time=datetime(2026, 1, 1))],
            )
        )
    assert await store.get_schedule("nightly") is None
    assert await store.get_task(tid(1)) is None


async def test_schedule_fails_with_the_rest_of_its_change_set(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.apply(
            ChangeSet(runs=[make_run(1, 99)], schedules=[make_schedule()], deleted_schedules=[])
        )
    assert await store.list_schedules() == []


async def test_stored_and_returned_schedules_are_copies(store: Store) -> None:
    schedule = full_schedule()
    await store.apply(ChangeSet(schedules=[schedule]))
    schedule.labels["team"] = "changed"
    schedule.policy.required_labels["gpu"] = "none"
    got = await store.get_schedule("monthly")
    assert got == full_schedule()
    assert got is not None
    got.labels.clear()
    got.policy.required_labels.clear()
    assert await store.list_schedules() == [full_schedule()]


# --- access control ----------------------------------------------------------------------------


def make_bootstrap(n: int, **fields: object) -> BootstrapToken:
    token = BootstrapToken(
        id=f"{n:016x}",
        secret_hash=f"{n:064x}",
        worker_id=WorkerId(f"w-{n}"),
        created_at=T0 + timedelta(seconds=n),
        expires_at=T0 + timedelta(hours=1, seconds=n),
    )
    for name, value in fields.items():
        setattr(token, name, value)
    return token


def full_bootstrap() -> BootstrapToken:
    return make_bootstrap(
        9,
        labels={"gpu": "a100", "ünï": "çødé"},
        created_by="alice",
        used_at=T0 + timedelta(minutes=5, microseconds=7),
        used_by_host="host-9",
        revoked_at=T0 + timedelta(minutes=6),
    )


def make_api_token(n: int, **fields: object) -> ApiToken:
    token = ApiToken(
        id=f"{n:016x}",
        secret_hash=f"{n:064x}",
        name=f"ci-{n}",
        scopes=frozenset({Scope.SUBMIT}),
        created_at=T0 + timedelta(seconds=n),
    )
    for name, value in fields.items():
        setattr(token, name, value)
    return token


def audit(n: int, kind: AuditKind = AuditKind.WORKER_ENROLLED) -> AuditEvent:
    """An event as submitted (id 0); `stored(audit(n), id)` is how it comes back."""
    return AuditEvent(
        time=T0 + timedelta(seconds=n),
        kind=kind,
        principal=f"p{n}",
        subject=f"s{n}",
        peer="ipv4:127.0.0.1:5000",
        detail=f"d{n} ünï",
    )


def stored(event: AuditEvent, event_id: int) -> AuditEvent:
    return AuditEvent(
        event.time, event.kind, event.principal, event.subject, event.peer, event.detail, event_id
    )


async def test_bootstrap_token_with_every_field_round_trips(store: Store) -> None:
    token, bare = full_bootstrap(), make_bootstrap(1)
    await store.apply(ChangeSet(bootstrap_tokens=[token, bare]))
    assert await store.get_bootstrap_token(token.id) == token
    assert await store.get_bootstrap_token(bare.id) == bare


async def test_missing_tokens_are_none_and_none_are_listed(store: Store) -> None:
    assert await store.get_bootstrap_token("0" * 16) is None
    assert await store.get_api_token("0" * 16) is None
    assert await store.list_bootstrap_tokens() == []
    assert await store.list_api_tokens() == []
    assert await store.list_audit_events(AuditQuery()) == []


async def test_bootstrap_token_upsert_replaces_by_id(store: Store) -> None:
    await store.apply(ChangeSet(bootstrap_tokens=[make_bootstrap(1), make_bootstrap(2)]))
    revoked = make_bootstrap(1, revoked_at=T0 + timedelta(minutes=1), labels={"a": "b"})
    await store.apply(ChangeSet(bootstrap_tokens=[revoked]))
    assert await store.get_bootstrap_token(revoked.id) == revoked
    assert await store.list_bootstrap_tokens() == [revoked, make_bootstrap(2)]


async def test_tokens_are_listed_oldest_first(store: Store) -> None:
    # created_at order, not id or insertion order; ties broken by id
    tokens = [
        make_bootstrap(3, created_at=T0),
        make_bootstrap(1, created_at=T0 + timedelta(seconds=10)),
        make_bootstrap(2, created_at=T0),
    ]
    api = [
        make_api_token(3, created_at=T0),
        make_api_token(1, created_at=T0 + timedelta(seconds=10)),
        make_api_token(2, created_at=T0),
    ]
    await store.apply(ChangeSet(bootstrap_tokens=tokens[:1], api_tokens=api[:1]))
    await store.apply(ChangeSet(bootstrap_tokens=tokens[1:], api_tokens=api[1:]))
    assert await store.list_bootstrap_tokens() == [tokens[2], tokens[0], tokens[1]]
    assert await store.list_api_tokens() == [api[2], api[0], api[1]]


async def test_consume_bootstrap_token_succeeds_once(store: Store) -> None:
    token = make_bootstrap(1, labels={"gpu": "a100"})
    await store.apply(ChangeSet(bootstrap_tokens=[token]))
    now = T0 + timedelta(minutes=1)
    got = await store.consume_bootstrap_token(token.id, now, "host-a")
    expected = make_bootstrap(1, labels={"gpu": "a100"}, used_at=now, used_by_host="host-a")
    assert got == expected
    assert await store.get_bootstrap_token(token.id) == expected
    later = now + timedelta(seconds=1)
    assert await store.consume_bootstrap_token(token.id, later, "host-b") is None
    assert await store.get_bootstrap_token(token.id) == expected  # unchanged by the replay


async def test_consume_refuses_revoked_and_missing_tokens(store: Store) -> None:
    revoked = make_bootstrap(1, revoked_at=T0)
    await store.apply(ChangeSet(bootstrap_tokens=[revoked]))
    assert await store.consume_bootstrap_token(revoked.id, T0, "h") is None
    assert await store.get_bootstrap_token(revoked.id) == revoked
    assert await store.consume_bootstrap_token("f" * 16, T0, "h") is None
    assert await store.get_bootstrap_token("f" * 16) is None


async def test_consume_does_not_check_expiry(store: Store) -> None:
    token = make_bootstrap(1)
    await store.apply(ChangeSet(bootstrap_tokens=[token]))
    now = token.expires_at + timedelta(days=1)
    got = await store.consume_bootstrap_token(token.id, now)
    assert got is not None
    assert (got.used_at, got.used_by_host) == (now, "")
    assert await store.consume_bootstrap_token(token.id, now) is None


async def test_concurrent_consumes_have_exactly_one_winner(store: Store) -> None:
    token = make_bootstrap(1)
    await store.apply(ChangeSet(bootstrap_tokens=[token]))
    results = await asyncio.gather(
        *(store.consume_bootstrap_token(token.id, T0, f"host-{i}") for i in range(10))
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert await store.get_bootstrap_token(token.id) == winners[0]
    assert winners[0].used_by_host.startswith("host-")


async def test_consume_sees_a_token_submitted_just_before(store: Store) -> None:
    token = make_bootstrap(1)
    written = store.submit(ChangeSet(bootstrap_tokens=[token]))  # not awaited yet
    assert await store.consume_bootstrap_token(token.id, T0, "h") is not None
    await written


async def test_consume_with_naive_datetime_is_rejected(store: Store) -> None:
    token = make_bootstrap(1)
    await store.apply(ChangeSet(bootstrap_tokens=[token]))
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.consume_bootstrap_token(token.id, datetime(2026, 1, 1))
    assert await store.get_bootstrap_token(token.id) == token


async def test_api_token_round_trips_with_scopes(store: Store) -> None:
    forever = make_api_token(1, scopes=frozenset(Scope), created_by="alice")
    expiring = make_api_token(
        2,
        scopes=frozenset({Scope.READ}),
        expires_at=T0 + timedelta(days=90, microseconds=1),
        revoked_at=T0 + timedelta(days=1),
    )
    await store.apply(ChangeSet(api_tokens=[forever, expiring]))
    got = await store.get_api_token(forever.id)
    assert got == forever
    assert got is not None
    assert got.expires_at is None
    assert isinstance(got.scopes, frozenset)
    assert all(isinstance(s, Scope) for s in got.scopes)
    assert await store.get_api_token(expiring.id) == expiring
    none = make_api_token(3, scopes=frozenset())
    await store.apply(ChangeSet(api_tokens=[none]))
    assert await store.get_api_token(none.id) == none


async def test_api_token_upsert_replaces_by_id(store: Store) -> None:
    await store.apply(ChangeSet(api_tokens=[make_api_token(1)]))
    revoked = make_api_token(1, revoked_at=T0 + timedelta(hours=1), name="renamed")
    await store.apply(ChangeSet(api_tokens=[revoked]))
    assert await store.list_api_tokens() == [revoked]


async def test_token_with_naive_datetime_fails_with_its_change_set(store: Store) -> None:
    bad = [
        ChangeSet(
            tasks=[make_task(1)], bootstrap_tokens=[make_bootstrap(1, used_at=datetime(2026, 1, 1))]
        ),
        ChangeSet(
            tasks=[make_task(1)], api_tokens=[make_api_token(1, expires_at=datetime(2026, 1, 1))]
        ),
        ChangeSet(
            tasks=[make_task(1)],
            audit_events=[AuditEvent(datetime(2026, 1, 1), AuditKind.WORKER_REVOKED)],
        ),
    ]
    for changes in bad:
        with pytest.raises(ValueError, match="timezone-aware"):
            await store.apply(changes)
    assert await store.get_task(tid(1)) is None
    assert await store.list_bootstrap_tokens() == []
    assert await store.list_api_tokens() == []
    assert await store.list_audit_events(AuditQuery()) == []


async def test_stored_and_returned_tokens_are_copies(store: Store) -> None:
    token = make_bootstrap(1, labels={"gpu": "a100"})
    await store.apply(ChangeSet(bootstrap_tokens=[token]))
    token.labels["gpu"] = "leaked"
    token.used_at = T0
    got = await store.get_bootstrap_token(token.id)
    assert got == make_bootstrap(1, labels={"gpu": "a100"})
    assert got is not None
    got.labels.clear()
    consumed = await store.consume_bootstrap_token(got.id, T0)
    assert consumed is not None
    consumed.labels["x"] = "y"
    assert (await store.list_bootstrap_tokens())[0].labels == {"gpu": "a100"}


def logged(position: int, task: int = 1, data: bytes = b"\x00event") -> LoggedEvent:
    return LoggedEvent(position, 4, str(tid(task)), "worker-1", data + bytes([position % 256]))


async def test_the_event_log_keeps_events_with_their_change_in_order(store: Store) -> None:
    assert await store.event_positions() == (0, 0)
    assert await store.read_events(0) == []
    await store.apply(ChangeSet(tasks=[make_task(1)], events=[logged(1), logged(2)]))
    await store.apply(ChangeSet(events=[logged(3, data=b"")]))
    assert await store.event_positions() == (1, 3)
    assert await store.read_events(0) == [logged(1), logged(2), logged(3, data=b"")]
    assert await store.read_events(1, limit=1) == [logged(2)]
    assert await store.read_events(3) == []


async def test_a_task_or_run_change_is_logged_as_it_was_committed(store: Store) -> None:
    """Logged with its object, encoded from the row the change set writes: the replay gives the
    state of that commit, not a later one, next to events logged as serialized messages."""
    task = make_task(7, labels={"team": "a"})
    run = make_run(7, task=7, status=RunStatus.ASSIGNED, worker_id=WorkerId("worker-3"))
    at = datetime(2026, 12, 2, 10, 0, 0, 123456, tzinfo=UTC)
    stamp = int(at.timestamp()) * 1_000_000 + at.microsecond
    changes = ChangeSet(
        tasks=[task],
        runs=[run],
        events=[
            logged(1),
            LoggedEvent(2, epb.EVENT_KIND_RUN_CHANGED, tid(7), "worker-3", subject=run, time=stamp),
            LoggedEvent(3, epb.EVENT_KIND_TASK_CHANGED, tid(7), "", subject=task, time=stamp),
        ],
    )
    committing = store.submit(changes)
    task.status, task.labels = TaskStatus.COMPLETED, {"team": "b"}  # after the hand-over
    run.status = RunStatus.COMPLETED
    await committing
    first, ran, changed = await store.read_events(0)
    assert first == logged(1)
    assert (ran.position, ran.kind, ran.task_id, ran.worker_id) == (
        2,
        epb.EVENT_KIND_RUN_CHANGED,
        tid(7),
        "worker-3",
    )
    run_event, task_event = eventlog.decode(ran), eventlog.decode(changed)
    assert run_event.position == 2 and task_event.position == 3
    assert run_event.run.id == rid(7) and run_event.run.status == pb.RUN_STATUS_ASSIGNED
    assert run_event.run.worker_id == "worker-3"
    assert task_event.task.id == tid(7) and task_event.task.status == pb.TASK_STATUS_PENDING
    assert dict(task_event.task.labels) == {"team": "a"}
    assert task_event.time.ToDatetime(tzinfo=UTC) == at


async def test_a_change_set_naming_a_task_or_run_twice_stores_its_last_state(
    store: Store,
) -> None:
    """Created, then assigned in the same commit: the engine names the objects twice."""
    first, run = make_task(8), make_run(8, task=8)
    later = replace(first, status=TaskStatus.RUNNING, worker_id=WorkerId("worker-2"))
    assigned = replace(run, status=RunStatus.ASSIGNED, worker_id=WorkerId("worker-2"))
    await store.apply(
        ChangeSet(tasks=[first, make_task(9), later], runs=[run, assigned, make_run(9, task=9)])
    )
    stored = await store.get_task(tid(8))
    assert stored is not None and stored.status is TaskStatus.RUNNING
    assert stored.worker_id == "worker-2"
    assert [(r.id, r.status) for r in await store.list_runs(tid(8))] == [
        (rid(8), RunStatus.ASSIGNED)
    ]
    assert await store.get_task(tid(9)) is not None


async def test_an_event_position_is_never_stored_twice(store: Store) -> None:
    await store.apply(ChangeSet(events=[logged(1), logged(2)]))
    with pytest.raises(ValueError):
        await store.apply(ChangeSet(tasks=[make_task(5)], events=[logged(2)]))
    await store.resume()
    assert await store.get_task(tid(5)) is None  # the change went with its event
    assert [e.position for e in await store.read_events(0)] == [1, 2]


@pytest.fixture(params=STORES)
async def small_log_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A store whose event log keeps 50 events (the SQL ones delete a thousand at a time)."""
    s = new_store(request, tmp_path, event_retention=50)
    await s.open()
    yield s
    await s.close()


async def test_the_event_log_keeps_at_least_its_retention_and_drops_older_ones(
    small_log_store: Store,
) -> None:
    store = small_log_store
    for start in range(1, 2501, 100):
        await store.apply(ChangeSet(events=[logged(p) for p in range(start, start + 100)]))
    oldest, newest = await store.event_positions()
    assert newest == 2500 and 1 < oldest <= 2500 - 50 + 1
    kept = await store.read_events(oldest - 1, limit=5000)
    assert [e.position for e in kept] == list(range(oldest, 2501))


async def test_audit_events_get_increasing_ids_newest_first(store: Store) -> None:
    await store.apply(ChangeSet(audit_events=[audit(1), audit(2)]))
    await store.apply(ChangeSet(audit_events=[audit(3, AuditKind.CONNECTION_REJECTED)]))
    assert await store.list_audit_events(AuditQuery()) == [
        stored(audit(3, AuditKind.CONNECTION_REJECTED), 3),
        stored(audit(2), 2),
        stored(audit(1), 1),
    ]


async def test_audit_event_id_given_by_the_caller_is_ignored(store: Store) -> None:
    await store.apply(ChangeSet(audit_events=[stored(audit(1), 42)]))
    assert await store.list_audit_events(AuditQuery()) == [stored(audit(1), 1)]


async def test_concurrent_audit_events_are_numbered_in_call_order(store: Store) -> None:
    await asyncio.gather(*(store.apply(ChangeSet(audit_events=[audit(n)])) for n in range(1, 51)))
    events = await store.list_audit_events(AuditQuery(limit=100))
    assert events == [stored(audit(n), n) for n in range(50, 0, -1)]


async def test_audit_limit_and_before_id_page_through(store: Store) -> None:
    await store.apply(ChangeSet(audit_events=[audit(n) for n in range(1, 11)]))
    first = await store.list_audit_events(AuditQuery(limit=4))
    assert [e.id for e in first] == [10, 9, 8, 7]
    second = await store.list_audit_events(AuditQuery(limit=4, before_id=first[-1].id))
    assert [e.id for e in second] == [6, 5, 4, 3]
    third = await store.list_audit_events(AuditQuery(limit=4, before_id=second[-1].id))
    assert [e.id for e in third] == [2, 1]
    assert await store.list_audit_events(AuditQuery(before_id=1)) == []
    beyond = await store.list_audit_events(AuditQuery(limit=2, before_id=1000))
    assert [e.id for e in beyond] == [10, 9]


async def test_audit_kinds_filter(store: Store) -> None:
    kinds = [AuditKind.WORKER_ENROLLED, AuditKind.ENROLLMENT_REJECTED, AuditKind.REQUEST_REJECTED]
    await store.apply(ChangeSet(audit_events=[audit(n, kinds[n % 3]) for n in range(1, 13)]))
    rejected = frozenset({AuditKind.ENROLLMENT_REJECTED, AuditKind.REQUEST_REJECTED})
    got = await store.list_audit_events(AuditQuery(kinds=rejected))
    assert [e.id for e in got] == [11, 10, 8, 7, 5, 4, 2, 1]
    assert all(e.kind in rejected for e in got)
    paged = await store.list_audit_events(AuditQuery(limit=3, before_id=10, kinds=rejected))
    assert [e.id for e in paged] == [8, 7, 5]
    only = frozenset({AuditKind.WORKER_ENROLLED})
    assert [e.id for e in await store.list_audit_events(AuditQuery(kinds=only))] == [12, 9, 6, 3]
    none = frozenset({AuditKind.API_TOKEN_REVOKED})
    assert await store.list_audit_events(AuditQuery(kinds=none)) == []


async def test_audit_list_rejects_non_positive_limit(store: Store) -> None:
    with pytest.raises(ValueError, match="limit"):
        await store.list_audit_events(AuditQuery(limit=0))


@pytest.fixture(params=STORES)
async def small_audit_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A store that keeps only 5 audit events."""
    s = new_store(request, tmp_path, audit_retention=5)
    await s.open()
    yield s
    await s.close()


async def test_audit_retention_drops_the_oldest(small_audit_store: Store) -> None:
    store = small_audit_store
    await store.apply(ChangeSet(audit_events=[audit(n) for n in range(1, 4)]))
    assert [e.id for e in await store.list_audit_events(AuditQuery())] == [3, 2, 1]
    await store.apply(ChangeSet(audit_events=[audit(n) for n in range(4, 8)]))
    assert [e.id for e in await store.list_audit_events(AuditQuery())] == [7, 6, 5, 4, 3]
    await store.apply(ChangeSet(audit_events=[audit(n) for n in range(8, 20)]))  # one change set
    events = await store.list_audit_events(AuditQuery())
    assert events == [stored(audit(n), n) for n in range(19, 14, -1)]  # ids are never reused
    await asyncio.gather(*(store.apply(ChangeSet(audit_events=[audit(n)])) for n in range(20, 40)))
    assert [e.id for e in await store.list_audit_events(AuditQuery())] == [39, 38, 37, 36, 35]


@pytest.mark.parametrize("retention", [0, -1])
def test_audit_retention_must_be_positive(tmp_path: Path, retention: int) -> None:
    with pytest.raises(ValueError, match="audit_retention"):
        MemoryStore(audit_retention=retention)
    with pytest.raises(ValueError, match="audit_retention"):
        SqliteStore(tmp_path / "t.db", audit_retention=retention)
    with pytest.raises(ValueError, match="audit_retention"):
        PostgresStore("postgresql://localhost/taskrun", audit_retention=retention)


async def test_access_control_use_after_close_raises(store: Store) -> None:
    await store.apply(ChangeSet(bootstrap_tokens=[make_bootstrap(1)]))
    await store.close()
    with pytest.raises(RuntimeError):
        await store.consume_bootstrap_token(make_bootstrap(1).id, T0)
    with pytest.raises(RuntimeError):
        await store.list_audit_events(AuditQuery())
    with pytest.raises(RuntimeError):
        await store.get_api_token("0" * 16)


# --- SQLite only ---------------------------------------------------------------------------------


async def test_sqlite_uses_wal_and_foreign_keys(sqlite_store: SqliteStore) -> None:
    conn = sqlite3.connect(sqlite_store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


async def probe_written(conn: sqlite3.Connection) -> None:
    """Until the checkpointer wrote its probe row (its first write after a complete checkpoint,
    which starts the WAL over)."""
    for _ in range(100):  # the checkpointer looks every second
        if conn.execute("SELECT count(*) FROM store_probe").fetchone()[0]:
            return
        await asyncio.sleep(0.05)
    pytest.fail("the checkpointer wrote no probe row after a complete checkpoint")


async def probes_after_commits(store: SqliteStore, rounds: int) -> None:
    """`rounds` times: a commit, then the checkpointer's probe row written after it (the probe
    row of the round before deleted first)."""
    conn = sqlite3.connect(store.path)
    try:
        for round in range(rounds):
            conn.execute("DELETE FROM store_probe")
            conn.commit()
            await store.apply(ChangeSet(tasks=[make_task(round + 1)]))
            await probe_written(conn)
    finally:
        conn.close()


async def test_sqlite_starts_the_wal_over_off_the_commit_path_after_a_checkpoint(
    sqlite_store: SqliteStore,
) -> None:
    """Once the checkpointer copied the whole WAL back, it makes the first write itself (the
    probe row): a commit never pays for starting the WAL over and syncing its header."""
    await sqlite_store.apply(ChangeSet(tasks=[make_task(1)]))
    conn = sqlite3.connect(sqlite_store.path)
    try:
        await probe_written(conn)
        busy, logged, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert (busy, logged, copied) == (0, 1, 1)  # the WAL began again: one frame, the probe
    finally:
        conn.close()
    assert await sqlite_store.get_task(tid(1)) is not None


async def test_sqlite_flushes_the_wal_outside_the_writers_lock_before_starting_it_over(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting the WAL over syncs it, with the writer's lock held: every commit meanwhile
    waits. The checkpointer syncs the WAL first, without the lock, so that sync has less left
    to write; a flush that fails is logged and the WAL still begins again."""
    flushed: list[tuple[str, bool]] = []
    fdatasync = os.fdatasync

    def recording(fd: int) -> None:
        wal = str(Path(f"/proc/self/fd/{fd}").readlink())
        flushed.append((wal, sqlite_store._write_lock.locked()))
        if len(flushed) == 1:
            raise OSError(errno.EIO, "Input/output error")
        fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", recording)
    with structlog.testing.capture_logs() as logs:
        await probes_after_commits(sqlite_store, 2)  # the first flush fails, the second works
    assert [e["error"] for e in logs if e["event"] == "wal flush failed"] == [
        "[Errno 5] Input/output error"
    ]
    assert flushed[:2] == [(f"{sqlite_store.path.resolve()}-wal", False)] * 2


async def test_sqlite_flushes_the_wal_with_fsync_where_there_is_no_fdatasync(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """macOS has no os.fdatasync: the checkpointer flushes with fsync there, and goes on."""
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(str(Path(f"/proc/self/fd/{fd}").readlink()))
        fsync(fd)

    monkeypatch.delattr(os, "fdatasync")
    monkeypatch.setattr(os, "fsync", recording)
    # a checkpointer that had died would write no second probe
    await probes_after_commits(sqlite_store, 2)
    assert f"{sqlite_store.path.resolve()}-wal" in synced


async def test_sqlite_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = SqliteStore(path)
    await first.open()
    await first.apply(
        ChangeSet(
            tasks=[full_task()],
            runs=[full_run()],
            workers=[full_worker()],
            chunks=[chunk(70, 1)],
        )
    )
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.get_task(tid(7)) == full_task()
        assert await second.get_run(rid(70)) == full_run()
        assert await second.get_worker(WorkerId("w-1")) == full_worker()
        assert [c.data for c in await second.read_output([rid(70)])] == ["r70s1"]
    finally:
        await second.close()


async def test_sqlite_close_drains_pending_writes(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = SqliteStore(path)
    await first.open()
    writes = [
        asyncio.ensure_future(first.apply(ChangeSet(tasks=[make_task(n)]))) for n in range(50)
    ]
    await asyncio.sleep(0)  # let every apply() enqueue
    await first.close()
    await asyncio.gather(*writes)
    second = SqliteStore(path)
    await second.open()
    try:
        assert len((await second.list_tasks(TaskQuery(limit=100))).tasks) == 50
    finally:
        await second.close()


KILLED_WRITER = """
import asyncio, os, signal, sys
from datetime import UTC, datetime
from taskrun.controlplane.store import SqliteStore
from taskrun.core.ids import TaskId
from taskrun.core.models import Task, TaskPolicy
from taskrun.core.status import TaskStatus
from taskrun.core.store import ChangeSet

async def main() -> None:
    store = SqliteStore(sys.argv[1])
    await store.open()
    now = datetime.now(UTC)
    task = Task(TaskId("tsk_killed"), "echo", "{}", {}, TaskPolicy(), TaskStatus.PENDING, now, now)
    await store.apply(ChangeSet(tasks=[task]))
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_sqlite_commit_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", KILLED_WRITER, str(path))
    assert await proc.wait() == -signal.SIGKILL
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.get_task(TaskId("tsk_killed")) is not None
    finally:
        await store.close()


def schema_of(path: Path) -> tuple[int, list[tuple[str, str]]]:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
        return version, objects
    finally:
        conn.close()


async def test_sqlite_reopen_at_current_version_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = SqliteStore(path)
    await first.open()
    assert first.migrations_applied == SCHEMA_VERSION
    await first.close()
    before = schema_of(path)
    second = SqliteStore(path)
    await second.open()
    await second.close()
    assert second.migrations_applied == 0
    assert second.commits == 0
    assert schema_of(path) == before == (SCHEMA_VERSION, before[1])


async def test_sqlite_refuses_newer_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = SqliteStore(path)
    with pytest.raises(SchemaVersionError, match="newer"):
        await store.open()
    await store.close()
    assert schema_of(path) == (SCHEMA_VERSION + 1, [])


async def test_sqlite_migrates_a_version_1_file_keeping_its_data(tmp_path: Path) -> None:
    from taskrun.controlplane.store.sqlite_schema import MIGRATIONS

    path = tmp_path / "t.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    first = SqliteStore(path)
    await first.open()
    await first.apply(ChangeSet(tasks=[make_task(1)]))  # a version-1 table still works
    await first.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert first.migrations_applied == SCHEMA_VERSION - 1
        assert await store.get_task(tid(1)) == make_task(1)
        await store.apply(ChangeSet(schedules=[full_schedule()]))
        assert await store.get_schedule("monthly") == full_schedule()
    finally:
        await store.close()
    assert schema_of(path)[0] == SCHEMA_VERSION


async def test_sqlite_migrates_a_version_2_file_keeping_its_workers(tmp_path: Path) -> None:
    from taskrun.controlplane.store.sqlite_schema import MIGRATIONS

    path = tmp_path / "t.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in (*MIGRATIONS[0], *MIGRATIONS[1]):
        conn.execute(statement)
    conn.execute(
        "INSERT INTO workers VALUES ('w-old', 'h', '1', '[]', '{}', 2, 3, NULL, NULL, NULL, NULL)"
    )
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert store.migrations_applied == SCHEMA_VERSION - 2
        old = await store.get_worker(WorkerId("w-old"))
        assert old == Worker(id=WorkerId("w-old"), hostname="h", version="1", max_concurrent_runs=2)
    finally:
        await store.close()
    assert schema_of(path)[0] == SCHEMA_VERSION


async def test_sqlite_migrates_a_version_3_file_keeping_its_workers(tmp_path: Path) -> None:
    from taskrun.controlplane.store.sqlite_schema import MIGRATIONS

    path = tmp_path / "t.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in (*MIGRATIONS[0], *MIGRATIONS[1], *MIGRATIONS[2]):
        conn.execute(statement)
    conn.execute(
        "INSERT INTO workers VALUES"
        " ('w-old', 'h', '1', '[]', '{\"gpu\":\"a100\"}', 2, 3, 0, NULL, NULL, NULL, 5, 'gone')"
    )
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert store.migrations_applied == SCHEMA_VERSION - 3
        old = await store.get_worker(WorkerId("w-old"))
        assert old == Worker(
            id=WorkerId("w-old"),
            hostname="h",
            version="1",
            labels={"gpu": "a100"},
            max_concurrent_runs=2,
            status=WorkerStatus(3),
            first_seen_at=datetime(1970, 1, 1, tzinfo=UTC),
            revoked_at=datetime(1970, 1, 1, 0, 0, 0, 5, tzinfo=UTC),
            revoked_reason="gone",
        )
        assert old.enrolled_labels == {}
        assert old.enrolled_at is None
        await store.apply(
            ChangeSet(
                workers=[full_worker()],
                bootstrap_tokens=[make_bootstrap(1)],
                api_tokens=[make_api_token(1)],
                audit_events=[audit(1)],
            )
        )
        assert await store.get_worker(WorkerId("w-1")) == full_worker()
        assert await store.consume_bootstrap_token(make_bootstrap(1).id, T0) is not None
        assert await store.list_api_tokens() == [make_api_token(1)]
        assert await store.list_audit_events(AuditQuery()) == [stored(audit(1), 1)]
    finally:
        await store.close()
    assert schema_of(path)[0] == SCHEMA_VERSION


async def test_sqlite_consume_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = SqliteStore(path)
    await first.open()
    token = make_bootstrap(1)
    await first.apply(ChangeSet(bootstrap_tokens=[token]))
    assert await first.consume_bootstrap_token(token.id, T0, "host-a") is not None
    conn = sqlite3.connect(path)  # committed: another connection sees it at once
    try:
        used = conn.execute("SELECT used_by_host FROM bootstrap_tokens").fetchall()
        assert used == [("host-a",)]
    finally:
        conn.close()
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        expected = make_bootstrap(1, used_at=T0, used_by_host="host-a")
        assert await second.get_bootstrap_token(token.id) == expected
        assert await second.consume_bootstrap_token(token.id, T0, "host-b") is None
    finally:
        await second.close()


async def test_sqlite_access_control_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = SqliteStore(path, audit_retention=3)
    await first.open()
    await first.apply(
        ChangeSet(
            bootstrap_tokens=[full_bootstrap()],
            api_tokens=[make_api_token(1, scopes=frozenset(Scope))],
            audit_events=[audit(n) for n in range(1, 6)],
        )
    )
    await first.close()
    second = SqliteStore(path, audit_retention=3)
    await second.open()
    try:
        assert await second.list_bootstrap_tokens() == [full_bootstrap()]
        assert await second.list_api_tokens() == [make_api_token(1, scopes=frozenset(Scope))]
        await second.apply(ChangeSet(audit_events=[audit(6)]))
        got = await second.list_audit_events(AuditQuery())
        assert got == [stored(audit(6), 6), stored(audit(5), 5), stored(audit(4), 4)]
    finally:
        await second.close()


async def test_sqlite_consume_runs_in_order_with_group_commits(
    sqlite_store: SqliteStore,
) -> None:
    tokens = [make_bootstrap(n) for n in range(1, 21)]
    writes = [sqlite_store.submit(ChangeSet(bootstrap_tokens=[t])) for t in tokens]
    consumed = await asyncio.gather(
        *(sqlite_store.consume_bootstrap_token(t.id, T0, "h") for t in tokens)
    )
    await asyncio.gather(*writes)
    assert all(c is not None for c in consumed)
    assert all(t.used_at == T0 for t in await sqlite_store.list_bootstrap_tokens())


async def test_sqlite_schedules_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = SqliteStore(path)
    await first.open()
    await first.apply(ChangeSet(schedules=[full_schedule(), make_schedule()]))
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.list_schedules() == [full_schedule(), make_schedule()]
    finally:
        await second.close()


async def test_sqlite_group_commits_concurrent_applies(sqlite_store: SqliteStore) -> None:
    before = sqlite_store.commits
    changes = [
        ChangeSet(tasks=[make_task(n)], runs=[make_run(n, n)], chunks=[chunk(n, 1)])
        for n in range(1, 2001)
    ]
    await asyncio.gather(*(sqlite_store.apply(c) for c in changes))
    transactions = sqlite_store.commits - before
    assert 1 <= transactions <= 200
    assert len(await sqlite_store.list_unfinished_tasks()) == 2000
    assert len(await sqlite_store.list_unfinished_runs()) == 2000


async def test_sqlite_rows_written_many_to_a_statement_keep_call_order(
    sqlite_store: SqliteStore,
) -> None:
    """Rows go in statements of up to 64 rows (the writer steps once per statement, not per
    row): counts that are no power of two and cross statement bounds all land, and a task
    upserted by two change sets of one group keeps the later state."""
    first = ChangeSet(tasks=[make_task(n) for n in range(1, 151)])  # 64 + 64 + 16 + 4 + 2
    first.runs = [make_run(n, n) for n in range(1, 98)]  # 64 + 32 + 1
    first.chunks = [chunk(n, 1) for n in range(1, 98)]
    later = ChangeSet(
        tasks=[make_task(n, status=TaskStatus.RUNNING, attempts=2) for n in range(100, 171)]
    )
    await asyncio.gather(sqlite_store.submit(first), sqlite_store.submit(later))  # queued together
    tasks = {t.id: t for t in await sqlite_store.list_unfinished_tasks()}
    assert len(tasks) == 170
    assert tasks[tid(99)] == make_task(99)
    assert tasks[tid(100)] == make_task(100, status=TaskStatus.RUNNING, attempts=2)
    assert tasks[tid(130)].status is TaskStatus.RUNNING  # both of its rows in one statement
    assert tasks[tid(170)].status is TaskStatus.RUNNING
    read = await sqlite_store.read_output([rid(n) for n in range(1, 98)], after={}, limit=1000)
    assert len(read) == 97


async def test_sqlite_writes_within_a_build_that_allows_few_variables_per_statement(
    sqlite_store: SqliteStore,
) -> None:
    """SQLite before 3.32 allows 999 variables in a statement (a task row has 23): the writer
    sizes its statements to the limit of the SQLite it runs on."""
    conn = sqlite_store._conn
    assert conn is not None
    with sqlite_store._write_lock:  # the writer's connection: change its limit between writes
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    await sqlite_store.apply(ChangeSet(tasks=[make_task(n) for n in range(1, 101)]))
    assert len(await sqlite_store.list_unfinished_tasks()) == 100


async def test_sqlite_reads_see_each_committed_write(sqlite_store: SqliteStore) -> None:
    for n in range(1, 21):
        await sqlite_store.apply(ChangeSet(tasks=[make_task(n)]))
        assert (await sqlite_store.get_task(tid(n))) == make_task(n)


async def test_sqlite_point_reads_do_not_queue_behind_long_reads(
    sqlite_store: SqliteStore,
) -> None:
    """A read by key answers while every thread of the read pool is busy with something long."""
    await sqlite_store.apply(ChangeSet(tasks=[make_task(1)], runs=[make_run(1, 1)]))
    await sqlite_store.apply(ChangeSet(workers=[full_worker()]))
    release = threading.Event()
    long_reads = [
        asyncio.ensure_future(sqlite_store._read(lambda _conn: release.wait(10)))
        for _ in range(_READ_THREADS)
    ]
    try:
        async with asyncio.timeout(2):
            assert await sqlite_store.get_task(tid(1)) == make_task(1)
            assert await sqlite_store.list_runs(tid(1)) == [make_run(1, 1)]
            assert await sqlite_store.get_worker(WorkerId("w-1")) == full_worker()
        assert not any(read.done() for read in long_reads)
    finally:
        release.set()
        assert await asyncio.gather(*long_reads) == [True] * _READ_THREADS


async def test_sqlite_point_reads_leave_no_snapshot_open(sqlite_store: SqliteStore) -> None:
    """A read left open would pin its snapshot: later reads would not see new commits and the
    WAL could never be reset, growing without end."""
    await sqlite_store.apply(ChangeSet(tasks=[make_task(1)], runs=[make_run(1, 1)]))
    assert await sqlite_store.get_task(tid(1)) == make_task(1)
    assert await sqlite_store.list_runs(tid(1)) == [make_run(1, 1)]
    assert await sqlite_store.get_task(tid(2)) is None
    conn = sqlite3.connect(sqlite_store.path)
    try:
        conn.execute("PRAGMA busy_timeout = 0")
        busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    assert (busy, frames) == (0, 0)  # every reader let go: the WAL was emptied
    await sqlite_store.apply(ChangeSet(tasks=[make_task(2)]))
    assert await sqlite_store.get_task(tid(2)) == make_task(2)


async def test_sqlite_open_that_cannot_read_stops_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = set(threading.enumerate())
    connect = sqlite3.connect

    def no_reading(database: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if "mode=ro" in str(database):
            raise sqlite3.OperationalError("unable to open database file")
        opened: sqlite3.Connection = connect(database, *args, **kwargs)
        return opened

    monkeypatch.setattr(sqlite3, "connect", no_reading)
    store = SqliteStore(tmp_path / "t.db")
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        await store.open()
    started = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert [name for name in started if name.startswith("taskrun-store")] == []
    monkeypatch.setattr(sqlite3, "connect", connect)  # readable again: the store opens
    await store.open()
    try:
        await store.apply(ChangeSet(tasks=[make_task(1)]))
        assert await store.get_task(tid(1)) == make_task(1)
    finally:
        await store.close()


class _BusyConnection:
    """What a read-only SQLite connection does while another process holds the file exclusively
    or recovers it after a crash: every statement fails with SQLITE_BUSY at once."""

    def __init__(self, code: int) -> None:
        self.code = code

    def execute(self, *_args: object) -> None:
        error = sqlite3.OperationalError("database is locked")
        error.sqlite_errorcode = self.code
        raise error

    def close(self) -> None:
        pass


@pytest.mark.parametrize("code", [sqlite3.SQLITE_BUSY, sqlite3.SQLITE_BUSY_RECOVERY])
async def test_sqlite_point_read_found_busy_is_read_in_the_pool(
    sqlite_store: SqliteStore, code: int
) -> None:
    await sqlite_store.apply(ChangeSet(tasks=[make_task(1)], runs=[make_run(1, 1)]))
    sqlite_store._point = _BusyConnection(code)  # type: ignore[assignment]
    assert await sqlite_store.get_task(tid(1)) == make_task(1)
    assert await sqlite_store.list_runs(tid(1)) == [make_run(1, 1)]


async def test_sqlite_point_read_fails_with_any_other_error(sqlite_store: SqliteStore) -> None:
    sqlite_store._point = _BusyConnection(sqlite3.SQLITE_IOERR)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError):
        await sqlite_store.get_task(tid(1))


# --- open_store ----------------------------------------------------------------------------------


async def test_open_store_memory() -> None:
    assert isinstance(open_store("memory"), MemoryStore)


async def test_open_store_sqlite_creates_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "t.db"
    store = open_store(f"sqlite:{path}")
    assert isinstance(store, SqliteStore)
    await store.open()
    await store.close()
    assert path.is_file()


async def test_open_store_postgresql_url() -> None:
    for url in ("postgresql://u@db.example:5433/taskrun", "postgres://u:secret@db/taskrun"):
        store = open_store(url)
        assert isinstance(store, PostgresStore)
        assert "secret" not in store.where


@pytest.mark.parametrize(
    "url", ["", "mysql://x", "postgresql://", "sqlite:", "sqlite::memory:", "Memory"]
)
def test_open_store_rejects_unknown_url(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported store url"):
        open_store(url)


async def test_sqlite_full_disk_fails_writes_cleanly_then_resumes(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", "1m") as small:
        store = SqliteStore(small / "t.db")
        await store.open()
        try:
            await store.apply(ChangeSet(tasks=[make_task(1)], runs=[make_run(1, 1)]))
            filler = fill(small)
            big = "x" * 200_000
            with pytest.raises(StoreUnavailable, match="database or disk is full"):
                for n in range(2, 50):
                    await store.apply(ChangeSet(tasks=[replace(make_task(n), input=big)]))
            with pytest.raises(StoreUnavailable):
                await store.resume()  # still full
            with pytest.raises(StoreUnavailable, match="refuses writes after a failed one"):
                await store.apply(ChangeSet(tasks=[make_task(99)]))
            filler.unlink()
            await store.resume()
            await store.apply(ChangeSet(tasks=[make_task(99)]))
            assert await store.get_task(tid(99)) is not None
            assert await store.get_task(tid(1)) == make_task(1)
        finally:
            await store.close()


async def test_sqlite_checkpoints_on_a_full_disk_break_nothing_and_resume_with_space(
    tmp_path: Path,
) -> None:
    """The checkpointer's own writes (copying the WAL back, the first write after it) fail
    while the disk is full: no commit is refused for it, nothing is lost, and it checkpoints
    again once there is room."""
    with small_filesystem(tmp_path / "small", "2m") as small:
        store = SqliteStore(small / "t.db")
        await store.open()
        try:
            big = "x" * 100_000
            for n in range(1, 4):  # WAL pages the database file has no room for yet
                await store.apply(ChangeSet(tasks=[replace(make_task(n), input=big)]))
            filler = fill(small)
            await asyncio.sleep(2.5)  # two checkpoint rounds on a full disk
            assert all([await store.get_task(tid(n)) for n in range(1, 4)])
            filler.unlink()
            await store.apply(ChangeSet(tasks=[make_task(9)]))  # never fenced
            conn = sqlite3.connect(store.path)
            try:
                for _ in range(100):
                    if conn.execute("SELECT count(*) FROM store_probe").fetchone()[0]:
                        break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("no complete checkpoint once the disk had room again")
            finally:
                conn.close()
            assert await store.get_task(tid(9)) is not None
        finally:
            await store.close()


# --- webhooks -------------------------------------------------------------------------


def make_webhook(n: int, **fields: object) -> Webhook:
    hook = Webhook(
        id=f"wh_{n:016d}",
        url=f"https://hooks.example/{n}",
        events=frozenset({WebhookEvent.TASK_COMPLETED, WebhookEvent.TASK_FAILED}),
        secret=new_secret(),
        created_at=T0 + timedelta(seconds=n),
        labels={"team": "ml"},
        agent="echo",
        schedule="nightly",
        description="to the channel",
        created_by="spiffe://taskrun/operator/admin",
    )
    return replace(hook, **fields)  # type: ignore[arg-type]


def make_delivery(n: int, webhook: Webhook, key: str = "", **fields: object) -> WebhookDelivery:
    delivery = WebhookDelivery(
        id=f"msg_{n:024d}",
        webhook_id=webhook.id,
        event=WebhookEvent.TASK_COMPLETED,
        event_key=key or f"tsk_{n}:completed",
        payload='{"type": "task.completed"}',
        created_at=T0 + timedelta(seconds=n),
        next_attempt_at=T0 + timedelta(seconds=100 - n),
    )
    return replace(delivery, **fields)  # type: ignore[arg-type]


async def test_webhooks_round_trip_and_a_taken_id_is_refused(store: Store) -> None:
    first, second = make_webhook(1), make_webhook(2, labels={}, agent="", schedule="")
    await store.add_webhook(second)
    await store.add_webhook(first)
    assert await store.list_webhooks() == [first, second]
    with pytest.raises(ValueError, match="already exists"):
        await store.add_webhook(make_webhook(1, url="https://other.example/"))
    assert await store.delete_webhook(first.id) is True
    assert await store.delete_webhook(first.id) is False
    assert await store.list_webhooks() == [second]


async def test_a_delivery_is_stored_once_per_webhook_and_event(store: Store) -> None:
    hook, other = make_webhook(1), make_webhook(2)
    await store.add_webhook(hook)
    await store.add_webhook(other)
    one = make_delivery(1, hook, key="tsk_1:completed")
    stored = await store.add_webhook_deliveries(
        [one, make_delivery(2, other, key="tsk_1:completed")]
    )
    assert [d.id for d in stored] == [one.id, make_delivery(2, other).id]
    again = await store.add_webhook_deliveries([make_delivery(3, hook, key="tsk_1:completed")])
    assert again == []
    orphan = make_delivery(4, make_webhook(9), key="tsk_4:completed")
    assert await store.add_webhook_deliveries([orphan]) == []
    assert await store.list_webhook_deliveries(hook.id) == [one]


async def test_pending_deliveries_come_by_next_attempt_and_leave_once_settled(store: Store) -> None:
    hook = make_webhook(1)
    await store.add_webhook(hook)
    deliveries = [make_delivery(n, hook) for n in (1, 2, 3)]
    await store.add_webhook_deliveries(deliveries)
    pending = await store.list_webhook_deliveries(pending=True)
    assert [d.id for d in pending] == [deliveries[2].id, deliveries[1].id, deliveries[0].id]
    done = replace(
        deliveries[2],
        status=DeliveryStatus.SUCCEEDED,
        attempts=3,
        last_status_code=204,
        last_error="",
        delivered_at=T0 + timedelta(hours=1),
    )
    await store.update_webhook_delivery(done)
    failed = replace(deliveries[1], attempts=1, last_status_code=500, last_error="HTTP 500")
    await store.update_webhook_delivery(failed)
    assert [d.id for d in await store.list_webhook_deliveries(hook.id, pending=True)] == [
        failed.id,
        deliveries[0].id,
    ]
    newest_first = await store.list_webhook_deliveries(hook.id, limit=2)
    assert newest_first == [done, failed]
    assert await store.delete_webhook(hook.id)
    assert await store.list_webhook_deliveries() == []


async def test_webhook_deliveries_survive_reopening_the_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = SqliteStore(path)
    await first.open()
    hook = make_webhook(1)
    await first.add_webhook(hook)
    await first.add_webhook_deliveries([make_delivery(1, hook)])
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.list_webhooks() == [hook]
        assert [d.id for d in await second.list_webhook_deliveries(pending=True)] == [
            make_delivery(1, hook).id
        ]
    finally:
        await second.close()


# --- conversations ------------------------------------------------------------------------------


def cid(n: int) -> ConversationId:
    return ConversationId(f"cnv_{n:026d}")


def make_conversation(n: int, **fields: object) -> Conversation:
    conversation = Conversation(
        id=cid(n),
        agent="anthropic",
        title=f"chat {n}",
        labels={"team": "a" if n % 2 else "b"},
        input='{"model": "claude-sonnet-5-5"}',
        policy=TaskPolicy(max_attempts=2, required_labels={"zone": "eu"}),
        created_at=T0 + timedelta(seconds=n),
        updated_at=T0 + timedelta(seconds=n),
    )
    for name, value in fields.items():
        setattr(conversation, name, value)
    return conversation


def make_turn(conversation: int, index: int, task: int, **fields: object) -> Turn:
    turn = Turn(
        conversation_id=cid(conversation),
        index=index,
        task_id=tid(task),
        message=f"message {index}",
        created_at=T0 + timedelta(seconds=index),
    )
    for name, value in fields.items():
        setattr(turn, name, value)
    return turn


async def test_conversation_with_every_field_and_its_turns_round_trip(store: Store) -> None:
    conversation = make_conversation(
        1,
        turns=2,
        usage=Usage(input_tokens=5, output_tokens=7, cost_usd=0.25, turns=2),
        session_id="sess-1",
        session_snapshot=b"\x00\x01zlib\xff",
        session_cost_usd=0.5,
        session_turn=3,
        summarized_through=1,
        summary="they said hello",
    )
    first = make_task(1, conversation_id=cid(1), turn=1, status=TaskStatus.FAILED)
    second = make_task(2, conversation_id=cid(1), turn=2)
    turns = [
        make_turn(
            1,
            1,
            1,
            status=TaskStatus.FAILED,
            error="overloaded",
            usage=Usage(input_tokens=5, cost_usd=0.1),
            finished_at=T0 + timedelta(seconds=9),
        ),
        make_turn(1, 2, 2, answer="hi", tools='[{"tool_use":"Read"}]'),
    ]
    # the turns come first in the change set: the store orders the tables, not the caller
    await store.apply(
        ChangeSet(tasks=[first, second], turns=turns[::-1], conversations=[conversation])
    )
    assert await store.get_conversation(cid(1)) == conversation
    assert await store.list_turns(cid(1)) == turns
    assert await store.get_task(tid(2)) == second
    assert await store.get_conversation(cid(9)) is None
    assert await store.list_turns(cid(9)) == []


async def test_turn_upsert_replaces_it(store: Store) -> None:
    await store.apply(
        ChangeSet(
            tasks=[make_task(1)], conversations=[make_conversation(1)], turns=[make_turn(1, 1, 1)]
        )
    )
    done = make_turn(1, 1, 1, status=TaskStatus.COMPLETED, answer="42", usage=Usage(cost_usd=1.5))
    await store.apply(ChangeSet(turns=[done]))
    assert await store.list_turns(cid(1)) == [done]


async def test_a_turn_needs_its_conversation_and_its_task(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.apply(ChangeSet(tasks=[make_task(1)], turns=[make_turn(1, 1, 1)]))
    await store.resume()
    with pytest.raises(ValueError):
        await store.apply(
            ChangeSet(conversations=[make_conversation(1)], turns=[make_turn(1, 1, 7)])
        )
    await store.resume()
    assert await store.get_conversation(cid(1)) is None  # all or nothing


async def test_deleting_a_conversation_deletes_its_turns_not_its_tasks(store: Store) -> None:
    await store.apply(
        ChangeSet(
            tasks=[make_task(1, conversation_id=cid(1), turn=1)],
            conversations=[make_conversation(1), make_conversation(2)],
            turns=[make_turn(1, 1, 1)],
        )
    )
    await store.apply(ChangeSet(deleted_conversations=[cid(1), cid(5)]))
    assert await store.get_conversation(cid(1)) is None
    assert await store.list_turns(cid(1)) == []
    assert (await store.get_task(tid(1))) is not None
    assert [c.id for c in await store.list_conversations(ConversationQuery())] == [cid(2)]


async def test_late_usage_adds_to_the_stored_run_task_turn_and_conversation(store: Store) -> None:
    before = Usage(input_tokens=10, output_tokens=2, cost_usd=0.5, turns=1)
    await store.apply(
        ChangeSet(
            tasks=[make_task(1, conversation_id=cid(1), turn=2, usage=replace(before))],
            runs=[make_run(1, 1, status=RunStatus.CANCELLED)],
            conversations=[make_conversation(1, usage=replace(before))],
            turns=[make_turn(1, 2, 1, usage=replace(before))],
        )
    )
    spent = Usage(input_tokens=7, output_tokens=1, cost_usd=0.25, turns=1)
    late = LateUsage(rid(1), tid(1), spent, conversation_id=cid(1), turn=2)
    await store.apply(ChangeSet(late_usage=[late]))
    total = Usage(input_tokens=17, output_tokens=3, cost_usd=0.75, turns=2)
    assert (await store.get_run(rid(1))).usage == spent  # type: ignore[union-attr]
    assert (await store.get_task(tid(1))).usage == total  # type: ignore[union-attr]
    assert (await store.get_conversation(cid(1))).usage == total  # type: ignore[union-attr]
    assert [t.usage for t in await store.list_turns(cid(1))] == [total]

    # a conversation deleted meanwhile stays deleted; the task still counts what it spent
    await store.apply(ChangeSet(deleted_conversations=[cid(1)]))
    await store.apply(ChangeSet(late_usage=[late]))
    assert await store.get_conversation(cid(1)) is None
    assert await store.list_turns(cid(1)) == []
    assert (await store.get_task(tid(1))).usage.input_tokens == 24  # type: ignore[union-attr]


async def test_list_conversations_newest_first_with_filters_and_pages(store: Store) -> None:
    await store.apply(
        ChangeSet(
            conversations=[
                make_conversation(n, agent="claude_code" if n > 3 else "anthropic")
                for n in range(1, 6)
            ]
        )
    )

    async def ids(**query: Any) -> list[ConversationId]:
        return [c.id for c in await store.list_conversations(ConversationQuery(**query))]

    assert await ids() == [cid(5), cid(4), cid(3), cid(2), cid(1)]
    assert await ids(limit=2) == [cid(5), cid(4)]
    assert await ids(limit=2, before=cid(4)) == [cid(3), cid(2)]
    assert await ids(agent="claude_code") == [cid(5), cid(4)]
    assert await ids(labels=(("team", "a"),)) == [cid(5), cid(3), cid(1)]
    with pytest.raises(ValueError):
        await ids(limit=0)


# --- workflows ----------------------------------------------------------------------


def make_workflow(name: str, version: int) -> Workflow:
    return Workflow(
        name=name,
        version=version,
        definition={"name": name, "steps": {"a": {"type": "wait", "duration": version}}},
        created_at=T0 + timedelta(seconds=version),
        description=f"v{version}",
    )


def make_workflow_run(n: int, workflow: Workflow, key: str = "") -> WorkflowRun:
    run = new_run(f"wfr_{n:04d}", workflow, {"n": n, "nested": [1, {"x": None}]}, T0, key)
    run.created_at = T0 + timedelta(seconds=n)
    return run


async def test_workflow_versions_round_trip_and_the_newest_is_listed(store: Store) -> None:
    v1, v2, other = make_workflow("brief", 1), make_workflow("brief", 2), make_workflow("a", 1)
    await store.apply(ChangeSet(workflows=[v1, other]))
    await store.apply(ChangeSet(workflows=[v2]))
    assert await store.get_workflow("brief") == v2
    assert await store.get_workflow("brief", 1) == v1
    assert await store.get_workflow("brief", 3) is None
    assert await store.get_workflow("nope") is None
    assert await store.list_workflows() == [other, v2]


async def test_a_stored_workflow_version_is_never_rewritten(store: Store) -> None:
    await store.apply(ChangeSet(workflows=[make_workflow("brief", 1)]))
    changed = make_workflow("brief", 1)
    changed.description = "rewritten"
    with pytest.raises((ValueError, sqlite3.IntegrityError)):
        await store.apply(ChangeSet(workflows=[changed]))
    await store.resume()
    assert (await store.get_workflow("brief", 1)) == make_workflow("brief", 1)


async def test_workflow_runs_round_trip_with_their_steps(store: Store) -> None:
    workflow = make_workflow("brief", 1)
    run = make_workflow_run(1, workflow, key="k1")
    step = run.steps["a"]
    step.status, step.result, step.started_at = StepStatus.WAITING, {"r": [1, 2]}, T0
    step.due_at, step.branch, step.choices = T0 + timedelta(hours=1), "then", ["x", "y"]
    await store.apply(ChangeSet(workflows=[workflow], workflow_runs=[run]))
    assert await store.get_workflow_run(run.id) == run
    assert await store.get_workflow_run_by_key("k1") == run
    assert await store.get_workflow_run_by_key("k2") is None
    done = make_workflow_run(2, workflow)
    done.status, done.finished_at, done.error = WorkflowRunStatus.FAILED, T0, "step 'a': boom"
    await store.apply(ChangeSet(workflow_runs=[done]))
    assert [r.id for r in await store.list_workflow_runs()] == [done.id, run.id]
    assert [r.id for r in await store.list_workflow_runs(unfinished=True)] == [run.id]
    assert [r.id for r in await store.list_workflow_runs(limit=1)] == [done.id]
    assert await store.list_workflow_runs("other") == []
    after_done = await store.list_workflow_runs(before=(done.created_at, done.id))
    assert [r.id for r in after_done] == [run.id]
    tie = make_workflow_run(3, workflow)  # created in the same microsecond: ordered by id
    tie.created_at = done.created_at
    await store.apply(ChangeSet(workflow_runs=[tie]))
    assert [r.id for r in await store.list_workflow_runs(before=(tie.created_at, tie.id))] == [
        done.id,
        run.id,
    ]
    assert await store.list_workflow_runs(before=(run.created_at, run.id)) == []
    step.status = StepStatus.COMPLETED  # an upsert replaces the steps' state
    await store.apply(ChangeSet(workflow_runs=[run]))
    stored = await store.get_workflow_run(run.id)
    assert stored is not None and stored.steps["a"].status is StepStatus.COMPLETED


async def test_a_workflow_run_needs_its_workflow_and_a_free_key(store: Store) -> None:
    workflow = make_workflow("brief", 1)
    with pytest.raises((ValueError, sqlite3.IntegrityError)):
        await store.apply(ChangeSet(workflow_runs=[make_workflow_run(1, workflow)]))
    await store.resume()
    await store.apply(
        ChangeSet(workflows=[workflow], workflow_runs=[make_workflow_run(1, workflow, "k")])
    )
    with pytest.raises((ValueError, sqlite3.IntegrityError)):
        await store.apply(ChangeSet(workflow_runs=[make_workflow_run(2, workflow, "k")]))
    await store.resume()
    assert [r.id for r in await store.list_workflow_runs()] == ["wfr_0001"]


async def test_workflow_runs_survive_reopening_the_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    workflow = make_workflow("brief", 1)
    run = make_workflow_run(1, workflow)
    first = SqliteStore(path)
    await first.open()
    await first.apply(ChangeSet(workflows=[workflow], workflow_runs=[run]))
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.get_workflow_run(run.id) == run
        assert await second.list_workflows() == [workflow]
    finally:
        await second.close()


async def test_sqlite_lone_and_grouped_change_sets_are_durable_before_they_resolve_and_in_order(
    tmp_path: Path,
) -> None:
    # A change set submitted alone commits at once on the caller's thread; one submitted in a
    # burst goes to the writer thread's group commit. Either way its future resolves only once
    # a fresh reader sees it, and the last one submitted wins.
    path = tmp_path / "t.db"
    store = SqliteStore(path)
    await store.open()
    reader = sqlite3.connect(path)
    seen_when_resolved: list[tuple[int, int]] = []

    def check(version: int, _: asyncio.Future[None]) -> None:
        row = reader.execute("SELECT attempts FROM tasks WHERE id = ?", (tid(1),)).fetchone()
        seen_when_resolved.append((version, row[0]))

    try:
        version = 0
        for burst in [1, 5, 1, 1, 40, 1, 3, 1, 200, 1]:
            futures = []
            for _ in range(burst):
                version += 1
                future = store.submit(ChangeSet(tasks=[make_task(1, attempts=version)]))
                future.add_done_callback(functools.partial(check, version))
                futures.append(future)
            await asyncio.gather(*futures)
        assert (await store.get_task(tid(1))) == make_task(1, attempts=version)
        assert len(seen_when_resolved) == version
        # committed in order: when version v resolved, the store held v or a later one
        assert all(stored >= v for v, stored in seen_when_resolved)
        assert store.commits < version  # the bursts were grouped
    finally:
        reader.close()
        await store.close()


async def test_sqlite_a_lone_change_set_that_fails_fences_the_next_until_resumed(
    sqlite_store: SqliteStore,
) -> None:
    bad = ChangeSet(tasks=[make_task(500)], runs=[make_run(500, 999)])  # its run's task is missing
    with pytest.raises(ValueError):
        await sqlite_store.apply(bad)
    with pytest.raises(StoreUnavailable):
        await sqlite_store.apply(ChangeSet(tasks=[make_task(1)]))
    assert await sqlite_store.get_task(tid(500)) is None
    await sqlite_store.resume()
    await sqlite_store.apply(ChangeSet(tasks=[make_task(1)]))
    assert await sqlite_store.get_task(tid(1)) == make_task(1)
