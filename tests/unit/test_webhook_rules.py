"""Webhook rules that need no server: signatures a receiver can check, targets, matching."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from datetime import UTC, datetime

import pytest

from taskrun.core import errors
from taskrun.core.webhooks import (
    Webhook,
    WebhookEvent,
    new_secret,
    parse_networks,
    sign,
    validate_url,
    verify,
)

NOW = 1_780_000_000


def test_the_signature_is_standard_webhooks_hmac_over_id_timestamp_and_body() -> None:
    secret = new_secret()
    body = b'{"type":"task.completed"}'
    header = sign(secret, "msg_1", NOW, body)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = hmac.new(key, b"msg_1." + str(NOW).encode() + b"." + body, hashlib.sha256)
    assert header == "v1," + base64.b64encode(expected.digest()).decode()
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(NOW), "webhook-signature": header}
    assert verify(secret, headers, body, NOW + 10)


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-id": "msg_2"},
        {"webhook-timestamp": str(NOW + 1)},
        {"webhook-signature": "v1,AAAA"},
        {"webhook-timestamp": "soon"},
    ],
)
def test_a_changed_header_fails_verification(change: dict[str, str]) -> None:
    secret = new_secret()
    body = b"{}"
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(NOW),
        "webhook-signature": sign(secret, "msg_1", NOW, body),
    }
    assert not verify(secret, {**headers, **change}, body, NOW)


def test_an_old_timestamp_fails_verification_even_when_signed() -> None:
    secret = new_secret()
    headers = {
        "webhook-id": "m",
        "webhook-timestamp": str(NOW),
        "webhook-signature": sign(secret, "m", NOW, b"{}"),
    }
    assert not verify(secret, headers, b"{}", NOW + 301)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://[::1]/x",
        "http://169.254.169.254/latest/meta-data",
        "http://192.168.1.10/x",
        "http://10.0.0.1/x",
        "http://localhost/x",
        "http://0.0.0.0/x",
    ],
)
def test_internal_targets_are_refused_by_default(url: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        validate_url(url, ())
    assert caught.value.field == "url"


def test_an_allowed_network_lets_its_addresses_through() -> None:
    allowed = parse_networks(["127.0.0.0/8", "10.0.0.0/8"])
    assert validate_url("http://127.0.0.1:8080/hook", allowed)
    assert validate_url("http://10.2.3.4/hook", allowed)
    with pytest.raises(errors.InvalidArgument):
        validate_url("http://192.168.0.1/hook", allowed)
    assert validate_url("https://93.184.215.14/hook", ()) == "https://93.184.215.14/hook"
    assert ipaddress.ip_network("10.0.0.0/8") in allowed


def test_a_webhook_matches_events_agent_schedule_and_every_label() -> None:
    hook = Webhook(
        id="wh_1",
        url="https://x.example/",
        events=frozenset({WebhookEvent.TASK_FAILED}),
        secret=new_secret(),
        created_at=datetime.now(UTC),
        labels={"team": "ml"},
        agent="echo",
        schedule="nightly",
    )
    labels = {"team": "ml", "extra": "1"}
    assert hook.wants(WebhookEvent.TASK_FAILED, "echo", "nightly", labels)
    assert not hook.wants(WebhookEvent.TASK_COMPLETED, "echo", "nightly", labels)
    assert not hook.wants(WebhookEvent.TASK_FAILED, "other", "nightly", labels)
    assert not hook.wants(WebhookEvent.TASK_FAILED, "echo", "", labels)
    assert not hook.wants(WebhookEvent.TASK_FAILED, "echo", "nightly", {"team": "web"})
