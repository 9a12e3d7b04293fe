"""Several control planes on one PostgreSQL database: one leads, the others stand by.

Each `taskrun server` on PostgreSQL runs this loop (the lease and its fencing are in
store/postgres_lease.py):

1. **Standby**: it serves its listeners, but every call ends UNAVAILABLE naming the leader's
   advertised address (also in the trailing metadata `taskrun-leader`), health says
   NOT_SERVING, and only `GetClusterStatus` is answered. Every quarter of the leadership lease
   it records itself as alive and tries to take the lease over (which works once the leader's
   lease ran out by the database's clock, or the leader released it when it stopped).
2. **Active**: it stops the standby listeners and starts the whole control plane on a store
   whose every write transaction checks the epoch (the restart path: load the unfinished work;
   workers reconnect and reclaim their runs within their lease). It renews the lease every
   quarter of its duration.
3. **Stepping down**: when a renewal finds another epoch, when a write was refused for that
   reason, or when its lease ran out by its own clock (measured from the start of the last
   renewal that succeeded, so it ends no later than the database's copy), it stops the control
   plane (sessions end, writes are refused, nothing more is acknowledged) and goes back to 1.

Clocks: expiry is decided by the database's clock alone; each control plane measures its own
lease with its monotonic clock, which only needs to tick at the database's rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from taskrun import __version__
from taskrun.controlplane.app import KEEPALIVE_OPTIONS, SERVICE_NAMES, RunningServer, _bind
from taskrun.controlplane.app import start_server as start_active
from taskrun.controlplane.cluster_service import ClusterService, database_of
from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.store.postgres import PostgresStore
from taskrun.controlplane.store.postgres_lease import LeaderLease, new_control_plane_id
from taskrun.controlplane.tls import ServerCertificateSource
from taskrun.core.errors import StoreUnavailable
from taskrun.runtime import settle_garbage_collector
from taskrun.servers import LEADER_METADATA, STANDBY_PREFIX
from taskrun.v1 import cluster_pb2 as cpb
from taskrun.v1 import cluster_pb2_grpc

log = structlog.get_logger(__name__)

# How long a control plane that steps down lets calls in flight finish.
STEP_DOWN_GRACE = 0.5


def leader_address(lease: LeaderLease, public: bool) -> str:
    """Where the leader is, as last read: its public listener for callers of ours."""
    leader = lease.leader
    if not leader.holder or leader.expires_in <= 0:
        return ""
    return leader.public_address if public else leader.address


def standby_message(lease: LeaderLease, public: bool = False) -> str:
    address = leader_address(lease, public)
    if address:
        return (
            f"{STANDBY_PREFIX}; the leader is at {address}"
            f" (epoch {lease.leader.epoch}): connect there"
        )
    return (
        f"{STANDBY_PREFIX} and no control plane leads right now; one takes over"
        f" within {lease.duration:g}s: retry shortly"
    )


@dataclass
class ClusterStatusReader:
    """`taskrun status` from the lease row and the list of control planes."""

    lease: LeaderLease

    async def __call__(self) -> cpb.ClusterStatus:
        leader = await self.lease.read_leader()  # StoreUnavailable: UNAVAILABLE
        planes = await self.lease.control_planes()
        reply = cpb.ClusterStatus(
            store="postgresql",
            database=database_of(self.lease.url),
            leader_id=leader.holder if leader.expires_in > 0 else "",
            leader_address=leader.address if leader.expires_in > 0 else "",
            epoch=leader.epoch,
            lease_seconds_left=max(0.0, leader.expires_in),
            answered_by=self.lease.id,
        )
        if leader.since is not None:
            reply.leader_since.FromDatetime(leader.since)
        for plane in planes:
            item = reply.control_planes.add(
                id=plane.id,
                address=plane.address,
                hostname=plane.hostname,
                pid=plane.pid,
                version=plane.version,
                seen_seconds_ago=plane.seen_ago,
                leader=plane.id == reply.leader_id,
                workers=plane.workers,
            )
            item.started_at.FromDatetime(plane.started_at)
        return reply


class _RefuseAll(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Every method a standby does not serve: UNAVAILABLE naming the leader."""

    def __init__(self, lease: LeaderLease, public: bool) -> None:
        self.lease = lease
        self.public = public  # on the TLS-only listener: name the leader's one

    async def _refuse(self, context: grpc.aio.ServicerContext) -> None:
        address = leader_address(self.lease, self.public)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            standby_message(self.lease, self.public),
            trailing_metadata=((LEADER_METADATA, address),) if address else (),
        )

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)
        client_streaming = server_streaming = False
        with contextlib.suppress(KeyError):
            found = descriptor_pool.Default().FindMethodByName(method.strip("/").replace("/", "."))
            client_streaming, server_streaming = found.client_streaming, found.server_streaming

        async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
            await self._refuse(context)

        if client_streaming and server_streaming:
            return grpc.stream_stream_rpc_method_handler(unary)
        if client_streaming:
            return grpc.stream_unary_rpc_method_handler(unary)
        if server_streaming:
            return grpc.unary_stream_rpc_method_handler(unary)
        return grpc.unary_unary_rpc_method_handler(unary)


class StandbyServer:
    """The listeners of a standby: health NOT_SERVING, status, UNAVAILABLE for the rest."""

    def __init__(self, config: ServerConfig, lease: LeaderLease) -> None:
        self.config = config
        self.lease = lease
        self.servers: list[grpc.aio.Server] = []

    async def start(self) -> StandbyServer:
        options = [*KEEPALIVE_OPTIONS, ("grpc.so_reuseport", 0)]
        status = ClusterService(ClusterStatusReader(self.lease), auth=None)
        health_servicer = health.aio.HealthServicer()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        listeners = [(self.config.listen, True)]
        if self.config.public_address():
            listeners.append((self.config.public_address(), False))
        for address, mutual in listeners:
            server = grpc.aio.server(options=options)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            if mutual:
                cluster_pb2_grpc.add_ClusterServiceServicer_to_server(status, server)
            server.add_generic_rpc_handlers((_RefuseAll(self.lease, public=not mutual),))
            source = ServerCertificateSource(
                self.config.ca_cert, self.config.server_cert, self.config.server_key
            )
            _bind(server, address, source.credentials(require_client_auth=mutual))
            await server.start()
            self.servers.append(server)
        return self

    async def stop(self) -> None:
        servers, self.servers = self.servers, []
        await asyncio.gather(*(s.stop(STEP_DOWN_GRACE) for s in servers))


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


class Leadership:
    """One control plane's life on a shared database: standby, active, standby again."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.lease = LeaderLease(
            config.store,
            new_control_plane_id(),
            config.advertised_address(),
            duration=config.leader_lease,
            version=__version__,
            public_address=config.advertised_public_address(),
        )
        self.poll = config.leader_lease / 4
        self.valid_until = 0.0  # time.monotonic(): this process's own end of its lease
        self.running: RunningServer | None = None
        self.terms = 0  # how often this process became the leader

    def leads(self) -> bool:
        return time.monotonic() < self.valid_until and self.lease.deposed_by is None

    async def run(self, stop: asyncio.Event) -> None:
        # the schema, with the lease row, exists before the first poll
        schema = PostgresStore(self.config.store)
        await schema.open()
        await schema.close()
        try:
            while not stop.is_set():
                standby = await StandbyServer(self.config, self.lease).start()
                log.info(
                    "standing by",
                    control_plane=self.lease.id,
                    address=self.lease.address,
                    database=self.lease.where,
                )
                try:
                    won = await self._stand_by(stop)
                finally:
                    await standby.stop()
                if not won:
                    break
                await self._lead(stop)
        finally:
            with contextlib.suppress(StoreUnavailable):
                await self.lease.leave()
            await self.lease.close()

    async def _stand_by(self, stop: asyncio.Event) -> bool:
        """Until this process takes the lease over (True) or is told to stop (False)."""
        last_error = ""
        polls = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.lease.seen()
                if polls % 240 == 0:
                    await self.lease.forget_old()
                polls += 1
                if await self.lease.try_acquire():
                    self.valid_until = started + self.lease.duration
                    return True
                last_error = ""
            except StoreUnavailable as exc:
                if str(exc) != last_error:
                    log.warning("cannot reach the database; standing by", error=str(exc))
                    last_error = str(exc)
            await _wait(stop, self.poll)
        return False

    async def _lead(self, stop: asyncio.Event) -> None:
        """Hold the lease (renewed from the start: loading the state may take a while) and
        serve as the active control plane until told to stop or until the lease is lost."""
        self.terms += 1
        lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        renewer = asyncio.create_task(self._hold(stop, lost))
        store = PostgresStore(self.config.store)
        self.lease.install(store)
        try:
            await store.open()
            running = await start_active(
                self.config,
                store=store,
                cluster_status=ClusterStatusReader(self.lease),
                leads=self.leads,
            )
        except Exception as exc:
            log.error("could not start as the leader; standing by again", error=str(exc))
            renewer.cancel()
            await store.close()
            await self._release()
            return
        self.running = running
        log.info(
            "leading",
            control_plane=self.lease.id,
            epoch=self.lease.epoch,
            address=self.lease.address,
        )
        try:
            reason = await lost
            log.warning("stepping down", reason=reason, epoch=self.lease.epoch)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            self.running = None
            await running.stop(grace=STEP_DOWN_GRACE)
            if stop.is_set():
                await self._release()
            else:
                self.lease.epoch = 0

    async def _release(self) -> None:
        try:
            await self.lease.release()
        except StoreUnavailable as exc:
            log.warning("could not release the leadership lease", error=str(exc))
        self.valid_until = 0.0

    async def _hold(self, stop: asyncio.Event, lost: asyncio.Future[str]) -> None:
        """Renew the lease until told to stop or deposed; then resolve `lost` with why."""
        while True:
            await _wait(stop, self.poll)
            reason = self._renewal_blocked(stop)
            if reason:
                lost.set_result(reason)
                return
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.valid_until - started):
                    renewed = await self.lease.renew()
            except (StoreUnavailable, TimeoutError) as exc:
                log.warning("could not renew the leadership lease", error=str(exc) or "timeout")
                continue
            if not renewed:
                lost.set_result("another control plane took over (a newer epoch)")
                return
            self.valid_until = started + self.lease.duration
            if self.running is not None:
                with contextlib.suppress(StoreUnavailable):
                    await self.lease.seen(list(self.running.engine.sessions))

    def _renewal_blocked(self, stop: asyncio.Event) -> str:
        if stop.is_set():
            return "the control plane is stopping"
        if time.monotonic() >= self.valid_until:
            return "its lease ran out before it could renew it (paused, or cut off)"
        if self.lease.deposed_by is not None:
            return str(self.lease.deposed_by)
        return ""


async def run_with_leadership(config: ServerConfig, stop: asyncio.Event) -> None:
    """Serve as one of the control planes on `config.store` until `stop` is set."""
    settle_garbage_collector()
    await Leadership(config).run(stop)
