"""`taskrun status`: the control planes sharing the database, who leads since when, the epoch,
the database, and the workers connected to each.

Any control plane answers (a standby too, to an operator certificate), so `--server` may name
any of them; with several addresses the first that answers does.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from taskrun.cli import output
from taskrun.cli.client import Client
from taskrun.cli.failover import FailoverStub
from taskrun.cli.running import main_module as _cli
from taskrun.v1 import cluster_pb2 as cpb
from taskrun.v1 import cluster_pb2_grpc


@dataclass(frozen=True, slots=True)
class ControlPlaneInfo:
    id: str
    address: str
    hostname: str
    pid: int
    version: str
    started_at: datetime | None
    seen_seconds_ago: float
    leader: bool
    workers: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    store: str
    database: str
    leader_id: str  # "" while none leads
    leader_address: str
    leader_since: datetime | None
    epoch: int
    lease_seconds_left: float
    answered_by: str
    control_planes: list[ControlPlaneInfo]


def _time(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    value: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return value


async def cluster_status(client: Client) -> ClusterStatus:
    """Ask whichever control plane the client reaches."""
    stub = FailoverStub(client._channels, cluster_pb2_grpc.ClusterServiceStub)
    reply: cpb.ClusterStatus = await stub.GetClusterStatus(
        cpb.GetClusterStatusRequest(), timeout=client.timeout
    )
    return ClusterStatus(
        store=reply.store,
        database=reply.database,
        leader_id=reply.leader_id,
        leader_address=reply.leader_address,
        leader_since=_time(reply, "leader_since"),
        epoch=reply.epoch,
        lease_seconds_left=reply.lease_seconds_left,
        answered_by=reply.answered_by,
        control_planes=[
            ControlPlaneInfo(
                id=p.id,
                address=p.address,
                hostname=p.hostname,
                pid=p.pid,
                version=p.version,
                started_at=_time(p, "started_at"),
                seen_seconds_ago=p.seen_seconds_ago,
                leader=p.leader,
                workers=list(p.workers),
            )
            for p in reply.control_planes
        ],
    )


def register(commands: Any) -> None:
    cli = _cli()
    p = cli._leaf(
        commands,
        "status",
        cmd_status,
        help="the control planes: who leads since when, the epoch, the database, their workers",
        description="Ask a control plane (any of them: a standby answers too) which control "
        "planes share its database, which one leads, since when and with which epoch (one "
        "more on every takeover), and which workers are connected to each. With SQLite or "
        "memory there is one control plane, which always leads.",
    )
    p.add_argument(
        "--output", "-o", choices=("table", "json"), default="table", help="table or json"
    )


def status_doc(status: ClusterStatus) -> dict[str, Any]:
    return {
        "store": status.store,
        "database": status.database,
        "leader": status.leader_id or None,
        "leader_address": status.leader_address or None,
        "leader_since": status.leader_since,
        "epoch": status.epoch,
        "lease_seconds_left": round(status.lease_seconds_left, 3),
        "answered_by": status.answered_by,
        "control_planes": [
            {
                "id": p.id,
                "address": p.address,
                "hostname": p.hostname,
                "pid": p.pid,
                "version": p.version,
                "role": "leader" if p.leader else "standby",
                "started_at": p.started_at,
                "seen_seconds_ago": round(p.seen_seconds_ago, 3),
                "workers": p.workers,
            }
            for p in status.control_planes
        ],
    }


def status_text(status: ClusterStatus, now: datetime) -> str:
    since = output.format_when(status.leader_since, now) if status.leader_since else "-"
    fields = [
        ("Store", f"{status.store} {status.database}".strip()),
        (
            "Leader",
            f"{status.leader_id} at {status.leader_address}" if status.leader_id else "none",
        ),
        ("Since", since),
        ("Epoch", str(status.epoch)),
    ]
    rows = [
        (
            p.id,
            "leader" if p.leader else "standby",
            p.address,
            output.format_when(p.started_at, now) if p.started_at else "-",
            f"{p.seen_seconds_ago:.1f}s ago",
            ", ".join(p.workers) or "-",
        )
        for p in status.control_planes
    ]
    table = output.render_table(
        ("CONTROL PLANE", "ROLE", "ADDRESS", "STARTED", "SEEN", "WORKERS"), rows
    )
    return f"{output.render_fields(fields).rstrip()}\n\n{table.rstrip()}"


def cmd_status(args: argparse.Namespace) -> int:
    cli = _cli()
    client = cli._client(args)

    async def run() -> ClusterStatus:
        async with client:
            return await cluster_status(client)

    status = asyncio.run(run())
    if args.output == "json":
        cli._write(output.dumps(output.to_json_value(status_doc(status))))
    else:
        cli._write(status_text(status, datetime.now(UTC)) + "\n")
    return int(cli.EXIT_OK)
