"""The `support_triage` sample agent: classify a support ticket into schema-checked JSON.

The model is asked for {category, priority, summary} matching TRIAGE_SCHEMA, the way any task
with an output schema is (`structured.answer`): on a violation it is asked again (at most twice),
told what was wrong.
Runs on either backend of `backends.py` (input "backend": "anthropic" | "claude_code"). It is
announced as available where either can run (a worker with only Claude Code runs it on
claude_code); without a `backend` in the input it uses the Messages API where it can, else Claude
Code; a task that names a backend this worker cannot use fails saying so, before any call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import structlog

from taskrun.core.agent import AgentError, AgentResult, Readiness, RunContext
from taskrun.core.models import AgentSpec
from taskrun.core.output_schema import parse_reply
from taskrun.core.status import Fault
from taskrun.worker.agents.backends import (
    AnthropicBackend,
    MessagesBackend,
    announced_backends,
    anthropic_api_missing,
    check_input,
    choose_model,
    rehearse_anthropic,
)
from taskrun.worker.agents.claude_cli import ClaudeCodeBackend, claude_code_missing
from taskrun.worker.agents.structured import answer

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
        "backend": {
            "enum": ["anthropic", "claude_code"],
            "description": "default: anthropic where the worker can call the API, else claude_code",
        },
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
"""


def violations(reply: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The parsed triage and an empty list, or None and what is wrong with the reply."""
    value, problems = parse_reply(reply, TRIAGE_SCHEMA)
    if problems or not isinstance(value, dict):
        return None, problems or ["the reply must be a JSON object"]
    return value, []


def ticket_prompt(ticket: dict[str, Any]) -> str:
    return (
        f"Ticket {ticket['ticket_id']}\nSubject: {ticket['subject']}\n\n{ticket['body']}\n\n"
        "Triage this ticket."
    )


def backend_named(
    name: str, log: Any, supervise: Callable[[str], str] | None = None
) -> MessagesBackend:
    """`supervise` (RunContext.supervised_program) starts any child process under the worker's
    supervisor."""
    if name == "anthropic":
        return AnthropicBackend.from_env(log)
    if name == "claude_code":
        return ClaudeCodeBackend(log=log, supervise=supervise)
    raise AgentError(f"unknown backend {name!r}; use 'anthropic' or 'claude_code'")


def backends_missing() -> dict[str, str]:
    """Why each backend cannot run on this worker ("" when it can)."""
    return {"anthropic": anthropic_api_missing(), "claude_code": claude_code_missing()}


def usable_backend(asked: object, missing: dict[str, str]) -> str:
    """The backend a run uses: the one the input names, else the Messages API where it can
    run, else Claude Code. AgentError when the named one cannot run here: the task's fault when
    the other can (this worker serves other triage tasks), the worker's when neither can."""
    if isinstance(asked, str) and asked:
        name = asked
    else:
        name = "claude_code" if missing["anthropic"] and not missing["claude_code"] else "anthropic"
    why = missing.get(name, "")
    if not why:
        return name
    others = [other for other, reason in missing.items() if other != name and not reason]
    if not others:
        raise AgentError(f"backend {name!r} cannot run on this worker: {why}", fault=Fault.WORKER)
    raise AgentError(
        f"input.backend: {name!r} cannot run on this worker ({why}); it has backend "
        f"{others[0]!r}: leave `backend` out to use it, or run the task where {name} can run",
        fault=Fault.TASK,
    )


class SupportTriageAgent:
    """Classifies a ticket (category, priority, summary), retrying on schema violations."""

    def __init__(self) -> None:
        rehearse_anthropic()  # its Messages API backend's first call, as the anthropic agent's
        self.spec = AgentSpec(
            name="support_triage",
            description="Classifies a support ticket into category, priority and a short "
            "summary (JSON checked against a schema); backend anthropic or claude_code.",
            backends=announced_backends(),
            input_schema=json.dumps(INPUT_SCHEMA),
        )

    def readiness(self) -> Readiness:
        """Ready when either backend can run here (the Messages API, or Claude Code)."""
        missing = backends_missing()
        if all(missing.values()):
            why = "; ".join(f"backend {name}: {reason}" for name, reason in missing.items())
            return Readiness(f"neither backend can run here ({why})", announced_backends())
        return Readiness("", announced_backends())

    async def run(self, ctx: RunContext) -> AgentResult:
        check_input(INPUT_SCHEMA, ctx.input)
        name = usable_backend(ctx.input.get("backend"), backends_missing())
        bound = log.bind(
            task_id=ctx.task_id, run_id=ctx.run_id, agent="support_triage", backend=name
        )
        backend = backend_named(name, bound, ctx.supervised_program)
        model = choose_model(ctx.model, ctx.input.get("model"))
        settings = ctx.options.model_settings  # its own system prompt and schema stay
        answered = await answer(
            ctx,
            backend,
            system=SYSTEM_PROMPT,
            messages=[{"role": "user", "content": ticket_prompt(ctx.input)}],
            model=model,
            max_tokens=settings.max_tokens or ctx.input.get("max_tokens", 512),
            temperature=settings.temperature,
            stop=settings.stop_sequences,
            schema=TRIAGE_SCHEMA,
            retries=MAX_RETRIES,
            on_text=ctx.emit,
            log=bound,
            event="triage_attempt",
            schema_name="the triage schema",
            event_data={"backend": name},
        )
        bound.info("ticket triaged", attempts=answered.attempts, **answered.value)
        return AgentResult(
            result={
                "ticket_id": ctx.input["ticket_id"],
                **answered.value,
                "attempts": answered.attempts,
                "backend": name,
            },
            usage=answered.usage,
            backend_used=answered.completion.backend,
        )
