"""Server TLS material that can be rotated without a restart.

grpc calls `fetch` before every new handshake; it re-reads the certificate and key only when
their files changed, and switches only to a pair whose key matches its certificate (a rotation
writes the two files one after the other). Live connections keep the certificate they started
with. The chain sent is the server certificate followed by the CA certificate, so that a worker
that pins the CA by fingerprint can find it in the handshake before it trusts anything.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = structlog.get_logger(__name__)


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _check_pair(cert_pem: bytes, key_pem: bytes) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if key.public_key() != cert.public_key():
        raise ValueError("the server key does not match the server certificate")
    return cert


class ServerCertificateSource:
    """One listener's view of the server certificate files."""

    def __init__(self, ca_cert: Path, server_cert: Path, server_key: Path) -> None:
        self.ca_cert, self.server_cert, self.server_key = ca_cert, server_cert, server_key
        self._lock = threading.Lock()
        self._stamps: tuple[tuple[int, int, int], ...] = ()
        self.serial = 0  # of the certificate new handshakes get
        self.rotations = 0

    def _load(self) -> grpc.ServerCertificateConfiguration:
        ca_pem = self.ca_cert.read_bytes()
        cert_pem, key_pem = self.server_cert.read_bytes(), self.server_key.read_bytes()
        cert = _check_pair(cert_pem, key_pem)
        chain = cert_pem if ca_pem.strip() in cert_pem else cert_pem.rstrip() + b"\n" + ca_pem
        self.serial = cert.serial_number
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, chain)], root_certificates=ca_pem
        )

    def _current_stamps(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(_stamp(p) for p in (self.ca_cert, self.server_cert, self.server_key))

    def initial(self) -> grpc.ServerCertificateConfiguration:
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: run `taskrun certs init` first")
        with self._lock:
            self._stamps = self._current_stamps()
            return self._load()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration if the files changed and are consistent; else None (keep)."""
        try:
            with self._lock:
                stamps = self._current_stamps()
                if stamps == self._stamps:
                    return None
                config = self._load()
                self._stamps = stamps
                self.rotations += 1
            log.info("server certificate reloaded", serial=f"{self.serial:x}")
            return config
        except Exception as exc:
            log.warning("server certificate not reloaded (kept the current one)", error=str(exc))
            return None

    def credentials(self, *, require_client_auth: bool) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial(), self.fetch, require_client_authentication=require_client_auth
        )
