"""The engine after a failed commit: refuses writes, then reloads its view from the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.store.memory import MemoryStore
from taskrun.core.errors import Unavailable
from taskrun.core.models import TaskPolicy, TaskSpec
from taskrun.core.status import TaskStatus
from taskrun.core.store import TaskQuery


def spec(key: str = "", text: str = "x") -> TaskSpec:
    return TaskSpec(
        agent="echo", input=f'{{"text": "{text}"}}', policy=TaskPolicy(idempotency_key=key)
    )


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, MemoryStore]]:
    store = MemoryStore()
    await store.open()
    e = Engine(store, ServerConfig(store="memory"))
    await e.start()
    yield e, store
    await e.stop()


async def until(predicate, within: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_failed_commit_is_unavailable_and_leaves_the_view_as_the_store_is(
    engine: tuple[Engine, MemoryStore],
) -> None:
    e, store = engine
    [(kept, _)] = await e.create_tasks([spec("a")])
    health: list[bool] = []
    e.on_health = health.append
    store.fail_writes("disk full")
    with pytest.raises(Unavailable, match="the store cannot write: disk full"):
        await e.create_tasks([spec("b")])
    assert health == [False]
    with pytest.raises(Unavailable):  # refused at once while recovering
        await e.cancel_task(kept.id, "")
    store.fail_writes(None)
    await until(lambda: health == [False, True])
    stored = (await store.list_tasks(TaskQuery(limit=100))).tasks
    assert [t.id for t in stored] == [kept.id]
    assert set(e.tasks) == {kept.id}  # "b" left no trace in the view
    assert set(e.runs) == {kept.current_run_id}
    [(again, created)] = await e.create_tasks([spec("b")])
    assert created and again.status is TaskStatus.PENDING
    assert e.recoveries == 1


async def test_a_second_request_with_the_same_key_waits_for_the_first_commit(
    engine: tuple[Engine, MemoryStore],
) -> None:
    e, _ = engine
    first, second = await asyncio.gather(e.create_tasks([spec("k")]), e.create_tasks([spec("k")]))
    assert first[0][1] is True and second[0][1] is False
    assert first[0][0].id == second[0][0].id


class GatedStore(MemoryStore):
    """Commits wait for `release()`; then they succeed or fail as MemoryStore decides."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    def submit(self, changes):  # type: ignore[no-untyped-def]
        inner = super().submit
        gate = self.gate

        async def later() -> None:
            await gate.wait()
            await inner(changes)

        return asyncio.ensure_future(later())


async def test_a_key_whose_first_commit_fails_is_not_answered_with_that_task() -> None:
    store = GatedStore()
    e = Engine(store, ServerConfig(store="memory"))
    store.gate.set()
    await e.start()
    store.gate.clear()
    first = asyncio.ensure_future(e.create_tasks([spec("k")]))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(e.create_tasks([spec("k")]))
    await asyncio.sleep(0.01)
    assert not second.done()  # waits for the first commit instead of answering from memory
    store.fail_writes("disk full")
    store.gate.set()
    for call in (first, second):
        with pytest.raises(Unavailable):
            await call
    store.fail_writes(None)
    await until(lambda: not e.store_error)
    assert await store.get_task_by_idempotency_key("k") is None
    await e.stop()


async def test_a_created_task_is_answered_as_its_commit_stored_it_not_as_the_view_is() -> None:
    store = GatedStore()
    store.gate.set()
    e = Engine(store, ServerConfig(store="memory"))
    await e.start()
    store.gate.clear()  # the creation is in the view; its commit waits
    creating = asyncio.ensure_future(e.create_tasks([spec("")]))
    await asyncio.sleep(0.01)
    [task_id] = list(e.tasks)
    cancelling = asyncio.ensure_future(e.cancel_task(task_id, "changed my mind"))
    await asyncio.sleep(0.01)  # the view now says CANCELLED; neither commit is durable
    store.gate.set()
    [(created, new)] = await creating
    assert new and created.status is TaskStatus.PENDING  # what the creating commit stored
    assert (await cancelling).status is TaskStatus.CANCELLED
    await e.stop()
