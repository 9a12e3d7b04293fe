"""Serve an ASGI application with uvicorn inside the control plane's own event loop, over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
import uvicorn
from starlette.types import ASGIApp

log = structlog.get_logger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the control plane owns SIGINT and SIGTERM."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready.set()


class _RotatingTls:
    """The server certificate files, re-read when they change: each new handshake checks their
    stamps (as the gRPC listeners do) and moves to a new context once the pair is consistent;
    live connections keep theirs."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.paths = (cert, key)
        self._stamps = self._current()
        self._make: Callable[[], ssl.SSLContext] | None = None
        self.context: ssl.SSLContext | None = None
        self.rotations = 0

    def _current(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in self.paths:
            st = path.stat()
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def factory(
        self, config: uvicorn.Config, default: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        self._make = default
        self.context = default()
        self.context.sni_callback = self._on_hello
        return self.context

    def _on_hello(self, sock: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        try:
            stamps = self._current()
            if stamps != self._stamps and self._make is not None:
                fresh = self._make()  # refuses a key that does not match the certificate
                fresh.sni_callback = self._on_hello
                self.context, self._stamps = fresh, stamps
                self.rotations += 1
                log.info("http api certificate reloaded")
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("http api certificate not reloaded (kept the current one)", error=str(exc))
        if self.context is not None and self.context is not ctx:
            sock.context = self.context


def _bind(address: str) -> socket.socket:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on an accepted connection only when its
    # socket says it is TCP. Without it, Nagle's algorithm held each response's body back until
    # the client acknowledged the headers (uvicorn writes them apart), which clients delay by up
    # to 40 ms: every call to the HTTP API and MCP took 44 ms on loopback, measured.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """A started uvicorn server; `port` is the bound port (useful with port 0)."""

    def __init__(
        self,
        app: ASGIApp,
        address: str,
        cert: Path,
        key: Path,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._on_close = on_close
        self._sock = _bind(address)
        self.host = address.rpartition(":")[0]
        self.port: int = self._sock.getsockname()[1]
        self.tls = _RotatingTls(cert, key)
        config = uvicorn.Config(
            app,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            ssl_context_factory=self.tls.factory,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> HttpServer:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        ready = asyncio.create_task(self._server.ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            self._sock.close()
            self._task.result()  # raises what stopped it, if anything did
            raise OSError(f"the HTTP API could not start on {self.host}:{self.port}")
        log.info("http api listening", address=f"{self.host}:{self.port}")
        return self

    async def close(self) -> None:
        if self._on_close is not None:
            self._on_close()  # open streams end now instead of at the graceful timeout
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sock.close()
