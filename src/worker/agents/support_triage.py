"""The `support_triage` sample agent: classify a support ticket into schema-checked JSON.

The model is asked for {category, priority, summary}; its reply is validated against
TRIAGE_SCHEMA. On a violation the model is asked again (at most twice), told what was wrong.
Runs on either backend of `backends.py` (input "backend": "anthropic" | "claude_code").
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import structlog

from taskrun.core.agent import AgentError, AgentResult, Readiness, RunContext
from taskrun.core.models import AgentSpec, Usage
from taskrun.worker.agents.backends import (
    ChatMessage,
    Completion,
    announced_backends,
    anthropic_api_missing,
    backend_named,
    check_input,
    choose_model,
)

log = structlog.get_logger(__name__)

MAX_RETRIES = 2  # re-asks after the first answer, so at most 3 model calls
CATEGORIES = ["account", "billing", "bug", "feature_request", "other"]
PRIORITIES = ["low", "normal", "high", "urgent"]

TRIAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "category": {"enum": CATEGORIES},
        "priority": {"enum": PRIORITIES},
        "summary": {"type": "string", "minLength": 1, "maxLength": 200},
    },
    "required": ["category", "priority", "summary"],
    "additionalProperties": False,
}

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ticket_id": {"type": "string", "minLength": 1},
        "subject": {"type": "string"},
        "body": {"type": "string"},
        "backend": {"enum": ["anthropic", "claude_code"], "default": "anthropic"},
        "model": {"type": "string", "minLength": 1},
        "max_tokens": {"type": "integer", "minimum": 64, "maximum": 8192, "default": 512},
    },
    "required": ["ticket_id", "subject", "body"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = f"""You triage customer support tickets.
Answer with one JSON object and nothing else (no prose, no code fence), with exactly these keys:
- "category": one of {", ".join(CATEGORIES)}
- "priority": one of {", ".join(PRIORITIES)}
- "summary": one sentence of at most 200 characters saying what the customer needs
The JSON Schema your answer must satisfy:
{json.dumps(TRIAGE_SCHEMA)}"""

_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
_validator = jsonschema.Draft202012Validator(TRIAGE_SCHEMA)


def violations(reply: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The parsed triage and an empty list, or None and what is wrong with the reply."""
    text = reply.strip()
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, [f"the reply is not valid JSON ({exc})"]
    if not isinstance(value, dict):
        return None, [f"the reply must be a JSON object, not {type(value).__name__}"]
    errors = sorted(_validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors
    ]
    return (value, []) if not problems else (None, problems)


def ticket_prompt(ticket: dict[str, Any]) -> str:
    return (
        f"Ticket {ticket['ticket_id']}\nSubject: {ticket['subject']}\n\n{ticket['body']}\n\n"
        "Triage this ticket."
    )


def feedback(problems: list[str]) -> str:
    listed = "\n".join(f"- {p}" for p in problems)
    return (
        f"Your answer did not match the schema:\n{listed}\n"
        "Reply again with only the corrected JSON object."
    )


class SupportTriageAgent:
    """Classifies a ticket (category, priority, summary), retrying on schema violations."""

    def __init__(self) -> None:
        self.spec = AgentSpec(
            name="support_triage",
            description="Classifies a support ticket into category, priority and a short "
            "summary (JSON checked against a schema); backend anthropic or claude_code.",
            backends=announced_backends(),
            input_schema=json.dumps(INPUT_SCHEMA),
        )

    def readiness(self) -> Readiness:
        """Ready when its default backend, the Messages API, can be called."""
        return Readiness(anthropic_api_missing(), announced_backends())

    async def run(self, ctx: RunContext) -> AgentResult:
        check_input(INPUT_SCHEMA, ctx.input)
        name = ctx.input.get("backend", "anthropic")
        bound = log.bind(
            task_id=ctx.task_id, run_id=ctx.run_id, agent="support_triage", backend=name
        )
        backend = backend_named(name, bound, ctx.supervised_program)
        model = choose_model(ctx.model, ctx.input.get("model"))
        messages: list[ChatMessage] = [{"role": "user", "content": ticket_prompt(ctx.input)}]
        usage = Usage()
        completion: Completion | None = None
        problems: list[str] = []
        for attempt in range(1, MAX_RETRIES + 2):
            completion = await backend.complete(
                system=SYSTEM_PROMPT,
                messages=messages,
                model=model,
                max_tokens=ctx.input.get("max_tokens", 512),
            )
            usage.add(completion.usage)
            triage, problems = violations(completion.text)
            await ctx.event(
                "triage_attempt",
                attempt=attempt,
                backend=name,
                valid=triage is not None,
                errors=problems,
                reply=completion.text[:500],
            )
            if triage is not None:
                bound.info("ticket triaged", attempts=attempt, **triage)
                await ctx.emit(json.dumps(triage, indent=2) + "\n")
                return AgentResult(
                    result={
                        "ticket_id": ctx.input["ticket_id"],
                        **triage,
                        "attempts": attempt,
                        "backend": name,
                    },
                    usage=usage,
                    backend_used=completion.backend,
                )
            bound.info("triage reply violated the schema", attempt=attempt, errors=problems)
            messages += [
                {"role": "assistant", "content": completion.text or "(empty reply)"},
                {"role": "user", "content": feedback(problems)},
            ]
        raise AgentError(
            f"the model's reply did not match the triage schema after {MAX_RETRIES + 1} "
            f"attempts: {'; '.join(problems)}"
        )
