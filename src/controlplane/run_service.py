"""The worker session: one bidirectional `StreamConnect` stream per worker (ARCHITECTURE.md).

The handler checks the hello against the worker's certificate, attaches the session to the
engine, then reads reports and writes assignments until the stream ends; one sweeper task
watches every session's lease and certificate. Reports go to the engine, which commits them
before anything is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import structlog

from taskrun import convert
from taskrun.controlplane.auth import Authenticator, peer_certificate_expiry
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.guard import status_code
from taskrun.controlplane.session import WorkerSession
from taskrun.core import errors
from taskrun.core.access import AuditKind
from taskrun.core.ids import WorkerId, is_valid_worker_id
from taskrun.core.models import (
    AgentSpec,
    Worker,
    utcnow,
)
from taskrun.core.text import quoted
from taskrun.core.validation import (
    validate_agent_name,
    validate_labels,
)
from taskrun.runtime import BurstCollector
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2, workers_pb2_grpc

log = structlog.get_logger(__name__)

HELLO_TIMEOUT = 10.0
SWEEP_TICK = 0.2  # seconds between looks at every session's lease (at most half the margin)


def _worker_from_hello(hello: workers_pb2.WorkerHello) -> Worker:
    """Validate a hello (INVALID_ARGUMENT naming the field) and turn it into a Worker."""
    if not is_valid_worker_id(hello.worker_id):
        raise errors.InvalidArgument("is not a valid worker id", field="hello.worker_id")
    if not 1 <= hello.max_concurrent_runs <= 10_000:
        raise errors.InvalidArgument(
            "must be between 1 and 10000", field="hello.max_concurrent_runs"
        )
    return Worker(
        id=WorkerId(hello.worker_id),
        hostname=hello.hostname[:255],
        version=hello.version[:64],
        agents=_agents_from(hello.agents, "hello.agents"),
        labels=validate_labels(dict(hello.labels), "hello.labels"),
        max_concurrent_runs=hello.max_concurrent_runs,
    )


# What a worker may announce. The control plane keeps it, and sends it with the worker and in
# the catalog of agents: bounded so that a page of workers always has room for one.
MAX_AGENTS = 256
MAX_AGENT_BYTES = 128 * 1024  # one agent: its schema, backends and description together
MAX_AGENTS_BYTES = 512 * 1024  # all of a worker's agents
MAX_DESCRIPTION = 4096


def _agents_from(agents: Sequence[pb.AgentSpec], field: str) -> tuple[AgentSpec, ...]:
    """Validate announced agents (INVALID_ARGUMENT naming the field)."""
    if len(agents) > MAX_AGENTS:
        raise errors.InvalidArgument(f"must be at most {MAX_AGENTS} agents", field=field)
    out = []
    total = 0
    for i, agent in enumerate(agents):
        validate_agent_name(agent.name, f"{field}[{i}].name")
        if len(agent.unavailable_reason) > 1000:
            raise errors.InvalidArgument(
                "is longer than 1000 characters", field=f"{field}[{i}].unavailable_reason"
            )
        if len(agent.description) > MAX_DESCRIPTION:
            raise errors.InvalidArgument(
                f"is longer than {MAX_DESCRIPTION} characters", field=f"{field}[{i}].description"
            )
        size = agent.ByteSize()
        if size > MAX_AGENT_BYTES:
            raise errors.InvalidArgument(
                f"is {size:,} bytes, over the limit of {MAX_AGENT_BYTES:,} for one agent "
                "(its input schema, backends and description)",
                field=f"{field}[{i}]",
            )
        total += size
        if total > MAX_AGENTS_BYTES:
            raise errors.InvalidArgument(
                f"are over {MAX_AGENTS_BYTES:,} bytes together", field=field
            )
        out.append(convert.agent_from_pb(agent))
    return tuple(out)


class RunService(workers_pb2_grpc.RunServiceServicer):
    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self.engine = engine
        self.auth = auth
        # Sessions whose lease and certificate one sweeper task watches (see _sweep).
        self._watched: set[WorkerSession] = set()
        self._sweeper: asyncio.Task[None] | None = None
        # what a storm of sessions leaves is collected when it settles, not in the busy moment after
        self._collector = BurstCollector()

    async def StreamConnect(
        self,
        request_iterator: AsyncIterator[workers_pb2.WorkerMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        # The hello is read before the certificate is checked: a refusal that reaches the client
        # before its first write makes that write fail with grpc's own INTERNAL ("Internal
        # error from Core") or "RPC already finished", and the reason is lost to it.
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello within 10s")
            return
        worker_id = await self.auth.worker(context)
        if first is grpc.aio.EOF or not first.HasField("hello"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "hello: the first message must be a hello"
            )
            return
        hello = first.hello
        try:
            if hello.worker_id != worker_id:
                raise errors.PermissionDenied(
                    f"hello.worker_id {quoted(hello.worker_id)} does not match the certificate "
                    f"identity {quoted(worker_id)}"
                )
            self.engine.check_not_revoked(worker_id)
            worker = _worker_from_hello(hello)
        except errors.TaskRunError as exc:
            self.auth.access.audit(
                AuditKind.CONNECTION_REJECTED,
                principal=f"worker {worker_id}",
                subject=hello.worker_id[:64],
                peer=context.peer() or "",
                detail=str(exc),
                rejection=True,
            )
            await context.abort(status_code(exc), str(exc))
            return
        worker.certificate_expires_at = peer_certificate_expiry(context)
        await self._serve(worker, hello, context)

    async def _serve(
        self,
        worker: Worker,
        hello: workers_pb2.WorkerHello,
        context: grpc.aio.ServicerContext,
    ) -> None:
        engine, cfg = self.engine, self.engine.config
        try:
            session = engine.attach(worker, hello)
        except errors.Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            return
        session.handler = asyncio.current_task()
        self._collector.note()
        params = workers_pb2.SessionParams(
            session_id=session.session_id,
            heartbeat_interval_ms=int(cfg.heartbeat_interval * 1000),
            lease_duration_ms=int(cfg.lease_duration * 1000),
            lease_margin_ms=int(cfg.lease_margin * 1000),
            idle_heartbeat_interval_ms=int(cfg.idle_heartbeat_interval * 1000),
            max_chunks_per_message=cfg.max_chunks_per_message,
            max_chunk_bytes=cfg.max_chunk_bytes,
            max_message_bytes=cfg.max_message_bytes,
        )
        writer: asyncio.Task[None] | None = None
        try:
            await context.write(workers_pb2.ServerMessage(params=params))
            writer = asyncio.create_task(session.write_loop(context.write))
            self._watch(session)
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    break
                if msg.HasField("agents"):
                    try:
                        agents = _agents_from(msg.agents.agents, "agents.agents")
                    except errors.InvalidArgument as exc:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                        return
                    engine.update_agents(session, agents)
                engine.handle_reports(session, msg)
                if engine.backlog > cfg.max_inflight_commits:
                    await engine.flush()
        except asyncio.CancelledError:
            if not session.kick_reason:
                raise
            # kicked by the engine: end the call with the reason instead of a bare CANCELLED
        finally:
            # Detach first: a writer blocked on a silent peer may take long to unwind.
            engine.detach(session)
            self._watched.discard(session)
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await writer
        if session.kick_reason:
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if session.kick_denied
                else grpc.StatusCode.UNAVAILABLE
            )
            await context.abort(code, session.kick_reason)

    def _watch(self, session: WorkerSession) -> None:
        self._watched.add(session)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        """End each session whose lease ran out (plus the margin) without a renewal (an idle
        one: its next idle heartbeat is that late, see WorkerSession.renew_deadline), or whose
        certificate it connected with expired (a renewed worker has moved on by then).

        One task looks at every session each tick (a fraction of the margin), instead of a
        timer per session re-armed at every renewal. A session ended here has its runs retried
        at once: the worker stopped them already, or never started them without a renewal.
        """
        margin = self.engine.config.lease_margin
        idle = self.engine.config.idle_heartbeat_interval
        tick = min(SWEEP_TICK, margin / 2)
        while self._watched:
            await asyncio.sleep(tick)
            now, wall = time.monotonic(), utcnow()
            ended = [
                s
                for s in self._watched
                if now >= s.renew_deadline(idle) + margin
                or (
                    s.worker.certificate_expires_at is not None
                    and wall >= s.worker.certificate_expires_at
                )
            ]
            for session in ended:
                self._watched.discard(session)
                self._end(session, now)

    def _end(self, session: WorkerSession, now: float) -> None:
        expires = session.worker.certificate_expires_at
        if expires is not None and utcnow() >= expires:
            reason = f"the client certificate expired at {expires:%Y-%m-%d %H:%M:%S} UTC"
            log.warning("worker certificate expired", worker_id=session.worker_id)
            session.kick(f"{reason}; renew it or enroll again")
            return
        silent = now - session.last_seen
        log.warning("worker lease ran out", worker_id=session.worker_id, silent_s=round(silent, 1))
        session.kick(f"the lease ran out: nothing heard from the worker for {silent:.1f}s")
        self.engine.detach(session)  # its runs are retried now, however long the stream lingers
