"""The HTTP API: a real control plane with its HTTP listener on loopback (real TLS), a real
worker running the echo agent, and httpx as the curl-equivalent client."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskrun.controlplane.pki import PkiPaths, issue_server_cert
from tests.conftest import Cluster
from tests.integration.test_security import cert_serial, presented_serial


@dataclass
class Sse:
    event: str = "message"
    data: str = ""
    id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.data)


async def sse_events(response: httpx.Response) -> AsyncIterator[Sse]:
    """Parse a text/event-stream body into events (comments skipped)."""
    current = Sse()
    async for line in response.aiter_lines():
        if line == "":
            if current.data or current.event != "message":
                yield current
            current = Sse()
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                current.event = value
            elif name == "data":
                current.data += value
            elif name == "id":
                current.id = value


async def start_http(cluster: Cluster) -> str:
    server = await cluster.start_server(http_listen="127.0.0.1:0", public_listen="")
    return f"https://127.0.0.1:{server.http_port}"


def http_client(cluster: Cluster, base: str, token: str | None) -> httpx.AsyncClient:
    tls = ssl.create_default_context(cafile=str(cluster.pki.ca_cert))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=base, verify=tls, headers=headers, timeout=10)


@asynccontextmanager
async def api(cluster: Cluster, scope: str = "admin") -> AsyncIterator[httpx.AsyncClient]:
    base = await start_http(cluster)
    token, _ = await cluster.client().create_api_token(f"http-{scope}", [scope])
    async with http_client(cluster, base, token) as client:
        yield client


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    for word in words:
        assert word in json.dumps(body), body
    assert "Traceback" not in response.text
    return body


# --- tasks -------------------------------------------------------------------------------------


async def test_a_task_created_over_http_is_followed_to_its_end_as_server_sent_events(
    cluster: Cluster,
) -> None:
    async with api(cluster, "submit") as client:
        await cluster.start_worker("worker-1")
        text = "hello over http"
        created = await client.post(
            "/v1/tasks",
            json={
                "agent": "echo",
                "allow_unknown_agent": True,
                "input_json": json.dumps({"text": text, "chunks": 3}),
            },
        )
        assert created.status_code == 201, created.text
        assert created.json()["created"] is True
        task_id = created.json()["task"]["id"]
        output, statuses = "", []
        async with client.stream("GET", f"/v1/tasks/{task_id}/follow") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event in sse_events(response):
                if event.event == "end":
                    break
                assert event.event == "update"
                update = event.json()
                output += "".join(c["data"] for c in update["chunks"])
                if update.get("task"):
                    statuses.append(update["task"]["status"])
        assert output == text
        assert statuses[-1] == "TASK_STATUS_COMPLETED"
        got = (await client.get(f"/v1/tasks/{task_id}")).json()
        assert got["status"] == "TASK_STATUS_COMPLETED"
        assert json.loads(got["result_json"]) == {"chars": len(text), "chunks": 3}
        assert [r["worker_id"] for r in got["runs"]] == ["worker-1"]
        stored = (await client.get(f"/v1/tasks/{task_id}/output")).json()
        assert "".join(c["data"] for c in stored["chunks"]) == text


async def test_a_follower_that_reconnects_with_last_event_id_loses_and_repeats_nothing(
    cluster: Cluster,
) -> None:
    async with api(cluster, "read") as reader:
        await cluster.start_worker("worker-1")
        text = "abcdefghijklmnopqrst"
        task = await cluster.client().create_task(
            "echo", {"text": text, "chunks": 20, "delay": 0.05}
        )
        received: list[str] = []
        last_id = None
        async with reader.stream("GET", f"/v1/tasks/{task.id}/follow") as response:
            async for event in sse_events(response):
                chunks = event.json()["chunks"]
                received += [c["data"] for c in chunks]
                last_id = event.id
                if len(received) >= 5:
                    break  # the connection drops mid-task
        assert last_id is not None and 5 <= len(received) < 20
        headers = {"Last-Event-ID": last_id}
        async with reader.stream("GET", f"/v1/tasks/{task.id}/follow", headers=headers) as response:
            first = True
            async for event in sse_events(response):
                if event.event == "end":
                    break
                update = event.json()
                if first:  # the resumed stream starts with the task as it is now
                    assert update["task"]["id"] == task.id
                    first = False
                received += [c["data"] for c in update["chunks"]]
        assert "".join(received) == text
        assert len(received) == 20


async def test_a_bad_last_event_id_is_a_400_naming_it(cluster: Cluster) -> None:
    async with api(cluster, "read") as reader:
        task = await cluster.client().create_task("echo", {"text": "x"}, allow_unknown_agent=True)
        response = await reader.get(
            f"/v1/tasks/{task.id}/follow", headers={"Last-Event-ID": "%%not-a-cursor%%"}
        )
        body = assert_problem(response, 400, "not an event id")
        assert body["field"] == "Last-Event-ID"


async def test_tasks_are_listed_with_the_grpc_filters_and_pages(cluster: Cluster) -> None:
    async with api(cluster, "submit") as client:
        ids = []
        for n in range(3):
            body = {
                "agent": "echo",
                "allow_unknown_agent": True,
                "input_json": "{}",
                "labels": {"team": f"t{n % 2}"},
            }
            ids.append((await client.post("/v1/tasks", json=body)).json()["task"]["id"])
        page = (await client.get("/v1/tasks", params={"page_size": 2})).json()
        assert [t["id"] for t in page["tasks"]] == ids[::-1][:2]
        rest = (
            await client.get(
                "/v1/tasks", params={"page_size": 2, "page_token": page["next_page_token"]}
            )
        ).json()
        assert [t["id"] for t in rest["tasks"]] == [ids[0]] and rest["next_page_token"] == ""
        labelled = (await client.get("/v1/tasks", params={"label": "team=t0"})).json()
        assert {t["id"] for t in labelled["tasks"]} == {ids[0], ids[2]}
        pending = (await client.get("/v1/tasks", params={"status": "pending"})).json()
        assert len(pending["tasks"]) == 3
        done = (await client.get("/v1/tasks", params={"status": "completed"})).json()
        assert done["tasks"] == []


async def test_create_many_validates_all_first_and_creates_none_when_one_is_bad(
    cluster: Cluster,
) -> None:
    async with api(cluster, "submit") as client:
        good = {"agent": "echo", "allow_unknown_agent": True, "input_json": "{}"}
        bad = {"agent": "echo", "allow_unknown_agent": True, "input_json": "[1]"}
        response = await client.post("/v1/tasks/batch", json={"tasks": [good, bad]})
        body = assert_problem(response, 400)
        assert body["field"] == "tasks[1].input_json"
        assert (await client.get("/v1/tasks")).json()["tasks"] == []
        ok = await client.post("/v1/tasks/batch", json={"tasks": [good, good]})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 2


async def test_cancel_over_http_cancels_a_running_task(cluster: Cluster) -> None:
    async with api(cluster, "submit") as client:
        await cluster.start_worker("worker-1")
        body = {
            "agent": "echo",
            "allow_unknown_agent": True,
            "input_json": json.dumps({"text": "ab", "chunks": 2, "delay": 30}),
        }
        task_id = (await client.post("/v1/tasks", json=body)).json()["task"]["id"]
        cancelled = await client.post(f"/v1/tasks/{task_id}/cancel", json={"reason": "enough"})
        assert cancelled.status_code == 200, cancelled.text
        async with client.stream("GET", f"/v1/tasks/{task_id}/follow") as response:
            statuses = [
                e.json()["task"]["status"]
                async for e in sse_events(response)
                if e.event == "update" and e.json().get("task")
            ]
        assert statuses[-1] == "TASK_STATUS_CANCELLED"
        again = await client.post(f"/v1/tasks/{task_id}/cancel", json={})
        assert again.status_code in (200, 412), again.text


# --- refusals ----------------------------------------------------------------------------------


async def test_no_token_is_401_and_a_read_token_cannot_submit_403(cluster: Cluster) -> None:
    base = await start_http(cluster)
    admin = cluster.client()
    async with http_client(cluster, base, None) as anonymous:
        response = await anonymous.post(
            "/v1/tasks", json={"agent": "echo", "allow_unknown_agent": True}
        )
        assert_problem(response, 401, "no credentials")
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await anonymous.get("/v1/healthz")).status_code == 200
        assert (await anonymous.get("/v1/openapi.json")).status_code == 200
    async with http_client(cluster, base, "tra_0123456789abcdef.nope") as wrong:
        assert_problem(await wrong.get("/v1/tasks"), 401)
    token, info = await admin.create_api_token("viewer", ["read"])
    async with http_client(cluster, base, token) as reader:
        assert (await reader.get("/v1/tasks")).status_code == 200
        body = {"agent": "echo", "allow_unknown_agent": True, "input_json": "{}"}
        assert_problem(await reader.post("/v1/tasks", json=body), 403, "submit")
        await admin.revoke_api_token(info.token_id)
        assert_problem(await reader.get("/v1/tasks"), 401, "revoked")
    assert (await admin.list_tasks())[0] == []


async def test_bad_input_is_a_400_naming_the_field_and_stores_nothing(cluster: Cluster) -> None:
    async with api(cluster, "submit") as client:
        cases: list[tuple[Any, str]] = [
            ({"agent": "", "input_json": "{}"}, "agent"),
            (
                {"agent": "echo", "allow_unknown_agent": True, "input_json": "not json"},
                "input_json",
            ),
            (
                {"agent": "echo", "allow_unknown_agent": True, "input_json": "{}", "agnet": "x"},
                "agnet",
            ),
            (
                {"agent": "echo", "allow_unknown_agent": True, "policy": {"priority": "high"}},
                "policy.priority",
            ),
        ]
        for body, named in cases:
            response = await client.post("/v1/tasks", json=body)
            problem = assert_problem(response, 400)
            assert named in (problem.get("field") or ""), problem
        raw = await client.post(
            "/v1/tasks", content=b"{oops", headers={"content-type": "application/json"}
        )
        assert_problem(raw, 400, "not JSON")
        assert_problem(await client.post("/v1/tasks", json=[1]), 400, "JSON object")
        assert_problem(await client.get("/v1/tasks", params={"page_size": 5000}), 400, "page_size")
        assert_problem(await client.get("/v1/tasks", params={"colour": "red"}), 400, "colour")
        assert_problem(await client.get("/v1/tasks", params={"status": "sleepy"}), 400)
        assert_problem(await client.get("/v1/tasks", params={"label": "novalue"}), 400, "label")
        assert (await client.get("/v1/tasks")).json()["tasks"] == []


async def test_not_found_conflict_precondition_and_size_limits(cluster: Cluster) -> None:
    async with api(cluster, "submit") as client:
        assert_problem(await client.get("/v1/tasks/t-missing"), 404, "task_id")
        assert_problem(await client.get("/v1/tasks/t-missing/follow"), 404, "task_id")
        assert_problem(await client.get("/v1/workers/nobody"), 404, "worker_id")
        assert_problem(await client.get("/v1/nothing-here"), 404)
        body = {
            "agent": "echo",
            "allow_unknown_agent": True,
            "input_json": "{}",
            "policy": {"idempotency_key": "k1"},
        }
        first = await client.post("/v1/tasks", json=body)
        assert first.status_code == 201
        same = await client.post("/v1/tasks", json=body)
        assert same.status_code == 200 and same.json()["created"] is False
        other = {**body, "input_json": '{"text": "different"}'}
        assert_problem(await client.post("/v1/tasks", json=other), 409, "idempotency")
        task_id = first.json()["task"]["id"]
        assert_problem(
            await client.post(f"/v1/tasks/{task_id}/continue", json={"prompt": "more"}), 412
        )
        huge = {
            "agent": "echo",
            "allow_unknown_agent": True,
            "input_json": json.dumps({"text": "x" * (9 * 1024 * 1024)}),
        }
        assert_problem(await client.post("/v1/tasks", json=huge), 413)


# --- workers, schedules, events ----------------------------------------------------------------


async def test_workers_are_listed_with_their_agents_and_input_schemas(cluster: Cluster) -> None:
    async with api(cluster, "read") as reader:
        await cluster.start_worker("worker-1")
        workers = (await reader.get("/v1/workers")).json()["workers"]
        assert [w["id"] for w in workers] == ["worker-1"]
        (echo,) = workers[0]["agents"]
        assert echo["name"] == "echo"
        assert json.loads(echo["input_schema_json"])["properties"]["text"]["type"] == "string"
        one = (await reader.get("/v1/workers/worker-1")).json()
        assert one["status"] == "WORKER_STATUS_ONLINE"
        online = await reader.get("/v1/workers", params={"status": "online"})
        assert len(online.json()["workers"]) == 1


async def test_workers_show_which_agents_are_unavailable_and_why_and_usage_is_served(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    async with api(cluster, "read") as reader:
        await cluster.start_worker("worker-1", agents=["echo", "anthropic"])
        one = (await reader.get("/v1/workers/worker-1")).json()
        agents = {a["name"]: a for a in one["agents"]}
        assert agents["echo"]["unavailable_reason"] == ""
        assert "no Anthropic credentials" in agents["anthropic"]["unavailable_reason"]
        assert one["consecutive_failures"] == 0 and one["quarantine_reason"] == ""
        usage = (await reader.get("/v1/usage", params={"days": "3"})).json()
        assert usage == {"rows": [], "budgets": [], "next_page_token": ""}
        assert_problem(await reader.get("/v1/usage", params={"days": "999"}), 400, "days")


async def test_schedules_are_created_read_updated_paused_and_deleted(cluster: Cluster) -> None:
    async with api(cluster, "submit") as client:
        await cluster.start_worker("worker-1")
        schedule = {
            "name": "nightly",
            "agent": "echo",
            "input_json": "{}",
            "cron": "0 3 * * *",
            "timezone": "Europe/Chisinau",
        }
        created = await client.post("/v1/schedules", json={"schedule": schedule})
        assert created.status_code == 200, created.text
        assert created.json()["next_fire_time"]
        again = await client.post("/v1/schedules", json={"schedule": schedule})
        assert_problem(again, 409, "nightly")
        bad = await client.post(
            "/v1/schedules", json={"schedule": {**schedule, "name": "x2", "cron": "nope"}}
        )
        assert assert_problem(bad, 400)["field"] == "schedule.cron"
        listed = (await client.get("/v1/schedules")).json()["schedules"]
        assert [s["name"] for s in listed] == ["nightly"]
        patched = await client.patch(
            "/v1/schedules/nightly",
            json={"schedule": {"cron": "0 4 * * *"}, "update_mask": "cron"},
        )
        assert patched.status_code == 200, patched.text
        assert (await client.get("/v1/schedules/nightly")).json()["cron"] == "0 4 * * *"
        paused = (await client.post("/v1/schedules/nightly/pause")).json()
        assert paused["paused"] is True
        preview = await client.get("/v1/schedules/nightly/preview", params={"count": 2})
        assert len(preview.json()["fire_times"]) == 2
        assert (await client.delete("/v1/schedules/nightly")).status_code == 200
        assert_problem(await client.get("/v1/schedules/nightly"), 404)


async def test_the_event_stream_carries_committed_task_changes(cluster: Cluster) -> None:
    async with api(cluster, "read") as reader:
        admin = cluster.client()
        params = {"kind": "task_changed"}
        async with reader.stream("GET", "/v1/events", params=params) as response:
            assert response.status_code == 200
            task = await admin.create_task("echo", {"text": "x"}, allow_unknown_agent=True)
            async for event in sse_events(response):
                assert event.event == "EVENT_KIND_TASK_CHANGED"
                got = event.json()["task"]
                assert got["id"] == task.id and got["status"] == "TASK_STATUS_PENDING"
                break
        bad = await reader.get("/v1/events", params={"kind": "nonsense"})
        assert_problem(bad, 400)


# --- the document ------------------------------------------------------------------------------


async def test_the_served_openapi_document_is_the_checked_in_one(cluster: Cluster) -> None:
    from pathlib import Path

    base = await start_http(cluster)
    async with http_client(cluster, base, None) as anonymous:
        served = (await anonymous.get("/v1/openapi.json")).json()
    checked_in = Path(__file__).parents[2] / "docs" / "openapi.json"
    assert served == json.loads(checked_in.read_text()), (
        "docs/openapi.json is stale: "
        "python -m taskrun.controlplane.http.openapi > docs/openapi.json"
    )
    assert "/v1/tasks/{task_id}/follow" in served["paths"]
    assert served["paths"]["/v1/tasks"]["post"]["operationId"] == "createTask"


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:99999"])
async def test_a_bad_http_address_stops_the_server_with_a_clear_error(
    cluster: Cluster, address: str
) -> None:
    with pytest.raises(OSError, match="HTTP API"):
        await cluster.start_server(http_listen=address, public_listen="")


async def test_a_follower_whose_token_is_revoked_gets_an_error_event_and_the_stream_ends(
    cluster: Cluster,
) -> None:
    base = await start_http(cluster)
    admin = cluster.client()
    await cluster.start_worker("worker-1")
    token, info = await admin.create_api_token("watcher", ["read"])
    task = await admin.create_task(
        "echo", {"text": "ab", "chunks": 2, "delay": 30}, allow_unknown_agent=True
    )
    async with (
        http_client(cluster, base, token) as reader,
        reader.stream("GET", f"/v1/tasks/{task.id}/follow") as response,
    ):
        events = sse_events(response)
        first = await anext(events)
        assert first.event == "update"
        await admin.revoke_api_token(info.token_id)
        error = await anext(events)
        while error.event == "update":  # the run may start (a status change) before the revoke
            error = await anext(events)
        assert error.event == "error"
        assert error.json()["status"] == 401 and "revoked" in error.json()["detail"]
        with pytest.raises(StopAsyncIteration):
            await anext(events)


async def test_a_rotated_server_certificate_reaches_new_http_connections_without_a_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    copy = PkiPaths.at(Path(shutil.copytree(cluster.pki.directory, tmp_path / "pki-copy")))
    server = await cluster.start_server(
        http_listen="127.0.0.1:0",
        public_listen="",
        server_cert=copy.server_cert,
        server_key=copy.server_key,
    )
    before = await asyncio.to_thread(presented_serial, server.http_port, cluster.pki)
    assert before == cert_serial(copy.server_cert)
    issue_server_cert(copy.directory)
    after = await asyncio.to_thread(presented_serial, server.http_port, cluster.pki)
    assert after == cert_serial(copy.server_cert) != before
    base = f"https://127.0.0.1:{server.http_port}"
    async with http_client(cluster, base, None) as client:
        assert (await client.get("/v1/healthz")).status_code == 200


async def test_an_idle_stream_gets_keepalive_comments_and_ends_when_the_server_stops(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskrun.controlplane.http import api as http_api

    monkeypatch.setattr(http_api, "KEEPALIVE", 0.05)
    async with api(cluster, "read") as reader:
        await cluster.start_worker("worker-1")
        task = await cluster.client().create_task(
            "echo", {"text": "ab", "chunks": 2, "delay": 30}, allow_unknown_agent=True
        )
        lines: list[str] = []
        async with reader.stream("GET", f"/v1/tasks/{task.id}/follow") as response:
            stream = response.aiter_lines()
            while lines.count(": keepalive") < 2:
                lines.append(await anext(stream))
            stopping = asyncio.create_task(cluster.stop_server())
            async with asyncio.timeout(5):  # not the 2 s graceful timeout per stream, nor hung
                rest = [line async for line in stream]
            await stopping
        error = rest[rest.index("event: error") + 1]
        assert json.loads(error.removeprefix("data: "))["status"] == 503


async def test_boolean_query_parameters_read_true_and_false_and_refuse_anything_else(
    cluster: Cluster,
) -> None:
    async with api(cluster, "read") as reader:
        await cluster.start_worker("worker-1")
        params = {"snapshot": "true", "kind": ["worker_connected", "snapshot_end"]}
        async with reader.stream("GET", "/v1/events", params=params) as response:
            assert response.status_code == 200
            events = sse_events(response)
            first, second = await anext(events), await anext(events)
        assert first.event == "EVENT_KIND_WORKER_CONNECTED" and first.json()["snapshot"] is True
        assert first.json()["worker"]["id"] == "worker-1"
        assert second.event == "EVENT_KIND_SNAPSHOT_END"
        task = await cluster.client().create_task("echo", {"text": "x"}, allow_unknown_agent=True)
        await cluster.client().wait(task.id)
        with_events = await reader.get(
            f"/v1/tasks/{task.id}/output", params={"include_events": "false"}
        )
        assert with_events.status_code == 200
        bad = await reader.get("/v1/events", params={"snapshot": "maybe"})
        assert assert_problem(bad, 400, "maybe")["field"] == "snapshot"


async def test_a_model_named_in_the_input_that_no_worker_offers_is_a_400_naming_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-never-used")  # the agent is ready, unused
    monkeypatch.delenv("TASKRUN_ANTHROPIC_MODELS", raising=False)
    monkeypatch.setenv("TASKRUN_ANTHROPIC_MODEL", "claude-sonnet-5-5")
    async with api(cluster, "submit") as client:
        await cluster.start_worker("worker-1", agents=["anthropic"])
        body = {"agent": "anthropic", "input_json": '{"prompt": "x", "model": "claude-opus-9"}'}
        problem = assert_problem(await client.post("/v1/tasks", json=body), 400, "claude-opus-9")
        assert problem.get("field") == "input_json.model", problem
        assert "anthropic/claude-sonnet-5-5" in problem["detail"]
        assert (await client.get("/v1/tasks")).json()["tasks"] == []
