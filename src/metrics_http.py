"""A tiny `/metrics` endpoint on the event loop, for the control plane and for workers.

Served from the running loop (not prometheus-client's thread), so collectors read the engine's
or the daemon's state without locks. Only `GET /metrics` is answered; it is plain HTTP meant for
a local Prometheus or an operator's curl, so bind it to a loopback or private address.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES = 8192


def split_address(listen: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets) as (host, port); ValueError when it is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{listen!r} is not host:port")
    return host.strip("[]"), int(port)


class MetricsServer:
    """Serve `registry` on `listen` until `close()`; `port` is the bound port (useful with 0)."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        self.registry = registry
        self.listen = listen
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> MetricsServer:
        host, port = split_address(self.listen)
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics listening", address=f"{host}:{self.port}", path="/metrics")
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method != "GET" or path != "/metrics":
                status, body, ctype = "404 Not Found", b"only GET /metrics\n", "text/plain"
            else:
                status, body, ctype = "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
