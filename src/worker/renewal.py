"""Certificate renewal: when (a jittered 70 to 90 % of the lifetime) and how (a fresh key, asked
for over the current mTLS identity, written where the current key and certificate live)."""

from __future__ import annotations

import random
import socket
from datetime import datetime
from pathlib import Path

import grpc
from cryptography import x509

from taskrun.core.identity import PrincipalKind, parse_spiffe_id
from taskrun.v1 import security_pb2 as spb
from taskrun.v1 import security_pb2_grpc
from taskrun.worker.identity import (
    check_worker_cert,
    new_key_and_csr,
    split_address,
    tls_name,
    write_key_and_cert,
)

RENEW_AT = (0.7, 0.9)  # fractions of the lifetime, from not_valid_before
RENEW_TIMEOUT = 30.0


class RenewalError(Exception):
    """Renewal failed this time; trying again later may work."""


class RenewalRefused(RenewalError):
    """The control plane refused this identity (revoked): retrying cannot help."""


def renewal_time(cert: x509.Certificate, rng: random.Random | None = None) -> datetime:
    """When to renew: a uniformly random point between 70 % and 90 % of the lifetime."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    low, high = RENEW_AT
    fraction = (rng or random).uniform(low, high)
    return start + (end - start) * fraction


def worker_id_of(cert: x509.Certificate) -> str:
    """The worker id in a certificate's SPIFFE URI SAN; ValueError when it names no worker."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    principal = parse_spiffe_id(uris[0]) if len(uris) == 1 else None
    if principal is None or principal.kind is not PrincipalKind.WORKER:
        raise ValueError(f"the certificate names no worker (URI SANs: {uris})")
    return principal.name


async def renew(
    *, server: str, server_name: str, ca_cert: Path, cert: Path, key: Path
) -> x509.Certificate:
    """Trade a fresh key's CSR for a new certificate over the current identity; store both.

    The new key replaces `key` and the new certificate replaces `cert` (key first, each file
    atomically). RenewalRefused when the control plane denies this identity, RenewalError for
    anything else (unreachable, unusable answer).
    """
    ca_pem, cert_pem, key_pem, worker_id = _current(ca_cert, cert, key)
    new_key_pem, csr_pem = new_key_and_csr(socket.gethostname())
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    try:
        host, _ = split_address(server)
    except ValueError as exc:
        raise RenewalError(str(exc)) from None
    name = tls_name(host, server_name)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    async with grpc.aio.secure_channel(server, creds, options=options) as channel:
        stub = security_pb2_grpc.CertificateServiceStub(channel)
        try:
            reply = await stub.RenewCertificate(
                spb.RenewCertificateRequest(csr_pem=csr_pem), timeout=RENEW_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or "no details"
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise RenewalRefused(details) from None
            raise RenewalError(f"{exc.code().name}: {details}") from None
    new_cert_pem = bytes(reply.certificate_pem)
    try:
        renewed = check_worker_cert(new_cert_pem, ca_pem, worker_id, new_key_pem)
    except ValueError as exc:
        raise RenewalError(f"the control plane returned an unusable certificate: {exc}") from None
    # Written on the event loop on purpose: two small files, once per lifetime, and nothing else
    # on the loop (a reconnect reading them) can see the new key with the old certificate.
    write_key_and_cert(key, cert, new_key_pem, new_cert_pem)
    return renewed


def _current(ca_cert: Path, cert: Path, key: Path) -> tuple[bytes, bytes, bytes, str]:
    """The CA, certificate and key in use, and the worker id the certificate names."""
    try:
        ca_pem, cert_pem, key_pem = ca_cert.read_bytes(), cert.read_bytes(), key.read_bytes()
        worker_id = worker_id_of(x509.load_pem_x509_certificate(cert_pem))
    except (OSError, ValueError) as exc:
        raise RenewalError(f"cannot read the current identity: {exc}") from None
    return ca_pem, cert_pem, key_pem, worker_id
