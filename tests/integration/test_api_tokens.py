"""Operators and programs: API tokens with scopes, and what the public (TLS-only) port serves.

Every refusal: the exact status, a message naming the problem, the store unchanged, and one
`request_rejected` audit event with the reason (helpers in test_security). A worker certificate
calling TaskService is in test_bad_input (test_worker_certificate_cannot_call_operator_services).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from taskrun.controlplane.pki import init_pki
from taskrun.core.access import AuditKind
from taskrun.core.status import RunStatus, TaskStatus, WorkerStatus
from taskrun.v1 import security_pb2 as spb
from taskrun.v1 import security_pb2_grpc, tasks_pb2, tasks_pb2_grpc, workers_pb2_grpc
from tests.conftest import Cluster
from tests.integration.test_bad_input import expect
from tests.integration.test_enrollment import start, wait_for
from tests.integration.test_security import (
    audit_mark,
    audit_since,
    csr_for,
    enroll_raw,
    eventually,
    new_key,
    one_rejection,
    running,
    store_state,
    tls_channel,
    token_client,
)

# --- refused -----------------------------------------------------------------------------------

UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED


async def test_an_operator_call_without_credentials_on_the_public_port_is_unauthenticated(
    cluster: Cluster,
) -> None:
    await start(cluster)
    admin = cluster.client()
    mark, before = await audit_mark(admin), await store_state(cluster)
    async with tls_channel(cluster) as ch:
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        request = tasks_pb2.CreateTaskRequest(agent="echo", input_json="{}")
        await expect(
            stub.CreateTask(request, timeout=5),
            grpc.StatusCode.UNAUTHENTICATED,
            "no credentials",
            "authorization: Bearer",
        )
    await one_rejection(admin, mark, AuditKind.REQUEST_REJECTED, "no credentials")
    assert await store_state(cluster) == before


async def test_a_read_only_api_token_cannot_cancel_a_task(cluster: Cluster) -> None:
    await start(cluster)
    daemon = await cluster.start_worker("worker-1")
    admin = cluster.client()
    task = await admin.create_task("echo", {"text": "abcdefghij", "chunks": 10, "delay": 0.3})

    async def run_started() -> bool:
        _, runs = await admin.get_task(task.id)
        return [r.status for r in runs] == [RunStatus.RUNNING]

    await eventually(run_started)
    secret, info = await admin.create_api_token("dashboard", ["read"])
    reader = token_client(cluster, secret)
    assert (await reader.get_task(task.id))[0].id == task.id  # reading is allowed
    mark = await audit_mark(admin)

    await expect(
        reader.cancel_task(task.id, "not yours"),
        grpc.StatusCode.PERMISSION_DENIED,
        f"api-token {info.token_id} (dashboard) holds scopes [read]",
        "needs 'submit'",
    )
    event = await one_rejection(admin, mark, AuditKind.REQUEST_REJECTED, "needs 'submit'")
    assert event.principal == f"api-token {info.token_id} (dashboard)"
    current, runs = await admin.get_task(task.id)
    assert current.status is TaskStatus.RUNNING and not current.cancel_requested
    assert [r.status for r in runs] == [RunStatus.RUNNING]
    assert daemon.runs  # the worker still runs it


async def test_a_revoked_api_token_is_refused_at_once(cluster: Cluster) -> None:
    await start(cluster)
    admin = cluster.client()
    secret, info = await admin.create_api_token("ci", ["submit"])
    program = token_client(cluster, secret)
    await program.list_tasks()  # works, and the connection stays open
    await admin.revoke_api_token(info.token_id)
    mark, before = await audit_mark(admin), await store_state(cluster)

    await expect(
        program.create_task("echo", {"text": "after revoke"}),
        grpc.StatusCode.UNAUTHENTICATED,
        f"authorization: API token {info.token_id} is revoked",
    )
    await one_rejection(admin, mark, AuditKind.REQUEST_REJECTED, "is revoked")
    assert await store_state(cluster) == before


async def test_an_expired_api_token_is_refused(cluster: Cluster) -> None:
    await start(cluster)
    admin = cluster.client()
    secret, info = await admin.create_api_token("short", ["read"], ttl=1)
    assert info.expires_at is not None
    expires_at = info.expires_at
    await wait_for(lambda: datetime.now(UTC) > expires_at, within=5)
    mark, before = await audit_mark(admin), await store_state(cluster)

    await expect(
        token_client(cluster, secret).list_tasks(),
        grpc.StatusCode.UNAUTHENTICATED,
        f"authorization: API token {info.token_id} is expired",
    )
    await one_rejection(admin, mark, AuditKind.REQUEST_REJECTED, "is expired")
    assert await store_state(cluster) == before


async def test_the_public_port_serves_no_worker_session_and_no_renewal(cluster: Cluster) -> None:
    await start(cluster)
    admin = cluster.client()
    mark = await audit_mark(admin)
    async with tls_channel(cluster) as ch:
        call = workers_pb2_grpc.RunServiceStub(ch).StreamConnect()
        await expect(call.read(), UNIMPLEMENTED, "Method not found")
        renew = security_pb2_grpc.CertificateServiceStub(ch).RenewCertificate(
            spb.RenewCertificateRequest(csr_pem=csr_for(new_key())), timeout=5
        )
        await expect(renew, UNIMPLEMENTED, "Method not found")
    assert await audit_since(admin, mark) == []
    assert running(cluster).engine.sessions == {}


async def test_the_public_port_serves_no_reflection(cluster: Cluster) -> None:
    await start(cluster)
    async with tls_channel(cluster) as ch:
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo()
        await expect(call.read(), UNIMPLEMENTED, "Method not found")


async def test_health_is_served_on_the_public_port_without_credentials(cluster: Cluster) -> None:
    await start(cluster)
    async with tls_channel(cluster) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("issuer", ["our CA", "another CA"])
async def test_a_client_certificate_on_the_public_port_grants_nothing(
    cluster: Cluster, tmp_path: Path, issuer: str
) -> None:
    """The public port never asks for a certificate, so even a real operator one is not seen."""
    await start(cluster)
    pki = cluster.pki if issuer == "our CA" else init_pki(tmp_path / "forged", workers=())
    admin = cluster.client()
    mark, before = await audit_mark(admin), await store_state(cluster)
    creds = grpc.ssl_channel_credentials(
        root_certificates=cluster.pki.ca_cert.read_bytes(),
        private_key=pki.operator_key.read_bytes(),
        certificate_chain=pki.operator_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(cluster.public_address, creds) as ch:
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        request = tasks_pb2.CreateTaskRequest(agent="echo", input_json="{}")
        await expect(
            stub.CreateTask(request, timeout=5), grpc.StatusCode.UNAUTHENTICATED, "no credentials"
        )
    await one_rejection(admin, mark, AuditKind.REQUEST_REJECTED, "no credentials")
    assert await store_state(cluster) == before


# --- positive ----------------------------------------------------------------------------------


async def test_a_submit_token_runs_a_task_over_the_public_port_but_cannot_drain_a_worker(
    cluster: Cluster,
) -> None:
    await start(cluster)
    await cluster.start_worker("worker-1")
    admin = cluster.client()
    secret, info = await admin.create_api_token("pipeline", ["submit"])
    program = token_client(cluster, secret)

    task = await program.create_task("echo", {"text": "over the public port", "chunks": 2})
    final = await program.wait(task.id)

    assert final.status is TaskStatus.COMPLETED
    mark = await audit_mark(admin)
    await expect(
        program.drain_worker("worker-1"),
        grpc.StatusCode.PERMISSION_DENIED,
        "holds scopes [submit]",
        "needs 'admin'",
    )
    await one_rejection(admin, mark, AuditKind.REQUEST_REJECTED, info.token_id, "needs 'admin'")
    worker, _ = await admin.get_worker("worker-1")
    assert worker.status is WorkerStatus.ONLINE


async def test_an_admin_token_creates_bootstrap_tokens_that_enroll(cluster: Cluster) -> None:
    await start(cluster)
    admin = cluster.client()
    secret, info = await admin.create_api_token("provisioner", ["admin"])
    program = token_client(cluster, secret)

    token = await program.create_bootstrap_token(ttl=300, worker_id="edge-admin")

    assert token.info.created_by == f"api-token {info.token_id} (provisioner)"
    assert token.ca_fingerprint.startswith("sha256:")
    assert token.public_port == cluster.public_port and token.session_port == cluster.port
    enrolled = await enroll_raw(cluster, token.token, csr_for(new_key()))
    assert enrolled.worker_id == "edge-admin"
    assert enrolled.session_port == cluster.port


async def test_revoking_an_api_token_ends_its_live_streams_at_once(cluster: Cluster) -> None:
    await start(cluster)
    await cluster.start_worker("worker-1")
    admin = cluster.client()
    secret, info = await admin.create_api_token("watcher", ["read"])
    reader = token_client(cluster, secret)
    task = await admin.create_task("echo", {"text": "abcdefghij", "chunks": 10, "delay": 0.15})
    events = reader.watch_events(snapshot=True)
    followed = reader.follow(task.id)
    await anext(events)  # both streams are up and waiting for news
    await anext(followed)

    await admin.revoke_api_token(info.token_id)

    for stream in (events, followed):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with asyncio.timeout(5):
                async for _ in stream:
                    pass
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert f"API token {info.token_id} was revoked" in (refused.value.details() or "")
    # the task itself is untouched: revoking a reader does not stop the work
    assert (await admin.wait(task.id)).status is TaskStatus.COMPLETED


async def test_with_the_public_api_off_the_public_port_serves_only_enrollment_and_health(
    cluster: Cluster,
) -> None:
    await start(cluster, public_operator_api=False)
    admin = cluster.client()  # the mTLS listener keeps every service
    secret, _ = await admin.create_api_token("ci", ["admin"])
    async with tls_channel(cluster) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        enroll = security_pb2_grpc.EnrollmentServiceStub(ch).Enroll(
            spb.EnrollRequest(token="trb_" + "0" * 16 + "." + "a" * 43, csr_pem=csr_for(new_key()))
        )
        await expect(enroll, grpc.StatusCode.UNAUTHENTICATED, "unknown token")
    program = token_client(cluster, secret)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await program.list_tasks()
    assert refused.value.code() is UNIMPLEMENTED
