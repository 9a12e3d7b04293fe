"""SubmitTasks: a client's submissions share one stream, each request followed on its own (real
server on loopback with mTLS and SQLite, real worker sessions)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from taskrun import convert
from taskrun.cli.client import Client, OutputReceived, TaskChanged
from taskrun.controlplane import auth, submit
from taskrun.core.models import TaskSpec, utcnow
from taskrun.core.status import TaskStatus
from taskrun.v1 import tasks_pb2
from tests.conftest import Cluster
from tests.faults import SilentProxy, fill, small_filesystem
from tests.integration.test_enrollment import start
from tests.integration.test_metrics import scrape, value
from tests.integration.test_security import token_client


def echo(text: str, **more: Any) -> TaskSpec:
    return TaskSpec(agent="echo", input=json.dumps({"text": text, **more}))


def stream_of(client: Client) -> object:
    stream = client._submits._stream
    assert stream is not None
    return stream.call


async def output_of(client: Client, spec: TaskSpec) -> tuple[str, TaskStatus]:
    text, status = "", TaskStatus.PENDING
    async for event in client.submit_and_follow(spec):
        if isinstance(event, OutputReceived):
            text += event.chunk.data
        elif isinstance(event, TaskChanged):
            status = event.task.status
    return text, status


async def test_one_after_another_and_side_by_side_on_one_stream(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=8)
    client = cluster.client()
    assert await output_of(client, echo("first")) == ("first", TaskStatus.COMPLETED)
    call = stream_of(client)
    for i in range(3):
        assert await output_of(client, echo(f"next {i}")) == (f"next {i}", TaskStatus.COMPLETED)
    texts = [f"{i:02d}" * 20 for i in range(12)]
    results = await asyncio.gather(
        *(output_of(client, echo(t, chunks=20, delay=0.01)) for t in texts)
    )
    assert results == [(t, TaskStatus.COMPLETED) for t in texts]  # nobody got another's output
    assert stream_of(client) is call
    assert len((await client.list_tasks(limit=100))[0]) == 16


async def test_a_refused_request_names_its_field_and_the_stream_goes_on(
    cluster: Cluster,
) -> None:
    server = await cluster.start_server(metrics_listen="127.0.0.1:0")
    await cluster.start_worker("worker-1")
    client = cluster.client()
    assert (await client.run(echo("up"))).status is TaskStatus.COMPLETED
    call = stream_of(client)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.run(TaskSpec(agent="no-such-agent", input="{}"))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "task.agent" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.run(TaskSpec(agent="echo", input="[1, 2]"))
    assert "task.input" in (caught.value.details() or "")
    assert (await client.run(echo("still here"))).status is TaskStatus.COMPLETED
    assert stream_of(client) is call
    assert len((await client.list_tasks())[0]) == 2  # the refused ones created nothing
    assert server.metrics_server is not None
    _, text = await scrape(server.metrics_server.port)
    assert value(text, 'taskrun_rejected_requests_total{reason="invalid_argument"}') == 2


async def test_the_protocol_names_what_is_wrong_and_stop_leaves_the_task_running(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    long = tasks_pb2.CreateAndFollowTaskRequest(
        task=convert.spec_to_pb(echo("ab", chunks=2, delay=60))
    )
    call = client._task_stub().SubmitTasks()
    await call.write(tasks_pb2.SubmitRequest(request_id=7, create=long))
    first = await call.read()
    assert first.request_id == 7 and first.update.created and first.update.task.id
    task_id = first.update.task.id
    refusals = [
        (tasks_pb2.SubmitRequest(request_id=7, create=long), "request_id: 7 is still followed"),
        (tasks_pb2.SubmitRequest(request_id=0, create=long), "request_id: must not be 0"),
        (tasks_pb2.SubmitRequest(request_id=8), "create: names no action"),
    ]
    for request, message in refusals:
        await call.write(request)
        while not (reply := await call.read()).HasField("error"):
            assert reply.request_id == 7  # the long task's own updates go on meanwhile
        assert reply.request_id == request.request_id
        assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert reply.error.message.startswith(message)
    await call.write(tasks_pb2.SubmitRequest(request_id=7, stop=True))
    await call.done_writing()
    rest = []
    async with asyncio.timeout(5):  # nothing is followed any more: the stream ends
        while (reply := await call.read()) is not grpc.aio.EOF:
            rest.append(reply)
    assert all(r.request_id == 7 and not r.update.last for r in rest)
    assert await call.code() is grpc.StatusCode.OK
    task, _ = await client.get_task(task_id)
    assert task.status in (TaskStatus.PENDING, TaskStatus.RUNNING)  # stopped following only


async def test_a_caller_that_stops_early_stops_only_its_own_request(cluster: Cluster) -> None:
    server = await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=4)
    client = cluster.client()
    stream = client.submit_and_follow(echo("ab", chunks=2, delay=60))
    async with contextlib.aclosing(stream):
        created = await anext(stream)
    assert isinstance(created, TaskChanged)
    async with asyncio.timeout(5):
        while server.engine.hub.following(created.task.id):
            await asyncio.sleep(0.01)  # the server let go of it
    assert await output_of(client, echo("after")) == ("after", TaskStatus.COMPLETED)


async def test_a_revoked_api_token_ends_the_stream_at_once(cluster: Cluster) -> None:
    await start(cluster)
    await cluster.start_worker("worker-1")
    admin = cluster.client()
    secret, info = await admin.create_api_token("submitter", ["submit"])
    program = token_client(cluster, secret)
    assert (await program.run(echo("before"))).status is TaskStatus.COMPLETED
    stream = program.submit_and_follow(echo("ab", chunks=2, delay=60))
    async with contextlib.aclosing(stream):
        await anext(stream)
        await admin.revoke_api_token(info.token_id)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with asyncio.timeout(5):
                async for _ in stream:
                    pass
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert f"API token {info.token_id} was revoked" in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await program.run(echo("after"))  # a new stream: refused when it opens
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_certificate_past_its_end_refuses_the_next_request_on_an_open_stream(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream reads its caller's certificate once, but checks it on every request: after
    the control plane's clock jumps past the certificate's end, the next request on the stream
    opened before is refused UNAUTHENTICATED and creates nothing."""
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    assert (await client.run(echo("before"))).status is TaskStatus.COMPLETED
    call = stream_of(client)
    jumped = utcnow() + timedelta(days=20 * 366)  # past any certificate the tests make
    monkeypatch.setattr(auth, "utcnow", lambda: jumped)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.run(echo("after"))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # refused on the stream opened before the jump, which it ended, not when another opened
    assert await call.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert "the client certificate expired at" in (refused.value.details() or "")
    monkeypatch.undo()
    tasks, _ = await cluster.client().list_tasks(limit=10)
    assert [t.input for t in tasks] == [echo("before").input]


async def test_an_idle_stream_does_not_hold_the_servers_stop(cluster: Cluster) -> None:
    """A client keeps its stream open between submissions: a stopping control plane ends it
    (UNAVAILABLE) at once instead of waiting out its grace for it."""
    server = await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    assert (await client.run(echo("idle after this"))).status is TaskStatus.COMPLETED
    started = time.monotonic()
    await server.stop(grace=20.0)
    cluster.server = None
    assert time.monotonic() - started < 10.0
    await cluster.start_server()
    assert (await client.run(echo("a new stream"))).status is TaskStatus.COMPLETED


async def test_a_request_past_the_streams_limit_is_refused_and_a_stop_still_read(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(submit, "MAX_FOLLOWED", 2)
    await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=4)
    client = cluster.client()
    long = tasks_pb2.CreateAndFollowTaskRequest(
        task=convert.spec_to_pb(echo("ab", chunks=2, delay=60))
    )
    call = client._task_stub().SubmitTasks()

    async def reply_to(request_id: int) -> tasks_pb2.SubmitUpdate:
        while True:
            reply: tasks_pb2.SubmitUpdate = await call.read()
            if reply.request_id == request_id:
                return reply

    for request_id in (1, 2, 3):
        await call.write(tasks_pb2.SubmitRequest(request_id=request_id, create=long))
    refused = await reply_to(3)
    assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert refused.error.message.startswith("request_id: 2 requests are followed")
    assert len((await client.list_tasks())[0]) == 2  # the third was not created
    await call.write(tasks_pb2.SubmitRequest(request_id=1, stop=True))
    await call.write(tasks_pb2.SubmitRequest(request_id=3, create=long))
    assert (await reply_to(3)).update.created  # room again once one was let go
    assert len((await client.list_tasks())[0]) == 3
    call.cancel()


async def test_a_stream_its_client_does_not_read_holds_back_nothing_else_and_loses_nothing(
    cluster: Cluster,
) -> None:
    server = await cluster.start_server()
    server.engine.hub._limit = 16  # a follower falls behind after 16 items it has not taken
    await cluster.start_worker("worker-1", capacity=8)
    # flow control windows that stay at 64 kB: the server cannot send it all
    client = cluster.client(options=[("grpc.http2.bdp_probe", 0)])
    call = client._task_stub().SubmitTasks()
    # a character per chunk: about 1 MB of updates in all
    texts = {i: f"<{i}>".ljust(5_000, "x") for i in range(1, 5)}
    for i, text in texts.items():
        spec = convert.spec_to_pb(echo(text, chunks=len(text)))
        create = tasks_pb2.CreateAndFollowTaskRequest(task=spec)
        await call.write(tasks_pb2.SubmitRequest(request_id=i, create=create))
    # nothing of it read: the tasks still finish, and another client is served meanwhile
    other = cluster.client()
    assert (await other.run(echo("meanwhile"))).status is TaskStatus.COMPLETED
    async with asyncio.timeout(60):
        while True:
            tasks, _ = await other.list_tasks(limit=100)
            if len(tasks) == 5 and all(t.status is TaskStatus.COMPLETED for t in tasks):
                break
            await asyncio.sleep(0.1)
    # what this test is about: the server could not send it all, and followers fell behind
    subs = [sub for group in server.engine.hub._subs.values() for sub in group]
    assert any(sub.lagged for sub in subs)
    # read at last: each request's output whole, once, in order, then its final state
    got = dict.fromkeys(texts, "")
    ended: set[int] = set()
    async with asyncio.timeout(60):
        while len(ended) < len(texts):
            reply = await call.read()
            assert reply.HasField("update") and reply.request_id not in ended
            got[reply.request_id] += "".join(c.data for c in reply.update.chunks)
            if reply.update.last:
                assert reply.update.task.status == TaskStatus.COMPLETED
                ended.add(reply.request_id)
    assert got == texts
    call.cancel()


async def test_a_message_that_does_not_parse_ends_the_stream_naming_request(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    client = cluster.client()
    raw = client.channel.stream_stream("/taskrun.v1.TaskService/SubmitTasks")
    call = raw()
    await call.write(b"\xff\xff\xff")  # not a SubmitRequest
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("request: ")


async def test_a_client_that_goes_away_leaves_nothing_followed(cluster: Cluster) -> None:
    server = await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=4)
    client = cluster.client()
    long = tasks_pb2.CreateAndFollowTaskRequest(
        task=convert.spec_to_pb(echo("ab", chunks=2, delay=60))
    )
    call = client._task_stub().SubmitTasks()
    task_ids = []
    for request_id in (1, 2):
        await call.write(tasks_pb2.SubmitRequest(request_id=request_id, create=long))
        while not (reply := await call.read()).update.created:
            pass  # the first task's own updates
        assert reply.request_id == request_id
        task_ids.append(reply.update.task.id)
    assert all(server.engine.hub.following(t) for t in task_ids)
    call.cancel()
    async with asyncio.timeout(5):
        while any(server.engine.hub.following(t) for t in task_ids):
            await asyncio.sleep(0.01)


async def test_a_store_that_cannot_write_refuses_the_request_and_the_stream_goes_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    with small_filesystem(tmp_path / "small", "4m") as small:
        await cluster.start_server(store=f"sqlite:{small / 'taskrun.db'}")
        await cluster.start_worker("worker-1")
        client = cluster.client()
        assert (await client.run(echo("before"))).status is TaskStatus.COMPLETED
        call = stream_of(client)
        filler = fill(small)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.run(echo("x" * 300_000))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == "the store cannot write: database or disk is full"
        filler.unlink()
        async with asyncio.timeout(15):
            while True:  # the store recovers; until then a submission is refused the same way
                with contextlib.suppress(grpc.aio.AioRpcError):
                    final = await client.run(echo("after"))
                    break
                await asyncio.sleep(0.1)
        assert final.status is TaskStatus.COMPLETED
        assert stream_of(client) is call  # refusals in band: the stream went on
        tasks, _ = await client.list_tasks()
        assert sorted(t.status for t in tasks) == [TaskStatus.COMPLETED] * 2  # nothing else
        await cluster.stop_server()


async def test_a_request_the_ended_stream_never_sent_goes_out_on_a_new_one(
    cluster: Cluster,
) -> None:
    """The stream can end between its reader noticing and the next request's write: nothing
    of that request was sent, so it is sent again on a new stream, not failed."""
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    assert (await client.run(echo("first"))).status is TaskStatus.COMPLETED
    ended = stream_of(client)
    ended.cancel()  # type: ignore[attr-defined]  # the reader has not run since
    assert (await client.run(echo("second"))).status is TaskStatus.COMPLETED
    assert stream_of(client) is not ended
    assert len((await client.list_tasks())[0]) == 2


async def test_a_path_gone_silent_under_the_stream_is_followed_again_once_back(
    cluster: Cluster,
) -> None:
    """The path under the shared stream goes silent mid-task: keepalive ends the stream, the
    task is followed again (not submitted again) once the path is back, and the next
    submission goes out on a new stream."""
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    proxy = await SilentProxy(int(cluster.address.rsplit(":", 1)[1])).start()
    fast_keepalive = [("grpc.keepalive_time_ms", 1_000), ("grpc.keepalive_timeout_ms", 1_000)]
    client = Client(
        proxy.address,
        ca=cluster.pki.ca_cert.read_bytes(),
        cert=cluster.pki.operator_cert.read_bytes(),
        key=cluster.pki.operator_key.read_bytes(),
        options=fast_keepalive,
    )
    cluster.clients.append(client)
    try:
        stream = client.submit_and_follow(echo("abc", chunks=3, delay=1))
        async with contextlib.aclosing(stream):
            created = await anext(stream)
            assert isinstance(created, TaskChanged)
            silent = stream_of(client)
            proxy.cut()
            async with asyncio.timeout(10):
                while client._submits._stream is not None:
                    await asyncio.sleep(0.05)  # keepalive noticed: the stream ended
            proxy.restore()
            rest = [e async for e in stream]
        assert isinstance(rest[-1], TaskChanged)
        assert rest[-1].task.status is TaskStatus.COMPLETED
        assert "".join(e.chunk.data for e in rest if isinstance(e, OutputReceived)) == "abc"
        assert (await client.run(echo("after"))).status is TaskStatus.COMPLETED
        assert stream_of(client) is not silent
        assert len((await client.list_tasks())[0]) == 2  # the first was not submitted again
    finally:
        await proxy.close()
