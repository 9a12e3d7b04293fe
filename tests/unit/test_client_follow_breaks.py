"""The client's follow against a server that cancels its stream (CANCELLED), as a stopping
control plane does to a call that came in as it stopped, or that is still open when its grace
ends. Following only reads, so the client follows again, as after UNAVAILABLE, instead of
giving up: the CLI printed "error: CANCELLED" across a server restart.

The server here is a TaskService written for the test, speaking the real protocol over mTLS:
what the real server does at stop is tested in tests/integration/test_create_and_follow.py;
this is about what the client makes of a status that server no longer sends there."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest

from taskrun import convert
from taskrun.cli.client import Client, OutputReceived, TaskChanged, TaskEvent
from taskrun.controlplane.pki import PkiPaths
from taskrun.core.ids import RunId, TaskId, new_task_id
from taskrun.core.models import OutputChunk, OutputKind, Task, TaskPolicy, TaskSpec
from taskrun.core.status import TaskStatus
from taskrun.v1 import tasks_pb2, tasks_pb2_grpc

RUN = RunId("run_01m8vpbcaq5cy1cdxadr3s0te4")


def _task(task_id: TaskId, status: TaskStatus) -> Task:
    now = datetime.now(UTC)
    return Task(
        id=task_id, agent="echo", input="{}", labels={}, policy=TaskPolicy(), status=status,
        created_at=now, updated_at=now, current_run_id=RUN,
    )  # fmt: skip


def _update(task: Task, *texts: str) -> tasks_pb2.TaskUpdate:
    update = tasks_pb2.TaskUpdate(task=convert.task_to_pb(task))
    for seq, text in enumerate(texts, 1):
        chunk = OutputChunk(RUN, 1, seq, text, OutputKind.TEXT, datetime.now(UTC))
        convert.chunk_to_pb(chunk, update.chunks.add())
    return update


class CancellingTaskService(tasks_pb2_grpc.TaskServiceServicer):
    """Creates one task; every stream on it sends what is new, then is cancelled by the server
    (the first `breaks` times), or sends the task's end."""

    def __init__(self, breaks: int) -> None:
        self.task_id = new_task_id()
        self.breaks = breaks
        self.follows: list[bool] = []  # per FollowTask: whether it was cancelled

    async def CreateAndFollowTask(
        self, request: tasks_pb2.CreateAndFollowTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tasks_pb2.TaskUpdate]:
        update = _update(_task(self.task_id, TaskStatus.RUNNING), "a")
        update.created = True
        yield update
        await context.abort(grpc.StatusCode.CANCELLED, "")

    async def FollowTask(
        self, request: tasks_pb2.FollowTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tasks_pb2.TaskUpdate]:
        assert request.task_id == self.task_id
        cancelled = len(self.follows) < self.breaks
        self.follows.append(cancelled)
        # as the real server, the stored output from the start: the client skips what it has
        running = _task(self.task_id, TaskStatus.RUNNING)
        yield _update(running, "a", *(["b"] * len(self.follows)))
        if cancelled:
            await context.abort(grpc.StatusCode.CANCELLED, "")
        yield _update(_task(self.task_id, TaskStatus.COMPLETED))


@contextlib.asynccontextmanager
async def serving(pki: PkiPaths, service: CancellingTaskService) -> AsyncIterator[Client]:
    server = grpc.aio.server()
    tasks_pb2_grpc.add_TaskServiceServicer_to_server(service, server)
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    client = Client(
        f"127.0.0.1:{port}",
        ca=pki.ca_cert.read_bytes(),
        cert=pki.operator_cert.read_bytes(),
        key=pki.operator_key.read_bytes(),
    )
    try:
        yield client
    finally:
        await client.close()
        await server.stop(None)


def _outcome(events: list[TaskEvent]) -> tuple[str, TaskStatus]:
    text = "".join(e.chunk.data for e in events if isinstance(e, OutputReceived))
    last = events[-1]
    assert isinstance(last, TaskChanged)
    return text, last.task.status


async def test_follow_goes_on_when_the_server_cancels_its_stream(pki: PkiPaths) -> None:
    service = CancellingTaskService(breaks=2)
    lost: list[grpc.StatusCode | None] = []
    async with serving(pki, service) as client:
        follow = client.follow(service.task_id, on_reconnect=lambda e: lost.append(e and e.code()))
        async with contextlib.aclosing(follow) as events:
            got = [event async for event in events]
    assert service.follows == [True, True, False]
    assert _outcome(got) == ("abbb", TaskStatus.COMPLETED)  # each piece once
    assert lost == [grpc.StatusCode.CANCELLED, None] * 2  # each stream had given something


async def test_submit_and_follow_hands_a_cancelled_stream_over_to_follow(pki: PkiPaths) -> None:
    service = CancellingTaskService(breaks=0)
    async with serving(pki, service) as client:
        stream = client.submit_and_follow(TaskSpec(agent="echo", input="{}"))
        async with contextlib.aclosing(stream) as events:
            got = [event async for event in events]
    assert service.follows == [False]
    assert _outcome(got) == ("ab", TaskStatus.COMPLETED)


async def test_a_stream_cancelled_before_it_gave_anything_is_an_error(pki: PkiPaths) -> None:
    """Nothing was ever received: no task is known to follow, so the error is the answer."""

    class Refusing(CancellingTaskService):
        async def FollowTask(self, request, context):  # type: ignore[no-untyped-def]
            await context.abort(grpc.StatusCode.CANCELLED, "")
            yield  # pragma: no cover

    service = Refusing(breaks=5)
    async with serving(pki, service) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with contextlib.aclosing(client.follow(service.task_id)) as events:
                async for _ in events:
                    pass
    assert raised.value.code() is grpc.StatusCode.CANCELLED
