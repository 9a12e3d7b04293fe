"""The client's side of SubmitTasks: one stream, opened on first use, that carries every
`Client.submit_and_follow` of the client, each request's updates handed to its own queue.

A call per task costs its start on both sides, the server's interceptors and credential checks;
on this stream each task costs two messages' worth. When the stream breaks, every request on it
learns how (`Broken`): one whose task exists follows it again, as after a broken
CreateAndFollowTask; one that a standby refused, or that never reached a control plane, is sent
again on the address the client uses now. The next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc

from taskrun.v1 import tasks_pb2


@dataclass(frozen=True, slots=True)
class Broken:
    """The stream broke under a request: the error, and whether nothing of the stream was
    done (a standby refused it, or its address could not be reached), so the request may be
    sent again at once (the client now uses the address that leads)."""

    error: grpc.aio.AioRpcError
    may_repeat: bool


# What a request's queue receives: its updates in order, then (instead of more) how the stream
# broke under it.
Item: TypeAlias = tasks_pb2.SubmitUpdate | Broken


def request_error(error: tasks_pb2.RequestError) -> grpc.aio.AioRpcError:
    """A request refused in band, as the error its own call would have ended with."""
    code = next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), error.message)


@dataclass
class _Stream:
    call: Any  # grpc.aio.StreamStreamCall
    queues: dict[int, asyncio.Queue[Item]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)
    broken: Broken | None = None


class Submits:
    """A client's submit stream: at most one open at a time, opened by the first request."""

    def __init__(
        self, open_call: Callable[[], Any], failed: Callable[[BaseException], bool]
    ) -> None:
        self._open_call = open_call  # a new SubmitTasks call on the channel in use
        # Channels.failed: notes a broken call (moves to the leader a standby named, or on from
        # an address that could not be reached); True when nothing of the call was done
        self._failed = failed
        self._stream: _Stream | None = None
        self._last_id = 0
        self.supported = True  # False once a server said it lacks the call

    async def start(
        self, request: tasks_pb2.CreateAndFollowTaskRequest
    ) -> tuple[int, asyncio.Queue[Item]]:
        """Send a request; returns its id and the queue its updates arrive in."""
        stream = self._stream
        if stream is None:
            stream = self._stream = _Stream(self._open_call())
            stream.reader = asyncio.create_task(self._read(stream))
        self._last_id += 1
        request_id = self._last_id
        queue: asyncio.Queue[Item] = asyncio.Queue()
        stream.queues[request_id] = queue
        try:
            async with stream.writing:
                await stream.call.write(
                    tasks_pb2.SubmitRequest(request_id=request_id, create=request)
                )
        except Exception:  # the stream ended before this request was sent: repeat it
            if stream.queues.pop(request_id, None) is not None:
                broken = await self._broken(stream)
                queue.put_nowait(Broken(broken.error, may_repeat=True))
        return request_id, queue

    async def stop(self, request_id: int) -> None:
        """Stop following a request whose end has not arrived (its task goes on)."""
        stream = self._stream
        if stream is None or stream.queues.pop(request_id, None) is None:
            return
        with contextlib.suppress(Exception):  # a stream that ended forgot it already
            async with stream.writing:
                await stream.call.write(tasks_pb2.SubmitRequest(request_id=request_id, stop=True))

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.call.cancel()
            if stream.reader is not None:  # it ends with the call (wait: a cancel of ours passes)
                await asyncio.wait({stream.reader})

    async def _read(self, stream: _Stream) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            while True:
                update = await stream.call.read()
                if update is grpc.aio.EOF:
                    break
                queue = stream.queues.get(update.request_id)
                if queue is None:
                    continue  # a request that was stopped
                queue.put_nowait(update)
                if update.HasField("error") or update.update.last:
                    del stream.queues[update.request_id]
        except grpc.aio.AioRpcError as exc:
            error = exc
        finally:
            if self._stream is stream:
                self._stream = None  # the next request opens a new stream
            if stream.queues:
                broken = await self._broken(stream, error)
                for queue in stream.queues.values():
                    queue.put_nowait(broken)
                stream.queues.clear()

    async def _broken(self, stream: _Stream, error: grpc.aio.AioRpcError | None = None) -> Broken:
        """How `stream` broke, judged once for all its requests (the judgement moves the
        client to another address)."""
        if stream.broken is None:
            error = error or await _ended_with(stream.call)
            stream.broken = Broken(error, self._failed(error))
        return stream.broken


async def _ended_with(call: Any) -> grpc.aio.AioRpcError:
    """The status a finished call ended with, as an error (UNAVAILABLE when it ended OK: the
    server never ends a stream with requests still followed)."""
    code = await call.code()
    details = await call.details()
    trailing = await call.trailing_metadata() or grpc.aio.Metadata()
    if code == grpc.StatusCode.OK:
        code, details = grpc.StatusCode.UNAVAILABLE, "the submit stream ended"
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)
