"""The engine's conversations (no worker: turns wait in the queue): terminal is terminal, one turn
at a time, and the invariant of the engine (nothing visible before it is durable; a failed commit
leaves the view as the store is)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.store.memory import MemoryStore
from taskrun.core.errors import FailedPrecondition, NotFound, Unavailable
from taskrun.core.ids import ConversationId
from taskrun.core.models import TaskSpec
from taskrun.core.status import TaskStatus, task_can_move
from tests.unit.test_engine_recovery import GatedStore


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


def test_no_terminal_task_status_can_move() -> None:
    for status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED):
        assert not any(task_can_move(status, other) for other in TaskStatus)


async def test_a_turn_is_a_task_and_only_one_runs_at_a_time(
    engine: tuple[Engine, MemoryStore],
) -> None:
    e, store = engine
    conversation, turn, task = await e.create_conversation("anthropic", "hello", options='{"a":1}')
    assert task.conversation_id == conversation.id and task.turn == turn.index == 1
    assert task.input == '{"a": 1, "prompt": "hello"}'
    assert (await store.get_task(task.id)) is not None  # durable on return
    assert [t.task_id for t in await store.list_turns(conversation.id)] == [task.id]
    with pytest.raises(FailedPrecondition, match=f"task {task.id}"):
        await e.send_message(conversation.id, "again")
    with pytest.raises(FailedPrecondition):
        await e.delete_conversation(conversation.id)
    await e.cancel_task(task.id, "changed my mind")
    [ended] = await store.list_turns(conversation.id)
    assert ended.status is TaskStatus.CANCELLED and "changed my mind" in ended.error
    _, second, task2 = await e.send_message(conversation.id, "again")
    assert second.index == 2 and task2.id != task.id
    context = e.contexts[task2.id]
    assert [(m.role, m.text) for m in context.history] == [
        ("user", "hello"),
        ("assistant", "(this turn cancelled: cancelled: changed my mind)"),
    ]
    assert (await store.get_task(task.id)).status is TaskStatus.CANCELLED  # type: ignore[union-attr]
    with pytest.raises(NotFound, match="conversation_id"):
        await e.send_message(ConversationId("cnv_missing"), "x")


async def test_a_failed_commit_leaves_no_turn_and_the_conversation_goes_on_after_recovery(
    engine: tuple[Engine, MemoryStore],
) -> None:
    e, store = engine
    conversation, _, first = await e.create_conversation("anthropic", "one")
    await e.cancel_task(first.id, "")
    store.fail_writes("disk full")
    with pytest.raises(Unavailable, match="disk full"):
        await e.send_message(conversation.id, "two")
    with pytest.raises(Unavailable):  # refused at once while recovering
        await e.create_conversation("anthropic", "other")
    store.fail_writes(None)
    await until(lambda: not e.store_error)
    assert [t.index for t in await store.list_turns(conversation.id)] == [1]
    assert (await store.get_conversation(conversation.id)).turns == 1  # type: ignore[union-attr]
    assert not e.turns and not e.conversations and not e.contexts  # as the store is
    _, turn, _ = await e.send_message(conversation.id, "two")
    assert turn.index == 2


async def test_continuing_a_lone_task_makes_it_the_first_turn_and_leaves_it_as_it_was(
    engine: tuple[Engine, MemoryStore],
) -> None:
    e, store = engine
    [(lone, _)] = await e.create_tasks(
        [TaskSpec(agent="anthropic", input='{"prompt": "hi", "max_tokens": 9}')]
    )
    with pytest.raises(FailedPrecondition, match="once it ended"):
        await e.continue_task(lone.id, "more")
    await e.cancel_task(lone.id, "")
    before = await store.get_task(lone.id)
    nxt = await e.continue_task(lone.id, "more")
    after = await store.get_task(lone.id)
    assert before is not None and after is not None
    assert after.status is before.status is TaskStatus.CANCELLED
    assert after.updated_at == before.updated_at and after.attempts == before.attempts
    assert after.conversation_id == nxt.conversation_id and after.turn == 1 and nxt.turn == 2
    assert nxt.input == '{"max_tokens": 9, "prompt": "more"}'
    turns = await store.list_turns(nxt.conversation_id)  # type: ignore[arg-type]
    assert [(t.index, t.message, t.status) for t in turns] == [
        (1, "hi", TaskStatus.CANCELLED),
        (2, "more", TaskStatus.PENDING),
    ]


async def test_two_messages_at_once_make_one_turn_and_one_refusal(
    engine: tuple[Engine, MemoryStore],
) -> None:
    e, store = engine
    conversation, _, first = await e.create_conversation("anthropic", "one")
    await e.cancel_task(first.id, "")
    results = await asyncio.gather(
        e.send_message(conversation.id, "two"),
        e.send_message(conversation.id, "two, again"),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["FailedPrecondition", "tuple"]
    assert [t.index for t in await store.list_turns(conversation.id)] == [1, 2]


async def test_continuing_one_lone_task_twice_at_once_makes_one_conversation(
    engine: tuple[Engine, MemoryStore],
) -> None:
    e, store = engine
    [(lone, _)] = await e.create_tasks([TaskSpec(agent="anthropic", input='{"prompt": "hi"}')])
    await e.cancel_task(lone.id, "")
    results = await asyncio.gather(
        e.continue_task(lone.id, "a"), e.continue_task(lone.id, "b"), return_exceptions=True
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    assert len(made) == 1
    assert sum(isinstance(r, FailedPrecondition) for r in results) == 1
    after = await store.get_task(lone.id)
    assert after is not None and after.conversation_id == made[0].conversation_id


async def test_a_message_right_after_a_turn_ended_sees_that_turn_even_mid_commit() -> None:
    store = GatedStore()
    store.gate.set()
    e = Engine(store, ServerConfig(store="memory"))
    await e.start()
    conversation, _, first = await e.create_conversation("anthropic", "one")
    store.gate.clear()  # the end of turn 1 is in the view, its commit not yet in the store
    cancelling = asyncio.ensure_future(e.cancel_task(first.id, "stop"))
    await asyncio.sleep(0.01)
    assert first.id not in e.turns and not cancelling.done()
    sending = asyncio.ensure_future(e.send_message(conversation.id, "two"))
    await asyncio.sleep(0.01)
    assert not sending.done()  # waits for the commit instead of reading a stale store
    store.gate.set()
    await cancelling
    _, turn, task = await sending
    assert turn.index == 2
    assert [m.text for m in e.contexts[task.id].history][1].startswith("(this turn cancelled")
    await e.stop()


async def test_a_transcript_too_long_for_one_message_is_cut_oldest_first() -> None:
    store = MemoryStore()
    e = Engine(store, ServerConfig(store="memory", max_message_bytes=64 * 1024))
    await e.start()
    conversation, _, first = await e.create_conversation("anthropic", "a" * 30_000)
    for n in range(3):
        await e.cancel_task(first.id, "")
        _, _, first = await e.send_message(conversation.id, str(n) + "b" * 30_000)
    task = e.tasks[first.id]
    run = e.runs[task.current_run_id]  # type: ignore[index]
    assignment = e._assignment(task, run)
    assert assignment.ByteSize() <= 64 * 1024
    history = assignment.conversation.history
    assert "earlier messages left out" in history[0].text
    assert history[-2].text.startswith("1b")  # the newest earlier turn is kept
    assert task.input.startswith('{"prompt": "2b')  # and the new message is the prompt
    await e.stop()


def test_assignments_beyond_one_message_go_in_the_next() -> None:
    from taskrun.controlplane.session import WorkerSession
    from taskrun.core.ids import WorkerId
    from taskrun.core.models import Worker
    from taskrun.v1 import workers_pb2 as wpb

    session = WorkerSession(Worker(WorkerId("w")), "s", 5.0, max_message_bytes=100_000)
    for n in range(3):
        session.send_assignment(wpb.RunAssignment(run_id=f"r{n}", input_json="x" * 60_000))
    sent: list[list[str]] = []

    async def write(msg: wpb.ServerMessage) -> None:
        sent.append([a.run_id for a in msg.assignments])
        if sum(map(len, sent)) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(session.write_loop(write))
    assert sent == [["r0"], ["r1"], ["r2"]]
