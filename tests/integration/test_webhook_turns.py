"""Conversation turns announced to webhooks: a real control plane (SQLite) and worker running the
`anthropic` agent against the fake Messages API, and a loopback receiver that verifies every
signature."""

from __future__ import annotations

import json

import pytest

from taskrun.core.webhooks import DeliveryStatus
from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, InvalidRequest, Text
from tests.integration.test_conversations import api as fake_api  # noqa: F401  (the fixture)
from tests.integration.test_webhooks import delivered, receiver, start

pytestmark = pytest.mark.usefixtures("fake_api")


async def test_a_turn_that_completes_and_one_that_fails_are_delivered_with_answer_and_cost(
    cluster: Cluster,
    fake_api: FakeAnthropic,  # noqa: F811
) -> None:
    await start(cluster)
    await cluster.start_worker("worker-1", agents=["anthropic", "echo"])
    admin = cluster.client()
    fake_api.enqueue(Text("Noted: 7.", input_tokens=1000, output_tokens=200))
    async with receiver() as hook_receiver:
        webhook, secret = await admin.create_webhook(
            hook_receiver.url,
            ["conversation.turn_completed", "conversation.turn_failed"],
            labels={"team": "a"},
        )
        hook_receiver.secret = secret
        plain = await admin.create_task("echo", {"text": "not a turn"}, labels={"team": "a"})
        await admin.wait(plain.id)
        conversation, first = await admin.create_conversation(
            "anthropic", "Remember 7.", labels={"team": "a"}
        )
        await hook_receiver.wait_for(1)
        fake_api.enqueue(InvalidRequest("this one fails"))
        second = await admin.continue_task(first.task_id, "Which number?")
        await hook_receiver.wait_for(2)
        completed, failed = (json.loads(r.body) for r in hook_receiver.requests)
        assert all(r.verified for r in hook_receiver.requests)
        assert completed["type"] == "conversation.turn_completed"
        assert completed["data"]["conversation"]["id"] == conversation.id
        assert completed["data"]["conversation"]["agent"] == "anthropic"
        turn = completed["data"]["turn"]
        assert turn["index"] == 1 and turn["task_id"] == first.task_id
        assert turn["answer"] == "Noted: 7." and turn["message"] == "Remember 7."
        _, turns = await admin.get_conversation(conversation.id)
        assert turns[0].usage.cost_usd > 0
        assert turn["usage"]["cost_usd"] == pytest.approx(turns[0].usage.cost_usd)
        assert turn["usage"]["input_tokens"] == "1000"  # int64 in the protobuf JSON mapping
        assert failed["type"] == "conversation.turn_failed"
        assert failed["data"]["turn"]["index"] == 2
        assert failed["data"]["turn"]["task_id"] == second.id
        assert "this one fails" in failed["data"]["turn"]["error"]
        assert failed["data"]["turn"]["status"] == "TASK_STATUS_FAILED"
        deliveries = await delivered(cluster, webhook.id, DeliveryStatus.SUCCEEDED)
        assert sorted(d.event_key for d in deliveries) == sorted(
            [f"{first.task_id}:turn_completed", f"{second.id}:turn_failed"]
        )


async def test_a_cancelled_turn_is_delivered_to_a_webhook_that_asked_for_it_only(
    cluster: Cluster,
    fake_api: FakeAnthropic,  # noqa: F811
) -> None:
    await start(cluster)
    await cluster.start_worker("worker-1", agents=["anthropic"])
    admin = cluster.client()
    fake_api.enqueue(Text(["slow", " answer"], delay=5.0))
    async with receiver() as cancelled_receiver, receiver() as completed_receiver:
        cancelled, secret = await admin.create_webhook(
            cancelled_receiver.url, ["conversation.turn_cancelled"]
        )
        cancelled_receiver.secret = secret
        other, other_secret = await admin.create_webhook(
            completed_receiver.url, ["conversation.turn_completed"]
        )
        completed_receiver.secret = other_secret
        conversation, turn = await admin.create_conversation("anthropic", "Take your time.")
        await admin.cancel_task(turn.task_id, reason="never mind")
        await cancelled_receiver.wait_for(1)
        (got,) = cancelled_receiver.requests
        body = json.loads(got.body)
        assert got.verified and body["type"] == "conversation.turn_cancelled"
        assert body["data"]["conversation"]["id"] == conversation.id
        assert "never mind" in body["data"]["turn"]["error"]
        await delivered(cluster, cancelled.id, DeliveryStatus.SUCCEEDED)
        # deliveries are recorded together, when the event is handled: none for the other one
        assert await admin.list_webhook_deliveries(other.id) == []
        assert completed_receiver.requests == []
