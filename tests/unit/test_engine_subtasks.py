"""The engine's run credentials (a worker attached without a stream: its assignments are read
from its session) and the tree helpers of subtasks.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from taskrun.controlplane import subtasks
from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.store.memory import MemoryStore
from taskrun.core.access import hash_secret
from taskrun.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from taskrun.core.ids import TaskId, WorkerId
from taskrun.core.models import AgentSpec, Task, TaskPolicy, TaskSpec, Worker, utcnow
from taskrun.core.status import TaskStatus
from taskrun.v1 import workers_pb2 as wpb


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, MemoryStore]]:
    store = MemoryStore()
    await store.open()
    e = Engine(store, ServerConfig(store="memory"))
    e.mcp_url = "https://cp.example:8443/mcp"
    await e.start()
    yield e, store
    await e.stop()


def attach(e: Engine, held: tuple[str, ...] = ()) -> list[wpb.RunAssignment]:
    worker = Worker(WorkerId("w-1"), agents=(AgentSpec("echo"),), max_concurrent_runs=4)
    hello = wpb.WorkerHello(worker_id="w-1", held_runs=[wpb.HeldRun(run_id=r) for r in held])
    session = e.attach(worker, hello)
    return session._assignments


async def until(predicate, within: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_copy_sent_again_carries_the_same_credential_and_it_dies_with_the_run(
    engine: tuple[Engine, MemoryStore],
) -> None:
    e, store = engine
    sent = attach(e)
    spec = TaskSpec("echo", "{}", policy=TaskPolicy(allow_subtasks=True))
    ((task, _),) = await e.create_tasks([spec])
    await until(lambda: bool(sent))
    first = sent[0]
    assert first.mcp_url == e.mcp_url and first.mcp_token.startswith("trr_")
    again = attach(e)  # the worker came back without it: sent again
    await until(lambda: bool(again))
    assert again[0].mcp_token == first.mcp_token
    grant = e.run_grant(first.mcp_token)
    assert grant is not None and grant[1].id == task.id
    await e.flush()
    stored = await store.get_run(grant[0].id)
    assert stored is not None
    assert stored.credential_hash == hash_secret(first.mcp_token.split(".", 1)[1])
    assert e.run_grant(first.mcp_token[:-1] + ("A" if first.mcp_token[-1] != "A" else "B")) is None
    await e.cancel_task(task.id, "done")
    assert e.run_grant(first.mcp_token) is None


async def test_a_task_without_allow_subtasks_gets_no_credential(
    engine: tuple[Engine, MemoryStore],
) -> None:
    e, _ = engine
    sent = attach(e)
    await e.create_tasks([TaskSpec("echo", "{}")])
    await until(lambda: bool(sent))
    assert sent[0].mcp_url == "" and sent[0].mcp_token == ""


def task(n: int, **fields: object) -> Task:
    now = utcnow()
    base = Task(TaskId(f"tsk_{n}"), "echo", "{}", {}, TaskPolicy(), TaskStatus.RUNNING, now, now)
    return replace(base, **fields)  # type: ignore[arg-type]


def test_place_checks_parent_depth_count_and_cost_before_anything_is_created() -> None:
    root = task(1, policy=TaskPolicy(allow_subtasks=True))
    deep = task(2, policy=TaskPolicy(allow_subtasks=True), root_task_id=root.id, depth=3)
    plain = task(3)
    parents = {t.id: t for t in (root, deep, plain)}
    tree = subtasks.Tree(root.id, max_subtasks=2, budget_usd=1.0, created=1)
    trees = {root.id: tree}

    def spec(parent: Task, **policy: object) -> TaskSpec:
        return TaskSpec("echo", "{}", policy=TaskPolicy(**policy), parent_task_id=parent.id)  # type: ignore[arg-type]

    (placed,) = subtasks.place([spec(root)], parents, trees, 3)
    assert placed == subtasks.Placement(root.id, root.id, 1)
    with pytest.raises(ResourceExhausted, match=r"at most 2 sub-tasks .* and has 2"):
        subtasks.place([spec(root), spec(root)], parents, trees, 3)  # the batch counts too
    with pytest.raises(ResourceExhausted, match="at most 3 levels"):
        subtasks.place([spec(deep)], parents, trees, 3)
    with pytest.raises(FailedPrecondition, match="does not allow sub-tasks"):
        subtasks.place([spec(plain)], parents, trees, 3)
    with pytest.raises(InvalidArgument) as own_budget:
        subtasks.place([spec(root, max_subtasks=5)], parents, trees, 3)
    assert own_budget.value.field == "policy.max_subtasks"
    tree.spent_usd = 1.0
    with pytest.raises(ResourceExhausted, match=r"spent \$1.0000 of their budget of \$1"):
        subtasks.place([spec(root)], parents, trees, 3)
    gone = TaskSpec("echo", "{}", parent_task_id=TaskId("tsk_9"))
    with pytest.raises(FailedPrecondition, match="has ended"):
        subtasks.place([gone], parents, trees, 3)


def test_below_follows_finished_links_to_every_descendant() -> None:
    parents = {
        TaskId("b"): TaskId("a"),
        TaskId("c"): TaskId("b"),
        TaskId("d"): TaskId("c"),
        TaskId("e"): TaskId("x"),
        TaskId("a"): None,
    }
    assert subtasks.below(TaskId("a"), parents) == ["b", "c", "d"]
    assert subtasks.below(TaskId("d"), parents) == []
