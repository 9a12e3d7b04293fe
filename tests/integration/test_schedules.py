"""Schedules end to end: a real control plane on loopback (mTLS, SQLite), real workers running
the tasks the schedules create, control-plane restarts across fire times, and the CLI."""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import structlog

from taskrun.cli import main as cli
from taskrun.core.models import Task
from taskrun.core.schedule import MisfirePolicy, OverlapPolicy, Schedule
from taskrun.core.status import TaskStatus
from tests.conftest import Cluster

SLOW = '{"text": "x", "chunks": 50, "delay": 0.1}'  # an echo task of about 5 s


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def tasks_of(client: Any, name: str) -> list[Task]:
    tasks, _ = await client.list_tasks(schedule=name, limit=1000)
    return sorted(tasks, key=lambda t: t.created_at)


def per_second(name: str, **fields: Any) -> Schedule:
    schedule = Schedule(
        name=name, agent="echo", timezone="Europe/Chisinau", rrule="FREQ=SECONDLY", **fields
    )
    return schedule


async def test_per_second_schedule_creates_tasks_that_complete(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    await client.create_schedule(per_second("tick", input='{"text": "tock"}'))

    async def two_completed() -> bool:
        tasks = await tasks_of(client, "tick")
        return sum(t.status is TaskStatus.COMPLETED for t in tasks) >= 2

    await eventually(two_completed)
    tasks = await tasks_of(client, "tick")
    keys = [t.policy.idempotency_key for t in tasks]
    assert len(set(keys)) == len(keys)
    assert all(k.startswith("schedule:tick:") and k.endswith("Z") for k in keys)
    done = [t for t in tasks if t.status is TaskStatus.COMPLETED]
    assert all(t.worker_id == "worker-1" and t.schedule == "tick" for t in done)
    schedule = await client.get_schedule("tick")
    assert schedule.last_task_id in {t.id for t in tasks}
    assert schedule.next_fire_time is not None and schedule.last_fire_time is not None
    assert schedule.next_fire_time - schedule.last_fire_time == timedelta(seconds=1)
    await client.delete_schedule("tick")


async def test_restart_across_fire_times_honours_the_misfire_policy(cluster: Cluster) -> None:
    """Down over both occurrences of a two-occurrence rule: run_once creates exactly one task
    (for the latest), skip creates none, and another restart creates nothing more."""
    await cluster.start_server(schedule_misfire_grace=0.5)
    await cluster.start_worker("worker-1")  # announces the agent
    client = cluster.client()
    first = datetime.fromtimestamp(math.ceil(time.time()) + 2, UTC)
    rule = f"DTSTART:{first:%Y%m%dT%H%M%S}Z\nRRULE:FREQ=SECONDLY;COUNT=2"
    for name, misfire in (("once", MisfirePolicy.RUN_ONCE), ("skip", MisfirePolicy.SKIP)):
        await client.create_schedule(
            Schedule(name=name, agent="echo", timezone="UTC", rrule=rule, misfire=misfire)
        )
    await cluster.stop_server()
    assert datetime.now(UTC) < first, "the server took too long to stop"
    await asyncio.sleep((first + timedelta(seconds=2) - datetime.now(UTC)).total_seconds())
    await cluster.start_server(schedule_misfire_grace=0.5)

    async def handled() -> bool:
        return all([(await client.get_schedule(n)).last_outcome for n in ("once", "skip")])

    await eventually(handled)
    (task,) = await tasks_of(client, "once")
    latest = first + timedelta(seconds=1)
    assert task.policy.idempotency_key == f"schedule:once:{latest:%Y-%m-%dT%H:%M:%SZ}"
    once = await client.get_schedule("once")
    assert "misfire policy run_once" in once.last_outcome
    assert once.next_fire_time is None  # COUNT=2 is used up
    assert await tasks_of(client, "skip") == []
    skip = await client.get_schedule("skip")
    assert skip.last_outcome.startswith("missed")
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED

    await cluster.stop_server()
    await cluster.start_server(schedule_misfire_grace=0.5)
    await asyncio.sleep(0.3)
    assert [t.id for t in await tasks_of(client, "once")] == [task.id]
    assert await tasks_of(client, "skip") == []


async def test_overlap_skip_and_cancel_previous_with_a_slow_task(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=8)
    client = cluster.client()
    await client.create_schedule(per_second("skipper", input=SLOW, overlap=OverlapPolicy.SKIP))
    await client.create_schedule(
        per_second("canceller", input=SLOW, overlap=OverlapPolicy.CANCEL_PREVIOUS)
    )

    async def replaced_twice() -> bool:
        return len(await tasks_of(client, "canceller")) >= 3

    await eventually(replaced_twice)
    for name in ("skipper", "canceller"):
        await client.pause_schedule(name)

    (only,) = await tasks_of(client, "skipper")
    assert only.status in (TaskStatus.PENDING, TaskStatus.RUNNING)
    skipper = await client.get_schedule("skipper")
    assert skipper.last_outcome == f"skipped: previous task still running ({only.id})"

    *earlier, latest = await tasks_of(client, "canceller")
    assert [t.status for t in earlier] == [TaskStatus.CANCELLED] * len(earlier)
    assert all("overlap policy cancel_previous" in t.error for t in earlier)
    assert latest.status in (TaskStatus.PENDING, TaskStatus.RUNNING)
    canceller = await client.get_schedule("canceller")
    assert f"cancelled previous {earlier[-1].id}" in canceller.last_outcome
    for task in (only, latest):
        await client.cancel_task(task.id)


async def test_paused_schedule_creates_nothing_until_resumed(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    created = await client.create_schedule(per_second("later", paused=True))
    assert created.paused and created.next_fire_time is None
    await asyncio.sleep(1.5)
    assert await tasks_of(client, "later") == []
    resumed = await client.resume_schedule("later")
    assert resumed.next_fire_time is not None

    async def one() -> bool:
        return bool(await tasks_of(client, "later"))

    await eventually(one, timeout=3)
    await client.pause_schedule("later")


async def test_trigger_creates_one_task_now(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    await client.create_schedule(
        Schedule(
            name="nightly",
            agent="echo",
            timezone="America/New_York",
            cron="0 3 * * *",
            input='{"text": "now"}',
        )
    )
    schedule, task = await client.trigger_schedule("nightly")
    assert task.schedule == "nightly" and schedule.last_task_id == task.id
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
    assert [t.id for t in await tasks_of(client, "nightly")] == [task.id]


async def test_schedules_survive_a_restart_and_preview_in_zone_and_utc(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    created = await client.create_schedule(
        Schedule(
            name="monthly",
            agent="echo",
            timezone="America/New_York",
            rrule="FREQ=MONTHLY;BYDAY=-1FR;BYHOUR=17;BYMINUTE=0",
            labels={"team": "docs"},
        )
    )
    await cluster.stop_server()
    await cluster.start_server()
    assert await client.get_schedule("monthly") == created
    assert [s.name for s in await client.list_schedules()] == ["monthly"]
    after = datetime(2027, 3, 1, tzinfo=UTC)  # after the pinned DTSTART (creation)
    zone, times = await client.preview_schedule("monthly", count=3, after=after)
    assert zone == "America/New_York"
    assert times == [
        (datetime(2027, 3, 26, 21, tzinfo=UTC), "2027-03-26T17:00:00-04:00"),
        (datetime(2027, 4, 30, 21, tzinfo=UTC), "2027-04-30T17:00:00-04:00"),
        (datetime(2027, 5, 28, 21, tzinfo=UTC), "2027-05-28T17:00:00-04:00"),
    ]


# --- bad input -------------------------------------------------------------------------------

BAD = {
    "cron": (dict(cron="61 * * * *"), "schedule.cron"),
    "rrule": (dict(rrule="FREQ=DAILY;BYHOUR=25"), "schedule.rrule"),
    "timezone": (dict(cron="* * * * *", timezone="Europe/Atlantis"), "schedule.timezone"),
    "unknown_agent": (dict(cron="* * * * *", agent="nobody"), "schedule.agent"),
    "name": (dict(cron="* * * * *", name="Not A Name"), "schedule.name"),
    "no_rule": (dict(), "schedule.cron"),
}


async def test_bad_schedules_are_invalid_argument_naming_the_field(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    for case, (fields, field) in BAD.items():
        values: dict[str, Any] = {"name": "bad", "agent": "echo", "timezone": "UTC", **fields}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.create_schedule(Schedule(**values))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert (info.value.details() or "").startswith(f"{field}: "), (case, info.value.details())
    assert await client.list_schedules() == []

    await client.create_schedule(
        Schedule(name="ok", agent="echo", timezone="UTC", cron="0 1 * * *")
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.create_schedule(
            Schedule(name="ok", agent="echo", timezone="UTC", cron="0 2 * * *")
        )
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.get_schedule("missing")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.update_schedule(Schedule(name="ok", agent="echo", timezone="UTC"), ["paused"])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("update_mask: ")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.update_schedule(
            Schedule(name="ok", agent="echo", timezone="Mars/Base", cron="0 2 * * *"),
            ["timezone"],
        )
    assert (info.value.details() or "").startswith("schedule.timezone: ")
    assert (await client.get_schedule("ok")).timezone == "UTC"


async def test_schedule_calls_need_an_operator_identity(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client("worker-1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.list_schedules()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """The server and worker log to stdout in this process; keep that out of the CLI's output."""
    before = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(io.StringIO()))
    try:
        yield
    finally:
        structlog.configure(**before)


async def test_schedule_commands(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], tmp_path: Any, quiet_logs: None
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    pki = cluster.pki
    connection = [
        "--server",
        cluster.address,
        "--ca",
        str(pki.ca_cert),
        "--cert",
        str(pki.operator_cert),
        "--key",
        str(pki.operator_key),
    ]

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(cli.main, [*argv, *connection])
        out, err = capsys.readouterr()
        return code, out, err

    input_file = tmp_path / "task.json"
    input_file.write_text('{"text": "brief"}')
    code, out, err = await run(
        "schedule",
        "create",
        "morning-brief",
        "--agent",
        "echo",
        "--input-file",
        str(input_file),
        "--cron",
        "30 8 * * MON-FRI",
        "--timezone",
        "Europe/Chisinau",
        "--overlap",
        "allow",
        "--label",
        "team=ops",
        "--priority",
        "5",
    )
    assert code == 0, err
    assert out.startswith("schedule morning-brief created; next at ")

    code, out, _ = await run("schedule", "get", "morning-brief", "--output", "json")
    doc = json.loads(out)
    assert doc["cron"] == "30 8 * * MON-FRI" and doc["overlap"] == "allow"
    assert doc["misfire"] == "run_once" and doc["input"] == {"text": "brief"}
    assert doc["labels"] == {"team": "ops"} and doc["policy"]["priority"] == 5

    code, out, _ = await run("schedule", "next", "morning-brief", "--count", "3", "-o", "json")
    fire_times = json.loads(out)["fire_times"]
    assert len(fire_times) == 3
    assert all(
        f["local"].endswith(("+02:00", "+03:00")) and f["local"][11:16] == "08:30"
        for f in fire_times
    )
    code, out, _ = await run("schedule", "next", "morning-brief")
    assert "LOCAL (Europe/Chisinau)" in out and "UTC" in out

    code, out, err = await run(
        "schedule", "update", "morning-brief", "--cron", "0 9 * * *", "--priority", "7",
        "--max-cost", "0.5", "--system", "Be brief.",
    )  # fmt: skip
    assert code == 0 and "updated" in out, err
    code, out, _ = await run("schedule", "get", "morning-brief")
    assert "Cron:" in out and "0 9 * * *" in out and "allow" in out

    code, out, _ = await run("schedule", "trigger", "morning-brief")
    task_id = out.strip()
    assert code == 0 and task_id.startswith("tsk_")
    code, out, _ = await run("task", "list", "--schedule", "morning-brief", "-o", "json")
    tasks = json.loads(out)["tasks"]
    assert [t["id"] for t in tasks] == [task_id]
    assert tasks[0]["policy"]["priority"] == 7
    # the model flags of `schedule update` reach the tasks it creates
    assert tasks[0]["policy"]["max_cost_usd"] == 0.5
    assert tasks[0]["policy"]["model_settings"]["system_prompt"] == "Be brief."

    code, out, _ = await run("schedule", "pause", "morning-brief")
    assert out == "schedule morning-brief paused\n"
    code, out, _ = await run("schedule", "list")
    assert "morning-brief" in out and "paused" in out

    code, _, err = await run(
        "schedule", "create", "bad", "--agent", "echo", "--cron", "* *", "--timezone", "UTC"
    )
    assert code == 2 and "INVALID_ARGUMENT: schedule.cron:" in err

    code, out, _ = await run("schedule", "delete", "morning-brief")
    assert code == 0
    code, _, err = await run("schedule", "get", "morning-brief")
    assert code == 2 and "NOT_FOUND" in err
