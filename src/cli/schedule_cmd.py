"""`taskrun schedule ...`: create, inspect, change, pause, trigger and delete schedules.

`register(subparsers)` adds the command group to the `taskrun` parser (src/cli/main.py); the
handlers reuse main's connection flags and client. Errors are raised as domain errors or gRPC
errors, which `taskrun`'s main turns into messages and exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from taskrun.cli import output
from taskrun.cli.client import Client
from taskrun.cli.model_opts import (
    add_model_arguments,
    apply_model_arguments,
    update_model_arguments,
)
from taskrun.cli.running import main_module as _cli
from taskrun.core.errors import InvalidArgument
from taskrun.core.models import Task, TaskPolicy
from taskrun.core.schedule import MisfirePolicy, OverlapPolicy, Schedule
from taskrun.core.validation import parse_label_args, validate_input

T = TypeVar("T")

SCHEDULE_HELP = (
    "Times are read on the wall clock of --timezone. A local time that does not exist (spring "
    "forward) fires once at the first instant after the gap; one that exists twice (fall back) "
    "fires once, the first time. --misfire: when the server was down at a fire time, run_once "
    "(default) runs the latest missed occurrence once, skip runs none. --overlap: when the "
    "previous task is unfinished, skip (default) creates nothing, allow creates anyway, "
    "cancel_previous cancels it first."
)


# --- parser ----------------------------------------------------------------------------------


def _policy_flags(p: argparse.ArgumentParser, *, update: bool) -> None:
    """Flags of the policy of the created tasks; on update None means "not given"."""
    cli = _cli()
    group = p.add_argument_group("policy of the tasks it creates")
    group.add_argument("--priority", type=int, default=None if update else 0, metavar="N")
    group.add_argument(
        "--timeout", type=cli.positive_float, metavar="S", help="run timeout in seconds"
    )
    group.add_argument(
        "--max-attempts",
        type=cli.attempts_arg,
        default=None if update else 0,  # 0 on the wire asks for the server's default
        metavar="N",
        help="at least 1 (default: the server's, 3)",
    )
    group.add_argument(
        "--require-label",
        action="append",
        metavar="K=V",
        help="only workers with this label run its tasks (repeat)",
    )
    group.add_argument(
        "--queue-timeout",
        type=cli.positive_float,
        metavar="S",
        help="fail a task if no worker takes it within S seconds",
    )
    group.add_argument(
        "--retry-on-failure",
        action="store_true",
        default=None if update else False,
        help="retry failed runs too, not only lost ones",
    )


def _rule_flags(p: argparse.ArgumentParser, *, update: bool) -> None:
    rule = p.add_mutually_exclusive_group(required=not update)
    rule.add_argument(
        "--cron",
        metavar="EXPR",
        help="5 fields: minute hour day-of-month month day-of-week, names allowed "
        "(e.g. '30 8 * * MON-FRI')",
    )
    rule.add_argument(
        "--rrule",
        metavar="RULE",
        help="an RFC 5545 RRULE, e.g. 'FREQ=MONTHLY;BYDAY=-1FR;BYHOUR=17;BYMINUTE=0' "
        "(optionally 'DTSTART:20260101T090000 RRULE:...'; COUNT and UNTIL allowed)",
    )
    p.add_argument(
        "--timezone",
        "--tz",
        default=None if update else "UTC",
        metavar="TZ",
        help="IANA time zone the rule is read in, e.g. Europe/Chisinau (default UTC)",
    )
    p.add_argument("--misfire", choices=("skip", "run_once"), default=None)
    p.add_argument("--overlap", choices=("allow", "skip", "cancel_previous"), default=None)


def _task_flags(p: argparse.ArgumentParser, *, update: bool) -> None:
    if update:
        p.add_argument("--agent", help="the agent of the tasks it creates")
    else:  # or a workflow it starts
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--agent", help="the agent of the tasks it creates")
        target.add_argument(
            "--workflow",
            metavar="NAME",
            help="start a run of this workflow instead (--input is the run's input)",
        )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="JSON", help="the task input, a JSON object")
    source.add_argument("--input-file", metavar="PATH", help="read the input from PATH (- = stdin)")
    p.add_argument(
        "--label",
        action="append",
        metavar="K=V",
        help="a label of its tasks (repeat)" + ("; replaces all labels" if update else ""),
    )


def register(subparsers: Any) -> None:
    """Add `schedule` and its commands to the `taskrun` parser."""
    cli = _cli()
    group = cli._group(subparsers, "schedule", "recurring tasks: cron or RRULE in a time zone")

    p = cli._leaf(
        group,
        "create",
        cmd_create,
        help="create a schedule",
        description="Create a schedule that creates a task at each occurrence of its rule.",
        epilog=SCHEDULE_HELP,
    )
    p.add_argument("name", metavar="NAME")
    _task_flags(p, update=False)
    _rule_flags(p, update=False)
    p.add_argument("--paused", action="store_true", help="create it paused")
    _policy_flags(p, update=False)
    add_model_arguments(p)
    cli._add_output(p)

    p = cli._leaf(
        group,
        "update",
        cmd_update,
        help="change a schedule (only the flags given)",
        description="Change the given fields of a schedule; its next occurrence is computed "
        "again from now.",
        epilog=SCHEDULE_HELP,
    )
    p.add_argument("name", metavar="NAME")
    _task_flags(p, update=True)
    _rule_flags(p, update=True)
    _policy_flags(p, update=True)
    add_model_arguments(p, update=True)
    cli._add_output(p)

    p = cli._leaf(group, "list", cmd_list, help="list schedules with their last and next fire")
    cli._add_output(p)
    p = cli._leaf(group, "get", cmd_get, help="show a schedule")
    p.add_argument("name", metavar="NAME")
    cli._add_output(p)
    p = cli._leaf(group, "pause", cmd_pause, help="stop creating tasks until resumed")
    p.add_argument("name", metavar="NAME")
    cli._add_output(p)
    p = cli._leaf(group, "resume", cmd_resume, help="fire again from the next occurrence after now")
    p.add_argument("name", metavar="NAME")
    cli._add_output(p)
    p = cli._leaf(group, "delete", cmd_delete, help="delete a schedule (its tasks stay)")
    p.add_argument("name", metavar="NAME")
    p = cli._leaf(
        group, "next", cmd_next, help="the next fire times, in the schedule's zone and UTC"
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--count", "-n", type=int, default=5, help="how many (default 5, at most 100)")
    cli._add_output(p)
    p = cli._leaf(
        group,
        "trigger",
        cmd_trigger,
        help="create one task now, outside the rhythm",
        description="Create one task of the schedule now and print its id (or, with "
        "--output json, the schedule and the task). The overlap policy does not apply.",
    )
    p.add_argument("name", metavar="NAME")
    cli._add_output(p)


# --- reading flags ---------------------------------------------------------------------------


def _input(args: argparse.Namespace) -> str | None:
    """The --input or --input-file text, validated; None when neither was given."""
    if args.input_file:
        try:
            text = sys.stdin.read() if args.input_file == "-" else Path(args.input_file).read_text()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read {args.input_file}: {exc.strerror}", field="--input-file"
            ) from None
    elif args.input is not None:
        text = args.input
    else:
        return None
    text, _ = validate_input(text, "input_json")
    return text


def _policy(args: argparse.Namespace, base: TaskPolicy) -> TaskPolicy:
    """`base` with the policy flags that were given."""
    changes: dict[str, Any] = {}
    for flag in ("priority", "timeout", "max_attempts", "queue_timeout", "retry_on_failure"):
        value = getattr(args, flag)
        if value is not None:
            changes[flag] = value
    if args.require_label is not None:
        changes["required_labels"] = parse_label_args(args.require_label, "policy.required_labels")
    return replace(base, **changes)


def schedule_from_args(args: argparse.Namespace) -> Schedule:
    """The schedule described by `schedule create` flags (the server validates the rest)."""
    return Schedule(
        name=args.name,
        agent=args.agent or "",
        workflow=getattr(args, "workflow", None) or "",
        timezone=args.timezone,
        cron=args.cron or "",
        rrule=args.rrule or "",
        input=_input(args) or "{}",
        labels=parse_label_args(args.label or [], "labels"),
        policy=apply_model_arguments(args, _policy(args, TaskPolicy(max_attempts=0))),
        misfire=MisfirePolicy[(args.misfire or "run_once").upper()],
        overlap=OverlapPolicy[(args.overlap or "skip").upper()],
        paused=args.paused,
    )


_POLICY_FLAGS = (
    "priority",
    "timeout",
    "max_attempts",
    "require_label",
    "queue_timeout",
    "retry_on_failure",
)


def update_from_args(args: argparse.Namespace, current: Schedule) -> tuple[Schedule, list[str]]:
    """The changed schedule and the fields (Schedule attribute names) the flags change."""
    fields: list[str] = []
    changes: dict[str, Any] = {}

    def change(name: str, value: Any) -> None:
        fields.append(name)
        changes[name] = value

    if args.agent is not None:
        change("agent", args.agent)
    text = _input(args)
    if text is not None:
        change("input", text)
    if args.label is not None:
        change("labels", parse_label_args(args.label, "labels"))
    if args.cron is not None:
        change("cron", args.cron)
    if args.rrule is not None:
        change("rrule", args.rrule)
    if args.timezone is not None:
        change("timezone", args.timezone)
    if args.misfire is not None:
        change("misfire", MisfirePolicy[args.misfire.upper()])
    if args.overlap is not None:
        change("overlap", OverlapPolicy[args.overlap.upper()])
    policy_given = any(getattr(args, f) is not None for f in _POLICY_FLAGS)
    policy = _policy(args, current.policy) if policy_given else current.policy
    with_model = update_model_arguments(args, policy)
    if policy_given or with_model is not None:
        change("policy", with_model or policy)
    if not fields:
        raise InvalidArgument("give at least one field to change (see --help)", field="update")
    return replace(current, **changes), fields


# --- output ----------------------------------------------------------------------------------


def schedule_doc(schedule: Schedule) -> dict[str, Any]:
    """The JSON document of a schedule: model field names, `input` embedded as JSON."""
    doc: dict[str, Any] = output.to_json_value(schedule)
    doc["input"] = output._embedded_json(schedule.input) or {}
    return doc


def _zone(schedule: Schedule) -> ZoneInfo | None:
    try:
        return ZoneInfo(schedule.timezone)
    except (ValueError, OSError):
        return None


def format_local(value: datetime | None, zone: ZoneInfo | None) -> str:
    """`2026-03-30 08:30:00 +03:00 (05:30:00 UTC)`; `-` for None."""
    if value is None:
        return output.NONE
    utc = value.astimezone(UTC)
    if zone is None or zone.key == "UTC":
        return utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    local = value.astimezone(zone)
    offset = local.strftime("%z")
    offset = f"{offset[:3]}:{offset[3:]}"
    return f"{local:%Y-%m-%d %H:%M:%S} {offset} ({utc:%Y-%m-%d %H:%M:%S} UTC)"


def rule_text(schedule: Schedule) -> str:
    """The cron expression, or the RRULE part of the rule (without its DTSTART)."""
    if schedule.cron:
        return schedule.cron
    lines = [ln for ln in schedule.rrule.split() if not ln.upper().startswith("DTSTART")]
    return " ".join(lines)


def _state(schedule: Schedule) -> str:
    if schedule.paused:
        return "paused"
    return "active" if schedule.next_fire_time else "ended"


def schedules_table(schedules: list[Schedule]) -> str:
    rows = []
    for s in schedules:
        zone = _zone(s)
        nxt = s.next_fire_time.astimezone(zone or UTC) if s.next_fire_time else None
        rows.append(
            (
                s.name,
                s.agent or f"workflow {s.workflow}",
                _state(s),
                rule_text(s),
                s.timezone,
                f"{nxt:%Y-%m-%d %H:%M:%S}" if nxt else output.NONE,
                output._one_line(s.last_outcome, 60) or output.NONE,
            )
        )
    return output.render_table(
        ("NAME", "AGENT", "STATE", "RULE", "TIMEZONE", "NEXT (LOCAL)", "LAST OUTCOME"), rows
    )


def schedule_detail(s: Schedule, now: datetime) -> str:
    zone = _zone(s)
    policy = s.policy
    fields = [
        ("Name", s.name),
        ("Workflow", s.workflow) if s.workflow else ("Agent", s.agent),
        ("State", _state(s)),
        ("Cron" if s.cron else "RRULE", s.cron or s.rrule.replace("\n", " ")),
        ("Timezone", s.timezone),
        ("Misfire", s.misfire.name.lower()),
        ("Overlap", s.overlap.name.lower()),
        ("Next fire", format_local(s.next_fire_time, zone)),
        ("Last fire", format_local(s.last_fire_time, zone)),
        ("Last task", s.last_task_id or output.NONE),
        ("Last outcome", s.last_outcome or output.NONE),
        ("Labels", output.format_labels(s.labels)),
        ("Input", output._one_line(s.input)),
        ("Created", output.format_when(s.created_at, now)),
        ("Updated", output.format_when(s.updated_at, now)),
    ]
    out = output.render_fields(fields)
    policy_fields = [
        ("priority", str(policy.priority)),
        ("timeout", output.format_duration(policy.timeout)),
        ("max attempts", str(policy.max_attempts)),
        ("queue timeout", output.format_duration(policy.queue_timeout)),
        ("retry on failure", "yes" if policy.retry_on_failure else "no"),
        ("required labels", output.format_labels(policy.required_labels)),
    ]
    return out + "Task policy:\n" + output.render_fields(policy_fields, indent="  ")


# --- commands --------------------------------------------------------------------------------


def _call(args: argparse.Namespace, fn: Callable[[Client], Awaitable[T]]) -> T:
    client: Client = _cli()._client(args)

    async def run() -> T:
        async with client:
            return await fn(client)

    return asyncio.run(run())


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _show(args: argparse.Namespace, schedule: Schedule, line: str) -> int:
    if args.output == "json":
        _write(output.dumps(schedule_doc(schedule)))
    else:
        _write(line + "\n")
    return 0


def _next_note(schedule: Schedule) -> str:
    if schedule.paused:
        return "paused"
    if schedule.next_fire_time is None:
        return "the rule has no further occurrence"
    return f"next at {format_local(schedule.next_fire_time, _zone(schedule))}"


def cmd_create(args: argparse.Namespace) -> int:
    schedule = schedule_from_args(args)
    created = _call(args, lambda c: c.create_schedule(schedule))
    return _show(args, created, f"schedule {created.name} created; {_next_note(created)}")


def cmd_update(args: argparse.Namespace) -> int:
    async def update(client: Client) -> Schedule:
        current = await client.get_schedule(args.name)
        changed, fields = update_from_args(args, current)
        return await client.update_schedule(changed, fields)

    updated = _call(args, update)
    return _show(args, updated, f"schedule {updated.name} updated; {_next_note(updated)}")


def cmd_list(args: argparse.Namespace) -> int:
    schedules = _call(args, lambda c: c.list_schedules())
    if args.output == "json":
        _write(output.dumps({"schedules": [schedule_doc(s) for s in schedules]}))
    elif schedules:
        _write(schedules_table(schedules))
    else:
        sys.stderr.write("no schedules\n")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    schedule = _call(args, lambda c: c.get_schedule(args.name))
    if args.output == "json":
        _write(output.dumps(schedule_doc(schedule)))
    else:
        _write(schedule_detail(schedule, datetime.now(UTC)))
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    schedule = _call(args, lambda c: c.pause_schedule(args.name))
    return _show(args, schedule, f"schedule {schedule.name} paused")


def cmd_resume(args: argparse.Namespace) -> int:
    schedule = _call(args, lambda c: c.resume_schedule(args.name))
    return _show(args, schedule, f"schedule {schedule.name} resumed; {_next_note(schedule)}")


def cmd_delete(args: argparse.Namespace) -> int:
    _call(args, lambda c: c.delete_schedule(args.name))
    _write(f"schedule {args.name} deleted\n")
    return 0


def cmd_next(args: argparse.Namespace) -> int:
    zone_name, times = _call(args, lambda c: c.preview_schedule(args.name, count=args.count))
    if args.output == "json":
        doc = {
            "name": args.name,
            "timezone": zone_name,
            "fire_times": [{"local": local, "utc": output.format_time(t)} for t, local in times],
        }
        _write(output.dumps(doc))
        return 0
    if not times:
        sys.stderr.write("the rule has no further occurrence\n")
        return 0
    rows = [
        (
            str(i),
            datetime.fromisoformat(local).strftime("%Y-%m-%d %H:%M:%S %a"),
            local[19:] or "+00:00",
            t.strftime("%Y-%m-%d %H:%M:%S"),
        )
        for i, (t, local) in enumerate(times, start=1)
    ]
    _write(output.render_table(("#", f"LOCAL ({zone_name})", "OFFSET", "UTC"), rows))
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    result: tuple[Schedule, Task] = _call(args, lambda c: c.trigger_schedule(args.name))
    schedule, task = result
    if args.output == "json":
        _write(output.dumps({"schedule": schedule_doc(schedule), "task": output.task_doc(task)}))
    else:
        _write(f"{task.id}\n")
    return 0
