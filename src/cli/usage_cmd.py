"""`taskrun usage`: what runs cost, per UTC day, agent, model and worker, and the daily budgets
the control plane enforces (set with `taskrun server --label-budget / --schedule-budget`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from taskrun import convert
from taskrun.cli import output
from taskrun.cli.client import Client
from taskrun.cli.running import main_module as _cli
from taskrun.v1 import tasks_pb2


def register(subparsers: Any) -> None:
    cli = _cli()
    p = cli._leaf(
        subparsers,
        "usage",
        cmd_usage,
        help="cost and tokens per day, agent, model and worker; daily budgets",
        description="Sum the cost and tokens of runs that ended (failed ones too) per UTC day, "
        "agent, model and worker, newest day first, and show each daily budget with what it "
        "has used today. Budgets are set on the server (--label-budget, --schedule-budget).",
    )
    p.add_argument(
        "--days",
        type=int,
        default=7,
        metavar="N",
        help="today and the N-1 days before it (default 7, at most 366)",
    )
    cli._add_output(p)


async def get_usage(client: Client, days: int) -> tasks_pb2.UsageReport:
    """The whole report: a long one comes in pages, joined here."""
    report = tasks_pb2.UsageReport()
    request = tasks_pb2.GetUsageRequest(days=days)
    async for page in client._pages(client._task_stub().GetUsage, request):
        report.rows.extend(page.rows)
        report.budgets.extend(page.budgets)
    return report


def usage_text(report: tasks_pb2.UsageReport) -> str:
    out = ""
    if report.rows:
        rows = [
            (
                r.day,
                r.agent,
                r.model or output.NONE,
                r.worker_id or output.NONE,
                str(r.runs),
                str(r.usage.input_tokens),
                str(r.usage.output_tokens),
                f"${r.usage.cost_usd:.4f}",
            )
            for r in report.rows
        ]
        out += output.render_table(
            ("DAY", "AGENT", "MODEL", "WORKER", "RUNS", "IN TOKENS", "OUT TOKENS", "COST"), rows
        )
        total = sum(r.usage.cost_usd for r in report.rows)
        out += f"total: ${total:.4f}\n"
    else:
        out += "no runs ended in this range\n"
    if report.budgets:
        caps = [
            (
                b.kind,
                b.key,
                f"${b.limit_usd:g}",
                f"${b.spent_usd:.4f}",
                "reached: its tasks wait for the next UTC day" if b.reached else "ok",
            )
            for b in report.budgets
        ]
        out += "\nDaily budgets (UTC day):\n"
        out += output.render_table(("KIND", "KEY", "LIMIT", "SPENT TODAY", "STATE"), caps)
    return out


def cmd_usage(args: argparse.Namespace) -> int:
    client: Client = _cli()._client(args)

    async def run() -> tasks_pb2.UsageReport:
        async with client:
            return await get_usage(client, args.days)

    report = asyncio.run(run())
    if args.output == "json":
        doc = convert.to_json_dict(report)
        sys.stdout.write(output.dumps(doc))
    else:
        sys.stdout.write(usage_text(report))
    sys.stdout.flush()
    return 0
