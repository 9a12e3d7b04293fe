"""What a task asks of its model, checked at submission; structured answers checked and parsed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from taskrun import convert
from taskrun.core.errors import InvalidArgument
from taskrun.core.models import ModelSettings, TaskPolicy
from taskrun.core.output_schema import exhausted, parse_reply, schema_violations
from taskrun.core.run_options import validate_model_settings, validate_output_schema
from taskrun.core.validation import validate_policy
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2 as wpb
from tests.unit.test_core import MODEL_SETTING_SAMPLES

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def test_a_schema_is_kept_as_compact_json_and_empty_means_none() -> None:
    assert validate_output_schema(json.dumps(SCHEMA, indent=4), "f") == json.dumps(
        SCHEMA, separators=(",", ":")
    )
    assert validate_output_schema("  ", "f") == ""


def test_mcp_servers_take_the_plain_and_the_file_form() -> None:
    plain = {"db": {"command": "db-mcp", "args": ["--ro"]}, "web": {"type": "http", "url": "u"}}
    for text in (json.dumps(plain), json.dumps({"mcpServers": plain})):
        settings = validate_model_settings(ModelSettings(mcp_servers=text), "s")
        assert json.loads(settings.mcp_servers) == plain


@pytest.mark.parametrize(
    "name", ["ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "TASKRUN_FENCING_TOKEN", "HOME", "LD_PRELOAD"]
)
def test_env_the_worker_owns_is_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="set by the worker") as err:
        validate_model_settings(ModelSettings(env={name: "x"}), "policy.model_settings")
    assert err.value.field == "policy.model_settings.env"


def test_env_for_the_tools_is_accepted() -> None:
    settings = validate_model_settings(ModelSettings(env={"MODE": "ci", "_X1": ""}), "s")
    assert settings.env == {"MODE": "ci", "_X1": ""}


def test_policy_defaults_need_no_settings() -> None:
    policy = validate_policy(TaskPolicy())
    assert policy.output_schema == "" and policy.output_retries == 2
    assert policy.model_settings.empty and policy.max_cost_usd == 0


def test_the_policy_round_trips_through_protobuf_and_into_the_assignment() -> None:
    policy = TaskPolicy(
        output_schema=json.dumps(SCHEMA),
        output_retries=0,
        model_settings=ModelSettings(
            system_prompt="s", max_tokens=9, temperature=0.0, stop_sequences=["x"], env={"A": "b"}
        ),
        max_cost_usd=1.5,
    )
    message = pb.TaskPolicy()
    convert.policy_to_pb(policy, message)
    back = convert.policy_from_pb(pb.TaskPolicy.FromString(message.SerializeToString()), 3)
    assert back.output_retries == 0  # zero re-asks is a choice, not "unset"
    assert back.model_settings.temperature == 0.0  # likewise a temperature of 0
    assert (back.output_schema, back.model_settings, back.max_cost_usd) == (
        policy.output_schema,
        policy.model_settings,
        1.5,
    )
    assert convert.policy_from_pb(pb.TaskPolicy(), 3).output_retries == 2
    assert convert.policy_from_pb(pb.TaskPolicy(), 3).model_settings.temperature is None
    assignment = wpb.RunAssignment()
    convert.run_options_to_pb(policy, assignment)
    options = convert.run_options_from_pb(assignment)
    assert options.output_schema == SCHEMA and options.output_retries == 0
    assert options.model_settings == policy.model_settings and options.max_cost_usd == 1.5
    assert convert.run_options_from_pb(wpb.RunAssignment()).output_schema is None


def test_replies_are_parsed_from_plain_or_fenced_json_and_checked() -> None:
    assert parse_reply('```json\n{"n": 1}\n```', SCHEMA) == ({"n": 1}, [])
    assert parse_reply('{"n": "one"}', SCHEMA) == (
        {"n": "one"},
        ["n: 'one' is not of type 'integer'"],
    )
    value, problems = parse_reply("sure! here it is", SCHEMA)
    assert value is None and problems[0].startswith("the reply is not valid JSON")


def test_many_violations_are_listed_up_to_ten_then_counted() -> None:
    schema = {"type": "array", "items": {"type": "string"}}
    problems = schema_violations(schema, list(range(15)))
    assert len(problems) == 11 and problems[-1] == "... and 5 more"
    assert exhausted(3, problems[:1]).startswith(
        "the model's reply did not match the output schema after 3 attempts: 0: 0 is not of type"
    )


def test_a_schema_that_cannot_be_applied_is_a_problem_not_a_crash() -> None:
    problems = schema_violations({"$ref": "#/$defs/missing"}, 1)
    assert problems and problems[0].startswith("(schema): the output schema could not be applied")


def test_settings_together_are_bounded_to_fit_an_assignment() -> None:
    big = {f"V{i}": "x" * 30_000 for i in range(20)}  # each value allowed, 600 kB together
    with pytest.raises(InvalidArgument, match="together, over the limit") as err:
        validate_model_settings(ModelSettings(env=big), "policy.model_settings")
    assert err.value.field == "policy.model_settings"


_POLICY_SAMPLES: dict[str, object] = {
    "priority": 7,
    "timeout": 30.0,
    "max_attempts": 5,
    "idempotency_key": "k",
    "required_labels": {"gpu": "a100"},
    "queue_timeout": 60.0,
    "retry_on_failure": True,
    "required_provider": "anthropic",
    "required_model": "claude-x",
    "output_schema": '{"type":"object"}',
    "output_retries": 0,
    "model_settings": ModelSettings(max_tokens=5),
    "max_cost_usd": 0.5,
    "allow_subtasks": True,
    "max_subtasks": 3,
    "subtask_budget_usd": 2.0,
}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TaskPolicy)])
def test_any_one_policy_field_set_alone_survives_protobuf(name: str) -> None:
    # reading skips an empty policy (and empty settings) whole: one field must be enough to read
    assert name in _POLICY_SAMPLES, "a new TaskPolicy field: add it here and to the converters"
    policy = TaskPolicy(**{name: _POLICY_SAMPLES[name]})  # type: ignore[arg-type]
    message = pb.TaskPolicy()
    convert.policy_to_pb(policy, message)
    back = convert.policy_from_pb(pb.TaskPolicy.FromString(message.SerializeToString()), 3)
    assert back == policy


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ModelSettings)])
def test_any_one_model_setting_set_alone_survives_protobuf(name: str) -> None:
    assert name in MODEL_SETTING_SAMPLES, "a new ModelSettings field: add it here"
    settings = ModelSettings(**{name: MODEL_SETTING_SAMPLES[name]})  # type: ignore[arg-type]
    message = pb.TaskPolicy()
    convert.policy_to_pb(TaskPolicy(model_settings=settings), message)
    back = convert.policy_from_pb(pb.TaskPolicy.FromString(message.SerializeToString()), 3)
    assert back.model_settings == settings


def test_an_empty_policy_reads_as_the_defaults_with_the_servers_attempts() -> None:
    assert convert.policy_from_pb(pb.TaskPolicy(), 4) == TaskPolicy(max_attempts=4)
    present_but_empty = pb.TaskPolicy()
    present_but_empty.model_settings.SetInParent()
    assert convert.policy_from_pb(present_but_empty, 4) == TaskPolicy(max_attempts=4)
