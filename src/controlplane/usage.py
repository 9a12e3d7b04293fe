"""Cost and token totals of ended runs, per UTC day, agent, model and worker (`taskrun usage`),
with the daily budgets and what they have used today."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from taskrun.controlplane.budgets import day_of, day_start
from taskrun.core.errors import InvalidArgument
from taskrun.core.models import Usage
from taskrun.core.store import UsageSum

DEFAULT_DAYS = 7
MAX_DAYS = 366


@dataclass(slots=True)
class UsageTotal:
    day: str
    agent: str
    model: str
    worker_id: str
    runs: int = 0
    usage: Usage = field(default_factory=Usage)


def since(days: int, now: datetime) -> datetime:
    """The start of the range: today (UTC) and the `days - 1` days before it."""
    days = days or DEFAULT_DAYS
    if not 1 <= days <= MAX_DAYS:
        raise InvalidArgument(f"must be between 1 and {MAX_DAYS}", field="days")
    return day_start(day_of(now) - timedelta(days=days - 1))


def totals(sums: Iterable[UsageSum]) -> list[UsageTotal]:
    """The store's sums as rows: newest day first, then by cost."""
    rows = [
        UsageTotal(s.day.isoformat(), s.agent, s.model, s.worker_id, s.runs, s.usage) for s in sums
    ]
    by_cost = sorted(rows, key=lambda r: (-r.usage.cost_usd, r.agent, r.model, r.worker_id))
    return sorted(by_cost, key=lambda r: r.day, reverse=True)  # stable: by cost within a day
