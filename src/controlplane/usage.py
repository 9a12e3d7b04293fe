"""Cost and token totals of ended runs, per UTC day, agent, model and worker (`taskrun usage`),
with the daily budgets and what they have used today."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from taskrun.controlplane.budgets import day_of, day_start
from taskrun.core.errors import InvalidArgument
from taskrun.core.models import Usage
from taskrun.core.store import RunSpending

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


def totals(spending: Iterable[RunSpending]) -> list[UsageTotal]:
    """Sums per (day, agent, model, worker), newest day first, then by cost."""
    rows: dict[tuple[str, str, str, str], UsageTotal] = {}
    for s in spending:
        run = s.run
        if run.finished_at is None:
            continue
        key = (
            day_of(run.finished_at).isoformat(),
            s.agent,
            run.backend_used.model_name if run.backend_used else "",
            run.worker_id or "",
        )
        row = rows.get(key)
        if row is None:
            row = rows[key] = UsageTotal(*key)
        row.runs += 1
        row.usage.add(run.usage)
    by_cost = sorted(rows.values(), key=lambda r: (-r.usage.cost_usd, r.agent, r.model))
    return sorted(by_cost, key=lambda r: r.day, reverse=True)  # stable: by cost within a day
