"""Access control: bootstrap tokens and enrollment, certificate renewal, API tokens, audit log.

Enrollment order matters (see ARCHITECTURE.md, security model): the request is checked first
(a bad CSR leaves the token unused), then the token is consumed in one atomic store operation
and only then checked for expiry, so a replay of any token, expired or not, always fails.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections import Counter as Tally
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from taskrun.controlplane import pki
from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.guard import current_method
from taskrun.controlplane.ratelimit import RateLimit
from taskrun.core import errors
from taskrun.core.access import (
    API_PREFIX,
    BOOTSTRAP_PREFIX,
    ApiToken,
    AuditEvent,
    AuditKind,
    AuditQuery,
    BootstrapToken,
    Scope,
    TokenState,
    new_token,
    parse_token,
    secret_matches,
)
from taskrun.core.durations import human_duration
from taskrun.core.ids import WorkerId, is_valid_worker_id
from taskrun.core.models import utcnow
from taskrun.core.store import ChangeSet
from taskrun.core.text import clip, quoted
from taskrun.core.validation import validate_labels

log = structlog.get_logger("taskrun.audit")

MAX_TOKEN_NAME = 64
LOGIN_UNIT_PREFIX = "login api-token "  # the subject OU of a `taskrun login` certificate
MAX_API_TOKEN_TTL = 5 * 365 * 86400.0
# Refusals are recorded, but a flood of them must not fill the store: at most this many per
# source (principal, else peer host) are persisted and logged per window; the rest are counted.
REJECTIONS_PER_WINDOW = 100
REJECTION_WINDOW = 10.0
REJECTION_SOURCES = 1000  # sources tracked at once; beyond, new ones share one budget


@dataclass(frozen=True, slots=True)
class Enrolled:
    worker_id: WorkerId
    certificate_pem: bytes
    ca_pem: bytes
    labels: dict[str, str]
    expires_at: datetime


class AccessControl:
    """Tokens, certificates and the audit log of one control plane."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.store = engine.store
        self.config = config
        self.session_port = 0
        self.public_port = 0
        self._ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
        self._ca_pem = b""
        self.ca_fingerprint = ""  # sha256:… of the CA certificate, handed out with tokens
        self._api_tokens: dict[str, ApiToken] = {}
        self._revoked: dict[str, asyncio.Event] = {}  # set when that API token is revoked
        self._rejections = RateLimit(
            REJECTIONS_PER_WINDOW, REJECTION_WINDOW, max_keys=REJECTION_SOURCES
        )
        self.suppressed_rejections = 0
        self.event_counts: Tally[AuditKind] = Tally()  # every audit event since the start

    async def load(self) -> None:
        """Read the CA (if its key is here) and the API tokens."""
        cfg = self.config
        self._ca_pem = cfg.ca_cert.read_bytes()
        self.ca_fingerprint = pki.ca_fingerprint(self._ca_pem)
        if cfg.ca_key_path().exists():
            self._ca = pki.load_ca(cfg.ca_cert, cfg.ca_key_path())
        else:
            log.warning(
                "CA key not found: enrollment and renewal are refused",
                ca_key=str(cfg.ca_key_path()),
            )
        self._api_tokens = {t.id: t for t in await self.store.list_api_tokens()}

    # --- audit ---------------------------------------------------------------------------------

    def audit(
        self,
        kind: AuditKind,
        *,
        principal: str = "",
        subject: str = "",
        peer: str = "",
        detail: str = "",
        rejection: bool = False,
        claimed: bool = False,
    ) -> None:
        """Record a security event: one structured log line, and a row in the store.

        A refusal names the method it refused (in its detail). Refusals are rate-limited per
        source, so a flood from one source never hides another's attempt: the source is the
        principal when it was authenticated (a certificate, a valid API token), else the peer's
        address (`claimed`: the principal is only what the caller said, e.g. an unknown token id,
        which an attacker could vary to get a fresh budget each time)."""
        self.event_counts[kind] += 1
        method = current_method.get()
        if rejection and method:
            detail = f"{detail or kind.value} (call {method})"
        fields = {
            "audit": kind.value,
            "principal": clip(principal),
            "subject": clip(subject),
            "peer": clip(peer),
        }
        if rejection:
            source = _peer_host(peer) if claimed or not principal else principal
            if self._rejections.allow(source):
                log.warning(clip(detail or kind.value, 1024), **fields)
            else:
                self.suppressed_rejections += 1
                if self._rejections.suppressed(source) == 1:
                    log.warning("further refusals from this source are only counted", **fields)
                return
        else:
            log.info(clip(detail or kind.value, 1024), **fields)
        event = AuditEvent(
            time=utcnow(),
            kind=kind,
            principal=clip(principal, 256),
            subject=clip(subject, 256),
            peer=clip(peer, 256),
            detail=clip(detail, 1024),
        )
        self.engine.commit(ChangeSet(audit_events=[event]))

    async def list_audit_events(self, query: AuditQuery) -> list[AuditEvent]:
        await self.engine.flush()  # what was recorded before this call is visible
        return await self.store.list_audit_events(query)

    # --- bootstrap tokens ----------------------------------------------------------------------

    async def create_bootstrap_token(
        self, *, by: str, ttl: float, worker_id: str, labels: Mapping[str, str]
    ) -> tuple[str, BootstrapToken]:
        """A new single-use token bound to `worker_id` (generated when empty) and `labels`."""
        cfg = self.config
        if ttl < 0:
            raise errors.InvalidArgument("must not be negative", field="ttl_seconds")
        ttl = ttl or cfg.bootstrap_token_ttl
        if ttl > cfg.max_bootstrap_token_ttl:
            raise errors.InvalidArgument(
                f"must be at most {human_duration(cfg.max_bootstrap_token_ttl)}, "
                f"not {human_duration(ttl)}",
                field="ttl_seconds",
            )
        if worker_id:
            if not is_valid_worker_id(worker_id):
                raise errors.InvalidArgument(
                    "is not a valid worker id (lower case letters, digits, '.', '_', '-'; "
                    "at most 64)",
                    field="worker_id",
                )
        else:
            worker_id = f"worker-{secrets.token_hex(4)}"
        try:
            self.engine.check_not_revoked(WorkerId(worker_id))
        except errors.PermissionDenied as exc:
            raise errors.FailedPrecondition(
                f"{exc.message}; enroll the machine under a new worker id", field="worker_id"
            ) from None
        checked = validate_labels(dict(labels))
        issued = new_token(BOOTSTRAP_PREFIX)
        now = utcnow()
        token = BootstrapToken(
            id=issued.token_id,
            secret_hash=issued.secret_hash,
            worker_id=WorkerId(worker_id),
            created_at=now,
            expires_at=now + timedelta(seconds=ttl),
            labels=checked,
            created_by=by,
        )
        await self.engine.commit(ChangeSet(bootstrap_tokens=[token]))
        self.audit(
            AuditKind.BOOTSTRAP_TOKEN_CREATED,
            principal=by,
            subject=f"token {token.id} for worker {worker_id}",
            detail=f"bootstrap token created, valid for {human_duration(ttl)}",
        )
        return issued.token, token

    async def list_bootstrap_tokens(self, include_inactive: bool) -> list[BootstrapToken]:
        await self.engine.flush()
        now = utcnow()
        tokens = await self.store.list_bootstrap_tokens()
        return [t for t in tokens if include_inactive or t.state(now) is TokenState.ACTIVE]

    async def revoke_bootstrap_token(self, token_id: str, *, by: str) -> BootstrapToken:
        await self.engine.flush()
        token = await self.store.get_bootstrap_token(_token_id(token_id, BOOTSTRAP_PREFIX))
        if token is None:
            raise errors.NotFound(f"no bootstrap token {quoted(token_id)}", field="token_id")
        if token.revoked_at is not None or token.used_at is not None:
            state = token.state(utcnow()).name.lower()
            raise errors.FailedPrecondition(f"token {token.id} is {state}", field="token_id")
        token = replace(token, revoked_at=utcnow())
        await self.engine.commit(ChangeSet(bootstrap_tokens=[token]))
        self.audit(
            AuditKind.BOOTSTRAP_TOKEN_REVOKED,
            principal=by,
            subject=f"token {token.id}",
            detail="bootstrap token revoked",
        )
        return token

    # --- enrollment and renewal ----------------------------------------------------------------

    @property
    def _worker_cert_lifetime(self) -> timedelta:
        return timedelta(seconds=self.config.worker_cert_lifetime)

    def _require_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if self._ca is None:
            raise errors.FailedPrecondition(
                "this control plane has no CA key, so it cannot sign certificates "
                f"(expected at {self.config.ca_key_path()})"
            )
        return self._ca

    async def enroll(self, token_text: str, csr_pem: bytes, hostname: str, peer: str) -> Enrolled:
        """Trade a bootstrap token and a CSR for the token's worker identity."""
        try:
            return await self._enroll(token_text, csr_pem, hostname[:255], peer)
        except errors.TaskRunError as exc:
            self.audit(
                AuditKind.ENROLLMENT_REJECTED,
                principal=_token_label(token_text),
                subject=hostname[:255],
                peer=peer,
                detail=str(exc),
                rejection=True,
                claimed=True,
            )
            raise

    async def _enroll(self, token_text: str, csr_pem: bytes, hostname: str, peer: str) -> Enrolled:
        ca = self._require_ca()
        parsed = parse_token(token_text, BOOTSTRAP_PREFIX)
        if parsed is None:
            raise errors.Unauthenticated("is not a TaskRun bootstrap token (trb_…)", field="token")
        key = _csr_key(csr_pem)  # checked before the token is touched: it stays usable
        stored = await self.store.get_bootstrap_token(parsed.token_id)
        if stored is None or not secret_matches(parsed.secret, stored.secret_hash):
            raise errors.Unauthenticated("unknown token", field="token")
        now = utcnow()
        token = await self.store.consume_bootstrap_token(parsed.token_id, now, hostname)
        if token is None:  # used or revoked: a replay, or a race lost to another enrollment
            state = {TokenState.REVOKED: "revoked", TokenState.EXPIRED: "expired"}.get(
                stored.state(now), "already used"
            )
            raise errors.Unauthenticated(f"token {parsed.token_id} was {state}", field="token")
        if now >= token.expires_at:
            raise errors.Unauthenticated(
                f"token {token.id} expired at {token.expires_at:%Y-%m-%d %H:%M:%S} UTC "
                f"(presented by host {quoted(hostname)})",
                field="token",
            )
        self.engine.check_not_revoked(token.worker_id)
        cert = pki.sign_worker_key(ca, key, token.worker_id, self._worker_cert_lifetime)
        await self.engine.record_enrollment(token.worker_id, token.labels, hostname)
        self.audit(
            AuditKind.WORKER_ENROLLED,
            principal=f"token {token.id}",
            subject=token.worker_id,
            peer=peer,
            detail=f"worker enrolled from host {quoted(hostname)}; certificate serial "
            f"{cert.serial_number:x} valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
        )
        return Enrolled(
            worker_id=token.worker_id,
            certificate_pem=pki.cert_pem(cert),
            ca_pem=self._ca_pem,
            labels=dict(token.labels),
            expires_at=cert.not_valid_after_utc,
        )

    async def renew(self, worker_id: WorkerId, csr_pem: bytes, peer: str) -> x509.Certificate:
        """A new certificate for an authenticated worker's own identity, over a new key."""
        try:
            ca = self._require_ca()
            self.engine.check_not_revoked(worker_id)
            key = _csr_key(csr_pem)
            cert = pki.sign_worker_key(ca, key, worker_id, self._worker_cert_lifetime)
        except errors.TaskRunError as exc:
            self.audit(
                AuditKind.RENEWAL_REJECTED,
                principal=f"worker {worker_id}",
                subject=worker_id,
                peer=peer,
                detail=str(exc),
                rejection=True,
            )
            raise
        self.audit(
            AuditKind.CERTIFICATE_RENEWED,
            principal=f"worker {worker_id}",
            subject=worker_id,
            peer=peer,
            detail=f"certificate renewed; serial {cert.serial_number:x} "
            f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
        )
        return cert

    async def issue_operator_certificate(
        self, token_id: str, csr_pem: bytes, ttl: float, peer: str
    ) -> x509.Certificate:
        """`taskrun login`: an operator certificate bound to the caller's (admin) API token,
        valid for `ttl` (0: the default) but never past the token's expiry."""
        cfg = self.config
        token = self._api_tokens.get(token_id)
        if token is None or token.state(utcnow()) is not TokenState.ACTIVE:
            raise errors.Unauthenticated("authorization: the API token is not active")
        if ttl < 0 or ttl > cfg.operator_cert_lifetime:
            raise errors.InvalidArgument(
                f"must be between 0 (the default) and {cfg.operator_cert_lifetime:.0f} seconds",
                field="ttl_seconds",
            )
        lifetime = timedelta(seconds=ttl or cfg.operator_cert_lifetime)
        if token.expires_at is not None:
            lifetime = min(lifetime, token.expires_at - utcnow())
        ca = self._require_ca()
        key = _csr_key(csr_pem)
        name = f"api-token-{token.id}"
        cert = pki.sign_operator_key(ca, key, name, lifetime, unit=f"{LOGIN_UNIT_PREFIX}{token.id}")
        self.audit(
            AuditKind.OPERATOR_CERTIFICATE_ISSUED,
            principal=f"api-token {token.id} ({token.name})",
            subject=f"operator {name}",
            peer=peer,
            detail=f"operator certificate issued; serial {cert.serial_number:x} valid until "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC, while token {token.id} is active",
        )
        return cert

    @property
    def ca_pem(self) -> bytes:
        return self._ca_pem

    # --- API tokens ----------------------------------------------------------------------------

    async def create_api_token(
        self, *, by: str, name: str, scopes: frozenset[Scope], ttl: float
    ) -> tuple[str, ApiToken]:
        if not name.strip():
            raise errors.InvalidArgument("must not be empty", field="name")
        if len(name) > MAX_TOKEN_NAME:
            raise errors.InvalidArgument(
                f"must be at most {MAX_TOKEN_NAME} characters", field="name"
            )
        if ttl < 0:
            raise errors.InvalidArgument("must not be negative", field="ttl_seconds")
        if ttl > MAX_API_TOKEN_TTL:
            raise errors.InvalidArgument(
                f"must be at most {MAX_API_TOKEN_TTL:.0f} seconds (5 years), or 0 for no expiry",
                field="ttl_seconds",
            )
        issued = new_token(API_PREFIX)
        now = utcnow()
        token = ApiToken(
            id=issued.token_id,
            secret_hash=issued.secret_hash,
            name=name,
            scopes=scopes,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl) if ttl else None,
            created_by=by,
        )
        await self.engine.commit(ChangeSet(api_tokens=[token]))
        self._api_tokens[token.id] = token
        self.audit(
            AuditKind.API_TOKEN_CREATED,
            principal=by,
            subject=f"api token {token.id} ({name})",
            detail=f"API token created with scopes {', '.join(sorted(scopes))}",
        )
        return issued.token, token

    def list_api_tokens(self, include_inactive: bool) -> list[ApiToken]:
        now = utcnow()
        tokens = sorted(self._api_tokens.values(), key=lambda t: (t.created_at, t.id))
        return [t for t in tokens if include_inactive or t.state(now) is TokenState.ACTIVE]

    async def revoke_api_token(self, token_id: str, *, by: str) -> ApiToken:
        token = self._api_tokens.get(_token_id(token_id, API_PREFIX))
        if token is None:
            raise errors.NotFound(f"no API token {quoted(token_id)}", field="token_id")
        if token.revoked_at is not None:
            raise errors.FailedPrecondition(f"token {token.id} is revoked", field="token_id")
        active, token = token, replace(token, revoked_at=utcnow())
        self._api_tokens[token.id] = token  # refused from this instant, before the commit
        self.revocation(token.id).set()  # and its live streams end now
        try:
            await self.engine.commit(ChangeSet(api_tokens=[token]))
        except errors.Unavailable:
            # Not revoked after all (the caller is told so): the token works as the store says.
            self._api_tokens[token.id] = active
            self._revoked.pop(token.id, None)
            raise
        self.audit(
            AuditKind.API_TOKEN_REVOKED,
            principal=by,
            subject=f"api token {token.id} ({token.name})",
            detail="API token revoked",
        )
        return token

    def revocation(self, token_id: str) -> asyncio.Event:
        """Set once the API token is revoked (streaming calls made with it wait on this too)."""
        event = self._revoked.get(token_id)
        if event is None:
            event = self._revoked[token_id] = asyncio.Event()
        return event

    def api_token_active(self, token_id: str) -> bool:
        token = self._api_tokens.get(token_id)
        return token is not None and token.state(utcnow()) is TokenState.ACTIVE

    def authenticate_api_token(self, text: str) -> ApiToken:
        """The active API token `text` names; Unauthenticated otherwise."""
        parsed = parse_token(text, API_PREFIX)
        if parsed is None:
            raise errors.Unauthenticated("authorization: not a TaskRun API token (Bearer tra_…)")
        token = self._api_tokens.get(parsed.token_id)
        if token is None or not secret_matches(parsed.secret, token.secret_hash):
            raise errors.Unauthenticated("authorization: unknown API token")
        state = token.state(utcnow())
        if state is not TokenState.ACTIVE:
            raise errors.Unauthenticated(
                f"authorization: API token {token.id} is {state.name.lower()}"
            )
        return token


def _peer_host(peer: str) -> str:
    """`ipv4:10.0.0.5:51234` → `ipv4:10.0.0.5`, `ipv6:[2001:db8::1]:443` → its /64: one source
    however many ports (or IPv6 addresses of one network) it uses."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        try:
            address = ipaddress.ip_address(rest[1:].partition("]")[0])
        except ValueError:
            return peer
        return f"ipv6:{ipaddress.ip_network(f'{address}/64', strict=False)}"
    return peer.rsplit(":", 1)[0] if kind == "ipv4" else peer


def _csr_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The key of a usable CSR; INVALID_ARGUMENT naming `csr_pem` and why otherwise."""
    try:
        return pki.csr_public_key(csr_pem)
    except pki.CsrRejected as exc:
        raise errors.InvalidArgument(str(exc), field="csr_pem") from None


def _token_id(value: str, prefix: str) -> str:
    """A token id as given to list/revoke: the bare id, or a whole token (its id part)."""
    if not value:
        raise errors.InvalidArgument("must not be empty", field="token_id")
    parsed = parse_token(value, prefix)
    if parsed is not None:
        return parsed.token_id
    if len(value) > 64:
        raise errors.InvalidArgument("is too long to be a token id", field="token_id")
    return value.removeprefix(prefix)


def _token_label(text: str) -> str:
    """How a presented bootstrap token appears in the audit log: its public id, never more."""
    parsed = parse_token(text, BOOTSTRAP_PREFIX)
    return f"token {parsed.token_id}" if parsed else "malformed token"
