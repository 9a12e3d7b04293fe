"""gRPC handlers for enrollment (public), certificate renewal (workers) and access admin."""

from __future__ import annotations

import grpc

from taskrun import convert
from taskrun.controlplane.access import AccessControl
from taskrun.controlplane.auth import Authenticator
from taskrun.controlplane.pages import dated_page, page_size
from taskrun.controlplane.pki import cert_pem, principal_of
from taskrun.controlplane.services import domain_errors
from taskrun.controlplane.sizing import fitting
from taskrun.core import errors
from taskrun.core.access import AuditKind, AuditQuery, Scope
from taskrun.core.models import utcnow
from taskrun.v1 import security_pb2 as spb
from taskrun.v1 import security_pb2_grpc

MAX_AUDIT_PAGE = 1000
DEFAULT_AUDIT_PAGE = 100


class EnrollmentService(security_pb2_grpc.EnrollmentServiceServicer):
    """Needs no credentials but the token: served on the public listener."""

    def __init__(self, access: AccessControl) -> None:
        self.access = access

    @domain_errors
    async def Enroll(
        self, request: spb.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> spb.EnrollResponse:
        enrolled = await self.access.enroll(
            request.token, request.csr_pem, request.hostname, context.peer() or ""
        )
        response = spb.EnrollResponse(
            worker_id=enrolled.worker_id,
            certificate_pem=enrolled.certificate_pem,
            ca_pem=enrolled.ca_pem,
            labels=enrolled.labels,
            session_port=self.access.session_port,
        )
        convert.ts_to_pb(enrolled.expires_at, response.expires_at)
        return response


class CertificateService(security_pb2_grpc.CertificateServiceServicer):
    """Renewal over the worker's current mTLS identity."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    @domain_errors
    async def RenewCertificate(
        self, request: spb.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> spb.RenewCertificateResponse:
        worker_id = await self.auth.worker(context)
        cert = await self.auth.access.renew(worker_id, request.csr_pem, context.peer() or "")
        response = spb.RenewCertificateResponse(certificate_pem=cert_pem(cert))
        convert.ts_to_pb(cert.not_valid_after_utc, response.expires_at)
        return response


class AccessService(security_pb2_grpc.AccessServiceServicer):
    """Bootstrap tokens, API tokens and the audit log: every call needs the `admin` scope."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth
        self.access = auth.access

    @domain_errors
    async def CreateBootstrapToken(
        self, request: spb.CreateBootstrapTokenRequest, context: grpc.aio.ServicerContext
    ) -> spb.CreateBootstrapTokenResponse:
        caller = await self.auth.operator(context, Scope.ADMIN)
        secret, token = await self.access.create_bootstrap_token(
            by=caller.name,
            ttl=float(request.ttl_seconds),
            worker_id=request.worker_id,
            labels=dict(request.labels),
        )
        return spb.CreateBootstrapTokenResponse(
            token=secret,
            info=convert.bootstrap_token_to_pb(token, utcnow()),
            ca_fingerprint=self.access.ca_fingerprint,
            public_port=self.access.public_port,
            session_port=self.access.session_port,
        )

    @domain_errors
    async def ListBootstrapTokens(
        self, request: spb.ListBootstrapTokensRequest, context: grpc.aio.ServicerContext
    ) -> spb.ListBootstrapTokensResponse:
        await self.auth.operator(context, Scope.ADMIN)
        size = page_size(request.page_size)
        tokens = await self.access.list_bootstrap_tokens(request.include_inactive)
        now = utcnow()
        listed, token = dated_page(
            tokens,
            size,
            request.page_token,
            "ListBootstrapTokens",
            lambda t: convert.bootstrap_token_to_pb(t, now),
            self.access.config.max_message_bytes,
        )
        return spb.ListBootstrapTokensResponse(tokens=listed, next_page_token=token)

    @domain_errors
    async def RevokeBootstrapToken(
        self, request: spb.RevokeBootstrapTokenRequest, context: grpc.aio.ServicerContext
    ) -> spb.BootstrapToken:
        caller = await self.auth.operator(context, Scope.ADMIN)
        token = await self.access.revoke_bootstrap_token(request.token_id, by=caller.name)
        return convert.bootstrap_token_to_pb(token, utcnow())

    @domain_errors
    async def CreateApiToken(
        self, request: spb.CreateApiTokenRequest, context: grpc.aio.ServicerContext
    ) -> spb.CreateApiTokenResponse:
        caller = await self.auth.operator(context, Scope.ADMIN)
        scopes = convert.scopes_from_pb(list(request.scopes))
        secret, token = await self.access.create_api_token(
            by=caller.name, name=request.name, scopes=scopes, ttl=float(request.ttl_seconds)
        )
        return spb.CreateApiTokenResponse(
            token=secret, info=convert.api_token_to_pb(token, utcnow())
        )

    @domain_errors
    async def ListApiTokens(
        self, request: spb.ListApiTokensRequest, context: grpc.aio.ServicerContext
    ) -> spb.ListApiTokensResponse:
        await self.auth.operator(context, Scope.ADMIN)
        size = page_size(request.page_size)
        now = utcnow()
        listed, token = dated_page(
            self.access.list_api_tokens(request.include_inactive),
            size,
            request.page_token,
            "ListApiTokens",
            lambda t: convert.api_token_to_pb(t, now),
            self.access.config.max_message_bytes,
        )
        return spb.ListApiTokensResponse(tokens=listed, next_page_token=token)

    @domain_errors
    async def RevokeApiToken(
        self, request: spb.RevokeApiTokenRequest, context: grpc.aio.ServicerContext
    ) -> spb.ApiToken:
        caller = await self.auth.operator(context, Scope.ADMIN)
        token = await self.access.revoke_api_token(request.token_id, by=caller.name)
        return convert.api_token_to_pb(token, utcnow())

    @domain_errors
    async def IssueOperatorCertificate(
        self, request: spb.IssueOperatorCertificateRequest, context: grpc.aio.ServicerContext
    ) -> spb.IssueOperatorCertificateResponse:
        caller = await self.auth.operator(context, Scope.ADMIN)
        if not caller.token_id or caller.name.startswith("spiffe://"):
            raise errors.FailedPrecondition(
                "log in with an admin API token (authorization: Bearer tra_…); a certificate "
                "cannot be traded for another"
            )
        cert = await self.access.issue_operator_certificate(
            caller.token_id, request.csr_pem, float(request.ttl_seconds), context.peer() or ""
        )
        principal = principal_of(cert_pem(cert))
        response = spb.IssueOperatorCertificateResponse(
            certificate_pem=cert_pem(cert),
            ca_pem=self.access.ca_pem,
            identity=str(principal or ""),
            session_port=self.access.session_port,
        )
        convert.ts_to_pb(cert.not_valid_after_utc, response.expires_at)
        return response

    @domain_errors
    async def ListAuditEvents(
        self, request: spb.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> spb.ListAuditEventsResponse:
        await self.auth.operator(context, Scope.ADMIN)
        limit = request.limit or DEFAULT_AUDIT_PAGE
        if not 1 <= limit <= MAX_AUDIT_PAGE:
            raise errors.InvalidArgument(f"must be between 1 and {MAX_AUDIT_PAGE}", field="limit")
        if request.before_id < 0:
            raise errors.InvalidArgument("must not be negative", field="before_id")
        kinds: set[AuditKind] = set()
        for value in request.kinds:
            try:
                kinds.add(AuditKind(value))
            except ValueError:
                known = ", ".join(k.value for k in AuditKind)
                raise errors.InvalidArgument(
                    f"unknown kind {value!r}; one of {known}", field="kinds"
                ) from None
        events = await self.access.list_audit_events(
            AuditQuery(limit=limit, before_id=request.before_id, kinds=frozenset(kinds))
        )
        listed, _ = fitting(  # a shorter page where the events do not fit: before_id goes on
            (convert.audit_event_to_pb(e) for e in events), self.access.config.max_message_bytes
        )
        return spb.ListAuditEventsResponse(events=listed)
