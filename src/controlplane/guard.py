"""One wrapper around every handler of both listeners.

It makes three promises no handler has to remember:

- a request that does not parse (random bytes, invalid UTF-8 in a string field, nesting past
  protobuf's limit) ends INVALID_ARGUMENT naming `request`, before any handler runs;
- the caller's client certificate binds per call: once it has expired, every call on a connection
  opened before that is refused UNAUTHENTICATED (grpc checks validity only at the handshake), and
  an operator certificate obtained with `taskrun login` stops working when its token is revoked;
- no call ends UNKNOWN: a domain error becomes its status, anything unexpected becomes INTERNAL
  with a fixed message and one log line (never a traceback or a Python name in the reply).

It also names the method being served (`current_method`), so that audit rows can say which call
was refused, and notes when a call last arrived (`quiet`), so that a stopping server can wait
for the calls grpc has accepted but not yet handed over (grpc's shutdown cancels those).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from taskrun.controlplane.ratelimit import LogLimiter
from taskrun.core import errors

log = structlog.get_logger(__name__)

STATUS_CODES: dict[type[errors.TaskRunError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(exc: errors.TaskRunError) -> grpc.StatusCode:
    """The gRPC status for a domain error: that of its nearest mapped class."""
    for kind in type(exc).__mro__:
        if kind in STATUS_CODES:
            return STATUS_CODES[kind]
    return grpc.StatusCode.INTERNAL


INTERNAL_MESSAGE = "internal error: the control plane could not handle this request (logged)"
MALFORMED_MESSAGE = (
    "request: is not a valid message for this method (wrong wire format, invalid UTF-8 in a "
    "string field, or nested too deep)"
)

current_method: contextvars.ContextVar[str] = contextvars.ContextVar("current_method", default="")

CredentialCheck = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


class Malformed:
    """Stands for a request message that did not parse (the deserializer never raises)."""

    __slots__ = ()


MALFORMED = Malformed()


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, RecursionError, …: the handler refuses it cleanly
            return MALFORMED

    return parse


class _GuardedContext:
    """A ServicerContext whose read() refuses a malformed message of a request stream."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        message = await self._context.read()
        if message is MALFORMED:
            raise errors.InvalidArgument(
                MALFORMED_MESSAGE.removeprefix("request: "), field="request"
            )
        return message


async def _end(
    context: grpc.aio.ServicerContext, exc: Exception, method: str, noted: LogLimiter
) -> None:
    """End the call for an exception a handler let through: its status, never UNKNOWN."""
    if context.done() or context.cancelled():  # the call has ended (the peer went away)
        log.debug("request ended after its call", method=method, error=type(exc).__name__)
        return
    if isinstance(exc, errors.TaskRunError):
        await context.abort(status_code(exc), str(exc))
    noted.error(method, "request failed", method=method, error=type(exc).__name__)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


class RequestGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Install with `grpc.aio.server(interceptors=[…, RequestGuard(check)])`."""

    def __init__(self, check_credentials: CredentialCheck) -> None:
        self.check_credentials = check_credentials
        # a caller can cause these lines at will: at most 10 per 10 s per peer host (or method)
        self.noted = LogLimiter(log, limit=10, window=10.0)
        # a method's handler is the same object call after call: wrap it once
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._last_arrival = 0.0  # time.monotonic() when the latest call was handed to us

    async def quiet(self, gap: float, at_most: float) -> None:
        """Return once no call has arrived for `gap` seconds of a responsive loop (or after
        `at_most`).

        grpc accepts calls faster than its Python loop hands them over, and its shutdown cancels
        those still queued (CANCELLED, which a client takes as final; grpc/grpc#41785). A gap
        with no arrival means the queue has drained, but only if the process could have seen
        one: time in which the loop was stalled (a busy machine, another thread) does not
        count."""
        step = gap / 5
        deadline = time.monotonic() + at_most
        seen, quiet_for = self._last_arrival, 0.0
        while (before := time.monotonic()) < deadline:
            await asyncio.sleep(step)
            took = time.monotonic() - before
            if self._last_arrival != seen:  # one came meanwhile: start again
                seen, quiet_for = self._last_arrival, 0.0
            elif took <= 2 * step:
                quiet_for += took
                if quiet_for >= gap:
                    return

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        self._last_arrival = time.monotonic()
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, name)
            if behavior is not None:
                return handler._replace(
                    request_deserializer=_safe(handler.request_deserializer),
                    **{name: self._wrap(behavior, method)},
                )
        return handler

    def _wrap(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        check, noted = self.check_credentials, self.noted

        async def admit(request: Any, context: grpc.aio.ServicerContext) -> None:
            current_method.set(method)
            if request is MALFORMED:
                peer = context.peer() or ""
                noted.info(
                    peer.rsplit(":", 1)[0], "malformed request refused", method=method, peer=peer
                )
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE)
            await check(context)

        if inspect.isasyncgenfunction(behavior):

            async def streaming(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                await admit(request, context)
                try:
                    async for item in behavior(request, _GuardedContext(context)):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _end(context, exc, method, noted)

            return streaming

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(request, context)
            try:
                return await behavior(request, _GuardedContext(context))
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _end(context, exc, method, noted)

        return unary
