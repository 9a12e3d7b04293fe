"""Schedules in the domain: parsing cron and RRULE, next fire times, and DST, on fixed instants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from taskrun.core.errors import InvalidArgument
from taskrun.core.models import TaskPolicy
from taskrun.core.schedule import (
    MAX_RRULE_COUNT,
    Schedule,
    compile_schedule,
    next_fire_times,
    occurrence_key,
    place,
    validate_schedule,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def sched(
    cron: str = "", rrule: str = "", tz: str = "UTC", now: datetime = NOW, **fields: object
) -> Schedule:
    """A validated schedule (as the server stores it)."""
    s = Schedule(name="s", agent="echo", timezone=tz, cron=cron, rrule=rrule)
    for key, value in fields.items():
        setattr(s, key, value)
    return validate_schedule(s, now)


def fires(s: Schedule, after: datetime, count: int = 3) -> list[datetime]:
    return next_fire_times(s, after, count)


def local(values: list[datetime], tz: str) -> list[str]:
    return [v.astimezone(ZoneInfo(tz)).isoformat() for v in values]


# --- cron ------------------------------------------------------------------------------------


def test_cron_with_names_fires_on_weekdays_in_its_zone() -> None:
    s = sched("30 8 * * MON-FRI", tz="Europe/Chisinau")
    # 2026-01-02 is a Friday; the weekend is skipped.
    assert local(fires(s, utc(2026, 1, 1, 12)), "Europe/Chisinau") == [
        "2026-01-02T08:30:00+02:00",
        "2026-01-05T08:30:00+02:00",
        "2026-01-06T08:30:00+02:00",
    ]


def test_cron_month_names_and_macros() -> None:
    assert fires(sched("0 6 1 JAN,jul *"), NOW, 2) == [utc(2026, 7, 1, 6), utc(2027, 1, 1, 6)]
    assert fires(sched("@daily"), NOW, 2) == [utc(2026, 1, 2), utc(2026, 1, 3)]
    assert fires(sched("@hourly"), NOW, 1) == [utc(2026, 1, 1, 13)]


def test_fire_times_are_strictly_after_the_given_instant() -> None:
    s = sched("*/15 * * * *")
    after_quarter = fires(s, utc(2026, 1, 1, 12, 15), 2)
    assert after_quarter == [utc(2026, 1, 1, 12, 30), utc(2026, 1, 1, 12, 45)]
    at = utc(2026, 1, 1, 12, 14, 59) + timedelta(microseconds=999_999)
    assert fires(s, at, 1) == [utc(2026, 1, 1, 12, 15)]


def test_last_friday_of_the_month_at_17_as_rrule_and_as_cron() -> None:
    rule = "FREQ=MONTHLY;BYDAY=-1FR;BYHOUR=17;BYMINUTE=0"
    expected = [
        "2026-01-30T17:00:00-05:00",
        "2026-02-27T17:00:00-05:00",
        "2026-03-27T17:00:00-04:00",  # after the switch to EDT: still 17:00 local
        "2026-04-24T17:00:00-04:00",
    ]
    by_rrule = sched(rrule=rule, tz="America/New_York")
    by_cron = sched("0 17 * * L5", tz="America/New_York")
    assert local(fires(by_rrule, NOW, 4), "America/New_York") == expected
    assert local(fires(by_cron, NOW, 4), "America/New_York") == expected


# --- RRULE -----------------------------------------------------------------------------------


def test_rrule_without_dtstart_is_pinned_to_creation_to_the_minute() -> None:
    s = sched(rrule="FREQ=DAILY", tz="Europe/Chisinau", now=utc(2026, 1, 1, 12, 34, 56))
    assert s.rrule == "DTSTART:20260101T143400\nRRULE:FREQ=DAILY"
    assert fires(s, utc(2026, 1, 1, 12, 34, 56), 2) == [
        utc(2026, 1, 2, 12, 34),
        utc(2026, 1, 3, 12, 34),
    ]
    # the pinned DTSTART keeps the occurrences stable whenever they are computed again
    assert compile_schedule(s).next_after(utc(2026, 6, 1)) == utc(2026, 6, 1, 11, 34)


@pytest.mark.parametrize(
    "text",
    [
        "DTSTART:20260105T090000\nRRULE:FREQ=WEEKLY;BYDAY=MO,WE",
        "DTSTART;TZID=America/New_York:20260105T090000 RRULE:FREQ=WEEKLY;BYDAY=MO,WE",
        "DTSTART:20260105T140000Z\nFREQ=WEEKLY;BYDAY=MO,WE",
    ],
    ids=["local", "tzid", "utc"],
)
def test_rrule_dtstart_forms_mean_the_same_wall_time(text: str) -> None:
    s = sched(rrule=text, tz="America/New_York")
    assert s.rrule == "DTSTART:20260105T090000\nRRULE:FREQ=WEEKLY;BYDAY=MO,WE"
    assert local(fires(s, NOW, 3), "America/New_York") == [
        "2026-01-05T09:00:00-05:00",
        "2026-01-07T09:00:00-05:00",
        "2026-01-12T09:00:00-05:00",
    ]


def test_rrule_count_ends_the_schedule() -> None:
    s = sched(rrule="DTSTART:20260102T080000\nRRULE:FREQ=DAILY;COUNT=3")
    assert fires(s, NOW, 5) == [utc(2026, 1, 2, 8), utc(2026, 1, 3, 8), utc(2026, 1, 4, 8)]
    assert compile_schedule(s).next_after(utc(2026, 1, 4, 8)) is None


def test_rrule_until_in_utc_is_the_same_instant_in_the_zone() -> None:
    text = "DTSTART:20260102T090000\nRRULE:FREQ=DAILY;UNTIL=20260104T070000Z"
    s = sched(rrule=text, tz="Europe/Chisinau")  # 07:00Z is 09:00 local: the last one counts
    assert local(fires(s, NOW, 5), "Europe/Chisinau") == [
        "2026-01-02T09:00:00+02:00",
        "2026-01-03T09:00:00+02:00",
        "2026-01-04T09:00:00+02:00",
    ]


def test_per_second_rrule_far_from_dtstart_is_computed_without_walking_every_second() -> None:
    s = sched(rrule="FREQ=SECONDLY;INTERVAL=7")
    rule = compile_schedule(s)
    far = utc(2031, 6, 1)  # 170 million seconds after DTSTART
    nxt = rule.next_after(far)
    assert nxt is not None and far < nxt <= far + timedelta(seconds=7)
    assert (nxt - NOW).total_seconds() % 7 == 0
    assert rule.latest_due(NOW, far) == nxt - timedelta(seconds=7)


def test_latest_due_finds_the_last_occurrence_of_a_long_outage() -> None:
    rule = compile_schedule(sched("0 9 * * *"))
    assert rule.latest_due(utc(2026, 1, 2, 9), utc(2026, 3, 1, 8)) == utc(2026, 2, 28, 9)
    assert rule.latest_due(utc(2026, 1, 2, 9), utc(2026, 1, 2, 9)) == utc(2026, 1, 2, 9)
    assert rule.latest_due(utc(2026, 1, 2, 9), utc(2026, 1, 2, 8)) is None


# --- DST -------------------------------------------------------------------------------------

# (zone, after, daily wall time, expected local fire times): each spring-forward night fires once
# at the first instant after the gap; each fall-back night fires once, at the earlier instant.
DST_CASES = {
    "chisinau_spring_forward": (
        "Europe/Chisinau",
        utc(2026, 3, 28, 12),
        "30 2 * * *",
        ["2026-03-29T03:00:00+03:00", "2026-03-30T02:30:00+03:00"],
    ),
    "chisinau_fall_back": (
        "Europe/Chisinau",
        utc(2026, 10, 24, 12),
        "30 2 * * *",
        ["2026-10-25T02:30:00+03:00", "2026-10-26T02:30:00+02:00"],
    ),
    "new_york_spring_forward": (
        "America/New_York",
        utc(2026, 3, 7, 12),
        "30 2 * * *",
        ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
    ),
    "new_york_fall_back": (
        "America/New_York",
        utc(2026, 10, 31, 12),
        "30 1 * * *",
        ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
    ),
    "sydney_fall_back": (
        "Australia/Sydney",
        utc(2026, 4, 4, 0),
        "30 2 * * *",
        ["2026-04-05T02:30:00+11:00", "2026-04-06T02:30:00+10:00"],
    ),
    "sydney_spring_forward": (
        "Australia/Sydney",
        utc(2026, 10, 3, 0),
        "30 2 * * *",
        ["2026-10-04T03:00:00+11:00", "2026-10-05T02:30:00+11:00"],
    ),
}


@pytest.mark.parametrize("case", list(DST_CASES))
def test_daily_cron_across_dst_fires_once_per_day(case: str) -> None:
    tz, after, cron, expected = DST_CASES[case]
    assert local(fires(sched(cron, tz=tz), after, 2), tz) == expected


@pytest.mark.parametrize("case", list(DST_CASES))
def test_daily_rrule_across_dst_fires_once_per_day(case: str) -> None:
    tz, after, cron, expected = DST_CASES[case]
    minute, hour = cron.split()[:2]
    rule = f"DTSTART:20260101T000000\nRRULE:FREQ=DAILY;BYHOUR={hour};BYMINUTE={minute}"
    s = sched(rrule=rule, tz=tz)
    assert local(fires(s, after, 2), tz) == expected


def test_times_inside_the_gap_collapse_into_one_fire_time() -> None:
    # every 15 minutes across New York's 02:00 -> 03:00: 02:00..02:45 do not exist.
    s = sched("*/15 * * * *", tz="America/New_York")
    assert local(fires(s, utc(2026, 3, 8, 6, 40), 4), "America/New_York") == [
        "2026-03-08T01:45:00-05:00",
        "2026-03-08T03:00:00-04:00",
        "2026-03-08T03:15:00-04:00",
        "2026-03-08T03:30:00-04:00",
    ]


def test_the_repeated_hour_fires_once_per_wall_time() -> None:
    # every 30 minutes across Chisinau's 03:00 -> 02:00: 02:00 and 02:30 exist twice.
    s = sched("*/30 * * * *", tz="Europe/Chisinau")
    assert local(fires(s, utc(2026, 10, 24, 22, 10), 5), "Europe/Chisinau") == [
        "2026-10-25T01:30:00+03:00",
        "2026-10-25T02:00:00+03:00",
        "2026-10-25T02:30:00+03:00",
        "2026-10-25T03:00:00+02:00",
        "2026-10-25T03:30:00+02:00",
    ]


def test_asking_from_inside_the_second_pass_of_a_repeated_hour() -> None:
    s = sched("*/30 * * * *", tz="Europe/Chisinau")
    second_pass = utc(2026, 10, 25, 0, 10)  # 02:10 EET, the second time 02:10 happens
    assert local(fires(s, second_pass, 2), "Europe/Chisinau") == [
        "2026-10-25T03:00:00+02:00",
        "2026-10-25T03:30:00+02:00",
    ]


def test_place_puts_a_gap_time_at_the_transition() -> None:
    zone = ZoneInfo("America/New_York")
    assert place(datetime(2026, 3, 8, 2, 30), zone) == utc(2026, 3, 8, 7)
    assert place(datetime(2026, 11, 1, 1, 30), zone) == utc(2026, 11, 1, 5, 30)
    assert place(datetime(2026, 7, 1, 12, 0), zone) == utc(2026, 7, 1, 16)


# --- validation ------------------------------------------------------------------------------


def test_valid_schedule_comes_back_canonical() -> None:
    s = Schedule(
        name="morning-brief",
        agent="echo",
        timezone="Europe/Chisinau",
        cron="  30 8 * * MON-FRI ",
        input="",
        policy=TaskPolicy(timeout=0),
    )
    got = validate_schedule(s, NOW)
    assert got.cron == "30 8 * * MON-FRI"
    assert got.input == "{}"
    assert got.policy.timeout is None


BAD: dict[str, tuple[dict[str, object], str, str]] = {
    "cron_four_fields": (dict(cron="* * * *"), "cron", "has 4 fields"),
    "cron_six_fields": (dict(cron="0 * * * * *"), "cron", "has 6 fields"),
    "cron_out_of_range": (dict(cron="61 * * * *"), "cron", "not a valid cron"),
    "cron_bad_name": (dict(cron="0 9 * * FUNDAY"), "cron", "not a valid cron"),
    "cron_never_matches": (dict(cron="0 0 30 2 *"), "cron", "can never occur"),
    "rrule_no_freq": (dict(rrule="BYDAY=MO"), "rrule", "has no FREQ"),
    "rrule_bad_freq": (dict(rrule="FREQ=FORTNIGHTLY"), "rrule", "not a valid RFC 5545"),
    "rrule_unknown_part": (dict(rrule="FREQ=DAILY;BYFOO=1"), "rrule", "not a valid RFC 5545"),
    "rrule_count_and_until": (
        dict(rrule="FREQ=DAILY;COUNT=2;UNTIL=20270101T000000Z"),
        "rrule",
        "both COUNT and UNTIL",
    ),
    "rrule_zero_interval": (dict(rrule="FREQ=DAILY;INTERVAL=0"), "rrule", "INTERVAL"),
    "rrule_huge_count": (
        dict(rrule=f"FREQ=SECONDLY;COUNT={MAX_RRULE_COUNT + 1}"),
        "rrule",
        "COUNT must be at most",
    ),
    "rrule_exdate": (
        dict(rrule="RRULE:FREQ=DAILY\nEXDATE:20260105T090000"),
        "rrule",
        "'EXDATE' is not supported",
    ),
    "rrule_two_rules": (dict(rrule="FREQ=DAILY\nRRULE:FREQ=HOURLY"), "rrule", "more than one"),
    "rrule_bad_dtstart": (dict(rrule="DTSTART:2026-01-01\nFREQ=DAILY"), "rrule", "DTSTART"),
    "rrule_other_zone": (
        dict(rrule="DTSTART;TZID=Europe/Paris:20260101T090000\nFREQ=DAILY"),
        "rrule",
        "TZID Europe/Paris",
    ),
    "rrule_already_over": (
        dict(rrule="DTSTART:20250101T090000\nRRULE:FREQ=DAILY;COUNT=3"),
        "rrule",
        "no occurrence after",
    ),
    "both_rules": (dict(cron="* * * * *", rrule="FREQ=DAILY"), "rrule", "not both"),
    "no_rule": (dict(), "cron", "give a cron expression or an rrule"),
    "unknown_zone": (dict(cron="* * * * *", timezone="Mars/Olympus"), "timezone", "not a known"),
    "zone_path": (dict(cron="* * * * *", timezone="../../etc/passwd"), "timezone", "not a known"),
    "empty_zone": (dict(cron="* * * * *", timezone=""), "timezone", "IANA"),
    "bad_name": (dict(cron="* * * * *", name="Morning Brief"), "name", "not a valid schedule"),
    "empty_name": (dict(cron="* * * * *", name=""), "name", "must not be empty"),
    "bad_agent": (dict(cron="* * * * *", agent="Echo!"), "agent", "not a valid agent"),
    "bad_input": (dict(cron="* * * * *", input="[1]"), "input_json", "JSON object"),
    "idempotency_key": (
        dict(cron="* * * * *", policy=TaskPolicy(idempotency_key="k")),
        "policy.idempotency_key",
        "must be empty",
    ),
    "bad_priority": (
        dict(cron="* * * * *", policy=TaskPolicy(priority=5000)),
        "policy.priority",
        "between",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_schedule_is_rejected_naming_the_field(case: str) -> None:
    fields, field, message = BAD[case]
    s = Schedule(name="s", agent="echo", timezone="UTC")
    for key, value in fields.items():
        setattr(s, key, value)
    with pytest.raises(InvalidArgument, match=message) as info:
        validate_schedule(s, NOW, prefix="schedule.")
    assert info.value.field == f"schedule.{field}"


def test_occurrence_key_is_the_utc_time_to_the_second() -> None:
    at = datetime(2026, 3, 29, 3, 0, tzinfo=ZoneInfo("Europe/Chisinau"))
    assert occurrence_key("morning-brief", at) == "schedule:morning-brief:2026-03-29T00:00:00Z"
