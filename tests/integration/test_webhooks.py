"""Webhooks end to end: a real control plane (SQLite) and worker, a real HTTP receiver on
loopback that verifies every signature, retries, and a restart between attempts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskrun.core.webhooks import DeliveryStatus, verify
from tests.conftest import Cluster
from tests.integration.test_http_api import assert_problem, http_client, start_http

LOOPBACK = ["127.0.0.0/8"]


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool


@dataclass
class Receiver:
    """An HTTP endpoint on loopback that answers `fail_first` requests with 500, then 204."""

    secret: str = ""
    fail_first: int = 0
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        ok = bool(self.secret) and verify(self.secret, headers, body, time.time())
        self.requests.append(Received(headers, body, ok))
        self.arrived.set()
        if len(self.requests) <= self.fail_first:
            return Response("not now", status_code=500)
        return Response(status_code=204)

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def receiver(fail_first: int = 0) -> AsyncIterator[Receiver]:
    r = Receiver(fail_first=fail_first)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    r.port = sock.getsockname()[1]
    app = Starlette(routes=[Route("/hook", r.handle, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield r
    finally:
        server.should_exit = True
        await task
        sock.close()


async def start(cluster: Cluster, **overrides: object) -> None:
    settings: dict[str, object] = {
        "webhook_allow_networks": LOOPBACK,
        "webhook_retry_base": 0.05,
        "webhook_retry_max": 0.2,
    }
    await cluster.start_server(**{**settings, **overrides})


async def ended(cluster: Cluster, task_id: str) -> None:
    admin = cluster.client()
    async with asyncio.timeout(15):
        while not (await admin.get_task(task_id))[0].status.terminal:
            await asyncio.sleep(0.02)


async def delivered(cluster: Cluster, webhook_id: str, status: DeliveryStatus) -> Any:
    admin = cluster.client()
    async with asyncio.timeout(15):
        while True:
            found = await admin.list_webhook_deliveries(webhook_id)
            if found and all(d.status is status for d in found):
                return found
            await asyncio.sleep(0.02)


async def test_a_completed_task_is_delivered_signed_to_a_loopback_receiver(
    cluster: Cluster,
) -> None:
    await start(cluster)
    await cluster.start_worker("worker-1")
    admin = cluster.client()
    async with receiver() as hook_receiver:
        webhook, secret = await admin.create_webhook(
            hook_receiver.url, ["task.completed"], labels={"notify": "yes"}
        )
        hook_receiver.secret = secret
        assert secret.startswith("whsec_")
        ignored = await admin.create_task("echo", {"text": "quiet"})  # no label: not sent
        await ended(cluster, ignored.id)  # it ends before the one that is sent
        task = await admin.create_task("echo", {"text": "hi"}, labels={"notify": "yes"})
        await hook_receiver.wait_for(1)
        (got,) = hook_receiver.requests
        assert got.verified, got.headers
        body = json.loads(got.body)
        assert body["type"] == "task.completed"
        assert body["data"]["task"]["id"] == task.id
        assert body["data"]["task"]["status"] == "TASK_STATUS_COMPLETED"
        assert json.loads(body["data"]["task"]["result_json"]) == {"chars": 2, "chunks": 1}
        (delivery,) = await delivered(cluster, webhook.id, DeliveryStatus.SUCCEEDED)
        assert delivery.id == got.headers["webhook-id"]
        assert delivery.last_status_code == 204 and delivery.attempts == 1
        assert delivery.event_key == f"{task.id}:completed"
        tampered = dict(got.headers, **{"webhook-timestamp": str(int(time.time()) - 3600)})
        assert not verify(secret, tampered, got.body, time.time())
        assert not verify(secret, got.headers, got.body + b" ", time.time())


async def test_a_receiver_that_fails_twice_gets_the_third_attempt_and_a_restart_sends_nothing_twice(
    cluster: Cluster,
) -> None:
    # retries far apart enough to restart the control plane between the first and second try
    await start(cluster, webhook_retry_base=2.0, webhook_retry_max=2.0)
    await cluster.start_worker("worker-1")
    admin = cluster.client()
    async with receiver(fail_first=2) as hook_receiver:
        webhook, secret = await admin.create_webhook(hook_receiver.url, ["task.failed"])
        hook_receiver.secret = secret
        task = await admin.create_task("echo", {"text": "x", "fail": "broken"})
        await hook_receiver.wait_for(1)
        await cluster.stop_worker("worker-1")
        await cluster.stop_server()  # between the first (failed) attempt and the second
        assert len(hook_receiver.requests) == 1
        await start(cluster, webhook_retry_base=0.05, webhook_retry_max=0.1)
        await hook_receiver.wait_for(3)
        (delivery,) = await delivered(cluster, webhook.id, DeliveryStatus.SUCCEEDED)
        assert delivery.attempts == 3 and delivery.last_status_code == 204
        ids = {r.headers["webhook-id"] for r in hook_receiver.requests}
        assert ids == {delivery.id}  # one delivery, three attempts, the same id
        assert all(r.verified for r in hook_receiver.requests)
        assert json.loads(hook_receiver.requests[-1].body)["data"]["task"]["id"] == task.id
        # after the success, another restart finds nothing left to send
        await cluster.stop_server()
        await start(cluster)
        assert cluster.server is not None and cluster.server.webhooks is not None
        assert cluster.server.webhooks._pending == {}
        assert await cluster.server.engine.store.list_webhook_deliveries(pending=True) == []
        assert len(hook_receiver.requests) == 3


async def test_a_receiver_that_keeps_failing_is_given_up_after_max_attempts(
    cluster: Cluster,
) -> None:
    await start(cluster, webhook_max_attempts=2)
    await cluster.start_worker("worker-1")
    admin = cluster.client()
    async with receiver(fail_first=100) as hook_receiver:
        webhook, _ = await admin.create_webhook(hook_receiver.url, ["task.completed"])
        await admin.create_task("echo", {"text": "x"})
        (delivery,) = await delivered(cluster, webhook.id, DeliveryStatus.FAILED)
        assert delivery.attempts == 2 and delivery.last_status_code == 500
        assert "HTTP 500" in delivery.last_error
        assert len(hook_receiver.requests) == 2


async def test_loopback_targets_are_refused_unless_allowed_and_bad_input_names_the_field(
    cluster: Cluster,
) -> None:
    await cluster.start_server()  # default: no internal network allowed
    admin = cluster.client()
    cases = [
        ("http://127.0.0.1:9/hook", ["task.completed"], "url", "loopback"),
        ("http://10.1.2.3/hook", ["task.completed"], "url", "internal"),
        ("http://localhost:9/hook", ["task.completed"], "url", "internal"),
        ("ftp://hooks.example/x", ["task.completed"], "url", "http"),
        ("https://user:pw@hooks.example/x", ["task.completed"], "url", "credentials"),
        ("https://hooks.example/x", ["task.finished"], "events", "task.completed"),
        ("https://hooks.example/x", [], "events", "at least one"),
    ]
    for url, events, named, word in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.create_webhook(url, events)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{named}:"), caught.value.details()
        assert word in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.create_webhook("https://hooks.example/x", ["task.completed"], secret="s3")
    assert caught.value.details().startswith("secret:")
    assert await admin.list_webhooks() == []


async def test_webhooks_over_http_need_admin_to_create_and_read_to_list(cluster: Cluster) -> None:
    base = await start_http(cluster)
    admin = cluster.client()
    submit, _ = await admin.create_api_token("ci", ["submit"])
    boss, _ = await admin.create_api_token("ops", ["admin"])
    body = {"url": "https://hooks.example/taskrun", "events": ["task.failed"]}
    async with http_client(cluster, base, submit) as client:
        assert_problem(await client.post("/v1/webhooks", json=body), 403, "admin")
    async with http_client(cluster, base, boss) as client:
        created = await client.post("/v1/webhooks", json=body)
        assert created.status_code == 200, created.text
        hook_id = created.json()["webhook"]["id"]
        assert created.json()["secret"].startswith("whsec_")
        listed = (await client.get("/v1/webhooks")).json()["webhooks"]
        assert [h["id"] for h in listed] == [hook_id]
        assert "secret" not in listed[0]
        deliveries = await client.get(f"/v1/webhooks/{hook_id}/deliveries")
        assert deliveries.json()["deliveries"] == []
        bad = await client.post("/v1/webhooks", json={**body, "url": "http://127.0.0.1/x"})
        assert assert_problem(bad, 400)["field"] == "url"
        assert (await client.delete(f"/v1/webhooks/{hook_id}")).status_code == 200
        assert_problem(await client.delete(f"/v1/webhooks/{hook_id}"), 404, "webhook_id")


async def test_the_webhook_cli_creates_lists_shows_deliveries_and_deletes(cluster: Cluster) -> None:
    from tests.integration.test_access_cli import json_of, run_cli

    await start(cluster)
    await cluster.start_worker("worker-1")
    async with receiver() as hook_receiver:
        created = await json_of(
            cluster,
            "webhook",
            "create",
            hook_receiver.url,
            "--event",
            "task.completed,task.failed",
            "--agent",
            "echo",
        )
        hook_receiver.secret = created["secret"]
        assert created["events"] == ["task.completed", "task.failed"]
        assert [w["id"] for w in await json_of(cluster, "webhook", "list")] == [created["id"]]
        await cluster.client().create_task("echo", {"text": "cli"})
        await hook_receiver.wait_for(1)
        assert hook_receiver.requests[0].verified
        await delivered(cluster, created["id"], DeliveryStatus.SUCCEEDED)
        (shown,) = await json_of(cluster, "webhook", "deliveries", created["id"])
        assert shown["status"] == "succeeded" and shown["last_status_code"] == 204
        code, out, err = await run_cli(cluster, "webhook", "test", created["id"])
        assert code == 0, err
        assert "answered 204" in out
        tested = json.loads(hook_receiver.requests[-1].body)
        assert tested["type"] == "webhook.test" and tested["data"]["webhook_id"] == created["id"]
        assert hook_receiver.requests[-1].verified
        code, out, _ = await run_cli(cluster, "webhook", "delete", created["id"])
        assert code == 0 and "deleted" in out
        code, _, err = await run_cli(cluster, "webhook", "delete", created["id"])
        assert code != 0 and "no webhook" in err
        code, _, err = await run_cli(
            cluster, "webhook", "create", hook_receiver.url, "--event", "task.done"
        )
        assert code != 0 and "unknown event 'task.done'" in err


async def test_a_schedule_that_fires_is_announced_to_a_webhook_that_names_it(
    cluster: Cluster,
) -> None:
    from taskrun.core.schedule import Schedule

    await start(cluster)
    await cluster.start_worker("worker-1")
    admin = cluster.client()
    await admin.create_schedule(
        Schedule(name="brief", agent="echo", timezone="UTC", cron="0 8 * * *", input="{}")
    )
    async with receiver() as hook_receiver:
        webhook, secret = await admin.create_webhook(
            hook_receiver.url, ["schedule.fired", "task.completed"], schedule="brief"
        )
        hook_receiver.secret = secret
        await admin.create_task("echo", {"text": "not from the schedule"})
        _, task = await admin.trigger_schedule("brief")
        await hook_receiver.wait_for(2)
        kinds = [json.loads(r.body)["type"] for r in hook_receiver.requests]
        assert sorted(kinds) == ["schedule.fired", "task.completed"]
        assert {json.loads(r.body)["data"]["task"]["id"] for r in hook_receiver.requests} == {
            task.id
        }
        found = await delivered(cluster, webhook.id, DeliveryStatus.SUCCEEDED)
        assert sorted(d.event_key for d in found) == [f"{task.id}:completed", f"{task.id}:fired"]


async def test_a_dead_endpoint_never_slows_dispatch(cluster: Cluster) -> None:
    """A receiver that accepts connections and never answers: tasks still run at full speed,
    and each attempt is recorded as timed out."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # accepted by the kernel, never read: every request waits forever
    try:
        await start(cluster, webhook_timeout=1.0, webhook_max_attempts=1)
        await cluster.start_worker("worker-1")
        admin = cluster.client()
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/hook"
        webhook, _ = await admin.create_webhook(url, ["task.completed"])
        started = time.monotonic()
        tasks = [await admin.create_task("echo", {"text": str(n)}) for n in range(20)]
        for task in tasks:
            await ended(cluster, task.id)
        assert time.monotonic() - started < 5  # not 20 x the 1 s timeout
        found = await delivered(cluster, webhook.id, DeliveryStatus.FAILED)
        assert len(found) == 20
        assert all("no answer within 1s" in d.last_error for d in found)
    finally:
        hung.close()


async def test_a_name_that_resolves_to_an_internal_address_is_refused_when_sent(
    cluster: Cluster,
) -> None:
    await start(cluster)  # loopback allowed: the webhook is accepted
    admin = cluster.client()
    async with receiver() as hook_receiver:
        url = f"http://localhost:{hook_receiver.port}/hook"
        webhook, _ = await admin.create_webhook(url, ["task.completed"])
        await cluster.stop_server()
        await start(cluster, webhook_allow_networks=[], webhook_max_attempts=1)
        await cluster.start_worker("worker-1")
        await admin.create_task("echo", {"text": "x"})
        (delivery,) = await delivered(cluster, webhook.id, DeliveryStatus.FAILED)
        assert "localhost resolves to" in delivery.last_error
        assert "internal address" in delivery.last_error
        assert hook_receiver.requests == []
