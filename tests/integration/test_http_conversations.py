"""Conversations over the HTTP API: start one, send the next message and read the answer as
server-sent events, read it back with its turns, list and delete it. The `anthropic` agent runs
against the fake Messages API; the rest is real (control plane, worker, TLS, API tokens)."""

from __future__ import annotations

import pytest

from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, Text
from tests.integration.test_conversations import api as fake_api  # noqa: F401  (the fixture)
from tests.integration.test_http_api import api, assert_problem, sse_events

pytestmark = pytest.mark.usefixtures("fake_api")


async def test_a_conversation_is_started_continued_read_and_deleted_over_http(
    cluster: Cluster,
    fake_api: FakeAnthropic,  # noqa: F811
) -> None:
    fake_api.enqueue(Text("Noted: 7."), Text("It was 7."))
    async with api(cluster, "submit") as http:
        await cluster.start_worker("worker-1", agents=["anthropic"])
        created = await http.post(
            "/v1/conversations", json={"agent": "anthropic", "message": "Remember 7."}
        )
        assert created.status_code == 200, created.text
        conversation = created.json()
        first_task = conversation["turns"][0]["task_id"]
        assert (await cluster.client().wait(first_task)).status.name == "COMPLETED"

        async with http.stream(
            "POST",
            f"/v1/conversations/{conversation['id']}/messages",
            json={"message": "Which number?"},
        ) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            events = [event async for event in sse_events(answer)]
        kinds = [e.event for e in events]
        assert kinds[0] == "turn" and kinds[-1] == "end" and "update" in kinds
        ended = [e.json() for e in events if e.event == "turn"][-1]
        assert ended["index"] == 2 and ended["answer"] == "It was 7."
        streamed = "".join(
            chunk.get("data", "")
            for e in events
            if e.event == "update"
            for chunk in e.json().get("chunks", [])
        )
        assert streamed == "It was 7."
        # the model got the whole history
        assert "Remember 7." in str(fake_api.message_requests[-1].messages)

        read = (await http.get(f"/v1/conversations/{conversation['id']}")).json()
        assert [t["message"] for t in read["turns"]] == ["Remember 7.", "Which number?"]
        listed = (await http.get("/v1/conversations", params={"agent": "anthropic"})).json()
        assert [c["id"] for c in listed["conversations"]] == [conversation["id"]]

        deleted = await http.delete(f"/v1/conversations/{conversation['id']}")
        assert deleted.status_code == 200
        gone = await http.get(f"/v1/conversations/{conversation['id']}")
        assert_problem(gone, 404, "conversation_id")


async def test_a_message_to_a_missing_conversation_is_a_404_not_a_stream(
    cluster: Cluster,
) -> None:
    async with api(cluster, "submit") as http:
        response = await http.post(
            "/v1/conversations/cnv_00000000000000000000000000/messages", json={"message": "hi"}
        )
        assert_problem(response, 404, "conversation_id")
        empty = await http.post("/v1/conversations", json={"agent": "anthropic"})
        assert_problem(empty, 400)


async def test_reading_conversations_needs_only_read_but_sending_needs_submit(
    cluster: Cluster,
) -> None:
    async with api(cluster, "read") as reader:
        assert (await reader.get("/v1/conversations")).status_code == 200
        refused = await reader.post(
            "/v1/conversations", json={"agent": "anthropic", "message": "hi"}
        )
        assert_problem(refused, 403, "submit")
