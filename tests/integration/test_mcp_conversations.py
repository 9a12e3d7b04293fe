"""The MCP server's conversation tools with the SDK's own client (streamable HTTP, real TLS, a
bearer token), a real control plane and worker; the `anthropic` agent answers from the fake
Messages API."""

from __future__ import annotations

import pytest

from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, Text
from tests.integration.test_conversations import api as fake_api  # noqa: F401  (the fixture)
from tests.integration.test_http_api import start_http
from tests.integration.test_mcp import error_text, mcp_client, structured

pytestmark = pytest.mark.usefixtures("fake_api")


async def test_conversation_tools_carry_the_agents_schemas_and_only_conversational_agents(
    cluster: Cluster,
) -> None:
    base = await start_http(cluster)
    await cluster.start_worker("worker-1", agents=["anthropic", "echo"])
    token, _ = await cluster.client().create_api_token("assistant", ["submit"])
    async with mcp_client(cluster, base, token) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert {"start_conversation", "send_message", "get_conversation", "chat_anthropic"} <= set(
            tools
        )
        assert "chat_echo" not in tools  # its input takes no prompt: it cannot hold a turn
        start = tools["start_conversation"].input_schema["properties"]
        assert start["agent"]["enum"] == ["anthropic"]
        chat = tools["chat_anthropic"]
        assert "Anthropic" in (chat.description or "") or "anthropic" in (chat.description or "")
        options = chat.input_schema["properties"]["options"]
        assert "prompt" not in options["properties"]
        assert options["properties"]["max_tokens"]["maximum"] == 128000
        assert options["additionalProperties"] is False
        assert chat.input_schema["properties"]["message"]["description"] == "the user message"


async def test_a_conversation_is_started_continued_and_read_with_answers_and_cost(
    cluster: Cluster,
    fake_api: FakeAnthropic,  # noqa: F811
) -> None:
    base = await start_http(cluster)
    await cluster.start_worker("worker-1", agents=["anthropic"])
    token, _ = await cluster.client().create_api_token("assistant", ["submit"])
    fake_api.enqueue(Text("Noted: 7."), Text("It was 7."))
    async with mcp_client(cluster, base, token) as client:
        started = structured(
            await client.call_tool(
                "chat_anthropic",
                {"message": "Remember 7.", "options": {"max_tokens": 50}, "labels": {"k": "v"}},
            )
        )
        conversation_id = started["conversation_id"]
        assert started["agent"] == "anthropic" and started["labels"] == {"k": "v"}
        assert started["last_turn"]["status"] == "completed"
        assert started["last_turn"]["answer"] == "Noted: 7."
        assert started["last_turn"]["cost_usd"] > 0
        answered = structured(
            await client.call_tool(
                "send_message", {"conversation_id": conversation_id, "message": "Which number?"}
            )
        )
        assert [t["answer"] for t in answered["turns"]] == ["Noted: 7.", "It was 7."]
        assert answered["cost_usd"] == pytest.approx(sum(t["cost_usd"] for t in answered["turns"]))
        assert "Remember 7." in str(fake_api.message_requests[-1].messages)
        assert fake_api.message_requests[-1].body["max_tokens"] == 50
        read = structured(
            await client.call_tool("get_conversation", {"conversation_id": conversation_id})
        )
        assert read["turn_count"] == 2 and read["turns"] == answered["turns"]
        # not waiting: the new turn is there, its task pending or running
        fake_api.enqueue(Text("Later."))
        queued = structured(
            await client.call_tool(
                "send_message",
                {"conversation_id": conversation_id, "message": "And now?", "wait": False},
            )
        )
        assert queued["last_turn"]["index"] == 3
        done = await cluster.client().wait(queued["last_turn"]["task_id"])
        assert done.status.name == "COMPLETED"
        # errors name the field, and the servicer's own checks apply
        missing = error_text(
            await client.call_tool("send_message", {"conversation_id": "cnv_nope", "message": "x"})
        )
        assert "NOT_FOUND" in missing and "conversation_id" in missing
        empty = error_text(
            await client.call_tool("start_conversation", {"agent": "anthropic", "message": " "})
        )
        assert empty == "message: must be a non-empty string"
        bad = error_text(
            await client.call_tool(
                "chat_anthropic", {"message": "hi", "options": {"max_tokens": "many"}}
            )
        )
        assert "INVALID_ARGUMENT" in bad and "max_tokens" in bad


async def test_a_read_token_may_read_a_conversation_but_not_start_one(cluster: Cluster) -> None:
    base = await start_http(cluster)
    await cluster.start_worker("worker-1", agents=["anthropic"])
    token, _ = await cluster.client().create_api_token("reader", ["read"])
    async with mcp_client(cluster, base, token) as client:
        refused = error_text(
            await client.call_tool("chat_anthropic", {"message": "hi", "wait": False})
        )
        assert "PERMISSION_DENIED" in refused and "submit" in refused
    assert await cluster.client().list_conversations() == []
