"""Who is calling: the principal in the peer's client certificate (mTLS), checked per handler."""

from __future__ import annotations

from datetime import datetime

import grpc
from cryptography import x509

from taskrun.core.identity import Principal, PrincipalKind, parse_spiffe_id


def _values(context: grpc.aio.ServicerContext, key: str) -> list[str]:
    auth = context.auth_context() or {}
    return [v.decode() if isinstance(v, bytes) else str(v) for v in auth.get(key, [])]


def peer_principal(context: grpc.aio.ServicerContext) -> Principal | None:
    """The TaskRun identity of the caller's certificate, or None."""
    for uri in _values(context, "peer_spiffe_id") + _values(
        context, "x509_subject_alternative_name"
    ):
        principal = parse_spiffe_id(uri)
        if principal is not None:
            return principal
    return None


def peer_certificate_expiry(context: grpc.aio.ServicerContext) -> datetime | None:
    pems = _values(context, "x509_pem_cert")
    if not pems:
        return None
    return x509.load_pem_x509_certificate(pems[0].encode()).not_valid_after_utc


async def require(context: grpc.aio.ServicerContext, kind: PrincipalKind) -> Principal:
    """The caller's principal if it is of `kind`; otherwise the call ends PERMISSION_DENIED."""
    principal = peer_principal(context)
    if principal is None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "no TaskRun identity in the client certificate"
        )
        raise AssertionError("unreachable")
    if principal.kind is not kind:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{principal} may not call this; it needs a {kind.value} identity",
        )
    return principal
