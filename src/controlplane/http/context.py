"""A call context for the gRPC servicers when the call arrives over HTTP.

The servicers read the caller from `invocation_metadata()` (the bearer token) and
`auth_context()` (a client certificate; HTTP callers present none), name the peer with `peer()`
and end a call with `abort(code, message)`. Here `abort` raises `Aborted`, which the HTTP layer
turns into problem details with the matching HTTP status.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NoReturn

import grpc

# gRPC status -> HTTP status (as the gRPC-HTTP transcoding convention maps them, except
# FAILED_PRECONDITION: 412 says "the resource is not in a state for this" more exactly here).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# "schedule.policy.timeout: must be positive" -> field "schedule.policy.timeout"
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class Aborted(Exception):
    """A servicer ended the call: its gRPC status and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    @property
    def field(self) -> str | None:
        match = _FIELD.match(self.message)
        return match.group(1) if match else None


class HttpCallContext:
    """What the servicers need of a `grpc.aio.ServicerContext`, for one HTTP request."""

    def __init__(self, headers: Mapping[str, str], peer: str) -> None:
        authorization = headers.get("authorization")
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", authorization),) if authorization is not None else ()
        )
        self._peer = peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no client certificate over HTTP: only bearer tokens

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise Aborted(code, details)
