"""Row encoding shortcuts give what the plain encoding gives."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from taskrun.controlplane.store import rows
from taskrun.core.models import ModelSettings, TaskPolicy

# Fields policy_json hands to the general encoding instead of the shortcut.
NOT_SCALAR = {"required_labels", "idempotency_key", "model_settings"}


def test_the_policy_shortcut_takes_every_other_field_of_a_policy() -> None:
    scalars = {f.name for f in dataclasses.fields(TaskPolicy)} - NOT_SCALAR
    assert set(inspect.signature(rows._plain_policy_json).parameters) == scalars


SAMPLES: dict[str, object] = {
    "priority": 5,
    "timeout": 90.5,
    "max_attempts": 4,
    "idempotency_key": "k-1",
    "required_labels": {"gpu": "a100"},
    "queue_timeout": 30.0,
    "retry_on_failure": True,
    "required_provider": "anthropic",
    "required_model": "claude",
    "output_schema": '{"type":"object"}',
    "output_retries": 0,
    "model_settings": ModelSettings(max_tokens=300),
    "max_cost_usd": 0.75,
    "allow_subtasks": True,
    "max_subtasks": 4,
    "subtask_budget_usd": 0.5,
}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TaskPolicy)])
def test_a_policy_encodes_and_decodes_alike_through_either_path(name: str) -> None:
    assert name in SAMPLES, "a new TaskPolicy field: add a sample here"
    policy = TaskPolicy(**{name: SAMPLES[name]})  # type: ignore[arg-type]
    for _ in range(2):  # the second time from the cache
        text = rows.policy_json(policy)
        assert text == rows._policy_json(policy)
        assert rows.policy_from(text) == policy


def test_zero_as_an_integer_and_as_a_float_are_cached_apart() -> None:
    as_int = rows.policy_json(TaskPolicy(subtask_budget_usd=0))
    as_float = rows.policy_json(TaskPolicy(subtask_budget_usd=0.0))
    assert as_int == rows._policy_json(TaskPolicy(subtask_budget_usd=0))
    assert as_float == rows._policy_json(TaskPolicy(subtask_budget_usd=0.0))
