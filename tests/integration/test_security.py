"""The security model, as a negative matrix and its positive counterparts, against a real control
plane on loopback (real TLS, a real SQLite file).

Every refusal is checked three ways: the exact gRPC status, a message naming the problem (the
field, where there is one), and a store left as it was. Refusals the server sees are audited, so
each also adds one `*_rejected` audit event with the reason; handshake failures never reach it.

Already covered elsewhere, not repeated here: a hello whose worker id differs from the
certificate, a worker certificate calling TaskService, an operator certificate opening a worker
session and reports for another worker's run (test_bad_input); revocation of a live stream and a
revoked worker's daemon reconnecting (test_revocation); handshake refusals against a bare gRPC
server (test_mtls_handshake); token reuse through `enroll`, renewal mid-run, an expired
certificate stopping the daemon (test_enrollment). API tokens and the public port: test_api_tokens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from taskrun.cli.client import Client
from taskrun.controlplane.app import RunningServer
from taskrun.controlplane.pki import (
    PkiPaths,
    init_pki,
    issue_client_cert,
    issue_server_cert,
    principal_of,
    write_private,
)
from taskrun.core.access import AuditEvent, AuditKind, TokenState
from taskrun.core.identity import Principal, PrincipalKind
from taskrun.core.ids import WorkerId
from taskrun.core.status import RunStatus, TaskStatus, WorkerStatus
from taskrun.core.store import ChangeSet, TaskQuery
from taskrun.v1 import (
    common_pb2,
    security_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    workers_pb2,
    workers_pb2_grpc,
)
from taskrun.v1 import security_pb2 as spb
from taskrun.worker.identity import enroll
from tests.conftest import Cluster
from tests.integration.test_bad_input import channel, expect
from tests.integration.test_enrollment import start, wait_for

OPERATOR_URI = "spiffe://taskrun/operator/admin"

# --- helpers -----------------------------------------------------------------------------------


def running(cluster: Cluster) -> RunningServer:
    assert cluster.server is not None
    return cluster.server


async def store_state(cluster: Cluster) -> tuple[object, ...]:
    """What a refusal must not change: tasks, runs, workers and tokens, as stored."""
    server = running(cluster)
    store = server.engine.store
    await server.engine.flush()
    tasks = (await store.list_tasks(TaskQuery(limit=1000))).tasks
    runs = [run for task in tasks for run in await store.list_runs(task.id)]
    workers = [
        (w.id, w.status, w.labels, w.enrolled_labels, w.enrolled_at, w.revoked_at)
        for w in await store.list_workers()
    ]
    bootstrap = [(t.id, t.used_at, t.revoked_at) for t in await store.list_bootstrap_tokens()]
    api = [(t.id, t.revoked_at) for t in await store.list_api_tokens()]
    return tasks, runs, workers, bootstrap, api


async def audit_mark(admin: Client) -> int:
    """The id of the newest audit event (0 when there is none)."""
    events = await admin.list_audit_events(limit=1)
    return events[0].id if events else 0


async def audit_since(admin: Client, mark: int) -> list[AuditEvent]:
    """Audit events recorded after `mark`, oldest first."""
    return sorted((e for e in await admin.list_audit_events() if e.id > mark), key=lambda e: e.id)


async def one_rejection(admin: Client, mark: int, kind: AuditKind, *needles: str) -> AuditEvent:
    """The single audit event since `mark`: of `kind`, with a reason containing `needles`."""
    (event,) = await audit_since(admin, mark)
    assert event.kind is kind, event
    for needle in needles:
        assert needle in event.detail, event.detail
    return event


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.01)


def tls_channel(cluster: Cluster) -> grpc.aio.Channel:
    """The public port, trusting our CA, presenting nothing."""
    creds = grpc.ssl_channel_credentials(root_certificates=cluster.pki.ca_cert.read_bytes())
    return grpc.aio.secure_channel(cluster.public_address, creds)


def mtls_channel(cluster: Cluster, cert_pem: bytes, key_pem: bytes) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=cluster.pki.ca_cert.read_bytes(),
        private_key=key_pem,
        certificate_chain=cert_pem,
    )
    return grpc.aio.secure_channel(cluster.address, creds)


def token_client(cluster: Cluster, token: str) -> Client:
    """A program on the public port with an API token (no client certificate)."""
    client = Client(cluster.public_address, ca=cluster.pki.ca_cert.read_bytes(), api_token=token)
    cluster.clients.append(client)
    return client


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def csr_for(key: Any, common_name: str = "edge-host", **extensions: x509.ExtensionType) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    for extension in extensions.values():
        builder = builder.add_extension(extension, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def tampered(csr_pem: bytes) -> bytes:
    """The CSR with one byte of its subject changed: still well-formed, signature broken."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    at = bytes(der).index(b"edge-host")  # inside CertificationRequestInfo, the signed part
    der[at] ^= 0x01
    armor = b"-----%s CERTIFICATE REQUEST-----\n"
    return armor % b"BEGIN" + base64.encodebytes(bytes(der)) + armor % b"END"


async def enroll_raw(
    cluster: Cluster, token: str, csr_pem: bytes, hostname: str = "edge-host"
) -> spb.EnrollResponse:
    async with tls_channel(cluster) as ch:
        stub = security_pb2_grpc.EnrollmentServiceStub(ch)
        response: spb.EnrollResponse = await stub.Enroll(
            spb.EnrollRequest(token=token, csr_pem=csr_pem, hostname=hostname), timeout=10
        )
        return response


async def refuse_enroll(
    cluster: Cluster,
    token: str,
    *needles: str,
    csr: bytes | None = None,
    code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED,
) -> None:
    """Enroll is refused with `code` and a message containing `needles`."""
    await expect(enroll_raw(cluster, token, csr or csr_for(new_key())), code, *needles)


async def token_state(admin: Client, token_id: str) -> TokenState:
    (info,) = [
        t
        for t in await admin.list_bootstrap_tokens(include_inactive=True)
        if t.token_id == token_id
    ]
    return info.state


def stale_reports(server: RunningServer) -> float:
    assert server.metrics is not None
    text = generate_latest(server.metrics.registry).decode()
    match = re.search(
        r'^taskrun_rejected_requests_total\{reason="stale_report"\} (\S+)$', text, re.M
    )
    assert match is not None
    return float(match.group(1))


def presented_serial(port: int, pki: PkiPaths) -> int:
    """The serial of the server certificate a new TLS handshake on `port` gets (verified)."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(pki.operator_cert, pki.operator_key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def cert_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


class RawWorker:
    """A worker session driven by hand over the stub: hello, then whatever the test sends."""

    def __init__(self, call: Any) -> None:
        self.call = call

    async def assignment(self) -> workers_pb2.RunAssignment:
        async with asyncio.timeout(10):
            while True:
                # grpc is untyped: the stream's deserializer makes ServerMessages (or EOF)
                message: workers_pb2.ServerMessage = await self.call.read()
                assert message is not grpc.aio.EOF
                if message.assignments:
                    (assigned,) = message.assignments
                    return assigned

    async def report(self, *updates: workers_pb2.RunStatusUpdate, **fields: Any) -> None:
        await self.call.write(workers_pb2.WorkerMessage(statuses=list(updates), **fields))


@contextlib.asynccontextmanager
async def raw_worker(
    cluster: Cluster, worker_id: str, held: Sequence[workers_pb2.RunAssignment] = ()
) -> AsyncIterator[RawWorker]:
    """`held`: runs the worker says it still runs (a reconnect)."""
    async with channel(cluster, worker_id) as ch:
        call = workers_pb2_grpc.RunServiceStub(ch).StreamConnect()
        hello = workers_pb2.WorkerHello(
            worker_id=worker_id,
            max_concurrent_runs=1,
            agents=[common_pb2.AgentSpec(name="echo")],
            held_runs=[
                workers_pb2.HeldRun(
                    run_id=r.run_id, attempt=r.attempt, status=common_pb2.RUN_STATUS_RUNNING
                )
                for r in held
            ],
        )
        await call.write(workers_pb2.WorkerMessage(hello=hello))
        first = await call.read()
        assert first.HasField("params")
        try:
            yield RawWorker(call)
        finally:
            call.cancel()


def status(run_id: str, attempt: int, value: common_pb2.RunStatus) -> workers_pb2.RunStatusUpdate:
    return workers_pb2.RunStatusUpdate(run_id=run_id, attempt=attempt, status=value)


@pytest.fixture
async def admin(cluster: Cluster) -> Client:
    """A control plane that can enroll (CA key, public port), and an operator client of it."""
    await start(cluster)
    return cluster.client()


# --- 1-3: the mTLS handshake of the real control plane ---------------------------------------


async def assert_handshake_refused(
    cluster: Cluster, admin: Client, cert_pem: bytes | None, key: bytes | None
) -> None:
    """A call on the mTLS port fails UNAVAILABLE before any handler: nothing audited or changed.

    The server closes the connection without a TLS alert, so the client learns no reason."""
    mark, before = await audit_mark(admin), await store_state(cluster)
    server = running(cluster)
    assert server.metrics is not None
    edge_before = dict(server.metrics.rejected.items())
    creds = grpc.ssl_channel_credentials(
        root_certificates=cluster.pki.ca_cert.read_bytes(),
        private_key=key,
        certificate_chain=cert_pem,
    )
    async with grpc.aio.secure_channel(cluster.address, creds) as ch:
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        request = tasks_pb2.CreateTaskRequest(agent="echo", input_json="{}")
        await expect(stub.CreateTask(request, timeout=5), grpc.StatusCode.UNAVAILABLE)
    assert await audit_since(admin, mark) == []
    assert dict(server.metrics.rejected.items()) == edge_before
    assert await store_state(cluster) == before


async def test_the_mtls_port_refuses_a_client_without_a_certificate(
    cluster: Cluster, admin: Client
) -> None:
    await assert_handshake_refused(cluster, admin, None, None)


async def test_the_mtls_port_refuses_a_certificate_from_another_ca(
    cluster: Cluster, admin: Client, tmp_path: Path
) -> None:
    other = init_pki(tmp_path / "other-pki", workers=())  # its operator: same name, other CA
    cert, key = other.operator_cert.read_bytes(), other.operator_key.read_bytes()
    await assert_handshake_refused(cluster, admin, cert, key)


async def test_the_mtls_port_refuses_an_expired_certificate(
    cluster: Cluster, admin: Client
) -> None:
    cert, key = issue_client_cert(
        cluster.pki,
        Principal(PrincipalKind.OPERATOR, "admin"),
        timedelta(minutes=1),
        now=datetime.now(UTC) - timedelta(minutes=10),
    )
    await assert_handshake_refused(cluster, admin, cert, key)


# --- 4: a worker revoked while offline --------------------------------------------------------


async def revoke_while_offline(cluster: Cluster, admin: Client, worker_id: str) -> None:
    await cluster.start_worker(worker_id)
    assert await cluster.stop_worker(worker_id) == 0

    async def offline() -> bool:
        return (await admin.get_worker(worker_id))[0].status is WorkerStatus.OFFLINE

    await eventually(offline)
    revoked = await admin.revoke_worker(worker_id, "disk image leaked")
    assert revoked.status is WorkerStatus.REVOKED


async def test_a_worker_revoked_while_offline_is_refused_its_stream(
    cluster: Cluster, admin: Client
) -> None:
    await revoke_while_offline(cluster, admin, "worker-3")
    mark, before = await audit_mark(admin), await store_state(cluster)

    async def connect() -> None:
        async with channel(cluster, "worker-3") as ch:
            call = workers_pb2_grpc.RunServiceStub(ch).StreamConnect()
            hello = workers_pb2.WorkerHello(worker_id="worker-3", max_concurrent_runs=1)
            await call.write(workers_pb2.WorkerMessage(hello=hello))
            await call.read()

    await expect(
        connect(),
        grpc.StatusCode.PERMISSION_DENIED,
        "worker worker-3 was revoked: disk image leaked",
    )
    event = await one_rejection(admin, mark, AuditKind.CONNECTION_REJECTED, "was revoked")
    assert event.principal == "worker worker-3"
    assert "worker-3" not in running(cluster).engine.sessions
    assert await store_state(cluster) == before


async def test_a_worker_revoked_while_offline_cannot_renew_its_certificate(
    cluster: Cluster, admin: Client
) -> None:
    await revoke_while_offline(cluster, admin, "worker-3")
    mark, before = await audit_mark(admin), await store_state(cluster)
    async with channel(cluster, "worker-3") as ch:
        stub = security_pb2_grpc.CertificateServiceStub(ch)
        request = spb.RenewCertificateRequest(csr_pem=csr_for(new_key()))
        await expect(
            stub.RenewCertificate(request, timeout=5),
            grpc.StatusCode.PERMISSION_DENIED,
            "worker worker-3 was revoked",
        )
    event = await one_rejection(admin, mark, AuditKind.RENEWAL_REJECTED, "was revoked")
    assert event.subject == "worker-3"
    assert await store_state(cluster) == before


# --- 5-9: bootstrap tokens and CSRs -----------------------------------------------------------


async def test_a_reused_bootstrap_token_is_refused(cluster: Cluster, admin: Client) -> None:
    token = await admin.create_bootstrap_token(ttl=600, worker_id="edge-5")
    await enroll_raw(cluster, token.token, csr_for(new_key()))
    mark, before = await audit_mark(admin), await store_state(cluster)

    await refuse_enroll(
        cluster, token.token, "token:", f"token {token.info.token_id} was already used"
    )
    event = await one_rejection(admin, mark, AuditKind.ENROLLMENT_REJECTED, "already used")
    assert event.principal == f"token {token.info.token_id}"
    assert token.token.split(".")[1] not in str(event)  # the secret is never recorded
    assert await store_state(cluster) == before


async def test_an_expired_bootstrap_token_is_refused_and_consumed_and_shows_who_presented_it(
    cluster: Cluster, admin: Client
) -> None:
    token = await admin.create_bootstrap_token(ttl=600, worker_id="edge-6")
    engine = running(cluster).engine
    stored = await engine.store.get_bootstrap_token(token.info.token_id)
    assert stored is not None
    await engine.commit(
        ChangeSet(bootstrap_tokens=[replace(stored, expires_at=datetime.now(UTC) - timedelta(1))])
    )
    mark = await audit_mark(admin)
    _, _, workers_before, _, _ = await store_state(cluster)

    await refuse_enroll(cluster, token.token, "token:", "expired at")
    # consumed (a replay fails) but shown as expired, not as used by the one who presented it
    assert await token_state(admin, token.info.token_id) is TokenState.EXPIRED
    await refuse_enroll(cluster, token.token, f"token {token.info.token_id} was expired")
    events = await audit_since(admin, mark)
    assert [e.kind for e in events] == [AuditKind.ENROLLMENT_REJECTED] * 2
    assert "expired at" in events[0].detail and "presented by host 'edge-host'" in events[0].detail
    assert "was expired" in events[1].detail
    _, _, workers_after, _, _ = await store_state(cluster)
    assert workers_after == workers_before == []  # no identity was issued


async def test_an_unknown_bootstrap_token_is_refused(cluster: Cluster, admin: Client) -> None:
    mark, before = await audit_mark(admin), await store_state(cluster)
    unknown = f"trb_{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}"

    await refuse_enroll(cluster, unknown, "token: unknown token")
    event = await one_rejection(admin, mark, AuditKind.ENROLLMENT_REJECTED, "unknown token")
    assert event.principal == f"token {unknown[4:20]}"
    assert await store_state(cluster) == before


async def test_a_wrong_secret_for_a_real_token_id_is_refused_and_does_not_burn_the_token(
    cluster: Cluster, admin: Client
) -> None:
    token = await admin.create_bootstrap_token(ttl=600, worker_id="edge-7")
    mark, before = await audit_mark(admin), await store_state(cluster)
    guess = f"trb_{token.info.token_id}.{secrets.token_urlsafe(32)}"

    await refuse_enroll(cluster, guess, "token: unknown token")
    await one_rejection(admin, mark, AuditKind.ENROLLMENT_REJECTED, "unknown token")
    assert await store_state(cluster) == before
    assert await token_state(admin, token.info.token_id) is TokenState.ACTIVE


@pytest.mark.parametrize(
    "text",
    ["", "hello", "trb_zz.short", f"tra_{'0' * 16}.{'A' * 43}", "trb_" + "0" * 16 + "." + "!" * 43],
    ids=["empty", "word", "bad syntax", "an api token", "bad secret alphabet"],
)
async def test_a_malformed_bootstrap_token_is_refused(
    cluster: Cluster, text: str, admin: Client
) -> None:
    mark, before = await audit_mark(admin), await store_state(cluster)

    await refuse_enroll(cluster, text, "token: is not a TaskRun bootstrap token")
    event = await one_rejection(admin, mark, AuditKind.ENROLLMENT_REJECTED, "bootstrap token")
    assert event.principal == "malformed token"
    assert await store_state(cluster) == before


async def test_a_tampered_csr_is_refused_and_leaves_the_token_usable(
    cluster: Cluster, admin: Client
) -> None:
    token = await admin.create_bootstrap_token(ttl=600, worker_id="edge-8")
    bad = tampered(csr_for(new_key()))
    assert not x509.load_pem_x509_csr(bad).is_signature_valid  # parses, but does not verify
    mark, before = await audit_mark(admin), await store_state(cluster)

    await refuse_enroll(
        cluster,
        token.token,
        "csr_pem: signature does not verify",
        csr=bad,
        code=grpc.StatusCode.INVALID_ARGUMENT,
    )
    await one_rejection(admin, mark, AuditKind.ENROLLMENT_REJECTED, "csr_pem", "signature")
    assert await store_state(cluster) == before
    assert await token_state(admin, token.info.token_id) is TokenState.ACTIVE
    enrolled = await enroll_raw(cluster, token.token, csr_for(new_key()))
    assert enrolled.worker_id == "edge-8"


@pytest.mark.parametrize(
    ("make_key", "named"),
    [
        (ed25519.Ed25519PrivateKey.generate, "got Ed25519"),
        (lambda: rsa.generate_private_key(65537, 1024), "got RSA-1024"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "got ECDSA secp384r1"),
    ],
    ids=["ed25519", "rsa-1024", "p-384"],
)
async def test_a_csr_with_a_key_other_than_p256_is_refused_naming_the_key_type(
    cluster: Cluster, make_key: Callable[[], Any], named: str, admin: Client
) -> None:
    token = await admin.create_bootstrap_token(ttl=600, worker_id="edge-9")
    mark, before = await audit_mark(admin), await store_state(cluster)

    await refuse_enroll(
        cluster,
        token.token,
        "csr_pem: key must be ECDSA P-256",
        named,
        csr=csr_for(make_key()),
        code=grpc.StatusCode.INVALID_ARGUMENT,
    )
    await one_rejection(admin, mark, AuditKind.ENROLLMENT_REJECTED, named)
    assert await store_state(cluster) == before
    assert await token_state(admin, token.info.token_id) is TokenState.ACTIVE


# --- 13: the names inside a CSR are ignored ---------------------------------------------------


async def test_the_names_inside_a_csr_are_ignored(cluster: Cluster, admin: Client) -> None:
    token = await admin.create_bootstrap_token(ttl=600, worker_id="edge-13")
    key = new_key()
    csr = csr_for(
        key,
        "admin",
        san=x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(OPERATOR_URI), x509.DNSName("localhost")]
        ),
        eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
    )

    enrolled = await enroll_raw(cluster, token.token, csr)

    assert enrolled.worker_id == "edge-13"
    cert = x509.load_pem_x509_certificate(enrolled.certificate_pem)
    assert principal_of(enrolled.certificate_pem) == Principal(PrincipalKind.WORKER, "edge-13")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://taskrun/worker/edge-13"
    ]
    assert san.get_values_for_type(x509.DNSName) == []
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-13"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # and it is a worker identity, not an operator: TaskService refuses it
    async with mtls_channel(cluster, enrolled.certificate_pem, key_pem(key)) as ch:
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        await expect(
            stub.ListTasks(tasks_pb2.ListTasksRequest(), timeout=5),
            grpc.StatusCode.PERMISSION_DENIED,
            "worker/edge-13",
            "operator identity",
        )


# --- 11: reports that are not for the current attempt on this worker --------------------------


async def retried_on(raw: RawWorker, admin: Client) -> tuple[str, workers_pb2.RunAssignment]:
    """A task whose first attempt failed on the raw worker, and its second attempt's assignment."""
    task = await admin.create_task("echo", {"text": "x"}, max_attempts=2, retry_on_failure=True)
    first = await raw.assignment()
    assert first.attempt == 1
    await raw.report(status(first.run_id, 1, common_pb2.RUN_STATUS_FAILED), message_seq=1)
    second = await raw.assignment()
    assert second.attempt == 2 and second.run_id != first.run_id
    return task.id, second


def assert_rejected_in_log(logs: Sequence[Mapping[str, Any]], run_id: str, what: set[str]) -> None:
    rejected = [e for e in logs if e["event"] == "report rejected" and e["run_id"] == run_id]
    assert {e["what"] for e in rejected} == what
    assert all(e["worker_id"] == "worker-4" and "not current" in e["reason"] for e in rejected)


async def test_a_report_with_a_stale_attempt_number_changes_nothing(
    cluster: Cluster, admin: Client
) -> None:
    server = running(cluster)
    async with raw_worker(cluster, "worker-4") as raw:
        task_id, current = await retried_on(raw, admin)
        before, counted = await store_state(cluster), stale_reports(server)
        with capture_logs() as logs:  # the current run, but with the previous attempt's number
            await raw.report(
                status(current.run_id, 1, common_pb2.RUN_STATUS_COMPLETED),
                chunks=[common_pb2.OutputChunk(run_id=current.run_id, attempt=1, seq=1, data="x")],
            )
            await wait_for(lambda: stale_reports(server) == counted + 2)
        assert await store_state(cluster) == before
        assert_rejected_in_log(logs, current.run_id, {"status", "output"})
    task, runs = await admin.get_task(task_id)
    assert task.status is not TaskStatus.COMPLETED
    assert [r.status for r in runs] == [RunStatus.FAILED, RunStatus.ASSIGNED]
    assert await server.engine.store.read_output([runs[1].id]) == []


async def test_a_report_for_a_finished_run_changes_nothing(cluster: Cluster, admin: Client) -> None:
    server = running(cluster)
    async with raw_worker(cluster, "worker-4") as raw:
        task_id, _ = await retried_on(raw, admin)
        _, runs = await admin.get_task(task_id)
        finished = runs[0]
        before, counted = await store_state(cluster), stale_reports(server)
        with capture_logs() as logs:
            await raw.report(
                status(finished.id, 1, common_pb2.RUN_STATUS_COMPLETED),
                chunks=[common_pb2.OutputChunk(run_id=finished.id, attempt=1, seq=1, data="x")],
            )
            await wait_for(lambda: stale_reports(server) == counted + 2)
        assert await store_state(cluster) == before
        assert_rejected_in_log(logs, finished.id, {"status", "output"})
    _, runs = await admin.get_task(task_id)
    assert runs[0].status is RunStatus.FAILED
    assert await server.engine.store.read_output([finished.id]) == []


# --- positive: labels bound at enrollment ---------------------------------------------------


async def test_labels_bound_to_the_token_win_over_the_labels_a_worker_announces(
    cluster: Cluster, admin: Client, tmp_path: Path
) -> None:
    token = await admin.create_bootstrap_token(ttl=600, worker_id="edge-eu", labels={"zone": "eu"})
    state = tmp_path / "state"
    await enroll(cluster.public_address, token.token, token.ca_fingerprint, state)
    us_only = await admin.create_task(
        "echo", {"text": "us"}, required_labels={"zone": "us"}, allow_unknown_agent=True
    )

    await cluster.start_worker("edge-eu", state_dir=state, labels={"zone": "us", "gpu": "none"})
    eu_only = await admin.create_task(
        "echo", {"text": "eu"}, required_labels={"zone": "eu"}, allow_unknown_agent=True
    )

    assert (await admin.wait(eu_only.id)).status is TaskStatus.COMPLETED
    worker, _ = await admin.get_worker("edge-eu")
    assert worker.labels == {"zone": "eu", "gpu": "none"}
    still, runs = await admin.get_task(us_only.id)
    assert still.status is TaskStatus.PENDING and runs[0].worker_id is None
    await admin.cancel_task(us_only.id)


# --- positive: server certificate rotation ----------------------------------------------------


async def start_on_copied_pki(cluster: Cluster, tmp_path: Path) -> PkiPaths:
    """A server whose certificate files are a private copy (the session PKI stays untouched)."""
    copy = PkiPaths.at(Path(shutil.copytree(cluster.pki.directory, tmp_path / "pki-copy")))
    await start(cluster, server_cert=copy.server_cert, server_key=copy.server_key)
    return copy


async def test_a_rotated_server_certificate_is_served_to_new_handshakes_while_streams_live_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    copy = await start_on_copied_pki(cluster, tmp_path)
    server = running(cluster)
    await cluster.start_worker("worker-1")
    session = server.engine.sessions[WorkerId("worker-1")].session_id
    old = cert_serial(copy.server_cert)
    assert await asyncio.to_thread(presented_serial, cluster.port, cluster.pki) == old

    issue_server_cert(copy.directory)
    new = cert_serial(copy.server_cert)

    assert new != old
    assert await asyncio.to_thread(presented_serial, cluster.port, cluster.pki) == new
    assert await asyncio.to_thread(presented_serial, cluster.public_port, cluster.pki) == new
    assert [s.serial for s in server.tls_sources] == [new, new]
    # the worker's stream, opened under the old certificate, carries on
    assert server.engine.sessions[WorkerId("worker-1")].session_id == session
    fresh = cluster.client()  # a new connection, verifying the new certificate
    task = await fresh.create_task("echo", {"text": "after rotation"})
    assert (await fresh.wait(task.id)).status is TaskStatus.COMPLETED
    _, runs = await fresh.get_task(task.id)
    assert [r.worker_id for r in runs] == ["worker-1"]
    assert server.engine.sessions[WorkerId("worker-1")].session_id == session


async def test_a_half_written_rotation_keeps_serving_the_old_certificate(
    cluster: Cluster, tmp_path: Path
) -> None:
    copy = await start_on_copied_pki(cluster, tmp_path)
    server = running(cluster)
    old = cert_serial(copy.server_cert)
    staged = PkiPaths.at(Path(shutil.copytree(copy.directory, tmp_path / "staged")))
    issue_server_cert(staged.directory)

    write_private(copy.server_key, staged.server_key.read_bytes())  # new key, old certificate

    assert await asyncio.to_thread(presented_serial, cluster.port, cluster.pki) == old
    assert server.tls_sources[0].rotations == 0
    async with Client(
        cluster.address,
        ca=cluster.pki.ca_cert.read_bytes(),
        cert=cluster.pki.operator_cert.read_bytes(),
        key=cluster.pki.operator_key.read_bytes(),
    ) as client:
        assert await client.list_workers() == []
    # once the certificate follows, the pair is consistent and is picked up
    write_private(copy.server_cert, staged.server_cert.read_bytes())
    new = cert_serial(staged.server_cert)
    assert await asyncio.to_thread(presented_serial, cluster.port, cluster.pki) == new
    assert server.tls_sources[0].rotations == 1


# --- positive: the audit log ------------------------------------------------------------------


async def test_the_audit_log_lists_security_events_in_order_by_kind_and_by_page(
    cluster: Cluster, admin: Client
) -> None:
    token = await admin.create_bootstrap_token(ttl=600, worker_id="audited-1")
    key = new_key()
    enrolled = await enroll_raw(cluster, token.token, csr_for(key), hostname="rack-7")
    async with mtls_channel(cluster, enrolled.certificate_pem, key_pem(key)) as ch:
        stub = security_pb2_grpc.CertificateServiceStub(ch)
        await stub.RenewCertificate(spb.RenewCertificateRequest(csr_pem=csr_for(new_key())))
    await admin.revoke_worker("audited-1", "decommissioned")
    _, api = await admin.create_api_token("ci", ["read"])
    await admin.revoke_api_token(api.token_id)
    spare = await admin.create_bootstrap_token(ttl=600, worker_id="audited-2")
    await admin.revoke_bootstrap_token(spare.info.token_id)
    await refuse_enroll(cluster, spare.token, f"token {spare.info.token_id} was revoked")

    newest_first = await admin.list_audit_events()

    assert [e.kind for e in reversed(newest_first)] == [
        AuditKind.BOOTSTRAP_TOKEN_CREATED,
        AuditKind.WORKER_ENROLLED,
        AuditKind.CERTIFICATE_RENEWED,
        AuditKind.WORKER_REVOKED,
        AuditKind.API_TOKEN_CREATED,
        AuditKind.API_TOKEN_REVOKED,
        AuditKind.BOOTSTRAP_TOKEN_CREATED,
        AuditKind.BOOTSTRAP_TOKEN_REVOKED,
        AuditKind.ENROLLMENT_REJECTED,
    ]
    ids = [e.id for e in newest_first]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    by_kind = {e.kind: e for e in reversed(newest_first)}  # the oldest of each kind
    assert by_kind[AuditKind.WORKER_ENROLLED].subject == "audited-1"
    assert "rack-7" in by_kind[AuditKind.WORKER_ENROLLED].detail
    assert by_kind[AuditKind.CERTIFICATE_RENEWED].principal == "worker audited-1"
    assert by_kind[AuditKind.BOOTSTRAP_TOKEN_CREATED].principal == OPERATOR_URI
    assert "was revoked" in by_kind[AuditKind.ENROLLMENT_REJECTED].detail

    lifecycle = await admin.list_audit_events(
        kinds=[AuditKind.WORKER_ENROLLED, AuditKind.CERTIFICATE_RENEWED, AuditKind.WORKER_REVOKED]
    )
    assert [e.kind for e in lifecycle] == [
        AuditKind.WORKER_REVOKED,
        AuditKind.CERTIFICATE_RENEWED,
        AuditKind.WORKER_ENROLLED,
    ]

    pages: list[AuditEvent] = []
    before_id = 0
    while page := await admin.list_audit_events(limit=3, before_id=before_id):
        assert len(page) <= 3
        pages += page
        before_id = page[-1].id
    assert pages == newest_first
    await expect(
        admin.list_audit_events(kinds=["nonsense"]), grpc.StatusCode.INVALID_ARGUMENT, "kinds"
    )
