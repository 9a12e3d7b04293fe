"""EventService.WatchEvents: a snapshot of the fleet, then every committed change, filtered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import structlog

from taskrun.controlplane.auth import Authenticator
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.events import Filter, Overflowed
from taskrun.controlplane.store import eventlog
from taskrun.core import errors
from taskrun.core.access import Scope
from taskrun.core.ids import RunId
from taskrun.v1 import events_pb2 as epb
from taskrun.v1 import events_pb2_grpc

log = structlog.get_logger(__name__)

MAX_ID = 128
REPLAY_PAGE = 1000
# How long a new watcher waits for a commit that was under way when it came (its changes reach
# the watcher from the log): longer means the database is in trouble, and the watcher is told
# to come back.
CATCH_UP_WAIT = 10.0
LOG_BEHIND = "the event log is behind: a commit is taking long; watch again in a moment"


def watch_filter(request: epb.WatchEventsRequest) -> Filter:
    """The subscription filter a request asks for (INVALID_ARGUMENT naming the field)."""
    for name in ("task_id", "worker_id"):
        if len(getattr(request, name)) > MAX_ID:
            raise errors.InvalidArgument("is too long", field=name)
    known = set(epb.EventKind.values())
    for kind in request.kinds:
        if kind not in known or kind == epb.EVENT_KIND_UNSPECIFIED:
            raise errors.InvalidArgument(f"unknown event kind {kind}", field="kinds")
    return Filter(
        task_id=request.task_id,
        worker_id=request.worker_id,
        kinds=frozenset(int(k) for k in request.kinds),
        include_output=request.include_output,
    )


class EventService(events_pb2_grpc.EventServiceServicer):
    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self.engine = engine
        self.auth = auth

    async def WatchEvents(
        self, request: epb.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[epb.Event]:
        principal = await self.auth.operator(context, Scope.READ)
        try:
            wanted = watch_filter(request)
        except errors.InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        engine = self.engine
        # Subscribe and take the snapshot in one step (no await between): every change after
        # the snapshot reaches the subscription, live or, when its commit was already under
        # way, from the log (`_catch_up`).
        sub = engine.events.subscribe(wanted)
        captured = engine.events.position
        log.info(
            "event watcher connected", by=str(principal), subscribers=engine.events.subscribers
        )
        last = 0  # the newest logged position delivered: live events up to it were replayed
        try:
            if request.after_position:
                await self._check_resumable(request.after_position, context)
                async for event in self._catch_up(request.after_position, captured, wanted):
                    last = event.position
                    if event.kind:  # not the marker of the end of the replay
                        yield event
            elif request.snapshot:
                for event in engine.events.snapshot(
                    engine.workers.values(), engine.tasks.values(), engine.runs, wanted
                ):
                    last = event.position  # SNAPSHOT_END's: the log's position it is current to
                    yield event
                if captured > last:  # changes in the snapshot whose commit was under way
                    async for event in self._catch_up(last, captured, wanted):
                        last = event.position
                        if event.kind:
                            yield event
            while True:
                try:
                    events = await self.auth.until_revoked(principal, context, sub.wait())
                except Overflowed as exc:
                    log.warning("event watcher dropped: too slow", by=str(principal))
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                    return
                except errors.Unavailable as exc:  # the control plane stops: watch again
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                    return
                for event in events:
                    if not event.position or event.position > last:
                        yield event
        except TimeoutError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, LOG_BEHIND)
        finally:
            engine.events.unsubscribe(sub)

    async def _check_resumable(self, after: int, context: grpc.aio.ServicerContext) -> None:
        """FAILED_PRECONDITION unless the log holds every event after `after`."""
        if after < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "after_position: is negative")
        oldest, newest = await self.engine.store.event_positions()
        if after > newest:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"after_position: {after} is beyond the newest logged event ({newest}); it "
                "comes from another database? Watch with a snapshot instead",
            )
        if after < newest and (oldest == 0 or oldest > after + 1):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"after_position: the event log no longer holds the events after {after} (it "
                f"starts at {oldest}); watch with a snapshot instead",
            )

    async def _catch_up(
        self, after: int, captured: int, wanted: Filter
    ) -> AsyncIterator[epb.Event]:
        """The logged events after `after` that `wanted` matches, through at least `captured`
        (the changes captured before the subscription, which it does not get live: their
        commit may still be under way, so this waits for it), then a marker event (kind 0)
        carrying the last position read. TimeoutError when that commit takes over
        CATCH_UP_WAIT."""
        store = self.engine.store
        last, waited = after, False
        while True:
            page = await store.read_events(last, REPLAY_PAGE)
            events = [
                eventlog.decode(logged)
                for logged in page
                if wanted.wants(logged.kind, logged.task_id, logged.worker_id)
            ]
            await self._with_output(events)
            for event in events:
                yield event
            if page:
                last = page[-1].position
            if len(page) == REPLAY_PAGE:
                continue
            if last >= captured or waited:
                break
            async with asyncio.timeout(CATCH_UP_WAIT):
                await self.engine.events.logged_through(captured)
            waited = True  # read once more: the log now holds all it ever will up to `captured`
        yield epb.Event(position=last)

    async def _with_output(self, events: list[epb.Event]) -> None:
        """Fill in the text of logged output events from the output table (one read per run)."""
        wanted: dict[str, list[epb.Event]] = {}
        for event in events:
            if event.kind == epb.EVENT_KIND_OUTPUT:
                wanted.setdefault(event.chunk.run_id, []).append(event)
        for run_id, chunk_events in wanted.items():
            run = RunId(run_id)
            floor = min(e.chunk.seq for e in chunk_events) - 1
            stored = await self.engine.store.read_output([run], after={run: floor})
            texts = {(c.attempt, c.seq): c.data for c in stored}
            for event in chunk_events:
                event.chunk.data = texts.get((event.chunk.attempt, event.chunk.seq), "")
