"""The HTTP API's and MCP's figures for scripts/bench: one call at a time over TLS, as a program
or an agent makes them (an agent's sub-task is an MCP `create_task` that waits for its result).

Against the latency figure's control plane, with an API token of the submit scope: GET
/v1/tasks/{id} of a finished echo task and GET /v1/tasks?page_size=50, a page of 50 finished
tasks (httpx), and MCP `create_task` of an echo task with `wait` (the `mcp` SDK's client over
streamable HTTP), each on one kept-alive connection. With
--compare-ref the sides take turns, a round of each at a time.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
from benchprocs import BenchError, operator_client
from mcp.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client

from taskrun.controlplane.pki import PkiPaths
from taskrun.core.models import TaskSpec

ROUNDS = 5  # turns per side; each a fifth of the calls
WARMUP = 20  # unmeasured calls of each kind per side, first
PAGE = 50  # tasks in the listed page (the API's default page)


@dataclass
class Reach:
    """Milliseconds, p50 over the calls, from sending each until its answer was read."""

    calls: int
    get_task_ms: float  # GET /v1/tasks/{id} of a finished echo task
    list_page_ms: float  # GET /v1/tasks?page_size=50, 50 finished echo tasks
    mcp_create_wait_ms: float  # MCP create_task(agent=echo, wait=true), until its result


@dataclass
class _Side:
    http: httpx.AsyncClient
    mcp: McpClient
    task_id: str
    get_s: list[float]
    list_s: list[float]
    mcp_s: list[float]


async def measure_reach(
    http_addresses: Sequence[str],
    grpc_addresses: Sequence[str],
    pki: PkiPaths,
    calls: int,
    profiles: Sequence[Callable[[], contextlib.AbstractAsyncContextManager[None]]] = (),
) -> list[Reach]:
    """The HTTP API's and MCP's round trips on each control plane, taking turns; each of
    `profiles` is entered around the measured calls (not the warm-up)."""
    tls = ssl.create_default_context(cafile=str(pki.ca_cert))
    tls.check_hostname = False  # the server certificate names localhost, the bench 127.0.0.1
    async with contextlib.AsyncExitStack() as stack:
        sides: list[_Side] = []
        for http_address, grpc_address in zip(http_addresses, grpc_addresses, strict=True):
            async with operator_client(grpc_address, pki) as admin:
                token, _ = await admin.create_api_token("bench-reach", ["submit"])
            headers = {"Authorization": f"Bearer {token}"}
            base = f"https://{http_address}"
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=base, verify=tls, headers=headers, timeout=30)
            )
            mcp_http = await stack.enter_async_context(
                httpx2.AsyncClient(verify=tls, headers=headers, timeout=30)
            )
            mcp = await stack.enter_async_context(
                McpClient(streamable_http_client(f"{base}/mcp", http_client=mcp_http))
            )
            task_id = (await _create_and_wait(mcp))["task_id"]
            async with operator_client(grpc_address, pki) as admin:
                echo = TaskSpec(agent="echo", input=json.dumps({"text": "x"}))
                for task in await admin.create_tasks([echo] * PAGE):
                    await admin.wait(task.id)
            sides.append(_Side(http, mcp, task_id, [], [], []))
        for side in sides:
            for _ in range(WARMUP):
                await _get(side)
                await _list(side)
                await _create_and_wait(side.mcp)
        for profile in profiles:
            await stack.enter_async_context(profile())
        for _ in range(ROUNDS):
            for side in sides:
                for _ in range(max(1, calls // ROUNDS)):
                    started = time.perf_counter()
                    await _get(side)
                    side.get_s.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await _list(side)
                    side.list_s.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await _create_and_wait(side.mcp)
                    side.mcp_s.append(time.perf_counter() - started)
    return [
        Reach(
            calls=len(side.get_s),
            get_task_ms=statistics.median(side.get_s) * 1000,
            list_page_ms=statistics.median(side.list_s) * 1000,
            mcp_create_wait_ms=statistics.median(side.mcp_s) * 1000,
        )
        for side in sides
    ]


async def _get(side: _Side) -> None:
    answer = await side.http.get(f"/v1/tasks/{side.task_id}")
    if answer.status_code != 200:
        raise BenchError(f"GET /v1/tasks/{side.task_id}: {answer.status_code} {answer.text}")


async def _list(side: _Side) -> None:
    answer = await side.http.get("/v1/tasks", params={"page_size": PAGE})
    if answer.status_code != 200 or len(answer.json()["tasks"]) != PAGE:
        raise BenchError(
            f"GET /v1/tasks?page_size={PAGE}: {answer.status_code} {answer.text[:300]}"
        )


async def _create_and_wait(mcp: McpClient) -> dict[str, Any]:
    result = await mcp.call_tool(
        "create_task", {"agent": "echo", "input": {"text": "x"}, "wait": True}
    )
    text = getattr(result.content[0], "text", "") if result.content else ""
    if result.is_error:
        raise BenchError(f"MCP create_task: {text}")
    summary: dict[str, Any] = json.loads(text)
    if summary.get("status") != "completed":
        raise BenchError(f"MCP create_task with wait answered {summary}")
    return summary
