"""Validation of everything a user submits. Each rule raises InvalidArgument naming the field."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from taskrun.core.errors import InvalidArgument
from taskrun.core.models import MAX_SESSION_SNAPSHOT_BYTES, ModelBackend, TaskPolicy, TaskSpec
from taskrun.core.run_options import (
    validate_max_cost,
    validate_model_settings,
    validate_output_retries,
    validate_output_schema,
)
from taskrun.core.text import clip, quoted, utf8_size

MAX_INPUT_BYTES = 1 << 20  # 1 MiB of JSON per task input
# 1 MiB of JSON per run result: a task with its input and result, and a run with its result,
# each fit a message (4 MiB by default) beside the others, as GetTask sends them.
MAX_RESULT_BYTES = 1 << 20
MAX_ERROR_CHARS = 16 * 1024  # a run's error is for people: its start, and how long it was
MAX_LABELS = 64
MAX_IDEMPOTENCY_KEY = 256
MAX_ATTEMPTS_LIMIT = 100
PRIORITY_RANGE = (-1000, 1000)
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0
MAX_BATCH = 1000
MAX_JSON_DEPTH = 64

_AGENT = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_LABEL_NAME = r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"([a-z0-9]([a-z0-9.-]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"({_LABEL_NAME})?")


def validate_agent_name(name: str, field: str = "agent") -> str:
    if not name:
        raise InvalidArgument("must not be empty", field=field)
    if not _AGENT.fullmatch(name):
        raise InvalidArgument(
            f"{quoted(name)} is not a valid agent name (lower case letters, digits, '_' or '-', "
            "starting with a letter, at most 64)",
            field=field,
        )
    return name


def validate_input(text: str, field: str = "input_json") -> tuple[str, dict[str, Any]]:
    """Parse a task input. Empty means {}. Returns the canonical text and the object.

    Refused: text over MAX_INPUT_BYTES, invalid JSON, anything but an object, nesting deeper than
    MAX_JSON_DEPTH, integers longer than Python parses, and strings holding a lone surrogate
    (`"\\ud800"`: no UTF-8 form, so no client could print it back).
    """
    if not text.strip():
        return "{}", {}
    size = utf8_size(text)
    if size > MAX_INPUT_BYTES:
        raise InvalidArgument(f"is {size} bytes, over the limit of {MAX_INPUT_BYTES}", field=field)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"is not valid JSON: {exc}", field=field) from None
    except RecursionError:
        raise InvalidArgument(
            f"is nested too deep (at most {MAX_JSON_DEPTH} levels)", field=field
        ) from None
    except ValueError:  # an integer with more digits than int() accepts
        raise InvalidArgument(
            "holds a number too long to read (integers of at most 4300 digits)", field=field
        ) from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"must be a JSON object, got {type(value).__name__}", field=field)
    check_json_value(value, field)
    return text, value


def clip_error(text: str) -> str:
    """A run's error as it is sent and kept: its start, and how long it was (one clipped
    already passes unchanged)."""
    return text if len(text) <= MAX_ERROR_CHARS + 64 else clip(text, MAX_ERROR_CHARS)


# What a worker reports beside a result: kept with the run, counted in usage rows and metric
# labels, and sent with every read of the task.
MAX_REPORTED_NAME = 256  # a model, a tool, a session id
MAX_REPORTED_PROVIDER = 64
MAX_REPORTED_ITEMS = 64  # tools, modalities


def bounded_backend(backend: ModelBackend) -> ModelBackend:
    """The backend a run says it used, as kept: names clipped, at most 64 tools and
    modalities. Any longer is not a real model's."""

    def name(text: str) -> str:
        return text[:MAX_REPORTED_NAME]

    names = (backend.model_name, *backend.modalities, *backend.tools)
    if (
        len(backend.provider) <= MAX_REPORTED_PROVIDER
        and len(backend.modalities) <= MAX_REPORTED_ITEMS
        and len(backend.tools) <= MAX_REPORTED_ITEMS
        and all(len(n) <= MAX_REPORTED_NAME for n in names)
    ):
        return backend  # every real one: nothing to copy
    return ModelBackend(
        provider=backend.provider[:MAX_REPORTED_PROVIDER],
        model_name=name(backend.model_name),
        context_window=backend.context_window,
        modalities=tuple(map(name, backend.modalities[:MAX_REPORTED_ITEMS])),
        tools=tuple(map(name, backend.tools[:MAX_REPORTED_ITEMS])),
    )


def kept_session_id(session_id: str) -> str:
    """A run's session id as kept: one longer than any real one is none."""
    return session_id if len(session_id) <= MAX_REPORTED_NAME else ""


def kept_snapshot(snapshot: bytes) -> bytes:
    """A session snapshot as kept: one over MAX_SESSION_SNAPSHOT_BYTES is too big to move (the
    worker keeps its own copy)."""
    return snapshot if len(snapshot) <= MAX_SESSION_SNAPSHOT_BYTES else b""


def result_over_limit(text: str, what: str = "result") -> str:
    """Why a run's result (JSON text) cannot be kept, or "" when it fits MAX_RESULT_BYTES."""
    size = utf8_size(text)
    if size <= MAX_RESULT_BYTES:
        return ""
    return f"the {what} is {size:,} bytes as JSON, over the limit of 1 MiB ({MAX_RESULT_BYTES:,})"


def check_json_value(value: object, field: str) -> None:
    """Refuse nesting past MAX_JSON_DEPTH and strings (or keys) holding lone surrogates."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidArgument(
                f"is nested too deep (at most {MAX_JSON_DEPTH} levels)", field=field
            )
        if isinstance(item, str):
            _check_text(item, field)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, field)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def _check_text(text: str, field: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(
            "holds a lone UTF-16 surrogate escape (like \\ud800), which is not text; "
            "send valid Unicode",
            field=field,
        ) from None


def validate_labels(labels: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"has {len(labels)} labels, at most {MAX_LABELS}", field=field)
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                f"key {quoted(key)} is not a valid label key (letters, digits, '.', '_', '-', "
                "at most 63, optional DNS prefix and '/')",
                field=field,
            )
        if not _LABEL_VALUE.fullmatch(value):
            raise InvalidArgument(
                f"value {quoted(value)} of {quoted(key)} is not a valid label value (letters, "
                "digits, "
                "'.', '_', '-', at most 63, starting and ending alphanumeric)",
                field=field,
            )
    return dict(labels)


def parse_label_args(items: list[str], field: str = "labels") -> dict[str, str]:
    """Parse `k=v` strings (CLI flags) into a label map, validated."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(f"{quoted(item)} must have the form key=value", field=field)
        labels[key] = value
    return validate_labels(labels, field)


def _duration(value: float | None, field: str) -> float | None:
    if value is None or value == 0:
        return None
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"must be a positive number of seconds, got {value}", field=field)
    if value > MAX_TIMEOUT_SECONDS:
        raise InvalidArgument(f"must be at most {MAX_TIMEOUT_SECONDS:.0f} seconds", field=field)
    return value


def validate_policy(policy: TaskPolicy, field: str = "policy") -> TaskPolicy:
    low, high = PRIORITY_RANGE
    if not low <= policy.priority <= high:
        raise InvalidArgument(f"must be between {low} and {high}", field=f"{field}.priority")
    if not 1 <= policy.max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise InvalidArgument(
            f"must be between 1 and {MAX_ATTEMPTS_LIMIT}", field=f"{field}.max_attempts"
        )
    if len(policy.idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(
            f"must be at most {MAX_IDEMPOTENCY_KEY} characters", field=f"{field}.idempotency_key"
        )
    return TaskPolicy(
        priority=policy.priority,
        timeout=_duration(policy.timeout, f"{field}.timeout"),
        max_attempts=policy.max_attempts,
        idempotency_key=policy.idempotency_key,
        required_labels=validate_labels(policy.required_labels, f"{field}.required_labels"),
        queue_timeout=_duration(policy.queue_timeout, f"{field}.queue_timeout"),
        retry_on_failure=policy.retry_on_failure,
        required_provider=policy.required_provider,
        required_model=policy.required_model,
        **_subtask_policy(policy, field),
        output_schema=validate_output_schema(policy.output_schema, f"{field}.output_schema_json"),
        output_retries=validate_output_retries(policy.output_retries, f"{field}.output_retries"),
        model_settings=validate_model_settings(policy.model_settings, f"{field}.model_settings"),
        max_cost_usd=validate_max_cost(policy.max_cost_usd, f"{field}.max_cost_usd"),
    )


MAX_SUBTASKS_LIMIT = 10_000


def _subtask_policy(policy: TaskPolicy, field: str) -> dict[str, Any]:
    if not 0 <= policy.max_subtasks <= MAX_SUBTASKS_LIMIT:
        raise InvalidArgument(
            f"must be between 0 (no limit) and {MAX_SUBTASKS_LIMIT}", field=f"{field}.max_subtasks"
        )
    budget = policy.subtask_budget_usd
    if not (math.isfinite(budget) and budget >= 0):
        raise InvalidArgument(
            "must be a finite number >= 0 (0: no limit)", field=f"{field}.subtask_budget_usd"
        )
    if (policy.max_subtasks or budget) and not policy.allow_subtasks:
        name = "max_subtasks" if policy.max_subtasks else "subtask_budget_usd"
        raise InvalidArgument(
            "is a budget for sub-tasks: set allow_subtasks too", field=f"{field}.{name}"
        )
    return {
        "allow_subtasks": policy.allow_subtasks,
        "max_subtasks": policy.max_subtasks,
        "subtask_budget_usd": budget,
    }


def validate_task_spec(spec: TaskSpec, field_prefix: str = "") -> TaskSpec:
    """Check a submission and return it in canonical form."""
    p = field_prefix
    agent = validate_agent_name(spec.agent, f"{p}agent")
    text, _ = validate_input(spec.input, f"{p}input_json")
    return TaskSpec(
        agent=agent,
        input=text,
        labels=validate_labels(spec.labels, f"{p}labels"),
        policy=validate_policy(spec.policy, f"{p}policy"),
        schedule=spec.schedule,
        parent_task_id=spec.parent_task_id,
    )
