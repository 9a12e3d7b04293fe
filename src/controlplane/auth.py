"""Who is calling, and may they: checked at the top of every handler.

Callers prove who they are with a client certificate (mTLS listener: operators and workers) or
an API token (`authorization: Bearer tra_…`, on either listener). An operator certificate holds
every scope; an API token holds the scopes it was created with. Refusals are audited.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NoReturn, TypeVar

import grpc
from cryptography import x509

from taskrun.controlplane.access import LOGIN_UNIT_PREFIX, AccessControl
from taskrun.core import errors
from taskrun.core.access import (
    API_PREFIX,
    RUN_PREFIX,
    AuditKind,
    Scope,
    grants,
    parse_run_credential,
    parse_token,
)
from taskrun.core.identity import Principal, PrincipalKind, parse_spiffe_id
from taskrun.core.ids import RunId, TaskId, WorkerId
from taskrun.core.models import utcnow

ALL_SCOPES = frozenset(Scope)
RUN_SCOPES = frozenset({Scope.SUBMIT})  # narrowed further by the calls that accept runs
T = TypeVar("T")


def _principal(auth: Mapping[str, Sequence[bytes | str]]) -> Principal | None:
    for key in ("peer_spiffe_id", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            principal = parse_spiffe_id(value.decode() if isinstance(value, bytes) else value)
            if principal is not None:
                return principal
    return None


def peer_principal(context: grpc.aio.ServicerContext) -> Principal | None:
    """The TaskRun identity of the caller's certificate, or None."""
    return _principal(context.auth_context() or {})


def peer(
    context: grpc.aio.ServicerContext,
) -> tuple[Principal | None, PeerCertificate | None]:
    """The caller's identity and certificate, read from one look at the call's auth context
    (each look copies every property, the certificate's PEM included)."""
    auth = context.auth_context() or {}
    return _principal(auth), _certificate(auth)


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """What a call needs to know of the caller's certificate (parsed once per PEM, cached)."""

    not_after: datetime
    login_token_id: str  # the API token a `taskrun login` certificate was issued against


@functools.lru_cache(maxsize=4096)
def _parse_peer_certificate(pem: bytes) -> PeerCertificate:
    cert = x509.load_pem_x509_certificate(pem)
    return PeerCertificate(cert.not_valid_after_utc, login_token_id(cert))


def login_token_id(cert: x509.Certificate) -> str:
    """The API token id recorded in an operator certificate issued by `taskrun login`, or ""."""
    values = cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)
    for attribute in values:
        text = attribute.value if isinstance(attribute.value, str) else ""
        if text.startswith(LOGIN_UNIT_PREFIX):
            return text.removeprefix(LOGIN_UNIT_PREFIX)
    return ""


def peer_certificate(context: grpc.aio.ServicerContext) -> PeerCertificate | None:
    """The caller's client certificate, or None when it presented none."""
    return _certificate(context.auth_context() or {})


def _certificate(auth: Mapping[str, Sequence[bytes | str]]) -> PeerCertificate | None:
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    pem = pems[0]
    return _parse_peer_certificate(pem if isinstance(pem, bytes) else str(pem).encode())


def peer_certificate_expiry(context: grpc.aio.ServicerContext) -> datetime | None:
    cert = peer_certificate(context)
    return cert.not_after if cert is not None else None


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, credential = text.partition(" ")
            if scheme.lower() != "bearer" or not credential:
                return ""  # present but malformed
            return credential.strip()
    return None


@dataclass(frozen=True, slots=True)
class CallPeer:
    """What a call's connection and headers say of its caller: its certificate's identity, the
    certificate, and a bearer credential. All three are fixed for the call's life (an HTTP/2
    stream keeps its TLS session and its headers), so a stream that checks each of its requests
    reads them once (each read of the auth context copies every property: about 30 µs per
    request, measured); the checks themselves (expiry, an active token, scopes) still run on
    each request."""

    principal: Principal | None
    certificate: PeerCertificate | None
    bearer: str | None


def call_peer(context: grpc.aio.ServicerContext) -> CallPeer:
    principal, cert = peer(context)
    return CallPeer(principal, cert, _bearer(context))


def _identity(
    context: grpc.aio.ServicerContext, known: CallPeer | None
) -> tuple[Principal | None, PeerCertificate | None]:
    """The caller's certificate identity and certificate: `known`'s, or read from the call."""
    return peer(context) if known is None else (known.principal, known.certificate)


@dataclass(frozen=True, slots=True)
class RunGrant:
    """What a run's credential binds to: the run, and the task whose sub-tasks it may create,
    read, wait for and cancel (nothing else)."""

    run_id: RunId
    task_id: TaskId


# The run (and its task) a run credential belongs to while that run is live; None otherwise.
RunGrants = Callable[[str], RunGrant | None]

RUN_CREDENTIAL_LIMIT = (
    "a run's credential may only create sub-tasks of its own task and read, wait for and "
    "cancel them"
)


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated operator or program: who, and what it may do."""

    name: str  # a SPIFFE id, "api-token <id> (<name>)", or "run <id> of task <id>"
    scopes: frozenset[Scope]
    token_id: str = ""  # the API token used, if any
    run: RunGrant | None = None  # a run's credential: it acts only on its task's sub-tasks

    def __str__(self) -> str:
        return self.name


class Authenticator:
    def __init__(self, access: AccessControl) -> None:
        self.access = access
        self.run_grants: RunGrants | None = None  # set by the app: the engine's live runs

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        message: str,
        *,
        principal: str = "",
        kind: AuditKind = AuditKind.REQUEST_REJECTED,
        claimed: bool = False,
    ) -> NoReturn:
        self.access.audit(
            kind,
            principal=principal,
            peer=context.peer() or "",
            detail=message,
            rejection=True,
            claimed=claimed,
        )
        await context.abort(code, message)
        raise AssertionError("unreachable")

    async def check_call(
        self, context: grpc.aio.ServicerContext, known: CallPeer | None = None
    ) -> None:
        """Per call, on both listeners: an expired client certificate, or a `taskrun login`
        certificate whose API token is no longer active, is refused UNAUTHENTICATED. `known`:
        the call's peer as read before (a stream checks each request)."""
        principal, cert = _identity(context, known)
        if cert is None:
            return
        if utcnow() >= cert.not_after:
            await self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"the client certificate expired at {cert.not_after:%Y-%m-%d %H:%M:%S} UTC; "
                "a worker must enroll again, an operator must run `taskrun login` again",
                principal=str(principal or ""),
            )
        if cert.login_token_id and not self.access.api_token_active(cert.login_token_id):
            await self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"the client certificate was issued against API token {cert.login_token_id}, "
                "which is revoked or expired; run `taskrun login` with an active token",
                principal=str(principal or ""),
            )

    async def operator(
        self,
        context: grpc.aio.ServicerContext,
        needed: Scope,
        *,
        runs: bool = False,
        known: CallPeer | None = None,
    ) -> Caller:
        """The caller if it holds `needed`; otherwise the call ends UNAUTHENTICATED or
        PERMISSION_DENIED (and the refusal is audited). A run's credential is refused unless
        `runs` (the few calls that scope it to its task's sub-tasks). `known`: the call's peer
        as read before."""
        bearer = _bearer(context) if known is None else known.bearer
        if bearer is not None and bearer.startswith(RUN_PREFIX):
            return await self._run_caller(context, bearer, needed, runs)
        if bearer is not None:
            try:
                token = self.access.authenticate_api_token(bearer)
            except errors.Unauthenticated as exc:
                claimed = parse_token(bearer, API_PREFIX)  # record the id it claimed, never more
                await self._refuse(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    str(exc),
                    principal=f"api-token {claimed.token_id}" if claimed else "",
                    claimed=True,
                )
            caller = Caller(f"api-token {token.id} ({token.name})", token.scopes, token.id)
        else:
            principal, cert = _identity(context, known)
            if principal is None:
                # the mTLS listener refuses a missing certificate in the handshake: this call
                # came to the public listener, which never asks for one
                certificates = (
                    f"port {self.access.session_port}"
                    if self.access.session_port
                    else "the mTLS port"
                )
                await self._refuse(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "no credentials: this is the public (TLS-only) port, which takes API tokens "
                    "(authorization: Bearer tra_…) but not client certificates; operator "
                    f"certificates are accepted on {certificates}",
                )
            if principal.kind is not PrincipalKind.OPERATOR:
                await self._refuse(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{principal} may not call this; it needs an operator identity",
                    principal=str(principal),
                )
            # a `taskrun login` certificate ends with its token
            caller = Caller(str(principal), ALL_SCOPES, cert.login_token_id if cert else "")
        if not grants(caller.scopes, needed):
            held = ", ".join(sorted(caller.scopes)) or "none"
            await self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller} holds scopes [{held}]; this call needs {needed.value!r}",
                principal=caller.name,
            )
        return caller

    async def _run_caller(
        self, context: grpc.aio.ServicerContext, bearer: str, needed: Scope, runs: bool
    ) -> Caller:
        grant = self.run_grants(bearer) if self.run_grants is not None else None
        claimed = parse_run_credential(bearer)
        principal = f"run {claimed.token_id}" if claimed else ""
        if grant is None:
            await self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization: the run credential is unknown or its run has ended",
                principal=principal,
                claimed=True,
            )
        caller = Caller(f"run {grant.run_id} of task {grant.task_id}", RUN_SCOPES, run=grant)
        if not runs or not grants(caller.scopes, needed):
            await self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller} may not call this: {RUN_CREDENTIAL_LIMIT}",
                principal=caller.name,
            )
        return caller

    async def until_revoked(
        self, caller: Caller, context: grpc.aio.ServicerContext, waiting: Awaitable[T]
    ) -> T:
        """Await `waiting` inside a streaming call; if the caller's API token is revoked
        meanwhile, end the call UNAUTHENTICATED at once instead."""
        if not caller.token_id:
            return await waiting
        revoked = self.access.revocation(caller.token_id)
        work = asyncio.ensure_future(waiting)
        stop = asyncio.ensure_future(revoked.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not work.done():
                work.cancel()
        if work.done():
            return work.result()
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"authorization: API token {caller.token_id} was revoked",
        )
        raise AssertionError("unreachable")

    async def worker(self, context: grpc.aio.ServicerContext) -> WorkerId:
        """The worker identity of the caller's certificate; otherwise the call is refused."""
        principal = peer_principal(context)
        if principal is None:
            await self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no TaskRun identity in the client certificate",
                kind=AuditKind.CONNECTION_REJECTED,
            )
        if principal.kind is not PrincipalKind.WORKER:
            await self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal} may not call this; it needs a worker identity",
                principal=str(principal),
                kind=AuditKind.CONNECTION_REJECTED,
            )
        return WorkerId(principal.name)
