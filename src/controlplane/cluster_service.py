"""ClusterService: which control planes share the database, who leads since when, the epoch.

The active control plane serves it with the other operator services (scope read). A standby
serves it too, to operator certificates only (it holds no API tokens), so that `taskrun status`
answers whichever control plane it reaches. With SQLite or memory there is one control plane,
which always leads (epoch 0).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import grpc

from taskrun import __version__
from taskrun.controlplane.auth import Authenticator, peer_principal
from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.store import POSTGRES_SCHEMES, redact
from taskrun.core.access import Scope
from taskrun.core.errors import Unavailable
from taskrun.core.identity import PrincipalKind
from taskrun.v1 import cluster_pb2 as cpb
from taskrun.v1 import cluster_pb2_grpc

StatusSource = Callable[[], Awaitable[cpb.ClusterStatus]]

STARTED_AT = datetime.now(UTC)


def store_kind(url: str) -> str:
    if url.startswith(POSTGRES_SCHEMES):
        return "postgresql"
    return "sqlite" if url.startswith("sqlite:") else "memory"


def database_of(url: str) -> str:
    if url.startswith(POSTGRES_SCHEMES):
        from taskrun.controlplane.store.postgres import describe

        return describe(url)
    return redact(url)


def single_process_status(config: ServerConfig, workers: Callable[[], list[str]]) -> StatusSource:
    """SQLite and memory: this process is the only control plane and always leads."""
    me = f"cp-{socket.gethostname()}-{os.getpid()}"

    async def status() -> cpb.ClusterStatus:
        reply = cpb.ClusterStatus(
            store=store_kind(config.store),
            database=database_of(config.store),
            leader_id=me,
            leader_address=config.advertised_address(),
            epoch=0,
            answered_by=me,
        )
        reply.leader_since.FromDatetime(STARTED_AT)
        plane = reply.control_planes.add(
            id=me,
            address=config.advertised_address(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            leader=True,
            workers=sorted(workers()),
        )
        plane.started_at.FromDatetime(STARTED_AT)
        return reply

    return status


class ClusterService(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, status: StatusSource, auth: Authenticator | None) -> None:
        """`auth` None: a standby, which accepts operator certificates only."""
        self.status = status
        self.auth = auth

    async def GetClusterStatus(
        self, request: cpb.GetClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ClusterStatus:
        if self.auth is not None:
            await self.auth.operator(context, Scope.READ)
        else:
            principal = peer_principal(context)
            if principal is None or principal.kind is not PrincipalKind.OPERATOR:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "a standby control plane answers status to operator certificates only; "
                    "ask the leader (API tokens are checked there)",
                )
        try:
            return await self.status()
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
