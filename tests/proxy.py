"""A loopback TCP proxy whose path can go silent, for tests and scripts/bench (no pytest here)."""

from __future__ import annotations

import asyncio
import contextlib


class SilentProxy:
    """A loopback TCP proxy; `cut()` stops forwarding without closing anything (a silent
    network path), `cut_upstream()` only what the client sends, `restore()` forwards again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.forwarding = asyncio.Event()
        self.forwarding.set()
        self.upstream = asyncio.Event()  # client -> target
        self.upstream.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> SilentProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, *gates: asyncio.Event
        ) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    for gate in gates:  # cut: hold the bytes, close nothing
                        await gate.wait()
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(
            pipe(reader, up_writer, self.forwarding, self.upstream),
            pipe(up_reader, writer, self.forwarding),
        )

    def cut(self) -> None:
        self.forwarding.clear()

    def cut_upstream(self) -> None:
        self.upstream.clear()

    def restore(self) -> None:
        self.forwarding.set()
        self.upstream.set()

    async def close(self) -> None:
        self.forwarding.set()
        self.upstream.set()
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            with contextlib.suppress(Exception):
                w.close()
