"""Schedules: recurring rules (cron or RFC 5545 RRULE, in an IANA time zone) that create Tasks.

Pure domain: the model, its validation, and when it fires. A rule is expanded on the wall clock
of its zone (as cron and RFC 5545 both read it); each wall time is then placed on the timeline:

- a wall time that does not exist (spring forward) fires once, at the first instant after the gap
  (02:30 on the night New York skips 02:00-03:00 fires at 03:00 EDT);
- a wall time that exists twice (fall back) fires once, at its first instant (the earlier offset).

Several wall times that land on the same instant (a per-minute rule inside a gap) fire once.

croniter and dateutil are imported where a rule is compiled: every command of the CLI imports
this module (through `convert`).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from taskrun.core.errors import InvalidArgument
from taskrun.core.ids import TaskId
from taskrun.core.models import TaskPolicy, utcnow
from taskrun.core.text import quoted
from taskrun.core.validation import (
    validate_agent_name,
    validate_input,
    validate_labels,
    validate_policy,
)

if TYPE_CHECKING:
    from dateutil.rrule import rrule

MAX_RRULE_COUNT = 100_000  # a COUNT rule is expanded in full once; keep that bounded
MAX_RULE_CHARS = 4096
MAX_PREVIEW = 100
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_CRON_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class MisfirePolicy(IntEnum):
    """What to do when the control plane was not running at a fire time."""

    SKIP = 1  # create nothing for missed occurrences
    RUN_ONCE = 2  # one task for the latest missed occurrence, never a burst


class OverlapPolicy(IntEnum):
    """What to do when an occurrence comes due while a task of the schedule is unfinished."""

    ALLOW = 1
    SKIP = 2
    CANCEL_PREVIOUS = 3


@dataclass(slots=True)
class Schedule:
    """A recurring rule and the task it creates at each occurrence, with its firing state."""

    name: str
    agent: str
    timezone: str
    cron: str = ""
    rrule: str = ""
    input: str = "{}"  # a JSON object, as text
    labels: dict[str, str] = field(default_factory=dict)
    policy: TaskPolicy = field(default_factory=TaskPolicy)
    misfire: MisfirePolicy = MisfirePolicy.RUN_ONCE
    overlap: OverlapPolicy = OverlapPolicy.SKIP
    paused: bool = False
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    last_fire_time: datetime | None = None  # the last occurrence that came due (or a trigger)
    next_fire_time: datetime | None = None  # None when paused or when the rule has ended
    last_task_id: TaskId | None = None
    last_outcome: str = ""
    # start a run of this workflow (with `input` as its input) instead of a task;
    # `agent` is then empty and `labels` and `policy` are not used.
    workflow: str = ""


def copy_schedule(s: Schedule) -> Schedule:
    """A copy that shares no mutable state with `s`."""
    return replace(
        s,
        labels=dict(s.labels),
        policy=s.policy.copy(),
    )


def occurrence_key(name: str, occurrence: datetime) -> str:
    """The idempotency key of the task an occurrence creates: the same across restarts."""
    return f"schedule:{name}:{format_utc(occurrence)}"


def format_utc(value: datetime) -> str:
    """`2026-03-29T00:00:00Z` (occurrences are whole seconds)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- validation ------------------------------------------------------------------------------


def validate_schedule_name(name: str, field: str = "name") -> str:
    if not name:
        raise InvalidArgument("must not be empty", field=field)
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{quoted(name)} is not a valid schedule name (lower case letters, digits, '_' or '-', "
            "starting with a letter, at most 64)",
            field=field,
        )
    return name


def parse_timezone(name: str, field: str = "timezone") -> ZoneInfo:
    if not name:
        raise InvalidArgument(
            "must name an IANA time zone, such as Europe/Chisinau, America/New_York or UTC",
            field=field,
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidArgument(
            f"{quoted(name)} is not a known IANA time zone (such as Europe/Chisinau, "
            "America/New_York or UTC)",
            field=field,
        ) from None


def validate_schedule(s: Schedule, now: datetime, prefix: str = "") -> Schedule:
    """Check a schedule as submitted and return it in canonical form.

    The canonical RRULE carries its DTSTART (pinned to `now`, to the minute, when none was
    given), so its occurrences never change after creation. Raises InvalidArgument naming the
    field, also when the rule has no occurrence after `now`.
    """
    p = prefix
    name = validate_schedule_name(s.name, f"{p}name")
    if s.workflow:
        if s.agent:
            raise InvalidArgument(
                "must be empty when the schedule starts a workflow (give agent or workflow)",
                field=f"{p}agent",
            )
        if not re.fullmatch(r"[a-z]([a-z0-9_-]{0,61}[a-z0-9])?", s.workflow):
            raise InvalidArgument(
                f"{quoted(s.workflow)} is not a workflow name", field=f"{p}workflow"
            )
        agent = ""
    else:
        agent = validate_agent_name(s.agent, f"{p}agent")
    text, _ = validate_input(s.input, f"{p}input_json")
    labels = validate_labels(s.labels, f"{p}labels")
    if s.policy.idempotency_key:
        raise InvalidArgument(
            "must be empty: each occurrence gets its own key (schedule:NAME:TIME)",
            field=f"{p}policy.idempotency_key",
        )
    policy = validate_policy(s.policy, f"{p}policy")
    cron, rrule_text, rule = validate_rule(s.cron, s.rrule, s.timezone, now, prefix)
    if rule.next_after(now) is None:
        raise InvalidArgument(
            f"has no occurrence after {format_utc(now)} (its COUNT or UNTIL has passed)",
            field=f"{p}cron" if cron else f"{p}rrule",
        )
    return replace(
        s,
        name=name,
        agent=agent,
        input=text,
        labels=labels,
        policy=policy,
        cron=cron,
        rrule=rrule_text,
        timezone=s.timezone,
        misfire=MisfirePolicy(s.misfire),
        overlap=OverlapPolicy(s.overlap),
    )


def validate_rule(
    cron: str, rrule_text: str, timezone: str, now: datetime, prefix: str = ""
) -> tuple[str, str, Rule]:
    """Check exactly one of cron and rrule in `timezone`: (cron, canonical rrule, its Rule)."""
    p = prefix
    zone = parse_timezone(timezone, f"{p}timezone")
    cron, rrule_text = cron.strip(), rrule_text.strip()
    if cron and rrule_text:
        raise InvalidArgument("give either cron or rrule, not both", field=f"{p}rrule")
    if not cron and not rrule_text:
        raise InvalidArgument("give a cron expression or an rrule", field=f"{p}cron")
    if cron:
        return cron, "", compile_cron(cron, zone, f"{p}cron")
    rrule_text = canonical_rrule(rrule_text, zone, now, f"{p}rrule")
    return "", rrule_text, compile_rrule(rrule_text, zone, f"{p}rrule")


# --- rules -----------------------------------------------------------------------------------

WallAfter = Callable[[datetime], datetime | None]


class Rule:
    """A compiled cron expression or RRULE in its zone: when it fires, as UTC instants."""

    def __init__(self, zone: ZoneInfo, wall_after: WallAfter) -> None:
        self.zone = zone
        self._wall_after = wall_after  # the next wall time strictly after a naive wall time

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire time strictly after `after` (aware), or None when the rule has ended."""
        wall = after.astimezone(self.zone).replace(tzinfo=None)
        while True:
            nxt = self._wall_after(wall)
            if nxt is None:
                return None
            instant = place(nxt, self.zone)
            if instant > after:
                return instant
            # a wall time of a repeated hour already passed (its first instant is behind us)
            wall = nxt

    def occurrences(self, after: datetime) -> Iterator[datetime]:
        """Fire times strictly after `after`, in order, each instant once."""
        current: datetime | None = after
        while current is not None:
            current = self.next_after(current)
            if current is not None:
                yield current

    def latest_due(self, since: datetime, now: datetime) -> datetime | None:
        """The last fire time in [since, now], or None when there is none.

        Searches backwards from `now` in growing windows, so a long outage costs a few steps,
        not one per missed occurrence.
        """
        if since > now:
            return None
        floor = since - timedelta(microseconds=1)
        window = timedelta(minutes=1)
        while True:
            start = max(floor, now - window)
            first = self.next_after(start)
            if first is not None and first <= now:
                latest = first
                while (nxt := self.next_after(latest)) is not None and nxt <= now:
                    latest = nxt
                return latest
            if start == floor:
                return None
            window *= 8


def next_fire_times(
    schedule: Schedule, after: datetime, count: int, rule: Rule | None = None
) -> list[datetime]:
    """The next `count` fire times of `schedule` strictly after `after`, as UTC instants."""
    rule = rule or compile_schedule(schedule)
    out: list[datetime] = []
    for instant in rule.occurrences(after):
        out.append(instant)
        if len(out) >= count:
            break
    return out


def compile_schedule(s: Schedule) -> Rule:
    """The rule of a schedule that was validated before (raises InvalidArgument otherwise)."""
    zone = parse_timezone(s.timezone)
    if s.cron:
        return compile_cron(s.cron, zone)
    return compile_rrule(s.rrule, zone)


def place(wall: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant at which the naive wall time `wall` of `zone` fires (see module doc)."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first  # exists; when it exists twice, fold=0 is its first instant
    # In a gap: fold=0 read it with the offset before the transition, fold=1 with the one after.
    # The transition lies between the two readings; find it to the second.
    lo = int(wall.replace(tzinfo=zone, fold=1).astimezone(UTC).timestamp())
    hi = int(first.timestamp())
    after_offset = _offset(hi, zone)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(mid, zone) == after_offset:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _offset(ts: int, zone: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(ts, UTC).astimezone(zone).utcoffset()


# --- cron ------------------------------------------------------------------------------------


def compile_cron(expr: str, zone: ZoneInfo, field: str = "cron") -> Rule:
    """5 fields (minute hour day-of-month month day-of-week), names allowed, or an @macro."""
    from croniter import CroniterError, croniter

    if len(expr) > MAX_RULE_CHARS:
        raise InvalidArgument(f"is longer than {MAX_RULE_CHARS} characters", field=field)
    text = _CRON_MACROS.get(expr.lower(), expr)
    fields = text.split()
    if len(fields) != 5:
        raise InvalidArgument(
            f"{quoted(expr)} has {len(fields)} fields; a cron expression has 5: minute hour "
            "day-of-month month day-of-week (e.g. '30 8 * * MON-FRI')",
            field=field,
        )
    try:
        croniter.expand(text, strict=True)
        croniter(text, datetime(2000, 1, 1))
    except (CroniterError, ValueError, KeyError, IndexError) as exc:
        raise InvalidArgument(
            f"{quoted(expr)} is not a valid cron expression: {exc}", field=field
        ) from None

    def wall_after(wall: datetime) -> datetime | None:
        try:
            nxt: datetime = croniter(text, wall).get_next(datetime)
        except CroniterError:  # no date ever matches
            return None
        return nxt

    return Rule(zone, wall_after)


# --- RRULE -----------------------------------------------------------------------------------

_DTSTART = re.compile(r"DTSTART(?P<params>(;[^:;]+)*):(?P<value>\S+)", re.IGNORECASE)
_DATE_TIME = re.compile(r"(\d{8})(T(\d{6})(Z?))?", re.IGNORECASE)
_PERIOD = {  # frequencies whose periods have a fixed length on the wall clock
    "SECONDLY": timedelta(seconds=1),
    "MINUTELY": timedelta(minutes=1),
    "HOURLY": timedelta(hours=1),
    "DAILY": timedelta(days=1),
    "WEEKLY": timedelta(weeks=1),
}


@dataclass(frozen=True, slots=True)
class _RRuleParts:
    dtstart: datetime | None  # naive wall time in the schedule's zone
    body: str  # the RRULE value: FREQ=...;...
    params: dict[str, str]


def _parse_dtstart(line: str, zone: ZoneInfo, field: str) -> datetime:
    match = _DTSTART.fullmatch(line)
    if match is None:
        raise InvalidArgument(f"{quoted(line)} is not a valid DTSTART line", field=field)
    tzid = ""
    for param in filter(None, match["params"].split(";")):
        key, _, value = param.partition("=")
        if key.upper() == "TZID":
            tzid = value
        elif key.upper() == "VALUE" and value.upper() in ("DATE", "DATE-TIME"):
            continue
        else:
            raise InvalidArgument(
                f"DTSTART parameter {quoted(param)} is not supported", field=field
            )
    value = match["value"]
    parsed = _DATE_TIME.fullmatch(value)
    if parsed is None:
        raise InvalidArgument(
            f"DTSTART {quoted(value)} is not a date-time like 20260301T083000 (local), "
            "20260301T063000Z (UTC) or a date like 20260301",
            field=field,
        )
    try:
        wall = datetime.strptime(parsed[1] + (parsed[3] or "000000"), "%Y%m%d%H%M%S")
    except ValueError:
        raise InvalidArgument(
            f"DTSTART {quoted(value)} is not a real date and time", field=field
        ) from None
    if parsed[4]:  # UTC: read it as the wall time of the schedule's zone
        if tzid:
            raise InvalidArgument("DTSTART must not have both TZID and a Z suffix", field=field)
        return wall.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None)
    if tzid and tzid != zone.key:
        raise InvalidArgument(
            f"DTSTART has TZID {tzid}, but the schedule's timezone is {zone.key}: "
            "give the same zone, UTC (a Z suffix), or no zone",
            field=field,
        )
    return wall


def _split_rrule(text: str, zone: ZoneInfo, field: str) -> _RRuleParts:
    """Read `[DTSTART...] [RRULE:]FREQ=...` (lines separated by newlines or spaces)."""
    if len(text) > MAX_RULE_CHARS:
        raise InvalidArgument(f"is longer than {MAX_RULE_CHARS} characters", field=field)
    dtstart: datetime | None = None
    body = ""
    for line in text.split():
        upper = line.upper()
        if upper.startswith("DTSTART"):
            if dtstart is not None:
                raise InvalidArgument("has more than one DTSTART", field=field)
            dtstart = _parse_dtstart(line, zone, field)
        elif upper.startswith("RRULE:") or (":" not in line and "=" in line):
            if body:
                raise InvalidArgument("has more than one RRULE; give exactly one", field=field)
            body = line.split(":", 1)[1] if upper.startswith("RRULE:") else line
        else:
            name = re.split(r"[:;]", line, maxsplit=1)[0]
            raise InvalidArgument(
                f"{quoted(name)} is not supported: give an RRULE, optionally with a DTSTART line",
                field=field,
            )
    if not body:
        raise InvalidArgument("has no RRULE (e.g. FREQ=DAILY;BYHOUR=8;BYMINUTE=30)", field=field)
    params: dict[str, str] = {}
    for part in filter(None, body.split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise InvalidArgument(
                f"{quoted(part)} is not a NAME=VALUE part of an RRULE", field=field
            )
        if key.upper() in params:
            raise InvalidArgument(f"gives {key.upper()} more than once", field=field)
        params[key.upper()] = value
    return _RRuleParts(dtstart, body, params)


def canonical_rrule(text: str, zone: ZoneInfo, now: datetime, field: str = "rrule") -> str:
    """`DTSTART:<local wall time>` and `RRULE:<rule>` on two lines; DTSTART is `now` to the
    minute when the text has none, so the occurrences never drift."""
    parts = _split_rrule(text, zone, field)
    dtstart = parts.dtstart
    if dtstart is None:
        dtstart = now.astimezone(zone).replace(tzinfo=None, second=0, microsecond=0)
    return f"DTSTART:{dtstart:%Y%m%dT%H%M%S}\nRRULE:{parts.body}"


def compile_rrule(text: str, zone: ZoneInfo, field: str = "rrule") -> Rule:
    """An RFC 5545 RRULE (with DTSTART, COUNT or UNTIL) read on the wall clock of `zone`."""
    from dateutil.rrule import rrule, rrulestr

    parts = _split_rrule(text, zone, field)
    params = parts.params
    if "FREQ" not in params:
        raise InvalidArgument(
            "has no FREQ (one of SECONDLY, MINUTELY, HOURLY, DAILY, WEEKLY, MONTHLY, YEARLY)",
            field=field,
        )
    if "COUNT" in params and "UNTIL" in params:
        raise InvalidArgument("must not give both COUNT and UNTIL (RFC 5545)", field=field)
    for key in ("COUNT", "INTERVAL"):
        if key in params:
            value = params[key]
            if not value.isdigit() or int(value) < 1:
                raise InvalidArgument(
                    f"{key} must be a positive integer, got {quoted(value)}", field=field
                )
    if "COUNT" in params and int(params["COUNT"]) > MAX_RRULE_COUNT:
        raise InvalidArgument(f"COUNT must be at most {MAX_RRULE_COUNT}", field=field)
    body = parts.body
    if "UNTIL" in params:
        until = params["UNTIL"]
        parsed = _DATE_TIME.fullmatch(until)
        if parsed is None:
            raise InvalidArgument(
                f"UNTIL {quoted(until)} is not a date-time like 20261231T235959Z or a date",
                field=field,
            )
        if parsed[4]:  # UTC: the same instant as a wall time of the zone
            try:
                instant = datetime.strptime(parsed[1] + parsed[3], "%Y%m%d%H%M%S")
            except ValueError:
                raise InvalidArgument(
                    f"UNTIL {quoted(until)} is not a real date", field=field
                ) from None
            local = instant.replace(tzinfo=UTC).astimezone(zone)
            body = re.sub(r"(?i)UNTIL=[^;]*", f"UNTIL={local:%Y%m%dT%H%M%S}", body, count=1)
    dtstart = parts.dtstart or datetime(2000, 1, 1)
    try:
        parsed_rule = rrulestr(f"RRULE:{body}", dtstart=dtstart)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise InvalidArgument(f"is not a valid RFC 5545 RRULE: {exc}", field=field) from None
    if not isinstance(parsed_rule, rrule):
        raise InvalidArgument("must hold exactly one RRULE", field=field)
    return Rule(zone, _rrule_wall_after(parsed_rule, dtstart, params))


def _rrule_wall_after(rule: rrule, dtstart: datetime, params: dict[str, str]) -> WallAfter:
    """Next wall time after a wall time, without walking every occurrence since DTSTART.

    A COUNT rule is expanded once (at most MAX_RRULE_COUNT) and searched by bisection. A
    rule of a fixed period (SECONDLY to WEEKLY) without COUNT restarts at the last period
    boundary before the asked time: the same occurrences, a few steps away.
    """
    if "COUNT" in params:
        expanded: list[datetime] = []

        def bisected(wall: datetime) -> datetime | None:
            if not expanded:
                expanded.extend(rule)
            i = bisect.bisect_right(expanded, wall)
            return expanded[i] if i < len(expanded) else None

        return bisected

    period = _PERIOD.get(params["FREQ"].upper())
    if period is None:
        return lambda wall: rule.after(wall)
    step = period * int(params.get("INTERVAL", "1"))

    def rebased(wall: datetime) -> datetime | None:
        periods = (wall - dtstart) // step
        start = dtstart + periods * step if periods > 0 else dtstart
        base = rule if start == dtstart else rule.replace(dtstart=start)
        return base.after(wall)

    return rebased
