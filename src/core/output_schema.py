"""Structured output: asking a model for JSON that matches a schema, and checking what it said.

A task may carry an output JSON Schema. Agents backed by a model put `instructions(schema)` in
the system prompt, read the reply with `parse_reply`, and on a violation ask again with
`feedback(problems)` (the conversation so far plus what did not validate), at most
`output_retries` times. The worker checks the final result with `schema_violations` whatever the
agent did, so a run never completes with a result that does not match.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
from referencing.exceptions import Unresolvable

MAX_PROBLEMS = 10  # listed in a re-ask or an error; the rest are counted

_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def schema_violations(schema: dict[str, Any], value: Any) -> list[str]:
    """What about `value` does not match `schema`, one line per problem, by path; [] if it does."""
    validator = jsonschema.Draft202012Validator(schema)
    try:
        errors = sorted(
            validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path]
        )
    except (jsonschema.exceptions.SchemaError, Unresolvable, RecursionError, ValueError) as exc:
        # a schema checked at submission should not get here (an unresolvable local $ref can)
        return [f"(schema): the output schema could not be applied ({exc})"]
    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors
    ]
    if len(problems) > MAX_PROBLEMS:
        more = len(problems) - MAX_PROBLEMS
        problems = [*problems[:MAX_PROBLEMS], f"... and {more} more"]
    return problems


def parse_reply(reply: str, schema: dict[str, Any]) -> tuple[Any, list[str]]:
    """The JSON value in a model's reply (a ```json fence is accepted) and what about it does
    not match the schema; (None, problems) when the reply is not JSON at all."""
    text = reply.strip()
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, [f"the reply is not valid JSON ({exc})"]
    return value, schema_violations(schema, value)


def instructions(schema: dict[str, Any]) -> str:
    """Told to the model (in the system prompt) when a task has an output schema."""
    return (
        "Answer with one JSON value and nothing else (no prose, no code fence). It must satisfy "
        f"this JSON Schema:\n{json.dumps(schema)}"
    )


def feedback(problems: list[str]) -> str:
    """The user message that asks again after a reply that did not validate."""
    listed = "\n".join(f"- {p}" for p in problems)
    return (
        f"Your answer did not match the schema:\n{listed}\n"
        "Reply again with only the corrected JSON."
    )


def exhausted(attempts: int, problems: list[str], schema: str = "the output schema") -> str:
    """The run's error once every attempt failed to validate."""
    return (
        f"the model's reply did not match {schema} after {attempts} attempt"
        f"{'s' if attempts != 1 else ''}: {'; '.join(problems)}"
    )
