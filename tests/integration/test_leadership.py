"""Several control planes on one PostgreSQL database: the lease, its fencing epoch, standbys that
name the leader, and clients that follow it. Real PostgreSQL, real gRPC servers with mTLS on
loopback, in this process (the process-level faults are in tests/e2e/test_failover.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskrun.cli.client import Client, TaskChanged
from taskrun.cli.status_cmd import cluster_status
from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.leadership import Leadership
from taskrun.controlplane.pki import PkiPaths
from taskrun.controlplane.store.postgres import PostgresStore
from taskrun.controlplane.store.postgres_lease import Deposed, LeaderLease
from taskrun.core.errors import StoreUnavailable
from taskrun.core.models import TaskSpec
from taskrun.core.status import TaskStatus
from taskrun.core.store import ChangeSet
from taskrun.servers import LEADER_METADATA
from taskrun.v1 import tasks_pb2, tasks_pb2_grpc
from tests.conftest import Cluster
from tests.unit.test_store_contract import make_run, make_task


async def until(predicate, within: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within):
        while not await predicate():
            await asyncio.sleep(0.02)


async def test_a_deposed_leader_cannot_write_a_single_row(postgres_url: str) -> None:
    reader = PostgresStore(postgres_url)
    await reader.open()  # creates the schema, with the lease row
    a = LeaderLease(postgres_url, "cp-a", "a:1", duration=0.3, version="test")
    b = LeaderLease(postgres_url, "cp-b", "b:1", duration=5.0, version="test")
    store_a = PostgresStore(postgres_url)
    a.install(store_a)
    await store_a.open()
    try:
        assert await a.try_acquire()
        assert not await b.try_acquire()  # a leads: b stands by
        await store_a.apply(ChangeSet(tasks=[make_task(1)], runs=[make_run(1, 1)]))

        await asyncio.sleep(0.4)  # a is paused past its lease: it does not renew
        assert await b.try_acquire()
        assert b.epoch == a.epoch + 1

        with pytest.raises(Deposed) as refused:
            await store_a.apply(ChangeSet(tasks=[make_task(2)]))
        assert "cp-b" in str(refused.value) and "b:1" in str(refused.value)
        assert await reader.get_task(make_task(2).id) is None  # not one row
        assert not await a.renew()
        with pytest.raises(StoreUnavailable):  # and it stays fenced
            await store_a.resume()
        assert await reader.get_task(make_task(1).id) is not None
    finally:
        for closing in (store_a.close(), reader.close(), a.close(), b.close()):
            await closing


async def test_a_takeover_waits_for_a_write_in_flight_and_then_fences_it_out(
    postgres_url: str,
) -> None:
    """The epoch check holds a share lock on the lease row until COMMIT: a takeover cannot slip
    between a leader's check and its commit."""
    reader = PostgresStore(postgres_url)
    await reader.open()
    a = LeaderLease(postgres_url, "cp-a", "a:1", duration=0.2, version="test")
    b = LeaderLease(postgres_url, "cp-b", "b:1", duration=5.0, version="test")
    store_a = PostgresStore(postgres_url)
    a.install(store_a)
    checked = asyncio.Event()
    release = asyncio.Event()
    guard = store_a.write_guard
    assert guard is not None

    async def slow_guard(conn):  # type: ignore[no-untyped-def]
        await guard(conn)
        checked.set()
        await release.wait()  # the write goes on after its check, while b tries to take over

    store_a.write_guard = slow_guard
    await store_a.open()
    try:
        assert await a.try_acquire()
        writing = asyncio.ensure_future(store_a.apply(ChangeSet(tasks=[make_task(1)])))
        await checked.wait()
        await asyncio.sleep(0.3)  # a's lease ran out meanwhile
        takeover = asyncio.ensure_future(b.try_acquire())
        await asyncio.sleep(0.3)
        assert not takeover.done()  # held back by the write in flight
        release.set()
        await writing  # the write that checked first commits...
        assert await takeover  # ...then b takes over, and sees it
        assert await reader.get_task(make_task(1).id) is not None
        with pytest.raises(Deposed):
            await store_a.apply(ChangeSet(tasks=[make_task(2)]))
    finally:
        release.set()
        for closing in (store_a.close(), reader.close(), a.close(), b.close()):
            await closing


def _config(pki: PkiPaths, store: str, port: int, public: int = 0) -> ServerConfig:
    return ServerConfig(
        listen=f"127.0.0.1:{port}",
        public_listen=f"127.0.0.1:{public}" if public else "",
        store=store,
        ca_cert=pki.ca_cert,
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        heartbeat_interval=0.5,
        lease_duration=3.0,
        lease_margin=0.2,
        leader_lease=1.0,
        retry_backoff_base=0.05,
    )


@contextlib.asynccontextmanager
async def control_plane(config: ServerConfig) -> AsyncIterator[tuple[Leadership, asyncio.Event]]:
    leadership = Leadership(config)
    stop = asyncio.Event()
    running = asyncio.create_task(leadership.run(stop))
    try:
        yield leadership, stop
    finally:
        stop.set()
        await running


def client_of(pki: PkiPaths, servers: str) -> Client:
    return Client(
        servers,
        ca=pki.ca_cert.read_bytes(),
        cert=pki.operator_cert.read_bytes(),
        key=pki.operator_key.read_bytes(),
        timeout=10,
    )


async def health_of(pki: PkiPaths, address: str) -> int:
    client = client_of(pki, address)
    async with client:
        reply = await health_pb2_grpc.HealthStub(client.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(reply.status)


async def test_a_worker_that_knows_only_the_standby_joins_the_leader(
    pki: PkiPaths, postgres_url: str, cluster: Cluster, reserve_port: Callable[..., int]
) -> None:
    port_a, port_b = reserve_port(), reserve_port()
    async with control_plane(_config(pki, postgres_url, port_a)) as (a, _):
        await until(lambda: _true(a.running is not None))
        async with control_plane(_config(pki, postgres_url, port_b)) as (b, _):
            await until(lambda: _true(b.lease.leader.holder == a.lease.id))
            daemon = await cluster.start_worker(
                "worker-1", wait=False, server=f"127.0.0.1:{port_b}"
            )

            async def joined() -> bool:
                return a.running is not None and "worker-1" in a.running.engine.sessions

            await until(joined)
            assert daemon.servers.current.target == f"127.0.0.1:{port_a}"
            await cluster.stop_worker("worker-1")


async def test_a_standby_names_the_leader_and_takes_over_when_it_stops(
    pki: PkiPaths, postgres_url: str, tmp_path: Path, reserve_port: Callable[..., int]
) -> None:
    port_a, port_b = reserve_port(), reserve_port()
    address_a, address_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    async with control_plane(_config(pki, postgres_url, port_a)) as (a, stop_a):
        await until(lambda: _true(a.running is not None))
        async with control_plane(_config(pki, postgres_url, port_b)) as (b, _):
            client = client_of(pki, address_b)  # it knows only the standby

            async def both_listed() -> bool:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    status = await cluster_status(client_of(pki, address_b))
                    return len(status.control_planes) == 2
                return False

            await until(both_listed)
            # the standby refuses, naming the leader in words and in metadata
            async with client_of(pki, address_b) as raw:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await tasks_pb2_grpc.TaskServiceStub(raw.channel).GetTask(
                        tasks_pb2.GetTaskRequest(task_id="tsk_x"), timeout=5
                    )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert address_a in (refused.value.details() or "")
            assert (LEADER_METADATA, address_a) in tuple(refused.value.trailing_metadata() or ())
            assert await health_of(pki, address_b) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await health_of(pki, address_a) == health_pb2.HealthCheckResponse.SERVING

            # the client follows the leader the standby named
            task = await client.create_task("echo", {"text": "hi"}, allow_unknown_agent=True)
            assert client.servers.current.target == address_a
            status = await cluster_status(client)
            assert status.store == "postgresql" and status.epoch == 1
            assert status.leader_id == a.lease.id and status.leader_address == address_a
            roles = {p.id: p.leader for p in status.control_planes}
            assert roles == {a.lease.id: True, b.lease.id: False}

            # the leader stops cleanly: it releases the lease and the standby takes over
            stop_a.set()
            await until(lambda: _true(b.running is not None))
            same, _ = await client.get_task(task.id)  # moved to b by itself
            assert same.id == task.id and same.status is TaskStatus.PENDING
            assert client.servers.current.target == address_b
            status = await cluster_status(client)
            assert status.epoch == 2 and status.leader_id == b.lease.id
            assert await health_of(pki, address_b) == health_pb2.HealthCheckResponse.SERVING
            await client.close()


async def test_a_worker_moves_on_from_a_control_plane_that_never_answers_within_seconds(
    cluster: Cluster,
) -> None:
    """A frozen control plane (SIGSTOP, a hung machine) still completes TCP handshakes in its
    kernel and never answers the TLS one: the worker gives up on it within seconds, not grpc's
    20 s (longer than its lease), and moves to the next address."""
    await cluster.start_server()
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(16)  # connections wait in the backlog: never accepted, never answered
        servers = f"127.0.0.1:{frozen.getsockname()[1]},{cluster.address}"
        await cluster.start_worker("worker-1", wait=False, server=servers)
        await cluster.wait_registered("worker-1")  # within 10 s
        daemon, _ = cluster.workers["worker-1"]
        assert daemon.servers.current.target == cluster.address
        await cluster.stop_worker("worker-1")


async def _true(value: bool) -> bool:
    return value


async def test_with_sqlite_the_one_control_plane_always_leads(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    status = await cluster_status(cluster.client())
    assert status.store == "sqlite" and status.epoch == 0
    assert status.leader_id == status.answered_by != ""
    assert [(p.leader, p.workers) for p in status.control_planes] == [(True, ["worker-1"])]


async def test_a_program_with_an_api_token_is_sent_to_the_leaders_public_listener(
    pki: PkiPaths, postgres_url: str, reserve_port: Callable[..., int]
) -> None:
    ports = [reserve_port() for _ in range(4)]
    async with control_plane(_config(pki, postgres_url, ports[0], ports[1])) as (a, _):
        await until(lambda: _true(a.running is not None))
        async with control_plane(_config(pki, postgres_url, ports[2], ports[3])) as (b, _):
            await until(lambda: _true(b.lease.leader.holder == a.lease.id))
            async with client_of(pki, f"127.0.0.1:{ports[0]}") as operator:
                token, _ = await operator.create_api_token("program", ["read"])
            program = Client(
                f"127.0.0.1:{ports[3]}",  # the standby's public listener
                ca=pki.ca_cert.read_bytes(),
                api_token=token,
                timeout=10,
            )
            async with program:
                listed, _ = await program.list_tasks()
                assert listed == []
                assert program.servers.current.target == f"127.0.0.1:{ports[1]}"


async def test_a_submission_to_the_standby_is_made_on_the_leader_it_names(
    pki: PkiPaths, postgres_url: str, reserve_port: Callable[..., int]
) -> None:
    """SubmitTasks is a stream, which the client does not repeat on its own: a standby's
    refusal (nothing was done) sends the request again to the leader it named."""
    port_a, port_b = reserve_port(), reserve_port()
    address_a, address_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    async with control_plane(_config(pki, postgres_url, port_a)) as (a, _):
        await until(lambda: _true(a.running is not None))
        async with control_plane(_config(pki, postgres_url, port_b)) as (b, _):
            await until(lambda: _true(b.lease.leader.holder == a.lease.id))
            async with client_of(pki, address_b) as client:  # it knows only the standby
                spec = TaskSpec(agent="echo", input='{"text": "hi"}')
                events = client.submit_and_follow(spec, allow_unknown_agent=True)
                async with contextlib.aclosing(events):
                    first = await anext(events)
                assert isinstance(first, TaskChanged) and first.task.status is TaskStatus.PENDING
                assert client.servers.current.target == address_a
                assert a.running is not None
                stored = await a.running.engine.store.get_task(first.task.id)
                assert stored is not None and len((await client.list_tasks())[0]) == 1
