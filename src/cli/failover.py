"""Stubs that follow the leader among several control planes (see taskrun.servers).

A unary call that a standby refused (it names the leader) or that could not reach its address is
repeated on the leader or the next address: nothing of it was done, so repeating cannot do it
twice. A call that reached the leader and then failed is not repeated (it may have been done);
the next call goes to the next address. Streaming calls are made on the address in use; their
callers re-open them (`Client.follow`) after `Channels.failed` moved on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import grpc

from taskrun.servers import ServerList, leader_of

# How long a unary call keeps looking for the leader among several addresses (a failover takes
# the leadership lease plus a start, a few seconds with the defaults).
FAILOVER_FOR = 20.0


class Channels:
    """One channel at a time, to the address in use."""

    def __init__(
        self,
        servers: ServerList,
        credentials: grpc.ChannelCredentials,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self.servers = servers
        self._credentials = credentials
        self._options = list(options)
        self._channel: grpc.aio.Channel | None = None
        self._target = ""
        self._old: list[grpc.aio.Channel] = []

    @property
    def channel(self) -> grpc.aio.Channel:
        endpoint = self.servers.current
        if self._channel is not None and self._target != endpoint.target:
            self._old.append(self._channel)
            self._channel = None
        if self._channel is None:
            options = dict(self._options)
            if endpoint.tls_name and "grpc.ssl_target_name_override" not in options:
                options["grpc.ssl_target_name_override"] = endpoint.tls_name
            self._channel = grpc.aio.secure_channel(
                endpoint.target, self._credentials, options=list(options.items())
            )
            self._target = endpoint.target
        return self._channel

    @property
    def is_open(self) -> bool:
        return self._channel is not None

    def failed(self, exc: BaseException) -> bool:
        """Note a failed call; True when it may be repeated at once on the address now in use
        (a standby named the leader, or one of several addresses could not be reached)."""
        several = self.servers.several  # before a move forgets the leaders it learned
        retry = self.servers.failed(exc)
        hinted = isinstance(exc, grpc.aio.AioRpcError) and bool(leader_of(exc))
        return retry and (hinted or several)

    async def close(self) -> None:
        channels = [*self._old, *([self._channel] if self._channel is not None else [])]
        self._old, self._channel = [], None
        for channel in channels:
            await channel.close()


class FailoverStub:
    """Wraps a generated stub class: `stub.Method(request, ...)` as on the stub itself."""

    def __init__(self, channels: Channels, stub_class: Any) -> None:
        self._channels = channels
        self._stub_class = stub_class
        self._stub: tuple[grpc.aio.Channel, Any] | None = None  # made once per channel

    def _on(self, channel: grpc.aio.Channel) -> Any:
        if self._stub is None or self._stub[0] is not channel:
            self._stub = (channel, self._stub_class(channel))
        return self._stub[1]

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._on(self._channels.channel), name)
        if not isinstance(method, grpc.aio.UnaryUnaryMultiCallable):
            return method  # streaming: on the address in use

        async def call(request: Any, **kwargs: Any) -> Any:
            give_up_at = time.monotonic() + FAILOVER_FOR
            tries, delay = 0, 0.1
            current = method
            while True:
                try:
                    return await current(request, **kwargs)
                except grpc.aio.AioRpcError as exc:
                    if not self._channels.failed(exc) or time.monotonic() > give_up_at:
                        raise
                tries += 1
                if tries % len(self._channels.servers.endpoints) == 0:
                    await asyncio.sleep(delay)  # every address refused: a takeover is under way
                    delay = min(delay * 2, 1.0)
                current = getattr(self._on(self._channels.channel), name)

        return call
