"""CreateAndFollowTask: one stream creates a task and follows it to its end (real server on
loopback with mTLS and SQLite, real worker sessions)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time

import grpc
import pytest

from taskrun import convert
from taskrun.cli.client import OutputReceived, TaskChanged, TaskEvent
from taskrun.core.models import TaskPolicy, TaskSpec
from taskrun.core.status import TaskStatus
from taskrun.v1 import events_pb2, events_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from tests.conftest import Cluster
from tests.faults import busy_cpus
from tests.integration.test_bad_input import channel

ORDER = {TaskStatus.PENDING: 0, TaskStatus.RUNNING: 1, TaskStatus.COMPLETED: 2}


async def test_the_stream_carries_the_created_task_then_its_output_then_its_end(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    text = "".join(f"{i:03d}" for i in range(50))
    spec = TaskSpec(agent="echo", input=json.dumps({"text": text, "chunks": 50}))
    events: list[TaskEvent] = []
    async with contextlib.aclosing(client.submit_and_follow(spec)) as stream:
        async for event in stream:
            events.append(event)
            if isinstance(event, TaskChanged):
                # Durable first: a state the stream shows is already in the store.
                stored, _ = await client.get_task(event.task.id)
                assert ORDER[stored.status] >= ORDER[event.task.status]
    first, last = events[0], events[-1]
    assert isinstance(first, TaskChanged) and first.task.status is not TaskStatus.COMPLETED
    assert isinstance(last, TaskChanged) and last.task.status is TaskStatus.COMPLETED
    assert last.task.id == first.task.id
    output = "".join(e.chunk.data for e in events if isinstance(e, OutputReceived))
    assert output == text
    stored, runs = await client.get_task(first.task.id)
    assert stored.status is TaskStatus.COMPLETED and len(runs) == 1
    assert (await client.run(spec)).status is TaskStatus.COMPLETED


async def test_a_task_no_worker_can_take_yet_is_streamed_from_pending_to_its_end(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    client = cluster.client()
    spec = TaskSpec(agent="echo", input=json.dumps({"text": "late"}))
    stream = client.submit_and_follow(spec, allow_unknown_agent=True)
    async with contextlib.aclosing(stream):
        first = await anext(stream)
        assert isinstance(first, TaskChanged) and first.task.status is TaskStatus.PENDING
        await cluster.start_worker("worker-1")
        statuses = [e.task.status async for e in stream if isinstance(e, TaskChanged)]
    assert statuses[-1] is TaskStatus.COMPLETED


async def test_an_idempotent_replay_follows_the_existing_task_and_says_it_was_not_created(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    spec = TaskSpec(
        agent="echo", input=json.dumps({"text": "once"}), policy=TaskPolicy(idempotency_key="k-1")
    )
    original = await client.run(spec)
    request = tasks_pb2.CreateAndFollowTaskRequest(task=convert.spec_to_pb(spec))
    updates = [u async for u in client._task_stub().CreateAndFollowTask(request)]
    assert updates[0].created is False
    assert updates[0].task.id == original.id
    assert updates[-1].task.status == TaskStatus.COMPLETED
    replayed = await client.run(spec)
    assert replayed.id == original.id
    assert len((await client.list_tasks())[0]) == 1


async def test_a_long_outputs_end_state_comes_after_all_of_it(cluster: Cluster) -> None:
    """More output than one update holds (1,000 chunks) is sent in several updates: the state
    comes with the last of them too, so nothing follows the terminal TaskChanged, live or
    replayed."""
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    text = "x" * 2500
    spec = TaskSpec(agent="echo", input=json.dumps({"text": text, "chunks": 2500}))
    live = [e async for e in client.submit_and_follow(spec)]
    task_id = live[0].task.id if isinstance(live[0], TaskChanged) else ""
    replayed = [e async for e in client.follow(task_id)]
    assert isinstance(live[0], TaskChanged)  # created on this stream: the task comes first
    for events in (live, replayed):
        last = events[-1]
        assert isinstance(last, TaskChanged) and last.task.status is TaskStatus.COMPLETED
        assert "".join(e.chunk.data for e in events if isinstance(e, OutputReceived)) == text


async def test_the_last_update_of_a_stream_says_so(cluster: Cluster) -> None:
    """A client may stop reading at an update marked last, without waiting for the stream's
    end: exactly the final update carries the mark, with the task's state."""
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    stub = client._task_stub()
    done = TaskSpec(agent="echo", input=json.dumps({"text": "x" * 2500, "chunks": 2500}))
    create = tasks_pb2.CreateAndFollowTaskRequest(task=convert.spec_to_pb(done))
    streams = [[u async for u in stub.CreateAndFollowTask(create)]]
    task_id = streams[0][0].task.id
    for follow in (True, False):
        request = tasks_pb2.FollowTaskRequest(task_id=task_id, follow=follow)
        streams.append([u async for u in stub.FollowTask(request)])
    running = await client.create_task("echo", {"text": "ab", "chunks": 2, "delay": 60})
    async with contextlib.aclosing(client.follow(running.id)) as events:
        async for event in events:
            if isinstance(event, TaskChanged) and event.task.status is TaskStatus.RUNNING:
                break
    request = tasks_pb2.FollowTaskRequest(task_id=running.id, follow=False)
    streams.append([u async for u in stub.FollowTask(request)])
    for updates in streams:
        assert [u.last for u in updates] == [False] * (len(updates) - 1) + [True]
        assert updates[0].HasField("task") and updates[-1].HasField("task")
    assert [s[-1].task.status for s in streams] == [TaskStatus.COMPLETED] * 3 + [TaskStatus.RUNNING]


async def test_a_bad_request_names_the_field_and_creates_nothing(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    spec = TaskSpec(agent="no-such-agent", input="{}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.run(spec)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "task.agent" in (caught.value.details() or "")
    bad_input = TaskSpec(agent="echo", input="[1, 2]")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.run(bad_input)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "task.input" in (caught.value.details() or "")
    assert (await client.list_tasks())[0] == []


async def test_a_stopping_server_ends_followers_and_watchers_unavailable_at_once(
    cluster: Cluster,
) -> None:
    """They follow again (elsewhere, or once it is back) instead of holding its shutdown for the
    whole grace."""
    server = await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    long = await client.create_task("echo", {"text": "ab", "chunks": 2, "delay": 60})
    async with channel(cluster) as ch:
        follow = tasks_pb2_grpc.TaskServiceStub(ch).FollowTask(
            tasks_pb2.FollowTaskRequest(task_id=long.id, follow=True)
        )
        watch = events_pb2_grpc.EventServiceStub(ch).WatchEvents(
            events_pb2.WatchEventsRequest(snapshot=True)
        )
        await follow.read()  # the task as it is: the stream is open
        await watch.read()
        started = time.monotonic()
        await server.stop(grace=30.0)
        cluster.server = None
        stopped_in = time.monotonic() - started
        for call in (follow, watch):
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    message = await call.read()
                    assert message is not grpc.aio.EOF
            assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "the control plane is stopping" in (ended.value.details() or "")
    assert stopped_in < 15.0, f"the stop waited {stopped_in:.1f}s of its 30s grace"


async def follow_once(
    stub: tasks_pb2_grpc.TaskServiceStub, task_id: str, ended: collections.Counter[str]
) -> str:
    """Follow until the stream ends; count its status code in `ended`, return its details."""
    call = stub.FollowTask(tasks_pb2.FollowTaskRequest(task_id=task_id, follow=True))
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        ended[exc.code().name] += 1
        return exc.details() or ""
    return ""


async def test_followers_that_come_back_at_once_while_the_server_stops_are_refused_unavailable(
    cluster: Cluster,
) -> None:
    """A follower ended by a stopping server opens its stream again at once. It is refused
    with UNAVAILABLE, which says "try again", never CANCELLED: a call that came in before the
    listener closed, while the stop was still to begin, was cancelled by it (the CLI's follow
    gave up). Busy CPUs and a few rounds make that window hit in most runs."""
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    long = await cluster.client().create_task("echo", {"text": "ab", "chunks": 2, "delay": 60})
    ended: collections.Counter[str] = collections.Counter()

    async def again_and_again(stub: tasks_pb2_grpc.TaskServiceStub, until: asyncio.Event) -> None:
        while not until.is_set():
            if "refused" in await follow_once(stub, long.id, ended):
                await asyncio.sleep(0.01)  # the listener is closed: no race left

    with busy_cpus():
        for _ in range(3):
            server = cluster.server or await cluster.start_server()
            stopped = asyncio.Event()
            async with channel(cluster) as ch:
                stub = tasks_pb2_grpc.TaskServiceStub(ch)
                loops = [asyncio.create_task(again_and_again(stub, stopped)) for _ in range(30)]
                await asyncio.sleep(0.5)  # every stream is open (or opening again)
                await server.stop(grace=5.0)
                cluster.server = None
                await asyncio.sleep(0.3)
                stopped.set()
                await asyncio.gather(*loops)
    assert ended["UNAVAILABLE"] >= 90
    assert set(ended) == {"UNAVAILABLE"}, ended


async def test_followers_arriving_as_the_server_stops_are_refused_unavailable(
    cluster: Cluster,
) -> None:
    """Sixty followers open their streams at once and the server stops as the first is served.
    grpc's stop cancels (CANCELLED) the calls it has accepted but not handed over yet, and the
    others were still being handed over, one by one: the server lets them all arrive first, so
    every one ends UNAVAILABLE (follow again), none CANCELLED."""
    server = await cluster.start_server()
    await cluster.start_worker("worker-1")
    long = await cluster.client().create_task("echo", {"text": "ab", "chunks": 2, "delay": 60})
    ended: collections.Counter[str] = collections.Counter()

    async with channel(cluster) as ch:
        await ch.channel_ready()
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        followers = [asyncio.create_task(follow_once(stub, long.id, ended)) for _ in range(60)]
        while not server.engine.hub.following(long.id):
            await asyncio.sleep(0)
        await server.stop(grace=5.0)
        cluster.server = None
        await asyncio.gather(*followers)
    assert ended == {"UNAVAILABLE": 60}


async def test_outcome_only_sends_the_ended_task_alone_on_every_way_of_following(
    cluster: Cluster,
) -> None:
    """A caller that waits for the result (`Client.run`, `Client.wait`, MCP's wait) asks for
    the outcome only: one update, the task once it has ended, no output and nothing on the way;
    live, replayed, created on a stream, and on the submit stream alike."""
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    stub = client._task_stub()
    text = "".join(f"{i:03d}" for i in range(40))
    # output on the way, and time to be followed while it runs
    spec = TaskSpec(agent="echo", input=json.dumps({"text": text, "chunks": 40, "delay": 0.005}))
    create = tasks_pb2.CreateAndFollowTaskRequest(task=convert.spec_to_pb(spec), outcome_only=True)
    created = [u async for u in stub.CreateAndFollowTask(create)]
    live = await client.create_task("echo", json.loads(spec.input))
    followed = [
        u
        async for u in stub.FollowTask(
            tasks_pb2.FollowTaskRequest(task_id=live.id, follow=True, outcome_only=True)
        )
    ]
    replayed = [
        u
        async for u in stub.FollowTask(
            tasks_pb2.FollowTaskRequest(task_id=live.id, follow=True, outcome_only=True)
        )
    ]
    for updates in (created, followed, replayed):
        assert len(updates) == 1
        (only,) = updates
        assert only.last and not only.chunks
        assert only.task.status == TaskStatus.COMPLETED
        assert json.loads(only.task.result_json) == {"chars": len(text), "chunks": 40}
    assert created[0].created is True
    events = [e async for e in client.submit_and_follow(spec, outcome_only=True)]
    assert len(events) == 1
    assert isinstance(events[0], TaskChanged) and events[0].task.status is TaskStatus.COMPLETED
    assert (await client.run(spec)).status is TaskStatus.COMPLETED
    assert (await client.wait(live.id)).status is TaskStatus.COMPLETED
    # the output is stored as ever, for whoever reads it
    stored = [e.chunk.data async for e in client.follow(live.id) if isinstance(e, OutputReceived)]
    assert "".join(stored) == text


async def test_outcome_only_without_follow_is_the_state_now_and_with_it_waits_for_the_end(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    stub = client._task_stub()
    running = await client.create_task("echo", {"text": "ab", "chunks": 2, "delay": 60})
    async with contextlib.aclosing(client.follow(running.id)) as events:
        async for event in events:
            if isinstance(event, TaskChanged) and event.task.status is TaskStatus.RUNNING:
                break
    request = tasks_pb2.FollowTaskRequest(task_id=running.id, follow=False, outcome_only=True)
    (now,) = [u async for u in stub.FollowTask(request)]
    assert now.last and not now.chunks and now.task.status == TaskStatus.RUNNING
    waiting = stub.FollowTask(
        tasks_pb2.FollowTaskRequest(task_id=running.id, follow=True, outcome_only=True)
    )
    first = asyncio.ensure_future(anext(aiter(waiting)))
    await asyncio.sleep(0.3)  # its output ("a" now, "b" in a minute) wakes nothing
    assert not first.done()
    await client.cancel_task(running.id, "enough")
    update = await asyncio.wait_for(first, 10)
    assert update.last and not update.chunks and update.task.status == TaskStatus.CANCELLED
    waiting.cancel()


async def test_an_outcome_only_follower_is_refused_an_unknown_task_and_ended_by_a_stop(
    cluster: Cluster,
) -> None:
    """It waits on nothing but the end, so what ends a follow otherwise must still reach it: a
    task that does not exist, and a control plane that stops (follow again elsewhere)."""
    server = await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    stub = client._task_stub()
    missing = stub.FollowTask(
        tasks_pb2.FollowTaskRequest(task_id="tsk_nosuchtask", follow=True, outcome_only=True)
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await missing.read()
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    assert "task_id" in (refused.value.details() or "")
    long = await client.create_task("echo", {"text": "ab", "chunks": 2, "delay": 60})
    async with channel(cluster) as ch:
        waiting = tasks_pb2_grpc.TaskServiceStub(ch).FollowTask(
            tasks_pb2.FollowTaskRequest(task_id=long.id, follow=True, outcome_only=True)
        )
        first = asyncio.ensure_future(waiting.read())
        await asyncio.sleep(0.3)
        assert not first.done()  # nothing until the end
        await server.stop(grace=30.0)
        cluster.server = None
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(first, 15)
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "the control plane is stopping" in (ended.value.details() or "")
