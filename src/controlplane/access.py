"""Access control: bootstrap tokens and enrollment, certificate renewal, API tokens, audit log.

Enrollment order matters (see ARCHITECTURE.md, security model): the request is checked first
(a bad CSR leaves the token unused), then the token is consumed in one atomic store operation
and only then checked for expiry, so a replay of any token, expired or not, always fails.
"""

from __future__ import annotations

import asyncio
import secrets
import time
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
from taskrun.core.validation import validate_labels

log = structlog.get_logger("taskrun.audit")

MAX_TOKEN_NAME = 64
# Refusals are recorded, but a flood of them must not fill the store: at most this many are
# persisted per window; the rest are only counted (and logged once per window).
REJECTIONS_PER_WINDOW = 100
REJECTION_WINDOW = 10.0


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
        self._window_start = 0.0
        self._window_rejections = 0
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
    ) -> None:
        """Record a security event: one structured log line, and a row in the store."""
        self.event_counts[kind] += 1
        fields = {"audit": kind.value, "principal": principal, "subject": subject, "peer": peer}
        if rejection:
            log.warning(detail or kind.value, **fields)
            now = time.monotonic()
            if now - self._window_start > REJECTION_WINDOW:
                self._window_start, self._window_rejections = now, 0
            self._window_rejections += 1
            if self._window_rejections > REJECTIONS_PER_WINDOW:
                self.suppressed_rejections += 1
                return
        else:
            log.info(detail or kind.value, **fields)
        event = AuditEvent(
            time=utcnow(),
            kind=kind,
            principal=principal[:256],
            subject=subject[:256],
            peer=peer[:256],
            detail=detail[:1024],
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
            raise errors.NotFound(f"no bootstrap token {token_id!r}", field="token_id")
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
            state = "revoked" if stored.revoked_at is not None else "already used"
            raise errors.Unauthenticated(f"token {parsed.token_id} was {state}", field="token")
        if now >= token.expires_at:
            raise errors.Unauthenticated(
                f"token {token.id} expired at {token.expires_at:%Y-%m-%d %H:%M:%S} UTC",
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
            detail=f"worker enrolled from host {hostname!r}; certificate serial "
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
            raise errors.NotFound(f"no API token {token_id!r}", field="token_id")
        if token.revoked_at is not None:
            raise errors.FailedPrecondition(f"token {token.id} is revoked", field="token_id")
        token = replace(token, revoked_at=utcnow())
        self._api_tokens[token.id] = token  # refused from this instant, before the commit
        self.revocation(token.id).set()  # and its live streams end now
        await self.engine.commit(ChangeSet(api_tokens=[token]))
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
