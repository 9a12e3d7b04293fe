"""The local PKI: files and modes, idempotency, and what each certificate says."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from taskrun.controlplane.pki import (
    PkiPaths,
    ca_fingerprint,
    init_pki,
    issue_client_cert,
    issue_worker_cert,
    not_after,
    principal_of,
    write_private,
)
from taskrun.core.identity import Principal, PrincipalKind

T = TypeVar("T", bound=x509.ExtensionType)

WORKER_1 = Principal(PrincipalKind.WORKER, "worker-1")


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return init_pki(tmp_path / "pki")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ext(cert: x509.Certificate, kind: type[T]) -> T:
    return cert.extensions.get_extension_for_class(kind).value


def leaf_pairs(pki: PkiPaths) -> list[tuple[Path, Path]]:
    return [
        (pki.server_cert, pki.server_key),
        (pki.operator_cert, pki.operator_key),
        (pki.worker_cert("worker-1"), pki.worker_key("worker-1")),
        (pki.worker_cert("worker-2"), pki.worker_key("worker-2")),
    ]


def verify_client(pki: PkiPaths, cert_pem: bytes) -> None:
    """Path-validate a client certificate against the CA (signature, validity, EKU)."""
    store = Store([load(pki.ca_cert)])
    verifier = PolicyBuilder().store(store).build_client_verifier()
    verifier.verify(x509.load_pem_x509_certificate(cert_pem), [])


# --- files -------------------------------------------------------------------------------------


def test_init_creates_every_file_with_owner_only_keys(pki: PkiPaths) -> None:
    assert mode(pki.directory) == 0o700
    for cert_path, key_path in [(pki.ca_cert, pki.ca_key), *leaf_pairs(pki)]:
        assert mode(cert_path) == 0o644, cert_path
        assert mode(key_path) == 0o600, key_path
    names = sorted(p.name for p in pki.directory.iterdir())
    assert names == sorted(
        [
            "ca.pem",
            "ca-key.pem",
            "server.pem",
            "server-key.pem",
            "operator.pem",
            "operator-key.pem",
            "worker-1.pem",
            "worker-1-key.pem",
            "worker-2.pem",
            "worker-2-key.pem",
        ]
    )


def test_paths_follow_the_fixed_layout(tmp_path: Path) -> None:
    paths = PkiPaths.at(tmp_path)
    assert paths.ca_key == tmp_path / "ca-key.pem"
    assert paths.worker_cert("w7") == tmp_path / "w7.pem"
    assert paths.worker_key("w7") == tmp_path / "w7-key.pem"


def test_rerunning_init_keeps_the_ca_and_existing_certificates(pki: PkiPaths) -> None:
    fingerprint = ca_fingerprint(pki.ca_cert.read_bytes())
    before = {p: p.read_bytes() for pair in leaf_pairs(pki) for p in pair}

    init_pki(pki.directory)

    assert ca_fingerprint(pki.ca_cert.read_bytes()) == fingerprint
    assert {p: p.read_bytes() for p in before} == before


def test_rerunning_init_adds_new_workers_signed_by_the_existing_ca(pki: PkiPaths) -> None:
    fingerprint = ca_fingerprint(pki.ca_cert.read_bytes())

    init_pki(pki.directory, workers=["worker-3"])

    assert ca_fingerprint(pki.ca_cert.read_bytes()) == fingerprint
    verify_client(pki, pki.worker_cert("worker-3").read_bytes())


def test_force_regenerates_the_ca_and_every_certificate(pki: PkiPaths) -> None:
    fingerprint = ca_fingerprint(pki.ca_cert.read_bytes())
    old_server = pki.server_cert.read_bytes()

    init_pki(pki.directory, force=True)

    assert ca_fingerprint(pki.ca_cert.read_bytes()) != fingerprint
    assert pki.server_cert.read_bytes() != old_server
    for cert_path, _ in leaf_pairs(pki):
        load(cert_path).verify_directly_issued_by(load(pki.ca_cert))


def test_a_ca_certificate_without_its_key_is_not_silently_replaced(pki: PkiPaths) -> None:
    pki.ca_key.unlink()

    with pytest.raises(FileNotFoundError, match=r"ca-key\.pem"):
        init_pki(pki.directory)


def test_bad_worker_id_is_rejected_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'Bad/ID'"):
        init_pki(tmp_path / "pki", workers=["worker-1", "Bad/ID"])
    assert not (tmp_path / "pki").exists()


@pytest.mark.parametrize("worker_id", ["ca", "server", "operator", "worker-1-key"])
def test_worker_ids_that_would_overwrite_other_files_are_rejected(
    tmp_path: Path, worker_id: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(worker_id))):
        init_pki(tmp_path / "pki", workers=[worker_id])


def test_write_private_replaces_a_file_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "secret.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)

    write_private(path, b"new")

    assert path.read_bytes() == b"new"
    assert mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.pem"]  # no temp file left


# --- certificate contents ----------------------------------------------------------------------


def test_ca_is_a_p256_signing_only_ca_valid_for_ten_years(pki: PkiPaths) -> None:
    ca = load(pki.ca_cert)
    constraints = ext(ca, x509.BasicConstraints)
    assert constraints.ca is True
    assert constraints.path_length == 0
    usage = ext(ca, x509.KeyUsage)
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    assert ext(ca, x509.SubjectKeyIdentifier).digest
    assert ca.subject.rfc4514_string() == "O=TaskRun,CN=TaskRun CA"
    assert ca.subject == ca.issuer
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= timedelta(days=3650)
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)


def test_every_certificate_chains_to_the_ca(pki: PkiPaths) -> None:
    ca = load(pki.ca_cert)
    for cert_path, _ in leaf_pairs(pki):
        load(cert_path).verify_directly_issued_by(ca)  # raises on a bad signature


def test_every_key_is_an_unencrypted_pkcs8_p256_key_matching_its_certificate(
    pki: PkiPaths,
) -> None:
    for cert_path, key_path in [(pki.ca_cert, pki.ca_key), *leaf_pairs(pki)]:
        data = key_path.read_bytes()
        assert data.startswith(b"-----BEGIN PRIVATE KEY-----"), key_path
        key = serialization.load_pem_private_key(data, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert key.public_key() == load(cert_path).public_key()


@pytest.mark.parametrize(
    ("attr", "uri", "common_name"),
    [
        ("operator_cert", "spiffe://taskrun/operator/admin", "admin"),
        ("worker-1", "spiffe://taskrun/worker/worker-1", "worker-1"),
        ("worker-2", "spiffe://taskrun/worker/worker-2", "worker-2"),
    ],
)
def test_client_certificates_carry_one_spiffe_id_and_client_auth_only(
    pki: PkiPaths, attr: str, uri: str, common_name: str
) -> None:
    path = getattr(pki, attr) if attr == "operator_cert" else pki.worker_cert(attr)
    cert = load(path)
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert san.get_values_for_type(x509.DNSName) == []
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext(cert, x509.BasicConstraints).ca is False
    assert ext(cert, x509.KeyUsage).digital_signature
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == common_name
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "TaskRun"
    verify_client(pki, path.read_bytes())


def test_server_certificate_names_its_hosts_and_its_spiffe_id(pki: PkiPaths) -> None:
    cert = load(pki.server_cert)
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://taskrun/server/control-plane"
    ]
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(cert, x509.BasicConstraints).ca is False
    verifier = (
        PolicyBuilder()
        .store(Store([load(pki.ca_cert)]))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    verifier.verify(cert, [])


def test_server_hosts_may_include_ipv6_and_extra_names(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "pki", server_hosts=["cp.example.internal", "::1"], workers=[])
    san = ext(load(pki.server_cert), x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["cp.example.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]


def test_serial_numbers_are_random_and_distinct(pki: PkiPaths) -> None:
    serials = {load(p).serial_number for p in [pki.ca_cert, *(c for c, _ in leaf_pairs(pki))]}
    assert len(serials) == 5
    assert all(s > 2**64 for s in serials)


def test_lifetime_starts_five_minutes_early_to_allow_clock_skew(pki: PkiPaths) -> None:
    start = datetime.now(UTC)
    cert_pem, _ = issue_client_cert(pki, WORKER_1, timedelta(hours=24))
    cert = x509.load_pem_x509_certificate(cert_pem)

    expected_start = start - timedelta(minutes=5)
    assert abs(cert.not_valid_before_utc - expected_start) < timedelta(seconds=5)
    assert abs(not_after(cert_pem) - (start + timedelta(hours=24))) < timedelta(seconds=5)
    assert not_after(cert_pem).tzinfo is not None


# --- helpers and issuing -----------------------------------------------------------------------


def test_ca_fingerprint_is_sha256_of_the_der_certificate(pki: PkiPaths) -> None:
    ca_pem = pki.ca_cert.read_bytes()
    fingerprint = ca_fingerprint(ca_pem)

    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    der = load(pki.ca_cert).public_bytes(serialization.Encoding.DER)
    assert fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()


def test_ca_fingerprint_uses_the_first_certificate_of_a_bundle(pki: PkiPaths) -> None:
    bundle = pki.ca_cert.read_bytes() + pki.server_cert.read_bytes()
    assert ca_fingerprint(bundle) == ca_fingerprint(pki.ca_cert.read_bytes())


def test_principal_of_round_trips_every_issued_identity(pki: PkiPaths) -> None:
    assert principal_of(pki.worker_cert("worker-2").read_bytes()) == Principal(
        PrincipalKind.WORKER, "worker-2"
    )
    assert principal_of(pki.operator_cert.read_bytes()) == Principal(
        PrincipalKind.OPERATOR, "admin"
    )
    assert principal_of(pki.server_cert.read_bytes()) == Principal(
        PrincipalKind.SERVER, "control-plane"
    )
    assert principal_of(pki.ca_cert.read_bytes()) is None  # no SAN at all


def test_issue_client_cert_with_a_new_key_returns_both(pki: PkiPaths) -> None:
    principal = Principal(PrincipalKind.OPERATOR, "ci-bot")
    cert_pem, key_pem = issue_client_cert(pki, principal)

    assert key_pem is not None
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == x509.load_pem_x509_certificate(cert_pem).public_key()
    assert principal_of(cert_pem) == principal
    verify_client(pki, cert_pem)


def test_issue_client_cert_for_a_given_public_key_returns_no_key(pki: PkiPaths) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem, key_pem = issue_client_cert(pki, WORKER_1, public_key=key.public_key())

    assert key_pem is None
    assert x509.load_pem_x509_certificate(cert_pem).public_key() == key.public_key()
    assert principal_of(cert_pem) == WORKER_1


def test_issue_client_cert_refuses_keys_other_than_p256(pki: PkiPaths) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="P-256"):
        issue_client_cert(pki, WORKER_1, public_key=key.public_key())


def test_issue_client_cert_refuses_a_name_that_is_not_a_spiffe_path_segment(
    pki: PkiPaths,
) -> None:
    with pytest.raises(ValueError, match="SPIFFE"):
        issue_client_cert(pki, Principal(PrincipalKind.WORKER, "a/b"))


def test_issue_client_cert_in_the_past_gives_an_expired_certificate(pki: PkiPaths) -> None:
    now = datetime.now(UTC)
    cert_pem, _ = issue_client_cert(pki, WORKER_1, timedelta(hours=1), now=now - timedelta(days=1))
    assert not_after(cert_pem) < now


def test_client_certificates_never_outlive_the_ca(pki: PkiPaths) -> None:
    cert_pem, _ = issue_client_cert(pki, WORKER_1, timedelta(days=365 * 20))
    assert not_after(cert_pem) == load(pki.ca_cert).not_valid_after_utc


def test_issue_worker_cert_writes_a_pair_signed_by_the_ca(pki: PkiPaths) -> None:
    cert_path, key_path = issue_worker_cert(pki.directory, "gpu-7", timedelta(hours=24))

    assert (cert_path, key_path) == (pki.worker_cert("gpu-7"), pki.worker_key("gpu-7"))
    assert mode(key_path) == 0o600
    assert mode(cert_path) == 0o644
    assert principal_of(cert_path.read_bytes()) == Principal(PrincipalKind.WORKER, "gpu-7")
    verify_client(pki, cert_path.read_bytes())


def test_issue_worker_cert_rejects_a_bad_id(pki: PkiPaths) -> None:
    with pytest.raises(ValueError, match=re.escape("'../evil'")):
        issue_worker_cert(pki.directory, "../evil")
