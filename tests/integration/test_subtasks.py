"""Agents orchestrating agents: a run of a task that allows sub-tasks gets the MCP server with a
credential of its own. A real control plane (SQLite, HTTP API with the MCP server) and real
workers; the `probe` agent hands the test the credential its run was given, holds its run until
told, and reports the cost its input names, so the test plays the agent's part with the MCP SDK's
own client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import grpc
import pytest

from taskrun.core.agent import AgentResult, RunContext, SubtaskAccess
from taskrun.core.models import AgentSpec, Usage
from taskrun.core.status import RunStatus, TaskStatus
from taskrun.worker.agents import load_agents
from taskrun.worker.config import WorkerConfig
from taskrun.worker.daemon import WorkerDaemon
from tests.conftest import Cluster
from tests.integration.test_http_api import http_client, start_http
from tests.integration.test_mcp import error_text, mcp_client, structured


@dataclass
class Probe:
    """An agent that publishes each run's SubtaskAccess (by task id) and ends when released."""

    spec: AgentSpec = field(
        default_factory=lambda: AgentSpec(
            "probe",
            "holds its run until the test releases it",
            input_schema=json.dumps({"type": "object"}),
        )
    )
    access: dict[str, SubtaskAccess | None] = field(default_factory=dict)
    released: dict[str, asyncio.Event] = field(default_factory=dict)
    started: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self, ctx: RunContext) -> AgentResult:
        release = self.released.setdefault(ctx.task_id, asyncio.Event())
        async with self.started:
            self.access[ctx.task_id] = ctx.subtasks
            self.started.notify_all()
        if "spend" in ctx.input:  # spent on the way, known to the server only when the run ends
            await ctx.report_usage(Usage(cost_usd=float(ctx.input["spend"])))
        if ctx.input.get("hold", True):
            await release.wait()
        return AgentResult({"ok": True}, usage=Usage(cost_usd=float(ctx.input.get("cost", 0))))

    async def running(self, task_id: str) -> SubtaskAccess | None:
        async with asyncio.timeout(15), self.started:
            await self.started.wait_for(lambda: task_id in self.access)
        return self.access[task_id]

    async def credential(self, task_id: str) -> SubtaskAccess:
        access = await self.running(task_id)
        assert access is not None, "the run was given no MCP server"
        return access

    def release(self, task_id: str) -> None:
        self.released.setdefault(task_id, asyncio.Event()).set()


async def start_probe_worker(
    cluster: Cluster, probe: Probe, worker_id: str = "worker-1", capacity: int = 8
) -> None:
    config = WorkerConfig.model_validate(
        {
            "server": cluster.address,
            "worker_id": worker_id,
            "agents": ["echo"],
            "ca_cert": cluster.pki.ca_cert,
            "cert": cluster.pki.worker_cert(worker_id),
            "key": cluster.pki.worker_key(worker_id),
            "reconnect_max_wait": 0.5,
            "capacity": capacity,
            "workspace_root": cluster.tmp.with_name(f"{cluster.tmp.name}-ws") / worker_id,
        }
    )
    agents: dict[str, Any] = {**load_agents(["echo"]), "probe": probe}
    daemon = WorkerDaemon(config, agents)
    cluster.workers[worker_id] = (daemon, asyncio.create_task(daemon.run()))
    await cluster.wait_registered(worker_id)


async def setup(cluster: Cluster, **settings: object) -> tuple[str, Probe]:
    settings = {"http_listen": "127.0.0.1:0", "public_listen": "", **settings}
    server = await cluster.start_server(**settings)
    base = f"https://127.0.0.1:{server.http_port}"
    probe = Probe()
    await start_probe_worker(cluster, probe)
    return base, probe


async def ended(cluster: Cluster, task_id: str) -> Any:
    return await cluster.client().wait(task_id)


async def test_a_run_credential_creates_reads_and_cancels_only_its_own_sub_tasks(
    cluster: Cluster,
) -> None:
    base, probe = await setup(cluster)
    await cluster.start_worker("worker-2")  # echo: where the sub-tasks run
    admin = cluster.client()
    other = await admin.create_task("echo", {"text": "not yours"})
    parent = await admin.create_task("probe", {}, allow_subtasks=True)
    access = await probe.credential(parent.id)
    assert access.url == f"{base}/mcp"
    assert access.token.startswith("trr_") and access.ca_file == cluster.pki.ca_cert
    assert probe.access.get(other.id) is None
    async with mcp_client(cluster, base, access.token) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == {"create_task", "get_task", "wait_for_task", "cancel_task"} | {
            "run_echo",
            "run_probe",
        }
        child = structured(
            await client.call_tool(
                "create_task", {"agent": "echo", "input": {"text": "hi"}, "wait": True}
            )
        )
        assert child["status"] == "completed" and child["runs"][0]["worker_id"] == "worker-2"
        _, _, below = await admin.get_task_tree(parent.id)
        assert [(t.id, t.parent_task_id, t.root_task_id, t.depth) for t in below] == [
            (child["task_id"], parent.id, parent.id, 1)
        ]
        again = structured(await client.call_tool("get_task", {"task_id": child["task_id"]}))
        assert again["status"] == "completed"
        # nothing else: another task is "not found", as are tools beyond the four
        hidden = error_text(await client.call_tool("get_task", {"task_id": other.id}))
        assert "NOT_FOUND" in hidden and f"among the sub-tasks of task {parent.id}" in hidden
        refused = error_text(await client.call_tool("cancel_task", {"task_id": other.id}))
        assert "NOT_FOUND" in refused
        for name in ("list_workers", "list_agents", "start_conversation", "create_schedule"):
            denied = error_text(await client.call_tool(name, {}))
            assert denied.startswith("PERMISSION_DENIED") and "sub-tasks" in denied
        slow = structured(
            await client.call_tool("run_echo", {"input": {"text": "ab", "chunks": 2, "delay": 30}})
        )
        structured(await client.call_tool("cancel_task", {"task_id": slow["task_id"]}))
        assert (await ended(cluster, slow["task_id"])).status is TaskStatus.CANCELLED
    # the same credential over the HTTP API: no list, and what it creates is a sub-task
    async with http_client(cluster, base, access.token) as http:
        listed = await http.get("/v1/tasks")
        assert listed.status_code == 403 and "sub-tasks" in listed.json()["detail"]
        made = await http.post("/v1/tasks", json={"agent": "echo", "input_json": "{}"})
        assert made.status_code == 201, made.text
        assert made.json()["task"]["parent_task_id"] == parent.id
        assert (await http.get(f"/v1/tasks/{other.id}")).status_code == 404
        assert (await http.get("/v1/workers")).status_code == 403
    assert (await admin.get_task(other.id))[0].status is not TaskStatus.CANCELLED
    # the credential dies with its run
    probe.release(parent.id)
    assert (await ended(cluster, parent.id)).status is TaskStatus.COMPLETED
    async with http_client(cluster, base, access.token) as http:
        after = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert after.status_code == 401 and "run has ended" in after.json()["detail"]
    runs = (await admin.get_task(parent.id))[1]
    assert runs[0].status is RunStatus.COMPLETED
    stored_run = await cluster.server.engine.store.get_run(runs[0].id)  # type: ignore[union-attr]
    assert stored_run is not None and len(stored_run.credential_hash) == 64
    assert access.token.split(".")[1] not in stored_run.credential_hash


async def test_the_credential_dies_when_its_worker_dies_and_the_run_is_lost(
    cluster: Cluster,
) -> None:
    base, probe = await setup(cluster)
    admin = cluster.client()
    parent = await admin.create_task("probe", {}, allow_subtasks=True, max_attempts=1)
    access = await probe.credential(parent.id)
    _, task = cluster.workers.pop("worker-1")
    task.cancel()  # the worker dies without a word; its lease runs out
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await ended(cluster, parent.id)).status is TaskStatus.FAILED
    (run,) = (await admin.get_task(parent.id))[1]
    assert run.status is RunStatus.LOST
    async with http_client(cluster, base, access.token) as http:
        after = await http.post("/v1/tasks", json={"agent": "echo", "input_json": "{}"})
        assert after.status_code == 401


async def test_sub_tasks_nest_only_as_deep_as_the_server_allows(cluster: Cluster) -> None:
    base, probe = await setup(cluster, max_subtask_depth=2)
    admin = cluster.client()
    root = await admin.create_task("probe", {}, allow_subtasks=True)
    level = root.id
    for depth in (1, 2):
        async with mcp_client(cluster, base, (await probe.credential(level)).token) as client:
            made = structured(
                await client.call_tool(
                    "create_task", {"agent": "probe", "input": {}, "allow_subtasks": True}
                )
            )
        level = made["task_id"]
        task = (await admin.get_task(level))[0]
        assert (task.depth, task.root_task_id) == (depth, root.id)
    async with mcp_client(cluster, base, (await probe.credential(level)).token) as client:
        deep = error_text(
            await client.call_tool("create_task", {"agent": "echo", "input": {"text": "x"}})
        )
    assert deep.startswith("RESOURCE_EXHAUSTED")
    assert "at most 2 levels" in deep and "max_subtask_depth" in deep
    _, _, below = await admin.get_task_tree(root.id)
    assert [t.depth for t in below] == [1, 2]


async def test_the_tree_budget_counts_sub_tasks_and_their_cost(cluster: Cluster) -> None:
    base, probe = await setup(cluster)
    admin = cluster.client()
    by_count = await admin.create_task("probe", {}, allow_subtasks=True, max_subtasks=2)
    async with mcp_client(cluster, base, (await probe.credential(by_count.id)).token) as client:
        for _ in range(2):
            structured(
                await client.call_tool(
                    "create_task", {"agent": "echo", "input": {"text": "x"}, "wait": True}
                )
            )
        third = error_text(
            await client.call_tool("create_task", {"agent": "echo", "input": {"text": "x"}})
        )
    assert third.startswith("RESOURCE_EXHAUSTED")
    assert "at most 2 sub-tasks" in third and "max_subtasks" in third
    assert len((await admin.list_tasks(parent_task_id=by_count.id))[0]) == 2


async def test_a_sub_task_that_spends_the_budget_fails_the_pending_ones_and_stops_new_ones(
    cluster: Cluster,
) -> None:
    # two slots: the parent and one sub-task run, a second sub-task waits in the queue
    base = await start_http(cluster)
    probe = Probe()
    await start_probe_worker(cluster, probe, capacity=2)
    admin = cluster.client()
    parent = await admin.create_task("probe", {}, allow_subtasks=True, subtask_budget_usd=0.5)
    async with mcp_client(cluster, base, (await probe.credential(parent.id)).token) as client:
        spender = structured(
            await client.call_tool("create_task", {"agent": "probe", "input": {"cost": 0.75}})
        )
        assert await probe.running(spender["task_id"]) is None  # no sub-tasks of its own
        queued = structured(
            await client.call_tool("create_task", {"agent": "probe", "input": {"hold": False}})
        )
        assert queued["status"] == "pending"
        probe.release(spender["task_id"])
        spent = structured(await client.call_tool("wait_for_task", {"task_id": spender["task_id"]}))
        assert spent["status"] == "completed" and spent["cost_usd"] == 0.75
        stopped = structured(
            await client.call_tool("wait_for_task", {"task_id": queued["task_id"]})
        )
        assert stopped["status"] == "failed"
        assert "spent $0.7500 of their budget of $0.5" in stopped["error"]
        assert stopped["runs"][0]["worker_id"] == ""  # never ran
        refused = error_text(
            await client.call_tool("create_task", {"agent": "echo", "input": {"text": "x"}})
        )
    assert refused.startswith("RESOURCE_EXHAUSTED") and "subtask_budget_usd" in refused
    done = (await admin.get_task(spender["task_id"]))[0]
    failed = (await admin.get_task(queued["task_id"]))[0]
    assert done.finished_at is not None and failed.finished_at is not None
    assert failed.finished_at >= done.finished_at
    assert probe.access.get(queued["task_id"]) is None


async def test_a_sub_task_that_spends_the_budget_stops_the_running_ones_not_the_root(
    cluster: Cluster,
) -> None:
    base, probe = await setup(cluster)
    admin = cluster.client()
    root = await admin.create_task("probe", {}, allow_subtasks=True, subtask_budget_usd=0.5)
    async with mcp_client(cluster, base, (await probe.credential(root.id)).token) as client:
        holder = structured(await client.call_tool("create_task", {"agent": "probe", "input": {}}))
        spender = structured(
            await client.call_tool("create_task", {"agent": "probe", "input": {"cost": 0.75}})
        )
        await probe.running(holder["task_id"])
        await probe.running(spender["task_id"])
        probe.release(spender["task_id"])
        stopped = structured(
            await client.call_tool("wait_for_task", {"task_id": holder["task_id"]})
        )
    assert stopped["status"] == "cancelled"
    assert "spent $0.7500 of their budget of $0.5" in stopped["error"]
    spent = (await admin.get_task(spender["task_id"]))[0]
    held, runs = await admin.get_task(holder["task_id"])
    assert spent.status is TaskStatus.COMPLETED and spent.finished_at is not None
    assert held.finished_at is not None and held.finished_at >= spent.finished_at
    async with asyncio.timeout(10):  # the worker was told, and its agent really stopped
        while runs[0].status is not RunStatus.CANCELLED or holder["task_id"] in {
            r.assignment.task_id for r in cluster.workers["worker-1"][0].runs.values()
        }:
            await asyncio.sleep(0.05)
            _, runs = await admin.get_task(holder["task_id"])
    assert not probe.released.get(holder["task_id"], asyncio.Event()).is_set()
    assert (await admin.get_task(root.id))[0].status is TaskStatus.RUNNING  # the root goes on
    probe.release(root.id)
    assert (await ended(cluster, root.id)).status is TaskStatus.COMPLETED


async def test_what_a_cancelled_sub_task_spent_counts_in_the_tree_budget(cluster: Cluster) -> None:
    base, probe = await setup(cluster)
    admin = cluster.client()
    root = await admin.create_task("probe", {}, allow_subtasks=True, subtask_budget_usd=0.5)
    async with mcp_client(cluster, base, (await probe.credential(root.id)).token) as client:
        spender = structured(
            await client.call_tool("create_task", {"agent": "probe", "input": {"spend": 0.75}})
        )
        other = structured(await client.call_tool("create_task", {"agent": "probe", "input": {}}))
        await probe.running(spender["task_id"])
        await probe.running(other["task_id"])
        await admin.cancel_task(spender["task_id"], reason="changed my mind")
        stopped = structured(await client.call_tool("wait_for_task", {"task_id": other["task_id"]}))
        refused = error_text(
            await client.call_tool("create_task", {"agent": "echo", "input": {"text": "x"}})
        )
    assert stopped["status"] == "cancelled"
    assert "spent $0.7500 of their budget of $0.5" in stopped["error"]
    assert refused.startswith("RESOURCE_EXHAUSTED") and "subtask_budget_usd" in refused
    cancelled = (await admin.get_task(spender["task_id"]))[0]
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.usage.cost_usd == 0.75
    assert (await admin.get_task(root.id))[0].status is TaskStatus.RUNNING


async def test_cancelling_a_parent_cancels_its_whole_tree_in_one_change(cluster: Cluster) -> None:
    base, probe = await setup(cluster)
    await cluster.start_worker("worker-2")
    admin = cluster.client()
    root = await admin.create_task("probe", {}, allow_subtasks=True)
    async with mcp_client(cluster, base, (await probe.credential(root.id)).token) as client:
        middle = structured(
            await client.call_tool(
                "create_task", {"agent": "probe", "input": {}, "allow_subtasks": True}
            )
        )
    async with mcp_client(cluster, base, (await probe.credential(middle["task_id"])).token) as c:
        leaf = structured(
            await c.call_tool("run_echo", {"input": {"text": "ab", "chunks": 2, "delay": 30}})
        )
        done = structured(await c.call_tool("run_echo", {"input": {"text": "quick"}, "wait": True}))
    assert done["status"] == "completed"
    await admin.cancel_task(root.id, reason="enough")
    ids = [root.id, middle["task_id"], leaf["task_id"]]
    tasks = [await ended(cluster, i) for i in ids]
    assert [t.status for t in tasks] == [TaskStatus.CANCELLED] * 3
    assert len({t.finished_at for t in tasks}) == 1  # one change set, one moment
    assert tasks[2].error == f"cancelled with task {root.id}: enough"
    assert (await admin.get_task(done["task_id"]))[0].status is TaskStatus.COMPLETED
    _, _, below = await admin.get_task_tree(root.id)
    assert {t.id for t in below} == {middle["task_id"], leaf["task_id"], done["task_id"]}
    # the agents really stopped: their runs are cancelled, not still running
    for task_id in ids:
        (run,) = (await admin.get_task(task_id))[1]
        assert run.status is RunStatus.CANCELLED


class SubtaskBudget(TypedDict, total=False):
    """A sub-task budget, as keyword arguments of Client.create_task."""

    max_subtasks: int
    subtask_budget_usd: float


async def test_allow_subtasks_needs_the_http_api_and_budgets_need_allow_subtasks(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    admin = cluster.client()
    with pytest.raises(grpc.aio.AioRpcError) as no_http:
        await admin.create_task("echo", {}, allow_subtasks=True)
    assert no_http.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "policy.allow_subtasks" in (no_http.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as bare_budget:
        await admin.create_task("echo", {}, max_subtasks=3)
    assert bare_budget.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "policy.max_subtasks" in (bare_budget.value.details() or "")
    bad_budgets = (
        ("max_subtasks", SubtaskBudget(max_subtasks=-1)),
        ("subtask_budget_usd", SubtaskBudget(subtask_budget_usd=float("nan"))),
    )
    for name, budget in bad_budgets:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await admin.create_task("echo", {}, allow_subtasks=True, **budget)
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"policy.{name}" in (bad.value.details() or "")
    assert (await admin.list_tasks())[0] == []


async def test_the_http_api_creates_a_task_that_allows_sub_tasks(cluster: Cluster) -> None:
    base, probe = await setup(cluster)
    token, _ = await cluster.client().create_api_token("ci", ["submit"])
    async with http_client(cluster, base, token) as http:
        made = await http.post(
            "/v1/tasks",
            json={
                "agent": "probe",
                "input_json": "{}",
                "policy": {"allow_subtasks": True, "max_subtasks": 1},
            },
        )
        assert made.status_code == 201, made.text
        task_id = made.json()["task"]["id"]
        access = await probe.credential(task_id)
        async with mcp_client(cluster, base, access.token) as client:
            child = structured(
                await client.call_tool("run_probe", {"input": {"hold": False}, "wait": True})
            )
        listed = await http.get("/v1/tasks", params={"parent_task_id": task_id})
        assert [t["id"] for t in listed.json()["tasks"]] == [child["task_id"]]
        got = (await http.get(f"/v1/tasks/{task_id}")).json()
        assert [t["id"] for t in got["subtasks"]] == [child["task_id"]]
    probe.release(task_id)


async def test_the_cli_creates_with_a_budget_lists_by_parent_and_shows_the_tree(
    cluster: Cluster,
) -> None:
    from tests.integration.test_access_cli import json_of, run_cli

    base, probe = await setup(cluster)
    await cluster.start_worker("worker-2")
    code, out, err = await run_cli(
        cluster,
        "task",
        "create",
        "probe",
        "--allow-subtasks",
        "--max-subtasks",
        "5",
        "--subtask-budget-usd",
        "2.5",
        "--output",
        "json",
    )
    assert code == 0, err
    root = json.loads(out)
    assert root["policy"]["allow_subtasks"] is True
    assert (root["policy"]["max_subtasks"], root["policy"]["subtask_budget_usd"]) == (5, 2.5)
    async with mcp_client(cluster, base, (await probe.credential(root["id"])).token) as client:
        middle = structured(
            await client.call_tool(
                "create_task",
                {"agent": "probe", "input": {"cost": 0.25}, "allow_subtasks": True},
            )
        )
    async with mcp_client(cluster, base, (await probe.credential(middle["task_id"])).token) as c:
        leaf = structured(await c.call_tool("run_echo", {"input": {"text": "leaf"}, "wait": True}))
    probe.release(middle["task_id"])
    await ended(cluster, middle["task_id"])
    listed = await json_of(cluster, "task", "list", "--parent", root["id"])
    assert [t["id"] for t in listed["tasks"]] == [middle["task_id"]]
    assert listed["tasks"][0]["parent_task_id"] == root["id"]
    code, shown, err = await run_cli(cluster, "task", "get", root["id"])
    assert code == 0, err
    tree = shown[shown.index("Sub-tasks:") :].splitlines()
    assert tree[1].split()[:3] == [root["id"], "probe", "running"]
    assert tree[2].split()[:5] == ["└─", middle["task_id"], "probe", "completed", "$0.2500"]
    assert tree[3].split()[:5] == ["└─", leaf["task_id"], "echo", "completed", "$0.0000"]
    assert "sub-tasks: 2, their cost $0.2500 (budget: at most 5, $2.5)" in tree[4]
    assert "allowed (at most 5, budget $2.5 for the tree)" in shown
    got = await json_of(cluster, "task", "get", root["id"])
    assert [(t["id"], t["depth"]) for t in got["subtasks"]] == [
        (middle["task_id"], 1),
        (leaf["task_id"], 2),
    ]
    assert "credential_hash" not in got["runs"][0]
    probe.release(root["id"])


async def test_the_tui_shows_the_tree_below_a_task_with_status_and_cost(cluster: Cluster) -> None:
    from taskrun.cli.tui.app import TaskRunApp
    from taskrun.cli.tui.screens import RunScreen
    from tests.integration.test_tui import SIZE, until

    base, probe = await setup(cluster)
    admin = cluster.client()
    root = await admin.create_task("probe", {}, allow_subtasks=True, max_subtasks=3)
    async with mcp_client(cluster, base, (await probe.credential(root.id)).token) as client:
        child = structured(
            await client.call_tool("create_task", {"agent": "probe", "input": {"cost": 0.5}})
        )
    await probe.running(child["task_id"])
    app = TaskRunApp(admin)
    async with app.run_test(size=SIZE) as pilot:
        screen = RunScreen(admin, root.id)
        await app.push_screen(screen)
        panel = screen.query_one("#subtasks")

        def shown() -> str:
            return str(panel.render())

        await until(pilot.pause, lambda: child["task_id"] in shown())
        assert screen.has_class("tree") and "running" in shown()
        probe.release(child["task_id"])
        await until(pilot.pause, lambda: "$0.5000" in shown())
        assert "completed" in shown() and "budget: at most 3" in shown()
    probe.release(root.id)


async def test_a_restart_keeps_the_run_credential_and_the_trees_count(
    cluster: Cluster, reserve_port: Callable[..., int]
) -> None:
    port = reserve_port()  # the HTTP port stays the same across the restart
    base, probe = await setup(cluster, http_listen=f"127.0.0.1:{port}")
    await cluster.start_worker("worker-2")
    admin = cluster.client()
    root = await admin.create_task("probe", {}, allow_subtasks=True, max_subtasks=2)
    token = (await probe.credential(root.id)).token
    echo = {"agent": "echo", "input": {"text": "x"}, "wait": True}
    async with mcp_client(cluster, base, token) as client:
        structured(await client.call_tool("create_task", echo))
    await cluster.stop_server()
    await cluster.start_server(http_listen=f"127.0.0.1:{port}", public_listen="")
    await cluster.wait_registered("worker-1")  # it reclaims the probe's run
    async with mcp_client(cluster, base, token) as client:
        second = structured(await client.call_tool("create_task", echo))
        assert second["status"] == "completed"
        third = error_text(await client.call_tool("create_task", echo))
    assert third.startswith("RESOURCE_EXHAUSTED") and "has 2" in third
    probe.release(root.id)
    assert (await ended(cluster, root.id)).status is TaskStatus.COMPLETED
