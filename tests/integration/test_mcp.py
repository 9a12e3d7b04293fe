"""The MCP server at /mcp: the official SDK's own client over streamable HTTP (real TLS, a bearer
token) against a real control plane with a real worker running the echo agent."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import mcp.types as mt
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import Cluster
from tests.integration.test_http_api import assert_problem, start_http


@asynccontextmanager
async def mcp_client(cluster: Cluster, base: str, token: str) -> AsyncIterator[Client]:
    tls = ssl.create_default_context(cafile=str(cluster.pki.ca_cert))
    http = httpx2.AsyncClient(verify=tls, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    async with http, Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
        yield client


def structured(result: mt.CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    value: dict[str, Any] = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert result.structured_content == value
    return value


def error_text(result: mt.CallToolResult) -> str:
    assert result.is_error
    text: str = result.content[0].text  # type: ignore[union-attr]
    return text


async def test_the_sdk_client_lists_tools_with_the_agents_own_schemas(cluster: Cluster) -> None:
    base = await start_http(cluster)
    await cluster.start_worker("worker-1")
    token, _ = await cluster.client().create_api_token("assistant", ["submit"])
    async with mcp_client(cluster, base, token) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert {
            "create_task",
            "get_task",
            "wait_for_task",
            "cancel_task",
            "list_workers",
            "list_agents",
            "create_schedule",
            "run_echo",
        } <= set(tools)
        echo = tools["run_echo"]
        assert "Streams its input text back" in (echo.description or "")
        text_schema = echo.input_schema["properties"]["input"]["properties"]["text"]
        assert text_schema == {"type": "string", "description": "what to send back"}
        agents = structured(await client.call_tool("list_agents", {}))["agents"]
        assert [a["name"] for a in agents] == ["echo"]
        assert agents[0]["input_schema"]["additionalProperties"] is False
        workers = structured(await client.call_tool("list_workers", {}))["workers"]
        assert [(w["worker_id"], w["status"], w["agents"]) for w in workers] == [
            ("worker-1", "online", ["echo"])
        ]


async def test_a_task_created_with_wait_returns_its_result_and_cost(cluster: Cluster) -> None:
    base = await start_http(cluster)
    await cluster.start_worker("worker-1")
    token, _ = await cluster.client().create_api_token("assistant", ["submit"])
    async with mcp_client(cluster, base, token) as client:
        done = structured(
            await client.call_tool(
                "create_task",
                {
                    "agent": "echo",
                    "input": {"text": "hi mcp"},
                    "labels": {"via": "mcp"},
                    "wait": True,
                },
            )
        )
        assert done["status"] == "completed"
        assert done["result"] == {"chars": 6, "chunks": 1}
        assert done["cost_usd"] == 0.0 and done["labels"] == {"via": "mcp"}
        assert [r["worker_id"] for r in done["runs"]] == ["worker-1"]
        # the per-agent tool, without waiting, then wait_for_task
        started = structured(
            await client.call_tool("run_echo", {"input": {"text": "later", "delay": 0.1}})
        )
        assert started["status"] in ("pending", "running")
        waited = structured(
            await client.call_tool("wait_for_task", {"task_id": started["task_id"]})
        )
        assert waited["status"] == "completed" and waited["result"]["chars"] == 5
        got = structured(await client.call_tool("get_task", {"task_id": started["task_id"]}))
        assert got["status"] == "completed"
    stored = (await cluster.client().get_task(done["task_id"]))[0]
    assert stored.labels == {"via": "mcp"}


async def test_wait_seconds_bounds_the_wait_and_never_the_creation(cluster: Cluster) -> None:
    base = await start_http(cluster)
    await cluster.start_worker("worker-1")
    token, _ = await cluster.client().create_api_token("assistant", ["submit"])
    slow = {"text": "ab", "chunks": 2, "delay": 0.5}
    async with mcp_client(cluster, base, token) as client:
        for seconds in (0, 0.2):
            args = {"agent": "echo", "input": slow, "wait": True, "wait_seconds": seconds}
            left = structured(await client.call_tool("create_task", args))
            assert left["status"] in ("pending", "running")
            assert left["waited"] == f"still {left['status']} after {seconds:g}s"
            done = structured(await client.call_tool("wait_for_task", {"task_id": left["task_id"]}))
            assert done["status"] == "completed" and done["result"] == {"chars": 2, "chunks": 2}
            assert [r["status"] for r in done["runs"]] == ["completed"]


async def test_cancel_and_schedule_tools_act_on_the_control_plane(cluster: Cluster) -> None:
    base = await start_http(cluster)
    await cluster.start_worker("worker-1")
    token, _ = await cluster.client().create_api_token("assistant", ["submit"])
    async with mcp_client(cluster, base, token) as client:
        slow = structured(
            await client.call_tool(
                "create_task", {"agent": "echo", "input": {"text": "ab", "chunks": 2, "delay": 30}}
            )
        )
        cancelled = structured(
            await client.call_tool("cancel_task", {"task_id": slow["task_id"], "reason": "no"})
        )
        assert cancelled["task_id"] == slow["task_id"]
        ended = structured(
            await client.call_tool(
                "wait_for_task", {"task_id": slow["task_id"], "wait_seconds": 20}
            )
        )
        assert ended["status"] == "cancelled"
        schedule = structured(
            await client.call_tool(
                "create_schedule",
                {"name": "daily-brief", "agent": "echo", "cron": "0 8 * * *", "timezone": "UTC"},
            )
        )
        assert schedule["name"] == "daily-brief" and schedule["next_fire_time"]
    assert [s.name for s in await cluster.client().list_schedules()] == ["daily-brief"]


async def test_tool_errors_name_the_problem_and_scopes_bind_as_over_grpc(cluster: Cluster) -> None:
    base = await start_http(cluster)
    await cluster.start_worker("worker-1")
    admin = cluster.client()
    reader_token, _ = await admin.create_api_token("viewer", ["read"])
    async with mcp_client(cluster, base, reader_token) as client:
        refused = error_text(
            await client.call_tool("create_task", {"agent": "echo", "input": {"text": "x"}})
        )
        assert refused.startswith("PERMISSION_DENIED") and "'submit'" in refused
        missing = error_text(await client.call_tool("get_task", {"task_id": "t-nope"}))
        assert missing.startswith("NOT_FOUND") and "task_id" in missing
    submit_token, _ = await admin.create_api_token("assistant", ["submit"])
    async with mcp_client(cluster, base, submit_token) as client:
        bad_input = error_text(
            await client.call_tool("create_task", {"agent": "echo", "input": {"colour": "red"}})
        )
        assert bad_input.startswith("INVALID_ARGUMENT") and "input_json" in bad_input
        bad_labels = error_text(
            await client.call_tool("create_task", {"agent": "echo", "labels": {"n": 1}})
        )
        assert bad_labels.startswith("labels:")
    assert (await admin.list_tasks())[0] == []


async def test_mcp_without_a_token_is_refused_before_the_sdk(cluster: Cluster) -> None:
    base = await start_http(cluster)
    tls = ssl.create_default_context(cafile=str(cluster.pki.ca_cert))
    async with httpx.AsyncClient(base_url=base, verify=tls) as anonymous:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        assert_problem(await anonymous.post("/mcp", json=body), 401, "no credentials")
