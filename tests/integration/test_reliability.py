"""Reliability inside one process: timeouts, drain, durable cancellation, retries of lost runs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from structlog.testing import capture_logs

from taskrun.core.agent import AgentResult, RunContext
from taskrun.core.models import AgentSpec
from taskrun.core.status import RunStatus, TaskStatus, WorkerStatus
from taskrun.v1 import common_pb2, workers_pb2, workers_pb2_grpc
from taskrun.worker.agents import load_agents
from taskrun.worker.config import WorkerConfig
from taskrun.worker.daemon import WorkerDaemon
from tests.conftest import Cluster
from tests.integration.test_bad_input import channel


async def wait_for(predicate, within: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


class Stubborn:
    """A misbehaving agent that ignores cancellation (what the server backstop is for)."""

    spec = AgentSpec(name="echo")

    def __init__(self) -> None:
        self.released = asyncio.Event()

    async def run(self, ctx: RunContext) -> AgentResult:
        while True:
            try:
                await self.released.wait()
                return AgentResult()
            except asyncio.CancelledError:
                if self.released.is_set():
                    raise


async def test_queue_timeout_fails_a_task_no_worker_takes(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    task = await client.create_task(
        "nobody_runs_this", {}, queue_timeout=0.3, allow_unknown_agent=True
    )
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert "queue timeout" in final.error
    _, runs = await client.get_task(task.id)
    assert [r.status for r in runs] == [RunStatus.FAILED]


async def test_server_backstop_fails_a_run_the_worker_cannot_stop(cluster: Cluster) -> None:
    server = await cluster.start_server(timeout_backstop=0.3)
    config = WorkerConfig(
        server=cluster.address,
        worker_id="worker-1",
        ca_cert=cluster.pki.ca_cert,
        cert=cluster.pki.worker_cert("worker-1"),
        key=cluster.pki.worker_key("worker-1"),
    )
    agent = Stubborn()
    daemon = WorkerDaemon(config, {"echo": agent})
    runner = asyncio.create_task(daemon.run())
    try:
        await cluster.wait_registered("worker-1")
        client = cluster.client()
        task = await client.create_task("echo", {}, timeout=0.2)
        final = await client.wait(task.id)
        assert final.status is TaskStatus.FAILED
        assert "control plane stopped it" in final.error
        # the slot stays taken while the worker still holds the run
        assert server.engine.sessions["worker-1"].runs  # type: ignore[index]
    finally:
        agent.released.set()
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_drain_via_rpc_finishes_running_work_and_takes_no_more(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    running = await client.create_task("echo", {"text": "ab", "chunks": 2, "delay": 0.3})
    _, task = cluster.workers["worker-1"]
    await wait_for(lambda: bool(cluster.workers["worker-1"][0].runs))
    worker = await client.drain_worker("worker-1")
    assert worker.status is WorkerStatus.DRAINING
    later = await client.create_task("echo", {"text": "later"})
    assert await asyncio.wait_for(task, 10) == 0  # the worker exited by itself
    assert (await client.get_task(running.id))[0].status is TaskStatus.COMPLETED
    assert (await client.get_task(later.id))[0].status is TaskStatus.PENDING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.drain_worker("worker-1")
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.drain_worker("no-such-worker")
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


async def test_cancel_while_the_worker_is_away_reaches_it_when_it_returns(
    cluster: Cluster,
) -> None:
    """Durable cancellation: the server restarts; the cancel lands before the worker is back."""
    server = await cluster.start_server()
    daemon = await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "x" * 100, "chunks": 100, "delay": 0.05})
    await wait_for(lambda: bool(daemon.runs))
    await cluster.stop_server()
    server = await cluster.start_server()
    # the worker is reconnecting with backoff; cancel before it is back
    cancelled = await client.cancel_task(task.id, "stop it")
    assert cancelled.status is TaskStatus.CANCELLED
    await cluster.wait_registered("worker-1")
    await wait_for(lambda: not daemon.runs)  # the agent really stopped
    await wait_for(lambda: not server.engine.sessions["worker-1"].runs)  # type: ignore[index]
    task, runs = await client.get_task(task.id)
    assert task.status is TaskStatus.CANCELLED
    assert runs[0].status is RunStatus.CANCELLED


async def test_lost_run_is_retried_on_another_worker(cluster: Cluster) -> None:
    """A worker vanishes without a word (its task is cancelled, like a crash in-process)."""
    await cluster.start_server(heartbeat_interval=0.2, lease_duration=0.8)
    doomed = await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "abc", "chunks": 3, "delay": 0.2})
    await wait_for(lambda: bool(doomed.runs))
    _, runner = cluster.workers.pop("worker-1")
    runner.cancel()
    await cluster.start_worker("worker-2")
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED
    assert final.attempts == 2
    _, runs = await client.get_task(task.id)
    assert [(r.status, r.worker_id) for r in runs] == [
        (RunStatus.LOST, "worker-1"),
        (RunStatus.COMPLETED, "worker-2"),
    ]


async def test_lost_run_fails_the_task_after_max_attempts(cluster: Cluster) -> None:
    await cluster.start_server(heartbeat_interval=0.2, lease_duration=0.8)
    doomed = await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "a", "delay": 1, "chunks": 2}, max_attempts=1)
    await wait_for(lambda: bool(doomed.runs))
    _, runner = cluster.workers.pop("worker-1")
    runner.cancel()
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert "lost" in final.error and "attempt 1 of 1" in final.error


async def test_failed_run_is_retried_when_the_policy_says_so(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task(
        "echo", {"fail": "flaky"}, max_attempts=3, retry_on_failure=True
    )
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert final.attempts == 3
    _, runs = await client.get_task(task.id)
    assert [r.attempt for r in runs] == [1, 2, 3]
    assert all(r.status is RunStatus.FAILED and r.error == "flaky" for r in runs)


def test_load_agents_names_unknown_agents() -> None:
    with pytest.raises(ValueError, match="unknown agent"):
        load_agents(["definitely_not_installed"])


async def _session_assignments(
    stub: workers_pb2_grpc.RunServiceStub,
) -> tuple[grpc.aio.StreamStreamCall, list[workers_pb2.RunAssignment]]:
    """Open a raw worker-1 session that holds nothing; (call, the first assignments sent)."""
    call = stub.StreamConnect()
    hello = workers_pb2.WorkerHello(
        worker_id="worker-1", max_concurrent_runs=1, agents=[common_pb2.AgentSpec(name="echo")]
    )
    await call.write(workers_pb2.WorkerMessage(hello=hello))
    first = await call.read()
    assert first.HasField("params")
    async with asyncio.timeout(10):
        while True:
            message = await call.read()
            if message.assignments:
                return call, list(message.assignments)


async def test_an_assignment_the_worker_may_never_have_read_is_sent_again_on_its_next_session(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    client = cluster.client()
    task = await client.create_task("echo", {"text": "hi"}, allow_unknown_agent=True)
    async with channel(cluster, "worker-1") as ch:
        stub = workers_pb2_grpc.RunServiceStub(ch)
        first, sent = await _session_assignments(stub)
        # the worker moves to a new session whose hello does not list the run (it never read it)
        second, again = await _session_assignments(stub)
        first.cancel()
        second.cancel()
    assert [(a.task_id, a.attempt) for a in sent] == [(task.id, 1)]
    assert [(a.run_id, a.attempt) for a in again] == [(sent[0].run_id, 1)]  # same run, not lost
    _, runs = await client.get_task(task.id)
    assert [r.status for r in runs] == [RunStatus.ASSIGNED]


async def test_a_stopping_control_plane_neither_takes_workers_back_nor_gives_up_their_runs(
    cluster: Cluster,
) -> None:
    """Between the engine's stop and the listener closing, a kicked worker comes back at once.
    The stopping control plane refuses it (UNAVAILABLE: try again) instead of starting a session
    nobody would end (it held the stop for the whole grace), and it never declares the run lost
    while it stops, however long that takes: the next control plane finds the run where it was."""
    server = await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "ab", "chunks": 2, "delay": 60})
    await wait_for(lambda: bool(cluster.workers["worker-1"][0].runs))

    with capture_logs() as logs:
        await server.engine.stop()
        # the worker retries every 0.1-0.25 s; the lease (2 s) plus margin runs out meanwhile
        await asyncio.sleep(3.0)
        assert server.engine.sessions == {}
        await cluster.stop_server()
    lost = [e for e in logs if e["event"] == "run ended without success"]
    assert lost == []
    refused = [e for e in logs if "UNAVAILABLE: the control plane is shutting down" in str(e)]
    assert refused, "the worker came back and was told to try again"

    # Stopping took longer than the lease, so the worker stopped the run itself. The next
    # control plane hears that from it and starts the second attempt (none was started twice).
    await cluster.start_server()
    await cluster.wait_registered("worker-1")
    _, runs = await client.get_task(task.id)
    assert [(r.attempt, r.status) for r in runs][:1] == [(1, RunStatus.CANCELLED)]
    assert "worker's lease ran out" in runs[0].error
    assert [r.attempt for r in runs] == [1, 2]
