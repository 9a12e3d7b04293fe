"""The worker's enrolled identity: its state directory, CA pinning, and `enroll`.

A state directory (mode 0700) holds::

    ca.pem           the installation's CA, pinned by fingerprint at enrollment
    worker.pem       the worker's current client certificate
    worker-key.pem   its private key (0600)
    identity.json    {worker_id, server, server_name, ca_fingerprint, enrolled_at, enroll_server}

Every file is written atomically (temporary file, fsync, rename), so a reader sees the old or the
new content, never a mix. `identity.json` is written last: its presence means the rest is there.
"""

from __future__ import annotations

import _ssl
import asyncio
import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from taskrun.core.identity import Principal, PrincipalKind
from taskrun.files import private_directory, write_atomic
from taskrun.v1 import security_pb2 as spb
from taskrun.v1 import security_pb2_grpc

SYSTEM_STATE_DIR = Path("/var/lib/taskrun/worker")  # what deploy/systemd's StateDirectory= gives
CONNECT_TIMEOUT = 10.0
ENROLL_TIMEOUT = 30.0
# The name `taskrun certs init` puts in the server certificate, verified when dialling an IP.
DEFAULT_TLS_NAME = "localhost"

_FINGERPRINT = re.compile(r"sha256:([0-9a-fA-F]{64})")


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where a worker keeps its enrolled identity unless --state-dir says otherwise.

    Under systemd with `StateDirectory=taskrun/worker` (deploy/systemd), $STATE_DIRECTORY, i.e.
    /var/lib/taskrun/worker; otherwise the user's XDG state directory:
    $XDG_STATE_HOME/taskrun/worker, by default ~/.local/state/taskrun/worker. Never relative to
    the current directory.
    """
    env = os.environ if env is None else env
    service = env.get("STATE_DIRECTORY", "").split(":")[0]
    if service:
        return Path(service)
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the spec says to ignore a relative one
        return Path(xdg) / "taskrun" / "worker"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".local" / "state" / "taskrun" / "worker"


class EnrollmentError(Exception):
    """Enrollment failed; the message says why and what to do."""


class PinError(EnrollmentError):
    """The server did not prove it holds the pinned CA (nothing secret was sent)."""


class ServerUnreachable(EnrollmentError):
    """The control plane could not be reached (or did not answer in time)."""


# --- the state directory -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatePaths:
    """Where each file of one state directory lives."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.directory / "worker.pem"

    @property
    def key(self) -> Path:
        return self.directory / "worker-key.pem"

    @property
    def identity(self) -> Path:
        return self.directory / "identity.json"


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """What enrollment established (the contents of identity.json)."""

    worker_id: str
    server: str  # the control plane's mTLS address: host dialled + ":" + session port
    server_name: str  # TLS name verified in the server certificate ("" = the host in server)
    ca_fingerprint: str  # sha256:<hex> of the pinned CA
    enrolled_at: datetime
    enroll_server: str = ""  # where Enroll was served (for the re-enroll hint)

    def to_json(self) -> dict[str, str]:
        return {
            "worker_id": self.worker_id,
            "server": self.server,
            "server_name": self.server_name,
            "ca_fingerprint": self.ca_fingerprint,
            "enrolled_at": self.enrolled_at.isoformat(),
            "enroll_server": self.enroll_server,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerIdentity:
        return cls(
            worker_id=str(data["worker_id"]),
            server=str(data["server"]),
            server_name=str(data.get("server_name", "")),
            ca_fingerprint=str(data.get("ca_fingerprint", "")),
            enrolled_at=datetime.fromisoformat(str(data["enrolled_at"])),
            enroll_server=str(data.get("enroll_server", "")),
        )


def write_key_and_cert(key_path: Path, cert_path: Path, key_pem: bytes, cert_pem: bytes) -> None:
    """Replace a key (0600) and its certificate (0644), key first."""
    write_atomic(key_path, key_pem, 0o600)
    write_atomic(cert_path, cert_pem, 0o644)


def ensure_state_dir(directory: Path) -> StatePaths:
    """Create the state directory (0700) if needed and tighten its mode."""
    private_directory(directory)  # and `.taskrun` above it, when created here: 0700
    directory.chmod(0o700)
    return StatePaths(directory)


def load_identity(directory: Path) -> WorkerIdentity | None:
    """The identity stored in directory, or None when nothing was enrolled there.

    ValueError when identity.json exists but cannot be read as one.
    """
    paths = StatePaths(directory)
    try:
        text = paths.identity.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return WorkerIdentity.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{paths.identity} is not a worker identity: {exc}") from None


def save_identity(
    directory: Path, identity: WorkerIdentity, *, ca_pem: bytes, cert_pem: bytes, key_pem: bytes
) -> StatePaths:
    """Store a whole identity: CA, key, certificate, then identity.json."""
    paths = ensure_state_dir(directory)
    write_atomic(paths.ca_cert, ca_pem, 0o644)
    write_key_and_cert(paths.key, paths.cert, key_pem, cert_pem)
    text = json.dumps(identity.to_json(), indent=2) + "\n"
    write_atomic(paths.identity, text.encode(), 0o600)
    return paths


# --- keys, CSRs and checks ---------------------------------------------------------------------


def new_key_and_csr(common_name: str) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and a CSR for it: (key_pem, csr_pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or "worker")]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def parse_fingerprint(text: str) -> bytes:
    """The digest named by `sha256:<64 hex digits>` (either case); ValueError otherwise."""
    match = _FINGERPRINT.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"CA fingerprint {text!r} is not in the form sha256:<64 hex digits> "
            "(as printed by `taskrun token create`)"
        )
    return bytes.fromhex(match.group(1))


def fingerprint_of(cert: x509.Certificate) -> str:
    """`sha256:<hex>` of the certificate's DER encoding."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def check_worker_cert(
    cert_pem: bytes, ca_pem: bytes, worker_id: str, key_pem: bytes
) -> x509.Certificate:
    """The certificate, after checking it is signed by the CA, names the worker and fits the key.

    ValueError saying what is wrong otherwise.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ValueError(f"the certificate is not issued by the pinned CA ({exc!r})") from None
    expected = Principal(PrincipalKind.WORKER, worker_id).uri
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [expected]:
        raise ValueError(f"the certificate names {uris or 'no identity'}, not {expected}")
    key = serialization.load_pem_private_key(key_pem, password=None)
    if key.public_key() != cert.public_key():
        raise ValueError("the certificate is not for the key this worker generated")
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise ValueError(f"the certificate already expired at {cert.not_valid_after_utc}")
    return cert


# --- pinning the CA ----------------------------------------------------------------------------


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of `host:port` or `[v6]:port`; ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"server address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def tls_name(host: str, server_name: str) -> str:
    """The name to verify in the server certificate: the given one, else localhost for an IP."""
    return server_name or (DEFAULT_TLS_NAME if _is_ip(host) else "")


def _presented_chain(sock: ssl.SSLSocket) -> list[x509.Certificate]:
    public = getattr(sock, "get_unverified_chain", None)  # Python 3.13+
    if public is not None:
        raw = public()
    else:
        sslobj = getattr(sock, "_sslobj", None)
        raw = sslobj.get_unverified_chain() if sslobj is not None else None
    certs: list[x509.Certificate] = []
    for item in raw or []:
        # 3.13+ gives DER bytes; before, _ssl.Certificate objects
        der = item if isinstance(item, bytes) else item.public_bytes(_ssl.ENCODING_DER)
        certs.append(x509.load_der_x509_certificate(der))
    return certs


def fetch_pinned_ca(host: str, port: int, fingerprint: str, server_name: str = "") -> bytes:
    """The CA certificate (PEM) the server at host:port presents, if it is the pinned one.

    Opens a TLS connection without verification, finds the presented certificate whose SHA-256
    matches fingerprint, and checks that it is a CA and that it issued the server's certificate.
    PinError when it does not (no secret has been sent at that point); EnrollmentError when the
    server cannot be reached; ValueError for a malformed fingerprint.
    """
    digest = parse_fingerprint(fingerprint)
    where = join_address(host, port)
    refused = (
        f"the server at {where} did not prove it holds the pinned CA {fingerprint.strip()}"
        " (the token was NOT sent)"
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    sni = tls_name(host, server_name) or None
    try:
        with (
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=sni) as sock,
        ):
            chain = _presented_chain(sock)
    except ssl.SSLError as exc:
        raise EnrollmentError(f"TLS with {where} failed: {exc} (the token was NOT sent)") from None
    except OSError as exc:
        raise ServerUnreachable(f"cannot reach the control plane at {where}: {exc}") from None
    if not chain:
        raise PinError(f"{refused}: it presented no certificate")
    leaf = chain[0]
    for cert in chain:
        if hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest() != digest:
            continue
        if not _is_ca(cert):
            raise PinError(f"{refused}: the certificate with that fingerprint is not a CA")
        try:
            leaf.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise PinError(
                f"{refused}: its certificate is not issued by the pinned CA ({exc!r})"
            ) from None
        return cert.public_bytes(serialization.Encoding.PEM)
    seen = ", ".join(fingerprint_of(c) for c in chain)
    raise PinError(f"{refused}: it presented {seen}")


# --- enrollment --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enrolled:
    identity: WorkerIdentity
    paths: StatePaths
    expires_at: datetime
    labels: dict[str, str]


def _enroll_error(exc: grpc.aio.AioRpcError, where: str) -> EnrollmentError:
    code, details = exc.code(), exc.details() or "no details"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return EnrollmentError(
            f"the control plane refused the token ({details}): it is unknown, already used, "
            "expired or revoked; create a new one with `taskrun token create`"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return EnrollmentError(f"the control plane rejected the enrollment request: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServerUnreachable(
            f"cannot reach the enrollment service at {where} ({code.name}: {details}); "
            "is it the control plane's public (enrollment) port?"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return EnrollmentError(f"{where} does not serve enrollment ({details})")
    return EnrollmentError(f"enrollment failed: {code.name}: {details}")


async def enroll(
    server: str,
    token: str,
    ca_fingerprint: str,
    state_dir: Path,
    *,
    server_name: str = "",
    hostname: str | None = None,
) -> Enrolled:
    """Pin the CA, trade token + a fresh key's CSR for a certificate, store the identity.

    server is the control plane's public (enrollment) address. EnrollmentError (PinError when the
    server is not the pinned one) or ValueError (malformed arguments) on failure.
    """
    parse_fingerprint(ca_fingerprint)
    if not token.strip():
        raise ValueError("the bootstrap token is empty")
    host, port = split_address(server)
    where = join_address(host, port)
    ca_pem = await asyncio.to_thread(fetch_pinned_ca, host, port, ca_fingerprint, server_name)
    hostname = hostname or socket.gethostname()
    key_pem, csr_pem = new_key_and_csr(hostname)
    name = tls_name(host, server_name)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(where, creds, options=options) as channel:
        stub = security_pb2_grpc.EnrollmentServiceStub(channel)
        try:
            reply = await stub.Enroll(
                spb.EnrollRequest(token=token.strip(), csr_pem=csr_pem, hostname=hostname),
                timeout=ENROLL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            raise _enroll_error(exc, where) from None
    worker_id = str(reply.worker_id)
    try:
        cert = check_worker_cert(bytes(reply.certificate_pem), ca_pem, worker_id, key_pem)
    except ValueError as exc:
        raise EnrollmentError(
            f"the control plane returned an unusable certificate: {exc}"
        ) from None
    session_port = int(reply.session_port) or port
    identity = WorkerIdentity(
        worker_id=worker_id,
        server=join_address(host, session_port),
        server_name=name,
        ca_fingerprint=fingerprint_of(x509.load_pem_x509_certificate(ca_pem)),
        enrolled_at=datetime.now(UTC),
        enroll_server=where,
    )
    paths = save_identity(
        state_dir, identity, ca_pem=ca_pem, cert_pem=bytes(reply.certificate_pem), key_pem=key_pem
    )
    return Enrolled(identity, paths, cert.not_valid_after_utc, dict(reply.labels))


def enroll_command(
    *, enroll_server: str = "", ca_fingerprint: str = "", state_dir: Path | None = None
) -> str:
    """The `taskrun worker enroll` command line to enroll again, with placeholders for unknowns."""
    parts = [
        "taskrun worker enroll",
        f"--server {enroll_server or 'HOST:PUBLIC_PORT'}",
        "--token NEW_TOKEN",
        f"--ca-fingerprint {ca_fingerprint or 'sha256:…'}",
    ]
    if state_dir is not None:
        parts.append(f"--state-dir {state_dir}")
    return " ".join(parts)
