"""Answers larger than one gRPC message are cut into pages and updates that each fit, never
refused (real server on loopback with mTLS and SQLite, a real worker session).

The server's message budget is set to its smallest (64 KiB: it may send 1 MiB more), so that
a few tasks of a few hundred kB reach it.
"""

from __future__ import annotations

import asyncio
import json

import grpc

from taskrun.cli.client import OutputReceived, TaskChanged
from taskrun.core.models import TaskSpec
from taskrun.core.status import TaskStatus
from taskrun.v1 import tasks_pb2
from tests.conftest import Cluster

SMALL = 64 * 1024
SEND_LIMIT = SMALL + 1024 * 1024  # what the server's channel lets through (app.py)


async def test_a_page_of_large_tasks_is_cut_to_fit_and_paging_returns_each_task_once(
    cluster: Cluster,
) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    await cluster.start_worker("worker-1", capacity=8)
    client = cluster.client()
    made = [
        (await client.create_task("echo", {"text": f"{i}" + "x" * 300_000})).id for i in range(6)
    ]
    await asyncio.gather(*(client.wait(t) for t in made))
    listed, pages, token = [], 0, ""
    while True:
        page, token = await client.list_tasks(limit=100, page_token=token)
        listed += [t.id for t in page]
        pages += 1
        if not token:
            break
    assert listed == made[::-1]  # newest first, each once
    assert pages > 1
    # each page as sent fits the server's own limit
    stub = client._task_stub()
    token = ""
    while True:
        reply = await stub.ListTasks(tasks_pb2.ListTasksRequest(page_size=100, page_token=token))
        assert reply.ByteSize() <= SEND_LIMIT
        assert reply.tasks
        if not (token := reply.next_page_token):
            break


async def test_output_too_large_for_one_update_is_replayed_and_followed_in_several(
    cluster: Cluster,
) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    await cluster.start_worker("worker-1")
    client = cluster.client()
    text = "".join(f"<{i:06d}>" for i in range(100_000))  # 800 kB, in 60 kB chunks
    live, status = "", TaskStatus.PENDING
    spec = TaskSpec(agent="echo", input=json.dumps({"text": text, "chunks": 14}))
    async for event in client.submit_and_follow(spec):  # followed as it runs
        if isinstance(event, OutputReceived):
            live += event.chunk.data
        elif isinstance(event, TaskChanged):
            status = event.task.status
    assert status is TaskStatus.COMPLETED and live == text
    (task,) = (await client.list_tasks(limit=1))[0]
    replayed = ""
    async for event in client.follow(task.id, follow=False):  # replayed once it ended
        if isinstance(event, OutputReceived):
            replayed += event.chunk.data
    assert replayed == text
    stub = client._task_stub()
    call = stub.FollowTask(tasks_pb2.FollowTaskRequest(task_id=task.id))
    updates = [u async for u in call]
    assert await call.code() is grpc.StatusCode.OK
    assert len(updates) > 1 and all(u.ByteSize() <= SEND_LIMIT for u in updates)
    assert updates[0].task.id == task.id  # a replay opens with the task
    assert updates[-1].last and updates[-1].task.status == TaskStatus.COMPLETED
