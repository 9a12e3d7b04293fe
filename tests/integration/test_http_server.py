"""The HTTP API's listener (controlplane/http/server.py): real uvicorn over real TLS on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl

from starlette.types import Receive, Scope, Send

from taskrun.controlplane.http.server import HttpServer
from taskrun.controlplane.pki import PkiPaths


async def _two_writes(scope: Scope, receive: Receive, send: Send) -> None:
    """An answer in two writes, headers then body, as uvicorn writes every response."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def test_an_answer_in_two_writes_is_not_held_back_waiting_for_an_ack(pki: PkiPaths) -> None:
    """Without TCP_NODELAY on the accepted connection, Nagle's algorithm holds the body back
    until the client acknowledges the headers, which a client delays by up to 40 ms: every call
    to the HTTP API and MCP took 44 ms on loopback (measured). asyncio sets it on a connection
    only when the listening socket says it is TCP, so the listener must be made that way."""
    server = await HttpServer(_two_writes, "127.0.0.1:0", pki.server_cert, pki.server_key).start()
    try:
        tls = ssl.create_default_context(cafile=str(pki.ca_cert))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=tls, server_hostname="localhost"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        accepted = [
            conn.transport.get_extra_info("socket")
            for conn in server._server.server_state.connections
        ]
        assert len(accepted) == 1
        assert _nodelay(accepted[0])
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()
