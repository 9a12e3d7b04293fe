"""The worker's identity: state directory, CA pinning, renewal timing, config from a state dir."""

from __future__ import annotations

import asyncio
import random
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from taskrun.controlplane.pki import PkiPaths, init_pki, issue_client_cert
from taskrun.core.identity import Principal, PrincipalKind
from taskrun.worker.config import WorkerConfig
from taskrun.worker.identity import (
    EnrollmentError,
    PinError,
    ServerUnreachable,
    StatePaths,
    WorkerIdentity,
    check_worker_cert,
    default_state_dir,
    enroll,
    fetch_pinned_ca,
    fingerprint_of,
    load_identity,
    new_key_and_csr,
    parse_fingerprint,
    save_identity,
)
from taskrun.worker.renewal import renewal_time
from tests.ports import refusing_port

# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki") / "certs", workers=("worker-1",))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("other") / "certs", workers=())


def fingerprint(paths: PkiPaths) -> str:
    return fingerprint_of(x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()))


class RecordCalls(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Notes every RPC that reaches the server."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        self.methods.append(handler_call_details.method)
        return await continuation(handler_call_details)


class TlsServer:
    """A real grpc.aio server on loopback presenting a chosen certificate chain."""

    def __init__(self, server: grpc.aio.Server, port: int, calls: RecordCalls) -> None:
        self.server, self.port, self.calls = server, port, calls

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


ServeFactory = Callable[[bytes, bytes], Awaitable[TlsServer]]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    started: list[TlsServer] = []

    async def start(key_pem: bytes, chain_pem: bytes) -> TlsServer:
        calls = RecordCalls()
        server = grpc.aio.server(interceptors=[calls])
        port = server.add_secure_port(
            "127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, chain_pem)])
        )
        await server.start()
        started.append(TlsServer(server, port, calls))
        return started[-1]

    yield start
    for s in started:
        await s.server.stop(grace=None)


def chain(paths: PkiPaths, *, ca: PkiPaths | None = None) -> tuple[bytes, bytes]:
    """(server key, server cert + CA cert) as a control plane's public listener presents them."""
    ca_pem = (ca or paths).ca_cert.read_bytes()
    return paths.server_key.read_bytes(), paths.server_cert.read_bytes() + ca_pem


# --- the state directory -----------------------------------------------------------------------


def _identity() -> WorkerIdentity:
    return WorkerIdentity(
        worker_id="w-7",
        server="127.0.0.1:50051",
        server_name="localhost",
        ca_fingerprint="sha256:" + "ab" * 32,
        enrolled_at=datetime(2026, 11, 3, 12, 0, tzinfo=UTC),
        enroll_server="127.0.0.1:50052",
    )


def test_saving_an_identity_makes_a_private_directory_and_key(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "worker"
    paths = save_identity(directory, _identity(), ca_pem=b"ca", cert_pem=b"cert", key_pem=b"key")

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.identity.stat().st_mode) == 0o600
    assert (paths.ca_cert.read_bytes(), paths.cert.read_bytes(), paths.key.read_bytes()) == (
        b"ca",
        b"cert",
        b"key",
    )
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_an_existing_state_directory_is_tightened_to_0700(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o755)
    save_identity(directory, _identity(), ca_pem=b"ca", cert_pem=b"cert", key_pem=b"key")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_saved_identity_loads_back_and_an_absent_one_is_none(tmp_path: Path) -> None:
    assert load_identity(tmp_path / "nothing") is None
    save_identity(tmp_path, _identity(), ca_pem=b"ca", cert_pem=b"cert", key_pem=b"key")
    assert load_identity(tmp_path) == _identity()


def test_a_corrupt_identity_file_is_a_clear_error(tmp_path: Path) -> None:
    StatePaths(tmp_path).identity.write_text("{not json")
    with pytest.raises(ValueError, match=r"identity\.json is not a worker identity"):
        load_identity(tmp_path)


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprints_accept_upper_and_lower_case_hex() -> None:
    digest = bytes(range(32))
    assert parse_fingerprint("sha256:" + digest.hex()) == digest
    assert parse_fingerprint("sha256:" + digest.hex().upper()) == digest


@pytest.mark.parametrize(
    "text",
    [
        "ab" * 32,  # no algorithm
        "sha1:" + "ab" * 20,
        "sha256:" + "ab" * 31,  # too short
        "sha256:" + "zz" * 32,
        "sha256:" + ":".join(["ab"] * 32),  # openssl's colon form
        "SHA256:" + "ab" * 32,
        "",
    ],
)
def test_other_fingerprint_formats_are_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"sha256:<64 hex digits>"):
        parse_fingerprint(text)


# --- pinning the CA against a real TLS server --------------------------------------------------


async def test_the_pinned_ca_is_returned_when_the_server_presents_it(
    pki: PkiPaths, serve: ServeFactory
) -> None:
    server = await serve(*chain(pki))
    ca_pem = await asyncio.to_thread(fetch_pinned_ca, "127.0.0.1", server.port, fingerprint(pki))
    assert ca_pem == pki.ca_cert.read_bytes()
    upper = "sha256:" + fingerprint(pki).removeprefix("sha256:").upper()
    assert await asyncio.to_thread(fetch_pinned_ca, "127.0.0.1", server.port, upper) == ca_pem


async def test_a_wrong_fingerprint_fails_before_any_rpc_is_made(
    pki: PkiPaths, serve: ServeFactory, tmp_path: Path
) -> None:
    server = await serve(*chain(pki))
    wrong = "sha256:" + "00" * 32
    with pytest.raises(PinError, match=r"did not prove it holds the pinned CA .*NOT sent"):
        await enroll(server.address, "trb_abc.secret", wrong, tmp_path / "state")
    assert server.calls.methods == []
    assert load_identity(tmp_path / "state") is None

    # the same server with the right pin does get the token (and serves no enrollment)
    with pytest.raises(EnrollmentError, match="does not serve enrollment"):
        await enroll(server.address, "trb_abc.secret", fingerprint(pki), tmp_path / "state")
    assert server.calls.methods == ["/taskrun.v1.EnrollmentService/Enroll"]


async def test_a_server_of_another_ca_fails_the_pin(
    pki: PkiPaths, other_pki: PkiPaths, serve: ServeFactory
) -> None:
    server = await serve(*chain(other_pki))
    with pytest.raises(PinError, match=r"did not prove it holds the pinned CA"):
        await asyncio.to_thread(fetch_pinned_ca, "127.0.0.1", server.port, fingerprint(pki))


async def test_presenting_the_pinned_ca_next_to_a_leaf_it_did_not_sign_fails(
    pki: PkiPaths, other_pki: PkiPaths, serve: ServeFactory
) -> None:
    # the CA certificate is public: anyone can append it to their own chain
    server = await serve(*chain(other_pki, ca=pki))
    with pytest.raises(PinError, match=r"not issued by the pinned CA"):
        await asyncio.to_thread(fetch_pinned_ca, "127.0.0.1", server.port, fingerprint(pki))


async def test_a_server_that_does_not_present_the_ca_fails_the_pin(
    pki: PkiPaths, serve: ServeFactory
) -> None:
    server = await serve(pki.server_key.read_bytes(), pki.server_cert.read_bytes())
    with pytest.raises(PinError, match=r"it presented sha256:"):
        await asyncio.to_thread(fetch_pinned_ca, "127.0.0.1", server.port, fingerprint(pki))


async def test_a_non_ca_certificate_with_the_pinned_fingerprint_fails(
    pki: PkiPaths, serve: ServeFactory
) -> None:
    server = await serve(*chain(pki))
    leaf = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    with pytest.raises(PinError, match=r"not a CA"):
        await asyncio.to_thread(fetch_pinned_ca, "127.0.0.1", server.port, fingerprint_of(leaf))


async def test_nobody_listening_is_reported_as_unreachable(pki: PkiPaths) -> None:
    with (
        refusing_port() as port,  # nothing listens there, nothing can while it is held
        pytest.raises(ServerUnreachable, match="cannot reach the control plane"),
    ):
        await asyncio.to_thread(fetch_pinned_ca, "127.0.0.1", port, fingerprint(pki))


# --- issued certificates -----------------------------------------------------------------------


def _signed(pki: PkiPaths, worker_id: str, key_pem: bytes, **kwargs: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert_pem, _ = issue_client_cert(
        pki, Principal(PrincipalKind.WORKER, worker_id), public_key=key.public_key(), **kwargs
    )
    return cert_pem


def test_an_issued_certificate_must_chain_to_the_ca_and_name_the_worker(
    pki: PkiPaths, other_pki: PkiPaths
) -> None:
    key_pem, _ = new_key_and_csr("host")
    good = _signed(pki, "w-1", key_pem)
    ca_pem = pki.ca_cert.read_bytes()
    assert check_worker_cert(good, ca_pem, "w-1", key_pem).serial_number > 0
    with pytest.raises(ValueError, match="not spiffe://taskrun/worker/w-2"):
        check_worker_cert(good, ca_pem, "w-2", key_pem)
    with pytest.raises(ValueError, match="not issued by the pinned CA"):
        check_worker_cert(_signed(other_pki, "w-1", key_pem), ca_pem, "w-1", key_pem)
    other_key, _ = new_key_and_csr("host")
    with pytest.raises(ValueError, match="not for the key"):
        check_worker_cert(good, ca_pem, "w-1", other_key)


def test_a_csr_carries_a_fresh_p256_key_each_time() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    (key_a, csr_a), (key_b, _) = new_key_and_csr("host-a"), new_key_and_csr("host-a")
    assert key_a != key_b
    csr = x509.load_pem_x509_csr(csr_a)
    assert csr.is_signature_valid
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)


# --- renewal timing ----------------------------------------------------------------------------


def test_renewal_falls_between_70_and_90_percent_of_the_lifetime_and_is_spread(
    pki: PkiPaths,
) -> None:
    cert_pem, _ = issue_client_cert(
        pki, Principal(PrincipalKind.WORKER, "w-1"), timedelta(hours=24)
    )
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    rng = random.Random(7)
    fractions = [(renewal_time(cert, rng) - start) / (end - start) for _ in range(5000)]
    assert all(0.7 <= f <= 0.9 for f in fractions)
    assert min(fractions) < 0.71 and max(fractions) > 0.89  # jittered over the whole window
    assert 0.79 < sum(fractions) / len(fractions) < 0.81


# --- the config of a worker with a state directory ---------------------------------------------


def test_a_state_directory_supplies_the_identity_and_explicit_server_wins(tmp_path: Path) -> None:
    save_identity(tmp_path, _identity(), ca_pem=b"ca", cert_pem=b"cert", key_pem=b"key")
    paths = StatePaths(tmp_path)

    config = WorkerConfig(state_dir=tmp_path).with_identity()
    assert (config.worker_id, config.server, config.server_name) == (
        "w-7",
        "127.0.0.1:50051",
        "localhost",
    )
    assert (config.ca_cert, config.cert_path(), config.key_path()) == (
        paths.ca_cert,
        paths.cert,
        paths.key,
    )
    assert config.with_identity() == config

    moved = WorkerConfig(state_dir=tmp_path, server="cp.example:443").with_identity()
    assert (moved.server, moved.server_name) == ("cp.example:443", "localhost")


def test_a_state_directory_without_identity_or_for_another_worker_is_refused(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"holds no enrolled identity.*taskrun worker enroll"):
        WorkerConfig(state_dir=tmp_path).with_identity()
    save_identity(tmp_path, _identity(), ca_pem=b"ca", cert_pem=b"cert", key_pem=b"key")
    with pytest.raises(ValueError, match="differs from 'w-7'"):
        WorkerConfig(state_dir=tmp_path, worker_id="worker-1").with_identity()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HOME": "/home/ada"}, "/home/ada/.local/state/taskrun/worker"),
        ({"HOME": "/home/ada", "XDG_STATE_HOME": "/srv/state"}, "/srv/state/taskrun/worker"),
        (
            {"HOME": "/home/ada", "XDG_STATE_HOME": "relative"},
            "/home/ada/.local/state/taskrun/worker",
        ),
        (
            {"HOME": "/root", "STATE_DIRECTORY": "/var/lib/taskrun/worker"},
            "/var/lib/taskrun/worker",
        ),
    ],
    ids=["home", "xdg", "relative_xdg_ignored", "systemd_state_directory"],
)
def test_the_default_state_directory_is_per_user_or_the_services_never_the_cwd(
    env: dict[str, str], expected: str
) -> None:
    assert default_state_dir(env) == Path(expected)
