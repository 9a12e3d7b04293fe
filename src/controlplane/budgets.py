"""Daily cost caps the control plane enforces at dispatch.

A cap is set per label (`team=research` may spend $20 a UTC day, over every task carrying that
label) or per schedule (its tasks may spend $5 a day). What counts is the cost the runs reported
when they ended (failed runs too), summed per UTC day. Once a cap is reached, runs of tasks it
covers are not dispatched: they wait, showing the cap as their `waiting_reason`, until the next
UTC day starts (or a higher cap is configured and the server restarted). Waiting rather than
failing keeps scheduled work from being lost to a busy morning; a task that must not wait that
long carries a queue timeout, which then fails it with its reason.

A cap stops new dispatches; runs already running finish and their cost counts, so a day may end
a little above its cap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from taskrun.core.models import Task


def day_of(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Cap:
    kind: str  # "label" or "schedule"
    key: str  # "team=research", or the schedule's name
    limit_usd: float
    spent_usd: float

    @property
    def reached(self) -> bool:
        return self.spent_usd >= self.limit_usd

    def reason(self) -> str:
        what = f"label {self.key}" if self.kind == "label" else f"schedule {self.key!r}"
        return (
            f"the daily budget of {what} is spent (${self.spent_usd:.4f} of "
            f"${self.limit_usd:g} today, UTC); it waits for the next day"
        )


class Budgets:
    """Today's spending against the configured caps. `spend` is fed by ended runs."""

    def __init__(
        self, labels: Mapping[str, float], schedules: Mapping[str, float], today: date
    ) -> None:
        self.label_caps = {tuple(k.split("=", 1)): v for k, v in labels.items()}
        self.schedule_caps = dict(schedules)
        self.day = today
        self._labels: dict[tuple[str, ...], float] = {}
        self._schedules: dict[str, float] = {}

    @property
    def configured(self) -> bool:
        return bool(self.label_caps or self.schedule_caps)

    def roll(self, now: datetime) -> bool:
        """Start a new day's totals when `now` is past today; whether it did."""
        today = day_of(now)
        if today == self.day:
            return False
        self.day = today
        self._labels.clear()
        self._schedules.clear()
        return True

    def spend(self, labels: Mapping[str, str], schedule: str, cost: float, when: datetime) -> None:
        if cost <= 0 or day_of(when) != self.day:
            return
        for key in self.label_caps:
            if labels.get(key[0]) == key[1]:
                self._labels[key] = self._labels.get(key, 0.0) + cost
        if schedule in self.schedule_caps:
            self._schedules[schedule] = self._schedules.get(schedule, 0.0) + cost

    def load(self, spent: Iterable[tuple[Mapping[str, str], str, float, datetime]]) -> None:
        for labels, schedule, cost, when in spent:
            self.spend(labels, schedule, cost, when)

    def caps(self) -> list[Cap]:
        out = [
            Cap("label", "=".join(key), limit, self._labels.get(key, 0.0))
            for key, limit in sorted(self.label_caps.items())
        ]
        out += [
            Cap("schedule", name, limit, self._schedules.get(name, 0.0))
            for name, limit in sorted(self.schedule_caps.items())
        ]
        return out

    def blocking(self, task: Task) -> Cap | None:
        """The first reached cap that covers the task, if any."""
        for key, limit in self.label_caps.items():
            if task.labels.get(key[0]) == key[1]:
                spent = self._labels.get(key, 0.0)
                if spent >= limit:
                    return Cap("label", "=".join(key), limit, spent)
        limit_s = self.schedule_caps.get(task.schedule) if task.schedule else None
        if limit_s is not None:
            spent = self._schedules.get(task.schedule, 0.0)
            if spent >= limit_s:
                return Cap("schedule", task.schedule, limit_s, spent)
        return None

    def seconds_to_next_day(self, now: datetime) -> float:
        return max(0.0, (day_start(self.day + timedelta(days=1)) - now).total_seconds())


def parse_caps(values: Iterable[str], kind: str) -> dict[str, float]:
    """`KEY=USD` (schedules) or `LABEL=VALUE=USD` (labels) into caps; ValueError naming the bad
    one."""
    caps: dict[str, float] = {}
    for raw in values:
        key, sep, amount = raw.strip().rpartition("=")
        example = "team=research=20" if kind == "label" else "nightly=5"
        if not sep or not key or (kind == "label" and "=" not in key.strip("=")):
            raise ValueError(f"{raw!r} is not a {kind} budget like {example!r}")
        try:
            usd = float(amount)
        except ValueError:
            raise ValueError(f"{raw!r}: {amount!r} is not an amount in US dollars") from None
        if not (usd >= 0 and usd < float("inf")):
            raise ValueError(f"{raw!r}: the amount must be a finite number >= 0")
        caps[key] = usd
    return caps
