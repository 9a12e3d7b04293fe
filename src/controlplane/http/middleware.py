"""ASGI middleware of the HTTP API."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage


class StatusTap:
    """ASGI middleware: tells `answered` each response's status as it starts, so a caller
    that has its answer finds it counted (the metrics' refusals)."""

    def __init__(self, app: ASGIApp, answered: Callable[[int], None]) -> None:
        self.app = app
        self.answered = answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def starting(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                self.answered(message["status"])
            await send(message)

        await self.app(scope, receive, starting)
