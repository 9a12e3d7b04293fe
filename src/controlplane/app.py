"""Assemble and run the control plane: store, engine, gRPC services, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.event_service import EventService  # issue 6
from taskrun.controlplane.metrics import ControlPlaneMetrics  # issue 6
from taskrun.controlplane.schedule_service import ScheduleService
from taskrun.controlplane.scheduler import Scheduler
from taskrun.controlplane.services import RunService, TaskService, WorkerService
from taskrun.controlplane.store import open_store
from taskrun.core.store import Store
from taskrun.metrics_http import MetricsServer  # issue 6
from taskrun.v1 import (
    events_pb2,
    events_pb2_grpc,
    schedules_pb2,
    schedules_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    workers_pb2,
    workers_pb2_grpc,
)

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    workers_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    workers_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
    schedules_pb2.DESCRIPTOR.services_by_name["ScheduleService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,  # issue 6
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


@dataclass
class RunningServer:
    """A started control plane; `port` is the bound port (useful with port 0)."""

    server: grpc.aio.Server
    engine: Engine
    health: health.aio.HealthServicer
    port: int
    scheduler: Scheduler | None = None
    metrics: ControlPlaneMetrics | None = None  # issue 6
    metrics_server: MetricsServer | None = None  # issue 6: None unless config.metrics_listen

    async def stop(self, grace: float = 5.0) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.metrics_server is not None:  # issue 6
            await self.metrics_server.close()
        if self.scheduler is not None:
            await self.scheduler.stop()
        await self.engine.stop()
        await self.server.stop(grace)
        await self.engine.flush()
        await self.engine.store.close()
        log.info("server stopped")


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    for path in (config.ca_cert, config.server_cert, config.server_key):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `taskrun certs init` first")
    return grpc.ssl_server_credentials(
        [(config.server_key.read_bytes(), config.server_cert.read_bytes())],
        root_certificates=config.ca_cert.read_bytes(),
        require_client_auth=True,
    )


async def start_server(config: ServerConfig) -> RunningServer:
    """Open the store, load state, and start serving on `config.listen`."""
    store = open_store(config.store)
    await store.open()
    try:
        return await _serve(config, store)
    except BaseException:
        await store.close()
        raise


async def _serve(config: ServerConfig, store: Store) -> RunningServer:
    engine = Engine(store, config)
    await engine.start()
    scheduler = Scheduler(engine, misfire_grace=config.schedule_misfire_grace)
    await scheduler.load()
    metrics = ControlPlaneMetrics(engine)  # issue 6
    server = grpc.aio.server(
        interceptors=[metrics.interceptor()],  # issue 6: rejections, stream messages
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes + 1024 * 1024),
            ("grpc.max_send_message_length", config.max_message_bytes + 1024 * 1024),
            *KEEPALIVE_OPTIONS,
        ],
    )
    tasks_pb2_grpc.add_TaskServiceServicer_to_server(TaskService(engine), server)
    workers_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerService(engine), server)
    workers_pb2_grpc.add_RunServiceServicer_to_server(RunService(engine), server)
    schedules_pb2_grpc.add_ScheduleServiceServicer_to_server(ScheduleService(scheduler), server)
    events_pb2_grpc.add_EventServiceServicer_to_server(EventService(engine), server)  # issue 6
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        port = server.add_secure_port(config.listen, server_credentials(config))
    except RuntimeError as exc:  # grpc reports a failed bind this way
        raise OSError(f"could not listen on {config.listen}: {exc}") from None
    if port == 0:
        raise OSError(f"could not listen on {config.listen}")
    metrics_server = None  # issue 6
    if config.metrics_listen:
        try:
            metrics_server = await MetricsServer(metrics.registry, config.metrics_listen).start()
        except (OSError, ValueError) as exc:
            if not config.metrics_optional:
                raise OSError(
                    f"could not serve metrics on {config.metrics_listen}: {exc}"
                ) from None
            log.warning("metrics not served", address=config.metrics_listen, error=str(exc))
    await server.start()
    scheduler.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = config.listen.rsplit(":", 1)[0]
    log.info("server listening", address=f"{host}:{port}", store=config.store)
    return RunningServer(server, engine, health_servicer, port, scheduler, metrics, metrics_server)


async def run_server(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly."""
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await running.stop()
