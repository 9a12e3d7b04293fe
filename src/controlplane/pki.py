"""The installation's private CA and the certificates it signs (ECDSA P-256, SPIFFE URI SANs).

Layout of a PKI directory (mode 0700; keys 0600, certificates 0644)::

    ca.pem  ca-key.pem  server.pem  server-key.pem  operator.pem  operator-key.pem
    <worker-id>.pem  <worker-id>-key.pem
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from taskrun.core.identity import Principal, PrincipalKind, parse_spiffe_id
from taskrun.core.ids import is_valid_worker_id
from taskrun.files import write_atomic

CA_LIFETIME = timedelta(days=3650)
DEFAULT_LIFETIME = timedelta(days=90)
CLOCK_SKEW = timedelta(minutes=5)
SERVER_PRINCIPAL = Principal(PrincipalKind.SERVER, "control-plane")
ORGANIZATION = "TaskRun"
CA_COMMON_NAME = "TaskRun CA"

# File stems used by the fixed files: a worker id equal to one of them would overwrite them.
_RESERVED_STEMS = frozenset({"ca", "server", "operator"})
_KEY_SUFFIX = "-key"


def _check_worker_id(worker_id: str) -> None:
    """Raise ValueError unless worker_id is valid and maps to its own pair of files."""
    if not is_valid_worker_id(worker_id):
        raise ValueError(f"invalid worker id: {worker_id!r}")
    if worker_id in _RESERVED_STEMS or worker_id.endswith(_KEY_SUFFIX):
        raise ValueError(f"worker id {worker_id!r} clashes with a PKI file name")


@dataclass(frozen=True)
class PkiPaths:
    """Where each PEM file of one PKI directory lives."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    operator_cert: Path
    operator_key: Path

    def worker_cert(self, worker_id: str) -> Path:
        """`<worker_id>.pem`; ValueError for an id that is invalid or clashes with another file."""
        _check_worker_id(worker_id)
        return self.directory / f"{worker_id}.pem"

    def worker_key(self, worker_id: str) -> Path:
        """`<worker_id>-key.pem`; ValueError like worker_cert."""
        _check_worker_id(worker_id)
        return self.directory / f"{worker_id}{_KEY_SUFFIX}.pem"

    @classmethod
    def at(cls, directory: Path) -> PkiPaths:
        """The standard file names under directory."""
        return cls(
            directory=directory,
            ca_cert=directory / "ca.pem",
            ca_key=directory / "ca-key.pem",
            server_cert=directory / "server.pem",
            server_key=directory / "server-key.pem",
            operator_cert=directory / "operator.pem",
            operator_key=directory / "operator-key.pem",
        )


# --- files -------------------------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Atomically write a secret (a private key) readable by the owner only (0600)."""
    write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    """Atomically write a certificate (0644)."""
    write_atomic(path, data, 0o644)


def _write_pair(cert_path: Path, key_path: Path, cert_pem: bytes, key_pem: bytes) -> None:
    # Key first: an interrupted run leaves a key without a certificate, which is regenerated.
    write_private(key_path, key_pem)
    _write_public(cert_path, cert_pem)


# --- building certificates ---------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _create_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    now = _utcnow()
    name = _name(CA_COMMON_NAME)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and its key from two PEM files (FileNotFoundError if absent)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    if key.public_key() != cert.public_key():
        raise ValueError(f"{key_path} does not match {cert_path}")
    return cert, key


class CsrRejected(ValueError):
    """A certificate signing request that cannot be signed; the message says why."""


MAX_CSR_BYTES = 16 * 1024


def csr_public_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The key of a well-formed, correctly self-signed CSR holding an ECDSA P-256 key.

    Only the key is used: names and extensions inside the CSR are ignored by design.
    """
    if not csr_pem:
        raise CsrRejected("must not be empty")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrRejected(f"is over {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CsrRejected("is not a PEM-encoded PKCS#10 certificate signing request") from None
    try:
        key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError):  # an unknown key algorithm or curve OID
        raise CsrRejected(
            "key must be ECDSA P-256, got a key algorithm or curve this control plane does not know"
        ) from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise CsrRejected(f"key must be ECDSA P-256, got ECDSA {key.curve.name}")
    else:
        raise CsrRejected(f"key must be ECDSA P-256, got {_key_kind(key)}")
    try:
        valid = csr.is_signature_valid
    except Exception:  # an unsupported signature algorithm
        valid = False
    if not valid:
        raise CsrRejected("signature does not verify: the request was altered or is corrupt")
    return key


def _key_kind(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def sign_worker_key(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    public_key: ec.EllipticCurvePublicKey,
    worker_id: str,
    lifetime: timedelta,
    *,
    now: datetime | None = None,
) -> x509.Certificate:
    """A client certificate for `worker_id` over a key taken from a checked CSR
    (`csr_public_key`); the CSR's names never reach it.

    Backdated by at most a tenth of the lifetime (5 min at most), so that clock skew is
    tolerated and short lifetimes stay mostly in the future.
    """
    _check_worker_id(worker_id)
    return _sign_leaf(
        ca,
        public_key,
        Principal(PrincipalKind.WORKER, worker_id),
        lifetime=lifetime,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
        skew=min(CLOCK_SKEW, lifetime / 10),
    )


def sign_operator_key(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    public_key: ec.EllipticCurvePublicKey,
    name: str,
    lifetime: timedelta,
    *,
    unit: str,
) -> x509.Certificate:
    """A short-lived operator client certificate (`taskrun login`); `unit` (the subject's OU)
    records what it was issued against, so that revoking that revokes the certificate."""
    return _sign_leaf(
        ca,
        public_key,
        Principal(PrincipalKind.OPERATOR, name),
        lifetime=lifetime,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        skew=min(CLOCK_SKEW, lifetime / 10),
        unit=unit,
    )


def _sign_leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    public_key: ec.EllipticCurvePublicKey,
    principal: Principal,
    *,
    lifetime: timedelta,
    usage: x509.ObjectIdentifier,
    extra_names: Sequence[x509.GeneralName] = (),
    now: datetime | None = None,
    skew: timedelta = CLOCK_SKEW,
    unit: str = "",
) -> x509.Certificate:
    """A certificate for principal (CN + URI SAN), valid for lifetime but not past the CA."""
    if parse_spiffe_id(principal.uri) != principal:
        raise ValueError(f"principal name cannot form a SPIFFE id: {principal.name!r}")
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise ValueError(f"only P-256 keys are accepted, got {public_key.curve.name}")
    if lifetime <= timedelta(0):
        raise ValueError("lifetime must be positive")
    ca_cert, ca_key = ca
    start = now if now is not None else _utcnow()
    if start.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    end = min(start + lifetime, ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    subject = _name(principal.name)
    if unit:
        subject = x509.Name([*subject, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - skew)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [*extra_names, x509.UniformResourceIdentifier(principal.uri)]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _host_name(host: str) -> x509.GeneralName:
    """An IPAddress SAN for an IP literal, else a DNSName SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


# --- public operations -------------------------------------------------------------------------


def init_pki(
    directory: Path,
    *,
    workers: Sequence[str] = ("worker-1", "worker-2"),
    operator: str = "admin",
    server_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    lifetime: timedelta = DEFAULT_LIFETIME,
    force: bool = False,
) -> PkiPaths:
    """Create (or complete) a PKI directory: CA, server, operator and one cert per worker.

    An existing CA and existing certificate/key pairs are kept; force=True regenerates all.
    A newly created CA always gets freshly signed leaves.
    """
    for worker_id in workers:
        _check_worker_id(worker_id)
    operator_principal = Principal(PrincipalKind.OPERATOR, operator)
    if parse_spiffe_id(operator_principal.uri) != operator_principal:
        raise ValueError(f"invalid operator name: {operator!r}")
    if not server_hosts:
        raise ValueError("server_hosts must name at least one host")

    paths = PkiPaths.at(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)

    fresh = force or not (paths.ca_cert.exists() and paths.ca_key.exists())
    if fresh:
        if paths.ca_cert.exists() and not force:
            raise FileNotFoundError(
                f"{paths.ca_cert} exists but {paths.ca_key} is missing; use force=True to replace"
            )
        ca_cert, ca_key = _create_ca()
        _write_pair(paths.ca_cert, paths.ca_key, cert_pem(ca_cert), _key_pem(ca_key))
        ca = (ca_cert, ca_key)
    else:
        ca = load_ca(paths.ca_cert, paths.ca_key)

    def ensure(
        cert_path: Path,
        key_path: Path,
        principal: Principal,
        usage: x509.ObjectIdentifier,
        extra_names: Sequence[x509.GeneralName] = (),
    ) -> None:
        if not fresh and cert_path.exists() and key_path.exists():
            return
        key = _new_key()
        cert = _sign_leaf(
            ca,
            key.public_key(),
            principal,
            lifetime=lifetime,
            usage=usage,
            extra_names=extra_names,
        )
        _write_pair(cert_path, key_path, cert_pem(cert), _key_pem(key))

    server_names = [_host_name(h) for h in server_hosts]
    ensure(
        paths.server_cert,
        paths.server_key,
        SERVER_PRINCIPAL,
        ExtendedKeyUsageOID.SERVER_AUTH,
        server_names,
    )
    ensure(
        paths.operator_cert,
        paths.operator_key,
        operator_principal,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    for worker_id in workers:
        ensure(
            paths.worker_cert(worker_id),
            paths.worker_key(worker_id),
            Principal(PrincipalKind.WORKER, worker_id),
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
    return paths


def issue_client_cert(
    paths: PkiPaths,
    principal: Principal,
    lifetime: timedelta = DEFAULT_LIFETIME,
    *,
    public_key: ec.EllipticCurvePublicKey | None = None,
    now: datetime | None = None,
) -> tuple[bytes, bytes | None]:
    """Sign a client certificate for principal with the CA in paths.

    Returns (cert_pem, key_pem) with a new P-256 key, or (cert_pem, None) when public_key is given.
    The names come only from principal. now (tz-aware, default: the current time) is the start of
    the validity period, before the usual clock-skew allowance.
    """
    ca = load_ca(paths.ca_cert, paths.ca_key)
    key_pem: bytes | None = None
    if public_key is None:
        key = _new_key()
        public_key, key_pem = key.public_key(), _key_pem(key)
    cert = _sign_leaf(
        ca, public_key, principal, lifetime=lifetime, usage=ExtendedKeyUsageOID.CLIENT_AUTH, now=now
    )
    return cert_pem(cert), key_pem


def issue_worker_cert(
    directory: Path, worker_id: str, lifetime: timedelta = DEFAULT_LIFETIME
) -> tuple[Path, Path]:
    """Write `<worker_id>.pem` and `<worker_id>-key.pem` signed by the CA in directory."""
    paths = PkiPaths.at(directory)
    cert_path, key_path = paths.worker_cert(worker_id), paths.worker_key(worker_id)
    key = _new_key()
    cert_pem, _ = issue_client_cert(
        paths, Principal(PrincipalKind.WORKER, worker_id), lifetime, public_key=key.public_key()
    )
    _write_pair(cert_path, key_path, cert_pem, _key_pem(key))
    return cert_path, key_path


def issue_server_cert(
    directory: Path,
    server_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    lifetime: timedelta = DEFAULT_LIFETIME,
) -> tuple[Path, Path]:
    """Replace `server.pem` and `server-key.pem` with a new key and certificate.

    A running control plane picks them up for new connections without a restart (live streams
    keep the old certificate until they reconnect).
    """
    if not server_hosts:
        raise ValueError("server_hosts must name at least one host")
    paths = PkiPaths.at(directory)
    ca = load_ca(paths.ca_cert, paths.ca_key)
    key = _new_key()
    cert = _sign_leaf(
        ca,
        key.public_key(),
        SERVER_PRINCIPAL,
        lifetime=lifetime,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        extra_names=[_host_name(h) for h in server_hosts],
    )
    _write_pair(paths.server_cert, paths.server_key, cert_pem(cert), _key_pem(key))
    return paths.server_cert, paths.server_key


def ca_fingerprint(ca_pem: bytes) -> str:
    """`sha256:<hex>` of the DER encoding of the first certificate in ca_pem."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def principal_of(cert_pem: bytes) -> Principal | None:
    """The TaskRun principal of a certificate: its single URI SAN, if that is a TaskRun id."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:  # an X.509 SVID carries exactly one URI SAN
        return None
    return parse_spiffe_id(uris[0])


def not_after(cert_pem: bytes) -> datetime:
    """The end of the certificate's validity period (tz-aware UTC)."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
