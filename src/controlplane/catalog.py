"""What the control plane knows about agents: the specs workers announced, with compiled
input schemas, so a bad input is INVALID_ARGUMENT at submission instead of a failed run later."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import structlog
from jsonschema.protocols import Validator

from taskrun.core.errors import InvalidArgument
from taskrun.core.models import AgentSpec

log = structlog.get_logger(__name__)

MAX_ERRORS = 3
# Input texts last found valid, per agent: tasks submitted together often share one input, and
# validating it again costs more than the rest of their creation.
VALID_INPUTS_KEPT = 256


@dataclass(frozen=True, slots=True)
class _Entry:
    spec: AgentSpec
    validator: Validator | None
    valid_inputs: dict[str, None] = field(default_factory=dict)


class AgentCatalog:
    def __init__(self) -> None:
        self._agents: dict[str, _Entry] = {}

    def learn(self, specs: Iterable[AgentSpec]) -> None:
        """Remember announced agents (the latest announcement of a name wins)."""
        for spec in specs:
            known = self._agents.get(spec.name)
            if known is not None and known.spec == spec:
                continue
            self._agents[spec.name] = _Entry(spec, _compile(spec))

    def get(self, name: str) -> AgentSpec | None:
        entry = self._agents.get(name)
        return entry.spec if entry else None

    def names(self) -> list[str]:
        return sorted(self._agents)

    def check_input_text(self, agent: str, text: str, field: str = "input_json") -> None:
        """`check_input` of a task's input as stored (a JSON object's text, already parsed once
        by validation): a text found valid before passes without validating it again."""
        entry = self._agents.get(agent)
        if entry is None or entry.validator is None or text in entry.valid_inputs:
            return
        self.check_input(agent, json.loads(text), field)
        if len(entry.valid_inputs) >= VALID_INPUTS_KEPT:
            entry.valid_inputs.clear()
        entry.valid_inputs[text] = None

    def check_input(self, agent: str, value: dict[str, Any], field: str = "input_json") -> None:
        """Validate an input against the agent's announced schema (unknown agents pass)."""
        entry = self._agents.get(agent)
        if entry is None or entry.validator is None:
            return
        problems = sorted(entry.validator.iter_errors(value), key=lambda e: list(e.path))
        if problems:
            described = "; ".join(_describe(e) for e in problems[:MAX_ERRORS])
            more = f" (and {len(problems) - MAX_ERRORS} more)" if len(problems) > MAX_ERRORS else ""
            raise InvalidArgument(
                f"does not match the input schema of agent {agent!r}: {described}{more}",
                field=field,
            )


def _compile(spec: AgentSpec) -> Validator | None:
    if not spec.input_schema:
        return None
    try:
        schema = json.loads(spec.input_schema)
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        validator: Validator = cls(schema)
    except (ValueError, RecursionError, jsonschema.SchemaError) as exc:
        log.warning("agent announced an unusable input schema", agent=spec.name, error=str(exc))
        return None
    return validator


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.path)
    return f"{where or '(top level)'}: {error.message}"
