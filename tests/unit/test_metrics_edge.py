"""The gRPC edge counts a rejection before its status leaves: grpc's `context.abort` sends the
status and only then raises, so a caller that sees the refusal and scrapes at once must find it
counted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import pytest

from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.metrics import ControlPlaneMetrics
from taskrun.controlplane.store.memory import MemoryStore


class _AbortingContext:
    """What matters of grpc's servicer context here: abort sends the status, then raises."""

    def __init__(self, metrics: ControlPlaneMetrics) -> None:
        self._metrics = metrics
        self._code: grpc.StatusCode | None = None
        self.counted_when_sent: dict[str, int] = {}

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> NoReturn:
        self._code = code
        self.counted_when_sent = dict(self._metrics.rejected)  # the client has its answer now
        raise grpc.aio.AbortError(details)


@pytest.fixture
def metrics() -> ControlPlaneMetrics:
    return ControlPlaneMetrics(Engine(MemoryStore(), ServerConfig(store="memory")))


def handlers(metrics: ControlPlaneMetrics, behavior: Any) -> grpc.RpcMethodHandler:
    handler = grpc.unary_unary_rpc_method_handler(behavior)
    interceptor: Any = metrics.interceptor()
    return interceptor._wrap_handler(handler, "/taskrun.v1.WorkerService/ListWorkers")


async def test_a_refusal_is_counted_before_its_status_is_sent(
    metrics: ControlPlaneMetrics,
) -> None:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "needs an operator identity")
        raise AssertionError("unreachable")

    context = _AbortingContext(metrics)
    with pytest.raises(grpc.aio.AbortError):
        await handlers(metrics, refuse).unary_unary(None, context)
    assert context.counted_when_sent == {"permission_denied": 1}
    assert metrics.rejected == {"permission_denied": 1}  # once, not again as the call ends


async def test_a_status_set_without_abort_is_counted_as_the_call_ends(
    metrics: ControlPlaneMetrics,
) -> None:
    async def invalid(request: Any, context: grpc.aio.ServicerContext) -> None:
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)

    await handlers(metrics, invalid).unary_unary(None, _AbortingContext(metrics))
    assert metrics.rejected == {"invalid_argument": 1}


async def test_a_streaming_refusal_is_counted_before_its_status_is_sent(
    metrics: ControlPlaneMetrics,
) -> None:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[int]:
        yield 1
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "token revoked")

    handler = grpc.unary_stream_rpc_method_handler(refuse)
    interceptor: Any = metrics.interceptor()
    wrapped = interceptor._wrap_handler(handler, "/taskrun.v1.TaskService/WatchTasks")
    context = _AbortingContext(metrics)
    with pytest.raises(grpc.aio.AbortError):
        async for _ in wrapped.unary_stream(None, context):
            pass
    assert context.counted_when_sent == {"unauthenticated": 1}
    assert metrics.rejected == {"unauthenticated": 1}


async def test_a_refusal_with_trailing_metadata_reaches_grpc_whole(
    metrics: ControlPlaneMetrics,
) -> None:
    seen: dict[str, Any] = {}

    class _Context(_AbortingContext):
        async def abort(
            self, code: grpc.StatusCode, details: str = "", *a: Any, **k: Any
        ) -> NoReturn:
            seen.update(k)
            await super().abort(code, details)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "standby", trailing_metadata=(("leader", "a:1"),)
        )
        raise AssertionError("unreachable")

    with pytest.raises(grpc.aio.AbortError):
        await handlers(metrics, refuse).unary_unary(None, _Context(metrics))
    assert seen == {"trailing_metadata": (("leader", "a:1"),)}
