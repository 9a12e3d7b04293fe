"""Access control: bootstrap tokens (enrollment), API tokens (bearer, with scopes), audit events.

A token is `<prefix><id>.<secret>`. The id is public (it names the token in lists and revocation);
the secret is 32 random bytes and only its SHA-256 is stored. A high-entropy secret needs no
slow hash: nobody can brute-force 256 bits from the digest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum, StrEnum

from taskrun.core.ids import WorkerId

BOOTSTRAP_PREFIX = "trb_"
API_PREFIX = "tra_"
RUN_PREFIX = "trr_"
_TOKEN = re.compile(r"(tr[ab]_)([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")
_RUN_TOKEN = re.compile(r"trr_(run_[0-9a-z]{26})\.([A-Za-z0-9_-]{43})")


class Scope(StrEnum):
    """What a bearer token may do. `admin` includes everything; `submit` includes `read`."""

    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"


_IMPLIED: dict[Scope, frozenset[Scope]] = {
    Scope.READ: frozenset({Scope.READ}),
    Scope.SUBMIT: frozenset({Scope.SUBMIT, Scope.READ}),
    Scope.ADMIN: frozenset(Scope),
}


def grants(scopes: frozenset[Scope], needed: Scope) -> bool:
    """Whether a token holding `scopes` may call something that needs `needed`."""
    return any(needed in _IMPLIED[s] for s in scopes)


class TokenState(IntEnum):
    ACTIVE = 1
    USED = 2
    EXPIRED = 3
    REVOKED = 4


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A freshly made token: the string to hand out once, and what is stored of it."""

    token: str
    token_id: str
    secret_hash: str


@dataclass(frozen=True, slots=True)
class ParsedToken:
    prefix: str
    token_id: str
    secret: str


def new_token(prefix: str) -> IssuedToken:
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return IssuedToken(f"{prefix}{token_id}.{secret}", token_id, hash_secret(secret))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(text: str, prefix: str) -> ParsedToken | None:
    """The parts of a token string of the given kind, or None when it is not one."""
    match = _TOKEN.fullmatch(text.strip())
    if match is None or match.group(1) != prefix:
        return None
    return ParsedToken(match.group(1), match.group(2), match.group(3))


def new_run_credential(run_id: str) -> IssuedToken:
    """A credential for one run (`trr_<run id>.<secret>`): it names its run, whose stored hash
    and state decide whether it is accepted, so it ends with the run without being revoked."""
    secret = secrets.token_urlsafe(32)
    return IssuedToken(f"{RUN_PREFIX}{run_id}.{secret}", run_id, hash_secret(secret))


def parse_run_credential(text: str) -> ParsedToken | None:
    """The run id and secret of a run credential, or None when the text is not one."""
    match = _RUN_TOKEN.fullmatch(text.strip())
    if match is None:
        return None
    return ParsedToken(RUN_PREFIX, match.group(1), match.group(2))


def secret_matches(secret: str, secret_hash: str) -> bool:
    """Constant-time comparison of a presented secret with a stored hash."""
    return hmac.compare_digest(hash_secret(secret), secret_hash)


@dataclass(slots=True)
class BootstrapToken:
    """A single-use enrollment token, bound to the worker identity (and labels) it produces."""

    id: str
    secret_hash: str
    worker_id: WorkerId
    created_at: datetime
    expires_at: datetime
    labels: dict[str, str] = field(default_factory=dict)
    created_by: str = ""
    used_at: datetime | None = None
    used_by_host: str = ""
    revoked_at: datetime | None = None

    def state(self, now: datetime) -> TokenState:
        if self.revoked_at is not None:
            return TokenState.REVOKED
        if self.used_at is not None:
            # consumed after it expired: it was presented (and refused), never used to enroll
            return TokenState.EXPIRED if self.used_at >= self.expires_at else TokenState.USED
        if now >= self.expires_at:
            return TokenState.EXPIRED
        return TokenState.ACTIVE


@dataclass(slots=True)
class ApiToken:
    """A bearer credential for programs, limited to its scopes."""

    id: str
    secret_hash: str
    name: str
    scopes: frozenset[Scope]
    created_at: datetime
    expires_at: datetime | None = None  # None: does not expire
    created_by: str = ""
    revoked_at: datetime | None = None

    def state(self, now: datetime) -> TokenState:
        if self.revoked_at is not None:
            return TokenState.REVOKED
        if self.expires_at is not None and now >= self.expires_at:
            return TokenState.EXPIRED
        return TokenState.ACTIVE


class AuditKind(StrEnum):
    WORKER_ENROLLED = "worker_enrolled"
    ENROLLMENT_REJECTED = "enrollment_rejected"
    CERTIFICATE_RENEWED = "certificate_renewed"
    RENEWAL_REJECTED = "renewal_rejected"
    WORKER_REVOKED = "worker_revoked"
    CONNECTION_REJECTED = "connection_rejected"  # a worker stream refused
    REQUEST_REJECTED = "request_rejected"  # an operator call without valid credentials or scope
    BOOTSTRAP_TOKEN_CREATED = "bootstrap_token_created"
    BOOTSTRAP_TOKEN_REVOKED = "bootstrap_token_revoked"
    API_TOKEN_CREATED = "api_token_created"
    API_TOKEN_REVOKED = "api_token_revoked"
    OPERATOR_CERTIFICATE_ISSUED = "operator_certificate_issued"  # `taskrun login`


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One security event. `id` is assigned by the store (0 until stored)."""

    time: datetime
    kind: AuditKind
    principal: str = ""  # who acted or was refused
    subject: str = ""  # what it was about
    peer: str = ""
    detail: str = ""
    id: int = 0


@dataclass(frozen=True, slots=True)
class AuditQuery:
    limit: int = 100
    before_id: int = 0  # 0 = from the newest
    kinds: frozenset[AuditKind] = frozenset()
