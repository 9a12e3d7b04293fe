"""Workflows: definitions (validated, versioned), runs and their steps, and inbox items.

A Workflow is a stored definition of Steps; a WorkflowRun is one execution of one version of it.
Steps form a graph by `needs` (parallel branches join by needing several steps). Four kinds:

- `task`: creates a Task for `agent` with `input`, a template whose `${expr}` parts are JMESPath
  expressions over `{"input": <run input>, "steps": {<name>: {"result": …, "status": …}}}`; with
  `json_field`, that field of the agent's result (e.g. a model's `text`) is parsed as JSON and
  becomes the step's result; an optional `output_schema` (JSON Schema) is checked against it;
- `approval`: waits for a person (an InboxItem) to approve (with one of `choices`) or reject, or
  for `timeout` to pass; `branches` maps the outcome (a choice, `approved`, `rejected`,
  `timeout`) to the steps it enables;
- `wait`: for `duration` seconds, or `until` a local time (`HH:MM` or an ISO date-time) in
  `timezone`;
- `condition`: evaluates `expression`; `then` lists the steps enabled when it is truthy, `else`
  the others.

A step named in a branch of a decision step only runs when that branch is taken; the steps of
the branches not taken are SKIPPED. A step runs once all its `needs` are finished and at least
one of them completed (or it needs nothing); when every one of them was skipped, it is skipped
too, so a join after a branch runs on the branch that was taken.

This module is pure: parsing, validation, templates and the state of a run as data. The control
plane's executor (controlplane.workflows) drives runs.

Why one module: a workflow's definition, its checks and the state of its runs are one model;
the checking of definitions is the part to move out if it grows.

jsonschema and yaml are imported where a definition or a result is checked: every command of
the CLI imports this module (through `convert`), and they take about 110 ms to import.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, time, timedelta
from enum import IntEnum
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jmespath
import jmespath.exceptions

from taskrun.core.errors import InvalidArgument
from taskrun.core.models import ModelSettings, TaskPolicy
from taskrun.core.text import quoted
from taskrun.core.validation import validate_agent_name, validate_labels, validate_policy

if TYPE_CHECKING:
    import jsonschema
    import yaml

# Both end alphanumeric: they become label values (`workflow`, `step`) of the steps' tasks.
NAME_PATTERN = r"^[a-z]([a-z0-9_-]{0,61}[a-z0-9])?$"
STEP_PATTERN = r"^[a-z]([a-z0-9_]{0,61}[a-z0-9])?$"  # usable in JMESPath without quoting
MAX_DEFINITION_BYTES = 256 * 1024
MAX_STEPS = 100
MAX_DEPTH = 64
_TOO_DEEP = f"nests deeper than {MAX_DEPTH} levels"
APPROVAL_OUTCOMES = ("approved", "rejected", "timeout")

_POLICY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
        "timeout": {"type": "number", "exclusiveMinimum": 0},
        "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "retry_on_failure": {"type": "boolean"},
        "queue_timeout": {"type": "number", "exclusiveMinimum": 0},
        "required_labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_COMMON = {
    "type": {"enum": ["task", "approval", "wait", "condition"]},
    "needs": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    "description": {"type": "string"},
}
_STEP_NAMES = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}

DEFINITION_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "TaskRun workflow definition",
    "type": "object",
    "required": ["name", "steps"],
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "description": {"type": "string"},
        "input_schema": {"type": "object"},
        "steps": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": MAX_STEPS,
            "propertyNames": {"pattern": STEP_PATTERN},
            "additionalProperties": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": _COMMON["type"]},
                "allOf": [
                    {
                        "if": {"properties": {"type": {"const": "task"}}},
                        "then": {
                            "required": ["agent"],
                            "properties": {
                                **_COMMON,
                                "agent": {"type": "string", "minLength": 1},
                                "input": {"type": "object"},
                                "policy": _POLICY_SCHEMA,
                                "labels": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "output_schema": {"type": "object"},
                                "json_field": {"type": "string", "minLength": 1},
                            },
                            "additionalProperties": False,
                        },
                    },
                    {
                        "if": {"properties": {"type": {"const": "approval"}}},
                        "then": {
                            "required": ["question"],
                            "properties": {
                                **_COMMON,
                                "question": {"type": "string", "minLength": 1},
                                "choices": {
                                    "type": "array",
                                    "items": {"type": "string", "pattern": NAME_PATTERN},
                                    "uniqueItems": True,
                                },
                                "timeout": {"type": "number", "exclusiveMinimum": 0},
                                "branches": {
                                    "type": "object",
                                    "additionalProperties": _STEP_NAMES,
                                },
                            },
                            "additionalProperties": False,
                        },
                    },
                    {
                        "if": {"properties": {"type": {"const": "wait"}}},
                        "then": {
                            "properties": {
                                **_COMMON,
                                "duration": {"type": "number", "minimum": 0},
                                "until": {"type": "string", "minLength": 1},
                                "timezone": {"type": "string", "minLength": 1},
                            },
                            "additionalProperties": False,
                        },
                    },
                    {
                        "if": {"properties": {"type": {"const": "condition"}}},
                        "then": {
                            "required": ["expression"],
                            "properties": {
                                **_COMMON,
                                "expression": {"type": "string", "minLength": 1},
                                "then": _STEP_NAMES,
                                "else": _STEP_NAMES,
                            },
                            "additionalProperties": False,
                        },
                    },
                ],
            },
        },
    },
    "additionalProperties": False,
}

_TEMPLATE = re.compile(r"\$\{([^}]*)\}")


# --- definitions -------------------------------------------------------------------------------


@dataclass(slots=True)
class Workflow:
    """One stored version of a definition. `definition` is the parsed document."""

    name: str
    version: int
    definition: dict[str, Any]
    created_at: datetime
    description: str = ""

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        steps: dict[str, dict[str, Any]] = self.definition["steps"]
        return steps


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


@functools.cache
def _definition_validator() -> jsonschema.Draft202012Validator:
    import jsonschema

    return jsonschema.Draft202012Validator(DEFINITION_SCHEMA)


@functools.cache
def _loader() -> type[yaml.SafeLoader]:
    """A SafeLoader without aliases: `*name` references could make a small document expand
    exponentially when it is written out as JSON (a billion laughs)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a workflow", event.start_mark
                )
            return super().compose_node(parent, index)

    return Loader


def parse_definition(text: str) -> dict[str, Any]:
    """Parse YAML (or JSON) text and validate it; InvalidArgument names the path of the error."""
    import yaml

    if len(text.encode()) > MAX_DEFINITION_BYTES:
        raise InvalidArgument(f"is larger than {MAX_DEFINITION_BYTES} bytes", field="definition")
    try:
        document = yaml.load(text, Loader=_loader())  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InvalidArgument(
            f"is neither YAML nor JSON{where}: {getattr(exc, 'problem', exc)}",
            field="definition",
        ) from None
    except RecursionError:
        raise InvalidArgument(_TOO_DEEP, field="definition") from None
    _check_keys(document, [])
    validate_definition(document)
    assert isinstance(document, dict)
    return document


def _check_keys(value: Any, path: list[Any]) -> None:
    """Every mapping key must be text (YAML reads `no`, `yes`, `on`, `off` as booleans and `1`
    as a number, which JSON and JMESPath would then see differently) and every value a JSON
    value (not a YAML date, or .nan)."""
    if len(path) > MAX_DEPTH:
        raise InvalidArgument(_TOO_DEEP, field=_path(path[:MAX_DEPTH]))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(
                    f"key {key!r} is not text (YAML reads no/yes/on/off as booleans and digits "
                    "as numbers): quote it",
                    field=_path([*path, str(key)]),
                )
            _check_keys(item, [*path, key])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_keys(item, [*path, i])
    elif not isinstance(value, str | int | float | bool | None):
        # YAML has dates, times and binary; JSON (how definitions are stored) has not
        raise InvalidArgument(
            f"{value!r} is not a JSON value (YAML reads 2026-12-24 as a date): quote it",
            field=_path(path),
        )
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument("is not a finite number", field=_path(path))


def validate_definition(document: Any) -> None:
    """Check a parsed definition against the schema, then the graph and the expressions."""
    import jsonschema

    validator = _definition_validator()
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        # the deepest error is the most precise (an `if/then` failure reports its own part)
        error = max(errors, key=lambda e: len(e.absolute_path))
        leaf = min(
            (e for e in (error.context or []) if e.absolute_path),
            key=lambda e: -len(e.absolute_path),
            default=error,
        )
        hint = ""
        if leaf.validator == "type" and isinstance(leaf.instance, bool):
            hint = " (YAML reads no/yes/on/off as booleans: quote it)"
        raise InvalidArgument(leaf.message + hint, field=_path(leaf.absolute_path))
    steps: dict[str, dict[str, Any]] = document["steps"]
    names = set(steps)

    def known(step: str, key: str, targets: list[str]) -> None:
        for i, target in enumerate(targets):
            if target not in names:
                raise InvalidArgument(
                    f"names no step {quoted(target)} (steps: {', '.join(sorted(names))})",
                    field=f"steps.{step}.{key}[{i}]",
                )
            if target == step:
                raise InvalidArgument("a step cannot name itself", field=f"steps.{step}.{key}")

    owner: dict[str, str] = {}  # a branch target -> the decision step that owns it
    for name, step in steps.items():
        known(name, "needs", step.get("needs", []))
        kind = step["type"]
        for key, targets in branches_of(step).items():
            where = f"branches.{key}" if kind == "approval" else key
            known(name, where, targets)
            for target in targets:
                if owner.get(target, name) != name:
                    raise InvalidArgument(
                        f"step {quoted(target)} is already a branch of {quoted(owner[target])}",
                        field=f"steps.{name}.{where}",
                    )
                owner[target] = name
        if kind == "approval":
            allowed = [*step.get("choices", []), *APPROVAL_OUTCOMES]
            for key in step.get("branches", {}):
                if key not in allowed:
                    raise InvalidArgument(
                        f"unknown outcome {quoted(key)} (valid: {', '.join(allowed)})",
                        field=f"steps.{name}.branches.{key}",
                    )
            if "timeout" in step.get("branches", {}) and "timeout" not in step:
                raise InvalidArgument(
                    "a timeout branch needs a timeout", field=f"steps.{name}.branches.timeout"
                )
            check_template(step["question"], f"steps.{name}.question")
        elif kind == "task":
            validate_agent_name(step["agent"], f"steps.{name}.agent")
            validate_labels(step.get("labels", {}), f"steps.{name}.labels")
            step_policy(step, 1, f"steps.{name}.policy")
            check_template(step.get("input", {}), f"steps.{name}.input")
            if "output_schema" in step:
                try:
                    jsonschema.Draft202012Validator.check_schema(step["output_schema"])
                except jsonschema.SchemaError as exc:
                    raise InvalidArgument(
                        f"is not a JSON Schema: {exc.message}",
                        field=f"steps.{name}.output_schema",
                    ) from None
        elif kind == "condition":
            _compile(step["expression"], f"steps.{name}.expression")
        elif kind == "wait":
            if ("duration" in step) == ("until" in step):
                raise InvalidArgument(
                    "give either duration (seconds) or until (HH:MM or an ISO date-time)",
                    field=f"steps.{name}",
                )
            if "until" in step:
                _zone(step.get("timezone", "UTC"), f"steps.{name}.timezone")
                _parse_until(step["until"], f"steps.{name}.until")
    for target, decider in owner.items():
        if decider not in steps[target].get("needs", []):
            # a branch target runs after its decision: make the edge explicit
            steps[target].setdefault("needs", []).append(decider)
    _check_acyclic(steps)
    if "input_schema" in document:
        try:
            jsonschema.Draft202012Validator.check_schema(document["input_schema"])
        except jsonschema.SchemaError as exc:
            raise InvalidArgument(
                f"is not a JSON Schema: {exc.message}", field="input_schema"
            ) from None


def step_policy(step: dict[str, Any], default_max_attempts: int, where: str) -> TaskPolicy:
    """A task step's policy as a validated TaskPolicy (InvalidArgument naming the field)."""
    fields = dict(step.get("policy", {}))
    settings = fields.pop("model_settings", None) or {}
    try:
        model_settings = ModelSettings(**settings)
    except TypeError as exc:
        raise InvalidArgument(
            f"has an unknown or misplaced setting ({exc})", field=f"{where}.model_settings"
        ) from None
    policy = TaskPolicy(
        max_attempts=fields.pop("max_attempts", default_max_attempts),
        required_labels=dict(fields.pop("required_labels", {})),
        model_settings=model_settings,
        **fields,
    )
    return validate_policy(policy, where)


def branches_of(step: dict[str, Any]) -> dict[str, list[str]]:
    """A decision step's branches: outcome -> steps it enables."""
    if step["type"] == "condition":
        return {k: list(step.get(k, [])) for k in ("then", "else") if k in step}
    if step["type"] == "approval":
        return {k: list(v) for k, v in step.get("branches", {}).items()}
    return {}


def _check_acyclic(steps: dict[str, dict[str, Any]]) -> None:
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            raise InvalidArgument(f"the steps form a cycle: {cycle}", field=f"steps.{name}.needs")
        state[name] = 1
        for need in steps[name].get("needs", []):
            visit(need, [*trail, name])
        state[name] = 2

    for name in steps:
        visit(name, [])


def _compile(expression: str, where: str) -> Any:
    try:
        return jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        raise InvalidArgument(
            f"is not a JMESPath expression ({quoted(expression)}): {exc}", field=where
        ) from None


def check_template(value: Any, where: str) -> None:
    if isinstance(value, str):
        for match in _TEMPLATE.finditer(value):
            _compile(match.group(1).strip(), where)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_template(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_template(item, f"{where}[{i}]")


def render(value: Any, context: dict[str, Any]) -> Any:
    """Substitute `${expr}` in every string of `value`. A string that is exactly one `${expr}`
    takes the expression's value (any JSON type); otherwise values are written into the text
    (strings as they are, others as JSON)."""
    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value.strip())
        if whole:
            return evaluate(whole.group(1).strip(), context)

        def text(match: re.Match[str]) -> str:
            found = evaluate(match.group(1).strip(), context)
            return found if isinstance(found, str) else json.dumps(found)

        return _TEMPLATE.sub(text, value)
    if isinstance(value, dict):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context) for v in value]
    return value


def evaluate(expression: str, context: dict[str, Any]) -> Any:
    return jmespath.search(expression, context)


def truthy(value: Any) -> bool:
    """JMESPath's truth: false, null, and empty strings, lists and objects are false."""
    return value not in (None, False, "", [], {})


def _zone(name: str, where: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(
            f"{quoted(name)} is not an IANA time zone (e.g. Europe/Paris)", field=where
        ) from None


def _parse_until(text: str, where: str) -> time | datetime:
    try:
        return time.fromisoformat(text) if len(text) <= 8 else datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            f"{quoted(text)} is neither HH:MM nor an ISO date-time (2026-12-03T07:00)", field=where
        ) from None


def wait_due(step: dict[str, Any], now: datetime) -> datetime:
    """When a wait step that starts at `now` (aware) ends."""
    if "duration" in step:
        return now + timedelta(seconds=float(step["duration"]))
    zone = ZoneInfo(step.get("timezone", "UTC"))
    until = _parse_until(step["until"], "until")
    if isinstance(until, datetime):
        return until if until.tzinfo else until.replace(tzinfo=zone)
    local = now.astimezone(zone)
    candidate = datetime.combine(local.date(), until, tzinfo=zone)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), until, tzinfo=zone)
    return candidate


def result_json(result: Any, field: str) -> Any:
    """The JSON held as text in `result[field]` (a model's reply; a ```json fence is allowed).
    ValueError naming the field when it is not there or not JSON."""
    text = result.get(field) if isinstance(result, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"result.{field} is not text (json_field {quoted(field)})")
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    if fenced:
        body = fenced.group(1)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ValueError(f"result.{field} is not JSON ({exc}): {body[:200]!r}") from None


def check_output(schema: dict[str, Any], result: Any) -> str:
    """'' when `result` satisfies `schema`, else the first problem with its path."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(result), key=lambda e: list(e.absolute_path)):
        where = "." + _path(error.absolute_path) if error.absolute_path else ""
        return f"result{where}: {error.message}"
    return ""


# --- runs --------------------------------------------------------------------------------------


class WorkflowRunStatus(IntEnum):
    RUNNING = 1
    COMPLETED = 2
    FAILED = 3
    CANCELLED = 4

    @property
    def finished(self) -> bool:
        return self is not WorkflowRunStatus.RUNNING


class StepStatus(IntEnum):
    PENDING = 1  # not started: its needs are unfinished (or it was just decided to start)
    RUNNING = 2  # a task step's task exists
    WAITING = 3  # an approval (for a person) or a wait (for a time)
    COMPLETED = 4
    FAILED = 5
    SKIPPED = 6  # on a branch not taken
    CANCELLED = 7

    @property
    def finished(self) -> bool:
        return self in (
            StepStatus.COMPLETED,
            StepStatus.FAILED,
            StepStatus.SKIPPED,
            StepStatus.CANCELLED,
        )


@dataclass(slots=True)
class Step:
    """The state of one step in one run."""

    name: str
    kind: str
    status: StepStatus = StepStatus.PENDING
    task_id: str = ""
    attempt: int = 0
    result: Any = None  # JSON value: a task's result, an approval's decision, a condition's value
    error: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    due_at: datetime | None = None  # a wait's end, an approval's timeout
    inbox_item_id: str = ""
    question: str = ""  # rendered when the approval started
    choices: list[str] = field(default_factory=list)
    branch: str = ""  # the outcome a decision step took
    comment: str = ""
    answered_by: str = ""


@dataclass(slots=True)
class WorkflowRun:
    id: str
    workflow: str
    version: int
    input: Any
    status: WorkflowRunStatus
    created_at: datetime
    updated_at: datetime
    steps: dict[str, Step]
    idempotency_key: str = ""
    finished_at: datetime | None = None
    error: str = ""
    schedule: str = ""


@dataclass(frozen=True, slots=True)
class InboxItem:
    """Something waiting for a person: today, an approval step of a running workflow run."""

    id: str
    run_id: str
    workflow: str
    step: str
    question: str
    choices: tuple[str, ...]
    created_at: datetime
    due_at: datetime | None


def task_key(run_id: str, step: str, attempt: int) -> str:
    """The idempotency key of a step's task: a crash between creating it and recording it
    finds the same task again."""
    return f"wf:{run_id}:{step}:{attempt}"


def new_run(
    run_id: str, workflow: Workflow, input: Any, now: datetime, key: str = "", schedule: str = ""
) -> WorkflowRun:
    return WorkflowRun(
        id=run_id,
        workflow=workflow.name,
        version=workflow.version,
        input=input,
        status=WorkflowRunStatus.RUNNING,
        created_at=now,
        updated_at=now,
        steps={n: Step(name=n, kind=s["type"]) for n, s in workflow.steps.items()},
        idempotency_key=key,
        schedule=schedule,
    )


def context_of(run: WorkflowRun) -> dict[str, Any]:
    """What `${…}` expressions see."""
    return {
        "input": run.input,
        "steps": {
            n: {"status": s.status.name.lower(), "result": s.result, "branch": s.branch}
            for n, s in run.steps.items()
        },
    }


def ready_steps(workflow: Workflow, run: WorkflowRun) -> tuple[list[str], list[str]]:
    """(steps to start, steps to skip) now: needs all finished; skipped when none completed or
    when a decision it depends on took another branch."""
    start: list[str] = []
    skip: list[str] = []
    owner: dict[str, tuple[str, set[str]]] = {}  # a branch target -> (decider, its outcomes)
    for name, spec in workflow.steps.items():
        for outcome, targets in branches_of(spec).items():
            for target in targets:
                owner.setdefault(target, (name, set()))[1].add(outcome)
    for name, spec in workflow.steps.items():
        state = run.steps[name]
        if state.status is not StepStatus.PENDING or state.task_id:
            continue
        needs = spec.get("needs", [])
        if any(not run.steps[n].status.finished for n in needs):
            continue
        if name in owner:
            decider, outcomes = owner[name]
            decided = run.steps[decider]
            if decided.status is StepStatus.COMPLETED and decided.branch not in outcomes:
                skip.append(name)
                continue
        if needs and all(run.steps[n].status is StepStatus.SKIPPED for n in needs):
            skip.append(name)
            continue
        start.append(name)
    return start, skip


def encode_run_state(run: WorkflowRun) -> str:
    """The steps of a run as JSON (how the stores keep them)."""
    return json.dumps(
        {
            n: {
                "kind": s.kind,
                "status": s.status.name,
                "task_id": s.task_id,
                "attempt": s.attempt,
                "result": s.result,
                "error": s.error,
                "started_at": _iso(s.started_at),
                "finished_at": _iso(s.finished_at),
                "due_at": _iso(s.due_at),
                "inbox_item_id": s.inbox_item_id,
                "question": s.question,
                "choices": s.choices,
                "branch": s.branch,
                "comment": s.comment,
                "answered_by": s.answered_by,
            }
            for n, s in run.steps.items()
        },
        separators=(",", ":"),
    )


def decode_run_state(text: str) -> dict[str, Step]:
    out: dict[str, Step] = {}
    for name, d in json.loads(text).items():
        out[name] = Step(
            name=name,
            kind=d["kind"],
            status=StepStatus[d["status"]],
            task_id=d["task_id"],
            attempt=d["attempt"],
            result=d["result"],
            error=d["error"],
            started_at=_dt(d["started_at"]),
            finished_at=_dt(d["finished_at"]),
            due_at=_dt(d["due_at"]),
            inbox_item_id=d["inbox_item_id"],
            question=d["question"],
            choices=list(d["choices"]),
            branch=d["branch"],
            comment=d["comment"],
            answered_by=d["answered_by"],
        )
    return out


def copy_run(run: WorkflowRun) -> WorkflowRun:
    """A deep copy (stores and readers must not see later changes)."""
    copy = replace(run)
    copy.steps = decode_run_state(encode_run_state(run))
    copy.input = json.loads(json.dumps(run.input))
    return copy


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
