"""`taskrun schedule ...` parsing and output, without a server."""

from __future__ import annotations

import argparse
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from taskrun.cli import main as cli
from taskrun.cli import schedule_cmd
from taskrun.core.errors import InvalidArgument
from taskrun.core.models import ModelSettings, TaskPolicy
from taskrun.core.schedule import MisfirePolicy, OverlapPolicy, Schedule


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser(argv).parse_args(list(argv))


def test_create_flags_make_the_schedule(tmp_path: Path) -> None:
    task_file = tmp_path / "task.json"
    task_file.write_text('{"prompt": "summarise"}')
    args = parse(
        "schedule",
        "create",
        "monthly",
        "--agent",
        "claude_code",
        "--input-file",
        str(task_file),
        "--rrule",
        "FREQ=MONTHLY;BYDAY=-1FR;BYHOUR=17;BYMINUTE=0",
        "--timezone",
        "America/New_York",
        "--misfire",
        "skip",
        "--overlap",
        "cancel_previous",
        "--label",
        "team=docs",
        "--priority",
        "2",
        "--timeout",
        "600",
        "--require-label",
        "gpu=a100",
        "--paused",
    )
    assert args.func is schedule_cmd.cmd_create
    s = schedule_cmd.schedule_from_args(args)
    assert s == Schedule(
        name="monthly",
        agent="claude_code",
        timezone="America/New_York",
        rrule="FREQ=MONTHLY;BYDAY=-1FR;BYHOUR=17;BYMINUTE=0",
        input='{"prompt": "summarise"}',
        labels={"team": "docs"},
        policy=TaskPolicy(
            priority=2, timeout=600.0, max_attempts=0, required_labels={"gpu": "a100"}
        ),
        misfire=MisfirePolicy.SKIP,
        overlap=OverlapPolicy.CANCEL_PREVIOUS,
        paused=True,
        created_at=s.created_at,
        updated_at=s.updated_at,
    )


def test_create_takes_the_model_flags_for_its_tasks() -> None:
    args = parse(
        "schedule", "create", "nightly", "--agent", "claude_code", "--cron", "@daily",
        "--tz", "UTC", "--max-cost", "2.5", "--append-system-prompt", "Be careful.",
        "--disallowed-tool", "Bash",
    )  # fmt: skip
    policy = schedule_cmd.schedule_from_args(args).policy
    assert policy.max_cost_usd == 2.5
    assert policy.model_settings.append_system_prompt == "Be careful."
    assert policy.model_settings.disallowed_tools == ["Bash"]


def test_create_defaults_to_run_once_and_skip() -> None:
    args = parse("schedule", "create", "b", "--agent", "echo", "--cron", "@daily", "--tz", "UTC")
    s = schedule_cmd.schedule_from_args(args)
    assert (s.misfire, s.overlap, s.input, s.paused) == (
        MisfirePolicy.RUN_ONCE,
        OverlapPolicy.SKIP,
        "{}",
        False,
    )


def test_create_with_a_workflow_makes_a_workflow_schedule() -> None:
    args = parse(
        "schedule", "create", "m", "--workflow", "morning-briefing", "--input", '{"city": "Oslo"}',
        "--cron", "30 7 * * MON-FRI", "--tz", "Europe/Oslo",
    )  # fmt: skip
    s = schedule_cmd.schedule_from_args(args)
    assert (s.workflow, s.agent, s.input) == ("morning-briefing", "", '{"city": "Oslo"}')


@pytest.mark.parametrize(
    "argv",
    [
        ["--agent", "echo", "--timezone", "UTC"],  # no rule
        ["--agent", "echo", "--cron", "* * * * *", "--rrule", "FREQ=DAILY", "--tz", "UTC"],
        ["--cron", "* * * * *", "--tz", "UTC"],  # no agent
        ["--agent", "echo", "--cron", "* * * * *", "--tz", "UTC", "--overlap", "queue"],
        ["--agent", "echo", "--workflow", "w", "--cron", "* * * * *"],
    ],
    ids=["no_rule", "both_rules", "no_agent", "bad_overlap", "agent_and_workflow"],
)
def test_create_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse("schedule", "create", "x", *argv)
    assert info.value.code == 2


def test_create_rejects_bad_input_locally() -> None:
    args = parse(
        "schedule", "create", "x", "--agent", "echo", "--cron", "@daily", "--tz", "UTC",
        "--input", "[1, 2]",
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match="JSON object"):
        schedule_cmd.schedule_from_args(args)


CURRENT = Schedule(
    name="b",
    agent="echo",
    timezone="UTC",
    cron="@daily",
    policy=TaskPolicy(priority=1, max_attempts=5, required_labels={"zone": "eu"}),
)


def test_update_changes_only_the_fields_given() -> None:
    args = parse("schedule", "update", "b", "--rrule", "FREQ=HOURLY", "--priority", "9")
    assert args.func is schedule_cmd.cmd_update
    changed, fields = schedule_cmd.update_from_args(args, CURRENT)
    assert fields == ["rrule", "policy"]
    assert changed.rrule == "FREQ=HOURLY"
    assert changed.policy == TaskPolicy(priority=9, max_attempts=5, required_labels={"zone": "eu"})
    assert (changed.agent, changed.timezone) == ("echo", "UTC")


def test_update_takes_the_model_flags_changing_only_those_given(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    current = replace(
        CURRENT,
        policy=TaskPolicy(
            priority=3,
            max_cost_usd=1.0,
            model_settings=ModelSettings(
                system_prompt="Be brief.", temperature=0.2, disallowed_tools=["Bash"]
            ),
        ),
    )
    args = parse(
        "schedule", "update", "b", "--max-cost", "2.5", "--output-schema", str(schema),
        "--allowed-tool", "Read", "--allowed-tool", "Grep", "--max-tokens", "300",
    )  # fmt: skip
    changed, fields = schedule_cmd.update_from_args(args, current)
    assert fields == ["policy"]
    policy = changed.policy
    assert (policy.max_cost_usd, policy.output_schema) == (2.5, '{"type": "object"}')
    settings = policy.model_settings
    assert settings.allowed_tools == ["Read", "Grep"] and settings.max_tokens == 300
    # what was not given stays
    assert policy.priority == 3 and settings.system_prompt == "Be brief."
    assert settings.temperature == 0.2 and settings.disallowed_tools == ["Bash"]
    assert current.policy.model_settings.allowed_tools == []  # the current one is untouched

    # '' and 0 clear; a repeated flag given replaces its whole list
    args = parse(
        "schedule", "update", "b", "--system", "", "--max-cost", "0", "--disallowed-tool", "",
    )  # fmt: skip
    cleared = schedule_cmd.update_from_args(args, current)[0].policy
    assert cleared.max_cost_usd == 0 and cleared.model_settings.system_prompt == ""
    assert cleared.model_settings.disallowed_tools == []
    assert cleared.priority == 3
    assert cleared.model_settings.temperature == 0.2  # not given: kept

    # a temperature of 0 is a temperature; '' returns to the agent's default
    zero = schedule_cmd.update_from_args(
        parse("schedule", "update", "b", "--temperature", "0"), current
    )
    assert zero[0].policy.model_settings.temperature == 0.0
    default = schedule_cmd.update_from_args(
        parse("schedule", "update", "b", "--temperature", ""), current
    )
    assert default[0].policy.model_settings.temperature is None
    with pytest.raises(InvalidArgument, match="'warm' is not a number") as bad:
        schedule_cmd.update_from_args(
            parse("schedule", "update", "b", "--temperature", "warm"), current
        )
    assert bad.value.field == "--temperature"


def test_update_without_flags_is_an_error() -> None:
    with pytest.raises(InvalidArgument, match="at least one field"):
        schedule_cmd.update_from_args(parse("schedule", "update", "b"), CURRENT)


@pytest.mark.parametrize("command", ["list", "get b", "pause b", "resume b", "delete b"])
def test_read_and_state_commands_parse(command: str) -> None:
    args = parse("schedule", *command.split())
    assert args.func.__module__ == "taskrun.cli.schedule_cmd"


def test_next_and_task_list_by_schedule_parse() -> None:
    assert parse("schedule", "next", "b", "--count", "7").count == 7
    assert parse("task", "list", "--schedule", "b").schedule == "b"


def test_local_times_show_the_zone_offset_and_utc() -> None:
    ny = ZoneInfo("America/New_York")
    assert (
        schedule_cmd.format_local(datetime(2026, 3, 8, 7, tzinfo=UTC), ny)
        == "2026-03-08 03:00:00 -04:00 (2026-03-08 07:00:00 UTC)"
    )
    assert schedule_cmd.format_local(None, ny) == "-"


def test_schedule_json_document_embeds_the_input() -> None:
    doc = schedule_cmd.schedule_doc(
        Schedule(name="b", agent="echo", timezone="UTC", cron="@daily", input='{"a": 1}')
    )
    assert doc["input"] == {"a": 1}
    assert doc["misfire"] == "run_once" and doc["overlap"] == "skip"
    assert doc["next_fire_time"] is None


def test_create_reads_the_rule_in_utc_when_no_timezone_is_given() -> None:
    args = parse("schedule", "create", "b", "--agent", "echo", "--cron", "@daily")
    assert schedule_cmd.schedule_from_args(args).timezone == "UTC"


def test_update_without_timezone_keeps_the_schedules_zone() -> None:
    args = parse("schedule", "update", "b", "--cron", "@hourly")
    assert args.timezone is None


@pytest.mark.parametrize(
    "argv",
    [
        ["task", "create", "echo"],
        ["schedule", "create", "b", "--agent", "echo", "--cron", "@daily"],
    ],
    ids=["task", "schedule"],
)
def test_max_attempts_0_is_refused_instead_of_becoming_the_default(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv, "--max-attempts", "0")
    assert info.value.code == 2
    assert "0 is too small: a task needs at least 1 attempt" in capsys.readouterr().err
