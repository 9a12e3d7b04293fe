"""`taskrun store copy`: everything a SQLite store holds arrives in PostgreSQL, equal."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from taskrun.controlplane.store import SqliteStore
from taskrun.controlplane.store.copy import DestinationNotEmpty, copy_store
from taskrun.controlplane.store.postgres import PostgresStore
from taskrun.core.access import AuditQuery, Scope
from taskrun.core.models import OutputChunk
from taskrun.core.status import RunStatus, TaskStatus
from taskrun.core.store import ChangeSet, ConversationQuery, LoggedEvent, Store, TaskQuery
from taskrun.v1 import events_pb2 as epb
from tests.unit.test_store_contract import (
    T0,
    audit,
    chunk,
    full_bootstrap,
    full_run,
    full_schedule,
    full_task,
    full_worker,
    logged,
    make_api_token,
    make_conversation,
    make_delivery,
    make_run,
    make_schedule,
    make_task,
    make_turn,
    make_webhook,
    make_workflow,
    make_workflow_run,
    rid,
    stored,
)


async def seed(store: SqliteStore) -> None:
    """30 tasks (task 7 with every field, two with two attempts), a run with 300 chunks, workers,
    schedules, tokens, and 12 audit events of which retention keeps the last 5 (ids 8..12)."""
    tasks = [make_task(n, labels={"n": str(n)}) for n in range(1, 31)]
    runs = [make_run(n, n) for n in range(1, 31)]
    runs += [make_run(100 + n, n, attempt=2, status=RunStatus.RUNNING) for n in (3, 4)]
    tasks[2] = replace(tasks[2], status=TaskStatus.RUNNING, attempts=2)
    await store.apply(ChangeSet(tasks=[*tasks, full_task()], runs=[*runs, full_run()]))
    await store.apply(ChangeSet(chunks=[chunk(1, s) for s in range(1, 301)]))
    await store.apply(ChangeSet(chunks=[chunk(n, 1) for n in range(2, 31)]))
    await store.apply(ChangeSet(chunks=[chunk(103, s, attempt=2) for s in (1, 2)]))
    await store.apply(
        ChangeSet(
            workers=[full_worker("w-1"), full_worker("w-2")],
            schedules=[full_schedule(), make_schedule()],
            bootstrap_tokens=[full_bootstrap()],
            api_tokens=[make_api_token(1, scopes=frozenset(Scope), expires_at=T0)],
            audit_events=[audit(n) for n in range(1, 13)],
        )
    )
    # conversations (turns are tasks 1 and 2), workflows in two versions with runs, webhooks
    conversations = [make_conversation(n, session_snapshot=b"\x00zlib\xff") for n in (1, 2)]
    workflows = [make_workflow("brief", 1), make_workflow("brief", 2), make_workflow("a", 1)]
    await store.apply(
        ChangeSet(
            conversations=conversations,
            turns=[make_turn(1, 1, 1), make_turn(1, 2, 2)],
            workflows=workflows,
            workflow_runs=[
                make_workflow_run(1, workflows[0], key="k1"),
                make_workflow_run(2, workflows[1]),
            ],
        )
    )
    hook = make_webhook(1)
    await store.add_webhook(hook)
    await store.add_webhook_deliveries([make_delivery(n, hook) for n in (1, 2)])
    # the event log: changes in their compact form and serialized events, over several pages
    task, run = full_task(), full_run()
    stamp = int(T0.timestamp() * 1_000_000)
    await store.apply(
        ChangeSet(
            tasks=[task],
            runs=[run],
            events=[
                LoggedEvent(
                    1, epb.EVENT_KIND_RUN_CHANGED, run.task_id, "", subject=run, time=stamp
                ),
                LoggedEvent(2, epb.EVENT_KIND_TASK_CHANGED, task.id, "", subject=task, time=stamp),
                *(logged(n) for n in range(3, 80)),
            ],
        )
    )


async def everything(store: Store) -> dict[str, object]:
    tasks = []
    before = None
    while True:
        page = await store.list_tasks(TaskQuery(limit=7, before=before))
        tasks.extend(page.tasks)
        if page.next_before is None:
            break
        before = page.next_before
    runs = {t.id: await store.list_runs(t.id) for t in tasks}
    output: dict[str, list[OutputChunk]] = {}
    for task_runs in runs.values():
        for run in task_runs:
            output[run.id] = await store.read_output([run.id])
    return {
        "tasks": tasks,
        "runs": runs,
        "output": output,
        "workers": await store.list_workers(),
        "schedules": await store.list_schedules(),
        "bootstrap": await store.list_bootstrap_tokens(),
        "api": await store.list_api_tokens(),
        "conversations": [
            (c, await store.list_turns(c.id))
            for c in await store.list_conversations(ConversationQuery(limit=100))
        ],
        "workflows": [
            await store.get_workflow(w.name, v)
            for w in await store.list_workflows()
            for v in range(1, w.version + 1)
        ],
        "workflow_runs": await store.list_workflow_runs(limit=100),
        "webhooks": await store.list_webhooks(),
        "deliveries": await store.list_webhook_deliveries(limit=100),
        "events": await store.read_events(0, limit=1000),
        "event_positions": await store.event_positions(),
    }


async def test_a_sqlite_store_is_copied_into_postgresql_whole(
    tmp_path: Path, postgres_url: str
) -> None:
    source = SqliteStore(tmp_path / "t.db", audit_retention=5)
    destination = PostgresStore(postgres_url)
    await source.open()
    await destination.open()
    try:
        await seed(source)
        counts = await copy_store(source, destination, batch=7)  # several pages of everything
        assert (counts.tasks, counts.runs, counts.output_chunks) == (30, 33, 331)
        assert (counts.workers, counts.schedules, counts.bootstrap_tokens) == (2, 2, 1)
        assert (counts.api_tokens, counts.audit_events) == (1, 5)
        assert (counts.conversations, counts.turns) == (2, 2)
        assert (counts.workflows, counts.workflow_runs) == (3, 2)
        assert (counts.webhooks, counts.webhook_deliveries) == (1, 2)
        assert counts.events == 79
        copied, original = await everything(destination), await everything(source)
        assert copied == original
        assert copied["event_positions"] == (1, 79)
        assert len(copied["output"][rid(1)]) == 300  # type: ignore[index]
        assert await destination.list_unfinished_runs() == await source.list_unfinished_runs()
        # audit events: same order and contents, numbered again from 1
        assert await destination.list_audit_events(AuditQuery()) == [
            stored(audit(n), n - 7) for n in range(12, 7, -1)
        ]
        assert [e.id for e in await source.list_audit_events(AuditQuery())] == [12, 11, 10, 9, 8]
        # the copy is a working store: the numbering and the key index go on
        await destination.apply(ChangeSet(audit_events=[audit(13)]))
        newest = await destination.list_audit_events(AuditQuery(limit=1))
        assert newest[0].id == 6
        assert await destination.get_task_by_idempotency_key("key-7") == full_task()
    finally:
        await source.close()
        await destination.close()


async def test_a_destination_that_holds_anything_is_refused(
    tmp_path: Path, postgres_url: str
) -> None:
    source = SqliteStore(tmp_path / "t.db")
    destination = PostgresStore(postgres_url)
    await source.open()
    await destination.open()
    try:
        await source.apply(ChangeSet(tasks=[make_task(1)]))
        await destination.apply(
            ChangeSet(schedules=[make_schedule(created_at=T0 - timedelta(days=1))])
        )
        with pytest.raises(DestinationNotEmpty, match="already holds schedules"):
            await copy_store(source, destination)
        assert (await destination.list_tasks(TaskQuery())).tasks == []
        await destination.apply(ChangeSet(deleted_schedules=["nightly"]))
        assert not await destination.list_schedules()
        await destination.apply(ChangeSet(events=[logged(1)]))  # an event log alone
        with pytest.raises(DestinationNotEmpty, match="already holds events"):
            await copy_store(source, destination)
    finally:
        await source.close()
        await destination.close()


async def test_store_copy_command(tmp_path: Path, postgres_url: str) -> None:
    path = tmp_path / "taskrun.db"
    source = SqliteStore(path)
    await source.open()
    await source.apply(ChangeSet(tasks=[full_task()], runs=[full_run()], workers=[full_worker()]))
    await source.close()

    code, out, _ = await taskrun("store", "copy", f"sqlite:{path}", postgres_url)
    assert code == 0
    assert "copied 1 tasks, 1 runs, 0 output chunks, 1 workers" in out
    check = PostgresStore(postgres_url)
    await check.open()
    try:
        assert (await check.list_tasks(TaskQuery())).tasks == [full_task()]
    finally:
        await check.close()

    code, _, err = await taskrun("store", "copy", f"sqlite:{path}", postgres_url)
    assert (code, err.splitlines()[-1]) == (
        1,
        "error: the destination store already holds tasks: copy into an empty one",
    )
    code, _, err = await taskrun("store", "copy", f"sqlite:{tmp_path / 'none.db'}", postgres_url)
    assert code == 2
    assert "does not exist" in err


async def taskrun(*argv: str) -> tuple[int, str, str]:
    """The `taskrun` command in its own process: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskrun.cli.main",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
