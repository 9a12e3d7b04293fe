"""`taskrun webhook create|list|delete|deliveries`: endpoints told when tasks end.

`register(subparsers)` adds them to the `taskrun` parser (src/cli/main.py); they reuse main's
connection flags and client. Creating and deleting need the `admin` scope, reading `read`.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from taskrun.cli import output
from taskrun.cli.client import Client
from taskrun.cli.running import main_module as _cli
from taskrun.core.webhooks import SUBSCRIBABLE, Webhook, WebhookDelivery

EVENTS = [e.value for e in SUBSCRIBABLE]


def _events(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    for name in names:
        if name not in EVENTS:
            raise argparse.ArgumentTypeError(f"unknown event {name!r} (one of {', '.join(EVENTS)})")
    return names


def register(subparsers: Any) -> None:
    cli = _cli()
    group = cli._group(subparsers, "webhook", "endpoints told (signed POSTs) when tasks end")
    p = cli._leaf(
        group,
        "create",
        cmd_webhook_create,
        help="register an endpoint; prints its signing secret once",
        description="Register a URL that receives a signed POST (Standard Webhooks headers "
        "webhook-id, webhook-timestamp, webhook-signature) when a matching task ends. Failed "
        "deliveries are retried with exponential backoff; `taskrun webhook deliveries ID` "
        "shows each one. Loopback and private targets are refused unless the server allows "
        "their network (--webhook-allow-network).",
    )
    p.add_argument("url", help="https://… (or http://…)")
    p.add_argument(
        "--event",
        action="append",
        type=_events,
        metavar="EVENT",
        help=f"{', '.join(EVENTS)} (repeat or comma-separate; default: all of them)",
    )
    p.add_argument("--label", action="append", metavar="K=V", help="only tasks with it (repeat)")
    p.add_argument("--agent", default="", help="only tasks of this agent")
    p.add_argument("--schedule", default="", help="only tasks this schedule created")
    p.add_argument("--description", default="", help="what it is for")
    p.add_argument("--secret", default="", help="whsec_… to sign with (default: a new one)")
    cli._add_output(p)
    p = cli._leaf(group, "list", cmd_webhook_list, help="registered webhooks")
    cli._add_output(p)
    p = cli._leaf(group, "delete", cmd_webhook_delete, help="delete a webhook and its deliveries")
    p.add_argument("webhook_id", metavar="WEBHOOK_ID")
    cli._add_output(p)
    p = cli._leaf(
        group,
        "test",
        cmd_webhook_test,
        help="send a webhook.test delivery now; prints how it went",
    )
    p.add_argument("webhook_id", metavar="WEBHOOK_ID")
    cli._add_output(p)
    p = cli._leaf(
        group, "deliveries", cmd_webhook_deliveries, help="a webhook's deliveries, newest first"
    )
    p.add_argument("webhook_id", metavar="WEBHOOK_ID")
    p.add_argument("--limit", type=int, default=50, help="how many (default 50, at most 1000)")
    cli._add_output(p)


def webhook_doc(w: Webhook) -> dict[str, Any]:
    return {
        "id": w.id,
        "url": w.url,
        "events": sorted(str(e) for e in w.events),
        "labels": w.labels,
        "agent": w.agent,
        "schedule": w.schedule,
        "description": w.description,
        "created_at": output.format_time(w.created_at),
        "created_by": w.created_by,
    }


def delivery_doc(d: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "webhook_id": d.webhook_id,
        "event": str(d.event),
        "event_key": d.event_key,
        "status": str(d.status),
        "attempts": d.attempts,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": output.format_time(d.created_at),
        "next_attempt_at": output.format_time(d.next_attempt_at),
        "delivered_at": output.format_time(d.delivered_at) if d.delivered_at else None,
    }


def cmd_webhook_create(args: argparse.Namespace) -> int:
    cli = _cli()
    events = [e for group in args.event or [EVENTS] for e in group]
    labels = cli._labels(args.label, "labels")
    webhook, secret = cli._one_call(
        args,
        lambda c: c.create_webhook(
            args.url,
            events,
            labels=labels,
            agent=args.agent,
            schedule=args.schedule,
            description=args.description,
            secret=args.secret,
        ),
    )
    if args.output == "json":
        cli._write(output.dumps({"secret": secret, **webhook_doc(webhook)}))
        return int(cli.EXIT_OK)
    cli._write(
        f"webhook: {webhook.id}\n"
        f"url:     {webhook.url}\n"
        f"events:  {', '.join(sorted(str(e) for e in webhook.events))}\n"
        f"secret:  {secret}\n"
        "\nThe secret is shown only this once. Verify each delivery: base64 HMAC-SHA256, keyed "
        "with the bytes after whsec_, of '<webhook-id>.<webhook-timestamp>.<body>' equals the "
        "part after 'v1,' of webhook-signature, and the timestamp is within 5 minutes.\n"
    )
    return int(cli.EXIT_OK)


def cmd_webhook_list(args: argparse.Namespace) -> int:
    cli = _cli()
    hooks: list[Webhook] = cli._one_call(args, lambda c: c.list_webhooks())
    if args.output == "json":
        cli._write(output.dumps([webhook_doc(w) for w in hooks]))
        return int(cli.EXIT_OK)
    if not hooks:
        cli._write("no webhooks\n")
        return int(cli.EXIT_OK)
    rows = [
        f"{w.id}  {','.join(sorted(str(e) for e in w.events))}  {w.url}"
        + (f"  labels={w.labels}" if w.labels else "")
        + (f"  agent={w.agent}" if w.agent else "")
        + (f"  schedule={w.schedule}" if w.schedule else "")
        for w in hooks
    ]
    cli._write("\n".join(rows) + "\n")
    return int(cli.EXIT_OK)


def cmd_webhook_delete(args: argparse.Namespace) -> int:
    cli = _cli()
    cli._one_call(args, lambda c: c.delete_webhook(args.webhook_id))
    if args.output == "json":
        cli._write(output.dumps({"id": args.webhook_id, "deleted": True}))
    else:
        cli._write(f"webhook {args.webhook_id} deleted\n")
    return int(cli.EXIT_OK)


def cmd_webhook_deliveries(args: argparse.Namespace) -> int:
    cli = _cli()
    found: list[WebhookDelivery] = cli._one_call(
        args, lambda c: c.list_webhook_deliveries(args.webhook_id, limit=args.limit)
    )
    if args.output == "json":
        cli._write(output.dumps([delivery_doc(d) for d in found]))
        return int(cli.EXIT_OK)
    if not found:
        cli._write("no deliveries\n")
        return int(cli.EXIT_OK)
    rows = [
        f"{d.id}  {d.event}  {d.event_key}  {d.status}  attempts={d.attempts}"
        + (f"  code={d.last_status_code}" if d.last_status_code else "")
        + (f"  error={d.last_error}" if d.last_error else "")
        for d in found
    ]
    cli._write("\n".join(rows) + "\n")
    return int(cli.EXIT_OK)


def cmd_webhook_test(args: argparse.Namespace) -> int:
    """Send a test delivery, then wait (up to the first retry) to say how its attempt went."""
    cli = _cli()

    async def run(client: Client) -> WebhookDelivery:
        delivery = await client.test_webhook(args.webhook_id)
        for _ in range(150):  # 15 s
            for found in await client.list_webhook_deliveries(args.webhook_id, limit=20):
                if found.id == delivery.id and found.attempts:
                    return found
            await asyncio.sleep(0.1)
        return delivery

    delivery = cli._one_call(args, run)
    if args.output == "json":
        cli._write(output.dumps(delivery_doc(delivery)))
    elif not delivery.attempts:
        cli._write(f"test delivery {delivery.id} queued; no attempt yet\n")
    elif delivery.status.value == "succeeded":
        cli._write(f"test delivery {delivery.id}: answered {delivery.last_status_code}\n")
    else:
        cli._write(
            f"test delivery {delivery.id} failed: {delivery.last_error}; it is retried "
            f"(taskrun webhook deliveries {args.webhook_id})\n"
        )
        return int(cli.EXIT_FAILED)
    return int(cli.EXIT_OK)
