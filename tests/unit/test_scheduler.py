"""The scheduler with an injected clock: firing, exactly once, misfire, overlap, changes.

A real Engine on a MemoryStore, no workers connected (created tasks stay PENDING, i.e.
unfinished, until a test cancels them). `run_due()` is called by the tests instead of the timer,
except in the timer tests at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.scheduler import Scheduler
from taskrun.controlplane.store import MemoryStore
from taskrun.core.errors import AlreadyExists, InvalidArgument, NotFound
from taskrun.core.ids import WorkerId
from taskrun.core.models import AgentSpec, Task, TaskPolicy, TaskSpec, Worker
from taskrun.core.schedule import MisfirePolicy, OverlapPolicy, Schedule, occurrence_key
from taskrun.core.status import TaskStatus
from taskrun.core.store import TaskQuery

T0 = datetime(2026, 3, 2, 8, 0, 30, tzinfo=UTC)  # a Monday
MINUTE = timedelta(minutes=1)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class Env:
    store: MemoryStore
    engine: Engine
    clock: Clock
    scheduler: Scheduler

    async def restart(self, *, misfire_grace: float = 60.0) -> Scheduler:
        """A new scheduler over the same store and engine, as after a control-plane restart."""
        await self.scheduler.stop()
        self.scheduler = Scheduler(
            self.engine, clock=self.clock, timer=False, misfire_grace=misfire_grace
        )
        await self.scheduler.load()
        return self.scheduler

    async def tasks(self, name: str = "every-minute") -> list[Task]:
        page = await self.store.list_tasks(TaskQuery(schedule=name, limit=1000))
        # oldest first (ids created in the same millisecond do not sort by creation)
        return sorted(page.tasks, key=lambda t: (t.created_at, t.policy.idempotency_key))


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    store = MemoryStore()
    engine = Engine(store, ServerConfig())
    await engine.start()
    engine.workers[WorkerId("w-1")] = Worker(id=WorkerId("w-1"), agents=(AgentSpec("echo"),))
    clock = Clock()
    scheduler = Scheduler(engine, clock=clock, timer=False)
    await scheduler.load()
    yield Env(store, engine, clock, scheduler)
    await scheduler.stop()
    await engine.stop()


def every_minute(**fields: object) -> Schedule:
    s = Schedule(
        name="every-minute",
        agent="echo",
        timezone="Europe/Chisinau",
        cron="* * * * *",
        input='{"text": "tick"}',
        labels={"team": "ml"},
        policy=TaskPolicy(priority=3, max_attempts=2),
    )
    for key, value in fields.items():
        setattr(s, key, value)
    return s


async def finish(env: Env, task: Task) -> None:
    """End a task (here: cancel it) so that it no longer overlaps."""
    await env.engine.cancel_task(task.id, "done for the test")


# --- firing ----------------------------------------------------------------------------------


async def test_created_schedule_is_stored_with_its_next_fire_time(env: Env) -> None:
    created = await env.scheduler.create(every_minute())
    assert created.next_fire_time == datetime(2026, 3, 2, 8, 1, tzinfo=UTC)
    assert created.created_at == T0
    assert await env.store.get_schedule("every-minute") == created
    assert await env.scheduler.run_due() == 0
    assert await env.tasks() == []


async def test_occurrence_creates_one_task_from_the_template(env: Env) -> None:
    await env.scheduler.create(every_minute())
    env.clock.advance(30 * timedelta(seconds=1))  # 08:01:00
    assert await env.scheduler.run_due() == 1
    assert await env.scheduler.run_due() == 0
    (task,) = await env.tasks()
    occurrence = datetime(2026, 3, 2, 8, 1, tzinfo=UTC)
    assert task.schedule == "every-minute"
    assert (task.agent, task.input, task.labels) == ("echo", '{"text": "tick"}', {"team": "ml"})
    assert task.policy == TaskPolicy(
        priority=3, max_attempts=2, idempotency_key="schedule:every-minute:2026-03-02T08:01:00Z"
    )
    stored = await env.store.get_schedule("every-minute")
    assert stored is not None
    assert stored.last_fire_time == occurrence
    assert stored.next_fire_time == occurrence + MINUTE
    assert stored.last_task_id == task.id
    assert stored.last_outcome == f"created task {task.id}"


async def test_each_occurrence_fires_once_in_order(env: Env) -> None:
    await env.scheduler.create(every_minute(overlap=OverlapPolicy.ALLOW))
    for _ in range(3):
        env.clock.advance(MINUTE)
        await env.scheduler.run_due()
    keys = [t.policy.idempotency_key for t in await env.tasks()]
    assert keys == [
        "schedule:every-minute:2026-03-02T08:01:00Z",
        "schedule:every-minute:2026-03-02T08:02:00Z",
        "schedule:every-minute:2026-03-02T08:03:00Z",
    ]


async def test_crash_after_creating_the_task_does_not_create_it_again(env: Env) -> None:
    """The task of an occurrence is committed but the schedule still says it is due (as if the
    control plane died in between): after a restart the key finds that task."""
    created = await env.scheduler.create(every_minute())
    assert created.next_fire_time is not None
    key = occurrence_key("every-minute", created.next_fire_time)
    spec = TaskSpec(
        agent="echo",
        input='{"text": "tick"}',
        labels={"team": "ml"},
        policy=TaskPolicy(priority=3, max_attempts=2, idempotency_key=key),
        schedule="every-minute",
    )
    ((first, _),) = await env.engine.create_tasks([spec])
    env.clock.advance(timedelta(seconds=40))
    await env.restart()
    assert await env.scheduler.run_due() == 1
    assert [t.id for t in await env.tasks()] == [first.id]
    stored = await env.store.get_schedule("every-minute")
    assert stored is not None and stored.last_task_id == first.id
    assert "already existed for this occurrence" in stored.last_outcome


# --- misfire ---------------------------------------------------------------------------------


async def test_misfire_run_once_runs_only_the_latest_missed_occurrence(env: Env) -> None:
    await env.scheduler.create(every_minute(misfire=MisfirePolicy.RUN_ONCE))
    env.clock.advance(10 * MINUTE)  # down over ten fire times; the last one was 30 s ago
    await env.restart(misfire_grace=5)
    assert await env.scheduler.run_due() == 1
    (task,) = await env.tasks()
    assert task.policy.idempotency_key == "schedule:every-minute:2026-03-02T08:10:00Z"
    stored = await env.store.get_schedule("every-minute")
    assert stored is not None
    assert stored.next_fire_time == datetime(2026, 3, 2, 8, 11, tzinfo=UTC)
    assert "misfire policy run_once" in stored.last_outcome
    assert "earlier missed occurrences were not run" in stored.last_outcome


async def test_misfire_skip_runs_nothing_and_waits_for_the_next(env: Env) -> None:
    await env.scheduler.create(every_minute(misfire=MisfirePolicy.SKIP))
    env.clock.advance(10 * MINUTE)
    await env.restart(misfire_grace=5)
    assert await env.scheduler.run_due() == 1
    assert await env.tasks() == []
    stored = await env.store.get_schedule("every-minute")
    assert stored is not None
    assert stored.last_outcome.startswith("missed: the control plane was not running")
    assert stored.next_fire_time == datetime(2026, 3, 2, 8, 11, tzinfo=UTC)
    env.clock.now = datetime(2026, 3, 2, 8, 11, 1, tzinfo=UTC)  # on time again
    await env.scheduler.run_due()
    assert len(await env.tasks()) == 1


async def test_a_little_late_is_not_a_misfire(env: Env) -> None:
    await env.scheduler.create(every_minute(misfire=MisfirePolicy.SKIP))
    env.clock.advance(timedelta(seconds=30 + 20))  # 20 s after 08:01, inside the 60 s grace
    await env.scheduler.run_due()
    assert len(await env.tasks()) == 1


async def test_misfire_of_a_daily_schedule_after_a_long_outage(env: Env) -> None:
    await env.scheduler.create(every_minute(cron="0 9 * * *"))
    env.clock.advance(timedelta(days=30))
    await env.restart()
    await env.scheduler.run_due()
    (task,) = await env.tasks()
    assert task.policy.idempotency_key.endswith("2026-04-01T06:00:00Z")  # 09:00 EEST


# --- overlap ---------------------------------------------------------------------------------


async def test_overlap_skip_creates_nothing_while_the_previous_task_is_unfinished(
    env: Env,
) -> None:
    await env.scheduler.create(every_minute(overlap=OverlapPolicy.SKIP))
    env.clock.advance(MINUTE)
    await env.scheduler.run_due()
    env.clock.advance(MINUTE)
    await env.scheduler.run_due()
    (first,) = await env.tasks()
    stored = await env.store.get_schedule("every-minute")
    assert stored is not None
    assert stored.last_outcome == f"skipped: previous task still running ({first.id})"
    await finish(env, first)
    env.clock.advance(MINUTE)
    await env.scheduler.run_due()
    assert len(await env.tasks()) == 2


async def test_overlap_cancel_previous_cancels_then_creates(env: Env) -> None:
    await env.scheduler.create(every_minute(overlap=OverlapPolicy.CANCEL_PREVIOUS))
    env.clock.advance(MINUTE)
    await env.scheduler.run_due()
    env.clock.advance(MINUTE)
    await env.scheduler.run_due()
    first, second = await env.tasks()
    assert first.status is TaskStatus.CANCELLED
    assert "overlap policy cancel_previous" in first.error
    assert second.status is TaskStatus.PENDING
    stored = await env.store.get_schedule("every-minute")
    assert stored is not None and f"cancelled previous {first.id}" in stored.last_outcome


async def test_overlap_allow_creates_anyway(env: Env) -> None:
    await env.scheduler.create(every_minute(overlap=OverlapPolicy.ALLOW))
    for _ in range(2):
        env.clock.advance(MINUTE)
        await env.scheduler.run_due()
    assert [t.status for t in await env.tasks()] == [TaskStatus.PENDING, TaskStatus.PENDING]


async def test_overlap_survives_a_restart(env: Env) -> None:
    await env.scheduler.create(every_minute(overlap=OverlapPolicy.SKIP))
    env.clock.advance(MINUTE)
    await env.scheduler.run_due()
    await env.restart()
    env.clock.advance(MINUTE)
    await env.scheduler.run_due()
    assert len(await env.tasks()) == 1


# --- changes ---------------------------------------------------------------------------------


async def test_paused_schedule_creates_nothing_and_resumes_without_catching_up(env: Env) -> None:
    await env.scheduler.create(every_minute())
    paused = await env.scheduler.pause("every-minute")
    assert paused.paused and paused.next_fire_time is None
    env.clock.advance(5 * MINUTE)
    assert await env.scheduler.run_due() == 0
    resumed = await env.scheduler.resume("every-minute")
    assert resumed.next_fire_time == datetime(2026, 3, 2, 8, 6, tzinfo=UTC)
    assert await env.scheduler.run_due() == 0
    assert await env.tasks() == []
    env.clock.advance(MINUTE)
    await env.scheduler.run_due()
    assert len(await env.tasks()) == 1


async def test_paused_state_is_durable(env: Env) -> None:
    await env.scheduler.create(every_minute(paused=True))
    env.clock.advance(5 * MINUTE)
    await env.restart()
    assert await env.scheduler.run_due() == 0
    assert env.scheduler.get("every-minute").paused


async def test_update_takes_effect_for_the_next_occurrence(env: Env) -> None:
    await env.scheduler.create(every_minute())
    changed = replace(every_minute(), cron="", rrule="FREQ=HOURLY;BYMINUTE=30")
    updated = await env.scheduler.update(changed, {"cron", "rrule"})
    assert updated.next_fire_time == datetime(2026, 3, 2, 8, 30, tzinfo=UTC)
    assert updated.created_at == T0
    env.clock.advance(MINUTE)
    assert await env.scheduler.run_due() == 0  # the old 08:01 occurrence is gone
    updated = await env.scheduler.update(
        replace(every_minute(), input='{"text": "new"}'), {"input"}
    )
    assert updated.rrule.endswith("RRULE:FREQ=HOURLY;BYMINUTE=30")
    env.clock.now = datetime(2026, 3, 2, 8, 30, tzinfo=UTC)
    await env.scheduler.run_due()
    (task,) = await env.tasks()
    assert task.input == '{"text": "new"}'


async def test_bad_update_changes_nothing(env: Env) -> None:
    before = await env.scheduler.create(every_minute())
    with pytest.raises(InvalidArgument) as info:
        await env.scheduler.update(replace(every_minute(), agent="nobody"), {"agent"}, "schedule.")
    assert info.value.field == "schedule.agent"
    with pytest.raises(InvalidArgument):
        await env.scheduler.update(replace(every_minute(), cron="* *"), {"cron"})
    assert await env.store.get_schedule("every-minute") == before
    assert env.scheduler.get("every-minute") == before


async def test_deleted_schedule_fires_no_more(env: Env) -> None:
    await env.scheduler.create(every_minute())
    await env.scheduler.delete("every-minute")
    env.clock.advance(MINUTE)
    assert await env.scheduler.run_due() == 0
    assert await env.store.list_schedules() == []
    with pytest.raises(NotFound):
        env.scheduler.get("every-minute")


async def test_trigger_creates_one_task_now_regardless_of_overlap(env: Env) -> None:
    await env.scheduler.create(every_minute(cron="0 9 * * *", paused=True))
    _, first = await env.scheduler.trigger("every-minute")
    schedule, second = await env.scheduler.trigger("every-minute")
    assert [t.id for t in await env.tasks()] == [first.id, second.id]
    assert second.policy.idempotency_key == ""
    assert schedule.last_task_id == second.id
    assert schedule.last_fire_time == T0
    assert schedule.next_fire_time is None  # still paused


async def test_unknown_agent_is_rejected_and_nothing_stored(env: Env) -> None:
    env.engine.catalog.learn([AgentSpec("echo")])
    with pytest.raises(InvalidArgument, match="no worker has announced") as info:
        await env.scheduler.create(every_minute(agent="claude_code"), prefix="schedule.")
    assert info.value.field == "schedule.agent"
    assert "(known agents: 'echo')" in info.value.message
    assert await env.store.list_schedules() == []
    assert env.scheduler.list_schedules() == []


TEXT_ONLY = '{"type": "object", "properties": {"text": {"type": "string"}}, ' + (
    '"additionalProperties": false}'
)
NEEDS_PROMPT = '{"type": "object", "required": ["prompt"]}'


def announce_echo_schema(env: Env, schema: str) -> None:
    env.engine.catalog.learn([AgentSpec("echo", input_schema=schema)])


async def test_an_input_that_does_not_match_the_agents_schema_is_rejected_at_create(
    env: Env,
) -> None:
    announce_echo_schema(env, TEXT_ONLY)
    with pytest.raises(InvalidArgument, match="input schema of agent 'echo'") as info:
        await env.scheduler.create(every_minute(input='{"x": 1}'), prefix="schedule.")
    assert info.value.field == "schedule.input_json"
    assert "x" in info.value.message
    assert await env.store.list_schedules() == []


async def test_an_update_to_an_input_that_does_not_match_the_schema_changes_nothing(
    env: Env,
) -> None:
    announce_echo_schema(env, TEXT_ONLY)
    created = await env.scheduler.create(every_minute())
    with pytest.raises(InvalidArgument, match="input schema of agent 'echo'"):
        await env.scheduler.update(every_minute(input='{"x": 1}'), fields=["input"])
    assert await env.store.get_schedule("every-minute") == created


async def test_an_occurrence_whose_input_no_longer_matches_the_schema_is_skipped_saying_why(
    env: Env,
) -> None:
    await env.scheduler.create(every_minute())  # {"text": "tick"}
    announce_echo_schema(env, NEEDS_PROMPT)  # a worker announced a stricter echo since
    env.clock.advance(30 * timedelta(seconds=1))  # 08:01:00
    assert await env.scheduler.run_due() == 1
    assert await env.tasks() == []
    stored = await env.store.get_schedule("every-minute")
    assert stored is not None
    assert stored.last_outcome.startswith("skipped: does not match the input schema of agent")
    assert "prompt" in stored.last_outcome
    assert stored.next_fire_time == datetime(2026, 3, 2, 8, 2, tzinfo=UTC)


async def test_trigger_refuses_an_input_that_does_not_match_the_schema(env: Env) -> None:
    await env.scheduler.create(every_minute())
    announce_echo_schema(env, NEEDS_PROMPT)
    with pytest.raises(InvalidArgument, match="input schema of agent 'echo'"):
        await env.scheduler.trigger("every-minute")
    assert await env.tasks() == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"cron": "61 * * * *"}, "schedule.cron"),
        ({"cron": "", "rrule": "FREQ=DAILY;BYDAY=XX"}, "schedule.rrule"),
        ({"timezone": "Europe/Atlantis"}, "schedule.timezone"),
        ({"name": "Bad Name"}, "schedule.name"),
    ],
    ids=["cron", "rrule", "timezone", "name"],
)
async def test_bad_schedule_is_rejected_and_nothing_stored(
    env: Env, fields: dict[str, str], field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await env.scheduler.create(every_minute(**fields), prefix="schedule.")
    assert info.value.field == field
    assert await env.store.list_schedules() == []


async def test_duplicate_name_is_already_exists(env: Env) -> None:
    await env.scheduler.create(every_minute())
    with pytest.raises(AlreadyExists):
        await env.scheduler.create(every_minute(cron="0 9 * * *"))


async def test_a_rule_that_ends_leaves_no_next_fire_time(env: Env) -> None:
    await env.scheduler.create(
        every_minute(cron="", rrule="DTSTART:20260302T100100\nRRULE:FREQ=MINUTELY;COUNT=2")
    )
    for _ in range(3):
        env.clock.advance(MINUTE)
        await env.scheduler.run_due()
    stored = await env.store.get_schedule("every-minute")
    assert stored is not None and stored.next_fire_time is None
    assert stored.last_outcome.endswith("the rule has no further occurrence")
    assert len(await env.tasks()) == 1  # the second occurrence overlapped the first (SKIP)


# --- the timer -------------------------------------------------------------------------------


async def test_timer_fires_due_schedules_without_being_asked(env: Env) -> None:
    await env.scheduler.stop()
    scheduler = Scheduler(env.engine)  # real clock, real timer
    await scheduler.load()
    scheduler.start()
    try:
        await scheduler.create(
            every_minute(
                name="fast",
                cron="",
                rrule="FREQ=SECONDLY",
                timezone="UTC",
                overlap=OverlapPolicy.ALLOW,
            )
        )
        async with asyncio.timeout(5):
            while not await env.tasks("fast"):
                await asyncio.sleep(0.05)
    finally:
        await scheduler.stop()


async def test_idle_schedules_cost_one_timer_and_no_rounds(env: Env) -> None:
    await env.scheduler.stop()
    scheduler = Scheduler(env.engine, max_sleep=3600)
    await scheduler.load()
    scheduler.start()
    rounds = 0
    run_due = scheduler.run_due

    async def counting() -> int:
        nonlocal rounds
        rounds += 1
        return await run_due()

    scheduler.run_due = counting  # type: ignore[method-assign]
    try:
        for n in range(1000):
            await scheduler.create(every_minute(name=f"daily-{n}", cron=f"{n % 60} 3 * * *"))
        await asyncio.sleep(0.3)
        assert rounds == 0
        timer = scheduler._timer
        assert timer is not None
        earliest = min(s.next_fire_time for s in scheduler.list_schedules() if s.next_fire_time)
        expected = (earliest - datetime.now(UTC)).total_seconds()
        loop = asyncio.get_running_loop()
        # armed when the last schedule was made: the sleep and the listing have passed since
        assert abs((timer.when() - loop.time()) - min(expected, 3600)) < 5.0
    finally:
        await scheduler.stop()
