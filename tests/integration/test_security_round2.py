"""Security, second round: each defect found by the outside attack, as a behaviour of
a real control plane on loopback with real certificates (short-lived ones made here)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from taskrun.cli.client import Client
from taskrun.controlplane.pki import issue_client_cert
from taskrun.core.access import AuditKind, Scope
from taskrun.core.identity import Principal, PrincipalKind
from taskrun.core.models import TaskSpec
from taskrun.v1 import security_pb2 as spb
from taskrun.v1 import security_pb2_grpc, tasks_pb2, workers_pb2, workers_pb2_grpc
from tests.conftest import Cluster
from tests.integration.test_access_cli import run_cli
from tests.integration.test_security import (
    audit_mark,
    audit_since,
    csr_for,
    enroll_raw,
    key_pem,
    mtls_channel,
    new_key,
    running,
    tls_channel,
    token_client,
)

# An exception class name, a traceback, or a Python repr of a type: never in a reply.
INTERNALS = re.compile(r"Traceback|[A-Z][A-Za-z]*(Error|Exception)\b|<class |File \"")


def short_lived(cluster: Cluster, principal: Principal, seconds: float) -> tuple[bytes, bytes]:
    """A certificate of `principal` that expires `seconds` from now, and its key."""
    key = new_key()
    cert, _ = issue_client_cert(
        cluster.pki, principal, timedelta(seconds=seconds), public_key=key.public_key()
    )
    return cert, key_pem(key)


async def until_expired(cert_pem: bytes) -> None:
    end = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
    await asyncio.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds()) + 1.1)


def clean(details: str | None) -> str:
    """The message of a refusal, checked to hold nothing of our internals."""
    assert details is not None
    assert not INTERNALS.search(details), details
    return details


async def refused(call, code: grpc.StatusCode, *needles: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    details = clean(err.value.details())
    assert err.value.code() is code, details
    for needle in needles:
        assert needle in details, details
    return details


@pytest.fixture
async def admin(cluster: Cluster) -> Client:
    await cluster.start_server(ca_key=cluster.pki.ca_key, public_listen="127.0.0.1:0")
    return cluster.client()


# --- 1: expiry binds per call -------------------------------------------------------------------


async def test_an_expired_operator_certificate_is_refused_on_a_connection_opened_before(
    cluster: Cluster, admin: Client
) -> None:
    cert, key = short_lived(cluster, Principal(PrincipalKind.OPERATOR, "short"), 3)
    client = Client(cluster.address, ca=cluster.pki.ca_cert.read_bytes(), cert=cert, key=key)
    cluster.clients.append(client)
    await client.list_workers()  # the connection opens while the certificate is valid
    await until_expired(cert)
    mark = await audit_mark(admin)

    await refused(client.list_workers(), grpc.StatusCode.UNAUTHENTICATED, "expired at")
    await refused(
        client.create_api_token("outlives-the-cert", [Scope.ADMIN]),
        grpc.StatusCode.UNAUTHENTICATED,
        "expired at",
    )
    assert [t.name for t in await admin.list_api_tokens()] == []
    events = await audit_since(admin, mark)
    assert [e.kind for e in events] == [AuditKind.REQUEST_REJECTED] * 2
    assert events[0].principal == "spiffe://taskrun/operator/short"
    assert events[0].detail.endswith("(call /taskrun.v1.WorkerService/ListWorkers)")
    assert events[1].detail.endswith("(call /taskrun.v1.AccessService/CreateApiToken)")


async def test_an_expired_worker_certificate_cannot_renew_on_its_open_channel(
    cluster: Cluster, admin: Client
) -> None:
    cert, key = short_lived(cluster, Principal(PrincipalKind.WORKER, "worker-2"), 3)
    async with mtls_channel(cluster, cert, key) as ch:
        stub = security_pb2_grpc.CertificateServiceStub(ch)
        request = spb.RenewCertificateRequest(csr_pem=csr_for(new_key()))
        await stub.RenewCertificate(request, timeout=5)  # valid: renews
        await until_expired(cert)
        await refused(
            stub.RenewCertificate(request, timeout=5),
            grpc.StatusCode.UNAUTHENTICATED,
            "expired at",
        )
        # and nothing else on that connection works either, not even the anonymous methods
        enroll = security_pb2_grpc.EnrollmentServiceStub(ch).Enroll(
            spb.EnrollRequest(token="trb_x", csr_pem=b"x"), timeout=5
        )
        await refused(enroll, grpc.StatusCode.UNAUTHENTICATED, "expired at")


# --- 3: malformed requests are INVALID_ARGUMENT naming the field --------------------------------


def raw_call(ch: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    """A unary method that sends bytes as they are (no serializer)."""
    return ch.unary_unary(method, request_serializer=None, response_deserializer=None)


def der_csr_with(old: bytes, new: bytes) -> bytes:
    """A P-256 CSR with one OID's bytes replaced (so its key cannot be loaded)."""
    csr = x509.load_pem_x509_csr(csr_for(new_key()))
    der = csr.public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1
    return x509_pem(der.replace(old, new))


def x509_pem(der: bytes) -> bytes:
    import base64

    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey
P256 = bytes.fromhex("06082a8648ce3d030107")  # prime256v1
UNKNOWN_KEY_ALGORITHM = bytes.fromhex("06072a8648ce3d0209")
UNKNOWN_CURVE = bytes.fromhex("06082a8648ce3d030109")

TASKS = "/taskrun.v1.TaskService/"


def create_task_bytes(agent: bytes, input_json: bytes = b"{}") -> bytes:
    """A CreateTaskRequest encoded by hand, so that a field can hold bytes that are not UTF-8."""
    return b"\x0a" + bytes([len(agent)]) + agent + b"\x12" + bytes([len(input_json)]) + input_json


@pytest.mark.parametrize(
    ("method", "payload", "field"),
    [
        pytest.param(TASKS + "CreateTask", os.urandom(64) + b"\xff", "request", id="random bytes"),
        pytest.param(
            TASKS + "CreateTask", create_task_bytes(b"ec\xffho"), "request", id="bad utf-8"
        ),
        pytest.param(
            TASKS + "CreateTask",
            tasks_pb2.CreateTaskRequest(
                agent="echo", input_json='{"a": ' + "[" * 10_000 + "]" * 10_000 + "}"
            ).SerializeToString(),
            "input_json: is nested too deep",
            id="json nested 10000 deep",
        ),
        pytest.param(
            TASKS + "CreateTask",
            tasks_pb2.CreateTaskRequest(
                agent="echo", input_json='{"a": ' + "7" * 5000 + "}"
            ).SerializeToString(),
            "input_json: holds a number too long",
            id="5000-digit integer",
        ),
        pytest.param(
            "/taskrun.v1.AccessService/CreateApiToken",
            spb.CreateApiTokenRequest(
                name="forever", scopes=["read"], ttl_seconds=2**62
            ).SerializeToString(),
            "ttl_seconds: must be at most",
            id="ttl of 2^62 seconds",
        ),
    ],
)
async def test_a_malformed_request_is_invalid_argument_naming_the_field_with_one_log_line(
    cluster: Cluster, admin: Client, method: str, payload: bytes, field: str
) -> None:
    with capture_logs() as logs:
        await refused(
            raw_call(admin.channel, method)(payload, timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            field,
        )
    assert len(logs) <= 1, logs


@pytest.mark.parametrize(
    ("old", "new"),
    [(EC_PUBLIC_KEY, UNKNOWN_KEY_ALGORITHM), (P256, UNKNOWN_CURVE)],
    ids=["unknown key algorithm", "unknown curve"],
)
async def test_an_anonymous_csr_with_an_unknown_key_oid_is_invalid_argument_with_one_log_line(
    cluster: Cluster, admin: Client, old: bytes, new: bytes
) -> None:
    token = await admin.create_bootstrap_token(ttl=600, worker_id="edge-oid")
    with capture_logs() as logs:
        await refused(
            enroll_raw(cluster, token.token, der_csr_with(old, new)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "csr_pem: key must be ECDSA P-256",
        )
    assert len(logs) <= 1, logs
    assert await enroll_raw(cluster, token.token, csr_for(new_key()))  # the token stays usable


async def test_a_malformed_message_on_a_worker_stream_ends_it_invalid_argument(
    cluster: Cluster, admin: Client
) -> None:
    ch = mtls_channel(
        cluster,
        cluster.pki.worker_cert("worker-4").read_bytes(),
        cluster.pki.worker_key("worker-4").read_bytes(),
    )
    async with ch:
        call = ch.stream_stream(
            "/taskrun.v1.RunService/StreamConnect",
            request_serializer=None,
            response_deserializer=None,
        )()
        await call.write(b"\x0a\x05\xff\xff\xff\xff\xff")
        await refused(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "request")
    assert "worker-4" not in running(cluster).engine.sessions


# --- 4: whole-string matching -------------------------------------------------------------------


async def test_a_worker_id_ending_in_a_newline_cannot_stand_in_for_a_revoked_one(
    cluster: Cluster, admin: Client
) -> None:
    token = await admin.create_bootstrap_token(ttl=600, worker_id="enr-a")
    await enroll_raw(cluster, token.token, csr_for(new_key()))
    await admin.revoke_worker("enr-a", "laptop stolen")

    await refused(
        admin.create_bootstrap_token(ttl=600, worker_id="enr-a\n"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "worker_id",
    )
    await refused(admin.create_task("echo\n", {}), grpc.StatusCode.INVALID_ARGUMENT, "agent")
    await refused(
        admin.create_task("echo", {}, labels={"team\n": "a"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "labels",
    )
    await refused(
        admin.create_task("echo", {}, labels={"team": "a\n"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "labels",
    )


# --- 6: file modes ------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- 5: text that is not UTF-8 ------------------------------------------------------------------


async def test_an_input_holding_a_lone_surrogate_is_refused_naming_input_json(
    cluster: Cluster, admin: Client
) -> None:
    await refused(
        admin.create_task("echo", '{"t": "\\ud800"}'),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input_json:",
        "surrogate",
    )
    await refused(
        admin.create_task("echo", '{"\\udfff": 1}'), grpc.StatusCode.INVALID_ARGUMENT, "input_json:"
    )


async def test_task_list_and_get_print_json_even_when_a_stored_input_holds_a_lone_surrogate(
    cluster: Cluster, admin: Client
) -> None:
    # stored before submissions were checked: written through the engine, as the old server did
    engine = running(cluster).engine
    [(task, _)] = await engine.create_tasks([TaskSpec(agent="echo", input='{"t": "\\ud800"}')])
    for args in (("task", "list"), ("task", "get", task.id)):
        code, out, err = await run_cli(cluster, *args, "--output", "json")
        assert code == 0, err
        doc = json.loads(out)
        doc = doc["tasks"][0] if "tasks" in doc else doc
        assert doc["input"] == {"t": "\ud800"}  # the same value, escaped in the JSON text
    code, out, err = await run_cli(cluster, "task", "get", task.id)
    assert code == 0, err


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def test_the_database_its_wal_and_shm_are_0600_in_a_0700_directory(
    cluster: Cluster, tmp_path: Path, umask_022: None
) -> None:
    db = tmp_path / "site" / ".taskrun" / "taskrun.db"
    await cluster.start_server(store=f"sqlite:{db}")
    client = cluster.client()
    await client.create_task("echo", {"text": "secret input"}, allow_unknown_agent=True)
    await running(cluster).engine.flush()
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert path.exists() and mode(path) == 0o600, (path, oct(mode(path)))
    assert mode(db.parent) == 0o700 and mode(db.parent.parent) == 0o700


async def test_an_existing_world_readable_database_and_taskrun_directory_are_tightened(
    cluster: Cluster, tmp_path: Path, umask_022: None
) -> None:
    db = tmp_path / ".taskrun" / "taskrun.db"
    await cluster.start_server(store=f"sqlite:{db}")
    await cluster.stop_server()
    for path in (db.parent, db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if path.exists():
            path.chmod(0o755 if path.is_dir() else 0o644)
    await cluster.start_server(store=f"sqlite:{db}")
    assert mode(db) == 0o600 and mode(db.parent) == 0o700
    for path in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert not path.exists() or mode(path) == 0o600


def test_a_worker_state_directory_and_taskrun_above_it_are_0700(
    tmp_path: Path, umask_022: None
) -> None:
    from taskrun.worker.identity import ensure_state_dir

    ensure_state_dir(tmp_path / ".taskrun" / "worker")
    assert mode(tmp_path / ".taskrun") == 0o700
    assert mode(tmp_path / ".taskrun" / "worker") == 0o700


# --- 7: audit rows say which call, whose token, and a flood hides nobody ------------------------


async def test_a_refusal_for_a_revoked_or_unknown_api_token_records_the_token_id_it_claimed(
    cluster: Cluster, admin: Client
) -> None:
    secret, info = await admin.create_api_token("ci", [Scope.READ])
    await admin.revoke_api_token(info.token_id)
    unknown = f"tra_{'ab' * 8}.{'A' * 43}"
    mark = await audit_mark(admin)
    for token in (secret, unknown):
        program = token_client(cluster, token)
        await refused(program.list_workers(), grpc.StatusCode.UNAUTHENTICATED)
    revoked, stranger = await audit_since(admin, mark)
    assert revoked.principal == f"api-token {info.token_id}", revoked
    assert stranger.principal == f"api-token {'ab' * 8}", stranger
    assert revoked.detail.endswith("(call /taskrun.v1.WorkerService/ListWorkers)")
    assert secret.split(".")[1] not in str(revoked)  # never the secret


async def test_a_flood_of_anonymous_refusals_does_not_hide_a_worker_trying_to_revoke_a_worker(
    cluster: Cluster, admin: Client
) -> None:
    mark = await audit_mark(admin)
    async with tls_channel(cluster) as ch:
        stub = workers_pb2_grpc.WorkerServiceStub(ch)
        for _ in range(150):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ListWorkers(workers_pb2.ListWorkersRequest(), timeout=5)
    worker = mtls_channel(
        cluster,
        cluster.pki.worker_cert("worker-6").read_bytes(),
        cluster.pki.worker_key("worker-6").read_bytes(),
    )
    async with worker as ch:
        attempt = workers_pb2_grpc.WorkerServiceStub(ch).RevokeWorker(
            workers_pb2.RevokeWorkerRequest(worker_id="worker-1"), timeout=5
        )
        await refused(attempt, grpc.StatusCode.PERMISSION_DENIED, "needs an operator identity")
    events = [e for e in await admin.list_audit_events(limit=1000) if e.id > mark]
    anonymous = [e for e in events if e.principal == ""]
    assert len(anonymous) == 100  # capped per source …
    [attempted] = [e for e in events if e.principal == "spiffe://taskrun/worker/worker-6"]
    assert attempted.detail.endswith("(call /taskrun.v1.WorkerService/RevokeWorker)")


# --- 8: bounded echoes --------------------------------------------------------------------------


async def test_a_100kb_label_value_in_a_hello_is_not_echoed_in_the_reply_or_the_log(
    cluster: Cluster, admin: Client
) -> None:
    huge = "v" * 100_000
    ch = mtls_channel(
        cluster,
        cluster.pki.worker_cert("worker-4").read_bytes(),
        cluster.pki.worker_key("worker-4").read_bytes(),
    )
    with capture_logs() as logs:
        async with ch:
            call = workers_pb2_grpc.RunServiceStub(ch).StreamConnect()
            hello = workers_pb2.WorkerHello(
                worker_id="worker-4", max_concurrent_runs=1, labels={"team": huge + "!"}
            )
            await call.write(workers_pb2.WorkerMessage(hello=hello))
            details = await refused(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "hello.labels")
    assert len(details) < 600, len(details)
    assert "(100001 characters)" in details
    assert logs and all(len(str(entry)) < 2000 for entry in logs), [len(str(e)) for e in logs]


# --- operators: short-lived certificates from `taskrun login`, revoked with their token ---------


async def test_login_gives_a_short_lived_operator_certificate_that_dies_with_its_token(
    cluster: Cluster, admin: Client, tmp_path: Path
) -> None:
    secret, info = await admin.create_api_token("alice", [Scope.ADMIN])
    out = tmp_path / "login"
    code, stdout, err = await run_cli(
        cluster,
        "login",
        "--out",
        str(out),
        "--ttl",
        "2h",
        server=cluster.public_address,
        TASKRUN_API_TOKEN=secret,
    )
    assert code == 0, err
    assert mode(out / "operator-key.pem") == 0o600 and mode(out) == 0o700
    cert = x509.load_pem_x509_certificate((out / "operator.pem").read_bytes())
    lifetime = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(hours=1.9) < lifetime <= timedelta(hours=2)
    identity = f"spiffe://taskrun/operator/api-token-{info.token_id}"
    assert identity in stdout and f"TASKRUN_SERVER=127.0.0.1:{cluster.port}" in stdout

    operator = Client(
        cluster.address,
        ca=(out / "ca.pem").read_bytes(),
        cert=(out / "operator.pem").read_bytes(),
        key=(out / "operator-key.pem").read_bytes(),
    )
    cluster.clients.append(operator)
    await operator.list_workers()  # an operator: every scope, on the mTLS listener
    mark = await audit_mark(admin)
    await admin.revoke_api_token(info.token_id)
    await refused(operator.list_workers(), grpc.StatusCode.UNAUTHENTICATED, info.token_id)
    refusal = [e for e in await audit_since(admin, mark) if e.kind is AuditKind.REQUEST_REJECTED]
    assert [e.principal for e in refusal] == [identity]


async def test_login_needs_an_admin_token_and_refuses_certificates_and_long_lifetimes(
    cluster: Cluster, admin: Client
) -> None:
    csr = csr_for(new_key())
    reader, _ = await admin.create_api_token("reader", [Scope.READ])
    await refused(
        token_client(cluster, reader).issue_operator_certificate(csr),
        grpc.StatusCode.PERMISSION_DENIED,
        "needs 'admin'",
    )
    await refused(
        admin.issue_operator_certificate(csr),
        grpc.StatusCode.FAILED_PRECONDITION,
        "log in with an admin API token",
    )
    boss, _ = await admin.create_api_token("boss", [Scope.ADMIN])
    await refused(
        token_client(cluster, boss).issue_operator_certificate(csr, ttl=25 * 3600),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ttl_seconds: must be between 0",
    )


async def test_a_login_certificate_never_outlives_its_token(
    cluster: Cluster, admin: Client
) -> None:
    boss, _ = await admin.create_api_token("short", [Scope.ADMIN], ttl=600)
    issued = await token_client(cluster, boss).issue_operator_certificate(csr_for(new_key()))
    assert issued.expires_at - datetime.now(UTC) <= timedelta(seconds=600)


async def test_varying_the_claimed_token_id_does_not_buy_a_fresh_refusal_budget(
    cluster: Cluster, admin: Client
) -> None:
    mark = await audit_mark(admin)
    async with tls_channel(cluster) as ch:
        stub = workers_pb2_grpc.WorkerServiceStub(ch)
        for i in range(150):
            bearer = (("authorization", f"Bearer tra_{i:016x}.{'A' * 43}"),)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ListWorkers(workers_pb2.ListWorkersRequest(), metadata=bearer)
    events = [e for e in await admin.list_audit_events(limit=1000) if e.id > mark]
    assert len(events) == 100  # one source: this host, whatever token ids it claims


async def test_revoking_the_token_ends_the_live_streams_of_its_login_certificate(
    cluster: Cluster, admin: Client
) -> None:
    secret, info = await admin.create_api_token("bob", [Scope.ADMIN])
    key = new_key()
    issued = await token_client(cluster, secret).issue_operator_certificate(csr_for(key))
    operator = Client(
        cluster.address,
        ca=cluster.pki.ca_cert.read_bytes(),
        cert=issued.certificate_pem,
        key=key_pem(key),
    )
    cluster.clients.append(operator)
    events = operator.watch_events(snapshot=True)
    await anext(events)  # the stream is up

    await admin.revoke_api_token(info.token_id)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(5):
            async for _ in events:
                pass
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert f"API token {info.token_id} was revoked" in (err.value.details() or "")
