"""Webhook deliveries: record every matching task outcome durably, then POST it, signed, with
retries.

Events come from the engine's event hub, which emits only committed changes, so nothing is
announced that the store could still lose. A delivery is stored before its first attempt and
after each one (attempts, status, response code, next attempt), so a restart resumes the pending
ones and never sends one that already succeeded. Delivery is at least once: an attempt that the
endpoint answered but that was not recorded yet (a crash in between) is sent again with the same
`webhook-id`, which receivers use to drop duplicates.

Senders run on their own tasks with a bounded number in flight and a timeout per attempt, so a
slow or dead endpoint never slows dispatch or the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import json
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from taskrun import convert
from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.events import EventSubscription, Filter, Overflowed
from taskrun.core import errors
from taskrun.core.ids import ConversationId
from taskrun.core.models import Turn, utcnow
from taskrun.core.status import TaskStatus
from taskrun.core.webhooks import (
    EVENT_OF_STATUS,
    TURN_EVENT_OF_STATUS,
    DeliveryStatus,
    Webhook,
    WebhookDelivery,
    WebhookEvent,
    address_allowed,
    new_delivery_id,
    new_secret,
    new_webhook_id,
    parse_networks,
    sign,
    validate_events,
    validate_webhook,
)
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import conversations_pb2 as cpb
from taskrun.v1 import events_pb2 as epb

log = structlog.get_logger(__name__)


def _turn_pb(turn: Turn) -> cpb.Turn:
    out = cpb.Turn()
    convert.turn_to_pb(turn, out)
    return out


MAX_IN_FLIGHT = 16
SUBSCRIPTION_LIMIT = 100_000
MAX_ERROR = 500
_TASK_CHANGES = Filter(
    kinds=frozenset({epb.EVENT_KIND_TASK_CHANGED, epb.EVENT_KIND_INBOX_ITEM_CREATED})
)
_TASK_STATUS = {
    pb.TASK_STATUS_COMPLETED: TaskStatus.COMPLETED,
    pb.TASK_STATUS_FAILED: TaskStatus.FAILED,
    pb.TASK_STATUS_CANCELLED: TaskStatus.CANCELLED,
}


class WebhookDispatcher:
    """Webhooks of one control plane: the subscriptions, and the deliveries still to send."""

    def __init__(
        self, engine: Engine, config: ServerConfig, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.config = config
        self.clock = clock
        self.allowed = parse_networks(config.webhook_allow_networks)
        self.hooks: dict[str, Webhook] = {}
        self._pending: dict[str, WebhookDelivery] = {}
        self._due: list[tuple[datetime, str]] = []  # (next attempt, delivery id), a heap
        self._in_flight: set[str] = set()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._attempts: set[asyncio.Task[None]] = set()
        self._sub: EventSubscription | None = None
        self._started = False
        self._announced: set[str] = set()  # schedule firings already turned into deliveries

    # --- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the webhooks and every pending delivery (after a restart, they go on)."""
        self.hooks = {w.id: w for w in await self.store.list_webhooks()}
        pending = await self.store.list_webhook_deliveries(pending=True, limit=10_000_000)
        for delivery in pending:
            self._schedule(delivery)
        log.info("webhooks loaded", webhooks=len(self.hooks), pending_deliveries=len(pending))

    def start(self) -> None:
        self._client = httpx.AsyncClient(
            follow_redirects=False, timeout=self.config.webhook_timeout, trust_env=False
        )
        self._tasks = [asyncio.create_task(self._send_loop(), name="webhook-sender")]
        self._started = True
        if self.hooks:
            self._subscribe()

    def _subscribe(self) -> None:
        """Watch task changes from the first webhook on (no webhook: no subscriber)."""
        if self._sub is None and self._started:
            self._sub = self.engine.events.subscribe(_TASK_CHANGES, limit=SUBSCRIPTION_LIMIT)
            self._tasks.append(asyncio.create_task(self._consume(), name="webhook-events"))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._attempts]:
            task.cancel()
        for task in [*self._tasks, *self._attempts]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sub is not None:
            self.engine.events.unsubscribe(self._sub)
        if self._client is not None:
            await self._client.aclose()

    # --- operations (the servicer's) ---------------------------------------------------------

    async def create(
        self,
        *,
        url: str,
        events: list[str],
        labels: dict[str, str],
        agent: str,
        schedule: str,
        description: str,
        secret: str,
        created_by: str,
    ) -> Webhook:
        webhook = Webhook(
            id=new_webhook_id(),
            url=url,
            events=validate_events(events),
            secret=secret or new_secret(),
            created_at=self.clock(),
            labels=labels,
            agent=agent,
            schedule=schedule,
            description=description,
            created_by=created_by,
        )
        validate_webhook(webhook, self.allowed)
        await self.store.add_webhook(webhook)
        self.hooks[webhook.id] = webhook
        self._subscribe()
        log.info("webhook created", webhook_id=webhook.id, url=webhook.url, by=created_by)
        return webhook

    async def delete(self, webhook_id: str) -> None:
        if not await self.store.delete_webhook(webhook_id):
            raise errors.NotFound(f"no webhook {webhook_id!r}", field="webhook_id")
        self.hooks.pop(webhook_id, None)
        for delivery_id in [d.id for d in self._pending.values() if d.webhook_id == webhook_id]:
            self._pending.pop(delivery_id, None)
        log.info("webhook deleted", webhook_id=webhook_id)

    async def send_test(self, webhook_id: str, by: str) -> WebhookDelivery:
        hook = self.hooks.get(webhook_id)
        if hook is None:
            raise errors.NotFound(f"no webhook {webhook_id!r}", field="webhook_id")
        now = self.clock()
        delivery_id = new_delivery_id()
        payload = {
            "type": str(WebhookEvent.WEBHOOK_TEST),
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "data": {"webhook_id": webhook_id, "requested_by": by},
        }
        delivery = WebhookDelivery(
            id=delivery_id,
            webhook_id=webhook_id,
            event=WebhookEvent.WEBHOOK_TEST,
            event_key=f"test:{delivery_id}",
            payload=json.dumps(payload, separators=(",", ":")),
            created_at=now,
            next_attempt_at=now,
        )
        stored = await self.store.add_webhook_deliveries([delivery])
        if not stored:  # deleted meanwhile
            raise errors.NotFound(f"no webhook {webhook_id!r}", field="webhook_id")
        self._schedule(delivery)
        return delivery

    async def deliveries(self, webhook_id: str, limit: int) -> list[WebhookDelivery]:
        if webhook_id not in self.hooks:
            raise errors.NotFound(f"no webhook {webhook_id!r}", field="webhook_id")
        return await self.store.list_webhook_deliveries(webhook_id, limit=limit)

    # --- events -> deliveries ----------------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            assert self._sub is not None
            try:
                events = await self._sub.wait()
            except Overflowed:
                log.error("webhook events fell behind; some task outcomes were not announced")
                self.engine.events.unsubscribe(self._sub)
                self._sub = self.engine.events.subscribe(_TASK_CHANGES, limit=SUBSCRIPTION_LIMIT)
                continue
            deliveries = [d for event in events for d in self._deliveries_for(event)]
            for event in events:
                deliveries.extend(await self._turn_deliveries(event))
            if not deliveries:
                continue
            try:
                stored = await self.store.add_webhook_deliveries(deliveries)
            except Exception as exc:  # the store failed: say so, keep serving
                log.error("webhook deliveries not recorded", count=len(deliveries), error=str(exc))
                continue
            for delivery in stored:
                self._schedule(delivery)

    def _deliveries_for(self, event: epb.Event) -> list[WebhookDelivery]:
        if not self.hooks:
            return []
        if event.kind == epb.EVENT_KIND_INBOX_ITEM_CREATED:
            return self._inbox_deliveries(event)
        task = event.task
        candidates: list[tuple[WebhookEvent, str]] = []
        status = _TASK_STATUS.get(task.status)
        if status is not None:
            candidates.append((EVENT_OF_STATUS[status], f"{task.id}:{status.name.lower()}"))
        fired = f"{task.id}:fired"
        if task.schedule and fired not in self._announced:
            # The first change seen of a task a schedule created (creation and assignment may
            # share one commit, so its status then is not always pending).
            candidates.append((WebhookEvent.SCHEDULE_FIRED, fired))
            if len(self._announced) > 100_000:
                self._announced.clear()  # the store's unique key still prevents a repeat
            self._announced.add(fired)
        created = task.created_at.ToDatetime(tzinfo=UTC)
        out: list[WebhookDelivery] = []
        now = self.clock()
        for kind, key in candidates:
            wanting = [
                h
                for h in self.hooks.values()
                if h.wants(kind, task.agent, task.schedule, dict(task.labels))
                # a firing counts only for webhooks that existed when it created the task
                and (kind is not WebhookEvent.SCHEDULE_FIRED or created >= h.created_at)
            ]
            if not wanting:
                continue
            data = {"task": convert.to_json_dict(task)}
            out.extend(_deliveries(wanting, kind, key, _payload(kind, event, data), now))
        return out

    async def _turn_deliveries(self, event: epb.Event) -> list[WebhookDelivery]:
        """A conversation's turn ended: its answer and usage come from the stored turn, which
        the engine commits with the task's end (so it is there when the event is). Filters
        apply to the turn's task (its agent and labels, the conversation's); the event key is
        the task's, so a turn is announced once per webhook."""
        task = event.task
        status = _TASK_STATUS.get(task.status) if event.HasField("task") else None
        if status is None or not task.conversation_id or not self.hooks:
            return []
        kind = TURN_EVENT_OF_STATUS[status]
        labels = dict(task.labels)
        wanting = [h for h in self.hooks.values() if h.wants(kind, task.agent, "", labels)]
        if not wanting:
            return []
        conversation_id = ConversationId(task.conversation_id)
        try:
            conversation = await self.store.get_conversation(conversation_id)
            turns = await self.store.list_turns(conversation_id) if conversation else []
        except Exception as exc:  # the store failed: say so, keep serving
            log.error("turn not announced", task_id=task.id, error=str(exc))
            return []
        turn = next((t for t in turns if t.index == task.turn), None)
        if conversation is None or turn is None:
            return []  # deleted meanwhile
        turn_json = convert.to_json_dict(_turn_pb(turn))
        payload = json.dumps(
            {
                "type": str(kind),
                "timestamp": event.time.ToDatetime().isoformat() + "Z",
                "data": {
                    "conversation": {
                        "id": conversation.id,
                        "agent": conversation.agent,
                        "title": conversation.title,
                        "labels": conversation.labels,
                        "turn_count": conversation.turns,
                    },
                    "turn": turn_json,
                },
            },
            separators=(",", ":"),
        )
        key = f"{task.id}:turn_{status.name.lower()}"
        return _deliveries(wanting, kind, key, payload, self.clock())

    def _inbox_deliveries(self, event: epb.Event) -> list[WebhookDelivery]:
        """a new inbox item. Labels filter on `workflow` (the workflow's name); the
        event key is the item's id, so an item announced again (after a restart) is stored
        once per webhook."""
        item = event.inbox_item
        kind = WebhookEvent.INBOX_ITEM_CREATED
        labels = {"workflow": item.workflow}
        wanting = [h for h in self.hooks.values() if h.wants(kind, "", "", labels)]
        if not wanting:
            return []
        payload = _payload(kind, event, {"inbox_item": convert.to_json_dict(item)})
        return _deliveries(wanting, kind, f"{item.id}:created", payload, self.clock())

    # --- sending -----------------------------------------------------------------------------

    def _schedule(self, delivery: WebhookDelivery) -> None:
        self._pending[delivery.id] = delivery
        heapq.heappush(self._due, (delivery.next_attempt_at, delivery.id))
        self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            while self._due and self._due[0][0] <= now:
                _, delivery_id = heapq.heappop(self._due)
                delivery = self._pending.get(delivery_id)
                if delivery is None or delivery_id in self._in_flight:
                    continue
                self._in_flight.add(delivery_id)
                task = asyncio.create_task(self._attempt(delivery))
                self._attempts.add(task)
                task.add_done_callback(self._attempts.discard)
            wait = (self._due[0][0] - now).total_seconds() if self._due else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _attempt(self, delivery: WebhookDelivery) -> None:
        try:
            async with self._slots:
                code, error = await self._post(delivery)
            await self._record(delivery, code, error)
        except Exception as exc:  # a store failure: the delivery stays pending in the store
            log.error("webhook attempt not recorded", delivery_id=delivery.id, error=str(exc))
        finally:
            self._in_flight.discard(delivery.id)

    async def _post(self, delivery: WebhookDelivery) -> tuple[int, str]:
        """(HTTP status, error text); status 0 when there was no answer."""
        hook = self.hooks.get(delivery.webhook_id)
        if hook is None:
            return 0, "the webhook was deleted"
        refusal = await self._check_target(hook.url)
        if refusal:
            return 0, refusal
        body = delivery.payload.encode()
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "taskrun-webhooks/1",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(hook.secret, delivery.id, stamp, body),
        }
        assert self._client is not None
        try:
            response = await self._client.post(hook.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return 0, f"no answer within {self.config.webhook_timeout:g}s"
        except httpx.HTTPError as exc:
            return 0, f"could not reach {hook.url}: {exc or 'connection failed'}"
        if 200 <= response.status_code < 300:
            return response.status_code, ""
        return response.status_code, f"HTTP {response.status_code}: {response.text[:200]}"

    async def _check_target(self, url: str) -> str:
        """Why the URL's host may not be reached now ("" when it may): every address it
        resolves to must be public or in an allowed network."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host,
                parts.port or (443 if parts.scheme == "https" else 80),
                type=socket.SOCK_STREAM,
            )
        except OSError as exc:
            return f"could not resolve {host}: {exc.strerror or exc}"
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address_allowed(address, self.allowed):
                return f"{host} resolves to {address}, an internal address that is not allowed"
        return ""

    async def _record(self, delivery: WebhookDelivery, code: int, error: str) -> None:
        now = self.clock()
        attempts = delivery.attempts + 1
        cfg = self.config
        if not error:
            updated = replace(
                delivery,
                status=DeliveryStatus.SUCCEEDED,
                attempts=attempts,
                last_status_code=code,
                last_error="",
                delivered_at=now,
            )
        else:
            base = min(cfg.webhook_retry_max, cfg.webhook_retry_base * 2 ** (attempts - 1))
            delay = base / 2 + random.uniform(0, base / 2)  # equal jitter: never 0
            next_at = now + timedelta(seconds=delay)
            expired = next_at - delivery.created_at > timedelta(seconds=cfg.webhook_max_age)
            given_up = attempts >= cfg.webhook_max_attempts or expired
            updated = replace(
                delivery,
                status=DeliveryStatus.FAILED if given_up else DeliveryStatus.PENDING,
                attempts=attempts,
                last_status_code=code,
                last_error=error[:MAX_ERROR],
                next_attempt_at=next_at,
            )
        await self.store.update_webhook_delivery(updated)
        log.info(
            "webhook attempt",
            delivery_id=delivery.id,
            webhook_id=delivery.webhook_id,
            attempt=attempts,
            status=str(updated.status),
            code=code,
            error=error[:200],
        )
        if updated.status is DeliveryStatus.PENDING and delivery.id in self._pending:
            self._schedule(updated)
        else:
            self._pending.pop(delivery.id, None)


def _payload(kind: WebhookEvent, event: epb.Event, data: dict[str, Any]) -> str:
    """A delivery's body: the event's type, its time and what it is about."""
    body = {"type": str(kind), "timestamp": event.time.ToDatetime().isoformat() + "Z", "data": data}
    return json.dumps(body, separators=(",", ":"))


def _deliveries(
    hooks: Iterable[Webhook], kind: WebhookEvent, key: str, payload: str, now: datetime
) -> list[WebhookDelivery]:
    """One delivery of `payload` to each of `hooks`, due now; `key` makes it once per hook."""
    return [
        WebhookDelivery(
            id=new_delivery_id(),
            webhook_id=hook.id,
            event=kind,
            event_key=key,
            payload=payload,
            created_at=now,
            next_attempt_at=now,
        )
        for hook in hooks
    ]
