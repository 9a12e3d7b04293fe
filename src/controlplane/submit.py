"""SubmitTasks: many CreateAndFollowTask exchanges multiplexed on one stream.

A client that submits one task after another (sub-tasks, chat turns, scripts) pays for a new
call each time: its start on both sides, the interceptors, the credential checks. On this
stream it pays once. Each request is followed in its own asyncio task, exactly as
CreateAndFollowTask follows it, and writes its updates to the stream itself (one write at a
time): no hand-over to another task per update, and a client that reads slowly holds back the
followers whose updates wait, not the server's memory.

A refused request is answered in band (an `error` naming the field) and the stream goes on; what
ends a call ends the stream for every request on it: the caller's credential revoked or expired
(UNAUTHENTICATED), the control plane stopping (UNAVAILABLE), a message that does not parse
(INVALID_ARGUMENT naming `request`: its id cannot be known).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

import grpc

from taskrun.controlplane.auth import Authenticator, Caller, call_peer
from taskrun.controlplane.followers import STOPPING, FollowHub
from taskrun.controlplane.guard import status_code
from taskrun.core import errors
from taskrun.core.access import Scope
from taskrun.v1 import tasks_pb2

# TaskService._create_and_follow: create one task, then yield its updates (a refusal raises)
CreateAndFollow = Callable[
    [tasks_pb2.CreateAndFollowTaskRequest, Caller, grpc.aio.ServicerContext],
    AsyncGenerator[tasks_pb2.TaskUpdate, None],
]

MAX_FOLLOWED = 10_000  # requests followed at once on one stream; one more is refused


class SubmitStream:
    """One SubmitTasks call."""

    def __init__(
        self,
        hub: FollowHub,
        auth: Authenticator,
        create_and_follow: CreateAndFollow,
        caller: Caller,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.hub = hub
        self.auth = auth
        self.create_and_follow = create_and_follow
        self.caller = caller
        self.context = context
        self.peer = call_peer(context)  # fixed for the call: read once, checked per request
        self.writing = asyncio.Lock()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.followed: dict[int, asyncio.Task[None]] = {}
        self.reading = True

    async def serve(self) -> None:
        """Until the client has half-closed and every request has ended, or the call ends for
        all of them (the exception it ends with is raised)."""
        reader = asyncio.create_task(self._read())
        # the stream may be idle, waiting for a request: end it as the control plane stops
        undo = self.hub.when_closed(lambda: self._end(errors.Unavailable(STOPPING)))
        try:
            await self.ended
        finally:
            undo()
            reader.cancel()
            followers = list(self.followed.values())  # (stopped ones were cancelled already)
            for task in followers:
                task.cancel()
            await asyncio.gather(reader, *followers, return_exceptions=True)

    def _end(self, error: BaseException | None = None) -> None:
        if not self.ended.done():
            if error is None:
                self.ended.set_result(None)
            else:
                self.ended.set_exception(error)

    async def _write(self, update: tasks_pb2.SubmitUpdate) -> None:
        async with self.writing:
            await self.context.write(update)

    async def _read(self) -> None:
        auth, context = self.auth, self.context
        try:
            while True:
                # an idle stream ends as soon as the caller's API token is revoked
                request = await auth.until_revoked(self.caller, context, context.read())
                if request is grpc.aio.EOF:
                    break
                await self._admit(request)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the call ends for every request on it
            self._end(exc)
            return
        self.reading = False
        self._maybe_end()

    async def _admit(self, request: tasks_pb2.SubmitRequest) -> None:
        request_id = request.request_id
        action = request.WhichOneof("action")
        if action == "stop":
            follower = self.followed.pop(request_id, None)
            if follower is not None:  # its room is free at once; its task goes on
                follower.cancel()
            return
        if request_id == 0:
            await self._refuse(
                request_id, errors.InvalidArgument("must not be 0", field="request_id")
            )
        elif request_id in self.followed:
            await self._refuse(
                request_id,
                errors.InvalidArgument(
                    f"{request_id} is still followed on this stream", field="request_id"
                ),
            )
        elif action is None:
            await self._refuse(
                request_id,
                errors.InvalidArgument("names no action: set create or stop", field="create"),
            )
        elif len(self.followed) >= MAX_FOLLOWED:
            # refused rather than left unread: a stop behind it must still be read
            await self._refuse(
                request_id,
                errors.ResourceExhausted(
                    f"{MAX_FOLLOWED} requests are followed on this stream already: wait for "
                    "one to end, stop one, or open another stream",
                    field="request_id",
                ),
            )
        else:
            # Credentials are checked again per request, as per call: a certificate may have
            # expired, an API token expired or a `taskrun login` token been revoked meanwhile.
            await self.auth.check_call(self.context, self.peer)
            caller = await self.auth.operator(self.context, Scope.SUBMIT, known=self.peer)
            follower = asyncio.create_task(self._follow(request_id, request.create, caller))
            self.followed[request_id] = follower
            follower.add_done_callback(lambda _: self._ended(request_id, follower))

    async def _follow(
        self, request_id: int, request: tasks_pb2.CreateAndFollowTaskRequest, caller: Caller
    ) -> None:
        updates = self.create_and_follow(request, caller, self.context)
        try:
            async for update in updates:
                await self._write(tasks_pb2.SubmitUpdate(request_id=request_id, update=update))
        except errors.TaskRunError as exc:
            await self._refuse(request_id, exc)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # an abort (the call ends for all) or a fault
            self._end(exc)
        finally:
            await updates.aclose()

    async def _refuse(self, request_id: int, exc: errors.TaskRunError) -> None:
        code = status_code(exc)
        refused = getattr(self.context, "refused", None)  # the metrics' edge, when present
        if refused is not None:
            refused(code)
        error = tasks_pb2.RequestError(code=code.value[0], message=str(exc))
        await self._write(tasks_pb2.SubmitUpdate(request_id=request_id, error=error))

    def _ended(self, request_id: int, follower: asyncio.Task[None]) -> None:
        if self.followed.get(request_id) is follower:
            del self.followed[request_id]
        self._maybe_end()

    def _maybe_end(self) -> None:
        if not self.reading and not self.followed:
            self._end()
