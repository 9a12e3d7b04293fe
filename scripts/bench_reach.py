"""The HTTP API's and MCP's figures for scripts/bench: one call at a time over TLS, as a program
or an agent makes them (an agent's sub-task is an MCP `create_task` that waits for its result).

Against the latency figure's control plane, with an API token of the submit scope: GET
/v1/tasks/{id} of a finished echo task and GET /v1/tasks?page_size=50, a page of 50 finished
tasks (httpx), and MCP `create_task` of an echo task with `wait` (the `mcp` SDK's client over
streamable HTTP), each on one kept-alive connection. Each kind of call is made in a block of
its own per round, so the server's CPU per call is measured for each kind. With
--compare-ref the sides take turns, a round of each at a time.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
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
    # The server process's CPU seconds per call of each kind; None where /proc is not there.
    get_task_cpu_s: float | None = None
    list_page_cpu_s: float | None = None
    mcp_create_wait_cpu_s: float | None = None


@dataclass
class _Side:
    http: httpx.AsyncClient
    mcp: McpClient
    task_id: str
    server_cpu: Callable[[], float | None]
    seconds: dict[str, list[float]] = field(default_factory=dict)  # by kind, each call's
    cpu: dict[str, float | None] = field(default_factory=dict)  # by kind, the server's in all


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


async def _mcp(side: _Side) -> None:
    await _create_and_wait(side.mcp)


KINDS: dict[str, Callable[[_Side], Awaitable[None]]] = {"get": _get, "list": _list, "mcp": _mcp}


async def measure_reach(
    http_addresses: Sequence[str],
    grpc_addresses: Sequence[str],
    pki: PkiPaths,
    calls: int,
    server_cpu: Sequence[Callable[[], float | None]],
    profiles: Sequence[Callable[[], contextlib.AbstractAsyncContextManager[None]]] = (),
) -> list[Reach]:
    """The HTTP API's and MCP's round trips on each control plane, taking turns; `server_cpu`
    reads each control plane's CPU seconds, and each of `profiles` is entered around the
    measured calls (not the warm-up)."""
    tls = ssl.create_default_context(cafile=str(pki.ca_cert))
    tls.check_hostname = False  # the server certificate names localhost, the bench 127.0.0.1
    async with contextlib.AsyncExitStack() as stack:
        sides: list[_Side] = []
        for http_address, grpc_address, cpu in zip(
            http_addresses, grpc_addresses, server_cpu, strict=True
        ):
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
            sides.append(_Side(http, mcp, task_id, cpu))
        for side in sides:
            for call in KINDS.values():
                for _ in range(WARMUP):
                    await call(side)
        for profile in profiles:
            await stack.enter_async_context(profile())
        for _ in range(ROUNDS):
            for side in sides:
                for kind, call in KINDS.items():
                    await _block(side, kind, call, max(1, calls // ROUNDS))
    return [_reach(side) for side in sides]


async def _block(side: _Side, kind: str, call: Callable[[_Side], Awaitable[None]], n: int) -> None:
    """`n` calls of one kind, one at a time, with the server's CPU around them."""
    seconds = side.seconds.setdefault(kind, [])
    before = side.server_cpu()
    for _ in range(n):
        started = time.perf_counter()
        await call(side)
        seconds.append(time.perf_counter() - started)
    after = side.server_cpu()
    spent = side.cpu.setdefault(kind, 0.0)
    if spent is None or before is None or after is None:
        side.cpu[kind] = None
    else:
        side.cpu[kind] = spent + after - before


def _reach(side: _Side) -> Reach:
    def p50_ms(kind: str) -> float:
        return statistics.median(side.seconds[kind]) * 1000

    def per_call(kind: str) -> float | None:
        spent = side.cpu.get(kind)
        return None if spent is None else spent / len(side.seconds[kind])

    return Reach(
        calls=len(side.seconds["get"]),
        get_task_ms=p50_ms("get"),
        list_page_ms=p50_ms("list"),
        mcp_create_wait_ms=p50_ms("mcp"),
        get_task_cpu_s=per_call("get"),
        list_page_cpu_s=per_call("list"),
        mcp_create_wait_cpu_s=per_call("mcp"),
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
