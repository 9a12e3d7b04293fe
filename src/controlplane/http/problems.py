"""RFC 9457 problem details: every error the HTTP API answers, with the field when one is at
fault."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse

from taskrun.controlplane.http.context import Aborted

MEDIA_TYPE = "application/problem+json"


class ProblemResponse(JSONResponse):
    media_type = MEDIA_TYPE


def problem_body(
    status: int, detail: str, *, field: str | None = None, code: str = ""
) -> dict[str, Any]:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Client Closed Request" if status == 499 else "Error"
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if code:
        body["code"] = code  # the gRPC status name, the same the gRPC API answers
    if field:
        body["field"] = field
    return body


def problem(
    status: int,
    detail: str,
    *,
    field: str | None = None,
    code: str = "",
    headers: dict[str, str] | None = None,
) -> ProblemResponse:
    body = problem_body(status, detail, field=field, code=code)
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="taskrun"'}
    return ProblemResponse(body, status_code=status, headers=headers)


def from_aborted(exc: Aborted) -> ProblemResponse:
    return problem(exc.http_status, exc.message, field=exc.field, code=exc.code.name)


def sse_error(exc: Aborted) -> str:
    """A problem as a server-sent event that ends a stream."""
    body = problem_body(exc.http_status, exc.message, field=exc.field, code=exc.code.name)
    return f"event: error\ndata: {json.dumps(body)}\n\n"
