"""Webhooks: subscriptions to task outcomes, their deliveries, target checks and signatures.

Signatures follow Standard Webhooks (standardwebhooks.com), as Svix and others send them:

    webhook-id:        the delivery id (the same on every retry: receivers dedupe on it)
    webhook-timestamp: seconds since the epoch when this attempt was signed
    webhook-signature: "v1," + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"))

The secret is `whsec_` + base64 of 32 random bytes; the HMAC key is those bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from urllib.parse import urlsplit

from taskrun.core import errors
from taskrun.core.status import TaskStatus
from taskrun.core.validation import validate_agent_name, validate_labels

SECRET_PREFIX = "whsec_"
MAX_URL = 2048
MAX_DESCRIPTION = 256
SIGNATURE_TOLERANCE = 300  # seconds a receiver should accept between timestamp and its clock


class WebhookEvent(StrEnum):
    TASK_COMPLETED = "task.completed"
    TASK_FAILED = "task.failed"
    TASK_CANCELLED = "task.cancelled"
    SCHEDULE_FIRED = "schedule.fired"  # a schedule created a task (its `data.task`)
    INBOX_ITEM_CREATED = "inbox.item_created"  # an approval waits (`data.inbox_item`)
    # a conversation's turn ended (`data.conversation`, `data.turn` with its answer and usage)
    TURN_COMPLETED = "conversation.turn_completed"
    TURN_FAILED = "conversation.turn_failed"
    TURN_CANCELLED = "conversation.turn_cancelled"
    WEBHOOK_TEST = "webhook.test"  # `taskrun webhook test`: sent on request, never subscribed


SUBSCRIBABLE = tuple(e for e in WebhookEvent if e is not WebhookEvent.WEBHOOK_TEST)


EVENT_OF_STATUS: dict[TaskStatus, WebhookEvent] = {
    TaskStatus.COMPLETED: WebhookEvent.TASK_COMPLETED,
    TaskStatus.FAILED: WebhookEvent.TASK_FAILED,
    TaskStatus.CANCELLED: WebhookEvent.TASK_CANCELLED,
}

TURN_EVENT_OF_STATUS: dict[TaskStatus, WebhookEvent] = {
    TaskStatus.COMPLETED: WebhookEvent.TURN_COMPLETED,
    TaskStatus.FAILED: WebhookEvent.TURN_FAILED,
    TaskStatus.CANCELLED: WebhookEvent.TURN_CANCELLED,
}


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for its next attempt
    SUCCEEDED = "succeeded"  # the endpoint answered 2xx
    FAILED = "failed"  # given up: attempts or time ran out


@dataclass(slots=True)
class Webhook:
    """An endpoint told about the events it asked for, on tasks that match its filter."""

    id: str
    url: str
    events: frozenset[WebhookEvent]
    secret: str  # whsec_…; kept to sign deliveries, shown once when created
    created_at: datetime
    labels: dict[str, str] = field(default_factory=dict)  # every one must match
    agent: str = ""  # only tasks of this agent
    schedule: str = ""  # only tasks this schedule created
    description: str = ""
    created_by: str = ""

    def wants(
        self, event: WebhookEvent, agent: str, schedule: str, labels: Mapping[str, str]
    ) -> bool:
        if event not in self.events:
            return False
        if self.agent and agent != self.agent:
            return False
        if self.schedule and schedule != self.schedule:
            return False
        return all(labels.get(k) == v for k, v in self.labels.items())


@dataclass(slots=True)
class WebhookDelivery:
    """One event for one webhook, and how sending it went."""

    id: str  # also the `webhook-id` header: stable across retries
    webhook_id: str
    event: WebhookEvent
    event_key: str  # what happened, once: "<task id>:<status>"; unique per webhook
    payload: str  # the JSON body, fixed when the event happened
    created_at: datetime
    next_attempt_at: datetime
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    last_status_code: int = 0  # 0: no HTTP answer
    last_error: str = ""
    delivered_at: datetime | None = None


def new_webhook_id() -> str:
    return f"wh_{secrets.token_hex(8)}"


def new_delivery_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str, field_name: str = "secret") -> bytes:
    """The HMAC key of a `whsec_…` secret (INVALID_ARGUMENT naming the field otherwise)."""
    if not secret.startswith(SECRET_PREFIX):
        raise errors.InvalidArgument(f"must start with {SECRET_PREFIX!r}", field=field_name)
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidArgument("is not base64 after whsec_", field=field_name) from None
    if not 24 <= len(key) <= 64:
        raise errors.InvalidArgument("must hold 24 to 64 bytes", field=field_name)
    return key


def sign(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    tolerance: int = SIGNATURE_TOLERANCE,
) -> bool:
    """What a receiver does: the timestamp is recent and one `v1,` signature matches."""
    delivery_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    if not delivery_id or not stamp.isdigit() or abs(now - int(stamp)) > tolerance:
        return False
    expected = sign(secret, delivery_id, int(stamp), body)
    offered = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, candidate) for candidate in offered)


# --- targets --------------------------------------------------------------------------------

_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}$")


def address_allowed(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    allowed: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> bool:
    """Public addresses always; loopback, private, link-local and other special ranges only
    when an allowed network holds them (so a webhook cannot reach into our own network)."""
    if any(address in network for network in allowed):
        return True
    return address.is_global and not address.is_multicast


def parse_networks(
    values: Iterable[str], field_name: str = "webhook_allow_networks"
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise errors.InvalidArgument(f"{value!r} is not a network", field=field_name) from None
    return tuple(out)


def validate_url(
    url: str,
    allowed: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
    field_name: str = "url",
) -> str:
    """An http(s) URL without credentials; an IP literal must be allowed (names are checked
    again, resolved, before every attempt)."""
    if not url or len(url) > MAX_URL:
        raise errors.InvalidArgument(f"must be 1 to {MAX_URL} characters", field=field_name)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise errors.InvalidArgument(f"is not a URL: {exc}", field=field_name) from None
    if parts.scheme not in ("https", "http"):
        raise errors.InvalidArgument("must be an http:// or https:// URL", field=field_name)
    if parts.username or parts.password:
        raise errors.InvalidArgument("must not hold credentials", field=field_name)
    host = parts.hostname or ""
    if not host:
        raise errors.InvalidArgument("has no host", field=field_name)
    if port == 0:
        raise errors.InvalidArgument("port 0 is not a port", field=field_name)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOST.match(host):
            raise errors.InvalidArgument(f"{host!r} is not a host name", field=field_name) from None
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            address = ipaddress.ip_address("127.0.0.1")
        else:
            return url
    if not address_allowed(address, allowed):
        raise errors.InvalidArgument(
            f"{address} is a loopback, private or otherwise internal address; the control plane "
            "refuses it unless its network is allowed (taskrun server --webhook-allow-network)",
            field=field_name,
        )
    return url


def validate_events(values: Iterable[str], field_name: str = "events") -> frozenset[WebhookEvent]:
    events = set()
    for value in values:
        try:
            event = WebhookEvent(value)
            if event not in SUBSCRIBABLE:
                raise ValueError(value)
            events.add(event)
        except ValueError:
            known = ", ".join(e.value for e in SUBSCRIBABLE)
            raise errors.InvalidArgument(
                f"unknown event {value!r} (known: {known})", field=field_name
            ) from None
    if not events:
        raise errors.InvalidArgument("name at least one event", field=field_name)
    return frozenset(events)


def validate_webhook(
    webhook: Webhook, allowed: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> Webhook:
    validate_url(webhook.url, allowed)
    secret_key(webhook.secret)
    if webhook.agent:
        validate_agent_name(webhook.agent, "agent")
    if len(webhook.schedule) > 64:
        raise errors.InvalidArgument("is too long", field="schedule")
    if len(webhook.description) > MAX_DESCRIPTION:
        raise errors.InvalidArgument(
            f"must be at most {MAX_DESCRIPTION} characters", field="description"
        )
    webhook.labels = validate_labels(webhook.labels, "labels")
    return webhook
