"""Daily budgets at dispatch, usage totals, and a worker announcing what it can run on its live
session: a real control plane (SQLite file, mTLS) and a real worker daemon on loopback, the
`anthropic` agent against the fake Messages API."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from taskrun.cli.usage_cmd import get_usage, usage_text
from taskrun.core.agent import AgentResult, RunContext
from taskrun.core.models import AgentSpec
from taskrun.core.status import Fault, RunStatus, TaskStatus
from taskrun.v1 import tasks_pb2, tasks_pb2_grpc
from taskrun.worker.config import WorkerConfig
from taskrun.worker.daemon import WorkerDaemon
from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, Text
from tests.integration.test_metrics import scrape, value

KEY = "sk-ant-test-key"
# 12 input and 1 output tokens of claude-sonnet-5-5 cost $0.000034: the cap is reached by one run
CAP = 0.00003
RESEARCH = {"team": "research"}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as fake:
        fake.default = Text(["ok"])
        for name in list(os.environ):
            if name.startswith(("ANTHROPIC_", "TASKRUN_ANTHROPIC_", "CLAUDE_")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("TASKRUN_ANTHROPIC_MAX_RETRIES", "0")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        yield fake


async def pending_with_reason(client, task_id: str, needle: str) -> str:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(10):
        while True:
            task, _ = await client.get_task(task_id)
            if task.status is TaskStatus.PENDING and needle in task.waiting_reason:
                return str(task.waiting_reason)
            await asyncio.sleep(0.05)


async def test_a_daily_label_cap_makes_the_next_task_wait_with_its_reason(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    server = await cluster.start_server(
        label_budgets={"team=research": CAP}, metrics_listen="127.0.0.1:0"
    )
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()

    first = await client.create_task("anthropic", {"prompt": "a"}, labels=RESEARCH)
    done = await client.wait(first.id)
    assert done.status is TaskStatus.COMPLETED and done.usage.cost_usd > CAP

    second = await client.create_task("anthropic", {"prompt": "b"}, labels=RESEARCH)
    reason = await pending_with_reason(client, second.id, "daily budget")
    assert reason.startswith("the daily budget of label team=research is spent ($0.0000")
    assert reason.endswith("today, UTC); it waits for the next day")
    # other work goes on
    other = await client.create_task("anthropic", {"prompt": "c"}, labels={"team": "ops"})
    assert (await client.wait(other.id)).status is TaskStatus.COMPLETED
    _, runs = await client.get_task(second.id)
    assert [r.status for r in runs] == [RunStatus.PENDING]  # never dispatched
    assert len(api.message_requests) == 2

    report = await get_usage(client, 1)
    [budget] = report.budgets
    assert (budget.kind, budget.key, budget.reached) == ("label", "team=research", True)
    assert budget.spent_usd == pytest.approx(done.usage.cost_usd)
    [row] = report.rows  # both runs: same day, agent, model and worker
    assert (row.agent, row.model, row.worker_id, row.runs) == (
        "anthropic",
        "claude-sonnet-5-5",
        "worker-1",
        2,
    )
    text = usage_text(report)
    assert "team=research" in text and "reached" in text

    assert server.metrics_server is not None
    _, body = await scrape(server.metrics_server.port)
    spent = 'taskrun_budget_spent_usd{key="team=research",kind="label"}'
    assert value(body, spent) == pytest.approx(done.usage.cost_usd)
    assert value(body, 'taskrun_budget_limit_usd{key="team=research",kind="label"}') == CAP
    worker_cost = value(body, 'taskrun_worker_cost_usd_total{worker="worker-1"}')
    assert worker_cost == pytest.approx(report.rows[0].usage.cost_usd)
    assert value(body, 'taskrun_worker_quarantined{worker="worker-1"}') == 0

    # a restarted control plane still knows what was spent today (from the store)
    await cluster.stop_server()
    await cluster.start_server(label_budgets={"team=research": CAP})
    await cluster.wait_registered("worker-1")
    client = cluster.client()
    await pending_with_reason(client, second.id, "daily budget of label team=research")


async def test_a_queue_timeout_fails_a_task_held_back_by_a_budget(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    await cluster.start_server(schedule_budgets={"nightly": 0.0}, label_budgets={"a=b": 0.0})
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    task = await client.create_task(
        "anthropic", {"prompt": "a"}, labels={"a": "b"}, queue_timeout=0.5
    )
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert "queue timeout" in final.error
    assert api.message_requests == []


async def test_usage_days_out_of_range_is_refused_naming_the_field(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    stub = tasks_pb2_grpc.TaskServiceStub(client.channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetUsage(tasks_pb2.GetUsageRequest(days=400))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "days" in (refused.value.details() or "")
    assert (await stub.GetUsage(tasks_pb2.GetUsageRequest())).rows == []


async def test_a_worker_that_gets_its_key_later_announces_it_and_the_waiting_task_runs(
    api: FakeAnthropic, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic", "echo"], agent_check_interval=0.1)
    client = cluster.client()
    worker, _ = await client.get_worker("worker-1")
    [anthropic] = [a for a in worker.agents if a.name == "anthropic"]
    assert "no Anthropic credentials" in anthropic.unavailable_reason

    task = await client.create_task("anthropic", {"prompt": "later"})
    reason = await pending_with_reason(client, task.id, "can run")
    assert reason.startswith("no online worker can run agent 'anthropic' now (worker-1: no ")

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)  # the operator fixed the worker's environment
    final = await asyncio.wait_for(client.wait(task.id), 10)
    assert final.status is TaskStatus.COMPLETED, final.error
    worker, _ = await client.get_worker("worker-1")
    assert all(a.available for a in worker.agents)
    _, runs = await client.get_task(task.id)
    assert len(runs) == 1  # it was never sent to the worker while it could not run it


class Crashing:
    """A plugin whose SDK is broken on this worker: every run raises at once."""

    spec = AgentSpec(name="crashing")

    async def run(self, ctx: RunContext) -> AgentResult:
        raise RuntimeError("cannot import its SDK")


class Slow:
    """Never answers within the tasks' (short) timeouts."""

    spec = AgentSpec(name="slow")

    async def run(self, ctx: RunContext) -> AgentResult:
        await asyncio.sleep(60)
        return AgentResult()


async def test_timeouts_are_the_tasks_fault_and_crashes_the_workers(cluster: Cluster) -> None:
    await cluster.start_server(quarantine_after=2, quarantine_base=60)
    config = WorkerConfig(
        server=cluster.address,
        worker_id="worker-1",
        ca_cert=cluster.pki.ca_cert,
        cert=cluster.pki.worker_cert("worker-1"),
        key=cluster.pki.worker_key("worker-1"),
        reconnect_max_wait=0.5,
    )
    daemon = WorkerDaemon(config, {"slow": Slow(), "crashing": Crashing()})
    cluster.workers["worker-1"] = (daemon, asyncio.create_task(daemon.run()))
    await cluster.wait_registered("worker-1")
    client = cluster.client()

    for _ in range(3):  # the task's own limit, however fast: the worker stays in service
        task = await client.create_task("slow", {}, timeout=0.2)
        final = await client.wait(task.id)
        assert final.error == "timed out after 0.2s"
        _, [run] = await client.get_task(task.id)
        assert (run.status, run.fault) == (RunStatus.FAILED, Fault.TASK)
    worker, _ = await client.get_worker("worker-1")
    assert worker.quarantined_until is None and worker.consecutive_failures == 0

    for _ in range(2):  # an agent that crashes is the worker's problem
        task = await client.create_task("crashing", {})
        final = await client.wait(task.id)
        assert final.error == "RuntimeError: cannot import its SDK"
        _, [run] = await client.get_task(task.id)
        assert run.fault is Fault.WORKER
    worker, _ = await client.get_worker("worker-1")
    assert worker.quarantined_until is not None
    assert "RuntimeError: cannot import its SDK" in worker.quarantine_reason
