"""The request guard on a bare grpc server with a handler that fails in ways ours should not:
whatever escapes a handler ends INTERNAL with a fixed message and one log line, never UNKNOWN."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from structlog.testing import capture_logs

from taskrun.controlplane.guard import INTERNAL_MESSAGE, RequestGuard
from taskrun.core import errors

METHOD = "/test.Guarded/Call"


async def no_check(context: grpc.aio.ServicerContext) -> None:
    return None


async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"domain":
        raise errors.NotFound("no such thing", field="name")
    raise KeyError("internal detail")


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[RequestGuard(no_check)])
    handler = grpc.unary_unary_rpc_method_handler(
        crash, request_deserializer=lambda b: b, response_serializer=lambda b: b
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Guarded", {"Call": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def call(address: str, payload: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(METHOD)(payload, timeout=5)
    return err.value


async def test_an_unexpected_exception_is_internal_with_a_fixed_message_and_one_log_line(
    address: str,
) -> None:
    with capture_logs() as logs:
        err = await call(address, b"anything")
    assert err.code() is grpc.StatusCode.INTERNAL
    assert err.details() == INTERNAL_MESSAGE
    assert "KeyError" not in (err.details() or "") and "internal detail" not in str(err.details())
    assert [(e["event"], e["error"]) for e in logs] == [("request failed", "KeyError")]


async def test_a_domain_error_is_its_status_naming_the_field(address: str) -> None:
    err = await call(address, b"domain")
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert err.details() == "name: no such thing"
