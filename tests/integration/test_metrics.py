"""Prometheus metrics on the real endpoints, and gRPC health while the server stops."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from taskrun.core.ids import WorkerId
from taskrun.metrics_http import split_address
from tests.conftest import Cluster
from tests.integration.test_bad_input import channel
from tests.integration.test_http_api import http_client


async def scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    """(status line, body) of an HTTP GET on 127.0.0.1:port."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return head.splitlines()[0], body


def value(body: str, series: str) -> float:
    """The value of one sample, e.g. `taskrun_tasks{status="completed"}`."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", body, re.MULTILINE)
    assert match is not None, f"{series} not in the scrape"
    return float(match.group(1))


async def test_control_plane_metrics_match_what_happened(cluster: Cluster) -> None:
    server = await cluster.start_server(metrics_listen="127.0.0.1:0")
    assert server.metrics_server is not None
    await cluster.start_worker("worker-1", capacity=2, metrics_listen="127.0.0.1:0")
    client = cluster.client()
    for _ in range(3):
        task = await client.create_task("echo", {"text": "hi"}, allow_unknown_agent=True)
        await client.wait(task.id)
    waiting = await client.create_task("nobody-offers-this", {}, allow_unknown_agent=True)
    with pytest.raises(grpc.aio.AioRpcError):
        await client.create_task("echo", "[1, 2]")  # not an object: INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError):
        await cluster.client("worker-1").list_workers()  # a worker is no operator

    status, body = await scrape(server.metrics_server.port)
    assert status == "HTTP/1.1 200 OK"
    assert value(body, 'taskrun_tasks{status="completed"}') == 3
    assert value(body, 'taskrun_tasks{status="pending"}') == 1
    assert value(body, 'taskrun_tasks{status="running"}') == 0
    assert value(body, 'taskrun_queue_depth{agent="nobody-offers-this"}') == 1
    assert value(body, "taskrun_dispatch_latency_seconds_count") == 3
    assert value(body, 'taskrun_run_duration_seconds_count{agent="echo",outcome="completed"}') == 3
    assert value(body, 'taskrun_workers{status="online"}') == 1
    assert value(body, 'taskrun_rejected_requests_total{reason="invalid_argument"}') == 1
    assert value(body, 'taskrun_rejected_requests_total{reason="permission_denied"}') == 1
    assert value(body, 'taskrun_rejected_requests_total{reason="stale_report"}') == 0
    assert value(body, "taskrun_stream_messages_received_total") >= 3
    assert value(body, "taskrun_stream_messages_sent_total") >= 4  # params + 3 assignments
    await client.cancel_task(waiting.id)
    assert (await scrape(server.metrics_server.port, "/other"))[0].startswith("HTTP/1.1 404")


async def test_refusals_over_http_are_counted_like_those_over_grpc(cluster: Cluster) -> None:
    """The HTTP API is an edge too: a refused request is counted by the status it was refused
    with, by the time its answer arrives."""
    server = await cluster.start_server(
        metrics_listen="127.0.0.1:0", http_listen="127.0.0.1:0", public_listen=""
    )
    assert server.metrics_server is not None
    base = f"https://127.0.0.1:{server.http_port}"
    reader, _ = await cluster.client().create_api_token("reader", ["read"])
    async with http_client(cluster, base, None) as anonymous:
        assert (await anonymous.get("/v1/tasks")).status_code == 401
    async with http_client(cluster, base, reader) as client:
        body = {"agent": "echo", "input": {"text": "hi"}}
        assert (await client.post("/v1/tasks", json=body)).status_code == 403  # read only
        assert (await client.get("/v1/tasks", params={"status": "NOPE"})).status_code == 400
        assert (await client.get("/v1/tasks/tsk_nothing")).status_code == 404  # not a refusal
        _, text = await scrape(server.metrics_server.port)
    assert value(text, 'taskrun_rejected_requests_total{reason="unauthenticated"}') == 1
    assert value(text, 'taskrun_rejected_requests_total{reason="permission_denied"}') == 1
    assert value(text, 'taskrun_rejected_requests_total{reason="invalid_argument"}') == 1


async def test_worker_metrics_count_runs_by_outcome(cluster: Cluster) -> None:
    await cluster.start_server()
    daemon = await cluster.start_worker("worker-1", metrics_listen="127.0.0.1:0")
    client = cluster.client()
    for _ in range(2):
        await client.wait((await client.create_task("echo", {"text": "hi"})).id)
    text = generate_latest(daemon.metrics.registry).decode()
    assert value(text, 'taskrun_worker_runs_total{outcome="completed"}') == 2
    assert value(text, "taskrun_worker_active_runs") == 0


def test_metrics_address_must_be_host_and_port() -> None:
    assert split_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert split_address("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError):
        split_address("9464")


async def test_health_reports_not_serving_while_the_server_stops(cluster: Cluster) -> None:
    server = await cluster.start_server()
    await cluster.start_worker("worker-1")
    async with channel(cluster) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(server.stop(grace=1.0))
        cluster.server = None
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


async def test_security_metrics_show_certificate_expiry_and_audit_events(
    cluster: Cluster,
) -> None:
    server = await cluster.start_server(metrics_listen="127.0.0.1:0")
    assert server.metrics_server is not None
    await cluster.start_worker("worker-1")
    client = cluster.client()
    await client.create_bootstrap_token(worker_id="edge-1")
    await client.create_bootstrap_token(worker_id="edge-2")
    with pytest.raises(grpc.aio.AioRpcError):
        await cluster.client("worker-1").list_workers()  # refused: a worker is no operator

    _, body = await scrape(server.metrics_server.port)
    expires = server.engine.sessions[WorkerId("worker-1")].worker.certificate_expires_at
    assert expires is not None
    assert value(
        body, 'taskrun_worker_certificate_expiry_timestamp_seconds{worker="worker-1"}'
    ) == pytest.approx(expires.timestamp())
    assert value(body, 'taskrun_security_events_total{kind="bootstrap_token_created"}') == 2
    assert value(body, 'taskrun_security_events_total{kind="request_rejected"}') == 1
    assert value(body, 'taskrun_security_events_total{kind="worker_enrolled"}') == 0
