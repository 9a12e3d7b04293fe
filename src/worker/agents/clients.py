"""The model SDKs' clients a worker keeps, and the SDKs' first-use work done before any run.

The worker's event loop also carries its heartbeats, so what blocks it inside a run can cost
the worker its lease (and the run a retry). Two things did, measured on a quiet machine:
- A new `AsyncAnthropic` or `AsyncOpenAI` builds an SSL context and a connection pool (50-100
  ms of blocking work) and then opens a new TCP and TLS connection to the provider. Runs now
  share one client per SDK, endpoint, key and retry count (`shared`), per event loop: a client's
  pool belongs to the loop it was made in.
- An SDK's first call imports modules and builds its response models (pydantic builds them on
  first use): a quarter of a second, several times that on a busy machine. `rehearse` makes
  that first call when the agent loads, against a canned reply served on loopback, in a thread
  with its own event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# A rehearsal takes about a second on a busy machine; past this something is wrong (it is then
# given up, and the first run pays what it would have)
REHEARSAL_TIMEOUT = 15.0

# Clients kept per event loop, the least recently made dropped first: a key that changes now and
# then (a rotated API key) must not pile them up. A dropped client is not closed, a run may be
# using it; its connections close when the last run holding it lets it go.
MAX_CLIENTS = 16

_clients: dict[asyncio.AbstractEventLoop, dict[Hashable, Any]] = {}
_rehearsed: set[str] = set()
_rehearsing = threading.Lock()


def shared(key: Hashable, make: Callable[[], Any]) -> Any:
    """The client for `key` on the running event loop, made by `make()` the first time."""
    loop = asyncio.get_running_loop()
    clients = _clients.get(loop)
    if clients is None:
        for old in [other for other in _clients if other.is_closed()]:
            del _clients[old]  # their connections went with their loop
        clients = _clients[loop] = {}
    client = clients.get(key)
    if client is None:
        while len(clients) >= MAX_CLIENTS:
            del clients[next(iter(clients))]
        client = clients[key] = make()
    return client


def sdk_client(
    client_class: Callable[..., Any],
    http_client_class: Callable[..., Any],
    *,
    api_key: str | None,
    base_url: str | None,
    max_retries: int,
    direct: bool = False,
) -> Any:
    """The shared client of an SDK (`anthropic.AsyncAnthropic`, `openai.AsyncOpenAI`: the same
    constructor). `direct`: its own connections ignore the environment's proxy settings, through
    the SDK's default httpx client class (`http_client_class`) with `trust_env=False`."""
    return shared(
        (client_class, api_key, base_url, max_retries, direct),
        lambda: client_class(
            api_key=api_key,
            base_url=base_url,
            max_retries=max_retries,
            http_client=http_client_class(trust_env=False) if direct else None,
        ),
    )


async def close_clients() -> None:
    """Close the running event loop's clients (their idle connections with them)."""
    clients = _clients.pop(asyncio.get_running_loop(), {})
    for client in clients.values():
        await client.close()


def rehearse(name: str, call: Callable[[str], Awaitable[object]], reply: bytes) -> None:
    """Once per process: `call(base_url)` against a server on 127.0.0.1 that answers every
    request with `reply` (a whole HTTP/1.1 response); `call` must not go through the
    environment's proxies. Never fails the caller: a rehearsal that goes wrong or takes over
    REHEARSAL_TIMEOUT only leaves the first run to pay (it is logged)."""
    with _rehearsing:
        if name in _rehearsed:
            return
        _rehearsed.add(name)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(_rehearsal(call, reply))
            except Exception as exc:  # whatever it was, the first run meets it again
                failure.append(exc)

        thread = threading.Thread(target=run, name=f"rehearse-{name}", daemon=True)
        thread.start()
        thread.join()
        if failure:
            log.warning("the model SDK's rehearsal failed", sdk=name, error=str(failure[0]))


async def _rehearsal(call: Callable[[str], Awaitable[object]], reply: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")  # the body is not needed: the reply is fixed
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with server, asyncio.timeout(REHEARSAL_TIMEOUT):
            await call(f"http://127.0.0.1:{port}")
    finally:
        await close_clients()


def http_reply(content_type: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 200 response that closes its connection."""
    head = (
        "HTTP/1.1 200 OK\r\n"
        f"content-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body
