"""Assemble and run the control plane: store, engine, gRPC services, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from taskrun.controlplane.access import AccessControl
from taskrun.controlplane.auth import Authenticator, RunGrant
from taskrun.controlplane.cluster_service import ClusterService, StatusSource, single_process_status
from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.conversation_service import ConversationService
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.event_service import EventService
from taskrun.controlplane.guard import RequestGuard
from taskrun.controlplane.metrics import ControlPlaneMetrics
from taskrun.controlplane.run_service import RunService
from taskrun.controlplane.schedule_service import ScheduleService
from taskrun.controlplane.scheduler import Scheduler
from taskrun.controlplane.security_service import (
    AccessService,
    CertificateService,
    EnrollmentService,
)
from taskrun.controlplane.services import TaskService
from taskrun.controlplane.sizing import RECEIVE_HEADROOM, SEND_HEADROOM
from taskrun.controlplane.store import POSTGRES_SCHEMES, open_store, redact
from taskrun.controlplane.tls import ServerCertificateSource
from taskrun.controlplane.webhook_service import WebhookService
from taskrun.controlplane.webhooks import WebhookDispatcher
from taskrun.controlplane.worker_service import WorkerService
from taskrun.controlplane.workflows.executor import WorkflowExecutor
from taskrun.controlplane.workflows.service import WorkflowService
from taskrun.core.store import Store
from taskrun.metrics_http import MetricsServer
from taskrun.ports import check_listen_address
from taskrun.runtime import settle_garbage_collector
from taskrun.v1 import (
    cluster_pb2,
    cluster_pb2_grpc,
    conversations_pb2,
    conversations_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    schedules_pb2,
    schedules_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
    workers_pb2,
    workers_pb2_grpc,
    workflows_pb2,
    workflows_pb2_grpc,
)

if TYPE_CHECKING:
    from taskrun.controlplane.http.server import HttpServer

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    workers_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    workers_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
    schedules_pb2.DESCRIPTOR.services_by_name["ScheduleService"].full_name,
    conversations_pb2.DESCRIPTOR.services_by_name["ConversationService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    security_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name,
    security_pb2.DESCRIPTOR.services_by_name["AccessService"].full_name,
    security_pb2.DESCRIPTOR.services_by_name["EnrollmentService"].full_name,
    webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
    workflows_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name,
    cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name,
)

# Keepalive: notice a silent peer in seconds (see FIELD-NOTES). Workers use matching settings.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


# Before grpc's stop: wait until no call has arrived for QUIET_GAP seconds, at most QUIET_AT_MOST.
QUIET_GAP = 0.05
QUIET_AT_MOST = 2.0


@dataclass
class RunningServer:
    """A started control plane; `port` is the bound port (useful with port 0)."""

    server: grpc.aio.Server
    engine: Engine
    health: health.aio.HealthServicer
    port: int
    scheduler: Scheduler | None = None
    metrics: ControlPlaneMetrics | None = None
    metrics_server: MetricsServer | None = None  # None unless config.metrics_listen
    # the TLS-only listener (Enroll, health, API-token callers); None when disabled
    public_server: grpc.aio.Server | None = None
    public_port: int = 0
    tls_sources: tuple[ServerCertificateSource, ...] = ()
    http_server: HttpServer | None = None  # None unless config.http_listen
    webhooks: WebhookDispatcher | None = None
    workflows: WorkflowExecutor | None = None
    guard: RequestGuard | None = None

    @property
    def http_port(self) -> int:
        return self.http_server.port if self.http_server is not None else 0

    async def stop(self, grace: float = 5.0) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http_server is not None:
            await self.http_server.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.workflows is not None:
            await self.workflows.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.engine.stop()
        if self.guard is not None:
            # grpc's stop cancels the calls it accepted but has not handed over yet (CANCELLED,
            # which clients take as final): let those arrive first, and be refused UNAVAILABLE
            # or served, while streams hold their callers (no one comes back yet).
            await self.guard.quiet(QUIET_GAP, at_most=QUIET_AT_MOST)
        servers = (self.server, self.public_server)
        stopping = [asyncio.create_task(s.stop(grace)) for s in servers if s is not None]
        # One turn of the loop lets each stop begin, and from then on a new call is refused
        # (UNAVAILABLE). Only then do followers and event watchers end (UNAVAILABLE: follow
        # again), at once rather than after the grace: a follower that came back before the
        # stop began would be left waiting unmatched, and be cancelled (CANCELLED) by it.
        await asyncio.sleep(0)
        self.engine.hub.close()
        self.engine.events.close()
        await asyncio.gather(*stopping)
        await self.engine.flush()
        await self.engine.store.close()
        log.info("server stopped")


def run_grant(engine: Engine, token: str) -> RunGrant | None:
    found = engine.run_grant(token)
    return RunGrant(found[0].id, found[1].id) if found is not None else None


def mcp_url(host: str, port: int) -> str:
    """The MCP server's URL for runs: a wildcard host stays, for each worker to replace with
    the host it reaches the control plane at."""
    host = host.strip("[]") or "0.0.0.0"
    return f"https://{f'[{host}]' if ':' in host else host}:{port}/mcp"


async def start_server(
    config: ServerConfig,
    *,
    store: Store | None = None,
    cluster_status: StatusSource | None = None,
    leads: Callable[[], bool] | None = None,
) -> RunningServer:
    """Open the store (unless an open one is given), load state, and start serving on
    `config.listen`. With several control planes (see leadership.py) `cluster_status` answers
    `taskrun status` and `leads` says whether this one's leadership lease still holds."""
    if store is None:
        store = open_store(config.store)
        await store.open()
    try:
        return await _serve(config, store, cluster_status, leads)
    except BaseException:
        await store.close()
        raise


async def _serve(
    config: ServerConfig,
    store: Store,
    cluster_status: StatusSource | None = None,
    leads: Callable[[], bool] | None = None,
) -> RunningServer:
    engine = Engine(store, config)
    engine.leads = leads
    await engine.start()
    health_servicer = health.aio.HealthServicer()
    background: set[asyncio.Task[None]] = set()

    def store_health(serving: bool) -> None:
        """NOT_SERVING while the store cannot write; SERVING again once the engine recovered."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def report() -> None:
            for name in ("", *SERVICE_NAMES):
                await health_servicer.set(name, status)

        task = asyncio.get_running_loop().create_task(report())
        background.add(task)
        task.add_done_callback(background.discard)

    engine.on_health = store_health
    scheduler = Scheduler(engine, misfire_grace=config.schedule_misfire_grace)
    await scheduler.load()
    workflows = WorkflowExecutor(engine)
    workflows.on_inbox_item = engine.events.announce_inbox_item
    await workflows.load()
    scheduler.workflows = workflows  # a schedule may start a workflow
    access = AccessControl(engine, config)
    await access.load()
    webhooks = WebhookDispatcher(engine, config)
    await webhooks.load()
    metrics = ControlPlaneMetrics(engine, access)
    auth = Authenticator(access)
    auth.run_grants = functools.partial(run_grant, engine)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes + RECEIVE_HEADROOM),
        ("grpc.max_send_message_length", config.max_message_bytes + SEND_HEADROOM),
        *KEEPALIVE_OPTIONS,
        # grpc binds with SO_REUSEPORT by default: a second server on a busy port would start and
        # share the connections. Without it, a busy port is a bind error.
        ("grpc.so_reuseport", 0),
    ]
    guard = RequestGuard(auth.check_call)  # parse, per-call credentials, never UNKNOWN
    tasks = TaskService(engine, auth)
    conversations = ConversationService(engine, auth, tasks)
    workers = WorkerService(engine, auth)
    schedules = ScheduleService(scheduler, auth)
    events = EventService(engine, auth)
    admin = AccessService(auth)
    webhook_service = WebhookService(webhooks, auth)
    workflow_service = WorkflowService(workflows, auth)
    enrollment = EnrollmentService(access)
    cluster = ClusterService(
        cluster_status or single_process_status(config, lambda: list(engine.sessions)), auth
    )

    def public_services(server: grpc.aio.Server) -> None:
        security_pb2_grpc.add_EnrollmentServiceServicer_to_server(enrollment, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    def operator_services(server: grpc.aio.Server) -> None:
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(tasks, server)
        conversations_pb2_grpc.add_ConversationServiceServicer_to_server(conversations, server)
        workers_pb2_grpc.add_WorkerServiceServicer_to_server(workers, server)
        schedules_pb2_grpc.add_ScheduleServiceServicer_to_server(schedules, server)
        events_pb2_grpc.add_EventServiceServicer_to_server(events, server)
        security_pb2_grpc.add_AccessServiceServicer_to_server(admin, server)
        webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(webhook_service, server)
        workflows_pb2_grpc.add_WorkflowServiceServicer_to_server(workflow_service, server)
        cluster_pb2_grpc.add_ClusterServiceServicer_to_server(cluster, server)

    # The mTLS listener: every caller presents a certificate signed by our CA.
    server = grpc.aio.server(interceptors=[metrics.interceptor(), guard], options=options)
    public_services(server)
    operator_services(server)
    workers_pb2_grpc.add_RunServiceServicer_to_server(RunService(engine, auth), server)
    security_pb2_grpc.add_CertificateServiceServicer_to_server(CertificateService(auth), server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    sources = [ServerCertificateSource(config.ca_cert, config.server_cert, config.server_key)]
    port = _bind(server, config.listen, sources[0].credentials(require_client_auth=True))
    access.session_port = port
    # The public listener: TLS only. Enroll and health need nothing; the operator services (unless
    # turned off) need an API token there (no certificate can be presented); no worker sessions.
    public_server: grpc.aio.Server | None = None
    public_port = 0
    public_address = config.public_address()
    if public_address:
        public_server = grpc.aio.server(
            interceptors=[metrics.interceptor(), guard], options=options
        )
        public_services(public_server)
        if config.public_operator_api:
            operator_services(public_server)
        # a source of its own: each listener's fetcher must see a rotation once for itself
        sources.append(
            ServerCertificateSource(config.ca_cert, config.server_cert, config.server_key)
        )
        public_port = _bind(
            public_server, public_address, sources[1].credentials(require_client_auth=False)
        )
        access.public_port = public_port
    metrics_server = None
    if config.metrics_listen:
        try:
            metrics_server = await MetricsServer(metrics.registry, config.metrics_listen).start()
        except (OSError, ValueError) as exc:
            if not config.metrics_optional:
                raise OSError(
                    f"could not serve metrics on {config.metrics_listen}: {exc}"
                ) from None
            log.warning("metrics not served", address=config.metrics_listen, error=str(exc))
    http_server = None
    if config.http_listen:
        # Imported only when served: the HTTP and MCP stack is about 20 MB of resident memory.
        from taskrun.controlplane.http.api import HttpApi, Servicers
        from taskrun.controlplane.http.mcp_server import McpEndpoint
        from taskrun.controlplane.http.openapi import build as build_openapi
        from taskrun.controlplane.http.server import HttpServer

        servicers = Servicers(
            tasks, conversations, workers, schedules, events, webhook_service, workflow_service
        )
        api = HttpApi(
            servicers,
            max_body_bytes=config.http_max_body_bytes,
            openapi=build_openapi(),
            answered=metrics.note_http_status,
        )
        mcp = McpEndpoint(servicers)

        @contextlib.asynccontextmanager
        async def lifespan(_: object) -> AsyncIterator[None]:
            async with mcp.running():
                yield

        try:
            http_server = HttpServer(
                api.app([("/mcp", mcp)], lifespan),
                config.http_listen,
                config.server_cert,
                config.server_key,
                on_close=api.closing.set,
            )
        except (OSError, ValueError) as exc:
            raise OSError(f"could not serve the HTTP API on {config.http_listen}: {exc}") from None
        await http_server.start()
        engine.mcp_url = config.mcp_url or mcp_url(http_server.host, http_server.port)
    await server.start()
    if public_server is not None:
        await public_server.start()
    scheduler.start()
    webhooks.start()
    workflows.start()  # after webhooks: it announces the inbox items still waiting
    if not engine.store_error:
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = config.listen.rsplit(":", 1)[0]
    bound = {
        "address": f"{host}:{port}",
        "public_address": (
            f"{public_address.rsplit(':', 1)[0]}:{public_port}" if public_server else ""
        ),
        "http_address": f"{http_server.host}:{http_server.port}" if http_server else "",
    }
    log.info(
        "server listening",
        **bound,
        store=redact(config.store),
        # gRPC's endpoints, picked as grpc loaded (taskrun.grpc_transport)
        grpc_experiments=os.environ.get("GRPC_EXPERIMENTS", ""),
    )
    if config.ready_file:
        write_ready_file(Path(config.ready_file), bound)
    return RunningServer(
        server,
        engine,
        health_servicer,
        port,
        scheduler,
        metrics,
        metrics_server,
        public_server=public_server,
        public_port=public_port,
        tls_sources=tuple(sources),
        http_server=http_server,
        webhooks=webhooks,
        workflows=workflows,
        guard=guard,
    )


def write_ready_file(path: Path, bound: dict[str, str]) -> None:
    """The bound addresses as JSON, replaced in one step: a reader never sees half of it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps({**bound, "pid": os.getpid()}) + "\n")
    partial.replace(path)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials) -> int:
    """Bind `address`; a busy port (or an address not on this host) is an OSError naming it."""
    check_listen_address(address)  # AddressUnavailable (an OSError) names the port
    problem = f"could not listen on {address}: the port is in use or the address is not local"
    try:
        port: int = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc reports a failed bind this way
        raise OSError(problem) from None
    if port == 0:
        raise OSError(problem)
    return port


async def run_server(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly.

    On PostgreSQL, as one of possibly several control planes: leading or standing by
    (leadership.py)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if config.store.startswith(POSTGRES_SCHEMES):
        from taskrun.controlplane.leadership import run_with_leadership

        await run_with_leadership(config, stop)
        return
    running = await start_server(config)
    settle_garbage_collector()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await running.stop()
