"""mTLS with certificates from the local PKI against a real grpc.aio server on loopback.

What `context.auth_context()` holds on the server for a worker certificate (grpcio 1.85; every
value is a list of bytes):

    transport_security_type        [b'ssl']
    security_level                 [b'TSI_PRIVACY_AND_INTEGRITY']
    x509_subject                   [b'O=TaskRun,CN=worker-1']
    x509_common_name               [b'worker-1']
    x509_subject_alternative_name  [b'spiffe://taskrun/worker/worker-1']
    peer_uri                       [b'spiffe://taskrun/worker/worker-1']
    peer_spiffe_id                 [b'spiffe://taskrun/worker/worker-1']  (one URI SAN only)
    x509_pem_cert                  [b'-----BEGIN CERTIFICATE-----\\n...']  (the peer's leaf)
    ssl_session_reused             [b'false']
    ssl_tls_version                [b'TLSv1.3']
    ssl_negotiated_key_exchange_group [b'X25519MLKEM768']
    ssl_requested_server_name      [b'localhost']  (only when the client sent SNI, i.e. a name)

Failed handshakes (no certificate, unknown CA, expired, wrong EKU, wrong host name) reach the
client as UNAVAILABLE and the handler is never called.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from taskrun.controlplane.pki import PkiPaths, init_pki, issue_client_cert, principal_of
from taskrun.core.identity import Principal, PrincipalKind

METHOD = "/taskrun.test.Echo/Peer"
TIMEOUT = 5.0

PeerInfo = dict[str, list[str]]


@dataclass
class Server:
    port: int
    calls: list[PeerInfo]


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return init_pki(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path: Path) -> PkiPaths:
    return init_pki(tmp_path / "other-pki")


@pytest.fixture
async def server(pki: PkiPaths) -> AsyncIterator[Server]:
    calls: list[PeerInfo] = []

    async def peer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Reply with the server's view of the caller: auth_context, values decoded."""
        info = {k: [v.decode() for v in vs] for k, vs in context.auth_context().items()}
        calls.append(info)
        return json.dumps(info).encode()

    # No (de)serializers: raw bytes in and out.
    generic = grpc.method_handlers_generic_handler(
        "taskrun.test.Echo", {"Peer": grpc.unary_unary_rpc_method_handler(peer)}
    )
    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers((generic,))
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = srv.add_secure_port("127.0.0.1:0", credentials)
    await srv.start()
    try:
        yield Server(port, calls)
    finally:
        await srv.stop(None)


async def call(
    target: str,
    ca_pem: bytes,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    options: list[tuple[str, str]] | None = None,
) -> PeerInfo:
    """One unary call; returns what the server saw of this client."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
        reply = await channel.unary_unary(METHOD)(b"", timeout=TIMEOUT)
    result: PeerInfo = json.loads(reply)
    return result


def pem_pair(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    """(certificate chain, private key) as read from a PKI directory."""
    return cert_path.read_bytes(), key_path.read_bytes()


async def call_as(
    server: Server, pki: PkiPaths, pair: tuple[bytes, bytes], host: str = "127.0.0.1"
) -> PeerInfo:
    """One call from host:port presenting the given certificate, trusting pki's CA."""
    cert_pem, key_pem = pair
    return await call(f"{host}:{server.port}", pki.ca_cert.read_bytes(), cert_pem, key_pem)


async def assert_refused(
    server: Server,
    ca_pem: bytes,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    options: list[tuple[str, str]] | None = None,
) -> None:
    """The call fails with UNAVAILABLE and the handler never runs."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(f"127.0.0.1:{server.port}", ca_pem, cert_pem, key_pem, options)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.calls == []


# --- accepted ----------------------------------------------------------------------------------


async def test_worker_cert_connects_and_the_server_sees_its_spiffe_id(
    server: Server, pki: PkiPaths
) -> None:
    peer = await call_as(
        server, pki, pem_pair(pki.worker_cert("worker-1"), pki.worker_key("worker-1"))
    )

    assert peer["transport_security_type"] == ["ssl"]
    assert peer["peer_spiffe_id"] == ["spiffe://taskrun/worker/worker-1"]
    assert peer["x509_subject_alternative_name"] == ["spiffe://taskrun/worker/worker-1"]
    assert peer["x509_common_name"] == ["worker-1"]
    assert principal_of(peer["x509_pem_cert"][0].encode()) == Principal(
        PrincipalKind.WORKER, "worker-1"
    )


async def test_operator_cert_connects_and_the_server_sees_its_spiffe_id(
    server: Server, pki: PkiPaths
) -> None:
    peer = await call_as(server, pki, pem_pair(pki.operator_cert, pki.operator_key))

    assert peer["peer_spiffe_id"] == ["spiffe://taskrun/operator/admin"]
    assert peer["x509_common_name"] == ["admin"]


async def test_the_server_is_reachable_by_its_dns_name_as_well(
    server: Server, pki: PkiPaths
) -> None:
    peer = await call_as(
        server,
        pki,
        pem_pair(pki.worker_cert("worker-2"), pki.worker_key("worker-2")),
        host="localhost",
    )

    assert peer["peer_spiffe_id"] == ["spiffe://taskrun/worker/worker-2"]
    assert peer["ssl_requested_server_name"] == ["localhost"]


async def test_a_freshly_issued_short_lived_cert_connects(server: Server, pki: PkiPaths) -> None:
    cert_pem, key_pem = issue_client_cert(
        pki, Principal(PrincipalKind.WORKER, "gpu-7"), timedelta(hours=24)
    )

    peer = await call(f"127.0.0.1:{server.port}", pki.ca_cert.read_bytes(), cert_pem, key_pem)

    assert peer["peer_spiffe_id"] == ["spiffe://taskrun/worker/gpu-7"]


# --- refused -----------------------------------------------------------------------------------


async def test_a_client_without_a_certificate_is_refused(server: Server, pki: PkiPaths) -> None:
    await assert_refused(server, pki.ca_cert.read_bytes())


async def test_a_client_cert_from_another_ca_is_refused(
    server: Server, pki: PkiPaths, other_pki: PkiPaths
) -> None:
    await assert_refused(
        server,
        pki.ca_cert.read_bytes(),  # trusts the right server...
        other_pki.worker_cert("worker-1").read_bytes(),  # ...but presents a foreign identity
        other_pki.worker_key("worker-1").read_bytes(),
    )


async def test_an_expired_client_cert_is_refused(server: Server, pki: PkiPaths) -> None:
    now = datetime.now(UTC)
    cert_pem, key_pem = issue_client_cert(
        pki,
        Principal(PrincipalKind.WORKER, "worker-1"),
        timedelta(hours=1),
        now=now - timedelta(days=1),
    )

    await assert_refused(server, pki.ca_cert.read_bytes(), cert_pem, key_pem)


async def test_the_server_cert_cannot_be_used_as_a_client_cert(
    server: Server, pki: PkiPaths
) -> None:
    await assert_refused(
        server,
        pki.ca_cert.read_bytes(),
        pki.server_cert.read_bytes(),  # EKU serverAuth only
        pki.server_key.read_bytes(),
    )


async def test_a_client_pinning_another_ca_refuses_the_server(
    server: Server, pki: PkiPaths, other_pki: PkiPaths
) -> None:
    await assert_refused(
        server,
        other_pki.ca_cert.read_bytes(),
        other_pki.worker_cert("worker-1").read_bytes(),
        other_pki.worker_key("worker-1").read_bytes(),
    )


async def test_the_client_checks_the_server_host_name(server: Server, pki: PkiPaths) -> None:
    await assert_refused(
        server,
        pki.ca_cert.read_bytes(),
        pki.worker_cert("worker-1").read_bytes(),
        pki.worker_key("worker-1").read_bytes(),
        options=[("grpc.ssl_target_name_override", "elsewhere.example")],
    )
